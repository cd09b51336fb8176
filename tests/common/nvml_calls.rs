//! What the NVML probe costs in driver calls, read from the stand-in (`tests/fixtures/nvml_standin/`)
//! through the dynamic loader: its per-entry-point call counter (`vramgate_standin_calls`), and its
//! entry points called straight, without nvml-wrapper or vramgate in between, to replay the calls a
//! sample makes. The loader hands out the copy nvml-wrapper loaded from the same file, so the
//! counter sees the probe's calls; holding the handle also keeps that copy (and its counts) loaded
//! across `Nvml` instances. Shared by `tests/nvml_costs.rs` and `benches/probe.rs` (`#[path]`
//! includes, so it depends on nothing else in `tests/common`).

#![allow(dead_code)] // the test and the benchmark each use a subset

use std::collections::BTreeMap;
use std::ffi::{CString, c_char, c_int, c_uint, c_ulonglong, c_void};
use std::path::Path;

/// Every entry point the stand-in exports and counts (docs/development.md lists them).
pub const ENTRY_POINTS: &[&str] = &[
    "nvmlInit_v2",
    "nvmlInit",
    "nvmlInitWithFlags",
    "nvmlShutdown",
    "nvmlSystemGetDriverVersion",
    "nvmlSystemGetNVMLVersion",
    "nvmlSystemGetCudaDriverVersion",
    "nvmlDeviceGetCount_v2",
    "nvmlDeviceGetCount",
    "nvmlDeviceGetHandleByIndex_v2",
    "nvmlDeviceGetHandleByIndex",
    "nvmlDeviceGetName",
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetMemoryInfo_v2",
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetTemperature",
    "nvmlDeviceGetMigMode",
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetGraphicsRunningProcesses_v3",
    "nvmlDeviceGetComputeRunningProcesses_v2",
    "nvmlDeviceGetGraphicsRunningProcesses_v2",
    "nvmlDeviceGetComputeRunningProcesses",
    "nvmlDeviceGetGraphicsRunningProcesses",
];

/// Calls per entry point (only those with calls).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Calls(pub BTreeMap<&'static str, u64>);

impl Calls {
    /// The calls made since `earlier` was read.
    pub fn since(&self, earlier: &Calls) -> Calls {
        Calls(
            self.0
                .iter()
                .map(|(name, n)| (*name, n.saturating_sub(earlier.get(name))))
                .filter(|(_, n)| *n > 0)
                .collect(),
        )
    }

    /// The calls of one entry point.
    pub fn get(&self, name: &str) -> u64 {
        self.0.get(name).copied().unwrap_or(0)
    }

    /// All calls.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// `count` of each entry point given, as a table to compare with.
    pub fn of(entries: &[(&'static str, u64)]) -> Calls {
        Calls(entries.iter().copied().filter(|(_, n)| *n > 0).collect())
    }
}

impl std::fmt::Display for Calls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(name, n)| format!("{name} {n}")).collect();
        write!(f, "{}", parts.join(", "))
    }
}

