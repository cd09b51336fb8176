//! End-to-end: how memory is given back. A stopped model gets SIGTERM, then SIGKILL after
//! `stop_timeout`, and is `unloaded` only once its memory is back (or `release_timeout` said
//! otherwise, with its event); a heartbeat lease ends unless renewed. SIGTERM to the daemon stops
//! its models (SIGTERM, at most 1.5 s, then SIGKILL) and it exits within about 3 s; killed with
//! SIGKILL it takes its model servers along, and an idle daemon keeps them.
//!
//! Memory that outlives its process is modelled by the sim device's `release_lag`.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::release::{PidGuard, pid_gone_within};
use common::sim_daemon::on_10000_mib as start;
use common::{Daemon, EventStream, fake_model, sim_config};
use serde_json::{Value, json};

const SECOND: Duration = Duration::from_secs(1);

/// A 10000 MiB sim device (no reserve) whose memory comes back `release_lag` after a process
/// is gone, with the given models.
fn start_with_lag(release_lag: &str, models: impl Fn(&Path) -> String) -> Daemon {
    Daemon::start(|sim| {
        // `sim_config` ends inside `[gpu.sim]`, so the key lands in that table.
        format!("{}release_lag = \"{release_lag}\"\n{}", sim_config(sim, 10000, "50ms", "reserve_mib = 0"), models(sim))
    })
}

/// Polls without blocking the runtime (the unload under test runs on it) until `pid` is gone.
async fn wait_pid_gone(pid: u32, deadline: Duration) {
    let end = Instant::now() + deadline;
    while vramgate::gpu::pid_is_alive(pid) {
        assert!(Instant::now() < end, "pid {pid} still alive after {deadline:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Whether device 0 of a status document lists `pid` among its processes.
fn lists_pid(status: &Value, pid: u32) -> bool {
    status["devices"][0]["processes"].as_array().is_some_and(|p| p.iter().any(|p| p["pid"] == pid))
}

/// Events until the model `model` reaches `unloaded` (that one included).
async fn events_until_unloaded(events: &mut EventStream, model: &str, deadline: Duration) -> Vec<Value> {
    let end = Instant::now() + deadline;
    let mut seen = Vec::new();
    loop {
        let event = events.next(end.saturating_duration_since(Instant::now())).await;
        let done = event["type"] == "model_state" && event["model"] == model && event["to"] == "unloaded";
        seen.push(event);
        if done {
            return seen;
        }
    }
}

#[tokio::test]
async fn sigterm_ignored_means_sigkill_after_stop_timeout() {
    let daemon = start(|sim| fake_model(sim, "a", 1000, "--ignore-sigterm", "stop_timeout = \"300ms\""), "");
    let (_, body) = daemon.load("a").await;
    let pid = body["pid"].as_u64().unwrap() as u32;
    let started = Instant::now();
    let (code, body) = daemon.unload("a").await;
    assert_eq!((code, body["state"].as_str()), (200, Some("unloaded")));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(300) && took < 5 * SECOND, "{took:?}");
    assert!(!vramgate::gpu::pid_is_alive(pid));
    let log = daemon.log();
    assert!(log.contains("killed=true") || log.contains("killed"), "the kill is logged");
}

#[tokio::test]
async fn a_stopped_model_is_unloaded_only_once_its_memory_is_back() {
    // Long enough that the test reads status while it lasts even on a loaded machine.
    let lag = Duration::from_millis(1200);
    let daemon = start_with_lag("1200ms", |sim| fake_model(sim, "a", 1000, "", ""));
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 200, "{body}");
    let pid = body["pid"].as_u64().unwrap() as u32;
    let _guard = PidGuard::new(pid);
    let claim = daemon.device_dir().join(pid.to_string());
    let mut events = daemon.events().await;

    let started = Instant::now();
    let unload = tokio::spawn({
        let url = daemon.url.clone();
        async move {
            let response = common::http::client()
                .post(format!("{url}/vramgate/models/a/unload"))
                .timeout(10 * SECOND)
                .send()
                .await
                .expect("unload");
            let code = response.status().as_u16();
            (code, response.json::<Value>().await.expect("JSON"), Instant::now())
        }
    });
    // The process exits at once on SIGTERM; its memory is still held for the lag.
    wait_pid_gone(pid, 5 * SECOND).await;
    let status = daemon.status().await;
    let model = common::model_in(&status, "a");
    assert_eq!(model["state"], "unloading", "the process is gone but its memory is not back yet: {status:#}");
    assert!(lists_pid(&status, pid), "the sim device still lists the gone pid during its lag: {status:#}");

    let (code, body, returned) = unload.await.unwrap();
    assert_eq!((code, body["state"].as_str()), (200, Some("unloaded")), "{body}");
    let took = returned - started;
    assert!(took >= lag, "unloaded after {took:?}, before the memory came back ({lag:?} after the exit)");
    assert!(took < lag + 2 * SECOND, "unloaded only after {took:?}, long after the memory came back");
    // The sample that found the memory back is the one that removed the claim.
    assert!(!claim.exists(), "unloaded while the device still held the claim of {pid}");
    let seen = events_until_unloaded(&mut events, "a", 5 * SECOND).await;
    assert!(
        !seen.iter().any(|e| e["type"] == "memory_release_timeout"),
        "the memory came back within release_timeout: {seen:#?}"
    );
    daemon.wait_for_status(2 * SECOND, "the pid gone from the device", |s| !lists_pid(s, pid)).await;
}

#[tokio::test]
async fn a_release_slower_than_release_timeout_is_an_event_and_the_model_unloads_anyway() {
    let lag = 3 * SECOND;
    let daemon = start_with_lag("3s", |sim| fake_model(sim, "a", 1000, "", "release_timeout = \"200ms\""));
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 200, "{body}");
    let pid = body["pid"].as_u64().unwrap() as u32;
    let _guard = PidGuard::new(pid);
    let mut events = daemon.events().await;

    let started = Instant::now();
    let (code, body) = daemon.unload("a").await;
    let took = started.elapsed();
    assert_eq!((code, body["state"].as_str()), (200, Some("unloaded")), "{body}");
    assert!(took >= Duration::from_millis(200), "unloaded after {took:?}, before release_timeout");
    assert!(took < lag, "unloaded after {took:?}: it waited for the memory beyond release_timeout");
    // The memory is in fact still held: the model became unloaded on the timeout.
    let status = daemon.status().await;
    assert!(lists_pid(&status, pid), "the lag is not over: {status:#}");

    let seen = events_until_unloaded(&mut events, "a", 5 * SECOND).await;
    let timeout = seen
        .iter()
        .position(|e| e["type"] == "memory_release_timeout")
        .unwrap_or_else(|| panic!("no memory_release_timeout before `unloaded`: {seen:#?}"));
    let event = &seen[timeout];
    assert_eq!(event["model"], "a", "{event}");
    let waited = event["waited_ms"].as_u64().unwrap_or_else(|| panic!("waited_ms: {event}"));
    assert!((200..3000).contains(&waited), "waited {waited} ms with release_timeout 200ms: {event}");
    assert!(u128::from(waited) <= took.as_millis(), "waited {waited} ms within an unload of {took:?}");
}

