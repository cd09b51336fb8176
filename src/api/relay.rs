//! The pinned streaming body: a model server's answer relayed to the client frame by frame,
//! holding the model in use until it ends, and ending a broken answer the way the client's
//! library understands.
//!
//! An answer can break four ways: the model server dies (or closes its connection) mid-answer,
//! it goes silent for `proxy.stall_timeout`, one message of it grows past
//! [`MAX_MESSAGE_BYTES`], or the model is told to stop (an unload, a crash's restart, shutdown)
//! while it answers: vramgate then cuts the answer and closes its connection to the server, which
//! is what lets llama-server exit on SIGTERM. Aborting the client's connection then (as a plain byte relay does)
//! makes client libraries raise transport errors (`httpx.RemoteProtocolError`, openai's
//! `APIConnectionError`) that say nothing of the cause. A streamed answer has messages, so
//! instead it ends with one more message carrying the error, and then a clean end of the body:
//!
//! - server-sent events (OpenAI streaming): `data: {"error": {"message", "type", "code"}}`, which
//!   the openai library raises as `APIError` with the message;
//! - NDJSON (Ollama streaming): `{"error": "…"}`, which the ollama library raises as
//!   `ResponseError`.
//!
//! To put the error at a message boundary, a framed body relays only whole messages: the bytes
//! of a message not yet ended wait (at most [`MAX_MESSAGE_BYTES`]) for its end, and are dropped
//! if the answer breaks first. A model server writes one message per write, so normally nothing
//! waits and each frame passes on as it came, uncopied.

use std::future::Future;
use std::pin::Pin as StdPin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, header};
use serde_json::json;

use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::arbiter::gate::Pin;
use crate::client::root_cause;

/// The most one streamed message (an SSE event, an NDJSON line) may hold before the answer is cut
/// off: a model server that never ends one must not grow the daemon without bound.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// How an answer's body is cut into messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No messages vramgate knows of (a JSON answer, audio, a file): relayed byte for byte; a
    /// failure breaks the client's connection, as there is no place for an error in it.
    Opaque,
    /// Server-sent events (`text/event-stream`, OpenAI streaming): an event ends with a blank line.
    Sse,
    /// Newline-delimited JSON (`application/x-ndjson`, Ollama streaming): one object per line.
    Ndjson,
}

impl Framing {
    /// The framing an answer's `Content-Type` says it has.
    pub fn of(headers: &HeaderMap) -> Framing {
        let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let media = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match media.as_str() {
            "text/event-stream" => Framing::Sse,
            "application/x-ndjson" | "application/ndjson" | "application/jsonl" => Framing::Ndjson,
            _ => Framing::Opaque,
        }
    }

    /// The message that ends a broken answer, in this framing's shape (`None` for opaque bodies).
    pub fn error_message(self, failure: &StreamFailure) -> Option<Bytes> {
        match self {
            Framing::Opaque => None,
            Framing::Ndjson => Some(Bytes::from(format!("{}\n", json!({ "error": failure.message })))),
            Framing::Sse => {
                let error = json!({
                    "error": { "message": failure.message, "type": "server_error", "code": failure.code }
                });
                Some(Bytes::from(format!("data: {error}\n\n")))
            }
        }
    }
}

/// Why a streamed answer broke off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamFailure {
    /// OpenAI-style code: `upstream_error` (the server failed), `upstream_timeout` (it went
    /// silent), `answer_too_large` (a message over the limit).
    pub code: &'static str,
    /// What happened, naming the model and the setting or limit involved.
    pub message: String,
}

impl StreamFailure {
    /// The model server's connection failed mid-answer.
    pub fn died(model: &str, cause: &str) -> StreamFailure {
        StreamFailure { code: "upstream_error", message: format!("model {model} failed mid-answer: {cause}") }
    }

    /// Nothing arrived for `proxy.stall_timeout`.
    pub fn stalled(model: &str, limit: Duration) -> StreamFailure {
        StreamFailure {
            code: "upstream_timeout",
            message: format!(
                "model {model} sent nothing for {} mid-answer (proxy.stall_timeout); the answer was cut off",
                crate::units::Rounded(limit)
            ),
        }
    }

    /// The model was told to stop while answering ([`Pin::cut`]).
    pub fn stopped(model: &str) -> StreamFailure {
        StreamFailure {
            code: "model_stopped",
            message: format!("model {model} was stopped (unloaded or shut down) mid-answer; the answer was cut off"),
        }
    }

    /// One message grew past [`MAX_MESSAGE_BYTES`].
    pub fn too_large(model: &str, what: &str) -> StreamFailure {
        StreamFailure {
            code: "answer_too_large",
            message: format!(
                "model {model} sent {what} larger than {} MiB; the answer was cut off",
                MAX_MESSAGE_BYTES >> 20
            ),
        }
    }
}

