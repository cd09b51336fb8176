//! `vramgate run --vram SIZE -- CMD…`: hold a lease while a command runs.
//!
//! The lease is held by this process's connection to the daemon: if this process dies (even by
//! SIGKILL) the connection closes and the daemon releases the lease within a second. The command
//! runs with `CUDA_VISIBLE_DEVICES` set to the leased device and exits with the command's status.

use std::process::ExitCode;

use std::io::IsTerminal;

use clap::Args;
use tokio::signal::unix::{SignalKind, signal};

use super::DaemonUrl;
use crate::client::Client;
use crate::units::{Mib, Span};

/// Exit status when no lease could be had (EX_TEMPFAIL: try again later).
pub const EXIT_NO_LEASE: u8 = 75;
/// Exit status when the command cannot be started (as shells do).
const EXIT_NOT_FOUND: u8 = 127;

#[derive(Debug, Args)]
#[command(trailing_var_arg = true)]
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
    /// How long to wait for memory before giving up ("0" = fail at once). Default: the daemon's
    /// scheduler.queue_timeout.
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

pub(super) async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.daemon.url)?;
    let program = args.command[0].clone();
    let holder = args.holder.clone().unwrap_or_else(|| {
        std::path::Path::new(&program).file_name().and_then(|n| n.to_str()).unwrap_or(&program).to_string()
    });
    let mut request = serde_json::json!({
        "holder": holder,
        "vram": args.vram.0,
        "exclusive": args.exclusive,
        "hold": "connection",
        // The command is this process's child: its GPU memory is the lease's, not foreign.
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
    let (grant, mut lease_stream) = match client.hold_lease(&request).await {
        Ok(granted) => granted,
        Err(e) => {
            eprintln!("vramgate run: no lease for {}: {e:#}", args.vram);
            return Ok(ExitCode::from(EXIT_NO_LEASE));
        }
    };

    let mut command = tokio::process::Command::new(&program);
    command.args(&args.command[1..]);
    command.env("VRAMGATE_LEASE_ID", &grant.id).env("VRAMGATE_LEASE_MIB", grant.vram_mib.to_string());
    if let Some(device) = grant.device {
        command.env("CUDA_VISIBLE_DEVICES", device.to_string());
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
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("vramgate run: cannot start {program:?}: {e}");
            return Ok(ExitCode::from(EXIT_NOT_FOUND));
        }
    };
    let child_pid = child.id();

    // Keep reading the heartbeats: the daemon notices we are gone when its writes fail.
    let watcher = tokio::spawn(async move {
        while let Ok(Some(_)) = lease_stream.chunk().await {}
        eprintln!("vramgate run: the daemon closed the lease (it stopped?); the command keeps running unguarded");
    });

    let interactive = std::io::stdin().is_terminal();
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
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
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    };
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

fn forward(pid: Option<u32>, signal: nix::sys::signal::Signal) {
    if let Some(pid) = pid {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
    }
}
