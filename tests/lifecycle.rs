//! End-to-end: a process model's life up to its stop. Started on demand and unloaded after its
//! idle `ttl`; restarted after a crash; a start that hangs is killed after `ready_timeout`, one
//! that exits is reported with both output streams (in the load's error, in status and in the
//! plain table); three failed starts in a row mean `failed` with a cooldown of 10 s, then 20 s,
//! during which demands are refused at once; an unload during a failing start does not get stuck.

mod common;

use std::time::{Duration, Instant};

use common::plain::{cli, text};
use common::scheduling::chat;
use common::sim_daemon::on_10000_mib as start;
use common::{Daemon, fake_model, sim_config};
use serde_json::{Value, json};

const SECOND: Duration = Duration::from_secs(1);

/// A model's `retry_in_s` in status.
async fn retry_in_s(daemon: &Daemon, model: &str) -> u64 {
    let entry = daemon.model(model).await;
    entry["retry_in_s"].as_u64().unwrap_or_else(|| panic!("no retry_in_s: {entry}"))
}

/// A demand through the proxy during the cooldown: refused at once with 503 `model_failed` and a
/// `Retry-After` of the seconds left; returns that header's value.
async fn refused_in_cooldown(daemon: &Daemon, model: &str) -> u64 {
    let asked = Instant::now();
    let response = chat(daemon, json!({"model": model, "messages": []})).await;
    let took = asked.elapsed();
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body: Value = response.json().await.expect("JSON error body");
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("model_failed")), "{body}");
    assert!(took < 2 * SECOND, "refused after {took:?}, not at once");
    retry_after.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no numeric Retry-After: {body}"))
}

/// The last words of the fake model's `--exit-on-start`: its final stderr line, and the line it
/// prints on stdout first.
fn exit_lines(name: &str, code: i32) -> (String, String) {
    (format!("fake-model: exiting with status {code} (--exit-on-start)"), format!("fake-model {name} starting on port"))
}

#[tokio::test]
async fn an_idle_model_is_unloaded_after_its_ttl() {
    let ttl = Duration::from_millis(400);
    let daemon = start(|sim| fake_model(sim, "a", 1000, "", "ttl = \"400ms\""), "");
    let since_start = Instant::now();
    let mut events = daemon.events().await;
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 200, "{body}");
    let pid = body["pid"].as_u64().expect("pid");
    // Use it back to back for three TTLs past the daemon's start: in use, it stays, and the
    // same process answers every request.
    let client = common::http::client();
    let mut last_use = chrono::Utc::now();
    while since_start.elapsed() < 3 * ttl {
        let response = client
            .post(format!("{}/v1/chat/completions", daemon.url))
            .json(&json!({"model": "a", "messages": []}))
            .send()
            .await
            .expect("POST");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-fake-pid"].to_str().ok(), Some(pid.to_string().as_str()), "reloaded");
        response.bytes().await.expect("the whole answer");
        last_use = chrono::Utc::now();
    }
    // Unloaded a TTL after its last use: not before (the TTL counts from the last use, not from
    // the start), and not much later.
    let event = loop {
        let event = events.next_of("model_state", 5 * SECOND).await;
        if event["to"] == "unloading" {
            break event;
        }
    };
    assert_eq!(event["reason"], "idle");
    let at = chrono::DateTime::parse_from_rfc3339(event["time"].as_str().expect("time")).expect("RFC 3339");
    let idle_for = (at.to_utc() - last_use).to_std().unwrap_or_default();
    // The daemon counts from the moment the answer ended, a hair before the client saw it end.
    assert!(idle_for >= ttl - Duration::from_millis(50), "unloaded {idle_for:?} after its last use (ttl {ttl:?})");
    assert!(idle_for < ttl + SECOND, "unloaded only {idle_for:?} after its last use (ttl {ttl:?})");
    daemon.wait_model_state("a", "unloaded", 5 * SECOND).await;
    daemon.wait_for_status(5 * SECOND, "memory back", |s| s["devices"][0]["used_mib"] == 0).await;
}