/// Cuts a body into whole messages as it arrives.
#[derive(Debug)]
struct Splitter {
    framing: Framing,
    /// The start of a message not yet ended.
    partial: Vec<u8>,
    /// SSE: the last byte scanned ended a line (so a line end now is a blank line).
    line_start: bool,
    /// SSE: the last byte scanned was `\r` (a `\n` now belongs to the same line end).
    after_cr: bool,
}

impl Splitter {
    fn new(framing: Framing) -> Splitter {
        Splitter { framing, partial: Vec::new(), line_start: true, after_cr: false }
    }

    /// Where the last message ended in `data` (the index after it), scanning on from where the
    /// previous data stopped.
    fn last_end(&mut self, data: &[u8]) -> Option<usize> {
        match self.framing {
            Framing::Opaque => Some(data.len()),
            Framing::Ndjson => data.iter().rposition(|b| *b == b'\n').map(|i| i + 1),
            Framing::Sse => {
                let mut end = None;
                for (i, byte) in data.iter().enumerate() {
                    match byte {
                        b'\n' if self.after_cr => {
                            // The `\n` of a `\r\n` that ended an event belongs to that event.
                            if end == Some(i) {
                                end = Some(i + 1);
                            }
                            self.after_cr = false;
                        }
                        b'\n' | b'\r' => {
                            if self.line_start {
                                end = Some(i + 1);
                            }
                            self.line_start = true;
                            self.after_cr = *byte == b'\r';
                        }
                        _ => {
                            self.line_start = false;
                            self.after_cr = false;
                        }
                    }
                }
                end
            }
        }
    }

    /// Takes a frame's data: what can go to the client now (whole messages), if anything.
    fn push(&mut self, data: Bytes) -> Result<Option<Bytes>, usize> {
        let end = self.last_end(&data);
        if self.partial.is_empty() && end == Some(data.len()) {
            // The usual case: the frame is whole messages.
            return Ok(Some(data));
        }
        let Some(end) = end else {
            self.partial.extend_from_slice(&data);
            return self.check().map(|()| None);
        };
        let mut ready = std::mem::take(&mut self.partial);
        ready.extend_from_slice(&data[..end]);
        self.partial.extend_from_slice(&data[end..]);
        self.check().map(|()| Some(Bytes::from(ready)))
    }

    /// `Err(held)` when the message being held is over the limit.
    fn check(&self) -> Result<(), usize> {
        if self.partial.len() > MAX_MESSAGE_BYTES { Err(self.partial.len()) } else { Ok(()) }
    }

    /// The unended last message, at a normal end of the body.
    fn rest(&mut self) -> Option<Bytes> {
        (!self.partial.is_empty()).then(|| Bytes::from(std::mem::take(&mut self.partial)))
    }
}

/// The upstream's body, frame by frame as it arrives, holding the model in use until it ends or
/// is dropped (the client went away). A streamed answer that breaks ends with an error message
/// of its own framing and a clean end ([module docs](self)).
pub struct PinnedBody<B> {
    inner: B,
    /// `proxy.stall_timeout` and the timer it runs, reset by every frame: a server that stops
    /// sending mid-answer breaks the stream instead of holding the model in use forever.
    stall: Option<(Duration, StdPin<Box<tokio::time::Sleep>>)>,
    splitter: Splitter,
    /// The error message went out (or the rest did): nothing more comes.
    ended: bool,
    /// Completes when the model is told to stop: the answer is cut there.
    cut: StdPin<Box<WaitForCancellationFutureOwned>>,
    pin: Pin,
}

impl<B> PinnedBody<B> {
    /// `inner`, holding `pin`, broken off after `stall` without a frame; a failure in a body of
    /// `framing` ends it with an error message.
    pub fn new(inner: B, stall: Option<Duration>, pin: Pin, framing: Framing) -> PinnedBody<B> {
        let stall = stall.map(|limit| (limit, Box::pin(tokio::time::sleep(limit))));
        let cut = Box::pin(pin.cut());
        PinnedBody { inner, stall, splitter: Splitter::new(framing), ended: false, cut, pin }
    }

    /// The answer broke: its error message and the end, or (opaque) a broken connection.
    fn fail(&mut self, failure: StreamFailure) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::BoxError>>> {
        tracing::warn!(model = %self.pin.model_id(), "{}", failure.message);
        self.ended = true;
        self.splitter.partial = Vec::new();
        match self.splitter.framing.error_message(&failure) {
            Some(message) => Poll::Ready(Some(Ok(http_body::Frame::data(message)))),
            None => Poll::Ready(Some(Err(failure.message.into()))),
        }
    }
}

