//! `vramgate load`, `unload`, `logs` and `mode`.

use std::io::Write;

use clap::Args;

use super::DaemonUrl;
use crate::client::Client;
use crate::status::ModelStatus;

#[derive(Debug, Args)]
pub(super) struct ModelArgs {
    /// The model id or alias.
    model: String,
    #[command(flatten)]
    daemon: DaemonUrl,
}

#[derive(Debug, Args)]
pub(super) struct LogsArgs {
    /// The model id or alias.
    model: String,
    /// Keep printing new lines as the model's server writes them.
    #[arg(short, long)]
    follow: bool,
    /// How many of the last lines to print first.
    #[arg(short = 'n', long, default_value_t = 200)]
    lines: usize,
    #[command(flatten)]
    daemon: DaemonUrl,
}

fn describe(status: &ModelStatus) -> String {
    let device = status.device.map(|d| format!(" on GPU {d}")).unwrap_or_default();
    let upstream = status.upstream.as_deref().map(|u| format!(" at {u}")).unwrap_or_default();
    format!("{} {}{device}{upstream} ({} MiB)", status.id, status.state, status.vram_mib)
}

pub(super) async fn load(args: ModelArgs) -> anyhow::Result<()> {
    let status = Client::new(&args.daemon.url)?.load(&args.model).await?;
    super::print_line(&describe(&status));
    Ok(())
}

pub(super) async fn unload(args: ModelArgs) -> anyhow::Result<()> {
    let status = Client::new(&args.daemon.url)?.unload(&args.model).await?;
    super::print_line(&describe(&status));
    Ok(())
}

pub(super) async fn logs(args: LogsArgs) -> anyhow::Result<()> {
    let mut response = Client::new(&args.daemon.url)?.logs(&args.model, args.lines, args.follow).await?;
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = response.chunk().await? {
        if out.write_all(&chunk).and_then(|_| out.flush()).is_err() {
            return Ok(()); // Closed pipe: the reader has what it wanted.
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
pub(super) struct ModeArgs {
    /// The `[modes.NAME]` to apply; without it, show the current mode and the modes defined.
    name: Option<String>,
    #[command(flatten)]
    daemon: DaemonUrl,
}

/// Applies a mode (unloads and CPU placements first, then GPU loads) and prints where each of
/// its models ended up; or shows the modes.
pub(super) async fn mode(args: ModeArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.daemon.url)?;
    let Some(name) = args.name else {
        let answer = client.mode().await?;
        let current = answer["mode"].as_str().unwrap_or("none");
        super::print_line(&format!("current mode: {current}"));
        if let Some(modes) = answer["modes"].as_object() {
            for (name, lists) in modes {
                let list = |key: &str| {
                    let ids: Vec<&str> =
                        lists[key].as_array().into_iter().flatten().filter_map(|v| v.as_str()).collect();
                    if ids.is_empty() { "-".to_string() } else { ids.join(", ") }
                };
                super::print_line(&format!(
                    "  {name}: gpu {}; cpu {}; unload {}",
                    list("gpu"),
                    list("cpu"),
                    list("unload")
                ));
            }
        }
        return Ok(());
    };
    let models = client.set_mode(&name).await?;
    super::print_line(&format!("mode {name} applied"));
    for status in &models {
        let placement = status.placement.as_deref().map(|p| format!(" [{p}]")).unwrap_or_default();
        super::print_line(&format!("  {}{placement}", describe(status)));
    }
    Ok(())
}
