//! The queue, evictions, leases, fairness, pressure and the deadline index.

use super::*;

/// Evictions: who is evicted for whom, as a table of (what holds llm, requester, evicted?).
#[test]
fn eviction_follows_priority_and_use() {
    // llm (6000, priority 50) fills a 8000 MiB device; a request for stt (3000) needs it gone.
    let cases: [(&str, bool, &str, bool); 3] = [
        ("idle llm, stt (priority 80) evicts it", false, "stt", true),
        ("llm in use: not evicted while a request holds it", true, "stt", false),
        ("a lower priority requester evicts nothing", false, "low", false),
    ];
    let config = format!(
        "{TWO_MODELS}\n[models.low]\nbackend = \"process\"\ncmd = \"low\"\nvram = \"3000MiB\"\npriority = 10\n"
    );
    for (name, in_use, requester, evicted) in cases {
        let mut rig = Rig::new(&config, 8000);
        rig.load("llm");
        let pid = rig.ready("llm");
        rig.sample(&[(pid, 6000)]);
        let _pin = in_use.then(|| rig.pin("llm"));
        let _caller = rig.load(requester);
        let expected = if evicted { ModelState::Unloading } else { ModelState::Ready };
        assert_eq!(rig.state("llm"), expected, "{name}");
        assert_eq!(rig.state(requester), ModelState::Unloaded, "{name}: waits in the queue");
        if evicted {
            let reason = rig.transitions().last().cloned().expect("a transition").2;
            assert_eq!(reason, format!("evicted_for:{requester}"), "{name}");
            rig.released("llm");
            rig.sample(&[]);
            assert_eq!(rig.state(requester), ModelState::Loading, "{name}: loads once the memory is back");
        }
    }
}

/// Callers waiting for a cold model are capped per model and in total: 503-style refusals, not
/// unbounded memory.
#[test]
fn callers_waiting_for_a_load_are_capped_per_model_and_in_total() {
    let config = format!("[scheduler]\nmax_waiters_per_model = 2\nmax_waiters = 3\n{TWO_MODELS}");
    let mut rig = Rig::new(&config, 10_000);
    let mut llm: Vec<_> = (0..3).map(|_| rig.load("llm")).collect();
    assert!(
        matches!(answered(&mut llm[2]), Some(Err(ArbiterError::TooManyWaiters(m))) if m.contains("max_waiters_per_model = 2"))
    );
    assert!(answered(&mut llm[0]).is_none() && answered(&mut llm[1]).is_none(), "the first two wait");
    let mut stt: Vec<_> = (0..2).map(|_| rig.load("stt")).collect();
    assert!(answered(&mut stt[0]).is_none(), "the third in total waits");
    assert!(
        matches!(answered(&mut stt[1]), Some(Err(ArbiterError::TooManyWaiters(m))) if m.contains("max_waiters = 3"))
    );
}

/// Fairness only when it helps: a waiter that a model lease blocks gets no drain of that model,
/// and requests to it keep being served; a waiter blocked by requests in flight does.
#[test]
fn a_model_is_drained_only_when_draining_can_free_it() {
    let config = format!("[scheduler]\nmax_wait_before_swap = \"1s\"\n{TWO_MODELS}");
    for held_by_lease in [true, false] {
        let mut rig = Rig::new(&config, 8000);
        rig.load("llm");
        let pid = rig.ready("llm");
        rig.sample(&[(pid, 6000)]);
        let request = model_lease("job", "llm");
        let _holder = if held_by_lease {
            let mut grant = rig.lease(request);
            Some(answered(&mut grant).expect("granted at once").expect("a grant"))
        } else {
            None
        };
        let _request_in_flight = rig.pin("llm");
        let _waiting = rig.load("stt");
        rig.advance(Duration::from_secs(2));
        let draining = rig.phase("llm") == Phase::Ready { draining: true };
        assert_eq!(draining, !held_by_lease, "held by a lease: {held_by_lease}");
        assert_eq!(rig.gates["llm"].try_pin().is_some(), held_by_lease, "requests still served: {held_by_lease}");
    }
}

