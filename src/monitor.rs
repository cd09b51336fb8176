//! The monitor: samples the probe on a timer, computes levels, publishes the latest view of the
//! devices and the events that describe changes.
//!
//! It owns the probe. Readers get the view through a `watch` channel (always the latest, never a
//! queue); what changed is decided by the pure [`ChangeTracker`], so the event rules are tested
//! without a runtime. A sample runs on the blocking pool because NVML calls and file reads block;
//! a sample that hangs (a wedged driver) is reported as a failure and never stops shutdown.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{GpuConfig, SAMPLE_INTERVAL_MAX, SAMPLE_INTERVAL_MIN};
use crate::events::{EventBus, EventKind};
use crate::gpu::{DeviceSnapshot, GpuPids, Level, Probe, ProbeError, ProbeKind, Thresholds};
use crate::status::{DeviceStatus, ProcessStatus};

/// What the monitor knows now.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuView {
    /// The probe in use.
    pub probe: ProbeKind,
    /// The latest readings, with levels. After a failed sample these are the last good ones.
    pub devices: Vec<DeviceStatus>,
    /// Why the GPU side is degraded: the probe choice, and a failing probe while it fails.
    pub degraded_reasons: Vec<String>,
    /// When `devices` was read.
    pub sampled_at: Option<DateTime<Utc>>,
}

/// The settings the monitor reads from `[gpu]`.
#[derive(Debug, Clone, Copy)]
pub struct MonitorSettings {
    /// Level boundaries.
    pub thresholds: Thresholds,
    /// Kept free on every device.
    pub reserve_mib: u64,
    /// Time between samples.
    pub interval: Duration,
    /// Minimum movement for a `vram_changed` event.
    pub change_threshold_mib: u64,
}

impl MonitorSettings {
    /// From the `[gpu]` section.
    pub fn from_config(gpu: &GpuConfig) -> MonitorSettings {
        MonitorSettings {
            thresholds: gpu.thresholds(),
            reserve_mib: gpu.reserve_mib.0,
            interval: gpu.sample_interval.get(),
            change_threshold_mib: gpu.change_threshold_mib.0,
        }
    }

    /// How long one sample may take before it counts as failed: generous, since a slow sample is
    /// not a broken one, but bounded so a wedged driver shows up in status.
    fn sample_deadline(&self) -> Duration {
        self.interval.saturating_mul(4).max(Duration::from_secs(2))
    }

    /// The interval the timer runs at: `interval` within the bounds validation enforces (a zero
    /// period would spin, and tokio's timer adds the period to the clock unchecked), whoever
    /// built these settings.
    fn timer_period(&self) -> Duration {
        self.interval.clamp(SAMPLE_INTERVAL_MIN, SAMPLE_INTERVAL_MAX)
    }
}

/// Turns a probe's snapshot into the status entry: usable memory and level.
pub fn device_status(snapshot: DeviceSnapshot, probe: ProbeKind, settings: &MonitorSettings) -> DeviceStatus {
    DeviceStatus {
        index: snapshot.index,
        level: settings.thresholds.level(snapshot.used_mib, snapshot.total_mib),
        usable_mib: snapshot.total_mib.saturating_sub(settings.reserve_mib),
        name: snapshot.name,
        probe,
        total_mib: snapshot.total_mib,
        used_mib: snapshot.used_mib,
        free_mib: snapshot.free_mib,
        utilization_pct: snapshot.utilization_pct,
        temperature_c: snapshot.temperature_c,
        processes: snapshot
            .processes
            .into_iter()
            .map(|p| ProcessStatus { pid: p.pid, used_mib: p.used_mib, name: p.name, model: None })
            .collect(),
        processes_unavailable: snapshot.processes_unavailable,
        named_consumers: snapshot.named,
        warnings: snapshot.warnings,
        error: snapshot.failed,
    }
}

