//! End-to-end: demotion to a model's CPU form and promotion back to the GPU, when they overlap
//! with other work: an unload or a load during a demotion, a promotion while the CPU form streams
//! an answer, the resident cap, lasting pressure (no flapping), and an external app that refuses
//! `cpu` (no tight retry loop). Each test was written in review against a bug it proved; its doc
//! comment says what used to go wrong.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::app::{Answer, App};
use common::sim_daemon::on_8000_mib as start;
use common::{Daemon, cpu_form, fake, fake_model, model_in as model, never_within, sim_config};
use futures_util::StreamExt;
use serde_json::{Value, json};

const SECOND: Duration = Duration::from_secs(1);

/// Collects every event of the daemon in the background.
fn collect_events(mut events: common::EventStream) -> Arc<Mutex<Vec<Value>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    tokio::spawn(async move {
        loop {
            let event = events.next(Duration::from_secs(3600)).await;
            out.lock().unwrap().push(event);
        }
    });
    seen
}

/// Used to fail: `vramgate unload` of a model while it is being demoted to the CPU is never answered, and
/// the model ends up ready on the CPU instead of unloaded. `request_unload` parks the caller in
/// `unload_waiters` of an `Unloading` model, but `on_released` with `then_cpu` starts the CPU
/// form and returns without looking at `unload_waiters`.
#[tokio::test]
async fn an_unload_during_a_demotion_is_answered_and_the_model_ends_unloaded() {
    let daemon = start(|sim| {
        format!(
            "{}[modes.quiet]\ncpu = [\"a\"]\n",
            // The GPU form takes 1.5 s to let go of its memory after SIGTERM: the demotion is slow.
            fake_model(sim, "a", 2000, "--stop-delay 1500ms", &format!("{}stop_timeout = \"5s\"", cpu_form(sim, "a")))
        )
    });
    assert_eq!(daemon.load("a").await.0, 200);
    let url = daemon.url.clone();
    let mode = tokio::spawn(async move {
        common::http::client().post(format!("{url}/vramgate/mode")).json(&json!({"mode": "quiet"})).send().await
    });
    daemon.wait_model_state("a", "unloading", 5 * SECOND).await;
    let url = daemon.url.clone();
    let unload = tokio::spawn(async move {
        let response = common::http::client().post(format!("{url}/vramgate/models/a/unload")).send().await.unwrap();
        let code = response.status().as_u16();
        (code, response.json::<Value>().await.unwrap_or_default())
    });
    // The demotion completes within ~1.5 s; the unload must be answered soon after.
    let answered = tokio::time::timeout(8 * SECOND, unload).await;
    let status = daemon.status().await;
    let (code, body) = answered
        .unwrap_or_else(|_| {
            panic!("`unload a` asked during its demotion was never answered; a is now: {}", model(&status, "a"))
        })
        .unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(daemon.model("a").await["state"], "unloaded");
    let _ = mode.await;
}

/// Used to fail: `vramgate load` of a model while it is being demoted answers 200 with the model on the
/// CPU. The README says a load of a model on the CPU promotes it; here the load's caller joins the
/// demotion's `ready_waiters` and is answered when the CPU form is ready.
#[tokio::test]
async fn a_load_during_a_demotion_ends_with_the_model_on_the_gpu() {
    let daemon = start(|sim| {
        format!(
            "{}[modes.quiet]\ncpu = [\"a\"]\n",
            fake_model(sim, "a", 2000, "--stop-delay 1s", &format!("{}stop_timeout = \"5s\"", cpu_form(sim, "a")))
        )
    });
    assert_eq!(daemon.load("a").await.0, 200);
    let url = daemon.url.clone();
    let mode = tokio::spawn(async move {
        common::http::client().post(format!("{url}/vramgate/mode")).json(&json!({"mode": "quiet"})).send().await
    });
    daemon.wait_model_state("a", "unloading", 5 * SECOND).await;
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["placement"], "gpu", "`load a` answered with a on the CPU: {body}");
    let _ = mode.await;
}

