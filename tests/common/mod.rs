//! Shared helpers for the end-to-end tests: start the real `vramgate` binary on a sim config in a
//! temp dir, talk to it over loopback HTTP, and wait on conditions with deadlines (never sleeps
//! that hope).

#![allow(dead_code)] // each test binary uses a different subset

pub mod app;
pub mod gguf;
pub mod http;
pub mod lines;
pub mod nvml;
pub mod ollama;
pub mod plain;
pub mod procs;
pub mod release;
pub mod scheduling;
pub mod sim_daemon;
pub mod stand_in;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

/// The binary under test. Run it through [`vramgate`], never with `Command::new(bin())`
/// directly (`tests/hermetic.rs` checks this).
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vramgate")
}

/// Where a test's `vramgate` commands point when the test names no daemon: a loopback port that
/// nothing listens on, so a forgotten `--url` fails at once instead of reaching a real daemon
/// on the default port.
pub const NO_DAEMON_URL: &str = "http://127.0.0.1:1";

/// The rule of the test harness: every `vramgate` a test runs is isolated from the user's machine.
/// Its home, state and config directories are a scratch directory under cargo's target tmp dir,
/// `VRAMGATE_URL` points at no daemon, and the user's `VRAMGATE_CONFIG`, `VRAMGATE_LOG` and
/// `VRAMGATE_TOKEN` are dropped. So no test reads or writes `~/.local/state/vramgate`, and none talks to a daemon on
/// the default port, even while the user's own daemon runs there. A test that needs a daemon
/// passes its URL (`--url`, or `.env("VRAMGATE_URL", …)`) and, for `serve`, a `--listen` port of 0
/// and a temp state directory (as [`Daemon::start`] does).
pub fn vramgate() -> Command {
    let mut command = Command::new(bin());
    isolate(&mut command);
    command
}

/// Applies the harness rule (see [`vramgate`]) to any command that may run `vramgate` itself
/// (a shell running a README block, a Python script using the client).
pub fn isolate(command: &mut Command) -> &mut Command {
    let home = isolated_home();
    command
        .env("HOME", &home)
        .env("XDG_STATE_HOME", home.join(".local/state"))
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_DATA_HOME", home.join(".local/share"))
        .env("VRAMGATE_URL", NO_DAEMON_URL)
        .env_remove("VRAMGATE_CONFIG")
        .env_remove("VRAMGATE_LOG")
        .env_remove("VRAMGATE_TOKEN")
}

/// The scratch home of this test binary's commands, inside cargo's target directory (never the
/// user's home); created on first use.
pub fn isolated_home() -> PathBuf {
    let home = Path::new(env!("CARGO_TARGET_TMPDIR")).join("isolated-home");
    std::fs::create_dir_all(&home).expect("create the isolated home");
    home
}

/// A sim config with one device of `total_mib` and the given sample interval; `extra` is appended
/// (more `[gpu]` keys must go in `gpu_extra`).
pub fn sim_config(sim_dir: &Path, total_mib: u64, interval: &str, gpu_extra: &str) -> String {
    format!(
        "[gpu]\nprobe = \"sim\"\nsample_interval = \"{interval}\"\n{gpu_extra}\n[gpu.sim]\ndir = \"{}\"\ndevices = [{{ name = \"Sim Test\", total_mib = {total_mib} }}]\n",
        sim_dir.display()
    )
}

/// A running daemon; killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub url: String,
    pub dir: tempfile::TempDir,
    pub stderr_path: PathBuf,
}

impl Daemon {
    /// The temp dir's sim directory (what `sim_config` should be given).
    pub fn sim_dir_for(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("sim")
    }

