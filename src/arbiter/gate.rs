//! The hot path's view of a model: whether it is serving, where, and how many requests use it.
//!
//! A warm request must not queue on the arbiter's mailbox. So each
//! model has a gate, shared by the arbiter and the proxy: the proxy pins a serving model with one
//! short read lock and an atomic increment, and unpins it by dropping the [`Pin`]. The arbiter reads
//! the counter when it chooses victims, and closes the gate under the write lock only if nobody
//! holds a pin, so a request can never pin a model that is being evicted.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use axum::http::uri::Authority;
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// What protocol a model's upstream speaks, fixed by its backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamKind {
    /// An OpenAI-compatible server (llama-server, vLLM, whisper.cpp server, ...): requests go to
    /// it unchanged.
    OpenAi,
    /// A model inside Ollama: requests go to Ollama's base URL with the `model` field naming the
    /// model as Ollama knows it.
    Ollama {
        /// Ollama's name for it (`ollama_model`, e.g. `llama3.2:3b`).
        model: String,
        /// The model's configured `options`: a request without them would make Ollama reload
        /// the model with its defaults (a different size).
        options: serde_json::Map<String, serde_json::Value>,
    },
    /// A model inside a client application: nothing to forward requests to.
    External,
}

/// Where a serving model listens (the URL and its parsed authority) and whether it runs in its
/// CPU form.
type Serving = (Arc<str>, Option<Authority>, bool);

/// What the gate's lock guards: where the model serves (`None`: it does not), and the signal
/// that cuts the answers of the requests pinned since the last cut.
struct GateState {
    serving: Option<Serving>,
    streams: CancellationToken,
}

/// One model's gate.
pub struct ModelGate {
    /// The model id.
    pub id: String,
    /// The protocol of its upstream.
    pub kind: UpstreamKind,
    /// The upstream base URL while the model is ready, and whether it runs in its CPU form
    /// (`None` otherwise), and the signal that cuts the answers in flight.
    state: RwLock<GateState>,
    in_use: AtomicU32,
    /// Milliseconds since `origin` of the last unpin (or of becoming ready).
    last_used_ms: AtomicU64,
    origin: Instant,
    /// Woken when a model's last pin is dropped, so the arbiter can serve a waiter that needed it
    /// idle, without a message per request.
    idle: Arc<Notify>,
    /// How many times its server crashed while serving (the engine counts each when it sees the
    /// exit), and woken at each: a request whose connection failed waits for this to tell a
    /// crash (send it again once restarted) from a live server refusing it.
    crashes: AtomicU64,
    crashed: Notify,
}

/// A model held in use; unpinned when dropped (the response body ended or the client went away).
pub struct Pin {
    gate: Arc<ModelGate>,
    /// Where to send the request (`http://127.0.0.1:PORT`).
    pub upstream: Arc<str>,
    /// The same, parsed once when the model became ready (the proxy builds URIs from it).
    pub authority: Option<Authority>,
    /// Whether the model runs in its CPU form (an Ollama model must then be asked with
    /// `num_gpu = 0`, or Ollama moves it back to the GPU behind vramgate's back).
    pub on_cpu: bool,
    /// Cancelled when the model is told to stop while this request is in flight.
    cut: CancellationToken,
    /// The model's crash count when it was pinned.
    crashes_seen: u64,
}

impl ModelGate {
    pub(crate) fn new(id: String, kind: UpstreamKind, origin: Instant, idle: Arc<Notify>) -> Arc<ModelGate> {
        Arc::new(ModelGate {
            id,
            kind,
            state: RwLock::new(GateState { serving: None, streams: CancellationToken::new() }),
            in_use: AtomicU32::new(0),
            last_used_ms: AtomicU64::new(0),
            origin,
            idle,
            crashes: AtomicU64::new(0),
            crashed: Notify::new(),
        })
    }

    /// Pins the model if it is serving. `None` means: ask the arbiter (it is not ready).
    pub fn try_pin(self: &Arc<Self>) -> Option<Pin> {
        let state = self.state.read().ok()?;
        let (upstream, authority, on_cpu) = state.serving.as_ref()?.clone();
        let cut = state.streams.clone();
        // Incremented under the read lock: `close_if_idle` cannot slip in between.
        self.in_use.fetch_add(1, Ordering::AcqRel);
        drop(state);
        let crashes_seen = self.crashes.load(Ordering::Acquire);
        Some(Pin { gate: self.clone(), upstream, authority, on_cpu, cut, crashes_seen })
    }

    /// Requests (and model leases) using it now.
    pub fn in_use(&self) -> u32 {
        self.in_use.load(Ordering::Acquire)
    }

    /// When it was last used, as milliseconds since the arbiter's origin.
    pub fn last_used_ms(&self) -> u64 {
        self.last_used_ms.load(Ordering::Acquire)
    }

    pub(crate) fn touch(&self) {
        self.last_used_ms.store(self.origin.elapsed().as_millis() as u64, Ordering::Release);
    }

    /// Opens the gate: the model is ready at `upstream`.
    #[cfg(test)]
    pub(crate) fn open(&self, upstream: &str) {
        self.open_on(upstream, false);
    }

