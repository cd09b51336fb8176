//! Leases: memory leases (queued like loads) and model leases (a load, then a pin held until
//! the lease ends).

use tokio::sync::oneshot;

use super::model::{Lease, Pending, ReadyCaller};
use super::{Effects, Engine};
use crate::arbiter::gate::Pin;
use crate::arbiter::{ArbiterError, LeaseGrant, LeaseRequest};
use crate::config::Backend;
use crate::events::EventKind;

type LeaseReply = oneshot::Sender<Result<LeaseGrant, ArbiterError>>;

impl<E: Effects> Engine<E> {
    pub(super) fn request_lease(&mut self, request: LeaseRequest, reply: LeaseReply) {
        if let Some(name) = request.model.clone() {
            self.request_model_lease(&name, request, reply);
            return;
        }
        if self.queue.len() >= self.settings.max_queue as usize {
            let _ = reply.send(Err(ArbiterError::QueueFull(self.settings.max_queue)));
            return;
        }
        let deadline = self.after(request.wait);
        let priority = request.priority;
        self.enqueue(priority, Pending::Lease { request, reply, deadline });
    }

    /// A model lease: granted at once if the model is ready, else after loading it like any other
    /// demand (queue, eviction and timeout rules included), with the pin taken when it became
    /// ready.
    fn request_model_lease(&mut self, name: &str, request: LeaseRequest, reply: LeaseReply) {
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
        if self.models[i].phase.serving() {
            let device = self.models[i].device;
            let request = LeaseRequest { model: Some(self.models[i].spec.id.clone()), ..request };
            let grant = self.grant_lease(request, device, None);
            if let Err(Ok(grant)) = reply.send(Ok(grant)) {
                // The caller went away meanwhile: do not keep the model in use for nobody.
                let _ = self.release_lease(&grant.id, "disconnected");
            }
            return;
        }
        if self.models[i].spec.kind() == Backend::External && self.models[i].attachment.is_none() {
            // The one-shot form: the lease holder is the app.
            self.models[i].oneshot = Some(request.pid);
        }
        let deadline = self.after(request.wait);
        let id = self.models[i].spec.id.clone();
        // Recorded under the model's id, not the alias it was asked by: whether a lease holds a
        // model (unload refused, no drain) is asked by id.
        let request = LeaseRequest { model: Some(id.clone()), ..request };
        let caller = ReadyCaller::ModelLease { request, reply, deadline };
        self.request_load(&id, Some((deadline, caller)), false);
    }

    /// Records a lease. A model lease holds a pin like a request in flight: the one taken when
    /// the model became ready for it, or one taken now (the model is ready when this runs).
    pub(super) fn grant_lease(&mut self, request: LeaseRequest, device: Option<u32>, pin: Option<Pin>) -> LeaseGrant {
        let pin = pin.or_else(|| {
            request.model.as_ref().and_then(|name| self.index(name).ok()).and_then(|i| self.models[i].gate.try_pin())
        });
        let upstream = pin.as_ref().map(|p| p.upstream.to_string());
        self.next_lease += 1;
        let id = format!("lease-{}", self.next_lease);
        let lease = Lease {
            id: id.clone(),
            holder: request.holder,
            device,
            vram_mib: if request.model.is_some() { 0 } else { request.vram_mib },
            exclusive: request.exclusive,
            ttl: request.ttl,
            model: request.model,
            upstream,
            priority: request.priority,
            expires: request.ttl.map(|ttl| self.after(ttl)),
            pid: request.pid,
            pin,
            granted: self.now,
        };
        let grant = lease.grant();
        self.leases.insert(id, lease);
        self.fx.emit(EventKind::LeaseGranted {
            id: grant.id.clone(),
            holder: grant.holder.clone(),
            device: grant.device,
            vram_mib: grant.vram_mib,
            exclusive: grant.exclusive,
        });
        grant
    }

    pub(super) fn release_lease(&mut self, id: &str, reason: &str) -> Result<(), ArbiterError> {
        // Dropping the lease drops its pin, if any: the model is idle again (and touched).
        let lease = self.leases.remove(id).ok_or_else(|| ArbiterError::UnknownLease(id.to_string()))?;
        // The end of a one-shot hold of an external model is its release (unless another such
        // lease still holds it).
        if let Some(i) = lease.model.as_ref().and_then(|m| self.index(m).ok())
            && self.models[i].oneshot.is_some()
            && !self.leased(&self.models[i].spec.id)
        {
            self.models[i].oneshot = None;
            drop(lease.pin);
            let _ = self.begin_unload(i, super::Reason::Requested);
        }
        self.fx.emit(EventKind::LeaseReleased { id: id.to_string(), holder: lease.holder, reason: reason.into() });
        Ok(())
    }

    /// Whether a model lease holds the model (its holder was given the model's address).
    pub(super) fn leased(&self, id: &str) -> bool {
        self.leases.values().any(|l| l.model.as_deref() == Some(id))
    }

    pub(super) fn leased_error(&self, id: &str, what: &str) -> ArbiterError {
        let holders: Vec<&str> =
            self.leases.values().filter(|l| l.model.as_deref() == Some(id)).map(|l| l.holder.as_str()).collect();
        ArbiterError::Conflict(format!(
            "model {id} cannot be {what} while model leases hold it (holders: {}): their holders talk to its \
             server directly; release the leases first",
            holders.join(", ")
        ))
    }

    /// How many leases keep `model` in use (model leases, one-shot external leases).
    pub(super) fn model_lease_count(&self, model: &str) -> u32 {
        let count = self.leases.values().filter(|l| l.model.as_deref() == Some(model)).count();
        u32::try_from(count).unwrap_or(u32::MAX)
    }
}