#[tokio::test]
async fn a_crash_while_ready_is_released_and_restarted_on_the_next_demand() {
    let daemon = start(|sim| fake_model(sim, "a", 2000, "", ""), "");
    let mut events = daemon.events().await;
    let (_, body) = daemon.load("a").await;
    let upstream = body["upstream"].as_str().unwrap().to_string();
    let first_pid = body["pid"].as_u64().unwrap();
    common::http::client().post(format!("{upstream}/crash")).send().await.unwrap();
    let event = loop {
        let event = events.next_of("model_state", 5 * SECOND).await;
        if event["to"] == "unloading" {
            break event;
        }
    };
    assert_eq!(event["reason"], "crashed");
    assert!(event["error"].as_str().unwrap().contains("exit status 3"), "{event}");
    daemon.wait_model_state("a", "unloaded", 5 * SECOND).await;
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 200, "{body}");
    assert_ne!(body["pid"].as_u64().unwrap(), first_pid);
}

#[tokio::test]
async fn a_hang_at_start_is_killed_after_ready_timeout_with_the_log_tail() {
    let daemon = start(|sim| fake_model(sim, "a", 100, "--hang-on-start", "ready_timeout = \"500ms\""), "");
    let started = Instant::now();
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 502, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("not ready after 500ms"), "{message}");
    assert!(message.contains("loading weights"), "the log tail is in the error: {message}");
    assert!(started.elapsed() < 5 * SECOND);
    let pid = common::release::started_pid(&daemon, "a").await;
    let _guard = common::release::PidGuard::new(pid);
    let model = daemon.wait_model_state("a", "unloaded", 5 * SECOND).await;
    assert_eq!(model["failures"], 1);
    assert!(model["pid"].is_null());
    // `unloaded` means the process is gone, not merely forgotten.
    assert!(!vramgate::gpu::pid_is_alive(pid), "the hung model {pid} still runs after its failed start");
}

