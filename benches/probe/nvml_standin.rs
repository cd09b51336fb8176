//! The NVML probe on the stand-in driver library (`tests/fixtures/nvml_standin/`, built here as
//! the tests build it): driver calls per sample, counted by the stand-in, and time per sample
//! against a baseline of the same calls made straight into the library (the stand-in's own work),
//! so what is left is nvml-wrapper's and vramgate's. Also the release watch (`gpu_pids`, polled
//! every 5 ms while a model's memory comes back) against a full sample. Not a GPU: a real driver's
//! calls cost what the hardware makes them cost; what this shows is the number of calls and the
//! overhead around them.

#[allow(dead_code)] // the builder's daemon-facing helpers are not used here
#[path = "../../tests/common/nvml.rs"]
mod standin;

#[path = "../../tests/common/nvml_calls.rs"]
mod calls;

use std::time::Duration;

use calls::{Calls, Driver};
use standin::{Device, List, Process, State, Variant};
use vramgate::config::NvmlConfig;
use vramgate::gpu::Probe;
use vramgate::gpu::nvml::NvmlProbe;

use super::{common::measure, micros};

/// What `standin::State::write_to` needs from its parent module (tests/common/mod.rs has the
/// same): replace a file by renaming a complete one over it.
fn write_atomically(path: &std::path::Path, text: &str) {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text).expect("write the stand-in's state");
    std::fs::rename(&partial, path).expect("move the stand-in's state into place");
}

/// `devices` devices with two compute processes and one graphics process each: this process and
/// its parent (real pids, so the probe reads their names as it would a model's) and a pid that
/// does not exist.
fn state(devices: u32) -> State {
    let me = std::process::id();
    let parent = std::os::unix::process::parent_id();
    let mut state = State { driver: Some("550.54.15".into()), ..State::default() };
    for index in 0..devices {
        state.devices.push(Device::new(&format!("NVIDIA Stand-in {index}"), 24576, 4096));
        for (list, pid, mib) in
            [(List::Compute, me, 2048), (List::Compute, 4_000_000, 512), (List::Graphics, parent, 64)]
        {
            state.processes.push(Process { device: index, list, pid, used_mib: Some(mib), late: false });
        }
    }
    state
}

fn line(name: &str, (p50, p99): (Duration, Duration), baseline: Option<Duration>) {
    print!("{name:<58} p50 {:>8.2} us  p99 {:>8.2} us", micros(p50), micros(p99));
    if let Some(base) = baseline {
        print!(
            "  = {:.2}x the stand-in's own work, +{:.2} us over it",
            p50.as_secs_f64() / base.as_secs_f64(),
            micros(p50.saturating_sub(base))
        );
    }
    println!();
}

/// Measures and prints the stand-in rows.
pub fn run(samples: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let library = standin::link_into(dir.path(), Variant::Full);
    // Held throughout: the counter, the raw calls, and the one copy of the library every probe
    // below loads again (so the counts survive each probe's shutdown).
    let driver = Driver::open(&library);
    let config = NvmlConfig { library: Some(library.clone()) };
    println!("nvml on the stand-in driver library (not a GPU), 3 processes per device, {samples} samples each");
    for devices in [1u32, 4] {
        state(devices).write_to(dir.path());
        let mut probe = match NvmlProbe::open(&config) {
            Ok(probe) => probe,
            Err(e) => {
                println!("nvml stand-in: the probe did not open ({e}); not measured");
                return;
            }
        };
        let count = |action: &mut dyn FnMut()| -> Calls {
            let before = driver.calls();
            action();
            driver.calls().since(&before)
        };
        let sample_calls = count(&mut || {
            std::hint::black_box(probe.sample().ok());
        });
        let watch_calls = count(&mut || {
            std::hint::black_box(probe.gpu_pids().ok());
        });
        let replay_calls = count(&mut || {
            std::hint::black_box(driver.replay_sample(devices));
        });
        let watch_replay_calls = count(&mut || {
            std::hint::black_box(driver.replay_gpu_pids(devices));
        });
        println!("nvml stand-in, {devices} device(s): calls per sample: {} ({sample_calls})", sample_calls.total());
        println!(
            "nvml stand-in, {devices} device(s): calls per release-watch poll: {} ({watch_calls})",
            watch_calls.total()
        );
        // The baseline is only the stand-in's share if it makes the very same calls; a probe
        // change that adds or drops calls makes the ratio below meaningless until the replay
        // (tests/common/nvml_calls.rs) follows it. tests/nvml_costs.rs fails in that case too.
        for (what, replay, real) in
            [("sample", &replay_calls, &sample_calls), ("watch", &watch_replay_calls, &watch_calls)]
        {
            if replay != real {
                println!("  WARNING: the {what} baseline replays {replay}, the probe made {real}: the ratio is off");
            }
        }
        let warmup = samples.min(50);
        let raw_sample = measure(samples, warmup, || {
            std::hint::black_box(driver.replay_sample(devices));
        });
        let full = measure(samples, warmup, || {
            std::hint::black_box(probe.sample().ok());
        });
        let raw_watch = measure(samples, warmup, || {
            std::hint::black_box(driver.replay_gpu_pids(devices));
        });
        let watch = measure(samples, warmup, || {
            std::hint::black_box(probe.gpu_pids().ok());
        });
        let label = |what: &str| format!("nvml stand-in, {devices} dev: {what}");
        line(&label("raw calls of a sample (baseline)"), raw_sample, None);
        line(&label("full sample"), full, Some(raw_sample.0));
        line(&label("raw calls of a watch poll (baseline)"), raw_watch, None);
        line(&label("release-watch poll (gpu_pids)"), watch, Some(raw_watch.0));
        println!(
            "nvml stand-in, {devices} dev: a watch poll costs {:.2}x a full sample's time, {} of its {} calls",
            watch.0.as_secs_f64() / full.0.as_secs_f64(),
            watch_calls.total(),
            sample_calls.total()
        );
    }
}
