//! External models (an app attached over the instruction stream) and CPU placement (loading a
//! model in its CPU form, or demoting it there).

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::model::{AfterRelease, Failure, Phase, Placement, ReadyCaller, Reason};
use super::{Effects, Engine};
use crate::arbiter::{Ack, ArbiterError, Attached, Command};
use crate::backend::external::{Action, Attachment, PendingAck};
use crate::config::{Backend, DEFAULT_ACK_TIMEOUT};
use crate::events::EventKind;
use crate::status::ModelStatus;
use crate::units::Rounded;

impl<E: Effects> Engine<E> {
    /// Puts a model in its CPU form: loads it there, or demotes it from the GPU. Answered when
    /// it serves from the CPU.
    pub(super) fn place_cpu(&mut self, name: &str, reply: oneshot::Sender<Result<ModelStatus, ArbiterError>>) {
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
        let deadline = self.after(
            model.spec.ready_timeout.saturating_add(model.spec.stop_timeout).saturating_add(model.spec.release_timeout),
        );
        match (&model.phase, model.placement) {
            (Phase::Ready { .. }, Placement::Cpu) => {
                // Where it was asked to be: no promotion back by itself.
                self.models[i].prefers_gpu = false;
                let _ = reply.send(Ok(self.model_status(i)));
            }
            (Phase::Loading | Phase::Unloading { .. }, _) => {
                // Placed once the load or unload in progress is done.
                self.settle_then(i, deadline, Command::PlaceCpu { name: id, reply });
            }
            (Phase::Ready { .. }, Placement::Gpu) if self.leased(&id) => {
                let _ = reply.send(Err(self.leased_error(&id, "placed on the CPU")));
            }
            (Phase::Ready { .. }, Placement::Gpu) => {
                if self.add_ready_waiter(i, deadline, ReadyCaller::PlaceCpu(reply)) {
                    self.demote(i, Reason::Mode, true);
                }
            }
            (Phase::Unloaded | Phase::Failed(_), _) => {
                if self.add_ready_waiter(i, deadline, ReadyCaller::PlaceCpu(reply)) {
                    self.start_load(i, None, 0, Placement::Cpu);
                }
            }
        }
    }

    /// Moves a ready GPU model to its CPU form: the GPU form is released first, then the CPU form
    /// started (one instruction for an external model). `forced`: a mode or user asked, so it
    /// goes even while requests use it (as a requested unload does: they get up to its
    /// `stop_timeout` to finish, then are cut); else only if idle. Returns whether it started.
    pub(super) fn demote(&mut self, i: usize, reason: Reason, forced: bool) -> bool {
        if forced {
            self.models[i].gate.close();
        } else if !self.models[i].gate.close_if_idle() {
            return false;
        }
        self.models[i].prefers_gpu = !forced;
        let in_use = self.models[i].gate.in_use() > 0;
        let idle_by = in_use.then(|| self.after(self.models[i].spec.stop_timeout));
        self.set_phase(i, Phase::Unloading { then: AfterRelease::CpuForm, idle_by }, reason, None);
        if idle_by.is_none() {
            self.begin_release_task(i);
        }
        true
    }

