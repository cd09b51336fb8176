//! A streamed completion relayed as Ollama's NDJSON: SSE events in, lines out, as they arrive;
//! broken off with an `{"error": …}` line (then a clean end) when the server dies, goes silent
//! for `proxy.stall_timeout` or the model is told to stop.

use std::time::Duration;

use axum::body::{Body, Bytes};
use futures_util::StreamExt;
use serde_json::json;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::super::ollama::DRAIN_LIMIT;
use super::super::relay::StreamFailure;
use super::Progress;
use super::sse::SseParser;
use crate::arbiter::gate::Pin;
use crate::client::root_cause;

/// Where a relayed stream is.
enum Phase {
    Streaming,
    /// The final line went out; what is left of the upstream body is read (briefly) so its
    /// connection can be reused, then the stream ends.
    Draining,
    Ended,
}

/// A streamed completion being turned into NDJSON, holding the model in use until it ends or the
/// client goes away (the stream is dropped with the response body).
pub(super) struct Relay {
    upstream: axum::body::BodyDataStream,
    parser: SseParser,
    progress: Progress,
    stall: Option<Duration>,
    model: String,
    phase: Phase,
    /// Completes when the model is told to stop: the answer is cut there.
    cut: std::pin::Pin<Box<WaitForCancellationFutureOwned>>,
    _pin: Pin,
}

/// What one read of the upstream stream came to.
enum Read {
    Next(Option<Result<Bytes, axum::Error>>),
    Stalled(Duration),
    Cut,
}

impl Relay {
    /// Relays `upstream`'s events as NDJSON lines, holding `pin` until the stream ends.
    pub(super) fn new(upstream: Body, progress: Progress, stall: Option<Duration>, model: String, pin: Pin) -> Relay {
        Relay {
            upstream: upstream.into_data_stream(),
            parser: SseParser::default(),
            progress,
            stall,
            model,
            phase: Phase::Streaming,
            cut: Box::pin(pin.cut()),
            _pin: pin,
        }
    }

    pub(super) fn into_stream(
        self,
    ) -> impl futures_util::Stream<Item = Result<Bytes, axum::BoxError>> + Send + 'static {
        futures_util::stream::unfold(self, |mut relay| async move {
            let item = relay.next().await?;
            Some((item, relay))
        })
    }

    /// The next piece of the client's stream: the lines of the next upstream read that produced
    /// any, as soon as it arrives.
    async fn next(&mut self) -> Option<Result<Bytes, axum::BoxError>> {
        loop {
            match std::mem::replace(&mut self.phase, Phase::Ended) {
                Phase::Ended => return None,
                Phase::Draining => {
                    // One bound for the whole drain (no deadline arithmetic to overflow).
                    let drain = async { while let Some(Ok(_)) = self.upstream.next().await {} };
                    let _ = tokio::time::timeout(DRAIN_LIMIT, drain).await;
                    return None;
                }
                Phase::Streaming => {}
            }
            let (upstream, stall, cut) = (&mut self.upstream, self.stall, &mut self.cut);
            let read = async {
                match stall {
                    Some(limit) => {
                        tokio::time::timeout(limit, upstream.next()).await.map_or(Read::Stalled(limit), Read::Next)
                    }
                    None => Read::Next(upstream.next().await),
                }
            };
            let read = tokio::select! {
                biased;
                () = cut.as_mut() => Read::Cut,
                read = read => read,
            };
            let next = match read {
                Read::Next(next) => next,
                Read::Stalled(limit) => {
                    let message = StreamFailure::stalled(&self.model, limit).message;
                    return Some(Ok(self.fail(message)));
                }
                Read::Cut => {
                    let message = StreamFailure::stopped(&self.model).message;
                    return Some(Ok(self.fail(message)));
                }
            };
            let mut events = Vec::new();
            let ended = match next {
                Some(Ok(bytes)) => {
                    if let Err(message) = self.parser.feed(&bytes, &mut events) {
                        return Some(Ok(self.fail(message)));
                    }
                    false
                }
                Some(Err(e)) => {
                    let message = StreamFailure::died(&self.model, &root_cause(&e)).message;
                    return Some(Ok(self.fail(message)));
                }
                None => {
                    self.parser.finish(&mut events);
                    true
                }
            };
            let mut out = Vec::new();
            self.phase = Phase::Streaming;
            for data in events {
                if let Err(message) = self.progress.event(&data, &mut out) {
                    Progress::push_line(&mut out, &json!({ "error": message }));
                    self.phase = Phase::Ended;
                    break;
                }
            }
            if matches!(self.phase, Phase::Streaming) {
                if ended {
                    // A server that ends without `[DONE]` still gets its answer a final line.
                    self.progress.final_lines(&mut out);
                    self.phase = Phase::Ended;
                } else if self.progress.done {
                    self.phase = Phase::Draining;
                }
            }
            if !out.is_empty() {
                return Some(Ok(Bytes::from(out)));
            }
        }
    }

    /// An error line for the client, after which its stream ends cleanly: Ollama's clients read
    /// the line as the error (the ollama library raises `ResponseError` with it), where a broken
    /// connection would be a transport error that says nothing of the cause.
    fn fail(&mut self, message: String) -> Bytes {
        tracing::warn!(model = %self.model, "{message}");
        self.phase = Phase::Ended;
        Bytes::from(format!("{}\n", json!({ "error": message })))
    }
}
