//! A model's state: its lifecycle [`Phase`], why it changed ([`Reason`]), and what the engine
//! keeps beside it (leases, queue entries, callers waiting).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::super::gate::{ModelGate, Pin};
use super::super::{ArbiterError, LeaseGrant, LeaseRequest, Loaded, Unloaded};
use crate::backend::external::{Attachment, PendingAck};
use crate::backend::ollama::OllamaLoaded;
use crate::backend::process::{LogBuffer, ProcessHandle};
use crate::config::{Backend, BackendSpec, ModelSpec};
use crate::events::ModelState;
use crate::status::ModelStatus;

/// Where a loaded model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// On the GPU: its memory is accounted.
    Gpu,
    /// Its CPU form: no GPU memory is accounted for it.
    Cpu,
}

impl Placement {
    /// The name status and events use.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Placement::Gpu => "gpu",
            Placement::Cpu => "cpu",
        }
    }
}

/// A model's lifecycle. Each variant carries what only it needs; status shows
/// [`Phase::state`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Not running.
    Unloaded,
    /// Starting: memory reserved, the backend asked to load it.
    Loading,
    /// Serving. `draining`: a waiter waited `max_wait_before_swap` for the memory it holds, so it
    /// takes no new requests; those in flight finish, then it is evicted.
    Ready { draining: bool },
    /// Being released; `then` says what the release leads to. `idle_by`: a requested unload of a
    /// model in use waits for its requests in flight to end (the gate is closed, so no new ones
    /// start) until then, and cuts them after.
    Unloading { then: AfterRelease, idle_by: Option<Instant> },
    /// Not loadable until something changes: see [`Failure`].
    Failed(Failure),
}

/// What a release leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterRelease {
    /// `unloaded`.
    Unloaded,
    /// The CPU form starts (a demotion).
    CpuForm,
    /// `failed`: it failed to start often enough to wait out a cooldown.
    Failed,
}

/// Why a model is failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// It failed to start repeatedly; a demand waits out the cooldown (`cooldown_until`).
    StartFailures,
    /// Its Ollama does not answer; it is unloaded (or adopted) once it does.
    OllamaUnreachable,
    /// The attached app did not acknowledge an instruction in time.
    Unresponsive,
}

impl Phase {
    /// The documented state name.
    pub(crate) fn state(&self) -> ModelState {
        match self {
            Phase::Unloaded => ModelState::Unloaded,
            Phase::Loading => ModelState::Loading,
            Phase::Ready { .. } => ModelState::Ready,
            Phase::Unloading { .. } => ModelState::Unloading,
            Phase::Failed(_) => ModelState::Failed,
        }
    }

    /// Whether an unload waits for the model's requests in flight to end.
    pub(crate) fn waits_for_idle(&self) -> bool {
        matches!(self, Phase::Unloading { idle_by: Some(_), .. })
    }

    /// Being released only to come back in its CPU form.
    pub(crate) fn demoting(&self) -> bool {
        matches!(self, Phase::Unloading { then: AfterRelease::CpuForm, .. })
    }

    /// Ready and taking requests.
    pub(crate) fn serving(&self) -> bool {
        matches!(self, Phase::Ready { draining: false })
    }
}

/// Why a model changed state: the event's `reason`, and the `state_reason` status keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reason {
    /// A user, a mode or a Ollama-surface `keep_alive: 0` asked.
    Requested,
    /// Its idle TTL passed.
    Idle,
    /// Evicted to make room for another model or a lease.
    EvictedFor(String),
    /// Evicted because `resident_cap` models were resident.
    ResidentCap,
    /// Released to relieve an emergency on its device.
    Pressure,
    /// Its process exited while serving.
    Crashed,
    /// Its start failed.
    StartFailed,
    /// Its memory is back (the end of an unload, which keeps the unload's cause).
    Released,
    /// Its start succeeded.
    Ready,
    /// Moved from its CPU form to the GPU.
    Promoted,
    /// Moved from the GPU to its CPU form.
    Demoted,
    /// A mode (or `place_cpu`) moved it.
    Mode,
    /// An app attached to it.
    Attached,
    /// Its app detached.
    Detached,
    /// Its app did not acknowledge an instruction in time.
    Unresponsive,
    /// Found loaded in its Ollama under its name.
    Adopted,
    /// Its Ollama no longer lists it.
    GoneFromOllama,
    /// Its Ollama answers again.
    OllamaBack,
    /// Its Ollama does not answer.
    OllamaUnreachable,
    /// The daemon is stopping.
    Shutdown,
}

