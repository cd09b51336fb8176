//! The `nvml` probe: NVIDIA devices through NVML (`nvml-wrapper`).
//!
//! The library is loaded at run time (`[gpu.nvml] library`, by default `libnvidia-ml.so.1`), so the binary starts on machines
//! without NVIDIA's driver and `auto` can fall through. The NVML calls live in [`NvmlProbe::read`];
//! everything after them is the pure [`assemble`], which is what CI (no GPU) tests on fakes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::{NvmlError, nvml_try};
use nvml_wrapper::struct_wrappers::device::ProcessInfo;
use nvml_wrapper::{Device, Nvml};

use crate::config::NvmlConfig;

use super::{DeviceSnapshot, GpuPids, Probe, ProbeError, ProbeKind, ProcessUsage, process_name};

const BYTES_PER_MIB: u64 = 1 << 20;

/// NVML calls one device costs per sample: handle, memory, utilization, temperature, compute and
/// graphics process lists. The wrapper's process-list calls each make two library calls (count,
/// then fill), so the library sees 8 per device.
pub const NVML_CALLS_PER_DEVICE: usize = 6;

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
    let mut warnings = Vec::new();
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
        .map(|p| {
            let used_mib = p.used_bytes.map(|bytes| bytes.div_ceil(BYTES_PER_MIB));
            if used_mib.is_none() {
                warnings.push(format!(
                    "NVML does not report the memory of pid {} (not available): it is counted at its model's size \
                     if it serves one, else within the device's foreign use",
                    p.pid
                ));
            }
            ProcessUsage { pid: p.pid, used_mib, name: name_of(p.pid).unwrap_or_else(|| "unknown".into()) }
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
        warnings,
        failed: None,
    }
}

/// What the driver says is not free: the larger of used + reserved (`nvmlMemory_v2_t`'s `used`
/// leaves the driver's reservation out) and total − free (so that whatever NVML counts in neither
/// figure is not handed out either). Admission subtracts this from the usable memory.
pub fn not_free_bytes(raw: &RawDevice) -> u64 {
    raw.used_bytes.saturating_add(raw.reserved_bytes).max(raw.total_bytes.saturating_sub(raw.free_bytes))
}

/// The names of `count` devices at start-up, from each device's answer (`name_of`). A device that
/// does not answer (`GPU_IS_LOST` at start) gets a plain name (`NVIDIA GPU N`) and is sampled like
/// the others, so its readings report it failed while the rest work; only when no device answers is
/// it an error (and `auto` falls through). For `NvmlProbe::open`.
pub fn device_names(count: u32, name_of: impl Fn(u32) -> Result<String, String>) -> Result<Vec<String>, ProbeError> {
    let answers: Vec<Result<String, String>> = (0..count).map(&name_of).collect();
    if !answers.is_empty() && answers.iter().all(Result::is_err) {
        let reasons: Vec<String> = answers
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.as_ref().err().map(|e| format!("NVML device {i}: {e}")))
            .collect();
        return Err(ProbeError(format!("no NVML device answers: {}", reasons.join("; "))));
    }
    Ok(answers.into_iter().enumerate().map(|(i, a)| a.unwrap_or_else(|_| format!("NVIDIA GPU {i}"))).collect())
}

/// How soon after a re-initialisation another may follow while a device still cannot be read. A
/// GPU that fell off the bus may answer again only through a fresh NVML (its handles are stale
/// until then); but an init costs time (seconds on a machine without persistence mode, inside a
/// sample), so the wait doubles with each re-initialisation that did not bring every device back,
/// up to [`REINIT_MAX_WAIT`], and starts over once every device answers.
pub const REINIT_FIRST_WAIT: Duration = Duration::from_secs(5);

/// The longest wait between re-initialisations while a device stays lost.
pub const REINIT_MAX_WAIT: Duration = Duration::from_secs(300);

/// The wait after `unanswered` re-initialisations in a row that left a device failing:
/// [`REINIT_FIRST_WAIT`] doubled each time, at most [`REINIT_MAX_WAIT`].
pub fn reinit_wait(unanswered: u32) -> Duration {
    REINIT_FIRST_WAIT
        .saturating_mul(1u32.checked_shl(unanswered.saturating_sub(1)).unwrap_or(u32::MAX))
        .min(REINIT_MAX_WAIT)
}

