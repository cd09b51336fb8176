//! What `vramgate top` shows, as plain data: the last status document, the latest events, the
//! selection, the mode picker and the connection. The network task and the keys change it
//! through [`TopState::apply`] and [`TopState::press`]; the screen is drawn from it alone
//! (render.rs), so every screen can be built in a test without a daemon or a terminal.

use std::collections::VecDeque;

use chrono::{DateTime, Utc};

use crate::events::Event;
use crate::gpu::Thresholds;
use crate::status::{ModelStatus, Status};

/// How many events are kept for the log (the screen shows the newest that fit).
pub(crate) const EVENTS_KEPT: usize = 200;

/// Whether the daemon answers.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Connection {
    /// Before the first answer.
    Connecting,
    /// The event stream is open.
    Connected,
    /// The daemon went away (or never answered); the view keeps its last figures and retries.
    Lost {
        /// Why, as the client said it.
        error: String,
        /// When it was first lost (the start of this outage).
        since: DateTime<Utc>,
    },
}

/// A line at the bottom saying what the last key did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Notice {
    /// What to show.
    pub text: String,
    /// Whether it reports a failure (drawn in red).
    pub failed: bool,
}

impl Notice {
    /// A notice that something happened or is under way.
    pub fn info(text: impl Into<String>) -> Notice {
        Notice { text: text.into(), failed: false }
    }

    /// A notice that something failed.
    pub fn failure(text: impl Into<String>) -> Notice {
        Notice { text: text.into(), failed: true }
    }
}

/// What the network task reports.
#[derive(Debug, Clone)]
pub(crate) enum Update {
    /// The event stream is open.
    Connected,
    /// A fresh status document, and the thresholds the daemon reported with it, per device
    /// (empty when it does not report them).
    Status(Box<Status>, Vec<(u32, Thresholds)>),
    /// The modes defined in the daemon's config (`GET /vramgate/mode`).
    Modes(Vec<String>),
    /// One event from the stream.
    Event(Box<Event>),
    /// The daemon cannot be reached or the stream broke off, and why.
    Lost(String),
    /// A load, unload or mode switch finished.
    Done(Notice),
}

/// What a key asks of the daemon, for the caller to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    /// `POST /vramgate/models/ID/load`.
    Load(String),
    /// `POST /vramgate/models/ID/unload`.
    Unload(String),
    /// `POST /vramgate/mode`.
    SetMode(String),
}

/// What a key does (input.rs maps keys to these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Key {
    /// Previous model, or previous mode in the picker.
    Up,
    /// Next model, or next mode in the picker.
    Down,
    /// Load the selected model.
    Load,
    /// Unload the selected model.
    Unload,
    /// Open the mode picker.
    Mode,
    /// Apply the mode picked.
    Enter,
    /// Close the picker, or quit.
    Escape,
    /// Quit.
    Quit,
}

/// What the main loop does after a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Nothing beyond redrawing.
    Stay,
    /// Send this to the daemon.
    Send(Request),
    /// Leave, restoring the terminal.
    Quit,
}

/// Everything the screen shows.
#[derive(Debug, Clone)]
pub(crate) struct TopState {
    /// The daemon's URL, for the header and the disconnected message.
    pub url: String,
    /// Whether it answers.
    pub connection: Connection,
    /// The last status document read (kept while the daemon is away).
    pub status: Option<Status>,
    /// Thresholds the daemon reported, per device; a device without them is drawn with the
    /// defaults, and says so.
    pub thresholds: Vec<(u32, Thresholds)>,
    /// The latest events, oldest first, at most [`EVENTS_KEPT`].
    pub events: VecDeque<Event>,
    /// The selected model's id (an id, not a row number: the rows may change under it).
    pub selected: Option<String>,
    /// The modes defined.
    pub modes: Vec<String>,
    /// The mode picker, while open: the index into `modes` under the cursor.
    pub picker: Option<usize>,
    /// What the last key did.
    pub notice: Option<Notice>,
    /// The time the screen is drawn for (ages and idle countdowns count to it).
    pub now: DateTime<Utc>,
}

impl TopState {
    /// The view before the daemon answered.
    pub fn new(url: &str, now: DateTime<Utc>) -> TopState {
        TopState {
            url: url.to_string(),
            connection: Connection::Connecting,
            status: None,
            thresholds: Vec::new(),
            events: VecDeque::new(),
            selected: None,
            modes: Vec::new(),
            picker: None,
            notice: None,
            now,
        }
    }