impl Reason {
    /// Whether an unload for this reason is an eviction (it waits for the model to be idle, and
    /// a model with `on_evict = "cpu"` is demoted instead).
    pub(crate) fn is_eviction(&self) -> bool {
        !matches!(self, Reason::Requested | Reason::Idle)
    }

    /// The documented string.
    pub(crate) fn as_string(&self) -> String {
        let plain = match self {
            Reason::EvictedFor(requester) => return format!("evicted_for:{requester}"),
            Reason::Requested => "requested",
            Reason::Idle => "idle",
            Reason::ResidentCap => "resident_cap",
            Reason::Pressure => "pressure",
            Reason::Crashed => "crashed",
            Reason::StartFailed => "failed",
            Reason::Released => "released",
            Reason::Ready => "ready",
            Reason::Promoted => "promoted",
            Reason::Demoted => "demoted",
            Reason::Mode => "mode",
            Reason::Attached => "attached",
            Reason::Detached => "detached",
            Reason::Unresponsive => "unresponsive",
            Reason::Adopted => "adopted",
            Reason::GoneFromOllama => "gone_from_ollama",
            Reason::OllamaBack => "ollama_back",
            Reason::OllamaUnreachable => "ollama_unreachable",
            Reason::Shutdown => "shutdown",
        };
        plain.to_string()
    }
}

/// What vramgate knows about one Ollama server.
#[derive(Default)]
pub(crate) struct OllamaServer {
    pub reachable: Option<bool>,
    pub error: Option<String>,
    pub loaded: Vec<OllamaLoaded>,
}

/// Someone waiting for a model to be ready, and how to answer them.
pub(crate) enum ReadyCaller {
    /// A load or a proxied request: answered with a pin taken when the model became ready.
    Load(oneshot::Sender<Result<Loaded, ArbiterError>>),
    /// A CPU placement: answered with the status once it serves from the CPU.
    PlaceCpu(oneshot::Sender<Result<ModelStatus, ArbiterError>>),
    /// A model lease: granted, holding the pin taken when the model became ready.
    ModelLease {
        request: LeaseRequest,
        reply: oneshot::Sender<Result<LeaseGrant, ArbiterError>>,
        /// When its wait ends (a lease asked again after the model closed at once gets the rest).
        deadline: Instant,
    },
}

impl ReadyCaller {
    /// Whether the caller stopped waiting (its HTTP client went away).
    pub(crate) fn is_closed(&self) -> bool {
        match self {
            ReadyCaller::Load(reply) => reply.is_closed(),
            ReadyCaller::PlaceCpu(reply) => reply.is_closed(),
            ReadyCaller::ModelLease { reply, .. } => reply.is_closed(),
        }
    }
}

/// A caller waiting for a model, with its deadline and when it asked.
pub(crate) struct ReadyWaiter {
    pub deadline: Instant,
    pub asked: Instant,
    pub caller: ReadyCaller,
}

