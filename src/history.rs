//! The recent past of every device, for the dashboard's timeline and `GET /vramgate/history`: a
//! bounded in-memory ring of samples, one per monitor sample thinned to at most one per wall-clock
//! second, each saying per device how much is used and free and at which level, and per owner
//! (model, lease, foreign process, named consumer) how much it holds.
//!
//! The ring holds [`CAPACITY`] samples (just over an hour at one a second; longer with a slower
//! `sample_interval`). A sample of one device with half a dozen owners takes about 410 bytes
//! (see [`Sample::approx_bytes`]), so the whole ring stays near 1.6 MB; it never grows past
//! `CAPACITY` entries however long the daemon runs. Nothing is kept across restarts.
//!
//! The recorder is a task of its own that wakes on each new GPU view (the monitor's `watch`),
//! reads the arbiter's latest view beside it, and pushes one sample under a short synchronous
//! lock that is never held across an await; the engine knows nothing of it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::arbiter::{ArbiterHandle, ArbiterView};
use crate::gpu::Level;
use crate::monitor::GpuView;

/// How many samples the ring keeps: 65 minutes at one a second.
pub const CAPACITY: usize = 3900;

/// One moment of every device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// When the devices were read.
    pub time: DateTime<Utc>,
    /// Each device's totals.
    pub devices: Vec<DeviceSample>,
    /// Who held how much, per device.
    pub owners: Vec<OwnerSample>,
}

/// One device in a sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceSample {
    /// The device's index.
    pub index: u32,
    /// In use, by anyone.
    pub used_mib: u64,
    /// Not in use.
    pub free_mib: u64,
    /// Installed.
    pub total_mib: u64,
    /// Its level then.
    pub level: Level,
}

/// What kind of owner holds memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OwnerKind {
    /// A managed model (its processes' memory, or its counted size where the driver gives none).
    Model,
    /// A lease (memory reserved for its holder).
    Lease,
    /// A process vramgate does not manage, by process name.
    Foreign,
    /// A consumer without a pid (the sim device's named files).
    Consumer,
}

/// One owner's memory on one device in a sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OwnerSample {
    /// The device.
    pub device: u32,
    /// What it is.
    pub kind: OwnerKind,
    /// The model id, the lease holder, the process name, or the consumer name.
    pub id: String,
    /// What it held.
    pub mib: u64,
}

impl Sample {
    /// Builds a sample from the monitor's and the arbiter's views, as status combines them: a
    /// process belongs to a model when the arbiter attributes its pid; a loaded model on the GPU
    /// without any measured process (an Ollama or external model) is counted at its size; foreign
    /// processes are summed by name.
    pub fn from_views(gpu: &GpuView, arbiter: &ArbiterView, time: DateTime<Utc>) -> Sample {
        let mut devices = Vec::with_capacity(gpu.devices.len());
        // Keyed by (device, kind, id) so that owners come out in a stable order and
        // several processes of one model (or one name) add up.
        let mut owners: BTreeMap<(u32, OwnerKind, String), u64> = BTreeMap::new();
        for device in &gpu.devices {
            devices.push(DeviceSample {
                index: device.index,
                used_mib: device.used_mib,
                free_mib: device.free_mib,
                total_mib: device.total_mib,
                level: device.level,
            });
            for process in &device.processes {
                let owner = match arbiter.process_models.get(&process.pid) {
                    Some(model) => (device.index, OwnerKind::Model, model.clone()),
                    None => (device.index, OwnerKind::Foreign, process.name.clone()),
                };
                let mib = match (process.used_mib, &owner.1) {
                    (Some(mib), _) => mib,
                    // Counted at the model's size, as status does.
                    (None, OwnerKind::Model) => {
                        arbiter.models.iter().find(|m| m.id == owner.2).map_or(0, |m| m.vram_mib)
                    }
                    (None, _) => 0,
                };
                let entry = owners.entry(owner).or_insert(0);
                *entry = entry.saturating_add(mib);
            }
            for consumer in &device.named_consumers {
                let entry = owners.entry((device.index, OwnerKind::Consumer, consumer.name.clone())).or_insert(0);
                *entry = entry.saturating_add(consumer.used_mib);
            }
        }
        for model in &arbiter.models {
            let on_gpu = model.placement.as_deref() != Some("cpu");
            let holds = matches!(model.state.as_str(), "ready" | "unloading");
            if let (Some(device), true, true) = (model.device, on_gpu, holds) {
                owners.entry((device, OwnerKind::Model, model.id.clone())).or_insert(model.vram_mib);
            }
        }
        for lease in &arbiter.leases {
            let entry = owners.entry((lease.device, OwnerKind::Lease, lease.holder.clone())).or_insert(0);
            *entry = entry.saturating_add(lease.vram_mib);
        }
        let owners =
            owners.into_iter().map(|((device, kind, id), mib)| OwnerSample { device, kind, id, mib }).collect();
        Sample { time, devices, owners }
    }

