//! Paper cuts of issue 9, end to end: a start-up failure's error carries both output streams and
//! shows in the plain status table; `config check` speaks the config's words and warns about
//! programs it cannot find; relative model commands work from any working directory; the
//! default log is readable lines, not JSON.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, fake, fake_model, sim_config};
use serde_json::Value;

const SECOND: Duration = Duration::from_secs(1);

/// Runs the CLI against `url`, with a temp HOME and state dir so nothing can reach a user's own
/// daemon or files.
fn cli(url: &str, home: &Path, args: &[&str]) -> Output {
    common::output(
        common::vramgate()
            .args(args)
            .env("VRAMGATE_URL", url)
            .env("HOME", home)
            .env("XDG_STATE_HOME", home.join("state")),
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The last words of the fake model's `--exit-on-start`: its final stderr line, and the line it
/// prints on stdout first.
fn exit_lines(name: &str, code: i32) -> (String, String) {
    (format!("fake-model: exiting with status {code} (--exit-on-start)"), format!("fake-model {name} starting on port"))
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

#[test]
fn config_check_names_the_probe_as_written_and_warns_about_missing_programs() {
    let dir = tempfile::tempdir().unwrap();
    let sim = dir.path().join("sim");
    let file = dir.path().join("vramgate.toml");
    let mut config = sim_config(&sim, 8192, "250ms", "");
    config.push_str("[models.found]\nbackend = \"process\"\ncmd = \"sh -c true\"\nvram = 100\n\n");
    config.push_str("[models.typo]\nbackend = \"process\"\ncmd = [\"nosuchprogram-xyz\", \"--port\", \"${PORT}\"]\n");
    std::fs::write(&file, &config).unwrap();
    let line = config.lines().position(|l| l.contains("nosuchprogram-xyz")).unwrap() + 1;
    let output = common::output(
        common::vramgate()
            .args(["config", "check"])
            .arg(&file)
            .env_remove("VRAMGATE_URL")
            .env("HOME", dir.path())
            .env("XDG_STATE_HOME", dir.path().join("state")),
    );
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    // A program missing here is a warning: the config may be meant for another machine.
    assert_eq!(output.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("OK (probe sim, 1 simulated device(s)"), "{stdout}");
    assert!(stdout.contains("1 warning"), "{stdout}");
    assert!(
        stderr.contains(&format!(
            "line {line}, column 1, key `models.typo.cmd`: program \"nosuchprogram-xyz\" is not found on PATH"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("models.found"), "{stderr}");
}

/// A daemon started as a user would start it (no `VRAMGATE_LOG`), from `cwd`, still hermetic:
/// its own state dir and HOME, an ephemeral port. Killed when dropped.
struct PlainDaemon {
    child: Child,
    url: String,
    stderr_path: PathBuf,
}

impl PlainDaemon {
    fn start(config: &Path, cwd: &Path, home: &Path) -> PlainDaemon {
        let stderr_path = home.join("daemon-stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut child = common::vramgate()
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(config)
            .current_dir(cwd)
            .env_remove("VRAMGATE_LOG")
            .env_remove("VRAMGATE_CONFIG")
            .env("HOME", home)
            .env("XDG_STATE_HOME", home.join("state"))
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn vramgate");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let Ok(line) = rx.recv_timeout(20 * SECOND) else {
            let _ = child.kill();
            panic!(
                "no listening line within 20 s; stderr:\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        };
        let url = line.split_whitespace().find(|w| w.starts_with("http://")).expect("URL").to_string();
        PlainDaemon { child, url, stderr_path }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits until the log contains `needle`, or panics with the log.
    async fn wait_log(&self, needle: &str) -> String {
        let end = Instant::now() + 10 * SECOND;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(Instant::now() < end, "no {needle:?} in the log:\n{log}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn status(&self) -> Value {
        common::http::get(format!("{}/vramgate/status", self.url)).await.unwrap().json().await.unwrap()
    }

    async fn wait_model(&self, id: &str, state: &str) -> Value {
        let end = Instant::now() + 10 * SECOND;
        loop {
            let status = self.status().await;
            let model = common::model_in(&status, id).clone();
            if model["state"] == state {
                return model;
            }
            assert!(Instant::now() < end, "model {id} not {state}: {model}\nlog:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for PlainDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_relative_model_command_runs_from_the_config_directory_whatever_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let sim = dir.path().join("sim");
    let script = dir.path().join("model.sh");
    std::fs::write(&script, format!("#!/bin/sh\nexec '{}' \"$@\"\n", fake())).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut config = sim_config(&sim, 8192, "50ms", "");
    config.push_str(&format!(
        "[models.rel]\nbackend = \"process\"\nvram = 300\n\
         cmd = [\"./model.sh\", \"--port\", \"${{PORT}}\", \"--sim-dir\", \"{}\", \"--vram\", \"300\", \"--name\", \"rel\", \"--load-delay\", \"50ms\"]\n",
        sim.display()
    ));
    let file = dir.path().join("vramgate.toml");
    std::fs::write(&file, config).unwrap();
    // Started from another directory, where `./model.sh` does not exist.
    let daemon = PlainDaemon::start(&file, elsewhere.path(), elsewhere.path());
    let home = tempfile::tempdir().unwrap();
    let output = cli(&daemon.url, home.path(), &["load", "rel"]);
    assert!(output.status.success(), "{}\nlog:\n{}", text(&output.stderr), daemon.log());
    let model = daemon.wait_model("rel", "ready").await;
    assert!(model["pid"].is_u64(), "{model}");
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
