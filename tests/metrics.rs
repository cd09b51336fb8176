//! End-to-end: `/metrics` on the sim device. Counters and histograms count what happened (loads,
//! evictions and releases with their times, requests by model, surface and status class with
//! their admission wait and time to first byte, queue waits, leases, pressure relief); gauges are
//! read at scrape time, so a process or lease that is gone has no series; a device that cannot
//! be read (`DIR/N/.lost`) or a probe that fails exports `vramgate_device_up 0` and none of its
//! stale figures; and every metric the shipped Grafana dashboard (`dist/grafana/vramgate.json`)
//! queries is exported.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::sim_daemon::on_10000_mib as start;
use common::{Daemon, fake_model};
use serde_json::{Value, json};

const SECOND: Duration = Duration::from_secs(1);

/// The marker that makes a sim device fail its readings (see `gpu::sim::LOST`).
const LOST: &str = ".lost";

/// The metrics the dashboard queries that the sim device cannot have samples of: it reports no
/// utilization or temperature, and an unknown value is absent, never 0. Their families are still
/// declared (`# TYPE`).
const ABSENT_ON_THE_SIM: [&str; 2] = ["vramgate_device_utilization_percent", "vramgate_device_temperature_celsius"];

async fn scrape(daemon: &Daemon) -> String {
    let response = common::http::get(format!("{}/metrics", daemon.url)).await.expect("GET /metrics");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().expect("a content type").to_string();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    response.text().await.expect("the exposition")
}

/// The value of the sample written exactly `series` (name and labels as exposed), if any.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The names that have at least one sample.
fn sampled(text: &str) -> BTreeSet<&str> {
    text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).filter_map(|l| l.split(['{', ' ']).next()).collect()
}

/// The families declared with a `# TYPE` line.
fn declared(text: &str) -> BTreeSet<&str> {
    text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect()
}

async fn chat(daemon: &Daemon, path: &str, body: Value) -> u16 {
    let response =
        common::http::client().post(format!("{}{path}", daemon.url)).json(&body).send().await.expect("a request");
    let status = response.status().as_u16();
    let _ = response.bytes().await;
    status
}

async fn lease(daemon: &Daemon, mib: u64, wait: &str) -> Value {
    let body = json!({"holder": "job", "vram": format!("{mib}MiB"), "device": 0, "wait": wait, "ttl": "5m"});
    let (code, grant) = daemon.post("/vramgate/leases", body).await;
    assert_eq!(code, 201, "{grant}");
    grant
}

/// Waits until the queue holds a waiter of `kind` (`load`, `lease`) that the arbiter has looked
/// at (it has a reason: it could not be admitted, and the `queued` event went out).
async fn wait_queued(daemon: &Daemon, kind: &str) {
    daemon
        .wait_for_status(5 * SECOND, &format!("a {kind} waiting"), |s| {
            s["queue"].as_array().is_some_and(|q| q.iter().any(|w| w["kind"] == kind && w["reason"].is_string()))
        })
        .await;
}

async fn release(daemon: &Daemon, grant: &Value) {
    let id = grant["id"].as_str().expect("a lease id");
    let released = common::http::client().delete(format!("{}/vramgate/leases/{id}", daemon.url)).send().await;
    assert_eq!(released.expect("DELETE").status(), 204);
}

