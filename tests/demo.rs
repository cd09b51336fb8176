//! `vramgate serve --demo`: the three lines it prints work as printed (run through `bash -c`,
//! with real curl when there is one), they do what they say (a chat loads `llm`, `load stt` fills
//! the GPU, `vision` evicts `llm` and not `stt`), the demo models answer every kind of request,
//! and the demo leaves nothing behind: its temp dir goes on SIGINT and on a failed start, and
//! nothing is written under HOME or the state dir.
//!
//! Its sandbox goes further than the harness's isolation (`common::isolate`): HOME, the state dir
//! and TMPDIR are fresh temp dirs that must be empty again at the end.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

/// The places a demo could write to outside its temp dir, each an empty temp dir to check.
struct Sandbox {
    home: tempfile::TempDir,
    state: tempfile::TempDir,
    /// `TMPDIR`: where the demo makes its temp dir, so that after the demo it must be empty again.
    tmp: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        Sandbox {
            home: tempfile::tempdir().expect("home"),
            state: tempfile::tempdir().expect("state"),
            tmp: tempfile::tempdir().expect("tmp"),
        }
    }

    /// A command with the sandbox's environment: no way to reach a user's daemon, home or state.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        common::isolate(&mut command);
        command
            .env("HOME", self.home.path())
            .env("XDG_STATE_HOME", self.state.path())
            .env("TMPDIR", self.tmp.path())
            // The demo must ignore a config named by the environment, and, on loopback, a token
            // the user exported for their own daemon (its printed curl lines send none).
            .env("VRAMGATE_CONFIG", self.home.path().join("no-such-config.toml"))
            .env("VRAMGATE_TOKEN", "the-users-own-token")
            .env_remove("VRAMGATE_LOG");
        command
    }

    /// Panics if anything was left in HOME, the state dir or TMPDIR.
    fn assert_untouched(&self) {
        for (what, dir) in
            [("HOME", self.home.path()), ("XDG_STATE_HOME", self.state.path()), ("TMPDIR", self.tmp.path())]
        {
            let left: Vec<PathBuf> =
                std::fs::read_dir(dir).expect("read dir").map(|e| e.expect("entry").path()).collect();
            assert!(left.is_empty(), "the demo left {left:?} in {what}");
        }
    }
}

/// A running `serve --demo`, with its stdout read line by line on a thread.
struct DemoDaemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr_path: PathBuf,
}

impl DemoDaemon {
    fn start(sandbox: &Sandbox, listen: &str, log_dir: &Path) -> DemoDaemon {
        let stderr_path = log_dir.join("demo-stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut child = sandbox
            .command(common::bin())
            .args(["serve", "--demo", "--listen", listen])
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn vramgate serve --demo");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        DemoDaemon { child, lines, stderr_path }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Stdout lines up to and including the one that starts with `last`.
    fn read_until(&self, last: &str, deadline: Duration) -> Vec<String> {
        let end = Instant::now() + deadline;
        let mut lines = Vec::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let done = line.starts_with(last);
                    lines.push(line);
                    if done {
                        return lines;
                    }
                }
                Err(_) => panic!(
                    "no line starting with {last:?} within {deadline:?}; got {lines:#?}\nstderr:\n{}",
                    self.log()
                ),
            }
        }
    }

    fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        common::wait_child(&mut self.child, deadline)
    }
}

impl Drop for DemoDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a shell line printed.
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `line` with `bash -c`, exactly as a user pasting it would, with a deadline.
fn run_line(sandbox: &Sandbox, url: &str, line: &str, deadline: Duration) -> Ran {
    let mut child = sandbox
        .command("bash")
        .args(["-c", line])
        // Had the printed line no `--url`, this would still keep it off the user's daemon.
        .env("VRAMGATE_URL", url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bash");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let status = common::wait_child(&mut child, deadline).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("{line:?} did not finish within {deadline:?}")
    });
    Ran { status, stdout: out.join().expect("stdout thread"), stderr: err.join().expect("stderr thread") }
}

