//! End-to-end: the Ollama-compatible surface (`/api/...`) in front of fake OpenAI-speaking model
//! servers on the sim device: requests are translated, streamed answers become NDJSON; an error
//! status from an Ollama model's server is passed on if it is a 4xx and becomes 502 otherwise.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::ollama::FakeOllama;
use common::stand_in::{Reply, StandIn};
use common::{Daemon, fake_model, sim_config};
use futures_util::StreamExt;
use serde_json::{Value, json};

const SECOND: Duration = Duration::from_secs(1);

fn start(models: impl Fn(&std::path::Path) -> String, extra: &str) -> Daemon {
    Daemon::start(|sim| format!("{}{extra}\n{}", sim_config(sim, 10000, "50ms", "reserve_mib = 0"), models(sim)))
}

async fn post(daemon: &Daemon, path: &str, body: Value) -> reqwest::Response {
    common::http::client().post(format!("{}{path}", daemon.url)).json(&body).send().await.unwrap()
}

async fn get(daemon: &Daemon, path: &str) -> Value {
    let response = common::http::get(format!("{}{path}", daemon.url)).await.unwrap();
    assert_eq!(response.status(), 200, "GET {path}");
    response.json().await.unwrap()
}

/// Reads an NDJSON answer to its end: each line parsed (a line that does not parse fails the
/// test), with the moment it was complete.
async fn ndjson(response: reqwest::Response) -> Vec<(Instant, Value)> {
    let mut lines = Vec::new();
    let mut pending = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("the stream ended cleanly");
        let arrived = Instant::now();
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let text = String::from_utf8(line).expect("UTF-8");
            let value: Value =
                serde_json::from_str(text.trim_end()).unwrap_or_else(|e| panic!("not a JSON line ({e}): {text:?}"));
            lines.push((arrived, value));
        }
    }
    assert!(pending.iter().all(u8::is_ascii_whitespace), "an unterminated last line: {pending:?}");
    lines
}

/// Checks the NDJSON shape: every line but the last is `done: false`, the last is the one final
/// line; returns the concatenated text of `part` (`message.content` or `response`).
fn check_stream(lines: &[(Instant, Value)], model: &str, text_of: impl Fn(&Value) -> Option<&str>) -> String {
    assert!(lines.len() >= 2, "{lines:?}");
    let (last, body) = lines.split_last().unwrap();
    let mut text = String::new();
    for (_, line) in body {
        assert_eq!(line["done"], false, "{line}");
        assert_eq!(line["model"], model, "{line}");
        assert!(chrono::DateTime::parse_from_rfc3339(line["created_at"].as_str().unwrap()).is_ok(), "{line}");
        text.push_str(text_of(line).unwrap_or_else(|| panic!("no text in {line}")));
    }
    let last = &last.1;
    assert_eq!(last["done"], true, "{last}");
    assert_eq!(last["done_reason"], "stop", "{last}");
    assert_eq!(last["model"], model, "{last}");
    assert!(last["total_duration"].as_u64().unwrap() > 0, "{last}");
    assert!(last["eval_count"].as_u64().unwrap() > 0, "{last}");
    assert_eq!(text_of(last), Some(""), "{last}");
    text
}