/// The status entry of a device whose reading failed: its last good figures (if it ever had
/// any), marked with the failure.
fn failed_device_status(
    snapshot: DeviceSnapshot,
    previous: Option<&DeviceStatus>,
    probe: ProbeKind,
    settings: &MonitorSettings,
) -> DeviceStatus {
    match previous {
        Some(previous) => DeviceStatus { error: snapshot.failed, ..previous.clone() },
        None => device_status(snapshot, probe, settings),
    }
}

/// The degraded reason for a device that failed its reading.
fn device_failure_reason(device: &DeviceStatus) -> Option<String> {
    let error = device.error.as_ref()?;
    Some(format!(
        "GPU {} ({}) failing: {error} (showing its last good readings; it admits nothing until it answers)",
        device.index, device.name
    ))
}

/// Remembers, per device, the level and the used memory last reported, and says which events a
/// new reading causes. The first reading of a device is the baseline and causes none.
#[derive(Debug, Default)]
pub struct ChangeTracker {
    /// Indexed by device index: (level, used_mib at the last `vram_changed` or baseline).
    last: Vec<Option<(Level, u64)>>,
    /// Consecutive failed samples, for `probe_recovered`.
    failures: u64,
    /// Consecutive failed readings of single devices (the others read), by device index.
    device_failures: std::collections::BTreeMap<u32, u64>,
}

impl ChangeTracker {
    /// Events for a successful reading.
    pub fn observe(&mut self, devices: &[DeviceStatus], change_threshold_mib: u64) -> Vec<EventKind> {
        let mut events = Vec::new();
        for device in devices {
            // A device that failed shows stale figures: no level or movement from them. It is
            // reported failed once per run of failures, and recovered when it answers again.
            let failures = self.device_failures.entry(device.index).or_default();
            if let Some(error) = &device.error {
                *failures = failures.saturating_add(1);
                if *failures == 1 {
                    events.push(EventKind::ProbeFailed {
                        probe: device.probe.as_str().into(),
                        error: format!("GPU {}: {error}", device.index),
                    });
                }
                continue;
            }
            let failed_samples = std::mem::take(failures);
            if failed_samples > 0 {
                events.push(EventKind::ProbeRecovered { probe: device.probe.as_str().into(), failed_samples });
            }
            let slot = device.index as usize;
            if self.last.len() <= slot {
                self.last.resize(slot + 1, None);
            }
            let Some((level, reported_used)) = self.last[slot] else {
                self.last[slot] = Some((device.level, device.used_mib));
                continue;
            };
            let mut next = (level, reported_used);
            if device.level != level {
                events.push(EventKind::LevelChanged {
                    device: device.index,
                    from: level,
                    to: device.level,
                    used_mib: device.used_mib,
                    total_mib: device.total_mib,
                });
                next.0 = device.level;
            }
            if change_threshold_mib > 0 && device.used_mib.abs_diff(reported_used) >= change_threshold_mib {
                events.push(EventKind::VramChanged {
                    device: device.index,
                    used_mib: device.used_mib,
                    previous_mib: reported_used,
                    free_mib: device.free_mib,
                });
                next.1 = device.used_mib;
            }
            self.last[slot] = Some(next);
        }
        events
    }

    /// Events for a failed reading: `probe_failed` only on the first failure of a run.
    pub fn failed(&mut self, probe: ProbeKind, error: &ProbeError) -> Vec<EventKind> {
        self.failures = self.failures.saturating_add(1);
        if self.failures == 1 {
            vec![EventKind::ProbeFailed { probe: probe.as_str().into(), error: error.0.clone() }]
        } else {
            Vec::new()
        }
    }

    /// Events for the first good reading after failures.
    pub fn succeeded(&mut self, probe: ProbeKind) -> Vec<EventKind> {
        let failed_samples = std::mem::take(&mut self.failures);
        if failed_samples > 0 {
            vec![EventKind::ProbeRecovered { probe: probe.as_str().into(), failed_samples }]
        } else {
            Vec::new()
        }
    }
}