fn have_curl() -> bool {
    Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a printed curl line: with curl itself when there is one, else the same POST through
/// reqwest (its URL and its `-d '...'` body taken from the line), so the test still checks what
/// the line asks for.
async fn run_curl_line(sandbox: &Sandbox, url: &str, line: &str) -> Value {
    let text = if have_curl() {
        let ran = run_line(sandbox, url, line, Duration::from_secs(20));
        assert!(ran.status.success(), "{line:?} failed: {}\n{}", ran.status, ran.stderr);
        ran.stdout
    } else {
        let target = line.split_whitespace().find(|w| w.starts_with("http://")).expect("a URL in the curl line");
        let body = line.split_once(" -d '").and_then(|(_, rest)| rest.strip_suffix('\'')).expect("a -d '...' body");
        common::http::client()
            .post(target)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("POST")
            .text()
            .await
            .expect("body")
    };
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{line:?} answered {text:?}, not JSON: {e}"))
}

async fn status(url: &str) -> Value {
    common::http::get(format!("{url}/vramgate/status")).await.expect("GET status").json().await.expect("status JSON")
}

/// Polls status until `check` holds; panics with the last status after `deadline`.
async fn wait_for_status(url: &str, what: &str, deadline: Duration, check: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + deadline;
    loop {
        let status = status(url).await;
        if check(&status) {
            return status;
        }
        assert!(Instant::now() < end, "no {what} within {deadline:?}; last status: {status:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Each model's state, from a status document.
fn states(status: &Value) -> Vec<(String, String)> {
    status["models"]
        .as_array()
        .expect("models")
        .iter()
        .map(|m| (m["id"].as_str().unwrap_or("").to_owned(), m["state"].as_str().unwrap_or("").to_owned()))
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
}

/// The daemon's event stream, opened before something happens so that nothing is missed.
struct Events(
    std::pin::Pin<
        Box<
            dyn futures_util::Stream<
                    Item = Result<eventsource_stream::Event, eventsource_stream::EventStreamError<reqwest::Error>>,
                >,
        >,
    >,
);

impl Events {
    async fn open(url: &str) -> Events {
        let response = common::http::get(format!("{url}/vramgate/events")).await.expect("GET events");
        assert!(response.status().is_success());
        Events(Box::pin(eventsource_stream::EventStream::new(response.bytes_stream())))
    }

    /// Waits for an event matching `check`, returning every event seen up to it.
    async fn until(&mut self, what: &str, deadline: Duration, check: impl Fn(&Value) -> bool) -> Vec<Value> {
        let end = tokio::time::Instant::now() + deadline;
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout_at(end, self.0.next()).await {
                Ok(Some(Ok(event))) => {
                    let value: Value = serde_json::from_str(&event.data).expect("event JSON");
                    let done = check(&value);
                    seen.push(value);
                    if done {
                        return seen;
                    }
                }
                other => panic!("no {what} within {deadline:?} ({:?}); events: {seen:#?}", other.map(|o| o.is_some())),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_printed_lines_work_as_printed_and_the_demo_leaves_nothing_behind() {
    let sandbox = Sandbox::new();
    let logs = tempfile::tempdir().expect("log dir");
    let mut demo = DemoDaemon::start(&sandbox, "127.0.0.1:0", logs.path());
    let printed = demo.read_until("Ctrl-C stops the demo", Duration::from_secs(20));

    // The listening line comes first, as for any `serve`; scripts parse it.
    let url = printed[0]
        .strip_prefix(&format!("vramgate {} listening on ", env!("CARGO_PKG_VERSION")))
        .unwrap_or_else(|| panic!("first line: {:?}", printed[0]))
        .to_owned();
    let temp_dir = PathBuf::from(
        printed
            .last()
            .and_then(|l| l.strip_prefix("Ctrl-C stops the demo and removes "))
            .and_then(|l| l.strip_suffix('.'))
            .expect("the temp dir in the last line"),
    );
    assert!(temp_dir.starts_with(sandbox.tmp.path()) && temp_dir.is_dir(), "{temp_dir:?}");
    let config = printed.iter().find_map(|l| l.strip_prefix("Config: ")).expect("the config's path");
    assert_eq!(Path::new(config), temp_dir.join("vramgate.toml"));

    // The three lines to try: curl, the CLI (by its full path: it is not on PATH here), curl.
    let commands: Vec<&String> =
        printed.iter().filter(|l| l.starts_with("curl ") || l.starts_with(&format!("{} ", common::bin()))).collect();
    let [chat, load, vision] = commands[..] else { panic!("expected three command lines, got {commands:#?}") };
    assert!(chat.contains(&url) && vision.contains(&url), "{chat}\n{vision}");
    assert_eq!(*load, format!("{} load stt --url {url}", common::bin()));

    // 1. A chat with llm loads it and gets the canned answer.
    let answer = run_curl_line(&sandbox, &url, chat).await;
    let content = answer["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    assert!(content.contains("vramgate's demo model `llm`"), "{answer}");
    assert_eq!(states(&status(&url).await), pairs(&[("llm", "ready"), ("stt", "unloaded"), ("vision", "unloaded")]));

    // 2. Loading stt fills the GPU: desktop + llm + stt is all the usable memory.
    let ran = run_line(&sandbox, &url, load, Duration::from_secs(20));
    assert!(ran.status.success(), "{load:?}: {}\n{}", ran.status, ran.stderr);
    assert!(ran.stdout.starts_with("stt ready on GPU 0"), "{}", ran.stdout);
    assert_eq!(states(&status(&url).await), pairs(&[("llm", "ready"), ("stt", "ready"), ("vision", "unloaded")]));
    // The device's reading catches up with the claims within a sample or two.
    let full =
        wait_for_status(&url, "a full GPU", Duration::from_secs(5), |s| s["devices"][0]["used_mib"] == 8192 - 512)
            .await;
    let device = &full["devices"][0];
    assert_eq!(
        (&device["name"], &device["total_mib"]),
        (&json!("Demo GPU (simulated 8 GiB)"), &json!(8192)),
        "{device}"
    );

    // 3. vision evicts llm (stt outranks it), and answers.
    let mut events = Events::open(&url).await;
    let answer = run_curl_line(&sandbox, &url, vision).await;
    let content = answer["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    assert!(content.contains("vramgate's demo model `vision`"), "{answer}");
    let seen = events
        .until("llm's eviction", Duration::from_secs(5), |e| {
            e["type"] == "model_state" && e["model"] == "llm" && e["to"] == "unloading"
        })
        .await;
    let eviction = seen.last().expect("an event");
    assert_eq!(eviction["reason"], "evicted_for:vision", "{eviction}");
    assert!(!seen.iter().any(|e| e["model"] == "stt" && e["to"] == "unloading"), "{seen:#?}");
    assert_eq!(states(&status(&url).await), pairs(&[("llm", "unloaded"), ("stt", "ready"), ("vision", "ready")]));

    // The demo models answer the other kinds of request too: a streamed chat, embeddings and a
    // transcription (multipart), all from models that are loaded, so nothing moves.
    let client = common::http::client();
    let response = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": "vision", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .expect("streamed chat");
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let body = response.text().await.expect("stream body");
    let streamed: String = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| {
            serde_json::from_str::<Value>(d).expect("chunk JSON")["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert!(streamed.starts_with("This is vramgate's demo model `vision`"), "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    assert_eq!(streamed, content, "the streamed words add up to the whole answer");

    let embedding: Value = client
        .post(format!("{url}/v1/embeddings"))
        .json(&json!({"model": "stt", "input": "hello"}))
        .send()
        .await
        .expect("embeddings")
        .json()
        .await
        .expect("embeddings JSON");
    assert!(embedding["data"][0]["embedding"].as_array().is_some_and(|v| !v.is_empty()), "{embedding}");

    let form = reqwest::multipart::Form::new()
        .text("model", "stt")
        .part("file", reqwest::multipart::Part::bytes(vec![0u8; 4096]).file_name("speech.wav"));
    let transcription: Value = client
        .post(format!("{url}/v1/audio/transcriptions"))
        .multipart(form)
        .send()
        .await
        .expect("transcription")
        .json()
        .await
        .expect("transcription JSON");
    assert!(transcription["text"].as_str().is_some_and(|t| t.contains("demo model `stt`")), "{transcription}");
    assert_eq!(states(&status(&url).await), pairs(&[("llm", "unloaded"), ("stt", "ready"), ("vision", "ready")]));

    // Ctrl-C: the daemon stops its models, exits 0, and the temp dir is gone.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(demo.child.id() as i32), nix::sys::signal::Signal::SIGINT)
        .expect("SIGINT");
    let exit = demo.wait_exit(Duration::from_secs(10)).unwrap_or_else(|| panic!("still running; {}", demo.log()));
    assert!(exit.success(), "{exit}\n{}", demo.log());
    assert!(!temp_dir.exists(), "{temp_dir:?} is still there");
    sandbox.assert_untouched();
}

#[tokio::test]
async fn closing_the_terminal_stops_the_demo_and_removes_its_temp_dir() {
    let sandbox = Sandbox::new();
    let logs = tempfile::tempdir().expect("log dir");
    let mut demo = DemoDaemon::start(&sandbox, "127.0.0.1:0", logs.path());
    let printed = demo.read_until("Ctrl-C stops the demo", Duration::from_secs(20));
    let url = printed[0].split_whitespace().find(|w| w.starts_with("http://")).expect("the URL").to_owned();
    // A model running, so that stopping has work to do.
    let loaded = common::http::client().post(format!("{url}/vramgate/models/stt/load")).send().await.expect("load");
    assert!(loaded.status().is_success(), "{}", loaded.text().await.unwrap_or_default());
    // A closed terminal sends SIGHUP.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(demo.child.id() as i32), nix::sys::signal::Signal::SIGHUP)
        .expect("SIGHUP");
    let exit = demo.wait_exit(Duration::from_secs(10)).unwrap_or_else(|| panic!("still running; {}", demo.log()));
    assert!(exit.success(), "{exit}\n{}", demo.log());
    sandbox.assert_untouched();
}

#[test]
fn a_busy_port_is_the_usual_clear_error_with_a_hint_and_the_temp_dir_goes() {
    let sandbox = Sandbox::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = taken.local_addr().expect("address").to_string();
    // Bounded: a demo that started after all is killed when the deadline passes.
    let output = common::output_within(
        sandbox.command(common::bin()).args(["serve", "--demo", "--listen", &address]),
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("vramgate: cannot listen on {address}")), "{stderr}");
    assert!(stderr.contains("--listen 127.0.0.1:0"), "{stderr}");
    assert!(output.stdout.is_empty(), "{}", String::from_utf8_lossy(&output.stdout));
    sandbox.assert_untouched();
}

#[test]
fn demo_conflicts_with_an_explicit_config_and_the_demo_model_command_is_hidden() {
    let sandbox = Sandbox::new();
    // hermetic: refused by argument parsing (exit 2) before anything starts
    let output = common::output(sandbox.command(common::bin()).args(["serve", "--demo", "--config", "x.toml"]));
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("'--demo' cannot be used with '--config"));

    let help = common::output(sandbox.command(common::bin()).arg("--help"));
    let help = String::from_utf8_lossy(&help.stdout);
    // hermetic: a subcommand name looked for in the help text
    assert!(help.contains("serve") && !help.contains("demo-model"), "{help}");
    let serve_help = common::output(sandbox.command(common::bin()).args(["serve", "--help"]));
    assert!(String::from_utf8_lossy(&serve_help.stdout).contains("--demo"));
    sandbox.assert_untouched();
}
