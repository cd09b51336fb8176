//! `vramgate-fake-ollama` as the tests run it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

/// A fake Ollama with `llama3.2:3b` (2048 MiB) and `tiny` (300 MiB); killed when dropped.
pub struct FakeOllama {
    pub child: Child,
    pub url: String,
}

impl FakeOllama {
    /// Starts it on any free port with a 50 ms load delay.
    pub fn start(sim: &Path) -> FakeOllama {
        Self::start_with(sim, 0, &[])
    }

    /// Starts it on `port` (0 = any), with more fake flags in `extra`.
    pub fn start_with(sim: &Path, port: u16, extra: &[&str]) -> FakeOllama {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vramgate-fake-ollama"))
            .args(["--port", &port.to_string(), "--sim-dir"])
            .arg(sim)
            .args(["--model", "llama3.2:3b=2048", "--model", "tiny=300", "--load-delay", "50ms", "--quiet"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the fake Ollama");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("the fake's first line");
        let url = line.trim().strip_prefix("listening on ").expect("listening line").to_string();
        FakeOllama { child, url }
    }

    pub fn port(&self) -> u16 {
        self.url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port")
    }

    /// Stops it the way a crash looks to vramgate: it just stops answering.
    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal).expect("kill");
    }

    /// GET one of its endpoints as JSON.
    pub async fn get(&self, path: &str) -> Value {
        super::http::get(format!("{}{path}", self.url)).await.expect("GET fake").json().await.expect("JSON")
    }
}

impl Drop for FakeOllama {
    fn drop(&mut self) {
        // A stopped (SIGSTOP) fake is woken first, or the kill would wait.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGCONT,
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
