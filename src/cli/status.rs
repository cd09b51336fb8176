//! `vramgate status [--json]`.

use std::fmt::Write;

use clap::Args;

use super::DaemonUrl;
use crate::client::Client;
use crate::status::Status;

#[derive(Debug, Args)]
pub(super) struct StatusArgs {
    /// Print the status document as JSON, exactly as `GET /vramgate/status` returns it.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    daemon: DaemonUrl,
}

pub(super) async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.daemon.url)?;
    let text = client.status_text().await?;
    if args.json {
        super::print_line(text.trim_end());
        return Ok(());
    }
    let status: Status = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("the daemon sent a status this CLI cannot read ({e}); is it another version?"))?;
    super::print_line(render_table(&status).trim_end());
    Ok(())
}

fn dash<T: ToString>(value: Option<T>) -> String {
    value.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// The human-readable status: a line for the daemon, a table of devices, each device's users.
pub(crate) fn render_table(status: &Status) -> String {
    let mut out = String::new();
    let health = if status.degraded { "DEGRADED" } else { "ok" };
    let _ = writeln!(out, "vramgate {}  probe: {}  health: {health}", status.version, status.probe.as_str());
    for reason in &status.degraded_reasons {
        let _ = writeln!(out, "  degraded: {reason}");
    }
    if let Some(mode) = &status.mode {
        let _ = writeln!(out, "mode: {mode}");
    }
    let _ = writeln!(out);
    if status.devices.is_empty() {
        let _ = writeln!(out, "no GPU devices");
    } else {
        let _ = writeln!(
            out,
            "{:<4} {:<28} {:>10} {:>10} {:>10} {:>10} {:<10} {:>5} {:>5}",
            "GPU", "NAME", "USED MiB", "FREE MiB", "TOTAL MiB", "USABLE", "LEVEL", "UTIL", "TEMP"
        );
        for d in &status.devices {
            let _ = writeln!(
                out,
                "{:<4} {:<28} {:>10} {:>10} {:>10} {:>10} {:<10} {:>5} {:>5}",
                d.index,
                truncate(&d.name, 28),
                d.used_mib,
                d.free_mib,
                d.total_mib,
                d.usable_mib,
                d.level.as_str(),
                dash(d.utilization_pct.map(|u| format!("{u}%"))),
                dash(d.temperature_c.map(|t| format!("{t}C"))),
            );
        }
        for d in &status.devices {
            let _ = writeln!(out);
            let _ = writeln!(out, "GPU {} users:", d.index);
            if let Some(error) = &d.error {
                let _ = writeln!(out, "  cannot be read: {error} (last good readings shown; admits nothing)");
            }
            if let Some(reason) = &d.processes_unavailable {
                let _ = writeln!(out, "  per-process usage unknown: {reason}");
            }
            if d.processes.is_empty() && d.named_consumers.is_empty() && d.processes_unavailable.is_none() {
                let _ = writeln!(out, "  (none)");
            }
            for p in &d.processes {
                let model = p.model.as_deref().map(|m| format!("  model {m}")).unwrap_or_default();
                // The driver may not say how much one process holds (NVML's "not available").
                let used = p.used_mib.map_or_else(|| "?".to_string(), |mib| mib.to_string());
                let _ = writeln!(out, "  pid {:<8} {:>8} MiB  {}{model}", p.pid, used, p.name);
            }
            for n in &d.named_consumers {
                let _ = writeln!(out, "  {:<12} {:>8} MiB  (named consumer)", n.name, n.used_mib);
            }
            for w in &d.warnings {
                let _ = writeln!(out, "  warning: {w}");
            }
        }
    }
    let _ = writeln!(out);
    if status.models.is_empty() {
        let _ = writeln!(
            out,
            "models: none configured (declare them in the config file: `vramgate serve --help`; \
             `vramgate serve --demo` shows vramgate managing models, no GPU needed)"
        );
    } else {
        let _ = writeln!(
            out,
            "{:<20} {:<9} {:<10} {:<5} {:>6} {:>9} {:>6} {:>8}",
            "MODEL", "BACKEND", "STATE", "ON", "GPU", "VRAM MiB", "IN USE", "PRIORITY"
        );
        for m in &status.models {
            let _ = writeln!(
                out,
                "{:<20} {:<9} {:<10} {:<5} {:>6} {:>9} {:>6} {:>8}{}",
                truncate(&m.id, 20),
                m.backend,
                m.state,
                m.placement.as_deref().unwrap_or("-"),
                dash(m.device),
                m.vram_mib,
                m.in_use,
                m.priority,
                if m.pinned { "  pinned" } else { "" }
            );
            // Why a model is out of service: evicted for whom, idle, crashed, asked to.
            if let Some(reason) = m.state_reason.as_deref().filter(|_| m.state != "ready" && m.state != "loading") {
                let _ = writeln!(out, "  {}: {}: {}", m.id, m.state, reason.replace("evicted_for:", "evicted for "));
            }
            if let Some(holder) = &m.attached {
                let pid = m.pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
                let _ = writeln!(out, "  {}: held by app {holder}{pid}", m.id);
            }
            if let Some(note) = &m.note {
                let _ = writeln!(out, "  {}: {note}", m.id);
            }
            // A note and the error are often the same sentence (an Ollama that does not answer).
            if let Some(error) = m.last_error.as_deref().filter(|e| m.note.as_deref() != Some(*e)) {
                render_error(&mut out, &m.id, error);
            }
            if let Some(seconds) = m.retry_in_s {
                let _ = writeln!(
                    out,
                    "  {}: {} failed starts in a row; next automatic try in {seconds}s (`vramgate load {}` tries now)",
                    m.id, m.failures, m.id
                );
            }
        }
    }
    for server in &status.ollama {
        let _ = writeln!(out);
        let state = match (server.reachable, &server.error) {
            (Some(true), _) => "reachable".to_string(),
            (Some(false), Some(error)) => format!("UNREACHABLE: {error}"),
            (Some(false), None) => "UNREACHABLE".to_string(),
            (None, _) => "not asked yet".to_string(),
        };
        let _ = writeln!(out, "Ollama at {}: {state}", server.url);
        for loaded in &server.models {
            let owner = match &loaded.managed_as {
                Some(id) => format!("model {id}"),
                None => "loaded directly, not by vramgate".to_string(),
            };
            let _ = writeln!(out, "  {:<28} {:>8} MiB  {owner}", truncate(&loaded.name, 28), loaded.vram_mib);
        }
    }
    if !status.leases.is_empty() {
        let _ = writeln!(out);
        for l in &status.leases {
            let exclusive = if l.exclusive { " exclusive" } else { "" };
            let _ =
                writeln!(out, "lease {} held by {}: {} MiB on GPU {}{exclusive}", l.id, l.holder, l.vram_mib, l.device);
        }
    }
    if !status.queue.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "waiting, in the order they will be served:");
        for w in &status.queue {
            let device = w.device.map(|d| format!(" on GPU {d}")).unwrap_or_default();
            let reason = w.reason.as_deref().unwrap_or("not looked at yet");
            let _ = writeln!(out, "  {} {} ({} MiB{device}): {reason}", w.kind, w.requester, w.vram_mib);
        }
    }
    out
}

