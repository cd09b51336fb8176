//! `vramgate load`, `unload` and `logs`.

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
