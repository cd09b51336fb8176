//! The queue and admission: who is served next, what is evicted for them (through
//! `policy::decide`, the one place admission is decided), fairness (draining), promotion back to
//! the GPU, and which candidate an `[aliases]` name uses.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::model::{Pending, Phase, Placement, ReadyCaller, Reason, Waiter};
use super::{Effects, Engine};
use crate::arbiter::ArbiterError;
use crate::config::Backend;
use crate::events::EventKind;
use crate::policy::{self, Decision, DeviceState, Hold, Request, Resident};

impl<E: Effects> Engine<E> {
    pub(super) fn enqueue(&mut self, priority: i32, pending: Pending) {
        self.next_seq += 1;
        self.queue.push(Waiter {
            seq: self.next_seq,
            priority,
            since: self.now,
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

    /// The plain data the policy decides over, from the latest reading and the models.
    pub(super) fn policy_inputs(&self) -> (Vec<DeviceState>, Vec<Resident>, Vec<Hold>) {
        // The reading the last sample attributed, not a newer one: a newer reading may show a
        // model's process before it is attributed, which would count it twice.
        let view = self.seen.clone();
        let stale = view.stale_for(self.now).is_some();
        let devices = view
            .devices
            .iter()
            .map(|d| {
                // A process without a figure counts as what the last sample assumed for it.
                let attributed: u64 = d
                    .processes
                    .iter()
                    .filter(|p| self.process_models.contains_key(&p.pid))
                    .map(|p| p.used_mib.or_else(|| self.assumed_mib.get(&(d.index, p.pid)).copied()).unwrap_or(0))
                    .fold(0, u64::saturating_add)
                    .saturating_add(
                        self.blind_mib
                            .get(&d.index)
                            .map_or(0, |models| models.iter().map(|(_, mib)| *mib).fold(0, u64::saturating_add)),
                    );
                // A lease's job (ffmpeg) uses its memory through its holder's processes; that use
                // is already counted by the lease's hold, so it is not foreign too (up to the
                // hold). Use by processes no lease claims is foreign, held memory or not.
                // One holder may hold several leases: its use counts up to their sum.
                let mut holds: HashMap<u32, u64> = HashMap::new();
                for lease in self.leases.values() {
                    if let (None, Some(device), Some(pid)) = (&lease.model, lease.device, lease.pid)
                        && device == d.index
                    {
                        let hold = holds.entry(pid).or_default();
                        *hold = hold.saturating_add(lease.vram_mib);
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
                    .filter(|m| m.spec.kind() == Backend::Ollama && m.on_gpu() && m.device == Some(d.index))
                    .map(|m| m.current_mib)
                    .sum();
                let foreign = d.used_mib.saturating_sub(attributed).saturating_sub(held).saturating_sub(in_ollama);
                // A device that cannot be read now admits nothing: its figures are stale, so
                // all of it counts as in use until it answers again (waiters wait, nothing is
                // evicted for them, since no eviction could make room).
                // So does every device while the readings are stale (the probe hangs or answers
                // late): the memory may have gone since they were taken.
                let foreign = if d.error.is_some() || stale { d.usable_mib } else { foreign };
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
                    ready: matches!(m.phase, Phase::Ready { .. }),
                    last_used: m.gate.last_used_ms(),
                    resident_since: self.millis(m.resident_since),
                    min_residency: super::millis(m.spec.min_residency),
                })
            })
            .collect();
        let holds = self
            .leases
            .values()
            .filter(|l| l.model.is_none())
            .filter_map(|l| {
                Some(Hold { holder: l.holder.clone(), device: l.device?, mib: l.vram_mib, exclusive: l.exclusive })
            })
            .collect();
        (devices, residents, holds)
    }

    fn loading_count(&self) -> u32 {
        let count = self.models.iter().filter(|m| m.phase == Phase::Loading).count();
        u32::try_from(count).unwrap_or(u32::MAX)
    }

    fn resident_count(&self) -> u32 {
        u32::try_from(self.models.iter().filter(|m| m.on_gpu()).count()).unwrap_or(u32::MAX)
    }

    /// Serves the queue in order: priority, then arrival. A waiter that cannot be served blocks
    /// later waiters on its device, so nobody is overtaken forever on the device it waits for.
    pub(super) fn schedule(&mut self) {
        let now = self.now;
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
                let loading = self.loading_count();
                if loading >= self.settings.max_parallel_loads {
                    // Waits for a load slot, not for memory: other requests may still go ahead.
                    self.queue[index].waiting_for = Some(format!(
                        "no load slot free ({loading} loading, max_parallel_loads = {})",
                        self.settings.max_parallel_loads
                    ));
                    index += 1;
                    continue;
                }
                if self.settings.resident_cap > 0 && self.resident_count() >= self.settings.resident_cap {
                    let (_, residents, _) = self.policy_inputs();
                    let victim = policy::cap_victim(&residents, self.millis(now));
                    if let Some(victim) = victim
                        && let Ok(v) = self.index(&victim)
                    {
                        if self.begin_unload(v, Reason::ResidentCap) {
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
                let waiter = self.queue.remove(index);
                if is_load || request.mib == 0 {
                    self.admit(waiter, None, 0);
                } else {
                    let error = ArbiterError::NeverFits("there is no GPU on this machine (probe \"none\")".into());
                    self.refuse(waiter, error);
                }
                continue;
            }
            match policy::decide(&devices, &residents, &holds, &request, self.millis(now)) {
                Decision::Admit { device } => {
                    let waiter = self.queue.remove(index);
                    self.admit(waiter, Some(device), request.mib);
                }
                Decision::Evict { device, victims } => {
                    for victim in &victims {
                        if let Ok(v) = self.index(victim) {
                            // A request may have pinned it since the decision: then it stays.
                            if self.begin_unload(v, Reason::EvictedFor(request.requester.clone())) {
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
                        self.plan_drain(index, &devices, &holds, &request);
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

    /// A waiter waited long enough behind busy models: stop feeding the ones whose eviction
    /// would serve it, so that they go idle and can be swapped out. Only while draining would
    /// help (the plan is redone on every pass): a model a lease holds never goes idle, and a
    /// waiter that does not fit even with every drainable model gone gets no drain. Only for
    /// someone who is actually waiting (not a preload).
    fn plan_drain(&mut self, index: usize, devices: &[DeviceState], holds: &[Hold], request: &Request) {
        let (_, mut idle_residents, _) = self.policy_inputs();
        for resident in &mut idle_residents {
            // Requests in flight end; a model lease holds until its holder lets go.
            resident.in_use = self.model_lease_count(&resident.id);
        }
        let someone_waits = match &self.queue[index].pending {
            Pending::Load { model } => self.index(model).is_ok_and(|m| !self.models[m].ready_waiters.is_empty()),
            Pending::Lease { .. } => true,
        };
        let at = self.millis(self.now);
        self.queue[index].drain = match policy::decide(devices, &idle_residents, holds, request, at) {
            Decision::Evict { victims, .. } if someone_waits => victims.into_iter().collect(),
            _ => BTreeSet::new(),
        };
    }

    /// Models demoted to the CPU to make room go back to the GPU once they fit without evicting
    /// anything, when nobody waits in the queue and they are idle.
    fn promote_demoted(&mut self) {
        if !self.queue.is_empty() || self.loading_count() >= self.settings.max_parallel_loads {
            return;
        }
        if self.settings.resident_cap > 0 && self.resident_count() >= self.settings.resident_cap {
            return;
        }
        let Some(i) = (0..self.models.len()).find(|&i| {
            let m = &self.models[i];
            m.prefers_gpu
                && matches!(m.phase, Phase::Ready { .. })
                && m.placement == Placement::Cpu
                && m.gate.in_use() == 0
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
            policy::decide(&devices, &residents, &holds, &request, self.millis(self.now))
        {
            // Not back into pressure: it was probably demoted to relieve it. The device must stay
            // below `critical` with the model on it.
            let calm = !self.pressure.contains(&device)
                && self.seen.devices.iter().find(|d| d.index == device).is_some_and(|d| {
                    (d.used_mib.saturating_add(request.mib)) as f64 * 100.0 < self.critical_pct * d.total_mib as f64
                });
            if calm {
                self.start_load(i, Some(device), request.mib, Placement::Gpu);
            }
        }
    }

    /// Closes the gates of the models some waiter is waiting to swap out (in-flight requests
    /// finish, new ones wait behind the swap) and reopens those no waiter wants any more.
    fn apply_draining(&mut self) {
        let wanted: BTreeSet<String> = self.queue.iter().flat_map(|w| w.drain.iter().cloned()).collect();
        for i in 0..self.models.len() {
            let model = &mut self.models[i];
            let Phase::Ready { draining } = model.phase else { continue };
            let want = wanted.contains(&model.spec.id);
            if want && !draining {
                model.phase = Phase::Ready { draining: true };
                model.gate.close();
                tracing::info!(model = %model.spec.id, "draining: a request waited too long for its memory");
            } else if !want && draining {
                // The swap is off (its waiter was served or gave up): serve again.
                model.phase = Phase::Ready { draining: false };
                model.open_gate();
                self.answer_ready(i);
            }
        }
    }

    /// Drops requests whose callers went away (a client disconnected while it waited), so that
    /// they neither block the queue nor count against `max_queue`.
    fn prune_abandoned(&mut self) {
        self.queue.retain(|w| !matches!(&w.pending, Pending::Lease { reply, .. } if reply.is_closed()));
        for i in 0..self.models.len() {
            let before = self.models[i].ready_waiters.len();
            let (gone, waiting): (Vec<_>, Vec<_>) =
                self.models[i].ready_waiters.drain(..).partition(|w| w.caller.is_closed());
            self.models[i].ready_waiters = waiting;
            for waiter in gone {
                if let ReadyCaller::ModelLease { request, .. } = waiter.caller
                    && let Some(model) = request.model
                {
                    // A one-shot claim on an external model ends with its caller.
                    self.deferred.push_back(crate::arbiter::Command::OneshotEnded { model });
                }
            }
            let spec = &self.models[i].spec;
            if before > 0 && self.models[i].ready_waiters.is_empty() && !spec.preload && !spec.pinned {
                let id = spec.id.clone();
                self.queue.retain(|w| !w.loads(&id));
            }
        }
    }

    pub(super) fn note_shortfall(&mut self, index: usize, message: String) {
        let waiter = &mut self.queue[index];
        if !waiter.announced {
            waiter.announced = true;
            let requester = match &waiter.pending {
                Pending::Load { model } => model.clone(),
                Pending::Lease { request, .. } => request.holder.clone(),
            };
            self.fx.emit(EventKind::Queued { requester, reason: message.clone() });
        }
        self.queue[index].waiting_for = Some(message.clone());
        self.queue[index].last_shortfall = Some(message);
    }

    /// The policy's view of a waiter; `None` if the waiter is stale (its model vanished or is
    /// loaded already).
    pub(super) fn policy_request(&self, index: usize) -> Option<(Request, bool)> {
        let waiter = &self.queue[index];
        match &waiter.pending {
            Pending::Load { model } => {
                let i = self.index(model).ok()?;
                let m = &self.models[i];
                let promotion = matches!(m.phase, Phase::Ready { .. }) && m.placement == Placement::Cpu;
                if !matches!(m.phase, Phase::Unloaded | Phase::Failed(_)) && !promotion {
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

    /// The memory a model is admitted with: what it declares or was measured at, else its
    /// header estimate, else (a first load of a model nothing is known of) everything currently
    /// free on the device, so that it starts only on an otherwise idle device and its real
    /// footprint can be measured.
    pub(super) fn load_reservation(&self, i: usize, device: Option<u32>) -> u64 {
        let model = &self.models[i];
        let known = model.known_mib();
        if known > 0 {
            return known;
        }
        // The header estimate, unless it is more than any device could hold: an estimate can be
        // wrong (a command it misreads), and a first load must not be refused on a guess.
        let largest = self.seen.devices.iter().map(|d| d.usable_mib).max().unwrap_or(0);
        if let Some(estimate) = model.estimated_mib.filter(|mib| *mib > 0 && *mib <= largest) {
            return estimate;
        }
        self.seen
            .devices
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
                    let m = &self.models[i];
                    if m.ready_waiters.is_empty() && !m.spec.preload && !m.spec.pinned {
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

    pub(super) fn refuse(&mut self, waiter: Waiter, error: ArbiterError) {
        match waiter.pending {
            Pending::Load { model } => {
                if let Ok(i) = self.index(&model) {
                    self.fail_ready_waiters(i, &error);
                }
            }
            Pending::Lease { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }

    /// For an alias with candidates: the first that is ready, else the first that fits (evicting
    /// only what its priority allows), else the first.
    pub(super) fn choose(&self, candidates: &[String]) -> Result<String, ArbiterError> {
        let indices: Vec<usize> = candidates.iter().map(|c| self.index(c)).collect::<Result<_, _>>()?;
        let Some(&first) = indices.first() else {
            return Err(ArbiterError::Cancelled("an alias with no candidates".into()));
        };
        if let Some(&ready) = indices.iter().find(|&&i| self.models[i].phase.serving()) {
            return Ok(self.models[ready].spec.id.clone());
        }
        let (devices, residents, holds) = self.policy_inputs();
        let at = self.millis(self.now);
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
