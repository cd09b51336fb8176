//! Shaping NVML's answers: the pure part of the probe (no library calls), which is what CI
//! tests on hand-made values: bytes to MiB, the compute and graphics lists merged by pid, what is
//! not free, the release watch's per-device lists, and a list asked for again when it grew.

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::ProcessInfo;

use super::super::{DeviceSnapshot, GpuPids, ProcessUsage};

const BYTES_PER_MIB: u64 = 1 << 20;

/// A process as NVML lists it: pid and bytes, where NVML knows the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawProcess {
    /// Process id (in the driver's pid namespace).
    pub pid: u32,
    /// Bytes used, `None` where NVML reports "not available" (some containers, WDDM).
    pub used_bytes: Option<u64>,
}

/// What NVML said about one device in one sample, before shaping.
#[derive(Debug, Clone, PartialEq)]
pub struct RawDevice {
    /// Device name, read once at start.
    pub name: String,
    /// Total bytes.
    pub total_bytes: u64,
    /// Used bytes (`nvmlMemory_v2_t`: allocated, not counting `reserved`).
    pub used_bytes: u64,
    /// Bytes the driver keeps for itself (`nvmlMemory_v2_t.reserved`), in neither `used` nor
    /// `free`; 0 where the API has no such figure.
    pub reserved_bytes: u64,
    /// Free bytes.
    pub free_bytes: u64,
    /// GPU utilization, if NVML could tell.
    pub utilization_pct: Option<u32>,
    /// Temperature, if NVML could tell.
    pub temperature_c: Option<u32>,
    /// Compute processes, or why NVML would not list them.
    pub compute: Result<Vec<RawProcess>, String>,
    /// Graphics processes, or why NVML would not list them.
    pub graphics: Result<Vec<RawProcess>, String>,
}

/// Shapes one device's raw NVML answers into a snapshot: bytes to MiB (used rounded up, so nothing
/// is under-counted; used is everything the driver says is not free, see [`not_free_bytes`]),
/// compute and graphics lists merged by pid (a process in both is counted once,
/// with the larger figure, because NVML reports the same allocation in each list), names from
/// `name_of`.
pub fn assemble(index: u32, raw: RawDevice, name_of: impl Fn(u32) -> Option<String>) -> DeviceSnapshot {
    let not_free = not_free_bytes(&raw);
    let mut unavailable = Vec::new();
    let mut merged: Vec<RawProcess> = Vec::new();
    for (kind, list) in [("compute", raw.compute), ("graphics", raw.graphics)] {
        match list {
            Ok(list) => {
                for process in list {
                    match merged.iter_mut().find(|p| p.pid == process.pid) {
                        Some(existing) => {
                            existing.used_bytes = match (existing.used_bytes, process.used_bytes) {
                                (Some(a), Some(b)) => Some(a.max(b)),
                                (a, b) => a.or(b),
                            }
                        }
                        None => merged.push(process),
                    }
                }
            }
            Err(reason) => unavailable.push(format!("NVML {kind} process list: {reason}")),
        }
    }
    merged.sort_by_key(|p| p.pid);
    let processes = merged
        .into_iter()
        // A process without a figure is `used_mib: None`; its one warning (naming its model, if
        // it serves one) is written where status is assembled (`monitor::figureless_warnings`),
        // so it is said once per device and pid.
        .map(|p| ProcessUsage {
            pid: p.pid,
            used_mib: p.used_bytes.map(|bytes| bytes.div_ceil(BYTES_PER_MIB)),
            name: name_of(p.pid).unwrap_or_else(|| "unknown".into()),
        })
        .collect();
    DeviceSnapshot {
        index,
        name: raw.name,
        total_mib: raw.total_bytes / BYTES_PER_MIB,
        used_mib: not_free.div_ceil(BYTES_PER_MIB),
        free_mib: raw.free_bytes / BYTES_PER_MIB,
        utilization_pct: raw.utilization_pct,
        temperature_c: raw.temperature_c.and_then(|t| i32::try_from(t).ok()),
        processes,
        processes_unavailable: (!unavailable.is_empty()).then(|| unavailable.join("; ")),
        named: Vec::new(),
        warnings: Vec::new(),
        failed: None,
    }
}

