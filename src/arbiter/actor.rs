//! The arbiter's task and its state. See the module docs in `mod.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::gate::{ModelGate, Pin};
use super::{
    Ack, ArbiterError, ArbiterHandle, ArbiterView, Attached, Command, LeaseGrant, LeaseRequest, Loaded, Unloaded,
};
use crate::backend::external::{Action, Attachment, PendingAck};
use crate::backend::ollama::{self, OllamaLoaded};
use crate::backend::process::{self, ProcessHandle, SpawnSpec, Spawner};
use crate::config::{Backend, ModeConfig, ModelSpec, OnEvict, SchedulerConfig};
use crate::events::{EventBus, EventKind, ModelState};
use crate::gpu::Level;
use crate::monitor::{GpuView, Sampler};
use crate::policy::{self, Decision, DeviceState, FAILURES_BEFORE_COOLDOWN, Hold, Request, Resident};
use crate::status::{LeaseStatus, ModelStatus, OllamaModelStatus, OllamaStatus, QueueEntry};
use crate::store::{ProcessRecord, Store};
use crate::units::Rounded;

/// Where a caller waiting for a model to be ready gets its answer.
type ReadyReply = oneshot::Sender<Result<Loaded, ArbiterError>>;

/// How often a release polls the probe while waiting for memory to come back.
const RELEASE_POLL: Duration = Duration::from_millis(5);
/// At shutdown, how long children get after SIGTERM before SIGKILL.
const SHUTDOWN_STOP: Duration = Duration::from_millis(1500);
/// How often a reachable Ollama's `/api/ps` is read (its footprints, models loaded behind
/// vramgate's back, models it dropped).
const OLLAMA_POLL: Duration = Duration::from_secs(1);
/// The longest pause between tries while an Ollama does not answer (backoff from `OLLAMA_POLL`).
const OLLAMA_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Where a loaded model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// On the GPU: its memory is accounted.
    Gpu,
    /// Its CPU form: no GPU memory is accounted for it.
    Cpu,
}

impl Placement {
    fn as_str(self) -> &'static str {
        match self {
            Placement::Gpu => "gpu",
            Placement::Cpu => "cpu",
        }
    }
}

/// What vramgate knows about one Ollama server.
#[derive(Default)]
struct OllamaServer {
    reachable: Option<bool>,
    error: Option<String>,
    loaded: Vec<OllamaLoaded>,
}

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
}

/// One model's state.
struct Model {
    spec: ModelSpec,
    state: ModelState,
    /// Increases with every start, so messages about an earlier process are recognised and
    /// ignored.
    generation: u64,
    device: Option<u32>,
    port: Option<u16>,
    process: Option<ProcessHandle>,
    logs: Option<Arc<process::LogBuffer>>,
    /// The footprint it was admitted with (declared, learned, or the whole device on a first load
    /// without either).
    reserved_mib: u64,
    /// Where it runs (or is being started) while loaded. While unloading: where it runs until
    /// the release is done.
    placement: Placement,
    /// Being released from the GPU only to come back in its CPU form (a demotion).
    then_cpu: bool,
    /// Demoted to the CPU to make room: promoted back when it fits again.
    prefers_gpu: bool,
    /// External models: the app attached to it.
    attachment: Option<Attachment>,
    /// External models: the instruction waiting for the app's acknowledgement.
    pending_ack: Option<PendingAck>,
    /// External models held in the one-shot form (a model lease, no attached app): loaded
    /// without an instruction (the lease holder loads it itself once granted) and released when
    /// the lease ends. The holder's pid, if it gave one, is attributed to the model.
    oneshot: Option<Option<u32>>,
    /// Why it needs attention (shown in status).
    note: Option<String>,
    /// When its state last changed: an `/api/ps` answer older than that may predate the change.
    changed_at: Instant,
    /// Why it is in its state: the reason of the last change that had a cause of its own (the
    /// `released` that ends an unload keeps the cause of the unload, e.g. `evicted_for:vision`).
    state_reason: Option<String>,
    /// The largest footprint measured, from the store and this run.
    learned_mib: Option<u64>,
    /// What its processes use now.
    current_mib: u64,
    /// In-use count, last use and the serving address, shared with the proxy's hot path.
    gate: Arc<ModelGate>,
    /// Whether it was ever used since the daemon started (for `last_used: null`).
    used_once: bool,
    /// Ready, but taking no new requests: a request waited `max_wait_before_swap` for its memory.
    /// In-flight requests finish, then it is evicted; new ones wait behind the swap.
    draining: bool,
    resident_since: Instant,
    failures: u32,
    cooldown_until: Option<Instant>,
    last_error: Option<String>,
    /// Callers waiting for it to be ready, each with its deadline.
    /// Callers waiting for it to be ready: (deadline, asked at, reply).
    ready_waiters: Vec<(Instant, Instant, ReadyReply)>,
    /// Callers waiting for it to be unloaded.
    unload_waiters: Vec<oneshot::Sender<Result<Unloaded, ArbiterError>>>,
    /// Pids seen using GPU memory for it, watched during a release.
    gpu_pids: BTreeSet<u32>,
}

impl Model {
    fn footprint(&self) -> u64 {
        if self.placement == Placement::Cpu && self.state != ModelState::Unloaded {
            return 0;
        }
        self.spec
            .declared_mib
            .unwrap_or(0)
            .max(self.learned_mib.unwrap_or(0))
            .max(self.current_mib)
            .max(if matches!(self.state, ModelState::Loading | ModelState::Unloading) { self.reserved_mib } else { 0 })
    }

    /// When an idle TTL would unload it: ready, unused, not pinned, with a TTL.
    fn idle_expiry(&self, origin: Instant) -> Option<Instant> {
        let idle = self.state == ModelState::Ready && self.gate.in_use() == 0 && !self.spec.pinned;
        if !idle || self.spec.ttl.is_zero() {
            return None;
        }
        // A TTL too large for the clock means "never".
        origin.checked_add(Duration::from_millis(self.gate.last_used_ms()))?.checked_add(self.spec.ttl)
    }

    fn holds_memory(&self) -> bool {
        matches!(self.state, ModelState::Loading | ModelState::Ready | ModelState::Unloading)
    }

    /// Whether its GPU memory is accounted: loaded or moving, on the GPU.
    fn on_gpu(&self) -> bool {
        self.holds_memory() && self.placement == Placement::Gpu
    }

    fn upstream(&self) -> Option<String> {
        match self.spec.backend {
            Backend::Process => self.port.map(|p| format!("http://127.0.0.1:{p}")),
            Backend::Ollama => self.holds_memory().then(|| self.spec.url.clone()),
            Backend::External => None,
        }
    }

    /// Opens its gate: requests may use it. External models are used inside their app, so their
    /// gate carries no address.
    fn open_gate(&self) {
        let on_cpu = self.placement == Placement::Cpu;
        match self.upstream() {
            Some(upstream) => self.gate.open_on(&upstream, on_cpu),
            None if self.spec.backend == Backend::External => self.gate.open_on("", on_cpu),
            None => {}
        }
    }
}

struct Lease {
    grant: LeaseGrant,
    priority: i32,
    expires: Option<Instant>,
    /// The holder's process: its GPU use, and its descendants' (the job `vramgate run` starts),
    /// is the lease's, not foreign, up to the lease's size.
    pid: Option<u32>,
    /// For a model lease: the model kept in use until the lease is dropped.
    _pin: Option<Pin>,
}

enum Pending {
    Load { model: String },
    Lease { request: LeaseRequest, reply: oneshot::Sender<Result<LeaseGrant, ArbiterError>>, deadline: Instant },
}

/// A request in the queue.
struct Waiter {
    seq: u64,
    priority: i32,
    since: Instant,
    pending: Pending,
    /// Models being evicted for it; it is not reconsidered until they are gone, so that one
    /// request never evicts twice for the same deficit.
    awaiting_release: BTreeSet<String>,
    /// The last shortfall message (with numbers), for the timeout error when it waited for
    /// nothing more recent.
    last_shortfall: Option<String>,
    /// What it waits for as of the last `schedule` pass that looked at it (a shortfall with its
    /// numbers, evictions, an earlier waiter, a load slot), for the queue in status.
    waiting_for: Option<String>,
    /// Busy models this waiter has waited on for `max_wait_before_swap`: they take no new
    /// requests while it waits.
    drain: BTreeSet<String>,
    announced: bool,
}

/// The arbiter's state and task.
pub struct Arbiter {
    settings: SchedulerConfig,
    log_dir: Option<PathBuf>,
    models: Vec<Model>,
    leases: HashMap<String, Lease>,
    queue: Vec<Waiter>,
    next_seq: u64,
    next_lease: u64,
    gpu: watch::Receiver<Arc<GpuView>>,
    sampler: Sampler,
    spawner: Spawner,
    http: reqwest::Client,
    store: Store,
    bus: EventBus,
    commands: mpsc::Sender<Command>,
    inbox: mpsc::Receiver<Command>,
    view: watch::Sender<Arc<ArbiterView>>,
    /// Devices in an emergency episode: relief continues until the level drops below critical.
    pressure: BTreeSet<u32>,
    process_models: HashMap<u32, String>,
    /// The reading the last `on_sample` processed; decisions use this one.
    seen: Arc<GpuView>,
    store_error: Option<String>,
    started: Instant,
    started_wall: DateTime<Utc>,
    /// Woken by the last unpin of a model (see `gate`).
    idle: Arc<Notify>,
    /// Each Ollama server that models use, by base URL.
    ollama: std::collections::BTreeMap<String, OllamaServer>,
    /// The mode applied last.
    mode: Option<String>,
    next_session: u64,
    /// See [`ArbiterSettings::critical_pct`].
    critical_pct: f64,
    /// GPU memory each lease holder's processes use (last reading), by (holder pid, device).
    holder_usage: HashMap<(u32, u32), u64>,
    /// App processes holding external models on the GPU, with those models (last reading).
    app_pids: HashMap<u32, Vec<String>>,
}

