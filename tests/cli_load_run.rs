//! End-to-end: `vramgate load`, `unload` and `run` as a user sees them. `run` checks its command
//! before asking for a lease, sets the device and the lease for it and exits with its status;
//! `load` and `run` say what they wait for while queued, with current numbers, and give up after
//! their wait (a bare number is seconds; durations in messages are rounded); a second `unload`
//! says the model was not loaded; `run --help` lists exit codes and the environment.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::lines::lines_of;
use common::{Daemon, fake_model, sim_config, wait_child};
use serde_json::{Value, json};

const SECOND: Duration = Duration::from_secs(1);

/// A 10000 MiB sim device without a reserve, sampled every 50 ms, with `rest` appended (models,
/// a `[scheduler]` section).
fn start(rest: impl Fn(&std::path::Path) -> String) -> Daemon {
    Daemon::start(|sim| format!("{}{}", sim_config(sim, 10000, "50ms", "reserve_mib = 0"), rest(sim)))
}

/// `vramgate ARGS` against `daemon` only: its URL, and a home and state dir of its own, so that
/// nothing reaches a user's daemon or files.
fn cli(daemon: &Daemon, args: &[&str]) -> Command {
    let home = daemon.dir.path().join("cli-home");
    std::fs::create_dir_all(&home).expect("cli home");
    let mut command = common::vramgate();
    command
        .args(args)
        .env("VRAMGATE_URL", &daemon.url)
        .env("HOME", &home)
        .env("XDG_STATE_HOME", home.join("state"))
        .stdin(Stdio::null());
    command
}

/// Runs a CLI command to the end, within `deadline`: its exit code, stdout and stderr.
fn finish(mut command: Command, deadline: Duration) -> (Option<i32>, String, String) {
    let mut child = common::KillOnDrop::spawn(command.stdout(Stdio::piped()).stderr(Stdio::piped()));
    let stdout = lines_of(child.0.stdout.take().expect("stdout"));
    let stderr = lines_of(child.0.stderr.take().expect("stderr"));
    let status = wait_child(&mut child.0, deadline);
    drop(child);
    let status = status.unwrap_or_else(|| panic!("vramgate did not finish within {deadline:?}"));
    let collect = |lines: mpsc::Receiver<String>| lines.iter().collect::<Vec<_>>().join("\n");
    (status.code(), collect(stdout), collect(stderr))
}

/// The next line of `lines` that satisfies `wanted`, or a panic naming what was seen, after
/// `deadline`. Lines before it are appended to `seen`.
fn line_where(
    lines: &mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    deadline: Duration,
    what: &str,
    wanted: impl Fn(&str) -> bool,
) -> String {
    let end = Instant::now() + deadline;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if wanted(&line) => return line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("no line with {what} within {deadline:?}; lines so far: {seen:#?}"),
        }
    }
}

/// Whether `text` is a duration as messages show it: `150ms`, `2.5s`, `60s`.
fn is_rounded(text: &str) -> bool {
    let number = |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
    if let Some(ms) = text.strip_suffix("ms") {
        return number(ms);
    }
    let Some(seconds) = text.strip_suffix('s') else { return false };
    match seconds.split_once('.') {
        Some((whole, tenth)) => number(whole) && tenth.len() == 1 && number(tenth),
        None => number(seconds),
    }
}

/// The duration in "gave up after waiting DURATION: ..." of `message`, checked to be rounded.
fn waited_in(message: &str) -> String {
    let (_, rest) = message.split_once("gave up after waiting ").unwrap_or_else(|| panic!("no wait in {message}"));
    let waited = rest.split(':').next().unwrap_or_default().to_string();
    assert!(is_rounded(&waited), "not a rounded duration: {waited:?} in {message}");
    waited
}

#[test]
fn rounded_durations_are_recognized() {
    for good in ["150ms", "0ms", "2.5s", "60s", "3.0s"] {
        assert!(is_rounded(good), "{good}");
    }
    for bad in ["60.001663614s", "2.50s", "s", "1m", "3.s", "60"] {
        assert!(!is_rounded(bad), "{bad}");
    }
}

