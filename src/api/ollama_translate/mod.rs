//! Ollama requests for a model behind an OpenAI-compatible server (llama-server and the like),
//! translated: `/api/chat` and a templated `/api/generate` to `/v1/chat/completions`, a `raw` or
//! `suffix` generate to `/v1/completions`, the embedding calls to `/v1/embeddings`; the answer
//! translated back, a streamed one event by event (SSE in, NDJSON out) as it arrives.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::AppState;
use super::ollama::{
    Endpoint, NDJSON, UPSTREAM_ANSWER_LIMIT, UPSTREAM_ERROR_LIMIT, error, error_message, nanos, now, send,
    upstream_failure, with_model_header,
};
use super::proxy::{read_answer, read_upstream, stopped_before_answering};
use crate::arbiter::gate::{ModelGate, Pin};

mod sse;
mod stream;
use sse::MAX_EVENT_BYTES;
use stream::Relay;

/// What a translated request answers with.
pub(super) struct Translation {
    pub(super) endpoint: Endpoint,
    /// The name the client asked for, echoed in every answer (as Ollama does).
    pub(super) asked: String,
    /// The name vramgate knows it by, sent upstream.
    pub(super) name: String,
    /// When the request arrived: `total_duration` counts from here.
    pub(super) started: Instant,
    /// The time spent finding and loading the model.
    pub(super) load_duration: Duration,
}

/// Ollama's `options` and `format` in OpenAI's terms, added to `out`. Options without an OpenAI
/// equivalent (num_ctx, repeat_penalty, mirostat, ...) are left out; `top_k` and `min_p` go as
/// the extensions llama-server and vLLM accept under those names.
fn map_options(object: &Map<String, Value>, out: &mut Map<String, Value>) {
    if let Some(Value::Object(options)) = object.get("options") {
        for (from, to) in [
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("top_k", "top_k"),
            ("min_p", "min_p"),
            ("seed", "seed"),
            ("stop", "stop"),
            ("presence_penalty", "presence_penalty"),
            ("frequency_penalty", "frequency_penalty"),
        ] {
            if let Some(value) = options.get(from).filter(|v| !v.is_null()) {
                out.insert(to.into(), value.clone());
            }
        }
        // Ollama's -1 (no limit) and -2 (fill the context) have no OpenAI form: left out.
        if let Some(n) = options.get("num_predict").and_then(Value::as_i64).filter(|n| *n > 0) {
            out.insert("max_tokens".into(), n.into());
        }
    }
    match object.get("format") {
        Some(Value::String(format)) if format == "json" => {
            out.insert("response_format".into(), json!({ "type": "json_object" }));
        }
        Some(schema @ Value::Object(_)) => {
            out.insert(
                "response_format".into(),
                json!({ "type": "json_schema", "json_schema": { "name": "response", "schema": schema } }),
            );
        }
        _ => {}
    }
}

/// One Ollama chat message as an OpenAI message (`images` are dropped: OpenAI wants them as
/// content parts, which llama-server only reads with a vision projector loaded).
fn openai_message(message: &Value) -> Value {
    let mut out = Map::new();
    out.insert("role".into(), message.get("role").cloned().unwrap_or_else(|| json!("user")));
    let content = match message.get("content") {
        None | Some(Value::Null) => json!(""),
        Some(content) => content.clone(),
    };
    out.insert("content".into(), content);
    if let Some(Value::Array(calls)) = message.get("tool_calls") {
        let calls: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(i, call)| {
                let function = &call["function"];
                let arguments = match &function["arguments"] {
                    Value::String(text) => text.clone(),
                    Value::Null => "{}".to_string(),
                    other => other.to_string(),
                };
                let id = call.get("id").and_then(Value::as_str).map_or_else(|| format!("call_{i}"), str::to_string);
                json!({ "id": id, "type": "function", "function": { "name": function["name"], "arguments": arguments } })
            })
            .collect();
        out.insert("tool_calls".into(), Value::Array(calls));
    }
    if let Some(id) = message.get("tool_call_id").filter(|v| v.is_string()) {
        out.insert("tool_call_id".into(), id.clone());
    }
    if let Some(name) = message.get("tool_name").filter(|v| v.is_string()) {
        out.insert("name".into(), name.clone());
    }
    Value::Object(out)
}

