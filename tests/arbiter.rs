//! End-to-end: models and leases through the real daemon, the sim device and fake model servers.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Daemon, fake_model, sim_config};
use serde_json::{Value, json};

const SECOND: Duration = Duration::from_secs(1);

/// A 10000 MiB sim device (no reserve) with the given models.
fn start(models: impl Fn(&std::path::Path) -> String, scheduler: &str) -> Daemon {
    Daemon::start(|sim| format!("{}{scheduler}\n{}", sim_config(sim, 10000, "50ms", "reserve_mib = 0"), models(sim)))
}

fn states(status: &Value) -> Vec<(String, String)> {
    status["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_str().unwrap().to_string(), m["state"].as_str().unwrap().to_string()))
        .collect()
}

#[tokio::test]
async fn two_fit_and_a_third_evicts_the_least_recently_used() {
    let daemon = start(
        |sim| {
            [fake_model(sim, "a", 4000, "", ""), fake_model(sim, "b", 4000, "", ""), fake_model(sim, "c", 4000, "", "")]
                .concat()
        },
        "",
    );
    let mut events = daemon.events().await;
    assert_eq!(daemon.load("a").await.0, 200);
    assert_eq!(daemon.load("b").await.0, 200);
    let status = daemon.status().await;
    assert_eq!(states(&status)[..2], [("a".into(), "ready".into()), ("b".into(), "ready".into())]);
    // Use a again so that b is the least recently used.
    let (code, body) = daemon.load("a").await;
    assert_eq!((code, body["state"].as_str()), (200, Some("ready")));
    let lease = daemon.post("/vramgate/leases", json!({"model": "a", "holder": "t"})).await;
    assert_eq!(lease.0, 201, "{:?}", lease.1);
    let released = daemon.post(&format!("/vramgate/leases/{}", lease.1["id"].as_str().unwrap()), Value::Null).await;
    assert_eq!(released.0, 405, "release is DELETE");
    let id = lease.1["id"].as_str().unwrap().to_string();
    let response = common::http::client().delete(format!("{}/vramgate/leases/{id}", daemon.url)).send().await.unwrap();
    assert_eq!(response.status(), 204);

    let (code, body) = daemon.load("c").await;
    assert_eq!(code, 200, "{body}");
    let status = daemon.status().await;
    assert_eq!(
        states(&status),
        vec![("a".into(), "ready".into()), ("b".into(), "unloaded".into()), ("c".into(), "ready".into())]
    );
    // The eviction carried its reason, and the device never held more than it has.
    loop {
        let event = events.next_of("model_state", 5 * SECOND).await;
        if event["model"] == "b" && event["to"] == "unloading" {
            assert_eq!(event["reason"], "evicted_for:c");
            break;
        }
    }
    assert!(status["devices"][0]["used_mib"].as_u64().unwrap() <= 10000);
    let status = daemon
        .wait_for_status(5 * SECOND, "both model processes on the device", |s| {
            s["devices"][0]["processes"]
                .as_array()
                .is_some_and(|p| p.iter().filter(|p| p["model"].is_string()).count() == 2)
        })
        .await;
    let processes: Vec<&str> =
        status["devices"][0]["processes"].as_array().unwrap().iter().filter_map(|p| p["model"].as_str()).collect();
    assert_eq!(processes.len(), 2);
    assert!(processes.contains(&"a") && processes.contains(&"c"), "{processes:?}");
}

#[tokio::test]
async fn priority_protects_the_higher_model_and_a_blocked_load_times_out_with_numbers() {
    let daemon = start(
        |sim| {
            [fake_model(sim, "big", 7000, "", "priority = 100"), fake_model(sim, "small", 4000, "", "priority = 10")]
                .concat()
        },
        "[scheduler]\nqueue_timeout = \"400ms\"\n",
    );
    assert_eq!(daemon.load("big").await.0, 200);
    let started = Instant::now();
    let (code, body) = daemon.load("small").await;
    assert_eq!(code, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("needs 4000 MiB on GPU 0"), "{message}");
    assert!(message.contains("3000 MiB available"), "{message}");
    assert!(message.contains("big 7000 MiB (higher priority)"), "{message}");
    assert!(started.elapsed() >= Duration::from_millis(350));
    assert_eq!(daemon.model("big").await["state"], "ready");
    assert_eq!(daemon.model("small").await["state"], "unloaded");
}

#[tokio::test]
async fn pinned_and_in_use_models_are_never_evicted() {
    let daemon = start(
        |sim| {
            [
                fake_model(sim, "pinned", 4000, "", "pinned = true"),
                fake_model(sim, "busy", 4000, "", ""),
                fake_model(sim, "third", 4000, "", ""),
            ]
            .concat()
        },
        "[scheduler]\nqueue_timeout = \"300ms\"\n",
    );
    // Pinned models are loaded at start-up.
    daemon.wait_model_state("pinned", "ready", 10 * SECOND).await;
    let refused = daemon.post("/vramgate/leases", json!({"model": "busy", "exclusive": true})).await;
    assert_eq!(refused.0, 400, "{}", refused.1);
    let lease = daemon.post("/vramgate/leases", json!({"model": "busy", "holder": "app"})).await;
    assert_eq!(lease.0, 201, "{}", lease.1);
    assert!(lease.1["upstream"].as_str().unwrap().starts_with("http://127.0.0.1:"));
    assert_eq!(daemon.model("busy").await["in_use"], 1);
    let (code, body) = daemon.load("third").await;
    assert_eq!(code, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("pinned 4000 MiB (pinned)") && message.contains("busy 4000 MiB (in use)"), "{message}");
    // Once the lease is released, busy is idle and can go.
    let id = lease.1["id"].as_str().unwrap();
    common::http::client().delete(format!("{}/vramgate/leases/{id}", daemon.url)).send().await.unwrap();
    let (code, body) = daemon.load("third").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(daemon.model("busy").await["state"], "unloaded");
    assert_eq!(daemon.model("pinned").await["state"], "ready");
}

#[tokio::test]
async fn min_residency_delays_eviction() {
    let daemon = start(
        |sim| {
            [fake_model(sim, "a", 6000, "", "min_residency = \"1500ms\""), fake_model(sim, "b", 6000, "", "")].concat()
        },
        "",
    );
    assert_eq!(daemon.load("a").await.0, 200);
    let loaded = Instant::now();
    let (code, body) = daemon.load("b").await;
    assert_eq!(code, 200, "{body}");
    assert!(loaded.elapsed() >= Duration::from_millis(1400), "a was evicted after {:?}", loaded.elapsed());
    assert_eq!(daemon.model("a").await["state"], "unloaded");
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
async fn resident_cap_holds() {
    let daemon = start(
        |sim| {
            [fake_model(sim, "a", 100, "", ""), fake_model(sim, "b", 100, "", ""), fake_model(sim, "c", 100, "", "")]
                .concat()
        },
        "[scheduler]\nresident_cap = 2\n",
    );
    for model in ["a", "b", "c"] {
        let (code, body) = daemon.load(model).await;
        assert_eq!(code, 200, "{body}");
        let status = daemon.status().await;
        let resident = states(&status).iter().filter(|(_, s)| s != "unloaded").count();
        assert!(resident <= 2, "{status:#}");
    }
    assert_eq!(daemon.model("a").await["state"], "unloaded", "the least recently used went");
}

#[tokio::test]
async fn max_parallel_loads_serializes_loads() {
    let daemon = start(
        |sim| {
            [fake_model(sim, "a", 100, "--load-delay 300ms", ""), fake_model(sim, "b", 100, "--load-delay 300ms", "")]
                .concat()
        },
        "",
    );
    let mut events = daemon.events().await;
    let (ra, rb) = tokio::join!(daemon.load("a"), daemon.load("b"));
    assert_eq!((ra.0, rb.0), (200, 200));
    let mut loading = 0;
    let mut seen = 0;
    while seen < 4 {
        let event = events.next_of("model_state", 5 * SECOND).await;
        match event["to"].as_str() {
            Some("loading") => loading += 1,
            Some("ready") => loading -= 1,
            _ => continue,
        }
        seen += 1;
        assert!(loading <= 1, "two loads ran at once");
    }
}

#[tokio::test]
async fn a_request_that_can_never_fit_fails_at_once() {
    let daemon = start(|sim| fake_model(sim, "a", 100, "", ""), "[scheduler]\nqueue_timeout = \"30s\"\n");
    let started = Instant::now();
    let (code, body) = daemon.post("/vramgate/leases", json!({"vram": "20G", "holder": "huge"})).await;
    assert_eq!(code, 422, "{body}");
    assert!(started.elapsed() < 5 * SECOND);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("only 10000 MiB usable on GPU 0") && message.contains("need at least 20480 MiB"),
        "{message}"
    );
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
async fn a_model_without_declared_vram_is_measured() {
    let daemon = start(|sim| common::undeclared_fake_model(sim, "a", 1234, "", "ttl = \"0\""), "");
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 200, "{body}");
    let model =
        daemon.wait_for_status(5 * SECOND, "a measured footprint", |s| s["models"][0]["measured_mib"] == 1234).await;
    assert_eq!(model["models"][0]["vram_mib"], 1234);
    assert!(model["models"][0]["declared_mib"].is_null());
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

#[tokio::test]
async fn a_restart_reaps_a_model_that_outlived_a_kill_9_of_the_daemon() {
    // A model server's keeper takes it down with the daemon; with the keeper killed too (both
    // by SIGKILL, the daemon frozen first so that it cannot stop the server when its keeper
    // dies), a server that cleared its parent-death signal survives, recorded in the state
    // database as the daemon left it; the next daemon on that state directory must stop it
    // before admitting anything.
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state").display().to_string();
    let config = move |model_flags: &'static str| {
        let state_dir = state_dir.clone();
        move |sim: &std::path::Path| {
            format!(
                "[server]\nstate_dir = \"{state_dir}\"\n{}{}",
                sim_config(sim, 10000, "50ms", "reserve_mib = 0"),
                fake_model(sim, "a", 100, model_flags, "")
            )
        }
    };
    let mut first = Daemon::start(config("--survive-parent-death"));
    let (code, body) = first.load("a").await;
    assert_eq!(code, 200, "{body}");
    let pid = body["pid"].as_u64().unwrap() as u32;
    let upstream = body["upstream"].as_str().unwrap().to_string();
    let _guard = common::release::PidGuard::new(pid);
    let keeper = vramgate::backend::process::proc_stat_field(pid, 5).expect("the server's process group") as i32;
    assert_ne!(keeper as u32, pid, "the server runs under a keeper that leads its group");
    first.signal(nix::sys::signal::Signal::SIGSTOP);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(keeper), nix::sys::signal::Signal::SIGKILL)
        .expect("kill the keeper");
    first.signal(nix::sys::signal::Signal::SIGKILL);
    first.wait_exit(5 * SECOND).expect("the first daemon died");
    // Still serving without its daemon: a real leftover, not a planted record.
    let health = common::http::get(format!("{upstream}/health")).await.expect("the survivor answers");
    assert_eq!(health.status(), 200);

    let second = Daemon::start(config(""));
    // Reaping happens at start-up, before the API listens, so no event-stream client can be
    // subscribed yet: the event is read from the daemon's log, where every published event's
    // JSON is written.
    let reaped = common::release::logged_events(&second, "leftover_reaped");
    assert_eq!(reaped.len(), 1, "one leftover_reaped event; log:\n{}", second.log());
    assert_eq!(reaped[0]["pid"], pid);
    assert_eq!(reaped[0]["model"], "a");
    assert!(common::release::pid_gone_within(pid, 2 * SECOND), "the leftover {pid} still runs");
    // The model starts afresh under the new daemon.
    assert_eq!(second.model("a").await["state"], "unloaded");
    let (code, body) = second.load("a").await;
    assert_eq!(code, 200, "{body}");
    assert_ne!(body["pid"].as_u64(), Some(u64::from(pid)));
}

