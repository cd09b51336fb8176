//! Prometheus metrics (`GET /metrics`), in the text format 0.0.4, through `prometheus-client`.
//!
//! Two kinds of series:
//!
//! - **Gauges of now** (devices, processes, models, leases, the queue, the mode): produced at
//!   scrape time by a collector ([`gauges`]) from the status document `GET /vramgate/status`
//!   returns, so the two cannot disagree and none goes stale: a process that exits or a lease that
//!   ends has no series on the next scrape, and a device that cannot be read exports
//!   `vramgate_device_up 0` and none of its figures.
//! - **Counts of what happened**: loads, unloads, evictions, waits, leases and pressure relief,
//!   counted from the event bus by one task ([`events`]); requests by model, surface and status
//!   class, their wait for admission and their time to first byte, counted by the proxy with
//!   atomics only ([`requests`]).

mod events;
mod gauges;
pub mod requests;

use std::collections::HashSet;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::sync::broadcast;

use crate::events::Event;
use crate::status::Status;
pub use requests::{RequestMetrics, RequestRecord, Surface};

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The daemon's metrics: the registry of counts, and the request series the proxy writes.
#[derive(Debug)]
pub struct Metrics {
    /// The counts of what happened (events, requests); the gauges are made per scrape.
    registry: Registry,
    events: events::EventMetrics,
    requests: Arc<RequestMetrics>,
    /// The configured model ids.
    models: HashSet<String>,
}

impl Metrics {
    /// Metrics for a daemon serving these model ids (the only values a request's `model` label
    /// takes).
    pub fn new(models: impl IntoIterator<Item = String>) -> Metrics {
        let models: HashSet<String> = models.into_iter().collect();
        let mut registry = Registry::default();
        let events = events::EventMetrics::register(&mut registry);
        let requests = Arc::new(RequestMetrics::new(models.iter().cloned()));
        registry.register_collector(Box::new(requests::RequestCollector(Arc::clone(&requests))));
        Metrics { registry, events, requests, models }
    }

    /// The request series, for the proxy.
    pub fn requests(&self) -> &RequestMetrics {
        &self.requests
    }

    /// Counts every event published on the bus `events` was subscribed to, from then on, in a
    /// task of its own (subscribe before anything happens that should count).
    pub fn count_events(&self, events: broadcast::Receiver<Arc<Event>>) -> tokio::task::JoinHandle<()> {
        events::spawn_observer(events::EventObserver::new(self.events.clone(), self.models.clone()), events)
    }