/// What the driver says is not free: the larger of used + reserved (`nvmlMemory_v2_t`'s `used`
/// leaves the driver's reservation out) and total − free (so that whatever NVML counts in neither
/// figure is not handed out either). Admission subtracts this from the usable memory.
pub fn not_free_bytes(raw: &RawDevice) -> u64 {
    raw.used_bytes.saturating_add(raw.reserved_bytes).max(raw.total_bytes.saturating_sub(raw.free_bytes))
}

/// Adds one device's compute and graphics lists to `lists`: their pids if both were read, else
/// the device as unreadable with the reasons (a pid missing from a list NVML refused, e.g. with
/// `NO_PERMISSION`, does not mean its memory is back).
pub fn add_device_lists(lists: &mut GpuPids, index: u32, read: Result<[Result<Vec<RawProcess>, String>; 2], String>) {
    let mut failures = Vec::new();
    let mut pids = Vec::new();
    match read {
        Ok(per_kind) => {
            for (kind, list) in ["compute", "graphics"].into_iter().zip(per_kind) {
                match list {
                    Ok(list) => pids.extend(list.into_iter().map(|p| p.pid)),
                    Err(reason) => failures.push(format!("NVML device {index} {kind} process list: {reason}")),
                }
            }
        }
        Err(reason) => failures.push(format!("NVML device {index} {reason}")),
    }
    if failures.is_empty() {
        lists.pids.extend(pids);
    } else {
        lists.unreadable.insert(index, failures.join("; "));
    }
}

/// How many times a process list is asked for when it keeps growing between NVML's count call and
/// its fill call (`INSUFFICIENT_SIZE`).
const LIST_TRIES: usize = 4;

/// Asks for a process list again when it grew past the wrapper's buffer between the count and the
/// fill (the wrapper sizes the buffer at the count plus 5, and each try counts afresh, so the next
/// buffer is larger): a few tries, then the error stands (a list that grows by more than 5 on every
/// try is one we cannot read now).
pub(super) fn retry_grown_list<T>(mut call: impl FnMut() -> Result<T, NvmlError>) -> Result<T, NvmlError> {
    let mut tries = 1;
    loop {
        match call() {
            Err(NvmlError::InsufficientSize(_)) if tries < LIST_TRIES => tries += 1,
            other => return other,
        }
    }
}