#[test]
fn vramgate_run_exits_with_the_command_status_and_sets_the_device() {
    let daemon = Daemon::start_sim(8192, "50ms");
    let output = common::output(common::vramgate().args([
        "run",
        "--vram",
        "1G",
        "--url",
        &daemon.url,
        "--",
        "sh",
        "-c",
        "echo \"$CUDA_VISIBLE_DEVICES $VRAMGATE_LEASE_MIB\"; exit 5",
    ]));
    assert_eq!(output.status.code(), Some(5));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "0 1024");
    let output = common::output(common::vramgate().args(["run", "--vram", "100G", "--url", &daemon.url, "--", "true"]));
    assert_eq!(output.status.code(), Some(75));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("need at least"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn an_exclusive_lease_blocks_other_leases_and_loads_until_released() {
    let daemon = start(|sim| fake_model(sim, "a", 100, "", ""), "[scheduler]\nqueue_timeout = \"300ms\"\n");
    let (code, lock) =
        daemon.post("/vramgate/leases", json!({"vram": 100, "exclusive": true, "holder": "ffmpeg"})).await;
    assert_eq!(code, 201, "{lock}");
    let (code, body) = daemon.post("/vramgate/leases", json!({"vram": 100, "holder": "other"})).await;
    assert_eq!(code, 503, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("held exclusively by ffmpeg"), "{body}");
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 503, "{body}");
    let id = lock["id"].as_str().unwrap();
    common::http::client().delete(format!("{}/vramgate/leases/{id}", daemon.url)).send().await.unwrap();
    assert_eq!(daemon.load("a").await.0, 200);
    let (code, _) = daemon.post("/vramgate/leases", json!({"vram": 100, "holder": "other"})).await;
    assert_eq!(code, 201);
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
async fn emergency_pressure_evicts_idle_models() {
    let daemon = start(
        |sim| {
            [fake_model(sim, "low", 3000, "", "priority = 1"), fake_model(sim, "high", 3000, "", "priority = 9")]
                .concat()
        },
        "",
    );
    assert_eq!(daemon.load("low").await.0, 200);
    assert_eq!(daemon.load("high").await.0, 200);
    // 6000 used by models; a foreign 3600 takes the device to 96 % (emergency).
    daemon.claim("desktop", 3600);
    daemon.wait_model_state("low", "unloaded", 5 * SECOND).await;
    // 6600 of 10000 is below critical (87.5 %): relief stops there.
    daemon.wait_for_status(5 * SECOND, "the memory back", |s| s["devices"][0]["used_mib"] == 6600).await;
    assert_eq!(daemon.model("high").await["state"], "ready");
}

#[tokio::test]
async fn logs_show_the_model_output() {
    let daemon = start(|sim| fake_model(sim, "a", 100, "", ""), "");
    daemon.load("a").await;
    let output = common::output(common::vramgate().args(["logs", "a", "--url", &daemon.url]));
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("loading weights") && text.contains("ready"), "{text}");
    let output = common::output(common::vramgate().args(["logs", "nope", "--url", &daemon.url]));
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown model \"nope\""));
}

