//! `vramgate run --vram SIZE -- CMD…`: hold a lease while a command runs.
//!
//! The lease is held by this process's connection to the daemon: if this process dies (even by
//! SIGKILL) the connection closes and the daemon releases the lease within a second. The command
//! runs with `CUDA_VISIBLE_DEVICES` set to the leased device and exits with the command's status.
//! The command is looked up before the lease is asked for: a typo must not evict a model.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use tokio::signal::unix::{SignalKind, signal};

use super::DaemonUrl;
use crate::client::Client;
use crate::units::{Mib, Span};

/// Exit status when no lease could be had (EX_TEMPFAIL: try again later).
pub const EXIT_NO_LEASE: u8 = 75;
/// Exit status when the command is not found (as shells do).
const EXIT_NOT_FOUND: u8 = 127;
/// Exit status when the command is found but cannot be executed (as shells do).
const EXIT_NOT_EXECUTABLE: u8 = 126;

/// Where `execvp` looks when `PATH` is not set (glibc's `_CS_PATH`).
const DEFAULT_PATH: &str = "/bin:/usr/bin";

#[derive(Debug, Args)]
#[command(
    trailing_var_arg = true,
    after_help = "Exit status:
  N        the command's own exit status
  128+N    the command was ended by signal N (130: SIGINT, 143: SIGTERM)
  75       no lease: it can never fit, the wait (--wait, else scheduler.queue_timeout) ran out,
           or the daemon cannot be reached; the command did not run
  126      the command is not executable
  127      the command was not found (checked before the lease is asked for: nothing is evicted)
  1        vramgate itself failed (e.g. an invalid --url)

The command runs with:
  CUDA_VISIBLE_DEVICES  the leased GPU's index, as `vramgate status` numbers devices
  CUDA_DEVICE_ORDER     PCI_BUS_ID (unless set already), so CUDA numbers GPUs that way too
  VRAMGATE_LEASE_ID     the lease's id
  VRAMGATE_LEASE_MIB    the memory leased, in MiB

While it waits in the daemon's queue, it says on stderr what it waits for, with the numbers.
If vramgate run is killed, the lease is released within a second and the command gets SIGTERM."
)]
pub(super) struct RunArgs {
    /// VRAM to hold while the command runs: "6G", "1536MiB", "1.5GiB".
    #[arg(long, value_parser = parse_size)]
    vram: Mib,
    /// The GPU to use; by default vramgate picks the one with the most room.
    #[arg(long)]
    device: Option<u32>,
    /// Hold the GPU alone: no other lease or model load is granted on it meanwhile (resident
    /// models stay).
    #[arg(long)]
    exclusive: bool,
    /// Priority: idle models of lower or equal priority may be evicted to make room.
    #[arg(long)]
    priority: Option<i32>,
    /// How long to wait for memory before giving up: "30s", "2m", or a number of seconds ("5",
    /// "1.5"); "0" fails at once. Default: the daemon's scheduler.queue_timeout.
    #[arg(long, value_parser = parse_duration)]
    wait: Option<Span>,
    /// Name shown in status; default: the command's name.
    #[arg(long)]
    holder: Option<String>,
    #[command(flatten)]
    daemon: DaemonUrl,
    /// The command and its arguments (after `--`).
    #[arg(required = true, num_args = 1..)]
    command: Vec<String>,
}

fn parse_size(text: &str) -> Result<Mib, String> {
    text.parse::<Mib>().map_err(|e| e.to_string())
}

fn parse_duration(text: &str) -> Result<Span, String> {
    text.parse::<Span>().map_err(|e| e.to_string())
}

/// Why the command cannot be run; the exit status and the message say which.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Unrunnable {
    /// Nothing by that name on `PATH`, or no file at that path.
    NotFound,
    /// A file is there, but this user cannot execute it (or it is a directory).
    NotExecutable(PathBuf),
}

