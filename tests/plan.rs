//! `vramgate plan` and `POST /vramgate/plan` through the real daemon on the demo's numbers: an
//! 8 GiB sim device with 512 MiB reserved and a 1 GiB desktop; llm 5 GiB and vision 3 GiB at
//! priority 50, stt 1.5 GiB at priority 80. Verdicts and exit codes, the measurement and its
//! restoration (also when the client goes away), and the errors.

mod common;

use std::time::Duration;

use serde_json::{Value, json};

use common::{Daemon, fake_model, model_in, sim_config};

const SECOND: Duration = Duration::from_secs(1);

/// The demo's models; `extra` adds tables (TOML), `vision_args` fake-server flags and
/// `vision_keys` model keys for vision.
fn demo(extra: &str, vision_args: &str, vision_keys: &str) -> Daemon {
    let extra = extra.to_string();
    let vision_args = vision_args.to_string();
    let vision_keys = format!("priority = 50\n{vision_keys}");
    let daemon = Daemon::start(move |sim| {
        format!(
            "{}\n{}\n{}\n{}\n{extra}",
            sim_config(sim, 8192, "20ms", "reserve_mib = 512"),
            fake_model(sim, "llm", 5120, "", "priority = 50"),
            fake_model(sim, "stt", 1536, "", "priority = 80"),
            fake_model(sim, "vision", 3072, &vision_args, &vision_keys),
        )
    });
    daemon.claim("desktop", 1024);
    daemon
}

async fn wait_desktop(daemon: &Daemon) {
    daemon.wait_for_status(5 * SECOND, "the desktop's 1 GiB", |s| s["devices"][0]["used_mib"] == 1024).await;
}

fn plan_cli(daemon: &Daemon, args: &[&str]) -> (i32, String) {
    let mut command = common::vramgate();
    command.arg("plan").args(args).env("VRAMGATE_URL", &daemon.url);
    let output = common::output_within(&mut command, 60 * SECOND);
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    (output.status.code().unwrap_or(-1), stdout)
}

#[tokio::test]
async fn verdicts_are_the_exit_status_and_the_report_says_why() {
    let daemon = demo("", "", "");
    wait_desktop(&daemon).await;
    // All three: stt and llm take the 6656 MiB there are; vision does not fit.
    let (code, text) = plan_cli(&daemon, &[]);
    assert_eq!(code, 4, "{text}");
    assert!(text.starts_with("NO-GO: "), "{text}");
    assert!(text.contains("vision: needs 3072 MiB"), "{text}");
    // llm and stt fill the device exactly: MARGINAL.
    let (code, text) = plan_cli(&daemon, &["llm", "stt"]);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("free after: 0 MiB"), "{text}");
    // stt and vision leave 2048 MiB (26.7%): GO; the JSON goes to stdout and to the report file.
    let report = daemon.dir.path().join("plan.json");
    let report_arg = report.to_str().expect("utf-8 path");
    let (code, text) = plan_cli(&daemon, &["stt", "vision", "--json", "--report", report_arg]);
    assert_eq!(code, 0, "{text}");
    let json: Value = serde_json::from_str(&text).expect("JSON on stdout");
    assert_eq!(json["verdict"], "GO");
    assert_eq!(json["devices"][0]["headroom_mib"], 2048);
    assert_eq!(json["devices"][0]["foreign_mib"], 1024);
    assert_eq!(json["models"], json!(["stt", "vision"]));
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report written")).expect("JSON");
    assert_eq!(written, json);
    // With llm loaded, stt and vision still GO, and the report names llm's eviction.
    assert_eq!(daemon.load("llm").await.0, 200);
    let (code, text) = plan_cli(&daemon, &["stt", "vision"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("llm (GPU 0, for vision)"), "{text}");
    assert_eq!(daemon.model("llm").await["state"], "ready", "a plan without --measure changes nothing");
}

#[tokio::test]
async fn a_measurement_loads_alone_then_together_finds_the_peak_and_puts_things_back() {
    // vision's warmup request holds 400 MiB more while it is answered (a request's working memory).
    let warmup = "warmup = { path = \"/v1/chat/completions\", body = { model = \"vision\", messages = [{ role = \"user\", content = \"look\" }] } }";
    let daemon = demo("", "--grow-vram 400 --token-delay 40ms", warmup);
    wait_desktop(&daemon).await;
    let (status, report) = daemon.post("/vramgate/plan", json!({ "models": ["stt", "vision"], "measure": true })).await;
    assert_eq!(status, 200, "{report:#}");
    let measurement = &report["measurement"];
    assert_eq!(measurement["interrupted"], Value::Null, "{report:#}");
    assert_eq!(measurement["baseline"][0]["used_mib"], 1024, "{report:#}");
    let model = |id: &str| measurement["models"].as_array().and_then(|m| m.iter().find(|m| m["id"] == id)).cloned();
    let stt = model("stt").expect("stt measured");
    assert_eq!(stt["alone_mib"], 1536, "{report:#}");
    assert!(stt["load_s"].as_f64().is_some_and(|s| s > 0.0), "{report:#}");
    assert_eq!(measurement["together"][0]["used_mib"], 1024 + 1536 + 3072, "{report:#}");
    // The peak step: vision's request held its 400 MiB while the readings were watched.
    assert_eq!(model("vision").expect("vision measured")["peak_mib"], 3072 + 400, "{report:#}");
    assert!(measurement["peak"][0]["used_mib"].as_u64().is_some_and(|u| u >= 1024 + 1536 + 3072 + 400), "{report:#}");
    assert_eq!(report["verdict"], "GO", "{report:#}");
    assert_eq!(measurement["restored"], json!(["stt", "vision"]));
    let status = daemon.status().await;
    for id in ["stt", "vision"] {
        assert_eq!(model_in(&status, id)["state"], "unloaded", "{id} put back: {status:#}");
    }
}

