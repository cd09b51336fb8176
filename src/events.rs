//! Events: what happened, published to every listener (the SSE stream, `vramgate events`).
//!
//! A broadcast channel: publishing never waits for a slow listener; a listener that falls too far
//! behind is told how many events it lost instead of stalling the daemon.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::gpu::Level;

/// How many events a listener may fall behind before it loses some.
const CHANNEL_CAPACITY: usize = 1024;

/// One event with its sequence number and time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Increases by one per event from daemon start; gaps tell a listener it lost events.
    pub seq: u64,
    /// When it happened.
    pub time: DateTime<Utc>,
    /// What happened; its fields are flattened into the event's JSON next to `type`.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// The life-cycle state of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelState {
    /// Not running.
    Unloaded,
    /// Starting: memory reserved, process spawned, health not yet passed.
    Loading,
    /// Serving.
    Ready,
    /// Stopping, or stopped and waiting for its memory to come back.
    Unloading,
    /// Failed to start three times in a row; waits out a cooldown.
    Failed,
}

impl ModelState {
    /// The lowercase name used in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Unloaded => "unloaded",
            ModelState::Loading => "loading",
            ModelState::Ready => "ready",
            ModelState::Unloading => "unloading",
            ModelState::Failed => "failed",
        }
    }
}

impl std::fmt::Display for ModelState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kinds of events, serialized as `{"type": "level_changed", ...fields}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// A device crossed a level boundary.
    LevelChanged {
        /// Device index.
        device: u32,
        /// Level before.
        from: Level,
        /// Level now.
        to: Level,
        /// Used memory now.
        used_mib: u64,
        /// Device size.
        total_mib: u64,
    },
    /// A device's used memory moved by at least `change_threshold_mib` since the last such event.
    VramChanged {
        /// Device index.
        device: u32,
        /// Used memory now.
        used_mib: u64,
        /// Used memory at the previous `vram_changed` (or at start).
        previous_mib: u64,
        /// Free memory now.
        free_mib: u64,
    },
    /// A sample failed; readings are stale until `probe_recovered`.
    ProbeFailed {
        /// `nvml`, `amd`, `sim` or `none`.
        probe: String,
        /// The probe's error.
        error: String,
    },
    /// Sampling works again.
    ProbeRecovered {
        /// The probe.
        probe: String,
        /// How many samples failed in a row.
        failed_samples: u64,
    },
    /// A model moved between states.
    ModelState {
        /// Model id.
        model: String,
        /// State before.
        from: ModelState,
        /// State now.
        to: ModelState,
        /// Why: `requested`, `idle`, `evicted_for:<id>`, `pressure`, `resident_cap`, `crashed`,
        /// `failed`, `ready`, `released`, `shutdown`.
        reason: String,
        /// Its device, where it has one.
        device: Option<u32>,
        /// Its footprint as vramgate counts it.
        vram_mib: u64,
        /// The error, for `failed` and `crashed`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A request could not be admitted at once and waits.
    Queued {
        /// The model or lease holder that waits.
        requester: String,
        /// Why, with the numbers.
        reason: String,
    },
    /// A lease was granted.
    LeaseGranted {
        /// Lease id.
        id: String,
        /// Who holds it.
        holder: String,
        /// Its device.
        device: Option<u32>,
        /// Memory granted.
        vram_mib: u64,
        /// Whether it excludes other leases and loads on the device.
        exclusive: bool,
    },
    /// A lease ended.
    LeaseReleased {
        /// Lease id.
        id: String,
        /// Who held it.
        holder: String,
        /// `released`, `disconnected`, `expired`, `shutdown`.
        reason: String,
    },
    /// A released model's memory did not show up as free within its `release_timeout`.
    MemoryReleaseTimeout {
        /// Model id.
        model: String,
        /// How long vramgate waited.
        waited_ms: u64,
    },
    /// A mode was applied (`vramgate mode NAME`, or `initial_mode` at start-up).
    ModeChanged {
        /// The mode before, if any.
        from: Option<String>,
        /// The mode now.
        to: String,
    },
    /// A model moved between the GPU and its CPU form while staying loaded.
    ModelPlaced {
        /// Model id.
        model: String,
        /// `gpu` or `cpu`.
        placement: String,
        /// Why: `demoted`, `promoted`, `mode`, `requested`.
        reason: String,
    },
    /// An app attached to an external model, or went away.
    ExternalAttachment {
        /// Model id.
        model: String,
        /// `attached` or `detached`.
        change: String,
        /// Who attached.
        holder: String,
        /// The app's pid, if it told.
        pid: Option<u32>,
    },
    /// An app did not acknowledge an instruction in time; its model is no longer counted on.
    ExternalUnresponsive {
        /// Model id.
        model: String,
        /// The instruction that went unanswered: `gpu`, `cpu` or `release`.
        action: String,
        /// How long vramgate waited.
        waited_ms: u64,
    },
    /// An Ollama server stopped answering (its models are failed until it returns) or answers
    /// again.
    OllamaReachability {
        /// Its base URL.
        url: String,
        /// Whether it answers now.
        reachable: bool,
        /// Why it does not, when it does not.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A process left behind by an earlier daemon was stopped at start-up.
    LeftoverReaped {
        /// Its pid.
        pid: u32,
        /// The model it served.
        model: String,
    },
    /// Sent to one listener only: it fell behind and these events were dropped for it.
    EventsLost {
        /// How many.
        count: u64,
    },
}

impl EventKind {
    /// The `type` string, as in the JSON.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::LevelChanged { .. } => "level_changed",
            EventKind::VramChanged { .. } => "vram_changed",
            EventKind::ProbeFailed { .. } => "probe_failed",
            EventKind::ProbeRecovered { .. } => "probe_recovered",
            EventKind::ModelState { .. } => "model_state",
            EventKind::Queued { .. } => "queued",
            EventKind::LeaseGranted { .. } => "lease_granted",
            EventKind::LeaseReleased { .. } => "lease_released",
            EventKind::MemoryReleaseTimeout { .. } => "memory_release_timeout",
            EventKind::ModeChanged { .. } => "mode_changed",
            EventKind::ModelPlaced { .. } => "model_placed",
            EventKind::ExternalAttachment { .. } => "external_attachment",
            EventKind::ExternalUnresponsive { .. } => "external_unresponsive",
            EventKind::OllamaReachability { .. } => "ollama_reachability",
            EventKind::LeftoverReaped { .. } => "leftover_reaped",
            EventKind::EventsLost { .. } => "events_lost",
        }
    }
}

/// The publishing side, cheap to clone.
#[derive(Clone)]
pub struct EventBus {
    sender: broadcast::Sender<Arc<Event>>,
    next_seq: Arc<AtomicU64>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    /// A bus with no listeners yet.
    pub fn new() -> EventBus {
        let (sender, _) = broadcast::channel(CHANNEL_CAPACITY);
        EventBus { sender, next_seq: Arc::new(AtomicU64::new(1)) }
    }

    /// Stamps and sends an event; also logs it. Having no listener is normal.
    pub fn publish(&self, kind: EventKind) -> Arc<Event> {
        let event = Arc::new(Event { seq: self.next_seq.fetch_add(1, Ordering::Relaxed), time: Utc::now(), kind });
        tracing::info!(target: "vramgate::events", event = %serde_json::to_string(&*event).unwrap_or_default());
        let _ = self.sender.send(event.clone());
        event
    }

    /// A new listener, which sees events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.sender.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape_is_flat_with_a_type() {
        let bus = EventBus::new();
        let mut rx = bus.subscribe();
        bus.publish(EventKind::LevelChanged {
            device: 0,
            from: Level::Ok,
            to: Level::Warning,
            used_mib: 760,
            total_mib: 1000,
        });
        let event = rx.try_recv().unwrap();
        let json = serde_json::to_value(&*event).unwrap();
        assert_eq!(json["type"], "level_changed");
        assert_eq!(json["from"], "ok");
        assert_eq!(json["to"], "warning");
        assert_eq!(json["used_mib"], 760);
        assert_eq!(json["seq"], 1);
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back, *event);
    }

    #[test]
    fn sequence_numbers_increase() {
        let bus = EventBus::new();
        let a = bus.publish(EventKind::EventsLost { count: 1 });
        let b = bus.publish(EventKind::EventsLost { count: 2 });
        assert_eq!(b.seq, a.seq + 1);
        assert_eq!(a.kind.name(), "events_lost");
    }
}