/// Whether a re-initialisation is due: none since the devices last all answered, or the last one
/// (`last_try`, after `unanswered` in a row) is [`reinit_wait`] old.
pub fn reinit_due(last_try: Option<Instant>, unanswered: u32, now: Instant) -> bool {
    last_try.is_none_or(|last| now.saturating_duration_since(last) >= reinit_wait(unanswered))
}

/// The probe over a loaded NVML.
pub struct NvmlProbe {
    /// `None` only after a re-initialisation whose init failed: every device is then failed until
    /// a later one succeeds.
    nvml: Option<Nvml>,
    library: PathBuf,
    names: Vec<String>,
    /// When NVML was last re-initialised (tried) since every device last answered, and how many
    /// re-initialisations in a row left a device failing: together they bound how often it
    /// happens.
    last_reinit: Option<Instant>,
    unanswered_reinits: u32,
    /// Why the last re-initialisation failed, reported as each device's failure meanwhile.
    reinit_error: Option<String>,
}

impl NvmlProbe {
    /// Loads the NVML library `[gpu.nvml]` names and enumerates devices; fails if the library is
    /// missing or lists no device.
    pub fn open(config: &NvmlConfig) -> Result<NvmlProbe, ProbeError> {
        let library = config.library();
        let nvml = init(library)?;
        let count = nvml.device_count().map_err(|e| ProbeError(format!("NVML device count: {e}")))?;
        if count == 0 {
            return Err(ProbeError("NVML loaded but lists no device".into()));
        }
        // A device that does not answer now (lost) is named by its index and read, and fails,
        // alone with each sample; the probe starts with the others.
        let names = device_names(count, |i| nvml.device_by_index(i).and_then(|d| d.name()).map_err(|e| e.to_string()))?;
        Ok(NvmlProbe {
            nvml: Some(nvml),
            library: library.to_path_buf(),
            names,
            last_reinit: None,
            unanswered_reinits: 0,
            reinit_error: None,
        })
    }

    /// Reads every device, each on its own: one that fails (GPU_IS_LOST) is reported failed, the
    /// others read.
    fn read_all(&self) -> Vec<DeviceSnapshot> {
        (0..self.names.len() as u32)
            .map(|index| {
                let name = self.names.get(index as usize).cloned().unwrap_or_default();
                let read = match &self.nvml {
                    Some(nvml) => read(nvml, index, &name),
                    None => Err(ProbeError(format!(
                        "NVML device {index}: NVML re-initialisation failed: {}",
                        self.reinit_error.as_deref().unwrap_or("unknown")
                    ))),
                };
                match read {
                    Ok(raw) => assemble(index, raw, process_name),
                    Err(e) => DeviceSnapshot::failed(index, name, e.0),
                }
            })
            .collect()
    }

    /// Shuts NVML down and initialises it again (a real driver keeps its state while any init is
    /// outstanding, so the old one goes first). A device that was named by its index at start-up
    /// gets its name if it answers now. The device count is kept: devices are known by index for
    /// the daemon's life.
    fn reinit(&mut self) {
        self.last_reinit = Some(Instant::now());
        if let Some(old) = self.nvml.take()
            && let Err(e) = old.shutdown()
        {
            tracing::debug!("NVML shutdown before re-initialisation: {e}");
        }
        match init(&self.library) {
            Ok(nvml) => {
                for (index, name) in self.names.iter_mut().enumerate() {
                    if let Ok(answered) = nvml.device_by_index(index as u32).and_then(|d| d.name()) {
                        *name = answered;
                    }
                }
                tracing::info!("NVML re-initialised after a device could not be read");
                self.nvml = Some(nvml);
                self.reinit_error = None;
            }
            Err(e) => {
                tracing::warn!("NVML re-initialisation failed: {e}");
                self.reinit_error = Some(e.0);
            }
        }
    }
}

/// Loads and initialises the NVML library at `library`.
fn init(library: &Path) -> Result<Nvml, ProbeError> {
    Nvml::builder().lib_path(library.as_os_str()).init().map_err(|e| init_error(library, e))
}

