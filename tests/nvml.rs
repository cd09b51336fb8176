//! End-to-end on the NVML path: the real daemon with `probe = "nvml"` loads the stand-in driver
//! library (tests/fixtures/nvml_standin/, built by tests/common/nvml.rs) through `[gpu.nvml]
//! library` and nvml-wrapper, as it would load NVIDIA's. Devices, levels and per-process
//! attribution reach status; a model is admitted, measured and evicted with its memory seen back;
//! a library that cannot be loaded is named in the error, and `auto` falls through keeping why.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::nvml::{self, Device, InjectedError, List, Process, State, Variant, When, code};
use common::{Daemon, KillOnDrop, fake_model, model_in};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(10);

/// The stand-in's directory of a daemon's temp dir (beside its sim dir, which `sim` is).
fn standin_dir(sim: &Path) -> PathBuf {
    sim.parent().expect("the sim dir is inside the daemon's temp dir").join("nvml")
}

/// Starts a daemon on its own link to the stand-in, with `state` written before it starts, plus
/// `rest` (models, more sections).
fn start(probe: &str, state: impl Fn(&Path) -> State, rest: impl Fn(&Path) -> String) -> Daemon {
    Daemon::start(|sim| {
        let dir = standin_dir(sim);
        let library = nvml::link_into(&dir, Variant::Full);
        state(sim).write_to(&dir);
        let no_amd = sim.parent().expect("temp dir").join("no-amd");
        std::fs::create_dir_all(&no_amd).expect("create the empty sysfs root");
        format!("{}{}", nvml::config(probe, &library, "20ms", &no_amd), rest(sim))
    })
}

fn device(status: &Value, index: usize) -> &Value {
    &status["devices"][index]
}

fn pids_on(status: &Value, index: usize) -> Vec<u64> {
    device(status, index)["processes"]
        .as_array()
        .map_or(vec![], |p| p.iter().filter_map(|p| p["pid"].as_u64()).collect())
}

/// Two devices with the figures, levels, names and process lists the stand-in reports; a rewrite
/// of its state while the daemon runs shows in the next samples.
#[tokio::test]
async fn two_devices_with_levels_and_processes_reach_status() {
    let sleeper = KillOnDrop::spawn(std::process::Command::new("sleep").arg("60"));
    let me = std::process::id();
    let other = sleeper.pid();
    let state = move || State {
        driver: Some("550.54.15".into()),
        devices: vec![
            Device {
                utilization_pct: Some(12),
                temperature_c: Some(41),
                ..Device::new("NVIDIA GeForce RTX 4070", 12282, 1000)
            },
            Device {
                utilization_pct: None,
                temperature_c: None,
                mig: true,
                ..Device::new("NVIDIA A100-SXM4-80GB MIG 3g.40gb", 40960, 32768)
            },
        ],
        processes: vec![
            Process { device: 1, list: List::Compute, pid: me, used_mib: Some(2000), late: false },
            Process { device: 1, list: List::Graphics, pid: other, used_mib: Some(300), late: false },
        ],
        ..State::default()
    };
    let daemon = start("nvml", |_| state(), |_| String::new());
    let status = daemon
        .wait_for_status(DEADLINE, "both stand-in devices", |s| s["devices"].as_array().is_some_and(|d| d.len() == 2))
        .await;
    assert_eq!(status["degraded"], false, "{status:#}");
    let (first, second) = (device(&status, 0), device(&status, 1));
    assert_eq!(first["probe"], "nvml");
    assert_eq!(first["name"], "NVIDIA GeForce RTX 4070");
    assert_eq!((first["total_mib"].as_u64(), first["used_mib"].as_u64()), (Some(12282), Some(1000)));
    assert_eq!(first["free_mib"].as_u64(), Some(11282));
    assert_eq!((first["utilization_pct"].as_u64(), first["temperature_c"].as_i64()), (Some(12), Some(41)));
    assert_eq!(first["level"], "ok");
    assert_eq!(first["processes"].as_array().map(Vec::len), Some(0));
    assert_eq!(second["name"], "NVIDIA A100-SXM4-80GB MIG 3g.40gb");
    assert_eq!(second["level"], "warning", "32768 of 40960 MiB is 80 %");
    assert!(
        second["utilization_pct"].is_null() && second["temperature_c"].is_null(),
        "NOT_SUPPORTED is unknown: {second}"
    );
    let processes = second["processes"].as_array().expect("processes");
    let entry =
        |pid: u32| processes.iter().find(|p| p["pid"] == pid).unwrap_or_else(|| panic!("pid {pid} in {second}"));
    assert_eq!(entry(me)["used_mib"], 2000);
    assert_eq!(entry(other)["used_mib"], 300);
    assert_eq!(entry(other)["name"], "sleep", "named from /proc");
    assert!(entry(me)["model"].is_null(), "no model runs as the test");

    // The driver's figures move: the next samples follow.
    let mut moved = state();
    moved.devices[1].used_mib = 37000;
    moved.processes.retain(|p| p.pid != other);
    moved.write_to(&standin_dir(&Daemon::sim_dir_for(&daemon.dir)));
    let status = daemon
        .wait_for_status(DEADLINE, "device 1 critical without the sleeper", |s| {
            device(s, 1)["level"] == "critical" && !pids_on(s, 1).contains(&u64::from(other))
        })
        .await;
    assert_eq!(device(&status, 1)["used_mib"], 37000);
    assert_eq!(pids_on(&status, 1), vec![u64::from(me)]);
}