/// Shared access to the probe for an immediate reading, off the timer: the arbiter watches a
/// release at millisecond resolution instead of waiting for the next tick.
#[derive(Clone)]
pub struct Sampler {
    probe: Arc<Mutex<Box<dyn Probe>>>,
    refresh: Arc<tokio::sync::Notify>,
}

impl Sampler {
    fn spawn(&self) -> JoinHandle<Result<Vec<DeviceSnapshot>, ProbeError>> {
        let probe = self.probe.clone();
        tokio::task::spawn_blocking(move || match probe.lock() {
            Ok(mut probe) => probe.sample(),
            Err(_) => Err(ProbeError("probe poisoned by an earlier panic".into())),
        })
    }

    /// Asks the monitor for a reading now rather than at the next tick (after a model became
    /// ready or was released, so that status shows it at once).
    pub fn refresh(&self) {
        self.refresh.notify_one();
    }

    /// One reading now, on the blocking pool.
    pub async fn sample(&self) -> Result<Vec<DeviceSnapshot>, ProbeError> {
        self.spawn().await.unwrap_or_else(|e| Err(ProbeError(format!("sample panicked: {e}"))))
    }

    /// The pids using GPU memory now, and the devices whose list cannot be read (the probe's
    /// cheapest call for it), on the blocking pool.
    pub async fn gpu_pids(&self) -> Result<GpuPids, ProbeError> {
        let probe = self.probe.clone();
        tokio::task::spawn_blocking(move || match probe.lock() {
            Ok(mut probe) => probe.gpu_pids(),
            Err(_) => Err(ProbeError("probe poisoned by an earlier panic".into())),
        })
        .await
        .unwrap_or_else(|e| Err(ProbeError(format!("process list panicked: {e}"))))
    }
}

/// The running monitor.
pub struct Monitor {
    sampler: Sampler,
    kind: ProbeKind,
    settings: MonitorSettings,
    base_reasons: Vec<String>,
    tracker: ChangeTracker,
    view: watch::Sender<Arc<GpuView>>,
    bus: EventBus,
}

impl Monitor {
    /// Takes the first sample (so status is meaningful from the first request), then returns the
    /// view's receiver; [`Monitor::run`] keeps it current.
    pub async fn start(
        probe: Box<dyn Probe>,
        base_reasons: Vec<String>,
        settings: MonitorSettings,
        bus: EventBus,
    ) -> (Monitor, watch::Receiver<Arc<GpuView>>) {
        let kind = probe.kind();
        let initial =
            GpuView { probe: kind, devices: Vec::new(), degraded_reasons: base_reasons.clone(), sampled_at: None };
        let (view, receiver) = watch::channel(Arc::new(initial));
        let mut monitor = Monitor {
            sampler: Sampler { probe: Arc::new(Mutex::new(probe)), refresh: Arc::new(tokio::sync::Notify::new()) },
            kind,
            settings,
            base_reasons,
            tracker: ChangeTracker::default(),
            view,
            bus,
        };
        // A wedged driver must not hold start-up (and SIGTERM) hostage: after twice the sample
        // deadline the daemon starts anyway, degraded, and the timer keeps trying.
        let give_up = CancellationToken::new();
        let timer = {
            let give_up = give_up.clone();
            let limit = settings.sample_deadline().saturating_mul(2);
            tokio::spawn(async move {
                tokio::time::sleep(limit).await;
                give_up.cancel();
            })
        };
        monitor.sample_once(&give_up).await;
        timer.abort();
        (monitor, receiver)
    }

    /// A handle for immediate readings.
    pub fn sampler(&self) -> Sampler {
        self.sampler.clone()
    }

