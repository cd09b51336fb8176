//! End-to-end on the NVML stand-in: the quirks real drivers have, each through the real daemon
//! with `probe = "nvml"`. A lost GPU (from start-up on, and one that answers only after NVML is
//! re-initialised), an unreadable process list holding a release, driver-reserved memory, a
//! process without a figure, memory not seen back after `release_timeout`, a process list that
//! grew between count and fill, unknown utilization and temperature, an older driver without
//! the `_v2` memory or `_v3` process calls, a `_v2` memory call that exists but cannot answer,
//! devices renumbered or gone after a re-initialisation (found by UUID), a release that waits for
//! every GPU its pids were seen on, and one warning per process without a figure.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::nvml::{self, Device, InjectedError, List, Process, State, Variant, When, code};
use common::release::PidGuard;
use common::{Daemon, fake_model, model_in, never_within};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(10);

const SECOND: Duration = Duration::from_secs(1);

/// The stand-in's directory of a daemon's temp dir (beside its sim dir, which `sim` is).
fn standin_dir(sim: &Path) -> PathBuf {
    sim.parent().expect("the sim dir is inside the daemon's temp dir").join("nvml")
}

/// The stand-in's directory of a running daemon.
fn dir_of(daemon: &Daemon) -> PathBuf {
    standin_dir(&Daemon::sim_dir_for(&daemon.dir))
}

/// Starts a daemon with `probe` on its own link to the `variant` stand-in, with `state` written
/// before it starts, plus `rest` (models, more sections).
fn start(probe: &str, variant: Variant, state: impl Fn(&Path) -> State, rest: impl Fn(&Path) -> String) -> Daemon {
    Daemon::start(|sim| {
        let dir = standin_dir(sim);
        let library = nvml::link_into(&dir, variant);
        state(sim).write_to(&dir);
        let no_amd = sim.parent().expect("temp dir").join("no-amd");
        std::fs::create_dir_all(&no_amd).expect("create the empty sysfs root");
        format!("{}{}", nvml::config(probe, &library, "20ms", &no_amd), rest(sim))
    })
}

fn device(status: &Value, index: usize) -> &Value {
    &status["devices"][index]
}

fn error(function: &str, device: Option<u32>, code: u32, when: When) -> InjectedError {
    InjectedError { function: function.into(), device, code, when }
}

fn process(pid: u32, used_mib: Option<u64>) -> Process {
    Process { device: 0, list: List::Compute, pid, used_mib, late: false }
}

/// The entry of `pid` on device `index`, if listed.
fn listed(status: &Value, index: usize, pid: u64) -> Option<&Value> {
    device(status, index)["processes"].as_array()?.iter().find(|p| p["pid"] == pid)
}

/// Asks for a memory lease of `mib` on `device` that does not wait; the code and the body.
async fn lease_now(daemon: &Daemon, device: u32, mib: u64) -> (u16, Value) {
    let body = serde_json::json!({"holder": "job", "vram": format!("{mib}MiB"), "device": device, "wait": "0"});
    daemon.post("/vramgate/leases", body).await
}

async fn metrics(daemon: &Daemon) -> String {
    common::http::get(format!("{}/metrics", daemon.url)).await.expect("GET /metrics").text().await.expect("text")
}

/// Two 8 GiB devices, 300 MiB used on each.
fn two_devices() -> Vec<Device> {
    vec![Device::new("NVIDIA Stand-in A", 8192, 300), Device::new("NVIDIA Stand-in B", 8192, 300)]
}

/// GPU 1 lost (GPU_IS_LOST on every call for it) from before start-up.
fn gpu_1_lost() -> State {
    State {
        devices: two_devices(),
        errors: vec![error("nvmlDeviceGetHandleByIndex_v2", Some(1), code::GPU_IS_LOST, When::Always)],
        ..State::default()
    }
}

