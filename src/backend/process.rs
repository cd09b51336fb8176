//! The `process` backend: supervised server processes (llama-server, whisper.cpp server, any
//! command with an HTTP health check).
//!
//! No zombies, no orphans: every command runs under a keeper (`vramgate keeper`, see
//! [`crate::keeper`]), which leads the model's process group (so a stop reaches its workers too),
//! is a child subreaper (so descendants that double-fork away from the group are still its
//! own), and kills every descendant when the command exits or the daemon dies. The keeper gets
//! `PR_SET_PDEATHSIG(SIGTERM)`; that signal fires when the *thread* that forked it exits, so all
//! forks happen on one [`Spawner`] thread that lives as long as the daemon, never on a pool thread
//! that may retire. Each command's stdout and
//! stderr are drained continuously by their own threads into a [`LogBuffer`] (a pipe nobody reads
//! fills up and stalls the child), and one more thread waits for its exit.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::{oneshot, watch};

pub use super::logs::{LogBuffer, LogSource};

/// Lines kept in memory per process for `vramgate logs` and error messages.
pub(crate) const LOG_RING_LINES: usize = 1000;
/// Lines of log quoted in a start-up error.
pub const ERROR_TAIL_LINES: usize = 15;
/// Lines of each stream (stdout, stderr) a start-up error quotes even when the other stream
/// wrote more since: the reason a server died is often on the quieter one.
pub const ERROR_TAIL_PER_STREAM: usize = 5;
/// Longest log line kept whole; longer ones are split.
const MAX_LINE: u64 = 16 * 1024;
/// How long to wait for a process to die after SIGKILL before giving up on it.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How often readiness is polled (DESIGN: tens of milliseconds, not llama-swap's 1 s).
const HEALTH_POLL: Duration = Duration::from_millis(25);
/// How long an exit waits for the pipe readers to reach end-of-file before it is reported. A
/// process's last words (the stderr line saying why it died) are still in the pipe when `wait`
/// returns; reporting at once would leave them out of the error. Bounded, because a grandchild
/// that inherited the pipes can keep them open long after the process itself is gone.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);
/// How long a stop that had to SIGKILL the command waits for its keeper to sweep the rest and
/// exit before killing the keeper too.
const KEEPER_SWEEP_WAIT: Duration = Duration::from_secs(3);
/// What to start.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    /// Program and arguments, already expanded.
    pub argv: Vec<String>,
    /// Extra environment, already expanded.
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
    /// Where to append the log, if anywhere.
    pub log_file: Option<PathBuf>,
}

/// Expands `${PORT}`, `${MODEL_ID}` and `${DEVICE}` in one argument or environment value.
pub fn expand(text: &str, port: u16, model_id: &str, device: Option<u32>) -> String {
    text.replace("${PORT}", &port.to_string())
        .replace("${MODEL_ID}", model_id)
        .replace("${DEVICE}", &device.map(|d| d.to_string()).unwrap_or_default())
}

/// A free loopback port for a child to listen on. Another program could take it between now
/// and the child's bind; the child then fails to start and the error shows its log.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal, if it was killed.
    pub signal: Option<i32>,
}

impl ExitInfo {
    fn from_status(status: ExitStatus) -> ExitInfo {
        ExitInfo { code: status.code(), signal: status.signal() }
    }
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exit status {code}"),
            (None, Some(signal)) => {
                let name = Signal::try_from(signal).map(|s| s.as_str().to_string()).unwrap_or(signal.to_string());
                write!(f, "killed by {name}")
            }
            (None, None) => f.write_str("ended"),
        }
    }
}

/// A running (or finished) child.
#[derive(Clone)]
pub struct ProcessHandle {
    /// The command's pid (what status shows as the model's process).
    pub pid: u32,
    /// Its process group: the keeper's pid (the command's own pid when started without one).
    pub group: u32,
    /// Kernel start time of the group's leader, to recognise the group in the store after a
    /// restart.
    pub start_ticks: u64,
    /// `None` while running; set once when it exits.
    pub exit: watch::Receiver<Option<ExitInfo>>,
    /// Its output.
    pub logs: Arc<LogBuffer>,
}

