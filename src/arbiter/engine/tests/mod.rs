//! The engine's transitions as tables (`lifecycle.rs`: a model's phases; `scheduling.rs`: the
//! queue, evictions, leases, fairness, pressure, deadlines), against a recording `Effects`: no processes, no sockets,
//! no sleeps. Time is a plain `Instant` the test moves forward.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::{Notify, oneshot, watch};

use super::*;

mod lifecycle;
mod namespace;
mod readings;
mod scheduling;
use crate::arbiter::gate::Pin;
use crate::arbiter::{Ack, LeaseGrant, LeaseRequest, Loaded};
use crate::backend::process::{LogBuffer, ProcessHandle};
use crate::config::Config;
use crate::events::ModelState;
use crate::gpu::{Level, ProbeKind};
use crate::status::{DeviceStatus, ProcessStatus};

/// What the engine asked for, in order.
#[derive(Default)]
struct Recorder {
    events: Vec<EventKind>,
    views: Vec<ArbiterView>,
    writes: Vec<StoreWrite>,
    /// (model, generation, placement)
    process_starts: Vec<(String, u64, Placement)>,
    ollama_starts: Vec<(String, u64)>,
    /// (model, generation)
    releases: Vec<(String, u64)>,
    /// Each process release's devices whose lists must be readable, in order.
    release_devices: Vec<std::collections::BTreeSet<u32>>,
    refreshes: usize,
    /// (model, true for a prefetch started, false for one stopped)
    prefetches: Vec<(String, bool)>,
}

impl Effects for Recorder {
    fn emit(&mut self, event: EventKind) {
        self.events.push(event);
    }
    fn publish(&mut self, view: ArbiterView) {
        self.views.push(view);
    }
    fn persist(&mut self, write: StoreWrite) {
        self.writes.push(write);
    }
    fn refresh_readings(&mut self) {
        self.refreshes += 1;
    }
    fn start_process(&mut self, start: ProcessStart) {
        self.process_starts.push((start.spec.id.clone(), start.generation, start.placement));
    }
    fn start_ollama(&mut self, start: OllamaStart) {
        self.ollama_starts.push((start.spec.id.clone(), start.generation));
    }
    fn release_process(&mut self, release: ProcessRelease) {
        self.release_devices.push(release.devices.clone());
        self.releases.push((release.model, release.generation));
    }
    fn release_ollama(&mut self, release: OllamaRelease) {
        self.releases.push((release.model, release.generation));
    }
    fn prefetch(&mut self, model: &str, _path: &std::path::Path) {
        self.prefetches.push((model.to_string(), true));
    }
    fn cancel_prefetch(&mut self, model: &str) {
        self.prefetches.push((model.to_string(), false));
    }
}

/// An engine on one simulated device, with the models of a config snippet.
struct Rig {
    engine: Engine<Recorder>,
    gates: HashMap<String, Arc<ModelGate>>,
    now: Instant,
    total_mib: u64,
    next_pid: u32,
}

impl Rig {
    /// `models`: `[models.*]` tables (and any `[scheduler]`); one device of `total_mib`.
    fn new(config: &str, total_mib: u64) -> Rig {
        Rig::with_known(config, total_mib, &KnownFootprints::default())
    }

    /// [`Rig::new`] with footprints known before the start (measured earlier, estimated).
    fn with_known(config: &str, total_mib: u64, known: &KnownFootprints) -> Rig {
        let config = Config::parse(config, None).expect("a valid config");
        let now = Instant::now();
        let idle = Arc::new(Notify::new());
        let specs = config.model_specs();
        let gates: HashMap<String, Arc<ModelGate>> = specs
            .iter()
            .map(|s| (s.id.clone(), ModelGate::new(s.id.clone(), s.upstream_kind(), now, idle.clone())))
            .collect();
        let settings = EngineSettings { scheduler: config.scheduler.clone(), log_dir: None, critical_pct: 90.0 };
        let view = Arc::new(device_view(total_mib, &[]));
        let engine =
            Engine::new(Recorder::default(), settings, specs, &gates, known, view.clone(), now, chrono::Utc::now());
        let mut rig = Rig { engine, gates, now, total_mib, next_pid: 1000 };
        rig.engine.start(view, ProcTable::default(), now);
        rig
    }

    fn fx(&mut self) -> &mut Recorder {
        self.engine.effects()
    }

    fn input(&mut self, input: Input) {
        self.engine.handle(input, self.now);
    }

    fn command(&mut self, command: Command) {
        self.input(Input::Command(command));
    }

