//! End-to-end: how vramgate describes its models to Ollama and OpenAI clients: `/api/show`
//! (from the weights file's GGUF header for a process model, passed through for a model inside
//! Ollama, Ollama's 404 string for an unknown one), the real `modified_at`/`created` and
//! `details` of `/api/tags` and `/v1/models`, `GET /v1/models/{id}`, and the model-file calls
//! (`/api/pull`, ...) that vramgate answers with what to do instead.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::ollama::FakeOllama;
use common::{Daemon, sim_config};
use serde_json::{Value, json};

/// The weights file's modification time the tests set: 2021-06-01T12:00:00Z.
const WEIGHTS_MTIME: u64 = 1_622_548_800;

/// A GGUF file's header, written as llama.cpp writes it (version 3, little-endian): these
/// metadata entries, then two tensor infos (which a reader sums when no parameter count is
/// declared). No tensor data: the header is all vramgate reads.
struct Gguf {
    entries: Vec<u8>,
    count: u64,
}

impl Gguf {
    fn new() -> Gguf {
        Gguf { entries: Vec::new(), count: 0 }
    }

    fn key(&mut self, key: &str, kind: u32) {
        self.entries.extend(string(key));
        self.entries.extend(kind.to_le_bytes());
        self.count += 1;
    }

    fn text(mut self, key: &str, value: &str) -> Gguf {
        self.key(key, 8);
        self.entries.extend(string(value));
        self
    }

    fn u32(mut self, key: &str, value: u32) -> Gguf {
        self.key(key, 4);
        self.entries.extend(value.to_le_bytes());
        self
    }

    fn u64(mut self, key: &str, value: u64) -> Gguf {
        self.key(key, 10);
        self.entries.extend(value.to_le_bytes());
        self
    }

    /// A vocabulary (an array of strings), which a reader must skip.
    fn tokens(mut self, tokens: &[&str]) -> Gguf {
        self.key("tokenizer.ggml.tokens", 9);
        self.entries.extend(8u32.to_le_bytes());
        self.entries.extend((tokens.len() as u64).to_le_bytes());
        for token in tokens {
            self.entries.extend(string(token));
        }
        self
    }

    fn write(&self, path: &Path) {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(2u64.to_le_bytes());
        out.extend(self.count.to_le_bytes());
        out.extend(&self.entries);
        for (name, dims) in [("token_embd.weight", [64u64, 300]), ("output.weight", [64, 300])] {
            out.extend(string(name));
            out.extend(2u32.to_le_bytes());
            for dim in dims {
                out.extend(dim.to_le_bytes());
            }
            out.extend(0u32.to_le_bytes());
            out.extend(0u64.to_le_bytes());
        }
        std::fs::write(path, out).expect("write the GGUF file");
        let file = std::fs::File::options().write(true).open(path).expect("open the GGUF file");
        file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(WEIGHTS_MTIME)).expect("set its mtime");
    }
}

fn string(text: &str) -> Vec<u8> {
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text.as_bytes());
    out
}

/// A tiny llama-architecture header: Q4_K_M (file type 15), 4096 tokens of context.
fn tiny_llama() -> Gguf {
    Gguf::new()
        .text("general.architecture", "llama")
        .text("general.name", "tiny")
        .tokens(&["<s>", "</s>", "hello"])
        .u32("general.file_type", 15)
        .u32("llama.context_length", 4096)
        .u64("llama.embedding_length", 64)
}

/// A process model whose command names `weights` the way llama-server is given it (`-m`); the
/// program is the fake model server, which these tests never start (describing a model does not
/// load it).
fn process_model(name: &str, weights: &Path, flags: &str) -> String {
    format!(
        "[models.{name}]\nbackend = \"process\"\nvram = 100\ncmd = [\"{}\", \"--port\", \"${{PORT}}\", \"-m\", \"{}\"{flags}]\n",
        common::fake(),
        weights.display()
    )
}

fn start(models: &str) -> Daemon {
    let models = models.to_string();
    Daemon::start(move |sim| format!("{}\n{models}", sim_config(sim, 10000, "50ms", "reserve_mib = 0")))
}

