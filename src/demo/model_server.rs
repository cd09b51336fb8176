//! The demo model server: a stand-in for a real model server (llama-server, vLLM, whisper.cpp,
//! ...) that runs on the simulated GPU device. `vramgate serve --demo` runs it as its demo models
//! (through the hidden `vramgate demo-model` subcommand, so the demo needs nothing but the one
//! binary), and the end-to-end tests run it as `vramgate-fake-model` (`tests/fixtures/fake_model.rs`,
//! a thin `main` around [`main`]).
//!
//! It speaks just enough of the llama-server / OpenAI HTTP surface for the daemon to start it, wait
//! for it to become healthy, proxy requests to it and stop it: chat and text completions (streamed
//! and not), embeddings and transcriptions, all answered with canned text. It claims simulated VRAM
//! the way the simulated device expects: a process "uses" `M` MiB on device `N` while the file
//! `SIM_DIR/N/<pid>` holds the integer `M` and the pid is alive.
//!
//! Every misbehaviour the daemon must survive is a flag: slow loading (`--load-delay`), never
//! becoming ready (`--hang-on-start`), dying during start-up (`--exit-on-start`), refusing to stop
//! (`--ignore-sigterm`), releasing memory slowly (`--stop-delay`), a memory peak while serving
//! (`--grow-vram`), outliving a killed daemon (`--survive-parent-death`), llama-server's way of
//! stopping (`--term-waits-for-clients`), and at run time
//! `POST /crash` and `POST /hang`. Two flags mimic what llama-server reports: `--timings` (its
//! `timings` block) and `--max-input` (its 400 for a prompt longer than the context).
//!
//! Nothing here may panic on an I/O error from the environment (a closed stdout, a missing or
//! read-only sim directory): a server that dies for its own reasons would make tests fail in ways
//! that look like daemon bugs, and would spoil a demo.
//!
//! It is a process of its own: [`main`] owns the process (it exits on signals and on `/crash`), so
//! the daemon never calls it in-process, only spawns it.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::ReceiverStream;

mod claim;
mod transcription;
use claim::{Claim, ClaimFiles};
use transcription::read_transcription_form;

/// How many content chunks a streamed completion sends before `[DONE]` without `--reply`.
const DEFAULT_STREAM_CHUNKS: u32 = 5;

/// The model server's command line, shared by `vramgate-fake-model` and `vramgate demo-model`.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelServerArgs {
    /// TCP port to listen on (0 picks a free one and prints it).
    #[arg(long)]
    port: u16,

    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,

    /// Simulated device directory; the VRAM claim is written to SIM_DIR/DEVICE/<pid>.
    #[arg(long, value_name = "DIR")]
    sim_dir: Option<PathBuf>,

    /// Simulated device index the VRAM is claimed on.
    #[arg(long, value_name = "N", default_value_t = 0)]
    device: u32,

    /// MiB of simulated VRAM claimed once loaded.
    #[arg(long, value_name = "MIB", default_value_t = 0)]
    vram: u64,

    /// Time spent "loading weights": /health answers 503 until it has passed.
    #[arg(long, value_name = "DURATION", default_value = "200ms", value_parser = humantime::parse_duration)]
    load_delay: Duration,

    /// Extra MiB claimed for the duration of each /v1 request (a peak for the daemon to measure).
    #[arg(long, value_name = "MIB")]
    grow_vram: Option<u64>,

    /// Never become ready: /health answers 503 forever.
    #[arg(long)]
    hang_on_start: bool,

    /// Print a few log lines, then exit with CODE right after start (a crash while loading).
    #[arg(long, value_name = "CODE", allow_negative_numbers = true)]
    exit_on_start: Option<i32>,

    /// Ignore SIGTERM (only SIGKILL, or SIGINT, stops it).
    #[arg(long)]
    ignore_sigterm: bool,

    /// Stop the way llama-server does: on SIGTERM, stop generating (streams go silent) and exit
    /// only once no request is open, that is once every client has closed its connection.
    #[arg(long)]
    term_waits_for_clients: bool,

    /// Outlive the daemon: clear the parent-death signal vramgate sets on its children, as a
    /// server that installs its own (or a runtime that resets it) does. What a `kill -9` of the
    /// daemon then leaves behind is a leftover for the next daemon to reap.
    #[arg(long)]
    survive_parent_death: bool,

    /// On SIGTERM/SIGINT, wait this long (holding the VRAM) before exiting.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = humantime::parse_duration)]
    stop_delay: Duration,

    /// Delay between streamed chunks (a non-streamed answer takes as long as the whole stream).
    #[arg(long, value_name = "DURATION", default_value = "20ms", value_parser = humantime::parse_duration)]
    token_delay: Duration,

    /// Model name reported in responses and headers.
    #[arg(long, default_value = "fake")]
    name: String,

    /// The canned answer of chats, completions and transcriptions, streamed word by word.
    /// Without it the answer is `hello from NAME`, streamed as `tok0 ` to `tok4 `.
    #[arg(long, value_name = "TEXT")]
    reply: Option<String>,

    /// Do not log each request (for benchmarks, where the log line would be measured too).
    #[arg(long)]
    quiet: bool,

    /// Report llama-server's `timings` (`prompt_n`, `prompt_ms`, `predicted_n`, `predicted_ms`)
    /// in whole answers and in a stream's last chunk, with fixed values: the prompt's word count
    /// and 12.5 ms, the chunk count and 80.25 ms.
    #[arg(long)]
    timings: bool,

    /// Answer a chat, completion or embedding request whose prompt or input has more than N words
    /// with llama-server's 400 `exceed_context_size_error`.
    #[arg(long, value_name = "N")]
    max_input: Option<u64>,
}