/// The sim scenario on NVML: a model is admitted on GPU 0, its server's pid is attributed to it
/// and its footprint measured from the driver's figure; a second model that does not fit beside
/// it evicts it, and once the driver no longer lists the first server's pid its memory is free.
#[tokio::test]
async fn a_model_is_measured_evicted_and_its_memory_seen_back() {
    let daemon = start(
        "nvml",
        |sim| State {
            devices: vec![
                Device::new("NVIDIA RTX Stand-in 10G", 10000, 200),
                Device::new("NVIDIA Stand-in 8G", 8000, 4000),
            ],
            // The fake model servers claim through sim files; the stand-in lists each live
            // claimant as a compute process on its device, as the driver would.
            claims: Some(sim.to_path_buf()),
            ..State::default()
        },
        |sim| [fake_model(sim, "a", 6000, "", "device = 0"), fake_model(sim, "b", 6000, "", "device = 0")].concat(),
    );
    let mut events = daemon.events().await;
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 200, "{body}");
    let a = daemon.model("a").await;
    let a_pid = a["pid"].as_u64().expect("a's server pid");
    let status = daemon
        .wait_for_status(DEADLINE, "a's server attributed on GPU 0", |s| {
            device(s, 0)["processes"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["pid"] == a_pid && p["model"] == "a" && p["used_mib"] == 6000))
        })
        .await;
    assert_eq!(device(&status, 0)["used_mib"], 6200, "the claim counts as used: {status:#}");
    assert_eq!(device(&status, 0)["free_mib"], 3800);
    let a = daemon.wait_for_status(DEADLINE, "a measured", |s| model_in(s, "a")["measured_mib"] == 6000).await;
    assert_eq!(model_in(&a, "a")["device"], 0);

    let (code, body) = daemon.load("b").await;
    assert_eq!(code, 200, "{body}");
    loop {
        let event = events.next_of("model_state", DEADLINE).await;
        if event["model"] == "a" && event["to"] == "unloading" {
            assert_eq!(event["reason"], "evicted_for:b");
            break;
        }
    }
    let b_pid = daemon.model("b").await["pid"].as_u64().expect("b's server pid");
    // The driver's figures are read call by call, so one sample may be taken across a's exit:
    // wait for a sample that shows it gone from both the list and the used memory.
    let status = daemon
        .wait_for_status(DEADLINE, "only b's server on GPU 0, a's memory back", |s| {
            pids_on(s, 0) == vec![b_pid] && device(s, 0)["used_mib"] == 6200
        })
        .await;
    assert_eq!(model_in(&status, "a")["state"], "unloaded");
    assert_eq!(model_in(&status, "b")["state"], "ready");
    let status = daemon
        .wait_for_status(DEADLINE, "b measured from the driver", |s| model_in(s, "b")["measured_mib"] == 6000)
        .await;
    assert_eq!(device(&status, 0)["processes"][0]["model"], "b");
}