    pub(super) fn attach(&mut self, name: &str, pid: Option<u32>, holder: String) -> Result<Attached, ArbiterError> {
        let i = self.index(name)?;
        let model = &self.models[i];
        let id = model.spec.id.clone();
        if model.spec.kind() != Backend::External {
            return Err(ArbiterError::Invalid(format!(
                "model {id} has backend = \"{}\"; only external models take an attached app",
                model.spec.kind().as_str()
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
        if matches!(model.phase, Phase::Failed(_)) {
            self.set_phase(i, Phase::Unloaded, Reason::Attached, None);
        }
        self.fx.emit(EventKind::ExternalAttachment { model: id.clone(), change: "attached".into(), holder, pid });
        let model = &self.models[i];
        if model.spec.preload || model.spec.pinned {
            self.request_load(&id, None, true);
        }
        Ok(Attached { session, instructions })
    }

    /// The app's stream is gone: everything it held is released.
    pub(super) fn detach(&mut self, name: &str, session: &str) {
        let Ok(i) = self.index(name) else { return };
        let model = &mut self.models[i];
        if model.attachment.as_ref().is_none_or(|a| a.session != session) {
            return;
        }
        let Some(attachment) = model.attachment.take() else { return };
        model.pending_ack = None;
        let id = model.spec.id.clone();
        self.fx.emit(EventKind::ExternalAttachment {
            model: id.clone(),
            change: "detached".into(),
            holder: attachment.holder,
            pid: attachment.pid,
        });
        if self.models[i].holds_memory() {
            let error = ArbiterError::Cancelled(format!("the app attached to model {id} disconnected"));
            self.fail_ready_waiters(i, &error);
            self.finish_release(i, Reason::Detached);
        }
    }

    /// Sends an instruction to the attached app and starts its acknowledgement clock. False if
    /// no app is attached (or its stream is gone).
    pub(super) fn instruct(&mut self, i: usize, action: Action) -> bool {
        let deadline = self.after(self.models[i].spec.external().map_or(DEFAULT_ACK_TIMEOUT, |e| e.ack_timeout));
        let model = &mut self.models[i];
        let Some(seq) = model.attachment.as_mut().and_then(|a| a.send(action)) else {
            return false;
        };
        model.pending_ack = Some(PendingAck { seq, action, deadline });
        true
    }

    pub(super) fn on_ack(&mut self, name: &str, ack: Ack) -> Result<(), ArbiterError> {
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
        match (model.phase.clone(), pending.action) {
            (Phase::Loading, Action::Gpu | Action::Cpu) => {
                self.on_load_finished(&id, generation, failure.map_or(Ok(()), Err));
            }
            (Phase::Unloading { then, .. }, Action::Gpu | Action::Cpu) if then != AfterRelease::CpuForm => {
                // Unloaded while the app was placing it: now release it.
                self.begin_release_task(i);
            }
            (Phase::Unloading { .. }, Action::Cpu) => match failure {
                None => {
                    // Demoted in one step: it serves from the CPU now.
                    let model = &mut self.models[i];
                    model.placement = Placement::Cpu;
                    model.current_mib = 0;
                    model.open_gate();
                    self.set_phase(i, Phase::Ready { draining: false }, Reason::Demoted, None);
                    self.fx.emit(EventKind::ModelPlaced {
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
                    if let Phase::Unloading { then, .. } = &mut model.phase {
                        *then = AfterRelease::Unloaded;
                    }
                    model.note = Some(message.clone());
                    let error = ArbiterError::StartFailed { model: id.clone(), message };
                    self.fail_ready_waiters(i, &error);
                    self.begin_release_task(i);
                }
            },
            (Phase::Unloading { .. }, Action::Release) => {
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
    pub(super) fn unresponsive(&mut self, i: usize, pending: PendingAck) {
        let model = &mut self.models[i];
        let id = model.spec.id.clone();
        let waited = model.spec.external().map_or(DEFAULT_ACK_TIMEOUT, |e| e.ack_timeout);
        let message = format!(
            "unresponsive: the attached app did not acknowledge `{}` within {}",
            pending.action.as_str(),
            Rounded(waited)
        );
        model.note = Some(message.clone());
        model.last_error = Some(message.clone());
        model.gate.close();
        self.fx.emit(EventKind::ExternalUnresponsive {
            model: id.clone(),
            action: pending.action.as_str().into(),
            waited_ms: super::millis(waited),
        });
        let error = ArbiterError::StartFailed { model: id.clone(), message: message.clone() };
        self.fail_ready_waiters(i, &error);
        let model = &mut self.models[i];
        model.current_mib = 0;
        model.reserved_mib = 0;
        self.set_phase(i, Phase::Failed(Failure::Unresponsive), Reason::Unresponsive, Some(message));
        self.models[i].device = None;
        self.memory_released(&id);
        self.answer_unloaded(i);
    }
}
