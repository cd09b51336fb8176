//! A daemon started as a user would start it (no `VRAMGATE_LOG`, from a working directory of the
//! test's choosing), and the CLI run against a URL, for the tests of the default log, start-up
//! failures and relative model commands.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const SECOND: Duration = Duration::from_secs(1);

/// Runs the CLI against `url`, with a temp HOME and state dir so nothing can reach a user's own
/// daemon or files.
pub fn cli(url: &str, home: &Path, args: &[&str]) -> Output {
    super::output(
        super::vramgate()
            .args(args)
            .env("VRAMGATE_URL", url)
            .env("HOME", home)
            .env("XDG_STATE_HOME", home.join("state")),
    )
}

/// Command output as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A daemon started as a user would start it (no `VRAMGATE_LOG`), from `cwd`, still hermetic:
/// its own state dir and HOME, an ephemeral port. Killed when dropped.
pub struct PlainDaemon {
    child: Child,
    pub url: String,
    stderr_path: PathBuf,
}

impl PlainDaemon {
    /// Starts `vramgate serve --config CONFIG` from `cwd`, with `home` as its home and state, and
    /// waits for its listening line.
    pub fn start(config: &Path, cwd: &Path, home: &Path) -> PlainDaemon {
        let stderr_path = home.join("daemon-stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut child = super::vramgate()
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

    /// What the daemon wrote on stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits until the log contains `needle`, or panics with the log.
    pub async fn wait_log(&self, needle: &str) -> String {
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

    /// The status document.
    pub async fn status(&self) -> Value {
        super::http::get(format!("{}/vramgate/status", self.url)).await.unwrap().json().await.unwrap()
    }

    /// Waits until model `id` is in `state`, or panics with the log.
    pub async fn wait_model(&self, id: &str, state: &str) -> Value {
        let end = Instant::now() + 10 * SECOND;
        loop {
            let status = self.status().await;
            let model = super::model_in(&status, id).clone();
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
