//! End-to-end: the real daemon against the simulated device, over loopback HTTP.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Daemon, sim_config};
use nix::sys::signal::Signal;
use serde_json::Value;

fn device0(status: &Value) -> &Value {
    &status["devices"][0]
}

#[tokio::test]
async fn status_reflects_a_file_written_after_start_within_two_sample_intervals() {
    let daemon = Daemon::start_sim(8192, "1s");
    let before = daemon.status().await;
    assert_eq!(device0(&before)["used_mib"], 0);
    let me = std::process::id();
    let written = Instant::now();
    daemon.claim(&me.to_string(), 1500);
    let status = daemon
        .wait_for_status(Duration::from_secs(2), "the claim to show up within two 1 s intervals", |s| {
            device0(s)["used_mib"] == 1500
        })
        .await;
    assert!(written.elapsed() <= Duration::from_secs(2));
    let process = &device0(&status)["processes"][0];
    assert_eq!(process["pid"], me);
    assert_eq!(process["used_mib"], 1500);
    assert!(process["model"].is_null());
    assert_eq!(device0(&status)["free_mib"], 8192 - 1500);
}

#[tokio::test]
async fn status_document_has_every_contract_field() {
    let daemon = Daemon::start(|sim| sim_config(sim, 8192, "100ms", "reserve_mib = 512"));
    daemon.claim("desktop", 1200);
    let status =
        daemon.wait_for_status(Duration::from_secs(5), "desktop claim", |s| device0(s)["used_mib"] == 1200).await;
    for key in ["devices", "degraded", "degraded_reasons", "models", "leases", "mode"] {
        assert!(status.get(key).is_some(), "status lacks {key}: {status:#}");
    }
    let device = device0(&status);
    for key in [
        "index",
        "name",
        "probe",
        "total_mib",
        "used_mib",
        "free_mib",
        "usable_mib",
        "level",
        "utilization_pct",
        "temperature_c",
        "processes",
    ] {
        assert!(device.get(key).is_some(), "device lacks {key}: {device:#}");
    }
    assert_eq!(device["probe"], "sim");
    assert_eq!(device["name"], "Sim Test");
    assert_eq!(device["usable_mib"], 8192 - 512);
    assert_eq!(device["level"], "ok");
    assert!(device["utilization_pct"].is_null() && device["temperature_c"].is_null());
    assert_eq!(device["named_consumers"][0]["name"], "desktop");
    assert_eq!(status["degraded"], false);
    assert_eq!(status["models"], Value::Array(vec![]));
    assert!(status["mode"].is_null());
}

#[tokio::test]
async fn crossing_each_threshold_emits_level_changed_in_order() {
    let daemon = Daemon::start_sim(1000, "50ms");
    let mut events = daemon.events().await;
    let mut seen = Vec::new();
    // One step per boundary, waiting for each event so no sample can skip a level.
    for (used, expected) in [(760, "warning"), (880, "critical"), (960, "emergency")] {
        daemon.claim("desktop", used);
        let event = events.next_of("level_changed", Duration::from_secs(5)).await;
        assert_eq!(event["to"], expected, "{event}");
        assert_eq!(event["used_mib"], used);
        assert_eq!(event["device"], 0);
        seen.push(format!("{}->{}", event["from"].as_str().unwrap(), event["to"].as_str().unwrap()));
    }
    assert_eq!(seen, vec!["ok->warning", "warning->critical", "critical->emergency"]);
    daemon.claim("desktop", 0);
    let back = events.next_of("level_changed", Duration::from_secs(5)).await;
    assert_eq!((back["from"].as_str(), back["to"].as_str()), (Some("emergency"), Some("ok")));
}

#[tokio::test]
async fn vram_changed_follows_the_threshold() {
    let daemon = Daemon::start(|sim| sim_config(sim, 8192, "50ms", "change_threshold_mib = 200"));
    let mut events = daemon.events().await;
    daemon.claim("desktop", 150);
    // 150 is below the threshold: wait until the daemon has surely seen it, then go past it.
    daemon.wait_for_status(Duration::from_secs(5), "150 MiB", |s| device0(s)["used_mib"] == 150).await;
    daemon.claim("desktop", 450);
    let event = events.next(Duration::from_secs(5)).await;
    assert_eq!(event["type"], "vram_changed", "the 150 MiB step must not have produced an event: {event}");
    assert_eq!(event["previous_mib"], 0);
    assert_eq!(event["used_mib"], 450);
    assert_eq!(event["free_mib"], 8192 - 450);
    assert!(event["seq"].as_u64().unwrap() >= 1);
    assert!(event["time"].is_string());
}