    /// Writes `config` into a fresh temp dir and starts `vramgate serve` on a free port.
    pub fn start(config: impl FnOnce(&Path) -> String) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_text = config(&Self::sim_dir_for(&dir));
        let config_path = dir.path().join("vramgate.toml");
        std::fs::write(&config_path, config_text).expect("write config");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut child = vramgate()
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config_path)
            .env("VRAMGATE_LOG", "debug")
            // Each daemon gets its own state database, as on a machine of its own.
            .env("XDG_STATE_HOME", dir.path().join("state"))
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn vramgate");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                panic!("vramgate did not report its address within 20 s; stderr:\n{log}");
            }
        };
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no URL in {line:?}"))
            .to_string();
        Daemon { child, url, dir, stderr_path }
    }

    /// Starts a daemon on a one-device sim config.
    pub fn start_sim(total_mib: u64, interval: &str) -> Daemon {
        Daemon::start(|sim| sim_config(sim, total_mib, interval, ""))
    }

    /// `DIR/0`, where claims for device 0 go.
    pub fn device_dir(&self) -> PathBuf {
        Self::sim_dir_for(&self.dir).join("0")
    }

    /// Claims `mib` on device 0 under `name` (a pid or a consumer name).
    pub fn claim(&self, name: &str, mib: u64) {
        write_atomically(&self.device_dir().join(name), &mib.to_string());
    }

    /// The daemon's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// GET a management endpoint as JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        let response = http::get(format!("{}{path}", self.url)).await.expect("GET");
        assert!(response.status().is_success(), "GET {path}: {}", response.status());
        response.json().await.expect("JSON body")
    }

    /// The status document.
    pub async fn status(&self) -> Value {
        self.get_json("/vramgate/status").await
    }

    /// Polls status until `check` holds, or panics with the last status after `deadline`.
    pub async fn wait_for_status(&self, deadline: Duration, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + deadline;
        loop {
            let status = self.status().await;
            if check(&status) {
                return status;
            }
            if Instant::now() > end {
                panic!("timed out after {deadline:?} waiting for {what}; last status: {status:#}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Opens the event stream; returns once the daemon has answered (and so has subscribed).
    pub async fn events(&self) -> EventStream {
        let response = http::get(format!("{}/vramgate/events", self.url)).await.expect("GET events");
        assert!(response.status().is_success());
        EventStream { inner: Box::pin(eventsource_stream::EventStream::new(response.bytes_stream())) }
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal).expect("kill");
    }

    /// Waits for the daemon to exit, up to `deadline`.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        wait_child(&mut self.child, deadline)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls a child until it exits or the deadline passes.
pub fn wait_child(child: &mut Child, deadline: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Writes through a temp file and a rename, so a sample never sees a half-written file.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_file_name(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("x")));
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

type SseInner = std::pin::Pin<
    Box<
        dyn futures_util::Stream<
                Item = Result<eventsource_stream::Event, eventsource_stream::EventStreamError<reqwest::Error>>,
            > + Send,
    >,
>;

/// The daemon's event stream, decoded to JSON.
pub struct EventStream {
    inner: SseInner,
}

impl EventStream {
    /// The next event, or panics if none comes within `deadline`.
    pub async fn next(&mut self, deadline: Duration) -> Value {
        match tokio::time::timeout(deadline, self.inner.next()).await {
            Ok(Some(Ok(event))) => serde_json::from_str(&event.data).expect("event JSON"),
            Ok(Some(Err(e))) => panic!("event stream error: {e}"),
            Ok(None) => panic!("event stream ended"),
            Err(_) => panic!("no event within {deadline:?}"),
        }
    }

    /// The next event of type `kind`, skipping others; panics after `deadline`.
    pub async fn next_of(&mut self, kind: &str, deadline: Duration) -> Value {
        let end = Instant::now() + deadline;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let event = self.next(left).await;
            if event["type"] == kind {
                return event;
            }
        }
    }

    /// Whether the stream ends (the server closed it) within `deadline`.
    pub async fn ends_within(&mut self, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        loop {
            match tokio::time::timeout(end.saturating_duration_since(Instant::now()), self.inner.next()).await {
                Ok(None) | Ok(Some(Err(_))) => return true,
                Ok(Some(Ok(_))) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// The fake model server the tests run as a "model".
pub fn fake() -> &'static str {
    env!("CARGO_BIN_EXE_vramgate-fake-model")
}

/// A `[models.NAME]` section running the fake server, declaring and claiming `vram` MiB on sim
/// device 0 after a 50 ms load (unless `args` sets `--load-delay`); `args` are more fake-server
/// flags, `keys` more model keys.
pub fn fake_model(sim: &Path, name: &str, vram: u64, args: &str, keys: &str) -> String {
    format!("{}vram = {vram}\n", undeclared_fake_model(sim, name, vram, args, keys))
}

/// As [`fake_model`], without declaring the footprint: vramgate must measure it.
pub fn undeclared_fake_model(sim: &Path, name: &str, vram: u64, args: &str, keys: &str) -> String {
    let delay = if args.contains("--load-delay") { "" } else { "--load-delay 50ms" };
    format!(
        "[models.{name}]\nbackend = \"process\"\ncmd = \"{} --port ${{PORT}} --sim-dir {} --vram {vram} --name {name} {delay} {args}\"\n{keys}\n",
        fake(),
        sim.display()
    )
}

impl Daemon {
    /// POST JSON to a management endpoint; the status code and the JSON body.
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let response = http::client().post(format!("{}{path}", self.url)).json(&body).send().await.expect("POST");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// `POST /vramgate/models/NAME/load`.
    pub async fn load(&self, model: &str) -> (u16, Value) {
        self.post(&format!("/vramgate/models/{model}/load"), Value::Null).await
    }

    /// `POST /vramgate/models/NAME/unload`.
    pub async fn unload(&self, model: &str) -> (u16, Value) {
        self.post(&format!("/vramgate/models/{model}/unload"), Value::Null).await
    }

    /// A model's entry in status.
    pub async fn model(&self, id: &str) -> Value {
        let status = self.status().await;
        status["models"].as_array().and_then(|m| m.iter().find(|m| m["id"] == id).cloned()).unwrap_or(Value::Null)
    }

    /// Waits until a model reaches `state`.
    pub async fn wait_model_state(&self, id: &str, state: &str, deadline: Duration) -> Value {
        let id = id.to_string();
        let status = self
            .wait_for_status(deadline, &format!("model {id} to be {state}"), |s| {
                s["models"].as_array().is_some_and(|m| m.iter().any(|m| m["id"] == id.as_str() && m["state"] == state))
            })
            .await;
        status["models"].as_array().and_then(|m| m.iter().find(|m| m["id"] == id.as_str()).cloned()).unwrap_or_default()
    }
}

/// A model's entry in a status document.
pub fn model_in<'a>(status: &'a Value, id: &str) -> &'a Value {
    status["models"].as_array().and_then(|m| m.iter().find(|m| m["id"] == id)).expect("model in status")
}

/// `cpu_cmd` for a fake process model: the same fake, claiming no GPU memory.
pub fn cpu_form(sim: &Path, name: &str) -> String {
    format!("cpu_cmd = \"{} --port ${{PORT}} --sim-dir {} --vram 0 --name {name}-cpu\"\n", fake(), sim.display())
}

/// Polls status for `period`, failing as soon as `bad` holds (a condition that must never become
/// true during that period).
pub async fn never_within(daemon: &Daemon, period: Duration, what: &str, bad: impl Fn(&Value) -> bool) {
    let end = Instant::now() + period;
    while Instant::now() < end {
        let status = daemon.status().await;
        assert!(!bad(&status), "{what}; status: {status:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The fenced blocks of `language` (```` ```toml ````, ```` ```sh ````) in a Markdown text, in order.
pub fn fenced_blocks(text: &str, language: &str) -> Vec<String> {
    let opening = format!("```{language}");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim_start()) {
            (None, fence) if fence == opening => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// How long a CLI command a test runs may take before the test fails (a regression that hangs
/// must fail the test, not hang the suite).
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(60);

/// Runs `command` to completion with its output captured, like `Command::output`, but fails the
/// test (killing the process) if it has not exited within `deadline`.
pub fn output_within(command: &mut Command, deadline: Duration) -> std::process::Output {
    let mut child =
        KillOnDrop(command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn"));
    // Read both pipes on threads so a chatty process cannot block on a full pipe meanwhile.
    let end = Instant::now() + deadline;
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            let _ = tx.send(bytes);
        });
        rx
    };
    let out = read(child.0.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let err = read(child.0.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>));
    let Some(status) = wait_child(&mut child.0, deadline) else {
        panic!("{command:?} did not finish within {deadline:?}");
    };
    // A grandchild may hold the pipes open after the command exited: don't wait past the deadline.
    let collect = |rx: mpsc::Receiver<Vec<u8>>| {
        rx.recv_timeout(end.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("{command:?} exited, but its output did not end within {deadline:?}"))
    };
    std::process::Output { status, stdout: collect(out), stderr: collect(err) }
}

/// [`output_within`] with [`COMMAND_DEADLINE`].
pub fn output(command: &mut Command) -> std::process::Output {
    output_within(command, COMMAND_DEADLINE)
}

/// A child process that is killed (and reaped) when the test ends, even when it fails first.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// Spawns `command`, to be killed when the guard drops.
    pub fn spawn(command: &mut Command) -> KillOnDrop {
        KillOnDrop(command.spawn().expect("spawn"))
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