#[tokio::test]
async fn the_queue_serves_priority_then_arrival_and_is_bounded() {
    let daemon = start(|_| String::new(), "[scheduler]\nmax_queue = 2\nqueue_timeout = \"10s\"\n");
    let (code, blocker) = daemon.post("/vramgate/leases", json!({"vram": 9000, "holder": "blocker"})).await;
    assert_eq!(code, 201, "{blocker}");
    let mut events = daemon.events().await;
    let first = {
        let url = daemon.url.clone();
        tokio::spawn(async move {
            let body = json!({"vram": 5000, "holder": "early-low", "priority": 1});
            common::http::client().post(format!("{url}/vramgate/leases")).json(&body).send().await.unwrap().status()
        })
    };
    // Wait until it is queued before the next arrives, so arrival order is certain.
    let queued = events.next_of("queued", 5 * SECOND).await;
    assert_eq!(queued["requester"], "early-low");
    assert!(queued["reason"].as_str().unwrap().contains("blocker 9000 MiB (lease)"), "{queued}");
    let second = {
        let url = daemon.url.clone();
        tokio::spawn(async move {
            let body = json!({"vram": 5000, "holder": "late-high", "priority": 9});
            common::http::client().post(format!("{url}/vramgate/leases")).json(&body).send().await.unwrap().status()
        })
    };
    assert_eq!(events.next_of("queued", 5 * SECOND).await["requester"], "late-high");
    // The queue holds two: a third is refused at once.
    let (code, body) = daemon.post("/vramgate/leases", json!({"vram": 100, "holder": "third"})).await;
    assert_eq!(code, 503, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("queue is full"), "{body}");

    let id = blocker["id"].as_str().unwrap();
    common::http::client().delete(format!("{}/vramgate/leases/{id}", daemon.url)).send().await.unwrap();
    let granted = events.next_of("lease_granted", 5 * SECOND).await;
    assert_eq!(granted["holder"], "late-high", "higher priority first");
    assert_eq!(second.await.unwrap(), 201);
    // Both fit once the blocker is gone (5000 + 5000 of 10000): the earlier, lower-priority one
    // comes right after.
    assert_eq!(events.next_of("lease_granted", 5 * SECOND).await["holder"], "early-low");
    assert_eq!(first.await.unwrap(), 201);
}

