//! The external backend: a model that lives inside a client application (CLIP inside a Python
//! app). The app attaches over HTTP (a long-lived stream), receives placement instructions and
//! acknowledges each one when it has carried it out. The arbiter counts the model's memory from
//! the acknowledgement of `gpu`, and stops counting it at the acknowledgement of `cpu` or
//! `release`, at the app's disconnect, or when the app stops answering.

use serde::Serialize;
use tokio::sync::mpsc;

/// What the app is told to do with its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Put it on the GPU (vramgate has reserved the memory).
    Gpu,
    /// Move it to the CPU (give the GPU memory back, keep serving).
    Cpu,
    /// Unload it.
    Release,
}

impl Action {
    /// The name in the protocol and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Gpu => "gpu",
            Action::Cpu => "cpu",
            Action::Release => "release",
        }
    }
}

/// One instruction, as sent on the attached stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Instruction {
    /// Numbers instructions within an attachment; the acknowledgement names it.
    pub seq: u64,
    /// What to do.
    pub action: Action,
}

/// An app attached to an external model.
#[derive(Debug)]
pub struct Attachment {
    /// Identifies this attachment in acknowledgements (a later attach gets a new one).
    pub session: String,
    /// Who attached, for status.
    pub holder: String,
    /// The app's process, whose GPU memory is the model's while it is placed on the GPU.
    pub pid: Option<u32>,
    /// Where instructions go; the HTTP handler writes them on the stream.
    pub instructions: mpsc::UnboundedSender<Instruction>,
    /// The last instruction number used.
    pub last_seq: u64,
}

impl Attachment {
    /// Sends the next instruction; `None` if the app's stream is already gone.
    pub fn send(&mut self, action: Action) -> Option<u64> {
        self.last_seq += 1;
        let seq = self.last_seq;
        self.instructions.send(Instruction { seq, action }).ok().map(|_| seq)
    }
}

/// An instruction waiting for its acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingAck {
    /// The instruction's number.
    pub seq: u64,
    /// What was asked.
    pub action: Action,
    /// When the app counts as unresponsive.
    pub deadline: std::time::Instant,
}
