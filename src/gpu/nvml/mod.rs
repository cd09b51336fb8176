//! The `nvml` probe: NVIDIA devices through NVML (`nvml-wrapper`).
//!
//! The library is loaded at run time (`[gpu.nvml] library`, by default `libnvidia-ml.so.1`), so
//! the binary starts on machines without NVIDIA's driver and `auto` can fall through. The NVML
//! calls live here; everything after them is pure and tested on hand-made values: shaping the
//! answers ([`assemble`], `shape.rs`), which device is which after a re-initialisation
//! ([`locate`], `identity.rs`), and when to re-initialise ([`ReinitBackoff`], `reinit.rs`).

mod identity;
mod reinit;
mod shape;

use std::path::{Path, PathBuf};
use std::time::Instant;

use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::error::{NvmlError, nvml_try};
use nvml_wrapper::struct_wrappers::device::ProcessInfo;
use nvml_wrapper::{Device, Nvml};

use crate::config::NvmlConfig;

pub use self::identity::{device_names, locate};
pub use self::reinit::{
    HEALTHY_FOR, HEALTHY_SAMPLES, REINIT_FIRST_WAIT, REINIT_MAX_WAIT, ReinitBackoff, reinit_helps, reinit_wait,
};
pub use self::shape::{RawDevice, RawProcess, add_device_lists, assemble, not_free_bytes};
use self::shape::{process_list, retry_grown_list};
use super::{DeviceSnapshot, GpuPids, Probe, ProbeError, ProbeKind, process_name};

/// NVML calls one device costs per sample: handle, memory, utilization, temperature, compute and
/// graphics process lists. The wrapper's process-list calls each make two library calls (count,
/// then fill), so the library sees 8 per device.
pub const NVML_CALLS_PER_DEVICE: usize = 6;

/// A device found at start-up. Its position in the probe's list is the daemon's index for it, for
/// the daemon's life, whatever NVML numbers it after a re-initialisation.
#[derive(Debug, Clone)]
struct Known {
    name: String,
    /// Its UUID, read at start-up (or when it first answered), to find it again after a
    /// re-initialisation; `None` while it never answered.
    uuid: Option<String>,
    /// NVML's index for it under the current init, or why it is not found there.
    at: Result<u32, String>,
}

/// Why one device could not be read: the message, and whether a fresh NVML could cure it
/// ([`reinit_helps`]).
#[derive(Debug, Clone)]
struct DeviceFailure {
    reason: String,
    curable: bool,
}