/// The `--timings` values: milliseconds the prompt and the generation "took".
const PROMPT_MS: f64 = 12.5;
const PREDICTED_MS: f64 = 80.25;

/// Prints a line to stdout and flushes it at once: the daemon reads our output through a pipe,
/// where Rust would otherwise buffer it, and tests wait for lines like `ready`. Errors (a closed
/// pipe) are ignored on purpose; `println!` would panic instead.
fn out(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

/// Prints a line to stderr, ignoring errors (see [`out`]).
fn err(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Wall-clock microseconds, stamped on each streamed chunk so a benchmark on the same machine can
/// measure each chunk's transit time (send to arrival) directly and through a proxy.
fn unix_micros() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0)
}

/// What the server answers: the same canned text whatever is asked.
struct Replies {
    /// A non-streamed chat or completion's content, and a transcription's text.
    whole: String,
    /// A streamed answer's content pieces, one per chunk; never empty.
    chunks: Vec<String>,
}

impl Replies {
    /// `--reply` streamed word by word (the pieces keep their spaces, so they add up to the
    /// whole), or the tests' fixed `hello from NAME` and `tok0 `..`tok4 `.
    fn new(reply: Option<&str>, name: &str) -> Replies {
        match reply {
            Some(text) if !text.is_empty() => {
                Replies { whole: text.to_owned(), chunks: text.split_inclusive(' ').map(str::to_owned).collect() }
            }
            _ => Replies {
                whole: format!("hello from {name}"),
                chunks: (0..DEFAULT_STREAM_CHUNKS).map(|i| format!("tok{i} ")).collect(),
            },
        }
    }
}

struct AppState {
    name: String,
    replies: Replies,
    token_delay: Duration,
    quiet: bool,
    /// `--timings`.
    timings: bool,
    /// `--max-input`.
    max_input: Option<u64>,
    ready: AtomicBool,
    /// Set by POST /hang: from then on no request gets an answer.
    hung: AtomicBool,
    claim: Mutex<Claim>,
    /// Chat, completion and embedding requests not yet answered or streamed to the end.
    open_requests: AtomicU64,
    /// Woken when a request closes (for `--term-waits-for-clients`).
    request_closed: tokio::sync::Notify,
    /// Set on SIGTERM with `--term-waits-for-clients`: streams send nothing more.
    terminating: AtomicBool,
    /// Headers added to every response, so tests can tell which process answered.
    headers: Vec<(HeaderName, HeaderValue)>,
    next_id: AtomicU64,
}

