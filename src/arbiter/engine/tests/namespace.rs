//! A device whose pids are from another pid namespace (vramgate in a container without
//! `--pid=host`): detected from the readings, said in the status, its models counted at their
//! size; no false alarm on a process that just exited; cleared when the pids are ours again.

use std::collections::BTreeSet;

use super::*;

/// The `/proc` facts of a reading where `missing` have no entry here and `here` do.
fn procs(here: &[u32], missing: &[u32]) -> ProcTable {
    ProcTable {
        entries: here.iter().map(|&pid| (pid, (1, pid))).collect(),
        missing: missing.iter().copied().collect::<BTreeSet<u32>>(),
    }
}

impl Rig {
    /// A reading where each (pid, MiB) uses the device, with those `/proc` facts.
    fn sample_with(&mut self, processes: &[(u32, u64)], procs: ProcTable) {
        let view = Arc::new(device_view(self.total_mib, processes));
        self.input(Input::Sample(view, procs));
    }

    fn degraded_reasons(&mut self) -> Vec<String> {
        self.fx().views.last().map(|v| v.degraded_reasons.clone()).unwrap_or_default()
    }

    fn device_warnings(&mut self) -> Vec<String> {
        let view = self.fx().views.last().cloned().unwrap_or_default();
        view.device_warnings.get(&0).cloned().unwrap_or_default()
    }
}

/// The pid the host gives llm's server, which does not exist in vramgate's namespace.
const HOST_PID: u32 = 4_200_001;

#[test]
fn pids_missing_here_in_two_readings_in_a_row_are_another_namespace_and_models_count_at_their_size() {
    let mut rig = Rig::new(TWO_MODELS, 10_000);
    drop(rig.load("llm"));
    let pid = rig.ready("llm");
    // One reading: a pid missing here may be a process that just exited. Not yet detected; its
    // memory counts as foreign on top of llm's 6000 (twice, the safe way).
    rig.sample_with(&[(HOST_PID, 6500)], procs(&[pid], &[HOST_PID]));
    assert!(rig.degraded_reasons().is_empty(), "{:?}", rig.degraded_reasons());
    let (devices, _, _) = rig.engine.policy_inputs();
    assert_eq!(devices[0].foreign_mib, 6500);
    // Two in a row: the device's pids are not ours.
    rig.sample_with(&[(HOST_PID, 6500)], procs(&[pid], &[HOST_PID]));
    let reasons = rig.degraded_reasons();
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(reasons[0].starts_with("GPU 0: the driver lists processes (4200001) that do not exist"), "{reasons:?}");
    assert!(reasons[0].contains("--pid=host"), "{reasons:?}");
    let warnings = rig.device_warnings();
    assert!(warnings.iter().any(|w| w.contains("pids 4200001 are not in vramgate's pid namespace")), "{warnings:?}");
    // Device-level accounting: llm at its 6000, the rest (500) foreign, counted once.
    let (devices, residents, _) = rig.engine.policy_inputs();
    assert_eq!(devices[0].foreign_mib, 500, "6500 used − llm's 6000");
    assert_eq!(residents[0].footprint_mib, 6000);
    assert!(rig.engine.process_models.is_empty(), "a host pid is nobody's here: {:?}", rig.engine.process_models);
    // 10000 − 500 − 6000 = 3500 ≥ 3000: stt starts beside llm, nothing evicted.
    drop(rig.load("stt"));
    assert!(rig.fx().process_starts.iter().any(|(id, ..)| id == "stt"));
    assert_eq!(rig.state("llm"), ModelState::Ready);
    assert!(
        !rig.fx().writes.iter().any(|w| matches!(w, StoreWrite::Footprint { .. })),
        "nothing learned from a reading that cannot be attributed"
    );
}