/// The upstream path and body for a translated chat or generate request.
fn completion_request(
    endpoint: Endpoint,
    name: &str,
    object: &Map<String, Value>,
) -> Result<(&'static str, Value), String> {
    let stream = object.get("stream").and_then(Value::as_bool).unwrap_or(true);
    let mut out = Map::new();
    out.insert("model".into(), json!(name));
    let path = match endpoint {
        Endpoint::Chat => {
            let messages = match object.get("messages") {
                Some(Value::Array(messages)) => messages.iter().map(openai_message).collect::<Vec<_>>(),
                _ => return Err("`messages` must be a list of messages".into()),
            };
            out.insert("messages".into(), Value::Array(messages));
            if let Some(tools) = object.get("tools").filter(|t| t.as_array().is_some_and(|a| !a.is_empty())) {
                out.insert("tools".into(), tools.clone());
            }
            "/v1/chat/completions"
        }
        Endpoint::Generate => {
            let text = |key: &str| -> Result<Option<String>, String> {
                match object.get(key) {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    Some(_) => Err(format!("`{key}` must be a string")),
                }
            };
            let prompt = text("prompt")?.unwrap_or_default();
            let system = text("system")?.filter(|s| !s.is_empty());
            let suffix = text("suffix")?.filter(|s| !s.is_empty());
            let raw = object.get("raw").and_then(Value::as_bool).unwrap_or(false);
            if raw || suffix.is_some() {
                // Ollama's raw mode: the prompt exactly as given, no chat template.
                let prompt = match system {
                    Some(system) => format!("{system}\n\n{prompt}"),
                    None => prompt,
                };
                out.insert("prompt".into(), json!(prompt));
                if let Some(suffix) = suffix {
                    out.insert("suffix".into(), json!(suffix));
                }
                "/v1/completions"
            } else {
                // Ollama applies the model's template to a prompt; the chat endpoint is where an
                // OpenAI server does that.
                let mut messages = Vec::new();
                if let Some(system) = system {
                    messages.push(json!({ "role": "system", "content": system }));
                }
                messages.push(json!({ "role": "user", "content": prompt }));
                out.insert("messages".into(), Value::Array(messages));
                "/v1/chat/completions"
            }
        }
        Endpoint::Embed | Endpoint::Embeddings => unreachable!("embeddings are not completions"),
    };
    out.insert("stream".into(), json!(stream));
    if stream {
        out.insert("stream_options".into(), json!({ "include_usage": true }));
    }
    map_options(object, &mut out);
    if path == "/v1/chat/completions" {
        map_think(object.get("think"), &mut out)?;
    }
    Ok((path, Value::Object(out)))
}

/// Ollama's `think` (`true`/`false`, or a level for the models that take one) as the chat
/// template arguments llama-server passes to the model's template (`enable_thinking`, and
/// `reasoning_effort` for a level); without it the server's default stands.
fn map_think(think: Option<&Value>, out: &mut Map<String, Value>) -> Result<(), String> {
    let kwargs = match think {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Bool(enabled)) => json!({ "enable_thinking": enabled }),
        Some(Value::String(level)) if matches!(level.as_str(), "high" | "medium" | "low") => {
            json!({ "enable_thinking": true, "reasoning_effort": level })
        }
        Some(other) => {
            return Err(format!("`think` must be true, false, \"high\", \"medium\" or \"low\", not {other}"));
        }
    };
    out.insert("chat_template_kwargs".into(), kwargs);
    Ok(())
}

