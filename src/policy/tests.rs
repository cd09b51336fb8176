//! Examples of the policy's decisions, one rule each.

use super::*;

pub(super) fn dev(index: u32, usable_mib: u64, foreign_mib: u64) -> DeviceState {
    DeviceState { index, usable_mib, foreign_mib }
}

/// A ready, idle, unpinned model of priority 0, resident since 0 with no minimum residency.
pub(super) fn res(id: &str, device: u32, footprint_mib: u64) -> Resident {
    Resident {
        id: id.to_owned(),
        device,
        footprint_mib,
        priority: 0,
        in_use: 0,
        pinned: false,
        ready: true,
        last_used: 0,
        resident_since: 0,
        min_residency: 0,
    }
}

pub(super) fn used(mut resident: Resident, last_used: Millis) -> Resident {
    resident.last_used = last_used;
    resident
}

pub(super) fn prio(mut resident: Resident, priority: i32) -> Resident {
    resident.priority = priority;
    resident
}

pub(super) fn hold(holder: &str, device: u32, mib: u64, exclusive: bool) -> Hold {
    Hold { holder: holder.to_owned(), device, mib, exclusive }
}

pub(super) fn req(requester: &str, mib: u64, device: Option<u32>, priority: i32) -> Request {
    Request { requester: requester.to_owned(), mib, device, priority, exclusive: false }
}

pub(super) fn evict(device: u32, victims: &[&str]) -> Decision {
    Decision::Evict { device, victims: victims.iter().map(|v| (*v).to_owned()).collect() }
}

pub(super) fn wait(decision: Decision) -> Shortfall {
    match decision {
        Decision::Wait(shortfall) => shortfall,
        other => panic!("expected Wait, got {other:?}"),
    }
}

pub(super) fn reason(shortfall: &Shortfall, id: &str) -> Option<String> {
    shortfall.holders.iter().find(|h| h.id == id).and_then(|h| h.kept_because.clone())
}

#[test]
pub(super) fn available_subtracts_everything_on_the_device_and_saturates() {
    let d = dev(0, 8000, 1000);
    let residents = [res("a", 0, 2000), res("elsewhere", 1, 5000)];
    let holds = [hold("job", 0, 1500, false), hold("far", 1, 100, false)];
    assert_eq!(available_mib(&d, &residents, &holds), 3500);
    assert_eq!(available_mib(&dev(0, 1000, 900), &residents, &holds), 0);
}

#[test]
pub(super) fn a_request_that_fits_is_admitted_without_victims() {
    let devices = [dev(0, 8000, 1000)];
    let residents = [res("a", 0, 2000)];
    assert_eq!(decide(&devices, &residents, &[], &req("b", 5000, Some(0), 0), 0), Decision::Admit { device: 0 });
    // Exactly the available amount still fits.
    assert_eq!(decide(&devices, &residents, &[], &req("b", 5000, None, -10), 0), Decision::Admit { device: 0 });
}

#[test]
pub(super) fn least_recently_used_goes_first_among_equal_priority() {
    let devices = [dev(0, 8000, 0)];
    let residents = [used(res("recent", 0, 3000), 50), used(res("old", 0, 3000), 10), used(res("mid", 0, 2000), 30)];
    // 0 available; a 3000 MiB deficit: the oldest alone covers it.
    assert_eq!(decide(&devices, &residents, &[], &req("new", 3000, Some(0), 0), 100), evict(0, &["old"]));
    // 4000: old, then mid would be the prefix (5000), and both are needed.
    assert_eq!(decide(&devices, &residents, &[], &req("new", 4000, Some(0), 0), 100), evict(0, &["old", "mid"]));
}

#[test]
pub(super) fn lower_priority_goes_before_less_recently_used() {
    let devices = [dev(0, 6000, 0)];
    let residents = [prio(used(res("old-important", 0, 3000), 1), 3), prio(used(res("new-cheap", 0, 3000), 90), 1)];
    assert_eq!(decide(&devices, &residents, &[], &req("x", 3000, Some(0), 5), 100), evict(0, &["new-cheap"]));
}

#[test]
pub(super) fn higher_priority_residents_are_protected() {
    let devices = [dev(0, 6000, 0)];
    let residents = [prio(res("vip", 0, 4000), 10), res("small", 0, 2000)];
    let shortfall = wait(decide(&devices, &residents, &[], &req("x", 3000, Some(0), 5), 100));
    assert_eq!(reason(&shortfall, "vip").as_deref(), Some("higher priority"));
    assert_eq!(reason(&shortfall, "small"), None);
    // Equal priority is fair game.
    assert_eq!(decide(&devices, &residents, &[], &req("x", 3000, Some(0), 10), 100), evict(0, &["vip"]));
}