/// GPU 1 lost at start-up: the daemon starts on GPU 0, GPU 1 shows the error and a degraded
/// reason and admits nothing; GPU 0's reading still moves and a lease on it is judged on it; GPU 1
/// recovers when it answers again.
#[tokio::test]
async fn a_lost_gpu_admits_nothing_while_the_other_goes_on_from_start_up_and_recovers() {
    let daemon = start("nvml", Variant::Full, |_| gpu_1_lost(), |_| String::new());
    let status = daemon
        .wait_for_status(DEADLINE, "GPU 1 failed, GPU 0 read", |s| {
            device(s, 1)["error"].is_string() && device(s, 0)["used_mib"] == 300
        })
        .await;
    assert!(device(&status, 1)["error"].as_str().is_some_and(|e| e.contains("fell off the bus")), "{status:#}");
    assert!(device(&status, 0)["error"].is_null(), "{status:#}");
    assert_eq!(status["degraded"], true);
    let reasons = status["degraded_reasons"].to_string();
    assert!(reasons.contains("GPU 1 (NVIDIA GPU 1) failing"), "{reasons}");

    // GPU 0's reading moves while GPU 1 is lost, and a lease on it is judged on it.
    let mut moved = gpu_1_lost();
    moved.devices[0].used_mib = 5000;
    moved.write_to(&dir_of(&daemon));
    daemon.wait_for_status(DEADLINE, "GPU 0's reading to move", |s| device(s, 0)["used_mib"] == 5000).await;
    let (code, body) = lease_now(&daemon, 0, 7000).await;
    assert_ne!(code, 201, "granted 7000 MiB with 3192 free: {body}");
    assert!(body.to_string().contains("3192 MiB available"), "{body}");
    let (code, body) = lease_now(&daemon, 0, 3000).await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = lease_now(&daemon, 1, 1000).await;
    assert_ne!(code, 201, "granted on a lost device: {body}");

    // It answers again: read, no longer degraded, admitting.
    State { devices: two_devices(), ..State::default() }.write_to(&dir_of(&daemon));
    let status = daemon
        .wait_for_status(DEADLINE, "GPU 1 to recover", |s| device(s, 1)["error"].is_null() && s["degraded"] == false)
        .await;
    assert_eq!(device(&status, 1)["used_mib"], 300, "{status:#}");
    let (code, body) = lease_now(&daemon, 1, 1000).await;
    assert_eq!(code, 201, "{body}");
}

/// `auto` with GPU 1 lost at start-up picks NVML (both devices, GPU 0 read) rather than falling
/// through to no GPU.
#[tokio::test]
async fn auto_picks_nvml_with_one_gpu_lost_at_start_up() {
    let daemon = start("auto", Variant::Full, |_| gpu_1_lost(), |_| String::new());
    let status = daemon.wait_for_status(DEADLINE, "GPU 0 read", |s| device(s, 0)["used_mib"] == 300).await;
    assert_eq!(status["probe"], "nvml", "{status:#}");
    assert_eq!(status["devices"].as_array().map(Vec::len), Some(2), "{status:#}");
    assert!(device(&status, 1)["error"].is_string(), "{status:#}");
    assert!(!status["degraded_reasons"].to_string().contains("no GPU found"), "{status:#}");
}

/// A GPU that answers again only once NVML is re-initialised (`until_init`): the probe shuts NVML
/// down and initialises it again, and the device's readings come back.
#[tokio::test]
async fn a_gpu_that_needs_nvml_reinitialised_comes_back() {
    let daemon =
        start("nvml", Variant::Full, |_| State { devices: two_devices(), ..State::default() }, |_| String::new());
    daemon.wait_for_status(DEADLINE, "both devices read", |s| device(s, 1)["used_mib"] == 300).await;
    // Lost from now until the next nvmlInit, with a figure that only a read after it can show.
    let mut lost = State {
        devices: two_devices(),
        errors: vec![error("nvmlDeviceGetMemoryInfo_v2", Some(1), code::GPU_IS_LOST, When::UntilInit)],
        ..State::default()
    };
    lost.devices[1].used_mib = 1234;
    lost.write_to(&dir_of(&daemon));
    let status = daemon
        .wait_for_status(DEADLINE, "GPU 1 read again after a re-initialisation", |s| {
            device(s, 1)["used_mib"] == 1234 && device(s, 1)["error"].is_null()
        })
        .await;
    assert_eq!(device(&status, 0)["used_mib"], 300, "{status:#}");
    assert!(daemon.log().contains("NVML re-initialised"), "{}", daemon.log());
}