/// Translates a request for an OpenAI-speaking model, sends it and translates the answer.
pub(super) async fn translate(
    state: &AppState,
    gate: &Arc<ModelGate>,
    pin: Pin,
    client_headers: &HeaderMap,
    object: Map<String, Value>,
    request: Translation,
) -> Response {
    let embedding = matches!(request.endpoint, Endpoint::Embed | Endpoint::Embeddings);
    let (path, body) = if embedding {
        let input = match request.endpoint {
            Endpoint::Embed => object.get("input"),
            _ => object.get("prompt"),
        };
        let empty = match input {
            None | Some(Value::Null) => true,
            Some(Value::String(s)) => s.is_empty(),
            Some(Value::Array(a)) => a.is_empty(),
            Some(_) => return error(StatusCode::BAD_REQUEST, "`input` must be a string or a list of strings"),
        };
        if empty {
            // Ollama loads the model and answers with no embeddings.
            let body = match request.endpoint {
                Endpoint::Embed => json!({ "model": request.asked, "embeddings": [] }),
                _ => json!({ "embedding": [] }),
            };
            return with_model_header(Json(body).into_response(), Some(&gate.id));
        }
        let mut out = json!({ "model": request.name, "input": input });
        if let Some(dimensions) = object.get("dimensions").filter(|d| d.is_u64()) {
            out["dimensions"] = dimensions.clone();
        }
        ("/v1/embeddings", out)
    } else {
        match completion_request(request.endpoint, &request.name, &object) {
            Ok(translated) => translated,
            Err(message) => return error(StatusCode::BAD_REQUEST, message),
        }
    };
    let stream = body["stream"].as_bool().unwrap_or(false);
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let accept = if stream { "text/event-stream" } else { "application/json" };
    headers.insert(header::ACCEPT, HeaderValue::from_static(accept));
    if let Some(authorization) = client_headers.get(header::AUTHORIZATION) {
        headers.insert(header::AUTHORIZATION, authorization.clone());
    }
    tracing::debug!(model = %gate.id, path, stream, "ollama request translated for an OpenAI server");
    let sent = Instant::now();
    let (pin, response) = match send(state, gate, pin, path, headers, Bytes::from(body.to_string())).await {
        Ok(sent) => sent,
        Err(response) => return response,
    };
    let (head, incoming) = response.into_parts();
    if !head.status.is_success() {
        let bytes = read_upstream(incoming, state.stall_timeout, UPSTREAM_ERROR_LIMIT).await.unwrap_or_default();
        return upstream_failure(&gate.id, head.status, &bytes);
    }
    let event_stream = head
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut progress = Progress::new(request, sent);
    if stream && event_stream {
        let relay = Relay::new(incoming, progress, state.stall_timeout, gate.id.clone(), pin);
        let response = Response::builder()
            .header(header::CONTENT_TYPE, NDJSON)
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::from_stream(relay.into_stream()))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
        return with_model_header(response, Some(&gate.id));
    }
    let read = tokio::select! {
        biased;
        () = pin.cut() => None,
        read = read_answer(state, incoming, UPSTREAM_ANSWER_LIMIT) => Some(read),
    };
    let Some(read) = read else {
        return error(StatusCode::SERVICE_UNAVAILABLE, stopped_before_answering(&gate.id).message().to_string());
    };
    // Held (and counted against proxy.max_buffered) until the translated answer is built.
    let answer_body = match read {
        Ok(read) => read,
        Err((StatusCode::BAD_GATEWAY, message)) => {
            return error(StatusCode::BAD_GATEWAY, format!("model {} at {} failed: {message}", gate.id, pin.upstream));
        }
        Err((status, message)) => return error(status, message),
    };
    let bytes = &answer_body.bytes;
    drop(pin);
    let answer: Value = match serde_json::from_slice(bytes) {
        Ok(answer) => answer,
        Err(e) => {
            return error(
                StatusCode::BAD_GATEWAY,
                format!("model {} answered with something other than JSON: {e}", gate.id),
            );
        }
    };
    if let Some(message) = answer.get("error").and_then(|_| error_message(bytes)) {
        // An error in a 200 answer: its own 4xx code stands (the request was at fault), anything
        // else is the server's failure.
        let status = answer["error"]["code"]
            .as_u64()
            .and_then(|code| u16::try_from(code).ok())
            .and_then(|code| StatusCode::from_u16(code).ok())
            .filter(StatusCode::is_client_error)
            .unwrap_or(StatusCode::BAD_GATEWAY);
        return error(status, message);
    }
    let response = if embedding {
        Json(progress.embeddings(&answer)).into_response()
    } else if stream {
        // The server answered a streamed request in one piece: still NDJSON, as a stream of one
        // content line and the final line.
        let mut out = Vec::new();
        progress.whole_as_lines(&answer, &mut out);
        Response::builder()
            .header(header::CONTENT_TYPE, NDJSON)
            .body(Body::from(out))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
    } else {
        Json(progress.whole(&answer)).into_response()
    };
    with_model_header(response, Some(&gate.id))
}

/// One tool call being assembled from streamed deltas.
#[derive(Default)]
struct ToolCall {
    name: String,
    arguments: String,
}