/// A daemon after a bit of everything, on 10000 MiB: `a` (5000 MiB) loaded and asked on both
/// surfaces (and a request for no model); `b` (6000 MiB) loaded, which evicts `a`; a 6000 MiB
/// lease, which evicts `b`; a second one, which waits in the queue until the first is released;
/// a load of `a`, which waits until the second is released; `a` released for pressure; the mode
/// `quiet` applied; at the end `b` loaded, a 500 MiB lease held and a 100 MiB named consumer.
async fn a_bit_of_everything() -> Daemon {
    let daemon = start(
        |sim| {
            format!(
                "{}{}[modes.quiet]\nunload = [\"a\"]\n",
                fake_model(sim, "a", 5000, "", ""),
                fake_model(sim, "b", 6000, "", "")
            )
        },
        "",
    );
    assert_eq!(daemon.load("a").await.0, 200);
    let messages = json!([{"role": "user", "content": "hi"}]);
    assert_eq!(chat(&daemon, "/v1/chat/completions", json!({"model": "a", "messages": messages})).await, 200);
    assert_eq!(chat(&daemon, "/api/chat", json!({"model": "a", "messages": messages, "stream": false})).await, 200);
    assert_eq!(chat(&daemon, "/v1/chat/completions", json!({"model": "nope", "messages": messages})).await, 404);
    assert_eq!(daemon.load("b").await.0, 200);
    daemon.wait_model_state("a", "unloaded", 5 * SECOND).await;

    let first = lease(&daemon, 6000, "10s").await;
    daemon.wait_model_state("b", "unloaded", 5 * SECOND).await;
    // Nothing to evict for a second one: it waits for the first.
    let url = daemon.url.clone();
    let second = tokio::spawn(async move {
        let body = json!({"holder": "job", "vram": "6000MiB", "device": 0, "wait": "10s", "ttl": "5m"});
        let response = common::http::client().post(format!("{url}/vramgate/leases")).json(&body).send().await;
        response.expect("POST").json::<Value>().await.expect("a grant")
    });
    wait_queued(&daemon, "lease").await;
    release(&daemon, &first).await;
    let second = second.await.expect("the second lease");
    assert!(second["id"].is_string(), "{second}");
    // Nor for a load of `a` while it holds 6000 MiB.
    let url = daemon.url.clone();
    let load = tokio::spawn(async move {
        let response = common::http::client().post(format!("{url}/vramgate/models/a/load")).send().await;
        response.expect("POST").status().as_u16()
    });
    wait_queued(&daemon, "load").await;
    release(&daemon, &second).await;
    assert_eq!(load.await.expect("the load"), 200);

    // 5000 + 4600 of 10000 is the emergency level: `a` is released to relieve it.
    daemon.claim("desktop", 4600);
    daemon.wait_model_state("a", "unloaded", 5 * SECOND).await;
    daemon.claim("desktop", 100);

    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "quiet"})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(daemon.load("b").await.0, 200);
    lease(&daemon, 500, "0").await;
    daemon
        .wait_for_status(5 * SECOND, "b's process and the named consumer measured", |s| {
            let device = &s["devices"][0];
            device["processes"].as_array().is_some_and(|p| p.iter().any(|p| p["model"] == "b"))
                && device["named_consumers"].as_array().is_some_and(|n| n.iter().any(|n| n["used_mib"] == 100))
        })
        .await;
    daemon
}

