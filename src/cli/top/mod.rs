//! `vramgate top`: a live terminal view of a running daemon (devices with their thresholds and
//! level, models, leases, the queue, the latest events), with keys to load and unload models and
//! to switch modes. feed.rs follows the daemon, state.rs holds what is shown, render.rs draws it,
//! input.rs maps keys.

mod feed;
mod input;
mod render;
mod state;
#[cfg(test)]
mod tests;

use std::io::IsTerminal;
use std::time::Duration;

use clap::Args;
use futures_util::StreamExt;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use super::DaemonUrl;
use crate::client::Client;
use state::{Outcome, TopState};

/// How often the screen is redrawn with nothing new (ages and idle countdowns move on).
const TICK: Duration = Duration::from_secs(1);

#[derive(Debug, Args)]
#[command(after_help = "Keys:
  ↑/↓, k/j   select a model
  l          load the selected model (the answer shows at the bottom when it is ready)
  u          unload the selected model
  m          pick a mode among the config's [modes.NAME] (↑/↓ to choose, Enter applies, Esc closes)
  q, Esc     quit (Ctrl-C too); the terminal is restored whatever ends the view

The view follows the daemon's event stream and re-reads its status when something changes. When
the daemon goes away it says so on the second line, keeps the last figures, and reconnects by
itself when the daemon is back. With [server] token set, export VRAMGATE_TOKEN.")]
pub(super) struct TopArgs {
    #[command(flatten)]
    daemon: DaemonUrl,
}

/// Puts the terminal back (cooked mode, main screen, cursor) when dropped: on return, on error
/// and while unwinding. ratatui's own panic hook does the same before a panic is printed.
struct RestoreTerminal;

impl Drop for RestoreTerminal {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

pub(super) async fn run(args: TopArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.daemon.url)?;
    if !std::io::stdout().is_terminal() {
        anyhow::bail!("vramgate top needs a terminal; in scripts use `vramgate status` or `vramgate events`");
    }
    let (updates_tx, mut updates) = mpsc::unbounded_channel();
    let follower = tokio::spawn(feed::follow(client.clone(), updates_tx.clone()));
    // Signals that would otherwise kill the view with the terminal still in raw mode.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut interrupt = signal(SignalKind::interrupt())?;

    // The guard first: a set-up that fails half-way (raw mode on, no alternate screen) is undone.
    let _restore = RestoreTerminal;
    let mut terminal = ratatui::try_init()?;
    let mut keys = crossterm::event::EventStream::new();
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state = TopState::new(&args.daemon.url, chrono::Utc::now());
    let result = loop {
        state.now = chrono::Utc::now();
        if let Err(error) = terminal.draw(|frame| render::draw(frame, &state)) {
            break Err(anyhow::anyhow!("cannot draw on the terminal: {error}"));
        }
        tokio::select! {
            key = keys.next() => match key {
                None => break Ok(()),
                Some(Err(error)) => break Err(anyhow::anyhow!("cannot read the keyboard: {error}")),
                Some(Ok(event)) => {
                    let Some(key) = event.as_key_event().and_then(|k| input::key_of(&k)) else { continue };
                    match state.press(key) {
                        Outcome::Stay => {}
                        Outcome::Quit => break Ok(()),
                        Outcome::Send(request) => {
                            tokio::spawn(feed::send(client.clone(), request, updates_tx.clone()));
                        }
                    }
                }
            },
            update = updates.recv() => {
                // The follower never ends while the screen holds its receiver; take in all that
                // is waiting before drawing once.
                let Some(update) = update else { break Ok(()) };
                state.apply(update);
                while let Ok(update) = updates.try_recv() {
                    state.apply(update);
                }
            }
            _ = ticks.tick() => {}
            _ = terminate.recv() => break Ok(()),
            _ = hangup.recv() => break Ok(()),
            _ = interrupt.recv() => break Ok(()),
        }
    };
    follower.abort();
    drop(terminal);
    result
}
