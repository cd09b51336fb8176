//! Property tests: random operation sequences applied to a model of the arbiter, checking the
//! policy's invariants after every step.

use super::*;
use proptest::prelude::*;
use proptest::sample::Index;

// ---- Property tests: random operation sequences applied to a model of the arbiter. ----

#[derive(Debug, Clone)]
enum Op {
    Request {
        mib: u64,
        priority: i32,
        /// None: any device; Some(Some(i)): one of the devices; Some(None): one that does not exist.
        device: Option<Option<Index>>,
        exclusive: bool,
        lease: bool,
        min_residency: Millis,
        /// Ask as an existing resident (to check it is never its own victim).
        as_resident: Option<Index>,
    },
    FinishLoad(Index),
    Release(Index),
    /// A job (a hold that is not a load in flight) ends.
    EndJob(Index),
    SetForeign {
        device: u32,
        mib: u64,
    },
    Use {
        who: Index,
        start: bool,
    },
    TogglePin(Index),
    StartUnload(Index),
    Advance(Millis),
}

fn op() -> impl Strategy<Value = Op> {
    let request = (
        // Mostly sizes that fit a device, so that evictions are common; some that never fit.
        prop_oneof![6 => 1u64..6000, 1 => 1u64..20_000],
        -5i32..=5,
        // Now and then a device that does not exist.
        prop::option::weighted(0.5, prop::option::weighted(0.95, any::<Index>())),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.15),
        prop_oneof![Just(0u64), 0u64..3000],
        prop::option::weighted(0.1, any::<Index>()),
    )
        .prop_map(|(mib, priority, device, exclusive, lease, min_residency, as_resident)| Op::Request {
            mib,
            priority,
            device,
            exclusive,
            lease,
            min_residency,
            as_resident,
        });
    prop_oneof![
        6 => request,
        5 => any::<Index>().prop_map(Op::FinishLoad),
        2 => any::<Index>().prop_map(Op::Release),
        2 => any::<Index>().prop_map(Op::EndJob),
        1 => (0u32..3, 0u64..8000).prop_map(|(device, mib)| Op::SetForeign { device, mib }),
        // Requests end a little more often than they start, so most models are idle most of the time.
        2 => (any::<Index>(), prop::bool::weighted(0.4)).prop_map(|(who, start)| Op::Use { who, start }),
        1 => any::<Index>().prop_map(Op::TogglePin),
        1 => any::<Index>().prop_map(Op::StartUnload),
        2 => (0u64..5000).prop_map(Op::Advance),
    ]
}

/// The arbiter as the properties see it.
#[derive(Debug)]
struct Model {
    devices: Vec<DeviceState>,
    residents: Vec<Resident>,
    holds: Vec<Hold>,
    /// Loads in flight: holder, priority, min residency. Their memory is a hold until they finish.
    loading: Vec<(String, i32, Millis)>,
    now: Millis,
    next_id: u64,
}

impl Model {
    /// Σ resident footprints + Σ holds on `device`.
    fn committed(&self, device: u32) -> i128 {
        let models: i128 =
            self.residents.iter().filter(|r| r.device == device).map(|r| i128::from(r.footprint_mib)).sum();
        models + self.holds.iter().filter(|h| h.device == device).map(|h| i128::from(h.mib)).sum::<i128>()
    }

    /// usable − foreign − committed, signed.
    fn headroom(&self, device: &DeviceState) -> i128 {
        i128::from(device.usable_mib) - i128::from(device.foreign_mib) - self.committed(device.index)
    }

    /// The victim rules, written independently of the code under test.
    fn eligible(&self, r: &Resident, request: &Request) -> bool {
        r.in_use == 0
            && r.ready
            && !r.pinned
            && self.now >= r.resident_since.saturating_add(r.min_residency)
            && r.priority <= request.priority
            && r.id != request.requester
    }

    fn conflicted(&self, device: u32, request: &Request) -> bool {
        self.holds
            .iter()
            .any(|h| h.device == device && h.holder != request.requester && (h.exclusive || request.exclusive))
    }
}

