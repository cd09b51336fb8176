//! The arbiter's task: owns the mailbox and the engine, turns what arrives (commands, readings,
//! deadlines, idle notifications) into the engine's inputs, and carries out its effects with the
//! backend drivers, the event bus, the state database and the status channel.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::drivers;
use super::engine::{
    Effects, Engine, EngineSettings, Input, KnownFootprints, OllamaRelease, OllamaStart, ProcessRelease, ProcessStart,
    StoreWrite,
};
use super::gate::ModelGate;
use super::{ArbiterHandle, ArbiterView, Command};
use crate::backend::process::Spawner;
use crate::config::{ModeConfig, ModelSpec, SchedulerConfig};
use crate::events::EventBus;
use crate::monitor::{GpuView, Sampler};
use crate::store::{Store, StoreWriter};

/// At shutdown, how long children get after SIGTERM before SIGKILL.
const SHUTDOWN_STOP: Duration = Duration::from_millis(1500);

/// What the arbiter needs from the rest of the daemon.
pub struct ArbiterSettings {
    /// `[scheduler]`.
    pub scheduler: SchedulerConfig,
    /// Models with defaults applied.
    pub models: Vec<ModelSpec>,
    /// Where model logs go (`state_dir/logs`).
    pub log_dir: Option<PathBuf>,
    /// `[aliases]`: names with candidate models in preference order.
    pub aliases: std::collections::BTreeMap<String, Vec<String>>,
    /// `[modes]`.
    pub modes: std::collections::BTreeMap<String, ModeConfig>,
    /// `[gpu] critical_pct`: a model demoted to the CPU is promoted back only if the device stays
    /// below it.
    pub critical_pct: f64,
    /// Each model's footprint estimated from its weights file's header (see `catalog`), in MiB.
    pub estimates: std::collections::HashMap<String, u64>,
    /// Each process model's weights file (see `catalog`), prefetched during a swap.
    pub weights: std::collections::HashMap<String, PathBuf>,
}

/// The effects, carried out for real.
struct ShellEffects {
    bus: EventBus,
    view: watch::Sender<Arc<ArbiterView>>,
    /// Writes on its own thread, in order; a failed write is retried until it succeeds.
    store: StoreWriter,
    sampler: Sampler,
    spawner: Spawner,
    http: reqwest::Client,
    commands: mpsc::Sender<Command>,
    /// The prefetches running, by model: set the flag to stop one.
    prefetches: HashMap<String, Arc<std::sync::atomic::AtomicBool>>,
}

impl Effects for ShellEffects {
    fn emit(&mut self, event: crate::events::EventKind) {
        self.bus.publish(event);
    }

    fn publish(&mut self, mut view: ArbiterView) {
        // Degraded while a write fails, and no longer once one succeeds again.
        if let Some(error) = self.store.write_failure() {
            view.degraded_reasons.insert(0, error);
        }
        self.view.send_replace(Arc::new(view));
    }

    fn persist(&mut self, write: StoreWrite) {
        match write {
            StoreWrite::RecordProcess(record) => self.store.record_process(record),
            StoreWrite::ForgetProcess(pid) => self.store.forget_process(pid),
            StoreWrite::Footprint { model, mib, estimate_mib } => {
                self.store.record_footprint_estimated(&model, mib, estimate_mib)
            }
        }
    }

    fn refresh_readings(&mut self) {
        self.sampler.refresh();
    }

    fn start_process(&mut self, start: ProcessStart) {
        drivers::start_process(start, self.spawner.clone(), self.http.clone(), self.commands.clone());
    }

    fn start_ollama(&mut self, start: OllamaStart) {
        drivers::start_ollama(start, self.http.clone(), self.commands.clone());
    }

    fn release_process(&mut self, release: ProcessRelease) {
        drivers::release_process(release, self.sampler.clone(), self.commands.clone());
    }

    fn release_ollama(&mut self, release: OllamaRelease) {
        drivers::release_ollama(release, self.http.clone(), self.commands.clone());
    }