    /// Opens the gate: the model is ready at `upstream`, in its CPU form if `on_cpu`.
    pub(crate) fn open_on(&self, upstream: &str, on_cpu: bool) {
        self.touch();
        if let Ok(mut state) = self.state.write() {
            let authority = upstream.strip_prefix("http://").and_then(|a| a.parse::<Authority>().ok());
            state.serving = Some((Arc::from(upstream), authority, on_cpu));
        }
    }

    /// Closes the gate whatever the pins (a crash, an explicit unload, shutdown).
    pub(crate) fn close(&self) {
        if let Ok(mut state) = self.state.write() {
            state.serving = None;
        }
    }

    /// Closes the gate because its server crashed while serving, and tells the requests that
    /// wait to know ([`Pin::crashed_within`]).
    pub(crate) fn crash(&self) {
        self.close();
        self.crashes.fetch_add(1, Ordering::AcqRel);
        self.crashed.notify_waiters();
    }

    /// Cuts the answers of every request in flight (each ends with an error message in its own
    /// framing, and its connection to the model server closes). Called when the model's backend
    /// is told to stop: llama-server does not exit on SIGTERM while a request runs, only once its
    /// clients have gone. Requests pinned later are not affected.
    pub(crate) fn cut_streams(&self) {
        if let Ok(mut state) = self.state.write() {
            std::mem::replace(&mut state.streams, CancellationToken::new()).cancel();
        }
    }

    /// Closes the gate only if nobody uses the model; false if a request pinned it meanwhile.
    pub(crate) fn close_if_idle(&self) -> bool {
        match self.state.write() {
            Ok(mut state) => {
                if self.in_use.load(Ordering::Acquire) > 0 {
                    return false;
                }
                state.serving = None;
                true
            }
            Err(_) => false,
        }
    }
}

impl Pin {
    /// The pinned model's id.
    pub fn model_id(&self) -> &str {
        &self.gate.id
    }

    /// The protocol of the pinned model's upstream.
    pub fn kind(&self) -> &UpstreamKind {
        &self.gate.kind
    }

    /// Whether the server this request was sent to crashes (the engine sees its exit) within
    /// `limit`, if it has not already.
    pub async fn crashed_within(&self, limit: std::time::Duration) -> bool {
        let gate = &self.gate;
        let wait = async {
            loop {
                let crashed = gate.crashed.notified();
                tokio::pin!(crashed);
                // Registered before the check, so a crash in between is not missed.
                crashed.as_mut().enable();
                if gate.crashes.load(Ordering::Acquire) != self.crashes_seen {
                    return;
                }
                crashed.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }

    /// Completes when the model is told to stop while this request is in flight
    /// ([`ModelGate::cut_streams`]).
    pub fn cut(&self) -> WaitForCancellationFutureOwned {
        self.cut.clone().cancelled_owned()
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.gate.touch();
        if self.gate.in_use.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.gate.idle.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> Arc<ModelGate> {
        ModelGate::new("llm".into(), UpstreamKind::OpenAi, Instant::now(), Arc::new(Notify::new()))
    }

    #[test]
    fn a_closed_gate_pins_nothing() {
        let gate = gate();
        assert!(gate.try_pin().is_none());
        gate.open("http://127.0.0.1:1");
        let pin = gate.try_pin().expect("serving");
        assert_eq!(&*pin.upstream, "http://127.0.0.1:1");
        assert_eq!(gate.in_use(), 1);
        drop(pin);
        assert_eq!(gate.in_use(), 0);
    }

    #[test]
    fn a_pinned_model_cannot_be_closed_for_eviction() {
        let gate = gate();
        gate.open("http://127.0.0.1:1");
        let pin = gate.try_pin().unwrap();
        assert!(!gate.close_if_idle());
        assert!(gate.try_pin().is_some(), "still serving");
        drop(pin);
        assert!(gate.close_if_idle());
        assert!(gate.try_pin().is_none());
    }

    #[tokio::test]
    async fn the_last_unpin_wakes_the_arbiter() {
        let idle = Arc::new(Notify::new());
        let gate = ModelGate::new("x".into(), UpstreamKind::OpenAi, Instant::now(), idle.clone());
        gate.open("http://127.0.0.1:1");
        let a = gate.try_pin().unwrap();
        let b = gate.try_pin().unwrap();
        drop(a);
        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(1), idle.notified()).await.expect("woken");
    }

    #[tokio::test]
    async fn a_cut_ends_the_requests_in_flight_and_not_later_ones() {
        let gate = gate();
        gate.open("http://127.0.0.1:1");
        let before = gate.try_pin().expect("serving");
        let cut = before.cut();
        gate.cut_streams();
        tokio::time::timeout(std::time::Duration::from_secs(1), cut).await.expect("the pin in flight is cut");
        let after = gate.try_pin().expect("still serving");
        let later = after.cut();
        tokio::pin!(later);
        assert!(futures_util::poll!(&mut later).is_pending(), "a pin taken after the cut is not cut");
    }

    #[test]
    fn pins_from_many_threads_balance() {
        let gate = gate();
        gate.open("http://127.0.0.1:1");
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..10_000 {
                        let pin = gate.try_pin();
                        assert!(pin.is_some());
                    }
                });
            }
        });
        assert_eq!(gate.in_use(), 0);
    }
}