#[tokio::test]
async fn a_heartbeat_lease_expires_unless_renewed() {
    let daemon = start(|_| String::new(), "");
    let (code, lease) = daemon.post("/vramgate/leases", json!({"vram": "1G", "ttl": "400ms", "holder": "py"})).await;
    assert_eq!(code, 201, "{lease}");
    let id = lease["id"].as_str().unwrap().to_string();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (code, _) = daemon.post(&format!("/vramgate/leases/{id}/renew"), Value::Null).await;
        assert_eq!(code, 200, "renewed in time");
    }
    daemon.wait_for_status(3 * SECOND, "expiry", |s| s["leases"].as_array().is_some_and(|l| l.is_empty())).await;
    let (code, body) = daemon.post(&format!("/vramgate/leases/{id}/renew"), Value::Null).await;
    assert_eq!(code, 404, "{body}");
}

#[tokio::test]
async fn sigterm_with_a_model_running_stops_it_and_exits_cleanly() {
    let mut daemon = start(|sim| fake_model(sim, "a", 100, "", ""), "");
    let (_, body) = daemon.load("a").await;
    let pid = body["pid"].as_u64().unwrap() as u32;
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let status = daemon.wait_exit(5 * SECOND).expect("the daemon exits");
    assert!(status.success(), "{status:?}\n{}", daemon.log());
    assert!(!vramgate::gpu::pid_is_alive(pid), "the model was stopped");
    assert!(daemon.log().contains("stopped (exit status 0)"), "stopped with SIGTERM, not killed:\n{}", daemon.log());
}

/// Sends a request head with `Expect: 100-continue` and returns once the daemon asked for the
/// body (so the request is in flight in its handler), then sends part of the body and stalls:
/// a client uploading slowly, which keeps its request open until the daemon gives up on it.
fn start_a_slow_upload(url: &str) -> std::net::TcpStream {
    let address = url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream.set_read_timeout(Some(5 * SECOND)).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).expect("write the head");
    let mut answer = [0u8; 64];
    let n = stream.read(&mut answer).expect("the daemon asks for the body");
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 100"), "expected 100 Continue, got {answer:?}");
    stream.write_all(b"{\"model\": \"a\", \"messages\": [").expect("write part of the body");
    stream
}