/// Memory leases: granted when they fit, refused when they never can, timed out with the
/// numbers of their last shortfall.
#[test]
fn memory_leases_are_granted_refused_or_timed_out() {
    let lease = |mib: u64, wait: u64| LeaseRequest { wait: Duration::from_secs(wait), ..memory_lease("ffmpeg", mib) };
    let mut rig = Rig::new(TWO_MODELS, 8000);
    let mut fits = rig.lease(lease(2000, 0));
    assert_eq!(answered(&mut fits).expect("answered").expect("granted").vram_mib, 2000);
    // Status says when it was granted (the dashboard shows the lease's age from it).
    let granted_at = rig.engine.view().leases[0].granted_at.expect("granted_at");
    assert!((chrono::Utc::now() - granted_at).num_seconds().abs() < 60, "{granted_at}");
    let mut never = rig.lease(lease(20_000, 5));
    assert!(matches!(answered(&mut never), Some(Err(ArbiterError::NeverFits(_)))));
    let mut waits = rig.lease(lease(7000, 5));
    assert!(answered(&mut waits).is_none(), "waits for the first lease");
    rig.advance(Duration::from_secs(5));
    match answered(&mut waits) {
        Some(Err(ArbiterError::Timeout { message, .. })) => assert!(message.contains("MiB"), "{message}"),
        other => panic!("expected a timeout, got {other:?}"),
    }
}

/// What the device says is in use beyond its listed processes (NVML's driver reservation, now in
/// `used_mib`) is foreign use: a lease is judged on it, not on the processes alone.
#[test]
fn memory_no_process_lists_is_foreign_and_counts_against_a_lease() {
    let lease = |mib: u64| LeaseRequest { wait: Duration::ZERO, ..memory_lease("ffmpeg", mib) };
    let mut rig = Rig::new(TWO_MODELS, 7680);
    let mut reading = device_view(7680, &[(4242, 300)]);
    reading.devices[0].used_mib = 900;
    rig.input(Input::Sample(Arc::new(reading), ProcTable::default()));
    let mut too_big = rig.lease(lease(6781));
    rig.advance(Duration::from_millis(1));
    assert!(answered(&mut too_big).expect("answered").is_err(), "7680 − 900 = 6780 is all there is");
    let mut fits = rig.lease(lease(6780));
    assert_eq!(answered(&mut fits).expect("answered").expect("granted").vram_mib, 6780);
}

/// A model's server whose memory the driver does not report ("not available") is counted once,
/// at the model's size, as the model's: not again as foreign, and no footprint is learned from
/// the missing figure.
#[test]
fn a_process_without_a_figure_counts_once_at_its_models_size() {
    let mut rig = Rig::new(TWO_MODELS, 10_000);
    drop(rig.load("llm"));
    let pid = rig.ready("llm");
    let mut reading = device_view(10_000, &[(pid, 0)]);
    reading.devices[0].used_mib = 6500;
    reading.devices[0].processes[0].used_mib = None;
    rig.input(Input::Sample(Arc::new(reading), ProcTable::default()));
    let (devices, residents, _) = rig.engine.policy_inputs();
    assert_eq!(devices[0].foreign_mib, 500, "6500 used − llm's 6000, not 6500 foreign on top of llm");
    assert_eq!(residents[0].footprint_mib, 6000);
    // 10000 − 500 − 6000 = 3500 ≥ 3000: stt starts beside llm, nothing evicted.
    drop(rig.load("stt"));
    assert!(rig.fx().process_starts.iter().any(|(id, ..)| id == "stt"));
    assert_eq!(rig.state("llm"), ModelState::Ready);
    assert!(
        !rig.fx().writes.iter().any(|w| matches!(w, StoreWrite::Footprint { .. })),
        "nothing measured, nothing learned"
    );
}

