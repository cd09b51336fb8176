//! A model's phases: loads, unloads, faults, external apps, Ollama reachability.

use super::*;

/// A process model's whole life: each step's input, then the state and the backend work asked.
#[test]
fn a_process_model_goes_through_every_phase_in_order() {
    let mut rig = Rig::new(TWO_MODELS, 10_000);
    let mut caller = rig.load("llm");
    assert_eq!(rig.state("llm"), ModelState::Loading);
    assert_eq!(rig.fx().process_starts, [("llm".to_string(), 1, Placement::Gpu)]);
    assert!(answered(&mut caller).is_none(), "answered only once ready");
    let pid = rig.spawned("llm");
    assert!(rig.fx().writes.iter().any(|w| matches!(w, StoreWrite::RecordProcess(r) if r.pid == pid)));
    rig.finished("llm", Ok(()));
    assert_eq!(rig.state("llm"), ModelState::Ready);
    let loaded = answered(&mut caller).expect("answered").expect("loaded");
    assert!(loaded.pin.is_some(), "answered with a pin taken when it became ready");
    drop(loaded);
    let mut unloaded = rig.unload("llm");
    assert_eq!(rig.state("llm"), ModelState::Unloading);
    assert_eq!(rig.fx().releases, [("llm".to_string(), 1)]);
    assert!(answered(&mut unloaded).is_none(), "answered once the memory is back");
    rig.released("llm");
    assert_eq!(rig.state("llm"), ModelState::Unloaded);
    assert!(answered(&mut unloaded).expect("answered").expect("unloaded").was_loaded);
    assert!(rig.fx().writes.contains(&StoreWrite::ForgetProcess(pid)));
    assert_eq!(
        rig.transitions(),
        [
            ("llm".into(), ModelState::Loading, "requested".into()),
            ("llm".into(), ModelState::Ready, "ready".into()),
            ("llm".into(), ModelState::Unloading, "requested".into()),
            ("llm".into(), ModelState::Unloaded, "released".into()),
        ]
    );
}

/// Faults during a life, as a table: what happens, and the state and reason it leads to.
#[test]
fn faults_lead_to_the_documented_states() {
    type Step = fn(&mut Rig);
    let table: [(&str, Step, ModelState, &str); 4] = [
        (
            "a crash while serving releases it",
            |rig| {
                rig.load("llm");
                rig.ready("llm");
                let generation = rig.generation("llm");
                let exit = crate::backend::process::ExitInfo { code: Some(1), signal: None };
                rig.command(Command::Exited { model: "llm".into(), generation, exit });
            },
            ModelState::Unloading,
            "crashed",
        ),
        (
            "a failed start goes through unloading",
            |rig| {
                rig.load("llm");
                rig.spawned("llm");
                rig.finished("llm", Err("exited at once".into()));
            },
            ModelState::Unloading,
            "failed",
        ),
        (
            "an unload while spawning waits for the spawn, then releases",
            |rig| {
                rig.load("llm");
                rig.unload("llm");
                assert!(rig.fx().releases.is_empty(), "nothing to stop before the spawn");
                rig.spawned("llm");
            },
            ModelState::Unloading,
            "requested",
        ),
        (
            "a report from an earlier life is ignored",
            |rig| {
                rig.load("llm");
                rig.ready("llm");
                rig.command(Command::Exited {
                    model: "llm".into(),
                    generation: 0,
                    exit: crate::backend::process::ExitInfo { code: Some(1), signal: None },
                });
            },
            ModelState::Ready,
            "ready",
        ),
    ];
    for (name, step, state, reason) in table {
        let mut rig = Rig::new(TWO_MODELS, 10_000);
        step(&mut rig);
        assert_eq!(rig.state("llm"), state, "{name}");
        let last = rig.transitions().last().cloned().expect("a transition");
        assert_eq!(last.2, reason, "{name}");
        if state == ModelState::Unloading {
            assert_eq!(rig.fx().releases.len(), 1, "{name}: the release is asked for once");
        }
    }
}