#[tokio::test]
async fn a_chat_without_streaming_answers_one_ollama_object() {
    let daemon = start(|sim| fake_model(sim, "a", 1000, "", ""), "");
    let response = post(
        &daemon,
        "/api/chat",
        json!({"model": "a", "messages": [{"role": "user", "content": "hi there"}], "stream": false}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-vramgate-model"], "a");
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["model"], "a");
    assert_eq!(body["message"], json!({"role": "assistant", "content": "hello from a"}));
    assert_eq!((body["done"].clone(), body["done_reason"].clone()), (json!(true), json!("stop")), "{body}");
    assert_eq!((body["prompt_eval_count"].clone(), body["eval_count"].clone()), (json!(2), json!(3)), "{body}");
    assert!(body["total_duration"].as_u64().unwrap() > 0);
    assert!(chrono::DateTime::parse_from_rfc3339(body["created_at"].as_str().unwrap()).is_ok(), "{body}");

    // Ollama clients may add the default tag; the name is echoed as asked.
    let response = post(
        &daemon,
        "/api/chat",
        json!({"model": "a:latest", "messages": [{"role": "user", "content": "x"}], "stream": false}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["model"], "a:latest");
    assert_eq!(body["message"]["content"], "hello from a");
}

#[tokio::test]
async fn a_streamed_chat_is_ndjson_line_by_line_as_tokens_arrive() {
    let daemon = start(|sim| fake_model(sim, "a", 1000, "--token-delay 150ms", ""), "");
    // No `stream` field: Ollama streams by default.
    let response =
        post(&daemon, "/api/chat", json!({"model": "a", "messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("application/x-ndjson"));
    assert_eq!(response.headers()["x-vramgate-model"], "a");
    let lines = ndjson(response).await;
    let text = check_stream(&lines, "a", |l| l["message"]["content"].as_str());
    assert_eq!(text, "tok0 tok1 tok2 tok3 tok4 ");
    assert_eq!(lines.iter().filter(|(_, l)| l["done"] == true).count(), 1);
    for (_, line) in &lines[..lines.len() - 1] {
        assert_eq!(line["message"]["role"], "assistant");
    }
    assert_eq!(lines.last().unwrap().1["eval_count"], 5);
    // Each token became a line when it arrived, not all at the end.
    let content: Vec<Instant> = lines.iter().filter(|(_, l)| l["done"] == false).map(|(at, _)| *at).collect();
    let spread = *content.last().unwrap() - content[0];
    assert!(spread >= Duration::from_millis(400), "the first and last token lines arrived {spread:?} apart: buffered");
}

#[tokio::test]
async fn a_generate_streams_response_lines_and_a_raw_one_goes_to_completions() {
    let daemon = start(|sim| fake_model(sim, "a", 1000, "--token-delay 10ms", ""), "");
    let response =
        post(&daemon, "/api/generate", json!({"model": "a", "prompt": "why is the sky blue", "system": "be brief"}))
            .await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("application/x-ndjson"));
    let lines = ndjson(response).await;
    let text = check_stream(&lines, "a", |l| l["response"].as_str());
    assert_eq!(text, "tok0 tok1 tok2 tok3 tok4 ");

    let response =
        post(&daemon, "/api/generate", json!({"model": "a", "prompt": "once upon", "raw": true, "stream": false}))
            .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!((body["response"].clone(), body["done"].clone()), (json!("hello from a"), json!(true)), "{body}");

    // A templated prompt went to the chat endpoint with its system message; the raw one did not.
    let logs = common::http::get(format!("{}/vramgate/models/a/logs", daemon.url)).await.unwrap().text().await.unwrap();
    let templated = logs.lines().find(|l| l.contains("why is the sky blue")).expect("the prompt reached the model");
    assert!(templated.contains("chat completion request") && templated.contains("be brief"), "{templated}");
    let raw = logs.lines().find(|l| l.contains("once upon")).expect("the raw prompt reached the model");
    assert!(raw.contains("fake-model: completion request"), "{raw}");
}

#[tokio::test]
async fn a_generate_without_prompt_loads_and_with_keep_alive_zero_unloads() {
    let daemon = start(|sim| fake_model(sim, "a", 1000, "", ""), "");
    assert_eq!(daemon.model("a").await["state"], "unloaded");
    let response = post(&daemon, "/api/generate", json!({"model": "a"})).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["model"], "a");
    assert_eq!((body["response"].clone(), body["done"].clone()), (json!(""), json!(true)), "{body}");
    assert_eq!(body["done_reason"], "load");
    let model = daemon.model("a").await;
    assert_eq!((model["state"].clone(), model["in_use"].clone()), (json!("ready"), json!(0)), "{model}");

    let response = post(&daemon, "/api/generate", json!({"model": "a", "keep_alive": 0})).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["done_reason"], "unload", "{body}");
    assert_eq!(daemon.model("a").await["state"], "unloaded");

    // The chat forms: no messages.
    let response = post(&daemon, "/api/chat", json!({"model": "a", "messages": []})).await;
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["done_reason"], "load", "{body}");
    assert_eq!(body["message"], json!({"role": "assistant", "content": ""}));
    assert_eq!(daemon.model("a").await["state"], "ready");
    let response = post(&daemon, "/api/chat", json!({"model": "a", "keep_alive": "0s"})).await;
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["done_reason"], "unload", "{body}");
    assert_eq!(daemon.model("a").await["state"], "unloaded");
}

