//! The keeper: a small `vramgate keeper` process between the daemon and every model command, so
//! that no process a model starts, however deep, outlives the daemon (not even under `kill -9`).
//!
//! `PR_SET_PDEATHSIG` reaches only the one process that set it; a wrapper (`sh -c`, `env`, a
//! conda or uv runner) or a server that double-forks away from its process group would survive.
//! The keeper is the group leader of the model's process group and a child subreaper
//! (`PR_SET_CHILD_SUBREAPER`), so every descendant whose parent exits is reparented to it instead
//! of to init. It starts the command in its own group, forwards SIGTERM and SIGINT to everything
//! below it, and sweeps (SIGKILL) every descendant, in the group or not, when the command exits
//! or when the daemon dies (its parent-death signal, backed by polling `getppid`). It then exits
//! the way the command did (same exit code, or killed by the same signal), so the daemon's exit
//! reporting reads as if it had started the command directly.

use std::collections::BTreeSet;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, kill, sigaction};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// How often the keeper looks for exits, signals and its parent.
const POLL: Duration = Duration::from_millis(10);
/// How long a sweep keeps killing descendants (one may fork while it is being killed).
const SWEEP_LIMIT: Duration = Duration::from_secs(2);
/// Exit status when the command could not be started at all.
const EXIT_CANNOT_START: u8 = 127;

/// Arguments of the hidden `vramgate keeper` subcommand (the daemon starts it; not for users).
#[derive(Debug, clap::Args)]
pub struct KeeperArgs {
    /// A file descriptor, inherited from the daemon, on which the keeper reports `pid N` once the
    /// command runs, or `error MESSAGE` if it could not be started, then closes it.
    #[arg(long)]
    pub report_fd: Option<i32>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Set by the SIGTERM/SIGINT handler: a stop was asked for (or the daemon died).
static STOP_ASKED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: nix::libc::c_int) {
    STOP_ASKED.store(true, Ordering::SeqCst);
}

/// Runs the keeper; returns only if the command's exit cannot be mirrored by a signal.
pub fn main(args: KeeperArgs) -> ExitCode {
    // The daemon pid as seen at start: when it changes, the daemon is gone.
    let daemon = nix::unistd::getppid();
    // Started as /proc/self/exe, the process would be named "exe" in ps, top and crash reports.
    let _ = nix::sys::prctl::set_name(c"vramgate-keeper");
    let mut report = args.report_fd.map(|fd| {
        // SAFETY: the daemon passes a pipe's write end it opened for us alone and closed on its
        // side; nothing else in this process owns that descriptor.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // The command must not inherit it, or the daemon would wait for the command to close it.
        let _ = nix::fcntl::fcntl(&owned, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
        std::fs::File::from(owned)
    });
    let mut say = |line: String| {
        if let Some(mut file) = report.take() {
            use std::io::Write;
            let _ = writeln!(file, "{line}");
        }
    };
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        say(format!("error cannot become a child subreaper: {e}"));
        return ExitCode::from(EXIT_CANNOT_START);
    }
    let handler = SigAction::new(SigHandler::Handler(on_stop_signal), SaFlags::SA_RESTART, SigSet::empty());
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        if let Err(e) = unsafe { sigaction(signal, &handler) } {
            say(format!("error cannot handle {signal}: {e}"));
            return ExitCode::from(EXIT_CANNOT_START);
        }
    }
    // The daemon may have died before the handler was in place; its death signal is then lost.
    if nix::unistd::getppid() != daemon {
        return ExitCode::from(EXIT_CANNOT_START);
    }
    let Some((program, rest)) = args.command.split_first() else {
        say("error no command given".into());
        return ExitCode::from(EXIT_CANNOT_START);
    };
    let mut command = std::process::Command::new(program);
    command.args(rest);
    let keeper = std::process::id() as i32;
    // SAFETY: only async-signal-safe calls (sigaction, sigprocmask, prctl, getppid, _exit) run
    // between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // A handler does not survive exec anyway, but the default disposition must be back
            // for the command to die of SIGTERM as it would without the keeper.
            for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
                let _ = sigaction(signal, &SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty()));
            }
            // If the keeper itself is killed (SIGKILL), the command goes with it.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            if nix::unistd::getppid().as_raw() != keeper {
                nix::libc::_exit(1);
            }
            Ok(())
        });
    }
    let child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            say(format!("error {e}"));
            eprintln!("vramgate keeper: cannot start {program:?}: {e}");
            return ExitCode::from(EXIT_CANNOT_START);
        }
    };
    let command_pid = child.id();
    say(format!("pid {command_pid}"));
    // The child is reaped below with waitpid(-1), together with the orphans handed to us.
    drop(child);
    let status = supervise(daemon, command_pid);
    sweep(Signal::SIGKILL);
    mirror(status)
}

/// How the command ended, as the keeper will repeat it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Code(i32),
    Signal(Signal),
    /// A signal nix has no name for (the real-time ones, 32 to 64): its number.
    OtherSignal(i32),
}

/// What one non-blocking wait for any child found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reaped {
    /// No child has changed state (or there is no child).
    Nothing,
    Exited(u32, i32),
    Signaled(u32, i32),
    /// A child stopped or continued; nothing was reaped.
    Other,
}

