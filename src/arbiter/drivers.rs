//! The backend drivers: the tasks that carry out what the engine asks for (start a process or an
//! Ollama model, stop it and watch its memory come back, read an Ollama's `/api/ps`) and report
//! back to it with a [`Command`]. They decide nothing.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Command;
use super::engine::{OllamaRelease, OllamaStart, Placement, ProcTable, ProcessRelease, ProcessStart, later};
use crate::backend::ollama;
use crate::backend::process::{self, SpawnSpec, Spawner};
use crate::monitor::{GpuView, Sampler};
use crate::units::Rounded;

pub(crate) use super::engine::OLLAMA_POLL;

/// How often a release polls the probe while waiting for memory to come back.
const RELEASE_POLL: Duration = Duration::from_millis(5);
/// The longest pause between tries while an Ollama does not answer (backoff from `OLLAMA_POLL`).
const OLLAMA_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Starts a process model: stops the CPU form first (a promotion), picks a port, spawns under a
/// keeper, waits for health and the warmup, then watches for its exit.
pub(crate) fn start_process(
    start: ProcessStart,
    spawner: Spawner,
    http: reqwest::Client,
    commands: mpsc::Sender<Command>,
) {
    tokio::spawn(async move {
        let ProcessStart { spec, generation, device, placement, previous, gate, log_dir } = start;
        let model_id = spec.id.clone();
        let Some(process) = spec.process() else {
            let result = Err(format!("model {model_id} is not a process model"));
            let _ = commands.send(Command::LoadFinished { model: model_id, generation, result }).await;
            return;
        };
        if let Some(previous) = previous {
            // Requests already streaming from the CPU form finish first (the gate is closed, so
            // no new ones start), up to `ready_timeout`. Polled: this runs once per promotion.
            let drain_until = later(Instant::now(), spec.ready_timeout);
            while gate.in_use() > 0 && Instant::now() < drain_until {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // Those still running at the deadline are cut, so the CPU form can exit.
            gate.cut_streams();
            previous.stop(spec.stop_timeout).await;
        }
        let port = match process::free_port() {
            Ok(port) => port,
            Err(e) => {
                let result = Err(format!("cannot find a free port: {e}"));
                let _ = commands.send(Command::LoadFinished { model: model_id, generation, result }).await;
                return;
            }
        };
        let expand = |text: &str| process::expand(text, port, &spec.id, device);
        let mut env: std::collections::BTreeMap<String, String> =
            process.env.iter().map(|(k, v)| (k.clone(), expand(v))).collect();
        if let Some(device) = device {
            env.entry("CUDA_VISIBLE_DEVICES".into()).or_insert_with(|| device.to_string());
            // CUDA numbers devices fastest first unless told otherwise; NVML's index (the one
            // vramgate reserves memory on) is in PCI bus order.
            env.entry("CUDA_DEVICE_ORDER".into()).or_insert_with(|| "PCI_BUS_ID".into());
        }
        env.insert("VRAMGATE_MODEL_ID".into(), spec.id.clone());
        env.insert("VRAMGATE_PORT".into(), port.to_string());
        env.insert("VRAMGATE_PLACEMENT".into(), placement.as_str().into());
        let argv = match (placement, &process.cpu_argv) {
            (Placement::Cpu, Some(cpu_argv)) => cpu_argv,
            _ => &process.argv,
        };
        let spawn_spec = SpawnSpec {
            argv: argv.iter().map(|a| expand(a)).collect(),
            env,
            cwd: process.cwd.clone(),
            log_file: log_dir.as_ref().map(|d| d.join(format!("{}.log", spec.id))),
        };
        let health = process
            .health
            .as_ref()
            .map(|h| if h.starts_with('/') { format!("http://127.0.0.1:{port}{h}") } else { expand(h) });
        let handle = match spawner.spawn(spawn_spec).await {
            Ok(handle) => handle,
            Err(e) => {
                let _ = commands
                    .send(Command::LoadFinished { model: model_id, generation, result: Err(e.to_string()) })
                    .await;
                return;
            }
        };
        let spawned = Command::Spawned { model: model_id.clone(), generation, handle: handle.clone(), port };
        let _ = commands.send(spawned).await;
        let mut result =
            handle.wait_ready(health.as_deref(), spec.ready_timeout, &http).await.map_err(|e| e.to_string());
        if result.is_ok()
            && let Some(warmup) = &spec.warmup
        {
            result = warm_up(&http, &format!("http://127.0.0.1:{port}"), warmup, spec.ready_timeout).await;
            if result.is_err() {
                handle.stop(spec.stop_timeout).await;
            }
        }
        let _ = commands.send(Command::LoadFinished { model: model_id.clone(), generation, result }).await;
        let exit = handle.wait_exit().await;
        let _ = commands.send(Command::Exited { model: model_id, generation, exit }).await;
    });
}

/// Asks Ollama to load the model (kept until vramgate releases it), reads its footprint from
/// `/api/ps`, then sends the warmup if any.
pub(crate) fn start_ollama(start: OllamaStart, http: reqwest::Client, commands: mpsc::Sender<Command>) {
    tokio::spawn(async move {
        let OllamaStart { spec, generation, placement } = start;
        let Some(target) = spec.ollama() else {
            let result = Err(format!("model {} is not an Ollama model", spec.id));
            let _ = commands.send(Command::LoadFinished { model: spec.id.clone(), generation, result }).await;
            return;
        };
        let cpu = placement == Placement::Cpu;
        let mut result =
            ollama::load(&http, &target.url, &target.model, &target.options, cpu, spec.ready_timeout).await;
        if result.is_ok() {
            let listed = ollama::ps(&http, &target.url, Duration::from_secs(5)).await;
            let _ = commands.send(Command::OllamaPs { url: target.url.clone(), result: listed }).await;
            if let Some(warmup) = &spec.warmup {
                result = warm_up(&http, &target.url, warmup, spec.ready_timeout).await;
            }
        }
        let _ = commands.send(Command::LoadFinished { model: spec.id.clone(), generation, result }).await;
    });
}

/// Stops the process (if running) and waits until its memory is back: none of its pids (those
/// seen on the GPU, the command, every member of its group) in the probe's process list (its
/// cheapest call: on NVML the per-process lists, not a whole sample).
pub(crate) fn release_process(release: ProcessRelease, sampler: Sampler, commands: mpsc::Sender<Command>) {
    tokio::spawn(async move {
        let ProcessRelease { model, generation, handle, mut pids, devices, grace, limit } = release;
        if let Some(handle) = &handle {
            pids.insert(handle.pid);
            let group = handle.group;
            let members = tokio::task::spawn_blocking(move || process::group_members(group)).await.unwrap_or_default();
            pids.extend(members);
            let (exit, killed) = handle.stop(grace).await;
            if killed {
                tracing::warn!(model = %model, "did not stop within {} of SIGTERM: killed ({exit})", Rounded(grace));
            }
        }
        let started = Instant::now();
        // Said once per release and per reason, not every poll.
        let mut warned: Option<String> = None;
        let timed_out = loop {
            let listed = tokio::time::timeout(Duration::from_secs(2), sampler.gpu_pids())
                .await
                .unwrap_or_else(|_| Err(crate::gpu::ProbeError("the probe did not answer within 2 s".into())));
            // Complete only when a readable list no longer shows the pids: a list the driver
            // refuses (no permission, a lost device) proves nothing, so the memory stays counted.
            let unreadable = match &listed {
                Ok(lists) if lists.shows_gone(&pids, &devices) => break false,
                Ok(lists) => lists.unreadable_among(&devices),
                Err(e) => Some(e.to_string()),
            };
            if let Some(reason) = unreadable
                && warned.as_ref() != Some(&reason)
            {
                tracing::warn!(
                    model = %model,
                    "cannot read the GPU process list during release ({reason}): its memory stays counted until a \
                     readable list shows its processes gone, or for release_timeout"
                );
                warned = Some(reason);
            }
            if started.elapsed() >= limit {
                break true;
            }
            tokio::time::sleep(RELEASE_POLL).await;
        };
        let waited = started.elapsed();
        let _ = commands.send(Command::Released { model, generation, timed_out, waited }).await;
    });
}

/// Asks Ollama to unload the model and waits until `/api/ps` no longer lists it.
pub(crate) fn release_ollama(release: OllamaRelease, http: reqwest::Client, commands: mpsc::Sender<Command>) {
    tokio::spawn(async move {
        let OllamaRelease { model, generation, url, name, limit } = release;
        let started = Instant::now();
        let timed_out = match ollama::unload(&http, &url, &name, limit).await {
            Ok(gone) => !gone,
            Err(e) => {
                // An Ollama that cannot be reached holds nothing we could free.
                tracing::warn!(model = %model, "release: {e}");
                false
            }
        };
        let waited = started.elapsed();
        let _ = commands.send(Command::Released { model, generation, timed_out, waited }).await;
    });
}

/// Reads an Ollama's `/api/ps` every second while it answers, backing off to
/// `OLLAMA_BACKOFF_MAX` while it does not, and reports each answer.
pub(crate) async fn watch_ollama(
    url: String,
    http: reqwest::Client,
    commands: mpsc::Sender<Command>,
    shutdown: CancellationToken,
) {
    let mut pause = OLLAMA_POLL;
    loop {
        let result = ollama::ps(&http, &url, Duration::from_secs(2)).await;
        pause = next_ollama_pause(pause, result.is_ok());
        if commands.send(Command::OllamaPs { url: url.clone(), result }).await.is_err() {
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// The pause before the next `/api/ps` try: `OLLAMA_POLL` while Ollama answers; after a failure
/// twice the previous pause (2 s after the first), up to `OLLAMA_BACKOFF_MAX`.
fn next_ollama_pause(previous: Duration, answered: bool) -> Duration {
    if answered { OLLAMA_POLL } else { previous.saturating_mul(2).min(OLLAMA_BACKOFF_MAX) }
}

/// Sends the model's warmup request; any answer but 2xx fails the start.
async fn warm_up(
    http: &reqwest::Client,
    base: &str,
    warmup: &crate::config::Warmup,
    limit: Duration,
) -> Result<(), String> {
    let url = format!("{base}{}", warmup.path);
    let response = http
        .post(&url)
        .json(&warmup.body)
        .timeout(limit)
        .send()
        .await
        .map_err(|e| format!("warmup request to {url} failed: {e}"))?;
    let status = response.status();
    // Read the whole answer: a streamed warmup is only done when its body is.
    let body = response.bytes().await.map_err(|e| format!("warmup answer from {url} broke off: {e}"))?;
    if !status.is_success() {
        let shown: String = String::from_utf8_lossy(&body).chars().take(300).collect();
        return Err(format!("warmup request to {url} answered {status}: {shown}"));
    }
    Ok(())
}

/// The parent and group of every process in a reading, and of their ancestors, from `/proc`,
/// and which of the reading's pids have no entry there (blocking file reads: run it on the
/// blocking pool).
pub(crate) fn read_proc_table(view: &GpuView) -> ProcTable {
    let mut table = ProcTable::default();
    for device in &view.devices {
        for p in &device.processes {
            let mut pid = p.pid;
            for _ in 0..super::engine::ANCESTRY_DEPTH {
                if pid <= 1 || table.entries.contains_key(&pid) {
                    break;
                }
                // One read per process: the parent (field 4) and the group (field 5) after the state.
                let Some(stat) = process::proc_stat(pid) else {
                    // A listed pid with no entry here: gone, or from another pid namespace.
                    if pid == p.pid {
                        table.missing.insert(pid);
                    }
                    break;
                };
                let mut fields = process::stat_fields(&stat).into_iter().flatten().skip(1);
                let parent = fields.next().and_then(|v| v.parse::<u32>().ok());
                let group = fields.next().and_then(|v| v.parse::<u32>().ok());
                let (Some(parent), Some(group)) = (parent, group) else { break };
                table.entries.insert(pid, (parent, group));
                pid = parent;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listed pid with no `/proc` entry here (a host pid seen from a container) is named
    /// missing; one that exists is not, and its parent and group are read.
    #[test]
    fn the_proc_table_names_the_listed_pids_that_do_not_exist_here() {
        let me = std::process::id();
        // Above Linux's largest pid: no process has it.
        let elsewhere = (1 << 22) + 7;
        let process = |pid| crate::status::ProcessStatus { pid, used_mib: Some(100), name: "p".into(), model: None };
        let device = crate::status::DeviceStatus {
            index: 0,
            name: "sim".into(),
            probe: crate::gpu::ProbeKind::Sim,
            total_mib: 1000,
            used_mib: 200,
            free_mib: 800,
            usable_mib: 1000,
            level: crate::gpu::Level::Ok,
            utilization_pct: None,
            temperature_c: None,
            processes: vec![process(me), process(elsewhere)],
            processes_unavailable: None,
            named_consumers: Vec::new(),
            warnings: Vec::new(),
            error: None,
        };
        let view = GpuView {
            probe: crate::gpu::ProbeKind::Sim,
            devices: vec![device],
            degraded_reasons: Vec::new(),
            sampled_at: None,
            read_at: None,
            stale_after: Duration::from_secs(5),
        };
        let table = read_proc_table(&view);
        assert_eq!(table.missing.iter().copied().collect::<Vec<u32>>(), vec![elsewhere]);
        assert!(table.entries.contains_key(&me), "{:?}", table.entries);
    }

    #[test]
    fn the_ollama_pause_doubles_from_2_s_to_30_s_and_resets_once_it_answers() {
        let mut pause = OLLAMA_POLL;
        let mut seen = Vec::new();
        for _ in 0..7 {
            pause = next_ollama_pause(pause, false);
            seen.push(pause.as_secs());
        }
        assert_eq!(seen, [2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(next_ollama_pause(pause, true), OLLAMA_POLL);
        assert_eq!(next_ollama_pause(Duration::MAX, false), OLLAMA_BACKOFF_MAX, "no overflow");
    }

    /// The watcher itself, on tokio's paused clock: minutes of an Ollama that never answers pass
    /// in no time, and the tries come at 0, 2, 6, 14, 30, 60, 90 s.
    #[tokio::test(start_paused = true)]
    async fn the_ollama_watcher_backs_off_on_the_clock_it_is_given() {
        // A port nothing listens on: every try fails at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port());
        let url = format!("http://127.0.0.1:{}", port.expect("a free port"));
        let (tx, mut rx) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        let start = tokio::time::Instant::now();
        let watcher = tokio::spawn(watch_ollama(url, reqwest::Client::new(), tx, shutdown.clone()));
        let mut tries = Vec::new();
        while tries.len() < 7 {
            match rx.recv().await {
                Some(Command::OllamaPs { result, .. }) => {
                    assert!(result.is_err(), "nothing answers there");
                    tries.push(start.elapsed().as_secs());
                }
                Some(_) => {}
                None => panic!("the watcher stopped"),
            }
        }
        shutdown.cancel();
        let _ = watcher.await;
        assert_eq!(tries, [0, 2, 6, 14, 30, 60, 90]);
    }
}