/// What a translated answer has said so far, and the timings for its final line.
struct Progress {
    request: Translation,
    /// When the request went upstream.
    sent: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    deltas: u64,
    finish_reason: Option<String>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    tool_calls: Vec<ToolCall>,
    /// The bytes of every tool call's name and arguments together: bounded, as one call is, so
    /// a server cannot grow the daemon with ever more calls either.
    tool_call_bytes: usize,
    done: bool,
    /// The server's own timings (llama-server's `timings`), when it reports them.
    timings: ServerTimings,
}

/// llama-server's `timings` (in a whole answer, and in the last chunks of a streamed one): the
/// tokens it evaluated and how long that took, per phase. Ollama's durations are these, where
/// present; measuring them from outside cannot tell the prompt's time from the first token's.
#[derive(Default)]
struct ServerTimings {
    prompt_n: Option<u64>,
    prompt: Option<Duration>,
    predicted_n: Option<u64>,
    predicted: Option<Duration>,
}

impl ServerTimings {
    /// Reads the `timings` of an answer or chunk; fields it lacks keep what an earlier one said.
    fn read(&mut self, timings: &Value) {
        if let Some(n) = timings["prompt_n"].as_u64() {
            self.prompt_n = Some(n);
        }
        if let Some(n) = timings["predicted_n"].as_u64() {
            self.predicted_n = Some(n);
        }
        if let Some(ms) = milliseconds(&timings["prompt_ms"]) {
            self.prompt = Some(ms);
        }
        if let Some(ms) = milliseconds(&timings["predicted_ms"]) {
            self.predicted = Some(ms);
        }
    }
}

/// A duration in (fractional) milliseconds as a model server reports it; `None` unless it is a
/// finite, non-negative number of a sane size (under a year).
fn milliseconds(value: &Value) -> Option<Duration> {
    let ms = value.as_f64().filter(|ms| ms.is_finite() && *ms >= 0.0 && *ms < 3.2e10)?;
    Duration::try_from_secs_f64(ms / 1000.0).ok()
}

/// OpenAI's `finish_reason` as Ollama's `done_reason`.
fn done_reason(finish_reason: Option<&str>) -> &'static str {
    match finish_reason {
        Some("length") => "length",
        _ => "stop",
    }
}

/// The text a choice carries: a chat delta's or message's `content`, or a completion's `text`.
fn choice_text<'a>(choice: &'a Value, part: &str) -> Option<&'a str> {
    choice[part]["content"].as_str().or_else(|| choice["text"].as_str())
}

/// OpenAI tool calls (arguments as a JSON string) as Ollama's (arguments as an object), and the
/// text of those that are not calls Ollama's clients can take: a call whose arguments are not a
/// JSON object (a generation cut off mid-call by its token limit) would make their libraries
/// fail to read the whole answer, so its text goes with the content instead, as Ollama does with
/// output it cannot parse as a call.
fn ollama_tool_calls(calls: impl Iterator<Item = (String, String)>) -> (Vec<Value>, String) {
    let mut parsed = Vec::new();
    let mut unparsed = String::new();
    for (name, arguments) in calls {
        let object = if arguments.trim().is_empty() {
            Some(Value::Object(Map::new()))
        } else {
            serde_json::from_str::<Value>(&arguments).ok().filter(Value::is_object)
        };
        match object {
            Some(arguments) => parsed.push(json!({ "function": { "name": name, "arguments": arguments } })),
            None => unparsed.push_str(&format!("{{\"name\": {}, \"arguments\": {arguments}}}", json!(name))),
        }
    }
    (parsed, unparsed)
}

impl Progress {
    fn new(request: Translation, sent: Instant) -> Progress {
        Progress {
            request,
            sent,
            first_token: None,
            last_token: None,
            deltas: 0,
            finish_reason: None,
            prompt_tokens: None,
            completion_tokens: None,
            tool_calls: Vec::new(),
            tool_call_bytes: 0,
            done: false,
            timings: ServerTimings::default(),
        }
    }

