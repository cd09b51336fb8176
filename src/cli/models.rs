//! `vramgate load`, `unload`, `logs` and `mode`, and the queue report `load` and `run` print
//! while they wait.

use std::convert::Infallible;
use std::future::Future;
use std::io::Write;
use std::time::{Duration, Instant};

use clap::Args;

use super::DaemonUrl;
use crate::client::Client;
use crate::status::{ModelStatus, QueueEntry, Status};
use crate::units::Rounded;

/// How soon after asking the queue is first looked at: a request served at once prints nothing.
const FIRST_LOOK: Duration = Duration::from_millis(250);
/// How often the queue is looked at while the request waits.
const LOOK_EVERY: Duration = Duration::from_millis(500);
/// A waiter whose reason changed is reported again, but not more often than this (readings on a
/// real GPU move by a few MiB all the time).
const CHANGED_AFTER: Duration = Duration::from_secs(2);
/// A waiter whose reason did not change is reported again this often.
const REPEAT_AFTER: Duration = Duration::from_secs(5);

#[derive(Debug, Args)]
#[command(after_help = "Exit status:
  0  done (`unload`: also when the model was not loaded, which it says)
  1  the daemon refused or failed (an unknown model, a model that failed to start, a wait in the
     queue longer than scheduler.queue_timeout, a model held by a lease), or cannot be reached

While `load` waits in the daemon's queue, it says on stderr what it waits for, with the numbers.")]
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
    let client = Client::new(&args.daemon.url)?;
    let name = args.model.as_str();
    // Its queue entry: a load of this model, named by its id or one of its aliases.
    let mine = |status: &Status, entry: &QueueEntry| {
        entry.kind == "load"
            && entry.model.as_deref().is_some_and(|id| {
                id == name || status.models.iter().any(|m| m.id == id && m.aliases.iter().any(|a| a == name))
            })
    };
    let status = report_queue("vramgate load", &client, client.load(name), mine).await?;
    super::print_line(&describe(&status));
    Ok(())
}

pub(super) async fn unload(args: ModelArgs) -> anyhow::Result<()> {
    let (status, was_loaded) = Client::new(&args.daemon.url)?.unload(&args.model).await?;
    if was_loaded {
        super::print_line(&describe(&status));
    } else if status.state == "unloaded" {
        super::print_line(&format!("{} was not loaded", status.id));
    } else {
        super::print_line(&format!("{} was not loaded ({})", status.id, status.state));
    }
    Ok(())
}

/// Waits for `request` (a load, or a lease that may wait in the daemon's queue) and meanwhile
/// prints on stderr what it waits for, as the queue in the status document says: once when it
/// is queued, then again when the reason changes or every few seconds, so the numbers shown are
/// current. `mine` picks the request's own entry. A request that is not queued prints nothing.
pub(super) async fn report_queue<T>(
    prefix: &str,
    client: &Client,
    request: impl Future<Output = T>,
    mine: impl Fn(&Status, &QueueEntry) -> bool,
) -> T {
    tokio::select! {
        answer = request => answer,
        never = watch_queue(prefix, client, mine) => match never {},
    }
}

async fn watch_queue(prefix: &str, client: &Client, mine: impl Fn(&Status, &QueueEntry) -> bool) -> Infallible {
    let asked = Instant::now();
    let mut looks = tokio::time::interval_at(crate::units::later(asked, FIRST_LOOK).into(), LOOK_EVERY);
    looks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<(Instant, String)> = None;
    loop {
        looks.tick().await;
        // A daemon that does not answer status now will fail the request itself, with the reason.
        let Ok(status) = client.status().await else { continue };
        let reason = status.queue.iter().find(|entry| mine(&status, entry)).and_then(|entry| entry.reason.clone());
        let Some(reason) = reason else { continue };
        let now = Instant::now();
        let due = match &last {
            None => true,
            Some((at, said)) => {
                let since = now.duration_since(*at);
                since >= REPEAT_AFTER || (since >= CHANGED_AFTER && *said != reason)
            }
        };
        if due {
            let line = match last {
                None => format!("{prefix}: queued: {reason}"),
                Some(_) => format!("{prefix}: queued for {}: {reason}", Rounded(now.duration_since(asked))),
            };
            eprintln!("{line}");
            last = Some((now, reason));
        }
    }
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