fn millis_since(origin: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(origin).as_millis() as u64
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
        let aliases = settings.aliases;
        let first_view = gpu.borrow().clone();
        let learned = store.footprints().unwrap_or_default();
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
                names.insert(alias.clone(), gates[&spec.id].clone());
            }
        }
        let ollama = settings
            .models
            .iter()
            .filter(|m| m.backend == Backend::Ollama)
            .map(|m| (m.url.clone(), OllamaServer::default()))
            .collect();
        let models = settings
            .models
            .into_iter()
            .map(|spec| Model {
                learned_mib: learned.get(&spec.id).copied(),
                gate: gates[&spec.id].clone(),
                spec,
                state: ModelState::Unloaded,
                generation: 0,
                device: None,
                port: None,
                process: None,
                logs: None,
                reserved_mib: 0,
                current_mib: 0,
                used_once: false,
                draining: false,
                resident_since: now,
                failures: 0,
                cooldown_until: None,
                last_error: None,
                ready_waiters: Vec::new(),
                unload_waiters: Vec::new(),
                gpu_pids: BTreeSet::new(),
                placement: Placement::Gpu,
                then_cpu: false,
                prefers_gpu: false,
                attachment: None,
                pending_ack: None,
                oneshot: None,
                note: None,
                changed_at: now,
                state_reason: None,
            })
            .collect();
        let arbiter = Arbiter {
            settings: settings.scheduler,
            log_dir: settings.log_dir,
            models,
            leases: HashMap::new(),
            queue: Vec::new(),
            next_seq: 0,
            next_lease: 0,
            gpu,
            sampler,
            spawner: Spawner::start()?,
            http: reqwest::Client::builder().pool_max_idle_per_host(2).build().map_err(std::io::Error::other)?,
            store,
            bus,
            commands: commands.clone(),
            inbox,
            view,
            pressure: BTreeSet::new(),
            process_models: HashMap::new(),
            seen: first_view,
            store_error: None,
            started: now,
            started_wall: Utc::now(),
            idle,
            ollama,
            mode: None,
            next_session: 0,
            critical_pct: settings.critical_pct,
            holder_usage: HashMap::new(),
            app_pids: HashMap::new(),
        };
        let groups = Arc::new(aliases.into_iter().collect());
        let handle = ArbiterHandle {
            commands,
            view: view_rx,
            gates: Arc::new(names),
            groups,
            modes: Arc::new(settings.modes),
            mode_switch: Arc::new(tokio::sync::Mutex::new(())),
        };
        Ok((arbiter, handle))
    }

    /// Runs until `shutdown`, then stops every model process.
    pub fn run(mut self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let preload: Vec<String> =
                self.models.iter().filter(|m| m.spec.preload || m.spec.pinned).map(|m| m.spec.id.clone()).collect();
            for id in preload {
                self.request_load(&id, None, true);
            }
            for url in self.ollama.keys() {
                tokio::spawn(watch_ollama(url.clone(), self.http.clone(), self.commands.clone(), shutdown.clone()));
            }
            self.on_sample();
            self.schedule();
            self.publish();
            loop {
                let wake = self.next_deadline();
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    command = self.inbox.recv() => match command {
                        Some(command) => self.handle(command),
                        None => break,
                    },
                    changed = self.gpu.changed() => {
                        if changed.is_err() { break; }
                        self.on_sample();
                    }
                    _ = sleep_until_opt(wake) => self.on_timers(),
                    // A model went idle: a waiter may now evict it.
                    _ = self.idle.notified() => {}
                }
                self.schedule();
                self.publish();
            }
            self.shutdown().await;
        })
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

    fn handle(&mut self, command: Command) {
        match command {
            Command::Load { name, explicit, reply } => match self.index(&name) {
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
                Ok(i) => {
                    let id = self.models[i].spec.id.clone();
                    let deadline = deadline_after(self.settings.queue_timeout.get());
                    self.request_load(&id, Some((deadline, reply)), explicit);
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
                let result = match self.leases.get_mut(&id) {
                    None => Err(ArbiterError::UnknownLease(id)),
                    Some(lease) => {
                        if let Some(ttl) = lease.grant.ttl_ms {
                            lease.expires = Some(deadline_after(Duration::from_millis(ttl)));
                        }
                        Ok(lease.grant.clone())
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
            Command::GrantModelLease { request, pin, reply } => {
                let device = self.index(pin.model_id()).ok().and_then(|i| self.models[i].device);
                let grant = self.grant_lease(request, device, Some(pin));
                if let Err(Ok(grant)) = reply.send(Ok(grant)) {
                    let _ = self.release_lease(&grant.id, "disconnected");
                }
            }
            Command::Choose { candidates, reply } => {
                let _ = reply.send(self.choose(&candidates));
            }
            Command::Logs { name, reply } => {
                let result = self.index(&name).map(|i| self.models[i].logs.clone());
                let _ = reply.send(result);
            }
            Command::Spawned { model, generation, handle } => self.on_spawned(&model, generation, handle),
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
                let held = self.leases.values().any(|l| l.grant.model.as_deref() == Some(model.as_str()));
                if let Ok(i) = self.index(&model)
                    && !held
                {
                    self.models[i].oneshot = None;
                }
            }
            Command::ModeApplied { name, reply } => {
                let from = self.mode.replace(name.clone());
                self.bus.publish(EventKind::ModeChanged { from, to: name });
                let _ = reply.send(Ok(()));
            }
        }
    }

    // ----- placement -----

    /// Puts a model in its CPU form: loads it there, or demotes it from the GPU. Answered when
    /// it serves from the CPU.
    fn place_cpu(&mut self, name: &str, reply: oneshot::Sender<Result<ModelStatus, ArbiterError>>) {
        let i = match self.index(name) {
            Ok(i) => i,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let model = &self.models[i];
        let id = model.spec.id.clone();
        if !model.spec.has_cpu_form() {
            let _ = reply.send(Err(ArbiterError::Invalid(format!(
                "model {id} has no CPU form: set models.{id}.cpu_cmd (e.g. llama-server with -ngl 0)"
            ))));
            return;
        }
        if model.oneshot.is_some() {
            let _ = reply.send(Err(ArbiterError::Conflict(format!(
                "model {id} is held by a lease in the one-shot form: its holder cannot be told to move it; \
                 release the lease first"
            ))));
            return;
        }
        // The caller waits like a load caller; the pin in the answer is dropped at once.
        let (ready, answer) = oneshot::channel();
        let deadline = deadline_after(
            model.spec.ready_timeout.saturating_add(model.spec.stop_timeout).saturating_add(model.spec.release_timeout),
        );
        match (model.state, model.placement) {
            (ModelState::Ready, Placement::Cpu) => {
                // Where it was asked to be: no promotion back by itself.
                self.models[i].prefers_gpu = false;
                let _ = reply.send(Ok(self.model_status(i)));
                return;
            }
            (ModelState::Loading | ModelState::Unloading, _) => {
                // Placed once the load or unload in progress is done.
                self.when_settled(&id, deadline, move |name| Command::PlaceCpu { name, reply });
                return;
            }
            (ModelState::Ready, Placement::Gpu) if self.leased(&id) => {
                let _ = reply.send(Err(self.leased_error(&id, "placed on the CPU")));
                return;
            }
            (ModelState::Ready, Placement::Gpu) => {
                self.models[i].ready_waiters.push((deadline, Instant::now(), ready));
                self.demote(i, "mode".into(), true);
            }
            (ModelState::Unloaded | ModelState::Failed, _) => {
                self.models[i].ready_waiters.push((deadline, Instant::now(), ready));
                self.start_load(i, None, 0, Placement::Cpu);
            }
        }
        tokio::spawn(async move {
            let result = match answer.await {
                Ok(result) => result.map(|loaded| loaded.status),
                Err(_) => Err(ArbiterError::ShuttingDown),
            };
            let _ = reply.send(result);
        });
    }

    /// Whether a model lease holds the model (its holder was given the model's address).
    fn leased(&self, id: &str) -> bool {
        self.leases.values().any(|l| l.grant.model.as_deref() == Some(id))
    }

    fn leased_error(&self, id: &str, what: &str) -> ArbiterError {
        let holders: Vec<&str> = self
            .leases
            .values()
            .filter(|l| l.grant.model.as_deref() == Some(id))
            .map(|l| l.grant.holder.as_str())
            .collect();
        ArbiterError::Conflict(format!(
            "model {id} cannot be {what} while model leases hold it (holders: {}): their holders talk to its \
             server directly; release the leases first",
            holders.join(", ")
        ))
    }

    /// Sends a command again once the model is neither loading nor unloading (or at `deadline`),
    /// for requests that must wait for a transition in progress rather than fail.
    fn when_settled(&self, id: &str, deadline: Instant, command: impl FnOnce(String) -> Command + Send + 'static) {
        let mut view = self.view.subscribe();
        let commands = self.commands.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let settled = |view: &ArbiterView| {
                view.models.iter().find(|m| m.id == id).is_none_or(|m| m.state != "loading" && m.state != "unloading")
            };
            let _ = tokio::time::timeout_at(deadline.into(), view.wait_for(|v| settled(v))).await;
            let _ = commands.send(command(id)).await;
        });
    }

    /// Moves a ready GPU model to its CPU form: the GPU form is released first, then the CPU form
    /// started (one instruction for an external model). `forced`: a mode or user asked, so it
    /// goes even while requests use it; else only if idle. Returns whether it started.
    fn demote(&mut self, i: usize, reason: String, forced: bool) -> bool {
        if forced {
            self.models[i].gate.close();
        } else if !self.models[i].gate.close_if_idle() {
            return false;
        }
        self.models[i].then_cpu = true;
        self.models[i].prefers_gpu = !forced;
        self.set_state(i, ModelState::Unloading, reason, None);
        self.begin_release_task(i);
        true
    }

    // ----- external models -----

    fn attach(&mut self, name: &str, pid: Option<u32>, holder: String) -> Result<Attached, ArbiterError> {
        let i = self.index(name)?;
        let model = &mut self.models[i];
        let id = model.spec.id.clone();
        if model.spec.backend != Backend::External {
            return Err(ArbiterError::Invalid(format!(
                "model {id} has backend = \"{}\"; only external models take an attached app",
                model.spec.backend.as_str()
            )));
        }
        if let Some(current) = &model.attachment
            && !current.instructions.is_closed()
        {
            let who = match current.pid {
                Some(pid) => format!("{} (pid {pid})", current.holder),
                None => current.holder.clone(),
            };
            return Err(ArbiterError::Conflict(format!("model {id} already has an app attached: {who}")));
        }
        if let Some(stale) = model.attachment.as_ref().map(|a| a.session.clone()) {
            self.detach(&id, &stale);
        }
        self.next_session += 1;
        let session = format!("att-{}", self.next_session);
        let (sender, instructions) = mpsc::unbounded_channel();
        let model = &mut self.models[i];
        model.attachment = Some(Attachment {
            session: session.clone(),
            holder: holder.clone(),
            pid,
            instructions: sender,
            last_seq: 0,
        });
        model.note = None;
        // Loads tried before any app was attached failed for that reason only: start afresh.
        model.failures = 0;
        model.cooldown_until = None;
        model.last_error = None;
        if model.state == ModelState::Failed {
            self.set_state(i, ModelState::Unloaded, "attached".into(), None);
        }
        self.bus.publish(EventKind::ExternalAttachment { model: id.clone(), change: "attached".into(), holder, pid });
        let model = &self.models[i];
        if model.spec.preload || model.spec.pinned {
            self.request_load(&id, None, true);
        }
        Ok(Attached { session, instructions })
    }

    /// The app's stream is gone: everything it held is released.
    fn detach(&mut self, name: &str, session: &str) {
        let Ok(i) = self.index(name) else { return };
        let model = &mut self.models[i];
        if model.attachment.as_ref().is_none_or(|a| a.session != session) {
            return;
        }
        let Some(attachment) = model.attachment.take() else { return };
        model.pending_ack = None;
        let id = model.spec.id.clone();
        self.bus.publish(EventKind::ExternalAttachment {
            model: id.clone(),
            change: "detached".into(),
            holder: attachment.holder,
            pid: attachment.pid,
        });
        if self.models[i].holds_memory() {
            let error = ArbiterError::Cancelled(format!("the app attached to model {id} disconnected"));
            for (_, _, reply) in self.models[i].ready_waiters.drain(..) {
                let _ = reply.send(Err(error.clone()));
            }
            self.finish_release(i, "detached");
        }
    }

    /// Sends an instruction to the attached app and starts its acknowledgement clock. False if
    /// no app is attached (or its stream is gone).
    fn instruct(&mut self, i: usize, action: Action) -> bool {
        let model = &mut self.models[i];
        let Some(seq) = model.attachment.as_mut().and_then(|a| a.send(action)) else {
            return false;
        };
        model.pending_ack = Some(PendingAck { seq, action, deadline: deadline_after(model.spec.ack_timeout) });
        true
    }

    fn on_ack(&mut self, name: &str, ack: Ack) -> Result<(), ArbiterError> {
        let i = self.index(name)?;
        let model = &mut self.models[i];
        let id = model.spec.id.clone();
        if model.attachment.as_ref().is_none_or(|a| a.session != ack.session) {
            return Err(ArbiterError::NotFound(format!(
                "no attachment {:?} on model {id} (it was detached or replaced)",
                ack.session
            )));
        }
        let Some(pending) = model.pending_ack.take_if(|p| p.seq == ack.seq) else {
            return Err(ArbiterError::NotFound(format!(
                "instruction {} of model {id} is not waiting for an acknowledgement (answered already, or timed out)",
                ack.seq
            )));
        };
        let generation = model.generation;
        let failure = (!ack.ok).then(|| {
            let why = ack.error.clone().unwrap_or_else(|| "no reason given".into());
            format!("the app could not carry out `{}`: {why}", pending.action.as_str())
        });
        match (model.state, pending.action) {
            (ModelState::Loading, Action::Gpu | Action::Cpu) => {
                self.on_load_finished(&id, generation, failure.map_or(Ok(()), Err));
            }
            (ModelState::Unloading, Action::Gpu | Action::Cpu) if !model.then_cpu => {
                // Unloaded while the app was placing it: now release it.
                self.begin_release_task(i);
            }
            (ModelState::Unloading, Action::Cpu) => match failure {
                None => {
                    // Demoted in one step: it serves from the CPU now.
                    let model = &mut self.models[i];
                    model.then_cpu = false;
                    model.placement = Placement::Cpu;
                    model.current_mib = 0;
                    model.open_gate();
                    self.set_state(i, ModelState::Ready, "demoted".into(), None);
                    self.bus.publish(EventKind::ModelPlaced {
                        model: id.clone(),
                        placement: "cpu".into(),
                        reason: "demoted".into(),
                    });
                    self.memory_released(&id);
                    self.answer_ready(i);
                }
                Some(message) => {
                    // The app cannot move it to the CPU: release it instead (asking again would
                    // only get the same answer).
                    let model = &mut self.models[i];
                    model.then_cpu = false;
                    model.note = Some(message.clone());
                    for (_, _, reply) in model.ready_waiters.drain(..) {
                        let _ =
                            reply.send(Err(ArbiterError::StartFailed { model: id.clone(), message: message.clone() }));
                    }
                    self.begin_release_task(i);
                }
            },
            (ModelState::Unloading, Action::Release) => {
                if let Some(message) = failure {
                    // Its memory is measured (the app's process) whatever it says; note it.
                    self.models[i].note = Some(message);
                }
                self.on_released(&id, generation, false, Duration::ZERO);
            }
            _ => {}
        }
        Ok(())
    }

    /// An instruction went unanswered: the app is marked unresponsive and its model no longer
    /// counted on (what its process really uses is still measured, as foreign use).
    fn unresponsive(&mut self, i: usize, pending: PendingAck) {
        let model = &mut self.models[i];
        let id = model.spec.id.clone();
        let waited = model.spec.ack_timeout;
        let message = format!(
            "unresponsive: the attached app did not acknowledge `{}` within {}",
            pending.action.as_str(),
            Rounded(waited)
        );
        model.note = Some(message.clone());
        model.last_error = Some(message.clone());
        model.then_cpu = false;
        model.gate.close();
        self.bus.publish(EventKind::ExternalUnresponsive {
            model: id.clone(),
            action: pending.action.as_str().into(),
            waited_ms: waited.as_millis() as u64,
        });
        let error = ArbiterError::StartFailed { model: id.clone(), message: message.clone() };
        for (_, _, reply) in self.models[i].ready_waiters.drain(..) {
            let _ = reply.send(Err(error.clone()));
        }
        let model = &mut self.models[i];
        model.current_mib = 0;
        model.reserved_mib = 0;
        self.set_state(i, ModelState::Failed, "unresponsive".into(), Some(message));
        self.models[i].device = None;
        self.memory_released(&id);
        let status = self.model_status(i);
        for reply in self.models[i].unload_waiters.drain(..) {
            let _ = reply.send(Ok(Unloaded { status: status.clone(), was_loaded: true }));
        }
    }

    /// Whether another model on the same Ollama already holds the runner named `name` (two
    /// vramgate models with the same `ollama_model`, e.g. with different options).
    fn ollama_entry_held(&self, url: &str, name: &str, except: usize) -> bool {
        self.models.iter().enumerate().any(|(j, m)| {
            j != except
                && m.spec.backend == Backend::Ollama
                && m.spec.url == url
                && m.holds_memory()
                && m.spec.ollama_model.as_deref().is_some_and(|n| ollama::same_model(n, name))
        })
    }

    /// Takes an Ollama model that Ollama has loaded as ready (on the GPU if it holds GPU memory).
    fn adopt_ollama(&mut self, i: usize, vram_mib: u64) {
        let device = self.models[i].spec.device.or_else(|| self.seen.devices.first().map(|d| d.index));
        let model = &mut self.models[i];
        model.generation += 1;
        model.placement = if vram_mib > 0 { Placement::Gpu } else { Placement::Cpu };
        model.device = device;
        model.current_mib = vram_mib;
        model.reserved_mib = 0;
        model.then_cpu = false;
        model.prefers_gpu = false;
        model.resident_since = Instant::now();
        model.used_once = true;
        model.gate.touch();
        model.open_gate();
        let placement = model.placement;
        self.set_state(i, ModelState::Ready, "adopted".into(), None);
        self.bus.publish(EventKind::ModelPlaced {
            model: self.models[i].spec.id.clone(),
            placement: placement.as_str().into(),
            reason: "adopted".into(),
        });
        // Whoever waits for it (a queued load) is served now.
        self.answer_ready(i);
    }

    /// Ends a model's residency at once (its app went away): nothing to stop or wait for.
    fn finish_release(&mut self, i: usize, reason: &str) {
        let id = self.models[i].spec.id.clone();
        let model = &mut self.models[i];
        model.gate.close();
        model.current_mib = 0;
        model.reserved_mib = 0;
        model.then_cpu = false;
        model.draining = false;
        self.set_state(i, ModelState::Unloaded, reason.into(), None);
        self.models[i].device = None;
        self.memory_released(&id);
        let status = self.model_status(i);
        for reply in self.models[i].unload_waiters.drain(..) {
            let _ = reply.send(Ok(Unloaded { status: status.clone(), was_loaded: true }));
        }
    }

    /// The lease holder among `holders` (the `pid`s of memory leases on one device) that is this
    /// process or one of its ancestors.
    fn lease_holder_of(pid: u32, holders: &BTreeSet<u32>) -> Option<u32> {
        if holders.is_empty() {
            return None;
        }
        let mut current = pid;
        // A job's processes are its holder's descendants; a few generations cover a shell
        // wrapper and a worker pool.
        for _ in 0..8 {
            if holders.contains(&current) {
                return Some(current);
            }
            current = process::proc_stat_field(current, 4)? as u32;
            if current <= 1 {
                return None;
            }
        }
        None
    }

    /// Waiters that were waiting for this model's memory may go on.
    fn memory_released(&mut self, id: &str) {
        // Whatever its processes still use (an app that moved a model to the CPU but kept the
        // memory cached) is foreign from now on, not invisible until the next reading.
        self.process_models.retain(|_, model| model != id);
        // An app process shared with other models is counted whole as foreign until the next
        // reading splits it again (its other models keep their share meanwhile: counted twice,
        // the safe way).
        for (pid, models) in &self.app_pids {
            if models.iter().any(|m| m == id) {
                self.process_models.remove(pid);
            }
        }
        for name in self.queue.iter_mut().map(|w| &mut w.awaiting_release) {
            name.remove(id);
        }
        self.sampler.refresh();
    }

    // ----- Ollama -----

    fn on_ollama_ps(&mut self, url: &str, result: Result<Vec<OllamaLoaded>, String>) {
        let Some(server) = self.ollama.get_mut(url) else { return };
        let was = server.reachable;
        match result {
            Ok(loaded) => {
                server.reachable = Some(true);
                server.error = None;
                server.loaded = loaded.clone();
                if was == Some(false) {
                    self.bus.publish(EventKind::OllamaReachability { url: url.into(), reachable: true, error: None });
                }
                for i in 0..self.models.len() {
                    let model = &self.models[i];
                    if model.spec.backend != Backend::Ollama || model.spec.url != url {
                        continue;
                    }
                    let name = model.spec.ollama_model.clone().unwrap_or_default();
                    let listed = loaded.iter().find(|m| ollama::same_model(&m.name, &name));
                    // An answer may have been on its way while the model changed state (a load
                    // finished, a release completed): only a settled model is judged by it.
                    let settled = model.changed_at.elapsed() > 2 * OLLAMA_POLL;
                    let held_by_another = self.ollama_entry_held(url, &name, i);
                    let model = &mut self.models[i];
                    if model.note.take().is_some() && model.state == ModelState::Failed {
                        // Its Ollama answers again: it may load on the next demand, or it is
                        // still loaded there (vramgate asked for keep_alive -1), and is adopted.
                        model.failures = 0;
                        model.cooldown_until = None;
                        model.last_error = None;
                        match listed {
                            Some(entry) => self.adopt_ollama(i, entry.vram_mib),
                            None => self.set_state(i, ModelState::Unloaded, "ollama_back".into(), None),
                        }
                        continue;
                    }
                    match (model.state, listed) {
                        (ModelState::Unloaded | ModelState::Failed, Some(entry)) if settled && !held_by_another => {
                            // Loaded with vramgate's name but not by vramgate now (a release that
                            // could not reach Ollama, or a load by hand): it is this model, so it
                            // is counted and idles out like one.
                            self.adopt_ollama(i, entry.vram_mib);
                        }
                        (ModelState::Ready | ModelState::Loading, Some(entry)) => {
                            model.current_mib = entry.vram_mib;
                            if model.state == ModelState::Ready
                                && model.placement == Placement::Gpu
                                && entry.vram_mib > model.learned_mib.unwrap_or(0)
                            {
                                model.learned_mib = Some(entry.vram_mib);
                                if let Err(e) = self.store.record_footprint(&model.spec.id, entry.vram_mib) {
                                    tracing::error!("{e}");
                                    self.store_error = Some(e.to_string());
                                }
                            }
                        }
                        (ModelState::Ready, None) if model.gate.in_use() == 0 && settled => {
                            // Unloaded behind vramgate's back (or Ollama restarted).
                            model.gate.close();
                            model.current_mib = 0;
                            self.set_state(i, ModelState::Unloaded, "gone_from_ollama".into(), None);
                            self.models[i].device = None;
                            let id = self.models[i].spec.id.clone();
                            self.memory_released(&id);
                        }
                        _ => {}
                    }
                }
            }
            Err(error) => {
                server.reachable = Some(false);
                server.error = Some(error.clone());
                server.loaded.clear();
                if was != Some(false) {
                    tracing::warn!("{error}");
                    self.bus.publish(EventKind::OllamaReachability {
                        url: url.into(),
                        reachable: false,
                        error: Some(error.clone()),
                    });
                }
                for i in 0..self.models.len() {
                    let model = &mut self.models[i];
                    if model.spec.backend != Backend::Ollama || model.spec.url != url || model.note.is_some() {
                        continue;
                    }
                    if model.state == ModelState::Loading || model.state == ModelState::Unloading {
                        // Its own request will fail and be handled there.
                        continue;
                    }
                    let id = model.spec.id.clone();
                    let message = format!("{error} (retrying with backoff)");
                    model.note = Some(message.clone());
                    model.last_error = Some(message.clone());
                    model.gate.close();
                    model.current_mib = 0;
                    let error = ArbiterError::StartFailed { model: id.clone(), message: message.clone() };
                    for (_, _, reply) in model.ready_waiters.drain(..) {
                        let _ = reply.send(Err(error.clone()));
                    }
                    if model.state != ModelState::Failed {
                        self.set_state(i, ModelState::Failed, "ollama_unreachable".into(), Some(message));
                    }
                    self.models[i].device = None;
                    self.memory_released(&id);
                }
            }
        }
    }

    // ----- models -----

    /// A load request: answered at once if ready, attached to the load in progress, or queued.
    /// The error for a demand during a failed model's cooldown, if it is in one.
    fn cooldown_error(&self, i: usize) -> Option<ArbiterError> {
        let model = &self.models[i];
        let now = Instant::now();
        let until = model.cooldown_until.filter(|t| *t > now && model.state == ModelState::Failed)?;
        Some(ArbiterError::Cooldown {
            model: model.spec.id.clone(),
            failures: model.failures,
            retry_in: until.saturating_duration_since(now),
            last_error: model.last_error.clone().unwrap_or_default(),
        })
    }

    fn request_load(&mut self, id: &str, caller: Option<(Instant, ReadyReply)>, explicit: bool) {
        let Ok(i) = self.index(id) else { return };
        let now = Instant::now();
        let leased = self.leased(id);
        let model = &mut self.models[i];
        let moving_to_cpu = (model.state == ModelState::Unloading && model.then_cpu)
            || (model.state == ModelState::Loading && model.placement == Placement::Cpu);
        if explicit && moving_to_cpu {
            // A user's load means the GPU: once the CPU form is up, it is promoted.
            if let Some((deadline, reply)) = caller {
                self.when_settled(id, deadline, move |name| Command::Load { name, explicit: true, reply });
            }
            return;
        }
        match model.state {
            ModelState::Ready if model.draining => {
                // It is being swapped out: wait for it behind the swap, then load it again.
                if let Some((deadline, reply)) = caller {
                    model.ready_waiters.push((deadline, Instant::now(), reply));
                }
                return;
            }
            // A user's or a mode's load of a model running in its CPU form: promote it (through
            // the queue, like any load), unless model leases hold its CPU form's server. A
            // request through the proxy is served where it runs.
            ModelState::Ready if explicit && model.placement == Placement::Cpu && leased => {
                if let Some((_, reply)) = caller {
                    let _ = reply.send(Err(self.leased_error(id, "moved to the GPU")));
                }
                return;
            }
            ModelState::Ready if explicit && model.placement == Placement::Cpu => {}
            ModelState::Ready => {
                let status = self.model_status(i);
                if let Some((_, reply)) = caller {
                    let pin = self.models[i].gate.try_pin();
                    let _ = reply.send(Ok(Loaded { status, pin }));
                }
                return;
            }
            ModelState::Failed if !explicit && model.cooldown_until.is_some_and(|t| t > now) => {
                if let (Some(error), Some((_, reply))) = (self.cooldown_error(i), caller) {
                    let _ = reply.send(Err(error));
                }
                return;
            }
            _ => {}
        }
        if let Some((deadline, reply)) = caller {
            model.ready_waiters.push((deadline, Instant::now(), reply));
        }
        let queued = self.queue.iter().any(|w| matches!(&w.pending, Pending::Load { model } if model == id));
        if model.state == ModelState::Loading || queued {
            return;
        }
        if self.queue.len() >= self.settings.max_queue as usize {
            let error = ArbiterError::QueueFull(self.settings.max_queue);
            for (_, _, reply) in self.models[i].ready_waiters.drain(..) {
                let _ = reply.send(Err(error.clone()));
            }
            return;
        }
        let priority = self.models[i].spec.priority;
        self.enqueue(priority, Pending::Load { model: id.to_string() });
    }

    fn enqueue(&mut self, priority: i32, pending: Pending) {
        self.next_seq += 1;
        self.queue.push(Waiter {
            seq: self.next_seq,
            priority,
            since: Instant::now(),
            pending,
            awaiting_release: BTreeSet::new(),
            last_shortfall: None,
            waiting_for: None,
            drain: BTreeSet::new(),
            announced: false,
        });
        // Priority first (higher first), then arrival: the order in which `schedule` serves.
        self.queue.sort_by_key(|w| (std::cmp::Reverse(w.priority), w.seq));
    }

    fn request_unload(&mut self, i: usize, reply: oneshot::Sender<Result<Unloaded, ArbiterError>>) {
        let id = self.models[i].spec.id.clone();
        if self.leased(&id) && self.models[i].holds_memory() {
            let _ = reply.send(Err(self.leased_error(&id, "unloaded")));
            return;
        }
        // A queued load of this model is withdrawn: the user asked for the opposite.
        self.queue.retain(|w| !matches!(&w.pending, Pending::Load { model } if *model == id));
        for (_, _, waiter) in self.models[i].ready_waiters.drain(..) {
            let _ =
                waiter.send(Err(ArbiterError::Cancelled(format!("model {id} was unloaded while this request waited"))));
        }
        match self.models[i].state {
            ModelState::Unloaded | ModelState::Failed => {
                let _ = reply.send(Ok(Unloaded { status: self.model_status(i), was_loaded: false }));
            }
            ModelState::Unloading => {
                // A demotion in progress becomes a plain release.
                self.models[i].then_cpu = false;
                self.models[i].unload_waiters.push(reply);
            }
            ModelState::Loading | ModelState::Ready => {
                self.models[i].unload_waiters.push(reply);
                let _ = self.begin_unload(i, "requested".into());
            }
        }
    }

    fn set_state(&mut self, i: usize, to: ModelState, reason: String, error: Option<String>) {
        let model = &mut self.models[i];
        let from = model.state;
        model.state = to;
        model.changed_at = Instant::now();
        if reason != "released" {
            model.state_reason = Some(reason.clone());
        }
        let event = EventKind::ModelState {
            model: model.spec.id.clone(),
            from,
            to,
            reason,
            device: model.device,
            vram_mib: model.footprint(),
            error,
        };
        self.bus.publish(event);
    }

    /// Reserves memory and starts the load task, in the given placement. A model that runs in
    /// its CPU form and is now loaded on the GPU (a promotion) has its CPU form stopped first.
    fn start_load(&mut self, i: usize, device: Option<u32>, reserved_mib: u64, placement: Placement) {
        let now = Instant::now();
        let model = &mut self.models[i];
        let promoting = model.state == ModelState::Ready && model.placement == Placement::Cpu;
        let demoting = model.state == ModelState::Unloading && model.then_cpu;
        let prefers_gpu = demoting && model.prefers_gpu;
        model.gate.close();
        model.generation += 1;
        model.device = device;
        model.reserved_mib = reserved_mib;
        model.current_mib = 0;
        model.resident_since = now;
        model.placement = placement;
        model.then_cpu = false;
        model.prefers_gpu = prefers_gpu;
        model.note = None;
        model.gate.touch();
        model.gpu_pids.clear();
        // Admitted: waiting for memory (queue_timeout) is over; now the start may take up to
        // ready_timeout, and its callers wait for that rather than give up mid-start.
        let started_by = deadline_after(model.spec.ready_timeout + Duration::from_secs(1));
        for (deadline, _, _) in &mut model.ready_waiters {
            *deadline = (*deadline).max(started_by);
        }
        let reason = if promoting {
            "promoted"
        } else if demoting {
            "demoted"
        } else {
            "requested"
        };
        self.set_state(i, ModelState::Loading, reason.into(), None);
        match self.models[i].spec.backend {
            Backend::Process => self.start_process(i, device, placement),
            Backend::Ollama => self.start_ollama(i, placement),
            Backend::External => {
                let action = if placement == Placement::Gpu { Action::Gpu } else { Action::Cpu };
                if self.models[i].oneshot.is_some() && self.models[i].attachment.is_none() {
                    // Granted to a lease holder that loads the model itself.
                    let finished = Command::LoadFinished {
                        model: self.models[i].spec.id.clone(),
                        generation: self.models[i].generation,
                        result: Ok(()),
                    };
                    let commands = self.commands.clone();
                    tokio::spawn(async move {
                        let _ = commands.send(finished).await;
                    });
                } else if !self.instruct(i, action) {
                    let id = self.models[i].spec.id.clone();
                    self.fail_start(
                        i,
                        format!(
                            "no app is attached to external model {id}: the app that holds it attaches with \
                             POST /vramgate/models/{id}/attach (Python: client.attach(\"{id}\", on_place=...))"
                        ),
                    );
                }
            }
        }
    }

    fn start_process(&mut self, i: usize, device: Option<u32>, placement: Placement) {
        let port = match process::free_port() {
            Ok(port) => port,
            Err(e) => {
                self.fail_start(i, format!("cannot find a free port: {e}"));
                return;
            }
        };
        // A promotion: the CPU form stops before the GPU form starts (they share the model id,
        // and often a port range and files).
        let previous = self.models[i].process.take();
        if let Some(previous) = &previous
            && let Err(e) = self.store.forget_process(previous.pid)
        {
            tracing::error!("{e}");
        }
        let model = &mut self.models[i];
        model.port = Some(port);
        let spec = model.spec.clone();
        let generation = model.generation;
        let expand = |text: &str| process::expand(text, port, &spec.id, device);
        let mut env: std::collections::BTreeMap<String, String> =
            spec.env.iter().map(|(k, v)| (k.clone(), expand(v))).collect();
        if let Some(device) = device {
            env.entry("CUDA_VISIBLE_DEVICES".into()).or_insert_with(|| device.to_string());
        }
        env.insert("VRAMGATE_MODEL_ID".into(), spec.id.clone());
        env.insert("VRAMGATE_PORT".into(), port.to_string());
        env.insert("VRAMGATE_PLACEMENT".into(), placement.as_str().into());
        let argv = match (placement, &spec.cpu_argv) {
            (Placement::Cpu, Some(cpu_argv)) => cpu_argv,
            _ => &spec.argv,
        };
        let spawn_spec = SpawnSpec {
            argv: argv.iter().map(|a| expand(a)).collect(),
            env,
            cwd: spec.cwd.clone(),
            log_file: self.log_dir.as_ref().map(|d| d.join(format!("{}.log", spec.id))),
        };
        let health = spec
            .health
            .as_ref()
            .map(|h| if h.starts_with('/') { format!("http://127.0.0.1:{port}{h}") } else { expand(h) });
        let spawner = self.spawner.clone();
        let http = self.http.clone();
        let commands = self.commands.clone();
        let model_id = spec.id.clone();
        let gate = self.models[i].gate.clone();
        tokio::spawn(async move {
            if let Some(previous) = previous {
                // Requests already streaming from the CPU form finish first (the gate is closed,
                // so no new ones start), up to `ready_timeout`. Polled: this runs once per
                // promotion, and the arbiter's idle signal belongs to the arbiter.
                let drain_until = Instant::now() + spec.ready_timeout;
                while gate.in_use() > 0 && Instant::now() < drain_until {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                previous.stop(spec.stop_timeout).await;
            }
            let handle = match spawner.spawn(spawn_spec).await {
                Ok(handle) => handle,
                Err(e) => {
                    let _ = commands
                        .send(Command::LoadFinished { model: model_id, generation, result: Err(e.to_string()) })
                        .await;
                    return;
                }
            };
            let _ =
                commands.send(Command::Spawned { model: model_id.clone(), generation, handle: handle.clone() }).await;
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
    fn start_ollama(&mut self, i: usize, placement: Placement) {
        let model = &mut self.models[i];
        model.port = None;
        let spec = model.spec.clone();
        let generation = model.generation;
        let http = self.http.clone();
        let commands = self.commands.clone();
        tokio::spawn(async move {
            let name = spec.ollama_model.clone().unwrap_or_default();
            let cpu = placement == Placement::Cpu;
            let mut result = ollama::load(&http, &spec.url, &name, &spec.options, cpu, spec.ready_timeout).await;
            if result.is_ok() {
                let listed = ollama::ps(&http, &spec.url, Duration::from_secs(5)).await;
                let _ = commands.send(Command::OllamaPs { url: spec.url.clone(), result: listed }).await;
                if let Some(warmup) = &spec.warmup {
                    result = warm_up(&http, &spec.url, warmup, spec.ready_timeout).await;
                }
            }
            let _ = commands.send(Command::LoadFinished { model: spec.id.clone(), generation, result }).await;
        });
    }

    fn find_generation(&self, id: &str, generation: u64) -> Option<usize> {
        self.models.iter().position(|m| m.spec.id == id && m.generation == generation)
    }

    fn on_spawned(&mut self, id: &str, generation: u64, handle: ProcessHandle) {
        let Some(i) = self.find_generation(id, generation) else { return };
        let record = ProcessRecord {
            pid: handle.pid,
            pgid: handle.group,
            start_ticks: handle.start_ticks,
            model: id.to_string(),
            started_at: Utc::now(),
        };
        if let Err(e) = self.store.record_process(&record) {
            tracing::error!("{e}");
            self.store_error = Some(e.to_string());
        }
        self.models[i].logs = Some(handle.logs.clone());
        self.models[i].gpu_pids.insert(handle.pid);
        self.models[i].process = Some(handle);
        // An unload asked for while it was spawning takes effect now.
        if self.models[i].state == ModelState::Unloading {
            self.begin_release_task(i);
        }
    }

    fn on_load_finished(&mut self, id: &str, generation: u64, result: Result<(), String>) {
        let Some(i) = self.find_generation(id, generation) else { return };
        if self.models[i].state == ModelState::Unloading && self.models[i].process.is_none() {
            // Unloaded while it was spawning, and the spawn failed: nothing to stop, but the
            // release must still finish (and answer its waiters).
            self.begin_release_task(i);
            return;
        }
        if self.models[i].state != ModelState::Loading {
            return;
        }
        match result {
            Ok(()) => {
                let model = &mut self.models[i];
                model.failures = 0;
                model.cooldown_until = None;
                model.last_error = None;
                model.used_once = true;
                model.open_gate();
                let placement = model.placement;
                self.set_state(i, ModelState::Ready, "ready".into(), None);
                self.bus.publish(EventKind::ModelPlaced {
                    model: id.to_string(),
                    placement: placement.as_str().into(),
                    reason: "ready".into(),
                });
                self.sampler.refresh();
                self.answer_ready(i);
            }
            Err(message) => self.fail_start(i, message),
        }
    }

    /// Answers everyone waiting for a ready model, each with a pin taken now, before anything
    /// else can run: a model that just became ready cannot be evicted before its callers use it.
    fn answer_ready(&mut self, i: usize) {
        // Published first, so that a caller who reads status right after its answer sees it.
        self.publish();
        let status = self.model_status(i);
        let gate = self.models[i].gate.clone();
        for (_, _, reply) in self.models[i].ready_waiters.drain(..) {
            // If the caller is gone, the pin comes back with the unsent answer and is dropped.
            let _ = reply.send(Ok(Loaded { status: status.clone(), pin: gate.try_pin() }));
        }
    }

    /// A start failed: count it, answer the waiters, release whatever is left of the process.
    fn fail_start(&mut self, i: usize, message: String) {
        let now = Instant::now();
        let model = &mut self.models[i];
        model.failures += 1;
        model.last_error = Some(message.clone());
        let error = ArbiterError::StartFailed { model: model.spec.id.clone(), message: message.clone() };
        if let Some(cooldown) = policy::failure_cooldown(model.failures) {
            model.cooldown_until = Some(now + cooldown);
        }
        // Published before the answers, so that a caller who reads status right after sees the
        // failure counted.
        self.publish();
        let model = &mut self.models[i];
        for (_, _, reply) in model.ready_waiters.drain(..) {
            let _ = reply.send(Err(error.clone()));
        }
        // Through unloading, so the memory is watched until it is really back.
        self.set_state(i, ModelState::Unloading, "failed".into(), Some(message));
        self.begin_release_task(i);
    }

    fn on_exited(&mut self, id: &str, generation: u64, exit: process::ExitInfo) {
        let Some(i) = self.find_generation(id, generation) else { return };
        if let Some(process) = &self.models[i].process
            && let Err(e) = self.store.forget_process(process.pid)
        {
            tracing::error!("{e}");
        }
        if self.models[i].state == ModelState::Ready {
            // A crash while serving: release its memory and start again on the next demand.
            let tail = self.models[i].process.as_ref().map(|p| p.logs.tail(5).join("\n")).unwrap_or_default();
            self.models[i].gate.close();
            self.set_state(i, ModelState::Unloading, "crashed".into(), Some(format!("{exit}; last output:\n{tail}")));
            self.begin_release_task(i);
        }
    }

    /// Starts unloading a model. An eviction (any reason but an explicit `requested`) happens
    /// only if no request pins the model at this very moment; returns whether it started.
    fn begin_unload(&mut self, i: usize, reason: String) -> bool {
        match self.models[i].state {
            ModelState::Ready | ModelState::Loading => {}
            _ => return false,
        }
        let model = &self.models[i];
        let evicted = reason != "requested" && reason != "idle";
        if evicted
            && model.state == ModelState::Ready
            && model.placement == Placement::Gpu
            && model.spec.on_evict == OnEvict::Cpu
            && model.spec.has_cpu_form()
        {
            // Its policy says: keep serving from the CPU rather than unload.
            return self.demote(i, reason, false);
        }
        if reason == "requested" {
            self.models[i].gate.close();
        } else if !self.models[i].gate.close_if_idle() {
            return false;
        }
        let was_loading = self.models[i].state == ModelState::Loading;
        if was_loading {
            let id = self.models[i].spec.id.clone();
            for (_, _, reply) in self.models[i].ready_waiters.drain(..) {
                let _ =
                    reply.send(Err(ArbiterError::Cancelled(format!("model {id} was unloaded while it was starting"))));
            }
        }
        self.set_state(i, ModelState::Unloading, reason, None);
        // A load still spawning has no process yet; `on_spawned` continues the release.
        if self.models[i].process.is_some() || !was_loading {
            self.begin_release_task(i);
        }
        true
    }

    /// Releases the model in a task and reports `Released` when its memory is back: the process
    /// stopped and gone from the probe's list, Ollama's `/api/ps` no longer listing it, or the app
    /// acknowledging `release` (or `cpu`, for a demotion).
    fn begin_release_task(&mut self, i: usize) {
        match self.models[i].spec.backend {
            Backend::Process => self.release_process(i),
            Backend::Ollama => {
                let model = &self.models[i];
                let spec = model.spec.clone();
                let generation = model.generation;
                let http = self.http.clone();
                let commands = self.commands.clone();
                tokio::spawn(async move {
                    let started = Instant::now();
                    let name = spec.ollama_model.clone().unwrap_or_default();
                    let limit = spec.stop_timeout + spec.release_timeout;
                    let timed_out = match ollama::unload(&http, &spec.url, &name, limit).await {
                        Ok(gone) => !gone,
                        Err(e) => {
                            // An Ollama that cannot be reached holds nothing we could free.
                            tracing::warn!(model = %spec.id, "release: {e}");
                            false
                        }
                    };
                    let waited = started.elapsed();
                    let _ = commands.send(Command::Released { model: spec.id, generation, timed_out, waited }).await;
                });
            }
            Backend::External => {
                let action = if self.models[i].then_cpu { Action::Cpu } else { Action::Release };
                if !self.instruct(i, action) {
                    // No app (any more): nothing holds the memory.
                    let model = &self.models[i];
                    let command = Command::Released {
                        model: model.spec.id.clone(),
                        generation: model.generation,
                        timed_out: false,
                        waited: Duration::ZERO,
                    };
                    let commands = self.commands.clone();
                    tokio::spawn(async move {
                        let _ = commands.send(command).await;
                    });
                }
            }
        }
    }

    /// Stops the process (if running) and waits until its memory is back, in a task.
    fn release_process(&mut self, i: usize) {
        let model = &mut self.models[i];
        let handle = model.process.clone();
        let mut pids = model.gpu_pids.clone();
        if let Some(handle) = &handle {
            pids.insert(handle.pid);
            pids.extend(process::group_members(handle.group));
        }
        let grace = model.spec.stop_timeout;
        let limit = model.spec.release_timeout;
        let generation = model.generation;
        let id = model.spec.id.clone();
        let sampler = self.sampler.clone();
        let commands = self.commands.clone();
        tokio::spawn(async move {
            if let Some(handle) = &handle {
                let (exit, killed) = handle.stop(grace).await;
                if killed {
                    tracing::warn!(model = %id, "did not stop within {} of SIGTERM: killed ({exit})", Rounded(grace));
                }
            }
            // The memory is back when none of its pids is in the probe's process list any more.
            let started = Instant::now();
            let timed_out = loop {
                match tokio::time::timeout(Duration::from_secs(2), sampler.sample())
                    .await
                    .unwrap_or_else(|_| Err(crate::gpu::ProbeError("the probe did not answer within 2 s".into())))
                {
                    Ok(devices) => {
                        if !devices.iter().any(|d| d.processes.iter().any(|p| pids.contains(&p.pid))) {
                            break false;
                        }
                    }
                    Err(e) => tracing::warn!(model = %id, "sample during release failed: {e}"),
                }
                if started.elapsed() >= limit {
                    break true;
                }
                tokio::time::sleep(RELEASE_POLL).await;
            };
            let waited = started.elapsed();
            let _ = commands.send(Command::Released { model: id, generation, timed_out, waited }).await;
        });
    }

    fn on_released(&mut self, id: &str, generation: u64, timed_out: bool, waited: Duration) {
        let Some(i) = self.find_generation(id, generation) else { return };
        if self.models[i].state != ModelState::Unloading {
            return;
        }
        if self.models[i].then_cpu {
            // A demotion (an external model without an app ends here too): the GPU form is
            // gone; start the CPU form.
            if let Some(process) = self.models[i].process.take()
                && let Err(e) = self.store.forget_process(process.pid)
            {
                tracing::error!("{e}");
            }
            self.models[i].port = None;
            self.memory_released(id);
            self.start_load(i, None, 0, Placement::Cpu);
            return;
        }
        if timed_out {
            self.bus.publish(EventKind::MemoryReleaseTimeout {
                model: id.to_string(),
                waited_ms: waited.as_millis() as u64,
            });
        }
        if let Some(process) = self.models[i].process.take()
            && let Err(e) = self.store.forget_process(process.pid)
        {
            tracing::error!("{e}");
        }
        let failed = self.models[i].cooldown_until.is_some() && self.models[i].failures >= FAILURES_BEFORE_COOLDOWN;
        let model = &mut self.models[i];
        model.port = None;
        model.current_mib = 0;
        let to = if failed { ModelState::Failed } else { ModelState::Unloaded };
        self.set_state(i, to, "released".into(), None);
        self.sampler.refresh();
        self.models[i].device = None;
        for name in self.queue.iter_mut().map(|w| &mut w.awaiting_release) {
            name.remove(id);
        }
        self.publish();
        let status = self.model_status(i);
        for reply in self.models[i].unload_waiters.drain(..) {
            let _ = reply.send(Ok(Unloaded { status: status.clone(), was_loaded: true }));
        }
        // Load again only for callers still waiting (they asked while it was going away).
        let wanted = !self.models[i].ready_waiters.is_empty();
        if failed {
            // In its cooldown: tell whoever still waits why, instead of letting them time out.
            if let Some(error) = self.cooldown_error(i) {
                for (_, _, reply) in self.models[i].ready_waiters.drain(..) {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        } else if wanted {
            self.request_load(id, None, false);
        }
    }

    /// For an alias with candidates: the first that is ready, else the first that fits (evicting
    /// only what its priority allows), else the first.
    fn choose(&self, candidates: &[String]) -> Result<String, ArbiterError> {
        let indices: Vec<usize> = candidates.iter().map(|c| self.index(c)).collect::<Result<_, _>>()?;
        let Some(&first) = indices.first() else {
            return Err(ArbiterError::Cancelled("an alias with no candidates".into()));
        };
        if let Some(&ready) =
            indices.iter().find(|&&i| self.models[i].state == ModelState::Ready && !self.models[i].draining)
        {
            return Ok(self.models[ready].spec.id.clone());
        }
        let (devices, residents, holds) = self.policy_inputs();
        let at = millis_since(self.started, Instant::now());
        let usable: Vec<usize> = indices.iter().copied().filter(|&i| self.cooldown_error(i).is_none()).collect();
        if devices.is_empty() {
            // No GPU: nothing is accounted, any candidate loads; the first that is not failing.
            return Ok(self.models[usable.first().copied().unwrap_or(first)].spec.id.clone());
        }
        for &i in &usable {
            let m = &self.models[i];
            let request = Request {
                requester: m.spec.id.clone(),
                mib: self.load_reservation(i, m.spec.device),
                device: m.spec.device,
                priority: m.spec.priority,
                exclusive: false,
            };
            if matches!(
                policy::decide(&devices, &residents, &holds, &request, at),
                Decision::Admit { .. } | Decision::Evict { .. }
            ) {
                return Ok(m.spec.id.clone());
            }
        }
        // None fits now: wait for the first that is not in a failure cooldown.
        Ok(self.models[usable.first().copied().unwrap_or(first)].spec.id.clone())
    }

    // ----- leases -----

    fn request_lease(&mut self, request: LeaseRequest, reply: oneshot::Sender<Result<LeaseGrant, ArbiterError>>) {
        if let Some(name) = request.model.clone() {
            self.request_model_lease(&name, request, reply);
            return;
        }
        if self.queue.len() >= self.settings.max_queue as usize {
            let _ = reply.send(Err(ArbiterError::QueueFull(self.settings.max_queue)));
            return;
        }
        let deadline = deadline_after(request.wait);
        let priority = request.priority;
        self.enqueue(priority, Pending::Lease { request, reply, deadline });
    }

    /// A model lease: granted at once if the model is ready, else after loading it like any other
    /// demand (queue, eviction and timeout rules included), by asking again once it is ready.
    fn request_model_lease(
        &mut self,
        name: &str,
        request: LeaseRequest,
        reply: oneshot::Sender<Result<LeaseGrant, ArbiterError>>,
    ) {
        let i = match self.index(name) {
            Ok(i) => i,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        if let Some(error) = self.cooldown_error(i) {
            let _ = reply.send(Err(error));
            return;
        }
        if self.models[i].state == ModelState::Ready && !self.models[i].draining {
            let device = self.models[i].device;
            let grant = self.grant_lease(request, device, None);
            if let Err(Ok(grant)) = reply.send(Ok(grant)) {
                // The caller went away meanwhile: do not keep the model in use for nobody.
                let _ = self.release_lease(&grant.id, "disconnected");
            }
            return;
        }
        if self.models[i].spec.backend == Backend::External && self.models[i].attachment.is_none() {
            // The one-shot form: the lease holder is the app.
            self.models[i].oneshot = Some(request.pid);
        }
        let deadline = deadline_after(request.wait);
        let (ready_tx, ready_rx) = oneshot::channel();
        let id = self.models[i].spec.id.clone();
        self.request_load(&id, Some((deadline, ready_tx)), false);
        let commands = self.commands.clone();
        tokio::spawn(async move {
            match ready_rx.await {
                Ok(Ok(Loaded { pin: Some(pin), .. })) => {
                    // Pinned when it became ready: it cannot be evicted before the lease exists.
                    let _ = commands.send(Command::GrantModelLease { request, pin, reply }).await;
                }
                Ok(Ok(Loaded { pin: None, .. })) => {
                    // Closed again at once: ask again with the time left.
                    let wait = deadline.saturating_duration_since(Instant::now());
                    let request = LeaseRequest { wait, ..request };
                    let _ = commands.send(Command::Acquire { request, reply }).await;
                }
                Ok(Err(e)) => {
                    let _ = reply.send(Err(e));
                    // No lease came of it: a one-shot claim on an external model ends here.
                    let _ = commands.send(Command::OneshotEnded { model: id }).await;
                }
                Err(_) => {
                    let _ = reply.send(Err(ArbiterError::ShuttingDown));
                }
            }
        });
    }

    /// Records a lease. A model lease holds a pin like a request in flight: the one taken when
    /// the model became ready for it, or one taken now (the model is ready when this runs).
    fn grant_lease(&mut self, request: LeaseRequest, device: Option<u32>, pin: Option<Pin>) -> LeaseGrant {
        let pin = pin.or_else(|| {
            request.model.as_ref().and_then(|name| self.index(name).ok()).and_then(|i| self.models[i].gate.try_pin())
        });
        let upstream = pin.as_ref().map(|p| p.upstream.to_string());
        self.next_lease += 1;
        let id = format!("lease-{}", self.next_lease);
        let grant = LeaseGrant {
            id: id.clone(),
            holder: request.holder.clone(),
            device,
            vram_mib: if request.model.is_some() { 0 } else { request.vram_mib },
            exclusive: request.exclusive,
            ttl_ms: request.ttl.map(|t| t.as_millis() as u64),
            model: request.model.clone(),
            upstream,
        };
        self.leases.insert(
            id,
            Lease {
                grant: grant.clone(),
                priority: request.priority,
                expires: request.ttl.map(deadline_after),
                pid: request.pid,
                _pin: pin,
            },
        );
        self.bus.publish(EventKind::LeaseGranted {
            id: grant.id.clone(),
            holder: grant.holder.clone(),
            device: grant.device,
            vram_mib: grant.vram_mib,
            exclusive: grant.exclusive,
        });
        grant
    }

    fn release_lease(&mut self, id: &str, reason: &str) -> Result<(), ArbiterError> {
        // Dropping the lease drops its pin, if any: the model is idle again (and touched).
        let lease = self.leases.remove(id).ok_or_else(|| ArbiterError::UnknownLease(id.to_string()))?;
        // The end of a one-shot hold of an external model is its release (unless another such
        // lease still holds it).
        if let Some(i) = lease.grant.model.as_ref().and_then(|m| self.index(m).ok())
            && self.models[i].oneshot.is_some()
            && !self.leases.values().any(|l| l.grant.model.as_deref() == Some(self.models[i].spec.id.as_str()))
        {
            self.models[i].oneshot = None;
            drop(lease._pin);
            let _ = self.begin_unload(i, "requested".into());
        }
        self.bus.publish(EventKind::LeaseReleased {
            id: id.to_string(),
            holder: lease.grant.holder,
            reason: reason.into(),
        });
        Ok(())
    }

    // ----- the decision -----

    /// The plain data the policy decides over, from the latest reading and the models.
    fn policy_inputs(&self) -> (Vec<DeviceState>, Vec<Resident>, Vec<Hold>) {
        // The reading `on_sample` attributed, not a newer one: a newer reading may show a model's
        // process before it is attributed, which would count it twice (as foreign and as the model).
        let view = self.seen.clone();
        let origin = self.started;
        let devices = view
            .devices
            .iter()
            .map(|d| {
                let attributed: u64 =
                    d.processes.iter().filter(|p| self.process_models.contains_key(&p.pid)).map(|p| p.used_mib).sum();
                // A lease's job (ffmpeg) uses its memory through its holder's processes; that use
                // is already counted by the lease's hold, so it is not foreign too (up to the
                // hold). Use by processes no lease claims is foreign, held memory or not.
                // One holder may hold several leases: its use counts up to their sum.
                let mut holds: HashMap<u32, u64> = HashMap::new();
                for lease in self.leases.values() {
                    if let (None, Some(device), Some(pid)) = (&lease.grant.model, lease.grant.device, lease.pid)
                        && device == d.index
                    {
                        *holds.entry(pid).or_default() += lease.grant.vram_mib;
                    }
                }
                let held: u64 = holds
                    .iter()
                    .map(|(pid, hold)| self.holder_usage.get(&(*pid, d.index)).copied().unwrap_or(0).min(*hold))
                    .sum();
                // Ollama's runners are not our processes either; what the models vramgate loaded
                // there use is counted as those models (from `/api/ps`), not again as foreign.
                let in_ollama: u64 = self
                    .models
                    .iter()
                    .filter(|m| m.spec.backend == Backend::Ollama && m.on_gpu() && m.device == Some(d.index))
                    .map(|m| m.current_mib)
                    .sum();
                let foreign = d.used_mib.saturating_sub(attributed).saturating_sub(held).saturating_sub(in_ollama);
                DeviceState { index: d.index, usable_mib: d.usable_mib, foreign_mib: foreign }
            })
            .collect();
        let residents = self
            .models
            .iter()
            .filter(|m| m.on_gpu())
            .filter_map(|m| {
                Some(Resident {
                    id: m.spec.id.clone(),
                    device: m.device?,
                    footprint_mib: m.footprint(),
                    priority: m.spec.priority,
                    in_use: m.gate.in_use(),
                    pinned: m.spec.pinned,
                    ready: m.state == ModelState::Ready,
                    last_used: m.gate.last_used_ms(),
                    resident_since: millis_since(origin, m.resident_since),
                    min_residency: m.spec.min_residency.as_millis() as u64,
                })
            })
            .collect();
        let holds = self
            .leases
            .values()
            .filter(|l| l.grant.model.is_none())
            .filter_map(|l| {
                Some(Hold {
                    holder: l.grant.holder.clone(),
                    device: l.grant.device?,
                    mib: l.grant.vram_mib,
                    exclusive: l.grant.exclusive,
                })
            })
            .collect();
        (devices, residents, holds)
    }

    /// Serves the queue in order: priority, then arrival. A waiter that cannot be served blocks
    /// later waiters on its device, so nobody is overtaken forever on the device it waits for.
    fn schedule(&mut self) {
        let now = Instant::now();
        // Devices blocked by a waiter that cannot be served yet (or that waits for its
        // evictions), each with that waiter's name; `blocked_all`: by one that may use any device.
        let mut blocked: BTreeMap<u32, String> = BTreeMap::new();
        let mut blocked_all: Option<String> = None;
        let mut index = 0;
        self.prune_abandoned();
        while index < self.queue.len() {
            if let Some(first) = &blocked_all {
                let behind = format!("behind {first} in the queue");
                for waiter in &mut self.queue[index..] {
                    waiter.waiting_for = Some(behind.clone());
                }
                break;
            }
            let (request, is_load) = match self.policy_request(index) {
                Some(found) => found,
                None => {
                    self.queue.remove(index);
                    continue;
                }
            };
            let blocker = match request.device {
                Some(d) => blocked.get(&d),
                None => blocked.values().next(),
            };
            let waiter = &mut self.queue[index];
            if let Some(evicting) = evicting(&waiter.awaiting_release) {
                waiter.waiting_for = Some(evicting);
            } else if let Some(blocker) = blocker {
                waiter.waiting_for = Some(format!("behind {blocker} in the queue"));
            }
            if blocker.is_some() || !waiter.awaiting_release.is_empty() {
                mark_blocked(&mut blocked, &mut blocked_all, request.device, &request.requester);
                index += 1;
                continue;
            }
            if is_load {
                let loading = self.models.iter().filter(|m| m.state == ModelState::Loading).count() as u32;
                if loading >= self.settings.max_parallel_loads {
                    // Waits for a load slot, not for memory: other requests may still go ahead.
                    self.queue[index].waiting_for = Some(format!(
                        "no load slot free ({loading} loading, max_parallel_loads = {})",
                        self.settings.max_parallel_loads
                    ));
                    index += 1;
                    continue;
                }
                let resident = self.models.iter().filter(|m| m.on_gpu()).count() as u32;
                if self.settings.resident_cap > 0 && resident >= self.settings.resident_cap {
                    let (_, residents, _) = self.policy_inputs();
                    let victim = policy::cap_victim(&residents, millis_since(self.started, now));
                    if let Some(victim) = victim
                        && let Ok(v) = self.index(&victim)
                    {
                        if self.begin_unload(v, "resident_cap".into()) {
                            let waiter = &mut self.queue[index];
                            waiter.awaiting_release.insert(victim.clone());
                            // Status shows the new reason now, not at the next pass.
                            waiter.waiting_for = evicting(&waiter.awaiting_release);
                        }
                    } else {
                        self.note_shortfall(
                            index,
                            format!(
                                "resident_cap = {} reached and no resident model is idle",
                                self.settings.resident_cap
                            ),
                        );
                    }
                    mark_blocked(&mut blocked, &mut blocked_all, request.device, &request.requester);
                    index += 1;
                    continue;
                }
            }
            let (devices, residents, holds) = self.policy_inputs();
            if devices.is_empty() {
                // No GPU at all: models run CPU-only and nothing is accounted; memory leases
                // cannot be served.
                if is_load || request.mib == 0 {
                    let waiter = self.queue.remove(index);
                    self.admit(waiter, None, 0);
                } else {
                    let waiter = self.queue.remove(index);
                    self.refuse(
                        waiter,
                        ArbiterError::NeverFits("there is no GPU on this machine (probe \"none\")".into()),
                    );
                }
                continue;
            }
            match policy::decide(&devices, &residents, &holds, &request, millis_since(self.started, now)) {
                Decision::Admit { device } => {
                    let waiter = self.queue.remove(index);
                    self.admit(waiter, Some(device), request.mib);
                }
                Decision::Evict { device, victims } => {
                    let reason = format!("evicted_for:{}", request.requester);
                    for victim in &victims {
                        if let Ok(v) = self.index(victim) {
                            // A request may have pinned it since the decision: then it stays.
                            if self.begin_unload(v, reason.clone()) {
                                self.queue[index].awaiting_release.insert(victim.clone());
                            }
                        }
                    }
                    if let Some(evicting) = evicting(&self.queue[index].awaiting_release) {
                        self.queue[index].waiting_for = Some(evicting);
                    }
                    blocked.entry(device).or_insert_with(|| request.requester.clone());
                    index += 1;
                }
                Decision::Wait(shortfall) => {
                    self.note_shortfall(index, shortfall.to_string());
                    if now.saturating_duration_since(self.queue[index].since)
                        >= self.settings.max_wait_before_swap.get()
                    {
                        // Waited long enough behind busy models: stop feeding the ones that block
                        // it, so that they go idle and can be swapped out.
                        let (_, mut idle_residents, _) = self.policy_inputs();
                        for resident in &mut idle_residents {
                            // Requests in flight end; a model lease holds until its holder lets
                            // go, so draining cannot free a model that one holds.
                            resident.in_use = self.model_lease_count(&resident.id);
                        }
                        let at = millis_since(self.started, now);
                        // Only while draining would help (the plan is redone on every pass), and
                        // only for someone who is actually waiting (not a preload).
                        let someone_waits = match &self.queue[index].pending {
                            Pending::Load { model } => {
                                self.index(model).is_ok_and(|m| !self.models[m].ready_waiters.is_empty())
                            }
                            Pending::Lease { .. } => true,
                        };
                        self.queue[index].drain = match policy::decide(&devices, &idle_residents, &holds, &request, at)
                        {
                            Decision::Evict { victims, .. } if someone_waits => victims.into_iter().collect(),
                            _ => BTreeSet::new(),
                        };
                    }
                    let device = request.device.or(Some(shortfall.device));
                    mark_blocked(&mut blocked, &mut blocked_all, device, &request.requester);
                    index += 1;
                }
                decision @ Decision::NeverFits(_) => {
                    let message = decision.message().unwrap_or_else(|| "can never fit".into());
                    let waiter = self.queue.remove(index);
                    self.refuse(waiter, ArbiterError::NeverFits(message));
                }
            }
        }
        self.apply_draining();
        self.promote_demoted();
    }

    /// Models demoted to the CPU to make room go back to the GPU once they fit without evicting
    /// anything, when nobody waits in the queue and they are idle.
    fn promote_demoted(&mut self) {
        if !self.queue.is_empty() {
            return;
        }
        let loading = self.models.iter().filter(|m| m.state == ModelState::Loading).count() as u32;
        if loading >= self.settings.max_parallel_loads {
            return;
        }
        let resident = self.models.iter().filter(|m| m.on_gpu()).count() as u32;
        if self.settings.resident_cap > 0 && resident >= self.settings.resident_cap {
            return;
        }
        let Some(i) = (0..self.models.len()).find(|&i| {
            let m = &self.models[i];
            m.prefers_gpu && m.state == ModelState::Ready && m.placement == Placement::Cpu && m.gate.in_use() == 0
        }) else {
            return;
        };
        let (devices, residents, holds) = self.policy_inputs();
        let model = &self.models[i];
        let request = Request {
            requester: model.spec.id.clone(),
            mib: self.load_reservation(i, model.spec.device),
            device: model.spec.device,
            priority: model.spec.priority,
            exclusive: false,
        };
        if let Decision::Admit { device } =
            policy::decide(&devices, &residents, &holds, &request, millis_since(self.started, Instant::now()))
        {
            // Not back into pressure: it was probably demoted to relieve it. The device must stay
            // below `critical` with the model on it.
            let calm = !self.pressure.contains(&device)
                && self.seen.devices.iter().find(|d| d.index == device).is_some_and(|d| {
                    (d.used_mib + request.mib) as f64 * 100.0 < self.critical_pct * d.total_mib as f64
                });
            if calm {
                self.start_load(i, Some(device), request.mib, Placement::Gpu);
            }
        }
    }

    /// How many leases keep `model` in use (model leases, one-shot external leases).
    fn model_lease_count(&self, model: &str) -> u32 {
        let count = self.leases.values().filter(|l| l.grant.model.as_deref() == Some(model)).count();
        u32::try_from(count).unwrap_or(u32::MAX)
    }

    /// Closes the gates of the models some waiter is waiting to swap out (in-flight requests
    /// finish, new ones wait behind the swap) and reopens those no waiter wants any more.
    fn apply_draining(&mut self) {
        let wanted: BTreeSet<String> = self.queue.iter().flat_map(|w| w.drain.iter().cloned()).collect();
        for i in 0..self.models.len() {
            let ready = self.models[i].state == ModelState::Ready;
            let want = ready && wanted.contains(&self.models[i].spec.id);
            let model = &mut self.models[i];
            if want && !model.draining {
                model.draining = true;
                model.gate.close();
                tracing::info!(model = %model.spec.id, "draining: a request waited too long for its memory");
            } else if !want && model.draining {
                model.draining = false;
                if ready {
                    // The swap is off (its waiter was served or gave up): serve again.
                    model.open_gate();
                    self.answer_ready(i);
                }
            }
        }
    }

    /// Drops requests whose callers went away (a client disconnected while it waited), so that
    /// they neither block the queue nor count against `max_queue`.
    fn prune_abandoned(&mut self) {
        self.queue.retain(|w| !matches!(&w.pending, Pending::Lease { reply, .. } if reply.is_closed()));
        for i in 0..self.models.len() {
            let before = self.models[i].ready_waiters.len();
            self.models[i].ready_waiters.retain(|(_, _, reply)| !reply.is_closed());
            let spec = &self.models[i].spec;
            if before > 0 && self.models[i].ready_waiters.is_empty() && !spec.preload && !spec.pinned {
                let id = spec.id.clone();
                self.queue.retain(|w| !matches!(&w.pending, Pending::Load { model } if *model == id));
            }
        }
    }

    fn note_shortfall(&mut self, index: usize, message: String) {
        let waiter = &mut self.queue[index];
        if !waiter.announced {
            waiter.announced = true;
            let requester = match &waiter.pending {
                Pending::Load { model } => model.clone(),
                Pending::Lease { request, .. } => request.holder.clone(),
            };
            self.bus.publish(EventKind::Queued { requester, reason: message.clone() });
        }
        self.queue[index].waiting_for = Some(message.clone());
        self.queue[index].last_shortfall = Some(message);
    }

    /// The policy's view of a waiter; `None` if the waiter is stale (its model vanished).
    fn policy_request(&self, index: usize) -> Option<(Request, bool)> {
        let waiter = &self.queue[index];
        match &waiter.pending {
            Pending::Load { model } => {
                let i = self.index(model).ok()?;
                let m = &self.models[i];
                let promotion = m.state == ModelState::Ready && m.placement == Placement::Cpu;
                if m.state != ModelState::Unloaded && m.state != ModelState::Failed && !promotion {
                    return None;
                }
                let mib = self.load_reservation(i, m.spec.device);
                Some((
                    Request {
                        requester: model.clone(),
                        mib,
                        device: m.spec.device,
                        priority: m.spec.priority,
                        exclusive: false,
                    },
                    true,
                ))
            }
            Pending::Lease { request, .. } => Some((
                Request {
                    requester: request.holder.clone(),
                    mib: request.vram_mib,
                    device: request.device,
                    priority: request.priority,
                    exclusive: request.exclusive,
                },
                false,
            )),
        }
    }

    /// The memory a model is admitted with: what it declares or was measured at, else (a first
    /// load of an undeclared model) everything currently free on the device, so that it starts
    /// only on an otherwise idle device and its real footprint can be measured.
    fn load_reservation(&self, i: usize, device: Option<u32>) -> u64 {
        let m = &self.models[i];
        let known = m.spec.declared_mib.unwrap_or(0).max(m.learned_mib.unwrap_or(0));
        if known > 0 {
            return known;
        }
        let view = &self.seen;
        view.devices
            .iter()
            .filter(|d| device.is_none_or(|want| d.index == want))
            .map(|d| d.usable_mib.saturating_sub(d.used_mib).max(1))
            .max()
            .unwrap_or(0)
    }

    fn admit(&mut self, waiter: Waiter, device: Option<u32>, mib: u64) {
        match waiter.pending {
            Pending::Load { model } => {
                if let Ok(i) = self.index(&model) {
                    if self.models[i].ready_waiters.is_empty()
                        && !self.models[i].spec.preload
                        && !self.models[i].spec.pinned
                    {
                        // Everyone who wanted it gave up.
                        return;
                    }
                    self.start_load(i, device, mib, Placement::Gpu);
                }
            }
            Pending::Lease { request, reply, .. } => {
                let grant = self.grant_lease(request, device, None);
                if let Err(Ok(grant)) = reply.send(Ok(grant)) {
                    // The caller went away while it waited: give the memory straight back.
                    let _ = self.release_lease(&grant.id, "disconnected");
                }
            }
        }
    }

    fn refuse(&mut self, waiter: Waiter, error: ArbiterError) {
        match waiter.pending {
            Pending::Load { model } => {
                if let Ok(i) = self.index(&model) {
                    for (_, _, reply) in self.models[i].ready_waiters.drain(..) {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
            Pending::Lease { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }

    // ----- time and readings -----

    fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        for model in &self.models {
            if let Some(expiry) = model.idle_expiry(self.started) {
                consider(expiry);
            }
            for (deadline, _, _) in &model.ready_waiters {
                consider(*deadline);
            }
        }
        for lease in self.leases.values() {
            if let Some(expires) = lease.expires {
                consider(expires);
            }
        }
        for waiter in &self.queue {
            if let Pending::Lease { deadline, .. } = &waiter.pending {
                consider(*deadline);
            }
        }
        for model in &self.models {
            if let Some(pending) = &model.pending_ack {
                consider(pending.deadline);
            }
        }
        next
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        // Apps that did not acknowledge in time.
        for i in 0..self.models.len() {
            if let Some(pending) = self.models[i].pending_ack.take_if(|p| p.deadline <= now) {
                self.unresponsive(i, pending);
            }
        }
        // Idle TTL.
        let idle: Vec<usize> = (0..self.models.len())
            .filter(|&i| self.models[i].idle_expiry(self.started).is_some_and(|expiry| expiry <= now))
            .collect();
        for i in idle {
            let _ = self.begin_unload(i, "idle".into());
        }
        // Heartbeat leases.
        let expired: Vec<String> =
            self.leases.iter().filter(|(_, l)| l.expires.is_some_and(|e| e <= now)).map(|(id, _)| id.clone()).collect();
        for id in expired {
            let _ = self.release_lease(&id, "expired");
        }
        // Waiters whose time is up, with the numbers of their last shortfall.
        let mut index = 0;
        while index < self.queue.len() {
            // A waiter whose victims are being released waits for them (bounded by their
            // release): giving up now would have evicted them for nothing.
            let expired = matches!(&self.queue[index].pending, Pending::Lease { deadline, .. } if *deadline <= now)
                && self.queue[index].awaiting_release.is_empty();
            if expired {
                let waiter = self.queue.remove(index);
                // What it waited for last (a waiter blocked behind another has no shortfall).
                let message = waiter
                    .waiting_for
                    .clone()
                    .or_else(|| waiter.last_shortfall.clone())
                    .unwrap_or_else(|| "no memory became available".into());
                let waited = now.saturating_duration_since(waiter.since);
                self.refuse(waiter, ArbiterError::Timeout { waited, message });
            } else {
                index += 1;
            }
        }
        for i in 0..self.models.len() {
            let waiters = std::mem::take(&mut self.models[i].ready_waiters);
            let (late, on_time): (Vec<_>, Vec<_>) = waiters.into_iter().partition(|(deadline, _, _)| *deadline <= now);
            self.models[i].ready_waiters = on_time;
            if late.is_empty() {
                continue;
            }
            let id = self.models[i].spec.id.clone();
            let shortfall = self.queue.iter().find_map(|w| match &w.pending {
                Pending::Load { model } if *model == id => w.waiting_for.clone().or_else(|| w.last_shortfall.clone()),
                _ => None,
            });
            let message = shortfall.unwrap_or_else(|| format!("model {id} is {}", self.models[i].state));
            for (_, asked, reply) in late {
                let waited = now.saturating_duration_since(asked);
                let _ = reply.send(Err(ArbiterError::Timeout { waited, message: message.clone() }));
            }
            // Nobody waits any more: withdraw its queued load (preloads and pinned stay).
            let spec = &self.models[i].spec;
            if self.models[i].ready_waiters.is_empty() && !spec.preload && !spec.pinned {
                self.queue.retain(|w| !matches!(&w.pending, Pending::Load { model } if *model == id));
            }
        }
    }

    /// A new reading: attribute processes to models, learn footprints, relieve pressure.
    fn on_sample(&mut self) {
        let view = self.gpu.borrow_and_update().clone();
        self.seen = view.clone();
        // Servers vramgate spawned (each leads its own process group) and the processes of apps
        // holding external models; one app may hold several models.
        let mut servers: HashMap<u32, usize> = HashMap::new();
        let mut apps: HashMap<u32, Vec<usize>> = HashMap::new();
        for (i, model) in self.models.iter().enumerate() {
            // A CPU form's processes are not the model's GPU footprint: what they use anyway
            // counts as foreign.
            if model.placement == Placement::Cpu {
                continue;
            }
            if let Some(process) = &model.process {
                servers.insert(process.pid, i);
                // Its group, led by its keeper: the workers a wrapper starts are in it.
                servers.insert(process.group, i);
            }
            if let Some(pid) = model.attachment.as_ref().and_then(|a| a.pid).or(model.oneshot.flatten())
                && model.on_gpu()
            {
                apps.entry(pid).or_default().push(i);
            }
        }
        let mut process_models = HashMap::new();
        let mut usage: HashMap<usize, u64> = HashMap::new();
        let mut holder_usage: HashMap<(u32, u32), u64> = HashMap::new();
        let mut app_pids: HashMap<u32, Vec<String>> = HashMap::new();
        for device in &view.devices {
            let holders: BTreeSet<u32> = self
                .leases
                .values()
                .filter(|l| l.grant.model.is_none() && l.grant.device == Some(device.index))
                .filter_map(|l| l.pid)
                .collect();
            for p in &device.processes {
                if let Some(models) = apps.get(&p.pid) {
                    // Shared by its models in proportion to what they declare, so the process
                    // is counted once.
                    let declared: Vec<u64> =
                        models.iter().map(|&i| self.models[i].spec.declared_mib.unwrap_or(1).max(1)).collect();
                    let total: u64 = declared.iter().sum();
                    for (&i, share) in models.iter().zip(declared) {
                        *usage.entry(i).or_default() += p.used_mib * share / total;
                    }
                    process_models.insert(p.pid, self.models[models[0]].spec.id.clone());
                    app_pids.insert(p.pid, models.iter().map(|&i| self.models[i].spec.id.clone()).collect());
                    continue;
                }
                // A worker of a model's server: same process group as the leader (only for
                // servers vramgate spawned; an app's own jobs are not its model).
                let server = servers.get(&p.pid).copied().or_else(|| {
                    let group = process::proc_stat_field(p.pid, 5)? as u32;
                    servers.get(&group).copied()
                });
                if let Some(i) = server {
                    process_models.insert(p.pid, self.models[i].spec.id.clone());
                    *usage.entry(i).or_default() += p.used_mib;
                    self.models[i].gpu_pids.insert(p.pid);
                } else if let Some(holder) = Self::lease_holder_of(p.pid, &holders) {
                    *holder_usage.entry((holder, device.index)).or_default() += p.used_mib;
                }
            }
        }
        self.process_models = process_models;
        self.holder_usage = holder_usage;
        self.app_pids = app_pids;
        for i in 0..self.models.len() {
            let used = usage.get(&i).copied().unwrap_or(0);
            let model = &mut self.models[i];
            // Ollama models are measured from `/api/ps`.
            if !model.on_gpu() || model.spec.backend == Backend::Ollama {
                continue;
            }
            model.current_mib = used;
            // An app's process may hold more than the model: its use is not learned as the
            // model's footprint.
            if model.state == ModelState::Ready
                && model.spec.backend == Backend::Process
                && used > model.learned_mib.unwrap_or(0)
            {
                model.learned_mib = Some(used);
                if let Err(e) = self.store.record_footprint(&model.spec.id, used) {
                    tracing::error!("{e}");
                    self.store_error = Some(e.to_string());
                }
            }
        }
        // Pressure: at emergency, release idle models one at a time, lowest priority first, until
        // the level is below critical.
        for device in &view.devices {
            if device.level == Level::Emergency {
                self.pressure.insert(device.index);
            } else if device.level < Level::Critical {
                self.pressure.remove(&device.index);
            }
        }
        for device in self.pressure.clone() {
            let releasing = self.models.iter().any(|m| m.state == ModelState::Unloading && m.device == Some(device));
            if releasing {
                continue;
            }
            let (_, residents, _) = self.policy_inputs();
            if let Some(victim) =
                policy::pressure_victim(device, &residents, millis_since(self.started, Instant::now()))
                && let Ok(i) = self.index(&victim)
            {
                let _ = self.begin_unload(i, "pressure".into());
            }
        }
    }

    fn model_status(&self, i: usize) -> ModelStatus {
        let m = &self.models[i];
        ModelStatus {
            id: m.spec.id.clone(),
            backend: m.spec.backend.as_str().into(),
            state: m.state.as_str().into(),
            device: m.device,
            vram_mib: m.footprint(),
            in_use: m.gate.in_use(),
            pinned: m.spec.pinned,
            priority: m.spec.priority,
            last_used: m
                .used_once
                .then(|| self.started_wall + chrono::Duration::milliseconds(m.gate.last_used_ms() as i64)),
            upstream: m.upstream(),
            pid: m.process.as_ref().map(|p| p.pid).or(m.attachment.as_ref().and_then(|a| a.pid)),
            measured_mib: m.learned_mib,
            declared_mib: m.spec.declared_mib,
            failures: m.failures,
            retry_in_s: m.cooldown_until.map(|t| t.saturating_duration_since(Instant::now()).as_secs()),
            last_error: m.last_error.clone(),
            aliases: m.spec.aliases.clone(),
            placement: (m.state == ModelState::Ready).then(|| m.placement.as_str().to_string()),
            expires_at: m
                .idle_expiry(self.started)
                .map(|t| self.started_wall + chrono::Duration::milliseconds(millis_since(self.started, t) as i64)),
            note: m.note.clone(),
            attached: m.attachment.as_ref().map(|a| a.holder.clone()),
            state_reason: m.state_reason.clone(),
        }
    }

    /// The queue as status shows it, in serving order; stale waiters (whose model vanished or
    /// is loading already) are left out, as `schedule` will drop them.
    fn queue_status(&self) -> Vec<QueueEntry> {
        (0..self.queue.len())
            .filter_map(|index| {
                let (request, is_load) = self.policy_request(index)?;
                let waiter = &self.queue[index];
                let (model, holder, pid) = match &waiter.pending {
                    Pending::Load { model } => (Some(model.clone()), None, None),
                    Pending::Lease { request, .. } => (None, Some(request.holder.clone()), request.pid),
                };
                let queued_at = i64::try_from(millis_since(self.started, waiter.since))
                    .ok()
                    .and_then(chrono::TimeDelta::try_milliseconds)
                    .and_then(|after_start| self.started_wall.checked_add_signed(after_start))
                    .unwrap_or(self.started_wall);
                Some(QueueEntry {
                    requester: request.requester,
                    kind: if is_load { "load" } else { "lease" }.into(),
                    model,
                    holder,
                    pid,
                    device: request.device,
                    vram_mib: request.mib,
                    priority: waiter.priority,
                    reason: waiter.waiting_for.clone(),
                    since: queued_at,
                })
            })
            .collect()
    }

    fn publish(&mut self) {
        let models = (0..self.models.len()).map(|i| self.model_status(i)).collect();
        let mut leases: Vec<LeaseStatus> = self
            .leases
            .values()
            .map(|l| LeaseStatus {
                id: l.grant.id.clone(),
                holder: l.grant.holder.clone(),
                device: l.grant.device.unwrap_or(0),
                vram_mib: l.grant.vram_mib,
                exclusive: l.grant.exclusive,
                model: l.grant.model.clone(),
                priority: l.priority,
            })
            .collect();
        leases.sort_by(|a, b| a.id.cmp(&b.id));
        let degraded_reasons = self.store_error.iter().map(|e| format!("state database: {e}")).collect();
        let mut degraded_reasons: Vec<String> = degraded_reasons;
        let mut ollama = Vec::new();
        for (url, server) in &self.ollama {
            if server.reachable == Some(false) {
                degraded_reasons.push(format!(
                    "Ollama at {url} does not answer ({}); its models are failed until it returns (retrying)",
                    server.error.as_deref().unwrap_or("no answer")
                ));
            }
            let models = server
                .loaded
                .iter()
                .map(|entry| OllamaModelStatus {
                    name: entry.name.clone(),
                    vram_mib: entry.vram_mib,
                    managed_as: self
                        .models
                        .iter()
                        .find(|m| {
                            m.spec.backend == Backend::Ollama
                                && m.spec.url == *url
                                && m.holds_memory()
                                && m.spec.ollama_model.as_deref().is_some_and(|n| ollama::same_model(n, &entry.name))
                        })
                        .map(|m| m.spec.id.clone()),
                })
                .collect();
            ollama.push(OllamaStatus {
                url: url.clone(),
                reachable: server.reachable,
                error: server.error.clone(),
                models,
            });
        }
        let queue = self.queue_status();
        self.view.send_replace(Arc::new(ArbiterView {
            models,
            leases,
            queue,
            process_models: self.process_models.clone(),
            degraded_reasons,
            mode: self.mode.clone(),
            ollama,
        }));
    }

    /// Stops every model process: SIGTERM to all at once, a bounded grace, then SIGKILL.
    async fn shutdown(&mut self) {
        for waiter in std::mem::take(&mut self.queue) {
            self.refuse(waiter, ArbiterError::ShuttingDown);
        }
        let handles: Vec<(String, ProcessHandle)> =
            self.models.iter().filter_map(|m| Some((m.spec.id.clone(), m.process.clone()?))).collect();
        let stops = handles.iter().map(|(id, handle)| async move {
            let grace = SHUTDOWN_STOP;
            let (exit, killed) = handle.stop(grace).await;
            tracing::info!(model = %id, killed, "stopped ({exit})");
        });
        futures_util::future::join_all(stops).await;
        for (_, handle) in &handles {
            let _ = self.store.forget_process(handle.pid);
        }
        for i in 0..self.models.len() {
            if self.models[i].holds_memory() {
                self.set_state(i, ModelState::Unloaded, "shutdown".into(), None);
            }
        }
    }
}

/// Reads an Ollama's `/api/ps` every second while it answers, backing off to
/// `OLLAMA_BACKOFF_MAX` while it does not, and reports each answer to the arbiter.
async fn watch_ollama(
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

/// What a waiter whose victims are being released waits for; `None` when it waits for none.
fn evicting(victims: &BTreeSet<String>) -> Option<String> {
    let names: Vec<&str> = victims.iter().map(String::as_str).collect();
    (!names.is_empty()).then(|| format!("evicting {} to make room", names.join(", ")))
}

/// Records that `requester`, not served yet, blocks later waiters on `device` (on every device
/// when it may use any); the first blocker is the one named to those behind it.
fn mark_blocked(
    blocked: &mut BTreeMap<u32, String>,
    blocked_all: &mut Option<String>,
    device: Option<u32>,
    requester: &str,
) {
    match device {
        Some(d) => {
            blocked.entry(d).or_insert_with(|| requester.to_string());
        }
        None => {
            blocked_all.get_or_insert_with(|| requester.to_string());
        }
    }
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

/// `now + wait`, saturating: a client may ask to wait "forever" (u64 seconds) without
/// overflowing the clock.
fn deadline_after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait).unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