/// Three failed starts in a row: failed, with a cooldown that answers demands at once and an
/// explicit load that retries.
#[test]
fn repeated_start_failures_end_failed_with_a_cooldown() {
    let mut rig = Rig::new(TWO_MODELS, 10_000);
    for _ in 0..FAILURES {
        rig.load("llm");
        rig.spawned("llm");
        rig.finished("llm", Err("boom".into()));
        rig.released("llm");
    }
    assert_eq!(rig.phase("llm"), Phase::Failed(model::Failure::StartFailures));
    let mut demand = rig.load("llm");
    match answered(&mut demand).expect("answered at once") {
        Err(ArbiterError::Cooldown { failures, .. }) => assert_eq!(failures, FAILURES),
        other => panic!("expected a cooldown error, got {:?}", other.map(|l| l.status)),
    }
    let (reply, _answer) = oneshot::channel();
    rig.command(Command::Load { name: "llm".into(), explicit: true, reply });
    assert_eq!(rig.state("llm"), ModelState::Loading, "an explicit load retries now");
}
const FAILURES: u32 = crate::policy::FAILURES_BEFORE_COOLDOWN;

/// A requested unload of a model in use closes its gate and waits for the requests in flight;
/// it stops the backend when they end, or cuts them at the model's stop_timeout.
#[test]
fn an_unload_waits_for_requests_in_flight_then_cuts_them_at_the_stop_timeout() {
    let config = "[models.llm]\nbackend = \"process\"\ncmd = \"llm\"\nvram = \"1000MiB\"\nstop_timeout = \"10s\"\n";
    for cut in [false, true] {
        let mut rig = Rig::new(config, 8000);
        rig.load("llm");
        rig.ready("llm");
        let pin = rig.pin("llm");
        let mut unloaded = rig.unload("llm");
        assert_eq!(rig.state("llm"), ModelState::Unloading);
        assert!(rig.gates["llm"].try_pin().is_none(), "no new request starts");
        assert!(rig.fx().releases.is_empty(), "the backend runs while a request streams");
        assert!(rig.engine.wants_idle());
        if cut {
            rig.advance(Duration::from_secs(9));
            assert!(rig.fx().releases.is_empty(), "not before the stop_timeout");
            assert!(pin.cut().now_or_never().is_none(), "the request runs on until then");
            rig.advance(Duration::from_secs(1));
            assert!(pin.cut().now_or_never().is_some(), "its answer is cut when the backend is stopped");
        } else {
            drop(pin);
            rig.input(Input::Idle);
        }
        assert_eq!(rig.fx().releases.len(), 1, "cut = {cut}: released once");
        rig.released("llm");
        assert!(answered(&mut unloaded).expect("answered").is_ok());
    }
}

/// External models: the app is instructed, and its acknowledgement moves the model.
#[test]
fn an_external_model_moves_on_the_apps_acknowledgements() {
    let config = "[models.clip]\nbackend = \"external\"\nvram = \"1000MiB\"\nack_timeout = \"5s\"\n";
    let mut rig = Rig::new(config, 8000);
    let (reply, mut attached) = oneshot::channel();
    rig.command(Command::Attach { name: "clip".into(), pid: None, holder: "app".into(), reply });
    let mut attached = answered(&mut attached).expect("answered").expect("attached");
    let mut caller = rig.load("clip");
    let instruction = attached.instructions.try_recv().expect("told to go to the GPU");
    assert_eq!(rig.state("clip"), ModelState::Loading);
    let (reply, _answer) = oneshot::channel();
    let ack = Ack { session: attached.session.clone(), seq: instruction.seq, ok: true, error: None };
    rig.command(Command::Ack { name: "clip".into(), ack, reply });
    assert_eq!(rig.state("clip"), ModelState::Ready);
    assert!(answered(&mut caller).expect("answered").is_ok());
    // Unacknowledged: unresponsive after ack_timeout.
    let _unloaded = rig.unload("clip");
    assert!(attached.instructions.try_recv().is_ok(), "told to release");
    rig.advance(Duration::from_secs(5));
    assert_eq!(rig.phase("clip"), Phase::Failed(model::Failure::Unresponsive));
}