    /// Moves the clock and delivers the tick the shell would.
    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.input(Input::Tick);
    }

    fn load(&mut self, name: &str) -> oneshot::Receiver<Result<Loaded, ArbiterError>> {
        let (reply, answer) = oneshot::channel();
        self.command(Command::Load { name: name.into(), explicit: false, reply });
        answer
    }

    fn unload(&mut self, name: &str) -> oneshot::Receiver<Result<Unloaded, ArbiterError>> {
        let (reply, answer) = oneshot::channel();
        self.command(Command::Unload { name: name.into(), reply });
        answer
    }

    fn lease(&mut self, request: LeaseRequest) -> oneshot::Receiver<Result<LeaseGrant, ArbiterError>> {
        let (reply, answer) = oneshot::channel();
        self.command(Command::Acquire { request, reply });
        answer
    }

    fn generation(&mut self, id: &str) -> u64 {
        let i = self.engine.index(id).expect("a configured model");
        self.engine.models[i].generation
    }

    fn phase(&self, id: &str) -> Phase {
        let i = self.engine.index(id).expect("a configured model");
        self.engine.models[i].phase.clone()
    }

    fn state(&self, id: &str) -> ModelState {
        self.phase(id).state()
    }

    /// The driver's reports for a process model that starts and becomes ready.
    fn spawned(&mut self, id: &str) -> u32 {
        let generation = self.generation(id);
        self.next_pid += 1;
        let pid = self.next_pid;
        let (_exit_tx, exit) = watch::channel(None);
        let handle = ProcessHandle { pid, group: pid, start_ticks: 1, exit, logs: LogBuffer::new(None) };
        self.command(Command::Spawned { model: id.into(), generation, handle, port: 40000 });
        pid
    }

    fn finished(&mut self, id: &str, result: Result<(), String>) {
        let generation = self.generation(id);
        self.command(Command::LoadFinished { model: id.into(), generation, result });
    }

    fn ready(&mut self, id: &str) -> u32 {
        let pid = self.spawned(id);
        self.finished(id, Ok(()));
        pid
    }

    fn released(&mut self, id: &str) {
        let generation = self.generation(id);
        self.command(Command::Released { model: id.into(), generation, timed_out: false, waited: Duration::ZERO });
    }

    /// A reading where each (pid, MiB) uses the device.
    fn sample(&mut self, processes: &[(u32, u64)]) {
        let view = Arc::new(device_view(self.total_mib, processes));
        self.input(Input::Sample(view, ProcTable::default()));
    }

    fn pin(&self, id: &str) -> Pin {
        self.gates[id].try_pin().expect("the gate is open")
    }

    /// The `model_state` events so far, as (model, to, reason).
    fn transitions(&mut self) -> Vec<(String, ModelState, String)> {
        self.fx()
            .events
            .iter()
            .filter_map(|e| match e {
                EventKind::ModelState { model, to, reason, .. } => Some((model.clone(), *to, reason.clone())),
                _ => None,
            })
            .collect()
    }
}

fn device_view(total_mib: u64, processes: &[(u32, u64)]) -> GpuView {
    let used: u64 = processes.iter().map(|p| p.1).sum();
    GpuView {
        probe: ProbeKind::Sim,
        devices: vec![DeviceStatus {
            index: 0,
            name: "sim".into(),
            probe: ProbeKind::Sim,
            total_mib,
            used_mib: used,
            free_mib: total_mib.saturating_sub(used),
            usable_mib: total_mib,
            level: Level::Ok,
            utilization_pct: None,
            temperature_c: None,
            processes: processes
                .iter()
                .map(|&(pid, used_mib)| ProcessStatus { pid, used_mib: Some(used_mib), name: "p".into(), model: None })
                .collect(),
            processes_unavailable: None,
            named_consumers: Vec::new(),
            warnings: Vec::new(),
            error: None,
        }],
        degraded_reasons: Vec::new(),
        sampled_at: None,
        read_at: None,
        stale_after: Duration::from_secs(5),
    }
}

/// A memory lease of `mib`, held while the connection lasts, that does not wait.
fn memory_lease(holder: &str, mib: u64) -> LeaseRequest {
    LeaseRequest {
        holder: holder.into(),
        vram_mib: mib,
        device: None,
        exclusive: false,
        priority: 0,
        wait: Duration::ZERO,
        ttl: None,
        model: None,
        pid: None,
    }
}

/// A model lease on `model` that waits up to 30 s for it to load.
fn model_lease(holder: &str, model: &str) -> LeaseRequest {
    LeaseRequest { wait: Duration::from_secs(30), model: Some(model.into()), ..memory_lease(holder, 0) }
}

fn answered<T>(answer: &mut oneshot::Receiver<T>) -> Option<T> {
    answer.try_recv().ok()
}

const TWO_MODELS: &str = r#"
[models.llm]
backend = "process"
cmd = "llm-server"
vram = "6000MiB"
priority = 50
[models.stt]
backend = "process"
cmd = "stt-server"
vram = "3000MiB"
priority = 80
"#;
