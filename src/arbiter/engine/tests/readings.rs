//! What the engine does with the readings' age and with the devices a model's processes were
//! seen on: a reading the probe failed to renew admits nothing (and says so) until a fresh one
//! arrives; a release watches every device the model's pids were seen on.

use super::*;

/// A reading of `processes` on the Rig's device, taken at `read_at`, stale 5 s later.
fn reading_at(rig: &Rig, processes: &[(u32, u64)], read_at: Instant) -> Arc<GpuView> {
    let mut view = device_view(rig.total_mib, processes);
    view.read_at = Some(read_at);
    view.stale_after = Duration::from_secs(5);
    Arc::new(view)
}

fn no_wait(mib: u64) -> LeaseRequest {
    LeaseRequest { wait: Duration::ZERO, ..memory_lease("job", mib) }
}

/// The probe hangs: no reading after the one at t0. From t0 + 5 s the engine wakes by itself,
/// says which device's reading is how old, and grants nothing on the old figures (a waiter
/// waits); the next fresh reading ends it, and the waiter is served.
#[test]
fn a_reading_past_its_bound_admits_nothing_until_a_fresh_one() {
    let mut rig = Rig::new(TWO_MODELS, 8000);
    let t0 = rig.now;
    let view = reading_at(&rig, &[(7, 1000)], t0);
    rig.input(Input::Sample(view, ProcTable::default()));
    let mut fresh = rig.lease(no_wait(1000));
    assert!(answered(&mut fresh).expect("answered").is_ok(), "a fresh reading admits");
    assert_eq!(rig.engine.next_deadline(), Some(t0 + Duration::from_secs(5)), "wakes when it goes stale");
    assert!(rig.engine.view().degraded_reasons.is_empty());

    rig.advance(Duration::from_secs(6));
    let reasons = rig.fx().views.last().expect("published at the deadline").degraded_reasons.clone();
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(reasons[0].starts_with("GPU 0 (sim): no fresh reading for 6.0s (more than 5.0s"), "{reasons:?}");
    assert!(reasons[0].contains("admits nothing"), "{reasons:?}");
    assert_eq!(rig.engine.next_deadline(), None, "no wake-up for a reading already stale");
    let mut refused = rig.lease(no_wait(1000));
    rig.advance(Duration::from_millis(1));
    assert!(answered(&mut refused).expect("answered").is_err(), "granted on a stale reading");
    let mut waits = rig.lease(LeaseRequest { wait: Duration::from_secs(30), ..memory_lease("job", 1000) });
    assert!(answered(&mut waits).is_none(), "waits for a fresh reading");

    // The late sample arrives, read at t0 + 1 s: on arrival it is already too old.
    let late = reading_at(&rig, &[(7, 1000)], t0 + Duration::from_secs(1));
    rig.input(Input::Sample(late, ProcTable::default()));
    assert!(answered(&mut waits).is_none(), "a reading 5 s old is stale on arrival");
    // A fresh one.
    let now = rig.now;
    rig.input(Input::Sample(reading_at(&rig, &[(7, 1000)], now), ProcTable::default()));
    assert_eq!(answered(&mut waits).expect("served").expect("granted").vram_mib, 1000);
    assert!(rig.engine.view().degraded_reasons.is_empty(), "{:?}", rig.engine.view().degraded_reasons);
}

/// A model's server whose processes were seen on devices 0 and 1: its release must see both
/// lists (a readable device 0 alone does not prove the memory on device 1 is back).
#[test]
fn a_release_watches_every_device_the_models_pids_were_seen_on() {
    let mut rig = Rig::new(TWO_MODELS, 8000);
    drop(rig.load("llm"));
    let pid = rig.ready("llm");
    let mut view = device_view(rig.total_mib, &[(pid, 4000)]);
    let mut second = view.devices[0].clone();
    second.index = 1;
    second.processes[0].used_mib = Some(2000);
    view.devices.push(second);
    rig.input(Input::Sample(Arc::new(view), ProcTable::default()));
    drop(rig.unload("llm"));
    assert_eq!(rig.fx().release_devices.last(), Some(&[0, 1].into()), "placed on 0, seen on 0 and 1");
    // A new load starts afresh: only the devices its new pids are seen on count.
    rig.released("llm");
    drop(rig.load("llm"));
    rig.ready("llm");
    drop(rig.unload("llm"));
    assert_eq!(rig.fx().release_devices.last(), Some(&[0].into()));
}
