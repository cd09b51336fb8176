//! The scheduling engine: every decision about models, leases and the queue, as a state machine
//! that does no I/O and reads no clock.
//!
//! [`Engine::handle`] takes one [`Input`] (a request, a driver's report, a GPU reading, a timer
//! tick, an idle notification) and the time it happens at, changes the state, and asks for
//! everything slow or outside itself through [`Effects`]: start or stop a backend, emit an event,
//! persist a record, publish the status view. The shell (`shell.rs`) owns the mailbox and
//! implements `Effects` with tasks; the tests (`tests.rs`) implement it with a recorder, so every
//! transition is tested without processes, sockets or sleeps.
//!
//! Where things live: a model's lifecycle in `model.rs` (`Phase`, `Reason`), loads, unloads and
//! releases in `lifecycle.rs`, the queue and admission (the only caller of `policy::decide`) in
//! `queue.rs`, leases in `leases.rs`, external models and CPU placement in `external.rs`, what an
//! Ollama's `/api/ps` says in `ollama.rs`, GPU readings (attribution, pressure) in `sample.rs`,
//! deadlines in `timers.rs`, the status projection in `project.rs`.

mod external;
mod leases;
mod lifecycle;
mod model;
mod namespace;
mod ollama;
mod project;
mod queue;
mod sample;
#[cfg(test)]
mod tests;
mod timers;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use self::model::{Lease, Model, OllamaServer, ReadyCaller, ReadyWaiter, Waiter};
pub(crate) use self::model::{Phase, Placement, Reason};
pub(crate) use self::ollama::OLLAMA_POLL;
use super::gate::ModelGate;
use super::{ArbiterError, ArbiterView, Command, Unloaded};
use crate::backend::process::ProcessHandle;
use crate::config::{ModelSpec, SchedulerConfig};
use crate::events::EventKind;
use crate::monitor::GpuView;
use crate::status::ModelStatus;
use crate::store::ProcessRecord;
use chrono::{DateTime, Utc};

/// What happens to a model's process, Ollama runner or app, asked for by the engine and carried
/// out by a backend driver, which reports back with a [`Command`].
pub(crate) trait Effects {
    /// Publishes an event on the bus.
    fn emit(&mut self, event: EventKind);
    /// Publishes the status view (before answering callers who may read it right after).
    fn publish(&mut self, view: ArbiterView);
    /// Writes to the state database.
    fn persist(&mut self, write: StoreWrite);
    /// Asks the monitor for a fresh reading soon (a model's memory changed).
    fn refresh_readings(&mut self);
    /// Starts a process model (after stopping `previous`, its CPU form, for a promotion).
    /// Reports `Spawned`, then `LoadFinished`, then `Exited`.
    fn start_process(&mut self, start: ProcessStart);
    /// Asks an Ollama to load a model. Reports `OllamaPs` and `LoadFinished`.
    fn start_ollama(&mut self, start: OllamaStart);
    /// Stops a process model and watches its memory come back. Reports `Released`.
    fn release_process(&mut self, release: ProcessRelease);
    /// Asks an Ollama to unload a model and waits until `/api/ps` no longer lists it. Reports
    /// `Released`.
    fn release_ollama(&mut self, release: OllamaRelease);
    /// Reads `path` (model `model`'s weights file) into the page cache in the background, while
    /// the model's load waits for a victim's memory. Reports nothing.
    fn prefetch(&mut self, model: &str, path: &std::path::Path);
    /// Stops the prefetch of `model`'s weights file (its load was abandoned).
    fn cancel_prefetch(&mut self, model: &str);
}