#[test]
pub(super) fn pinned_in_use_loading_and_young_models_are_never_victims() {
    let devices = [dev(0, 8000, 0)];
    let mut pinned = used(res("pinned", 0, 2000), 0);
    pinned.pinned = true;
    let mut busy = used(res("busy", 0, 2000), 0);
    busy.in_use = 1;
    let mut loading = used(res("loading", 0, 2000), 0);
    loading.ready = false;
    let mut young = used(res("young", 0, 2000), 0);
    young.resident_since = 90;
    young.min_residency = 60;
    let residents = [pinned, busy, loading, young];
    let shortfall = wait(decide(&devices, &residents, &[], &req("x", 1, Some(0), 100), 100));
    assert_eq!(reason(&shortfall, "pinned").as_deref(), Some("pinned"));
    assert_eq!(reason(&shortfall, "busy").as_deref(), Some("in use"));
    assert_eq!(reason(&shortfall, "loading").as_deref(), Some("loading"));
    assert_eq!(reason(&shortfall, "young").as_deref(), Some("min residency"));
    // Once its minimum residency is over, the young one is the only possible victim.
    assert_eq!(decide(&devices, &residents, &[], &req("x", 1, Some(0), 100), 150), evict(0, &["young"]));
}

#[test]
pub(super) fn the_requester_is_never_its_own_victim() {
    let devices = [dev(0, 4000, 0)];
    let residents = [res("me", 0, 4000)];
    let shortfall = wait(decide(&devices, &residents, &[], &req("me", 1000, Some(0), 0), 10));
    assert_eq!(reason(&shortfall, "me").as_deref(), Some("requester"));
}

#[test]
pub(super) fn minimisation_prefers_one_big_victim_over_two_small() {
    let devices = [dev(0, 4000, 0)];
    let residents = [used(res("small-a", 0, 500), 1), used(res("small-b", 0, 500), 2), used(res("big", 0, 3000), 3)];
    // Deficit 1500: the prefix is all three, then both small ones are dropped.
    assert_eq!(decide(&devices, &residents, &[], &req("x", 1500, Some(0), 0), 10), evict(0, &["big"]));
    // Deficit 3300: the prefix is all three; small-a is dropped first (small-b + big = 3500 still
    // covers it), after which small-b is needed.
    assert_eq!(decide(&devices, &residents, &[], &req("x", 3300, Some(0), 0), 10), evict(0, &["small-b", "big"]));
}

#[test]
pub(super) fn any_device_admits_where_most_is_available() {
    let devices = [dev(0, 8000, 0), dev(1, 8000, 0), dev(2, 8000, 0)];
    let residents = [res("a", 0, 4000), res("b", 1, 1000), res("c", 2, 1000)];
    // GPU 1 and 2 tie at 7000: the lowest index wins.
    assert_eq!(decide(&devices, &residents, &[], &req("x", 2000, None, 0), 0), Decision::Admit { device: 1 });
    // Filling the roomiest device exactly is still a fit: no eviction on GPU 0 for it.
    assert_eq!(decide(&devices, &residents, &[], &req("x", 7000, None, 0), 0), Decision::Admit { device: 1 });
}

#[test]
pub(super) fn any_device_evicts_where_fewest_victims_are_needed() {
    let devices = [dev(0, 4000, 0), dev(1, 4000, 0), dev(2, 4000, 0)];
    let residents = [
        res("a1", 0, 2000),
        res("a2", 0, 2000),
        prio(res("b", 1, 4000), 2),
        res("c1", 2, 1000),
        prio(res("c2", 2, 3000), 1),
    ];
    // GPU 0 needs two victims; GPU 1 one of priority 2; GPU 2 one (c2, after c1 is dropped) of priority 1.
    assert_eq!(decide(&devices, &residents, &[], &req("x", 3000, None, 5), 0), evict(2, &["c2"]));
}

