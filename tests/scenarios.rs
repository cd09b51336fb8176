//! End-to-end, from a user's point of view: leases against foreign use, apps holding external
//! models (their memory, their jobs, idleness, attaching late), modes that cannot hold or lose
//! their caller, and Ollama's unload call. Each test was written in review against a bug it proved;
//! its doc comment says what used to go wrong.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::app::{Answer, App};
use common::procs::{Claims, Proc, attach_as, attach_keeping, settle};
use common::{Daemon, cpu_form, fake_model, model_in as model, never_within, sim_config};
use futures_util::StreamExt;
use serde_json::{Value, json};

const SECOND: Duration = Duration::from_secs(1);

/// An 8000 MiB sim device without reserve, plus `rest`.
fn start(rest: impl Fn(&Path) -> String) -> Daemon {
    Daemon::start(|sim| format!("{}{}", sim_config(sim, 8000, "50ms", "reserve_mib = 0"), rest(sim)))
}

// ----- modes -----

/// `ArbiterHandle::set_mode` loads a mode's `gpu` list one model after the other with ordinary
/// loads, and a later load may evict an earlier one: here `b` evicts `a` (idle, same priority),
/// and the mode answers 200 "applied" with `a` unloaded. `vramgate mode both` exits 0 although
/// the state it was asked for does not hold. A mode must not evict its own `gpu` models to load
/// another of them; it should fail at that step (422/503 naming the numbers), or be rejected by
/// `config check` when the declared footprints cannot fit together.
#[tokio::test]
async fn a_mode_whose_gpu_models_cannot_all_fit_does_not_report_success_with_one_evicted() {
    let daemon = start(|sim| {
        format!(
            "{}{}[modes.both]\ngpu = [\"a\", \"b\"]\n",
            fake_model(sim, "a", 5000, "", "ttl = \"0\""),
            fake_model(sim, "b", 5000, "", "ttl = \"0\"")
        )
    });
    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "both"})).await;
    let status = daemon.status().await;
    let (a, b) = (model(&status, "a"), model(&status, "b"));
    let message = body["error"]["message"].as_str().unwrap_or_default();
    // The documented answer: 409, naming the model that did not stay, and the mode not recorded.
    assert!(
        code == 409 && message.contains("a did not stay on the GPU") && status["mode"] != "both",
        "mode both (a 5000 + b 5000 MiB on 8000) answered {code} and status names mode {}; a is {}, b is {}; \
         expected 409 naming a as evicted; the answer: {body}",
        status["mode"],
        a["state"],
        b["state"]
    );
}