impl<B> http_body::Body for PinnedBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: StdPin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            // Checked before every frame, so a server that keeps sending is cut as promptly as a
            // silent one.
            if this.cut.as_mut().poll(cx).is_ready() {
                let failure = StreamFailure::stopped(this.pin.model_id());
                return this.fail(failure);
            }
            let frame = StdPin::new(&mut this.inner).poll_frame(cx);
            if let Some((limit, timer)) = &mut this.stall {
                if frame.is_ready() {
                    // `tokio::time::sleep` saturates a far deadline; the reset must not overflow.
                    if let Some(deadline) = tokio::time::Instant::now().checked_add(*limit) {
                        timer.as_mut().reset(deadline);
                    }
                } else if timer.as_mut().poll(cx).is_ready() {
                    let failure = StreamFailure::stalled(this.pin.model_id(), *limit);
                    return this.fail(failure);
                }
            }
            let frame = match frame {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.ended = true;
                    return Poll::Ready(this.splitter.rest().map(|rest| Ok(http_body::Frame::data(rest))));
                }
                Poll::Ready(Some(Err(e))) => {
                    let error: axum::BoxError = e.into();
                    let failure = StreamFailure::died(this.pin.model_id(), &root_cause(&*error));
                    return this.fail(failure);
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                // Trailers pass as they are.
                Err(frame) => return Poll::Ready(Some(Ok(frame))),
            };
            match this.splitter.push(data) {
                Ok(Some(ready)) => return Poll::Ready(Some(Ok(http_body::Frame::data(ready)))),
                // Part of a message: read on (polling again registers the waker).
                Ok(None) => {}
                Err(_) => {
                    let what = match this.splitter.framing {
                        Framing::Ndjson => "a line",
                        _ => "an event",
                    };
                    let failure = StreamFailure::too_large(this.pin.model_id(), what);
                    return this.fail(failure);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || (self.splitter.partial.is_empty() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.splitter.framing {
            Framing::Opaque => self.inner.size_hint(),
            // An error message may be added.
            _ => http_body::SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pushed(splitter: &mut Splitter, data: &str) -> Option<String> {
        let out = splitter.push(Bytes::copy_from_slice(data.as_bytes())).expect("under the limit");
        out.map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    #[test]
    fn sse_events_pass_whole_and_a_split_event_waits_for_its_end() {
        let mut sse = Splitter::new(Framing::Sse);
        assert_eq!(pushed(&mut sse, "data: a\n\n").as_deref(), Some("data: a\n\n"));
        assert_eq!(pushed(&mut sse, "data: b\n"), None, "the event has not ended");
        assert_eq!(pushed(&mut sse, "\ndata: c").as_deref(), Some("data: b\n\n"));
        assert_eq!(pushed(&mut sse, "\r\n\r\n").as_deref(), Some("data: c\r\n\r\n"));
        assert_eq!(pushed(&mut sse, "data: d\r\n").as_deref(), None);
        assert_eq!(pushed(&mut sse, "\r\n").as_deref(), Some("data: d\r\n\r\n"));
        assert_eq!(sse.rest(), None);
    }

    #[test]
    fn ndjson_lines_pass_whole() {
        let mut ndjson = Splitter::new(Framing::Ndjson);
        assert_eq!(pushed(&mut ndjson, "{\"a\":1}\n{\"b\"").as_deref(), Some("{\"a\":1}\n"));
        assert_eq!(pushed(&mut ndjson, ":2}").as_deref(), None);
        assert_eq!(ndjson.rest().as_deref(), Some(b"{\"b\":2}".as_slice()), "an unended last line still goes");
    }

    #[test]
    fn a_message_over_the_limit_is_refused() {
        let mut sse = Splitter::new(Framing::Sse);
        let chunk = Bytes::from(vec![b'x'; 1 << 20]);
        let mut refused = false;
        for _ in 0..=(MAX_MESSAGE_BYTES >> 20) {
            if sse.push(chunk.clone()).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused, "17 MiB without an event's end must be refused");
    }

    #[test]
    fn error_messages_take_each_framing_shape() {
        let failure = StreamFailure::died("m", "connection reset");
        let sse = Framing::Sse.error_message(&failure).expect("an SSE event");
        let sse = std::str::from_utf8(&sse).expect("UTF-8");
        let data = sse.strip_prefix("data: ").and_then(|s| s.strip_suffix("\n\n")).expect("one event");
        let value: serde_json::Value = serde_json::from_str(data).expect("JSON");
        assert_eq!(value["error"]["code"], "upstream_error");
        assert_eq!(value["error"]["message"], "model m failed mid-answer: connection reset");
        let line = Framing::Ndjson.error_message(&failure).expect("a line");
        assert_eq!(&line[..], b"{\"error\":\"model m failed mid-answer: connection reset\"}\n");
        assert_eq!(Framing::Opaque.error_message(&failure), None);
    }

    #[test]
    fn the_framing_comes_from_the_content_type() {
        let mut headers = HeaderMap::new();
        assert_eq!(Framing::of(&headers), Framing::Opaque);
        headers.insert(header::CONTENT_TYPE, "text/event-stream; charset=utf-8".parse().expect("a header value"));
        assert_eq!(Framing::of(&headers), Framing::Sse);
        headers.insert(header::CONTENT_TYPE, "application/x-ndjson".parse().expect("a header value"));
        assert_eq!(Framing::of(&headers), Framing::Ndjson);
        headers.insert(header::CONTENT_TYPE, "application/json".parse().expect("a header value"));
        assert_eq!(Framing::of(&headers), Framing::Opaque);
    }
}
