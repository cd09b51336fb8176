//! End-to-end: vramgate in a container without the host's pid namespace, played by the sim
//! device's `DIR/N/.foreign-namespace` marker (the device lists each process under a pid that
//! does not exist here, as NVML reports host pids inside a container). The daemon detects it,
//! says so in `degraded_reasons` and the device's `warnings`, counts its models at their size
//! (once), learns no footprint, and goes back to attribution by pid when the pids are its own. An
//! unload there ends once the model's process has exited, and what the device still holds for it
//! is foreign until a reading shows it gone.

mod common;

use std::time::Duration;

use common::fake_model;
use common::release::PidGuard;
use common::sim_daemon::on_10000_mib as start;
use serde_json::Value;

const SECOND: Duration = Duration::from_secs(1);

/// The marker that makes a sim device list pids from another namespace (see
/// `gpu::sim::FOREIGN_NAMESPACE`).
const FOREIGN_NAMESPACE: &str = ".foreign-namespace";

/// Asks for a memory lease of `mib` on GPU 0 that does not wait; the code and the body.
async fn lease_now(daemon: &common::Daemon, mib: u64) -> (u16, Value) {
    let body = serde_json::json!({"holder": "job", "vram": format!("{mib}MiB"), "device": 0, "wait": "0"});
    daemon.post("/vramgate/leases", body).await
}

/// Whether GPU 0 lists `pid` with `model` (JSON `null` for nobody's).
fn lists(status: &Value, pid: u32, model: &Value) -> bool {
    status["devices"][0]["processes"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p["pid"] == pid && &p["model"] == model))
}

#[tokio::test]
async fn pids_from_another_namespace_are_detected_said_counted_once_and_cleared() {
    // Pinned: a lease that does not fit must be refused, not make room by evicting it.
    let daemon = start(|sim| fake_model(sim, "a", 3000, "", "pinned = true"), "");
    std::fs::write(daemon.device_dir().join(FOREIGN_NAMESPACE), "").expect("marker");
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 200, "{body}");
    let pid = u32::try_from(body["pid"].as_u64().expect("a pid")).expect("a pid fits u32");
    let _guard = PidGuard::new(pid);
    let host_pid = vramgate::gpu::sim::host_pid(pid);

    let status = daemon
        .wait_for_status(5 * SECOND, "the other namespace detected", |s| {
            s["degraded_reasons"].to_string().contains("pid namespace")
        })
        .await;
    assert_eq!(status["degraded"], true);
    let reasons = status["degraded_reasons"].to_string();
    assert!(
        reasons.contains(&format!("GPU 0: the driver lists processes ({host_pid}) that do not exist")),
        "{reasons}"
    );
    assert!(reasons.contains("--pid=host"), "{reasons}");
    let warnings = status["devices"][0]["warnings"].to_string();
    assert!(warnings.contains(&format!("pids {host_pid} are not in vramgate's pid namespace")), "{warnings}");
    assert!(lists(&status, host_pid, &Value::Null), "the host pid is listed, nobody's: {status:#}");
    assert_eq!(status["devices"][0]["used_mib"], 3000, "{status:#}");
    assert!(common::model_in(&status, "a")["measured_mib"].is_null(), "nothing measured: {status:#}");
    // Counted once: 10000 − 3000 leaves 7000, not 4000 (3000 foreign on top of the model's 3000).
    let (code, body) = lease_now(&daemon, 7000).await;
    assert_eq!(code, 201, "{body}");
    let lease = body["id"].as_str().expect("a lease id").to_string();
    let response = common::http::client()
        .delete(format!("{}/vramgate/leases/{lease}", daemon.url))
        .send()
        .await
        .expect("DELETE the lease");
    assert!(response.status().is_success(), "{}", response.status());
    assert_eq!(daemon.model("a").await["state"], "ready");

    // The pids are ours again (vramgate restarted with --pid=host, here: the marker removed).
    std::fs::remove_file(daemon.device_dir().join(FOREIGN_NAMESPACE)).expect("remove the marker");
    let status = daemon
        .wait_for_status(5 * SECOND, "attribution by pid again", |s| {
            s["degraded"] == false && lists(s, pid, &Value::from("a"))
        })
        .await;
    assert!(!status["devices"][0]["warnings"].to_string().contains("pid namespace"), "{status:#}");
    let status = daemon
        .wait_for_status(5 * SECOND, "the footprint measured", |s| common::model_in(s, "a")["measured_mib"] == 3000)
        .await;
    assert_eq!(status["degraded"], false, "{status:#}");
}

