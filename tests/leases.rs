//! End-to-end: what a lease's holder is promised. `lease_released` says why a lease ended
//! (`released`, `disconnected`, `expired`), and a model lease keeps its model loaded, in use and
//! where it is: no promotion stops the CPU form it holds, and no mode demotes or unloads it (409,
//! naming the holder), the one-shot form of an external model included. Each test written in
//! review against a bug says in its doc comment what used to go wrong.

mod common;

use std::time::{Duration, Instant};

use common::sim_daemon::on_8000_mib as start;
use common::{cpu_form, fake_model, model_in as model};
use serde_json::json;

const SECOND: Duration = Duration::from_secs(1);

/// `lease_released` says why: `released` (the holder let go), `disconnected` (a connection-held
/// lease whose client went away), `expired` (a heartbeat lease not renewed within its ttl).
#[tokio::test]
async fn lease_released_says_released_disconnected_or_expired() {
    let daemon = start(|_| String::new());
    let mut events = daemon.events().await;

    let (code, grant) =
        daemon.post("/vramgate/leases", json!({"vram": "100MiB", "holder": "let-go", "ttl": "60s"})).await;
    assert_eq!(code, 201, "{grant}");
    let id = grant["id"].as_str().unwrap();
    let response =
        common::http::client().delete(format!("{}/vramgate/leases/{id}", daemon.url)).send().await.expect("DELETE");
    assert!(response.status().is_success(), "{}", response.status());
    let event = events.next_of("lease_released", 5 * SECOND).await;
    assert_eq!((event["id"].as_str(), event["reason"].as_str()), (Some(id), Some("released")), "{event}");

    let held = common::http::client()
        .post(format!("{}/vramgate/leases", daemon.url))
        .json(&json!({"vram": "100MiB", "holder": "goes-away", "hold": "connection"}))
        .send()
        .await
        .expect("a connection-held lease");
    assert_eq!(held.status(), 200, "a connection-held lease answers 200 with its stream");
    let granted = events.next_of("lease_granted", 5 * SECOND).await;
    drop(held);
    let event = events.next_of("lease_released", 5 * SECOND).await;
    assert_eq!((&event["id"], event["reason"].as_str()), (&granted["id"], Some("disconnected")), "{event}");

    let (code, grant) =
        daemon.post("/vramgate/leases", json!({"vram": "100MiB", "holder": "forgets", "ttl": "300ms"})).await;
    assert_eq!(code, 201, "{grant}");
    let event = events.next_of("lease_released", 5 * SECOND).await;
    assert_eq!((&event["id"], event["reason"].as_str()), (&grant["id"], Some("expired")), "{event}");
}

/// The promotion drain (`start_process`: wait while `gate.in_use() > 0`, up to `ready_timeout`,
/// then stop the CPU form) counts a model lease's pin as a request that will finish, and stops
/// the CPU form under it when `ready_timeout` runs out. A model lease (README: "keeps it in use,
/// never evicted, while the lease is held; the grant carries its upstream URL") talks to that
/// upstream directly; after `vramgate load` its URL is dead while the lease is still held. The
/// same holds for a mode's forced demotion of a lease-held model (`demote(.., forced)` closes the
/// gate whatever the pins): only the external one-shot form was guarded.
#[tokio::test]
async fn a_promotion_does_not_stop_the_cpu_form_a_model_lease_holds() {
    let daemon = start(|sim| {
        format!(
            "{}[modes.quiet]\ncpu = [\"a\"]\n",
            fake_model(sim, "a", 1000, "", &format!("{}ready_timeout = \"2s\"\nttl = \"0\"", cpu_form(sim, "a")))
        )
    });
    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "quiet"})).await;
    assert_eq!(code, 200, "{body}");
    let (code, grant) =
        daemon.post("/vramgate/leases", json!({"model": "a", "holder": "direct-client", "ttl": "60s"})).await;
    assert_eq!(code, 201, "{grant}");
    let upstream = grant["upstream"].as_str().expect("the grant's upstream").to_string();
    let health = format!("{upstream}/health");
    assert_eq!(common::http::get(&health).await.unwrap().status(), 200);
    let url = daemon.url.clone();
    let load = tokio::spawn(async move {
        common::http::client().post(format!("{url}/vramgate/models/a/load")).send().await.map(|r| r.status())
    });
    let end = Instant::now() + 5 * SECOND;
    while Instant::now() < end {
        let alive = common::http::get(&health).await.is_ok_and(|r| r.status() == 200);
        assert!(
            alive,
            "the lease {} still holds a, but its upstream {upstream} (a's CPU form) was stopped by the promotion; \
             a is now: {}",
            grant["id"],
            model(&daemon.status().await, "a")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    load.abort();
}

/// Same cause, through a mode: `place_cpu` → `demote(i, "mode", forced = true)` closes the gate
/// and releases the GPU form although a model lease holds it (only the external one-shot form is
/// refused, with a Conflict). The lease holder's upstream URL goes dead while it holds the lease.
#[tokio::test]
async fn a_mode_does_not_demote_a_process_model_a_model_lease_holds() {
    let daemon = start(|sim| {
        format!(
            "{}[modes.quiet]\ncpu = [\"a\"]\n",
            fake_model(sim, "a", 1000, "", &format!("{}ttl = \"0\"", cpu_form(sim, "a")))
        )
    });
    let (code, grant) =
        daemon.post("/vramgate/leases", json!({"model": "a", "holder": "direct-client", "ttl": "60s"})).await;
    assert_eq!(code, 201, "{grant}");
    let upstream = grant["upstream"].as_str().expect("the grant's upstream").to_string();
    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "quiet"})).await;
    let alive = common::http::get(format!("{upstream}/health")).await.is_ok_and(|r| r.status() == 200);
    // The documented refusal: 409, naming who holds the model.
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        code == 409 && message.contains("holders: direct-client"),
        "mode quiet answered {code} ({body}); expected 409 naming the lease holder direct-client"
    );
    assert!(
        alive,
        "mode quiet (answered {code}: {body}) stopped a's GPU form at {upstream} while lease {} held it",
        grant["id"]
    );
}