/// A re-initialisation that fails (the driver refuses the new init) is said for every device
/// until a later one succeeds; that one brings the devices back.
#[tokio::test]
async fn a_failed_reinitialisation_is_reported_and_a_later_one_recovers() {
    let daemon =
        start("nvml", Variant::Full, |_| State { devices: two_devices(), ..State::default() }, |_| String::new());
    daemon.wait_for_status(DEADLINE, "both devices read", |s| device(s, 1)["used_mib"] == 300).await;
    // GPU 1 lost, and every init from now on refused (nvml-wrapper initialises with nvmlInit_v2).
    let refused = State {
        devices: two_devices(),
        errors: vec![
            error("nvmlDeviceGetMemoryInfo_v2", Some(1), code::GPU_IS_LOST, When::Always),
            error("nvmlInit_v2", None, code::DRIVER_NOT_LOADED, When::Always),
        ],
        ..State::default()
    };
    refused.write_to(&dir_of(&daemon));
    let status = daemon
        .wait_for_status(DEADLINE, "the failed re-initialisation said", |s| {
            device(s, 0)["error"].as_str().is_some_and(|e| e.contains("re-initialisation failed"))
        })
        .await;
    assert!(device(&status, 1)["error"].as_str().is_some_and(|e| e.contains("re-initialisation failed")), "{status:#}");
    assert!(daemon.log().contains("NVML re-initialisation failed"), "{}", daemon.log());
    // The driver answers again: the next try (after its backoff, 5 s) brings both back.
    State { devices: two_devices(), ..State::default() }.write_to(&dir_of(&daemon));
    daemon
        .wait_for_status(3 * DEADLINE, "both devices back", |s| {
            device(s, 0)["error"].is_null() && device(s, 1)["error"].is_null()
        })
        .await;
}

