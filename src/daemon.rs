//! `vramgate serve`: wires the probe, the monitor and the HTTP API together, and stops them
//! cleanly on SIGINT/SIGTERM.

use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::arbiter::{Arbiter, ArbiterHandle, ArbiterSettings};
use crate::backend::leftovers;
use crate::config::Config;
use crate::events::EventBus;
use crate::events::EventKind;
use crate::gpu;
use crate::monitor::{Monitor, MonitorSettings};
use crate::store::{self, Store};

/// How long open connections get to finish after a shutdown signal before the daemon exits
/// anyway. The whole stop must stay under a second.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(700);
/// How long the arbiter may take to stop model processes at shutdown.
const ARBITER_STOP: Duration = Duration::from_secs(3);

/// Takes the state directory's lock for the daemon's lifetime (released by the OS when the
/// process ends, however it ends).
fn lock_state_dir(state_dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::io::Write;
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create the state directory {}", state_dir.display()))?;
    let path = state_dir.join("daemon.lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .read(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    if file.try_lock().is_err() {
        let owner = std::fs::read_to_string(&path).unwrap_or_default();
        anyhow::bail!(
            "another vramgate daemon (pid {}) already uses the state directory {}; stop it, or give this one its own server.state_dir",
            owner.trim(),
            state_dir.display()
        );
    }
    // A full disk fails here first: name the file, so the user knows which file system to free.
    file.set_len(0)
        .and_then(|_| write!(file, "{}", std::process::id()))
        .with_context(|| format!("cannot write the lock file {}", path.display()))?;
    Ok(file)
}

/// Stops processes that an earlier daemon started and did not stop (it crashed or was killed),
/// before anything is admitted: their memory would otherwise count as foreign forever. All
/// leftovers stop together within one grace period, and neither the `/proc` scans nor the
/// database writes run on the runtime's threads. Returns the store.
async fn reap_leftovers(mut store: Store, bus: &EventBus) -> anyhow::Result<Store> {
    let records = match store.processes() {
        Ok(records) => records,
        Err(e) => {
            tracing::error!("{e}");
            return Ok(store);
        }
    };
    if records.is_empty() {
        return Ok(store);
    }
    let stopped = leftovers::reap_leftovers(&records, leftovers::LEFTOVER_GRACE).await;
    for (recorded, pids) in records.iter().zip(stopped) {
        for pid in pids {
            tracing::warn!(pid, model = %recorded.record.model, "stopped a leftover process of an earlier daemon");
            bus.publish(EventKind::LeftoverReaped { pid, model: recorded.record.model.clone() });
        }
    }
    let pids: Vec<u32> = records.iter().map(|recorded| recorded.record.pid).collect();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = store.forget_processes(&pids) {
            tracing::error!("{e}");
        }
        store
    })
    .await
    .context("the state database task failed")
}

/// Whether this process ignores SIGHUP (started under `nohup`), read from the kernel's view of
/// its signal dispositions: installing a handler would undo what the user asked for.
fn hangup_is_ignored() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| status.lines().find_map(|l| l.strip_prefix("SigIgn:").map(|mask| mask.trim().to_string())))
        .and_then(|mask| u64::from_str_radix(&mask, 16).ok())
        // Signal N is bit N - 1; SIGHUP is 1.
        .is_some_and(|mask| mask & 1 != 0)
}