/// Why a process did not become ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    /// It could not be started at all.
    #[error("cannot start {program:?}: {message}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        message: String,
    },
    /// It exited before its health check passed.
    #[error("exited during start-up ({exit}); last output:\n{tail}")]
    Exited {
        /// How.
        exit: String,
        /// Its last lines.
        tail: String,
    },
    /// Its health check did not pass in time; it was stopped.
    #[error("not ready after {} (health check {url}); last output:\n{tail}", crate::units::Rounded(*timeout))]
    Timeout {
        /// The limit.
        timeout: Duration,
        /// The URL polled.
        url: String,
        /// Its last lines.
        tail: String,
    },
}

impl ProcessHandle {
    /// Whether it has exited.
    pub fn exited(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    /// Waits until it exits.
    pub async fn wait_exit(&self) -> ExitInfo {
        let mut exit = self.exit.clone();
        loop {
            if let Some(info) = *exit.borrow_and_update() {
                return info;
            }
            if exit.changed().await.is_err() {
                // The waiter thread is gone without a verdict; treat it as ended.
                return ExitInfo { code: None, signal: None };
            }
        }
    }

    fn tail_text(&self) -> String {
        let tail = self.logs.error_tail();
        if tail.is_empty() { "(nothing)".to_string() } else { tail.join("\n") }
    }

    /// Polls `url` every 25 ms until it answers 200, the process exits, or `timeout` passes
    /// (then the process is stopped). 503 and refused connections mean "still loading".
    pub async fn wait_ready(
        &self,
        url: Option<&str>,
        timeout: Duration,
        http: &reqwest::Client,
    ) -> Result<(), StartError> {
        let Some(url) = url else {
            return match self.exited() {
                Some(exit) => Err(StartError::Exited { exit: exit.to_string(), tail: self.tail_text() }),
                None => Ok(()),
            };
        };
        let deadline = Instant::now()
            .checked_add(timeout)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600));
        let mut exit = self.exit.clone();
        loop {
            if let Some(info) = *exit.borrow_and_update() {
                return Err(StartError::Exited { exit: info.to_string(), tail: self.tail_text() });
            }
            let attempt = http.get(url).timeout(Duration::from_secs(1)).send();
            let healthy = tokio::select! {
                response = attempt => response.map(|r| r.status() == reqwest::StatusCode::OK).unwrap_or(false),
                _ = exit.changed() => false,
            };
            if healthy {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let error = StartError::Timeout { timeout, url: url.to_string(), tail: self.tail_text() };
                self.stop(Duration::from_millis(500)).await;
                return Err(error);
            }
            tokio::select! {
                _ = tokio::time::sleep(HEALTH_POLL) => {}
                _ = exit.changed() => {}
            }
        }
    }

    /// SIGTERM to the group, up to `grace` for it to exit, then SIGKILL; then SIGKILL for any
    /// straggler left in the group. Returns how it ended and whether SIGKILL was needed.
    pub async fn stop(&self, grace: Duration) -> (ExitInfo, bool) {
        let group = Pid::from_raw(self.group as i32);
        if self.exited().is_none() {
            let _ = killpg(group, Signal::SIGTERM);
        }
        let mut killed = false;
        let info = match tokio::time::timeout(grace, self.wait_exit()).await {
            Ok(info) => info,
            Err(_) => {
                killed = true;
                // Everything but the keeper first: it then sees the command die and sweeps the
                // descendants that left the group, which a SIGKILL of the keeper would orphan.
                let has_keeper = self.group != self.pid;
                if has_keeper {
                    for pid in group_members(self.group).into_iter().filter(|pid| *pid != self.group) {
                        let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    }
                }
                if !has_keeper || tokio::time::timeout(KEEPER_SWEEP_WAIT, self.wait_exit()).await.is_err() {
                    let _ = killpg(group, Signal::SIGKILL);
                }
                // A process stuck in the kernel (a wedged driver) may not die even now: bound the
                // wait so a release cannot hang forever.
                match tokio::time::timeout(KILL_WAIT, self.wait_exit()).await {
                    Ok(info) => info,
                    Err(_) => {
                        tracing::error!(
                            pid = self.pid,
                            "still alive {} after SIGKILL",
                            crate::units::Rounded(KILL_WAIT)
                        );
                        ExitInfo { code: None, signal: None }
                    }
                }
            }
        };
        if !group_members(self.group).is_empty() {
            let _ = killpg(group, Signal::SIGKILL);
        }
        (info, killed)
    }
}