impl AppState {
    /// Locks the claim; a poisoned lock still holds a usable claim, and panicking here would take
    /// the whole fixture down.
    fn claim(&self) -> MutexGuard<'_, Claim> {
        self.claim.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Holds `--grow-vram` extra MiB for as long as it lives; it lives as long as the request it was
/// made for, including the streaming of the body, and gives the memory back when dropped (also
/// when the client goes away mid-stream).
struct Growth(Arc<AppState>);

impl Growth {
    fn start(state: &Arc<AppState>) -> Self {
        state.open_requests.fetch_add(1, Ordering::SeqCst);
        let mut claim = state.claim();
        if claim.grow_mib > 0 {
            claim.in_flight += 1;
            claim.sync();
        }
        Growth(Arc::clone(state))
    }
}

impl Drop for Growth {
    fn drop(&mut self) {
        let mut claim = self.0.claim();
        if claim.grow_mib > 0 {
            claim.in_flight = claim.in_flight.saturating_sub(1);
            claim.sync();
        }
        drop(claim);
        self.0.open_requests.fetch_sub(1, Ordering::SeqCst);
        self.0.request_closed.notify_waiters();
    }
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// Runs around every route (and the 404 fallback): hangs when told to, turns requests away while
/// loading, and stamps the identifying headers.
async fn gate(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if state.hung.load(Ordering::SeqCst) {
        // Accept the connection but never answer, like a server stuck in a GPU kernel.
        return std::future::pending().await;
    }
    let mut response = if request.uri().path() != "/health" && !state.ready.load(Ordering::SeqCst) {
        json_response(StatusCode::SERVICE_UNAVAILABLE, json!({"error": {"message": "Loading model", "code": 503}}))
    } else {
        next.run(request).await
    };
    for (name, value) in &state.headers {
        response.headers_mut().insert(name.clone(), value.clone());
    }
    response
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.load(Ordering::SeqCst) {
        json_response(StatusCode::OK, json!({"status": "ok"}))
    } else {
        json_response(StatusCode::SERVICE_UNAVAILABLE, json!({"status": "loading"}))
    }
}

async fn crash() -> Response {
    err("fake-model: crashing on request (exit 3)");
    // Exit from a separate task after a moment so the response below can reach the client.
    tokio::spawn(async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::process::exit(3);
    });
    json_response(StatusCode::OK, json!({"status": "crashing"}))
}

async fn hang(State(state): State<Arc<AppState>>) -> Response {
    err("fake-model: hanging on request; no further HTTP answers");
    state.hung.store(true, Ordering::SeqCst);
    json_response(StatusCode::OK, json!({"status": "hanging"}))
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    json_response(
        StatusCode::OK,
        json!({"object": "list", "data": [{"id": state.name, "object": "model", "owned_by": "vramgate-fake-model"}]}),
    )
}

/// Parses a request body leniently: no Content-Type needed (so plain `curl -d` works), and an
/// empty body counts as `{}`. A body that is not JSON gets a 400 answer, as from the OpenAI API.
fn parse_body(body: &Bytes) -> Result<Value, Box<Response>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|e| {
        Box::new(json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": {"message": format!("invalid JSON body: {e}"), "type": "invalid_request_error"}}),
        ))
    })
}

/// A rough prompt size for the `usage` block: the words in `prompt` or in the messages' contents.
fn prompt_tokens(body: &Value) -> u64 {
    let words = |v: &Value| v.as_str().map_or(0, |s| s.split_whitespace().count() as u64);
    let from_prompt = words(&body["prompt"]);
    let from_messages: u64 =
        body["messages"].as_array().map_or(0, |messages| messages.iter().map(|m| words(&m["content"])).sum());
    from_prompt + from_messages
}

async fn chat_completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    complete(state, body, "chat completion").await
}

async fn completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    complete(state, body, "completion").await
}

