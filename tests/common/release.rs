//! Helpers for the tests of stopping and releasing: a model's pid from its log, waiting for a
//! pid to be gone, a guard that kills a process the daemon was meant to stop (so a failing test
//! leaves nothing behind), and the events a daemon logged (for events published before any client
//! could subscribe).

use std::time::{Duration, Instant};

use serde_json::Value;

use super::Daemon;

/// The pid of the model's latest start, from the `--- vramgate started pid N: ...` line the
/// daemon writes into the model's log.
pub async fn started_pid(daemon: &Daemon, model: &str) -> u32 {
    let url = format!("{}/vramgate/models/{model}/logs?tail=1000", daemon.url);
    let response = reqwest::Client::new().get(&url).timeout(Duration::from_secs(10)).send().await.expect("GET logs");
    let text = response.text().await.expect("log text");
    text.lines()
        .rev()
        .find_map(|line| line.strip_prefix("--- vramgate started pid ")?.split(':').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no start line in the log of {model}:\n{text}"))
}

/// Whether `pid` is gone (or a zombie) within `deadline`.
pub fn pid_gone_within(pid: u32, deadline: Duration) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if !vramgate::gpu::pid_is_alive(pid) {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A process the test expects the daemon to stop: SIGKILLed with its group when the guard drops
/// if it is still the same process (same start time), so that a failing test leaves no model
/// server behind. Not a child of the test (its parent is the daemon, or init).
pub struct PidGuard {
    pid: u32,
    start_ticks: Option<u64>,
}

impl PidGuard {
    pub fn new(pid: u32) -> PidGuard {
        PidGuard { pid, start_ticks: vramgate::backend::process::proc_stat_field(pid, 22) }
    }
}

impl Drop for PidGuard {
    fn drop(&mut self) {
        if self.start_ticks.is_some()
            && vramgate::backend::process::proc_stat_field(self.pid, 22) == self.start_ticks
            && vramgate::gpu::pid_is_alive(self.pid)
        {
            // The process itself; and, when it leads a group (a model's keeper does), the group.
            let pid = nix::unistd::Pid::from_raw(self.pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// The events of type `kind` that the daemon has logged so far. Every published event is logged
/// as JSON at DEBUG (`vramgate::events: event={...}`), and [`Daemon::start`] runs the daemon at
/// DEBUG; this is how a test sees an event published before the API listens.
pub fn logged_events(daemon: &Daemon, kind: &str) -> Vec<Value> {
    daemon
        .log()
        .lines()
        .filter(|line| line.contains("vramgate::events"))
        .filter_map(|line| line.split_once(" event=").map(|(_, json)| json))
        .filter_map(|json| serde_json::from_str::<Value>(json.trim()).ok())
        .filter(|event| event["type"] == kind)
        .collect()
}
