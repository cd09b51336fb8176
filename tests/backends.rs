//! End-to-end: external models (an app attached over HTTP), CPU placement, modes, and the seeds'
//! scenarios, through the real daemon on the sim device.

mod common;

use std::path::Path;
use std::time::Duration;

use common::app::{Answer, App};
use common::{Daemon, fake, fake_model, model_in as model, sim_config, write_atomically};
use serde_json::{Value, json};

const SECOND: Duration = Duration::from_secs(1);

/// An 8000 MiB sim device without reserve, plus `rest`.
fn start(rest: impl Fn(&Path) -> String) -> Daemon {
    Daemon::start(|sim| format!("{}{}", sim_config(sim, 8000, "50ms", "reserve_mib = 0"), rest(sim)))
}

#[tokio::test]
async fn an_external_model_is_placed_demoted_under_pressure_promoted_back_and_released_on_disconnect() {
    let daemon = start(|sim| {
        format!(
            "[models.clip]\nbackend = \"external\"\nvram = \"1000MiB\"\non_evict = \"cpu\"\npriority = 10\n{}",
            fake_model(sim, "big", 7500, "", "priority = 50\nttl = \"0\"")
        )
    });
    let mut events = daemon.events().await;
    let app = App::attach(&daemon, "clip", 1000, |_| Answer::Ok).await;
    assert_eq!(events.next_of("external_attachment", 5 * SECOND).await["change"], "attached");

    let (code, body) = daemon.load("clip").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!((body["state"].as_str(), body["placement"].as_str()), (Some("ready"), Some("gpu")));
    // The app's memory is the model's, not foreign.
    let status = daemon
        .wait_for_status(5 * SECOND, "the app's process attributed to clip", |s| {
            s["devices"][0]["processes"].as_array().is_some_and(|p| p.iter().any(|p| p["model"] == "clip"))
        })
        .await;
    assert_eq!(model(&status, "clip")["vram_mib"], 1000);
    assert_eq!(model(&status, "clip")["attached"], "test-app");
    assert_eq!(model(&status, "clip")["pid"], std::process::id());

    // big needs 7500 of 8000: clip is demoted to the CPU, not unloaded.
    let (code, body) = daemon.load("big").await;
    assert_eq!(code, 200, "{body}");
    let placed = events.next_of("model_placed", 5 * SECOND).await;
    assert_eq!((placed["model"].as_str(), placed["placement"].as_str()), (Some("clip"), Some("gpu")));
    let placed = events.next_of("model_placed", 5 * SECOND).await;
    assert_eq!((placed["model"].as_str(), placed["placement"].as_str()), (Some("clip"), Some("cpu")));
    let status = daemon.status().await;
    assert_eq!(model(&status, "clip")["placement"], "cpu");
    assert_eq!(model(&status, "clip")["state"], "ready");
    assert_eq!(model(&status, "big")["state"], "ready");
    assert_eq!(app.actions(), ["gpu", "cpu"]);

    // Room again: clip goes back to the GPU by itself.
    assert_eq!(daemon.unload("big").await.0, 200);
    daemon
        .wait_for_status(5 * SECOND, "clip promoted back to the GPU", |s| {
            model(s, "clip")["placement"] == "gpu" && model(s, "clip")["state"] == "ready"
        })
        .await;
    assert_eq!(app.actions(), ["gpu", "cpu", "gpu"]);

    // The app goes away: everything it held is released.
    app.exit();
    daemon.wait_model_state("clip", "unloaded", 3 * SECOND).await;
    let detached = events.next_of("external_attachment", 5 * SECOND).await;
    assert_eq!(detached["change"], "detached");
}