#[tokio::test]
async fn a_measurement_leaves_loaded_models_alone_and_never_evicts_them() {
    let daemon = demo("", "", "");
    wait_desktop(&daemon).await;
    assert_eq!(daemon.load("llm").await.0, 200);
    // stt fits beside llm; vision would evict it, so the measurement stops there and says why.
    let (status, report) = daemon.post("/vramgate/plan", json!({ "models": ["stt", "vision"], "measure": true })).await;
    assert_eq!(status, 200, "{report:#}");
    let interrupted = report["measurement"]["interrupted"].as_str().unwrap_or_default();
    assert!(interrupted.contains("vision was not loaded: it would evict llm"), "{report:#}");
    let status = daemon.status().await;
    assert_eq!(model_in(&status, "llm")["state"], "ready", "{status:#}");
    assert_eq!(model_in(&status, "stt")["state"], "unloaded", "{status:#}");
    assert_eq!(model_in(&status, "vision")["state"], "unloaded", "{status:#}");
}

#[tokio::test]
async fn a_client_that_goes_away_stops_the_measurement_and_the_daemon_puts_things_back() {
    let daemon = demo("", "--load-delay 8s", "");
    wait_desktop(&daemon).await;
    let url = daemon.url.clone();
    let request = tokio::spawn(async move {
        common::http::client()
            .post(format!("{url}/vramgate/plan"))
            .json(&json!({ "models": ["vision"], "measure": true }))
            .send()
            .await
    });
    daemon.wait_model_state("vision", "loading", 5 * SECOND).await;
    request.abort();
    // The load in flight is given up and vision is unloaded again, well before it would be ready.
    daemon.wait_model_state("vision", "unloaded", 5 * SECOND).await;
    // And the daemon takes the next measurement (the first one let go of its turn).
    let (status, report) = daemon.post("/vramgate/plan", json!({ "models": ["stt"], "measure": true })).await;
    assert_eq!(status, 200, "{report:#}");
}

#[tokio::test]
async fn bad_plan_requests_are_clear_errors() {
    let daemon = demo("[modes.day]\ngpu = [\"stt\"]\n", "", "");
    let (status, body) = daemon.post("/vramgate/plan", json!({ "models": ["nope"] })).await;
    assert_eq!(status, 404, "{body:#}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("nope"), "{body:#}");
    let (status, body) = daemon.post("/vramgate/plan", json!({ "margin_pct": 80 })).await;
    assert_eq!(status, 400, "{body:#}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("margin_pct"), "{body:#}");
    let (status, body) = daemon.post("/vramgate/plan", json!({ "mode": "night" })).await;
    assert_eq!(status, 404, "{body:#}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("day"), "{body:#}");
    let (status, body) = daemon.post("/vramgate/plan", json!({ "modles": [] })).await;
    assert_eq!(status, 400, "{body:#}");
    // A mode's GPU models are the set.
    let (status, body) = daemon.post("/vramgate/plan", json!({ "mode": "day" })).await;
    assert_eq!((status, body["models"].clone()), (200, json!(["stt"])), "{body:#}");
}

/// A model nothing is known of is measured (the advice a NO-GO gives for it), and a measurement
/// that fails is a NO-GO that says why first, whatever the declared figures say.
#[tokio::test]
async fn an_unknown_model_is_measured_and_a_failed_measurement_is_no_go() {
    let extra = |sim: &std::path::Path| {
        format!(
            "{}\n{}",
            common::undeclared_fake_model(sim, "unknown", 700, "", ""),
            fake_model(sim, "broken", 500, "--exit-on-start 3", "")
        )
    };
    let daemon =
        Daemon::start(move |sim| format!("{}\n{}", sim_config(sim, 8192, "20ms", "reserve_mib = 512"), extra(sim)));
    let (code, text) = plan_cli(&daemon, &["unknown"]);
    assert_eq!(code, 4, "unknown without a measurement: {text}");
    assert!(text.contains("--measure"), "{text}");
    let (code, text) = plan_cli(&daemon, &["unknown", "--measure", "--json"]);
    assert_eq!(code, 0, "{text}");
    let report: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(report["measurement"]["models"][0]["alone_mib"], 700, "{report:#}");
    assert_eq!(report["devices"][0]["models"][0]["source"], "peak", "{report:#}");
    // The declared 500 MiB would fit, but the model does not start: NO-GO, the reason first.
    let (code, text) = plan_cli(&daemon, &["broken", "--measure"]);
    assert_eq!(code, 4, "{text}");
    assert!(text.starts_with("NO-GO: the measurement of broken stopped early: loading broken failed"), "{text}");
    let broken = daemon.model("broken").await;
    assert!(broken["state"] == "unloaded" || broken["state"] == "failed", "nothing left running: {broken:#}");
}
