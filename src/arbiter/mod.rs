//! The arbiter: the single owner of scheduling state (models, leases, the queue).
//!
//! It is one task fed by a channel ([`ArbiterHandle`] sends it [`Command`]s). Decisions come from
//! the pure `policy` module; slow work (spawning, health polling, stopping, waiting for memory to
//! come back) runs in tasks that report back to the arbiter with messages, so its loop never
//! blocks. After every message it publishes an [`ArbiterView`] for status readers.

mod drivers;
mod engine;
pub mod gate;
mod prefetch;
mod shell;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::backend::external::Instruction;
use crate::backend::ollama::OllamaLoaded;
use crate::backend::process::{ExitInfo, LogBuffer, ProcessHandle};
use crate::config::ModeConfig;
use crate::status::{LeaseStatus, ModelStatus, OllamaStatus, QueueEntry};
use crate::units::Rounded;

pub use shell::{Arbiter, ArbiterSettings};

/// What the arbiter publishes after every change.
#[derive(Debug, Clone, Default)]
pub struct ArbiterView {
    /// Every configured model.
    pub models: Vec<ModelStatus>,
    /// Every lease held.
    pub leases: Vec<LeaseStatus>,
    /// The requests waiting, in serving order, each with what it waits for.
    pub queue: Vec<QueueEntry>,
    /// Which managed model each GPU process belongs to, by pid.
    pub process_models: HashMap<u32, String>,
    /// Reasons the scheduling side is degraded (a failing state database, an unreachable
    /// Ollama).
    pub degraded_reasons: Vec<String>,
    /// Warnings about a device's readings, by device index (its pids are from another pid
    /// namespace), shown in that device's `warnings`.
    pub device_warnings: BTreeMap<u32, Vec<String>>,
    /// The mode applied last.
    pub mode: Option<String>,
    /// Each Ollama server the models use: reachable or not, and what it has loaded.
    pub ollama: Vec<OllamaStatus>,
}

/// Why a request to the arbiter failed. Each message names the numbers a person needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArbiterError {
    /// No model or alias has that name.
    #[error("unknown model {name:?}; configured: {}", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    UnknownModel {
        /// The name asked for.
        name: String,
        /// The names that exist.
        known: Vec<String>,
    },
    /// It can never fit, however long it waits.
    #[error("{0}")]
    NeverFits(String),
    /// It waited `queue_timeout` (or `--wait`) without fitting.
    #[error("gave up after waiting {}: {message}", Rounded(*waited))]
    Timeout {
        /// How long it waited.
        waited: Duration,
        /// The last shortfall, with numbers.
        message: String,
    },
    /// The queue is full.
    #[error("the queue is full ({0} waiting); try again later")]
    QueueFull(u32),
    /// Too many callers already wait for models to load (`scheduler.max_waiters_per_model`,
    /// `scheduler.max_waiters`); answered 503 with `Retry-After`.
    #[error("{0}; try again later")]
    TooManyWaiters(String),
    /// The model's process did not start.
    #[error("model {model} failed to start: {message}")]
    StartFailed {
        /// Model id.
        model: String,
        /// Why, with the log tail.
        message: String,
    },
    /// The model failed repeatedly and waits out a cooldown before the next automatic try.
    #[error(
        "model {model} failed to start {failures} times in a row; next automatic try in {} (`vramgate load {model}` retries now). Last error: {last_error}",
        Rounded(*retry_in)
    )]
    Cooldown {
        /// Model id.
        model: String,
        /// Failures in a row.
        failures: u32,
        /// Time left.
        retry_in: Duration,
        /// The last start error.
        last_error: String,
    },
    /// The request was overtaken by an unload of the same model, or similar.
    #[error("{0}")]
    Cancelled(String),
    /// No lease has that id.
    #[error("no lease {0:?} (released, expired, or never granted)")]
    UnknownLease(String),
    /// The daemon is stopping.
    #[error("vramgate is shutting down")]
    ShuttingDown,
    /// The request does not make sense for this model (e.g. attaching to a process model).
    #[error("{0}")]
    Invalid(String),
    /// Something named in the request does not exist (a mode, an attachment, an instruction).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the model's state (another app is attached, it is busy).
    #[error("{0}")]
    Conflict(String),
    /// A step of a mode switch failed; the steps before it stay done.
    #[error("mode {mode}: {step}: {inner}")]
    InMode {
        /// The mode being applied.
        mode: String,
        /// The step that failed, e.g. `loading vlm on the GPU`.
        step: String,
        /// Why.
        inner: Box<ArbiterError>,
    },
}