/// The NVML calls for one device. Temperature and utilization are optional extras (some devices
/// refuse them); memory is not.
fn read(nvml: &Nvml, index: u32, name: &str) -> Result<RawDevice, ProbeError> {
    let fail = |what: &str, e: NvmlError| ProbeError(format!("NVML device {index} {what}: {e}"));
    let device = nvml.device_by_index(index).map_err(|e| fail("handle", e))?;
    let memory = memory(nvml, &device).map_err(|e| fail("memory", e))?;
    Ok(RawDevice {
        name: name.to_string(),
        total_bytes: memory.total,
        used_bytes: memory.used,
        reserved_bytes: memory.reserved,
        free_bytes: memory.free,
        utilization_pct: device.utilization_rates().ok().map(|u| u.gpu),
        temperature_c: device.temperature(TemperatureSensor::Gpu).ok(),
        compute: process_list(retry_grown_list(|| compute_processes(&device))),
        graphics: process_list(retry_grown_list(|| graphics_processes(&device))),
    })
}

/// A device's memory figures, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Memory {
    total: u64,
    used: u64,
    reserved: u64,
    free: u64,
}

/// `nvmlDeviceGetMemoryInfo_v2` where the driver exports it (drivers from 510 on), else the v1
/// `nvmlDeviceGetMemoryInfo`, which every driver has.
fn memory(nvml: &Nvml, device: &Device) -> Result<Memory, NvmlError> {
    match device.memory_info() {
        Ok(m) => Ok(Memory { total: m.total, used: m.used, reserved: m.reserved, free: m.free }),
        Err(NvmlError::FailedToLoadSymbol(_)) => memory_v1(nvml, device),
        Err(e) => Err(e),
    }
}

/// nvml.h's `nvmlMemory_t` (v1): total, free, used, in that order.
#[repr(C)]
struct MemoryV1 {
    total: u64,
    free: u64,
    used: u64,
}

/// The v1 memory call, through the library's raw symbol (nvml-wrapper only calls v2). v1 has no
/// `reserved` figure: real drivers count the reservation in its `used` (which is why v2 split it
/// out), so reserved is 0 here and nothing is left uncounted.
fn memory_v1(nvml: &Nvml, device: &Device) -> Result<Memory, NvmlError> {
    let call = nvml.lib().nvmlDeviceGetMemoryInfo.as_ref().map_err(|e| NvmlError::FailedToLoadSymbol(e.to_string()))?;
    let mut figures = MemoryV1 { total: 0, free: 0, used: 0 };
    // SAFETY: `call` is the library's `nvmlDeviceGetMemoryInfo` with nvml.h's signature (as
    // nvml-wrapper-sys binds it), the handle comes from this NVML, still initialised, and
    // `figures` has `nvmlMemory_t`'s layout and outlives the call.
    let code = unsafe { call(device.handle(), (&raw mut figures).cast()) };
    nvml_try(code)?;
    Ok(Memory { total: figures.total, used: figures.used, reserved: 0, free: figures.free })
}

/// The compute processes: `_v3` where the driver exports it, else `_v2` (drivers before 510;
/// the same figures in an older struct).
fn compute_processes(device: &Device) -> Result<Vec<ProcessInfo>, NvmlError> {
    match device.running_compute_processes() {
        Err(NvmlError::FailedToLoadSymbol(_)) => device.running_compute_processes_v2(),
        other => other,
    }
}

/// The graphics processes, `_v3` else `_v2`, as [`compute_processes`].
fn graphics_processes(device: &Device) -> Result<Vec<ProcessInfo>, NvmlError> {
    match device.running_graphics_processes() {
        Err(NvmlError::FailedToLoadSymbol(_)) => device.running_graphics_processes_v2(),
        other => other,
    }
}

