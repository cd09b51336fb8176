//! Prometheus text exposition, rendered at scrape time from the status document.
//!
//! No metrics registry: every value is a reading of the current state, and per-process series come
//! and go with processes, which a registry would keep as stale series until someone removed them.
//! Rendering from the same document as status also keeps the two from disagreeing.

use std::fmt::Write;

use crate::status::Status;

/// Escapes a label value (backslash, double quote, newline), as the text format requires.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A metric family: its header, then its samples.
struct Family<'a> {
    out: &'a mut String,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &str, kind: &str, help: &str) -> Family<'a> {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{key}=\"{}\"", escape(val));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// Renders every metric.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    const MIB: u64 = 1 << 20;
    let mib = MIB;

    let mut up = Family::new(&mut out, "vramgate_up", "gauge", "Always 1 while the daemon answers.");
    up.sample("vramgate_up", &[("version", &status.version)], 1);
    let mut degraded =
        Family::new(&mut out, "vramgate_degraded", "gauge", "1 when vramgate runs degraded (no GPU, failing probe).");
    degraded.sample("vramgate_degraded", &[("probe", status.probe.as_str())], u8::from(status.degraded));

    type DeviceValue = fn(&crate::status::DeviceStatus) -> Option<u64>;
    let device_families: [(&str, &str, DeviceValue); 7] = [
        ("vramgate_device_total_bytes", "Installed device memory.", |d| Some(d.total_mib * MIB)),
        ("vramgate_device_used_bytes", "Device memory in use, by anyone.", |d| Some(d.used_mib * MIB)),
        ("vramgate_device_free_bytes", "Device memory not in use.", |d| Some(d.free_mib * MIB)),
        ("vramgate_device_usable_bytes", "Device memory vramgate may hand out (total minus reserve).", |d| {
            Some(d.usable_mib * MIB)
        }),
        ("vramgate_device_level", "Pressure level: 0 ok, 1 warning, 2 critical, 3 emergency.", |d| {
            Some(u64::from(d.level.as_number()))
        }),
        ("vramgate_device_utilization_percent", "GPU busy percentage (absent where unknown).", |d| {
            d.utilization_pct.map(u64::from)
        }),
        ("vramgate_device_processes", "Processes using the device.", |d| Some(d.processes.len() as u64)),
    ];
    for (name, help, value) in device_families {
        let mut family = Family::new(&mut out, name, "gauge", help);
        for device in &status.devices {
            if let Some(v) = value(device) {
                let index = device.index.to_string();
                family.sample(name, &[("device", &index), ("name", &device.name)], v);
            }
        }
    }
    let name = "vramgate_device_temperature_celsius";
    let mut temperature = Family::new(&mut out, name, "gauge", "GPU temperature (absent where unknown).");
    for device in &status.devices {
        if let Some(t) = device.temperature_c {
            temperature.sample(name, &[("device", &device.index.to_string()), ("name", &device.name)], t);
        }
    }
    let name = "vramgate_process_used_bytes";
    let mut processes = Family::new(&mut out, name, "gauge", "Device memory held by one process.");
    for device in &status.devices {
        let index = device.index.to_string();
        // A process whose figure the driver does not give has no sample: absent, never 0.
        for p in &device.processes {
            let Some(used_mib) = p.used_mib else { continue };
            let pid = p.pid.to_string();
            let model = p.model.as_deref().unwrap_or("");
            processes.sample(
                name,
                &[("device", &index), ("pid", &pid), ("name", &p.name), ("model", model)],
                used_mib.saturating_mul(mib),
            );
        }
    }
    let name = "vramgate_named_consumer_used_bytes";
    let mut named =
        Family::new(&mut out, name, "gauge", "Device memory held by a named consumer without a pid (sim device).");
    for device in &status.devices {
        let index = device.index.to_string();
        for n in &device.named_consumers {
            named.sample(name, &[("device", &index), ("name", &n.name)], n.used_mib * mib);
        }
    }
    let name = "vramgate_model_state";
    let mut states = Family::new(
        &mut out,
        name,
        "gauge",
        "1 for the state a model is in (unloaded, loading, ready, unloading, failed), with where it runs.",
    );
    for m in &status.models {
        let placement = m.placement.as_deref().unwrap_or("");
        states.sample(
            name,
            &[("model", &m.id), ("backend", &m.backend), ("state", &m.state), ("placement", placement)],
            1,
        );
    }
    let name = "vramgate_model_vram_bytes";
    let mut footprints = Family::new(&mut out, name, "gauge", "A model's footprint as vramgate counts it.");
    for m in &status.models {
        footprints.sample(name, &[("model", &m.id)], m.vram_mib * mib);
    }
    let name = "vramgate_model_in_use";
    let mut in_use = Family::new(&mut out, name, "gauge", "Requests and model leases using a model now.");
    for m in &status.models {
        in_use.sample(name, &[("model", &m.id)], m.in_use);
    }
    let name = "vramgate_leases";
    let mut leases = Family::new(&mut out, name, "gauge", "Leases held.");
    leases.sample(name, &[], status.leases.len());
    if let Some(mode) = &status.mode {
        let name = "vramgate_mode";
        let mut current = Family::new(&mut out, name, "gauge", "1 for the mode applied last.");
        current.sample(name, &[("mode", mode)], 1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{Level, NamedUsage, ProbeKind};
    use crate::status::{DeviceStatus, ProcessStatus};

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

    #[test]
    fn every_sample_line_belongs_to_a_declared_family() {
        let text = render(&status());
        let declared: Vec<&str> =
            text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(declared.contains(&name), "{name} has no TYPE line");
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "bad value in {line}");
        }
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

    #[test]
    fn escapes_label_values() {
        assert_eq!(escape("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }
}
