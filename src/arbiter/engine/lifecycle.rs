//! Loads, unloads and releases: a model's way through its [`Phase`]s, and the backend work each
//! step asks for.

use std::time::Duration;

use super::model::{AfterRelease, Failure, Phase, Placement, ReadyCaller, ReadyWaiter, Reason};
use super::{Effects, Engine, OllamaRelease, OllamaStart, ProcessRelease, ProcessStart, StoreWrite};
use crate::arbiter::{ArbiterError, Command, LeaseRequest, Loaded, Unloaded};
use crate::backend::external::Action;
use crate::backend::process::{ExitInfo, ProcessHandle};
use crate::config::{Backend, BackendSpec, OnEvict};
use crate::events::EventKind;
use crate::policy::{self, FAILURES_BEFORE_COOLDOWN};
use crate::store::ProcessRecord;

impl<E: Effects> Engine<E> {
    /// The error for a demand during a failed model's cooldown, if it is in one.
    pub(super) fn cooldown_error(&self, i: usize) -> Option<ArbiterError> {
        let model = &self.models[i];
        let now = self.now;
        let failed = matches!(model.phase, Phase::Failed(_));
        let until = model.cooldown_until.filter(|t| *t > now && failed)?;
        Some(ArbiterError::Cooldown {
            model: model.spec.id.clone(),
            failures: model.failures,
            retry_in: until.saturating_duration_since(now),
            last_error: model.last_error.clone().unwrap_or_default(),
        })
    }

    /// A load request: answered at once if ready, attached to the load in progress, or queued.
    /// `explicit` (a user's or a mode's load) also promotes a model from its CPU form and
    /// retries one in its failure cooldown.
    pub(super) fn request_load(&mut self, id: &str, caller: Option<(std::time::Instant, ReadyCaller)>, explicit: bool) {
        let Ok(i) = self.index(id) else { return };
        let now = self.now;
        let leased = self.leased(id);
        let model = &self.models[i];
        let moving_to_cpu =
            model.phase.demoting() || (model.phase == Phase::Loading && model.placement == Placement::Cpu);
        if explicit && moving_to_cpu {
            // A user's load means the GPU: once the CPU form is up, it is promoted.
            match caller {
                Some((deadline, ReadyCaller::Load(reply))) => {
                    self.settle_then(i, deadline, Command::Load { name: id.to_string(), explicit: true, reply })
                }
                Some((deadline, caller)) => {
                    self.add_ready_waiter(i, deadline, caller);
                }
                None => {}
            }
            return;
        }
        match &model.phase {
            Phase::Ready { draining: true } => {
                // It is being swapped out: wait for it behind the swap, then load it again.
                if let Some((deadline, caller)) = caller {
                    self.add_ready_waiter(i, deadline, caller);
                }
                return;
            }
            // A user's or a mode's load of a model running in its CPU form: promote it (through
            // the queue, like any load), unless model leases hold its CPU form's server. A
            // request through the proxy is served where it runs.
            Phase::Ready { .. } if explicit && model.placement == Placement::Cpu && leased => {
                if let Some((_, caller)) = caller {
                    let error = self.leased_error(id, "moved to the GPU");
                    self.fail_caller(caller, error);
                }
                return;
            }
            Phase::Ready { .. } if explicit && model.placement == Placement::Cpu => {}
            Phase::Ready { .. } => {
                if let Some((_, caller)) = caller {
                    self.answer_ready_caller(i, caller);
                }
                return;
            }
            Phase::Failed(_) if !explicit && model.cooldown_until.is_some_and(|t| t > now) => {
                if let (Some(error), Some((_, caller))) = (self.cooldown_error(i), caller) {
                    self.fail_caller(caller, error);
                }
                return;
            }
            _ => {}
        }
        if let Some((deadline, caller)) = caller
            && !self.add_ready_waiter(i, deadline, caller)
        {
            return;
        }
        let queued = self.queue.iter().any(|w| w.loads(id));
        if self.models[i].phase == Phase::Loading || queued {
            return;
        }
        if self.queue.len() >= self.settings.max_queue as usize {
            let error = ArbiterError::QueueFull(self.settings.max_queue);
            self.fail_ready_waiters(i, &error);
            return;
        }
        let priority = self.models[i].spec.priority;
        self.enqueue(priority, super::model::Pending::Load { model: id.to_string() });
    }