/// Used to fail: promoting a model from its CPU form (`vramgate load` of a model a mode put on the CPU)
/// stops the CPU form even while a request is streaming from it: `start_load` closes the gate with
/// `close()` (not `close_if_idle`) and `start_process` stops the previous process at once. The
/// README: "While the answer is being sent the model is in use and never evicted".
#[tokio::test]
async fn a_promotion_does_not_break_a_request_streaming_from_the_cpu_form() {
    let daemon = start(|sim| {
        let cpu = format!(
            "cpu_cmd = \"{} --port ${{PORT}} --sim-dir {} --vram 0 --name a-cpu --token-delay 300ms\"\n",
            fake(),
            sim.display()
        );
        format!("{}[modes.quiet]\ncpu = [\"a\"]\n", fake_model(sim, "a", 1000, "", &cpu))
    });
    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "quiet"})).await;
    assert_eq!(code, 200, "{body}");
    let response = common::http::client()
        .post(format!("{}/v1/chat/completions", daemon.url))
        .json(&json!({"model": "a", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let first = tokio::time::timeout(5 * SECOND, stream.next()).await.expect("a first chunk");
    assert!(first.is_some_and(|c| c.is_ok()));
    assert_eq!(daemon.model("a").await["in_use"], 1);
    // Promote it while the answer streams.
    let url = daemon.url.clone();
    let load = tokio::spawn(async move {
        common::http::client().post(format!("{url}/vramgate/models/a/load")).send().await.map(|r| r.status())
    });
    let mut body = String::new();
    let outcome = loop {
        match tokio::time::timeout(10 * SECOND, stream.next()).await {
            Err(_) => break Err("no chunk within 10 s".to_string()),
            Ok(None) => break Ok(()),
            Ok(Some(Err(e))) => break Err(format!("the stream broke: {e}")),
            Ok(Some(Ok(chunk))) => body.push_str(&String::from_utf8_lossy(&chunk)),
        }
    };
    assert!(
        outcome.is_ok() && body.contains("[DONE]"),
        "the answer streaming from a's CPU form was cut by the promotion: {outcome:?}; received: {body}"
    );
    let _ = load.await;
}

/// Used to fail: `promote_demoted` ignores `[scheduler] resident_cap`: a model demoted to make room under
/// the cap is promoted straight back as soon as the memory allows it, so more models are resident
/// on the GPU than the cap permits.
#[tokio::test]
async fn a_promotion_does_not_exceed_the_resident_cap() {
    let daemon = Daemon::start(|sim| {
        format!(
            "{}[scheduler]\nresident_cap = 1\n{}{}",
            sim_config(sim, 8000, "50ms", "reserve_mib = 0"),
            fake_model(sim, "a", 1000, "", &format!("{}on_evict = \"cpu\"\nttl = \"0\"", cpu_form(sim, "a"))),
            fake_model(sim, "b", 1000, "", "ttl = \"0\"")
        )
    });
    assert_eq!(daemon.load("a").await.0, 200);
    let (code, body) = daemon.load("b").await;
    assert_eq!(code, 200, "{body}");
    never_within(&daemon, 2 * SECOND, "resident_cap = 1, yet two models hold the GPU", |s| {
        let on_gpu = s["models"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| {
                (m["state"] == "ready" && m["placement"] == "gpu") || (m["state"] == "loading" && m["device"] == 0)
            })
            .count();
        on_gpu > 1
    })
    .await;
}

/// Used to fail: a model demoted under pressure (`on_evict = "cpu"`) is promoted straight back by
/// `promote_demoted`, which only asks the policy whether it fits (usable − foreign), not whether
/// the device would be back at the emergency level; pressure relief then demotes it again, and so
/// on: the model flaps between GPU and CPU for as long as the pressure lasts.
#[tokio::test]
async fn a_model_demoted_under_pressure_does_not_flap_between_gpu_and_cpu() {
    let daemon =
        start(|sim| fake_model(sim, "a", 1000, "", &format!("{}on_evict = \"cpu\"\nttl = \"0\"", cpu_form(sim, "a"))));
    assert_eq!(daemon.load("a").await.0, 200);
    let events = collect_events(daemon.events().await);
    // 1000 + 6700 of 8000 = 96 %: emergency. Without a, 84 %: below critical.
    daemon.claim("desktop", 6700);
    let count = |reason: &str| {
        events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| {
                e["type"] == "model_state" && e["model"] == "a" && e["to"] == "loading" && e["reason"] == reason
            })
            .count()
    };
    let end = Instant::now() + 5 * SECOND;
    while count("demoted") == 0 {
        assert!(Instant::now() < end, "a was not demoted under pressure within 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Watch for 3 s (or until it has clearly looped).
    let end = Instant::now() + 3 * SECOND;
    while Instant::now() < end && count("demoted") < 5 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (demotions, promotions) = (count("demoted"), count("promoted"));
    assert!(
        demotions <= 1 && promotions == 0,
        "under lasting pressure, a was demoted {demotions} times and promoted {promotions} times: \
         promoted back into the emergency, demoted again, and so on"
    );
}

/// Used to fail: an external model whose app cannot carry out `cpu` is re-evicted and re-demoted in a
/// tight loop: the `demotion_failed` path in `on_ack` makes it `ready` on the GPU again and calls
/// `memory_released`, so the waiting load is reconsidered at once, evicts it again, and the app
/// gets another `cpu` instruction, as fast as it can answer.
#[tokio::test]
async fn a_failed_external_demotion_is_not_retried_in_a_tight_loop() {
    let daemon = start(|sim| {
        format!(
            "[models.clip]\nbackend = \"external\"\nvram = 1000\non_evict = \"cpu\"\npriority = 10\n{}",
            fake_model(sim, "big", 7500, "", "priority = 50\nttl = \"0\"")
        )
    });
    let app =
        App::attach(&daemon, "clip", 1000, |action| if action == "cpu" { Answer::Fail } else { Answer::Ok }).await;
    let (code, body) = daemon.load("clip").await;
    assert_eq!(code, 200, "{body}");
    let url = daemon.url.clone();
    let _big =
        tokio::spawn(
            async move { common::http::client().post(format!("{url}/vramgate/models/big/load")).send().await },
        );
    // The demotion must happen (big needs clip's room), or there is no retry to count.
    let asked = Instant::now() + 3 * SECOND;
    while !app.actions().iter().any(|a| a == "cpu") {
        assert!(
            Instant::now() < asked,
            "clip was never told `cpu` within 3 s to make room for big: {:?}",
            app.actions()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let end = Instant::now() + 3 * SECOND;
    while Instant::now() < end {
        let cpu = app.actions().iter().filter(|a| *a == "cpu").count();
        assert!(cpu <= 3, "the app got {cpu} `cpu` instructions within 3 s after refusing the first one");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.exit();
}