#[test]
pub(super) fn an_exclusive_hold_blocks_everyone_else() {
    let devices = [dev(0, 8000, 0), dev(1, 8000, 6000)];
    let holds = [hold("ffmpeg", 0, 1000, true)];
    let shortfall = wait(decide(&devices, &[], &holds, &req("x", 100, Some(0), 0), 0));
    assert_eq!(shortfall.exclusive_conflict.as_deref(), Some("ffmpeg"));
    assert_eq!(
        shortfall.to_string(),
        "needs 100 MiB on GPU 0; 7000 MiB available (usable 8000, foreign 0); held by: ffmpeg 1000 MiB (exclusive lease); GPU 0 is held exclusively by ffmpeg"
    );
    // The holder itself may take more; another device is used when any will do.
    assert_eq!(decide(&devices, &[], &holds, &req("ffmpeg", 100, Some(0), 0), 0), Decision::Admit { device: 0 });
    assert_eq!(decide(&devices, &[], &holds, &req("x", 100, None, 0), 0), Decision::Admit { device: 1 });
    // It cannot be evicted around either.
    let residents = [res("a", 1, 2000)];
    assert_eq!(decide(&devices, &residents, &holds, &req("x", 1000, None, 0), 0), evict(1, &["a"]));
}

#[test]
pub(super) fn an_exclusive_request_needs_the_device_free_of_other_holds() {
    let devices = [dev(0, 8000, 0)];
    let holds = [hold("ffmpeg", 0, 2048, false), hold("small", 0, 10, false)];
    let mut request = req("render", 1000, Some(0), 0);
    request.exclusive = true;
    let shortfall = wait(decide(&devices, &[], &holds, &request, 0));
    assert_eq!(shortfall.exclusive_conflict.as_deref(), Some("ffmpeg"));
    assert!(
        shortfall.to_string().ends_with("; an exclusive lease needs GPU 0 to itself, but ffmpeg holds 2048 MiB"),
        "{shortfall}"
    );
    // Resident models may stay, and may be evicted for it.
    let residents = [res("llm", 0, 7000)];
    assert_eq!(decide(&devices, &residents, &[], &request, 0), Decision::Admit { device: 0 });
    assert_eq!(decide(&devices, &residents, &[hold("render", 0, 500, false)], &request, 0), evict(0, &["llm"]));
}

#[test]
pub(super) fn bigger_than_usable_never_fits() {
    let devices = [dev(0, 7680, 0), dev(1, 6000, 0)];
    let decision = decide(&devices, &[], &[], &req("x", 9000, None, 0), 0);
    let Decision::NeverFits(shortfall) = &decision else { panic!("expected NeverFits, got {decision:?}") };
    assert_eq!(shortfall.device, 0);
    assert_eq!(
        decision.message().as_deref(),
        Some("only 7680 MiB usable on GPU 0 (total minus reserve), need at least 9000 MiB")
    );
    // Foreign use does not make a request never fit: it may go away.
    let busy = [dev(0, 7680, 7000)];
    assert!(matches!(decide(&busy, &[], &[], &req("x", 7680, None, 0), 0), Decision::Wait(_)));
    // A request that fits only on a device it did not ask for still never fits.
    assert!(matches!(decide(&devices, &[], &[], &req("x", 7000, Some(1), 0), 0), Decision::NeverFits(_)));
}

#[test]
pub(super) fn an_unknown_device_never_fits() {
    let decision = decide(&[dev(0, 8000, 0)], &[], &[], &req("x", 1, Some(3), 0), 0);
    let Decision::NeverFits(shortfall) = &decision else { panic!("expected NeverFits, got {decision:?}") };
    assert_eq!((shortfall.device, shortfall.usable_mib, shortfall.need_mib), (3, 0, 1));
    assert_eq!(
        decision.message().as_deref(),
        Some("GPU 3 has no usable memory (no such device, or its reserve takes all of it), need at least 1 MiB")
    );
    assert!(matches!(decide(&[], &[], &[], &req("x", 1, None, 0), 0), Decision::NeverFits(_)));
}

#[test]
pub(super) fn wait_message_lists_holders_largest_first_with_reasons() {
    let devices = [dev(0, 7680, 1200)];
    let mut llm = res("llm", 0, 4380);
    llm.in_use = 2;
    let mut whisper = res("whisper", 0, 1500);
    whisper.pinned = true;
    let residents = [whisper, llm, res("clip", 0, 500)];
    let holds = [hold("ffmpeg", 0, 99, false)];
    let decision = decide(&devices, &residents, &holds, &req("vlm", 6144, Some(0), 0), 0);
    assert_eq!(
        decision.message().as_deref(),
        Some(
            "needs 6144 MiB on GPU 0; 1 MiB available (usable 7680, foreign 1200); held by: llm 4380 MiB (in use), \
             whisper 1500 MiB (pinned), clip 500 MiB, ffmpeg 99 MiB (lease)"
        )
    );
}

