//! The monitor's tests: levels and events from readings (`ChangeTracker`), the view's age, the
//! warnings about processes without a figure, and the sampling task on a scripted probe.

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

/// One warning per pid without a figure, in pid order, naming its model where it has one,
/// however often the pid is listed.
#[test]
fn a_figureless_pid_is_warned_about_once() {
    let process = |pid, used_mib| ProcessStatus { pid, used_mib, name: "p".into(), model: None };
    let listed = [process(9, None), process(3, Some(10)), process(5, None), process(9, None), process(5, None)];
    let warnings = figureless_warnings(&listed, |pid| (pid == 9).then(|| ("llm".to_string(), 6000)));
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].starts_with("pid 5: no memory figure") && warnings[0].contains("foreign"), "{warnings:?}");
    assert!(warnings[1].starts_with("pid 9 of model llm: no memory figure"), "{warnings:?}");
    assert!(warnings[1].contains("(6000 MiB)"), "{warnings:?}");
    assert!(figureless_warnings(&[process(3, Some(10))], |_| None).is_empty());
}

/// A reading is stale one interval plus the sample deadline after its sample started.
#[test]
fn a_reading_goes_stale_after_an_interval_and_a_sample_deadline() {
    let view = |read_at| GpuView {
        probe: ProbeKind::Sim,
        devices: vec![device(0, 100)],
        degraded_reasons: vec![],
        sampled_at: None,
        read_at,
        stale_after: settings().stale_after(),
    };
    assert_eq!(settings().stale_after(), Duration::from_millis(2010), "10 ms + max(4 × 10 ms, 2 s)");
    let slow = MonitorSettings { interval: Duration::from_secs(1), ..settings() };
    assert_eq!(slow.stale_after(), Duration::from_secs(5), "the default interval: 1 s + 4 s");
    let t0 = Instant::now();
    let fresh = view(Some(t0));
    assert_eq!(fresh.stale_for(t0 + Duration::from_millis(2009)), None);
    assert_eq!(fresh.stale_at(t0), Some(t0 + Duration::from_millis(2010)));
    assert_eq!(fresh.stale_for(t0 + Duration::from_millis(2500)), Some(Duration::from_millis(2500)));
    assert_eq!(fresh.stale_at(t0 + Duration::from_millis(2500)), None, "already stale: no wake-up");
    assert_eq!(view(None).stale_for(t0 + Duration::from_secs(60)), None, "no reading yet");
    let nothing = GpuView { devices: vec![], ..view(Some(t0)) };
    assert_eq!(nothing.stale_for(t0 + Duration::from_secs(60)), None, "no device to admit on");
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
    assert!(
        events
            .iter()
            .all(|e| matches!(e, EventKind::LevelChanged { device: 1, .. } | EventKind::VramChanged { device: 1, .. }))
    );
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
    let sampler = Sampler {
        probe: Arc::new(Mutex::new(probe)),
        refresh: Arc::new(tokio::sync::Notify::new()),
        fast: Default::default(),
    };
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
    let sampler = Sampler {
        probe: Arc::new(Mutex::new(probe)),
        refresh: Arc::new(tokio::sync::Notify::new()),
        fast: Default::default(),
    };
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
        let (monitor, mut view) = Monitor::start(Box::new(Scripted(answers)), vec![], settings, EventBus::new()).await;
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

/// While a [`FastSampling`] guard lives the monitor samples every 20 ms whatever its interval
/// (a plan's measurement sees short peaks), and at its interval again once the guard is gone.
#[tokio::test]
async fn a_fast_sampling_guard_samples_every_20_ms_while_it_lives() {
    let samples = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let probe: Box<dyn Probe> = Box::new(CountingProbe { samples: samples.clone() });
    let settings = MonitorSettings { interval: Duration::from_secs(2), ..settings() };
    let (monitor, _view) = Monitor::start(probe, vec![], settings, crate::events::EventBus::new()).await;
    let sampler = monitor.sampler();
    let shutdown = CancellationToken::new();
    let task = monitor.run(shutdown.clone());
    let count = || samples.load(std::sync::atomic::Ordering::SeqCst);
    let fast = sampler.fast();
    let before = count();
    // At the 2 s interval not one more sample would come within 1.5 s; at 20 ms, ten do.
    let deadline = std::time::Instant::now() + Duration::from_millis(1500);
    while count() < before + 10 {
        assert!(std::time::Instant::now() < deadline, "only {} samples in 1.5 s while fast", count() - before);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(fast);
    // The sleep already running may end in one more sample; then the 2 s interval holds.
    tokio::time::sleep(Duration::from_millis(60)).await;
    let after = count();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(count() <= after + 1, "{} samples in 400 ms after the guard was dropped", count() - after);
    shutdown.cancel();
    task.await.expect("the monitor ends");
}