/// A process list the driver refuses is not an empty one: the model on that device is counted at
/// its size (not again as foreign), its footprint is not learned, and its release makes the
/// memory foreign until a reading shows it gone.
#[test]
fn an_unreadable_process_list_counts_the_models_there_at_their_size() {
    let mut rig = Rig::new(TWO_MODELS, 10_000);
    drop(rig.load("llm"));
    let pid = rig.ready("llm");
    rig.sample(&[(pid, 6200)]);
    let mut reading = device_view(10_000, &[]);
    reading.devices[0].used_mib = 6500;
    reading.devices[0].processes_unavailable = Some("NVML compute process list: Insufficient Permissions".into());
    rig.input(Input::Sample(Arc::new(reading.clone()), ProcTable::default()));
    let (devices, residents, _) = rig.engine.policy_inputs();
    assert_eq!(residents[0].footprint_mib, 6200, "the last measured size, not 0");
    assert_eq!(devices[0].foreign_mib, 300, "6500 used − llm's 6200");
    // 10000 − 300 − 6200 = 3500: stt fits beside it.
    drop(rig.load("stt"));
    assert!(rig.fx().process_starts.iter().any(|(id, ..)| id == "stt"));
    assert_eq!(rig.state("llm"), ModelState::Ready);
    // Released (the watch timed out on the unreadable list): its memory is foreign now.
    drop(rig.unload("llm"));
    let generation = rig.generation("llm");
    rig.command(Command::Released { model: "llm".into(), generation, timed_out: true, waited: Duration::ZERO });
    let (devices, _, _) = rig.engine.policy_inputs();
    assert_eq!(devices[0].foreign_mib, 6500, "not counted nowhere");
}

/// A release no list confirmed (amdgpu has none; the release ends when the process does) leaves
/// what the model was counted at as foreign until a reading shows it gone: a load waiting behind
/// it is not admitted on memory the driver may still hold.
#[test]
fn a_release_no_list_confirmed_keeps_the_memory_counted_until_a_reading_shows_it_gone() {
    let mut rig = Rig::new(TWO_MODELS, 10_000);
    drop(rig.load("llm"));
    rig.ready("llm");
    let mut blind = device_view(10_000, &[]);
    blind.devices[0].used_mib = 6500;
    blind.devices[0].processes_unavailable = Some("amdgpu sysfs has no per-process figures".into());
    rig.input(Input::Sample(Arc::new(blind), ProcTable::default()));
    drop(rig.unload("llm"));
    let generation = rig.generation("llm");
    rig.command(Command::Released { model: "llm".into(), generation, timed_out: false, waited: Duration::ZERO });
    let (devices, _, _) = rig.engine.policy_inputs();
    assert_eq!(devices[0].foreign_mib, 6500, "the last reading's use is not counted nowhere");
    let (_, residents, _) = rig.engine.policy_inputs();
    assert!(residents.is_empty(), "llm is gone");
}

/// While a model loads on a device whose processes cannot be attributed, its size is not
/// assumed out of the device's use: the rest of that use stays foreign (its reservation counts
/// on its own).
#[test]
fn a_loading_model_on_a_blind_device_hides_no_foreign_use() {
    let mut rig = Rig::new(TWO_MODELS, 16_000);
    drop(rig.load("llm"));
    rig.spawned("llm");
    let mut blind = device_view(16_000, &[]);
    blind.devices[0].used_mib = 6000;
    blind.devices[0].processes_unavailable = Some("amdgpu sysfs has no per-process figures".into());
    rig.input(Input::Sample(Arc::new(blind), ProcTable::default()));
    let (devices, _, _) = rig.engine.policy_inputs();
    assert_eq!(devices[0].foreign_mib, 6000, "others' 6000 MiB, not hidden by llm's reservation");
}

/// A device that cannot be read admits nothing: a lease waits (nothing is evicted for it) until a
/// reading of the device works again, and is then judged on that reading.
#[test]
fn a_device_that_cannot_be_read_admits_nothing_until_it_answers() {
    let mut rig = Rig::new(TWO_MODELS, 8000);
    let mut lost = device_view(8000, &[]);
    lost.devices[0].error = Some("GPU is lost".into());
    rig.input(Input::Sample(Arc::new(lost), ProcTable::default()));
    let (devices, _, _) = rig.engine.policy_inputs();
    assert_eq!(devices[0].foreign_mib, 8000, "its free memory counts as zero");
    let mut waits = rig.lease(LeaseRequest { wait: Duration::from_secs(5), ..memory_lease("ffmpeg", 1000) });
    assert!(answered(&mut waits).is_none(), "not granted on a device that cannot be read");
    rig.sample(&[(7, 2000)]);
    assert_eq!(answered(&mut waits).expect("answered").expect("granted").vram_mib, 1000);
}