/// Checks one decision against the state it was made in; panics with the reason if a property fails.
fn check(model: &Model, request: &Request, decision: &Decision) {
    // Decisions do not depend on the order of the inputs.
    let residents: Vec<Resident> = model.residents.iter().rev().cloned().collect();
    let holds: Vec<Hold> = model.holds.iter().rev().cloned().collect();
    assert_eq!(&decide(&model.devices, &residents, &holds, request, model.now), decision, "order matters");

    let candidates: Vec<&DeviceState> = match request.device {
        Some(wanted) => model.devices.iter().filter(|d| d.index == wanted).collect(),
        None => model.devices.iter().collect(),
    };
    let usable = |d: u32| model.devices.iter().find(|x| x.index == d).map(|x| x.usable_mib);
    let available = |d: &DeviceState| available_mib(d, &model.residents, &model.holds);
    let fitting: Vec<&DeviceState> = candidates
        .iter()
        .copied()
        .filter(|d| request.mib <= available(d) && !model.conflicted(d.index, request))
        .collect();

    // (e) NeverFits exactly when the request is bigger than every candidate's usable memory.
    let never = candidates.iter().all(|d| request.mib > d.usable_mib);
    assert_eq!(matches!(decision, Decision::NeverFits(_)), never, "NeverFits iff too big everywhere");

    // (c) A request that fits somewhere it may go is admitted, on the roomiest such device.
    if let Some(max) = fitting.iter().map(|d| available(d)).max() {
        let Decision::Admit { device } = decision else { panic!("fits but got {decision:?}") };
        let chosen = fitting.iter().find(|d| d.index == *device).expect("admitted on a fitting device");
        assert_eq!(available(chosen), max, "admitted where most is available");
    }

    match decision {
        Decision::Admit { device } => {
            let d = candidates.iter().find(|d| d.index == *device).expect("admit on a candidate");
            assert!(request.mib <= available(d));
            assert!(!model.conflicted(*device, request), "admitted past an exclusive conflict");
        }
        Decision::Evict { device, victims } => {
            let d = candidates.iter().find(|d| d.index == *device).expect("evict on a candidate");
            assert!(!model.conflicted(*device, request), "evicted past an exclusive conflict");
            // (d) Eviction only when needed, and every victim needed.
            assert!(!victims.is_empty());
            assert!(request.mib > available(d), "evicted for a request that fit");
            let mut footprints = Vec::new();
            for id in victims {
                assert_eq!(victims.iter().filter(|v| *v == id).count(), 1, "victim {id} named twice");
                let r = model
                    .residents
                    .iter()
                    .find(|r| &r.id == id && r.device == *device)
                    .expect("victim is a resident of the device");
                // (b) Only idle, ready, unpinned, old enough, no higher priority, not the requester.
                assert!(model.eligible(r, request), "ineligible victim {r:?} for {request:?}");
                footprints.push(i128::from(r.footprint_mib));
            }
            let deficit = i128::from(request.mib) - model.headroom(d);
            let freed: i128 = footprints.iter().sum();
            assert!(freed >= deficit, "victims do not cover the deficit");
            for f in &footprints {
                assert!(freed - f < deficit, "a victim was not needed");
            }
        }
        Decision::Wait(shortfall) => {
            assert!(usable(shortfall.device).is_some_and(|u| request.mib <= u), "waits on a device it fits");
            assert_eq!(shortfall.need_mib, request.mib);
            // Waiting is right only if no allowed device could be freed enough.
            for d in candidates.iter().filter(|d| !model.conflicted(d.index, request)) {
                let evictable: i128 = model
                    .residents
                    .iter()
                    .filter(|r| r.device == d.index && model.eligible(r, request))
                    .map(|r| i128::from(r.footprint_mib))
                    .sum();
                assert!(model.headroom(d) + evictable < i128::from(request.mib), "could have evicted on {d:?}");
            }
            assert!(!shortfall.to_string().is_empty());
        }
        Decision::NeverFits(shortfall) => assert_eq!(shortfall.need_mib, request.mib),
    }
}