unsafe extern "C" {
    fn dlopen(path: *const c_char, flags: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void;
    fn dlclose(handle: *mut c_void) -> c_int;
}

/// nvml.h's `nvmlMemory_v2_t` (the library writes the fields; the replay only pays for them).
#[allow(dead_code)]
#[repr(C)]
#[derive(Default)]
struct MemoryV2 {
    version: c_uint,
    total: c_ulonglong,
    reserved: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

/// nvml.h's `nvmlUtilization_t` (written by the library).
#[allow(dead_code)]
#[repr(C)]
#[derive(Default)]
struct Utilization {
    gpu: c_uint,
    memory: c_uint,
}

/// nvml.h's `nvmlProcessInfo_t` (the `_v3` process calls' entries, written by the library).
#[allow(dead_code)]
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ProcessInfo {
    pid: c_uint,
    used_gpu_memory: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

type Device = *mut c_void;
type CallCounter = unsafe extern "C" fn(*const c_char) -> c_ulonglong;
type HandleByIndex = unsafe extern "C" fn(c_uint, *mut Device) -> c_int;
type MemoryInfoV2 = unsafe extern "C" fn(Device, *mut MemoryV2) -> c_int;
type UtilizationRates = unsafe extern "C" fn(Device, *mut Utilization) -> c_int;
type Temperature = unsafe extern "C" fn(Device, c_int, *mut c_uint) -> c_int;
type ProcessList = unsafe extern "C" fn(Device, *mut c_uint, *mut ProcessInfo) -> c_int;

const NVML_SUCCESS: c_int = 0;
/// `NVML_STRUCT_VERSION(Memory, 2)`, as nvml.h and nvml-wrapper compute it.
const MEMORY_V2_VERSION: c_uint = (std::mem::size_of::<MemoryV2>() | (2 << 24)) as c_uint;
/// The headroom nvml-wrapper adds to a process count before the fill call.
const WRAPPER_HEADROOM: c_uint = 5;

/// The stand-in as the loader holds it: the counter and the entry points a sample uses.
pub struct Driver {
    handle: *mut c_void,
    counter: CallCounter,
    handle_by_index: HandleByIndex,
    memory_info: MemoryInfoV2,
    utilization: UtilizationRates,
    temperature: Temperature,
    compute: ProcessList,
    graphics: ProcessList,
}

impl Driver {
    /// Opens the stand-in at `library` (the path nvml-wrapper loads too, so both share one copy).
    /// Panics naming what is missing: a fixture that is not the stand-in is a broken test setup.
    pub fn open(library: &Path) -> Driver {
        let path = CString::new(library.as_os_str().as_encoded_bytes()).expect("a library path without NUL");
        const RTLD_NOW: c_int = 2;
        // SAFETY: a NUL-terminated path; the handle is closed on drop.
        let handle = unsafe { dlopen(path.as_ptr(), RTLD_NOW) };
        assert!(!handle.is_null(), "dlopen {}", library.display());
        let symbol = |name: &str| {
            let c_name = CString::new(name).expect("a symbol name without NUL");
            // SAFETY: a live handle and a NUL-terminated name.
            let found = unsafe { dlsym(handle, c_name.as_ptr()) };
            assert!(!found.is_null(), "{} does not export {name}: not the full NVML stand-in", library.display());
            found
        };
        // SAFETY: each symbol is the stand-in's function of nvml.h's signature written beside it.
        unsafe {
            Driver {
                counter: std::mem::transmute::<*mut c_void, CallCounter>(symbol("vramgate_standin_calls")),
                handle_by_index: std::mem::transmute::<*mut c_void, HandleByIndex>(symbol(
                    "nvmlDeviceGetHandleByIndex_v2",
                )),
                memory_info: std::mem::transmute::<*mut c_void, MemoryInfoV2>(symbol("nvmlDeviceGetMemoryInfo_v2")),
                utilization: std::mem::transmute::<*mut c_void, UtilizationRates>(symbol(
                    "nvmlDeviceGetUtilizationRates",
                )),
                temperature: std::mem::transmute::<*mut c_void, Temperature>(symbol("nvmlDeviceGetTemperature")),
                compute: std::mem::transmute::<*mut c_void, ProcessList>(symbol(
                    "nvmlDeviceGetComputeRunningProcesses_v3",
                )),
                graphics: std::mem::transmute::<*mut c_void, ProcessList>(symbol(
                    "nvmlDeviceGetGraphicsRunningProcesses_v3",
                )),
                handle,
            }
        }
    }

    /// The calls made in this process so far, per entry point.
    pub fn calls(&self) -> Calls {
        Calls(
            ENTRY_POINTS
                .iter()
                .map(|name| {
                    let c_name = CString::new(*name).expect("an entry point name without NUL");
                    // SAFETY: a NUL-terminated name; the library stays loaded while `self` lives.
                    (*name, unsafe { (self.counter)(c_name.as_ptr()) })
                })
                .filter(|(_, n)| *n > 0)
                .collect(),
        )
    }

    /// The calls one NVML probe sample makes, straight into the library, in the order
    /// nvml-wrapper makes them for `NvmlProbe::read` (handle, memory, utilization, temperature,
    /// compute then graphics list: count, and a fill when the count is not 0). What this costs is
    /// the stand-in's own work in a sample. Returns the processes listed, so nothing is optimised
    /// away.
    pub fn replay_sample(&self, devices: u32) -> usize {
        let mut listed = 0;
        for index in 0..devices {
            let Some(device) = self.device(index) else { continue };
            let mut memory = MemoryV2 { version: MEMORY_V2_VERSION, ..MemoryV2::default() };
            let mut utilization = Utilization::default();
            let mut temperature: c_uint = 0;
            // SAFETY: a handle the library gave and out-pointers to live values of nvml.h's types.
            unsafe {
                std::hint::black_box((self.memory_info)(device, &mut memory));
                std::hint::black_box((self.utilization)(device, &mut utilization));
                std::hint::black_box((self.temperature)(device, 0, &mut temperature));
            }
            listed += self.list(self.compute, device) + self.list(self.graphics, device);
        }
        listed
    }

    /// The calls `NvmlProbe::gpu_pids` (the release watch) makes, straight into the library:
    /// the handle and the two process lists per device.
    pub fn replay_gpu_pids(&self, devices: u32) -> usize {
        let mut listed = 0;
        for index in 0..devices {
            if let Some(device) = self.device(index) {
                listed += self.list(self.compute, device) + self.list(self.graphics, device);
            }
        }
        listed
    }

    fn device(&self, index: u32) -> Option<Device> {
        let mut device: Device = std::ptr::null_mut();
        // SAFETY: an out-pointer to a live handle.
        let code = unsafe { (self.handle_by_index)(index, &mut device) };
        (code == NVML_SUCCESS).then_some(device)
    }

    /// nvml.h's count-then-fill protocol, as nvml-wrapper follows it.
    fn list(&self, call: ProcessList, device: Device) -> usize {
        let mut count: c_uint = 0;
        // SAFETY: a null buffer asks for the count only.
        unsafe { call(device, &mut count, std::ptr::null_mut()) };
        if count == 0 {
            return 0;
        }
        count = count.saturating_add(WRAPPER_HEADROOM);
        let mut entries = vec![ProcessInfo::default(); count as usize];
        // SAFETY: `count` entries of nvml.h's layout.
        let code = unsafe { call(device, &mut count, entries.as_mut_ptr()) };
        if code != NVML_SUCCESS {
            return 0;
        }
        entries.iter().take(count as usize).filter(|e| e.pid != 0).count()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // SAFETY: the handle came from dlopen and is closed once.
        unsafe { dlclose(self.handle) };
    }
}