/// The deadline index: every pending deadline, earliest first.
#[test]
fn the_deadline_index_orders_every_pending_deadline() {
    let config = "[models.llm]\nbackend = \"process\"\ncmd = \"llm\"\nvram = \"1000MiB\"\nttl = \"30s\"\n";
    let mut rig = Rig::new(config, 8000);
    assert_eq!(rig.engine.next_deadline(), None, "nothing pending");
    rig.load("llm");
    rig.ready("llm");
    let ttl_at = rig.engine.next_deadline().expect("the idle TTL");
    let lease = LeaseRequest { ttl: Some(Duration::from_secs(5)), ..memory_lease("job", 100) };
    let _grant = rig.lease(lease);
    assert_eq!(rig.engine.deadlines().len(), 2);
    assert!(rig.engine.next_deadline().expect("the heartbeat") < ttl_at, "the earlier one first");
    rig.advance(Duration::from_secs(30));
    assert_eq!(rig.state("llm"), ModelState::Unloading, "idle TTL");
    assert!(rig.engine.view().leases.is_empty(), "the heartbeat lease expired");
}

/// Queue rules: higher priority first; a waiter that cannot be served blocks later waiters on
/// its device; a load waits for a load slot without blocking memory requests.
#[test]
fn the_queue_serves_by_priority_and_load_slots() {
    let config = format!(
        "{TWO_MODELS}\n[models.low]\nbackend = \"process\"\ncmd = \"low\"\nvram = \"1000MiB\"\npriority = 10\n"
    );
    let mut rig = Rig::new(&config, 20_000);
    let _llm = rig.load("llm");
    // max_parallel_loads = 1: the next loads wait for the slot, in priority order.
    let _low = rig.load("low");
    let _stt = rig.load("stt");
    let queue: Vec<String> = rig.engine.view().queue.iter().map(|q| q.requester.clone()).collect();
    assert_eq!(queue, ["stt", "low"], "priority first");
    assert!(rig.engine.view().queue[0].reason.as_deref().is_some_and(|r| r.contains("no load slot free")));
    rig.ready("llm");
    assert_eq!(rig.state("stt"), ModelState::Loading, "the higher priority goes first");
    assert_eq!(rig.state("low"), ModelState::Unloaded);
}

/// `resident_cap`: at the cap, the least valuable idle resident makes room.
#[test]
fn resident_cap_evicts_an_idle_model() {
    let config = format!("[scheduler]\nresident_cap = 1\n{TWO_MODELS}");
    let mut rig = Rig::new(&config, 20_000);
    drop(rig.load("llm"));
    rig.ready("llm");
    let _stt = rig.load("stt");
    assert_eq!(rig.state("llm"), ModelState::Unloading);
    assert_eq!(rig.transitions().last().map(|t| t.2.clone()), Some("resident_cap".into()));
}

/// Pressure: at `emergency` an idle model is released, lowest priority first.
#[test]
fn an_emergency_releases_the_lowest_priority_idle_model() {
    let mut rig = Rig::new(TWO_MODELS, 20_000);
    drop(rig.load("llm"));
    let llm = rig.ready("llm");
    drop(rig.load("stt"));
    let stt = rig.ready("stt");
    let mut view = device_view(20_000, &[(llm, 6000), (stt, 3000), (1, 10_500)]);
    view.devices[0].level = Level::Emergency;
    rig.input(Input::Sample(Arc::new(view), ProcTable::default()));
    assert_eq!(rig.state("llm"), ModelState::Unloading, "priority 50 goes before 80");
    assert_eq!(rig.state("stt"), ModelState::Ready, "one at a time");
}