fn apply(model: &mut Model, op: Op) {
    match op {
        Op::Request { mib, priority, device, exclusive, lease, min_residency, as_resident } => {
            let reuse = as_resident.and_then(|i| {
                (!model.residents.is_empty()).then(|| model.residents[i.index(model.residents.len())].id.clone())
            });
            model.next_id += 1;
            let requester = match (&reuse, lease) {
                (Some(id), _) => id.clone(),
                (None, true) => format!("job{}", model.next_id),
                (None, false) => format!("model{}", model.next_id),
            };
            // A model load is never exclusive; a job may be.
            let device = device.map(|pick| match pick {
                Some(i) => model.devices[i.index(model.devices.len())].index,
                None => 99,
            });
            let request = Request { requester, mib, device, priority, exclusive: exclusive && lease };
            let decision = decide(&model.devices, &model.residents, &model.holds, &request, model.now);
            check(model, &request, &decision);

            let device = match &decision {
                Decision::Admit { device } => *device,
                Decision::Evict { device, victims } => {
                    model.residents.retain(|r| !(r.device == *device && victims.contains(&r.id)));
                    *device
                }
                Decision::Wait(_) | Decision::NeverFits(_) => return,
            };
            model.holds.push(Hold { holder: request.requester.clone(), device, mib, exclusive: request.exclusive });
            if reuse.is_none() && !lease {
                model.loading.push((request.requester, priority, min_residency));
            }
            // (a) The invariant: what is admitted fits in usable − foreign at the moment of admission.
            let d = model.devices.iter().find(|d| d.index == device).expect("admitted on a known device");
            assert!(model.headroom(d) >= 0, "over-committed GPU {device} after {decision:?}: {model:?}");
        }
        Op::FinishLoad(i) => {
            if model.loading.is_empty() {
                return;
            }
            let (id, priority, min_residency) = model.loading.remove(i.index(model.loading.len()));
            if let Some(at) = model.holds.iter().position(|h| h.holder == id) {
                let h = model.holds.remove(at);
                model.residents.push(Resident {
                    id,
                    device: h.device,
                    footprint_mib: h.mib,
                    priority,
                    in_use: 0,
                    pinned: false,
                    ready: true,
                    last_used: model.now,
                    resident_since: model.now,
                    min_residency,
                });
            }
        }
        Op::Release(i) => {
            let total = model.residents.len() + model.holds.len();
            if total == 0 {
                return;
            }
            let at = i.index(total);
            if at < model.residents.len() {
                model.residents.remove(at);
            } else {
                let h = model.holds.remove(at - model.residents.len());
                model.loading.retain(|(id, _, _)| *id != h.holder);
            }
        }
        Op::EndJob(i) => {
            let jobs: Vec<usize> = (0..model.holds.len())
                .filter(|&at| !model.loading.iter().any(|(id, _, _)| *id == model.holds[at].holder))
                .collect();
            if !jobs.is_empty() {
                model.holds.remove(jobs[i.index(jobs.len())]);
            }
        }
        Op::SetForeign { device, mib } => {
            if let Some(d) = model.devices.iter_mut().find(|d| d.index == device) {
                d.foreign_mib = mib;
            }
        }
        Op::Use { who, start } => {
            if model.residents.is_empty() {
                return;
            }
            let now = model.now;
            let len = model.residents.len();
            let r = &mut model.residents[who.index(len)];
            r.in_use = if start { r.in_use + 1 } else { r.in_use.saturating_sub(1) };
            r.last_used = now;
        }
        Op::TogglePin(i) => {
            if !model.residents.is_empty() {
                let len = model.residents.len();
                let r = &mut model.residents[i.index(len)];
                r.pinned = !r.pinned;
            }
        }
        Op::StartUnload(i) => {
            if !model.residents.is_empty() {
                let len = model.residents.len();
                model.residents[i.index(len)].ready = false;
            }
        }
        Op::Advance(ms) => model.now += ms,
    }
}

fn devices() -> impl Strategy<Value = Vec<DeviceState>> {
    prop::collection::vec((1000u64..16_000, 0u64..2000), 1..=3).prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (usable_mib, foreign_mib))| DeviceState {
                index: u32::try_from(i).expect("at most 3 devices"),
                usable_mib,
                foreign_mib,
            })
            .collect()
    })
}

