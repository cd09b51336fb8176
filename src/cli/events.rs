//! `vramgate events [--json]`: follows the event stream until interrupted.

use std::time::Duration;

use clap::Args;
use futures_util::StreamExt;

use super::DaemonUrl;
use crate::client::Client;
use crate::events::{Event, EventKind};
use crate::units::Rounded;

#[derive(Debug, Args)]
pub(super) struct EventsArgs {
    /// Print each event as one line of JSON, as the daemon sends it.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    daemon: DaemonUrl,
}

pub(super) async fn run(args: EventsArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.daemon.url)?;
    let stream = client.events().await?;
    tokio::pin!(stream);
    while let Some(item) = stream.next().await {
        let (raw, event) = item?;
        let line = if args.json { raw } else { describe(&event) };
        if !super::print_line(&line) {
            return Ok(());
        }
    }
    Err(anyhow::anyhow!("the daemon closed the event stream (it is shutting down or was restarted)"))
}

/// One readable line per event.
pub(crate) fn describe(event: &Event) -> String {
    let time = event.time.format("%H:%M:%S%.3f");
    let what = match &event.kind {
        EventKind::LevelChanged { device, from, to, used_mib, total_mib } => {
            format!("GPU {device} level {from} -> {to} ({used_mib} of {total_mib} MiB used)")
        }
        EventKind::VramChanged { device, used_mib, previous_mib, free_mib } => {
            // Both come from the daemon as u64: their difference always fits an i128.
            let delta = i128::from(*used_mib) - i128::from(*previous_mib);
            format!("GPU {device} used {previous_mib} -> {used_mib} MiB ({delta:+} MiB, {free_mib} MiB free)")
        }
        EventKind::ProbeFailed { probe, error } => format!("probe {probe} failed: {error}"),
        EventKind::ProbeRecovered { probe, failed_samples } => {
            format!("probe {probe} recovered after {failed_samples} failed sample(s)")
        }
        EventKind::ModelState { model, from, to, reason, device, vram_mib, error } => {
            let device = device.map(|d| format!(" on GPU {d}")).unwrap_or_default();
            let error = error.as_ref().map(|e| format!(": {}", e.lines().next().unwrap_or(""))).unwrap_or_default();
            format!("model {model} {from} -> {to} ({reason}){device}, {vram_mib} MiB{error}")
        }
        EventKind::Queued { requester, reason } => format!("{requester} waits: {reason}"),
        EventKind::LeaseGranted { id, holder, device, vram_mib, exclusive } => {
            let device = device.map(|d| format!(" on GPU {d}")).unwrap_or_default();
            let exclusive = if *exclusive { " (exclusive)" } else { "" };
            format!("lease {id} for {holder}: {vram_mib} MiB{device}{exclusive}")
        }
        EventKind::LeaseReleased { id, holder, reason } => format!("lease {id} of {holder} released ({reason})"),
        EventKind::MemoryReleaseTimeout { model, waited_ms } => {
            format!("model {model}: memory not back after {}", Rounded(Duration::from_millis(*waited_ms)))
        }
        EventKind::ModeChanged { from, to } => match from {
            Some(from) => format!("mode {from} -> {to}"),
            None => format!("mode {to}"),
        },
        EventKind::ModelPlaced { model, placement, reason } => format!("{model} now on {placement} ({reason})"),
        EventKind::ExternalAttachment { model, change, holder, pid } => match pid {
            Some(pid) => format!("{model}: app {holder} (pid {pid}) {change}"),
            None => format!("{model}: app {holder} {change}"),
        },
        EventKind::ExternalUnresponsive { model, action, waited_ms } => {
            format!(
                "{model}: the app did not acknowledge `{action}` within {}; no longer counted on",
                Rounded(Duration::from_millis(*waited_ms))
            )
        }
        EventKind::OllamaReachability { url, reachable, error } => match (reachable, error) {
            (true, _) => format!("Ollama at {url} answers again"),
            (false, Some(error)) => format!("Ollama at {url} unreachable: {error}"),
            (false, None) => format!("Ollama at {url} unreachable"),
        },
        EventKind::LeftoverReaped { pid, model } => format!("stopped leftover pid {pid} of model {model}"),
        EventKind::EventsLost { count } => format!("{count} event(s) lost: this client fell behind"),
    };
    format!("{time} {:<16} {what}", event.kind.name())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::Level;

    #[test]
    fn lines_read_naturally() {
        let event = Event {
            seq: 3,
            time: chrono::Utc::now(),
            kind: EventKind::VramChanged { device: 0, used_mib: 900, previous_mib: 1000, free_mib: 7292 },
        };
        assert!(describe(&event).contains("GPU 0 used 1000 -> 900 MiB (-100 MiB, 7292 MiB free)"));
        let event = Event {
            seq: 4,
            time: chrono::Utc::now(),
            kind: EventKind::LevelChanged {
                device: 1,
                from: Level::Ok,
                to: Level::Warning,
                used_mib: 760,
                total_mib: 1000,
            },
        };
        assert!(describe(&event).contains("level_changed"));
        assert!(describe(&event).contains("GPU 1 level ok -> warning"));
    }
}