    /// Takes in what the network task reported.
    pub fn apply(&mut self, update: Update) {
        match update {
            Update::Connected => self.connection = Connection::Connected,
            Update::Status(status, thresholds) => {
                self.status = Some(*status);
                self.thresholds = thresholds;
                self.keep_selection();
            }
            Update::Modes(modes) => self.modes = modes,
            Update::Event(event) => {
                if self.events.len() >= EVENTS_KEPT {
                    self.events.pop_front();
                }
                self.events.push_back(*event);
            }
            Update::Lost(error) => {
                // The outage started at the first failure; later retries only update the reason.
                let since = match &self.connection {
                    Connection::Lost { since, .. } => *since,
                    _ => self.now,
                };
                self.connection = Connection::Lost { error, since };
                self.picker = None;
            }
            Update::Done(notice) => self.notice = Some(notice),
        }
    }

    /// The models in the order shown.
    pub fn models(&self) -> &[ModelStatus] {
        self.status.as_ref().map_or(&[], |s| s.models.as_slice())
    }

    /// The selected model's row, if any.
    pub fn selected_row(&self) -> Option<usize> {
        let id = self.selected.as_deref()?;
        self.models().iter().position(|m| m.id == id)
    }

    /// The thresholds a device is drawn with, and whether the daemon reported them.
    pub fn thresholds_of(&self, device: u32) -> (Thresholds, bool) {
        match self.thresholds.iter().find(|(index, _)| *index == device) {
            Some((_, thresholds)) => (*thresholds, true),
            None => (Thresholds::default(), false),
        }
    }

    /// The selection survives a refresh when its model is still there; otherwise the first
    /// model is selected.
    fn keep_selection(&mut self) {
        if self.selected_row().is_none() {
            self.selected = self.models().first().map(|m| m.id.clone());
        }
    }

    fn move_selection(&mut self, down: bool) {
        let count = self.models().len();
        if count == 0 {
            return;
        }
        let row = match (self.selected_row(), down) {
            (None, _) => 0,
            (Some(row), true) => (row + 1).min(count - 1),
            (Some(row), false) => row.saturating_sub(1),
        };
        self.selected = self.models().get(row).map(|m| m.id.clone());
    }

    /// Handles a key: moves the selection or the picker, or says what to send or to quit.
    pub fn press(&mut self, key: Key) -> Outcome {
        if let Some(cursor) = self.picker {
            return self.press_in_picker(key, cursor);
        }
        match key {
            Key::Up | Key::Down => {
                self.move_selection(key == Key::Down);
                Outcome::Stay
            }
            Key::Load | Key::Unload => {
                let Some(id) = self.selected_row().and_then(|row| self.models().get(row)).map(|m| m.id.clone()) else {
                    self.notice = Some(Notice::failure("no model selected"));
                    return Outcome::Stay;
                };
                if self.connection != Connection::Connected {
                    self.notice = Some(Notice::failure(format!("cannot reach the daemon to change {id}")));
                    return Outcome::Stay;
                }
                let (verb, request) = match key {
                    Key::Load => ("loading", Request::Load(id.clone())),
                    _ => ("unloading", Request::Unload(id.clone())),
                };
                self.notice = Some(Notice::info(format!("{verb} {id}…")));
                Outcome::Send(request)
            }
            Key::Mode => {
                if self.modes.is_empty() {
                    self.notice = Some(Notice::failure("no modes are defined in the daemon's config ([modes.NAME])"));
                    return Outcome::Stay;
                }
                let current = self.status.as_ref().and_then(|s| s.mode.as_deref());
                self.picker = Some(self.modes.iter().position(|m| Some(m.as_str()) == current).unwrap_or(0));
                Outcome::Stay
            }
            Key::Enter => Outcome::Stay,
            Key::Escape | Key::Quit => Outcome::Quit,
        }
    }

    fn press_in_picker(&mut self, key: Key, cursor: usize) -> Outcome {
        let last = self.modes.len().saturating_sub(1);
        match key {
            Key::Up => self.picker = Some(cursor.saturating_sub(1)),
            Key::Down => self.picker = Some((cursor + 1).min(last)),
            Key::Enter => {
                self.picker = None;
                let Some(mode) = self.modes.get(cursor).cloned() else { return Outcome::Stay };
                self.notice = Some(Notice::info(format!("switching to mode {mode}…")));
                return Outcome::Send(Request::SetMode(mode));
            }
            Key::Escape | Key::Mode => self.picker = None,
            // Loading or unloading a model is not what a picker of modes is for.
            Key::Load | Key::Unload => {}
            Key::Quit => return Outcome::Quit,
        }
        Outcome::Stay
    }
}
