//! End-to-end: `vramgate run` and signals. Killed, it releases its lease within a second and its
//! command gets SIGTERM; it forwards SIGTERM and SIGINT to its command and exits with the
//! command's status, or 128+N when signal N ended the command.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::sim_daemon::on_8000_mib as start;
use common::{Daemon, KillOnDrop};
use nix::sys::signal::Signal;
use serde_json::json;

const SECOND: Duration = Duration::from_secs(1);

/// Sends `signal` to one process (not its group).
fn signal(pid: u32, signal: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).expect("kill");
}

/// Waits until `path` exists with some text in it, and returns the text; panics after `deadline`.
fn wait_for_file(path: &Path, deadline: Duration, what: &str) -> String {
    let end = Instant::now() + deadline;
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && !text.is_empty()
        {
            return text;
        }
        assert!(Instant::now() < end, "{what}: {} not written within {deadline:?}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A shell command for `vramgate run` that writes `started` once running, writes the name of a
/// trapped signal (TERM, INT) into `caught` and exits with `exit_on_signal`.
fn trapping_command(dir: &Path, exit_on_signal: u8) -> (Vec<String>, PathBuf, PathBuf) {
    let (started, caught) = (dir.join("started"), dir.join("caught"));
    let script = format!(
        "trap 'echo TERM > {c}; exit {e}' TERM; trap 'echo INT > {c}; exit {e}' INT; echo up > {s}; \
         while :; do sleep 0.05; done",
        c = caught.display(),
        s = started.display(),
        e = exit_on_signal
    );
    (vec!["sh".into(), "-c".into(), script], started, caught)
}

/// A `vramgate run` in a process group of its own, which its command shares: when the test ends,
/// however it ends, the whole group is killed, so a command whose SIGTERM never came (the very
/// failure these tests look for) does not loop on forever.
struct RunGroup(KillOnDrop);

impl RunGroup {
    fn pid(&self) -> u32 {
        self.0.pid()
    }
}

impl Drop for RunGroup {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.0.pid() as i32), Signal::SIGKILL);
    }
}

/// Starts `vramgate run --vram 100MiB -- COMMAND` against `daemon`, stdin not a terminal.
fn spawn_run(daemon: &Daemon, command: &[String]) -> RunGroup {
    use std::os::unix::process::CommandExt;
    let mut run = common::vramgate();
    run.args(["run", "--vram", "100MiB", "--url", &daemon.url, "--"])
        .args(command)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    RunGroup(KillOnDrop::spawn(&mut run))
}

/// `vramgate run`'s help: "If vramgate run is killed, the lease is released within a second and
/// the command gets SIGTERM."
#[tokio::test]
async fn a_sigkilled_vramgate_run_releases_its_lease_and_its_command_gets_sigterm() {
    let daemon = start(|_| String::new());
    let dir = tempfile::tempdir().unwrap();
    let (command, started, caught) = trapping_command(dir.path(), 0);
    let mut run = spawn_run(&daemon, &command);
    wait_for_file(&started, 10 * SECOND, "the command under vramgate run");
    let status =
        daemon.wait_for_status(5 * SECOND, "the lease", |s| s["leases"].as_array().is_some_and(|l| l.len() == 1)).await;
    // The holder is the command's name; the size is the one asked for.
    assert_eq!((&status["leases"][0]["holder"], &status["leases"][0]["vram_mib"]), (&json!("sh"), &json!(100)));
    signal(run.pid(), Signal::SIGKILL);
    common::wait_child(&mut run.0.0, 5 * SECOND).expect("vramgate run dies of SIGKILL");
    let killed = Instant::now();
    assert_eq!(wait_for_file(&caught, 5 * SECOND, "the command's SIGTERM").trim(), "TERM");
    daemon
        .wait_for_status(2 * SECOND, "the lease to go", |s| s["leases"].as_array().is_some_and(|l| l.is_empty()))
        .await;
    assert!(killed.elapsed() < SECOND, "released after {:?}", killed.elapsed());
}

/// `vramgate run` forwards SIGTERM, and SIGINT when stdin is not a terminal, to its command, and
/// exits with the command's own status.
#[tokio::test]
async fn vramgate_run_forwards_sigterm_and_sigint_to_its_command() {
    let daemon = start(|_| String::new());
    for (sent, name) in [(Signal::SIGTERM, "TERM"), (Signal::SIGINT, "INT")] {
        let dir = tempfile::tempdir().unwrap();
        let (command, started, caught) = trapping_command(dir.path(), 3);
        let mut run = spawn_run(&daemon, &command);
        wait_for_file(&started, 10 * SECOND, "the command under vramgate run");
        signal(run.pid(), sent);
        assert_eq!(wait_for_file(&caught, 5 * SECOND, &format!("the forwarded {sent}")).trim(), name);
        let status = common::wait_child(&mut run.0.0, 5 * SECOND).expect("vramgate run exits after its command");
        assert_eq!(status.code(), Some(3), "{sent}: vramgate run exits with the command's status 3");
        daemon
            .wait_for_status(2 * SECOND, "the lease released", |s| s["leases"].as_array().is_some_and(|l| l.is_empty()))
            .await;
    }
}

/// `vramgate run --help`: "128+N  the command was ended by signal N (130: SIGINT, 143: SIGTERM)".
#[tokio::test]
async fn vramgate_run_exits_128_plus_n_when_a_signal_ended_its_command() {
    let daemon = start(|_| String::new());
    for (sent, expected) in [(Signal::SIGTERM, 143), (Signal::SIGINT, 130)] {
        let dir = tempfile::tempdir().unwrap();
        let started = dir.path().join("started");
        // `exec sleep`: the command itself is ended by the signal (no shell to trap it).
        let command = vec!["sh".into(), "-c".into(), format!("echo up > {}; exec sleep 30", started.display())];
        let mut run = spawn_run(&daemon, &command);
        wait_for_file(&started, 10 * SECOND, "the command under vramgate run");
        // Whether the shell has reached `exec sleep` yet does not matter: the shell does not trap
        // the signal either, so the command ends by it in both cases.
        signal(run.pid(), sent);
        let status = common::wait_child(&mut run.0.0, 5 * SECOND).expect("vramgate run exits after its command");
        assert_eq!(status.code(), Some(expected), "{sent}");
    }
}
