//! End-to-end: pressure relief. When foreign use takes the device to the emergency level, idle
//! models are released by priority, one at a time (each release waited for until its memory is
//! back), until the device is below critical; higher-priority models stay.

mod common;

use std::time::{Duration, Instant};

use chrono::Utc;
use common::fake_model;
use common::scheduling::{event_time, next_state};
use common::sim_daemon::on_10000_mib as start;

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test]
async fn emergency_pressure_evicts_idle_models() {
    let daemon = start(
        |sim| {
            [fake_model(sim, "low", 3000, "", "priority = 1"), fake_model(sim, "high", 3000, "", "priority = 9")]
                .concat()
        },
        "",
    );
    assert_eq!(daemon.load("low").await.0, 200);
    assert_eq!(daemon.load("high").await.0, 200);
    // 6000 used by models; a foreign 3600 takes the device to 96 % (emergency).
    daemon.claim("desktop", 3600);
    daemon.wait_model_state("low", "unloaded", 5 * SECOND).await;
    // 6600 of 10000 is below critical (87.5 %): relief stops there.
    daemon.wait_for_status(5 * SECOND, "the memory back", |s| s["devices"][0]["used_mib"] == 6600).await;
    assert_eq!(daemon.model("high").await["state"], "ready");
}

#[tokio::test]
async fn pressure_relief_releases_one_model_at_a_time_waiting_for_each_release() {
    // Each release takes 400 ms: the server holds its memory for that long after SIGTERM.
    let slow = "--stop-delay 400ms";
    let daemon = start(
        |sim| {
            [
                fake_model(sim, "low1", 500, slow, "priority = 1"),
                fake_model(sim, "low2", 1000, slow, "priority = 2"),
                fake_model(sim, "high", 4100, "", "priority = 9"),
            ]
            .concat()
        },
        "",
    );
    for model in ["low1", "low2", "high"] {
        assert_eq!(daemon.load(model).await.0, 200, "{model}");
    }
    let mut events = daemon.events().await;
    // 5600 used by models; a foreign 4000 takes the device to 96 % (emergency). Releasing low1
    // leaves 91 % (still critical: relief goes on), releasing low2 81 % (relief stops).
    let claimed = Utc::now();
    daemon.claim("desktop", 4000);
    let first = next_state(&mut events, "low1", "unloading", 5 * SECOND).await;
    assert_eq!(first["reason"], "pressure", "{first}");
    // The next relief starts only once the first release is complete (its memory is back).
    let mut order = Vec::new();
    let end = Instant::now() + 10 * SECOND;
    while order.len() < 2 {
        let event = events.next_of("model_state", end.saturating_duration_since(Instant::now())).await;
        match (event["model"].as_str(), event["to"].as_str()) {
            (Some("low1"), Some("unloaded")) | (Some("low2"), Some("unloading")) => order.push(event),
            _ => {}
        }
    }
    assert_eq!(
        (order[0]["model"].as_str(), order[1]["model"].as_str()),
        (Some("low1"), Some("low2")),
        "low2's relief began before low1's memory was back: {order:?}"
    );
    assert_eq!(order[1]["reason"], "pressure", "{}", order[1]);
    let first_release = (event_time(&order[0]) - event_time(&first)).to_std().unwrap_or_default();
    assert!(first_release >= Duration::from_millis(350), "low1's release took only {first_release:?}");
    next_state(&mut events, "low2", "unloaded", 5 * SECOND).await;
    // 4100 + 4000 of 10000 is below critical (87.5 %): relief stops there.
    daemon.wait_for_status(5 * SECOND, "the memory back", |s| s["devices"][0]["used_mib"] == 8100).await;
    common::never_within(&daemon, Duration::from_millis(300), "high must stay", |s| {
        common::model_in(s, "high")["state"] != "ready"
    })
    .await;
    let took = (Utc::now() - claimed).to_std().unwrap_or_default();
    assert!(took < 5 * SECOND, "relief took {took:?}");
}