#[tokio::test]
async fn a_corrupt_state_database_stops_the_daemon_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("state.db"), b"not a database ".repeat(200)).unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, format!("[server]\nstate_dir = \"{}\"\n[gpu]\nprobe = \"none\"\n", dir.path().display()))
        .unwrap();
    let output = common::output(common::vramgate().args(["serve", "--listen", "127.0.0.1:0", "--config"]).arg(&config));
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("state.db") && stderr.contains("move it aside"), "{stderr}");
}

#[tokio::test]
async fn an_absurd_wait_is_refused_or_honoured_but_never_crashes_the_arbiter() {
    let daemon = start(|sim| fake_model(sim, "a", 100, "", ""), "");
    let (code, body) = daemon
        .post(
            "/vramgate/leases",
            json!({"vram": "1G", "holder": "x", "wait": 18446744073709551615u64, "ttl": 18446744073709551615u64}),
        )
        .await;
    assert!(code == 201 || code == 400, "{code} {body}");
    assert_eq!(daemon.load("a").await.0, 200, "the arbiter still works");
}

#[tokio::test]
async fn a_second_daemon_on_the_same_state_dir_refuses_and_leaves_the_first_alone() {
    let first = start(|sim| fake_model(sim, "a", 100, "", ""), "");
    let (_, body) = first.load("a").await;
    let pid = body["pid"].as_u64().unwrap() as u32;
    let config = first.dir.path().join("vramgate.toml");
    let output = common::output(
        common::vramgate()
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .env("XDG_STATE_HOME", first.dir.path().join("state")),
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("another vramgate daemon") && stderr.contains("state directory"), "{stderr}");
    assert!(vramgate::gpu::pid_is_alive(pid), "the first daemon's model survived");
    assert_eq!(first.model("a").await["state"], "ready");
}