/// Finds the file `execvp` would run for `program`: a name with a slash is a path; any other name
/// is looked up in the directories of `path` (an empty entry is the current directory). Done
/// before the lease is asked for, so that a typo neither waits in the queue nor evicts a model.
fn resolve(program: &str, path: Option<OsString>) -> Result<PathBuf, Unrunnable> {
    if program.is_empty() {
        return Err(Unrunnable::NotFound);
    }
    if program.contains('/') {
        let candidate = PathBuf::from(program);
        return match std::fs::metadata(&candidate) {
            Err(_) => Err(Unrunnable::NotFound),
            Ok(_) if executable(&candidate) => Ok(candidate),
            Ok(_) => Err(Unrunnable::NotExecutable(candidate)),
        };
    }
    let path = path.unwrap_or_else(|| DEFAULT_PATH.into());
    let mut not_executable = None;
    for dir in std::env::split_paths(&path) {
        let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
        let candidate = dir.join(program);
        if executable(&candidate) {
            return Ok(candidate);
        }
        // Like execvp: a file that is there but not executable is reported only if nothing
        // later on the path can be run.
        if not_executable.is_none() && candidate.exists() {
            not_executable = Some(candidate);
        }
    }
    Err(not_executable.map_or(Unrunnable::NotFound, Unrunnable::NotExecutable))
}

/// A regular file this process may execute (access(2) knows about permissions, ACLs and noexec
/// mounts, which the mode bits alone do not).
fn executable(candidate: &Path) -> bool {
    candidate.is_file() && nix::unistd::access(candidate, nix::unistd::AccessFlags::X_OK).is_ok()
}

pub(super) async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let program = args.command[0].clone();
    let executable = match resolve(&program, std::env::var_os("PATH")) {
        Ok(found) => found,
        Err(Unrunnable::NotFound) => {
            eprintln!("vramgate run: {program}: command not found");
            return Ok(ExitCode::from(EXIT_NOT_FOUND));
        }
        Err(Unrunnable::NotExecutable(path)) if path.as_os_str() == program.as_str() => {
            eprintln!("vramgate run: {program}: not executable");
            return Ok(ExitCode::from(EXIT_NOT_EXECUTABLE));
        }
        Err(Unrunnable::NotExecutable(path)) => {
            eprintln!("vramgate run: {program}: not executable ({})", path.display());
            return Ok(ExitCode::from(EXIT_NOT_EXECUTABLE));
        }
    };
    let client = Client::new(&args.daemon.url)?;
    let holder = args.holder.clone().unwrap_or_else(|| {
        std::path::Path::new(&program).file_name().and_then(|n| n.to_str()).unwrap_or(&program).to_string()
    });
    let mut request = serde_json::json!({
        "holder": holder,
        "vram": args.vram.0,
        "exclusive": args.exclusive,
        "hold": "connection",
        // The command is this process's child: its GPU memory is the lease's, not foreign. The
        // pid also finds this request in the status document's queue.
        "pid": std::process::id(),
    });
    if let Some(device) = args.device {
        request["device"] = device.into();
    }
    if let Some(priority) = args.priority {
        request["priority"] = priority.into();
    }
    if let Some(wait) = args.wait {
        request["wait"] = wait.to_string().into();
    }
    // Its queue entry: the lease asked for by this process.
    let pid = std::process::id();
    let mine =
        |_: &crate::status::Status, entry: &crate::status::QueueEntry| entry.kind == "lease" && entry.pid == Some(pid);
    let (grant, mut lease_stream) =
        match super::models::report_queue("vramgate run", &client, client.hold_lease(&request), mine).await {
            Ok(granted) => granted,
            Err(e) => {
                eprintln!("vramgate run: no lease for {}: {e:#}", args.vram);
                return Ok(ExitCode::from(EXIT_NO_LEASE));
            }
        };

    // The file found above, under the name it was given (what `ps` and the program itself see).
    let mut command = tokio::process::Command::new(&executable);
    command.arg0(&program).args(&args.command[1..]);
    command.env("VRAMGATE_LEASE_ID", &grant.id).env("VRAMGATE_LEASE_MIB", grant.vram_mib.to_string());
    if let Some(device) = grant.device {
        command.env("CUDA_VISIBLE_DEVICES", device.to_string());
        // CUDA numbers devices fastest first unless told otherwise; the lease's index is NVML's,
        // in PCI bus order. A user's own choice stands.
        if std::env::var_os("CUDA_DEVICE_ORDER").is_none() {
            command.env("CUDA_DEVICE_ORDER", "PCI_BUS_ID");
        }
    }
    // If this process dies (even by SIGKILL) the lease is gone, so the command must not keep
    // using the GPU unguarded: it gets SIGTERM. It stays in our process group so that it keeps
    // the terminal (ffmpeg reads keys from it).
    // SAFETY: only prctl, an async-signal-safe call, runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM).map_err(std::io::Error::from)
        });
    }
    // The handlers are in place before the command exists: a signal that arrives right after the
    // spawn is forwarded, not the default action that would kill `run` and leave the command.
    // (A command's exec resets handled signals to their defaults.)
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut child = match command.spawn() {
        Ok(child) => child,
        // Replaced or made unexecutable since it was looked up.
        Err(e) => {
            eprintln!("vramgate run: cannot start {program}: {e}");
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), client.release(&grant.id)).await;
            let code = if e.kind() == std::io::ErrorKind::NotFound { EXIT_NOT_FOUND } else { EXIT_NOT_EXECUTABLE };
            return Ok(ExitCode::from(code));
        }
    };
    let child_pid = child.id();

    // Keep reading the heartbeats: the daemon notices we are gone when its writes fail.
    let watcher = tokio::spawn(async move {
        while let Ok(Some(_)) = lease_stream.chunk().await {}
        eprintln!("vramgate run: the daemon closed the lease (it stopped?); the command keeps running unguarded");
    });

    let interactive = std::io::stdin().is_terminal();
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            // From a terminal, Ctrl-C already reached the whole foreground group, the command
            // included: sending it again would look like a second Ctrl-C ("force quit").
            _ = sigint.recv() => if !interactive { forward(child_pid, nix::sys::signal::Signal::SIGINT) },
            _ = sigterm.recv() => forward(child_pid, nix::sys::signal::Signal::SIGTERM),
        }
    };
    // Release explicitly first (closing the connection would too, at the next heartbeat).
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), client.release(&grant.id)).await;
    watcher.abort();
    use std::os::unix::process::ExitStatusExt;
    let code = match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128i32.saturating_add(signal),
        (None, None) => 1,
    };
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

