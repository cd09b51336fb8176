//! Events: what happened, published to every listener (the SSE stream, `vramgate events`).
//!
//! A broadcast channel: publishing never waits for a slow listener; a listener that falls too far
//! behind is told how many events it lost instead of stalling the daemon.
//!
//! Every event is also logged: its JSON at DEBUG (`VRAMGATE_LOG=debug`), and, for the events a
//! person watching the daemon cares about (model state changes, leases, levels, modes), one
//! readable line at INFO, or WARN for failures (see [`EventKind::log_line`]).

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

/// How loud an event's readable log line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Normal operation.
    Info,
    /// Something failed or needs attention.
    Warn,
}

/// An error in one line: its first line and, when it quotes output, the last line of that
/// output that is not one of vramgate's own markers.
fn one_line(error: &str) -> String {
    let mut lines = error.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default().to_string();
    let marker =
        |l: &&str| (l.starts_with("--- ") && l.ends_with(" ---")) || (l.starts_with("[... ") && l.ends_with(" ...]"));
    match lines.rfind(|l| !marker(l)) {
        Some(last) => format!("{first} {last}"),
        None => first,
    }
}

impl EventKind {
    /// The readable log line for this event and how loud it is, or `None` for events that are
    /// frequent (`vram_changed`) or already logged where they happen (probe failures, leftovers,
    /// an Ollama that stops answering).
    pub fn log_line(&self) -> Option<(LogLevel, String)> {
        use LogLevel::{Info, Warn};
        let line = match self {
            EventKind::LevelChanged { device, from, to, used_mib, total_mib } => {
                let level = if to > from { Warn } else { Info };
                (
                    level,
                    format!(
                        "GPU {device}: level {} -> {} ({used_mib} of {total_mib} MiB used)",
                        from.as_str(),
                        to.as_str()
                    ),
                )
            }
            EventKind::ModelState { model, from, to, reason, device, vram_mib, error } => {
                let mut line = format!("model {model}: {from} -> {to} ({reason})");
                if let Some(device) = device {
                    line.push_str(&format!(" on GPU {device}"));
                }
                if *vram_mib > 0 {
                    line.push_str(&format!(", {vram_mib} MiB"));
                }
                match error {
                    Some(error) => (Warn, format!("{line}: {}", one_line(error))),
                    None => (Info, line),
                }
            }
            EventKind::Queued { requester, reason } => (Info, format!("queued: {requester} waits: {reason}")),
            EventKind::LeaseGranted { id, holder, device, vram_mib, exclusive } => {
                let place = device.map(|d| format!(" on GPU {d}")).unwrap_or_default();
                let exclusive = if *exclusive { ", exclusive" } else { "" };
                (Info, format!("lease {id} granted to {holder}: {vram_mib} MiB{place}{exclusive}"))
            }
            EventKind::LeaseReleased { id, holder, reason } => {
                (Info, format!("lease {id} of {holder} ended ({reason})"))
            }
            EventKind::MemoryReleaseTimeout { model, waited_ms } => (
                Warn,
                format!(
                    "model {model}: its memory did not show up free within {} (release_timeout)",
                    crate::units::Rounded(std::time::Duration::from_millis(*waited_ms))
                ),
            ),
            EventKind::ModeChanged { from, to } => {
                (Info, format!("mode {} -> {to}", from.as_deref().unwrap_or("(none)")))
            }
            // Every load ends with one on the GPU: only a move is news.
            EventKind::ModelPlaced { placement, reason, .. } if reason == "ready" && placement == "gpu" => return None,
            EventKind::ModelPlaced { model, placement, reason } => {
                (Info, format!("model {model}: now on {placement} ({reason})"))
            }
            EventKind::ExternalAttachment { model, change, holder, pid } => {
                let pid = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
                (Info, format!("model {model}: app {holder}{pid} {change}"))
            }
            EventKind::ExternalUnresponsive { model, action, waited_ms } => (
                Warn,
                format!(
                    "model {model}: the attached app did not acknowledge `{action}` within {}",
                    crate::units::Rounded(std::time::Duration::from_millis(*waited_ms))
                ),
            ),
            EventKind::OllamaReachability { url, reachable: true, .. } => {
                (Info, format!("Ollama at {url} answers again"))
            }
            EventKind::ProbeRecovered { probe, failed_samples } => {
                (Info, format!("probe {probe} works again after {failed_samples} failed sample(s)"))
            }
            EventKind::VramChanged { .. }
            | EventKind::ProbeFailed { .. }
            | EventKind::OllamaReachability { .. }
            | EventKind::LeftoverReaped { .. }
            | EventKind::EventsLost { .. } => return None,
        };
        Some(line)
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

    /// Stamps and sends an event; also logs it (see the module docs). Having no listener is
    /// normal.
    pub fn publish(&self, kind: EventKind) -> Arc<Event> {
        let event = Arc::new(Event { seq: self.next_seq.fetch_add(1, Ordering::Relaxed), time: Utc::now(), kind });
        // The JSON is only built when DEBUG is on: tracing evaluates fields of enabled events only.
        tracing::debug!(target: "vramgate::events", event = %serde_json::to_string(&*event).unwrap_or_default());
        match event.kind.log_line() {
            Some((LogLevel::Info, line)) => tracing::info!(target: "vramgate::events", "{line}"),
            Some((LogLevel::Warn, line)) => tracing::warn!(target: "vramgate::events", "{line}"),
            None => {}
        }
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
    fn readable_log_lines() {
        let state = EventKind::ModelState {
            model: "llm".into(),
            from: ModelState::Loading,
            to: ModelState::Ready,
            reason: "ready".into(),
            device: Some(0),
            vram_mib: 5120,
            error: None,
        };
        assert_eq!(
            state.log_line(),
            Some((LogLevel::Info, "model llm: loading -> ready (ready) on GPU 0, 5120 MiB".into()))
        );
        let evicted = EventKind::ModelState {
            model: "llm".into(),
            from: ModelState::Ready,
            to: ModelState::Unloading,
            reason: "evicted_for:vision".into(),
            device: Some(1),
            vram_mib: 5120,
            error: None,
        };
        assert_eq!(
            evicted.log_line().unwrap().1,
            "model llm: ready -> unloading (evicted_for:vision) on GPU 1, 5120 MiB"
        );
        let failed = EventKind::ModelState {
            model: "stt".into(),
            from: ModelState::Loading,
            to: ModelState::Unloading,
            reason: "failed".into(),
            device: None,
            vram_mib: 0,
            error: Some(
                "exited during start-up (exit status 3); last output:\n--- started ---\nloading\nout of memory\n--- pid 9 exit status 3 ---"
                    .into(),
            ),
        };
        assert_eq!(
            failed.log_line(),
            Some((
                LogLevel::Warn,
                "model stt: loading -> unloading (failed): exited during start-up (exit status 3); last output: out of memory"
                    .into()
            ))
        );
        let level =
            EventKind::LevelChanged { device: 0, from: Level::Ok, to: Level::Warning, used_mib: 760, total_mib: 1000 };
        assert_eq!(
            level.log_line(),
            Some((LogLevel::Warn, "GPU 0: level ok -> warning (760 of 1000 MiB used)".into()))
        );
        let lease = EventKind::LeaseGranted {
            id: "l-1".into(),
            holder: "ffmpeg".into(),
            device: Some(0),
            vram_mib: 2048,
            exclusive: true,
        };
        assert_eq!(lease.log_line().unwrap().1, "lease l-1 granted to ffmpeg: 2048 MiB on GPU 0, exclusive");
        let placed = EventKind::ModelPlaced { model: "llm".into(), placement: "gpu".into(), reason: "ready".into() };
        assert_eq!(placed.log_line(), None);
        let timeout = EventKind::MemoryReleaseTimeout { model: "llm".into(), waited_ms: 5000 };
        assert!(timeout.log_line().unwrap().1.ends_with("within 5.0s (release_timeout)"));
        assert_eq!(EventKind::VramChanged { device: 0, used_mib: 1, previous_mib: 0, free_mib: 1 }.log_line(), None);
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
