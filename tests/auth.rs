//! End-to-end: the API token (`server.token` / `VRAMGATE_TOKEN`). With one set, every route but
//! `/vramgate/health` requires `Authorization: Bearer TOKEN` and answers 401 in its surface's
//! shape; a non-loopback `listen` without one refuses to start; the CLI sends the token; and no
//! API input can make the daemon run a command of its choosing.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use common::{Daemon, fake_model, output, output_within, sim_config, vramgate};
use futures_util::StreamExt;
use serde_json::{Value, json};

const TOKEN: &str = "t0ken-for-tests";

/// Starts `vramgate serve` on `config` as [`Daemon::start`] does, but with the environment's
/// `VRAMGATE_TOKEN` set to `env_token` or removed, so that the test's token, not the user's
/// environment's, is the one in force.
fn start(env_token: Option<&str>, config: impl FnOnce(&Path) -> String) -> Daemon {
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = dir.path().join("vramgate.toml");
    std::fs::write(&config_path, config(&Daemon::sim_dir_for(&dir))).expect("write config");
    let stderr_path = dir.path().join("stderr.log");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let mut command = vramgate();
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config_path)
        .env("VRAMGATE_LOG", "debug")
        .env("XDG_STATE_HOME", dir.path().join("state"))
        .stdout(Stdio::piped())
        .stderr(stderr);
    match env_token {
        Some(token) => command.env("VRAMGATE_TOKEN", token),
        None => command.env_remove("VRAMGATE_TOKEN"),
    };
    let mut child = command.spawn().expect("spawn vramgate");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "vramgate did not report its address; stderr:\n{}",
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        );
    };
    let url =
        line.split_whitespace().find(|w| w.starts_with("http://")).expect("a URL in the listening line").to_string();
    Daemon { child, url, dir, stderr_path }
}

/// A daemon whose config sets [`TOKEN`], with one fake model `a` (streaming slowly enough to
/// be seen streaming).
fn guarded() -> Daemon {
    start(None, |sim| {
        format!(
            "[server]\ntoken = \"{TOKEN}\"\n{}{}",
            sim_config(sim, 8000, "50ms", "reserve_mib = 0"),
            fake_model(sim, "a", 1000, "--token-delay 20ms", "")
        )
    })
}

/// A request with an optional `Authorization` header value.
async fn send(daemon: &Daemon, method: &str, path: &str, authorization: Option<&str>) -> reqwest::Response {
    let client = common::http::client();
    let url = format!("{}{path}", daemon.url);
    let mut request = match method {
        "GET" => client.get(url),
        "POST" => client.post(url).json(&json!({ "model": "a", "messages": [] })),
        other => panic!("no such method in this test: {other}"),
    };
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    request.send().await.expect("a response")
}

#[derive(Clone, Copy, Debug)]
enum Surface {
    Management,
    OpenAi,
    Ollama,
}

/// Every guarded route (and an unknown path of each surface), with its surface.
const ROUTES: &[(&str, &str, Surface)] = &[
    ("GET", "/", Surface::Management),
    ("GET", "/vramgate/status", Surface::Management),
    ("GET", "/vramgate/models", Surface::Management),
    ("GET", "/vramgate/leases", Surface::Management),
    ("GET", "/vramgate/mode", Surface::Management),
    ("GET", "/vramgate/events", Surface::Management),
    ("GET", "/vramgate/models/a/logs?tail=5", Surface::Management),
    ("POST", "/vramgate/models/a/load", Surface::Management),
    ("POST", "/vramgate/models/a/unload", Surface::Management),
    ("GET", "/metrics", Surface::Management),
    ("GET", "/no-such-path", Surface::Management),
    ("GET", "/v1/models", Surface::OpenAi),
    ("POST", "/v1/chat/completions", Surface::OpenAi),
    ("POST", "/v1/embeddings", Surface::OpenAi),
    ("GET", "/v1/no-such-path", Surface::OpenAi),
    ("GET", "/api/tags", Surface::Ollama),
    ("GET", "/api/ps", Surface::Ollama),
    ("GET", "/api/version", Surface::Ollama),
    ("POST", "/api/chat", Surface::Ollama),
    ("POST", "/api/generate", Surface::Ollama),
    ("GET", "/api/no-such-path", Surface::Ollama),
];