/// `on_evict = "cpu"`: an eviction demotes (GPU form released, then the CPU form started), and
/// the model is promoted back once it fits again and nobody waits.
#[test]
fn an_eviction_demotes_a_model_with_a_cpu_form_and_it_is_promoted_back_later() {
    let config = format!(
        "{TWO_MODELS}\n[models.vision]\nbackend = \"process\"\ncmd = \"vision\"\ncpu_cmd = \"vision --cpu\"\n\
         vram = \"6000MiB\"\npriority = 10\non_evict = \"cpu\"\n"
    );
    let mut rig = Rig::new(&config, 8000);
    // The answer (and the pin it carries) is dropped: the model is idle.
    drop(rig.load("vision"));
    let pid = rig.ready("vision");
    rig.sample(&[(pid, 6000)]);
    let mut stt = rig.load("stt");
    assert!(rig.phase("vision").demoting(), "released from the GPU to come back on the CPU");
    rig.released("vision");
    assert_eq!(rig.state("vision"), ModelState::Loading);
    assert_eq!(rig.fx().process_starts.last().map(|s| s.2), Some(Placement::Cpu));
    rig.ready("vision");
    assert_eq!(rig.transitions().last().map(|t| t.2.clone()), Some("ready".into()));
    rig.sample(&[]);
    let stt_pid = rig.ready("stt");
    assert!(answered(&mut stt).expect("answered").is_ok());
    // stt goes away: vision fits on the GPU again and is promoted.
    rig.sample(&[(stt_pid, 3000)]);
    let _unload = rig.unload("stt");
    rig.released("stt");
    rig.sample(&[]);
    assert_eq!(rig.state("vision"), ModelState::Loading);
    assert_eq!(rig.transitions().last().map(|t| t.2.clone()), Some("promoted".into()));
    assert_eq!(rig.fx().process_starts.last().map(|s| s.2), Some(Placement::Gpu));
}

/// An Ollama that stops answering fails its loaded models; when it answers again they are
/// adopted if it still holds them, else unloaded.
#[test]
fn an_unreachable_ollama_fails_its_models_until_it_answers() {
    let config = "[models.chat]\nbackend = \"ollama\"\nollama_model = \"llama3.2\"\nvram = \"2000MiB\"\n";
    for still_loaded in [true, false] {
        let mut rig = Rig::new(config, 8000);
        let _chat = rig.load("chat");
        assert_eq!(rig.fx().ollama_starts.len(), 1);
        rig.finished("chat", Ok(()));
        assert_eq!(rig.state("chat"), ModelState::Ready);
        let url = rig.engine.ollama_urls()[0].clone();
        rig.command(Command::OllamaPs { url: url.clone(), result: Err("connection refused".into()) });
        assert_eq!(rig.phase("chat"), Phase::Failed(model::Failure::OllamaUnreachable));
        assert!(rig.engine.view().degraded_reasons.iter().any(|r| r.contains("does not answer")));
        let listed = if still_loaded {
            vec![crate::backend::ollama::OllamaLoaded {
                name: "llama3.2:latest".into(),
                vram_mib: 2100,
                size_mib: 2100,
            }]
        } else {
            Vec::new()
        };
        rig.command(Command::OllamaPs { url, result: Ok(listed) });
        let (state, reason) =
            if still_loaded { (ModelState::Ready, "adopted") } else { (ModelState::Unloaded, "ollama_back") };
        assert_eq!(rig.state("chat"), state, "still loaded: {still_loaded}");
        assert_eq!(rig.transitions().last().map(|t| t.2.clone()), Some(reason.into()));
    }
}

/// A user's load of a model on its way to the CPU waits for it to settle; with
/// `queue_timeout = "0s"` that wait is over at once: a timeout, not a command re-run for ever.
#[test]
fn a_load_waiting_for_a_model_to_settle_times_out_instead_of_spinning() {
    let config = "[scheduler]\nqueue_timeout = \"0s\"\n[models.vision]\nbackend = \"process\"\ncmd = \"vision\"\n\
         cpu_cmd = \"vision --cpu\"\nvram = \"3000MiB\"\n";
    let mut rig = Rig::new(config, 8000);
    let (reply, _placed) = oneshot::channel();
    rig.command(Command::PlaceCpu { name: "vision".into(), reply });
    assert_eq!(rig.state("vision"), ModelState::Loading, "its CPU form starts");
    let (reply, mut answer) = oneshot::channel();
    rig.command(Command::Load { name: "vision".into(), explicit: true, reply });
    assert!(matches!(answered(&mut answer), Some(Err(ArbiterError::Timeout { .. }))));
}

/// Commands the engine sends itself during start-up run during start-up: a preloaded external
/// model without an app fails its start and is released at once, not at the next input.
#[test]
fn start_up_runs_the_commands_the_engine_sent_itself() {
    let config = "[models.clip]\nbackend = \"external\"\nvram = \"1000MiB\"\npreload = true\n";
    let rig = Rig::new(config, 8000);
    assert_eq!(rig.state("clip"), ModelState::Unloaded, "{:?}", rig.phase("clip"));
}

