//! End-to-end: GPU readings that fail in part, on the sim device. A device that cannot be read
//! (`DIR/N/.lost`, as NVML's `GPU_IS_LOST`) is degraded and admits nothing while the others are
//! read and admit on their real numbers, from start-up on, and it recovers when it answers; a
//! device whose process list cannot be read (`DIR/N/.unlisted`, as NVML's `NO_PERMISSION`) holds
//! a release until a readable list shows the model's processes gone; a process listed without a
//! figure (`DIR/N/.unmeasured`, as NVML's "not available") is `null`, absent from `/metrics`, and
//! its model is counted once, at its size.

mod common;

use std::time::{Duration, Instant};

use common::release::PidGuard;
use common::sim_daemon::on_10000_mib as start;
use common::{fake_model, never_within};
use serde_json::Value;

const SECOND: Duration = Duration::from_secs(1);

/// The marker that makes a sim device's process list unreadable (see `gpu::sim::UNLISTED`).
const UNLISTED: &str = ".unlisted";
/// The marker that makes a sim device list processes without figures (see `gpu::sim::UNMEASURED`).
const UNMEASURED: &str = ".unmeasured";
/// The marker that makes a sim device fail its readings (see `gpu::sim::LOST`).
const LOST: &str = ".lost";

/// Asks for a memory lease of `mib` on `device` that does not wait; the code and the body.
async fn lease_now(daemon: &common::Daemon, device: u32, mib: u64) -> (u16, Value) {
    let body = serde_json::json!({"holder": "job", "vram": format!("{mib}MiB"), "device": device, "wait": "0"});
    daemon.post("/vramgate/leases", body).await
}

#[tokio::test]
async fn a_lost_device_admits_nothing_while_the_other_goes_on_from_start_up_and_recovers() {
    let daemon = common::Daemon::start(|sim| {
        // Lost before the daemon starts: it must start with the good device.
        std::fs::create_dir_all(sim.join("1")).expect("sim dir");
        std::fs::write(sim.join("1").join(LOST), "GPU_IS_LOST").expect("marker");
        format!(
            "[gpu]\nprobe = \"sim\"\nsample_interval = \"50ms\"\nreserve_mib = 0\n[gpu.sim]\ndir = \"{}\"\n\
             devices = [{{ name = \"Sim A\", total_mib = 8192 }}, {{ name = \"Sim B\", total_mib = 8192 }}]\n",
            sim.display()
        )
    });
    let status = daemon.status().await;
    assert_eq!(status["devices"].as_array().map(Vec::len), Some(2), "{status:#}");
    assert!(status["devices"][1]["error"].as_str().is_some_and(|e| e.contains("GPU_IS_LOST")), "{status:#}");
    assert!(status["devices"][0]["error"].is_null(), "{status:#}");
    assert_eq!(status["degraded"], true);
    let reasons = status["degraded_reasons"].to_string();
    assert!(reasons.contains("GPU 1 (Sim B) failing"), "{reasons}");

    // GPU 0's reading moves while GPU 1 is lost, and a lease on it is judged on it.
    std::fs::write(daemon.device_dir().join("desktop"), "5000").expect("claim");
    daemon.wait_for_status(5 * SECOND, "GPU 0's reading to move", |s| s["devices"][0]["used_mib"] == 5000).await;
    let (code, body) = lease_now(&daemon, 0, 7000).await;
    assert_ne!(code, 201, "granted 7000 MiB with 3192 free: {body}");
    assert!(body.to_string().contains("3192 MiB available"), "{body}");
    let (code, body) = lease_now(&daemon, 0, 3000).await;
    assert_eq!(code, 201, "{body}");
    // The lost device admits nothing.
    let (code, body) = lease_now(&daemon, 1, 1000).await;
    assert_ne!(code, 201, "granted on a lost device: {body}");

    // It answers again: read, no longer degraded, admitting.
    std::fs::remove_file(common::Daemon::sim_dir_for(&daemon.dir).join("1").join(LOST)).expect("remove the marker");
    let status = daemon
        .wait_for_status(5 * SECOND, "GPU 1 to recover", |s| {
            s["devices"][1]["error"].is_null() && s["degraded"] == false
        })
        .await;
    assert_eq!(status["devices"][1]["used_mib"], 0, "{status:#}");
    let (code, body) = lease_now(&daemon, 1, 1000).await;
    assert_eq!(code, 201, "{body}");
}