#[tokio::test]
async fn sigterm_stops_a_term_ignoring_model_with_sigkill_after_its_grace_and_exits_within_3_s() {
    let mut daemon = Daemon::start(|sim| {
        format!(
            "{}{}",
            sim_config(sim, 10000, "50ms", "reserve_mib = 0"),
            fake_model(sim, "a", 100, "--ignore-sigterm", "")
        )
    });
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 200, "{body}");
    let pid = body["pid"].as_u64().unwrap() as u32;
    let _guard = PidGuard::new(pid);
    // An open request the daemon cannot finish: shutdown must not wait for it past its grace.
    let _upload = start_a_slow_upload(&daemon.url);

    let signalled = Instant::now();
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let status = daemon.wait_exit(10 * SECOND).expect("the daemon exits");
    let took = signalled.elapsed();
    let log = daemon.log();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(took >= Duration::from_millis(1450), "exited after {took:?}: the model got no 1.5 s grace\n{log}");
    assert!(took < Duration::from_millis(3500), "exited only after {took:?}\n{log}");
    // The daemon itself killed the model after the grace (not the kernel, when the daemon died).
    assert!(
        log.lines().any(|l| l.contains("model=a") && l.contains("killed=true") && l.contains("stopped (")),
        "the model was killed by the arbiter after its grace:\n{log}"
    );
    assert!(!log.contains("still stopping"), "the arbiter's stop was cut short:\n{log}");
    let model_log = std::fs::read_to_string(daemon.dir.path().join("state/vramgate/logs/a.log")).unwrap_or_default();
    assert!(model_log.contains("ignoring SIGTERM"), "SIGTERM came first:\n{model_log}");
    assert!(pid_gone_within(pid, SECOND), "the model {pid} outlived the daemon");
}

#[tokio::test]
async fn killing_the_daemon_with_sigkill_takes_its_children_along() {
    let mut daemon = start(|sim| fake_model(sim, "a", 100, "", ""), "");
    let (_, body) = daemon.load("a").await;
    let pid = body["pid"].as_u64().unwrap() as u32;
    daemon.signal(nix::sys::signal::Signal::SIGKILL);
    daemon.wait_exit(5 * SECOND).expect("daemon gone");
    let deadline = Instant::now() + 2 * SECOND;
    while vramgate::gpu::pid_is_alive(pid) {
        assert!(Instant::now() < deadline, "child {pid} outlived the daemon by 2 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn a_child_outlives_daemon_idleness() {
    // PR_SET_PDEATHSIG fires when the forking *thread* exits; children must survive idle
    // periods in which a pool thread would retire (tokio's blocking threads after 10 s).
    let daemon = start(|sim| fake_model(sim, "a", 100, "", "ttl = \"0\""), "");
    let (_, body) = daemon.load("a").await;
    let pid = body["pid"].as_u64().unwrap() as u32;
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until {
        assert!(vramgate::gpu::pid_is_alive(pid), "the model died while the daemon idled");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(daemon.model("a").await["state"], "ready");
}

/// Memory not seen back within `release_timeout` still counts: the evicted model is `unloaded` on
/// the timeout, but the load that evicted it starts only once a reading shows that memory gone.
#[tokio::test]
async fn memory_not_back_after_release_timeout_holds_the_next_load_until_a_reading_shows_it_gone() {
    let daemon = start_with_lag("1500ms", |sim| {
        format!(
            "{}{}",
            fake_model(sim, "a", 6000, "", "release_timeout = \"100ms\""),
            fake_model(sim, "b", 6000, "", "")
        )
    });
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 200, "{body}");
    let pid = body["pid"].as_u64().unwrap() as u32;
    let _guard = PidGuard::new(pid);
    // b does not fit beside a: loading it evicts a, whose release times out after 100 ms while
    // the device still holds a's memory for 1.5 s.
    let load_b = tokio::spawn({
        let url = daemon.url.clone();
        async move {
            let response = common::http::client()
                .post(format!("{url}/vramgate/models/b/load"))
                .timeout(20 * SECOND)
                .send()
                .await
                .expect("load b");
            response.status().as_u16()
        }
    });
    // Until b starts, every status that shows it started must also show a's memory gone.
    let end = Instant::now() + 10 * SECOND;
    loop {
        let status = daemon.status().await;
        let b = common::model_in(&status, "b")["state"].as_str().unwrap_or_default().to_string();
        if b == "loading" || b == "ready" {
            assert!(!lists_pid(&status, pid), "b started while a's memory was still in use: {status:#}");
            break;
        }
        assert!(Instant::now() < end, "b never started: {status:#}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(load_b.await.unwrap(), 200);
}
