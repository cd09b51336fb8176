//! The gauges of now (devices, processes, models, leases, the queue, the mode), produced at scrape
//! time from the status document by a `prometheus-client` [`Collector`].
//!
//! Nothing here is kept between scrapes: a process that exits, a lease that ends or a device that
//! stops answering has no series on the next scrape, instead of a stale one that a registry would
//! keep until someone removed it. Values the status document does not know are absent, never 0.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::status::{DeviceStatus, Status};

/// Bytes in a MiB: status counts MiB, Prometheus wants base units.
const MIB: u64 = 1 << 20;

/// The collector: one status document, encoded once.
#[derive(Debug)]
pub(super) struct StatusCollector {
    /// The document this scrape reads.
    pub status: Status,
}

/// One gauge sample under the family `metric` was opened for.
fn sample(metric: &mut MetricEncoder, labels: &impl EncodeLabelSet, value: impl EncodeGaugeValue) -> std::fmt::Result {
    ConstGauge::new(value).encode(metric.encode_family(labels)?)
}

/// Whether the whole probe is failing now (every sample fails): the monitor then keeps the last
/// good figures of every device and says so in a degraded reason (`probe NAME failing: …`), so no
/// device has a figure of now.
fn probe_failing(status: &Status) -> bool {
    let prefix = format!("probe {} failing:", status.probe.as_str());
    status.degraded_reasons.iter().any(|reason| reason.starts_with(&prefix))
}