async fn post(daemon: &Daemon, path: &str, body: Value) -> (u16, Value) {
    let response = common::http::client().post(format!("{}{path}", daemon.url)).json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON answer"))
}

async fn get(daemon: &Daemon, path: &str) -> (u16, Value) {
    let response = common::http::get(format!("{}{path}", daemon.url)).await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON answer"))
}

fn weights_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tiny-q4_k_m.gguf");
    (dir, path)
}

#[tokio::test]
async fn show_describes_a_process_model_from_its_gguf_header() {
    let (_dir, weights) = weights_dir();
    tiny_llama().write(&weights);
    let daemon =
        start(&format!("{}aliases = [\"chat\"]\n", process_model("tiny", &weights, ", \"--embeddings\", \"--jinja\"")));
    let expected_at = "2021-06-01T12:00:00Z";
    for body in [json!({ "model": "tiny" }), json!({ "name": "tiny" }), json!({ "model": "chat" })] {
        let (status, show) = post(&daemon, "/api/show", body.clone()).await;
        assert_eq!(status, 200, "{body}: {show}");
        let details = &show["details"];
        assert_eq!(details["format"], "gguf", "{show}");
        assert_eq!(details["family"], "llama", "{show}");
        assert_eq!(details["families"], json!(["llama"]), "{show}");
        assert_eq!(details["quantization_level"], "Q4_K_M", "{show}");
        // Two 64 x 300 tensors, no declared count: 38400 parameters.
        assert_eq!(details["parameter_size"], "38K", "{show}");
        let info = &show["model_info"];
        assert_eq!(info["general.architecture"], "llama", "{show}");
        assert_eq!(info["general.name"], "tiny", "{show}");
        assert_eq!(info["general.file_type"], 15, "{show}");
        assert_eq!(info["general.parameter_count"], 38400, "{show}");
        assert_eq!(info["llama.context_length"], 4096, "{show}");
        assert_eq!(show["capabilities"], json!(["completion", "embedding", "tools"]), "{show}");
        assert_eq!(show["modified_at"], expected_at, "{show}");
    }
    // Describing it did not load it.
    assert_eq!(daemon.model("tiny").await["state"], "unloaded");

    let (_, tags) = get(&daemon, "/api/tags").await;
    let entries = tags["models"].as_array().expect("models");
    for name in ["tiny", "chat"] {
        let entry = entries.iter().find(|m| m["name"] == name).unwrap_or_else(|| panic!("no {name} in {tags}"));
        assert_eq!(entry["modified_at"], expected_at, "{entry}");
        assert_eq!(entry["details"]["format"], "gguf", "{entry}");
        assert_eq!(entry["details"]["family"], "llama", "{entry}");
        assert_eq!(entry["details"]["quantization_level"], "Q4_K_M", "{entry}");
    }
    let (_, models) = get(&daemon, "/v1/models").await;
    for entry in models["data"].as_array().expect("data") {
        assert_eq!(entry["created"], WEIGHTS_MTIME, "{entry}");
    }
}

#[tokio::test]
async fn a_header_declared_parameter_count_wins_and_a_weights_file_without_gguf_in_its_name_is_still_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weights = dir.path().join("weights.bin");
    tiny_llama().u64("general.parameter_count", 1_240_000_000).write(&weights);
    let daemon = start(&process_model("big", &weights, ""));
    let (status, show) = post(&daemon, "/api/show", json!({ "model": "big" })).await;
    assert_eq!(status, 200, "{show}");
    assert_eq!(show["details"]["format"], "gguf", "{show}");
    assert_eq!(show["details"]["parameter_size"], "1.2B", "{show}");
    assert_eq!(show["model_info"]["general.parameter_count"], 1_240_000_000u64, "{show}");
    assert_eq!(show["capabilities"], json!(["completion"]), "{show}");
}