#[tokio::test]
async fn a_pid_file_of_an_exited_process_is_not_counted() {
    let daemon = Daemon::start_sim(8192, "50ms");
    let mut exited = Command::new("true").spawn().expect("spawn true");
    let dead_pid = exited.id();
    exited.wait().expect("reap");
    let me = std::process::id();
    daemon.claim(&dead_pid.to_string(), 4000);
    daemon.claim(&me.to_string(), 300);
    let status = daemon
        .wait_for_status(Duration::from_secs(5), "the live claim", |s| {
            device0(s)["processes"].as_array().is_some_and(|p| p.iter().any(|p| p["pid"] == me))
        })
        .await;
    assert_eq!(device0(&status)["used_mib"], 300, "the dead pid's 4000 MiB must not count");
    let pids: Vec<&Value> = device0(&status)["processes"].as_array().unwrap().iter().map(|p| &p["pid"]).collect();
    assert!(!pids.contains(&&Value::from(dead_pid)));
    assert!(!daemon.device_dir().join(dead_pid.to_string()).exists(), "the dead pid's file is removed");
}

#[tokio::test]
async fn garbage_in_a_sim_file_is_reported_and_the_daemon_keeps_going() {
    let daemon = Daemon::start_sim(8192, "50ms");
    common::write_atomically(&daemon.device_dir().join("desktop"), "twelve hundred");
    daemon.claim("game", 700);
    let status = daemon
        .wait_for_status(Duration::from_secs(5), "a warning about the garbage", |s| {
            device0(s)["warnings"].as_array().is_some_and(|w| !w.is_empty())
        })
        .await;
    let warning = device0(&status)["warnings"][0].as_str().unwrap().to_string();
    assert!(warning.contains("desktop") && warning.contains("twelve hundred"), "{warning}");
    assert_eq!(device0(&status)["used_mib"], 700);
}

#[tokio::test]
async fn probe_none_is_degraded_with_a_reason() {
    let daemon = Daemon::start(|_| "[gpu]\nprobe = \"none\"\n".into());
    let status = daemon.status().await;
    assert_eq!(status["degraded"], true);
    assert_eq!(status["devices"], Value::Array(vec![]));
    let reason = status["degraded_reasons"][0].as_str().unwrap();
    assert!(reason.contains("CPU-only"), "{reason}");
}

#[tokio::test]
async fn auto_on_a_machine_without_gpus_falls_back_and_says_why() {
    // An empty sysfs root stands in for "no AMD card". Whether NVML opens is this machine's
    // business: the test asks NVML itself and checks the outcome that follows from the answer.
    let empty = tempfile::tempdir().unwrap();
    let root = empty.path().display().to_string();
    let daemon = Daemon::start(move |_| format!("[gpu.amd]\nsysfs_root = \"{root}\"\n"));
    let status = daemon.status().await;
    match vramgate::gpu::nvml::NvmlProbe::open(&vramgate::config::NvmlConfig::default()) {
        Err(nvml_error) => {
            assert_eq!(status["probe"], "none", "NVML cannot open here ({nvml_error}); status: {status:#}");
            assert_eq!(status["degraded"], true, "{status:#}");
            assert_eq!(status["devices"], Value::Array(vec![]), "{status:#}");
            let reasons: Vec<&str> =
                status["degraded_reasons"].as_array().unwrap().iter().filter_map(|r| r.as_str()).collect();
            assert!(reasons.iter().any(|r| r.starts_with("nvml: ")), "{reasons:?}");
            assert!(reasons.iter().any(|r| r.starts_with("amd: ")), "{reasons:?}");
        }
        Ok(_) => {
            // A machine with an NVIDIA driver: auto picks NVML (a container may still be degraded,
            // e.g. without per-process figures, so that is not asserted).
            assert_eq!(status["probe"], "nvml", "NVML opens here; status: {status:#}");
            assert!(status["devices"].as_array().is_some_and(|d| !d.is_empty()), "{status:#}");
        }
    }
}