    /// A line (or whole answer) carrying text: `message` for chat, `response` for generate.
    fn line(&self, content: &str, thinking: Option<&str>, done: bool) -> Value {
        let mut line = json!({ "model": self.request.asked, "created_at": now() });
        match self.request.endpoint {
            Endpoint::Chat => {
                let mut message = json!({ "role": "assistant", "content": content });
                if let Some(thinking) = thinking {
                    message["thinking"] = json!(thinking);
                }
                line["message"] = message;
            }
            _ => {
                line["response"] = json!(content);
                if let Some(thinking) = thinking {
                    line["thinking"] = json!(thinking);
                }
            }
        }
        line["done"] = json!(done);
        line
    }

    /// Adds `done_reason`, the counts and the durations to a final line.
    fn complete(&self, line: &mut Value) {
        let end = Instant::now();
        line["done_reason"] = json!(done_reason(self.finish_reason.as_deref()));
        line["total_duration"] = json!(nanos(end - self.request.started));
        line["load_duration"] = json!(nanos(self.request.load_duration));
        // The server's timings and the counts they go with, where it reports them; else usage's
        // counts and the times seen from here.
        let timings = &self.timings;
        if let Some(count) = timings.prompt_n.or(self.prompt_tokens) {
            line["prompt_eval_count"] = json!(count);
        }
        let first = self.first_token.unwrap_or(end);
        let prompt = timings.prompt.unwrap_or_else(|| first.saturating_duration_since(self.sent));
        line["prompt_eval_duration"] = json!(nanos(prompt));
        line["eval_count"] = json!(timings.predicted_n.or(self.completion_tokens).unwrap_or(self.deltas));
        let last = self.last_token.unwrap_or(end);
        let eval = timings.predicted.unwrap_or_else(|| last.saturating_duration_since(first));
        line["eval_duration"] = json!(nanos(eval));
    }

    fn push_line(out: &mut Vec<u8>, line: &Value) {
        out.extend_from_slice(line.to_string().as_bytes());
        out.push(b'\n');
    }

    /// Reads the counts (`usage`) and the server's `timings` of an answer or a chunk.
    fn usage(&mut self, answer: &Value) {
        if let Some(n) = answer["usage"]["prompt_tokens"].as_u64() {
            self.prompt_tokens = Some(n);
        }
        if let Some(n) = answer["usage"]["completion_tokens"].as_u64() {
            self.completion_tokens = Some(n);
        }
        if answer["timings"].is_object() {
            self.timings.read(&answer["timings"]);
        }
    }

    /// One SSE event's data: its NDJSON lines go to `out`. `Err` is an error the server sent in
    /// the stream.
    fn event(&mut self, data: &str, out: &mut Vec<u8>) -> Result<(), String> {
        let data = data.trim();
        if data.is_empty() || self.done {
            return Ok(());
        }
        if data == "[DONE]" {
            self.final_lines(out);
            return Ok(());
        }
        let chunk: Value =
            serde_json::from_str(data).map_err(|e| format!("unreadable event from the model server: {e}"))?;
        if !chunk["error"].is_null() {
            return Err(error_message(data.as_bytes()).unwrap_or_else(|| "the model server reported an error".into()));
        }
        self.usage(&chunk);
        let Some(choice) = chunk["choices"].get(0) else { return Ok(()) };
        if let Some(reason) = choice["finish_reason"].as_str() {
            self.finish_reason = Some(reason.to_string());
        }
        if let Some(calls) = choice["delta"]["tool_calls"].as_array() {
            for (position, call) in calls.iter().enumerate() {
                // A model server's index is not trusted to size memory: at most one past the
                // calls seen so far.
                let index = call["index"]
                    .as_u64()
                    .map_or(position, |i| usize::try_from(i).unwrap_or(usize::MAX))
                    .min(self.tool_calls.len());
                if self.tool_calls.len() <= index {
                    self.tool_calls.resize_with(index + 1, ToolCall::default);
                }
                let name = call["function"]["name"].as_str().unwrap_or("");
                let arguments = call["function"]["arguments"].as_str().unwrap_or("");
                self.tool_call_bytes = self.tool_call_bytes.saturating_add(name.len()).saturating_add(arguments.len());
                if self.tool_call_bytes > MAX_EVENT_BYTES {
                    return Err(format!(
                        "the model server sent tool calls larger than {} MiB in all; the answer was cut off",
                        MAX_EVENT_BYTES >> 20
                    ));
                }
                let assembled = &mut self.tool_calls[index];
                assembled.name.push_str(name);
                assembled.arguments.push_str(arguments);
            }
        }
        let content = choice_text(choice, "delta").unwrap_or("");
        let thinking = choice["delta"]["reasoning_content"].as_str().filter(|t| !t.is_empty());
        if !content.is_empty() || thinking.is_some() {
            let now = Instant::now();
            self.first_token.get_or_insert(now);
            self.last_token = Some(now);
            self.deltas += 1;
            Self::push_line(out, &self.line(content, thinking, false));
        }
        Ok(())
    }