/// Polls without blocking the runtime (the unload under test runs on it) until `pid` is gone.
async fn wait_pid_gone(pid: u32, deadline: Duration) {
    let end = Instant::now() + deadline;
    while vramgate::gpu::pid_is_alive(pid) {
        assert!(Instant::now() < end, "pid {pid} still alive after {deadline:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One 10000 MiB device whose processes are the fake model servers' claims.
fn claimed(sim: &Path) -> State {
    State {
        devices: vec![Device::new("NVIDIA Stand-in 10G", 10000, 0)],
        claims: Some(sim.to_path_buf()),
        ..State::default()
    }
}

/// NO_PERMISSION on both process-list calls: unload stays `unloading` after the server exited,
/// with a warning, until a readable list shows its pid gone.
#[tokio::test]
async fn an_unreadable_process_list_holds_a_release_until_a_readable_list_shows_it_gone() {
    let daemon =
        start("nvml", Variant::Full, claimed, |sim| fake_model(sim, "a", 1000, "", "release_timeout = \"60s\""));
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 200, "{body}");
    let pid = body["pid"].as_u64().expect("a pid") as u32;
    let _guard = PidGuard::new(pid);
    let mut refused = claimed(&Daemon::sim_dir_for(&daemon.dir));
    refused.errors = ["nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetGraphicsRunningProcesses_v3"]
        .into_iter()
        .map(|f| error(f, None, code::NO_PERMISSION, When::Always))
        .collect();
    refused.write_to(&dir_of(&daemon));
    let status = daemon
        .wait_for_status(DEADLINE, "the list reported unreadable", |s| {
            device(s, 0)["processes_unavailable"].as_str().is_some_and(|r| r.contains("permission"))
        })
        .await;
    assert_eq!(device(&status, 0)["used_mib"], 1000, "the memory is in use: {status:#}");

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
    wait_pid_gone(pid, DEADLINE).await;
    let unloaded = |s: &Value| model_in(s, "a")["state"] == "unloaded";
    never_within(&daemon, SECOND, "released while the process list was unreadable", unloaded).await;
    assert!(daemon.log().contains("cannot read the GPU process list during release"), "{}", daemon.log());
    let readable_again = Instant::now();
    claimed(&Daemon::sim_dir_for(&daemon.dir)).write_to(&dir_of(&daemon));
    let (code, body, returned) = unload.await.expect("the unload task");
    assert_eq!((code, body["state"].as_str()), (200, Some("unloaded")), "{body}");
    assert!(returned >= readable_again, "unloaded before a readable list showed the pid gone");
}

/// `nvmlMemory_v2_t` with 600 MiB reserved: used is 900, not 300, and a lease that fits only if
/// the reservation is ignored is refused.
#[tokio::test]
async fn reserved_memory_is_counted_as_used() {
    let state = |_: &Path| State {
        devices: vec![Device { reserved_mib: 600, free_mib: Some(7292), ..Device::new("NVIDIA Reserved", 8192, 300) }],
        ..State::default()
    };
    let daemon = start("nvml", Variant::Full, state, |_| String::new());
    let status = daemon.wait_for_status(DEADLINE, "the device read", |s| device(s, 0)["total_mib"] == 8192).await;
    assert_eq!(
        (device(&status, 0)["used_mib"].as_u64(), device(&status, 0)["free_mib"].as_u64()),
        (Some(900), Some(7292))
    );
    let (code, body) = lease_now(&daemon, 0, 7380).await;
    assert_ne!(code, 201, "granted 7380 MiB with 7292 free: {body}");
    let (code, body) = lease_now(&daemon, 0, 7292).await;
    assert_eq!(code, 201, "{body}");
}

/// The model server's pid listed with `na`: `null` in status, absent from `/metrics`, the model
/// counted once at its size with a warning, and nothing measured.
#[tokio::test]
async fn a_model_process_without_a_figure_is_null_absent_from_metrics_and_counted_once() {
    let one = |used| State { devices: vec![Device::new("NVIDIA Stand-in 10G", 10000, used)], ..State::default() };
    // Pinned: a lease that does not fit must be refused, not make room by evicting it.
    let daemon = start("nvml", Variant::Full, |_| one(0), |sim| fake_model(sim, "a", 3000, "", "pinned = true"));
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 200, "{body}");
    let pid = body["pid"].as_u64().expect("a pid");
    let _guard = PidGuard::new(pid as u32);
    let mut blind = one(3000);
    blind.processes = vec![process(pid as u32, None)];
    blind.write_to(&dir_of(&daemon));
    let status = daemon
        .wait_for_status(DEADLINE, "the model's process listed without a figure", |s| {
            listed(s, 0, pid).is_some_and(|p| p["used_mib"].is_null() && p["model"] == "a")
        })
        .await;
    assert_eq!(device(&status, 0)["used_mib"], 3000, "{status:#}");
    let warnings: Vec<String> = device(&status, 0)["warnings"]
        .as_array()
        .expect("warnings")
        .iter()
        .filter_map(|w| w.as_str().map(str::to_string))
        .collect();
    let about_pid: Vec<&String> = warnings.iter().filter(|w| w.contains(&format!("pid {pid}"))).collect();
    assert_eq!(about_pid.len(), 1, "one warning per device and pid: {warnings:?}");
    assert!(about_pid[0].starts_with(&format!("pid {pid} of model a: no memory figure")), "{warnings:?}");
    assert!(model_in(&status, "a")["measured_mib"].is_null(), "nothing measured: {status:#}");
    let text = metrics(&daemon).await;
    assert!(text.contains("vramgate_device_used_bytes"), "{text}");
    assert!(!text.contains(&format!("pid=\"{pid}\"")), "a sample for a process without a figure: {text}");
    // Counted once: 10000 − 3000 leaves 7000, not 4000.
    let (code, body) = lease_now(&daemon, 0, 7000).await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(daemon.model("a").await["state"], "ready");
}

/// The driver keeps listing a's pid (and its memory) after a exited and `release_timeout` passed:
/// b, which needs a's memory, waits until a reading shows it gone.
#[tokio::test]
async fn memory_not_back_after_release_timeout_holds_the_next_load_until_a_reading_shows_it_gone() {
    let daemon = start("nvml", Variant::Full, claimed, |sim| {
        [fake_model(sim, "a", 6000, "", "release_timeout = \"100ms\""), fake_model(sim, "b", 6000, "", "")].concat()
    });
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 200, "{body}");
    let pid = body["pid"].as_u64().expect("a pid") as u32;
    let _guard = PidGuard::new(pid);
    daemon.wait_for_status(DEADLINE, "a's server listed", |s| listed(s, 0, u64::from(pid)).is_some()).await;
    // From now on the driver lists a's pid with its 6000 MiB whatever happens to the process.
    let mut stuck = State { devices: vec![Device::new("NVIDIA Stand-in 10G", 10000, 6000)], ..State::default() };
    stuck.processes = vec![process(pid, Some(6000))];
    stuck.write_to(&dir_of(&daemon));
    let load_b = tokio::spawn({
        let url = daemon.url.clone();
        async move {
            let response = common::http::client()
                .post(format!("{url}/vramgate/models/b/load"))
                .timeout(30 * SECOND)
                .send()
                .await
                .expect("load b");
            response.status().as_u16()
        }
    });
    wait_pid_gone(pid, DEADLINE).await;
    daemon
        .wait_for_status(DEADLINE, "a unloaded after its release_timeout", |s| model_in(s, "a")["state"] == "unloaded")
        .await;
    let started = |s: &Value| matches!(model_in(s, "b")["state"].as_str(), Some("loading" | "ready"));
    never_within(&daemon, SECOND, "b started while the driver still showed a's memory", started).await;
    // The driver shows a's memory back: b starts.
    claimed(&Daemon::sim_dir_for(&daemon.dir)).write_to(&dir_of(&daemon));
    assert_eq!(load_b.await.expect("the load task"), 200);
}