#[tokio::test]
async fn amd_probe_reads_a_sysfs_tree_and_says_processes_are_unknown() {
    let sysfs = tempfile::tempdir().unwrap();
    let device = sysfs.path().join("card0/device");
    std::fs::create_dir_all(device.join("hwmon/hwmon0")).unwrap();
    std::fs::write(device.join("mem_info_vram_total"), (16u64 << 30).to_string()).unwrap();
    std::fs::write(device.join("mem_info_vram_used"), (13u64 << 30).to_string()).unwrap();
    std::fs::write(device.join("gpu_busy_percent"), "64").unwrap();
    std::fs::write(device.join("hwmon/hwmon0/temp1_input"), "58000").unwrap();
    let root = sysfs.path().display().to_string();
    let daemon = Daemon::start(move |_| format!("[gpu]\nprobe = \"amd\"\n[gpu.amd]\nsysfs_root = \"{root}\"\n"));
    let status = daemon.status().await;
    let d = device0(&status);
    assert_eq!(d["probe"], "amd");
    assert_eq!((d["total_mib"].as_u64(), d["used_mib"].as_u64()), (Some(16384), Some(13312)));
    assert_eq!(d["level"], "warning");
    assert_eq!((d["utilization_pct"].as_u64(), d["temperature_c"].as_i64()), (Some(64), Some(58)));
    assert_eq!(d["processes"], Value::Array(vec![]));
    assert!(d["processes_unavailable"].as_str().unwrap().contains("per-process"));
}

#[tokio::test]
async fn a_failing_probe_degrades_then_recovers() {
    let daemon = Daemon::start_sim(8192, "50ms");
    let mut events = daemon.events().await;
    let dir = daemon.device_dir();
    // A plain file where the device directory should be makes every sample fail.
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, "not a directory").unwrap();
    let failed = events.next_of("probe_failed", Duration::from_secs(5)).await;
    assert_eq!(failed["probe"], "sim");
    let status = daemon.wait_for_status(Duration::from_secs(5), "degraded", |s| s["degraded"] == true).await;
    assert!(status["degraded_reasons"][0].as_str().unwrap().contains("failing"));
    assert_eq!(status["devices"].as_array().unwrap().len(), 1, "last good readings are kept");

    std::fs::remove_file(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    let recovered = events.next_of("probe_recovered", Duration::from_secs(5)).await;
    assert!(recovered["failed_samples"].as_u64().unwrap() >= 1);
    daemon.wait_for_status(Duration::from_secs(5), "healthy again", |s| s["degraded"] == false).await;
}

#[tokio::test]
async fn metrics_and_health_endpoints() {
    let daemon = Daemon::start_sim(1000, "50ms");
    let me = std::process::id();
    daemon.claim(&me.to_string(), 800);
    daemon.wait_for_status(Duration::from_secs(5), "the claim", |s| device0(s)["used_mib"] == 800).await;
    let response = common::http::get(format!("{}/metrics", daemon.url)).await.unwrap();
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = response.text().await.unwrap();
    let mib = 1u64 << 20;
    assert!(
        text.contains(&format!("vramgate_device_total_bytes{{device=\"0\",name=\"Sim Test\"}} {}\n", 1000 * mib)),
        "{text}"
    );
    assert!(text.contains(&format!("vramgate_device_used_bytes{{device=\"0\",name=\"Sim Test\"}} {}\n", 800 * mib)));
    assert!(text.contains(&format!("vramgate_device_free_bytes{{device=\"0\",name=\"Sim Test\"}} {}\n", 200 * mib)));
    assert!(text.contains("vramgate_device_level{device=\"0\",name=\"Sim Test\"} 1\n"));
    assert!(text.contains(&format!("vramgate_process_used_bytes{{device=\"0\",pid=\"{me}\",")));
    let health = daemon.get_json("/vramgate/health").await;
    assert_eq!(health["status"], "ok");
    let missing = common::http::get(format!("{}/vramgate/nope", daemon.url)).await.unwrap();
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("/vramgate/nope"));
}

fn assert_stops_within_a_second(daemon: &mut Daemon, signal: Signal) {
    let sent = Instant::now();
    daemon.signal(signal);
    let status = daemon.wait_exit(Duration::from_secs(5)).expect("daemon did not exit");
    let took = sent.elapsed();
    assert!(took < Duration::from_secs(1), "{signal} took {took:?}; log:\n{}", daemon.log());
    assert!(status.success(), "exit status {status:?}; log:\n{}", daemon.log());
}

#[tokio::test]
async fn sigterm_stops_the_daemon_within_a_second_even_with_an_open_event_stream() {
    let mut daemon = Daemon::start_sim(8192, "50ms");
    let mut events = daemon.events().await;
    // An idle keep-alive connection too.
    let client = common::http::client();
    client.get(format!("{}/vramgate/health", daemon.url)).send().await.unwrap();
    assert_stops_within_a_second(&mut daemon, Signal::SIGTERM);
    assert!(events.ends_within(Duration::from_secs(2)).await, "the event stream is closed");
    assert!(daemon.log().contains("SIGTERM received"));
}

