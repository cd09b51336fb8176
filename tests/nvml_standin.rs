//! The NVML stand-in itself, loaded in this process through nvml-wrapper as vramgate loads it:
//! it answers as the real library does (figures, NOT_SUPPORTED, "not available", the count/fill
//! protocol of the process lists), its injected errors fire once, always or after N calls and per
//! device, a rewritten state is read on the next call, and its reduced builds lack the versioned
//! symbols an older driver lacks. The quirk tests of the NVML probe rely on all of this.
//!
//! A process loads one copy of each build (the loader shares a file loaded twice), so each test
//! here uses a build of its own.

mod common;

use std::ffi::{CString, c_char, c_int, c_uint, c_ulonglong, c_void};

use common::nvml::{self, Device, InjectedError, List, Process, State, Variant, When, code};
use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;

const MIB: u64 = 1 << 20;

/// nvml.h's `nvmlProcessInfo_v1_t`, written out here so the stand-in's layout is checked against
/// the header's rather than against itself.
#[repr(C)]
#[derive(Clone, Copy)]
struct ProcessInfoV1 {
    pid: c_uint,
    used_gpu_memory: c_ulonglong,
}

/// nvml.h's `nvmlProcessInfo_v2_t` (the _v2 and _v3 calls' entries).
#[repr(C)]
#[derive(Clone, Copy)]
struct ProcessInfoV2 {
    pid: c_uint,
    used_gpu_memory: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

/// nvml.h's `nvmlDeviceGetMemoryInfo`.
type MemoryCall = unsafe extern "C" fn(*mut c_void, *mut MemoryV1) -> c_int;

/// The stand-in's call counter (not NVML).
type CallCounter = unsafe extern "C" fn(*const c_char) -> c_ulonglong;

/// A process-list entry point of nvml.h.
type ProcessCall<T> = unsafe extern "C" fn(*mut c_void, *mut c_uint, *mut T) -> c_int;

unsafe extern "C" {
    fn dlopen(path: *const c_char, flags: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void;
    fn dlclose(handle: *mut c_void) -> c_int;
}

/// The dynamic loader's view of a library: which symbols it exports (nvml-wrapper's own table
/// leaves the older calls out unless built with `legacy-functions`).
struct Symbols(*mut c_void);

impl Symbols {
    fn open(library: &std::path::Path) -> Symbols {
        let path = CString::new(library.as_os_str().as_encoded_bytes()).expect("a path without NUL");
        const RTLD_NOW: c_int = 2;
        // SAFETY: a NUL-terminated path; the handle is closed on drop.
        let handle = unsafe { dlopen(path.as_ptr(), RTLD_NOW) };
        assert!(!handle.is_null(), "dlopen {}", library.display());
        Symbols(handle)
    }

    fn get(&self, name: &str) -> Option<*mut c_void> {
        let name = CString::new(name).expect("a name without NUL");
        // SAFETY: a live handle and a NUL-terminated name.
        let symbol = unsafe { dlsym(self.0, name.as_ptr()) };
        (!symbol.is_null()).then_some(symbol)
    }
}

impl Drop for Symbols {
    fn drop(&mut self) {
        // SAFETY: the handle came from dlopen and is closed once.
        unsafe { dlclose(self.0) };
    }
}

/// nvml.h's `nvmlMemory_t`.
#[repr(C)]
struct MemoryV1 {
    total: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

fn process(device: u32, list: List, pid: u32, used_mib: Option<u64>, late: bool) -> Process {
    Process { device, list, pid, used_mib, late }
}

fn error(function: &str, device: Option<u32>, code: u32, when: When) -> InjectedError {
    InjectedError { function: function.into(), device, code, when }
}

#[test]
fn the_standin_answers_as_nvml_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let library = nvml::link_into(dir.path(), Variant::Full);
    let mut state = State {
        driver: Some("535.183.01".into()),
        devices: vec![
            Device { reserved_mib: 600, ..Device::new("NVIDIA GeForce RTX 3060", 12288, 4000) },
            Device {
                utilization_pct: None,
                temperature_c: None,
                mig: true,
                ..Device::new("NVIDIA H100 MIG", 81920, 0)
            },
        ],
        processes: vec![
            process(0, List::Compute, 4242, Some(3000), false),
            process(0, List::Graphics, 77, None, false),
            process(0, List::Compute, 4343, Some(1), true),
        ],
        errors: vec![
            error("nvmlDeviceGetTemperature", Some(0), code::GPU_IS_LOST, When::Once),
            error("nvmlDeviceGetUtilizationRates", None, code::NO_PERMISSION, When::After(2)),
        ],
        delays: vec![],
        claims: None,
    };
    state.write_to(dir.path());
    let nvml = Nvml::builder().lib_path(library.as_os_str()).init().expect("the stand-in initialises");
    assert_eq!(nvml.sys_driver_version().expect("driver version"), "535.183.01");
    assert_eq!(nvml.device_count().expect("count"), 2);
    let first = nvml.device_by_index(0).expect("device 0");
    let second = nvml.device_by_index(1).expect("device 1");
    assert!(matches!(nvml.device_by_index(2), Err(NvmlError::InvalidArg)));
    assert_eq!(first.name().expect("name"), "NVIDIA GeForce RTX 3060");
    assert_eq!(first.uuid().expect("uuid"), "GPU-00000000-0000-4000-8000-000000000000", "the default for index 0");
    let memory = first.memory_info().expect("memory v2");
    assert_eq!(
        (memory.total, memory.used, memory.free, memory.reserved),
        (12288 * MIB, 4000 * MIB, (12288 - 4000 - 600) * MIB, 600 * MIB),
        "v2 reports reserved apart from used"
    );

    // A process that starts between the count and the fill call is in the fill (within the
    // wrapper's headroom); "not available" is NVML_VALUE_NOT_AVAILABLE.
    let compute = first.running_compute_processes().expect("compute list");
    let listed: Vec<(u32, UsedGpuMemory)> = compute.iter().map(|p| (p.pid, p.used_gpu_memory.clone())).collect();
    assert_eq!(listed, vec![(4242, UsedGpuMemory::Used(3000 * MIB)), (4343, UsedGpuMemory::Used(MIB))]);
    assert_eq!(first.running_compute_processes_count().expect("count call"), 1, "the late one is not counted");
    let graphics = first.running_graphics_processes().expect("graphics list");
    assert_eq!(graphics.len(), 1);
    assert_eq!((graphics[0].pid, &graphics[0].used_gpu_memory), (77, &UsedGpuMemory::Unavailable));

    // Injected errors: once on one device; after two calls on every device.
    assert!(matches!(first.temperature(TemperatureSensor::Gpu), Err(NvmlError::GpuLost)));
    assert_eq!(first.temperature(TemperatureSensor::Gpu).expect("the second call answers"), 40);
    assert!(matches!(second.temperature(TemperatureSensor::Gpu), Err(NvmlError::NotSupported)));
    assert_eq!(first.utilization_rates().expect("first call").gpu, 0);
    assert!(matches!(second.utilization_rates(), Err(NvmlError::NotSupported)), "the second call, not yet failing");
    assert!(matches!(first.utilization_rates(), Err(NvmlError::NoPermission)), "the third call fails");
    assert!(matches!(first.utilization_rates(), Err(NvmlError::NoPermission)), "and every one after");

    // More processes start between the calls than the wrapper leaves room for: the fill call
    // answers INSUFFICIENT_SIZE, as the real library does.
    state.processes.extend((0..6).map(|i| process(0, List::Compute, 5000 + i, Some(10), true)));
    // A device that falls off the bus answers GPU_IS_LOST to everything about it.
    state.errors = ["nvmlDeviceGetMemoryInfo_v2", "nvmlDeviceGetName", "nvmlDeviceGetHandleByIndex_v2"]
        .into_iter()
        .map(|f| error(f, Some(1), code::GPU_IS_LOST, When::Always))
        .collect();
    state.write_to(dir.path());
    assert!(matches!(first.running_compute_processes(), Err(NvmlError::InsufficientSize(_))));
    assert!(matches!(second.memory_info(), Err(NvmlError::GpuLost)));
    assert!(matches!(nvml.device_by_index(1), Err(NvmlError::GpuLost)));
    assert_eq!(first.memory_info().expect("device 0 still answers").used, 4000 * MIB);
    assert_eq!(first.utilization_rates().expect("the rewrite dropped the old rules").gpu, 0);

    // A device that answers again only once NVML is re-initialised.
    state.errors = vec![error("nvmlDeviceGetMemoryInfo_v2", Some(0), code::GPU_IS_LOST, When::UntilInit)];
    state.write_to(dir.path());
    assert!(matches!(first.memory_info(), Err(NvmlError::GpuLost)));
    assert!(matches!(first.memory_info(), Err(NvmlError::GpuLost)), "still lost without a re-init");
    let again = Nvml::builder().lib_path(library.as_os_str()).init().expect("NVML initialised again");
    assert_eq!(
        again.device_by_index(0).and_then(|d| d.memory_info()).expect("answers after the re-init").used,
        4000 * MIB
    );
    drop(again);

    // The calls this process made, as a benchmark counts them.
    let symbols = Symbols::open(&library);
    let calls = symbols.get("vramgate_standin_calls").expect("the call counter");
    // SAFETY: the stand-in's `unsigned long long vramgate_standin_calls(const char *)`.
    let calls = unsafe { std::mem::transmute::<*mut c_void, CallCounter>(calls) };
    let count = |name: &str| {
        let name = CString::new(name).expect("a name without NUL");
        // SAFETY: a NUL-terminated name; the library stays loaded while `symbols` lives.
        unsafe { calls(name.as_ptr()) }
    };
    assert_eq!(count("nvmlDeviceGetName"), 1);
    assert_eq!(count("nvmlDeviceGetTemperature"), 3);
    assert_eq!(count("nvmlDeviceGetUtilizationRates"), 5);
    assert_eq!(count("nvmlDeviceGetMigMode"), 0);

    // A state file that cannot be read makes every call fail rather than answer stale figures.
    std::fs::write(dir.path().join(nvml::STATE_FILE), "device zero\n").expect("write a broken state");
    assert!(matches!(first.memory_info(), Err(NvmlError::Unknown)));
    let orphan = "device 0 total=1MiB used=0 free=1MiB\nprocess 1 compute 7 1MiB\n";
    std::fs::write(dir.path().join(nvml::STATE_FILE), orphan).expect("write a state with a stray process");
    assert!(matches!(first.memory_info(), Err(NvmlError::Unknown)), "a process on no device is refused");
    nvml.shutdown().expect("shutdown");
}

#[test]
fn an_older_driver_build_lacks_the_v3_process_calls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let library = nvml::link_into(dir.path(), Variant::WithoutV3);
    State {
        devices: vec![Device::new("NVIDIA Old Driver", 8192, 100)],
        processes: vec![process(0, List::Compute, 4242, Some(100), false)],
        ..State::default()
    }
    .write_to(dir.path());
    let nvml = Nvml::builder().lib_path(library.as_os_str()).init().expect("the stand-in initialises");
    let device = nvml.device_by_index(0).expect("device 0");
    assert!(matches!(device.running_compute_processes(), Err(NvmlError::FailedToLoadSymbol(_))));
    assert!(matches!(device.running_graphics_processes(), Err(NvmlError::FailedToLoadSymbol(_))));
    assert_eq!(device.memory_info().expect("memory v2 is there").used, 100 * MIB);
    // The _v2 and unversioned (nvmlProcessInfo_v1_t) calls are there for a fallback.
    let symbols = Symbols::open(&library);
    assert!(symbols.get("nvmlDeviceGetComputeRunningProcesses_v3").is_none());
    assert!(symbols.get("nvmlDeviceGetGraphicsRunningProcesses_v3").is_none());
    assert!(symbols.get("nvmlDeviceGetGraphicsRunningProcesses_v2").is_some());
    let v2 = symbols.get("nvmlDeviceGetComputeRunningProcesses_v2").expect("the v2 symbol");
    let v1 = symbols.get("nvmlDeviceGetComputeRunningProcesses").expect("the v1 symbol");
    // SAFETY: both are nvml.h's `nvmlReturn_t f(nvmlDevice_t, unsigned int *, T *)`.
    let (v2, v1) = unsafe {
        (
            std::mem::transmute::<*mut c_void, ProcessCall<ProcessInfoV2>>(v2),
            std::mem::transmute::<*mut c_void, ProcessCall<ProcessInfoV1>>(v1),
        )
    };
    let mut count: c_uint = 4;
    let mut infos = [ProcessInfoV2 { pid: 0, used_gpu_memory: 0, gpu_instance_id: 0, compute_instance_id: 0 }; 4];
    // SAFETY: the handle is the stand-in's, the buffer holds `count` entries.
    let code = unsafe { v2(device.handle().cast(), &mut count, infos.as_mut_ptr()) };
    assert_eq!((code, count), (0, 1));
    assert_eq!((infos[0].pid, infos[0].used_gpu_memory, infos[0].gpu_instance_id), (4242, 100 * MIB, u32::MAX));
    let mut count: c_uint = 4;
    let mut infos = [ProcessInfoV1 { pid: 0, used_gpu_memory: 0 }; 4];
    // SAFETY: as above, with v1 entries.
    let code = unsafe { v1(device.handle().cast(), &mut count, infos.as_mut_ptr()) };
    assert_eq!((code, count), (0, 1));
    assert_eq!((infos[0].pid, infos[0].used_gpu_memory), (4242, 100 * MIB));
}

#[test]
fn an_older_driver_build_lacks_the_v2_memory_call() {
    let dir = tempfile::tempdir().expect("tempdir");
    let library = nvml::link_into(dir.path(), Variant::WithoutMemoryV2);
    State { devices: vec![Device { reserved_mib: 300, ..Device::new("NVIDIA Old", 4096, 1000) }], ..State::default() }
        .write_to(dir.path());
    let nvml = Nvml::builder().lib_path(library.as_os_str()).init().expect("the stand-in initialises");
    let device = nvml.device_by_index(0).expect("device 0");
    assert!(matches!(device.memory_info(), Err(NvmlError::FailedToLoadSymbol(_))));
    let symbols = Symbols::open(&library);
    assert!(symbols.get("nvmlDeviceGetMemoryInfo_v2").is_none());
    let v1 = symbols.get("nvmlDeviceGetMemoryInfo").expect("the v1 symbol");
    // SAFETY: nvml.h's `nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t, nvmlMemory_t *)`.
    let v1 = unsafe { std::mem::transmute::<*mut c_void, MemoryCall>(v1) };
    let mut memory = MemoryV1 { total: 0, free: 0, used: 0 };
    // SAFETY: the handle is the stand-in's; the struct is nvml.h's nvmlMemory_t.
    let code = unsafe { v1(device.handle().cast(), &mut memory) };
    assert_eq!(code, 0);
    assert_eq!(
        (memory.total, memory.used, memory.free),
        (4096 * MIB, 1300 * MIB, 2796 * MIB),
        "v1 used includes reserved"
    );
}
