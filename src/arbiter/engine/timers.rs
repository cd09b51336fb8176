//! Deadlines: idle TTLs, heartbeat leases, callers' waits, acknowledgements, unloads waiting for
//! requests in flight, commands waiting for a model to settle. The engine keeps them in one
//! ordered index ([`Deadlines`]), rebuilt from the state after every input, so the shell sleeps
//! until the first and nothing can be forgotten when state changes.

use std::collections::BTreeSet;
use std::time::Instant;

use super::model::{Pending, Phase, ReadyWaiter, Reason};
use super::{Effects, Engine};
use crate::arbiter::ArbiterError;

/// What a deadline is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Deadline {
    /// An app's acknowledgement of an instruction to model `.0`.
    Ack(usize),
    /// Model `.0`'s idle TTL.
    IdleTtl(usize),
    /// A heartbeat lease.
    LeaseExpiry(String),
    /// A queued memory lease's wait.
    LeaseWait(u64),
    /// A caller waiting for model `.0`.
    CallerWait(usize),
    /// Model `.0`'s unload waiting for its requests in flight.
    UnloadCut(usize),
    /// A command waiting for model `.0` to settle.
    Settle(usize),
    /// The latest GPU reading becomes stale (no newer one came): say so, admit nothing on it.
    StaleReadings,
}

/// Every pending deadline, in time order.
#[derive(Debug, Default)]
pub(crate) struct Deadlines(BTreeSet<(Instant, Deadline)>);

impl Deadlines {
    /// The earliest.
    pub(crate) fn first(&self) -> Option<Instant> {
        self.0.first().map(|(at, _)| *at)
    }

    /// How many are pending.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    fn add(&mut self, at: Instant, what: Deadline) {
        self.0.insert((at, what));
    }
}

impl<E: Effects> Engine<E> {
    /// The ordered index of every deadline in the current state.
    pub(crate) fn deadlines(&self) -> Deadlines {
        let mut index = Deadlines::default();
        for (i, model) in self.models.iter().enumerate() {
            if let Some(expiry) = model.idle_expiry(self.started) {
                index.add(expiry, Deadline::IdleTtl(i));
            }
            for waiter in &model.ready_waiters {
                index.add(waiter.deadline, Deadline::CallerWait(i));
            }
            if let Some(pending) = &model.pending_ack {
                index.add(pending.deadline, Deadline::Ack(i));
            }
            if let Phase::Unloading { idle_by: Some(by), .. } = model.phase {
                index.add(by, Deadline::UnloadCut(i));
            }
        }
        for (id, lease) in &self.leases {
            if let Some(expires) = lease.expires {
                index.add(expires, Deadline::LeaseExpiry(id.clone()));
            }
        }
        for waiter in &self.queue {
            // A lease whose victims are being released waits for them, past its deadline: its
            // deadline counts again once they are gone (else the shell would wake at once, for
            // ever, until they are).
            if let Pending::Lease { deadline, .. } = &waiter.pending
                && waiter.awaiting_release.is_empty()
            {
                index.add(*deadline, Deadline::LeaseWait(waiter.seq));
            }
        }
        for settle in &self.settling {
            index.add(settle.deadline, Deadline::Settle(settle.model));
        }
        // Nothing to do then but publish (every input ends with a publication) and stop
        // admitting on the old figures, which `policy_inputs` does from the time alone.
        if let Some(at) = self.seen.stale_at(self.now) {
            index.add(at, Deadline::StaleReadings);
        }
        index
    }

    /// When the engine next needs a `Tick`.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines().first()
    }

    pub(super) fn on_idle(&mut self) {
        self.release_idle_unloads();
    }

    /// Acts on every deadline that passed.
    pub(super) fn on_timers(&mut self) {
        let now = self.now;
        // Apps that did not acknowledge in time.
        for i in 0..self.models.len() {
            if let Some(pending) = self.models[i].pending_ack.take_if(|p| p.deadline <= now) {
                self.unresponsive(i, pending);
            }
        }
        // Unloads whose requests in flight did not end in time: cut them.
        self.release_idle_unloads();
        // Idle TTL.
        let idle: Vec<usize> = (0..self.models.len())
            .filter(|&i| self.models[i].idle_expiry(self.started).is_some_and(|expiry| expiry <= now))
            .collect();
        for i in idle {
            let _ = self.begin_unload(i, Reason::Idle);
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
            let (late, on_time): (Vec<ReadyWaiter>, Vec<ReadyWaiter>) =
                waiters.into_iter().partition(|w| w.deadline <= now);
            self.models[i].ready_waiters = on_time;
            if late.is_empty() {
                continue;
            }
            let id = self.models[i].spec.id.clone();
            let shortfall = self
                .queue
                .iter()
                .find(|w| w.loads(&id))
                .and_then(|w| w.waiting_for.clone().or_else(|| w.last_shortfall.clone()));
            let message = shortfall.unwrap_or_else(|| format!("model {id} is {}", self.models[i].state()));
            for waiter in late {
                let waited = now.saturating_duration_since(waiter.asked);
                self.fail_caller(waiter.caller, ArbiterError::Timeout { waited, message: message.clone() });
            }
            // Nobody waits any more: withdraw its queued load (preloads and pinned stay).
            let spec = &self.models[i].spec;
            if self.models[i].ready_waiters.is_empty() && !spec.preload && !spec.pinned {
                self.queue.retain(|w| !w.loads(&id));
            }
        }
    }
}
