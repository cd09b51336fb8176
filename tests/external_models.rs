//! End-to-end: external models, which run inside an app attached over HTTP (or hold a one-shot
//! model lease). Placed on the GPU, demoted under pressure, promoted back and released when the
//! app goes; an app that never acknowledges is marked unresponsive; attaching errors name the
//! problem; attaching clears the failures of loads tried before; a model a mode placed is not
//! released as idle while its app holds it; a failed one-shot lease does not make the model
//! loadable without an app; requests naming an external model (directly or through an alias) are
//! refused without loading it. Each test written in review against a bug says in its doc comment
//! what used to go wrong.

mod common;

use std::time::Duration;

use common::app::{Answer, App};
use common::procs::settle;
use common::sim_daemon::on_8000_mib as start;
use common::{Daemon, fake_model, model_in as model, never_within, write_atomically};
use serde_json::{Value, json};

const SECOND: Duration = Duration::from_secs(1);

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

/// Loading an external model before its app attached fails (documented), and each such attempt
/// counts as a failed *start*: after three, the model is `failed` with a cooldown. Attaching the
/// app, which removes the cause, clears neither: status keeps saying `failed` with "no app is
/// attached" as `last_error` while an app is attached, and every demand that is not an explicit
/// `load` (a model lease, an Ollama-surface load call) is refused for the cooldown (10 s,
/// doubling up to 5 min) "failed to start 3 times in a row".
#[tokio::test]
async fn attaching_the_app_clears_the_failures_of_loads_tried_before_it_attached() {
    let daemon = start(|_| "[models.clip]\nbackend = \"external\"\nvram = 1000\n".into());
    for _ in 0..3 {
        let (code, body) = daemon.load("clip").await;
        assert_eq!(code, 502, "{body}");
    }
    settle(&daemon, 3 * SECOND, |s| model(s, "clip")["state"] == "failed").await;
    let app = App::attach(&daemon, "clip", 1000, |_| Answer::Ok).await;
    let (code, body) = daemon.post("/vramgate/leases", json!({"model": "clip", "holder": "app", "ttl": "30s"})).await;
    let clip = daemon.model("clip").await;
    assert_eq!(
        code, 201,
        "with its app attached, a model lease on clip was refused: {body}; clip: state {}, last_error {}",
        clip["state"], clip["last_error"]
    );
    app.exit();
}

/// An external model is used inside its app, never through vramgate, so its gate is never pinned
/// or touched after the load: `idle_expiry` sees it idle from the moment it was placed, and the
/// TTL from `[defaults]` (10 minutes unless set) releases it however busy the app is. With the
/// README's seed-001 config (no `ttl` on `clip`), `vramgate mode autopilot` puts CLIP on the GPU
/// and ten minutes later the app is told `release` (and a CLIP on the CPU in `recording` is
/// released the same way): the mode does not hold. The app has no way to say it is using the
/// model. Here `[defaults] ttl = "1s"` stands for the default 10m. An attached external model
/// should not idle out unless its own `ttl` says so (or the app must be able to mark it in use).
#[tokio::test]
async fn an_external_model_placed_by_a_mode_is_not_released_as_idle_while_its_app_holds_it() {
    let daemon = start(|_| {
        "[defaults]\nttl = \"1s\"\n[models.clip]\nbackend = \"external\"\nvram = \"1GiB\"\npriority = 80\n\
         [modes.autopilot]\ngpu = [\"clip\"]\n"
            .into()
    });
    let app = App::attach(&daemon, "clip", 1024, |_| Answer::Ok).await;
    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "autopilot"})).await;
    assert_eq!(code, 200, "{body}");
    never_within(
        &daemon,
        3 * SECOND,
        "mode autopilot put clip on the GPU; its app was told to release it as idle",
        |s| model(s, "clip")["state"] != "ready",
    )
    .await;
    assert_eq!(app.actions(), ["gpu"]);
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

/// Used to fail: a one-shot model lease on an external model that is not granted (here: it timed out)
/// leaves `oneshot` set; from then on a plain `vramgate load` of that model "succeeds" with no app
/// attached (ready on the GPU, its memory reserved for nobody), instead of failing with the
/// documented message that says how to attach.
#[tokio::test]
async fn a_failed_one_shot_lease_does_not_make_an_external_model_loadable_without_an_app() {
    let daemon = start(|_| "[models.clip]\nbackend = \"external\"\nvram = 1000\n".into());
    let (code, hold) = daemon.post("/vramgate/leases", json!({"vram": "7500MiB", "holder": "ffmpeg"})).await;
    assert_eq!(code, 201, "{hold}");
    let (code, body) = daemon.post("/vramgate/leases", json!({"model": "clip", "wait": "0", "pid": 1})).await;
    assert_eq!(code, 503, "{body}");
    let id = hold["id"].as_str().unwrap();
    let response = common::http::client().delete(format!("{}/vramgate/leases/{id}", daemon.url)).send().await.unwrap();
    assert_eq!(response.status(), 204);

    let (code, body) = daemon.load("clip").await;
    assert_eq!(code, 502, "loading an external model with no app attached must fail; got {body}");
    assert!(body.to_string().contains("attach"), "{body}");
}

/// Used to fail: a `/v1/...` request naming an external model is refused with 400 ("it runs inside the
/// app attached to it ... vramgate only places it") only after `pin_model` has loaded it: the
/// app is told to put the model on the GPU, the memory is reserved (evicting idle models if
/// needed), and it stays there until its TTL. A refused request should have no such effect.
#[tokio::test]
async fn a_refused_openai_request_for_an_external_model_does_not_load_it() {
    let daemon = start(|_| "[models.clip]\nbackend = \"external\"\nvram = 1000\n".into());
    let app = App::attach(&daemon, "clip", 1000, |_| Answer::Ok).await;
    let response = common::http::client()
        .post(format!("{}/v1/embeddings", daemon.url))
        .json(&json!({"model": "clip", "input": "a cat"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let clip = daemon.model("clip").await;
    assert_eq!(
        (clip["state"].as_str(), app.actions()),
        (Some("unloaded"), Vec::<String>::new()),
        "the refused request loaded clip onto the GPU: {clip}"
    );
    app.exit();
}

/// The Ollama surface refuses a request for an external model "before anything loads" only when
/// the name is the model's own (`state.arbiter.gate(&name)`); an `[aliases]` name has no gate,
/// so `pin_model` chooses and loads the external model first (the app is told `gpu`, memory is
/// reserved) and the request is refused only afterwards (the `UpstreamKind::External` arm).
/// `src/api/openai.rs` has the same hole ("Reached through an alias").
#[tokio::test]
async fn an_ollama_request_through_an_alias_of_an_external_model_does_not_load_it() {
    let daemon =
        start(|_| "[models.clip]\nbackend = \"external\"\nvram = 1000\n[aliases]\nvision = [\"clip\"]\n".into());
    let app = App::attach(&daemon, "clip", 0, |_| Answer::Ok).await;
    let response = common::http::client()
        .post(format!("{}/api/chat", daemon.url))
        .json(&json!({"model": "vision", "messages": [{"role": "user", "content": "a cat"}]}))
        .timeout(10 * SECOND)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let clip = daemon.model("clip").await;
    let seen = app.actions();
    assert_eq!(
        (clip["state"].as_str(), seen.clone()),
        (Some("unloaded"), Vec::<String>::new()),
        "the refused request loaded clip onto the GPU: {clip}; the app was told {seen:?}"
    );
    app.exit();
}