/// Pids whose process group is `pgid` (a stopped server's workers, say), from `/proc`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| proc_stat_field(*pid, 5).is_some_and(|g| g == pgid as u64))
        // A zombie holds nothing and only waits for its parent to reap it.
        .filter(|pid| crate::gpu::pid_is_alive(*pid))
        .collect()
}

/// One numeric field of `/proc/<pid>/stat` (1-based as in proc(5): 5 = pgrp, 22 = starttime).
pub fn proc_stat_field(pid: u32, field: usize) -> Option<u64> {
    stat_fields(&proc_stat(pid)?)?.nth(field.checked_sub(3)?)?.parse().ok()
}

/// The text of `/proc/<pid>/stat`, for reading several of its fields with one read.
pub fn proc_stat(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()
}

/// The fields of a `/proc/<pid>/stat` text from field 3 (the state) on: those after the command
/// name, which is in parentheses and may contain spaces.
pub fn stat_fields(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    Some(stat[stat.rfind(')')? + 1..].split_whitespace())
}

type SpawnJob = (SpawnSpec, oneshot::Sender<Result<ProcessHandle, StartError>>);

/// The one thread that forks children (see the module docs for why).
#[derive(Clone)]
pub struct Spawner {
    jobs: std::sync::mpsc::Sender<SpawnJob>,
}

impl Spawner {
    /// Starts the spawner thread; it lives until every `Spawner` clone is dropped. Every command
    /// runs under a keeper: this very binary (`vramgate keeper`), started as `/proc/self/exe` so
    /// that it still starts after a package upgrade replaced the file the daemon was run from.
    pub fn start() -> std::io::Result<Spawner> {
        Spawner::start_with(Some(PathBuf::from("/proc/self/exe")))
    }

    /// Starts the spawner thread with `keeper` as the keeper binary, or none: then commands are
    /// started directly, and a wrapper's children can outlive a killed daemon (for unit tests,
    /// whose binary is not `vramgate`).
    pub fn start_with(keeper: Option<PathBuf>) -> std::io::Result<Spawner> {
        let (jobs, queue) = std::sync::mpsc::channel::<SpawnJob>();
        std::thread::Builder::new().name("vramgate-spawner".into()).spawn(move || {
            for (spec, reply) in queue {
                let _ = reply.send(spawn_now(spec, keeper.as_deref()));
            }
        })?;
        Ok(Spawner { jobs })
    }