/// "Not supported" means the device has no such processes (an H100 has no graphics engine), not
/// that we are blind, so it reads as an empty list.
pub(super) fn process_list(result: Result<Vec<ProcessInfo>, NvmlError>) -> Result<Vec<RawProcess>, String> {
    match result {
        Ok(list) => Ok(list
            .into_iter()
            .map(|p| RawProcess {
                pid: p.pid,
                used_bytes: match p.used_gpu_memory {
                    UsedGpuMemory::Used(bytes) => Some(bytes),
                    UsedGpuMemory::Unavailable => None,
                },
            })
            .collect()),
        Err(NvmlError::NotSupported) => Ok(Vec::new()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = BYTES_PER_MIB;
    const GIB: u64 = 1024 * MIB;

    fn raw(compute: Result<Vec<RawProcess>, String>, graphics: Result<Vec<RawProcess>, String>) -> RawDevice {
        RawDevice {
            name: "NVIDIA H100 80GB HBM3".into(),
            total_bytes: 80 * GIB,
            used_bytes: 10 * GIB + 512 * MIB + 1,
            reserved_bytes: 0,
            free_bytes: 69 * GIB + 511 * MIB,
            utilization_pct: Some(12),
            temperature_c: Some(41),
            compute,
            graphics,
        }
    }

    fn names(pid: u32) -> Option<String> {
        (pid == 4242).then(|| "python3".to_string())
    }

    #[test]
    fn converts_units_and_names_processes() {
        let snap = assemble(0, raw(Ok(vec![RawProcess { pid: 4242, used_bytes: Some(10 * GIB) }]), Ok(vec![])), names);
        assert_eq!(snap.total_mib, 80 * 1024);
        assert_eq!(snap.used_mib, 10 * 1024 + 513, "used rounds up");
        assert_eq!(snap.free_mib, 69 * 1024 + 511);
        assert_eq!(snap.utilization_pct, Some(12));
        assert_eq!(snap.temperature_c, Some(41));
        assert_eq!(snap.processes, vec![ProcessUsage { pid: 4242, used_mib: Some(10240), name: "python3".into() }]);
        assert!(snap.processes_unavailable.is_none());
    }

    #[test]
    fn a_pid_in_both_lists_is_counted_once() {
        let snap = assemble(
            1,
            raw(
                Ok(vec![
                    RawProcess { pid: 7, used_bytes: Some(300 * MIB) },
                    RawProcess { pid: 4242, used_bytes: Some(GIB) },
                ]),
                Ok(vec![RawProcess { pid: 4242, used_bytes: Some(GIB) }, RawProcess { pid: 9, used_bytes: Some(MIB) }]),
            ),
            names,
        );
        assert_eq!(snap.index, 1);
        let pids: Vec<(u32, Option<u64>)> = snap.processes.iter().map(|p| (p.pid, p.used_mib)).collect();
        assert_eq!(pids, vec![(7, Some(300)), (9, Some(1)), (4242, Some(1024))]);
        assert_eq!(snap.processes[0].name, "unknown", "a pid we cannot see in /proc");
    }

    #[test]
    fn unknown_per_process_memory_is_flagged_not_invented() {
        let snap = assemble(
            0,
            raw(
                Ok(vec![RawProcess { pid: 5, used_bytes: None }]),
                Ok(vec![RawProcess { pid: 5, used_bytes: Some(2 * MIB) }]),
            ),
            names,
        );
        assert_eq!(snap.processes[0].used_mib, Some(2), "a figure from the other list wins over none");
        let blind = assemble(0, raw(Ok(vec![RawProcess { pid: 6, used_bytes: None }]), Ok(vec![])), names);
        assert_eq!(blind.processes[0].used_mib, None, "unknown, not 0");
        assert!(blind.warnings.is_empty(), "said once, where status is assembled: {:?}", blind.warnings);
        assert_eq!(blind.used_mib, 10 * 1024 + 513, "still in the device's use");
    }

    #[test]
    fn a_failed_process_list_is_reported() {
        let snap = assemble(0, raw(Err("Insufficient Permissions".into()), Ok(vec![])), names);
        assert!(snap.processes.is_empty());
        assert!(snap.processes_unavailable.unwrap().contains("compute process list: Insufficient Permissions"));
    }

    #[test]
    fn not_supported_process_lists_are_empty_not_errors() {
        assert_eq!(process_list(Err(NvmlError::NotSupported)), Ok(vec![]));
        assert!(process_list(Err(NvmlError::NoPermission)).is_err());
    }

    #[test]
    fn missing_temperature_and_utilization_are_unknown() {
        let mut device = raw(Ok(vec![]), Ok(vec![]));
        device.temperature_c = None;
        device.utilization_pct = None;
        let snap = assemble(0, device, names);
        assert_eq!((snap.temperature_c, snap.utilization_pct), (None, None));
    }

    /// `nvmlMemory_v2_t`: used leaves the driver's reservation out. The numbers: 8 GiB,
    /// 300 MiB used, 600 MiB reserved, 7292 MiB free: 900 MiB is not free, not 300.
    #[test]
    fn used_counts_what_the_driver_says_is_not_free_reserved_included() {
        let mut device = raw(Ok(vec![]), Ok(vec![]));
        device.total_bytes = 8 * GIB;
        device.used_bytes = 300 * MIB;
        device.reserved_bytes = 600 * MIB;
        device.free_bytes = 7292 * MIB;
        let snap = assemble(0, device.clone(), names);
        assert_eq!((snap.used_mib, snap.free_mib), (900, 7292));
        // NVML's figures need not add up: whatever is in neither used nor free is not free either.
        device.reserved_bytes = 0;
        device.free_bytes = 7000 * MIB;
        assert_eq!(assemble(0, device.clone(), names).used_mib, 1192, "total − free");
        // Reserved alone, with a free figure that leaves room for it.
        device.reserved_bytes = 2000 * MIB;
        assert_eq!(assemble(0, device.clone(), names).used_mib, 2300, "used + reserved");
        // Nonsense from a driver does not overflow.
        device.used_bytes = u64::MAX;
        device.reserved_bytes = u64::MAX;
        assert_eq!(not_free_bytes(&device), u64::MAX);
    }

    /// A list that grew between the count and the fill is asked for again (the wrapper recounts,
    /// so the buffer grows); one that keeps growing fails after `LIST_TRIES` calls.
    #[test]
    fn a_process_list_that_grew_is_asked_for_again() {
        let calls = std::cell::Cell::new(0);
        let grows_twice = || {
            calls.set(calls.get() + 1);
            if calls.get() <= 2 { Err(NvmlError::InsufficientSize(None)) } else { Ok(vec![7u32]) }
        };
        assert!(matches!(retry_grown_list(grows_twice).as_deref(), Ok([7])));
        assert_eq!(calls.get(), 3);
        calls.set(0);
        let always = || -> Result<Vec<u32>, NvmlError> {
            calls.set(calls.get() + 1);
            Err(NvmlError::InsufficientSize(None))
        };
        assert!(matches!(retry_grown_list(always), Err(NvmlError::InsufficientSize(_))));
        assert_eq!(calls.get(), LIST_TRIES);
        calls.set(0);
        let other = || -> Result<Vec<u32>, NvmlError> {
            calls.set(calls.get() + 1);
            Err(NvmlError::NoPermission)
        };
        assert!(matches!(retry_grown_list(other), Err(NvmlError::NoPermission)));
        assert_eq!(calls.get(), 1, "only a grown list is asked for again");
    }

    /// The release watch's lists: a device whose list NVML refuses is unreadable, not empty, so
    /// a pid missing from it is not taken as released; readable devices still count.
    #[test]
    fn an_unreadable_process_list_is_reported_not_empty() {
        let mut lists = GpuPids::default();
        let p = |pid| RawProcess { pid, used_bytes: Some(MIB) };
        add_device_lists(&mut lists, 0, Ok([Ok(vec![p(10)]), Ok(vec![p(11)])]));
        add_device_lists(&mut lists, 1, Ok([Err("Insufficient Permissions".into()), Ok(vec![p(12)])]));
        add_device_lists(&mut lists, 2, Err("handle: GPU is lost".into()));
        assert_eq!(lists.pids, [10, 11].into(), "nothing from a device with a refused list");
        assert!(lists.unreadable[&1].contains("device 1 compute process list: Insufficient Permissions"));
        assert!(lists.unreadable[&2].contains("GPU is lost"));
        let model: std::collections::BTreeSet<u32> = [99].into();
        assert!(lists.shows_gone(&model, &[0].into()), "device 0 was read and lists no 99");
        assert!(!lists.shows_gone(&model, &[1].into()), "device 1's list was not read");
        assert!(!lists.shows_gone(&model, &[].into()), "some list was not read");
        assert!(!lists.shows_gone(&[10].into(), &[0].into()), "still listed");
        // A model whose pids were seen on devices 0 and 1: device 0 alone proves nothing.
        assert!(!lists.shows_gone(&model, &[0, 1].into()), "device 1's list was not read");
        let why = lists.unreadable_among(&[0, 1].into()).expect("device 1 unreadable");
        assert!(why.contains("device 1") && !why.contains("GPU is lost"), "only the devices asked about: {why}");
        assert_eq!(lists.unreadable_among(&[0].into()), None);
    }
}
