//! The monitor: samples the probe on a timer, computes levels, publishes the latest view of the
//! devices and the events that describe changes.
//!
//! It owns the probe. Readers get the view through a `watch` channel (always the latest, never a
//! queue); what changed is decided by the pure [`ChangeTracker`], so the event rules are tested
//! without a runtime. A sample runs on the blocking pool because NVML calls and file reads block;
//! a sample that hangs (a wedged driver) is reported as a failure and never stops shutdown.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// When the sample that read `devices` started, on the monotonic clock (`None` before the
    /// first reading): with `stale_after`, how the arbiter tells readings it may no longer admit
    /// on (a probe that hangs or answers late).
    pub read_at: Option<Instant>,
    /// How old a reading may get before it is stale: one sample interval plus the time a sample
    /// may take ([`MonitorSettings::stale_after`]). A stale reading admits nothing.
    pub stale_after: Duration,
}

impl GpuView {
    /// How old the readings are at `now` if they are stale (older than `stale_after`), else
    /// `None` (fresh, or no devices to read).
    pub fn stale_for(&self, now: Instant) -> Option<Duration> {
        let age = now.saturating_duration_since(self.read_at?);
        (age >= self.stale_after && !self.devices.is_empty()).then_some(age)
    }

    /// When the readings become stale, if they are fresh at `now` (the arbiter wakes then to say
    /// so and to stop admitting on them).
    pub fn stale_at(&self, now: Instant) -> Option<Instant> {
        let at = self.read_at?.checked_add(self.stale_after)?;
        (at > now && !self.devices.is_empty()).then_some(at)
    }
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

    /// How old a reading may get before nothing is admitted on it: the next sample is due one
    /// interval after it started and may take up to [`sample_deadline`](Self::sample_deadline);
    /// a reading older than both is one the probe failed to renew (it hangs or answers late).
    /// With the default 1 s interval: 5 s; at most 4 × the interval + the interval, at least
    /// 2 s + the interval.
    pub fn stale_after(&self) -> Duration {
        self.timer_period().saturating_add(self.sample_deadline())
    }

    /// The interval the timer runs at: `interval` within the bounds validation enforces (a zero
    /// period would spin, and tokio's timer adds the period to the clock unchecked), whoever
    /// built these settings.
    fn timer_period(&self) -> Duration {
        self.interval.clamp(SAMPLE_INTERVAL_MIN, SAMPLE_INTERVAL_MAX)
    }
}

/// The warnings about a device's processes without a memory figure (NVML's "not available"): one
/// per pid, in pid order, however many times the pid is listed. `model_of` gives the model a pid
/// is attributed to and the size it is counted at; a pid of no model is within the device's
/// foreign use. Status adds these to the device's `warnings` (the probes do not write their own,
/// so nothing is said twice).
pub fn figureless_warnings(
    processes: &[ProcessStatus],
    model_of: impl Fn(u32) -> Option<(String, u64)>,
) -> Vec<String> {
    let pids: std::collections::BTreeSet<u32> =
        processes.iter().filter(|p| p.used_mib.is_none()).map(|p| p.pid).collect();
    pids.into_iter()
        .map(|pid| match model_of(pid) {
            Some((model, size)) => format!(
                "pid {pid} of model {model}: no memory figure from the driver; the model is counted at its size \
                 ({size} MiB) and its footprint is not measured"
            ),
            None => format!(
                "pid {pid}: no memory figure from the driver; its memory is counted within the device's foreign \
                 use"
            ),
        })
        .collect()
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
    /// How many [`FastSampling`] guards are alive: while any is, the timer samples every
    /// [`FAST_SAMPLE_PERIOD`].
    fast: Arc<std::sync::atomic::AtomicUsize>,
}

/// The sampling period while something measures peaks (`vramgate plan --measure`).
pub const FAST_SAMPLE_PERIOD: Duration = Duration::from_millis(20);

/// Keeps the monitor sampling every [`FAST_SAMPLE_PERIOD`] while it lives.
pub struct FastSampling(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for FastSampling {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Sampler {
    fn spawn(&self) -> JoinHandle<Result<Vec<DeviceSnapshot>, ProbeError>> {
        let probe = self.probe.clone();
        tokio::task::spawn_blocking(move || match probe.lock() {
            Ok(mut probe) => probe.sample(),
            Err(_) => Err(ProbeError("probe poisoned by an earlier panic".into())),
        })
    }

    /// Samples every [`FAST_SAMPLE_PERIOD`] (or the configured interval, if shorter) until the
    /// guard is dropped, so that a short peak is seen.
    pub fn fast(&self) -> FastSampling {
        self.fast.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.refresh.notify_one();
        FastSampling(self.fast.clone())
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
        let initial = GpuView {
            probe: kind,
            devices: Vec::new(),
            degraded_reasons: base_reasons.clone(),
            sampled_at: None,
            read_at: None,
            stale_after: settings.stale_after(),
        };
        let (view, receiver) = watch::channel(Arc::new(initial));
        let mut monitor = Monitor {
            sampler: Sampler {
                probe: Arc::new(Mutex::new(probe)),
                refresh: Arc::new(tokio::sync::Notify::new()),
                fast: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            },
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
            let fast = self.sampler.fast.clone();
            loop {
                let fast_on = fast.load(std::sync::atomic::Ordering::SeqCst) > 0;
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = ticker.tick() => {}
                    _ = refresh.notified() => ticker.reset(),
                    () = tokio::time::sleep(FAST_SAMPLE_PERIOD), if fast_on => {}
                }
                if !self.sample_once(&shutdown).await {
                    return;
                }
            }
        })
    }

    /// One sample: read, compare, publish. Returns false if shutdown interrupted it.
    async fn sample_once(&mut self, shutdown: &CancellationToken) -> bool {
        let started = Instant::now();
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
            Ok(snapshots) => self.record_success(snapshots, started),
            Err(e) => self.record_failure(&e),
        }
        true
    }

    /// Publishes a reading taken by the sample that started at `started`.
    fn record_success(&mut self, snapshots: Vec<DeviceSnapshot>, started: Instant) {
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
            read_at: Some(started),
            stale_after: self.settings.stale_after(),
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
mod tests;
