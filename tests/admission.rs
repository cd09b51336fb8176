//! End-to-end: admission and eviction. What fits is admitted; what does not evicts the least
//! recently used idle model, never a pinned, in-use, higher-priority or too-young
//! (`min_residency`) one; `resident_cap` and `max_parallel_loads` hold; a request that can never
//! fit fails at once; an exclusive lease blocks everything else; a lease's job is counted once; a
//! model without a declared size is measured. Seed 000's scenario closes it.

mod common;

use std::time::{Duration, Instant};

use common::sim_daemon::on_10000_mib as start;
use common::{Daemon, fake_model, model_in as model, sim_config};
use serde_json::{Value, json};

const SECOND: Duration = Duration::from_secs(1);

fn states(status: &Value) -> Vec<(String, String)> {
    status["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_str().unwrap().to_string(), m["state"].as_str().unwrap().to_string()))
        .collect()
}

#[tokio::test]
async fn two_fit_and_a_third_evicts_the_least_recently_used() {
    let daemon = start(
        |sim| {
            [fake_model(sim, "a", 4000, "", ""), fake_model(sim, "b", 4000, "", ""), fake_model(sim, "c", 4000, "", "")]
                .concat()
        },
        "",
    );
    let mut events = daemon.events().await;
    assert_eq!(daemon.load("a").await.0, 200);
    assert_eq!(daemon.load("b").await.0, 200);
    let status = daemon.status().await;
    assert_eq!(states(&status)[..2], [("a".into(), "ready".into()), ("b".into(), "ready".into())]);
    // Use a again so that b is the least recently used.
    let (code, body) = daemon.load("a").await;
    assert_eq!((code, body["state"].as_str()), (200, Some("ready")));
    let lease = daemon.post("/vramgate/leases", json!({"model": "a", "holder": "t"})).await;
    assert_eq!(lease.0, 201, "{:?}", lease.1);
    let released = daemon.post(&format!("/vramgate/leases/{}", lease.1["id"].as_str().unwrap()), Value::Null).await;
    assert_eq!(released.0, 405, "release is DELETE");
    let id = lease.1["id"].as_str().unwrap().to_string();
    let response = common::http::client().delete(format!("{}/vramgate/leases/{id}", daemon.url)).send().await.unwrap();
    assert_eq!(response.status(), 204);

    let (code, body) = daemon.load("c").await;
    assert_eq!(code, 200, "{body}");
    let status = daemon.status().await;
    assert_eq!(
        states(&status),
        vec![("a".into(), "ready".into()), ("b".into(), "unloaded".into()), ("c".into(), "ready".into())]
    );
    // The eviction carried its reason, and the device never held more than it has.
    loop {
        let event = events.next_of("model_state", 5 * SECOND).await;
        if event["model"] == "b" && event["to"] == "unloading" {
            assert_eq!(event["reason"], "evicted_for:c");
            break;
        }
    }
    assert!(status["devices"][0]["used_mib"].as_u64().unwrap() <= 10000);
    let status = daemon
        .wait_for_status(5 * SECOND, "both model processes on the device", |s| {
            s["devices"][0]["processes"]
                .as_array()
                .is_some_and(|p| p.iter().filter(|p| p["model"].is_string()).count() == 2)
        })
        .await;
    let processes: Vec<&str> =
        status["devices"][0]["processes"].as_array().unwrap().iter().filter_map(|p| p["model"].as_str()).collect();
    assert_eq!(processes.len(), 2);
    assert!(processes.contains(&"a") && processes.contains(&"c"), "{processes:?}");
}

#[tokio::test]
async fn priority_protects_the_higher_model_and_a_blocked_load_times_out_with_numbers() {
    let daemon = start(
        |sim| {
            [fake_model(sim, "big", 7000, "", "priority = 100"), fake_model(sim, "small", 4000, "", "priority = 10")]
                .concat()
        },
        "[scheduler]\nqueue_timeout = \"400ms\"\n",
    );
    assert_eq!(daemon.load("big").await.0, 200);
    let started = Instant::now();
    let (code, body) = daemon.load("small").await;
    assert_eq!(code, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("needs 4000 MiB on GPU 0"), "{message}");
    assert!(message.contains("3000 MiB available"), "{message}");
    assert!(message.contains("big 7000 MiB (higher priority)"), "{message}");
    assert!(started.elapsed() >= Duration::from_millis(350));
    assert_eq!(daemon.model("big").await["state"], "ready");
    assert_eq!(daemon.model("small").await["state"], "unloaded");
}

#[tokio::test]
async fn pinned_and_in_use_models_are_never_evicted() {
    let daemon = start(
        |sim| {
            [
                fake_model(sim, "pinned", 4000, "", "pinned = true"),
                fake_model(sim, "busy", 4000, "", ""),
                fake_model(sim, "third", 4000, "", ""),
            ]
            .concat()
        },
        "[scheduler]\nqueue_timeout = \"300ms\"\n",
    );
    // Pinned models are loaded at start-up.
    daemon.wait_model_state("pinned", "ready", 10 * SECOND).await;
    let refused = daemon.post("/vramgate/leases", json!({"model": "busy", "exclusive": true})).await;
    assert_eq!(refused.0, 400, "{}", refused.1);
    let lease = daemon.post("/vramgate/leases", json!({"model": "busy", "holder": "app"})).await;
    assert_eq!(lease.0, 201, "{}", lease.1);
    assert!(lease.1["upstream"].as_str().unwrap().starts_with("http://127.0.0.1:"));
    assert_eq!(daemon.model("busy").await["in_use"], 1);
    let (code, body) = daemon.load("third").await;
    assert_eq!(code, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("pinned 4000 MiB (pinned)") && message.contains("busy 4000 MiB (in use)"), "{message}");
    // Once the lease is released, busy is idle and can go.
    let id = lease.1["id"].as_str().unwrap();
    common::http::client().delete(format!("{}/vramgate/leases/{id}", daemon.url)).send().await.unwrap();
    let (code, body) = daemon.load("third").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(daemon.model("busy").await["state"], "unloaded");
    assert_eq!(daemon.model("pinned").await["state"], "ready");
}

#[tokio::test]
async fn min_residency_delays_eviction() {
    let daemon = start(
        |sim| {
            [fake_model(sim, "a", 6000, "", "min_residency = \"1500ms\""), fake_model(sim, "b", 6000, "", "")].concat()
        },
        "",
    );
    assert_eq!(daemon.load("a").await.0, 200);
    let loaded = Instant::now();
    let (code, body) = daemon.load("b").await;
    assert_eq!(code, 200, "{body}");
    assert!(loaded.elapsed() >= Duration::from_millis(1400), "a was evicted after {:?}", loaded.elapsed());
    assert_eq!(daemon.model("a").await["state"], "unloaded");
}

#[tokio::test]
async fn resident_cap_holds() {
    let daemon = start(
        |sim| {
            [fake_model(sim, "a", 100, "", ""), fake_model(sim, "b", 100, "", ""), fake_model(sim, "c", 100, "", "")]
                .concat()
        },
        "[scheduler]\nresident_cap = 2\n",
    );
    for model in ["a", "b", "c"] {
        let (code, body) = daemon.load(model).await;
        assert_eq!(code, 200, "{body}");
        let status = daemon.status().await;
        let resident = states(&status).iter().filter(|(_, s)| s != "unloaded").count();
        assert!(resident <= 2, "{status:#}");
    }
    assert_eq!(daemon.model("a").await["state"], "unloaded", "the least recently used went");
}

#[tokio::test]
async fn max_parallel_loads_serializes_loads() {
    let daemon = start(
        |sim| {
            [fake_model(sim, "a", 100, "--load-delay 300ms", ""), fake_model(sim, "b", 100, "--load-delay 300ms", "")]
                .concat()
        },
        "",
    );
    let mut events = daemon.events().await;
    let (ra, rb) = tokio::join!(daemon.load("a"), daemon.load("b"));
    assert_eq!((ra.0, rb.0), (200, 200));
    let mut loading = 0;
    let mut seen = 0;
    while seen < 4 {
        let event = events.next_of("model_state", 5 * SECOND).await;
        match event["to"].as_str() {
            Some("loading") => loading += 1,
            Some("ready") => loading -= 1,
            _ => continue,
        }
        seen += 1;
        assert!(loading <= 1, "two loads ran at once");
    }
}

#[tokio::test]
async fn a_request_that_can_never_fit_fails_at_once() {
    let daemon = start(|sim| fake_model(sim, "a", 100, "", ""), "[scheduler]\nqueue_timeout = \"30s\"\n");
    let started = Instant::now();
    let (code, body) = daemon.post("/vramgate/leases", json!({"vram": "20G", "holder": "huge"})).await;
    assert_eq!(code, 422, "{body}");
    assert!(started.elapsed() < 5 * SECOND);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("only 10000 MiB usable on GPU 0") && message.contains("need at least 20480 MiB"),
        "{message}"
    );
}