/// A device that cannot be read shows its last good level: an emergency there is stale, and
/// releases nothing.
#[test]
fn a_stale_emergency_on_a_device_that_cannot_be_read_releases_nothing() {
    let mut rig = Rig::new(TWO_MODELS, 20_000);
    drop(rig.load("llm"));
    let llm = rig.ready("llm");
    let mut view = device_view(20_000, &[(llm, 6000), (1, 14_500)]);
    view.devices[0].level = Level::Emergency;
    view.devices[0].error = Some("GPU is lost".into());
    rig.input(Input::Sample(Arc::new(view), ProcTable::default()));
    assert_eq!(rig.state("llm"), ModelState::Ready);
}

/// A model lease keeps its model in use: never evicted, not unloadable, and its pin goes with it.
#[test]
fn a_model_lease_keeps_its_model() {
    let mut rig = Rig::new(TWO_MODELS, 8000);
    let request = model_lease("app", "llm");
    let mut grant = rig.lease(request);
    assert_eq!(rig.state("llm"), ModelState::Loading, "loaded on demand");
    let pid = rig.ready("llm");
    let grant = answered(&mut grant).expect("answered").expect("granted");
    assert_eq!(grant.upstream.as_deref(), Some("http://127.0.0.1:40000"));
    assert_eq!(rig.gates["llm"].in_use(), 1, "the lease holds a pin");
    rig.sample(&[(pid, 6000)]);
    let _stt = rig.load("stt");
    assert_eq!(rig.state("llm"), ModelState::Ready, "not evicted");
    let mut unload = rig.unload("llm");
    assert!(matches!(answered(&mut unload), Some(Err(ArbiterError::Conflict(_)))));
    let (reply, _done) = oneshot::channel();
    rig.command(Command::Release { id: grant.id, reason: "released", reply: Some(reply) });
    assert_eq!(rig.gates["llm"].in_use(), 0);
    assert_eq!(rig.state("llm"), ModelState::Unloading, "now stt may evict it");
}

/// A lease whose wait ran out while its victim is still being released waits for the release,
/// and its passed deadline does not wake the shell over and over meanwhile.
#[test]
fn a_lease_past_its_wait_while_its_victims_go_does_not_keep_the_clock_ringing() {
    let mut rig = Rig::new(TWO_MODELS, 8000);
    drop(rig.load("llm"));
    let pid = rig.ready("llm");
    rig.sample(&[(pid, 6000)]);
    let mut lease =
        rig.lease(LeaseRequest { wait: Duration::from_secs(1), priority: 100, ..memory_lease("job", 4000) });
    assert_eq!(rig.state("llm"), ModelState::Unloading, "evicted for the lease");
    rig.advance(Duration::from_secs(2));
    assert!(answered(&mut lease).is_none(), "it waits for the victim it evicted");
    assert!(rig.engine.next_deadline().is_none_or(|at| at > rig.now), "no deadline in the past");
    rig.released("llm");
    rig.sample(&[]);
    assert!(answered(&mut lease).expect("answered").is_ok(), "granted once the memory is back");
}

/// A model known only by its header estimate is admitted with that estimate, leaving the rest of
/// the device to others, instead of reserving everything free (what a model nothing is known of
/// does).
#[test]
fn a_model_known_by_its_estimate_is_admitted_with_it() {
    let config = "[models.llm]\nbackend = \"process\"\ncmd = \"llm\"\nvram = \"5000MiB\"\n\
        [models.new]\nbackend = \"process\"\ncmd = \"new\"\n";
    // An estimate past what any device holds (a misread command) is not used: a first load must
    // not be refused on a guess.
    for estimate in [Some(2000), None, Some(50_000)] {
        let known = KnownFootprints {
            learned: HashMap::new(),
            estimated: estimate.map(|mib| ("new".to_string(), mib)).into_iter().collect(),
            ..KnownFootprints::default()
        };
        let mut rig = Rig::with_known(config, 8000, &known);
        let _llm = rig.load("llm");
        let pid = rig.ready("llm");
        rig.sample(&[(pid, 5000)]);
        let _new = rig.load("new");
        let new = rig.engine.models.iter().find(|m| m.spec.id == "new").expect("configured");
        let reserved = (new.state(), new.reserved_mib);
        match estimate {
            Some(mib) if mib < 8000 => {
                assert_eq!(reserved, (ModelState::Loading, mib), "admitted with its estimate");
                assert_eq!(rig.state("llm"), ModelState::Ready, "nothing evicted for it");
            }
            _ => assert_eq!(reserved, (ModelState::Loading, 3000), "everything free"),
        }
    }
}