    /// An estimate of the heap and inline bytes this sample holds in the ring (the documented
    /// memory bound is `CAPACITY` times this, for a typical sample).
    pub fn approx_bytes(&self) -> usize {
        let owners: usize = self.owners.iter().map(|o| std::mem::size_of::<OwnerSample>() + o.id.capacity()).sum();
        std::mem::size_of::<Sample>() + self.devices.capacity() * std::mem::size_of::<DeviceSample>() + owners
    }
}

/// The lines the dashboard draws on each device's bar: the level boundaries (`[gpu]
/// warning_pct`, `critical_pct`, `emergency_pct`) and the reserve (`[gpu] reserve_mib`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Start of `warning`, percent of total.
    pub warning_pct: f64,
    /// Start of `critical`, percent of total.
    pub critical_pct: f64,
    /// Start of `emergency`, percent of total.
    pub emergency_pct: f64,
    /// Kept free on every device.
    pub reserve_mib: u64,
}

impl Limits {
    /// From the monitor's settings.
    pub fn from_settings(settings: &crate::monitor::MonitorSettings) -> Limits {
        Limits {
            warning_pct: settings.thresholds.warning_pct,
            critical_pct: settings.thresholds.critical_pct,
            emergency_pct: settings.thresholds.emergency_pct,
            reserve_mib: settings.reserve_mib,
        }
    }
}

/// The ring. Cheap to share (`Arc`); every method takes its lock briefly and never awaits.
#[derive(Debug)]
pub struct History {
    capacity: usize,
    samples: Mutex<VecDeque<Sample>>,
    /// The monitor's sample interval, reported with the samples.
    interval_ms: u64,
    /// The thresholds and reserve, reported with the samples.
    limits: Limits,
}

impl History {
    /// An empty ring of [`CAPACITY`] samples, for a monitor with these settings.
    pub fn new(settings: &crate::monitor::MonitorSettings) -> History {
        History::with_capacity(CAPACITY, settings)
    }

    /// An empty ring of `capacity` samples (at least one).
    pub fn with_capacity(capacity: usize, settings: &crate::monitor::MonitorSettings) -> History {
        let capacity = capacity.max(1);
        History {
            capacity,
            samples: Mutex::new(VecDeque::with_capacity(capacity)),
            interval_ms: u64::try_from(settings.interval.as_millis()).unwrap_or(u64::MAX),
            limits: Limits::from_settings(settings),
        }
    }

    /// Adds a sample. A sample in the same wall-clock second as the newest replaces it (the
    /// thinning: at most one a second, and always the latest figures); beyond the capacity the
    /// oldest sample goes.
    pub fn push(&self, sample: Sample) {
        let mut samples = self.lock();
        let same_second = samples.back().is_some_and(|newest| same_second(newest.time, sample.time));
        if same_second {
            samples.pop_back();
        }
        if samples.len() >= self.capacity {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// The samples taken at or after `since` (all of them for `None`), oldest first.
    pub fn since(&self, since: Option<DateTime<Utc>>) -> Vec<Sample> {
        let samples = self.lock();
        let start = since.map_or(0, |since| samples.partition_point(|s| s.time < since));
        samples.range(start..).cloned().collect()
    }

    /// How many samples it holds.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether it holds none yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most samples it keeps.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The monitor's sample interval in milliseconds.
    pub fn interval_ms(&self) -> u64 {
        self.interval_ms
    }

    /// The thresholds and reserve.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Sample>> {
        // A panic while holding the lock cannot leave the ring half-written (each push is a
        // couple of deque operations): keep using it.
        self.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Whether two times fall in the same wall-clock second.
fn same_second(a: DateTime<Utc>, b: DateTime<Utc>) -> bool {
    a.timestamp() == b.timestamp()
}

/// Records a sample for each new GPU view until `shutdown`. Run as a task of its own.
pub async fn record(
    history: Arc<History>,
    mut gpu: watch::Receiver<Arc<GpuView>>,
    arbiter: ArbiterHandle,
    shutdown: CancellationToken,
) {
    loop {
        let view = gpu.borrow_and_update().clone();
        // No reading yet (the first sample is still running): nothing to record.
        if let Some(time) = view.sampled_at {
            history.push(Sample::from_views(&view, &arbiter.view(), time));
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = gpu.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::ProbeKind;
    use crate::status::{DeviceStatus, LeaseStatus, ModelStatus, ProcessStatus};

    fn settings() -> crate::monitor::MonitorSettings {
        crate::monitor::MonitorSettings::from_config(&crate::config::GpuConfig::default())
    }

    fn at(secs: i64, millis: u32) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, millis * 1_000_000).expect("a valid time")
    }

    fn sample(time: DateTime<Utc>, used: u64) -> Sample {
        Sample {
            time,
            devices: vec![DeviceSample {
                index: 0,
                used_mib: used,
                free_mib: 8192 - used,
                total_mib: 8192,
                level: Level::Ok,
            }],
            owners: vec![OwnerSample { device: 0, kind: OwnerKind::Model, id: "llm".into(), mib: used }],
        }
    }

    #[test]
    fn the_ring_keeps_its_capacity_and_drops_the_oldest() {
        let history = History::with_capacity(100, &settings());
        for second in 0..250 {
            history.push(sample(at(second, 0), u64::try_from(second).expect("small")));
        }
        assert_eq!(history.len(), 100);
        let all = history.since(None);
        assert_eq!(all.first().map(|s| s.time), Some(at(150, 0)), "the oldest kept is the 151st pushed");
        assert_eq!(all.last().map(|s| s.time), Some(at(249, 0)), "newest last");
        assert!(all.windows(2).all(|w| w[0].time < w[1].time));
    }

    #[test]
    fn the_default_ring_covers_an_hour_in_a_few_mebibytes() {
        let history = History::new(&settings());
        assert!(history.capacity() >= 3600, "an hour at one sample a second");
        for second in 0..i64::try_from(CAPACITY + 500).expect("small") {
            history.push(sample(at(second, 0), 100));
        }
        assert_eq!(history.len(), CAPACITY);
        // One device and six owners: the documented estimate of about 0.5 KiB a sample.
        let mut typical = sample(at(0, 0), 100);
        for name in ["vision", "stt", "desktop", "firefox", "run", "embed"] {
            typical.owners.push(OwnerSample { device: 0, kind: OwnerKind::Foreign, id: name.into(), mib: 1 });
        }
        let bytes = typical.approx_bytes();
        eprintln!("a typical sample: {bytes} bytes; a full ring: {} bytes", bytes * CAPACITY);
        assert!(bytes < 700, "a typical sample takes {bytes} bytes");
        assert!(bytes * CAPACITY < 3 << 20, "the ring stays under 3 MiB: {}", bytes * CAPACITY);
    }

    #[test]
    fn samples_within_one_second_are_thinned_to_the_latest() {
        let history = History::with_capacity(10, &settings());
        for millis in [0, 100, 200, 900] {
            history.push(sample(at(5, millis), u64::from(millis)));
        }
        history.push(sample(at(6, 0), 1));
        let all = history.since(None);
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].time, all[0].devices[0].used_mib), (at(5, 900), 900));
        assert_eq!(history.since(Some(at(5, 950))).len(), 1);
        assert_eq!(history.since(Some(at(7, 0))).len(), 0);
    }

