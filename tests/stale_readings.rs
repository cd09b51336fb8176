//! End-to-end on the NVML stand-in: a probe that hangs (a driver call that does not return, the
//! stand-in's `delay` line) leaves the arbiter with a reading it can no longer trust. Past one
//! sample interval plus the sample deadline (here 20 ms + 2 s), every device it covers admits
//! nothing, with a degraded reason naming the device and how old its reading is; once the driver
//! answers again, fresh readings end it and leases are granted again.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Daemon;
use common::nvml::{self, Delay, Device, State, Variant};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(10);

/// The stand-in's directory in a daemon's temp dir (beside its sim dir).
fn standin_dir(sim: &Path) -> PathBuf {
    sim.parent().expect("the sim dir is inside the daemon's temp dir").join("nvml")
}

fn one_device() -> State {
    State { devices: vec![Device::new("NVIDIA Stand-in A", 8192, 300)], ..State::default() }
}

/// Asks for a memory lease of `mib` on device 0 that does not wait; the code and the body.
async fn lease_now(daemon: &Daemon, mib: u64) -> (u16, Value) {
    let body = serde_json::json!({"holder": "job", "vram": format!("{mib}MiB"), "device": 0, "wait": "0"});
    daemon.post("/vramgate/leases", body).await
}

fn stale_reason(status: &Value) -> Option<String> {
    status["degraded_reasons"]
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .find(|r| r.contains("no fresh reading"))
        .map(str::to_string)
}

#[tokio::test]
async fn a_hung_probe_admits_nothing_on_its_old_reading_and_recovers() {
    let daemon = Daemon::start(|sim| {
        let dir = standin_dir(sim);
        let library = nvml::link_into(&dir, Variant::Full);
        one_device().write_to(&dir);
        let no_amd = sim.parent().expect("temp dir").join("no-amd");
        std::fs::create_dir_all(&no_amd).expect("create the empty sysfs root");
        nvml::config("nvml", &library, "20ms", &no_amd)
    });
    let dir = standin_dir(&Daemon::sim_dir_for(&daemon.dir));
    daemon.wait_for_status(DEADLINE, "the device read", |s| s["devices"][0]["used_mib"] == 300).await;
    let (code, body) = lease_now(&daemon, 1000).await;
    assert_eq!(code, 201, "a fresh reading admits: {body}");

    // The driver's memory call stops returning (a minute; lifted below).
    let hung = State {
        delays: vec![Delay { function: "nvmlDeviceGetMemoryInfo_v2".into(), device: None, ms: 60_000 }],
        ..one_device()
    };
    hung.write_to(&dir);
    let status = daemon.wait_for_status(DEADLINE, "the reading said stale", |s| stale_reason(s).is_some()).await;
    let reason = stale_reason(&status).expect("a stale reason");
    assert!(reason.starts_with("GPU 0 (NVIDIA Stand-in A): no fresh reading for "), "{reason}");
    assert!(reason.contains("admits nothing"), "{reason}");
    assert_eq!(status["degraded"], true, "{status:#}");
    let (code, body) = lease_now(&daemon, 1000).await;
    assert_ne!(code, 201, "granted on a reading the probe failed to renew: {body}");

    // The driver answers again: fresh readings, no longer degraded, admitting.
    one_device().write_to(&dir);
    daemon.wait_for_status(DEADLINE, "fresh readings", |s| stale_reason(s).is_none() && s["degraded"] == false).await;
    let (code, body) = lease_now(&daemon, 1000).await;
    assert_eq!(code, 201, "{body}");
}