#[tokio::test]
async fn a_model_that_exits_at_start_reports_both_streams_in_load_and_status() {
    const MODELS: usize = 4;
    const TRIES: usize = 3;
    let daemon = Daemon::start(|sim| {
        let mut config = sim_config(sim, 8192, "50ms", "");
        for n in 0..MODELS {
            config.push_str(&fake_model(sim, &format!("m{n}"), 100, "--exit-on-start 7", ""));
        }
        config
    });
    let home = tempfile::tempdir().unwrap();
    // The exit races the pipe readers on every start: try often enough that a lost line shows.
    for n in 0..MODELS {
        let name = format!("m{n}");
        let (stderr_line, stdout_line) = exit_lines(&name, 7);
        for attempt in 1..=TRIES {
            let output = cli(&daemon.url, home.path(), &["load", &name]);
            assert_eq!(output.status.code(), Some(1), "{name} try {attempt}");
            let error = text(&output.stderr);
            assert!(error.contains("exit status 7"), "{name} try {attempt}: {error}");
            assert!(error.contains(&stderr_line), "{name} try {attempt}: the last stderr line is missing: {error}");
            assert!(error.contains(&stdout_line), "{name} try {attempt}: the stdout line is missing: {error}");
            let model = daemon
                .wait_for_status(5 * SECOND, "the failure counted", |s| {
                    common::model_in(s, &name)["failures"].as_u64() == Some(attempt as u64)
                })
                .await;
            let last_error = common::model_in(&model, &name)["last_error"].as_str().unwrap_or_default().to_string();
            assert!(last_error.contains(&stderr_line), "{name} try {attempt}: last_error {last_error:?}");
            assert!(last_error.contains(&stdout_line), "{name} try {attempt}: last_error {last_error:?}");
        }
    }
    // After three failures in a row the model is `failed`, and the plain table says why and
    // when it is tried again.
    daemon.wait_model_state("m0", "failed", 5 * SECOND).await;
    let output = cli(&daemon.url, home.path(), &["status"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let table = text(&output.stdout);
    let (stderr_line, _) = exit_lines("m0", 7);
    assert!(table.contains("m0: last error: exited during start-up (exit status 7); last output:"), "{table}");
    assert!(table.contains(&format!("    {stderr_line}")), "{table}");
    assert!(table.contains("m0: 3 failed starts in a row; next automatic try in"), "{table}");
}

#[tokio::test]
async fn a_pinned_model_that_fails_at_start_shows_its_reason_in_the_table() {
    let daemon = Daemon::start(|sim| {
        let mut config = sim_config(sim, 8192, "50ms", "");
        config.push_str(&fake_model(sim, "pinned", 100, "--exit-on-start 9", "pinned = true\npreload = true"));
        config
    });
    daemon
        .wait_for_status(10 * SECOND, "the preload to fail", |s| {
            common::model_in(s, "pinned")["last_error"].is_string()
        })
        .await;
    let home = tempfile::tempdir().unwrap();
    let table = text(&cli(&daemon.url, home.path(), &["status"]).stdout);
    let (stderr_line, _) = exit_lines("pinned", 9);
    assert!(table.contains("pinned: last error: exited during start-up (exit status 9)"), "{table}");
    assert!(table.contains(&stderr_line), "{table}");
}

#[tokio::test]
async fn exit_during_start_up_and_three_failures_mean_failed_with_a_cooldown() {
    let daemon = start(|sim| fake_model(sim, "a", 100, "--exit-on-start 7", ""), "");
    for attempt in 1..=3 {
        let (code, body) = daemon.load("a").await;
        assert_eq!(code, 502, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("exit status 7"), "{message}");
        let expected = if attempt < 3 { "unloaded" } else { "failed" };
        daemon.wait_model_state("a", expected, 5 * SECOND).await;
    }
    let model = daemon.model("a").await;
    assert_eq!((model["state"].as_str(), model["failures"].as_u64()), (Some("failed"), Some(3)), "{model}");
    // The first cooldown is 10 s: what is left of it, seen a moment later.
    let retry_in = model["retry_in_s"].as_u64().expect("a failed model says when it is tried again");
    assert!((8..=10).contains(&retry_in), "retry_in_s {retry_in}, expected about 10: {model}");
    // A proxy-style demand is refused during the cooldown; `vramgate load` retries anyway.
    let lease = daemon.post("/vramgate/leases", json!({"model": "a"})).await;
    assert_eq!(lease.0, 503, "{}", lease.1);
    assert!(lease.1["error"]["message"].as_str().unwrap().contains("next automatic try"), "{}", lease.1);
    let output = common::output(common::vramgate().args(["load", "a", "--url", &daemon.url]));
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("exit status 7"));
    assert_eq!(daemon.model("a").await["failures"], 4);
}

#[tokio::test]
async fn a_failing_model_cools_down_10_s_then_20_s_and_refuses_demands_meanwhile() {
    let daemon = start(|sim| fake_model(sim, "a", 100, "--exit-on-start 7", ""), "");
    for attempt in 1..=3 {
        let (code, body) = daemon.load("a").await;
        assert_eq!(code, 502, "attempt {attempt}: {body}");
        let expected = if attempt < 3 { "unloaded" } else { "failed" };
        daemon.wait_model_state("a", expected, 5 * SECOND).await;
    }
    // The first cooldown is 10 s: read within a few seconds of the failure, between 8 and 10
    // whole seconds are left.
    let left = retry_in_s(&daemon, "a").await;
    assert!((8..=10).contains(&left), "retry_in_s {left} after the third failure, expected about 10");
    let retry_after = refused_in_cooldown(&daemon, "a").await;
    assert!((8..=10).contains(&retry_after), "Retry-After {retry_after}, expected about 10");
    assert_eq!(daemon.model("a").await["failures"], 3, "a refused demand is not a try");

    // `vramgate load` (explicit) tries at once; its failure doubles the cooldown to 20 s.
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 502, "{body}");
    let model = daemon.wait_model_state("a", "failed", 5 * SECOND).await;
    assert_eq!(model["failures"], 4);
    let left = retry_in_s(&daemon, "a").await;
    assert!((18..=20).contains(&left), "retry_in_s {left} after the fourth failure, expected about 20 (doubled)");
    let retry_after = refused_in_cooldown(&daemon, "a").await;
    assert!((18..=20).contains(&retry_after), "Retry-After {retry_after}, expected about 20");
}

#[tokio::test]
async fn an_unload_during_a_failing_spawn_does_not_get_stuck() {
    let daemon = start(
        |_| "[models.ghost]\nbackend = \"process\"\ncmd = \"/nonexistent/llama-server\"\nvram = 100\n".to_string(),
        "",
    );
    for _ in 0..5 {
        let (load, unload) = tokio::join!(daemon.load("ghost"), daemon.unload("ghost"));
        assert!(load.0 == 502 || load.0 == 409 || load.0 == 503, "{load:?}");
        assert_eq!(unload.0, 200, "{unload:?}");
    }
    let model = daemon.wait_for_status(5 * SECOND, "ghost settled", |s| s["models"][0]["state"] != "unloading").await;
    assert!(model["models"][0]["state"] == "unloaded" || model["models"][0]["state"] == "failed", "{model:#}");
    assert_eq!(model["models"][0]["vram_mib"], 100);
}