#[tokio::test]
async fn an_unload_in_another_namespace_ends_with_the_process_and_its_memory_stays_foreign_until_gone() {
    // The device hands the memory back 2 s after the process is gone (`release_lag`), listing its
    // pid until then, as a real driver does.
    let daemon = common::Daemon::start(|sim| {
        format!(
            "{}release_lag = \"8s\"\n{}",
            common::sim_config(sim, 10000, "50ms", "reserve_mib = 0"),
            fake_model(sim, "a", 3000, "", "")
        )
    });
    std::fs::write(daemon.device_dir().join(FOREIGN_NAMESPACE), "").expect("marker");
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 200, "{body}");
    let pid = u32::try_from(body["pid"].as_u64().expect("a pid")).expect("a pid fits u32");
    let _guard = PidGuard::new(pid);
    daemon
        .wait_for_status(5 * SECOND, "the other namespace detected", |s| {
            s["degraded_reasons"].to_string().contains("pid namespace")
        })
        .await;
    // Nothing on the list is the model's pid: the release ends once the process has exited.
    let (code, body) = daemon.unload("a").await;
    assert_eq!((code, body["state"].as_str()), (200, Some("unloaded")), "{body}");
    assert!(!vramgate::gpu::pid_is_alive(pid), "unloaded while its process runs");
    // The device still holds its 3000 MiB (within the 8 s lag, far longer than the two requests
    // below take even on a loaded machine): foreign, not counted nowhere.
    let status = daemon.status().await;
    assert_eq!(status["devices"][0]["used_mib"], 3000, "the lag has not passed yet: {status:#}");
    let (code, body) = lease_now(&daemon, 8000).await;
    assert_ne!(code, 201, "granted 8000 MiB while 3000 of 10000 are still held: {body}");
    // Handed back: the lease fits.
    daemon.wait_for_status(20 * SECOND, "the memory back", |s| s["devices"][0]["used_mib"] == 0).await;
    let (code, body) = lease_now(&daemon, 8000).await;
    assert_eq!(code, 201, "{body}");
}

/// The same on the NVML path: the stand-in driver lists a pid that exists in no namespace here
/// (the host's pid of the model's server) holding the model's memory; the model vramgate started
/// runs under its own pid, which NVML never lists.
#[tokio::test]
async fn on_nvml_a_listed_pid_from_another_namespace_is_detected_and_the_model_counted_once() {
    use common::nvml::{self, Device, List, Process, State, Variant};
    // Above Linux's largest pid: no process here has it.
    const HOST_PID: u32 = (1 << 22) + 4242;
    let daemon = common::Daemon::start(|sim| {
        let dir = sim.parent().expect("the sim dir is inside the daemon's temp dir").join("nvml");
        let library = nvml::link_into(&dir, Variant::Full);
        State {
            driver: Some("550.54.15".into()),
            devices: vec![Device::new("NVIDIA In A Container", 10000, 3000)],
            processes: vec![Process {
                device: 0,
                list: List::Compute,
                pid: HOST_PID,
                used_mib: Some(3000),
                late: false,
            }],
            ..State::default()
        }
        .write_to(&dir);
        let no_amd = sim.parent().expect("temp dir").join("no-amd");
        std::fs::create_dir_all(&no_amd).expect("create the empty sysfs root");
        format!(
            "{}{}",
            nvml::config("nvml", &library, "20ms", &no_amd),
            fake_model(sim, "a", 3000, "", "pinned = true")
        )
    });
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 200, "{body}");
    let pid = u32::try_from(body["pid"].as_u64().expect("a pid")).expect("a pid fits u32");
    let _guard = PidGuard::new(pid);
    let status = daemon
        .wait_for_status(5 * SECOND, "the other namespace detected", |s| {
            s["degraded_reasons"].to_string().contains(&format!("lists processes ({HOST_PID})"))
        })
        .await;
    assert_eq!(status["probe"], "nvml", "{status:#}");
    assert!(lists(&status, HOST_PID, &Value::Null), "{status:#}");
    assert_eq!(status["devices"][0]["processes"][0]["name"], "unknown", "{status:#}");
    assert!(status["devices"][0]["warnings"].to_string().contains("--pid=host"), "{status:#}");
    // Counted once: 10000 − 3000 leaves 7000.
    let (code, body) = lease_now(&daemon, 7000).await;
    assert_eq!(code, 201, "{body}");
}