/// A crash while serving is counted and explained in status until the next successful start.
#[test]
fn a_crash_while_serving_is_recorded_in_failures_and_last_error() {
    let mut rig = Rig::new(TWO_MODELS, 10_000);
    drop(rig.load("llm"));
    rig.ready("llm");
    let generation = rig.generation("llm");
    let pin = rig.pin("llm");
    let exit = crate::backend::process::ExitInfo { code: Some(139), signal: None };
    rig.command(Command::Exited { model: "llm".into(), generation, exit });
    assert!(pin.cut().now_or_never().is_none(), "an answer broken by the crash is not cut: it reports the crash");
    drop(pin);
    let status = rig.engine.view().models.into_iter().find(|m| m.id == "llm").expect("llm in status");
    assert_eq!(status.failures, 1);
    assert!(status.last_error.as_deref().is_some_and(|e| e.contains("crashed while serving")), "{status:?}");
    rig.released("llm");
    assert_eq!(rig.state("llm"), ModelState::Unloaded, "a crash is no start failure: no cooldown");
    drop(rig.load("llm"));
    rig.ready("llm");
    let status = rig.engine.view().models.into_iter().find(|m| m.id == "llm").expect("llm in status");
    assert_eq!((status.failures, status.last_error), (0, None), "cleared by the next start");
}

/// A mode that moves a model in use to the CPU lets its requests finish first, as a requested
/// unload does: its GPU form is stopped when they end, or at its stop_timeout, cutting them.
#[test]
fn a_forced_demotion_waits_for_requests_in_flight_then_cuts_them_at_the_stop_timeout() {
    let config = "[models.vision]\nbackend = \"process\"\ncmd = \"vision\"\ncpu_cmd = \"vision --cpu\"\n\
         vram = \"3000MiB\"\nstop_timeout = \"10s\"\n";
    let mut rig = Rig::new(config, 8000);
    drop(rig.load("vision"));
    rig.ready("vision");
    let pin = rig.pin("vision");
    let (reply, _placed) = oneshot::channel();
    rig.command(Command::PlaceCpu { name: "vision".into(), reply });
    assert_eq!(rig.state("vision"), ModelState::Unloading);
    assert!(rig.fx().releases.is_empty(), "the GPU form serves its request on");
    rig.advance(Duration::from_secs(9));
    assert!(rig.fx().releases.is_empty() && pin.cut().now_or_never().is_none(), "not before the stop_timeout");
    rig.advance(Duration::from_secs(1));
    assert_eq!(rig.fx().releases.len(), 1, "released at the stop_timeout");
    assert!(pin.cut().now_or_never().is_some(), "and the request cut");
}

/// A release that times out with the old server's pid still holding its memory: that memory is
/// foreign from then on, so the next load waits for a reading that shows it gone instead of
/// starting on memory still in use.
#[test]
fn memory_not_seen_back_after_the_release_timeout_stays_counted_until_a_reading_shows_it_gone() {
    let mut rig = Rig::new(TWO_MODELS, 8000);
    drop(rig.load("llm"));
    let pid = rig.ready("llm");
    rig.sample(&[(pid, 6000)]);
    drop(rig.unload("llm"));
    let generation = rig.generation("llm");
    rig.command(Command::Released {
        model: "llm".into(),
        generation,
        timed_out: true,
        waited: Duration::from_secs(10),
    });
    assert_eq!(rig.state("llm"), ModelState::Unloaded);
    assert!(rig.fx().events.iter().any(|e| matches!(e, EventKind::MemoryReleaseTimeout { .. })));
    // 8000 − 6000 still held < 3000: stt must not start on the old server's memory.
    let mut caller = rig.load("stt");
    assert!(rig.fx().process_starts.iter().all(|(id, ..)| id != "stt"), "started on memory still in use");
    rig.sample(&[(pid, 6000)]);
    assert!(rig.fx().process_starts.iter().all(|(id, ..)| id != "stt"), "a reading still showing it");
    assert!(answered(&mut caller).is_none());
    // The reading that shows it gone lets the load go on.
    rig.sample(&[]);
    assert!(rig.fx().process_starts.iter().any(|(id, ..)| id == "stt"), "started once the memory is back");
}