/// Serves both completion endpoints with the same chat-shaped answers; the tests only care that
/// a request flows through the daemon, not about OpenAI's legacy text format.
async fn complete(state: Arc<AppState>, body: Bytes, kind: &str) -> Response {
    let body = match parse_body(&body) {
        Ok(body) => body,
        Err(response) => return *response,
    };
    if let Some(refusal) = too_long(&state, prompt_tokens(&body)) {
        return refusal;
    }
    let stream = body["stream"].as_bool().unwrap_or(false);
    if !state.quiet {
        let shown: String = body.to_string().chars().take(160).collect();
        err(&format!("fake-model: {kind} request (stream: {stream}) {shown}"));
    }
    let growth = Growth::start(&state);
    if stream {
        stream_completion(state, growth, prompt_tokens(&body))
    } else {
        whole_completion(state, growth, &body).await
    }
}

/// llama-server's answer to a prompt longer than its context (`--max-input`).
fn too_long(state: &AppState, tokens: u64) -> Option<Response> {
    let limit = state.max_input.filter(|limit| tokens > *limit)?;
    Some(json_response(
        StatusCode::BAD_REQUEST,
        json!({"error": {
            "code": 400,
            "message": "the request exceeds the available context size, try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": tokens,
            "n_ctx": limit,
        }}),
    ))
}

/// llama-server's `timings` block, with the `--timings` values.
fn timings(prompt_n: u64, predicted_n: u64) -> Value {
    json!({
        "prompt_n": prompt_n,
        "prompt_ms": PROMPT_MS,
        "predicted_n": predicted_n,
        "predicted_ms": PREDICTED_MS,
    })
}