    /// The line with the assembled tool calls (if any), then the final line.
    fn final_lines(&mut self, out: &mut Vec<u8>) {
        if self.done {
            return;
        }
        self.done = true;
        if !self.tool_calls.is_empty() && self.request.endpoint == Endpoint::Chat {
            let calls = std::mem::take(&mut self.tool_calls);
            let (calls, unparsed) = ollama_tool_calls(calls.into_iter().map(|c| (c.name, c.arguments)));
            let mut line = self.line(&unparsed, None, false);
            if !calls.is_empty() {
                line["message"]["tool_calls"] = json!(calls);
            }
            Self::push_line(out, &line);
        }
        let mut line = self.line("", None, true);
        self.complete(&mut line);
        Self::push_line(out, &line);
    }

    /// Reads a whole (non-streamed) completion.
    fn absorb(&mut self, answer: &Value) -> (String, Option<String>, Vec<Value>) {
        let now = Instant::now();
        self.first_token = Some(self.sent);
        self.last_token = Some(now);
        self.usage(answer);
        let choice = &answer["choices"][0];
        self.finish_reason = choice["finish_reason"].as_str().map(str::to_string);
        let mut content = choice_text(choice, "message").unwrap_or("").to_string();
        let thinking = choice["message"]["reasoning_content"].as_str().filter(|t| !t.is_empty()).map(str::to_string);
        let (calls, unparsed) = choice["message"]["tool_calls"].as_array().map_or_else(Default::default, |calls| {
            ollama_tool_calls(calls.iter().map(|c| {
                let name = c["function"]["name"].as_str().unwrap_or("").to_string();
                let arguments = match &c["function"]["arguments"] {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                };
                (name, arguments)
            }))
        });
        content.push_str(&unparsed);
        if !content.is_empty() {
            self.deltas = 1;
        }
        (content, thinking, calls)
    }

    /// A whole completion as one Ollama object.
    fn whole(&mut self, answer: &Value) -> Value {
        let (content, thinking, calls) = self.absorb(answer);
        let mut line = self.line(&content, thinking.as_deref(), true);
        if !calls.is_empty() && self.request.endpoint == Endpoint::Chat {
            line["message"]["tool_calls"] = json!(calls);
        }
        self.complete(&mut line);
        line
    }

    /// A whole completion as NDJSON: the content line, then the final line.
    fn whole_as_lines(&mut self, answer: &Value, out: &mut Vec<u8>) {
        let (content, thinking, calls) = self.absorb(answer);
        let mut line = self.line(&content, thinking.as_deref(), false);
        if !calls.is_empty() && self.request.endpoint == Endpoint::Chat {
            line["message"]["tool_calls"] = json!(calls);
        }
        Self::push_line(out, &line);
        self.done = true;
        let mut last = self.line("", None, true);
        self.complete(&mut last);
        Self::push_line(out, &last);
    }

    /// An OpenAI embeddings answer as Ollama's.
    fn embeddings(&mut self, answer: &Value) -> Value {
        self.usage(answer);
        let mut data: Vec<&Value> = answer["data"].as_array().map(|d| d.iter().collect()).unwrap_or_default();
        data.sort_by_key(|d| d["index"].as_u64().unwrap_or(0));
        let vectors: Vec<Value> = data.iter().map(|d| d["embedding"].clone()).collect();
        if self.request.endpoint == Endpoint::Embeddings {
            return json!({ "embedding": vectors.into_iter().next().unwrap_or_else(|| json!([])) });
        }
        let mut body = json!({
            "model": self.request.asked,
            "embeddings": vectors,
            "total_duration": nanos(self.request.started.elapsed()),
            "load_duration": nanos(self.request.load_duration),
        });
        if let Some(count) = self.prompt_tokens {
            body["prompt_eval_count"] = json!(count);
        }
        body
    }
}

#[cfg(test)]
mod tests;