#[tokio::test]
async fn counters_and_histograms_count_loads_evictions_requests_leases_and_pressure() {
    let daemon = a_bit_of_everything().await;
    let text = scrape(&daemon).await;
    let expected: [(&str, f64); 23] = [
        ("vramgate_model_loads_total{model=\"a\",result=\"ready\"}", 2.0),
        ("vramgate_model_loads_total{model=\"b\",result=\"ready\"}", 2.0),
        ("vramgate_model_load_duration_seconds_count{model=\"a\"}", 2.0),
        ("vramgate_model_evictions_total{model=\"a\",reason=\"evicted_for\"}", 1.0),
        ("vramgate_model_evictions_total{model=\"b\",reason=\"evicted_for\"}", 1.0),
        ("vramgate_model_evictions_total{model=\"a\",reason=\"pressure\"}", 1.0),
        ("vramgate_pressure_reliefs_total{device=\"0\",model=\"a\"}", 1.0),
        ("vramgate_model_unloads_total{model=\"a\",reason=\"evicted_for\",result=\"released\"}", 1.0),
        ("vramgate_model_unloads_total{model=\"a\",reason=\"pressure\",result=\"released\"}", 1.0),
        ("vramgate_model_unloads_total{model=\"b\",reason=\"evicted_for\",result=\"released\"}", 1.0),
        ("vramgate_model_release_duration_seconds_count{model=\"a\"}", 2.0),
        ("vramgate_requests_total{model=\"a\",surface=\"openai\",status_class=\"2xx\"}", 1.0),
        ("vramgate_requests_total{model=\"a\",surface=\"ollama\",status_class=\"2xx\"}", 1.0),
        ("vramgate_requests_total{model=\"\",surface=\"openai\",status_class=\"4xx\"}", 1.0),
        ("vramgate_request_admission_wait_seconds_count{model=\"a\",surface=\"openai\"}", 1.0),
        ("vramgate_request_first_byte_seconds_count{model=\"a\",surface=\"ollama\"}", 1.0),
        ("vramgate_lease_waits_total", 1.0),
        ("vramgate_lease_grants_total{exclusive=\"false\"}", 3.0),
        ("vramgate_lease_releases_total{reason=\"released\"}", 2.0),
        ("vramgate_model_load_waits_total{model=\"a\"}", 1.0),
        ("vramgate_events_total{type=\"mode_changed\"}", 1.0),
        ("vramgate_mode{mode=\"quiet\"}", 1.0),
        ("vramgate_leases", 1.0),
    ];
    for (series, want) in expected {
        assert_eq!(value(&text, series), Some(want), "{series} in:\n{text}");
    }
    // The times are the real ones: the fake model loads in 50 ms, and none of this took a minute.
    let load = value(&text, "vramgate_model_load_duration_seconds_sum{model=\"a\"}").expect("a load time");
    assert!((0.1..60.0).contains(&load), "two loads of 50 ms took {load} s in all");
    // A ready model is admitted at once, well before its answer's head.
    let waited = value(&text, "vramgate_request_admission_wait_seconds_sum{model=\"a\",surface=\"openai\"}");
    let answered = value(&text, "vramgate_request_first_byte_seconds_sum{model=\"a\",surface=\"openai\"}");
    assert!(matches!((waited, answered), (Some(w), Some(a)) if w <= a && a < 30.0), "{waited:?} {answered:?}");
    // Nothing stale: `a` is gone, so are its process and the lease that was released.
    assert!(!text.lines().any(|l| l.starts_with("vramgate_process_used_bytes") && l.contains("model=\"a\"")), "{text}");
    assert_eq!(text.lines().filter(|l| l.starts_with("vramgate_lease_vram_bytes{")).count(), 1, "{text}");
    assert!(text.contains("vramgate_lease_vram_bytes{id=\""), "{text}");
    assert_eq!(
        value(&text, "vramgate_model_state{model=\"a\",backend=\"process\",state=\"unloaded\",placement=\"\"}"),
        Some(1.0)
    );
}

/// Every name the dashboard's queries use (panels, annotations, variables): each `vramgate_…`
/// token of each expression.
fn dashboard_metrics() -> BTreeSet<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/grafana/vramgate.json");
    let text = std::fs::read_to_string(&path).expect("the dashboard");
    let dashboard: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
    let mut queries = Vec::new();
    fn walk(value: &Value, queries: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr" | "query" | "definition", Value::String(query)) => queries.push(query.clone()),
                        _ => walk(value, queries),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|item| walk(item, queries)),
            _ => {}
        }
    }
    walk(&dashboard, &mut queries);
    let mut names = BTreeSet::new();
    for query in &queries {
        let mut rest = query.as_str();
        while let Some(start) = rest.find("vramgate_") {
            let tail = &rest[start..];
            let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    names
}

#[tokio::test]
async fn every_metric_the_grafana_dashboard_queries_is_exported() {
    let wanted = dashboard_metrics();
    assert!(wanted.len() >= 25, "the dashboard queries only {wanted:?}");
    let daemon = a_bit_of_everything().await;
    let text = scrape(&daemon).await;
    let (sampled, declared) = (sampled(&text), declared(&text));
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|name| !sampled.contains(name.as_str()))
        .filter(|name| !(ABSENT_ON_THE_SIM.contains(&name.as_str()) && declared.contains(name.as_str())))
        .collect();
    assert!(missing.is_empty(), "queried by the dashboard but not on /metrics: {missing:?}\n{text}");
    // The exceptions are real: queried, and without a sample on the sim only.
    for name in ABSENT_ON_THE_SIM {
        assert!(wanted.contains(name) && !sampled.contains(name), "{name}: drop it from ABSENT_ON_THE_SIM");
    }
}

