//! Counters and histograms of what happened, counted from the event bus by one task: loads,
//! unloads and their times, evictions, waits in the queue, leases, pressure relief.
//!
//! Everything is derived from events that already flow (`model_state`, `queued`,
//! `lease_granted`, `lease_released`, `memory_release_timeout`): the engine is not asked for
//! anything more. A load's time is the time between its model's `model_state` events into and out
//! of `loading`; a release's, into and out of `unloading`: both are stamped when the engine makes
//! the change.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use crate::events::{Event, EventKind, ModelState};

/// A load: spawn to ready, from a fraction of a second (a small model, warm caches) to minutes.
const LOAD_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0];
/// A release: stop to memory seen back.
const RELEASE_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// The unload reasons that are evictions: the model was released for someone else's sake.
const EVICTIONS: [&str; 3] = ["evicted_for", "resident_cap", "pressure"];
/// The reasons a load ended without the model ready that are failures (the rest are
/// cancellations: an unload or a shutdown while it started).
const LOAD_FAILURES: [&str; 6] =
    ["failed", "crashed", "unresponsive", "ollama_unreachable", "detached", "gone_from_ollama"];

/// `type` is a keyword: this label set is a plain pair.
type TypeLabel = [(&'static str, &'static str); 1];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelResult {
    model: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelReasonResult {
    model: String,
    reason: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelReason {
    model: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceModel {
    device: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Exclusive {
    exclusive: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

type Histograms = Family<ModelLabel, Histogram, fn() -> Histogram>;

/// The families, registered once; each is a handle to the registered one.
#[derive(Clone, Debug)]
pub(super) struct EventMetrics {
    events: Family<TypeLabel, Counter>,
    loads: Family<ModelResult, Counter>,
    load_seconds: Histograms,
    unloads: Family<ModelReasonResult, Counter>,
    release_seconds: Histograms,
    evictions: Family<ModelReason, Counter>,
    pressure_reliefs: Family<DeviceModel, Counter>,
    load_waits: Family<ModelLabel, Counter>,
    lease_waits: Counter,
    lease_grants: Family<Exclusive, Counter>,
    lease_releases: Family<ReasonLabel, Counter>,
}

impl EventMetrics {
    /// Registers every family in `registry` (counters get their `_total` there).
    pub(super) fn register(registry: &mut Registry) -> EventMetrics {
        let metrics = EventMetrics {
            events: Family::default(),
            loads: Family::default(),
            load_seconds: Family::new_with_constructor(|| Histogram::new(LOAD_BUCKETS.iter().copied())),
            unloads: Family::default(),
            release_seconds: Family::new_with_constructor(|| Histogram::new(RELEASE_BUCKETS.iter().copied())),
            evictions: Family::default(),
            pressure_reliefs: Family::default(),
            load_waits: Family::default(),
            lease_waits: Counter::default(),
            lease_grants: Family::default(),
            lease_releases: Family::default(),
        };
        registry.register("vramgate_events", "Events published, by type.", metrics.events.clone());
        registry.register(
            "vramgate_model_loads",
            "Loads that ended, by model and result: ready, failed (the start failed), cancelled (unloaded or shut \
             down while starting).",
            metrics.loads.clone(),
        );
        registry.register(
            "vramgate_model_load_duration_seconds",
            "Time from a load's start (its process spawned) to the model ready, for loads that became ready.",
            metrics.load_seconds.clone(),
        );
        registry.register(
            "vramgate_model_unloads",
            "Releases that ended, by model, why the release began (requested, idle, evicted_for, pressure, \
             resident_cap, failed, crashed, shutdown, ...) and result: released, or release_timeout when the memory \
             did not show up free within release_timeout.",
            metrics.unloads.clone(),
        );
        registry.register(
            "vramgate_model_release_duration_seconds",
            "Time from a model told to stop to its memory seen back (a requested unload of a model in use includes \
             its wait for the requests in flight).",
            metrics.release_seconds.clone(),
        );
        registry.register(
            "vramgate_model_evictions",
            "Models released for someone else's sake, by model and reason: evicted_for (room for a load or a \
             lease), resident_cap, pressure.",
            metrics.evictions.clone(),
        );
        registry.register(
            "vramgate_pressure_reliefs",
            "Models released (or moved to their CPU form) to relieve an emergency on a device.",
            metrics.pressure_reliefs.clone(),
        );
        registry.register(
            "vramgate_model_load_waits",
            "Loads that could not be admitted at once and waited in the queue, by model.",
            metrics.load_waits.clone(),
        );
        registry.register(
            "vramgate_lease_waits",
            "Memory leases that could not be granted at once and waited in the queue.",
            metrics.lease_waits.clone(),
        );
        registry.register(
            "vramgate_lease_grants",
            "Leases granted, by whether exclusive.",
            metrics.lease_grants.clone(),
        );
        registry.register(
            "vramgate_lease_releases",
            "Leases ended, by reason: released, disconnected, expired, shutdown.",
            metrics.lease_releases.clone(),
        );
        metrics
    }
}

/// What the observer remembers of a model: the state its last event put it in, since when, why,
/// and whether its release timed out.
#[derive(Debug)]
struct Entered {
    state: ModelState,
    since: DateTime<Utc>,
    reason: String,
    release_timed_out: bool,
}

/// Turns events into counts. Pure: it reads only the events (their times included).
#[derive(Debug)]
pub(super) struct EventObserver {
    metrics: EventMetrics,
    /// The configured model ids: a `queued` event names a model (a load) or a lease holder.
    models: HashSet<String>,
    /// By model id.
    entered: HashMap<String, Entered>,
}

/// A reason as a label value: `evicted_for:<id>` loses its id (one series per requester would
/// grow with every lease holder's name).
fn reason_label(reason: &str) -> &str {
    reason.split_once(':').map_or(reason, |(kind, _)| kind)
}

impl EventObserver {
    pub(super) fn new(metrics: EventMetrics, models: HashSet<String>) -> EventObserver {
        EventObserver { metrics, models, entered: HashMap::new() }
    }

    /// Counts one event.
    pub(super) fn observe(&mut self, event: &Event) {
        if !matches!(event.kind, EventKind::EventsLost { .. }) {
            self.metrics.events.get_or_create(&[("type", event.kind.name())]).inc();
        }
        match &event.kind {
            EventKind::ModelState { model, from, to, reason, device, .. } => {
                self.model_state(event.time, model, *from, *to, reason, *device);
            }
            EventKind::MemoryReleaseTimeout { model, .. } => {
                if let Some(entered) = self.entered.get_mut(model) {
                    entered.release_timed_out = true;
                }
            }
            EventKind::Queued { requester, .. } => {
                if self.models.contains(requester) {
                    self.metrics.load_waits.get_or_create(&ModelLabel { model: requester.clone() }).inc();
                } else {
                    self.metrics.lease_waits.inc();
                }
            }
            EventKind::LeaseGranted { exclusive, .. } => {
                let exclusive = if *exclusive { "true" } else { "false" };
                self.metrics.lease_grants.get_or_create(&Exclusive { exclusive }).inc();
            }
            EventKind::LeaseReleased { reason, .. } => {
                self.metrics.lease_releases.get_or_create(&ReasonLabel { reason: reason.clone() }).inc();
            }
            _ => {}
        }
    }

    /// Events were lost (the observer fell behind): what it remembered of the models may be out
    /// of date, so no duration is measured from it.
    pub(super) fn lost(&mut self) {
        self.entered.clear();
    }

    fn model_state(
        &mut self,
        time: DateTime<Utc>,
        model: &str,
        from: ModelState,
        to: ModelState,
        reason: &str,
        device: Option<u32>,
    ) {
        let before = self.entered.insert(
            model.to_string(),
            Entered { state: to, since: time, reason: reason.to_string(), release_timed_out: false },
        );
        // How long it was `from`, when the observer saw it enter that state.
        let before = before.filter(|b| b.state == from);
        let spent = before.as_ref().and_then(|b| (time - b.since).to_std().ok()).map(|d| d.as_secs_f64());
        let label = || ModelLabel { model: model.to_string() };
        let m = &self.metrics;
        if from == ModelState::Loading && to != ModelState::Loading {
            let result = if to == ModelState::Ready {
                "ready"
            } else if LOAD_FAILURES.contains(&reason_label(reason)) {
                "failed"
            } else {
                "cancelled"
            };
            m.loads.get_or_create(&ModelResult { model: model.to_string(), result }).inc();
            if let (Some(seconds), true) = (spent, to == ModelState::Ready) {
                m.load_seconds.get_or_create(&label()).observe(seconds);
            }
        }
        if from == ModelState::Unloading && to != ModelState::Unloading {
            let result =
                if before.as_ref().is_some_and(|b| b.release_timed_out) { "release_timeout" } else { "released" };
            // Why the release began: the reason of the event into `unloading`.
            let cause = before.as_ref().map_or("unknown", |b| reason_label(&b.reason)).to_string();
            m.unloads.get_or_create(&ModelReasonResult { model: model.to_string(), reason: cause, result }).inc();
            if let Some(seconds) = spent {
                m.release_seconds.get_or_create(&label()).observe(seconds);
            }
        }
        if to == ModelState::Unloading && from != ModelState::Unloading {
            let cause = reason_label(reason);
            if EVICTIONS.contains(&cause) {
                m.evictions.get_or_create(&ModelReason { model: model.to_string(), reason: cause.to_string() }).inc();
            }
            if cause == "pressure" {
                let device = device.map(|d| d.to_string()).unwrap_or_default();
                m.pressure_reliefs.get_or_create(&DeviceModel { device, model: model.to_string() }).inc();
            }
        }
    }
}

/// Counts every event published on `events` from now on, until the bus closes.
pub(super) fn spawn_observer(
    mut observer: EventObserver,
    mut events: broadcast::Receiver<Arc<Event>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(event) => observer.observe(&event),
                Err(RecvError::Lagged(count)) => {
                    tracing::warn!("metrics: {count} event(s) were not counted (the counter fell behind)");
                    observer.lost();
                }
                Err(RecvError::Closed) => return,
            }
        }
    })
}