/// One model's state.
pub(crate) struct Model {
    pub spec: ModelSpec,
    pub phase: Phase,
    /// Increases with every start, so messages about an earlier process are recognised and
    /// ignored.
    pub generation: u64,
    pub device: Option<u32>,
    pub port: Option<u16>,
    pub process: Option<ProcessHandle>,
    pub logs: Option<Arc<LogBuffer>>,
    /// The footprint it was admitted with (declared, learned, or the whole device on a first load
    /// without either).
    pub reserved_mib: u64,
    /// Where it runs (or is being started) while loaded. While unloading: where it runs until
    /// the release is done.
    pub placement: Placement,
    /// Demoted to the CPU to make room: promoted back when it fits again.
    pub prefers_gpu: bool,
    /// External models: the app attached to it.
    pub attachment: Option<Attachment>,
    /// External models: the instruction waiting for the app's acknowledgement.
    pub pending_ack: Option<PendingAck>,
    /// External models held in the one-shot form (a model lease, no attached app): loaded
    /// without an instruction (the lease holder loads it itself once granted) and released when
    /// the lease ends. The holder's pid, if it gave one, is attributed to the model.
    pub oneshot: Option<Option<u32>>,
    /// Why it needs attention (shown in status).
    pub note: Option<String>,
    /// When its state last changed: an `/api/ps` answer older than that may predate the change.
    pub changed_at: Instant,
    /// Why it is in its state: the reason of the last change that had a cause of its own (the
    /// `released` that ends an unload keeps the cause of the unload, e.g. `evicted_for:vision`).
    pub state_reason: Option<Reason>,
    /// The largest footprint measured, from the store and this run.
    pub learned_mib: Option<u64>,
    /// The footprint estimated from its weights file's header, used until one is measured.
    pub estimated_mib: Option<u64>,
    /// `learned_mib` was scaled from a measurement made under another estimate: the next
    /// measurement replaces it, even a smaller one.
    pub learned_scaled: bool,
    /// What its processes use now.
    pub current_mib: u64,
    /// The most its processes were seen using since it last became ready (a request's working
    /// memory included); `None` until a reading measured it.
    pub peak_mib: Option<u64>,
    /// In-use count, last use and the serving address, shared with the proxy's hot path.
    pub gate: Arc<ModelGate>,
    /// Whether it was ever used since the daemon started (for `last_used: null`).
    pub used_once: bool,
    pub resident_since: Instant,
    pub failures: u32,
    pub cooldown_until: Option<Instant>,
    pub last_error: Option<String>,
    /// Callers waiting for it to be ready.
    pub ready_waiters: Vec<ReadyWaiter>,
    /// Callers waiting for it to be unloaded.
    pub unload_waiters: Vec<oneshot::Sender<Result<Unloaded, ArbiterError>>>,
    /// Pids seen using GPU memory for it, watched during a release.
    pub gpu_pids: BTreeSet<u32>,
    /// The devices those pids were seen on (a server may spread over several GPUs): a release
    /// is complete only once each of their process lists was read and shows the pids gone.
    pub gpu_devices: BTreeSet<u32>,
}

impl Model {
    pub(crate) fn new(spec: ModelSpec, gate: Arc<ModelGate>, known: &super::KnownFootprints, now: Instant) -> Model {
        Model {
            learned_mib: known.learned.get(&spec.id).copied(),
            estimated_mib: known.estimated.get(&spec.id).copied(),
            learned_scaled: known.scaled.contains(&spec.id),
            gate,
            spec,
            phase: Phase::Unloaded,
            generation: 0,
            device: None,
            port: None,
            process: None,
            logs: None,
            reserved_mib: 0,
            current_mib: 0,
            peak_mib: None,
            used_once: false,
            resident_since: now,
            failures: 0,
            cooldown_until: None,
            last_error: None,
            ready_waiters: Vec::new(),
            unload_waiters: Vec::new(),
            gpu_pids: BTreeSet::new(),
            gpu_devices: BTreeSet::new(),
            placement: Placement::Gpu,
            prefers_gpu: false,
            attachment: None,
            pending_ack: None,
            oneshot: None,
            note: None,
            changed_at: now,
            state_reason: None,
        }
    }

    /// The documented state.
    pub(crate) fn state(&self) -> ModelState {
        self.phase.state()
    }

    /// Memory counted for it: the largest of what it declares, was measured at and uses now, and
    /// while it moves, what it was admitted with (its estimate, for a first load).
    pub(crate) fn footprint(&self) -> u64 {
        if self.placement == Placement::Cpu && self.phase != Phase::Unloaded {
            return 0;
        }
        let moving = matches!(self.phase, Phase::Loading | Phase::Unloading { .. });
        self.known_mib().max(self.current_mib).max(if moving { self.reserved_mib } else { 0 })
    }

    /// What it is known to need before it runs: the larger of what it declares and was measured
    /// at; 0 when neither is known (its estimate is only for admission: see `load_reservation`).
    pub(crate) fn known_mib(&self) -> u64 {
        self.spec.declared_mib.unwrap_or(0).max(self.learned_mib.unwrap_or(0))
    }

    /// When an idle TTL would unload it: ready, unused, not pinned, with a TTL.
    pub(crate) fn idle_expiry(&self, origin: Instant) -> Option<Instant> {
        let idle = matches!(self.phase, Phase::Ready { .. }) && self.gate.in_use() == 0 && !self.spec.pinned;
        if !idle || self.spec.ttl.is_zero() {
            return None;
        }
        // A TTL too large for the clock means "never".
        origin.checked_add(Duration::from_millis(self.gate.last_used_ms()))?.checked_add(self.spec.ttl)
    }