/// Without `[gpu.nvml] library`, the system's `libnvidia-ml.so.1` is loaded from wherever the
/// dynamic loader looks: here `LD_LIBRARY_PATH`, which finds the stand-in under that name.
#[tokio::test]
async fn the_default_library_is_found_on_the_loader_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let standin = dir.path().join("driver");
    nvml::link_into(&standin, Variant::Full);
    State { devices: vec![Device::new("NVIDIA On The Loader Path", 6144, 512)], ..State::default() }.write_to(&standin);
    let config = dir.path().join("vramgate.toml");
    std::fs::write(&config, "[gpu]\nprobe = \"nvml\"\nsample_interval = \"20ms\"\nreserve_mib = 0\n")
        .expect("write config");
    let mut serve = common::vramgate();
    serve
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env("XDG_STATE_HOME", dir.path().join("state"))
        .env("LD_LIBRARY_PATH", &standin)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("stderr.log")).expect("stderr file"));
    let mut daemon = KillOnDrop::spawn(&mut serve);
    let stdout = daemon.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(DEADLINE).expect("the daemon reports its address");
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap_or_else(|| {
        let log = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
        panic!("no URL in {line:?}; stderr:\n{log}")
    });
    let end = std::time::Instant::now() + DEADLINE;
    loop {
        let status: Value = common::http::get(format!("{url}/vramgate/status"))
            .await
            .expect("GET status")
            .json()
            .await
            .expect("status JSON");
        assert_eq!(status["probe"], "nvml", "{status:#}");
        if device(&status, 0)["name"] == "NVIDIA On The Loader Path" {
            break;
        }
        assert!(std::time::Instant::now() < end, "no stand-in device within {DEADLINE:?}: {status:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `vramgate serve` with `probe = "nvml"` on `library`, in `dir`: it must fail; what it said.
fn serve_must_fail(dir: &Path, library: &Path) -> String {
    let config = dir.join("vramgate.toml");
    std::fs::write(&config, nvml::config("nvml", library, "20ms", dir)).expect("write config");
    let output = common::output(
        common::vramgate()
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .env("XDG_STATE_HOME", dir.join("state")),
    );
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "serve must fail; stderr:\n{stderr}");
    stderr
}

/// A configured library that does not exist: `probe = "nvml"` stops the daemon with an error that
/// names the path tried and the key to set.
#[test]
fn a_library_that_cannot_be_loaded_is_named_with_the_key_to_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no-driver-here/libnvidia-ml.so.1");
    let stderr = serve_must_fail(dir.path(), &missing);
    assert!(stderr.contains(&missing.display().to_string()), "names the path tried:\n{stderr}");
    assert!(stderr.contains("[gpu.nvml] library"), "says what to set:\n{stderr}");
    assert!(stderr.contains("/usr/lib/wsl/lib/libnvidia-ml.so.1"), "gives WSL's path:\n{stderr}");
}

/// NVML that loads but lists no device: `probe = "nvml"` refuses to start, saying so.
#[test]
fn a_library_that_lists_no_device_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let standin = dir.path().join("nvml");
    let library = nvml::link_into(&standin, Variant::Full);
    nvml::State::default().write_to(&standin);
    let stderr = serve_must_fail(dir.path(), &library);
    assert!(stderr.contains("lists no device"), "says why:\n{stderr}");
}

/// `auto` over NVML that cannot start (a file that is no library; a driver that is not loaded):
/// the daemon runs CPU-only and keeps NVML's reason, with the library's path, in
/// `degraded_reasons`.
#[tokio::test]
async fn auto_falls_through_a_broken_library_keeping_the_reason() {
    let daemon = Daemon::start(|sim| {
        let dir = standin_dir(sim);
        std::fs::create_dir_all(&dir).expect("create dir");
        let garbage = dir.join("libnvidia-ml.so.1");
        std::fs::write(&garbage, "not a shared object").expect("write garbage");
        nvml::config("auto", &garbage, "20ms", &dir)
    });
    let status = daemon.status().await;
    assert_eq!(status["degraded"], true, "{status:#}");
    let reasons = status["degraded_reasons"].to_string();
    assert!(reasons.contains("nvml: NVML unavailable: cannot load the NVML library"), "{reasons}");
    assert!(reasons.contains("nvml/libnvidia-ml.so.1"), "{reasons}");
    assert_eq!(status["devices"].as_array().map(Vec::len), Some(0), "{status:#}");

    let daemon = start(
        "auto",
        |_| State {
            devices: vec![Device::new("NVIDIA Unloaded", 8000, 0)],
            errors: vec![InjectedError {
                function: "nvmlInit_v2".into(),
                device: None,
                code: code::DRIVER_NOT_LOADED,
                when: When::Always,
            }],
            ..State::default()
        },
        |_| String::new(),
    );
    let status = daemon.status().await;
    let reasons = status["degraded_reasons"].to_string();
    assert!(reasons.contains("NVIDIA driver is not loaded"), "{reasons}");
    assert!(reasons.contains("no GPU found"), "{reasons}");
    assert_eq!(status["devices"].as_array().map(Vec::len), Some(0), "{status:#}");
}