fn forward(pid: Option<u32>, signal: nix::sys::signal::Signal) {
    if let Some(pid) = pid {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn file(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    #[test]
    fn names_are_looked_up_on_the_path_in_order() {
        let first = tempfile::tempdir().expect("tempdir");
        let second = tempfile::tempdir().expect("tempdir");
        let tool = file(second.path(), "tool", 0o755);
        let path = std::env::join_paths([first.path(), second.path()]).expect("join");
        assert_eq!(resolve("tool", Some(path.clone())), Ok(tool));
        let earlier = file(first.path(), "tool", 0o755);
        assert_eq!(resolve("tool", Some(path.clone())), Ok(earlier));
        assert_eq!(resolve("nosuchcmd", Some(path)), Err(Unrunnable::NotFound));
        assert_eq!(resolve("", None), Err(Unrunnable::NotFound));
    }

    #[test]
    fn a_file_that_is_not_executable_is_reported_unless_a_later_one_is() {
        let first = tempfile::tempdir().expect("tempdir");
        let second = tempfile::tempdir().expect("tempdir");
        let plain = file(first.path(), "tool", 0o644);
        let path = std::env::join_paths([first.path(), second.path()]).expect("join");
        // access(2) wants an x bit even for root, so this holds in a root container too.
        assert_eq!(resolve("tool", Some(path.clone())), Err(Unrunnable::NotExecutable(plain)));
        let runnable = file(second.path(), "tool", 0o755);
        assert_eq!(resolve("tool", Some(path)), Ok(runnable));
    }

    #[test]
    fn a_name_with_a_slash_is_a_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = file(dir.path(), "job.sh", 0o755);
        let plain = file(dir.path(), "notes.txt", 0o644);
        let shown = |p: &Path| p.to_str().expect("utf-8 temp path").to_string();
        // Not looked up on the path, even when the path has a file of that name.
        let path = std::env::join_paths([dir.path()]).expect("join");
        assert_eq!(resolve(&shown(&script), Some(path.clone())), Ok(script.clone()));
        assert_eq!(resolve(&shown(&plain), Some(path.clone())), Err(Unrunnable::NotExecutable(plain)));
        assert_eq!(resolve(&shown(&dir.path().join("gone")), Some(path.clone())), Err(Unrunnable::NotFound));
        assert_eq!(resolve(&shown(dir.path()), Some(path)), Err(Unrunnable::NotExecutable(dir.path().to_path_buf())));
    }
}