    /// Starts a process from the spawner thread.
    pub async fn spawn(&self, spec: SpawnSpec) -> Result<ProcessHandle, StartError> {
        let program = spec.argv.first().cloned().unwrap_or_default();
        let (reply, answer) = oneshot::channel();
        let gone = || StartError::Spawn { program: program.clone(), message: "the spawner thread is gone".into() };
        self.jobs.send((spec, reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

fn spawn_now(spec: SpawnSpec, keeper: Option<&Path>) -> Result<ProcessHandle, StartError> {
    let program = spec.argv.first().cloned().unwrap_or_default();
    let fail = |message: String| StartError::Spawn { program: program.clone(), message };
    // The keeper tells on this pipe which pid the command got, or why it could not start it.
    let report = match keeper {
        Some(_) => Some(
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| fail(format!("cannot open a pipe: {e}")))?,
        ),
        None => None,
    };
    let report_fd = report.as_ref().map(|(_, write)| write.as_raw_fd());
    let mut command = match (keeper, report_fd) {
        (Some(keeper), Some(fd)) => {
            let mut command = Command::new(keeper);
            // How `ps` shows it; the program itself is this binary whatever its path.
            command.arg0("vramgate");
            command.args(["keeper", "--report-fd", &fd.to_string(), "--"]).args(&spec.argv);
            command
        }
        _ => {
            let mut command = Command::new(&program);
            command.args(&spec.argv[1.min(spec.argv.len())..]);
            command
        }
    };
    // NOTIFY_SOCKET is the daemon's own line to systemd: a model server that speaks sd_notify
    // (some do) must not report "ready" or "stopping" on the daemon's behalf.
    command.env_remove("NOTIFY_SOCKET");
    // The daemon's API token is not the model's business (a server that logs its environment
    // would write it to disk).
    command.env_remove(crate::config::TOKEN_ENV);
    command.envs(&spec.env).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some(cwd) = &spec.cwd {
        command.current_dir(cwd);
    }
    command.process_group(0);
    let parent = std::process::id() as i32;
    // The keeper catches SIGTERM and kills everything below it; a direct command just dies.
    let death_signal = if keeper.is_some() { Signal::SIGTERM } else { Signal::SIGKILL };
    // SAFETY: only async-signal-safe calls (fcntl, prctl, getppid, _exit) run between fork and
    // exec.
    unsafe {
        command.pre_exec(move || {
            if let Some(fd) = report_fd {
                // Only the keeper inherits the report pipe (it is close-on-exec for every other
                // child the daemon forks).
                if nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            nix::sys::prctl::set_pdeathsig(death_signal).map_err(std::io::Error::from)?;
            // The daemon may have died between fork and prctl; then nobody would ever kill us.
            if nix::unistd::getppid().as_raw() != parent {
                nix::libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|e| fail(e.to_string()))?;
    let group = child.id();
    let pid = match report {
        Some((read, write)) => {
            drop(write);
            match read_report(read) {
                Ok(pid) => pid,
                Err(message) => {
                    // The keeper exits at once after an error report (or died before any).
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(fail(message));
                }
            }
        }
        None => group,
    };
    let logs = LogBuffer::new(spec.log_file.as_deref());
    logs.push(format!("--- vramgate started pid {pid}: {} ---", spec.argv.join(" ")));
    // Each reader holds a clone of `reader_open` until its pipe reaches end-of-file; the waiter
    // sees the channel disconnect once both are done.
    let (reader_open, readers_done) = std::sync::mpsc::channel::<()>();
    if let Some(stdout) = child.stdout.take() {
        drain(stdout, logs.clone(), LogSource::Stdout, reader_open.clone());
    }
    if let Some(stderr) = child.stderr.take() {
        drain(stderr, logs.clone(), LogSource::Stderr, reader_open.clone());
    }
    drop(reader_open);
    // Read before the waiter can reap it: after that the pid may be gone.
    let start_ticks = proc_stat_field(group, 22).unwrap_or(0);
    let (exit_tx, exit) = watch::channel(None);
    let exit_logs = logs.clone();
    let waiter = std::thread::Builder::new().name(format!("vramgate-wait-{pid}")).spawn(move || {
        let info = match child.wait() {
            Ok(status) => ExitInfo::from_status(status),
            Err(_) => ExitInfo { code: None, signal: None },
        };
        // The exit is reported (and so the error's log tail taken) only once both streams are
        // read to their end, or after DRAIN_AFTER_EXIT if something else still holds them open.
        let _ = readers_done.recv_timeout(DRAIN_AFTER_EXIT);
        exit_logs.push(format!("--- pid {pid} {info} ---"));
        let _ = exit_tx.send(Some(info));
    });
    if let Err(e) = waiter {
        // Without a waiter nobody would reap it: stop it now rather than leak a zombie.
        let _ = killpg(Pid::from_raw(group as i32), Signal::SIGKILL);
        return Err(fail(format!("cannot start its waiter thread: {e}")));
    }
    Ok(ProcessHandle { pid, group, start_ticks, exit, logs })
}

/// Reads the keeper's one report line: the command's pid, or why it could not be started.
fn read_report(pipe: std::os::fd::OwnedFd) -> Result<u32, String> {
    let mut text = String::new();
    // Bounded: the report is one short line; the keeper closes the pipe right after it.
    std::fs::File::from(pipe)
        .take(4096)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the keeper's report: {e}"))?;
    parse_report(&text)
}

/// Parses the keeper's report: `pid N` or `error MESSAGE`.
fn parse_report(text: &str) -> Result<u32, String> {
    let line = text.lines().next().unwrap_or("");
    if let Some(pid) = line.strip_prefix("pid ") {
        return pid.trim().parse().map_err(|_| format!("the keeper reported a bad pid {pid:?}"));
    }
    match line.strip_prefix("error ") {
        Some(message) => Err(message.to_string()),
        None => Err("the keeper exited before starting it".to_string()),
    }
}

/// Reads a pipe line by line into the log until it closes; `open` is dropped then, which tells
/// the exit waiter this stream is complete.
fn drain(pipe: impl Read + Send + 'static, logs: Arc<LogBuffer>, source: LogSource, open: std::sync::mpsc::Sender<()>) {
    let name = if source == LogSource::Stderr { "vramgate-stderr" } else { "vramgate-stdout" };
    let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
        let _open = open;
        let mut reader = BufReader::new(pipe);
        let mut buffer = Vec::new();
        loop {
            buffer.clear();
            // A line is cut at MAX_LINE bytes: a progress bar redrawn with '\r' never ends one.
            match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut buffer) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buffer);
                    logs.push_from(source, line.trim_end_matches(['\n', '\r']).to_string());
                }
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!("cannot start a log reader thread: {e}; the child may stall on a full pipe");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `logs -f` reads the tail and subscribes in one step: with a writer pushing all along, every
    /// line is seen exactly once, in the tail or on the feed, whenever the follower starts. Many
    /// rounds, so that some follower starts between two pushes; fewer lines a round than the
    /// feed holds, so a slow reader never lags.
    #[test]
    fn a_follower_sees_every_line_once_however_it_races_the_writer() {
        const LINES: u32 = 200;
        for _ in 0..300 {
            let buffer = LogBuffer::new(None);
            let writer = {
                let buffer = buffer.clone();
                std::thread::spawn(move || {
                    for n in 0..LINES {
                        buffer.push_from(LogSource::Stdout, n.to_string());
                    }
                })
            };
            while buffer.tail(1).is_empty() {
                std::thread::yield_now();
            }
            let (tail, mut feed) = buffer.tail_and_follow(usize::MAX);
            writer.join().expect("writer");
            let mut seen: Vec<u32> = tail.iter().map(|l| l.parse().expect("a number")).collect();
            while let Ok(line) = feed.try_recv() {
                seen.push(line.parse().expect("a number"));
            }
            assert_eq!(seen, (0..LINES).collect::<Vec<_>>(), "lines lost or repeated between the tail and the feed");
        }
    }

    fn spec(script: &str) -> SpawnSpec {
        SpawnSpec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: BTreeMap::new(),
            cwd: None,
            log_file: None,
        }
    }

    #[test]
    fn the_keepers_report_gives_a_pid_or_the_reason() {
        assert_eq!(parse_report("pid 4321\n"), Ok(4321));
        assert_eq!(
            parse_report("error No such file or directory (os error 2)\n"),
            Err("No such file or directory (os error 2)".into())
        );
        assert_eq!(parse_report(""), Err("the keeper exited before starting it".into()));
        assert!(parse_report("pid many").unwrap_err().contains("bad pid"));
    }

    #[test]
    fn expansion_of_placeholders() {
        assert_eq!(expand("--port=${PORT} ${MODEL_ID}@${DEVICE}", 8080, "llm", Some(1)), "--port=8080 llm@1");
        assert_eq!(expand("${DEVICE}", 1, "x", None), "");
    }

    #[test]
    fn stat_fields_of_this_process() {
        let me = std::process::id();
        assert!(proc_stat_field(me, 22).is_some());
        assert!(proc_stat_field(me, 5).is_some());
        assert_eq!(proc_stat_field(u32::MAX, 5), None);
    }

    #[tokio::test]
    async fn output_is_captured_and_exit_reported() {
        let spawner = Spawner::start_with(None).unwrap();
        let handle = spawner.spawn(spec("echo out; echo err >&2; exit 7")).await.unwrap();
        let exit = handle.wait_exit().await;
        assert_eq!(exit.code, Some(7));
        // The exit is reported only once both streams are read to their end, so both lines are
        // there already, before the exit marker.
        let tail = handle.logs.tail(10);
        assert!(tail.iter().any(|l| l == "out") && tail.iter().any(|l| l == "err"), "{tail:?}");
        assert_eq!(tail.last().map(String::as_str), Some(format!("--- pid {} exit status 7 ---", handle.pid).as_str()));
    }

    #[tokio::test]
    async fn an_exit_at_start_always_carries_the_last_words_of_both_streams() {
        // The last words are written right before the exit, behind a screenful of earlier output
        // that the readers are still working through (the pipes hold up to 64 KiB each) when the
        // exit arrives. Repeated, because it is a race.
        let spawner = Spawner::start_with(None).unwrap();
        let http = reqwest::Client::new();
        let script = "seq 1 8000; seq 1 8000 >&2; echo 'on stdout'; echo 'out of memory' >&2; exit 3";
        for attempt in 0..10 {
            let handle = spawner.spawn(spec(script)).await.unwrap();
            let err =
                handle.wait_ready(Some("http://127.0.0.1:9/health"), Duration::from_secs(10), &http).await.unwrap_err();
            let text = err.to_string();
            assert!(text.contains("exit status 3"), "attempt {attempt}: {text}");
            assert!(text.contains("out of memory"), "attempt {attempt}: the stderr line is missing: {text}");
            assert!(text.contains("on stdout"), "attempt {attempt}: the stdout line is missing: {text}");
        }
    }

    #[tokio::test]
    async fn a_grandchild_holding_the_pipes_delays_the_exit_report_only_briefly() {
        let spawner = Spawner::start_with(None).unwrap();
        // The background sleep inherits both pipes and keeps them open after its parent exits.
        let handle = spawner.spawn(spec("sleep 30 & echo bye >&2; exit 5")).await.unwrap();
        let started = Instant::now();
        let exit = tokio::time::timeout(Duration::from_secs(5), handle.wait_exit()).await.expect("exit reported");
        assert_eq!(exit.code, Some(5));
        assert!(started.elapsed() < DRAIN_AFTER_EXIT + Duration::from_secs(2), "{:?}", started.elapsed());
        assert!(handle.logs.tail(10).iter().any(|l| l == "bye"), "{:?}", handle.logs.tail(10));
        let _ = killpg(Pid::from_raw(handle.pid as i32), Signal::SIGKILL);
    }

    #[tokio::test]
    async fn exit_during_start_up_carries_status_and_output() {
        let spawner = Spawner::start_with(None).unwrap();
        let handle = spawner.spawn(spec("echo 'model file missing' >&2; exit 4")).await.unwrap();
        let http = reqwest::Client::new();
        let err =
            handle.wait_ready(Some("http://127.0.0.1:9/health"), Duration::from_secs(10), &http).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("exit status 4"), "{text}");
        assert!(text.contains("model file missing"), "{text}");
    }

    #[tokio::test]
    async fn a_term_ignoring_child_is_killed_after_the_grace() {
        let spawner = Spawner::start_with(None).unwrap();
        let handle = spawner.spawn(spec("trap '' TERM; echo ready; while true; do sleep 0.01; done")).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !handle.logs.tail(5).iter().any(|l| l == "ready") {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let started = Instant::now();
        let (exit, killed) = handle.stop(Duration::from_millis(200)).await;
        assert!(killed);
        assert_eq!(exit.signal, Some(9));
        assert!(started.elapsed() < Duration::from_secs(3));
        // SIGKILL is asynchronous: wait (bounded) for the kernel to finish the group off.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !group_members(handle.pid).is_empty() {
            assert!(Instant::now() < deadline, "the whole group is gone");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let spawner = Spawner::start_with(None).unwrap();
        let mut bad = spec("");
        bad.argv = vec!["/nonexistent/llama-server".into()];
        let err = spawner.spawn(bad).await.err().unwrap();
        assert!(err.to_string().contains("/nonexistent/llama-server"), "{err}");
    }

    #[tokio::test]
    async fn an_endless_line_is_split_not_hoarded() {
        let spawner = Spawner::start_with(None).unwrap();
        let handle = spawner.spawn(spec("head -c 40000 /dev/zero | tr '\\0' x; echo")).await.unwrap();
        handle.wait_exit().await;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let total: usize = handle.logs.tail(10).iter().filter(|l| l.starts_with('x')).map(String::len).sum();
            if total == 40000 {
                break;
            }
            assert!(Instant::now() < deadline, "got {total} bytes of the line");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(handle.logs.tail(10).iter().all(|l| l.len() as u64 <= MAX_LINE));
    }

    #[test]
    fn log_ring_keeps_the_last_lines() {
        let logs = LogBuffer::new(None);
        for i in 0..(LOG_RING_LINES + 5) {
            logs.push(i.to_string());
        }
        let tail = logs.tail(2);
        assert_eq!(tail, vec![(LOG_RING_LINES + 3).to_string(), (LOG_RING_LINES + 4).to_string()]);
        assert_eq!(logs.tail(usize::MAX).len(), LOG_RING_LINES);
    }

    #[test]
    fn an_error_tail_quotes_the_last_lines_of_each_stream() {
        let logs = LogBuffer::new(None);
        logs.push("--- started ---".into());
        logs.push_from(LogSource::Stderr, "fatal: no such model file".into());
        for i in 0..(LOG_RING_LINES + 30) {
            logs.push_from(LogSource::Stdout, format!("progress {i}"));
        }
        logs.push("--- exited ---".into());
        let tail = logs.error_tail();
        let skipped = LOG_RING_LINES + 30 - (ERROR_TAIL_LINES - 1);
        let mut expected = vec!["fatal: no such model file".to_string(), format!("[... {skipped} lines ...]")];
        expected.extend((skipped..LOG_RING_LINES + 30).map(|i| format!("progress {i}")));
        expected.push("--- exited ---".into());
        assert_eq!(tail, expected);
        // Short logs come whole, with no gap marker.
        let short = LogBuffer::new(None);
        short.push_from(LogSource::Stdout, "a".into());
        short.push_from(LogSource::Stderr, "b".into());
        assert_eq!(short.error_tail(), vec!["a", "b"]);
    }

    #[test]
    fn exit_info_reads_naturally() {
        assert_eq!(ExitInfo { code: Some(3), signal: None }.to_string(), "exit status 3");
        assert_eq!(ExitInfo { code: None, signal: Some(9) }.to_string(), "killed by SIGKILL");
    }
}