/// Runs the daemon until a signal. `ready` is called with the bound address once the API
/// accepts connections (the CLI prints it; tests read it to find a port chosen with `:0`).
pub async fn run(config: Config, ready: impl FnOnce(std::net::SocketAddr)) -> anyhow::Result<()> {
    // Signal handlers first, so a SIGTERM during start-up is not lost to the default action.
    let mut sigterm = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    // A closed terminal (SIGHUP) stops the daemon as cleanly as Ctrl-C, so `serve --demo` still
    // removes its temp dir; under `nohup` (SIGHUP ignored) it keeps running, as the user asked.
    let mut sighup = if hangup_is_ignored() {
        None
    } else {
        Some(signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?)
    };

    for warning in config.warnings() {
        tracing::warn!("config: {warning}");
    }
    let opened = gpu::open(&config.gpu)
        .map_err(|e| anyhow::anyhow!("cannot start the GPU probe (gpu.probe = \"{}\"): {e}", config.gpu.probe))?;
    // Probes `auto` skipped on its way to a GPU; when it found none they are degraded reasons,
    // logged once below with the others.
    for skipped in opened.skipped.iter().filter(|s| !opened.degraded_reasons.contains(s)) {
        tracing::info!("probe auto: skipped {skipped}");
    }
    let kind = opened.probe.kind();
    let bus = EventBus::new();
    // Subscribed before anything publishes, so that every event from start-up on is counted.
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new(config.models.keys().cloned()));
    metrics.count_events(bus.subscribe());
    let settings = MonitorSettings::from_config(&config.gpu);
    let history = std::sync::Arc::new(crate::history::History::new(&settings));
    let (monitor, view) = Monitor::start(opened.probe, opened.degraded_reasons, settings, bus.clone()).await;
    {
        let view = view.borrow();
        tracing::info!(probe = kind.as_str(), devices = view.devices.len(), "GPU probe started");
        for reason in &view.degraded_reasons {
            tracing::warn!("degraded: {reason}");
        }
    }

    // Checks that need the real devices (a model's `device` and `vram`).
    let totals: Vec<u64> = view.borrow().devices.iter().map(|d| d.total_mib).collect();
    if kind != gpu::ProbeKind::None || config.models.values().any(|m| m.device.is_some()) {
        config.check_devices(&totals).map_err(|e| anyhow::Error::new(*e))?;
    }

    let state_dir = config.server.state_dir.clone().unwrap_or_else(store::default_state_dir);
    // One daemon per state directory: a second one would take the first one's children for
    // leftovers and stop them.
    let _lock = lock_state_dir(&state_dir)?;
    let store = Store::open(&state_dir).context("cannot open the state database (server.state_dir)")?;
    let store = reap_leftovers(store, &bus).await?;
    let catalog = {
        let specs = config.model_specs();
        let file = config.file().map(std::path::Path::to_path_buf);
        let started = std::time::SystemTime::now();
        // Reads each model's weights-file header: file I/O, on the blocking pool.
        tokio::task::spawn_blocking(move || crate::catalog::Catalog::build(&specs, file.as_deref(), started))
            .await
            .context("reading the models' weights files failed")?
    };
    let settings = ArbiterSettings {
        scheduler: config.scheduler.clone(),
        models: config.model_specs(),
        log_dir: Some(state_dir.join("logs")),
        aliases: config.aliases.clone(),
        modes: config.modes.clone(),
        critical_pct: config.gpu.critical_pct,
        estimates: catalog.estimates(),
        weights: catalog.weights_files(),
    };
    let monitor_sampler = monitor.sampler();
    let (arbiter, arbiter_handle) = Arbiter::new(settings, view.clone(), monitor.sampler(), store, bus.clone())
        .context("cannot start the arbiter")?;

    let listen = config.server.listen;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (server.listen / --listen)"))?;
    let local = listener.local_addr().context("cannot read the bound address")?;

    let shutdown = CancellationToken::new();
    let monitor_task = monitor.run(shutdown.clone());
    let arbiter_task = arbiter.run(shutdown.clone());
    tokio::spawn(crate::history::record(history.clone(), view.clone(), arbiter_handle.clone(), shutdown.clone()));
    if let Some(mode) = config.server.initial_mode.clone() {
        tokio::spawn(apply_initial_mode(arbiter_handle.clone(), bus.clone(), mode, shutdown.clone()));
    }
    let app = api::router(AppState {
        gpu: view,
        arbiter: arbiter_handle,
        queue_timeout: config.scheduler.queue_timeout.get(),
        default_priority: config.defaults.priority,
        upstream: api::proxy::upstream_client(),
        body_budget: api::proxy::BodyBudget::new(
            usize::try_from(config.proxy.buffered_budget().bytes()).unwrap_or(usize::MAX),
        ),
        max_body_bytes: usize::try_from(config.proxy.max_body.bytes()).unwrap_or(usize::MAX),
        first_byte_timeout: (!config.proxy.first_byte_timeout.is_zero()).then(|| config.proxy.first_byte_timeout.get()),
        stall_timeout: (!config.proxy.stall_timeout.is_zero()).then(|| config.proxy.stall_timeout.get()),
        bus,
        shutdown: shutdown.clone(),
        token: config.server.token.clone(),
        catalog: std::sync::Arc::new(catalog),
        cors: api::cors::CorsOrigins::new(&config.server.cors_origins),
        metrics,
        history,
        sampler: monitor_sampler,
    });
    let bounds = api::server::ServerSettings {
        max_connections: usize::try_from(config.server.max_connections).unwrap_or(usize::MAX),
        header_read_timeout: (!config.server.header_read_timeout.is_zero())
            .then(|| config.server.header_read_timeout.get()),
        write_timeout: (!config.proxy.client_timeout.is_zero()).then(|| config.proxy.client_timeout.get()),
    };
    let server = api::server::serve(listener, app, bounds, shutdown.clone());
    ready(local);
    tracing::info!("listening on http://{local}");

    let stopper = shutdown.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = sigterm.recv() => "SIGTERM",
            _ = sigint.recv() => "SIGINT",
            _ = async {
                match sighup.as_mut() {
                    Some(hangup) => hangup.recv().await,
                    None => std::future::pending().await,
                }
            } => "SIGHUP",
        };
        tracing::info!("{name} received: shutting down");
        crate::notify::stopping();
        stopper.cancel();
    });

    tokio::pin!(server);
    let served = tokio::select! {
        () = &mut server => Ok(()),
        _ = async { shutdown.cancelled().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
            tracing::warn!("connections still open after {}: closing them", crate::units::Rounded(SHUTDOWN_GRACE));
            Ok(())
        }
    };
    shutdown.cancel();
    // The arbiter stops model processes (SIGTERM, a bounded grace, SIGKILL) before it returns.
    if tokio::time::timeout(ARBITER_STOP, arbiter_task).await.is_err() {
        tracing::warn!(
            "model processes still stopping after {}; they die with the daemon",
            crate::units::Rounded(ARBITER_STOP)
        );
    }
    let _ = tokio::time::timeout(Duration::from_millis(100), monitor_task).await;
    tracing::info!("stopped");
    served
}

/// Applies `[server] initial_mode`. A mode with external models usually cannot be applied at
/// start-up (no app has attached yet), so a failure is retried each time an app attaches, until
/// the mode holds once or the daemon stops.
async fn apply_initial_mode(arbiter: ArbiterHandle, bus: EventBus, mode: String, shutdown: CancellationToken) {
    let mut events = bus.subscribe();
    loop {
        // A mode chosen since (by a user or an app) wins over the initial one.
        if arbiter.view().mode.is_some() {
            return;
        }
        match arbiter.set_mode(&mode).await {
            Ok(_) => {
                tracing::info!("initial mode {mode} applied");
                return;
            }
            Err(e) => {
                tracing::warn!(
                    "initial mode {mode} (server.initial_mode) not applied yet: {e}; retrying when an app attaches"
                )
            }
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                event = events.recv() => match event {
                    Ok(event) if matches!(&event.kind, EventKind::ExternalAttachment { change, .. } if change == "attached") => break,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    }
}