/// A model's state in a status document.
fn state_of(status: &Value, id: &str) -> String {
    common::model_in(status, id)["state"].as_str().unwrap_or_default().to_string()
}

/// Polls without blocking the runtime (the unload under test runs on it) until `pid` is gone.
async fn wait_pid_gone(pid: u32, deadline: Duration) {
    let end = Instant::now() + deadline;
    while vramgate::gpu::pid_is_alive(pid) {
        assert!(Instant::now() < end, "pid {pid} still alive after {deadline:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn an_unreadable_process_list_holds_a_release_until_a_readable_list_shows_it_gone() {
    let daemon = start(|sim| fake_model(sim, "a", 1000, "", "release_timeout = \"60s\""), "");
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 200, "{body}");
    let pid = body["pid"].as_u64().expect("a pid") as u32;
    let _guard = PidGuard::new(pid);
    let marker = daemon.device_dir().join(UNLISTED);
    std::fs::write(&marker, "NO_PERMISSION").expect("write the marker");
    let status = daemon
        .wait_for_status(5 * SECOND, "the list reported unreadable", |s| {
            s["devices"][0]["processes_unavailable"].as_str().is_some_and(|r| r.contains("NO_PERMISSION"))
        })
        .await;
    assert_eq!(status["devices"][0]["used_mib"], 1000, "the memory is still in use: {status:#}");

    let unload = tokio::spawn({
        let url = daemon.url.clone();
        async move {
            let response = common::http::client()
                .post(format!("{url}/vramgate/models/a/unload"))
                .timeout(30 * SECOND)
                .send()
                .await
                .expect("unload");
            (response.status().as_u16(), response.json::<Value>().await.expect("JSON"), Instant::now())
        }
    });
    wait_pid_gone(pid, 10 * SECOND).await;
    // Gone from the OS, but no readable list says its memory is back: still unloading.
    never_within(&daemon, SECOND, "released while the process list was unreadable", |s| state_of(s, "a") == "unloaded")
        .await;
    assert!(daemon.log().contains("cannot read the GPU process list during release"), "{}", daemon.log());
    let readable_again = Instant::now();
    std::fs::remove_file(&marker).expect("remove the marker");
    let (code, body, returned) = unload.await.expect("the unload task");
    assert_eq!((code, body["state"].as_str()), (200, Some("unloaded")), "{body}");
    assert!(returned >= readable_again, "unloaded before a readable list showed the pid gone");
    let status = daemon.status().await;
    assert!(status["devices"][0]["processes_unavailable"].is_null(), "{status:#}");
}

#[tokio::test]
async fn a_process_without_a_figure_is_null_absent_from_metrics_and_its_model_counted_once() {
    // Pinned: a lease that does not fit must be refused, not make room by evicting it.
    let daemon = start(|sim| fake_model(sim, "a", 3000, "", "pinned = true"), "");
    std::fs::write(daemon.device_dir().join(UNMEASURED), "").expect("marker");
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 200, "{body}");
    let pid = body["pid"].as_u64().expect("a pid");
    let _guard = PidGuard::new(pid as u32);
    let status = daemon
        .wait_for_status(5 * SECOND, "the model's process listed without a figure", |s| {
            s["devices"][0]["processes"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["pid"] == pid && p["used_mib"].is_null() && p["model"] == "a"))
        })
        .await;
    assert_eq!(status["devices"][0]["used_mib"], 3000, "{status:#}");
    let warnings: Vec<&str> =
        status["devices"][0]["warnings"].as_array().expect("warnings").iter().filter_map(Value::as_str).collect();
    let about_pid: Vec<&&str> = warnings.iter().filter(|w| w.contains(&format!("pid {pid}"))).collect();
    assert_eq!(about_pid.len(), 1, "one warning per device and pid: {warnings:?}");
    assert!(about_pid[0].starts_with(&format!("pid {pid} of model a: no memory figure")), "{warnings:?}");
    assert!(common::model_in(&status, "a")["measured_mib"].is_null(), "nothing measured: {status:#}");
    let metrics = common::http::get(format!("{}/metrics", daemon.url)).await.expect("metrics");
    let text = metrics.text().await.expect("text");
    assert!(!text.contains(&format!("pid=\"{pid}\"")), "a sample for a process without a figure: {text}");
    // Counted once: 10000 − 3000 leaves 7000, not 4000 (3000 foreign on top of the model's 3000).
    let (code, body) = lease_now(&daemon, 0, 7000).await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(daemon.model("a").await["state"], "ready");
}