    /// Adds a caller waiting for model `i`, unless the waiting callers are at their caps (then
    /// it is refused with a `Retry-After`). Returns whether it was added.
    pub(super) fn add_ready_waiter(&mut self, i: usize, deadline: std::time::Instant, caller: ReadyCaller) -> bool {
        let for_model = self.models[i].ready_waiters.len();
        let total: usize = self.models.iter().map(|m| m.ready_waiters.len()).sum();
        let per_model_cap = self.settings.max_waiters_per_model as usize;
        let total_cap = self.settings.max_waiters as usize;
        if for_model >= per_model_cap || total >= total_cap {
            let id = self.models[i].spec.id.clone();
            let message = if for_model >= per_model_cap {
                format!(
                    "{for_model} requests already wait for model {id} (scheduler.max_waiters_per_model = {per_model_cap})"
                )
            } else {
                format!("{total} requests already wait for models (scheduler.max_waiters = {total_cap})")
            };
            self.fail_caller(caller, ArbiterError::TooManyWaiters(message));
            return false;
        }
        let asked = self.now;
        self.models[i].ready_waiters.push(ReadyWaiter { deadline, asked, caller });
        true
    }

    /// Re-runs `command` once model `i` is neither loading nor unloading, or at `deadline`.
    pub(super) fn settle_then(&mut self, i: usize, deadline: std::time::Instant, command: Command) {
        self.settling.push(super::Settle { model: i, since: self.now, deadline, command });
    }

    pub(super) fn request_unload(
        &mut self,
        i: usize,
        reply: tokio::sync::oneshot::Sender<Result<Unloaded, ArbiterError>>,
    ) {
        let id = self.models[i].spec.id.clone();
        if self.leased(&id) && self.models[i].holds_memory() {
            let _ = reply.send(Err(self.leased_error(&id, "unloaded")));
            return;
        }
        // A queued load of this model is withdrawn: the user asked for the opposite.
        self.queue.retain(|w| !w.loads(&id));
        let error = ArbiterError::Cancelled(format!("model {id} was unloaded while this request waited"));
        self.fail_ready_waiters(i, &error);
        match &mut self.models[i].phase {
            Phase::Unloaded | Phase::Failed(_) => {
                let _ = reply.send(super::not_loaded(self.model_status(i)));
            }
            Phase::Unloading { then, .. } => {
                // A demotion in progress becomes a plain release.
                if *then == AfterRelease::CpuForm {
                    *then = AfterRelease::Unloaded;
                }
                self.models[i].unload_waiters.push(reply);
            }
            Phase::Loading | Phase::Ready { .. } => {
                self.models[i].unload_waiters.push(reply);
                let _ = self.begin_unload(i, Reason::Requested);
            }
        }
    }

    /// Moves model `i` to `phase` and says so on the bus.
    pub(super) fn set_phase(&mut self, i: usize, phase: Phase, reason: Reason, error: Option<String>) {
        let now = self.now;
        let model = &mut self.models[i];
        let from = model.state();
        model.phase = phase;
        model.changed_at = now;
        if reason != Reason::Released {
            model.state_reason = Some(reason.clone());
        }
        let event = EventKind::ModelState {
            model: model.spec.id.clone(),
            from,
            to: model.state(),
            reason: reason.as_string(),
            device: model.device,
            vram_mib: model.footprint(),
            error,
        };
        self.fx.emit(event);
    }