/// A stored measurement is kept while the estimate it was measured under still holds, and scaled
/// by the new estimate when that changed; models without estimates keep their measurements.
#[test]
fn a_stored_measurement_is_corrected_when_the_estimate_changes() {
    let measured: HashMap<String, u64> =
        [("same", 3000), ("changed", 3000), ("plain", 1234)].map(|(m, v)| (m.to_string(), v)).into();
    let then: HashMap<String, u64> = [("same", 2500), ("changed", 2500)].map(|(m, v)| (m.to_string(), v)).into();
    let now: HashMap<String, u64> = [("same", 2500), ("changed", 5000)].map(|(m, v)| (m.to_string(), v)).into();
    let known = KnownFootprints::new(measured, &then, now);
    assert_eq!(known.learned["same"], 3000);
    assert_eq!(known.learned["changed"], 6000, "5000 × 3000 / 2500");
    assert_eq!(known.learned["plain"], 1234);
    assert_eq!(known.estimated["changed"], 5000);
    assert_eq!(known.scaled.iter().collect::<Vec<_>>(), ["changed"]);
}

/// A footprint scaled from an older measurement is a guess: the first real measurement replaces
/// it even when smaller (a measured figure only ever grows otherwise).
#[test]
fn the_first_measurement_replaces_a_scaled_footprint_even_a_smaller_one() {
    let config = "[models.llm]\nbackend = \"process\"\ncmd = \"llm\"\n";
    let known = KnownFootprints::new(
        [("llm".to_string(), 3000)].into(),
        &[("llm".to_string(), 2500)].into(),
        [("llm".to_string(), 5000)].into(),
    );
    let mut rig = Rig::with_known(config, 10_000, &known);
    let _load = rig.load("llm");
    let pid = rig.ready("llm");
    rig.sample(&[(pid, 4000)]);
    let llm = rig.engine.models.iter().find(|m| m.spec.id == "llm").expect("configured");
    assert_eq!(llm.learned_mib, Some(4000), "measured below the scaled 6000");
    rig.sample(&[(pid, 3500)]);
    let llm = rig.engine.models.iter().find(|m| m.spec.id == "llm").expect("configured");
    assert_eq!(llm.learned_mib, Some(4000), "then only a larger measurement raises it");
}

/// A load that waits for a victim's memory prefetches its weights file meanwhile; the prefetch
/// is stopped when the load is abandoned, left running when the load starts, and never asked
/// for with `prefetch = false`.
#[test]
fn a_load_waiting_for_a_release_prefetches_its_weights_and_an_abandoned_one_stops() {
    let weights: HashMap<String, std::path::PathBuf> = [("stt".to_string(), "/m/stt.gguf".into())].into();
    for (prefetch, abandon) in [(true, false), (true, true), (false, false)] {
        let config = format!("[scheduler]\nprefetch = {prefetch}\nqueue_timeout = \"10s\"\n{TWO_MODELS}");
        let known = KnownFootprints { weights: weights.clone(), ..KnownFootprints::default() };
        let mut rig = Rig::with_known(&config, 8000, &known);
        rig.load("llm");
        let pid = rig.ready("llm");
        rig.sample(&[(pid, 6000)]);
        let stt = rig.load("stt");
        assert_eq!(rig.state("llm"), ModelState::Unloading, "llm is evicted for stt");
        let expected_start = if prefetch { vec![("stt".to_string(), true)] } else { vec![] };
        assert_eq!(rig.fx().prefetches, expected_start, "prefetch = {prefetch}");
        if abandon {
            // The caller goes away and the queue timeout passes: the load is abandoned.
            drop(stt);
            rig.advance(Duration::from_secs(11));
            assert_eq!(rig.fx().prefetches.last(), Some(&("stt".to_string(), false)), "stopped");
        } else {
            rig.released("llm");
            assert_eq!(rig.state("stt"), ModelState::Loading);
            assert_eq!(rig.fx().prefetches, expected_start, "a load that started keeps its prefetch");
        }
    }
}
