//! The plan's verdicts on the demo's numbers: an 8 GiB device with 512 MiB reserved and a 1 GiB
//! desktop; llm 5 GiB and vision 3 GiB at priority 50, stt 1.5 GiB at priority 80.

use super::report::PlanReport;
use super::*;

fn demo_device() -> DeviceState {
    DeviceState { index: 0, usable_mib: 8192 - 512, foreign_mib: 1024 }
}

fn model(id: &str, mib: Option<u64>, priority: i32) -> ModelFacts {
    ModelFacts {
        id: id.into(),
        priority,
        device: None,
        footprint: mib.map(|mib| Footprint { mib, source: Source::Declared }),
    }
}

fn demo(set: &[&str]) -> Vec<ModelFacts> {
    let all = [model("llm", Some(5120), 50), model("stt", Some(1536), 80), model("vision", Some(3072), 50)];
    set.iter().map(|id| all.iter().find(|m| m.id == *id).expect("a demo model").clone()).collect()
}

fn resident(id: &str, mib: u64, priority: i32) -> Resident {
    Resident {
        id: id.into(),
        device: 0,
        footprint_mib: mib,
        priority,
        in_use: 0,
        pinned: false,
        ready: true,
        last_used: 0,
        resident_since: 0,
        min_residency: 0,
    }
}

fn judged(models: Vec<ModelFacts>, residents: Vec<Resident>) -> Judgement {
    let inputs = Inputs { devices: vec![demo_device()], residents, holds: Vec::new(), models, now: 1_000_000 };
    judge(&inputs, &HashMap::new(), DEFAULT_MARGIN_PCT)
}

#[test]
fn verdicts_on_the_demo_numbers() {
    // 5120 + 1536 = 6656 = 7680 − 1024: fits with nothing left.
    let j = judged(demo(&["llm", "stt"]), Vec::new());
    assert_eq!((j.verdict, j.devices[0].headroom_mib), (Verdict::Marginal, 0));
    // 1536 + 3072 leaves 2048 MiB, 26.7% of usable.
    let j = judged(demo(&["stt", "vision"]), Vec::new());
    assert_eq!((j.verdict, j.devices[0].headroom_mib), (Verdict::Go, 2048));
    assert!((j.devices[0].headroom_pct - 26.666).abs() < 0.01, "{}", j.devices[0].headroom_pct);
    // All three: stt (priority 80) then llm (the larger) are placed, and vision no longer fits.
    let j = judged(demo(&["llm", "stt", "vision"]), Vec::new());
    assert_eq!(j.verdict, Verdict::NoGo);
    assert_eq!(j.unplaced.iter().map(|u| u.id.as_str()).collect::<Vec<_>>(), ["vision"]);
    assert!(j.unplaced[0].reason.contains("needs 3072 MiB"), "{}", j.unplaced[0].reason);
    assert_eq!(j.verdict.exit_code(), 4);
}

#[test]
fn what_loading_the_set_would_evict_is_named() {
    // llm is loaded now; stt fits beside it, vision evicts it (priority 50 may evict 50).
    let j = judged(demo(&["stt", "vision"]), vec![resident("llm", 5120, 50)]);
    assert_eq!(j.verdict, Verdict::Go);
    assert_eq!(j.evictions, vec![Eviction { id: "llm".into(), for_model: "vision".into(), device: 0 }]);
    assert!(j.devices[0].others.is_empty(), "llm does not stay");
    // A higher priority model loaded now is not evicted: the set does not fit.
    let j = judged(demo(&["stt", "vision"]), vec![resident("keeper", 5120, 90)]);
    assert_eq!(j.verdict, Verdict::NoGo);
    assert!(j.evictions.is_empty());
    // A model of the set that is loaded already counts where it is.
    let j = judged(demo(&["llm", "stt"]), vec![resident("llm", 5120, 50)]);
    assert_eq!(j.devices[0].models.iter().find(|m| m.id == "llm").map(|m| m.resident), Some(true));
}

#[test]
fn an_unknown_footprint_is_no_go_with_what_to_do() {
    let j = judged(vec![model("mystery", None, 50)], Vec::new());
    assert_eq!(j.verdict, Verdict::NoGo);
    assert!(j.unplaced[0].reason.contains("--measure"), "{}", j.unplaced[0].reason);
}

#[test]
fn footprints_come_from_the_largest_known_figure_else_the_estimate() {
    let known = Footprint::known(Some(5000), Some(5200), Some(5600), Some(4000)).expect("known");
    assert_eq!((known.mib, known.source), (5600, Source::Peak));
    let known = Footprint::known(Some(5000), Some(4800), None, Some(9000)).expect("known");
    assert_eq!((known.mib, known.source), (5000, Source::Declared));
    let known = Footprint::known(None, None, None, Some(4000)).expect("known");
    assert_eq!((known.mib, known.source), (4000, Source::Estimated));
    assert_eq!(Footprint::known(None, None, None, None), None);
}