    /// Samples every interval until `shutdown` is cancelled.
    pub fn run(mut self, shutdown: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(self.settings.timer_period());
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick fires at once; `start` already sampled.
            ticker.tick().await;
            let refresh = self.sampler.refresh.clone();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = ticker.tick() => {}
                    _ = refresh.notified() => ticker.reset(),
                }
                if !self.sample_once(&shutdown).await {
                    return;
                }
            }
        })
    }

    /// One sample: read, compare, publish. Returns false if shutdown interrupted it.
    async fn sample_once(&mut self, shutdown: &CancellationToken) -> bool {
        let mut task = self.sampler.spawn();
        let deadline = self.settings.sample_deadline();
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return false,
            joined = &mut task => joined,
            _ = tokio::time::sleep(deadline) => {
                let late = ProbeError(format!("sample did not finish within {}", crate::units::Rounded(deadline)));
                self.record_failure(&late);
                tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    joined = &mut task => joined,
                }
            }
        };
        let result = outcome.unwrap_or_else(|e| Err(ProbeError(format!("sample panicked: {e}"))));
        match result {
            Ok(snapshots) => self.record_success(snapshots),
            Err(e) => self.record_failure(&e),
        }
        true
    }

    fn record_success(&mut self, snapshots: Vec<DeviceSnapshot>) {
        let previous = self.view.borrow().clone();
        let devices: Vec<DeviceStatus> = snapshots
            .into_iter()
            .map(|s| match s.failed {
                Some(_) => {
                    let before = previous.devices.iter().find(|d| d.index == s.index);
                    failed_device_status(s, before, self.kind, &self.settings)
                }
                None => device_status(s, self.kind, &self.settings),
            })
            .collect();
        let mut events = self.tracker.succeeded(self.kind);
        events.extend(self.tracker.observe(&devices, self.settings.change_threshold_mib));
        let mut degraded_reasons = self.base_reasons.clone();
        degraded_reasons.extend(devices.iter().filter_map(device_failure_reason));
        self.view.send_replace(Arc::new(GpuView {
            probe: self.kind,
            devices,
            degraded_reasons,
            sampled_at: Some(Utc::now()),
        }));
        for event in events {
            self.bus.publish(event);
        }
    }

    fn record_failure(&mut self, error: &ProbeError) {
        tracing::warn!(probe = self.kind.as_str(), %error, "GPU sample failed");
        let events = self.tracker.failed(self.kind, error);
        let reason = format!("probe {} failing: {error} (showing the last good readings)", self.kind.as_str());
        self.view.send_modify(|view| {
            let mut next = (**view).clone();
            next.degraded_reasons = self.base_reasons.clone();
            next.degraded_reasons.push(reason);
            *view = Arc::new(next);
        });
        for event in events {
            self.bus.publish(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::ProcessUsage;

    fn settings() -> MonitorSettings {
        MonitorSettings {
            thresholds: Thresholds::default(),
            reserve_mib: 100,
            interval: Duration::from_millis(10),
            change_threshold_mib: 100,
        }
    }

    fn device(index: u32, used: u64) -> DeviceStatus {
        let snapshot = DeviceSnapshot {
            index,
            name: "d".into(),
            total_mib: 1000,
            used_mib: used,
            free_mib: 1000 - used,
            ..DeviceSnapshot::default()
        };
        device_status(snapshot, ProbeKind::Sim, &settings())
    }

    fn names(events: &[EventKind]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                EventKind::LevelChanged { from, to, .. } => format!("level {from}->{to}"),
                EventKind::VramChanged { previous_mib, used_mib, .. } => format!("vram {previous_mib}->{used_mib}"),
                other => other.name().to_string(),
            })
            .collect()
    }

    #[test]
    fn status_entry_has_usable_and_level() {
        let d = device(0, 900);
        assert_eq!(d.usable_mib, 900);
        assert_eq!(d.level, Level::Critical);
        let with_process = device_status(
            DeviceSnapshot {
                total_mib: 50,
                processes: vec![ProcessUsage { pid: 1, used_mib: Some(5), name: "x".into() }],
                ..DeviceSnapshot::default()
            },
            ProbeKind::Sim,
            &settings(),
        );
        assert_eq!(with_process.usable_mib, 0, "reserve larger than the device leaves nothing");
        assert_eq!(with_process.processes[0].model, None);
    }

    #[test]
    fn first_reading_is_a_silent_baseline() {
        let mut tracker = ChangeTracker::default();
        assert!(tracker.observe(&[device(0, 960)], 100).is_empty());
    }

    #[test]
    fn crossing_every_boundary_reports_each_level_in_order() {
        let mut tracker = ChangeTracker::default();
        tracker.observe(&[device(0, 0)], 100);
        let mut all = Vec::new();
        for used in [760, 880, 960, 100] {
            all.extend(tracker.observe(&[device(0, used)], 100));
        }
        assert_eq!(
            names(&all),
            vec![
                "level ok->warning",
                "vram 0->760",
                "level warning->critical",
                "vram 760->880",
                "level critical->emergency",
                "level emergency->ok",
                "vram 880->100",
            ]
        );
    }

    #[test]
    fn small_moves_accumulate_until_the_threshold() {
        let mut tracker = ChangeTracker::default();
        tracker.observe(&[device(0, 0)], 100);
        assert!(tracker.observe(&[device(0, 60)], 100).is_empty());
        assert_eq!(names(&tracker.observe(&[device(0, 100)], 100)), vec!["vram 0->100"]);
        assert!(tracker.observe(&[device(0, 199)], 100).is_empty());
        assert!(tracker.observe(&[device(0, 1)], 100).is_empty());
        assert_eq!(names(&tracker.observe(&[device(0, 0)], 100)), vec!["vram 100->0"]);
    }

    #[test]
    fn a_zero_threshold_disables_vram_changed() {
        let mut tracker = ChangeTracker::default();
        tracker.observe(&[device(0, 0)], 0);
        assert!(tracker.observe(&[device(0, 500)], 0).is_empty());
    }

    #[test]
    fn devices_are_tracked_separately() {
        let mut tracker = ChangeTracker::default();
        tracker.observe(&[device(0, 0), device(1, 0)], 100);
        let events = tracker.observe(&[device(0, 0), device(1, 800)], 100);
        assert!(events.iter().all(|e| matches!(
            e,
            EventKind::LevelChanged { device: 1, .. } | EventKind::VramChanged { device: 1, .. }
        )));
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn failure_is_reported_once_and_recovery_counts_the_failures() {
        let mut tracker = ChangeTracker::default();
        let err = ProbeError("gone".into());
        assert_eq!(names(&tracker.failed(ProbeKind::Nvml, &err)), vec!["probe_failed"]);
        assert!(tracker.failed(ProbeKind::Nvml, &err).is_empty());
        let recovered = tracker.succeeded(ProbeKind::Nvml);
        assert_eq!(recovered, vec![EventKind::ProbeRecovered { probe: "nvml".into(), failed_samples: 2 }]);
        assert!(tracker.succeeded(ProbeKind::Nvml).is_empty());
    }

    /// A probe with a cheap process list: what a release polls.
    struct CountingProbe {
        samples: Arc<std::sync::atomic::AtomicU32>,
    }

    impl Probe for CountingProbe {
        fn kind(&self) -> ProbeKind {
            ProbeKind::Sim
        }
        fn sample(&mut self) -> Result<Vec<DeviceSnapshot>, ProbeError> {
            self.samples.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(Vec::new())
        }
        fn gpu_pids(&mut self) -> Result<GpuPids, ProbeError> {
            Ok(GpuPids { pids: [7, 9].into(), unreadable: Default::default() })
        }
    }

    /// A release polls the process list every few milliseconds: the probe's own cheap call, never
    /// a whole sample (on NVML: memory, utilization, temperature and names of every device).
    #[tokio::test]
    async fn the_process_list_is_the_probes_cheap_call_not_a_sample() {
        let samples = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let probe: Box<dyn Probe> = Box::new(CountingProbe { samples: samples.clone() });
        let sampler = Sampler { probe: Arc::new(Mutex::new(probe)), refresh: Arc::new(tokio::sync::Notify::new()) };
        for _ in 0..3 {
            assert_eq!(sampler.gpu_pids().await.expect("a list").pids, [7, 9].into());
        }
        assert_eq!(samples.load(std::sync::atomic::Ordering::SeqCst), 0, "no sample taken");
        // A probe without a cheaper call answers from a sample.
        let (script, answers) = std::sync::mpsc::channel();
        let mut with_process = snapshot(100);
        with_process[0].processes.push(ProcessUsage { pid: 42, used_mib: Some(100), name: "p".into() });
        script.send(Ok(with_process)).expect("scripted");
        let probe: Box<dyn Probe> = Box::new(Scripted(answers));
        let sampler = Sampler { probe: Arc::new(Mutex::new(probe)), refresh: Arc::new(tokio::sync::Notify::new()) };
        assert_eq!(sampler.gpu_pids().await.expect("a list").pids, [42].into());
    }

    /// A probe whose answers a test scripts.
    struct Scripted(std::sync::mpsc::Receiver<Result<Vec<DeviceSnapshot>, ProbeError>>);

    impl Probe for Scripted {
        fn kind(&self) -> ProbeKind {
            ProbeKind::Sim
        }
        fn sample(&mut self) -> Result<Vec<DeviceSnapshot>, ProbeError> {
            self.0.recv().unwrap_or_else(|_| Err(ProbeError("script ended".into())))
        }
    }

    fn snapshot(used: u64) -> Vec<DeviceSnapshot> {
        vec![DeviceSnapshot {
            index: 0,
            name: "d".into(),
            total_mib: 1000,
            used_mib: used,
            free_mib: 1000 - used,
            ..DeviceSnapshot::default()
        }]
    }

    #[tokio::test]
    async fn a_first_sample_that_hangs_does_not_hold_start_up() {
        let (script, answers) = std::sync::mpsc::channel::<Result<Vec<DeviceSnapshot>, ProbeError>>();
        let bus = EventBus::new();
        let started = Monitor::start(Box::new(Scripted(answers)), vec![], settings(), bus);
        // The deadline is max(4 × interval, 2 s); start-up gives up after twice that.
        let (_monitor, view) = tokio::time::timeout(Duration::from_secs(10), started).await.expect("start-up returns");
        assert!(view.borrow().degraded_reasons.iter().any(|r| r.contains("did not finish")), "{:?}", view.borrow());
        drop(script);
    }

    #[tokio::test]
    async fn a_failing_sample_degrades_keeps_readings_and_recovers() {
        let (script, answers) = std::sync::mpsc::channel();
        script.send(Ok(snapshot(100))).unwrap();
        let bus = EventBus::new();
        let mut events = bus.subscribe();
        let (monitor, mut view) = Monitor::start(Box::new(Scripted(answers)), vec![], settings(), bus).await;
        assert_eq!(view.borrow().devices[0].used_mib, 100);
        assert!(view.borrow().degraded_reasons.is_empty());

        let shutdown = CancellationToken::new();
        let task = monitor.run(shutdown.clone());
        script.send(Err(ProbeError("driver went away".into()))).unwrap();
        let event = events.recv().await.unwrap();
        assert_eq!(event.kind.name(), "probe_failed");
        view.wait_for(|v| !v.degraded_reasons.is_empty()).await.unwrap();
        assert!(view.borrow().degraded_reasons[0].contains("driver went away"));
        assert_eq!(view.borrow().devices[0].used_mib, 100, "last good readings stay");

        script.send(Ok(snapshot(950))).unwrap();
        let recovered = events.recv().await.unwrap();
        assert_eq!(recovered.kind.name(), "probe_recovered");
        let level = events.recv().await.unwrap();
        assert!(matches!(level.kind, EventKind::LevelChanged { to: Level::Emergency, .. }));
        view.wait_for(|v| v.degraded_reasons.is_empty()).await.unwrap();

        shutdown.cancel();
        // The probe is now blocked waiting on the script; shutdown must not wait for it.
        tokio::time::timeout(Duration::from_secs(2), task).await.expect("monitor stops promptly").unwrap();
    }

    /// One device failing while the other is read: the good one's readings move on, the failed
    /// one keeps its last good figures with the error, is named in `degraded_reasons`, is reported
    /// failed once and recovered when it answers again.
    #[tokio::test]
    async fn a_failing_device_degrades_alone_and_recovers() {
        let two = |used0: u64, failed1: Option<&str>| {
            let mut devices = snapshot(used0);
            devices.push(match failed1 {
                Some(reason) => DeviceSnapshot::failed(1, "d1", reason),
                None => DeviceSnapshot {
                    index: 1,
                    name: "d1".into(),
                    total_mib: 1000,
                    used_mib: 200,
                    free_mib: 800,
                    ..DeviceSnapshot::default()
                },
            });
            devices
        };
        let (script, answers) = std::sync::mpsc::channel();
        script.send(Ok(two(100, None))).unwrap();
        let bus = EventBus::new();
        let mut events = bus.subscribe();
        let (monitor, mut view) = Monitor::start(Box::new(Scripted(answers)), vec![], settings(), bus).await;
        let shutdown = CancellationToken::new();
        let task = monitor.run(shutdown.clone());

        script.send(Ok(two(500, Some("GPU is lost")))).unwrap();
        script.send(Ok(two(600, Some("GPU is lost")))).unwrap();
        view.wait_for(|v| v.devices[0].used_mib == 600).await.unwrap();
        {
            let v = view.borrow();
            assert_eq!(v.devices[1].error.as_deref(), Some("GPU is lost"));
            assert_eq!(v.devices[1].used_mib, 200, "its last good reading stays");
            assert_eq!(v.degraded_reasons.len(), 1, "{:?}", v.degraded_reasons);
            assert!(v.degraded_reasons[0].starts_with("GPU 1 (d1) failing: GPU is lost"), "{:?}", v.degraded_reasons);
        }

        script.send(Ok(two(600, None))).unwrap();
        view.wait_for(|v| v.degraded_reasons.is_empty()).await.unwrap();
        assert!(view.borrow().devices[1].error.is_none());
        // Events are published just after the view: wait for the recovery itself.
        let recovered = EventKind::ProbeRecovered { probe: "sim".into(), failed_samples: 2 };
        let mut names = Vec::new();
        while !names.contains(&recovered) {
            let event = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
            names.push(event.expect("the recovery is reported").expect("the bus").kind.clone());
        }
        let failures: Vec<&EventKind> = names.iter().filter(|e| e.name() == "probe_failed").collect();
        let failed = EventKind::ProbeFailed { probe: "sim".into(), error: "GPU 1: GPU is lost".into() };
        assert_eq!(failures, [&failed], "failed once per run");
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(2), task).await.expect("monitor stops").unwrap();
    }

    /// Settings nobody validated (zero, or a period the clock cannot add) run at the bounded
    /// period instead of panicking: at start, on the timer, and on an immediate refresh.
    #[tokio::test]
    async fn unvalidated_intervals_neither_spin_nor_overflow() {
        for interval in [Duration::ZERO, Duration::MAX] {
            let (script, answers) = std::sync::mpsc::channel();
            script.send(Ok(snapshot(100))).unwrap();
            let settings = MonitorSettings { interval, ..settings() };
            let (monitor, mut view) =
                Monitor::start(Box::new(Scripted(answers)), vec![], settings, EventBus::new()).await;
            let sampler = monitor.sampler();
            let shutdown = CancellationToken::new();
            let task = monitor.run(shutdown.clone());
            script.send(Ok(snapshot(300))).unwrap();
            sampler.refresh();
            let sampled = tokio::time::timeout(Duration::from_secs(5), view.wait_for(|v| v.devices[0].used_mib == 300));
            sampled.await.expect("a refresh samples at once").unwrap();
            shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(2), task).await.expect("monitor stops").expect("no panic");
        }
    }
}
