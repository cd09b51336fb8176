//! The README's quick start, run as written, so it cannot rot: its "Try it" blocks start the demo
//! and take the tour against it, checking that each line does what the README says.
//!
//! Three substitutions keep the test hermetic and fast, and nothing else is changed:
//! `cargo run --release --` becomes the binary `cargo test` built (the same code, without a second
//! release build), `serve --demo` also gets `--listen 127.0.0.1:0` (never the default port a
//! user's daemon may hold), and the tour's `localhost:9777` becomes the address the demo printed.
//! `cargo install --path .` is stood in for by putting that binary's directory first on `PATH`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The shell blocks of the README section whose heading starts with `heading`.
fn shell_blocks(readme: &str, heading: &str) -> Vec<String> {
    let mut section = String::new();
    let mut in_section = false;
    for line in readme.lines() {
        if line.starts_with("## ") {
            in_section = line.starts_with(heading);
        } else if in_section {
            section.push_str(line);
            section.push('\n');
        }
    }
    common::fenced_blocks(&section, "sh")
}

/// The demo, started from the README's command; stopped with SIGINT by the test, killed if the
/// test fails first.
struct Demo {
    child: Child,
    lines: mpsc::Receiver<String>,
    url: String,
    printed: Vec<String>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_demo(command: &str, bin_dir: &Path) -> Demo {
    let binary = common::bin();
    let command =
        command.replace("cargo run --release --", binary).replace("serve --demo", "serve --demo --listen 127.0.0.1:0");
    let mut shell = std::process::Command::new("bash");
    common::isolate(&mut shell);
    let mut child = shell
        .args(["-c", &format!("exec {command}")])
        .env("PATH", path_with(bin_dir))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the demo");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = lines.recv_timeout(Duration::from_secs(30)).expect("the demo prints its listening line");
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {first:?}"))
        .to_string();
    let mut demo = Demo { child, lines, url, printed: vec![first] };
    // What to try next follows at once; collect it until the stream goes quiet.
    while let Ok(line) = demo.lines.recv_timeout(Duration::from_millis(500)) {
        demo.printed.push(line);
    }
    demo
}

fn path_with(dir: &Path) -> String {
    format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default())
}

/// Runs one line of the tour as the README has it, against the demo at `url`; its stdout.
fn run_line(line: &str, url: &str, bin_dir: &Path) -> String {
    let address = url.trim_start_matches("http://");
    let line = line.replace("localhost:9777", address).replace("127.0.0.1:9777", address);
    let mut shell = std::process::Command::new("bash");
    common::isolate(&mut shell);
    let output = common::output(
        shell
            .args(["-euo", "pipefail", "-c", &line])
            .env("PATH", path_with(bin_dir))
            .env("VRAMGATE_URL", url)
            .stdin(Stdio::null()),
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "README line failed ({}): {line}\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

async fn status(url: &str) -> Value {
    common::http::get(format!("{url}/vramgate/status")).await.expect("GET status").json().await.expect("status JSON")
}

fn state_of<'a>(status: &'a Value, id: &str) -> &'a str {
    status["models"]
        .as_array()
        .and_then(|models| models.iter().find(|m| m["id"] == id))
        .and_then(|m| m["state"].as_str())
        .unwrap_or("missing")
}

/// The temp dir the demo said it removes on exit.
fn demo_dir(printed: &[String]) -> PathBuf {
    printed
        .iter()
        .filter(|line| line.contains("removes"))
        .flat_map(|line| line.split_whitespace())
        .map(|word| word.trim_matches(|c: char| c == '`' || c == '.' || c == ',' || c == ')' || c == '('))
        .find(|word| word.starts_with('/') && word.contains("vramgate-demo"))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("the demo names its temp dir: {printed:#?}"))
}

#[tokio::test]
async fn the_quick_start_runs_as_written() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).expect("README");
    let blocks = shell_blocks(&readme, "## Try it");
    assert_eq!(blocks.len(), 2, "the README's Try it section: the demo command, then the tour");
    let bin_dir = Path::new(common::bin()).parent().expect("the binary's directory").to_path_buf();

    assert!(blocks[0].contains("cargo run --release -- serve --demo"), "{}", blocks[0]);
    let mut demo = start_demo(blocks[0].trim(), &bin_dir);
    let dir = demo_dir(&demo.printed);
    assert!(dir.is_dir(), "the demo's temp dir {} exists while it runs", dir.display());

    let tour: Vec<&str> = blocks[1].lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(tour.len(), 5, "a five-line tour: {tour:#?}");

    // 1. A chat request starts `llm` on demand and gets its answer.
    let answer = run_line(tour[0], &demo.url, &bin_dir);
    let answer: Value = serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer}"));
    assert!(answer["choices"][0]["message"]["content"].as_str().is_some_and(|c| !c.is_empty()), "{answer}");
    assert_eq!(state_of(&status(&demo.url).await, "llm"), "ready");

    // 2. `vramgate load stt` fills the GPU beside it.
    let loaded = run_line(tour[1], &demo.url, &bin_dir);
    assert!(loaded.contains("stt") && loaded.contains("ready"), "{loaded}");
    let now = status(&demo.url).await;
    assert_eq!((state_of(&now, "llm"), state_of(&now, "stt")), ("ready", "ready"), "{now:#}");

    // 3. The vision request evicts the idle `llm` (not `stt`) and is answered.
    let answer = run_line(tour[2], &demo.url, &bin_dir);
    assert!(answer.contains("choices"), "{answer}");
    let now = status(&demo.url).await;
    assert_eq!(
        (state_of(&now, "vision"), state_of(&now, "stt"), state_of(&now, "llm")),
        ("ready", "ready", "unloaded"),
        "{now:#}"
    );

    // 4. `vramgate status` shows it, with the eviction's reason.
    let table = run_line(tour[3], &demo.url, &bin_dir);
    for word in ["vision", "stt", "ready", "llm: unloaded: evicted for vision"] {
        assert!(table.contains(word), "status lacks {word:?}: {table}");
    }

    // 5. A job holds a lease for as long as its command runs, with its GPU in the environment.
    let job = run_line(tour[4], &demo.url, &bin_dir);
    assert!(job.contains("GPU 0 is mine: 1024 MiB"), "{job}");
    let now = status(&demo.url).await;
    assert_eq!(now["leases"].as_array().map(Vec::len), Some(0), "the lease ends with its command: {now:#}");

    // Ctrl-C stops the demo, its models, and removes its temp dir.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(demo.child.id() as i32), nix::sys::signal::Signal::SIGINT)
        .expect("SIGINT");
    let status = common::wait_child(&mut demo.child, Duration::from_secs(15)).expect("the demo stops on Ctrl-C");
    assert!(status.success(), "{status}");
    let end = Instant::now() + Duration::from_secs(5);
    while dir.exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!dir.exists(), "the demo's temp dir {} is removed on exit", dir.display());
}