#[tokio::test]
async fn a_damaged_weights_file_is_described_without_its_header_and_the_reason_is_logged() {
    let (_dir, weights) = weights_dir();
    // A header cut inside its first key, and then a file that is not GGUF at all.
    let mut cut = b"GGUF".to_vec();
    cut.extend(3u32.to_le_bytes());
    cut.extend(0u64.to_le_bytes());
    cut.extend(1u64.to_le_bytes());
    cut.extend(u64::MAX.to_le_bytes());
    std::fs::write(&weights, cut).expect("write");
    let other = weights.with_file_name("other.gguf");
    std::fs::write(&other, b"PK\x03\x04 a zip file").expect("write");
    let daemon = start(&format!("{}{}", process_model("cut", &weights, ""), process_model("zip", &other, "")));
    for (name, reason) in [("cut", "at most 65535 are accepted"), ("zip", "not a GGUF file")] {
        let (status, show) = post(&daemon, "/api/show", json!({ "model": name })).await;
        assert_eq!(status, 200, "{show}");
        // Named .gguf: the format is known; what the header would say is not.
        assert_eq!(show["details"]["format"], "gguf", "{show}");
        assert_eq!(show["details"]["family"], "", "{show}");
        assert_eq!(show["model_info"], json!({}), "{show}");
        assert!(daemon.log().contains(reason), "no {reason:?} in the log:\n{}", daemon.log());
    }
}

#[tokio::test]
async fn without_a_weights_file_the_times_are_the_config_files() {
    let daemon = start(&process_model("gone", Path::new("/nonexistent/model.gguf"), ""));
    let config_mtime = std::fs::metadata(daemon.dir.path().join("vramgate.toml")).unwrap().modified().unwrap();
    let config_secs = config_mtime.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let (_, models) = get(&daemon, "/v1/models").await;
    assert_eq!(models["data"][0]["created"], config_secs, "{models}");
    let (_, show) = post(&daemon, "/api/show", json!({ "model": "gone" })).await;
    let shown = chrono::DateTime::parse_from_rfc3339(show["modified_at"].as_str().expect("modified_at")).unwrap();
    // To the nanosecond: the daemon's start (the last resort) is within the same second.
    assert_eq!(shown, chrono::DateTime::<chrono::Utc>::from(config_mtime), "{show}");
    assert_eq!(show["details"]["format"], "gguf", "the command names a .gguf file: {show}");
}

#[tokio::test]
async fn show_of_an_unknown_model_is_ollamas_404_with_a_string_error() {
    let daemon = start(&process_model("tiny", Path::new("/nonexistent/model.gguf"), ""));
    let (status, answer) = post(&daemon, "/api/show", json!({ "model": "nope" })).await;
    assert_eq!(status, 404);
    assert_eq!(answer, json!({ "error": "model 'nope' not found" }));
    let (status, answer) = post(&daemon, "/api/show", json!({})).await;
    assert_eq!(status, 400);
    assert!(answer["error"].as_str().is_some_and(|e| e.contains("model is required")), "{answer}");
    // Ollama clients may add the default tag.
    let (status, answer) = post(&daemon, "/api/show", json!({ "model": "tiny:latest" })).await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test]
async fn show_for_an_ollama_model_is_answered_by_its_ollama_without_loading_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sim = Daemon::sim_dir_for(&dir);
    std::fs::create_dir_all(&sim).expect("sim dir");
    let ollama = FakeOllama::start(&sim);
    let url = ollama.url.clone();
    let daemon = Daemon::start(move |sim_dir| {
        format!(
            "{}\n[models.llama]\nbackend = \"ollama\"\nollama_model = \"llama3.2:3b\"\nurl = \"{url}\"\n",
            sim_config(sim_dir, 10000, "50ms", "reserve_mib = 0")
        )
    });
    let (status, show) = post(&daemon, "/api/show", json!({ "model": "llama", "verbose": true })).await;
    assert_eq!(status, 200, "{show}");
    // The fake Ollama's own answer, asked under Ollama's name of the model.
    assert_eq!(show["modelfile"], "FROM llama3.2:3b\n", "{show}");
    assert_eq!(show["model_info"]["general.architecture"], "fake", "{show}");
    assert_eq!(daemon.model("llama").await["state"], "unloaded");
}