/// `POST /vramgate/mode` runs the switch inside the HTTP handler (`set_mode` awaited by
/// `api::external::set_mode`). When the client goes away (the Python client's
/// `set_mode(name, timeout=...)` runs out, a script is interrupted), the handler future is
/// dropped in the middle: the unloads and demotions are done, the remaining loads are abandoned
/// or finish unannounced, and `ModeApplied` is never sent. The daemon is left half-way, with
/// `mode` still naming the previous mode although its models were changed. The switch should
/// run to completion (or its failure be recorded) whatever the caller does.
#[tokio::test]
async fn a_mode_switch_completes_when_the_client_that_asked_for_it_goes_away() {
    let daemon = start(|sim| {
        format!(
            "{}{}{}[modes.work]\ngpu = [\"a\", \"b\"]\n[modes.play]\nunload = [\"b\"]\ncpu = [\"a\"]\nload = [\"c\"]\n",
            fake_model(sim, "a", 2000, "", &format!("{}ttl = \"0\"", cpu_form(sim, "a"))),
            fake_model(sim, "b", 3000, "", "ttl = \"0\""),
            fake_model(sim, "c", 5000, "--load-delay 2s", "ttl = \"0\"")
        )
    });
    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "work"})).await;
    assert_eq!(code, 200, "{body}");
    // The caller gives up after one second, while c (2 s to load) is still starting.
    let answer = common::http::client()
        .post(format!("{}/vramgate/mode", daemon.url))
        .json(&json!({"mode": "play"}))
        .timeout(SECOND)
        .send()
        .await;
    assert!(answer.is_err(), "the switch was expected to take longer than the client's timeout");
    let end = Instant::now() + 10 * SECOND;
    loop {
        let status = daemon.status().await;
        if status["mode"] == "play" && model(&status, "c")["state"] == "ready" {
            break;
        }
        assert!(
            Instant::now() < end,
            "10 s after its client went away, mode play is not applied: mode = {}, a = {} on {}, b = {}, c = {}",
            status["mode"],
            model(&status, "a")["state"],
            model(&status, "a")["placement"],
            model(&status, "b")["state"],
            model(&status, "c")["state"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The README's seed-001 config (CLIP as an external model, `[modes.recording] cpu = ["clip"]`)
/// with `[server] initial_mode = "recording"`, as the README suggests: the initial mode runs at
/// start-up, before any app can have attached, so `placing clip on the CPU` fails at once ("no app
/// is attached") and the mode is given up for good (an error in the log, `mode: null`). When the
/// app attaches a moment later nothing happens: the initial mode is never applied. With an
/// external model in it, an initial mode can only work if it waits for (or is re-applied on) the
/// app's attachment.
#[tokio::test]
async fn the_initial_mode_is_applied_once_the_app_of_its_external_model_attaches() {
    let daemon = Daemon::start(|sim| {
        format!(
            "[server]\ninitial_mode = \"recording\"\n{}[models.clip]\nbackend = \"external\"\nvram = \"1GiB\"\n\
             priority = 80\n{}[modes.autopilot]\ngpu = [\"clip\"]\nunload = [\"vlm\"]\n\
             [modes.recording]\ncpu = [\"clip\"]\ngpu = [\"vlm\"]\n",
            sim_config(sim, 8000, "50ms", "reserve_mib = 0"),
            fake_model(sim, "vlm", 5000, "", "ttl = \"5m\"")
        )
    });
    // Let the start-up attempt run first (it fails within milliseconds today).
    settle(&daemon, 3 * SECOND, |s| !model(s, "clip")["last_error"].is_null() || !s["mode"].is_null()).await;
    let app = App::attach(&daemon, "clip", 1024, |_| Answer::Ok).await;
    let end = Instant::now() + 10 * SECOND;
    loop {
        let status = daemon.status().await;
        if status["mode"] == "recording" {
            assert_eq!(model(&status, "clip")["placement"], "cpu");
            assert_eq!(model(&status, "vlm")["state"], "ready");
            break;
        }
        assert!(
            Instant::now() < end,
            "initial_mode recording was never applied although clip's app attached 10 s ago: mode = {}, \
             clip = {} ({}), vlm = {}",
            status["mode"],
            model(&status, "clip")["state"],
            model(&status, "clip")["last_error"],
            model(&status, "vlm")["state"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.exit();
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

// ----- leases and the queue -----

/// README: a lease's `wait` "`\"0\"` fails at once", and "one that waited in vain gets 503 with the
/// numbers". A `wait: 0` lease that could fit by evicting an idle model (seed 003's free-VRAM
/// pre-flight: `vramgate run --wait 0`, `client.lease(wait=0)`) gets the eviction *and* the
/// refusal: `schedule` starts unloading `a` for it, then `on_timers` expires it before the memory
/// is back, with "no memory became available" (no numbers, since a waiter that evicts never
/// records a shortfall). The user loses the LLM and the job does not run. A lease that may not
/// wait should evict nothing (and say why, with the numbers), or be granted once its victims are
/// gone: it is now the latter, and the test holds it to exactly that.
#[tokio::test]
async fn a_lease_that_may_not_wait_does_not_evict_a_model_and_then_fail() {
    let daemon = start(|sim| fake_model(sim, "a", 5000, "", "ttl = \"0\""));
    assert_eq!(daemon.load("a").await.0, 200);
    let (code, body) =
        daemon.post("/vramgate/leases", json!({"vram": "5000MiB", "holder": "preflight", "wait": "0"})).await;
    // What it does: a is evicted, its memory waited for, and only then the lease granted, so a
    // is already gone when the grant arrives (a grant next to a ready a would over-commit: 5000 +
    // 5000 > 8000; a refusal after evicting a is the bug this test was written for).
    let a = daemon.model("a").await;
    assert!(
        code == 201 && body["vram_mib"] == 5000 && a["state"] == "unloaded",
        "a lease with wait 0 answered {code} ({body}) with model a {}; expected 201 for 5000 MiB with a \
         already unloaded",
        a["state"]
    );
}

/// DESIGN: "the sum of what vramgate admitted on a device never exceeds its usable memory minus
/// foreign use at the moment of admission". `policy_inputs` subtracts every lease's hold from the
/// unattributed use before calling it foreign ("a lease's job uses its memory through processes
/// we cannot attribute"), whether or not the job uses any of it yet: a 4000 MiB lease whose job
/// has not started hides the desktop's 3000 MiB. With 8000 MiB, 4000 leased and 3000 really used
/// by someone else, only 1000 MiB can still be promised, yet a 3000 MiB lease is granted: once
/// the first job allocates its 4000, the card is 2000 MiB over (an OOM, which vramgate exists to
/// prevent).
#[tokio::test]
async fn a_lease_not_yet_used_does_not_hide_foreign_use() {
    let daemon = start(|_| String::new());
    let (code, body) =
        daemon.post("/vramgate/leases", json!({"vram": "4000MiB", "holder": "ffmpeg", "ttl": "60s"})).await;
    assert_eq!(code, 201, "{body}");
    daemon.claim("desktop", 3000);
    daemon.wait_for_status(5 * SECOND, "the desktop's 3000 MiB", |s| s["devices"][0]["used_mib"] == 3000).await;
    let (code, body) = daemon
        .post("/vramgate/leases", json!({"vram": "3000MiB", "holder": "whisper-job", "wait": "0", "priority": 0}))
        .await;
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        code == 503 && message.contains("needs 3000 MiB"),
        "8000 MiB, 4000 leased to ffmpeg, 3000 used by the desktop: a further 3000 MiB lease answered {code} \
         ({body}); expected 503 naming the 3000 MiB (4000 + 3000 admitted > 8000 - 3000 foreign)"
    );
}

// ----- external models -----

/// README: "the app's pid's memory is the model's while it is on the GPU". `on_sample` keeps one
/// owner per pid (`owners.insert(pid, i)`), so an app holding two external models (CLIP and a
/// second encoder in one Python process) has all of its memory attributed to the last of them
/// and none to the other, which is then still counted at its declared size: 1000 MiB are counted
/// twice. Here the app really uses 3000 of 8000 MiB, yet a 5000 MiB lease is refused.
#[tokio::test]
async fn two_external_models_held_by_one_app_are_counted_once() {
    let daemon = start(|_| {
        "[models.clip]\nbackend = \"external\"\nvram = 1000\nttl = \"0\"\n\
         [models.vlm]\nbackend = \"external\"\nvram = 2000\nttl = \"0\"\n"
            .into()
    });
    let app = Proc::spawn(None);
    let claims = Claims::new(&daemon, app.pid());
    let clip = attach_as(&daemon, "clip", app.pid(), 1000, claims.clone()).await;
    let vlm = attach_as(&daemon, "vlm", app.pid(), 2000, claims.clone()).await;
    assert_eq!(daemon.load("clip").await.0, 200);
    assert_eq!(daemon.load("vlm").await.0, 200);
    daemon
        .wait_for_status(5 * SECOND, "the app's 3000 MiB seen", |s| {
            s["devices"][0]["processes"].as_array().is_some_and(|p| {
                p.iter().any(|p| p["pid"] == app.pid() && p["used_mib"] == 3000 && !p["model"].is_null())
            })
        })
        .await;
    let status = daemon.status().await;
    let counted = (model(&status, "clip")["vram_mib"].clone(), model(&status, "vlm")["vram_mib"].clone());
    // Priority 0: the lease may evict nothing, so the answer is admission on the numbers alone.
    let (code, body) = daemon
        .post("/vramgate/leases", json!({"vram": "5000MiB", "holder": "ffmpeg", "wait": "0", "priority": 0}))
        .await;
    assert_eq!(
        (counted.0.as_u64(), counted.1.as_u64(), code),
        (Some(1000), Some(2000), 201),
        "the app uses 3000 of 8000 MiB (clip 1000 + vlm 2000); vramgate counts clip {} and vlm {} MiB, and a \
         lease of the 5000 MiB free answered {code}: {body}",
        counted.0,
        counted.1
    );
    clip.abort();
    vlm.abort();
}

/// `on_sample` attributes a GPU process to a model when its process *group* leader is the
/// model's pid ("a worker of a model's server"). That is right for the servers vramgate spawns
/// (each leads its own group) but not for an attached app's pid: a program started from a shell
/// leads its own process group, so every GPU job it starts (`vramgate run --vram 2G -- ffmpeg`,
/// a subprocess) is counted as its external model. Here ffmpeg's 2000 MiB, already held by its
/// lease, is counted again as clip's: clip shows 3000 MiB, and a lease of the 5000 MiB really
/// free is refused.
#[tokio::test]
async fn a_gpu_job_started_by_the_app_is_not_counted_as_the_apps_external_model() {
    let daemon = start(|_| "[models.clip]\nbackend = \"external\"\nvram = 1000\nttl = \"0\"\n".into());
    let app = Proc::spawn(None);
    // ffmpeg, started by the app (same process group), holding its own lease.
    let ffmpeg = Proc::spawn(Some(app.pid()));
    let (code, body) = daemon
        .post("/vramgate/leases", json!({"vram": "2000MiB", "holder": "ffmpeg", "ttl": "60s", "pid": ffmpeg.pid()}))
        .await;
    assert_eq!(code, 201, "{body}");
    daemon.claim(&ffmpeg.pid().to_string(), 2000);
    let holder = attach_as(&daemon, "clip", app.pid(), 1000, Claims::new(&daemon, app.pid())).await;
    assert_eq!(daemon.load("clip").await.0, 200);
    let status = daemon
        .wait_for_status(5 * SECOND, "the app's memory attributed to clip", |s| {
            s["devices"][0]["processes"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["pid"] == app.pid() && p["model"] == "clip"))
        })
        .await;
    let ffmpeg_entry = status["devices"][0]["processes"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["pid"] == ffmpeg.pid()).cloned())
        .unwrap_or_default();
    let (code, body) =
        daemon.post("/vramgate/leases", json!({"vram": "5000MiB", "holder": "job", "wait": "0", "priority": 0})).await;
    assert!(
        ffmpeg_entry["model"].is_null() && code == 201,
        "ffmpeg (pid {}, not the app's pid) is counted as {} and clip as {} MiB; a lease of the 5000 MiB really \
         free answered {code}: {body}",
        ffmpeg.pid(),
        ffmpeg_entry["model"],
        model(&status, "clip")["vram_mib"]
    );
    holder.abort();
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

/// For process models a release is done when the pids are gone from a fresh reading; for an
/// external model the app's acknowledgement is taken as the memory being back
/// (`memory_released` at once), and the very next decision still uses the previous reading's
/// attribution: the app's pid is "attributed" (so not foreign) while the demoted model counts 0.
/// An app whose process keeps the memory after `cpu` (PyTorch keeps it cached after
/// `clip.to("cpu")`, exactly the Python README's `on_place`) thus lets vramgate admit a load into
/// memory that is still in use: here 7500 MiB are started next to the app's 1000 on an 8000 MiB
/// card. The memory should be watched until it is really back (as for processes, bounded by
/// `release_timeout`), or at least the decision should wait for a reading taken after the ack.
#[tokio::test]
async fn an_external_demotion_is_not_counted_as_freed_memory_before_the_app_really_frees_it() {
    let daemon = start(|sim| {
        format!(
            "[models.clip]\nbackend = \"external\"\nvram = 1000\non_evict = \"cpu\"\nttl = \"0\"\n{}",
            fake_model(sim, "big", 7500, "", "ttl = \"0\"\nready_timeout = \"5s\"")
        )
    });
    let app = Proc::spawn(None);
    let claims = Claims::new(&daemon, app.pid());
    let holder = attach_keeping(&daemon, "clip", app.pid(), 1000, claims, true).await;
    assert_eq!(daemon.load("clip").await.0, 200);
    daemon
        .wait_for_status(5 * SECOND, "the app's 1000 MiB attributed to clip", |s| {
            s["devices"][0]["processes"].as_array().is_some_and(|p| p.iter().any(|p| p["model"] == "clip"))
        })
        .await;
    let url = daemon.url.clone();
    let load = tokio::spawn(async move {
        let response = common::http::client().post(format!("{url}/vramgate/models/big/load")).send().await.unwrap();
        response.status().as_u16()
    });
    // clip is demoted to make room (it must be: otherwise nothing here is tested)...
    daemon
        .wait_for_status(5 * SECOND, "clip demoted to the CPU for big", |s| model(s, "clip")["placement"] == "cpu")
        .await;
    // ...but the app still uses 1000 MiB after `cpu`: big (7500) must not start on the 8000 MiB card.
    never_within(&daemon, 3 * SECOND, "big was started while the app still used 1000 of 8000 MiB", |s| {
        let big = model(s, "big");
        big["state"] == "loading" || big["state"] == "ready"
    })
    .await;
    load.abort();
    holder.abort();
}

// ----- Ollama models -----

/// Ollama's unload call (`/api/generate` with no prompt and `keep_alive: 0`, Open WebUI's "unload"
/// button, scripts that free the GPU after their own request) sets the runner to expire: Ollama
/// unloads it once the requests using it are done. On vramgate's Ollama surface the same call is
/// `arbiter.unload` → `begin_unload("requested")`, which closes the gate whatever the pins and
/// stops the server at once: another client's answer, streaming from that model, is cut off
/// mid-way. The model should go once it is idle, as in Ollama.
#[tokio::test]
async fn an_ollama_unload_call_does_not_cut_off_an_answer_another_client_is_streaming() {
    let daemon = start(|sim| fake_model(sim, "a", 1000, "--token-delay 400ms", "ttl = \"0\""));
    assert_eq!(daemon.load("a").await.0, 200);
    let response = common::http::client()
        .post(format!("{}/api/chat", daemon.url))
        .json(&json!({"model": "a", "messages": [{"role": "user", "content": "tell me a story"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let first = tokio::time::timeout(5 * SECOND, stream.next()).await.expect("a first line").expect("a chunk");
    assert!(first.is_ok(), "{first:?}");
    // Another client unloads the model the Ollama way.
    let (code, body) = daemon.post("/api/generate", json!({"model": "a", "keep_alive": 0})).await;
    let mut text = String::from_utf8_lossy(&first.unwrap()).to_string();
    let mut broken = None;
    while let Ok(Some(chunk)) = tokio::time::timeout(10 * SECOND, stream.next()).await {
        match chunk {
            Ok(bytes) => text.push_str(&String::from_utf8_lossy(&bytes)),
            Err(e) => {
                broken = Some(e.to_string());
                break;
            }
        }
    }
    let done = text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).any(|l| l["done"] == true);
    assert!(
        done && broken.is_none(),
        "the unload call (answered {code}: {body}) cut off the answer streaming to another client: \
         broken = {broken:?}, received: {text}"
    );
}
