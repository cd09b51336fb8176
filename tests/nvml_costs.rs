//! What the NVML probe costs in driver calls, counted by the stand-in driver library
//! (`vramgate_standin_calls`): a sample makes a fixed set of calls per device and nothing else, a
//! process list with nothing on it costs one call, the release watch (`Probe::gpu_pids`, polled
//! every 5 ms while a model's memory comes back) asks only for the process lists, and the
//! benchmark's baseline (`cargo bench --bench probe`) replays exactly the calls of a sample. These
//! assert counts, never times: a change that adds driver calls to a sample or to the watch fails
//! here, and its cost shows in the benchmark.
//!
//! A process loads one copy of the stand-in (the loader shares a file loaded twice), and its state
//! file is found beside the path of the first load, so the tests here share one directory and take
//! turns.

mod common;
#[path = "common/nvml_calls.rs"]
mod nvml_calls;

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use common::nvml::{self, Device, List, Process, State, Variant};
use nvml_calls::{Calls, Driver};
use vramgate::config::NvmlConfig;
use vramgate::gpu::Probe;
use vramgate::gpu::nvml::{NVML_CALLS_PER_DEVICE, NvmlProbe};

const HANDLE: &str = "nvmlDeviceGetHandleByIndex_v2";
const MEMORY: &str = "nvmlDeviceGetMemoryInfo_v2";
const UTILIZATION: &str = "nvmlDeviceGetUtilizationRates";
const TEMPERATURE: &str = "nvmlDeviceGetTemperature";
const COMPUTE: &str = "nvmlDeviceGetComputeRunningProcesses_v3";
const GRAPHICS: &str = "nvmlDeviceGetGraphicsRunningProcesses_v3";

/// The stand-in linked into a directory every test here uses, one test at a time.
fn standin() -> (std::sync::MutexGuard<'static, ()>, PathBuf) {
    static TURN: Mutex<()> = Mutex::new(());
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let turn = TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("nvml-costs")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("a directory for the stand-in")
    });
    let library = nvml::link_into(dir.path(), Variant::Full);
    (turn, library)
}

/// `devices` devices, each with two compute processes and one graphics process when `busy`.
fn state(devices: u32, busy: bool) -> State {
    let mut state = State { driver: Some("550.54.15".into()), ..State::default() };
    for index in 0..devices {
        state.devices.push(Device::new(&format!("NVIDIA Stand-in {index}"), 24576, 2048));
        if busy {
            for (list, pid, mib) in
                [(List::Compute, 4242, 1024), (List::Compute, 4243, 512), (List::Graphics, 4244, 64)]
            {
                state.processes.push(Process {
                    device: index,
                    list,
                    pid: pid + index * 10,
                    used_mib: Some(mib),
                    late: false,
                });
            }
        }
    }
    state
}

fn open(library: &std::path::Path, state: &State) -> NvmlProbe {
    state.write_to(library.parent().expect("the link's directory"));
    NvmlProbe::open(&NvmlConfig { library: Some(library.to_path_buf()) }).expect("the probe opens on the stand-in")
}

/// The calls `action` makes, counted by the stand-in.
fn counted<T>(driver: &Driver, action: impl FnOnce() -> T) -> (Calls, T) {
    let before = driver.calls();
    let result = action();
    (driver.calls().since(&before), result)
}

#[test]
fn a_sample_makes_eight_driver_calls_per_device_with_processes_and_nothing_else() {
    let (_turn, library) = standin();
    let driver = Driver::open(&library);
    let mut probe = open(&library, &state(4, true));
    let (calls, sample) = counted(&driver, || probe.sample().expect("a sample"));
    let pids: Vec<Vec<u32>> = sample.iter().map(|d| d.processes.iter().map(|p| p.pid).collect()).collect();
    assert_eq!(
        pids,
        vec![vec![4242, 4243, 4244], vec![4252, 4253, 4254], vec![4262, 4263, 4264], vec![4272, 4273, 4274]]
    );
    // Per device: handle, memory, utilization, temperature, and count + fill for each list.
    let expected =
        Calls::of(&[(HANDLE, 4), (MEMORY, 4), (UTILIZATION, 4), (TEMPERATURE, 4), (COMPUTE, 8), (GRAPHICS, 8)]);
    assert_eq!(calls, expected, "the driver calls of one sample of 4 devices");
    assert_eq!(calls.total(), 32);
    assert_eq!(calls.0.len(), NVML_CALLS_PER_DEVICE, "the wrapper calls NVML_CALLS_PER_DEVICE documents");
}

#[test]
fn a_process_list_with_nothing_on_it_costs_one_call() {
    let (_turn, library) = standin();
    let driver = Driver::open(&library);
    let mut probe = open(&library, &state(1, false));
    let (calls, sample) = counted(&driver, || probe.sample().expect("a sample"));
    assert!(sample[0].processes.is_empty());
    let expected =
        Calls::of(&[(HANDLE, 1), (MEMORY, 1), (UTILIZATION, 1), (TEMPERATURE, 1), (COMPUTE, 1), (GRAPHICS, 1)]);
    assert_eq!(calls, expected, "an empty list is one count call, no fill");
}

#[test]
fn the_release_watch_asks_only_for_the_process_lists() {
    let (_turn, library) = standin();
    let driver = Driver::open(&library);
    let mut probe = open(&library, &state(4, true));
    let (sample, _) = counted(&driver, || probe.sample().expect("a sample"));
    let (watch, pids) = counted(&driver, || probe.gpu_pids().map(|pids| format!("{pids:?}")));
    let pids = pids.expect("the release watch's lists");
    for pid in [4242, 4244, 4273] {
        assert!(pids.contains(&pid.to_string()), "pid {pid} in the watch's lists: {pids}");
    }
    // The handle and the two lists per device: no memory, utilization, temperature or name.
    assert_eq!(watch, Calls::of(&[(HANDLE, 4), (COMPUTE, 8), (GRAPHICS, 8)]), "the driver calls of one watch poll");
    assert!(watch.total() < sample.total(), "the watch ({watch}) is cheaper than a sample ({sample})");
}

#[test]
fn the_benchmark_baseline_replays_exactly_the_calls_of_a_sample() {
    let (_turn, library) = standin();
    let driver = Driver::open(&library);
    let mut probe = open(&library, &state(4, true));
    let (sample, _) = counted(&driver, || probe.sample().expect("a sample"));
    let (replay, listed) = counted(&driver, || driver.replay_sample(4));
    assert_eq!(replay, sample, "the baseline must make the sample's calls, no more and no fewer");
    assert_eq!(listed, 12, "the replay reads every process");
    let (watch, _) = counted(&driver, || probe.gpu_pids().map(|_| ()));
    let (replay, listed) = counted(&driver, || driver.replay_gpu_pids(4));
    assert_eq!(replay, watch, "the watch's baseline must make the watch's calls");
    assert_eq!(listed, 12);
}