fn stream_completion(state: Arc<AppState>, growth: Growth, prompt_n: u64) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(1);
    let id = format!("chatcmpl-fake-{}", state.next_id());
    tokio::spawn(async move {
        // The growth guard lives in this task, so the extra VRAM is held until the stream ends.
        let _growth = growth;
        let count = state.replies.chunks.len();
        for (i, piece) in state.replies.chunks.iter().enumerate() {
            tokio::time::sleep(state.token_delay).await;
            if state.terminating.load(Ordering::SeqCst) {
                // Like llama-server after SIGTERM: nothing more comes until the client goes.
                tx.closed().await;
                return;
            }
            let last = i + 1 == count;
            let mut chunk = json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": unix_now(),
                "model": state.name,
                "choices": [{
                    "index": 0,
                    "delta": if i == 0 {
                        json!({"role": "assistant", "content": piece})
                    } else {
                        json!({"content": piece})
                    },
                    "finish_reason": if last { json!("stop") } else { Value::Null },
                }],
                "sent_us": unix_micros() as u64,
            });
            if last && state.timings {
                // llama-server reports its timings with the last chunk.
                chunk["timings"] = timings(prompt_n, count as u64);
            }
            if tx.send(Ok(Bytes::from(format!("data: {chunk}\n\n")))).await.is_err() {
                return; // The client went away; dropping the guard releases the growth.
            }
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
    });
    Response::builder()
        .header(CONTENT_TYPE, "text/event-stream")
        .header(CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(ReceiverStream::new(rx)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn whole_completion(state: Arc<AppState>, growth: Growth, body: &Value) -> Response {
    // Take as long as the streamed answer would, so a --grow-vram peak is visible to a sampler.
    if !state.token_delay.is_zero() {
        let chunks = u32::try_from(state.replies.chunks.len()).unwrap_or(u32::MAX);
        tokio::time::sleep(state.token_delay.saturating_mul(chunks)).await;
    }
    drop(growth);
    let prompt_tokens = prompt_tokens(body);
    let completion_tokens = state.replies.whole.split_whitespace().count() as u64;
    let mut answer = json!({
        "id": format!("chatcmpl-fake-{}", state.next_id()),
        "object": "chat.completion",
        "created": unix_now(),
        "model": state.name,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": state.replies.whole},
            "finish_reason": "stop",
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    });
    if state.timings {
        answer["timings"] = timings(prompt_tokens, completion_tokens);
    }
    json_response(StatusCode::OK, answer)
}

async fn embeddings(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let body = match parse_body(&body) {
        Ok(body) => body,
        Err(response) => return *response,
    };
    let prompt_tokens = prompt_tokens(&json!({"prompt": body["input"]}));
    if let Some(refusal) = too_long(&state, prompt_tokens) {
        return refusal;
    }
    let growth = Growth::start(&state);
    tokio::time::sleep(state.token_delay).await;
    drop(growth);
    json_response(
        StatusCode::OK,
        json!({
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
            "model": state.name,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }),
    )
}

/// An OpenAI-style 400 answer.
fn bad_request(message: String) -> Response {
    json_response(StatusCode::BAD_REQUEST, json!({"error": {"message": message, "type": "invalid_request_error"}}))
}

/// `/v1/audio/transcriptions`: the canned text for any audio, as JSON (`{"text": ...}`, also for
/// `verbose_json`) or as plain text (`response_format=text`).
async fn transcriptions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let form = match read_transcription_form(&headers, body).await {
        Ok(form) => form,
        Err(message) => return bad_request(message),
    };
    let Some(file_bytes) = form.file_bytes else {
        return bad_request("the form has no `file` field: send the audio as -F file=@audio.wav".to_owned());
    };
    if !state.quiet {
        err(&format!("fake-model: transcription request ({file_bytes} bytes of audio)"));
    }
    let growth = Growth::start(&state);
    tokio::time::sleep(state.token_delay).await;
    drop(growth);
    match form.response_format.as_deref() {
        None | Some("" | "json" | "verbose_json") => {
            json_response(StatusCode::OK, json!({"text": state.replies.whole}))
        }
        Some("text") => {
            ([(CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{}\n", state.replies.whole)).into_response()
        }
        Some(other) => {
            bad_request(format!("response_format {other:?} is not supported here: use json, verbose_json or text"))
        }
    }
}

async fn not_found() -> Response {
    json_response(StatusCode::NOT_FOUND, json!({"error": {"message": "no such endpoint", "code": 404}}))
}

/// Waits for SIGTERM/SIGINT and then stops: after `--stop-delay` the process exits 0. Its claim
/// is left for the device to drop with the process (at once, or after the sim's `release_lag`),
/// as a real server's memory goes when its process does: removing the file here would hand the
/// memory back before the process is gone. Exiting directly (rather than a graceful server
/// shutdown) keeps an open stream from holding the process up, which a real server would not do
/// either.
async fn handle_signals(state: Arc<AppState>, args: &ModelServerArgs) -> std::io::Result<()> {
    let (ignore_sigterm, stop_delay) = (args.ignore_sigterm, args.stop_delay);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let which = loop {
        tokio::select! {
            _ = term.recv() => {
                if ignore_sigterm {
                    err("ignoring SIGTERM");
                    continue;
                }
                if args.term_waits_for_clients {
                    state.terminating.store(true, Ordering::SeqCst);
                    loop {
                        let closed = state.request_closed.notified();
                        let open = state.open_requests.load(Ordering::SeqCst);
                        if open == 0 {
                            break;
                        }
                        err(&format!("fake-model: SIGTERM: waiting for {open} open request(s) to close"));
                        closed.await;
                    }
                }
                break "SIGTERM";
            }
            _ = int.recv() => break "SIGINT",
        }
    };
    err(&format!("fake-model: got {which}, exiting in {}", humantime::format_duration(stop_delay)));
    tokio::time::sleep(stop_delay).await;
    out("stopping");
    std::process::exit(0);
}

async fn run(args: ModelServerArgs, extra: Router) -> Result<(), String> {
    let pid = std::process::id();
    out(&format!("fake-model {} starting on port {} (pid {pid})", args.name, args.port));
    err(&format!(
        "loading weights... (model {}, {} MiB on device {}, load delay {})",
        args.name,
        args.vram,
        args.device,
        humantime::format_duration(args.load_delay)
    ));

    if let Some(code) = args.exit_on_start {
        err("error: failed to allocate device memory for model weights (simulated)");
        err(&format!("fake-model: exiting with status {code} (--exit-on-start)"));
        std::process::exit(code);
    }

    let files = args.sim_dir.as_ref().map(|sim_dir| {
        let dir = sim_dir.join(args.device.to_string());
        ClaimFiles { file: dir.join(pid.to_string()), tmp: dir.join(format!(".{pid}.tmp")), dir }
    });
    let mut headers = vec![(HeaderName::from_static("x-fake-pid"), HeaderValue::from(pid))];
    match HeaderValue::from_str(&args.name) {
        Ok(value) => headers.push((HeaderName::from_static("x-fake-model"), value)),
        Err(_) => err("fake-model: name is not a valid header value; x-fake-model left out"),
    }
    let state = Arc::new(AppState {
        name: args.name.clone(),
        replies: Replies::new(args.reply.as_deref(), &args.name),
        token_delay: args.token_delay,
        quiet: args.quiet,
        timings: args.timings,
        max_input: args.max_input,
        ready: AtomicBool::new(false),
        hung: AtomicBool::new(false),
        claim: Mutex::new(Claim {
            files,
            base_mib: args.vram,
            grow_mib: args.grow_vram.unwrap_or(0),
            in_flight: 0,
            active: false,
        }),
        headers,
        next_id: AtomicU64::new(0),
        open_requests: AtomicU64::new(0),
        request_closed: tokio::sync::Notify::new(),
        terminating: AtomicBool::new(false),
    });

    // Signals first, so a stop during loading (or a hung start) is handled like any other.
    let (signal_state, signal_args) = (Arc::clone(&state), args.clone());
    tokio::spawn(async move {
        if let Err(e) = handle_signals(signal_state, &signal_args).await {
            err(&format!("fake-model: cannot install signal handlers: {e}"));
        }
    });

    // Bind before loading, so /health can say "loading" for the whole load delay.
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .map_err(|e| format!("cannot listen on {}:{}: {e}", args.host, args.port))?;
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    if let Some(addr) = addr {
        err(&format!("listening on http://{addr}"));
    }

    let app = Router::new()
        .route("/health", get(health))
        .route("/crash", post(crash))
        .route("/hang", post(hang))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/audio/transcriptions", post(transcriptions))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(Arc::clone(&state), gate))
        .with_state(Arc::clone(&state))
        .merge(extra);

    let load_state = Arc::clone(&state);
    let (hang_on_start, load_delay) = (args.hang_on_start, args.load_delay);
    tokio::spawn(async move {
        let started = Instant::now();
        tokio::time::sleep(load_delay).await;
        if hang_on_start {
            err("fake-model: stuck while loading (--hang-on-start)");
            return;
        }
        {
            // Claim the memory before saying ready: the daemon may measure as soon as it sees us healthy.
            let mut claim = load_state.claim();
            claim.active = true;
            claim.sync();
        }
        load_state.ready.store(true, Ordering::SeqCst);
        err(&format!("weights loaded in {}ms", started.elapsed().as_millis()));
        out("ready");
    });

    axum::serve(listener, app).await.map_err(|e| format!("server error: {e}"))
}

/// Runs the model server until a signal, `POST /crash` or a start-up failure ends the process.
/// Returns only when the server could not start (a busy port, no async runtime), with the exit
/// status to use.
pub fn main(args: ModelServerArgs) -> ExitCode {
    main_with(args, Router::new())
}

/// [`main`], also serving `extra` routes (the test fixture's stand-ins for endpoints of a server).
pub fn main_with(args: ModelServerArgs, extra: Router) -> ExitCode {
    if args.survive_parent_death {
        // PR_SET_PDEATHSIG(0). The kernel keeps the setting per thread and only the thread
        // vramgate forked (this one, after exec) has it: clear it here, before the runtime
        // starts threads.
        if let Err(e) = nix::sys::prctl::set_pdeathsig(None) {
            err(&format!("fake-model: cannot clear the parent-death signal: {e}"));
            return ExitCode::FAILURE;
        }
        err("fake-model: will survive the daemon (--survive-parent-death)");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            err(&format!("fake-model: cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, extra)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            err(&format!("fake-model: {e}"));
            ExitCode::FAILURE
        }
    }
}