    /// The exposition: the gauges read from `status` now, then the counts.
    pub fn render(&self, status: Status) -> String {
        let mut out = String::new();
        let mut now = Registry::default();
        now.register_collector(Box::new(gauges::StatusCollector { status }));
        // Writing into a String cannot fail; an encoder error would be a bug in a collector,
        // and the text before it is still a valid exposition.
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &now)
            .and_then(|()| prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry))
        {
            tracing::warn!("metrics: encoding failed: {e}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventKind, ModelState};
    use crate::gpu::{Level, NamedUsage, ProbeKind};
    use crate::status::{DeviceStatus, ProcessStatus};
    use axum::http::StatusCode;
    use chrono::{DateTime, Utc};

    /// The gauges of one status document (no counts yet).
    fn render(status: &Status) -> String {
        Metrics::new(std::iter::empty()).render(status.clone())
    }

    fn status() -> Status {
        Status {
            version: "0.1.0".into(),
            probe: ProbeKind::Sim,
            devices: vec![DeviceStatus {
                index: 0,
                name: "Sim \"8G\"".into(),
                probe: ProbeKind::Sim,
                total_mib: 8192,
                used_mib: 1024,
                free_mib: 7168,
                usable_mib: 7680,
                level: Level::Warning,
                utilization_pct: None,
                temperature_c: Some(51),
                processes: vec![ProcessStatus { pid: 4242, used_mib: Some(900), name: "python3".into(), model: None }],
                processes_unavailable: None,
                named_consumers: vec![NamedUsage { name: "desktop".into(), used_mib: 124 }],
                warnings: vec![],
                error: None,
            }],
            degraded: false,
            degraded_reasons: vec![],
            models: vec![],
            leases: vec![],
            queue: vec![],
            mode: None,
            ollama: Vec::new(),
            sampled_at: None,
            limits: None,
        }
    }

    #[test]
    fn renders_device_and_process_series() {
        let text = render(&status());
        assert!(
            text.contains("vramgate_device_total_bytes{device=\"0\",name=\"Sim \\\"8G\\\"\"} 8589934592\n"),
            "{text}"
        );
        assert!(text.contains("vramgate_device_used_bytes{device=\"0\",name=\"Sim \\\"8G\\\"\"} 1073741824\n"));
        assert!(text.contains("vramgate_device_level{device=\"0\",name=\"Sim \\\"8G\\\"\"} 1\n"));
        assert!(text.contains("vramgate_device_temperature_celsius{device=\"0\",name=\"Sim \\\"8G\\\"\"} 51\n"));
        assert!(!text.contains("vramgate_device_utilization_percent{"), "unknown values are absent, not zero");
        assert!(text.contains(
            "vramgate_process_used_bytes{device=\"0\",pid=\"4242\",name=\"python3\",model=\"\"} 943718400\n"
        ));
        assert!(text.contains("vramgate_named_consumer_used_bytes{device=\"0\",name=\"desktop\"} 130023424\n"));
        assert!(text.contains("vramgate_degraded{probe=\"sim\"} 0\n"));
    }

    /// A process the driver gives no figure for has no sample: absent, never 0.
    #[test]
    fn a_process_without_a_figure_has_no_sample() {
        let mut status = status();
        status.devices[0].processes[0].used_mib = None;
        let text = render(&status);
        assert!(!text.contains("vramgate_process_used_bytes{"), "{text}");
        assert!(text.contains("vramgate_device_processes{device=\"0\""), "still counted as a process: {text}");
    }

    /// Every sample line, gauges, counters and histograms alike, belongs to a family declared
    /// once with its type, and has a number for a value.
    #[test]
    fn every_sample_line_belongs_to_a_declared_family() {
        let metrics = Metrics::new(["llm".to_string()]);
        let mut observer = events::EventObserver::new(metrics.events.clone(), metrics.models.clone());
        for event in load_then_evict() {
            observer.observe(&event);
        }
        let mut record = metrics.requests().start(Surface::OpenAi);
        record.admitted("llm", std::time::Duration::from_millis(20));
        record.answered(StatusCode::OK);
        drop(record);
        let text = metrics.render(status());
        let declared: Vec<(&str, &str)> =
            text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split_once(' ')).collect();
        let names: Vec<&str> = declared.iter().map(|(name, _)| *name).collect();
        let unique: std::collections::BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(unique.len(), names.len(), "a family declared twice: {text}");
        for kind in ["gauge", "counter", "histogram"] {
            assert!(declared.iter().any(|(_, k)| *k == kind), "no {kind} in {text}");
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().expect("a name");
            let family = declared.iter().find(|(family, kind)| {
                *family == name
                    || (*kind == "histogram"
                        && ["_bucket", "_sum", "_count"].iter().any(|s| name.strip_suffix(s) == Some(*family)))
            });
            assert!(family.is_some(), "{name} has no TYPE line: {text}");
            let value = line.rsplit(' ').next().expect("a value");
            assert!(value.parse::<f64>().is_ok(), "bad value in {line}");
        }
    }

    fn at(millis: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_800_000_000_000 + millis).expect("a time")
    }

    fn event(seq: u64, millis: i64, kind: EventKind) -> Event {
        Event { seq, time: at(millis), kind }
    }

    fn state(model: &str, from: ModelState, to: ModelState, reason: &str) -> EventKind {
        EventKind::ModelState {
            model: model.into(),
            from,
            to,
            reason: reason.into(),
            device: Some(0),
            vram_mib: 1000,
            error: None,
        }
    }

    /// `llm` loads in 1.5 s, waits, is evicted for a lease and released in 0.25 s; `vision`
    /// fails to start; a lease waits and is granted, then released.
    fn load_then_evict() -> Vec<Event> {
        use ModelState::{Loading, Ready, Unloaded, Unloading};
        vec![
            event(1, 0, EventKind::Queued { requester: "llm".into(), reason: "needs 1000 MiB".into() }),
            event(2, 0, state("llm", Unloaded, Loading, "requested")),
            event(3, 1500, state("llm", Loading, Ready, "ready")),
            event(4, 2000, EventKind::Queued { requester: "job".into(), reason: "needs 9000 MiB".into() }),
            event(5, 2000, state("llm", Ready, Unloading, "evicted_for:job")),
            event(6, 2250, state("llm", Unloading, Unloaded, "released")),
            event(
                7,
                2300,
                EventKind::LeaseGranted {
                    id: "l-1".into(),
                    holder: "job".into(),
                    device: Some(0),
                    vram_mib: 9000,
                    exclusive: false,
                },
            ),
            event(
                8,
                2400,
                EventKind::LeaseReleased { id: "l-1".into(), holder: "job".into(), reason: "released".into() },
            ),
            event(9, 3000, state("vision", Unloaded, Loading, "requested")),
            event(10, 3100, state("vision", Loading, Unloading, "failed")),
            event(11, 3200, EventKind::MemoryReleaseTimeout { model: "vision".into(), waited_ms: 100 }),
            event(12, 3200, state("vision", Unloading, Unloaded, "released")),
            event(13, 4000, state("llm", Unloaded, Loading, "requested")),
            event(14, 4100, state("llm", Loading, Ready, "ready")),
            event(15, 5000, state("llm", Ready, Unloading, "pressure")),
        ]
    }

    #[test]
    fn events_count_loads_unloads_evictions_waits_and_leases() {
        let metrics = Metrics::new(["llm".to_string(), "vision".to_string()]);
        let mut observer = events::EventObserver::new(metrics.events.clone(), metrics.models.clone());
        for event in load_then_evict() {
            observer.observe(&event);
        }
        let text = metrics.render(status());
        for line in [
            "vramgate_model_loads_total{model=\"llm\",result=\"ready\"} 2",
            "vramgate_model_loads_total{model=\"vision\",result=\"failed\"} 1",
            "vramgate_model_load_duration_seconds_count{model=\"llm\"} 2",
            "vramgate_model_load_duration_seconds_sum{model=\"llm\"} 1.6",
            "vramgate_model_load_duration_seconds_bucket{model=\"llm\",le=\"0.1\"} 1",
            "vramgate_model_load_duration_seconds_bucket{model=\"llm\",le=\"2.5\"} 2",
            "vramgate_model_unloads_total{model=\"llm\",reason=\"evicted_for\",result=\"released\"} 1",
            "vramgate_model_unloads_total{model=\"vision\",reason=\"failed\",result=\"release_timeout\"} 1",
            "vramgate_model_release_duration_seconds_sum{model=\"llm\"} 0.25",
            "vramgate_model_evictions_total{model=\"llm\",reason=\"evicted_for\"} 1",
            "vramgate_model_evictions_total{model=\"llm\",reason=\"pressure\"} 1",
            "vramgate_pressure_reliefs_total{device=\"0\",model=\"llm\"} 1",
            "vramgate_model_load_waits_total{model=\"llm\"} 1",
            "vramgate_lease_waits_total 1",
            "vramgate_lease_grants_total{exclusive=\"false\"} 1",
            "vramgate_lease_releases_total{reason=\"released\"} 1",
            "vramgate_events_total{type=\"model_state\"} 10",
            "vramgate_events_total{type=\"memory_release_timeout\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        assert!(!text.contains("vramgate_model_loads_total{model=\"vision\",result=\"ready\""), "{text}");
        // The last release has not ended: not counted yet.
        assert!(!text.contains("vramgate_model_unloads_total{model=\"llm\",reason=\"pressure\""), "{text}");
    }

    /// After lost events the observer measures no duration from what it remembered.
    #[test]
    fn no_duration_across_lost_events() {
        use ModelState::{Loading, Ready, Unloaded};
        let metrics = Metrics::new(["llm".to_string()]);
        let mut observer = events::EventObserver::new(metrics.events.clone(), metrics.models.clone());
        observer.observe(&event(1, 0, state("llm", Unloaded, Loading, "requested")));
        observer.lost();
        observer.observe(&event(9, 5000, state("llm", Loading, Ready, "ready")));
        let text = metrics.render(status());
        assert!(text.contains("vramgate_model_loads_total{model=\"llm\",result=\"ready\"} 1"), "{text}");
        assert!(!text.contains("vramgate_model_load_duration_seconds"), "{text}");
    }

    /// A device whose reading failed exports `vramgate_device_up 0` and none of its stale
    /// figures; the device read normally goes on.
    #[test]
    fn a_failed_device_is_down_and_has_no_figures() {
        let mut status = status();
        let mut lost = status.devices[0].clone();
        lost.index = 1;
        lost.name = "Sim B".into();
        lost.error = Some("GPU_IS_LOST".into());
        status.devices.push(lost);
        let text = render(&status);
        assert!(text.contains("vramgate_device_up{device=\"0\",name=\"Sim \\\"8G\\\"\"} 1\n"), "{text}");
        assert!(text.contains("vramgate_device_up{device=\"1\",name=\"Sim B\"} 0\n"), "{text}");
        let device_1: Vec<&str> =
            text.lines().filter(|l| l.contains("device=\"1\"") && !l.starts_with("vramgate_device_up")).collect();
        assert!(device_1.is_empty(), "stale figures of the failed device: {device_1:?}");
        assert!(text.contains("vramgate_device_used_bytes{device=\"0\""), "{text}");
    }

    /// A probe whose samples the monitor takes from a channel.
    struct Scripted(std::sync::mpsc::Receiver<Result<Vec<crate::gpu::DeviceSnapshot>, crate::gpu::ProbeError>>);

    impl crate::gpu::Probe for Scripted {
        fn kind(&self) -> ProbeKind {
            ProbeKind::Sim
        }
        fn sample(&mut self) -> Result<Vec<crate::gpu::DeviceSnapshot>, crate::gpu::ProbeError> {
            self.0.recv().unwrap_or_else(|_| Err(crate::gpu::ProbeError("script ended".into())))
        }
    }

    /// While the whole probe fails (the monitor keeps every device's last good figures and says
    /// so in its degraded reason), no device is up and none has figures.
    #[tokio::test]
    async fn a_failing_probe_leaves_every_device_down() {
        use crate::monitor::{Monitor, MonitorSettings};
        let (script, answers) = std::sync::mpsc::channel();
        let reading = crate::gpu::DeviceSnapshot {
            index: 0,
            name: "d".into(),
            total_mib: 1000,
            used_mib: 100,
            free_mib: 900,
            ..Default::default()
        };
        script.send(Ok(vec![reading])).expect("the script");
        let settings = MonitorSettings {
            thresholds: crate::gpu::Thresholds::default(),
            reserve_mib: 0,
            interval: std::time::Duration::from_millis(10),
            change_threshold_mib: 1,
        };
        let bus = crate::events::EventBus::new();
        let (monitor, mut view) = Monitor::start(Box::new(Scripted(answers)), vec![], settings, bus).await;
        let from_view = |view: &crate::monitor::GpuView| Status {
            probe: view.probe,
            devices: view.devices.clone(),
            degraded: !view.degraded_reasons.is_empty(),
            degraded_reasons: view.degraded_reasons.clone(),
            ..status()
        };
        let text = render(&from_view(&view.borrow()));
        assert!(text.contains("vramgate_device_up{device=\"0\",name=\"d\"} 1\n"), "{text}");

        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = monitor.run(shutdown.clone());
        script.send(Err(crate::gpu::ProbeError("driver went away".into()))).expect("the script");
        view.wait_for(|v| !v.degraded_reasons.is_empty()).await.expect("the view");
        let failing = from_view(&view.borrow());
        assert_eq!(failing.devices[0].used_mib, 100, "the monitor keeps the last good figures");
        let text = render(&failing);
        assert!(text.contains("vramgate_device_up{device=\"0\",name=\"d\"} 0\n"), "{text}");
        for gone in ["vramgate_device_used_bytes{", "vramgate_device_free_bytes{", "vramgate_device_level{"] {
            assert!(!text.contains(gone), "{gone} while the probe fails: {text}");
        }
        assert!(text.contains("vramgate_degraded{probe=\"sim\"} 1\n"), "{text}");
        shutdown.cancel();
        drop(script);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), task).await;
    }

    #[test]
    fn renders_models_leases_and_the_mode() {
        let mut status = status();
        let model: crate::status::ModelStatus = serde_json::from_value(serde_json::json!({
            "id": "clip", "backend": "external", "state": "ready", "device": 0, "vram_mib": 1000,
            "in_use": 2, "pinned": false, "priority": 80, "last_used": null, "placement": "cpu"
        }))
        .unwrap();
        status.models = vec![model];
        status.mode = Some("recording".into());
        let text = render(&status);
        assert!(
            text.contains(
                "vramgate_model_state{model=\"clip\",backend=\"external\",state=\"ready\",placement=\"cpu\"} 1\n"
            ),
            "{text}"
        );
        assert!(text.contains("vramgate_model_vram_bytes{model=\"clip\"} 1048576000\n"));
        assert!(text.contains("vramgate_model_in_use{model=\"clip\"} 2\n"));
        assert!(text.contains("vramgate_leases 0\n"));
        assert!(text.contains("vramgate_mode{mode=\"recording\"} 1\n"));
    }
}