#[test]
pub(super) fn message_shapes_are_stable() {
    let holders = vec![
        HolderInfo { id: "llm".into(), mib: 4380, kept_because: Some("in use".into()) },
        HolderInfo { id: "whisper".into(), mib: 1500, kept_because: Some("pinned".into()) },
    ];
    let mut shortfall = Shortfall {
        device: 0,
        need_mib: 6144,
        available_mib: 2100,
        usable_mib: 7680,
        foreign_mib: 1200,
        holders,
        exclusive_conflict: None,
    };
    assert_eq!(
        shortfall.to_string(),
        "needs 6144 MiB on GPU 0; 2100 MiB available (usable 7680, foreign 1200); held by: llm 4380 MiB (in use), whisper 1500 MiB (pinned)"
    );
    assert_eq!(Decision::Wait(shortfall.clone()).message(), Some(shortfall.to_string()), "Display is the wait form");
    assert_eq!(shortfall.describe(true), "only 7680 MiB usable on GPU 0 (total minus reserve), need at least 6144 MiB");

    shortfall.holders.push(HolderInfo { id: "ffmpeg".into(), mib: 2048, kept_because: Some("lease".into()) });
    shortfall.exclusive_conflict = Some("ffmpeg".into());
    assert!(shortfall.to_string().ends_with(
        "whisper 1500 MiB (pinned), ffmpeg 2048 MiB (lease); an exclusive lease needs GPU 0 to itself, but ffmpeg holds 2048 MiB"
    ));
    shortfall.holders =
        vec![HolderInfo { id: "ffmpeg".into(), mib: 2048, kept_because: Some("exclusive lease".into()) }];
    assert_eq!(
        shortfall.to_string(),
        "needs 6144 MiB on GPU 0; 2100 MiB available (usable 7680, foreign 1200); held by: ffmpeg 2048 MiB (exclusive lease); GPU 0 is held exclusively by ffmpeg"
    );
    // No holders: no "held by" part at all.
    shortfall.holders.clear();
    shortfall.exclusive_conflict = None;
    assert_eq!(shortfall.to_string(), "needs 6144 MiB on GPU 0; 2100 MiB available (usable 7680, foreign 1200)");
    assert_eq!(Decision::Admit { device: 0 }.message(), None);
    assert_eq!(evict(0, &["a"]).message(), None);
}

#[test]
pub(super) fn an_over_committed_device_evicts_enough_to_restore_the_invariant() {
    // Foreign use grew after admission: 2000 committed, only 1200 room.
    let devices = [dev(0, 4000, 2800)];
    let residents = [used(res("a", 0, 1000), 1), used(res("b", 0, 1000), 2)];
    assert_eq!(available_mib(&devices[0], &residents, &[]), 0);
    // 100 needs the 800 overshoot plus 100 covered: one victim of 1000 does it.
    assert_eq!(decide(&devices, &residents, &[], &req("x", 100, Some(0), 0), 10), evict(0, &["a"]));
    // 300 needs 1100: both.
    assert_eq!(decide(&devices, &residents, &[], &req("x", 300, Some(0), 0), 10), evict(0, &["a", "b"]));
}

#[test]
pub(super) fn pressure_victim_is_lowest_priority_then_least_recently_used() {
    let mut busy = prio(res("busy", 0, 100), -9);
    busy.in_use = 1;
    let residents = [
        busy,
        prio(used(res("high", 0, 100), 0), 5),
        prio(used(res("low-new", 0, 100), 50), 1),
        prio(used(res("low-old", 0, 100), 40), 1),
        prio(used(res("other-gpu", 1, 100), 0), -9),
    ];
    assert_eq!(pressure_victim(0, &residents, 100).as_deref(), Some("low-old"));
    assert_eq!(pressure_victim(1, &residents, 100).as_deref(), Some("other-gpu"));
    assert_eq!(pressure_victim(2, &residents, 100), None);
    let mut young = res("young", 3, 100);
    young.min_residency = 1000;
    assert_eq!(pressure_victim(3, &[young.clone()], 999), None);
    assert_eq!(pressure_victim(3, &[young], 1000).as_deref(), Some("young"));
}

#[test]
pub(super) fn cap_victim_is_least_recently_used_regardless_of_priority() {
    let mut pinned = used(res("pinned", 0, 100), 0);
    pinned.pinned = true;
    let residents = [pinned, prio(used(res("vip", 1, 100), 5), 100), prio(used(res("cheap", 0, 100), 9), -100)];
    assert_eq!(cap_victim(&residents, 10).as_deref(), Some("vip"));
    assert_eq!(cap_victim(&residents[..1], 10), None);
}
