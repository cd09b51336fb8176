//! A server-sent-events parser for the translated streams: OpenAI's SSE in, one event's data at
//! a time out.

/// The most one streamed event (or one tool call being assembled) may hold: a model server that
/// never ends an event must not grow the daemon without bound.
pub(super) const MAX_EVENT_BYTES: usize = 16 << 20;

/// A server-sent-events parser fed with reads of any size: an event split across reads waits for
/// its end, several events in one read all come out.
#[derive(Default)]
pub(super) struct SseParser {
    /// The start of a line not yet ended.
    partial: Vec<u8>,
    /// How much of `partial` is known to hold no newline (so a read scans only what is new).
    scanned: usize,
    /// The `data` of the event being read (its lines joined with `\n`).
    data: Option<String>,
}

impl SseParser {
    /// Feeds bytes; the data of each event they complete is appended to `events`. `Err` if an
    /// event grows past [`MAX_EVENT_BYTES`].
    pub(super) fn feed(&mut self, bytes: &[u8], events: &mut Vec<String>) -> Result<(), String> {
        self.partial.extend_from_slice(bytes);
        let mut start = 0;
        let mut from = self.scanned;
        while let Some(end) = self.partial[from..].iter().position(|b| *b == b'\n') {
            let line = self.partial[start..from + end].to_vec();
            start = from + end + 1;
            from = start;
            self.line(&line, events);
        }
        self.partial.drain(..start);
        self.scanned = self.partial.len();
        let pending = self.partial.len() + self.data.as_ref().map_or(0, String::len);
        if pending > MAX_EVENT_BYTES {
            return Err(format!(
                "the model server sent an event larger than {} MiB; the answer was cut off",
                MAX_EVENT_BYTES >> 20
            ));
        }
        Ok(())
    }

    /// The stream ended: an unterminated last line and event still count.
    pub(super) fn finish(&mut self, events: &mut Vec<String>) {
        self.scanned = 0;
        let line = std::mem::take(&mut self.partial);
        if !line.is_empty() {
            self.line(&line, events);
        }
        if let Some(data) = self.data.take() {
            events.push(data);
        }
    }

    fn line(&mut self, line: &[u8], events: &mut Vec<String>) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if let Some(data) = self.data.take() {
                events.push(data);
            }
            return;
        }
        let line = String::from_utf8_lossy(line);
        if line.starts_with(':') {
            return; // a comment (keep-alive)
        }
        let (field, value) = line.split_once(':').unwrap_or((&line, ""));
        if field == "data" {
            let value = value.strip_prefix(' ').unwrap_or(value);
            match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            }
        }
    }
}