#[tokio::test]
async fn embed_answers_embeddings() {
    let daemon = start(|sim| fake_model(sim, "a", 1000, "", ""), "");
    let response = post(&daemon, "/api/embed", json!({"model": "a", "input": "hello world"})).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-vramgate-model"], "a");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["model"], "a");
    assert_eq!(body["embeddings"], json!([[0.1, 0.2, 0.3]]), "{body}");
    assert_eq!(body["prompt_eval_count"], 2, "{body}");

    let response = post(&daemon, "/api/embed", json!({"model": "a", "input": ["one", "two"]})).await;
    let body: Value = response.json().await.unwrap();
    assert!(body["embeddings"][0].as_array().is_some_and(|e| e.len() == 3), "{body}");

    // Ollama's older call.
    let response = post(&daemon, "/api/embeddings", json!({"model": "a", "prompt": "hello"})).await;
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({"embedding": [0.1, 0.2, 0.3]}));
}

#[tokio::test]
async fn tags_list_every_model_and_alias() {
    let daemon = start(
        |sim| [fake_model(sim, "a", 1000, "", "aliases = [\"chat\"]"), fake_model(sim, "b", 2000, "", "")].concat(),
        "[aliases]\nany = [\"b\", \"a\"]\n",
    );
    let tags = get(&daemon, "/api/tags").await;
    let models = tags["models"].as_array().unwrap();
    let find = |name: &str| models.iter().find(|m| m["name"] == name).unwrap_or_else(|| panic!("no {name} in {tags}"));
    for (name, mib) in [("a", 1000u64), ("b", 2000), ("chat", 1000), ("any", 2000)] {
        let entry = find(name);
        assert_eq!(entry["model"], name);
        assert_eq!(entry["size"], mib * 1048576, "{entry}");
        assert_eq!(entry["digest"], "");
        // The fake's command names no weights file: no family is known (tests/ollama_show.rs
        // covers one that is).
        assert_eq!(entry["details"]["family"], "", "{entry}");
        assert!(chrono::DateTime::parse_from_rfc3339(entry["modified_at"].as_str().unwrap()).is_ok(), "{entry}");
    }
    assert_eq!(models.len(), 4, "{tags}");
}

#[tokio::test]
async fn ps_lists_ready_models_with_their_vram_and_expiry() {
    let daemon = start(
        |sim| {
            [
                fake_model(sim, "a", 1000, "", ""),
                fake_model(sim, "b", 2000, "", ""),
                fake_model(sim, "forever", 500, "", "ttl = \"0\""),
            ]
            .concat()
        },
        "",
    );
    assert_eq!(get(&daemon, "/api/ps").await, json!({"models": []}));
    assert_eq!(daemon.load("a").await.0, 200);
    assert_eq!(daemon.load("forever").await.0, 200);
    let ps = get(&daemon, "/api/ps").await;
    let models = ps["models"].as_array().unwrap();
    assert_eq!(models.len(), 2, "{ps}");
    assert!(!models.iter().any(|m| m["name"] == "b"), "an unloaded model is not listed: {ps}");
    let a = models.iter().find(|m| m["name"] == "a").unwrap();
    assert_eq!(a["model"], "a");
    assert_eq!((a["size"].clone(), a["size_vram"].clone()), (json!(1000u64 << 20), json!(1000u64 << 20)), "{a}");
    // The default ttl is 10 minutes.
    let expires = chrono::DateTime::parse_from_rfc3339(a["expires_at"].as_str().unwrap()).unwrap();
    let left = expires.signed_duration_since(chrono::Utc::now());
    assert!(left > chrono::Duration::minutes(9) && left <= chrono::Duration::minutes(10), "{a}");
    let forever = models.iter().find(|m| m["name"] == "forever").unwrap();
    assert_eq!(forever["expires_at"], "2318-01-01T00:00:00Z", "{forever}");
    assert_eq!(forever["size_vram"], 500u64 << 20);
}