/// What is known of each model's footprint before it runs, by model id.
#[derive(Debug, Clone, Default)]
pub(crate) struct KnownFootprints {
    /// Measured in an earlier run (the largest), corrected where the estimate has changed since.
    pub learned: HashMap<String, u64>,
    /// Estimated from the weights file's header for the configured flags.
    pub estimated: HashMap<String, u64>,
    /// The models whose `learned` figure was scaled from an older measurement: the next
    /// measurement replaces it, smaller or not.
    pub scaled: std::collections::BTreeSet<String>,
    /// Each process model's weights file, for the prefetch during a swap.
    pub weights: HashMap<String, std::path::PathBuf>,
}

impl KnownFootprints {
    /// Combines what the store remembers with this run's estimates. A footprint measured when
    /// the model's estimate was `E0` is kept as measured while the estimate is still `E0`; once
    /// the estimate has changed to `E` (a new context size, another quantization), the
    /// measurement no longer describes the model as configured, and what is learned becomes
    /// `E × measured / E0`: the new estimate with the correction that measurement showed.
    pub(crate) fn new(
        measured: HashMap<String, u64>,
        measured_with_estimate: &HashMap<String, u64>,
        estimated: HashMap<String, u64>,
    ) -> KnownFootprints {
        let mut scaled_models = std::collections::BTreeSet::new();
        let learned = measured
            .into_iter()
            .map(|(model, mib)| {
                let then = measured_with_estimate.get(&model).copied().filter(|e| *e > 0);
                let corrected = match (then, estimated.get(&model)) {
                    (Some(then), Some(&now)) if then != now => {
                        scaled_models.insert(model.clone());
                        let scaled = u128::from(now) * u128::from(mib);
                        u64::try_from(scaled.div_ceil(u128::from(then))).unwrap_or(u64::MAX)
                    }
                    _ => mib,
                };
                (model, corrected)
            })
            .collect();
        KnownFootprints { learned, estimated, scaled: scaled_models, weights: HashMap::new() }
    }
}

/// A write to the state database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoreWrite {
    /// A process was started.
    RecordProcess(ProcessRecord),
    /// A process is gone (stopped, exited, or replaced).
    ForgetProcess(u32),
    /// A model's largest footprint measured so far.
    Footprint { model: String, mib: u64, estimate_mib: Option<u64> },
}

/// Everything a process driver needs to start a model.
pub(crate) struct ProcessStart {
    pub spec: ModelSpec,
    pub generation: u64,
    pub device: Option<u32>,
    pub placement: Placement,
    /// The CPU form to stop first (a promotion), once the requests streaming from it are done.
    pub previous: Option<ProcessHandle>,
    /// The model's gate, to see those requests end.
    pub gate: Arc<ModelGate>,
    pub log_dir: Option<PathBuf>,
}

/// Everything an Ollama driver needs to load a model.
pub(crate) struct OllamaStart {
    pub spec: ModelSpec,
    pub generation: u64,
    pub placement: Placement,
}

/// A process model to stop and watch until its memory is back.
pub(crate) struct ProcessRelease {
    pub model: String,
    pub generation: u64,
    /// `None` when it never spawned (or exited already): only the memory is watched.
    pub handle: Option<ProcessHandle>,
    /// Pids seen using GPU memory for it.
    pub pids: BTreeSet<u32>,
    /// The devices whose process lists must be readable to see its pids gone: the one it was
    /// placed on and every one its pids were seen on (every device's, when empty).
    pub devices: BTreeSet<u32>,
    pub grace: Duration,
    pub limit: Duration,
}

/// An Ollama model to unload.
pub(crate) struct OllamaRelease {
    pub model: String,
    pub generation: u64,
    pub url: String,
    pub name: String,
    pub limit: Duration,
}

/// The parent and process group of processes in a reading, read from `/proc` by the shell (off
/// the engine): a model server's workers are in its group or below its keeper, and a lease's job
/// is below its holder.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProcTable {
    /// pid → (parent pid, process group).
    pub entries: HashMap<u32, (u32, u32)>,
    /// The reading's pids that have no `/proc` entry here: gone already, or from another pid
    /// namespace (vramgate in a container). A pid not named here exists.
    pub missing: BTreeSet<u32>,
}