#[tokio::test]
async fn an_exclusive_lease_blocks_other_leases_and_loads_until_released() {
    let daemon = start(|sim| fake_model(sim, "a", 100, "", ""), "[scheduler]\nqueue_timeout = \"300ms\"\n");
    let (code, lock) =
        daemon.post("/vramgate/leases", json!({"vram": 100, "exclusive": true, "holder": "ffmpeg"})).await;
    assert_eq!(code, 201, "{lock}");
    let (code, body) = daemon.post("/vramgate/leases", json!({"vram": 100, "holder": "other"})).await;
    assert_eq!(code, 503, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("held exclusively by ffmpeg"), "{body}");
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 503, "{body}");
    let id = lock["id"].as_str().unwrap();
    common::http::client().delete(format!("{}/vramgate/leases/{id}", daemon.url)).send().await.unwrap();
    assert_eq!(daemon.load("a").await.0, 200);
    let (code, _) = daemon.post("/vramgate/leases", json!({"vram": 100, "holder": "other"})).await;
    assert_eq!(code, 201);
}

#[tokio::test]
async fn a_lease_jobs_own_memory_is_not_counted_twice() {
    let daemon = start(|_| String::new(), "[scheduler]\nqueue_timeout = \"2s\"\n");
    let (code, lease) =
        daemon.post("/vramgate/leases", json!({"vram": 6000, "holder": "job", "pid": std::process::id()})).await;
    assert_eq!(code, 201, "{lease}");
    // The job really uses its 6000 MiB: a process the daemon cannot attribute.
    daemon.claim(&std::process::id().to_string(), 6000);
    daemon.wait_for_status(5 * SECOND, "the job's memory", |s| s["devices"][0]["used_mib"] == 6000).await;
    let (code, body) = daemon.post("/vramgate/leases", json!({"vram": 3000, "holder": "second", "wait": "0"})).await;
    assert_eq!(code, 201, "6000 held + 3000 fit in 10000: {body}");
}

#[tokio::test]
async fn a_model_without_declared_vram_is_measured() {
    let daemon = start(|sim| common::undeclared_fake_model(sim, "a", 1234, "", "ttl = \"0\""), "");
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 200, "{body}");
    let model =
        daemon.wait_for_status(5 * SECOND, "a measured footprint", |s| s["models"][0]["measured_mib"] == 1234).await;
    assert_eq!(model["models"][0]["vram_mib"], 1234);
    assert!(model["models"][0]["declared_mib"].is_null());
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