/// A list that grew by more than nvml-wrapper's headroom of 5 between the count and the fill
/// (INSUFFICIENT_SIZE) once: it is read after a retry, every process in status.
#[tokio::test]
async fn a_process_list_that_grew_between_count_and_fill_is_read_after_a_retry() {
    let pids: Vec<u32> = (0..7).map(|i| 70_000 + i).collect();
    let daemon = Daemon::start(|sim| {
        let dir = standin_dir(sim);
        let library = nvml::link_into(&dir, Variant::Full);
        let state = State {
            devices: vec![Device::new("NVIDIA Busy", 10000, 700)],
            processes: vec![process(pids[0], Some(100))],
            ..State::default()
        };
        let late: String = pids[1..].iter().map(|pid| format!("process 0 compute {pid} 100MiB late_once\n")).collect();
        state.write_with(&dir, &late);
        let no_amd = sim.parent().expect("temp dir").join("no-amd");
        std::fs::create_dir_all(&no_amd).expect("create the empty sysfs root");
        nvml::config("nvml", &library, "20ms", &no_amd)
    });
    let status = daemon.wait_for_status(DEADLINE, "the device read", |s| device(s, 0)["total_mib"] == 10000).await;
    assert!(device(&status, 0)["processes_unavailable"].is_null(), "{status:#}");
    let listed: Vec<u64> = device(&status, 0)["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .filter_map(|p| p["pid"].as_u64())
        .collect();
    assert_eq!(listed, pids.iter().map(|&p| u64::from(p)).collect::<Vec<_>>(), "{status:#}");
}

/// Utilization and temperature NVML cannot give (NOT_SUPPORTED): `null` in status and no sample
/// in `/metrics`, never 0; the device that has them exports them.
#[tokio::test]
async fn unknown_utilization_and_temperature_are_null_and_absent_from_metrics() {
    let state = |_: &Path| State {
        devices: vec![
            Device { utilization_pct: Some(12), temperature_c: Some(41), ..Device::new("NVIDIA Known", 8192, 0) },
            Device { utilization_pct: None, temperature_c: None, ..Device::new("NVIDIA Unknown", 8192, 0) },
        ],
        ..State::default()
    };
    let daemon = start("nvml", Variant::Full, state, |_| String::new());
    let status = daemon.wait_for_status(DEADLINE, "both devices", |s| device(s, 1)["total_mib"] == 8192).await;
    assert_eq!(
        (device(&status, 0)["utilization_pct"].as_u64(), device(&status, 0)["temperature_c"].as_i64()),
        (Some(12), Some(41))
    );
    assert!(
        device(&status, 1)["utilization_pct"].is_null() && device(&status, 1)["temperature_c"].is_null(),
        "{status:#}"
    );
    let text = metrics(&daemon).await;
    for metric in ["vramgate_device_utilization_percent", "vramgate_device_temperature_celsius"] {
        let samples: Vec<&str> = text.lines().filter(|l| l.starts_with(&format!("{metric}{{"))).collect();
        assert_eq!(samples.len(), 1, "{metric} only for the device that has it: {text}");
        assert!(samples[0].contains("device=\"0\""), "{samples:?}");
    }
}

/// What both older-driver tests check: the device's figures and its processes (both lists), with
/// figures.
async fn reads_like_the_full_library(daemon: &Daemon, used_mib: u64) {
    let me = u64::from(std::process::id());
    let status = daemon.wait_for_status(DEADLINE, "the device and its process", |s| listed(s, 0, me).is_some()).await;
    assert!(device(&status, 0)["error"].is_null(), "{status:#}");
    assert!(device(&status, 0)["processes_unavailable"].is_null(), "{status:#}");
    assert_eq!(device(&status, 0)["used_mib"].as_u64(), Some(used_mib), "{status:#}");
    assert_eq!(device(&status, 0)["free_mib"], 7292, "{status:#}");
    assert_eq!(listed(&status, 0, me).expect("listed")["used_mib"], 250, "{status:#}");
    let parent = u64::from(std::os::unix::process::parent_id());
    assert_eq!(listed(&status, 0, parent).expect("the graphics process")["used_mib"], 50, "{status:#}");
    assert_eq!(status["degraded"], false, "{status:#}");
}

/// 300 MiB used, 600 reserved, 7292 free, the test's own pid on the compute list and its
/// parent's on the graphics list.
fn older_driver_state(_: &Path) -> State {
    State {
        devices: vec![Device {
            reserved_mib: 600,
            free_mib: Some(7292),
            ..Device::new("NVIDIA Older Driver", 8192, 300)
        }],
        processes: vec![
            process(std::process::id(), Some(250)),
            Process { list: List::Graphics, ..process(std::os::unix::process::parent_id(), Some(50)) },
        ],
        ..State::default()
    }
}

/// A driver without `nvmlDeviceGetMemoryInfo_v2`: memory from the v1 call (whose used includes
/// the reservation), processes as with the full library.
#[tokio::test]
async fn without_memory_v2_the_v1_memory_call_is_used() {
    let daemon = start("nvml", Variant::WithoutMemoryV2, older_driver_state, |_| String::new());
    reads_like_the_full_library(&daemon, 900).await;
}

/// A driver without the `_v3` process calls: the lists come from `_v2`.
#[tokio::test]
async fn without_v3_process_calls_the_v2_lists_are_used() {
    let daemon = start("nvml", Variant::WithoutV3, older_driver_state, |_| String::new());
    reads_like_the_full_library(&daemon, 900).await;
}

/// A driver whose `nvmlDeviceGetMemoryInfo_v2` exists but answers `NOT_SUPPORTED`, `UNKNOWN` or
/// `ARGUMENT_VERSION_MISMATCH` (a struct version it does not know): memory from the v1 call, as
/// when the symbol is missing.
#[tokio::test]
async fn a_v2_memory_call_that_cannot_answer_falls_back_to_v1() {
    for answer in [code::NOT_SUPPORTED, code::UNKNOWN, code::ARGUMENT_VERSION_MISMATCH] {
        let refusing = |sim: &Path| State {
            errors: vec![error("nvmlDeviceGetMemoryInfo_v2", None, answer, When::Always)],
            ..older_driver_state(sim)
        };
        let daemon = start("nvml", Variant::Full, refusing, |_| String::new());
        reads_like_the_full_library(&daemon, 900).await;
    }
}

/// Two devices told apart by UUID, 1000 and 5000 MiB used.
fn by_uuid(order: &[&str]) -> State {
    let card = |uuid: &str| match uuid {
        "GPU-aaaa" => Device { uuid: Some(uuid.into()), ..Device::new("NVIDIA Card A", 8192, 1000) },
        _ => Device { uuid: Some(uuid.into()), ..Device::new("NVIDIA Card B", 8192, 5000) },
    };
    State {
        devices: order.iter().map(|u| card(u)).collect(),
        // Every device lost until NVML is initialised again, which renumbers them.
        errors: vec![error("nvmlDeviceGetMemoryInfo_v2", None, code::GPU_IS_LOST, When::UntilInit)],
        ..State::default()
    }
}

/// NVML numbers the devices afresh when it is re-initialised (here: in the other order): each is
/// found again by its UUID, so GPU 0's figures stay card A's and never become card B's.
#[tokio::test]
async fn after_a_reinitialisation_devices_are_found_by_uuid_not_index() {
    let daemon = start(
        "nvml",
        Variant::Full,
        |_| State { errors: vec![], ..by_uuid(&["GPU-aaaa", "GPU-bbbb"]) },
        |_| String::new(),
    );
    daemon.wait_for_status(DEADLINE, "both cards read", |s| device(s, 1)["used_mib"] == 5000).await;
    by_uuid(&["GPU-bbbb", "GPU-aaaa"]).write_to(&dir_of(&daemon));
    let end = Instant::now() + DEADLINE;
    loop {
        let status = daemon.status().await;
        for index in [0, 1] {
            let used = device(&status, index)["used_mib"].as_u64();
            assert_eq!(used, Some([1000, 5000][index]), "GPU {index} shows another card's figures: {status:#}");
        }
        let read = |i| device(&status, i)["error"].is_null();
        if read(0) && read(1) && daemon.log().contains("NVML re-initialised") {
            assert_eq!(device(&status, 0)["name"], "NVIDIA Card A", "{status:#}");
            assert_eq!(device(&status, 1)["name"], "NVIDIA Card B", "{status:#}");
            break;
        }
        assert!(Instant::now() < end, "the cards were not read again: {status:#}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A card that is gone after the re-initialisation (the one after it moved down to its index):
/// it fails, naming its UUID, and the other card is read where NVML lists it now.
#[tokio::test]
async fn a_card_gone_after_a_reinitialisation_fails_and_the_others_are_found() {
    let daemon = start(
        "nvml",
        Variant::Full,
        |_| State { errors: vec![], ..by_uuid(&["GPU-aaaa", "GPU-bbbb"]) },
        |_| String::new(),
    );
    daemon.wait_for_status(DEADLINE, "both cards read", |s| device(s, 1)["used_mib"] == 5000).await;
    by_uuid(&["GPU-bbbb"]).write_to(&dir_of(&daemon));
    let status = daemon
        .wait_for_status(DEADLINE, "card A gone, card B read at its new index", |s| {
            device(s, 0)["error"].as_str().is_some_and(|e| e.contains("GPU-aaaa")) && device(s, 1)["error"].is_null()
        })
        .await;
    assert!(device(&status, 0)["error"].as_str().is_some_and(|e| e.contains("left the bus")), "{status:#}");
    assert_eq!(device(&status, 0)["used_mib"], 1000, "its last good reading, marked failed: {status:#}");
    assert_eq!(device(&status, 1)["used_mib"], 5000, "{status:#}");
    assert_eq!(device(&status, 1)["name"], "NVIDIA Card B", "{status:#}");
}

/// Two 10000 MiB devices whose processes are the fake model servers' claims (on device 0), plus
/// `extra` listed processes.
fn two_claimed(sim: &Path, extra: Vec<Process>) -> State {
    State {
        devices: vec![Device::new("NVIDIA Stand-in A", 10000, 0), Device::new("NVIDIA Stand-in B", 10000, 0)],
        processes: extra,
        claims: Some(sim.to_path_buf()),
        ..State::default()
    }
}

/// A model server placed on GPU 0 whose pid was also seen on GPU 1 (a server split over two
/// GPUs): with GPU 1's lists unreadable, GPU 0's readable list showing the pid gone does not
/// complete the release; GPU 1 readable again, without the pid, does.
#[tokio::test]
async fn a_release_waits_for_every_device_its_pids_were_seen_on() {
    let daemon = start(
        "nvml",
        Variant::Full,
        |sim| two_claimed(sim, vec![]),
        |sim| fake_model(sim, "a", 1000, "", "device = 0\nrelease_timeout = \"60s\""),
    );
    let sim = Daemon::sim_dir_for(&daemon.dir);
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 200, "{body}");
    let pid = body["pid"].as_u64().expect("a pid") as u32;
    let _guard = PidGuard::new(pid);
    let on_gpu_1 = Process { device: 1, ..process(pid, Some(500)) };
    two_claimed(&sim, vec![on_gpu_1.clone()]).write_to(&dir_of(&daemon));
    daemon
        .wait_for_status(DEADLINE, "the server's pid on both GPUs", |s| {
            listed(s, 0, u64::from(pid)).is_some_and(|p| p["model"] == "a")
                && listed(s, 1, u64::from(pid)).is_some_and(|p| p["model"] == "a")
        })
        .await;
    let mut refused = two_claimed(&sim, vec![on_gpu_1]);
    refused.errors = ["nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetGraphicsRunningProcesses_v3"]
        .into_iter()
        .map(|f| error(f, Some(1), code::NO_PERMISSION, When::Always))
        .collect();
    refused.write_to(&dir_of(&daemon));
    daemon
        .wait_for_status(DEADLINE, "GPU 1's list reported unreadable", |s| {
            device(s, 1)["processes_unavailable"].as_str().is_some_and(|r| r.contains("permission"))
        })
        .await;

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
    wait_pid_gone(pid, DEADLINE).await;
    daemon.wait_for_status(DEADLINE, "GPU 0 read without the pid", |s| listed(s, 0, u64::from(pid)).is_none()).await;
    let unloaded = |s: &Value| model_in(s, "a")["state"] == "unloaded";
    never_within(&daemon, SECOND, "released while GPU 1's process list was unreadable", unloaded).await;
    assert!(daemon.log().contains("cannot read the GPU process list during release"), "{}", daemon.log());
    let readable_again = Instant::now();
    two_claimed(&sim, vec![]).write_to(&dir_of(&daemon));
    let (code, body, returned) = unload.await.expect("the unload task");
    assert_eq!((code, body["state"].as_str()), (200, Some("unloaded")), "{body}");
    assert!(returned >= readable_again, "unloaded before GPU 1's readable list showed the pid gone");
}