    /// Reserves memory and starts the load, in the given placement. A model that runs in its
    /// CPU form and is now loaded on the GPU (a promotion) has its CPU form stopped first.
    pub(super) fn start_load(&mut self, i: usize, device: Option<u32>, reserved_mib: u64, placement: Placement) {
        let now = self.now;
        let model = &mut self.models[i];
        let promoting = matches!(model.phase, Phase::Ready { .. }) && model.placement == Placement::Cpu;
        let demoting = model.phase.demoting();
        let prefers_gpu = demoting && model.prefers_gpu;
        model.gate.close();
        model.generation += 1;
        model.device = device;
        model.reserved_mib = reserved_mib;
        model.current_mib = 0;
        model.peak_mib = None;
        model.resident_since = now;
        model.placement = placement;
        model.prefers_gpu = prefers_gpu;
        model.note = None;
        model.gate.touch();
        model.gpu_pids.clear();
        model.gpu_devices.clear();
        // Admitted: waiting for memory (queue_timeout) is over; now the start may take up to
        // ready_timeout, and its callers wait for that rather than give up mid-start.
        let started_by = super::later(now, model.spec.ready_timeout.saturating_add(Duration::from_secs(1)));
        for waiter in &mut model.ready_waiters {
            waiter.deadline = waiter.deadline.max(started_by);
        }
        let reason = if promoting {
            Reason::Promoted
        } else if demoting {
            Reason::Demoted
        } else {
            Reason::Requested
        };
        self.set_phase(i, Phase::Loading, reason, None);
        let model = &mut self.models[i];
        match model.spec.kind() {
            Backend::Process => {
                // A promotion: the CPU form stops before the GPU form starts (the driver waits
                // for the requests streaming from it). The driver picks the port.
                let previous = model.process.take();
                model.port = None;
                if let Some(previous) = &previous {
                    self.fx.persist(StoreWrite::ForgetProcess(previous.pid));
                }
                let model = &self.models[i];
                self.fx.start_process(ProcessStart {
                    spec: model.spec.clone(),
                    generation: model.generation,
                    device,
                    placement,
                    previous,
                    gate: model.gate.clone(),
                    log_dir: self.log_dir.clone(),
                });
            }
            Backend::Ollama => {
                model.port = None;
                let start = OllamaStart { spec: model.spec.clone(), generation: model.generation, placement };
                self.fx.start_ollama(start);
            }
            Backend::External => {
                let action = if placement == Placement::Gpu { Action::Gpu } else { Action::Cpu };
                if model.oneshot.is_some() && model.attachment.is_none() {
                    // Granted to a lease holder that loads the model itself.
                    let finished = Command::LoadFinished {
                        model: model.spec.id.clone(),
                        generation: model.generation,
                        result: Ok(()),
                    };
                    self.deferred.push_back(finished);
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

    fn find_generation(&self, id: &str, generation: u64) -> Option<usize> {
        self.models.iter().position(|m| m.spec.id == id && m.generation == generation)
    }

    pub(super) fn on_spawned(&mut self, id: &str, generation: u64, handle: ProcessHandle, port: u16) {
        let Some(i) = self.find_generation(id, generation) else { return };
        let record = ProcessRecord {
            pid: handle.pid,
            pgid: handle.group,
            start_ticks: handle.start_ticks,
            model: id.to_string(),
            started_at: self.wall(self.now),
        };
        self.fx.persist(StoreWrite::RecordProcess(record));
        let model = &mut self.models[i];
        model.logs = Some(handle.logs.clone());
        model.gpu_pids.insert(handle.pid);
        model.process = Some(handle);
        model.port = Some(port);
        // An unload asked for while it was spawning takes effect now.
        if matches!(model.phase, Phase::Unloading { .. }) {
            self.begin_release_task(i);
        }
    }

    pub(super) fn on_load_finished(&mut self, id: &str, generation: u64, result: Result<(), String>) {
        let Some(i) = self.find_generation(id, generation) else { return };
        if matches!(self.models[i].phase, Phase::Unloading { .. }) && self.models[i].process.is_none() {
            // Unloaded while it was spawning, and the spawn failed: nothing to stop, but the
            // release must still finish (and answer its waiters).
            self.begin_release_task(i);
            return;
        }
        if self.models[i].phase != Phase::Loading {
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
                self.set_phase(i, Phase::Ready { draining: false }, Reason::Ready, None);
                self.fx.emit(EventKind::ModelPlaced {
                    model: id.to_string(),
                    placement: placement.as_str().into(),
                    reason: "ready".into(),
                });
                self.fx.refresh_readings();
                self.answer_ready(i);
            }
            Err(message) => self.fail_start(i, message),
        }
    }

    /// Answers everyone waiting for a ready model, each with a pin taken now, before anything
    /// else can run: a model that just became ready cannot be evicted before its callers use it.
    pub(super) fn answer_ready(&mut self, i: usize) {
        // Published first, so that a caller who reads status right after its answer sees it.
        self.publish();
        let waiters: Vec<ReadyWaiter> = self.models[i].ready_waiters.drain(..).collect();
        for waiter in waiters {
            self.answer_ready_caller(i, waiter.caller);
        }
    }

    /// Answers one caller of a ready model.
    pub(super) fn answer_ready_caller(&mut self, i: usize, caller: ReadyCaller) {
        let status = self.model_status(i);
        let gate = self.models[i].gate.clone();
        match caller {
            ReadyCaller::Load(reply) => {
                // If the caller is gone, the pin comes back with the unsent answer and is dropped.
                let _ = reply.send(Ok(Loaded { status, pin: gate.try_pin() }));
            }
            ReadyCaller::PlaceCpu(reply) => {
                let _ = reply.send(Ok(status));
            }
            ReadyCaller::ModelLease { request, reply, deadline } => match gate.try_pin() {
                Some(pin) => {
                    // Pinned now: it cannot be evicted before the lease exists.
                    let device = self.models[i].device;
                    let grant = self.grant_lease(request, device, Some(pin));
                    if let Err(Ok(grant)) = reply.send(Ok(grant)) {
                        let _ = self.release_lease(&grant.id, "disconnected");
                    }
                }
                None => {
                    // Closed again at once: ask again with the time left.
                    let wait = deadline.saturating_duration_since(self.now);
                    let request = LeaseRequest { wait, ..request };
                    self.deferred.push_back(Command::Acquire { request, reply });
                }
            },
        }
    }

    /// A start failed: count it, answer the waiters, release whatever is left of the process.
    pub(super) fn fail_start(&mut self, i: usize, message: String) {
        let now = self.now;
        let model = &mut self.models[i];
        model.failures = model.failures.saturating_add(1);
        model.last_error = Some(message.clone());
        let error = ArbiterError::StartFailed { model: model.spec.id.clone(), message: message.clone() };
        if let Some(cooldown) = policy::failure_cooldown(model.failures) {
            model.cooldown_until = Some(super::later(now, cooldown));
        }
        let then = if model.cooldown_until.is_some() && model.failures >= FAILURES_BEFORE_COOLDOWN {
            AfterRelease::Failed
        } else {
            AfterRelease::Unloaded
        };
        // Published before the answers, so that a caller who reads status right after sees the
        // failure counted.
        self.publish();
        self.fail_ready_waiters(i, &error);
        // Through unloading, so the memory is watched until it is really back.
        self.set_phase(i, Phase::Unloading { then, idle_by: None }, Reason::StartFailed, Some(message));
        self.begin_release_task(i);
    }

    pub(super) fn on_exited(&mut self, id: &str, generation: u64, exit: ExitInfo) {
        let Some(i) = self.find_generation(id, generation) else { return };
        if let Some(process) = &self.models[i].process {
            self.fx.persist(StoreWrite::ForgetProcess(process.pid));
        }
        match self.models[i].phase {
            Phase::Ready { .. } => {
                // A crash while serving: release its memory and start again on the next demand.
                // Status says so until the next successful start: the failure is counted and
                // its reason kept (a crash is no start failure: no cooldown follows from it).
                let tail = self.models[i].process.as_ref().map(|p| p.logs.tail(5).join("\n")).unwrap_or_default();
                let error = format!("crashed while serving: {exit}; last output:\n{tail}");
                let model = &mut self.models[i];
                model.gate.crash();
                model.failures = model.failures.saturating_add(1);
                model.last_error = Some(error.clone());
                let phase = Phase::Unloading { then: AfterRelease::Unloaded, idle_by: None };
                self.set_phase(i, phase, Reason::Crashed, Some(error));
                // Its answers in flight broke with it (each ends with the server's failure):
                // nothing to cut.
                self.release_backend(i);
            }
            Phase::Unloading { then, idle_by: Some(_) } => {
                // It was waiting for its requests to end; they ended with it.
                self.models[i].phase = Phase::Unloading { then, idle_by: None };
                self.begin_release_task(i);
            }
            _ => {}
        }
    }

    /// Starts unloading a model. An eviction (any reason but `requested` or `idle`) happens only
    /// if no request pins the model at this very moment; returns whether it started. A requested
    /// unload of a model in use closes its gate and waits (up to its `stop_timeout`) for the
    /// requests in flight to end before it stops the backend.
    pub(super) fn begin_unload(&mut self, i: usize, reason: Reason) -> bool {
        if !matches!(self.models[i].phase, Phase::Ready { .. } | Phase::Loading) {
            return false;
        }
        let model = &self.models[i];
        if reason.is_eviction()
            && matches!(model.phase, Phase::Ready { .. })
            && model.placement == Placement::Gpu
            && model.spec.on_evict == OnEvict::Cpu
            && model.spec.has_cpu_form()
        {
            // Its policy says: keep serving from the CPU rather than unload.
            return self.demote(i, reason, false);
        }
        if reason == Reason::Requested {
            self.models[i].gate.close();
        } else if !self.models[i].gate.close_if_idle() {
            return false;
        }
        let was_loading = self.models[i].phase == Phase::Loading;
        if was_loading {
            let id = self.models[i].spec.id.clone();
            let error = ArbiterError::Cancelled(format!("model {id} was unloaded while it was starting"));
            self.fail_ready_waiters(i, &error);
        }
        let in_use = !was_loading && self.models[i].gate.in_use() > 0;
        let idle_by = in_use.then(|| self.after(self.models[i].spec.stop_timeout));
        self.set_phase(i, Phase::Unloading { then: AfterRelease::Unloaded, idle_by }, reason, None);
        // A load still spawning has no process yet; `on_spawned` continues the release.
        if idle_by.is_none() && (self.models[i].process.is_some() || !was_loading) {
            self.begin_release_task(i);
        }
        true
    }

    /// Unloads that waited for their models' requests in flight go on once those ended (or at
    /// their deadline, cutting them).
    pub(super) fn release_idle_unloads(&mut self) {
        let now = self.now;
        for i in 0..self.models.len() {
            let model = &self.models[i];
            if let Phase::Unloading { then, idle_by: Some(by) } = model.phase
                && (model.gate.in_use() == 0 || by <= now)
            {
                self.models[i].phase = Phase::Unloading { then, idle_by: None };
                self.begin_release_task(i);
            }
        }
    }

    /// Asks the backend to release the model; it reports `Released` when its memory is back:
    /// the process stopped and gone from the probe's list, Ollama's `/api/ps` no longer listing
    /// it, or the app acknowledging `release` (or `cpu`, for a demotion).
    pub(super) fn begin_release_task(&mut self, i: usize) {
        // Told to stop: answers still in flight are cut here (their clients get an error message
        // and their connections to the server close), or a llama-server that does not exit on
        // SIGTERM while it answers would hold the release up for the whole `stop_timeout`.
        self.models[i].gate.cut_streams();
        self.release_backend(i);
    }

    /// [`begin_release_task`](Self::begin_release_task) without the cut.
    fn release_backend(&mut self, i: usize) {
        let model = &self.models[i];
        let id = model.spec.id.clone();
        let generation = model.generation;
        match &model.spec.backend {
            BackendSpec::Process(_) => {
                let release = ProcessRelease {
                    model: id,
                    generation,
                    handle: model.process.clone(),
                    pids: model.gpu_pids.clone(),
                    devices: model.device.into_iter().chain(model.gpu_devices.iter().copied()).collect(),
                    grace: model.spec.stop_timeout,
                    limit: model.spec.release_timeout,
                };
                self.fx.release_process(release);
            }
            BackendSpec::Ollama(ollama) => {
                let release = OllamaRelease {
                    model: id,
                    generation,
                    url: ollama.url.clone(),
                    name: ollama.model.clone(),
                    limit: model.spec.stop_timeout.saturating_add(model.spec.release_timeout),
                };
                self.fx.release_ollama(release);
            }
            BackendSpec::External(_) => {
                let action = if model.phase.demoting() { Action::Cpu } else { Action::Release };
                if !self.instruct(i, action) {
                    // No app (any more): nothing holds the memory.
                    let released =
                        Command::Released { model: id, generation, timed_out: false, waited: Duration::ZERO };
                    self.deferred.push_back(released);
                }
            }
        }
    }

    pub(super) fn on_released(&mut self, id: &str, generation: u64, timed_out: bool, waited: Duration) {
        let Some(i) = self.find_generation(id, generation) else { return };
        let Phase::Unloading { then, .. } = self.models[i].phase else { return };
        if then == AfterRelease::CpuForm {
            // A demotion (an external model without an app ends here too): the GPU form is
            // gone; start the CPU form.
            if let Some(process) = self.models[i].process.take() {
                self.fx.persist(StoreWrite::ForgetProcess(process.pid));
            }
            self.models[i].port = None;
            self.memory_released(id);
            self.start_load(i, None, 0, Placement::Cpu);
            return;
        }
        // A release on a device whose processes cannot be attributed (amdgpu, an unreadable
        // list, another pid namespace) was not seen complete by a list: what the model was
        // counted at is foreign until a reading shows it gone, or a load waiting behind it
        // would be admitted on memory the driver still holds.
        let unconfirmed = self.blind_mib.values().any(|models| models.iter().any(|(model, _)| model == id));
        if unconfirmed && !timed_out {
            self.forget_attribution(id);
        }
        if timed_out {
            self.fx.emit(EventKind::MemoryReleaseTimeout { model: id.to_string(), waited_ms: super::millis(waited) });
            // Its processes are no longer the model's: what they still hold (a pid still on the
            // GPU past `release_timeout`) is foreign from now on, until a reading shows it gone.
            // Left attributed, it would count nowhere (the model is no longer resident) and the
            // next load would over-commit. (A release that completed was seen gone by a readable
            // list, newer than the last reading: that memory is back, not foreign.)
            self.forget_attribution(id);
        }
        if let Some(process) = self.models[i].process.take() {
            self.fx.persist(StoreWrite::ForgetProcess(process.pid));
        }
        // A start that failed often enough ends `failed`; so does any release of a model still
        // counting such failures (a user's unload during a retry).
        let model = &self.models[i];
        let failed = then == AfterRelease::Failed
            || (model.cooldown_until.is_some() && model.failures >= FAILURES_BEFORE_COOLDOWN);
        let model = &mut self.models[i];
        model.port = None;
        model.current_mib = 0;
        let to = if failed { Phase::Failed(Failure::StartFailures) } else { Phase::Unloaded };
        self.set_phase(i, to, Reason::Released, None);
        self.fx.refresh_readings();
        self.models[i].device = None;
        for names in self.queue.iter_mut().map(|w| &mut w.awaiting_release) {
            names.remove(id);
        }
        self.publish();
        self.answer_unloaded(i);
        // Load again only for callers still waiting (they asked while it was going away).
        let wanted = !self.models[i].ready_waiters.is_empty();
        if failed && let Some(error) = self.cooldown_error(i) {
            // In its cooldown: tell whoever still waits why, instead of letting them time out.
            self.fail_ready_waiters(i, &error);
        } else if wanted {
            // Not failed, or its cooldown ended while the release took its time: start it again
            // for whoever waits.
            self.request_load(id, None, false);
        }
    }

    /// Ends a model's residency at once (its app went away): nothing to stop or wait for.
    pub(super) fn finish_release(&mut self, i: usize, reason: Reason) {
        let id = self.models[i].spec.id.clone();
        let model = &mut self.models[i];
        model.gate.close();
        model.current_mib = 0;
        model.reserved_mib = 0;
        self.set_phase(i, Phase::Unloaded, reason, None);
        self.models[i].device = None;
        self.memory_released(&id);
        self.answer_unloaded(i);
    }

    /// Waiters that were waiting for this model's memory may go on.
    pub(super) fn memory_released(&mut self, id: &str) {
        // Whatever its processes still use (an app that moved a model to the CPU but kept the
        // memory cached) is foreign from now on, not invisible until the next reading.
        self.forget_attribution(id);
        for names in self.queue.iter_mut().map(|w| &mut w.awaiting_release) {
            names.remove(id);
        }
        self.fx.refresh_readings();
    }

    /// Stops attributing any process to the model: what they use is foreign until the next
    /// reading attributes it again (it will not, once the model is no longer resident).
    fn forget_attribution(&mut self, id: &str) {
        self.process_models.retain(|_, model| model != id);
        for models in self.blind_mib.values_mut() {
            models.retain(|(model, _)| model != id);
        }
        // An app process shared with other models is counted whole as foreign until the next
        // reading splits it again (its other models keep their share meanwhile: counted twice,
        // the safe way).
        for (pid, models) in &self.app_pids {
            if models.iter().any(|m| m == id) {
                self.process_models.remove(pid);
            }
        }
    }
}
