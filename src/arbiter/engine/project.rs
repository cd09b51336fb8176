//! The status projection: the engine's state as the JSON contract's types (`crate::status`),
//! published after every input.

use std::collections::BTreeMap;
use std::time::Instant;

use chrono::{DateTime, Utc};

use super::model::{Pending, Phase};
use super::{Effects, Engine, namespace};
use crate::arbiter::ArbiterView;
use crate::backend::ollama;
use crate::status::{LeaseStatus, ModelStatus, OllamaModelStatus, OllamaStatus, QueueEntry};

impl<E: Effects> Engine<E> {
    /// What `vramgate plan` judges the set `names` on (see [`crate::plan::judge`]).
    pub(super) fn plan_inputs(&self, names: &[String]) -> Result<crate::plan::Inputs, crate::arbiter::ArbiterError> {
        let mut models: Vec<crate::plan::ModelFacts> = Vec::new();
        for name in names {
            let m = &self.models[self.index(name)?];
            if models.iter().any(|f| f.id == m.spec.id) {
                continue;
            }
            models.push(crate::plan::ModelFacts {
                id: m.spec.id.clone(),
                priority: m.spec.priority,
                device: m.spec.device,
                footprint: crate::plan::Footprint::known(
                    m.spec.declared_mib,
                    m.learned_mib,
                    m.peak_mib,
                    m.estimated_mib,
                ),
            });
        }
        let (devices, residents, holds) = self.policy_inputs();
        Ok(crate::plan::Inputs { devices, residents, holds, models, now: self.millis(self.now) })
    }

    /// The wall-clock time of monotonic instant `t`.
    pub(super) fn wall(&self, t: Instant) -> DateTime<Utc> {
        self.wall_ms(self.millis(t))
    }

    /// The wall-clock time of a moment `ms` milliseconds after the start (a gate's last use).
    fn wall_ms(&self, ms: u64) -> DateTime<Utc> {
        i64::try_from(ms)
            .ok()
            .and_then(chrono::TimeDelta::try_milliseconds)
            .and_then(|after_start| self.started_wall.checked_add_signed(after_start))
            .unwrap_or(self.started_wall)
    }

    pub(super) fn model_status(&self, i: usize) -> ModelStatus {
        let m = &self.models[i];
        ModelStatus {
            id: m.spec.id.clone(),
            backend: m.spec.kind().as_str().into(),
            state: m.state().as_str().into(),
            device: m.device,
            vram_mib: m.footprint(),
            in_use: m.gate.in_use(),
            pinned: m.spec.pinned,
            priority: m.spec.priority,
            last_used: m.used_once.then(|| self.wall_ms(m.gate.last_used_ms())),
            upstream: m.upstream(),
            pid: m.process.as_ref().map(|p| p.pid).or(m.attachment.as_ref().and_then(|a| a.pid)),
            measured_mib: m.learned_mib,
            declared_mib: m.spec.declared_mib,
            estimated_mib: m.estimated_mib,
            peak_mib: m.peak_mib,
            failures: m.failures,
            retry_in_s: m.cooldown_until.map(|t| t.saturating_duration_since(self.now).as_secs()),
            last_error: m.last_error.clone(),
            aliases: m.spec.aliases.clone(),
            placement: matches!(m.phase, Phase::Ready { .. }).then(|| m.placement.as_str().to_string()),
            expires_at: m.idle_expiry(self.started).map(|t| self.wall(t)),
            note: m.note.clone(),
            attached: m.attachment.as_ref().map(|a| a.holder.clone()),
            state_reason: m.state_reason.as_ref().map(|r| r.as_string()),
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
                    since: self.wall(waiter.since),
                })
            })
            .collect()
    }

    /// The whole view status readers see.
    pub(crate) fn view(&self) -> ArbiterView {
        let models = (0..self.models.len()).map(|i| self.model_status(i)).collect();
        let mut leases: Vec<LeaseStatus> = self
            .leases
            .values()
            .map(|l| LeaseStatus {
                id: l.id.clone(),
                holder: l.holder.clone(),
                device: l.device.unwrap_or(0),
                vram_mib: l.vram_mib,
                exclusive: l.exclusive,
                model: l.model.clone(),
                priority: l.priority,
                granted_at: Some(self.wall(l.granted)),
            })
            .collect();
        leases.sort_by(|a, b| a.id.cmp(&b.id));
        let mut degraded_reasons = Vec::new();
        let mut device_warnings: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        if let Some(age) = self.seen.stale_for(self.now) {
            for device in &self.seen.devices {
                degraded_reasons.push(stale_reason(device, age, self.seen.stale_after));
            }
        }
        for (device, pids) in self.namespaces.foreign_devices() {
            degraded_reasons.push(namespace::degraded_reason(device, pids));
            device_warnings.entry(device).or_default().push(namespace::device_warning(pids));
        }
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
                            m.spec.ollama().is_some_and(|o| o.url == *url && ollama::same_model(&o.model, &entry.name))
                                && m.holds_memory()
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
        ArbiterView {
            models,
            leases,
            queue: self.queue_status(),
            process_models: self.process_models.clone(),
            degraded_reasons,
            device_warnings,
            mode: self.mode.clone(),
            ollama,
        }
    }

    /// Publishes the view without a scheduling pass (only in-use counts and last uses changed).
    pub(crate) fn refresh_view(&mut self) {
        self.publish();
    }

    /// Publishes the view.
    pub(super) fn publish(&mut self) {
        let view = self.view();
        self.fx.publish(view);
    }

    /// What the shell stops at shutdown: every model's process.
    pub(crate) fn running_processes(&self) -> Vec<(String, crate::backend::process::ProcessHandle)> {
        self.models.iter().filter_map(|m| Some((m.spec.id.clone(), m.process.clone()?))).collect()
    }

    /// At shutdown: closes every model to new requests and cuts every answer in flight, so no
    /// model server waits for its clients before it exits
    /// ([`begin_release_task`](Engine::begin_release_task) does the same for one).
    pub(crate) fn cut_all_streams(&self) {
        for model in &self.models {
            model.gate.close();
            model.gate.cut_streams();
        }
    }

    /// At shutdown: refuses everyone waiting in the queue or for a model.
    pub(crate) fn refuse_waiting(&mut self, now: Instant) {
        self.now = now;
        for waiter in std::mem::take(&mut self.queue) {
            self.refuse(waiter, crate::arbiter::ArbiterError::ShuttingDown);
        }
        for i in 0..self.models.len() {
            self.fail_ready_waiters(i, &crate::arbiter::ArbiterError::ShuttingDown);
        }
    }

    /// Refuses everyone still waiting and marks every loaded model unloaded (the shell has
    /// stopped their processes).
    pub(crate) fn shut_down(&mut self, now: Instant) {
        self.refuse_waiting(now);
        for (_, handle) in self.running_processes() {
            self.fx.persist(super::StoreWrite::ForgetProcess(handle.pid));
        }
        for i in 0..self.models.len() {
            if self.models[i].holds_memory() {
                self.set_phase(i, Phase::Unloaded, super::Reason::Shutdown, None);
            }
        }
    }
}

/// The degraded reason of a device whose latest reading is `age` old, past `bound`.
fn stale_reason(device: &crate::status::DeviceStatus, age: std::time::Duration, bound: std::time::Duration) -> String {
    format!(
        "GPU {} ({}): no fresh reading for {} (more than {}: the GPU probe hangs or answers late); it admits \
         nothing until a new reading arrives",
        device.index,
        device.name,
        crate::units::Rounded(age),
        crate::units::Rounded(bound)
    )
}
