//! When the NVML probe re-initialises NVML, counted by the stand-in driver library in this process
//! (`vramgate_standin_calls`): a device that answers with a permanent error (no permission) never
//! makes it re-initialise, however many samples; a lost GPU (`GPU_IS_LOST`) does, once, and not
//! again before its backoff. The backoff's schedule itself is unit-tested in
//! `src/gpu/nvml/reinit.rs` (time is an argument there).
//!
//! A process loads one copy of the stand-in, and its state file is found beside the path of the
//! first load, so this file has one test.

mod common;
#[path = "common/nvml_calls.rs"]
mod nvml_calls;

use common::nvml::{self, Device, InjectedError, State, Variant, When, code};
use nvml_calls::Driver;
use vramgate::config::NvmlConfig;
use vramgate::gpu::Probe;
use vramgate::gpu::nvml::NvmlProbe;

const INIT: &str = "nvmlInit_v2";
const SHUTDOWN: &str = "nvmlShutdown";

fn two_devices_with(errors: Vec<InjectedError>) -> State {
    State {
        devices: vec![Device::new("NVIDIA Stand-in A", 8192, 300), Device::new("NVIDIA Stand-in B", 8192, 300)],
        errors,
        ..State::default()
    }
}

fn on_device_1(code: u32) -> Vec<InjectedError> {
    vec![InjectedError { function: "nvmlDeviceGetMemoryInfo_v2".into(), device: Some(1), code, when: When::Always }]
}

#[test]
fn only_a_curable_failure_reinitialises_nvml_and_then_not_before_its_backoff() {
    let dir = tempfile::Builder::new().prefix("nvml-reinit").tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a dir");
    let library = nvml::link_into(dir.path(), Variant::Full);
    two_devices_with(on_device_1(code::NO_PERMISSION)).write_to(dir.path());
    let mut probe = NvmlProbe::open(&NvmlConfig { library: Some(library.clone()) }).expect("the probe opens");
    let driver = Driver::open(&library);

    // A permanent answer: device 1 fails in every sample, GPU 0 is read, NVML is left alone.
    let before = driver.calls();
    for _ in 0..5 {
        let devices = probe.sample().expect("a sample");
        assert!(devices[0].failed.is_none(), "{devices:?}");
        let failed = devices[1].failed.as_deref().unwrap_or_default();
        assert!(failed.contains("does not have permission"), "{devices:?}");
    }
    let calls = driver.calls().since(&before);
    assert_eq!((calls.get(INIT), calls.get(SHUTDOWN)), (0, 0), "re-initialised for a permanent error: {calls}");

    // A lost GPU: re-initialised at once (it is still lost after it), then not again within the
    // backoff (5 s; these samples take milliseconds).
    two_devices_with(on_device_1(code::GPU_IS_LOST)).write_to(dir.path());
    let before = driver.calls();
    for _ in 0..5 {
        let devices = probe.sample().expect("a sample");
        assert!(devices[1].failed.as_deref().is_some_and(|f| f.contains("fell off the bus")), "{devices:?}");
    }
    let calls = driver.calls().since(&before);
    assert_eq!((calls.get(INIT), calls.get(SHUTDOWN)), (1, 1), "{calls}");
}