    /// Loaded or moving: its backend holds (or may hold) memory.
    pub(crate) fn holds_memory(&self) -> bool {
        matches!(self.phase, Phase::Loading | Phase::Ready { .. } | Phase::Unloading { .. })
    }

    /// Whether its GPU memory is accounted: loaded or moving, on the GPU.
    pub(crate) fn on_gpu(&self) -> bool {
        self.holds_memory() && self.placement == Placement::Gpu
    }

    /// Where requests go while it is loaded.
    pub(crate) fn upstream(&self) -> Option<String> {
        match &self.spec.backend {
            BackendSpec::Process(_) => self.port.map(|p| format!("http://127.0.0.1:{p}")),
            BackendSpec::Ollama(ollama) => self.holds_memory().then(|| ollama.url.clone()),
            BackendSpec::External(_) => None,
        }
    }

    /// Opens its gate: requests may use it. External models are used inside their app, so their
    /// gate carries no address.
    pub(crate) fn open_gate(&self) {
        let on_cpu = self.placement == Placement::Cpu;
        match self.upstream() {
            Some(upstream) => self.gate.open_on(&upstream, on_cpu),
            None if self.spec.kind() == Backend::External => self.gate.open_on("", on_cpu),
            None => {}
        }
    }
}

/// A lease held: the engine's record of it. The answer a holder gets (`LeaseGrant`, the JSON
/// contract) is made from it, not kept.
pub(crate) struct Lease {
    pub id: String,
    pub holder: String,
    /// Its device (`None` on a machine without GPUs, for a model lease).
    pub device: Option<u32>,
    /// Memory held (0 for a model lease).
    pub vram_mib: u64,
    pub exclusive: bool,
    /// The heartbeat: renewed within this, or it expires.
    pub ttl: Option<Duration>,
    /// A model lease's model, and where its server listens.
    pub model: Option<String>,
    pub upstream: Option<String>,
    pub priority: i32,
    pub expires: Option<Instant>,
    /// The holder's process: its GPU use, and its descendants' (the job `vramgate run` starts),
    /// is the lease's, not foreign, up to the lease's size.
    pub pid: Option<u32>,
    /// For a model lease: the model kept in use until the lease is dropped.
    pub pin: Option<Pin>,
    /// When it was granted.
    pub granted: Instant,
}

impl Lease {
    /// The answer its holder gets.
    pub(crate) fn grant(&self) -> LeaseGrant {
        LeaseGrant {
            id: self.id.clone(),
            holder: self.holder.clone(),
            device: self.device,
            vram_mib: self.vram_mib,
            exclusive: self.exclusive,
            ttl_ms: self.ttl.map(super::millis),
            model: self.model.clone(),
            upstream: self.upstream.clone(),
        }
    }
}

/// What a queue entry waits to do.
pub(crate) enum Pending {
    /// Load a model (its callers wait in the model's `ready_waiters`).
    Load { model: String },
    /// Grant a memory lease.
    Lease { request: LeaseRequest, reply: oneshot::Sender<Result<LeaseGrant, ArbiterError>>, deadline: Instant },
}

/// A request in the queue.
pub(crate) struct Waiter {
    pub seq: u64,
    pub priority: i32,
    pub since: Instant,
    pub pending: Pending,
    /// Models being evicted for it; it is not reconsidered until they are gone, so that one
    /// request never evicts twice for the same deficit.
    pub awaiting_release: BTreeSet<String>,
    /// The last shortfall message (with numbers), for the timeout error when it waited for
    /// nothing more recent.
    pub last_shortfall: Option<String>,
    /// What it waits for as of the last pass that looked at it (a shortfall with its numbers,
    /// evictions, an earlier waiter, a load slot), for the queue in status.
    pub waiting_for: Option<String>,
    /// Busy models this waiter has waited on for `max_wait_before_swap`: they take no new
    /// requests while it waits.
    pub drain: BTreeSet<String>,
    pub announced: bool,
}

impl Waiter {
    /// Whether it is the queued load of `model`.
    pub(crate) fn loads(&self, model: &str) -> bool {
        matches!(&self.pending, Pending::Load { model: m } if m == model)
    }
}