#[tokio::test]
async fn sigint_stops_the_daemon_within_a_second() {
    let mut daemon = Daemon::start(|_| "[gpu]\nprobe = \"none\"\n".into());
    assert_stops_within_a_second(&mut daemon, Signal::SIGINT);
}

/// Runs `serve` with a config that must make it refuse to start; its output, once it exited
/// (within a deadline: a daemon that started after all fails the test instead of hanging it).
fn serve_that_must_not_start(listen: &str, config: &std::path::Path) -> std::process::Output {
    common::output_within(
        common::vramgate().args(["serve", "--listen", listen, "--config"]).arg(config),
        Duration::from_secs(10),
    )
}

#[test]
fn a_bad_config_makes_serve_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[gpu]\nprobe = \"none\"\nwarning_pct = 95\ncritical_pct = 90\n").unwrap();
    let output = serve_that_must_not_start("127.0.0.1:0", &path);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("gpu.warning_pct") && stderr.contains("line 3"), "{stderr}");
    assert!(output.stdout.is_empty(), "it never started listening");
}

#[test]
fn a_busy_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    // Its own state directory: without one this daemon would lock (and reap leftovers recorded in)
    // the user's ~/.local/state/vramgate.
    let state = tempfile::tempdir().unwrap();
    let config = state.path().join("vramgate.toml");
    std::fs::write(&config, format!("[server]\nstate_dir = \"{}\"\n[gpu]\nprobe = \"none\"\n", state.path().display()))
        .unwrap();
    let output = serve_that_must_not_start(&address, &config);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("cannot listen on {address}")), "{stderr}");
}

#[test]
fn a_named_probe_that_cannot_start_is_a_clear_start_up_error() {
    if vramgate::gpu::nvml::NvmlProbe::open(&vramgate::config::NvmlConfig::default()).is_ok() {
        return; // This machine has NVIDIA's driver: the probe rightly starts.
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nvml.toml");
    std::fs::write(&path, format!("[server]\nstate_dir = \"{}\"\n[gpu]\nprobe = \"nvml\"\n", dir.path().display()))
        .unwrap();
    let output = serve_that_must_not_start("127.0.0.1:0", &path);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot start the GPU probe") && stderr.contains("NVML"), "{stderr}");
}

#[test]
fn serve_without_a_config_says_what_to_try_next() {
    let state = tempfile::tempdir().unwrap();
    let stderr_path = state.path().join("stderr.log");
    let mut child = common::KillOnDrop::spawn(
        common::vramgate()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("XDG_STATE_HOME", state.path())
            .env("VRAMGATE_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap()),
    );
    // The listening line comes after the hint is logged.
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.0.stdout.take().unwrap()), &mut first).unwrap();
    assert!(first.contains("listening on http://127.0.0.1:"), "{first:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.pid() as i32), Signal::SIGTERM).unwrap();
    assert!(common::wait_child(&mut child.0, Duration::from_secs(10)).is_some_and(|s| s.success()));
    let log = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(log.contains("no config file") && log.contains("vramgate serve --demo"), "{log}");
}

#[tokio::test]
async fn sighup_stops_the_daemon_within_a_second_like_a_closed_terminal() {
    let mut daemon = Daemon::start(|_| "[gpu]\nprobe = \"none\"\n".into());
    assert_stops_within_a_second(&mut daemon, Signal::SIGHUP);
}

#[tokio::test]
async fn under_nohup_sighup_is_left_ignored() {
    let state = tempfile::tempdir().unwrap();
    let mut command = std::process::Command::new("nohup");
    common::isolate(&mut command);
    let mut child = common::KillOnDrop::spawn(
        command
            .arg(common::bin())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("XDG_STATE_HOME", state.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null()),
    );
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.0.stdout.take().unwrap()), &mut first).unwrap();
    let url = first.split_whitespace().find(|w| w.starts_with("http://")).expect("listening line").to_string();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.pid() as i32), Signal::SIGHUP).unwrap();
    // It must keep serving: for a second, every health check answers and the process lives on.
    let end = std::time::Instant::now() + Duration::from_secs(1);
    while std::time::Instant::now() < end {
        assert!(child.0.try_wait().unwrap().is_none(), "a SIGHUP under nohup stopped the daemon");
        let health = common::http::get(format!("{url}/vramgate/health")).await.expect("health");
        assert!(health.status().is_success());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.pid() as i32), Signal::SIGTERM).unwrap();
    assert!(common::wait_child(&mut child.0, Duration::from_secs(10)).is_some_and(|s| s.success()));
}