#[tokio::test]
async fn the_reaper_leaves_a_process_that_merely_reuses_a_recorded_pid_alone() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state").join("vramgate");
    let bystander = {
        use std::os::unix::process::CommandExt;
        common::KillOnDrop::spawn(Command::new("sleep").arg("30").process_group(0))
    };
    let pid = bystander.pid();
    let ticks = vramgate::backend::process::proc_stat_field(pid, 22).unwrap();
    vramgate::store::Store::open(&state)
        .unwrap()
        .record_process(&vramgate::store::ProcessRecord {
            pid,
            pgid: pid,
            start_ticks: ticks + 12345,
            model: "llm".into(),
            started_at: chrono::Utc::now(),
        })
        .unwrap();
    let state_dir = state.display().to_string();
    let daemon = Daemon::start(move |sim| {
        format!("[server]\nstate_dir = \"{state_dir}\"\n{}", sim_config(sim, 10000, "50ms", "reserve_mib = 0"))
    });
    daemon.status().await;
    assert!(vramgate::gpu::pid_is_alive(pid), "a process with another start time is not ours");
    drop(bystander);
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

#[tokio::test]
async fn a_lease_jobs_own_memory_is_not_counted_twice() {
    let daemon = start(|_| String::new(), "[scheduler]\nqueue_timeout = \"2s\"\n");
    let (code, lease) =
        daemon.post("/vramgate/leases", json!({"vram": 6000, "holder": "job", "pid": std::process::id()})).await;
    assert_eq!(code, 201, "{lease}");
    // The job really uses its 6000 MiB: a process the daemon cannot attribute.
    daemon.claim(&std::process::id().to_string(), 6000);
    daemon.wait_for_status(5 * SECOND, "the job's memory", |s| s["devices"][0]["used_mib"] == 6000).await;
    let (code, body) = daemon.post("/vramgate/leases", json!({"vram": 3000, "holder": "second", "wait": "0"})).await;
    assert_eq!(code, 201, "6000 held + 3000 fit in 10000: {body}");
}