#[tokio::test]
async fn an_app_that_never_acknowledges_is_marked_unresponsive() {
    let daemon = start(|_| "[models.clip]\nbackend = \"external\"\nvram = 1000\nack_timeout = \"300ms\"\n".into());
    let mut events = daemon.events().await;
    let app = App::attach(&daemon, "clip", 1000, |_| Answer::Silent).await;
    let (code, body) = daemon.load("clip").await;
    assert_eq!(code, 502, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("unresponsive") && message.contains("gpu"), "{message}");
    let event = events.next_of("external_unresponsive", 5 * SECOND).await;
    assert_eq!((event["model"].as_str(), event["action"].as_str()), (Some("clip"), Some("gpu")));
    let status = daemon.status().await;
    let clip = model(&status, "clip");
    assert_eq!(clip["state"], "failed");
    assert!(clip["note"].as_str().unwrap_or_default().contains("unresponsive"), "{clip}");
    // Nothing is counted for it any more.
    assert_eq!(clip["vram_mib"], 1000, "the declared footprint stays visible");
    assert!(daemon.status().await["leases"].as_array().unwrap().is_empty());
    assert_eq!(app.actions(), ["gpu"]);
    app.exit();
}

#[tokio::test]
async fn attaching_errors_name_the_problem() {
    let daemon = start(|sim| {
        format!("[models.clip]\nbackend = \"external\"\nvram = 1000\n{}", fake_model(sim, "llm", 1000, "", ""))
    });
    // Loading an external model nobody holds says how to attach.
    let (code, body) = daemon.load("clip").await;
    assert_eq!(code, 502, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("/vramgate/models/clip/attach"), "{body}");

    let (code, body) = daemon.post("/vramgate/models/llm/attach", json!({})).await;
    assert_eq!(code, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("only external models"), "{body}");
    let (code, _) = daemon.post("/vramgate/models/nope/attach", json!({})).await;
    assert_eq!(code, 404);
    let (code, body) = daemon.post("/vramgate/models/clip/attach", json!({"pid": "x"})).await;
    assert_eq!(code, 400, "{body}");

    let app = App::attach(&daemon, "clip", 1000, |_| Answer::Ok).await;
    let (code, body) = daemon.post("/vramgate/models/clip/attach", json!({})).await;
    assert_eq!(code, 409, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("test-app"), "{body}");
    let (code, body) =
        daemon.post("/vramgate/models/clip/ack", json!({"session": "att-999", "seq": 1, "ok": true})).await;
    assert_eq!(code, 404, "{body}");
    let (code, body) = daemon.post("/vramgate/models/clip/ack", json!({"seq": 1})).await;
    assert_eq!(code, 400, "{body}");
    app.exit();
}

/// Three fake process models; `a` has a CPU form (the same fake, claiming no GPU memory).
fn modes_config(sim: &Path) -> String {
    let cpu_form =
        format!("cpu_cmd = \"{} --port ${{PORT}} --sim-dir {} --vram 0 --name a-cpu\"", fake(), sim.display());
    format!(
        "{}{}{}",
        fake_model(sim, "a", 2000, "", &cpu_form),
        fake_model(sim, "b", 3000, "", ""),
        fake_model(sim, "c", 5000, "", "")
    )
}

const MODES: &str =
    "[modes.work]\ngpu = [\"a\", \"b\"]\n[modes.play]\nunload = [\"b\"]\ncpu = [\"a\"]\nload = [\"c\"]\n";