/// Two 8192 MiB devices sampled every 50 ms; device 1 holds a 1000 MiB named consumer.
fn two_devices() -> Daemon {
    Daemon::start(|sim| {
        std::fs::create_dir_all(sim.join("1")).expect("sim dir");
        std::fs::write(sim.join("1").join("desktop"), "1000").expect("claim");
        format!(
            "[gpu]\nprobe = \"sim\"\nsample_interval = \"50ms\"\nreserve_mib = 0\n[gpu.sim]\ndir = \"{}\"\n\
             devices = [{{ name = \"Sim A\", total_mib = 8192 }}, {{ name = \"Sim B\", total_mib = 8192 }}]\n",
            sim.display()
        )
    })
}

/// The sample lines about `device` but its `vramgate_device_up`.
fn figures_of(text: &str, device: u32) -> Vec<&str> {
    let label = format!("device=\"{device}\"");
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains(&label) && !l.starts_with("vramgate_device_up{"))
        .collect()
}

#[tokio::test]
async fn a_lost_device_is_down_without_stale_figures_and_comes_back() {
    let daemon = two_devices();
    let text = scrape(&daemon).await;
    assert_eq!(value(&text, "vramgate_device_up{device=\"1\",name=\"Sim B\"}"), Some(1.0), "{text}");
    assert_eq!(value(&text, "vramgate_device_used_bytes{device=\"1\",name=\"Sim B\"}"), Some(1000.0 * 1048576.0));

    let marker = Daemon::sim_dir_for(&daemon.dir).join("1").join(LOST);
    std::fs::write(&marker, "GPU_IS_LOST").expect("marker");
    daemon.wait_for_status(5 * SECOND, "GPU 1 failing", |s| s["devices"][1]["error"].is_string()).await;
    let text = scrape(&daemon).await;
    assert_eq!(value(&text, "vramgate_device_up{device=\"1\",name=\"Sim B\"}"), Some(0.0), "{text}");
    assert_eq!(figures_of(&text, 1), Vec::<&str>::new(), "stale figures of the lost device:\n{text}");
    assert_eq!(value(&text, "vramgate_device_up{device=\"0\",name=\"Sim A\"}"), Some(1.0), "{text}");
    assert_eq!(value(&text, "vramgate_device_used_bytes{device=\"0\",name=\"Sim A\"}"), Some(0.0), "{text}");

    std::fs::remove_file(&marker).expect("marker");
    daemon.wait_for_status(5 * SECOND, "GPU 1 back", |s| s["devices"][1]["error"].is_null()).await;
    let text = scrape(&daemon).await;
    assert_eq!(value(&text, "vramgate_device_up{device=\"1\",name=\"Sim B\"}"), Some(1.0), "{text}");
    assert_eq!(value(&text, "vramgate_device_free_bytes{device=\"1\",name=\"Sim B\"}"), Some(7192.0 * 1048576.0));
}

#[tokio::test]
async fn a_failing_probe_leaves_every_device_down_without_figures() {
    let daemon = two_devices();
    daemon.wait_for_status(5 * SECOND, "both devices read", |s| s["devices"][1]["used_mib"] == 1000).await;
    // A plain file where the sim directory should be makes every sample fail.
    let sim = Daemon::sim_dir_for(&daemon.dir);
    std::fs::remove_dir_all(&sim).expect("remove the sim dir");
    std::fs::write(&sim, "not a directory").expect("a file in its place");
    daemon.wait_for_status(5 * SECOND, "the probe failing", |s| s["degraded"] == true).await;
    let text = scrape(&daemon).await;
    for device in [0, 1] {
        let name = if device == 0 { "Sim A" } else { "Sim B" };
        assert_eq!(value(&text, &format!("vramgate_device_up{{device=\"{device}\",name=\"{name}\"}}")), Some(0.0));
        assert_eq!(figures_of(&text, device), Vec::<&str>::new(), "stale figures of GPU {device}:\n{text}");
    }
    assert_eq!(value(&text, "vramgate_degraded{probe=\"sim\"}"), Some(1.0), "{text}");
}