/// A request for a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRequest {
    /// Who holds it (shown in status and in other requests' shortfall messages).
    pub holder: String,
    /// Memory to hold, for a memory lease.
    pub vram_mib: u64,
    /// A fixed device; `None` lets vramgate choose.
    pub device: Option<u32>,
    /// No other lease or load on the device while held (seed 003's process-wide GPU lock).
    pub exclusive: bool,
    /// Higher wins in the queue and may evict idle models of lower or equal priority.
    pub priority: i32,
    /// How long it may wait for memory; zero = fail at once if it does not fit.
    pub wait: Duration,
    /// Heartbeat: the lease expires unless renewed within this time. `None` = held as long as
    /// the connection that asked for it (the HTTP layer releases it when the client goes).
    pub ttl: Option<Duration>,
    /// A model lease: load this model (on demand) and keep it in use (never evicted) while held.
    pub model: Option<String>,
    /// The holder's process. For a model lease on an external model that no app is attached to
    /// (the one-shot form: acquire, renew, release), this process's GPU memory is the model's.
    pub pid: Option<u32>,
}

/// A granted lease.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaseGrant {
    /// Lease id, for renew and release.
    pub id: String,
    /// Who holds it.
    pub holder: String,
    /// Its device (`null` on a machine without GPUs for a model lease).
    pub device: Option<u32>,
    /// Memory held.
    pub vram_mib: u64,
    /// Exclusive or not.
    pub exclusive: bool,
    /// The heartbeat, if any: renew before this many milliseconds pass.
    pub ttl_ms: Option<u64>,
    /// For a model lease: the model id and its upstream base URL.
    pub model: Option<String>,
    /// For a model lease: where the model's server listens.
    pub upstream: Option<String>,
}

/// The answer to an unload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unloaded {
    /// The model's status entry once it is unloaded.
    pub status: ModelStatus,
    /// False when there was nothing to unload (it was unloaded or failed already), so that a
    /// second `vramgate unload` can say so instead of reporting memory it did not free.
    pub was_loaded: bool,
}

/// A model that was ready when the answer was made, pinned for the caller so that nothing can
/// evict it between "ready" and its first use. Dropping it unpins.
pub struct Loaded {
    /// The model's status entry.
    pub status: ModelStatus,
    /// The pin; `None` only if the model closed again in the same instant.
    pub pin: Option<gate::Pin>,
}