/// The previous review made a mode refuse to *demote* a model that a model lease holds ("their
/// holders talk to its server directly"), but a mode's `unload` list goes through
/// `request_unload` → `begin_unload("requested")`, which closes the gate whatever the pins and
/// stops the server: the lease holder's upstream URL dies while the lease is still granted
/// (README: a model lease "keeps that model loaded and in use, never evicted, while the lease is
/// held"). The same Conflict as for a demotion is expected.
#[tokio::test]
async fn a_mode_does_not_unload_a_model_a_model_lease_holds() {
    let daemon =
        start(|sim| format!("{}[modes.quiet]\nunload = [\"a\"]\n", fake_model(sim, "a", 1000, "", "ttl = \"0\"")));
    let (code, grant) =
        daemon.post("/vramgate/leases", json!({"model": "a", "holder": "direct-client", "ttl": "60s"})).await;
    assert_eq!(code, 201, "{grant}");
    let upstream = grant["upstream"].as_str().expect("the grant's upstream").to_string();
    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "quiet"})).await;
    let alive = common::http::get(format!("{upstream}/health")).await.is_ok_and(|r| r.status() == 200);
    let leases = daemon.status().await["leases"].clone();
    // The documented refusal: 409, naming who holds the model.
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        code == 409 && message.contains("holders: direct-client"),
        "mode quiet answered {code} ({body}); expected 409 naming the lease holder direct-client"
    );
    assert!(
        alive,
        "mode quiet (answered {code}: {body}) stopped a's server at {upstream} while lease {} still holds it \
         (leases: {leases})",
        grant["id"]
    );
}

/// Used to fail (README: "Held this way the model is in use, so it is never evicted or demoted"): a mode
/// demotes an external model held in the one-shot form. `place_cpu` → `demote(forced)` ignores
/// the lease's pin; with no app to instruct, the "demotion" completes at once and status says the
/// model is on the CPU, while the lease holder, who was never told, keeps using the GPU (now
/// counted as foreign).
#[tokio::test]
async fn a_mode_does_not_demote_an_external_model_held_by_a_one_shot_lease() {
    let daemon =
        start(|_| "[models.clip]\nbackend = \"external\"\nvram = 1000\n[modes.quiet]\ncpu = [\"clip\"]\n".into());
    let (code, grant) = daemon.post("/vramgate/leases", json!({"model": "clip", "ttl": "30s"})).await;
    assert_eq!(code, 201, "{grant}");
    assert_eq!(daemon.model("clip").await["placement"], "gpu");
    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "quiet"})).await;
    let clip = daemon.model("clip").await;
    assert_eq!(
        clip["placement"], "gpu",
        "a lease-held external model was demoted by a mode (mode answered {code}: {body})"
    );
    // The documented refusal: 409, saying the one-shot lease holds it (its holder has no name to
    // give: a one-shot lease is held by whoever took it).
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        code == 409 && message.contains("held by a lease in the one-shot form"),
        "mode quiet answered {code} ({body}); expected 409 saying a one-shot lease holds clip"
    );
}