/// Checks a 401 and its body's shape for `surface`.
async fn assert_refused(response: reqwest::Response, surface: Surface, what: &str) {
    assert_eq!(response.status(), 401, "{what}");
    assert_eq!(
        response.headers().get("www-authenticate").and_then(|v| v.to_str().ok()),
        Some("Bearer"),
        "{what}: WWW-Authenticate"
    );
    let body: Value = response.json().await.unwrap_or_else(|e| panic!("{what}: a JSON body: {e}"));
    match surface {
        Surface::Management => {
            assert_eq!(body["error"]["code"], 401, "{what}: {body}");
            assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("token")), "{what}: {body}");
        }
        Surface::OpenAi => {
            assert_eq!(body["error"]["code"], "invalid_api_key", "{what}: {body}");
            assert_eq!(body["error"]["type"], "invalid_request_error", "{what}: {body}");
            assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("token")), "{what}: {body}");
        }
        Surface::Ollama => {
            assert!(body["error"].as_str().is_some_and(|m| m.contains("token")), "{what}: {body}");
        }
    }
    assert!(!body.to_string().contains(TOKEN), "{what}: the answer must not echo the token: {body}");
}

#[tokio::test]
async fn every_surface_refuses_a_missing_or_wrong_token_in_its_own_shape() {
    let daemon = guarded();
    let wrong_credentials = [
        None,
        Some("Bearer wrong".to_string()),
        // A prefix of the token, and the token with one more character: equal bytes as far as
        // they go must not be enough.
        Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
        Some(format!("Bearer {TOKEN}x")),
        // The right secret under another scheme.
        Some(format!("Basic {TOKEN}")),
        Some(TOKEN.to_string()),
    ];
    for (method, path, surface) in ROUTES {
        for credential in &wrong_credentials {
            let what = format!("{method} {path} with {credential:?}");
            assert_refused(send(&daemon, method, path, credential.as_deref()).await, *surface, &what).await;
        }
    }
    // Nothing refused had an effect: the load and the chats above started nothing.
    let status = common::http::client()
        .get(format!("{}/vramgate/status", daemon.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("status")
        .json::<Value>()
        .await
        .expect("status JSON");
    assert_eq!(common::model_in(&status, "a")["state"], "unloaded", "{status}");
}

#[tokio::test]
async fn the_right_token_opens_every_surface() {
    let daemon = guarded();
    for (method, path, _) in ROUTES {
        let response = send(&daemon, method, path, Some(&format!("Bearer {TOKEN}"))).await;
        assert_ne!(response.status(), 401, "{method} {path} with the right token");
        if !path.contains("no-such-path") && !path.starts_with("/api/") && !path.contains("embeddings") {
            assert!(response.status().is_success(), "{method} {path}: {}", response.status());
        }
    }
    // The scheme is case-insensitive (RFC 9110), as clients vary.
    let response = send(&daemon, "GET", "/vramgate/status", Some(&format!("bearer {TOKEN}"))).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn health_stays_open_without_a_token() {
    let daemon = guarded();
    let response = send(&daemon, "GET", "/vramgate/health", None).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("health JSON");
    assert_eq!(body["status"], "ok", "{body}");
}

#[tokio::test]
async fn a_streamed_answer_passes_through_with_the_token() {
    let daemon = guarded();
    let response = common::http::client()
        .post(format!("{}/v1/chat/completions", daemon.url))
        .bearer_auth(TOKEN)
        .json(&json!({ "model": "a", "stream": true }))
        .send()
        .await
        .expect("a streamed answer");
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.expect("a chunk")));
    }
    assert!(text.contains("tok0") && text.contains("tok4") && text.contains("[DONE]"), "{text}");
}

#[tokio::test]
async fn the_environments_token_wins_over_the_configs() {
    let daemon = start(Some("from-env"), |sim| {
        format!("[server]\ntoken = \"from-config\"\n{}", sim_config(sim, 8000, "50ms", "reserve_mib = 0"))
    });
    assert_eq!(send(&daemon, "GET", "/vramgate/status", Some("Bearer from-env")).await.status(), 200);
    assert_eq!(send(&daemon, "GET", "/vramgate/status", Some("Bearer from-config")).await.status(), 401);
    // The secret never reaches the log.
    let log = daemon.log();
    assert!(!log.contains("from-env") && !log.contains("from-config"), "{log}");
}

/// Runs `vramgate config check` on `text`, with no token in the environment.
fn config_check(text: &str) -> std::process::Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vramgate.toml");
    std::fs::write(&path, text).expect("write config");
    output(vramgate().args(["config", "check"]).arg(&path).env_remove("VRAMGATE_TOKEN"))
}

#[test]
fn config_check_refuses_an_exposed_listen_without_a_token_naming_the_keys_and_line() {
    let out = config_check("[gpu]\nprobe = \"none\"\n\n[server]\nlisten = \"0.0.0.0:9777\"\n");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for named in ["line 5", "key `server.listen`", "server.token", "VRAMGATE_TOKEN", "server.allow_unauthenticated"] {
        assert!(stderr.contains(named), "{named:?} not in:\n{stderr}");
    }
}