/// Messages to the arbiter.
pub(crate) enum Command {
    Load { name: String, explicit: bool, reply: oneshot::Sender<Result<Loaded, ArbiterError>> },
    Unload { name: String, reply: oneshot::Sender<Result<Unloaded, ArbiterError>> },
    Acquire { request: LeaseRequest, reply: oneshot::Sender<Result<LeaseGrant, ArbiterError>> },
    Renew { id: String, reply: oneshot::Sender<Result<LeaseGrant, ArbiterError>> },
    Release { id: String, reason: &'static str, reply: Option<oneshot::Sender<Result<(), ArbiterError>>> },
    Logs { name: String, reply: oneshot::Sender<Result<Option<Arc<LogBuffer>>, ArbiterError>> },
    Choose { candidates: Vec<String>, reply: oneshot::Sender<Result<String, ArbiterError>> },
    PlanInputs { models: Vec<String>, reply: oneshot::Sender<Result<crate::plan::Inputs, ArbiterError>> },
    Spawned { model: String, generation: u64, handle: ProcessHandle, port: u16 },
    LoadFinished { model: String, generation: u64, result: Result<(), String> },
    Exited { model: String, generation: u64, exit: ExitInfo },
    Released { model: String, generation: u64, timed_out: bool, waited: Duration },
    PlaceCpu { name: String, reply: oneshot::Sender<Result<ModelStatus, ArbiterError>> },
    Attach { name: String, pid: Option<u32>, holder: String, reply: oneshot::Sender<Result<Attached, ArbiterError>> },
    Detach { name: String, session: String },
    Ack { name: String, ack: Ack, reply: oneshot::Sender<Result<(), ArbiterError>> },
    OllamaPs { url: String, result: Result<Vec<OllamaLoaded>, String> },
    OneshotEnded { model: String },
    ModeApplied { name: String, reply: oneshot::Sender<Result<(), ArbiterError>> },
}

impl Command {
    /// Answers a request with `error` instead of carrying it out (reports, which have no caller,
    /// are dropped).
    pub(crate) fn refuse(self, error: ArbiterError) {
        match self {
            Command::Load { reply, .. } => drop(reply.send(Err(error))),
            Command::PlaceCpu { reply, .. } => drop(reply.send(Err(error))),
            Command::Unload { reply, .. } => drop(reply.send(Err(error))),
            Command::Acquire { reply, .. } | Command::Renew { reply, .. } => drop(reply.send(Err(error))),
            Command::Release { reply: Some(reply), .. } => drop(reply.send(Err(error))),
            Command::Logs { reply, .. } => drop(reply.send(Err(error))),
            Command::Choose { reply, .. } => drop(reply.send(Err(error))),
            Command::PlanInputs { reply, .. } => drop(reply.send(Err(error))),
            Command::Attach { reply, .. } => drop(reply.send(Err(error))),
            Command::Ack { reply, .. } | Command::ModeApplied { reply, .. } => drop(reply.send(Err(error))),
            Command::Release { reply: None, .. }
            | Command::Spawned { .. }
            | Command::LoadFinished { .. }
            | Command::Exited { .. }
            | Command::Released { .. }
            | Command::Detach { .. }
            | Command::OllamaPs { .. }
            | Command::OneshotEnded { .. } => {}
        }
    }
}

/// An app's attachment to an external model, as the HTTP layer streams it.
pub struct Attached {
    /// Names the attachment in acknowledgements.
    pub session: String,
    /// The instructions to write on the stream.
    pub instructions: mpsc::UnboundedReceiver<Instruction>,
}

/// An app's acknowledgement of an instruction.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    /// The attachment's session.
    pub session: String,
    /// The instruction's number.
    pub seq: u64,
    /// Whether the app carried it out.
    pub ok: bool,
    /// Why not, when it did not.
    #[serde(default)]
    pub error: Option<String>,
}

/// Releases a lease whose grant arrived after its caller stopped waiting.
struct GrantGuard {
    answer: Option<oneshot::Receiver<Result<LeaseGrant, ArbiterError>>>,
    arbiter: ArbiterHandle,
}

impl Drop for GrantGuard {
    fn drop(&mut self) {
        if let Some(mut answer) = self.answer.take() {
            // Closing first means the arbiter can no longer send: either the grant is here now,
            // or it will see the closed channel and release it itself.
            answer.close();
            if let Ok(Ok(grant)) = answer.try_recv() {
                self.arbiter.release_detached(&grant.id, "disconnected");
            }
        }
    }
}

/// The way everything else talks to the arbiter. Cheap to clone.
#[derive(Clone)]
pub struct ArbiterHandle {
    commands: mpsc::Sender<Command>,
    view: watch::Receiver<Arc<ArbiterView>>,
    /// Every model's gate by id and by alias, for the hot path.
    gates: Arc<HashMap<String, Arc<gate::ModelGate>>>,
    /// `[aliases]`: names with candidate models.
    groups: Arc<HashMap<String, Vec<String>>>,
    /// `[modes]`.
    modes: Arc<BTreeMap<String, ModeConfig>>,
    /// Mode switches run one at a time.
    mode_switch: Arc<tokio::sync::Mutex<()>>,
}