/// A device's figures as of now: `None` for a device whose latest reading failed (its figures
/// are the last good ones, stale), or while the whole probe fails.
fn read_now(device: &DeviceStatus, probe_failing: bool) -> Option<&DeviceStatus> {
    (device.error.is_none() && !probe_failing).then_some(device)
}

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let status = &self.status;
        let gauge = MetricType::Gauge;

        let mut up = encoder.encode_descriptor("vramgate_up", "Always 1 while the daemon answers.", None, gauge)?;
        sample(&mut up, &[("version", status.version.as_str())], 1u64)?;
        let mut degraded = encoder.encode_descriptor(
            "vramgate_degraded",
            "1 when vramgate runs degraded (no GPU, a failing probe or device; see degraded_reasons in status).",
            None,
            gauge,
        )?;
        sample(&mut degraded, &[("probe", status.probe.as_str())], u64::from(status.degraded))?;

        let failing = probe_failing(status);
        let indexes: Vec<String> = status.devices.iter().map(|d| d.index.to_string()).collect();
        let labelled = || {
            status
                .devices
                .iter()
                .zip(&indexes)
                .map(|(d, index)| (d, [("device", index.as_str()), ("name", d.name.as_str())]))
        };
        let mut device_up = encoder.encode_descriptor(
            "vramgate_device_up",
            "1 when the device's latest reading succeeded; 0 when it failed (its figures are then absent, not stale).",
            None,
            gauge,
        )?;
        for (device, labels) in labelled() {
            sample(&mut device_up, &labels, u64::from(read_now(device, failing).is_some()))?;
        }

        type DeviceValue = fn(&DeviceStatus) -> Option<u64>;
        let families: [(&str, &str, DeviceValue); 7] = [
            ("vramgate_device_total_bytes", "Installed device memory.", |d| Some(d.total_mib.saturating_mul(MIB))),
            ("vramgate_device_used_bytes", "Device memory in use, by anyone.", |d| {
                Some(d.used_mib.saturating_mul(MIB))
            }),
            ("vramgate_device_free_bytes", "Device memory not in use.", |d| Some(d.free_mib.saturating_mul(MIB))),
            ("vramgate_device_usable_bytes", "Device memory vramgate may hand out (total minus reserve).", |d| {
                Some(d.usable_mib.saturating_mul(MIB))
            }),
            ("vramgate_device_level", "Pressure level: 0 ok, 1 warning, 2 critical, 3 emergency.", |d| {
                Some(u64::from(d.level.as_number()))
            }),
            ("vramgate_device_utilization_percent", "GPU busy percentage (absent where unknown).", |d| {
                d.utilization_pct.map(u64::from)
            }),
            ("vramgate_device_processes", "Processes using the device.", |d| Some(d.processes.len() as u64)),
        ];
        for (name, help, value) in families {
            let mut family = encoder.encode_descriptor(name, help, None, gauge)?;
            for (device, labels) in labelled() {
                if let Some(v) = read_now(device, failing).and_then(value) {
                    sample(&mut family, &labels, v)?;
                }
            }
        }

        let mut temperature = encoder.encode_descriptor(
            "vramgate_device_temperature_celsius",
            "GPU temperature (absent where unknown).",
            None,
            gauge,
        )?;
        for (device, labels) in labelled() {
            if let Some(celsius) = read_now(device, failing).and_then(|d| d.temperature_c) {
                sample(&mut temperature, &labels, celsius)?;
            }
        }

        let mut processes = encoder.encode_descriptor(
            "vramgate_process_used_bytes",
            "Device memory held by one process.",
            None,
            gauge,
        )?;
        for (device, index) in status.devices.iter().zip(&indexes) {
            let Some(device) = read_now(device, failing) else { continue };
            // A process whose figure the driver does not give has no sample: absent, never 0.
            for p in &device.processes {
                let Some(used_mib) = p.used_mib else { continue };
                let pid = p.pid.to_string();
                let model = p.model.as_deref().unwrap_or("");
                let labels = [("device", index.as_str()), ("pid", &pid), ("name", &p.name), ("model", model)];
                sample(&mut processes, &labels, used_mib.saturating_mul(MIB))?;
            }
        }
        let mut named = encoder.encode_descriptor(
            "vramgate_named_consumer_used_bytes",
            "Device memory held by a named consumer without a pid (sim device).",
            None,
            gauge,
        )?;
        for (device, index) in status.devices.iter().zip(&indexes) {
            let Some(device) = read_now(device, failing) else { continue };
            for n in &device.named_consumers {
                sample(&mut named, &[("device", index.as_str()), ("name", &n.name)], n.used_mib.saturating_mul(MIB))?;
            }
        }

        let mut states = encoder.encode_descriptor(
            "vramgate_model_state",
            "1 for the state a model is in (unloaded, loading, ready, unloading, failed), with where it runs.",
            None,
            gauge,
        )?;
        for m in &status.models {
            let placement = m.placement.as_deref().unwrap_or("");
            let labels =
                [("model", m.id.as_str()), ("backend", &m.backend), ("state", &m.state), ("placement", placement)];
            sample(&mut states, &labels, 1u64)?;
        }
        let mut footprints = encoder.encode_descriptor(
            "vramgate_model_vram_bytes",
            "A model's footprint as vramgate counts it.",
            None,
            gauge,
        )?;
        for m in &status.models {
            sample(&mut footprints, &[("model", m.id.as_str())], m.vram_mib.saturating_mul(MIB))?;
        }
        let mut in_use = encoder.encode_descriptor(
            "vramgate_model_in_use",
            "Requests and model leases using a model now.",
            None,
            gauge,
        )?;
        for m in &status.models {
            sample(&mut in_use, &[("model", m.id.as_str())], m.in_use)?;
        }

        let leases = encoder.encode_descriptor("vramgate_leases", "Leases held.", None, gauge)?;
        ConstGauge::new(status.leases.len() as u64).encode(leases)?;
        let mut leased = encoder.encode_descriptor(
            "vramgate_lease_vram_bytes",
            "Device memory one lease holds (0 for a model lease, which holds its model instead).",
            None,
            gauge,
        )?;
        for lease in &status.leases {
            let device = lease.device.to_string();
            let labels = [("id", lease.id.as_str()), ("holder", &lease.holder), ("device", &device)];
            sample(&mut leased, &labels, lease.vram_mib.saturating_mul(MIB))?;
        }
        let mut queue = encoder.encode_descriptor(
            "vramgate_queue_waiters",
            "Requests waiting in the queue, by kind (load, lease).",
            None,
            gauge,
        )?;
        for kind in ["load", "lease"] {
            let waiting = status.queue.iter().filter(|w| w.kind == kind).count() as u64;
            sample(&mut queue, &[("kind", kind)], waiting)?;
        }
        if let Some(mode) = &status.mode {
            let mut current =
                encoder.encode_descriptor("vramgate_mode", "1 for the mode applied last.", None, gauge)?;
            sample(&mut current, &[("mode", mode.as_str())], 1u64)?;
        }
        Ok(())
    }
}