#[test]
fn config_check_accepts_an_exposed_listen_with_a_token_or_explicitly_without() {
    for server in ["token = \"s3cret\"", "allow_unauthenticated = true"] {
        let out = config_check(&format!("[gpu]\nprobe = \"none\"\n\n[server]\nlisten = \"0.0.0.0:9777\"\n{server}\n"));
        assert!(out.status.success(), "{server}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn config_check_never_prints_the_token() {
    let out = config_check("[server]\ntoken = \"has a space\"\n");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("server.token") && stderr.contains("line 2"), "{stderr}");
    assert!(!stderr.contains("has a space"), "{stderr}");
}

#[test]
fn serve_listen_on_a_non_loopback_address_without_a_token_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("vramgate.toml");
    std::fs::write(&config, "[gpu]\nprobe = \"none\"\n").expect("write config");
    let runs: [&[&str]; 3] = [
        &["serve", "--listen", "0.0.0.0:0"],
        &["serve", "--listen", "0.0.0.0:0", "--config", config.to_str().expect("utf-8 path")],
        &["serve", "--demo", "--listen", "0.0.0.0:0"],
    ];
    for args in runs {
        // Were the check missing, the daemon would run: the deadline fails the test.
        let out = output_within(
            vramgate().args(args).env("XDG_STATE_HOME", dir.path().join("state")).env_remove("VRAMGATE_TOKEN"),
            Duration::from_secs(20),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        for named in
            ["--listen 0.0.0.0:0", "server.listen", "server.token", "VRAMGATE_TOKEN", "server.allow_unauthenticated"]
        {
            assert!(stderr.contains(named), "{args:?}: {named:?} not in:\n{stderr}");
        }
        assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"), "{args:?} must not listen");
    }
}

/// Runs a `vramgate` CLI command against `daemon` with `token` (or none) in the environment.
fn cli(daemon: &Daemon, token: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut command = vramgate();
    command.args(args).env("VRAMGATE_URL", &daemon.url);
    match token {
        Some(token) => command.env("VRAMGATE_TOKEN", token),
        None => command.env_remove("VRAMGATE_TOKEN"),
    };
    output(&mut command)
}

#[test]
fn the_cli_sends_vramgate_token_and_says_when_one_is_needed() {
    let daemon = guarded();
    for args in [&["status"][..], &["load", "a"], &["logs", "a"], &["mode"], &["unload", "a"]] {
        let out = cli(&daemon, Some(TOKEN), args);
        assert!(out.status.success(), "{args:?} with the token: {}", String::from_utf8_lossy(&out.stderr));
    }
    for args in [&["status"][..], &["load", "a"], &["unload", "a"], &["logs", "a"], &["mode"], &["events"]] {
        let out = cli(&daemon, None, args);
        assert_eq!(out.status.code(), Some(1), "{args:?} without a token");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("the daemon requires a token: set VRAMGATE_TOKEN"), "{args:?}: {stderr}");

        let out = cli(&daemon, Some("wrong"), args);
        assert_eq!(out.status.code(), Some(1), "{args:?} with a wrong token");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("rejected the token in VRAMGATE_TOKEN"), "{args:?}: {stderr}");
    }
    let out = cli(&daemon, None, &["run", "--vram", "100M", "--", "true"]);
    assert_eq!(out.status.code(), Some(75), "run without a token gets no lease");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("set VRAMGATE_TOKEN"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&daemon, Some(TOKEN), &["run", "--vram", "100M", "--", "true"]);
    assert!(out.status.success(), "run with the token: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn no_api_input_makes_the_daemon_run_a_command() {
    let daemon = start(None, |sim| {
        format!(
            "{}{}[modes.m]\ngpu = [\"a\"]\n",
            sim_config(sim, 8000, "50ms", "reserve_mib = 0"),
            fake_model(sim, "a", 1000, "", "")
        )
    });
    let sentinel = daemon.dir.path().join("injected");
    let touch = format!("touch {}", sentinel.display());
    let injected = json!({
        "cmd": ["sh", "-c", touch],
        "cpu_cmd": ["sh", "-c", touch],
        "argv": ["sh", "-c", touch],
        "env": { "LD_PRELOAD": "/nonexistent.so", "PATH": "/nonexistent" },
        "url": "http://127.0.0.1:1",
    });
    let client = common::http::client();
    let post = |path: String, mut body: Value| {
        if let (Some(body), Some(extra)) = (body.as_object_mut(), injected.as_object()) {
            body.extend(extra.clone());
        }
        client.post(format!("{}{path}", daemon.url)).json(&body).send()
    };

    let load = post("/vramgate/models/a/load".into(), json!({})).await.expect("load");
    assert_eq!(load.status(), 200, "extra fields are ignored by a load");
    let loaded: Value = load.json().await.expect("load JSON");
    let pid = loaded["pid"].as_u64().expect("the model's pid");
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("the model's executable");
    assert_eq!(exe, Path::new(common::fake()), "the model runs its configured command");

    let mode = post("/vramgate/mode".into(), json!({ "mode": "m" })).await.expect("mode");
    // A mode's body names its fields strictly: the extra ones are refused outright.
    assert_eq!(mode.status(), 400, "extra fields are refused by a mode");
    let attach = post("/vramgate/models/a/attach".into(), json!({ "pid": std::process::id() })).await.expect("attach");
    assert_eq!(attach.status(), 400, "a process model cannot be attached to");
    // A lease answers with a stream: its first line is the grant; dropping it releases the lease.
    let lease = post("/vramgate/leases".into(), json!({ "vram": "100MiB", "holder": "x" })).await.expect("lease");
    let mut lease_stream = lease.bytes_stream();
    let first = lease_stream.next().await.expect("a grant line").expect("a chunk");
    assert!(String::from_utf8_lossy(&first).contains("lease"), "{}", String::from_utf8_lossy(&first));
    drop(lease_stream);

    // Model names with shell metacharacters are names, not commands: nothing is configured by
    // those names, so every one is a 404.
    for name in ["%24%28touch%20injected%29", "a%3Btouch%20injected", "%60touch%20injected%60", "a%20%7C%20sh"] {
        let response = post(format!("/vramgate/models/{name}/load"), json!({})).await.expect("load by odd name");
        assert_eq!(response.status(), 404, "{name}");
    }
    let body = |model: String| json!({ "model": model, "messages": [], "prompt": "x" });
    for model in [format!("$({touch})"), format!("a; {touch}"), format!("`{touch}`")] {
        for path in ["/v1/chat/completions", "/api/chat", "/api/generate"] {
            let response = post(path.to_string(), body(model.clone())).await.expect("chat by odd name");
            assert_eq!(response.status(), 404, "{path} {model}");
        }
    }

    assert!(!sentinel.exists(), "an injected command ran");
    let status = daemon.status().await;
    assert_eq!(common::model_in(&status, "a")["pid"], pid, "the same configured process serves `a`: {status}");
}

