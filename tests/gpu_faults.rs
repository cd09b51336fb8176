//! End-to-end: GPU readings that fail in part, on the sim device. A device whose process list
//! cannot be read (`DIR/N/.unlisted`, as NVML's `NO_PERMISSION`) holds a release until a readable
//! list shows the model's processes gone.

mod common;

use std::time::{Duration, Instant};

use common::release::PidGuard;
use common::sim_daemon::on_10000_mib as start;
use common::{fake_model, never_within};
use serde_json::Value;

const SECOND: Duration = Duration::from_secs(1);

/// The marker that makes a sim device's process list unreadable (see `gpu::sim::UNLISTED`).
const UNLISTED: &str = ".unlisted";

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