/// A llama.cpp model sized for a long context: the suggestion is the context that fits.
#[test]
fn a_context_that_fits_is_suggested_from_the_kv_cost_per_token() {
    const MIB: u64 = 1 << 20;
    // 2000 MiB fixed, 1 MiB per 16 tokens of context, sized for 65536 tokens: 6096 MiB.
    let estimate = Estimate {
        weights_bytes: 1744 * MIB,
        kv_cache_bytes: 4096 * MIB,
        kv_bytes_per_token: MIB / 16,
        compute_bytes: 0,
        overhead_bytes: 256 * MIB,
        context: 65536,
        gpu_layers: 32,
    };
    let mut facts = model("qwen", Some(estimate.total_mib()), 50);
    facts.footprint = Some(Footprint { mib: estimate.total_mib(), source: Source::Estimated });
    let inputs = Inputs { devices: vec![demo_device()], models: vec![facts.clone()], now: 1, ..Inputs::default() };
    let estimates: HashMap<String, Estimate> = [("qwen".to_string(), estimate.clone())].into();
    // 6096 MiB of 6656 available: 560 MiB (7.3% of 7680 usable) stays free: GO at a 5% margin.
    assert_eq!(judge(&inputs, &estimates, DEFAULT_MARGIN_PCT).verdict, Verdict::Go);
    // At a 10% margin (768 MiB) it is marginal, 208 MiB short: 3888 MiB for the cache, 62208 tokens.
    let j = judge(&inputs, &estimates, 10.0);
    assert_eq!(j.verdict, Verdict::Marginal);
    assert!(j.suggestions.iter().any(|s| s.contains("qwen: -c 62208")), "{:?}", j.suggestions);
    // Beside a 3 GiB model of higher priority it does not fit; the context that does is named.
    let inputs = Inputs { residents: vec![resident("keeper", 3072, 90)], ..inputs };
    let j = judge(&inputs, &estimates, DEFAULT_MARGIN_PCT);
    assert_eq!(j.verdict, Verdict::NoGo);
    // 6656 − 3072 = 3584 MiB available: 1584 MiB for the cache, 25344 tokens.
    assert!(j.suggestions.iter().any(|s| s.contains("qwen: -c 25344")), "{:?}", j.suggestions);
}

#[test]
fn the_report_puts_the_verdict_first_and_names_evictions() {
    let j = judged(demo(&["stt", "vision"]), vec![resident("llm", 5120, 50)]);
    let report = PlanReport::new(vec!["stt".into(), "vision".into()], j, None);
    let text = report.render();
    assert!(text.starts_with("GO: stt, vision fit together"), "{text}");
    assert!(text.contains("free after: 2048 MiB (26.7% of usable; margin 5%)"), "{text}");
    assert!(text.contains("llm (GPU 0, for vision)"), "{text}");
    let json = serde_json::to_value(&report).expect("serializes");
    assert_eq!(json["verdict"], "GO");
    assert_eq!(json["exit_code"], 0);
    assert_eq!(json["devices"][0]["headroom_mib"], 2048);
    assert_eq!(json["evictions"][0]["id"], "llm");
}

/// A model busy with a request now would be evicted once idle: the verdict does not turn on
/// this moment's traffic.
#[test]
fn requests_in_flight_do_not_change_the_verdict() {
    let busy = Resident { in_use: 2, min_residency: 60_000, resident_since: 999_999, ..resident("llm", 5120, 50) };
    let j = judged(demo(&["stt", "vision"]), vec![busy]);
    assert_eq!(j.verdict, Verdict::Go);
    assert_eq!(j.evictions.len(), 1, "llm is evicted once idle: {:?}", j.evictions);
}

/// A measurement that stopped early proves nothing: the report is NO-GO, and says why first.
#[test]
fn an_interrupted_measurement_is_no_go_with_the_reason_first() {
    let j = judged(demo(&["stt"]), Vec::new());
    assert_eq!(j.verdict, Verdict::Go);
    let measurement = report::Measurement {
        interrupted: Some("loading stt failed: exit 1".into()),
        ..report::Measurement::default()
    };
    let report = PlanReport::new(vec!["stt".into()], j, Some(measurement));
    assert_eq!((report.verdict(), report.exit_code), (Verdict::NoGo, 4));
    assert!(report.render().starts_with("NO-GO: the measurement of stt stopped early: loading stt failed"));
}