#[tokio::test]
async fn version_names_an_ollama_version_and_vramgates() {
    let daemon = start(|_| String::new(), "");
    let version = get(&daemon, "/api/version").await;
    assert!(version["version"].as_str().is_some_and(|v| v.split('.').count() == 3), "{version}");
    assert_eq!(version["vramgate"], env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn errors_have_ollamas_shape() {
    let daemon = start(
        |sim| {
            [
                fake_model(sim, "big", 9000, "", "pinned = true"),
                fake_model(sim, "other", 3000, "", ""),
                // Never listens: forwarding to it fails.
                "[models.deaf]\nbackend = \"process\"\ncmd = \"sleep 30\"\nhealth = \"none\"\nvram = 10\n".to_string(),
            ]
            .concat()
        },
        "[scheduler]\nqueue_timeout = \"300ms\"\n",
    );
    daemon.wait_model_state("big", "ready", 10 * SECOND).await;
    let client = common::http::client();
    let url = format!("{}/api/chat", daemon.url);
    let message = |body: &Value| -> String {
        let object = body.as_object().unwrap_or_else(|| panic!("not an object: {body}"));
        assert_eq!(object.len(), 1, "{body}");
        body["error"].as_str().unwrap_or_else(|| panic!("no error string in {body}")).to_string()
    };

    let response = client.post(&url).body("{not json").send().await.unwrap();
    assert_eq!(response.status(), 400);
    assert!(message(&response.json().await.unwrap()).contains("JSON"));
    let response = client.post(&url).json(&json!({"messages": []})).send().await.unwrap();
    assert_eq!(response.status(), 400);
    assert!(message(&response.json().await.unwrap()).contains("model"));
    let response = client.post(&url).json(&json!({"model": 7})).send().await.unwrap();
    assert_eq!(response.status(), 400);
    message(&response.json().await.unwrap());
    let response = client.post(&url).json(&json!({"model": "big", "messages": "hi"})).send().await.unwrap();
    assert_eq!(response.status(), 400);
    assert!(message(&response.json().await.unwrap()).contains("messages"));

    let response = client.post(&url).json(&json!({"model": "gpt-17", "messages": []})).send().await.unwrap();
    assert_eq!(response.status(), 404);
    let text = message(&response.json().await.unwrap());
    assert!(
        text.contains("gpt-17") && text.contains("big") && text.contains("other") && text.contains("deaf"),
        "{text}"
    );

    let chat = json!({"model": "other", "messages": [{"role": "user", "content": "hi"}]});
    let response = client.post(&url).json(&chat).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert!(message(&response.json().await.unwrap()).contains("needs 3000 MiB on GPU 0"));

    let response = client
        .post(format!("{}/api/embed", daemon.url))
        .json(&json!({"model": "deaf", "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    assert!(message(&response.json().await.unwrap()).contains("deaf"));
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_releases_the_model() {
    let daemon = start(|sim| fake_model(sim, "a", 1000, "--token-delay 1s", ""), "");
    let response =
        post(&daemon, "/api/chat", json!({"model": "a", "messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    let line: Value = serde_json::from_slice(first.trim_ascii_end()).unwrap();
    assert_eq!(line["message"]["content"], "tok0 ");
    assert_eq!(daemon.model("a").await["in_use"], 1);
    drop(stream);
    daemon.wait_for_status(3 * SECOND, "in_use back to 0", |s| s["models"][0]["in_use"] == 0).await;
}

#[tokio::test]
async fn a_model_inside_ollama_is_passed_through_with_its_ollama_name_and_without_keep_alive() {
    let sim = tempfile::tempdir().unwrap();
    let ollama = FakeOllama::start_with(sim.path(), 0, &["--token-delay", "100ms"]);
    let (sim_dir, url) = (sim.path().to_path_buf(), ollama.url.clone());
    let daemon = Daemon::start(move |_| {
        format!(
            "{}[models.llama]\nbackend = \"ollama\"\nollama_model = \"llama3.2:3b\"\nurl = \"{url}\"\n",
            sim_config(&sim_dir, 8000, "50ms", "reserve_mib = 0")
        )
    });
    // A client's keep_alive 0 with a prompt must not unload the model behind vramgate's back.
    let body = json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}], "keep_alive": 0});
    let response = post(&daemon, "/api/chat", body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-vramgate-model"], "llama");
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("application/x-ndjson"));
    let lines = ndjson(response).await;
    // Ollama's own answer, unchanged (it names the model as Ollama knows it).
    let text = check_stream(&lines, "llama3.2:3b", |l| l["message"]["content"].as_str());
    assert_eq!(text, "tok0 tok1 tok2 tok3 tok4 ");
    let spread = lines[lines.len() - 2].0 - lines[0].0;
    assert!(spread >= Duration::from_millis(250), "lines arrived {spread:?} apart: buffered");

    let requests = ollama.get("/fake/requests").await;
    let chat =
        requests.as_array().unwrap().iter().rev().find(|r| r["path"] == "/api/chat").expect("a chat reached Ollama");
    assert_eq!(chat["body"]["model"], "llama3.2:3b", "{chat}");
    assert!(chat["body"].get("keep_alive").is_none(), "keep_alive was forwarded: {chat}");
    assert_eq!(chat["body"]["messages"], json!([{"role": "user", "content": "hi"}]));

    let model = daemon.wait_model_state("llama", "ready", 3 * SECOND).await;
    daemon.wait_for_status(3 * SECOND, "in_use back to 0", |s| s["models"][0]["in_use"] == 0).await;
    assert_eq!(model["backend"], "ollama");
    let ps = ollama.get("/api/ps").await;
    assert!(ps["models"].as_array().unwrap().iter().any(|m| m["name"] == "llama3.2:3b"), "{ps}");

    // Non-streamed answers and embeddings the same way.
    let body = json!({"model": "llama", "prompt": "why", "stream": false});
    let answer: Value = post(&daemon, "/api/generate", body).await.json().await.unwrap();
    assert_eq!((answer["response"].clone(), answer["done"].clone()), (json!("tok0 tok1 tok2 tok3 tok4 "), json!(true)));
    let body = json!({"model": "llama", "input": ["a", "b"], "keep_alive": "0s"});
    let answer: Value = post(&daemon, "/api/embed", body).await.json().await.unwrap();
    assert_eq!(answer["embeddings"], json!([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]]), "{answer}");
    let requests = ollama.get("/fake/requests").await;
    let embed = requests.as_array().unwrap().iter().rev().find(|r| r["path"] == "/api/embed").unwrap();
    assert_eq!(embed["body"], json!({"model": "llama3.2:3b", "input": ["a", "b"]}));
    assert_eq!(daemon.model("llama").await["state"], "ready");
}

/// README (The Ollama-compatible API): "an error status from the model server is passed on if it
/// is a 4xx and becomes 502 otherwise". That holds for translated requests
/// (`upstream_failure`), but `pass_through` returns an Ollama model's answer whatever its status:
/// Ollama's 500 (a runner that crashed, CUDA out of memory) reaches the client as 500.
#[tokio::test]
async fn a_5xx_from_an_ollama_model_becomes_502_as_the_readme_says() {
    let dir = tempfile::tempdir().unwrap();
    // An Ollama whose load and unload calls work (listed by /api/ps) and whose every other
    // answer is its 500 for a crashed runner.
    let loaded = Arc::new(Mutex::new(BTreeSet::<String>::new()));
    let (_ollama, url) = StandIn::start(Arc::new(move |method, path, body| {
        let body: Value = serde_json::from_slice(body).unwrap_or_default();
        let mut loaded = loaded.lock().unwrap();
        if method == "GET" {
            let models: Vec<Value> = loaded
                .iter()
                .map(|m| json!({"name": m, "model": m, "size": 1u64 << 30, "size_vram": 1u64 << 30}))
                .collect();
            return Reply::json(200, &json!({ "models": models }));
        }
        let name = body["model"].as_str().unwrap_or_default().to_string();
        if path == "/api/generate" && body["prompt"].as_str().is_none_or(str::is_empty) {
            if body["keep_alive"] == 0 {
                loaded.remove(&name);
            } else {
                loaded.insert(name.clone());
            }
            return Reply::json(200, &json!({"model": name, "response": "", "done": true}));
        }
        Reply::json(500, &json!({"error": "llama runner process has terminated: CUDA error: out of memory"}))
    }))
    .await;
    let sim_dir = dir.path().join("sim");
    let daemon = Daemon::start(move |_| {
        format!(
            "{}[models.llama]\nbackend = \"ollama\"\nollama_model = \"llama3.2:3b\"\nurl = \"{url}\"\n",
            sim_config(&sim_dir, 8000, "50ms", "reserve_mib = 0")
        )
    });
    let (code, body) = daemon.load("llama").await;
    assert_eq!(code, 200, "{body}");
    let response = common::http::client()
        .post(format!("{}/api/chat", daemon.url))
        .json(&json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}], "stream": false}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or_default();
    assert_eq!(status, 502, "Ollama's 500 was passed on as {status}: {body}");
    assert!(body["error"].as_str().is_some_and(|m| m.contains("out of memory")), "{body}");
}
