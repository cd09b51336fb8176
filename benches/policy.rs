//! How long one admission decision takes with a realistic worst case: 100 resident models and
//! 50 leases on 4 devices, a request that needs evictions. Baseline in the same run: the same
//! decision with 1 model and no leases.
//!
//! Run: `cargo bench --bench policy`.

mod common;

use std::time::Duration;

use common::measure;

use vramgate::policy::{Decision, DeviceState, Hold, Request, Resident, decide};

fn residents(count: usize, devices: u32) -> Vec<Resident> {
    (0..count)
        .map(|i| Resident {
            id: format!("model-{i}"),
            device: i as u32 % devices,
            footprint_mib: 200 + (i as u64 * 37) % 900,
            priority: (i as i32 * 7) % 10,
            in_use: u32::from(i % 5 == 0),
            pinned: i % 17 == 0,
            ready: i % 11 != 0,
            last_used: (i as u64 * 7919) % 100_000,
            resident_since: 0,
            min_residency: 0,
        })
        .collect()
}

fn holds(count: usize, devices: u32) -> Vec<Hold> {
    (0..count)
        .map(|i| Hold { holder: format!("job-{i}"), device: i as u32 % devices, mib: 50, exclusive: false })
        .collect()
}

fn main() {
    let devices: Vec<DeviceState> =
        (0..4).map(|index| DeviceState { index, usable_mib: 24_000, foreign_mib: 1_200 }).collect();
    let request = Request { requester: "new".into(), mib: 12_000, device: None, priority: 5, exclusive: false };

    let big_residents = residents(100, 4);
    let big_holds = holds(50, 4);
    let decision = decide(&devices, &big_residents, &big_holds, &request, 200_000);
    assert!(matches!(decision, Decision::Evict { .. }), "the benchmark must exercise victim selection: {decision:?}");

    let small_residents = residents(1, 1);
    let iterations = 20_000;
    let (base_p50, base_p99) = measure(iterations, 1000, || {
        std::hint::black_box(decide(&devices[..1], &small_residents, &[], &request, 200_000));
    });
    let (p50, p99) = measure(iterations, 1000, || {
        std::hint::black_box(decide(&devices, &big_residents, &big_holds, &request, 200_000));
    });
    println!("policy decision, {iterations} iterations each");
    println!("baseline: 1 model, 0 leases, 1 device     p50 {:>8.2} us  p99 {:>8.2} us", us(base_p50), us(base_p99));
    println!(
        "100 models, 50 leases, 4 devices           p50 {:>8.2} us  p99 {:>8.2} us  = {:.1}x baseline, {:.0} decisions/s",
        us(p50),
        us(p99),
        p50.as_secs_f64() / base_p50.as_secs_f64(),
        1.0 / p50.as_secs_f64()
    );
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
