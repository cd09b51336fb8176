//! The network side of `vramgate top`: follows `/vramgate/events`, re-reads `/vramgate/status`
//! when events say something changed (at most [`MIN_REFRESH_GAP`] apart), and when the daemon
//! goes away says so and tries again until it returns. Everything it learns goes to the screen
//! as [`Update`]s.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;

use super::state::{Notice, Request, Update};
use crate::client::Client;
use crate::events::EventKind;
use crate::gpu::Thresholds;
use crate::status::Status;

/// Status is read again at most this often however many events arrive (a loading model sends a
/// VRAM event each sample): a few times a second is as fast as a person reads.
pub(crate) const MIN_REFRESH_GAP: Duration = Duration::from_millis(250);
/// The first wait before trying a lost daemon again; doubled after each failure up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Follows the daemon until the screen goes away (the receiver of `updates` is dropped).
pub(crate) async fn follow(client: Client, updates: UnboundedSender<Update>) {
    let mut retry = RETRY_FIRST;
    loop {
        let (error, was_connected) = session(&client, &updates).await;
        if was_connected {
            retry = RETRY_FIRST;
        }
        if updates.send(Update::Lost(format!("{error:#}"))).is_err() {
            return;
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(RETRY_MAX);
    }
}

/// One connection: open the stream, read status and modes, then follow events until the stream
/// ends. Returns why it ended and whether it got as far as the stream.
async fn session(client: &Client, updates: &UnboundedSender<Update>) -> (anyhow::Error, bool) {
    // The stream is opened before status is read, so no change between the two is missed.
    let stream = match client.events().await {
        Ok(stream) => stream,
        Err(error) => return (error, false),
    };
    tokio::pin!(stream);
    if let Err(error) = refresh(client, updates).await {
        return (error, false);
    }
    if let Err(error) = refresh_modes(client, updates).await {
        return (error, false);
    }
    if updates.send(Update::Connected).is_err() {
        return (anyhow::anyhow!("the screen closed"), true);
    }
    let mut last_refresh = Instant::now();
    let mut stale = false;
    let mut modes_stale = false;
    loop {
        let due = last_refresh + MIN_REFRESH_GAP;
        tokio::select! {
            item = stream.next() => match item {
                None => return (anyhow::anyhow!("the daemon closed the event stream"), true),
                Some(Err(error)) => return (error, true),
                Some(Ok((_, event))) => {
                    // A mode change may come from a reload of the config, with other modes.
                    modes_stale |= matches!(event.kind, EventKind::ModeChanged { .. });
                    stale = true;
                    if updates.send(Update::Event(Box::new(event))).is_err() {
                        return (anyhow::anyhow!("the screen closed"), true);
                    }
                }
            },
            () = tokio::time::sleep_until(due), if stale => {
                if let Err(error) = refresh(client, updates).await {
                    return (error, true);
                }
                if modes_stale && let Err(error) = refresh_modes(client, updates).await {
                    return (error, true);
                }
                (stale, modes_stale) = (false, false);
                last_refresh = Instant::now();
            }
        }
    }
}

async fn refresh(client: &Client, updates: &UnboundedSender<Update>) -> anyhow::Result<()> {
    let text = client.status_text().await?;
    let status: Status =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("unreadable status document from the daemon: {e}"))?;
    let raw: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let thresholds = reported_thresholds(&raw, &status);
    // A closed screen ends the session on the next send anyway.
    let _ = updates.send(Update::Status(Box::new(status), thresholds));
    Ok(())
}

async fn refresh_modes(client: &Client, updates: &UnboundedSender<Update>) -> anyhow::Result<()> {
    let answer = client.mode().await?;
    let modes = answer["modes"].as_object().map(|modes| modes.keys().cloned().collect()).unwrap_or_default();
    let _ = updates.send(Update::Modes(modes));
    Ok(())
}

/// The thresholds each device is drawn with, where the status document carries them: a
/// device's own `thresholds`, else the document's `thresholds` or `limits` (each an object
/// with `warning_pct`, `critical_pct`, `emergency_pct`). A daemon that reports none gets none
/// here, and the screen draws the defaults and says so.
pub(crate) fn reported_thresholds(raw: &serde_json::Value, status: &Status) -> Vec<(u32, Thresholds)> {
    let read = |value: &serde_json::Value| -> Option<Thresholds> {
        let warning_pct = value.get("warning_pct")?.as_f64()?;
        let critical_pct = value.get("critical_pct")?.as_f64()?;
        let emergency_pct = value.get("emergency_pct")?.as_f64()?;
        // Drawn as positions on the bar: nonsense is not drawn at all.
        let ordered = 0.0 < warning_pct && warning_pct < critical_pct && critical_pct < emergency_pct;
        (ordered && emergency_pct <= 100.0).then_some(Thresholds { warning_pct, critical_pct, emergency_pct })
    };
    let shared = read(&raw["thresholds"]).or_else(|| read(&raw["limits"]));
    let devices = raw["devices"].as_array();
    status
        .devices
        .iter()
        .enumerate()
        .filter_map(|(position, device)| {
            let own = devices.and_then(|d| d.get(position)).and_then(|d| read(&d["thresholds"]));
            own.or(shared).map(|t| (device.index, t))
        })
        .collect()
}

/// Sends what a key asked for and reports the answer as a notice when it comes (a load waits
/// until the model is ready, so this runs beside the screen, not in its way).
pub(crate) async fn send(client: Client, request: Request, updates: UnboundedSender<Update>) {
    let notice = match request {
        Request::Load(id) => match client.load(&id).await {
            Ok(model) => Notice::info(format!("{} {} ({} MiB)", model.id, model.state, model.vram_mib)),
            Err(error) => Notice::failure(format!("load {id} failed: {error:#}")),
        },
        Request::Unload(id) => match client.unload(&id).await {
            Ok((model, true)) => Notice::info(format!("{} {}", model.id, model.state)),
            Ok((model, false)) => Notice::info(format!("{} was not loaded", model.id)),
            Err(error) => Notice::failure(format!("unload {id} failed: {error:#}")),
        },
        Request::SetMode(mode) => match client.set_mode(&mode).await {
            Ok(_) => Notice::info(format!("mode {mode} applied")),
            Err(error) => Notice::failure(format!("mode {mode} failed: {error:#}")),
        },
    };
    let _ = updates.send(Update::Done(notice));
}