/// A caller who asks for a model while its last failed start is being cleaned up waits for the
/// release; when the release outlasts the cooldown, the release starts the model again for that
/// caller instead of leaving it to time out.
#[test]
fn a_caller_waiting_through_a_failed_release_that_outlasts_the_cooldown_gets_a_new_start() {
    let mut rig = Rig::new(TWO_MODELS, 10_000);
    for round in 1..=FAILURES {
        rig.load("llm");
        rig.spawned("llm");
        rig.finished("llm", Err("boom".into()));
        if round < FAILURES {
            rig.released("llm");
        }
    }
    let mut waiting = rig.load("llm");
    assert!(answered(&mut waiting).is_none(), "it waits for the release");
    let cooldown = crate::policy::failure_cooldown(FAILURES).expect("a cooldown after the failures");
    rig.advance(cooldown + Duration::from_secs(1));
    rig.released("llm");
    assert_eq!(rig.state("llm"), ModelState::Loading, "the cooldown has passed: it starts again for the caller");
    rig.ready("llm");
    assert!(matches!(answered(&mut waiting), Some(Ok(_))), "the caller is answered once it is ready");
}

/// A caller waiting behind a swap for an Ollama model that Ollama then drops on its own (its
/// last request ended, and the listing came before the idle notice) gets the model loaded again
/// once the swap is done, instead of waiting until its deadline.
#[test]
fn a_caller_waiting_for_a_draining_model_that_leaves_ollama_gets_it_loaded_again() {
    let config = "[scheduler]\nmax_wait_before_swap = \"1s\"\n\
        [models.chat]\nbackend = \"ollama\"\nollama_model = \"llama3.2\"\nvram = \"6000MiB\"\n\
        [models.stt]\nbackend = \"process\"\ncmd = \"stt\"\nvram = \"3000MiB\"\n";
    let mut rig = Rig::new(config, 8000);
    let first = rig.load("chat");
    rig.finished("chat", Ok(()));
    assert_eq!(rig.state("chat"), ModelState::Ready);
    drop(first);
    let in_flight = rig.pin("chat");
    let _stt = rig.load("stt");
    rig.advance(Duration::from_secs(2));
    assert_eq!(rig.phase("chat"), Phase::Ready { draining: true }, "drained for stt");
    let mut waiting = rig.load("chat");
    assert!(answered(&mut waiting).is_none(), "it waits behind the swap");
    rig.advance(3 * crate::arbiter::engine::OLLAMA_POLL);
    drop(in_flight);
    let url = rig.engine.ollama_urls()[0].clone();
    rig.command(Command::OllamaPs { url, result: Ok(Vec::new()) });
    assert_eq!(rig.state("chat"), ModelState::Unloaded, "gone from Ollama");
    rig.ready("stt");
    rig.unload("stt");
    rig.released("stt");
    assert_eq!(rig.fx().ollama_starts.len(), 2, "it is loaded again for the caller");
    rig.finished("chat", Ok(()));
    assert!(matches!(answered(&mut waiting), Some(Ok(_))), "the caller is answered");
}

/// A model's peak is the most a reading saw it use since it became ready: it rises with use,
/// does not fall when use does, and starts afresh with the next load.
#[test]
fn the_peak_is_the_most_seen_since_the_model_became_ready() {
    let mut rig = Rig::new(TWO_MODELS, 10_000);
    let peak = |rig: &Rig| rig.engine.models.iter().find(|m| m.spec.id == "llm").and_then(|m| m.peak_mib);
    let _load = rig.load("llm");
    let pid = rig.spawned("llm");
    rig.sample(&[(pid, 7000)]);
    assert_eq!(peak(&rig), None, "what it uses while it loads is not its peak");
    rig.finished("llm", Ok(()));
    for (used, expected) in [(5000, 5000), (6500, 6500), (5200, 6500)] {
        rig.sample(&[(pid, used)]);
        assert_eq!(peak(&rig), Some(expected), "after a reading of {used}");
    }
    assert_eq!(rig.engine.view().models.iter().find(|m| m.id == "llm").and_then(|m| m.peak_mib), Some(6500));
    rig.unload("llm");
    rig.released("llm");
    let _again = rig.load("llm");
    assert_eq!(peak(&rig), None, "a new load starts afresh");
}