#[tokio::test]
async fn modes_release_and_demote_before_they_load() {
    let daemon = start(|sim| format!("{}{MODES}", modes_config(sim)));
    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "work"})).await;
    assert_eq!(code, 200, "{body}");
    let status = daemon.status().await;
    assert_eq!(status["mode"], "work");
    for id in ["a", "b"] {
        assert_eq!(
            (model(&status, id)["state"].as_str(), model(&status, id)["placement"].as_str()),
            (Some("ready"), Some("gpu"))
        );
    }

    let mut events = daemon.events().await;
    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "play"})).await;
    assert_eq!(code, 200, "{body}");
    // The order of events proves it: b released and a demoted before c starts loading.
    let mut order = Vec::new();
    loop {
        let event = events.next(5 * SECOND).await;
        match event["type"].as_str() {
            Some("model_state") => {
                order.push(format!("{} {} {}", event["model"], event["to"], event["reason"]).replace('"', ""))
            }
            Some("mode_changed") => {
                assert_eq!((event["from"].as_str(), event["to"].as_str()), (Some("work"), Some("play")));
                break;
            }
            _ => {}
        }
    }
    let position =
        |needle: &str| order.iter().position(|e| e == needle).unwrap_or_else(|| panic!("{needle} in {order:?}"));
    assert!(position("b unloaded released") < position("c loading requested"), "{order:?}");
    assert!(position("a ready ready") < position("c loading requested"), "{order:?}");
    assert!(position("a loading demoted") < position("a ready ready"), "{order:?}");
    let status = daemon.status().await;
    assert_eq!(status["mode"], "play");
    assert_eq!(model(&status, "a")["placement"], "cpu");
    assert_eq!(model(&status, "b")["state"], "unloaded");
    assert_eq!(model(&status, "c")["placement"], "gpu");

    let shown = daemon.get_json("/vramgate/mode").await;
    assert_eq!(shown["mode"], "play");
    assert_eq!(shown["modes"]["play"]["gpu"], json!(["c"]));
    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "nope"})).await;
    assert_eq!(code, 404, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("play, work"), "{body}");

    // And back with the CLI; a (on the CPU) is promoted to the GPU.
    let output = common::output(common::vramgate().args(["mode", "work", "--url", &daemon.url]));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let status = daemon.status().await;
    assert_eq!(model(&status, "a")["placement"], "gpu");
    assert_eq!(status["mode"], "work");
}

#[tokio::test]
async fn the_initial_mode_applies_at_start_up() {
    let daemon = Daemon::start(|sim| {
        format!(
            "[server]\ninitial_mode = \"work\"\n{}{}{MODES}",
            sim_config(sim, 8000, "50ms", "reserve_mib = 0"),
            modes_config(sim)
        )
    });
    let status = daemon.wait_for_status(10 * SECOND, "mode work", |s| s["mode"] == "work").await;
    assert_eq!(model(&status, "a")["state"], "ready");
    assert_eq!(model(&status, "b")["state"], "ready");
}

/// Seed 000: Whisper pinned at high priority plus an LLM on an 8 GiB card with 1 GiB foreign; a
/// VLM request evicts the LLM, never Whisper.
#[tokio::test]
async fn seed_000_a_vlm_request_evicts_the_llm_never_the_pinned_whisper() {
    let daemon = Daemon::start(|sim| {
        std::fs::create_dir_all(sim.join("0")).unwrap();
        std::fs::write(sim.join("0").join("desktop"), "1024").unwrap();
        format!(
            "{}{}{}{}",
            sim_config(sim, 8192, "50ms", ""),
            fake_model(sim, "whisper", 1500, "", "priority = 100\npinned = true\npreload = true"),
            fake_model(sim, "llm", 4000, "", "priority = 50"),
            fake_model(sim, "vlm", 4500, "", "priority = 50"),
        )
    });
    daemon.wait_model_state("whisper", "ready", 10 * SECOND).await;
    let client = common::http::client();
    let chat = |id: &str| {
        client.post(format!("{}/v1/chat/completions", daemon.url)).json(&json!({"model": id, "messages": []})).send()
    };
    assert_eq!(chat("llm").await.unwrap().status(), 200);
    let mut events = daemon.events().await;
    let response = chat("vlm").await.unwrap();
    assert_eq!(response.status(), 200);
    let evicted = events.next_of("model_state", 5 * SECOND).await;
    assert_eq!((evicted["model"].as_str(), evicted["reason"].as_str()), (Some("llm"), Some("evicted_for:vlm")));
    let status = daemon.status().await;
    assert_eq!(model(&status, "whisper")["state"], "ready");
    assert_eq!(model(&status, "llm")["state"], "unloaded");
    assert_eq!(model(&status, "vlm")["state"], "ready");
}