/// The probe over a loaded NVML.
pub struct NvmlProbe {
    /// `None` only after a re-initialisation whose init failed: every device is then failed until
    /// a later one succeeds.
    nvml: Option<Nvml>,
    library: PathBuf,
    devices: Vec<Known>,
    /// When NVML may be re-initialised next.
    backoff: ReinitBackoff,
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
        let devices = names
            .into_iter()
            .zip(0..count)
            .map(|(name, index)| Known { name, uuid: uuid_of(&nvml, index), at: Ok(index) })
            .collect();
        Ok(NvmlProbe {
            nvml: Some(nvml),
            library: library.to_path_buf(),
            devices,
            backoff: ReinitBackoff::default(),
            reinit_error: None,
        })
    }

    /// Reads every device, each on its own: one that fails (GPU_IS_LOST) is reported failed, the
    /// others read. Also says whether a failure is one a re-initialisation could cure.
    fn read_all(&self) -> (Vec<DeviceSnapshot>, bool) {
        let mut curable = false;
        let snapshots = self
            .devices
            .iter()
            .zip(0u32..)
            .map(|(known, index)| {
                let read = match (&self.nvml, &known.at) {
                    (Some(nvml), Ok(at)) => read(nvml, index, *at, &known.name),
                    (Some(_), Err(gone)) => {
                        Err(DeviceFailure { reason: format!("NVML device {index}: {gone}"), curable: true })
                    }
                    (None, _) => Err(DeviceFailure {
                        reason: format!(
                            "NVML device {index}: NVML re-initialisation failed: {}",
                            self.reinit_error.as_deref().unwrap_or("unknown")
                        ),
                        curable: true,
                    }),
                };
                match read {
                    Ok(raw) => assemble(index, raw, process_name),
                    Err(failure) => {
                        curable |= failure.curable;
                        DeviceSnapshot::failed(index, known.name.clone(), failure.reason)
                    }
                }
            })
            .collect();
        (snapshots, curable)
    }

    /// Shuts NVML down and initialises it again (a real driver keeps its state while any init is
    /// outstanding, so the old one goes first), then finds each device again by its UUID: NVML
    /// numbers devices afresh at each init, and the daemon's device N must stay the same card. A
    /// device that was named by its index at start-up gets its name (and UUID) if it answers now.
    fn reinit(&mut self) {
        if let Some(old) = self.nvml.take()
            && let Err(e) = old.shutdown()
        {
            tracing::debug!("NVML shutdown before re-initialisation: {e}");
        }
        match init(&self.library) {
            Ok(nvml) => {
                let count = nvml.device_count().unwrap_or(0);
                let listed: Vec<Option<String>> = (0..count).map(|j| uuid_of(&nvml, j)).collect();
                let known: Vec<Option<String>> = self.devices.iter().map(|d| d.uuid.clone()).collect();
                for ((device, at), index) in self.devices.iter_mut().zip(locate(&known, &listed)).zip(0u32..) {
                    if let Ok(j) = at {
                        if j != index {
                            tracing::info!("NVML numbers device {index} as {j} since its re-initialisation");
                        }
                        device.uuid = device.uuid.take().or_else(|| listed.get(j as usize).cloned().flatten());
                        if let Ok(answered) = nvml.device_by_index(j).and_then(|d| d.name()) {
                            device.name = answered;
                        }
                    }
                    device.at = at;
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

/// The UUID of NVML's device `index`, if it answers.
fn uuid_of(nvml: &Nvml, index: u32) -> Option<String> {
    nvml.device_by_index(index).and_then(|d| d.uuid()).ok()
}

/// The NVML calls for the daemon's device `index`, NVML's device `at`. Temperature and utilization
/// are optional extras (some devices refuse them); memory is not.
fn read(nvml: &Nvml, index: u32, at: u32, name: &str) -> Result<RawDevice, DeviceFailure> {
    let fail = |what: &str, e: NvmlError| DeviceFailure {
        curable: reinit_helps(&e),
        reason: format!("NVML device {index} {what}: {e}"),
    };
    let device = nvml.device_by_index(at).map_err(|e| fail("handle", e))?;
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

/// `nvmlDeviceGetMemoryInfo_v2` where the driver has it working, else the v1
/// `nvmlDeviceGetMemoryInfo`, which every driver has (see [`v2_memory_unusable`]). When v1 fails
/// too, its error stands (the v2 one when v1 is missing as well).
fn memory(nvml: &Nvml, device: &Device) -> Result<Memory, NvmlError> {
    match device.memory_info() {
        Ok(m) => Ok(Memory { total: m.total, used: m.used, reserved: m.reserved, free: m.free }),
        Err(e) if v2_memory_unusable(&e) => memory_v1(nvml, device).map_err(|v1| match v1 {
            NvmlError::FailedToLoadSymbol(_) => e,
            other => other,
        }),
        Err(e) => Err(e),
    }
}

/// nvml.h's `NVML_ERROR_ARGUMENT_VERSION_MISMATCH`: the driver does not know the struct version
/// the caller set (nvml-wrapper has no variant for it: `UnexpectedVariant(25)`).
const ARGUMENT_VERSION_MISMATCH: u32 = 25;

/// The answers of `nvmlDeviceGetMemoryInfo_v2` after which the v1 call is asked instead: the
/// symbol missing (drivers before 510), the call not supported, the struct version not understood,
/// or an error the driver does not explain (all seen from real drivers for v2 alone). A lost GPU
/// or a refused permission is the device's answer, whichever call asks.
fn v2_memory_unusable(error: &NvmlError) -> bool {
    matches!(
        error,
        NvmlError::FailedToLoadSymbol(_)
            | NvmlError::FunctionNotFound
            | NvmlError::NotSupported
            | NvmlError::Unknown
            | NvmlError::UnexpectedVariant(ARGUMENT_VERSION_MISMATCH)
    )
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

impl Probe for NvmlProbe {
    fn kind(&self) -> ProbeKind {
        ProbeKind::Nvml
    }

    fn sample(&mut self) -> Result<Vec<DeviceSnapshot>, ProbeError> {
        let (snapshots, curable) = self.read_all();
        let now = Instant::now();
        self.backoff.observe(curable, now);
        // A device that cannot be read for a reason a fresh NVML can cure (it fell off the bus
        // and came back, NVML lost its initialisation) may answer again only through one:
        // re-initialise, with a growing wait between tries, and read again at once so a recovery
        // shows in this sample. A permanent answer (no permission, not supported) never does.
        if !curable || !self.backoff.due(now) {
            return Ok(snapshots);
        }
        self.backoff.tried(now);
        self.reinit();
        Ok(self.read_all().0)
    }

    /// Two calls per device (the compute and graphics process lists), nothing else. A device
    /// whose handle or lists fail is reported unreadable, never as an empty list.
    fn gpu_pids(&mut self) -> Result<GpuPids, ProbeError> {
        let mut lists = GpuPids::default();
        for (known, index) in self.devices.iter().zip(0u32..) {
            let read = match (&self.nvml, &known.at) {
                (Some(nvml), Ok(at)) => nvml.device_by_index(*at).map_err(|e| format!("handle: {e}")).map(|device| {
                    [
                        process_list(retry_grown_list(|| compute_processes(&device))),
                        process_list(retry_grown_list(|| graphics_processes(&device))),
                    ]
                }),
                (Some(_), Err(gone)) => Err(gone.clone()),
                (None, _) => Err("NVML is not initialised (its re-initialisation failed)".to_string()),
            };
            add_device_lists(&mut lists, index, read);
        }
        Ok(lists)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The v2 memory call's answers that make the probe ask the v1 call, and those that do not.
    #[test]
    fn the_v1_memory_call_is_asked_when_v2_cannot_answer() {
        for unusable in [
            NvmlError::FailedToLoadSymbol("nvmlDeviceGetMemoryInfo_v2".into()),
            NvmlError::FunctionNotFound,
            NvmlError::NotSupported,
            NvmlError::Unknown,
            NvmlError::UnexpectedVariant(ARGUMENT_VERSION_MISMATCH),
        ] {
            assert!(v2_memory_unusable(&unusable), "{unusable:?}");
        }
        for answer in [NvmlError::GpuLost, NvmlError::NoPermission, NvmlError::UnexpectedVariant(26)] {
            assert!(!v2_memory_unusable(&answer), "{answer:?}");
        }
    }
}