#[tokio::test]
async fn model_file_calls_say_that_vramgate_does_not_manage_model_files() {
    let daemon = start(&process_model("tiny", Path::new("/nonexistent/model.gguf"), ""));
    for (method, path, says) in [
        ("POST", "/api/pull", "does not download models"),
        ("POST", "/api/push", "does not upload models"),
        ("POST", "/api/create", "does not create models"),
        ("POST", "/api/copy", "does not copy models"),
        ("DELETE", "/api/delete", "does not delete models"),
    ] {
        let response = common::http::client()
            .request(method.parse().unwrap(), format!("{}{path}", daemon.url))
            .json(&json!({ "model": "tiny", "source": "tiny", "destination": "t2" }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 501, "{path}");
        let answer: Value = response.json().await.expect("JSON");
        let message = answer["error"].as_str().unwrap_or_else(|| panic!("{path}: not a string error: {answer}"));
        assert!(message.contains(says), "{path}: {message}");
    }
}

#[tokio::test]
async fn v1_models_id_answers_the_model_object_or_openais_404() {
    let (_dir, weights) = weights_dir();
    tiny_llama().write(&weights);
    let daemon = start(&format!("{}aliases = [\"chat\"]\n", process_model("tiny", &weights, "")));
    for id in ["tiny", "chat"] {
        let (status, model) = get(&daemon, &format!("/v1/models/{id}")).await;
        assert_eq!(status, 200, "{model}");
        assert_eq!(model["id"], id);
        assert_eq!(model["object"], "model");
        assert_eq!(model["created"], WEIGHTS_MTIME);
        assert_eq!(model["owned_by"], "vramgate");
    }
    let (status, answer) = get(&daemon, "/v1/models/org/none").await;
    assert_eq!(status, 404, "{answer}");
    assert_eq!(answer["error"]["code"], "model_not_found", "{answer}");
    assert!(answer["error"]["message"].as_str().is_some_and(|m| m.contains("'org/none' does not exist")), "{answer}");
}

/// A process model that runs (the fake model server, named llama-server's way: `-m WEIGHTS`),
/// with more fake-server flags in `flags` (llama-server's `-c`, the fake's `--props-*`).
fn running_model(sim: &Path, name: &str, weights: &Path, flags: &str) -> String {
    common::fake_model(sim, name, 100, &format!("-m {} {flags}", weights.display()), "")
}

/// A daemon whose models are made by `models` (given the sim dir), with `[proxy]` keys `proxy`.
fn start_running(proxy: &str, models: impl FnOnce(&Path) -> String) -> Daemon {
    Daemon::start(move |sim| {
        format!("{}\n[proxy]\n{proxy}\n{}", sim_config(sim, 10000, "50ms", "reserve_mib = 0"), models(sim))
    })
}

/// Loads `name` and waits until it is ready.
async fn load(daemon: &Daemon, name: &str) {
    let (status, body) = daemon.load(name).await;
    assert_eq!(status, 200, "load {name}: {body}\n{}", daemon.log());
    daemon.wait_model_state(name, "ready", Duration::from_secs(10)).await;
}

/// `/api/show` of `name`, which must answer 200 within `deadline`.
async fn show_within(daemon: &Daemon, name: &str, deadline: Duration) -> Value {
    let asked = post(daemon, "/api/show", json!({ "model": name }));
    let (status, show) = tokio::time::timeout(deadline, asked)
        .await
        .unwrap_or_else(|_| panic!("/api/show of {name} did not answer within {deadline:?}"));
    assert_eq!(status, 200, "{show}");
    show
}

/// The `num_ctx` of a show answer's `parameters` (Ollama's `name   value` lines).
fn num_ctx(show: &Value) -> Option<u64> {
    let parameters = show["parameters"].as_str().expect("parameters is a string");
    let mut values = parameters.lines().filter_map(|line| match line.split_whitespace().collect::<Vec<_>>()[..] {
        ["num_ctx", value] => Some(value.parse().expect("num_ctx is a number")),
        _ => None,
    });
    let value = values.next();
    assert_eq!(values.next(), None, "one num_ctx line: {parameters:?}");
    value
}

#[tokio::test]
async fn a_running_models_context_size_comes_from_its_servers_props() {
    let (_dir, weights) = weights_dir();
    tiny_llama().write(&weights);
    let daemon = start_running("", |sim| running_model(sim, "tiny", &weights, "-c 8192 --props-n-ctx 2048"));
    // Not running: the command's -c is all there is.
    let show = show_within(&daemon, "tiny", Duration::from_secs(5)).await;
    assert_eq!(num_ctx(&show), Some(8192), "{show}");
    assert_eq!(show["model_info"]["llama.context_length"], 4096, "{show}");

    load(&daemon, "tiny").await;
    let show = show_within(&daemon, "tiny", Duration::from_secs(5)).await;
    // The server's own figure wins; model_info keeps the trained length, as Ollama's does.
    assert_eq!(num_ctx(&show), Some(2048), "{show}");
    assert_eq!(show["model_info"]["llama.context_length"], 4096, "{show}");
    assert_eq!(show["capabilities"], json!(["completion"]), "{show}");
    assert_eq!(show["details"]["family"], "llama", "{show}");
}

#[tokio::test]
async fn a_server_without_props_leaves_the_ctx_size_flag() {
    let (_dir, weights) = weights_dir();
    tiny_llama().write(&weights);
    let daemon = start_running("", |sim| {
        format!(
            "{}{}",
            running_model(sim, "flagged", &weights, "--ctx-size 8192"),
            running_model(sim, "plain", &weights, "")
        )
    });
    load(&daemon, "flagged").await;
    load(&daemon, "plain").await;
    // The fake answers /props with 404, as a server that is not llama-server does.
    let show = show_within(&daemon, "flagged", Duration::from_secs(1)).await;
    assert_eq!(num_ctx(&show), Some(8192), "{show}");
    assert_eq!(show["model_info"]["llama.context_length"], 4096, "{show}");
    let show = show_within(&daemon, "plain", Duration::from_secs(1)).await;
    assert_eq!(show["parameters"], "", "{show}");
    assert_eq!(show["model_info"]["llama.context_length"], 4096, "{show}");
    let log = daemon.log();
    assert!(log.contains("no /props from") && log.contains("status 404"), "the missing /props is logged:\n{log}");
}

#[tokio::test]
async fn props_that_are_not_json_or_never_come_leave_the_flag_and_show_answers_promptly() {
    let (_dir, weights) = weights_dir();
    tiny_llama().write(&weights);
    // A short first-byte timeout bounds the wait for /props below its own 2 s.
    let daemon = start_running("first_byte_timeout = \"300ms\"", |sim| {
        format!(
            "{}{}",
            running_model(sim, "garbled", &weights, "-c 8192 --props-garbage"),
            running_model(sim, "hung", &weights, "-c 4096 --props-hang")
        )
    });
    load(&daemon, "garbled").await;
    load(&daemon, "hung").await;
    let show = show_within(&daemon, "garbled", Duration::from_secs(1)).await;
    assert_eq!(num_ctx(&show), Some(8192), "{show}");
    assert_eq!(show["capabilities"], json!(["completion"]), "{show}");
    let show = show_within(&daemon, "hung", Duration::from_millis(1500)).await;
    assert_eq!(num_ctx(&show), Some(4096), "{show}");
    assert_eq!(show["details"]["family"], "llama", "{show}");
    let log = daemon.log();
    assert!(log.contains("not JSON"), "the garbled /props is logged:\n{log}");
    assert!(log.contains("no answer within"), "the hung /props is logged:\n{log}");
}

#[tokio::test]
async fn a_server_that_takes_images_has_the_vision_capability() {
    let (_dir, weights) = weights_dir();
    tiny_llama().write(&weights);
    let daemon = start_running("", |sim| running_model(sim, "seer", &weights, "--props-vision --props-n-ctx 1024"));
    let show = show_within(&daemon, "seer", Duration::from_secs(5)).await;
    assert_eq!(show["capabilities"], json!(["completion"]), "not running, the flags tell no vision: {show}");
    load(&daemon, "seer").await;
    let show = show_within(&daemon, "seer", Duration::from_secs(5)).await;
    assert_eq!(show["capabilities"], json!(["completion", "vision"]), "{show}");
    assert_eq!(num_ctx(&show), Some(1024), "{show}");
}