/// Seed 001: AUTOPILOT (CLIP on the GPU, VLM unloaded) and RECORDING (CLIP on the CPU, VLM loaded),
/// the VLM unloaded when idle and loaded again on demand.
#[tokio::test]
async fn seed_001_autopilot_and_recording_with_idle_unload_and_reload_on_demand() {
    let daemon = start(|sim| {
        format!(
            "[models.clip]\nbackend = \"external\"\nvram = 1500\npriority = 80\n{}\
             [modes.autopilot]\ngpu = [\"clip\"]\nunload = [\"vlm\"]\n[modes.recording]\ncpu = [\"clip\"]\ngpu = [\"vlm\"]\n",
            fake_model(sim, "vlm", 6000, "", "ttl = \"500ms\"")
        )
    });
    let app = App::attach(&daemon, "clip", 1500, |_| Answer::Ok).await;
    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "autopilot"})).await;
    assert_eq!(code, 200, "{body}");
    let status = daemon.status().await;
    assert_eq!(
        (model(&status, "clip")["placement"].as_str(), model(&status, "vlm")["state"].as_str()),
        (Some("gpu"), Some("unloaded"))
    );

    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "recording"})).await;
    assert_eq!(code, 200, "{body}");
    let status = daemon.status().await;
    assert_eq!(model(&status, "clip")["placement"], "cpu");
    assert_eq!(model(&status, "vlm")["state"], "ready");
    assert_eq!(app.actions(), ["gpu", "cpu"]);

    // Idle: the VLM goes after its TTL; a request brings it back.
    daemon.wait_model_state("vlm", "unloaded", 5 * SECOND).await;
    let response = common::http::client()
        .post(format!("{}/v1/chat/completions", daemon.url))
        .json(&json!({"model": "vlm", "messages": [{"role": "user", "content": "what is on screen?"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(daemon.model("vlm").await["state"], "ready");

    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "autopilot"})).await;
    assert_eq!(code, 200, "{body}");
    let status = daemon.status().await;
    assert_eq!(model(&status, "clip")["placement"], "gpu");
    assert_eq!(model(&status, "vlm")["state"], "unloaded");
    assert_eq!(app.actions(), ["gpu", "cpu", "gpu"]);
    app.exit();
}

/// The one-shot form for apps that cannot keep a stream open: a model lease on an external model
/// (acquire), renewed by heartbeat, released with DELETE or by expiry.
#[tokio::test]
async fn an_app_without_a_stream_acquires_renews_and_releases_its_external_model() {
    let daemon = start(|_| "[models.clip]\nbackend = \"external\"\nvram = 1000\n".into());
    let pid = std::process::id();
    let (code, grant) = daemon
        .post("/vramgate/leases", json!({"model": "clip", "holder": "batch-job", "ttl": "30s", "pid": pid}))
        .await;
    assert_eq!(code, 201, "{grant}");
    let clip = daemon.model("clip").await;
    assert_eq!((clip["state"].as_str(), clip["placement"].as_str()), (Some("ready"), Some("gpu")));
    assert_eq!(clip["in_use"], 1, "held by the lease: never evicted");
    // The app loads the model itself; its memory is the model's, not foreign.
    let claim = Daemon::sim_dir_for(&daemon.dir).join("0").join(pid.to_string());
    write_atomically(&claim, "1000");
    daemon
        .wait_for_status(5 * SECOND, "the app's memory attributed to clip", |s| {
            s["devices"][0]["processes"].as_array().is_some_and(|p| p.iter().any(|p| p["model"] == "clip"))
        })
        .await;
    let id = grant["id"].as_str().unwrap().to_string();
    let (code, renewed) = daemon.post(&format!("/vramgate/leases/{id}/renew"), Value::Null).await;
    assert_eq!(code, 200, "{renewed}");

    let response = common::http::client().delete(format!("{}/vramgate/leases/{id}", daemon.url)).send().await.unwrap();
    assert_eq!(response.status(), 204);
    daemon.wait_model_state("clip", "unloaded", 3 * SECOND).await;
    let _ = std::fs::remove_file(&claim);

    // Expiry ends it the same way.
    let (code, grant) = daemon.post("/vramgate/leases", json!({"model": "clip", "ttl": "300ms"})).await;
    assert_eq!(code, 201, "{grant}");
    assert_eq!(daemon.model("clip").await["state"], "ready");
    daemon.wait_model_state("clip", "unloaded", 3 * SECOND).await;
}