#[tokio::test]
async fn a_client_that_gives_up_while_queued_leaves_no_lease_behind() {
    let daemon = start(|_| String::new(), "[scheduler]\nqueue_timeout = \"10s\"\n");
    let (_, blocker) = daemon.post("/vramgate/leases", json!({"vram": 10000, "holder": "blocker"})).await;
    let mut events = daemon.events().await;
    // Raw connections, so the test knows each request was written before it hangs up.
    let address = daemon.url.trim_start_matches("http://").to_string();
    let mut sockets = Vec::new();
    for i in 0..5 {
        use tokio::io::AsyncWriteExt;
        let body = json!({"vram": 1000, "holder": format!("w{i}"), "hold": "connection"}).to_string();
        let request = format!(
            "POST /vramgate/leases HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut socket = tokio::net::TcpStream::connect(&address).await.unwrap();
        socket.write_all(request.as_bytes()).await.unwrap();
        sockets.push(socket);
    }
    let queued = events.next_of("queued", 5 * SECOND).await;
    assert!(queued["requester"].as_str().unwrap().starts_with('w'), "{queued}");
    drop(sockets);
    let id = blocker["id"].as_str().unwrap();
    common::http::client().delete(format!("{}/vramgate/leases/{id}", daemon.url)).send().await.unwrap();
    // Whatever was granted to a vanished client is released at once.
    daemon.wait_for_status(3 * SECOND, "no leases", |s| s["leases"].as_array().is_some_and(|l| l.is_empty())).await;
}

#[tokio::test]
async fn a_slow_start_is_waited_for_beyond_queue_timeout() {
    // queue_timeout bounds the wait for memory; once admitted, the start may take ready_timeout.
    let daemon =
        start(|sim| fake_model(sim, "slow", 100, "--load-delay 800ms", ""), "[scheduler]\nqueue_timeout = \"300ms\"\n");
    let (code, body) = daemon.load("slow").await;
    assert_eq!(code, 200, "{body}");
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
