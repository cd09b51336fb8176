//! A model process's output: the last lines in memory (a ring, plus the last lines of each
//! stream kept apart for start errors), its log file, and a feed of new lines for followers.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;

use tokio::sync::broadcast;

use super::process::{ERROR_TAIL_LINES, ERROR_TAIL_PER_STREAM, LOG_RING_LINES};

/// Where a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSource {
    /// The process's standard output.
    Stdout,
    /// The process's standard error.
    Stderr,
    /// vramgate itself (the start and exit markers).
    Vramgate,
}

/// The last lines a process printed, its log file, and a feed of new lines for followers.
pub struct LogBuffer {
    lines: Mutex<Ring>,
    file: Mutex<Option<std::fs::File>>,
    feed: broadcast::Sender<String>,
}

/// The lines kept in memory, each numbered in the order it was read.
#[derive(Default)]
struct Ring {
    /// The number the next line gets.
    next: u64,
    /// The last [`LOG_RING_LINES`] lines, whatever their source.
    all: VecDeque<(u64, String)>,
    /// The last [`ERROR_TAIL_PER_STREAM`] lines of stdout and of stderr, kept apart so that a
    /// flood on one stream never pushes the other's last words out.
    stdout: VecDeque<(u64, String)>,
    stderr: VecDeque<(u64, String)>,
}

fn push_bounded(lines: &mut VecDeque<(u64, String)>, limit: usize, line: (u64, String)) {
    if lines.len() >= limit {
        lines.pop_front();
    }
    lines.push_back(line);
}

impl LogBuffer {
    /// A buffer that also appends to `file` (created with its directory if needed).
    pub fn new(file: Option<&Path>) -> Arc<LogBuffer> {
        let file = file.and_then(|path| {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            match std::fs::OpenOptions::new().create(true).append(true).open(path) {
                Ok(file) => Some(file),
                Err(e) => {
                    tracing::warn!("cannot open log file {}: {e}; keeping logs in memory only", path.display());
                    None
                }
            }
        });
        let (feed, _) = broadcast::channel(256);
        Arc::new(LogBuffer { lines: Mutex::new(Ring::default()), file: Mutex::new(file), feed })
    }

    /// Adds one line of vramgate's own (a marker).
    pub fn push(&self, line: String) {
        self.push_from(LogSource::Vramgate, line);
    }

    /// Adds one line read from `source`.
    pub fn push_from(&self, source: LogSource, line: String) {
        if let Ok(mut file) = self.file.lock()
            && let Some(file) = file.as_mut()
        {
            let _ = writeln!(file, "{line}");
        }
        if let Ok(mut ring) = self.lines.lock() {
            let number = ring.next;
            ring.next = number.wrapping_add(1);
            match source {
                LogSource::Stdout => push_bounded(&mut ring.stdout, ERROR_TAIL_PER_STREAM, (number, line.clone())),
                LogSource::Stderr => push_bounded(&mut ring.stderr, ERROR_TAIL_PER_STREAM, (number, line.clone())),
                LogSource::Vramgate => {}
            }
            push_bounded(&mut ring.all, LOG_RING_LINES, (number, line.clone()));
            // Sent under the lock, so that `tail_and_follow` sees each line exactly once: in the
            // tail it reads, or on the feed it subscribed to in the same critical section.
            let _ = self.feed.send(line);
        } else {
            let _ = self.feed.send(line);
        }
    }

    /// The last `n` lines and a feed of every line after them, taken together: no line pushed
    /// meanwhile is lost between the two, nor seen twice.
    pub fn tail_and_follow(&self, n: usize) -> (Vec<String>, broadcast::Receiver<String>) {
        match self.lines.lock() {
            Ok(ring) => {
                let tail =
                    ring.all.iter().skip(ring.all.len().saturating_sub(n)).map(|(_, line)| line.clone()).collect();
                (tail, self.feed.subscribe())
            }
            Err(_) => (Vec::new(), self.feed.subscribe()),
        }
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> Vec<String> {
        match self.lines.lock() {
            Ok(ring) => ring.all.iter().skip(ring.all.len().saturating_sub(n)).map(|(_, line)| line.clone()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// The lines an error quotes: the last [`ERROR_TAIL_LINES`] lines, plus the last
    /// [`ERROR_TAIL_PER_STREAM`] lines of stdout and of stderr however much the other stream
    /// wrote since, in the order they were read. A gap between quoted lines is shown as
    /// `[... N lines ...]`.
    pub fn error_tail(&self) -> Vec<String> {
        let Ok(ring) = self.lines.lock() else { return Vec::new() };
        let mut quoted: BTreeMap<u64, &str> = BTreeMap::new();
        let recent = ring.all.iter().skip(ring.all.len().saturating_sub(ERROR_TAIL_LINES));
        for (number, line) in recent.chain(&ring.stdout).chain(&ring.stderr) {
            quoted.insert(*number, line);
        }
        let mut out = Vec::new();
        let mut previous: Option<u64> = None;
        for (number, line) in quoted {
            // Lines before the first quoted one are simply older output, as in any tail.
            if let Some(gap) = previous.and_then(|p| number.checked_sub(p)).filter(|gap| *gap > 1) {
                out.push(format!("[... {} lines ...]", gap - 1));
            }
            previous = Some(number);
            out.push(line.to_string());
        }
        out
    }
}