impl ProcTable {
    fn parent(&self, pid: u32) -> Option<u32> {
        self.entries.get(&pid).map(|e| e.0)
    }
    fn group(&self, pid: u32) -> Option<u32> {
        self.entries.get(&pid).map(|e| e.1)
    }
    /// `pid` and its ancestors, nearest first, a few generations up (a shell wrapper, a worker
    /// pool, a double fork below a keeper).
    fn lineage(&self, pid: u32) -> impl Iterator<Item = u32> + '_ {
        let mut next = Some(pid);
        std::iter::from_fn(move || {
            let current = next?;
            next = self.parent(current).filter(|&p| p > 1);
            Some(current)
        })
        .take(ANCESTRY_DEPTH)
    }
}

/// How many generations of parents attribution walks.
pub(crate) const ANCESTRY_DEPTH: usize = 8;

/// One input to the engine.
pub(crate) enum Input {
    /// A request or a driver's report.
    Command(Command),
    /// A new GPU reading, with the `/proc` facts about its processes.
    Sample(Arc<GpuView>, ProcTable),
    /// The earliest deadline passed.
    Tick,
    /// A model's last pin was dropped.
    Idle,
}

/// What the engine needs from the configuration.
pub struct EngineSettings {
    /// `[scheduler]`.
    pub scheduler: SchedulerConfig,
    /// Where model logs go (`state_dir/logs`).
    pub log_dir: Option<PathBuf>,
    /// `[gpu] critical_pct`: a model demoted to the CPU is promoted back only if the device stays
    /// below it.
    pub critical_pct: f64,
}

/// A command to re-run once a model is neither loading nor unloading (or at a deadline): a
/// request that meets a model mid-transition waits for it rather than fail.
struct Settle {
    model: usize,
    /// When it was asked, and when it gives up (answered with a timeout, never run again: a
    /// deadline already passed must not re-queue the command it came with).
    since: Instant,
    deadline: Instant,
    command: Command,
}

/// The engine's state. One owner: the shell's task (or a test).
pub(crate) struct Engine<E: Effects> {
    fx: E,
    settings: SchedulerConfig,
    log_dir: Option<PathBuf>,
    critical_pct: f64,
    models: Vec<Model>,
    /// Each process model's weights file (for the prefetch during a swap).
    weights: HashMap<String, PathBuf>,
    /// The models whose weights file is being prefetched.
    prefetching: BTreeSet<String>,
    leases: HashMap<String, Lease>,
    queue: Vec<Waiter>,
    next_seq: u64,
    next_lease: u64,
    next_session: u64,
    /// Devices in an emergency episode: relief continues until the level drops below critical.
    pressure: BTreeSet<u32>,
    /// Which model each attributed GPU process belongs to.
    process_models: HashMap<u32, String>,
    /// What an attributed process without a figure from the driver counts as, by (device, pid):
    /// its model's size (see `on_sample`).
    assumed_mib: HashMap<(u32, u32), u64>,
    /// What models count as on a device whose process list could not be read, by device: (model,
    /// MiB) for each model placed there that has processes (see `on_sample`).
    blind_mib: HashMap<u32, Vec<(String, u64)>>,
    /// Which devices list pids from another pid namespace (see `namespace.rs`).
    namespaces: namespace::PidNamespaces,
    /// The reading the last sample processed; decisions use this one.
    seen: Arc<GpuView>,
    /// When the engine started (monotonic and wall clock): gates count milliseconds from it.
    started: Instant,
    started_wall: DateTime<Utc>,
    /// The time of the input being handled.
    now: Instant,
    /// Each Ollama server that models use, by base URL.
    ollama: BTreeMap<String, OllamaServer>,
    /// The mode applied last.
    mode: Option<String>,
    /// GPU memory each lease holder's processes use (last reading), by (holder pid, device).
    holder_usage: HashMap<(u32, u32), u64>,
    /// App processes holding external models on the GPU, with those models (last reading).
    app_pids: HashMap<u32, Vec<String>>,
    /// Commands the engine sends itself, handled after the current input as inputs of their own.
    deferred: VecDeque<Command>,
    /// Commands waiting for a model to settle.
    settling: Vec<Settle>,
}