    fn prefetch(&mut self, model: &str, path: &std::path::Path) {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if let Some(previous) = self.prefetches.insert(model.to_string(), stop.clone()) {
            previous.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let (model, path) = (model.to_string(), path.to_path_buf());
        // File reads: on the blocking pool, never the loop.
        tokio::task::spawn_blocking(move || super::prefetch::read_ahead(&model, &path, &stop));
    }

    fn cancel_prefetch(&mut self, model: &str) {
        if let Some(stop) = self.prefetches.remove(model) {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// The arbiter's task, before it runs.
pub struct Arbiter {
    engine: Engine<ShellEffects>,
    inbox: mpsc::Receiver<Command>,
    gpu: watch::Receiver<Arc<GpuView>>,
    /// Woken by the last unpin of a model (see `gate`).
    idle: Arc<Notify>,
    http: reqwest::Client,
    commands: mpsc::Sender<Command>,
    store: StoreWriter,
    /// Changes when a state-database write fails or succeeds again: status is republished.
    store_failures: watch::Receiver<Option<String>>,
}

impl Arbiter {
    /// Builds the arbiter; [`Arbiter::run`] starts it.
    pub fn new(
        settings: ArbiterSettings,
        gpu: watch::Receiver<Arc<GpuView>>,
        sampler: Sampler,
        store: Store,
        bus: EventBus,
    ) -> std::io::Result<(Arbiter, ArbiterHandle)> {
        let (commands, inbox) = mpsc::channel(1024);
        let (view, view_rx) = watch::channel(Arc::new(ArbiterView::default()));
        let first_view = gpu.borrow().clone();
        let known = KnownFootprints::new(
            store.footprints().unwrap_or_default(),
            &store.footprint_estimates().unwrap_or_default(),
            settings.estimates.clone(),
        );
        let known = KnownFootprints { weights: settings.weights.clone(), ..known };
        let now = Instant::now();
        let idle = Arc::new(Notify::new());
        let gates: HashMap<String, Arc<ModelGate>> = settings
            .models
            .iter()
            .map(|spec| (spec.id.clone(), ModelGate::new(spec.id.clone(), spec.upstream_kind(), now, idle.clone())))
            .collect();
        let mut names: HashMap<String, Arc<ModelGate>> = gates.clone();
        for spec in &settings.models {
            for alias in &spec.aliases {
                if let Some(gate) = gates.get(&spec.id) {
                    names.insert(alias.clone(), gate.clone());
                }
            }
        }
        let http = reqwest::Client::builder().pool_max_idle_per_host(2).build().map_err(std::io::Error::other)?;
        let store = StoreWriter::start(store)?;
        let store_failures = store.failures();
        let fx = ShellEffects {
            bus,
            view,
            store: store.clone(),
            sampler,
            spawner: Spawner::start()?,
            http: http.clone(),
            commands: commands.clone(),
            prefetches: HashMap::new(),
        };
        let engine_settings = EngineSettings {
            scheduler: settings.scheduler,
            log_dir: settings.log_dir,
            critical_pct: settings.critical_pct,
        };
        let mut engine = Engine::new(fx, engine_settings, settings.models, &gates, &known, first_view, now, Utc::now());
        // Status and `/v1/models` list the configured models from the first answer, before the
        // arbiter's task first runs.
        engine.refresh_view();
        let handle = ArbiterHandle {
            commands: commands.clone(),
            view: view_rx,
            gates: Arc::new(names),
            groups: Arc::new(settings.aliases.into_iter().collect()),
            modes: Arc::new(settings.modes),
            mode_switch: Arc::new(tokio::sync::Mutex::new(())),
        };
        Ok((Arbiter { engine, inbox, gpu, idle, http, commands, store, store_failures }, handle))
    }

    /// Runs until `shutdown`, then stops every model process.
    pub fn run(mut self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            for url in self.engine.ollama_urls() {
                tokio::spawn(drivers::watch_ollama(url, self.http.clone(), self.commands.clone(), shutdown.clone()));
            }
            let first = self.gpu.borrow_and_update().clone();
            let procs = proc_table(first.clone()).await;
            self.engine.start(first, procs, Instant::now());
            loop {
                let wake = self.engine.next_deadline();
                let input = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    command = self.inbox.recv() => match command {
                        Some(command) => Input::Command(command),
                        None => break,
                    },
                    changed = self.gpu.changed() => {
                        if changed.is_err() { break; }
                        let view = self.gpu.borrow_and_update().clone();
                        // The /proc reads run on the blocking pool, not on the runtime's threads.
                        let procs = proc_table(view.clone()).await;
                        Input::Sample(view, procs)
                    }
                    _ = sleep_until_opt(wake) => Input::Tick,
                    _ = self.idle.notified() => Input::Idle,
                    changed = self.store_failures.changed(), if self.store_failures.has_changed().is_ok() => {
                        if changed.is_ok() {
                            self.engine.refresh_view();
                        }
                        continue;
                    }
                };
                if matches!(input, Input::Idle) && !self.engine.wants_idle() {
                    // Nobody waits for a model to go idle: only the status (in use, last use)
                    // changed, and the next deadline is recomputed at the top of the loop.
                    self.engine.refresh_view();
                    continue;
                }
                self.engine.handle(input, Instant::now());
            }
            self.shutdown().await;
        })
    }

    /// Stops every model process: SIGTERM to all at once, a bounded grace, then SIGKILL.
    async fn shutdown(&mut self) {
        // Whoever waits is told at once, not after the processes stopped.
        self.engine.refuse_waiting(Instant::now());
        self.engine.cut_all_streams();
        let handles = self.engine.running_processes();
        let stops = handles.iter().map(|(id, handle)| async move {
            let (exit, killed) = handle.stop(SHUTDOWN_STOP).await;
            tracing::info!(model = %id, killed, "stopped ({exit})");
        });
        futures_util::future::join_all(stops).await;
        self.engine.shut_down(Instant::now());
        if let Err(e) = self.store.flush(Duration::from_millis(300)).await {
            tracing::error!("the state database may miss the last changes: {e}");
        }
    }
}

/// The `/proc` facts about a reading's processes, read on the blocking pool.
async fn proc_table(view: Arc<GpuView>) -> super::engine::ProcTable {
    tokio::task::spawn_blocking(move || drivers::read_proc_table(&view)).await.unwrap_or_default()
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}