    fn device(processes: Vec<ProcessStatus>) -> DeviceStatus {
        DeviceStatus {
            index: 0,
            name: "Sim".into(),
            probe: ProbeKind::Sim,
            total_mib: 8192,
            used_mib: 6000,
            free_mib: 2192,
            usable_mib: 7680,
            level: Level::Warning,
            utilization_pct: None,
            temperature_c: None,
            processes,
            processes_unavailable: None,
            named_consumers: vec![crate::gpu::NamedUsage { name: "desktop".into(), used_mib: 500 }],
            warnings: vec![],
            error: None,
        }
    }

    fn model(id: &str, state: &str, vram: u64) -> ModelStatus {
        serde_json::from_value(serde_json::json!({
            "id": id, "backend": "process", "state": state, "device": 0, "vram_mib": vram, "in_use": 0,
            "pinned": false, "priority": 0, "last_used": null,
        }))
        .expect("a model status")
    }

    #[test]
    fn owners_are_models_by_pid_foreign_processes_by_name_consumers_and_leases() {
        let process = |pid, used_mib, name: &str| ProcessStatus { pid, used_mib, name: name.into(), model: None };
        let gpu = GpuView {
            probe: ProbeKind::Sim,
            devices: vec![device(vec![
                process(10, Some(3000), "llama-server"),
                process(11, None, "llama-server"),
                process(20, Some(300), "python"),
                process(21, Some(200), "python"),
            ])],
            degraded_reasons: vec![],
            sampled_at: Some(at(0, 0)),
            read_at: None,
            stale_after: std::time::Duration::from_secs(5),
        };
        let mut arbiter = ArbiterView::default();
        arbiter.process_models.insert(10, "llm".into());
        arbiter.process_models.insert(11, "stt".into());
        arbiter.models = vec![model("llm", "ready", 3000), model("stt", "ready", 1200), model("ext", "ready", 700)];
        arbiter.leases = vec![LeaseStatus {
            id: "l1".into(),
            holder: "train".into(),
            device: 0,
            vram_mib: 900,
            exclusive: false,
            model: None,
            priority: 0,
            granted_at: None,
        }];
        let sample = Sample::from_views(&gpu, &arbiter, at(0, 0));
        let owners: Vec<(OwnerKind, &str, u64)> =
            sample.owners.iter().map(|o| (o.kind, o.id.as_str(), o.mib)).collect();
        assert_eq!(
            owners,
            [
                (OwnerKind::Model, "ext", 700),
                (OwnerKind::Model, "llm", 3000),
                (OwnerKind::Model, "stt", 1200),
                (OwnerKind::Lease, "train", 900),
                (OwnerKind::Foreign, "python", 500),
                (OwnerKind::Consumer, "desktop", 500),
            ]
        );
        assert_eq!(sample.devices[0].level, Level::Warning);
    }
}
