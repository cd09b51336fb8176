//! End-to-end: the CLI subcommands against a real daemon: `status` (JSON and the table), `events`
//! (following, and exiting 1 when the daemon stops), `logs`, `config check`, and `--help`.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::lines::lines_of;
use common::sim_daemon::on_10000_mib as start;
use common::{Daemon, KillOnDrop, fake_model};
use nix::sys::signal::Signal;
use serde_json::Value;

const SECOND: Duration = Duration::from_secs(1);

fn run_cli(args: &[&str]) -> std::process::Output {
    common::output(common::vramgate().args(args))
}

#[tokio::test]
async fn status_json_is_the_http_document() {
    let daemon = Daemon::start_sim(8192, "50ms");
    daemon.claim("desktop", 1234);
    let http = daemon.wait_for_status(Duration::from_secs(5), "claim", |s| s["devices"][0]["used_mib"] == 1234).await;
    let output = run_cli(&["status", "--json", "--url", &daemon.url]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let mut cli: Value = serde_json::from_slice(&output.stdout).expect("status --json prints JSON");
    let mut http = http;
    // Taken at different moments: only the sample time may differ.
    cli.as_object_mut().unwrap().remove("sampled_at");
    http.as_object_mut().unwrap().remove("sampled_at");
    assert_eq!(cli, http);
}

#[tokio::test]
async fn status_table_and_the_url_from_the_environment() {
    let daemon = Daemon::start_sim(8192, "50ms");
    daemon.claim("desktop", 6500);
    daemon.wait_for_status(Duration::from_secs(5), "claim", |s| s["devices"][0]["used_mib"] == 6500).await;
    let output = common::output(common::vramgate().arg("status").env("VRAMGATE_URL", &daemon.url));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("Sim Test"), "{table}");
    assert!(table.contains("warning"), "{table}");
    assert!(table.contains("6500"), "{table}");
    assert!(table.contains("desktop"), "{table}");
}

#[test]
fn status_without_a_daemon_fails_clearly() {
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let output = run_cli(&["status", "--url", &url]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot reach vramgate") && stderr.contains(&url), "{stderr}");
    let output = run_cli(&["status", "--url", "localhost:9777"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("invalid --url"));
}

#[tokio::test]
async fn events_prints_each_event_as_it_happens() {
    let daemon = Daemon::start_sim(1000, "50ms");
    for json in [true, false] {
        let mut args = vec!["events", "--url", daemon.url.as_str()];
        if json {
            args.push("--json");
        }
        let mut child =
            common::KillOnDrop::spawn(common::vramgate().args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()));
        let stdout = child.0.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        // We cannot see when the CLI has subscribed, so keep changing the device until a line
        // arrives: every change crosses the warning boundary and so is an event.
        let end = Instant::now() + Duration::from_secs(10);
        let mut high = false;
        let line = loop {
            high = !high;
            daemon.claim("desktop", if high { 800 } else { 0 });
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                break line;
            }
            assert!(Instant::now() < end, "no event printed within 10 s");
        };
        if json {
            let event: Value = serde_json::from_str(&line).expect("--json prints JSON lines");
            assert!(event["type"] == "level_changed" || event["type"] == "vram_changed", "{event}");
        } else {
            assert!(line.contains("level_changed") || line.contains("vram_changed"), "{line}");
            assert!(line.contains("GPU 0"), "{line}");
        }
        drop(child);
    }
}

#[test]
fn config_check_accepts_good_files_and_rejects_bad_ones_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[gpu]\nprobe = \"sim\"\nsample_interval = \"250ms\"\n[gpu.sim]\ndir = \"/tmp/x\"\ndevices = [{ name = \"Sim 8G\", total_mib = \"8GiB\" }]\n",
    )
    .unwrap();
    let output = run_cli(&["config", "check", good.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("OK"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[server]\nlisten = \"127.0.0.1:9777\"\n\n[gpu]\nreserve_mib = \"lots\"\n").unwrap();
    let output = run_cli(&["config", "check", bad.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("gpu.reserve_mib") && stderr.contains("line 5") && stderr.contains("\"lots\""), "{stderr}");

    let output = run_cli(&["config", "check", dir.path().join("missing.toml").to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot read"));
}

#[test]
fn help_explains_every_subcommand() {
    let output = run_cli(&["--help"]);
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    // The "Commands:" list: each entry is "  NAME  summary".
    let listed: Vec<&str> = help
        .lines()
        .skip_while(|line| line.trim() != "Commands:")
        .skip(1)
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    // hermetic: subcommand names looked for in the help text (each runs only with --help).
    let visible = ["serve", "status", "events", "top", "load", "unload", "logs", "mode", "plan", "run"];
    let visible = [&visible[..], &["config", "completions", "man"]].concat();
    for &sub in &visible {
        let entry = help.lines().find(|line| line.split_whitespace().next() == Some(sub));
        assert!(
            listed.contains(&sub) && entry.is_some_and(|line| line.split_whitespace().count() > 2),
            "{sub} is not listed with a summary under Commands:\n{help}"
        );
        let sub_help = run_cli(&[sub, "--help"]);
        assert!(sub_help.status.success(), "{sub} --help: {}", String::from_utf8_lossy(&sub_help.stderr));
    }
    // Exactly these (and clap's `help`): nothing listed that this test does not know of, and the
    // hidden `demo-model` (the demo's model server) is not shown.
    let mut expected: Vec<&str> = visible.clone();
    expected.push("help");
    assert_eq!(listed, expected, "{help}");
    assert!(!help.contains("demo-model"), "the hidden demo-model subcommand is listed:\n{help}");
    let output = run_cli(&["status", "--help"]);
    assert!(String::from_utf8_lossy(&output.stdout).contains("VRAMGATE_URL"));
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

/// `vramgate events` exits 1 when the daemon closes the stream (it stopped).
#[tokio::test]
async fn events_exits_1_when_the_daemon_stops() {
    let mut daemon = Daemon::start_sim(1000, "50ms");
    let mut events = KillOnDrop::spawn(
        common::vramgate().args(["events", "--url", &daemon.url]).stdout(Stdio::piped()).stderr(Stdio::piped()),
    );
    let lines = lines_of(events.0.stdout.take().unwrap());
    // Its subscription cannot be seen: change the device until a line shows it is following.
    let end = Instant::now() + 10 * SECOND;
    let mut high = false;
    loop {
        high = !high;
        daemon.claim("desktop", if high { 800 } else { 0 });
        if lines.recv_timeout(Duration::from_millis(200)).is_ok() {
            break;
        }
        assert!(Instant::now() < end, "vramgate events printed nothing within 10 s");
    }
    daemon.signal(Signal::SIGTERM);
    daemon.wait_exit(5 * SECOND).expect("the daemon stops on SIGTERM");
    let status = common::wait_child(&mut events.0, 5 * SECOND).expect("vramgate events exits once the stream closes");
    let mut stderr = String::new();
    events.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("closed the event stream"), "{stderr}");
}