/// Lines of a start error's quoted output the table shows; `vramgate logs` has the rest.
const ERROR_OUTPUT_LINES: usize = 3;
/// Widest error line the table shows.
const ERROR_LINE_WIDTH: usize = 160;

/// A model's last error under its row: the first line, then the last lines of the output it
/// quotes (without vramgate's own markers), each cut to a readable width.
fn render_error(out: &mut String, id: &str, error: &str) {
    let mut lines = error.lines().map(str::trim_end).filter(|l| !l.trim().is_empty());
    let first = lines.next().unwrap_or_default();
    let _ = writeln!(out, "  {id}: last error: {}", truncate(first, ERROR_LINE_WIDTH));
    let marker = |l: &&str| {
        let l = l.trim();
        (l.starts_with("--- ") && l.ends_with(" ---")) || (l.starts_with("[... ") && l.ends_with(" ...]"))
    };
    let output: Vec<&str> = lines.filter(|l| !marker(l)).collect();
    if output.len() > ERROR_OUTPUT_LINES {
        let _ = writeln!(out, "    [... `vramgate logs {id}` shows the whole output]");
    }
    for line in &output[output.len().saturating_sub(ERROR_OUTPUT_LINES)..] {
        let _ = writeln!(out, "    {}", truncate(line, ERROR_LINE_WIDTH));
    }
}

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_string()
    } else {
        let mut short: String = text.chars().take(width.saturating_sub(1)).collect();
        short.push('…');
        short
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{Level, NamedUsage, ProbeKind};
    use crate::status::{DeviceStatus, ProcessStatus};

    /// A process model's status entry of 2048 MiB at priority 50, every optional field empty.
    fn model_entry(id: &str, state: &str) -> crate::status::ModelStatus {
        crate::status::ModelStatus {
            id: id.into(),
            backend: "process".into(),
            state: state.into(),
            device: None,
            vram_mib: 2048,
            in_use: 0,
            pinned: false,
            priority: 50,
            last_used: None,
            upstream: None,
            pid: None,
            measured_mib: None,
            declared_mib: None,
            estimated_mib: None,
            peak_mib: None,
            failures: 0,
            retry_in_s: None,
            last_error: None,
            aliases: vec![],
            placement: None,
            expires_at: None,
            note: None,
            attached: None,
            state_reason: None,
        }
    }

    #[test]
    fn table_shows_devices_users_and_degradation() {
        let status = Status {
            version: "0.1.0".into(),
            probe: ProbeKind::Sim,
            devices: vec![DeviceStatus {
                index: 0,
                name: "Sim 8G".into(),
                probe: ProbeKind::Sim,
                total_mib: 8192,
                used_mib: 6500,
                free_mib: 1692,
                usable_mib: 7680,
                level: Level::Warning,
                utilization_pct: None,
                temperature_c: Some(51),
                processes: vec![
                    ProcessStatus { pid: 4242, used_mib: Some(5300), name: "python3".into(), model: None },
                    ProcessStatus { pid: 77, used_mib: None, name: "hidden".into(), model: None },
                ],
                processes_unavailable: None,
                named_consumers: vec![NamedUsage { name: "desktop".into(), used_mib: 1200 }],
                warnings: vec!["sim file x: garbage".into()],
                error: Some("GPU is lost".into()),
            }],
            degraded: true,
            degraded_reasons: vec!["probe sim failing: boom".into()],
            models: vec![],
            leases: vec![],
            queue: vec![crate::status::QueueEntry {
                requester: "vision".into(),
                kind: "load".into(),
                model: Some("vision".into()),
                holder: None,
                pid: None,
                device: Some(0),
                vram_mib: 3072,
                priority: 50,
                reason: Some("needs 3072 MiB on GPU 0; 1180 MiB available".into()),
                since: chrono::Utc::now(),
            }],
            mode: None,
            ollama: Vec::new(),
            sampled_at: None,
            limits: None,
        };
        let table = render_table(&status);
        assert!(table.contains("health: DEGRADED"), "{table}");
        assert!(
            table.contains("load vision (3072 MiB on GPU 0): needs 3072 MiB on GPU 0; 1180 MiB available"),
            "the queue with its reason: {table}"
        );
        assert!(table.contains("degraded: probe sim failing: boom"));
        assert!(table.contains("Sim 8G") && table.contains("warning") && table.contains("51C"));
        assert!(table.contains("pid 4242") && table.contains("python3"));
        assert!(table.contains("pid 77              ? MiB  hidden"), "a process without a figure: {table}");
        assert!(table.contains("cannot be read: GPU is lost (last good readings shown; admits nothing)"), "{table}");
        assert!(table.contains("desktop") && table.contains("(named consumer)"));
        assert!(table.contains("warning: sim file x: garbage"));
        assert!(table.contains("models: none configured") && table.contains("vramgate serve --demo"), "{table}");
    }

    #[test]
    fn table_shows_placement_notes_mode_and_ollama_servers() {
        let model = |id: &str, placement: Option<&str>, note: Option<&str>| crate::status::ModelStatus {
            backend: "ollama".into(),
            device: Some(0),
            placement: placement.map(str::to_string),
            note: note.map(str::to_string),
            attached: placement.is_some().then(|| "clip-app".to_string()),
            state_reason: placement.is_none().then(|| "evicted_for:vlm".to_string()),
            ..model_entry(id, if placement.is_some() { "ready" } else { "failed" })
        };
        let status = Status {
            version: "0.1.0".into(),
            probe: ProbeKind::Sim,
            devices: vec![],
            degraded: false,
            degraded_reasons: vec![],
            models: vec![model("clip", Some("cpu"), None), model("llama", None, Some("Ollama does not answer"))],
            leases: vec![],
            queue: vec![],
            mode: Some("recording".into()),
            ollama: vec![crate::status::OllamaStatus {
                url: "http://127.0.0.1:11434".into(),
                reachable: Some(true),
                error: None,
                models: vec![crate::status::OllamaModelStatus {
                    name: "tiny:latest".into(),
                    vram_mib: 300,
                    managed_as: None,
                }],
            }],
            sampled_at: None,
            limits: None,
        };
        let table = render_table(&status);
        assert!(table.contains("mode: recording"), "{table}");
        assert!(table.lines().any(|l| l.starts_with("clip") && l.contains("cpu")), "{table}");
        assert!(table.contains("llama: Ollama does not answer"), "{table}");
        assert!(table.contains("llama: failed: evicted for vlm"), "why a model is out of service: {table}");
        assert!(table.contains("clip: held by app clip-app"), "{table}");
        assert!(table.contains("Ollama at http://127.0.0.1:11434: reachable"), "{table}");
        assert!(table.contains("tiny:latest") && table.contains("loaded directly"), "{table}");
    }

    #[test]
    fn a_failed_model_shows_why_and_when_it_is_tried_again() {
        let error = format!(
            "exited during start-up (exit status 7); last output:\n--- vramgate started pid 9: fake ---\nline 1\nline 2\n\
             loading weights\nerror: out of memory {}\n--- pid 9 exit status 7 ---",
            "x".repeat(300)
        );
        let status = Status {
            version: "0.1.0".into(),
            probe: ProbeKind::Sim,
            devices: vec![],
            degraded: false,
            degraded_reasons: vec![],
            models: vec![crate::status::ModelStatus {
                declared_mib: Some(2048),
                failures: 3,
                retry_in_s: Some(25),
                last_error: Some(error),
                state_reason: Some("failed".into()),
                ..model_entry("llm", "failed")
            }],
            leases: vec![],
            queue: vec![],
            mode: None,
            ollama: Vec::new(),
            sampled_at: None,
            limits: None,
        };
        let table = render_table(&status);
        assert!(table.contains("  llm: last error: exited during start-up (exit status 7); last output:\n"), "{table}");
        assert!(table.contains("    [... `vramgate logs llm` shows the whole output]\n    line 2\n    loading weights\n    error: out of memory xxx"), "{table}");
        assert!(!table.contains("line 1") && !table.contains("--- pid 9"), "{table}");
        assert!(table.lines().all(|l| l.chars().count() <= ERROR_LINE_WIDTH + 4), "{table}");
        assert!(table.contains("llm: 3 failed starts in a row; next automatic try in 25s"), "{table}");
    }

    #[test]
    fn long_names_are_cut() {
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
    }
}