impl<E: Effects> Engine<E> {
    /// A new engine; models start unloaded with their footprints learned in an earlier run.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        fx: E,
        settings: EngineSettings,
        specs: Vec<ModelSpec>,
        gates: &HashMap<String, Arc<ModelGate>>,
        known: &KnownFootprints,
        first_view: Arc<GpuView>,
        now: Instant,
        started_wall: DateTime<Utc>,
    ) -> Engine<E> {
        let ollama = specs
            .iter()
            .filter_map(ModelSpec::ollama)
            .map(|ollama| (ollama.url.clone(), OllamaServer::default()))
            .collect();
        let models = specs
            .into_iter()
            .filter_map(|spec| {
                let gate = gates.get(&spec.id)?.clone();
                Some(Model::new(spec, gate, known, now))
            })
            .collect();
        Engine {
            fx,
            settings: settings.scheduler,
            log_dir: settings.log_dir,
            critical_pct: settings.critical_pct,
            models,
            weights: known.weights.clone(),
            prefetching: BTreeSet::new(),
            leases: HashMap::new(),
            queue: Vec::new(),
            next_seq: 0,
            next_lease: 0,
            next_session: 0,
            pressure: BTreeSet::new(),
            process_models: HashMap::new(),
            assumed_mib: HashMap::new(),
            blind_mib: HashMap::new(),
            namespaces: namespace::PidNamespaces::default(),
            seen: first_view,
            started: now,
            started_wall,
            now,
            ollama,
            mode: None,
            holder_usage: HashMap::new(),
            app_pids: HashMap::new(),
            deferred: VecDeque::new(),
            settling: Vec::new(),
        }
    }

    /// The effects implementation (the tests read what was asked for).
    #[cfg(test)]
    pub(crate) fn effects(&mut self) -> &mut E {
        &mut self.fx
    }

    /// The Ollama base URLs the models use (the shell watches each one's `/api/ps`).
    pub(crate) fn ollama_urls(&self) -> Vec<String> {
        self.ollama.keys().cloned().collect()
    }

    /// Starts the preloaded and pinned models and takes the first reading.
    pub(crate) fn start(&mut self, view: Arc<GpuView>, procs: ProcTable, now: Instant) {
        self.now = now;
        let preload: Vec<String> =
            self.models.iter().filter(|m| m.spec.preload || m.spec.pinned).map(|m| m.spec.id.clone()).collect();
        for id in preload {
            self.request_load(&id, None, true);
        }
        self.on_sample(view, procs);
        self.settle_pass();
        self.run_deferred();
    }

    /// Handles one input at `now`, then serves the queue and publishes the view; then the
    /// commands the engine sent itself, each as an input of its own.
    pub(crate) fn handle(&mut self, input: Input, now: Instant) {
        self.now = now;
        match input {
            Input::Command(command) => self.on_command(command),
            Input::Sample(view, procs) => self.on_sample(view, procs),
            Input::Tick => self.on_timers(),
            // A model went idle: a waiter may now evict it, a requested unload may go on.
            Input::Idle => self.on_idle(),
        }
        self.settle_pass();
        self.run_deferred();
        self.reconcile_prefetch();
    }

    /// Prefetches the weights file of each model whose load waits for a victim's memory, and
    /// stops the prefetch of a load that was abandoned (no longer waiting, and not started).
    fn reconcile_prefetch(&mut self) {
        if !self.settings.prefetch {
            return;
        }
        let waiting: BTreeSet<String> = self
            .queue
            .iter()
            .filter(|w| !w.awaiting_release.is_empty())
            .filter_map(|w| match &w.pending {
                model::Pending::Load { model } => Some(model.clone()),
                _ => None,
            })
            .filter(|model| self.weights.contains_key(model))
            .collect();
        let new: Vec<String> = waiting.difference(&self.prefetching).cloned().collect();
        for model in new {
            if let Some(path) = self.weights.get(&model) {
                self.fx.prefetch(&model, path);
            }
            self.prefetching.insert(model);
        }
        let done: Vec<String> = self.prefetching.difference(&waiting).cloned().collect();
        for model in done {
            self.prefetching.remove(&model);
            // A load that started reads the file itself: the prefetch may as well go on.
            let started =
                self.index(&model).is_ok_and(|i| matches!(self.models[i].phase, Phase::Loading | Phase::Ready { .. }));
            if !started {
                self.fx.cancel_prefetch(&model);
            }
        }
    }

    /// The commands the engine sent itself, each handled as an input of its own.
    fn run_deferred(&mut self) {
        while let Some(command) = self.deferred.pop_front() {
            self.on_command(command);
            self.settle_pass();
        }
    }

    /// Whether an idle notification can change anything: someone waits in the queue, an unload
    /// waits for requests in flight to end, or a model demoted to its CPU form may go back to the
    /// GPU once idle. Otherwise the shell skips the pass.
    pub(crate) fn wants_idle(&self) -> bool {
        !self.queue.is_empty()
            || self.models.iter().any(|m| {
                m.phase.waits_for_idle()
                    || (m.prefers_gpu && matches!(m.phase, Phase::Ready { .. }) && m.placement == Placement::Cpu)
            })
    }

    /// The pass after every input: commands whose model settled run again, the queue is served,
    /// the view published.
    fn settle_pass(&mut self) {
        let now = self.now;
        let mut index = 0;
        while index < self.settling.len() {
            let settle = &self.settling[index];
            let model = &self.models[settle.model];
            let settled = !matches!(model.phase, Phase::Loading | Phase::Unloading { .. });
            if settled {
                let settle = self.settling.remove(index);
                self.deferred.push_back(settle.command);
            } else if settle.deadline <= now {
                let settle = self.settling.remove(index);
                let error = ArbiterError::Timeout {
                    waited: now.saturating_duration_since(settle.since),
                    message: format!("model {} is still {}", model.spec.id, model.state()),
                };
                settle.command.refuse(error);
            } else {
                index += 1;
            }
        }
        self.schedule();
        self.publish();
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Load { name, explicit, reply } => match self.index(&name) {
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
                Ok(i) => {
                    let id = self.models[i].spec.id.clone();
                    let deadline = self.after(self.settings.queue_timeout.get());
                    self.request_load(&id, Some((deadline, ReadyCaller::Load(reply))), explicit);
                }
            },
            Command::Unload { name, reply } => match self.index(&name) {
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
                Ok(i) => self.request_unload(i, reply),
            },
            Command::Acquire { request, reply } => self.request_lease(request, reply),
            Command::Renew { id, reply } => {
                let now = self.now;
                let result = match self.leases.get_mut(&id) {
                    None => Err(ArbiterError::UnknownLease(id)),
                    Some(lease) => {
                        if let Some(ttl) = lease.ttl {
                            lease.expires = Some(later(now, ttl));
                        }
                        Ok(lease.grant())
                    }
                };
                let _ = reply.send(result);
            }
            Command::Release { id, reason, reply } => {
                let result = self.release_lease(&id, reason);
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Command::Choose { candidates, reply } => {
                let _ = reply.send(self.choose(&candidates));
            }
            Command::PlanInputs { models, reply } => {
                let _ = reply.send(self.plan_inputs(&models));
            }
            Command::Logs { name, reply } => {
                let result = self.index(&name).map(|i| self.models[i].logs.clone());
                let _ = reply.send(result);
            }
            Command::Spawned { model, generation, handle, port } => self.on_spawned(&model, generation, handle, port),
            Command::LoadFinished { model, generation, result } => self.on_load_finished(&model, generation, result),
            Command::Exited { model, generation, exit } => self.on_exited(&model, generation, exit),
            Command::Released { model, generation, timed_out, waited } => {
                self.on_released(&model, generation, timed_out, waited)
            }
            Command::PlaceCpu { name, reply } => self.place_cpu(&name, reply),
            Command::Attach { name, pid, holder, reply } => {
                let _ = reply.send(self.attach(&name, pid, holder));
            }
            Command::Detach { name, session } => self.detach(&name, &session),
            Command::Ack { name, ack, reply } => {
                let _ = reply.send(self.on_ack(&name, ack));
            }
            Command::OllamaPs { url, result } => self.on_ollama_ps(&url, result),
            Command::OneshotEnded { model } => {
                let held = self.leased(&model);
                if let Ok(i) = self.index(&model)
                    && !held
                {
                    self.models[i].oneshot = None;
                }
            }
            Command::ModeApplied { name, reply } => {
                let from = self.mode.replace(name.clone());
                self.fx.emit(EventKind::ModeChanged { from, to: name });
                let _ = reply.send(Ok(()));
            }
        }
    }

    fn index(&self, name: &str) -> Result<usize, ArbiterError> {
        self.models
            .iter()
            .position(|m| m.spec.id == name)
            .or_else(|| self.models.iter().position(|m| m.spec.aliases.iter().any(|a| a == name)))
            .ok_or_else(|| ArbiterError::UnknownModel {
                name: name.to_string(),
                known: self.models.iter().map(|m| m.spec.id.clone()).collect(),
            })
    }

    /// `now + wait`, saturating (see [`later`]).
    fn after(&self, wait: Duration) -> Instant {
        later(self.now, wait)
    }

    /// Milliseconds since the engine started, for the policy's plain-number clock.
    fn millis(&self, t: Instant) -> u64 {
        millis_since(self.started, t)
    }

    /// Answers a model's unload waiters with its status now.
    fn answer_unloaded(&mut self, i: usize) {
        let status = self.model_status(i);
        for reply in self.models[i].unload_waiters.drain(..) {
            let _ = reply.send(Ok(Unloaded { status: status.clone(), was_loaded: true }));
        }
    }

    /// Fails every caller waiting for model `i` to be ready.
    fn fail_ready_waiters(&mut self, i: usize, error: &ArbiterError) {
        let waiters: Vec<ReadyWaiter> = self.models[i].ready_waiters.drain(..).collect();
        for waiter in waiters {
            self.fail_caller(waiter.caller, error.clone());
        }
    }

    /// Tells one caller its request failed. A one-shot claim on an external model that came of
    /// nothing ends with it.
    fn fail_caller(&mut self, caller: ReadyCaller, error: ArbiterError) {
        match caller {
            ReadyCaller::Load(reply) => {
                let _ = reply.send(Err(error));
            }
            ReadyCaller::PlaceCpu(reply) => {
                let _ = reply.send(Err(error));
            }
            ReadyCaller::ModelLease { request, reply, .. } => {
                let _ = reply.send(Err(error));
                if let Some(model) = request.model {
                    self.deferred.push_back(Command::OneshotEnded { model });
                }
            }
        }
    }
}

/// `now + wait`, saturating: a client may ask to wait "forever" (u64 seconds) without
/// overflowing the clock.
pub(crate) fn later(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait).or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600))).unwrap_or(now)
}

/// Milliseconds from `origin` to `t` (zero before it).
pub(crate) fn millis_since(origin: Instant, t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(origin).as_millis()).unwrap_or(u64::MAX)
}

/// A duration in whole milliseconds, saturating.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Answers an unload that found nothing to unload.
fn not_loaded(status: ModelStatus) -> Result<Unloaded, ArbiterError> {
    Ok(Unloaded { status, was_loaded: false })
}