/// Waits for any child without blocking, decoding the status itself: nix's `waitpid` reaps a
/// child killed by a real-time signal and then fails to name the signal, losing the exit.
fn reap_one() -> Reaped {
    let mut status: nix::libc::c_int = 0;
    // SAFETY: waitpid writes only into `status`, a valid c_int.
    let pid = unsafe { nix::libc::waitpid(-1, &mut status, nix::libc::WNOHANG) };
    let Ok(pid) = u32::try_from(pid) else { return Reaped::Nothing };
    if pid == 0 {
        Reaped::Nothing
    } else if nix::libc::WIFEXITED(status) {
        Reaped::Exited(pid, nix::libc::WEXITSTATUS(status))
    } else if nix::libc::WIFSIGNALED(status) {
        Reaped::Signaled(pid, nix::libc::WTERMSIG(status))
    } else {
        Reaped::Other
    }
}

/// Reaps every child (the command and orphans reparented to the keeper) until the command exits
/// or the daemon is gone. A stop request is forwarded to all descendants once.
fn supervise(daemon: Pid, command_pid: u32) -> Ending {
    let mut forwarded = false;
    loop {
        loop {
            match reap_one() {
                Reaped::Exited(pid, code) if pid == command_pid => return Ending::Code(code),
                Reaped::Signaled(pid, number) if pid == command_pid => {
                    return Signal::try_from(number).map_or(Ending::OtherSignal(number), Ending::Signal);
                }
                Reaped::Nothing => break,
                // An orphan reaped, or a stop/continue report: look again.
                Reaped::Exited(..) | Reaped::Signaled(..) | Reaped::Other => {}
            }
        }
        if nix::unistd::getppid() != daemon {
            // The daemon died (however): nothing of the model may outlive it.
            return Ending::Signal(Signal::SIGKILL);
        }
        if STOP_ASKED.load(Ordering::SeqCst) && !forwarded {
            forwarded = true;
            // The group got the stop signal already (the daemon signals the whole group); a second
            // SIGTERM makes servers such as llama-server abort ("second interrupt"). Only those
            // that left the group hear it from the keeper.
            let group: BTreeSet<u32> = crate::backend::process::group_members(std::process::id()).into_iter().collect();
            for pid in descendants().difference(&group) {
                let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGTERM);
            }
        }
        std::thread::sleep(POLL);
    }
}

/// Sends `signal` to every descendant until none is left (or [`SWEEP_LIMIT`] passes), reaping
/// them as they die.
fn sweep(signal: Signal) {
    let deadline = Instant::now() + SWEEP_LIMIT;
    loop {
        let left = descendants();
        if left.is_empty() || Instant::now() >= deadline {
            return;
        }
        for pid in left {
            let _ = kill(Pid::from_raw(pid as i32), signal);
        }
        while let Ok(status) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            if status == WaitStatus::StillAlive {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Every live process below the keeper: its process group (the command's workers, even those
/// whose parent already exited) and its children's children, recursively (a descendant that left
/// the group with `setsid` is still reparented to the keeper, a subreaper).
fn descendants() -> BTreeSet<u32> {
    let me = std::process::id();
    let mut found: BTreeSet<u32> = crate::backend::process::group_members(me).into_iter().collect();
    let mut visited = BTreeSet::new();
    let mut queue = vec![me];
    while let Some(pid) = queue.pop() {
        // A process tree has no cycles, but a pid reused mid-walk could make one: visit once.
        if !visited.insert(pid) {
            continue;
        }
        for child in children_of(pid) {
            found.insert(child);
            queue.push(child);
        }
    }
    found.remove(&me);
    found.retain(|pid| crate::gpu::pid_is_alive(*pid));
    found
}

/// The children of `pid`, from `/proc/<pid>/task/*/children` (every thread may have forked).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    let mut children = Vec::new();
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            children.extend(parse_children(&text));
        }
    }
    children
}

/// Parses a `/proc/<pid>/task/<tid>/children` file: pids separated by spaces.
pub fn parse_children(text: &str) -> Vec<u32> {
    text.split_whitespace().filter_map(|word| word.parse().ok()).collect()
}

/// Ends the keeper the way the command ended: the same exit code, or the same signal (with the
/// default action, and no core file of the keeper itself).
fn mirror(ending: Ending) -> ExitCode {
    match ending {
        Ending::Code(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        // No name, so no portable way to repeat it: say it the shell's way.
        Ending::OtherSignal(number) => ExitCode::from(u8::try_from(128 + number.clamp(0, 127)).unwrap_or(255)),
        Ending::Signal(signal) => {
            let no_core = nix::libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            // SAFETY: setrlimit with a valid struct has no memory effects.
            unsafe { nix::libc::setrlimit(nix::libc::RLIMIT_CORE, &no_core) };
            // SAFETY: restoring the default action is always sound.
            let _ =
                unsafe { sigaction(signal, &SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty())) };
            let mut only = SigSet::empty();
            only.add(signal);
            let _ = only.thread_unblock();
            let _ = nix::sys::signal::raise(signal);
            // A signal whose default action does not end a process: say it the shell's way.
            ExitCode::from(128u8.saturating_add(signal as i32 as u8))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_files_parse_to_pids() {
        assert_eq!(parse_children("12 345 6\n"), vec![12, 345, 6]);
        assert_eq!(parse_children(""), Vec::<u32>::new());
        assert_eq!(parse_children("7 x 8"), vec![7, 8]);
    }

    #[test]
    fn this_process_lists_a_child_it_started() {
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let listed = children_of(std::process::id()).contains(&child.id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(listed, "a child of this test process is listed in /proc/*/task/*/children");
    }
}
