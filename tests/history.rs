//! `GET /vramgate/history` (the daemon's ring of recent samples) and how the dashboard is served:
//! its JSON contract, `since` as a time or as seconds, a bad `since` named in a 400, `GET /`
//! redirecting browsers to `/ui/` while `curl /` keeps its text list, and the dashboard's files
//! served without the token while the data behind them needs it.

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, fake_model, sim_config};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(15);

fn start(server: &str) -> Daemon {
    Daemon::start(|sim| {
        format!("{server}{}{}", sim_config(sim, 8192, "100ms", ""), fake_model(sim, "llm", 5000, "", ""))
    })
}

/// A client that does not follow redirects, so a test sees them.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("an HTTP client")
}

/// Waits until the history holds a sample for which `check` holds; returns the whole document.
async fn wait_for_history(daemon: &Daemon, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let history = daemon.get_json("/vramgate/history").await;
        if history["samples"].as_array().is_some_and(|samples| samples.iter().any(&check)) {
            return history;
        }
        assert!(started.elapsed() < DEADLINE, "no sample with {what} within {DEADLINE:?}: {history}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn owner<'a>(sample: &'a Value, kind: &str, id: &str) -> Option<&'a Value> {
    sample["owners"].as_array()?.iter().find(|o| o["kind"] == kind && o["id"] == id)
}

#[tokio::test]
async fn history_records_devices_and_owners_newest_last() {
    let daemon = start("");
    daemon.claim("desktop", 700);
    assert_eq!(daemon.load("llm").await.0, 200);
    let history = wait_for_history(&daemon, "llm and the desktop consumer", |sample| {
        owner(sample, "model", "llm").is_some_and(|o| o["mib"] == 5000)
            && owner(sample, "consumer", "desktop").is_some_and(|o| o["mib"] == 700)
    })
    .await;
    assert_eq!(history["interval_ms"], 100);
    assert!(history["capacity"].as_u64().is_some_and(|c| c >= 3600), "{history}");
    assert_eq!(history["limits"]["warning_pct"], 75.0);
    // The status document carries the same limits (what `vramgate top` draws its bars with).
    assert_eq!(daemon.status().await["limits"], history["limits"]);
    let samples = history["samples"].as_array().expect("samples");
    let newest = samples.last().expect("a sample");
    let device = &newest["devices"][0];
    assert_eq!((device["index"].as_u64(), device["total_mib"].as_u64()), (Some(0), Some(8192)));
    assert_eq!(device["used_mib"].as_u64().zip(device["free_mib"].as_u64()).map(|(u, f)| u + f), Some(8192));
    assert_eq!(device["level"], "ok", "5700 of 8192 MiB is 70 %");
    let times: Vec<chrono::DateTime<chrono::Utc>> =
        samples.iter().map(|s| s["time"].as_str().expect("time").parse().expect("RFC 3339")).collect();
    // At most one sample a second (the monitor samples every 100 ms), newest last.
    assert!(times.windows(2).all(|w| w[0].timestamp() < w[1].timestamp()), "{times:?}");

    // `since` as a time: nothing after the newest; as seconds ago: the recent ones.
    let after = (*times.last().expect("a time") + chrono::TimeDelta::seconds(5)).to_rfc3339();
    let later = daemon.get_json(&format!("/vramgate/history?since={}", after.replace('+', "%2B"))).await;
    assert_eq!(later["samples"].as_array().map(Vec::len), Some(0), "{later}");
    let recent = daemon.get_json("/vramgate/history?since=3600").await;
    assert!(recent["samples"].as_array().is_some_and(|s| !s.is_empty()), "{recent}");
}

#[tokio::test]
async fn a_bad_since_is_a_400_naming_the_parameter() {
    let daemon = start("");
    let response = client().get(format!("{}/vramgate/history?since=yesterday", daemon.url)).send().await.expect("GET");
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.expect("JSON");
    let message = body["error"]["message"].as_str().expect("a message");
    assert!(message.contains("`since`") && message.contains("RFC 3339"), "{message}");
}

#[tokio::test]
async fn browsers_are_sent_to_the_dashboard_and_curl_keeps_the_text_list() {
    let daemon = start("");
    let http = client();
    let browser =
        http.get(format!("{}/", daemon.url)).header("accept", "text/html,*/*;q=0.8").send().await.expect("GET");
    assert_eq!(browser.status(), 303);
    assert_eq!(browser.headers()["location"], "/ui/");
    let curl = http.get(format!("{}/", daemon.url)).header("accept", "*/*").send().await.expect("GET");
    assert_eq!(curl.status(), 200);
    assert!(curl.text().await.expect("text").contains("GET /vramgate/history"));
    let page = http.get(format!("{}/ui/", daemon.url)).send().await.expect("GET");
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert!(page.text().await.expect("html").contains("<script src=\"app.js\""));
    let missing = http.get(format!("{}/ui/nothing.js", daemon.url)).send().await.expect("GET");
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn with_a_token_the_files_are_open_and_the_data_is_not() {
    let daemon = start("[server]\ntoken = \"s3cret\"\n");
    let http = client();
    for file in ["/ui/", "/ui/app.js", "/ui/app.css", "/ui/uPlot.iife.min.js", "/ui/uPlot.min.css"] {
        let response = http.get(format!("{}{file}", daemon.url)).send().await.expect("GET");
        assert_eq!(response.status(), 200, "{file} holds no data and is served without the token");
    }
    let browser = http.get(format!("{}/", daemon.url)).header("accept", "text/html").send().await.expect("GET");
    assert_eq!(browser.status(), 303, "the redirect needs no token");
    let history = http.get(format!("{}/vramgate/history", daemon.url)).send().await.expect("GET");
    assert_eq!(history.status(), 401);
    let authorized =
        http.get(format!("{}/vramgate/history", daemon.url)).bearer_auth("s3cret").send().await.expect("GET");
    assert_eq!(authorized.status(), 200);
    let curl = http.get(format!("{}/", daemon.url)).send().await.expect("GET");
    assert_eq!(curl.status(), 401, "the text list stays behind the token");
}