/// Why NVML did not start, naming the library tried. A library that cannot be loaded at all gets
/// what to set, since drivers outside the loader's search path are common (WSL, NixOS).
fn init_error(library: &Path, error: NvmlError) -> ProbeError {
    match error {
        NvmlError::LibloadingError(e) => ProbeError(format!(
            "NVML unavailable: cannot load the NVML library {}: {e}; if the NVIDIA driver is installed, set \
             [gpu.nvml] library to its libnvidia-ml.so.1 (WSL: /usr/lib/wsl/lib/libnvidia-ml.so.1, NixOS: \
             /run/opengl-driver/lib/libnvidia-ml.so.1)",
            library.display()
        )),
        e => ProbeError(format!("NVML unavailable (library {}): {e}", library.display())),
    }
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
fn retry_grown_list<T>(mut call: impl FnMut() -> Result<T, NvmlError>) -> Result<T, NvmlError> {
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
fn process_list(result: Result<Vec<ProcessInfo>, NvmlError>) -> Result<Vec<RawProcess>, String> {
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

impl Probe for NvmlProbe {
    fn kind(&self) -> ProbeKind {
        ProbeKind::Nvml
    }

    fn sample(&mut self) -> Result<Vec<DeviceSnapshot>, ProbeError> {
        let snapshots = self.read_all();
        if snapshots.iter().all(|s| s.failed.is_none()) {
            self.last_reinit = None;
            self.unanswered_reinits = 0;
            return Ok(snapshots);
        }
        // A device that cannot be read may answer again only through a fresh NVML (a GPU that
        // fell off the bus and came back): re-initialise, with a growing wait between tries
        // (`reinit_wait`), and read again at once so a recovery shows in this sample.
        if !reinit_due(self.last_reinit, self.unanswered_reinits, Instant::now()) {
            return Ok(snapshots);
        }
        self.reinit();
        let snapshots = self.read_all();
        if snapshots.iter().any(|s| s.failed.is_some()) {
            self.unanswered_reinits = self.unanswered_reinits.saturating_add(1);
        }
        Ok(snapshots)
    }

    /// Two calls per device (the compute and graphics process lists), nothing else. A device
    /// whose handle or lists fail is reported unreadable, never as an empty list.
    fn gpu_pids(&mut self) -> Result<GpuPids, ProbeError> {
        let mut lists = GpuPids::default();
        for index in 0..self.names.len() as u32 {
            let read = match &self.nvml {
                Some(nvml) => nvml.device_by_index(index).map_err(|e| format!("handle: {e}")).map(|device| {
                    [
                        process_list(retry_grown_list(|| compute_processes(&device))),
                        process_list(retry_grown_list(|| graphics_processes(&device))),
                    ]
                }),
                None => Err("NVML is not initialised (its re-initialisation failed)".to_string()),
            };
            add_device_lists(&mut lists, index, read);
        }
        Ok(lists)
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
        assert!(blind.warnings[0].contains("pid 6"));
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
        assert!(lists.shows_gone(&model, Some(0)), "device 0 was read and lists no 99");
        assert!(!lists.shows_gone(&model, Some(1)), "device 1's list was not read");
        assert!(!lists.shows_gone(&model, None), "some list was not read");
        assert!(!lists.shows_gone(&[10].into(), Some(0)), "still listed");
    }

    /// Re-initialisation: at once on the first failure, then after a wait that doubles with each
    /// try that did not bring every device back, up to the cap.
    #[test]
    fn reinit_is_bounded_and_backs_off() {
        let now = Instant::now();
        assert!(reinit_due(None, 0, now), "the first failure re-initialises at once");
        assert_eq!(reinit_wait(1), REINIT_FIRST_WAIT);
        assert_eq!(reinit_wait(2), 2 * REINIT_FIRST_WAIT);
        assert_eq!(reinit_wait(3), 4 * REINIT_FIRST_WAIT);
        assert_eq!(reinit_wait(40), REINIT_MAX_WAIT, "capped, no overflow");
        assert_eq!(reinit_wait(u32::MAX), REINIT_MAX_WAIT);
        assert!(!reinit_due(Some(now), 1, now + REINIT_FIRST_WAIT - Duration::from_millis(1)));
        assert!(reinit_due(Some(now), 1, now + REINIT_FIRST_WAIT));
        assert!(!reinit_due(Some(now), 2, now + REINIT_FIRST_WAIT), "the second wait is longer");
        assert!(reinit_due(Some(now), 2, now + 2 * REINIT_FIRST_WAIT));
        assert!(!reinit_due(Some(now + Duration::from_secs(1)), 1, now), "a clock that went back waits");
    }

    /// At start-up one device that does not answer leaves the others usable; none answering is
    /// an error naming each.
    #[test]
    fn start_up_names_survive_a_lost_device_but_not_all_lost() {
        let one_lost = |i: u32| if i == 1 { Err("GPU is lost".to_string()) } else { Ok(format!("RTX {i}")) };
        assert_eq!(device_names(3, one_lost).unwrap(), ["RTX 0", "NVIDIA GPU 1", "RTX 2"]);
        let err = device_names(2, |_| Err("GPU is lost".to_string())).unwrap_err();
        assert!(err.0.contains("NVML device 0: GPU is lost") && err.0.contains("NVML device 1"), "{err}");
        assert_eq!(device_names(0, one_lost).unwrap(), Vec::<String>::new());
    }
}
