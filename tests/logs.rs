//! End-to-end: logs. `vramgate logs -f` follows a model's output; the daemon's default log is
//! readable lines (the events' JSON only at debug), and each degraded reason is logged once.

mod common;

use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::lines::lines_of;
use common::plain::{PlainDaemon, cli, text};
use common::sim_daemon::on_8000_mib as start;
use common::{KillOnDrop, fake_model, sim_config};
use serde_json::json;

const SECOND: Duration = Duration::from_secs(1);

/// Reads lines until one contains `needle`; panics (with what came) after `deadline`.
fn wait_line(lines: &mpsc::Receiver<String>, needle: &str, deadline: Duration) -> String {
    let end = Instant::now() + deadline;
    let mut seen = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("no line containing {needle:?} within {deadline:?}; got:\n{}", seen.join("\n")),
        }
    }
}

/// `vramgate logs -f` keeps printing the lines a model's server writes after it started.
#[tokio::test]
async fn logs_follow_prints_lines_written_after_it_started() {
    let daemon = start(|sim| fake_model(sim, "m", 100, "", "ttl = \"0\""));
    assert_eq!(daemon.load("m").await.0, 200);
    let mut logs = KillOnDrop::spawn(
        common::vramgate().args(["logs", "m", "-f", "--url", &daemon.url]).stdout(Stdio::piped()).stderr(Stdio::null()),
    );
    let lines = lines_of(logs.0.stdout.take().unwrap());
    // The tail first: once it is printed, the command is following.
    wait_line(&lines, "weights loaded", 10 * SECOND);
    let marker = format!("after-follow-{}", std::process::id());
    let response = common::http::client()
        .post(format!("{}/v1/chat/completions", daemon.url))
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": marker}]}))
        .timeout(10 * SECOND)
        .send()
        .await
        .expect("chat");
    assert_eq!(response.status(), 200);
    let line = wait_line(&lines, &marker, 5 * SECOND);
    assert!(line.contains("request"), "{line}");
    assert!(logs.0.try_wait().unwrap().is_none(), "logs -f must keep following");
}

#[tokio::test]
async fn the_default_log_is_readable_lines_and_the_json_is_at_debug() {
    let dir = tempfile::tempdir().unwrap();
    let sim = dir.path().join("sim");
    let mut config = sim_config(&sim, 8192, "50ms", "");
    config.push_str(&fake_model(&sim, "llm", 500, "", ""));
    let file = dir.path().join("vramgate.toml");
    std::fs::write(&file, config).unwrap();
    let daemon = PlainDaemon::start(&file, dir.path(), dir.path());
    let home = tempfile::tempdir().unwrap();
    let output = cli(&daemon.url, home.path(), &["load", "llm"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let output = cli(&daemon.url, home.path(), &["unload", "llm"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    daemon.wait_log("model llm: unloaded -> loading (requested) on GPU 0, 500 MiB").await;
    daemon.wait_log("model llm: loading -> ready (ready) on GPU 0, 500 MiB").await;
    let log = daemon.wait_log("model llm: unloading -> unloaded").await;
    assert!(log.contains(" INFO vramgate::events: model llm: ready -> unloading (requested)"), "{log}");
    // No event as raw JSON (that is DEBUG), whatever its type.
    assert!(!log.contains("\"seq\"") && !log.contains("event="), "{log}");
}

#[tokio::test]
async fn each_degraded_reason_is_logged_once() {
    for probe in ["none", "auto"] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vramgate.toml");
        std::fs::write(&file, format!("[gpu]\nprobe = \"{probe}\"\n")).unwrap();
        let daemon = PlainDaemon::start(&file, dir.path(), dir.path());
        let status = daemon.status().await;
        let reasons: Vec<String> =
            status["degraded_reasons"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_string()).collect();
        if probe == "none" {
            assert_eq!(reasons.len(), 1, "{status}");
        }
        // `auto` on a machine with a GPU is not degraded at all; without one, the probes it
        // skipped are degraded reasons, and each must be said once, not once more as "skipped".
        let log = daemon.wait_log("listening on").await;
        for reason in &reasons {
            assert_eq!(log.matches(reason.as_str()).count(), 1, "probe {probe}: {reason:?} in\n{log}");
        }
    }
}
