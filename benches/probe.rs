//! What one monitor sample costs, per probe, against a baseline measured in the same run.
//!
//! Run: `cargo bench --bench probe` (add `-- --samples 2000` for more). It measures the NVML probe
//! on the stand-in driver library too (`probe/nvml_standin.rs`: driver calls per sample and per
//! release-watch poll, time over the stand-in's own work). On an NVIDIA machine it also measures
//! the real NVML: the full sample vs. a memory-only query of every device (the cheapest useful
//! reading), and the share of a 500 ms tick the sample takes.

mod common;
#[path = "probe/nvml_standin.rs"]
mod nvml_standin;

use std::time::Duration;

use common::measure;

use vramgate::config::{SimConfig, SimDeviceConfig};
use vramgate::gpu::nvml::{NVML_CALLS_PER_DEVICE, NvmlProbe};
use vramgate::gpu::sim::SimProbe;
use vramgate::gpu::{Probe, ProbeKind};
use vramgate::units::Mib;

const DEFAULT_INTERVAL: Duration = Duration::from_millis(500);

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn report(name: &str, (p50, p99): (Duration, Duration), baseline: Option<(&str, Duration)>) {
    let duty = p50.as_secs_f64() / DEFAULT_INTERVAL.as_secs_f64() * 100.0;
    print!("{name:<44} p50 {:>9.1} us  p99 {:>9.1} us  ({duty:.4} % of a 500 ms tick)", micros(p50), micros(p99));
    if let Some((base_name, base)) = baseline {
        print!("  = {:.2}x {base_name}", p50.as_secs_f64() / base.as_secs_f64());
    }
    println!();
}

fn main() {
    let samples: usize = common::arg("--samples", 500);
    println!("probe sample cost, {samples} samples each");

    // Sim: the baseline is reading one claim file, the least any sample of the directory does.
    let dir = tempfile::tempdir().expect("tempdir");
    let me = std::process::id();
    for consumers in [1usize, 10, 50] {
        let config = SimConfig {
            dir: dir.path().join(consumers.to_string()),
            devices: vec![SimDeviceConfig { name: "Sim".into(), total_mib: Mib(8192) }],
            release_lag: Default::default(),
        };
        let mut probe = SimProbe::open(&config).expect("sim");
        let device_dir = config.dir.join("0");
        std::fs::write(device_dir.join(me.to_string()), "100").expect("write");
        for i in 1..consumers {
            std::fs::write(device_dir.join(format!("consumer{i}")), "10").expect("write");
        }
        let one_file = device_dir.join(me.to_string());
        let baseline = measure(samples, samples.min(50), || {
            std::hint::black_box(std::fs::read_to_string(&one_file).ok());
        });
        let full = measure(samples, samples.min(50), || {
            std::hint::black_box(probe.sample().ok());
        });
        if consumers == 1 {
            report("sim: read one claim file (baseline)", baseline, None);
        }
        report(&format!("sim: full sample, {consumers} consumer file(s)"), full, Some(("one file read", baseline.0)));
    }

    nvml_standin::run(samples);

    match NvmlProbe::open(&vramgate::config::NvmlConfig::default()) {
        Err(e) => println!("nvml: not measured here ({e})"),
        Ok(mut probe) => {
            assert_eq!(probe.kind(), ProbeKind::Nvml);
            let devices = probe.sample().map(|d| d.len()).unwrap_or(0);
            let nvml = nvml_wrapper::Nvml::init().expect("NVML loaded once already");
            let baseline = measure(samples, samples.min(50), || {
                for i in 0..devices as u32 {
                    std::hint::black_box(nvml.device_by_index(i).and_then(|d| d.memory_info()).ok());
                }
            });
            let full = measure(samples, samples.min(50), || {
                std::hint::black_box(probe.sample().ok());
            });
            println!(
                "nvml: {devices} device(s), {} wrapper calls per sample ({NVML_CALLS_PER_DEVICE} per device)",
                devices * NVML_CALLS_PER_DEVICE
            );
            report("nvml: handle + memory_info per device (baseline)", baseline, None);
            report("nvml: full sample (with process lists)", full, Some(("memory-only", baseline.0)));
        }
    }
}