/// The daemon's token is vramgate's own: it never travels on to a model server (an Ollama may be
/// another host, over plain http). A raw upstream records every request head it gets.
#[tokio::test]
async fn the_token_never_reaches_a_model_server() {
    let dir = tempfile::tempdir().unwrap();
    let (cmd, port_file) = common::stand_in::port_reporting_cmd(dir.path());
    let daemon = start(None, |sim| {
        format!(
            "[server]\ntoken = \"{TOKEN}\"\n{}[models.up]\nbackend = \"process\"\ncmd = {cmd}\nhealth = \"none\"\n",
            sim_config(sim, 8192, "50ms", "")
        )
    });
    let (code, body) = {
        let response = common::http::client()
            .post(format!("{}/vramgate/models/up/load", daemon.url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("load");
        (response.status().as_u16(), response.text().await.unwrap_or_default())
    };
    assert_eq!(code, 200, "{body}");
    // `health = "none"`: ready once spawned, which can be before the shell wrote the file.
    let written = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(&port_file).is_ok_and(|text| text.ends_with('\n')) {
        assert!(std::time::Instant::now() < written, "the model never reported its port");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let port: u16 = std::fs::read_to_string(&port_file).expect("the reported port").trim().parse().expect("a port");
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("serve on the model's port");
    {
        let heads = heads.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut stream = stream;
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && std::io::Read::read(&mut stream, &mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                heads.lock().unwrap().push(String::from_utf8_lossy(&head).to_lowercase());
                let answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}";
                let _ = std::io::Write::write_all(&mut stream, answer);
            }
        });
    }
    for path in ["/v1/chat/completions", "/v1/embeddings"] {
        let response = common::http::client()
            .post(format!("{}{path}", daemon.url))
            .bearer_auth(TOKEN)
            .json(&json!({"model": "up", "messages": [], "input": "x"}))
            .send()
            .await
            .expect("a proxied request");
        assert_eq!(response.status(), 200, "{path}");
    }
    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 2, "both requests reached the model server: {heads:?}");
    for head in &heads {
        assert!(!head.contains(TOKEN) && !head.contains("authorization"), "the token went upstream: {head}");
    }
}