/// A random snapshot of a nearly full machine, dense in eviction candidates. A device's usable
/// memory is what is committed on it plus its foreign use plus a random slack that may be
/// negative (over-committed: foreign use grew after admissions).
fn snapshot() -> impl Strategy<Value = (Model, Request)> {
    let device = (0u64..2000, -1500i64..1500);
    let resident = (
        0u32..3,
        200u64..3000,
        -5i32..=5,
        prop_oneof![4 => Just(0u32), 1 => 1u32..3],
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.9),
        0u64..1000,
        0u64..1000,
        prop_oneof![Just(0u64), 0u64..500],
    );
    let hold = (0u32..3, 0u64..3000, prop::bool::weighted(0.1), 0u32..4);
    let request = (
        prop_oneof![6 => 1u64..4000, 1 => 1u64..16_000],
        // Often the top priority, so that priority does not hide the other rules.
        prop_oneof![-5i32..=5, Just(5)],
        prop::option::of(0u32..3),
        prop::bool::weighted(0.1),
        prop::option::of(0usize..16),
    );
    (
        prop::collection::vec(device, 1..=3),
        prop::collection::vec(resident, 0..16),
        prop::collection::vec(hold, 0..4),
        request,
        0u64..2000,
    )
        .prop_map(|(devices, residents, holds, (mib, priority, device, exclusive, as_resident), now)| {
            let residents: Vec<Resident> = residents
                .into_iter()
                .enumerate()
                .map(|(i, (device, footprint_mib, priority, in_use, pinned, ready, last_used, since, min))| Resident {
                    id: format!("r{i}"),
                    device,
                    footprint_mib,
                    priority,
                    in_use,
                    pinned,
                    ready,
                    last_used,
                    resident_since: since,
                    min_residency: min,
                })
                .collect();
            let holds: Vec<Hold> = holds
                .into_iter()
                .map(|(device, mib, exclusive, who)| Hold { holder: format!("job{who}"), device, mib, exclusive })
                .collect();
            let mut model = Model { devices: Vec::new(), residents, holds, loading: Vec::new(), now, next_id: 0 };
            model.devices = devices
                .into_iter()
                .enumerate()
                .map(|(i, (foreign_mib, slack))| {
                    let index = u32::try_from(i).expect("at most 3 devices");
                    let full = i64::try_from(model.committed(index) + i128::from(foreign_mib)).expect("small");
                    let usable_mib = u64::try_from((full + slack).max(1000)).expect("positive");
                    DeviceState { index, usable_mib, foreign_mib }
                })
                .collect();
            // Sometimes an existing resident asks, sometimes a job that may hold something already.
            let requester = match as_resident {
                Some(i) if i < model.residents.len() => model.residents[i].id.clone(),
                Some(i) => format!("job{}", i % 4),
                None => "new".to_owned(),
            };
            (model, Request { requester, mib, device, priority, exclusive })
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn single_decisions_on_random_snapshots((model, request) in snapshot()) {
        let decision = decide(&model.devices, &model.residents, &model.holds, &request, model.now);
        check(&model, &request, &decision);
        // (a) Applying an admission keeps usable − foreign ≥ what is committed, over-committed or not before.
        let mut after = model;
        let device = match &decision {
            Decision::Admit { device } => *device,
            Decision::Evict { device, victims } => {
                after.residents.retain(|r| !victims.contains(&r.id));
                *device
            }
            Decision::Wait(_) | Decision::NeverFits(_) => return Ok(()),
        };
        let before = after.devices.iter().find(|d| d.index == device).map(|d| after.headroom(d));
        after.holds.push(Hold { holder: request.requester.clone(), device, mib: request.mib, exclusive: request.exclusive });
        let d = after.devices.iter().find(|d| d.index == device).expect("admitted on a known device");
        // An Admit on an already over-committed device (possible only for 0 MiB) cannot make it worse.
        prop_assert!(after.headroom(d) >= 0 || before.is_some_and(|b| after.headroom(d) == b && request.mib == 0));
    }

    #[test]
    fn decisions_keep_the_invariants(devices in devices(), ops in prop::collection::vec(op(), 1..80)) {
        let mut model =
            Model { devices, residents: Vec::new(), holds: Vec::new(), loading: Vec::new(), now: 0, next_id: 0 };
        for op in ops {
            apply(&mut model, op);
        }
    }

    #[test]
    fn victim_helpers_pick_only_idle_models(
        devices in devices(),
        ops in prop::collection::vec(op(), 1..80),
        device in 0u32..3,
    ) {
        let mut model =
            Model { devices, residents: Vec::new(), holds: Vec::new(), loading: Vec::new(), now: 0, next_id: 0 };
        for op in ops {
            apply(&mut model, op);
        }
        let idle = |r: &Resident| {
            r.in_use == 0 && r.ready && !r.pinned && model.now >= r.resident_since.saturating_add(r.min_residency)
        };
        let on_device: Vec<&Resident> = model.residents.iter().filter(|r| r.device == device && idle(r)).collect();
        match pressure_victim(device, &model.residents, model.now) {
            Some(id) => {
                let v = on_device.iter().find(|r| r.id == id).expect("an idle resident of the device");
                prop_assert!(on_device.iter().all(|r| (r.priority, r.last_used) >= (v.priority, v.last_used)));
            }
            None => prop_assert!(on_device.is_empty()),
        }
        let all: Vec<&Resident> = model.residents.iter().filter(|r| idle(r)).collect();
        match cap_victim(&model.residents, model.now) {
            Some(id) => {
                let v = all.iter().find(|r| r.id == id).expect("an idle resident");
                prop_assert!(all.iter().all(|r| r.last_used >= v.last_used));
            }
            None => prop_assert!(all.is_empty()),
        }
    }
}

#[test]
fn the_failure_cooldown_starts_at_10_s_and_doubles_up_to_5_min() {
    let secs = |failures| failure_cooldown(failures).map(|d| d.as_secs());
    for failures in 0..FAILURES_BEFORE_COOLDOWN {
        assert_eq!(secs(failures), None, "no cooldown after {failures} failures");
    }
    let sequence: Vec<Option<u64>> = (3..=10).map(secs).collect();
    let expected = [10, 20, 40, 80, 160, 300, 300, 300].map(Some);
    assert_eq!(sequence, expected);
    // However long the run of failures, the cooldown stays at the cap (no overflow).
    assert_eq!(secs(1000), Some(300));
    assert_eq!(secs(u32::MAX), Some(300));
}