#[test]
fn an_empty_list_neither_detects_nor_clears() {
    let mut rig = Rig::new(TWO_MODELS, 10_000);
    drop(rig.load("llm"));
    let pid = rig.ready("llm");
    // Missing, empty, missing: not two in a row.
    rig.sample_with(&[(HOST_PID, 6000)], procs(&[pid], &[HOST_PID]));
    rig.sample_with(&[], procs(&[pid], &[]));
    rig.sample_with(&[(HOST_PID, 6000)], procs(&[pid], &[HOST_PID]));
    assert!(rig.degraded_reasons().is_empty(), "{:?}", rig.degraded_reasons());
    rig.sample_with(&[(HOST_PID, 6000)], procs(&[pid], &[HOST_PID]));
    assert_eq!(rig.degraded_reasons().len(), 1, "two in a row");
    // Detected: an empty list (nothing on the GPU for a moment) keeps it.
    rig.sample_with(&[], procs(&[pid], &[]));
    assert_eq!(rig.degraded_reasons().len(), 1, "an empty list says nothing either way");
    assert!(rig.engine.namespaces.foreign_devices().any(|(device, pids)| device == 0 && pids == [HOST_PID]));
}

#[test]
fn a_process_that_exited_is_no_sign_of_another_namespace() {
    let mut rig = Rig::new(TWO_MODELS, 10_000);
    drop(rig.load("llm"));
    let pid = rig.ready("llm");
    // On the host: llm's server is listed, here, then exits and the driver lists its pid for a
    // few readings more while it frees the memory.
    rig.sample_with(&[(pid, 6000)], procs(&[pid], &[]));
    for _ in 0..4 {
        rig.sample_with(&[(pid, 6000)], procs(&[], &[pid]));
        assert!(rig.degraded_reasons().is_empty(), "{:?}", rig.degraded_reasons());
    }
    // A job that starts and exits between two readings (never seen here), once, then an empty
    // list, then another such job: not two readings in a row.
    rig.sample_with(&[(7001, 500)], procs(&[], &[7001]));
    rig.sample_with(&[], procs(&[], &[]));
    rig.sample_with(&[(7002, 500)], procs(&[], &[7002]));
    assert!(rig.degraded_reasons().is_empty(), "{:?}", rig.degraded_reasons());
    // Foreign processes that exist here (other users' jobs on the host) are just foreign.
    rig.sample_with(&[(7003, 500), (7004, 200)], procs(&[7003, 7004], &[]));
    rig.sample_with(&[(7003, 500), (7004, 200)], procs(&[7003, 7004], &[]));
    assert!(rig.degraded_reasons().is_empty(), "{:?}", rig.degraded_reasons());
    // One pid here among missing ones: the namespaces match.
    rig.sample_with(&[(7005, 500), (7003, 500)], procs(&[7003], &[7005]));
    rig.sample_with(&[(7005, 500), (7003, 500)], procs(&[7003], &[7005]));
    assert!(rig.degraded_reasons().is_empty(), "{:?}", rig.degraded_reasons());
}

#[test]
fn a_reading_whose_pids_exist_here_again_clears_it_and_attribution_resumes() {
    let mut rig = Rig::new(TWO_MODELS, 10_000);
    drop(rig.load("llm"));
    let pid = rig.ready("llm");
    rig.sample_with(&[(HOST_PID, 6200)], procs(&[pid], &[HOST_PID]));
    rig.sample_with(&[(HOST_PID, 6200)], procs(&[pid], &[HOST_PID]));
    assert_eq!(rig.degraded_reasons().len(), 1);
    // Restarted with --pid=host (or the driver's pids match again): llm's pid is listed.
    rig.sample_with(&[(pid, 6200)], procs(&[pid], &[]));
    assert!(rig.degraded_reasons().is_empty(), "{:?}", rig.degraded_reasons());
    assert!(rig.device_warnings().is_empty(), "{:?}", rig.device_warnings());
    assert_eq!(rig.engine.process_models.get(&pid).map(String::as_str), Some("llm"));
    let (devices, residents, _) = rig.engine.policy_inputs();
    assert_eq!(devices[0].foreign_mib, 0);
    assert_eq!(residents[0].footprint_mib, 6200, "measured again");
}

/// A listed pid missing here without a memory figure is no evidence: WSLg lists its compositor
/// that way on an ordinary host.
#[test]
fn a_missing_pid_without_a_figure_is_no_sign_of_another_namespace() {
    let mut rig = Rig::new(TWO_MODELS, 10_000);
    for _ in 0..3 {
        let mut view = device_view(10_000, &[(HOST_PID, 0)]);
        view.devices[0].processes[0].used_mib = None;
        view.devices[0].used_mib = 300;
        rig.input(Input::Sample(Arc::new(view), procs(&[], &[HOST_PID])));
    }
    assert!(rig.degraded_reasons().is_empty(), "{:?}", rig.degraded_reasons());
}