#[test]
fn vramgate_run_exits_with_the_command_status_and_sets_the_device() {
    let daemon = Daemon::start_sim(8192, "50ms");
    let output = common::output(common::vramgate().env_remove("CUDA_DEVICE_ORDER").args([
        "run",
        "--vram",
        "1G",
        "--url",
        &daemon.url,
        "--",
        "sh",
        "-c",
        "echo \"$CUDA_VISIBLE_DEVICES $CUDA_DEVICE_ORDER $VRAMGATE_LEASE_MIB\"; exit 5",
    ]));
    assert_eq!(output.status.code(), Some(5));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "0 PCI_BUS_ID 1024");
    let output = common::output(common::vramgate().args(["run", "--vram", "100G", "--url", &daemon.url, "--", "true"]));
    assert_eq!(output.status.code(), Some(75));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("need at least"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn run_checks_the_command_before_asking_for_a_lease() {
    // A loaded, idle model fills most of the GPU: any lease of 2 GiB would evict it.
    let daemon = start(|sim| fake_model(sim, "big", 9000, "", ""));
    assert_eq!(daemon.load("big").await.0, 200);
    let mut events = daemon.events().await;
    let scripts = tempfile::tempdir().expect("tempdir");
    let plain = scripts.path().join("notes.txt");
    std::fs::write(&plain, "not a program").expect("write");
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let plain = plain.to_str().expect("utf-8 temp path");

    let cases = [
        ("vramgate-no-such-command", 127, "vramgate run: vramgate-no-such-command: command not found"),
        ("./vramgate-no-such-file", 127, "vramgate run: ./vramgate-no-such-file: command not found"),
        (plain, 126, "not executable"),
    ];
    for (program, code, message) in cases {
        let (exit, _, stderr) = finish(cli(&daemon, &["run", "--vram", "2G", "--", program, "arg"]), 10 * SECOND);
        assert_eq!(exit, Some(code), "{program}: {stderr}");
        assert!(stderr.contains(message), "{program}: {stderr}");
        assert!(!stderr.contains("lease"), "{program} asked for a lease: {stderr}");
    }

    // Nothing was asked of the daemon: a lease asked for afterwards is the first lease event,
    // and nothing was queued, granted or unloaded before it.
    let sentinel = daemon.post("/vramgate/leases", json!({"vram": 100, "holder": "sentinel", "wait": 0})).await;
    assert_eq!(sentinel.0, 201, "{}", sentinel.1);
    let mut before = Vec::new();
    loop {
        let event = events.next(5 * SECOND).await;
        if event["type"] == "lease_granted" && event["holder"] == "sentinel" {
            break;
        }
        before.push(event);
    }
    let touched = |e: &&Value| {
        ["queued", "lease_granted", "lease_released", "model_state"].contains(&e["type"].as_str().unwrap_or(""))
    };
    let touched: Vec<&Value> = before.iter().filter(touched).collect();
    assert!(touched.is_empty(), "the daemon was asked for something: {touched:#?}");
    assert_eq!(common::model_in(&daemon.status().await, "big")["state"], "ready");
}

#[tokio::test]
async fn unload_says_when_a_model_was_not_loaded() {
    let daemon = start(|sim| fake_model(sim, "whisper", 2500, "", ""));
    let (exit, stdout, stderr) = finish(cli(&daemon, &["unload", "whisper"]), 10 * SECOND);
    assert_eq!(exit, Some(0), "{stderr}");
    assert_eq!(stdout, "whisper was not loaded");

    // A fast load is never queued, so it says nothing on stderr.
    let (exit, stdout, stderr) = finish(cli(&daemon, &["load", "whisper"]), 20 * SECOND);
    assert_eq!(exit, Some(0), "{stderr}");
    assert!(stdout.starts_with("whisper ready on GPU 0"), "{stdout}");
    assert!(!stderr.contains("queued"), "{stderr}");

    let (exit, stdout, stderr) = finish(cli(&daemon, &["unload", "whisper"]), 20 * SECOND);
    assert_eq!(exit, Some(0), "{stderr}");
    assert_eq!(stdout, "whisper unloaded (2500 MiB)");
    let (exit, stdout, stderr) = finish(cli(&daemon, &["unload", "whisper"]), 10 * SECOND);
    assert_eq!(exit, Some(0), "{stderr}");
    assert_eq!(stdout, "whisper was not loaded");

    // The HTTP answer says it too.
    let (code, body) = daemon.unload("whisper").await;
    assert_eq!((code, body["was_loaded"].as_bool(), body["state"].as_str()), (200, Some(false), Some("unloaded")));
}

#[tokio::test]
async fn load_says_what_it_waits_for_with_current_numbers() {
    let daemon = start(|sim| {
        format!(
            "[scheduler]\nqueue_timeout = \"8s\"\n{}{}",
            fake_model(sim, "llm", 5000, "", ""),
            fake_model(sim, "stt", 7000, "", "")
        )
    });
    // The LLM is loaded and held in use by an app's model lease: it cannot be evicted.
    assert_eq!(daemon.load("llm").await.0, 200);
    let lease = daemon.post("/vramgate/leases", json!({"model": "llm", "holder": "app", "ttl": "60s"})).await;
    assert_eq!(lease.0, 201, "{}", lease.1);

    let mut load =
        common::KillOnDrop::spawn(cli(&daemon, &["load", "stt"]).stdout(Stdio::piped()).stderr(Stdio::piped()));
    let stderr = lines_of(load.0.stderr.take().expect("stderr"));
    let mut seen = Vec::new();
    let first = line_where(&stderr, &mut seen, 5 * SECOND, "the queued line", |l| l.contains("queued"));
    assert!(first.starts_with("vramgate load: queued: needs 7000 MiB on GPU 0; 5000 MiB available"), "{first}");
    assert!(first.contains("llm 5000 MiB (in use)"), "{first}");

    // The status document shows the same waiter.
    let status = daemon.status().await;
    let entry = &status["queue"][0];
    assert_eq!((entry["kind"].as_str(), entry["model"].as_str()), (Some("load"), Some("stt")), "{status:#}");
    assert_eq!(entry["vram_mib"], 7000, "{status:#}");
    assert!(entry["since"].is_string(), "{status:#}");

    // A lease asked for meanwhile would fit, but waits its turn: the queue says behind whom.
    let url = daemon.url.clone();
    let behind = tokio::spawn(async move {
        let body = json!({"vram": 1000, "holder": "job", "wait": 2});
        let response = common::http::client().post(format!("{url}/vramgate/leases")).json(&body).send().await;
        let response = response.expect("POST lease");
        (response.status().as_u16(), response.json::<Value>().await.expect("JSON error"))
    });
    daemon
        .wait_for_status(5 * SECOND, "the lease queued behind the load", |s| {
            s["queue"][1]["holder"] == "job" && s["queue"][1]["reason"] == "behind stt in the queue"
        })
        .await;
    let (code, body) = tokio::time::timeout(10 * SECOND, behind).await.expect("the lease answers").expect("lease task");
    assert_eq!(code, 503, "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.starts_with("gave up after waiting 2") && message.contains(": behind stt in the queue"), "{body}");

    // Other use appears on the device: the next lines carry the new numbers.
    daemon.claim("desktop", 1000);
    daemon
        .wait_for_status(5 * SECOND, "the queue's reason to count the new use", |s| {
            s["queue"][0]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("4000 MiB available") && r.contains("foreign 1000"))
        })
        .await;
    let again = line_where(&stderr, &mut seen, 7 * SECOND, "the new numbers", |l| l.contains("foreign 1000"));
    assert!(again.starts_with("vramgate load: queued for "), "{again}");
    assert!(again.contains("needs 7000 MiB on GPU 0; 4000 MiB available"), "{again}");

    // It gives up at queue_timeout, saying how long it waited in rounded form.
    let exit = wait_child(&mut load.0, 15 * SECOND).expect("load gives up after queue_timeout");
    assert_eq!(exit.code(), Some(1));
    let rest: Vec<String> = stderr.iter().collect();
    let failure = rest.iter().find(|l| l.starts_with("vramgate: ")).unwrap_or_else(|| panic!("no error in {rest:#?}"));
    let waited = waited_in(failure);
    // Just under 8 s (its clock starts a moment after the deadline's) reads "8.0s".
    let seconds: f64 = waited.trim_end_matches('s').parse().unwrap_or_else(|_| panic!("{failure}"));
    assert!((7.9..10.0).contains(&seconds), "{failure}");
    assert_eq!(common::model_in(&daemon.status().await, "llm")["state"], "ready");
}

#[tokio::test]
async fn run_says_what_it_waits_for_and_gives_up_after_bare_seconds() {
    let daemon = start(|_| String::new());
    daemon.claim("desktop", 8000);
    daemon.wait_for_status(5 * SECOND, "the claim", |s| s["devices"][0]["used_mib"] == 8000).await;

    // The API reads a bare number as seconds, fractions too, and its 503 rounds the wait.
    let started = Instant::now();
    let (code, body) = daemon.post("/vramgate/leases", json!({"vram": 3000, "holder": "api", "wait": "1.5"})).await;
    assert_eq!(code, 503, "{body}");
    assert!(started.elapsed() >= Duration::from_millis(1500), "waited only {:?}", started.elapsed());
    let message = body["error"]["message"].as_str().expect("message");
    assert!(waited_in(message).starts_with("1."), "{message}");
    assert!(message.contains("needs 3000 MiB on GPU 0; 2000 MiB available"), "{message}");

    let started = Instant::now();
    let mut run = common::KillOnDrop::spawn(
        cli(&daemon, &["run", "--vram", "3000", "--wait", "3", "--", "true"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let stderr = lines_of(run.0.stderr.take().expect("stderr"));
    let mut seen = Vec::new();
    let first = line_where(&stderr, &mut seen, 3 * SECOND, "the queued line", |l| l.contains("queued"));
    assert_eq!(first, "vramgate run: queued: needs 3000 MiB on GPU 0; 2000 MiB available (usable 10000, foreign 8000)");
    let exit = wait_child(&mut run.0, 10 * SECOND).expect("run gives up after --wait");
    assert_eq!(exit.code(), Some(75));
    assert!(started.elapsed() >= 3 * SECOND, "gave up after {:?}", started.elapsed());
    let rest: Vec<String> = stderr.iter().collect();
    let failure =
        rest.iter().find(|l| l.contains("no lease for")).unwrap_or_else(|| panic!("no failure line in {rest:#?}"));
    assert!(waited_in(failure).starts_with('3'), "{failure}");
    assert_eq!(daemon.status().await["queue"], json!([]));
}

#[test]
fn run_help_lists_exit_codes_and_the_environment() {
    let home = tempfile::tempdir().expect("tempdir");
    let help = |args: &[&str]| {
        let output = common::output(
            common::vramgate()
                .args(args)
                .env("HOME", home.path())
                .env("XDG_STATE_HOME", home.path().join("state"))
                .env("VRAMGATE_URL", "http://127.0.0.1:9"),
        );
        assert!(output.status.success(), "{args:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let run = help(&["run", "--help"]);
    for wanted in [
        "Exit status",
        "128+N",
        "75",
        "126",
        "127",
        "CUDA_VISIBLE_DEVICES",
        "VRAMGATE_LEASE_ID",
        "VRAMGATE_LEASE_MIB",
        "a number of seconds",
    ] {
        assert!(run.contains(wanted), "`run --help` lacks {wanted:?}:\n{run}");
    }
    for command in ["load", "unload"] {
        let text = help(&[command, "--help"]);
        assert!(text.contains("Exit status:\n  0  done"), "`{command} --help` lacks its exit status:\n{text}");
    }
}

#[test]
fn run_refuses_a_duration_it_cannot_read() {
    let home = tempfile::tempdir().expect("tempdir");
    let output = common::output(
        common::vramgate()
            .args(["run", "--vram", "1G", "--wait", "5 parsecs", "--", "true"])
            .env("HOME", home.path())
            .env("XDG_STATE_HOME", home.path().join("state"))
            .env("VRAMGATE_URL", "http://127.0.0.1:9"),
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("\"5 parsecs\"") && stderr.contains("a number of seconds"), "{stderr}");
}