impl ArbiterHandle {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, ArbiterError>>) -> Command,
    ) -> Result<T, ArbiterError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(make(reply)).await.map_err(|_| ArbiterError::ShuttingDown)?;
        answer.await.map_err(|_| ArbiterError::ShuttingDown)?
    }

    /// Loads a model (by id or alias) and waits until it is ready. `explicit` (a user's `load`)
    /// also retries a model in its failure cooldown.
    pub async fn load(&self, name: &str, explicit: bool) -> Result<ModelStatus, ArbiterError> {
        self.ask(|reply| Command::Load { name: name.to_string(), explicit, reply }).await.map(|loaded| loaded.status)
    }

    /// Loads a model if needed (a demand: no retry during a failure cooldown) and returns it
    /// pinned. `Ok(None)`: it closed again at once (evicted or draining); ask again.
    pub async fn pin(&self, name: &str) -> Result<Option<gate::Pin>, ArbiterError> {
        self.ask(|reply| Command::Load { name: name.to_string(), explicit: false, reply })
            .await
            .map(|loaded| loaded.pin)
    }

    /// Unloads a model and waits until its memory is back.
    pub async fn unload(&self, name: &str) -> Result<Unloaded, ArbiterError> {
        self.ask(|reply| Command::Unload { name: name.to_string(), reply }).await
    }

    /// Asks for a lease and waits for it (up to `request.wait`). If the caller stops waiting
    /// (its HTTP client disconnected and the handler was dropped), a grant that was already sent
    /// is released rather than leaked.
    pub async fn acquire(&self, request: LeaseRequest) -> Result<LeaseGrant, ArbiterError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Acquire { request, reply }).await.map_err(|_| ArbiterError::ShuttingDown)?;
        let mut guard = GrantGuard { answer: Some(answer), arbiter: self.clone() };
        let answer = guard.answer.as_mut().ok_or(ArbiterError::ShuttingDown)?;
        let result = answer.await.map_err(|_| ArbiterError::ShuttingDown)?;
        guard.answer = None;
        result
    }

    /// Renews a heartbeat lease.
    pub async fn renew(&self, id: &str) -> Result<LeaseGrant, ArbiterError> {
        self.ask(|reply| Command::Renew { id: id.to_string(), reply }).await
    }

    /// Releases a lease and waits until the arbiter has done so.
    pub async fn release(&self, id: &str) -> Result<(), ArbiterError> {
        self.ask(|reply| Command::Release { id: id.to_string(), reason: "released", reply: Some(reply) }).await
    }

    /// Releases a lease without waiting (for a connection that is going away).
    pub fn release_detached(&self, id: &str, reason: &'static str) {
        let command = Command::Release { id: id.to_string(), reason, reply: None };
        if let Err(mpsc::error::TrySendError::Full(command)) = self.commands.try_send(command) {
            let commands = self.commands.clone();
            tokio::spawn(async move {
                let _ = commands.send(command).await;
            });
        }
    }

    /// A model's log buffer (`None` if it never ran in this daemon).
    pub async fn logs(&self, name: &str) -> Result<Option<Arc<LogBuffer>>, ArbiterError> {
        self.ask(|reply| Command::Logs { name: name.to_string(), reply }).await
    }

    /// The gate of a model, by id or alias.
    pub fn gate(&self, name: &str) -> Option<Arc<gate::ModelGate>> {
        self.gates.get(name).cloned()
    }

    /// The candidates of an `[aliases]` name, in preference order.
    pub fn candidates(&self, name: &str) -> Option<&[String]> {
        self.groups.get(name).map(Vec::as_slice)
    }

    /// Which candidate an `[aliases]` name should use now (see `Arbiter::choose`).
    pub async fn choose(&self, candidates: &[String]) -> Result<String, ArbiterError> {
        self.ask(|reply| Command::Choose { candidates: candidates.to_vec(), reply }).await
    }

    /// Every name requests may use (ids, model aliases and `[aliases]`), sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.gates.keys().chain(self.groups.keys()).cloned().collect();
        names.sort();
        names
    }

    /// The latest view, with each model's `in_use` read live from its gate. The arbiter
    /// republishes after a request's pin drops only when it gets to it, so without the live count
    /// a client that reads the status right after its answer could still see its own request.
    /// Only `in_use` is live: `last_used` and the rest are as last published.
    pub fn view(&self) -> Arc<ArbiterView> {
        let published = self.view.borrow().clone();
        let live = |m: &ModelStatus| self.gates.get(&m.id).map(|gate| gate.in_use());
        if published.models.iter().all(|m| live(m).is_none_or(|in_use| in_use == m.in_use)) {
            return published;
        }
        let mut view = ArbiterView::clone(&published);
        for model in &mut view.models {
            if let Some(in_use) = live(model) {
                model.in_use = in_use;
            }
        }
        Arc::new(view)
    }

    /// Puts a model in its CPU form (loading it there, or demoting it from the GPU) and waits
    /// until it serves from there.
    pub async fn place_cpu(&self, name: &str) -> Result<ModelStatus, ArbiterError> {
        self.ask(|reply| Command::PlaceCpu { name: name.to_string(), reply }).await
    }

    /// Attaches an app to an external model; it receives instructions until the returned stream
    /// is dropped, which detaches it and releases what it held.
    pub async fn attach(&self, name: &str, pid: Option<u32>, holder: &str) -> Result<Attached, ArbiterError> {
        self.ask(|reply| Command::Attach { name: name.to_string(), pid, holder: holder.to_string(), reply }).await
    }

    /// Detaches an app (its stream is gone), without waiting.
    pub fn detach_detached(&self, name: &str, session: &str) {
        let command = Command::Detach { name: name.to_string(), session: session.to_string() };
        if let Err(mpsc::error::TrySendError::Full(command)) = self.commands.try_send(command) {
            let commands = self.commands.clone();
            tokio::spawn(async move {
                let _ = commands.send(command).await;
            });
        }
    }

    /// An app's acknowledgement of an instruction.
    pub async fn ack(&self, name: &str, ack: Ack) -> Result<(), ArbiterError> {
        self.ask(|reply| Command::Ack { name: name.to_string(), ack, reply }).await
    }

    /// What `vramgate plan` judges `models` (ids or aliases) on: the policy's view of every
    /// device, the residents and holds now, and each model's known footprint.
    pub async fn plan_inputs(&self, models: &[String]) -> Result<crate::plan::Inputs, ArbiterError> {
        self.ask(|reply| Command::PlanInputs { models: models.to_vec(), reply }).await
    }

    /// The status view, as it changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ArbiterView>> {
        self.view.clone()
    }

    /// Exclusive use of the model set for a long multi-step change (a mode switch, a plan's
    /// measurement), or `None` while another one runs.
    pub fn try_exclusive(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        self.mode_switch.clone().try_lock_owned().ok()
    }

    /// The `[modes]` table.
    pub fn modes(&self) -> &BTreeMap<String, ModeConfig> {
        &self.modes
    }

    /// Applies a mode: unloads, then CPU placements (demotions), then GPU loads, each waited
    /// for, stopping at the first error. Mode switches are serialized.
    pub async fn set_mode(&self, name: &str) -> Result<Vec<ModelStatus>, ArbiterError> {
        let Some(mode) = self.modes.get(name).cloned() else {
            let known: Vec<&str> = self.modes.keys().map(String::as_str).collect();
            let list = if known.is_empty() { "none defined".to_string() } else { known.join(", ") };
            return Err(ArbiterError::NotFound(format!("unknown mode {name:?} (modes: {list})")));
        };
        // Run to the end in its own task: a caller that stops waiting (an HTTP client that gave
        // up) must not leave the switch half done and the mode unrecorded.
        let handle = self.clone();
        let name = name.to_string();
        let switch = tokio::spawn(async move {
            let _serial = handle.mode_switch.lock().await;
            handle.apply_mode(&name, &mode).await
        });
        switch.await.map_err(|_| ArbiterError::ShuttingDown)?
    }

    async fn apply_mode(&self, name: &str, mode: &ModeConfig) -> Result<Vec<ModelStatus>, ArbiterError> {
        let fail = |step: String| {
            move |inner: ArbiterError| ArbiterError::InMode { mode: name.to_string(), step, inner: Box::new(inner) }
        };
        for id in &mode.unload {
            self.unload(id).await.map_err(fail(format!("unloading {id}")))?;
        }
        for id in &mode.cpu {
            self.place_cpu(id).await.map_err(fail(format!("placing {id} on the CPU")))?;
        }
        let gpu = mode.gpu_models();
        for id in &gpu {
            self.load(id, true).await.map_err(fail(format!("loading {id} on the GPU")))?;
        }
        // A later load may have evicted an earlier one: the mode holds only if all are there.
        let view = self.view();
        let missing: Vec<&str> = gpu
            .iter()
            .filter(|id| {
                !view.models.iter().any(|m| m.id == **id && m.state == "ready" && m.placement.as_deref() == Some("gpu"))
            })
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            let step = format!("keeping {} on the GPU together", gpu.join(", "));
            let inner = ArbiterError::Conflict(format!(
                "{} did not stay on the GPU (evicted to make room for a later model of the mode): they do not fit \
                 together",
                missing.join(", ")
            ));
            return Err(ArbiterError::InMode { mode: name.to_string(), step, inner: Box::new(inner) });
        }
        self.ask(|reply| Command::ModeApplied { name: name.to_string(), reply }).await?;
        Ok(self.view().models.clone())
    }
}
