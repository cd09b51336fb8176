//! `vramgate top` in a real terminal: the binary runs in a tmux pane (a private tmux server of
//! this test's own), the test types keys with `send-keys` and reads the screen with
//! `capture-pane`, against a daemon on the sim device with fake models.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, KillOnDrop, fake_model, sim_config};

/// How long the screen may take to show what the test waits for.
const SCREEN_DEADLINE: Duration = Duration::from_secs(20);

/// A tmux server of this test's own: its socket in a temp dir and named after this process, no
/// user config read, killed when dropped (also when the test fails), so no user session is seen
/// or touched.
struct Tmux {
    socket: String,
    dir: tempfile::TempDir,
}

impl Tmux {
    fn new() -> Tmux {
        Tmux { socket: format!("vramgate-top-test-{}", std::process::id()), dir: tempfile::tempdir().expect("tempdir") }
    }

    fn command(&self) -> Command {
        let mut command = Command::new("tmux");
        command
            .env("TMUX_TMPDIR", self.dir.path())
            // Run from inside a user's tmux, tmux would otherwise take this for a nested client.
            .env_remove("TMUX")
            .args(["-f", "/dev/null", "-L", &self.socket]);
        command
    }

    fn run(&self, args: &[&str]) -> String {
        let output = common::output(self.command().args(args));
        assert!(output.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The pane's screen as text.
    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "top"])
    }

    fn keys(&self, keys: &str) {
        self.run(&["send-keys", "-t", "top", keys]);
    }

    /// Polls the screen until `check` holds; fails with the last screen when the deadline passes.
    fn wait_for(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + SCREEN_DEADLINE;
        loop {
            let screen = self.screen();
            if check(&screen) {
                return screen;
            }
            // Exited (the wrapper's last words are on screen): no point waiting any longer.
            assert!(!screen.contains("tty mode:"), "top exited before the screen showed {what}:\n{screen}");
            assert!(Instant::now() < end, "the screen did not show {what} within {SCREEN_DEADLINE:?}:\n{screen}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.command().arg("kill-server").stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

/// The model's row in the table (the device legend names loaded models too, beside the
/// thresholds).
fn model_row<'a>(screen: &'a str, id: &str) -> Option<&'a str> {
    let swatch = format!("■ {id} ");
    screen.lines().find(|line| line.contains(&swatch) && !line.contains("warning"))
}

fn row_shows(screen: &str, id: &str, state: &str) -> bool {
    model_row(screen, id).is_some_and(|row| row.contains(&format!(" {state} ")))
}

/// `vramgate top` as a command line for the pane: the harness's isolated environment (see
/// `common::vramgate`) spelled out for `env`, since tmux starts the pane's command itself; then
/// a shell that reports how it exited and whether the terminal is back in cooked mode.
fn top_command_line(url: &str) -> Vec<String> {
    let isolated = common::vramgate();
    let mut line: Vec<String> = vec!["sh".into(), "-c".into(), REPORT_EXIT.into(), "sh".into(), "env".into()];
    let mut assignments = Vec::new();
    for (key, value) in isolated.get_envs() {
        let key = key.to_string_lossy();
        match value {
            // `env` takes its options before the first NAME=VALUE.
            None => line.extend(["-u".to_string(), key.into_owned()]),
            Some(_) if key == "VRAMGATE_URL" => assignments.push(format!("VRAMGATE_URL={url}")),
            Some(value) => assignments.push(format!("{key}={}", value.to_string_lossy())),
        }
    }
    line.extend(assignments);
    line.push(isolated.get_program().to_string_lossy().into_owned());
    line.push("top".into());
    line
}

/// Runs the command given as arguments, then prints its exit status and the terminal's
/// canonical-mode flag (`icanon` when restored, `-icanon` if left raw). The empty line first:
/// when the pane dies, tmux scrolls its screen up a line to say so.
const REPORT_EXIT: &str = "\"$@\"; status=$?; echo; echo \"top exited: $status\"; \
     echo \"tty mode: $(stty -a | grep -o -- '-\\?icanon' | head -n 1)\"";

fn config(sim: &Path) -> String {
    format!(
        "{}{}{}[modes.seeing]\ngpu = [\"vision\"]\n",
        sim_config(sim, 10000, "50ms", "reserve_mib = 0"),
        fake_model(sim, "llm", 3000, "", ""),
        fake_model(sim, "vision", 2000, "", "")
    )
}

/// A daemon again on the address and state of the one stopped, as a restart would bring it.
fn restart_on(url: &str, dir: &Path) -> KillOnDrop {
    let listen = url.trim_start_matches("http://");
    let config: PathBuf = dir.join("vramgate.toml");
    KillOnDrop::spawn(
        common::vramgate()
            .args(["serve", "--listen", listen, "--config"])
            .arg(&config)
            .env("XDG_STATE_HOME", dir.join("state"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
}

#[test]
fn top_follows_the_daemon_loads_unloads_switches_modes_and_survives_its_absence() {
    let mut daemon = Daemon::start(config);
    let tmux = Tmux::new();
    let line = top_command_line(&daemon.url);
    // The pane stays after top exits (remain-on-exit), so its last words can be read; set before
    // the session starts, in the same tmux invocation, so even an early exit is kept.
    let mut args = vec!["start-server", ";", "set-option", "-g", "remain-on-exit", "on", ";"];
    args.extend(["new-session", "-d", "-s", "top", "-x", "120", "-y", "40"]);
    args.extend(line.iter().map(String::as_str));
    tmux.run(&args);

    let screen = tmux.wait_for("both models, connected", |s| {
        s.contains("connected: live") && row_shows(s, "llm", "unloaded") && row_shows(s, "vision", "unloaded")
    });
    assert!(screen.contains("GPU 0 Sim Test"), "{screen}");
    assert!(screen.contains("warning 75% critical 87.5% emergency 95%"), "{screen}");
    assert!(model_row(&screen, "llm").is_some_and(|row| row.contains('▶')), "the first model is selected:\n{screen}");

    tmux.keys("l");
    let screen = tmux.wait_for("llm ready", |s| row_shows(s, "llm", "ready") && s.contains("llm ready (3000 MiB)"));
    assert!(screen.contains("■ llm 3000"), "the device bar's legend holds llm:\n{screen}");
    assert!(screen.contains("model llm loading -> ready"), "the event log shows the load:\n{screen}");

    tmux.keys("u");
    tmux.wait_for("llm unloaded", |s| row_shows(s, "llm", "unloaded") && s.contains("model llm unloading -> unloaded"));

    tmux.keys("j");
    tmux.wait_for("vision selected", |s| model_row(s, "vision").is_some_and(|row| row.contains('▶')));

    // The mode picker lists the config's modes; Enter applies the one under the cursor.
    tmux.keys("m");
    tmux.wait_for("the mode picker", |s| s.contains("Enter applies, Esc closes") && s.contains("▶ seeing"));
    tmux.keys("Enter");
    let screen = tmux.wait_for("mode seeing applied", |s| {
        s.contains("mode seeing applied") && s.contains("mode: seeing") && row_shows(s, "vision", "ready")
    });
    assert!(!screen.contains("Enter applies"), "the picker closed:\n{screen}");

    // The daemon goes away: the view says so and stays.
    let url = daemon.url.clone();
    daemon.child.kill().expect("stop the daemon");
    daemon.wait_exit(Duration::from_secs(10)).expect("the daemon exits");
    let unreachable = format!("daemon at {url} unreachable:");
    let screen = tmux.wait_for("the disconnected message", |s| s.contains(&unreachable) && s.contains("retrying"));
    assert!(model_row(&screen, "vision").is_some(), "the last figures stay on screen:\n{screen}");

    // And comes back on the same address: the view reconnects by itself.
    let _again = restart_on(&url, daemon.dir.path());
    tmux.wait_for("the reconnection", |s| s.contains("connected: live") && !s.contains(&unreachable));

    tmux.keys("q");
    let screen = tmux.wait_for("top's exit", |s| s.contains("top exited:") && s.contains("tty mode:"));
    assert!(screen.contains("top exited: 0"), "{screen}");
    assert!(screen.contains("tty mode: icanon"), "the terminal is back in cooked mode:\n{screen}");
    assert!(!screen.contains("vramgate top"), "the main screen is back, the view gone:\n{screen}");
}

#[test]
fn top_explains_its_keys_and_refuses_to_draw_into_a_pipe() {
    let help = common::output(common::vramgate().args(["top", "--help"]));
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for line in [
        "k/j   select a model",
        "l          load the selected model",
        "u          unload",
        "m          pick a mode",
        "q, Esc     quit",
        "--url <URL>",
    ] {
        assert!(help.contains(line), "{line:?} missing in the help:\n{help}");
    }

    // Output captured, not a terminal: a clear refusal, not escape codes into a file.
    let output = common::output(common::vramgate().arg("top"));
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("vramgate top needs a terminal"), "{stderr}");
    assert!(output.stdout.is_empty(), "nothing drawn: {:?}", String::from_utf8_lossy(&output.stdout));
}
