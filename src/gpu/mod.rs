//! Probes: where device readings come from.
//!
//! Every probe turns its source (NVML, amdgpu sysfs, the simulated device's files, nothing) into
//! the same plain [`DeviceSnapshot`]s. A probe only reads; it never decides anything. Sampling is
//! blocking I/O (NVML calls, file reads), so the monitor runs it off the async runtime.

pub mod amd;
pub mod level;
pub mod none;
pub mod nvml;
pub mod sim;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::config::{GpuConfig, ProbeChoice};

pub use level::{Level, Thresholds};

/// Which probe produced the readings; also the `probe` field of each device in status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    /// NVIDIA, through NVML.
    Nvml,
    /// AMD, through Linux sysfs.
    Amd,
    /// The simulated device of tests and demos.
    Sim,
    /// No GPU: CPU-only.
    None,
}

impl ProbeKind {
    /// The lowercase name used in config, status and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeKind::Nvml => "nvml",
            ProbeKind::Amd => "amd",
            ProbeKind::Sim => "sim",
            ProbeKind::None => "none",
        }
    }
}

/// One process's use of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessUsage {
    /// Operating-system process id.
    pub pid: u32,
    /// VRAM the process holds on this device; `None` where the driver does not say (NVML's "not
    /// available" in some containers and under WDDM): the process is listed, its memory is only
    /// in the device's total use. Never 0 for "unknown".
    pub used_mib: Option<u64>,
    /// The process name from `/proc/<pid>/comm`, or `unknown` when it cannot be read (for example
    /// a process in another pid namespace).
    pub name: String,
}

/// Memory that a named consumer holds without a process id (the sim device's `PATH/N/desktop`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedUsage {
    /// The consumer's name (the file name in the sim directory).
    pub name: String,
    /// VRAM it holds.
    pub used_mib: u64,
}

/// One reading of one device.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeviceSnapshot {
    /// Position of the device as the probe enumerates it (NVML index, card order, sim list order).
    pub index: u32,
    /// Marketing name, e.g. "NVIDIA GeForce RTX 4070".
    pub name: String,
    /// Installed memory.
    pub total_mib: u64,
    /// Memory in use, by anyone.
    pub used_mib: u64,
    /// Memory not in use.
    pub free_mib: u64,
    /// GPU busy percentage, where the probe knows it.
    pub utilization_pct: Option<u32>,
    /// Core temperature, where the probe knows it.
    pub temperature_c: Option<i32>,
    /// The per-process list (empty where the probe cannot see processes).
    pub processes: Vec<ProcessUsage>,
    /// Why `processes` is empty although memory is in use, when the probe cannot see processes
    /// (amdgpu sysfs has no per-process figures). `None` where the list is authoritative.
    pub processes_unavailable: Option<String>,
    /// Consumers without a process id (sim named files).
    pub named: Vec<NamedUsage>,
    /// Problems with this reading that did not stop it (a sim file holding garbage).
    pub warnings: Vec<String>,
    /// Why this device could not be read this time (NVML's `GPU_IS_LOST`, a sysfs file gone),
    /// while the others were: its figures are then meaningless (the monitor keeps its last good
    /// ones) and it admits nothing until it answers again. `None` for a good reading.
    pub failed: Option<String>,
}

impl DeviceSnapshot {
    /// The reading of a device that did not answer this time: index, name and why.
    pub fn failed(index: u32, name: impl Into<String>, reason: impl Into<String>) -> DeviceSnapshot {
        DeviceSnapshot { index, name: name.into(), failed: Some(reason.into()), ..DeviceSnapshot::default() }
    }
}

/// What the per-process lists say now: the pids listed on every device whose list could be read,
/// and the devices whose list could not (with why). A pid missing from an unreadable list proves
/// nothing, so a release is complete only where the lists were read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuPids {
    /// Pids using memory on the devices whose lists were read.
    pub pids: BTreeSet<u32>,
    /// Devices whose list could not be read now, by index, with the reason.
    pub unreadable: BTreeMap<u32, String>,
}

impl GpuPids {
    /// Whether these lists show every one of `pids` gone from `devices` (every device when
    /// empty): each of those devices' lists was read (a pid may still be on one that was not,
    /// whatever the others say) and none of the lists read shows any of the pids.
    pub fn shows_gone(&self, pids: &BTreeSet<u32>, devices: &BTreeSet<u32>) -> bool {
        self.unreadable_among(devices).is_none() && self.pids.is_disjoint(pids)
    }

    /// Why the lists of `devices` (every device when empty) cannot all be read now: the reasons
    /// of those that cannot, joined; `None` when all can.
    pub fn unreadable_among(&self, devices: &BTreeSet<u32>) -> Option<String> {
        let reasons: Vec<&str> = self
            .unreadable
            .iter()
            .filter(|(device, _)| devices.is_empty() || devices.contains(device))
            .map(|(_, reason)| reason.as_str())
            .collect();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }
}

/// A probe could not start or could not take a reading.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProbeError(pub String);

/// A source of device readings.
pub trait Probe: Send {
    /// Which kind of probe this is.
    fn kind(&self) -> ProbeKind;
    /// Takes one reading of every device. Blocking; may take milliseconds (NVML) or less. A
    /// device that fails is a snapshot with `failed` set, so the others are still read; an `Err`
    /// is for a probe that cannot read anything.
    fn sample(&mut self) -> Result<Vec<DeviceSnapshot>, ProbeError>;

    /// The pids using GPU memory on each device, and the devices whose list cannot be read now:
    /// all a release watches (every few milliseconds, until the model's pids are gone). The
    /// default takes a whole sample (a device with `processes_unavailable` is unreadable); a
    /// probe with a cheaper call overrides it (NVML: the per-process lists only, no memory,
    /// utilization, temperature or process names).
    fn gpu_pids(&mut self) -> Result<GpuPids, ProbeError> {
        let mut lists = GpuPids::default();
        for device in self.sample()? {
            match device.failed.or(device.processes_unavailable) {
                Some(reason) => {
                    lists.unreadable.insert(device.index, reason);
                }
                None => lists.pids.extend(device.processes.iter().map(|p| p.pid)),
            }
        }
        Ok(lists)
    }
}

/// A started probe, with what happened on the way to it.
pub struct OpenedProbe {
    /// The probe to sample.
    pub probe: Box<dyn Probe>,
    /// Why the daemon runs degraded because of the probe choice (e.g. `auto` found no GPU and
    /// each probe's reason for failing). Empty when a real or simulated device is in use.
    pub degraded_reasons: Vec<String>,
    /// Probes that `auto` tried and skipped before the one it chose, with their errors; logged,
    /// not counted as degradation (an AMD machine has no NVML and that is fine).
    pub skipped: Vec<String>,
}

/// Starts the probe the config asks for. An explicitly named probe that cannot start is an error
/// (the user asked for that hardware); `auto` tries NVML, then AMD, then falls back to `none`.
pub fn open(config: &GpuConfig) -> Result<OpenedProbe, ProbeError> {
    let opened = |probe: Box<dyn Probe>| OpenedProbe { probe, degraded_reasons: vec![], skipped: vec![] };
    match config.probe {
        ProbeChoice::Nvml => Ok(opened(Box::new(nvml::NvmlProbe::open(&config.nvml)?))),
        ProbeChoice::Amd => Ok(opened(Box::new(amd::AmdProbe::open(&config.amd.sysfs_root)?))),
        ProbeChoice::Sim => {
            let sim =
                config.sim.as_ref().ok_or_else(|| ProbeError("probe = \"sim\" needs a [gpu.sim] section".into()))?;
            Ok(opened(Box::new(sim::SimProbe::open(sim)?)))
        }
        ProbeChoice::None => Ok(OpenedProbe {
            probe: Box::new(none::NoneProbe),
            degraded_reasons: vec!["no GPU probe configured (probe = \"none\"): running CPU-only".into()],
            skipped: vec![],
        }),
        ProbeChoice::Auto => {
            let mut skipped = Vec::new();
            match nvml::NvmlProbe::open(&config.nvml) {
                Ok(probe) => return Ok(OpenedProbe { probe: Box::new(probe), degraded_reasons: vec![], skipped }),
                Err(e) => skipped.push(format!("nvml: {e}")),
            }
            match amd::AmdProbe::open(&config.amd.sysfs_root) {
                Ok(probe) => return Ok(OpenedProbe { probe: Box::new(probe), degraded_reasons: vec![], skipped }),
                Err(e) => skipped.push(format!("amd: {e}")),
            }
            let mut degraded_reasons = vec!["no GPU found (probe = \"auto\"): running CPU-only".to_string()];
            degraded_reasons.extend(skipped.iter().cloned());
            Ok(OpenedProbe { probe: Box::new(none::NoneProbe), degraded_reasons, skipped })
        }
    }
}

/// The name of a process from `/proc/<pid>/comm`, or `None` if it is gone or invisible to us.
pub fn process_name(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
        .filter(|s| !s.is_empty())
}

/// The name for display: the process name, or `unknown`.
pub(crate) fn process_name_or_unknown(pid: u32) -> String {
    process_name(pid).unwrap_or_else(|| "unknown".to_string())
}

/// Whether `pid` is a running process. A zombie (exited, not yet reaped) counts as gone: it holds
/// no memory any more.
pub fn pid_is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may itself contain
        // spaces or parentheses, so look after the last ')'.
        Ok(stat) => match stat.rfind(')') {
            Some(end) => !matches!(stat[end + 1..].trim_start().chars().next(), Some('Z') | Some('X')),
            None => true,
        },
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_named() {
        assert!(pid_is_alive(std::process::id()));
        assert!(process_name(std::process::id()).is_some());
    }

    #[test]
    fn a_reaped_child_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn true");
        let pid = child.id();
        child.wait().expect("wait");
        assert!(!pid_is_alive(pid));
    }

    #[test]
    fn a_zombie_is_not_alive() {
        let child = std::process::Command::new("true").spawn().expect("spawn true");
        let pid = child.id();
        // Not reaped: the child becomes a zombie once it exits.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while pid_is_alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!pid_is_alive(pid));
        drop(child);
    }

    #[test]
    fn none_probe_is_degraded_with_a_reason() {
        let config = GpuConfig { probe: ProbeChoice::None, ..GpuConfig::default() };
        let opened = open(&config).expect("none always opens");
        assert_eq!(opened.probe.kind(), ProbeKind::None);
        assert!(opened.degraded_reasons[0].contains("CPU-only"));
    }

    #[test]
    fn auto_without_gpus_falls_back_to_none_and_keeps_each_reason() {
        let empty = tempfile::tempdir().expect("tempdir");
        let mut config = GpuConfig { probe: ProbeChoice::Auto, ..GpuConfig::default() };
        config.amd.sysfs_root = empty.path().to_path_buf();
        let opened = open(&config).expect("auto always opens");
        // This test machine has no NVIDIA driver; where one exists, auto rightly picks it.
        if opened.probe.kind() == ProbeKind::None {
            assert!(opened.degraded_reasons.iter().any(|r| r.starts_with("nvml: ")), "{:?}", opened.degraded_reasons);
            assert!(opened.degraded_reasons.iter().any(|r| r.starts_with("amd: ")), "{:?}", opened.degraded_reasons);
        }
    }

    #[test]
    fn explicit_sim_without_section_is_an_error() {
        let config = GpuConfig { probe: ProbeChoice::Sim, sim: None, ..GpuConfig::default() };
        let err = open(&config).err().expect("must fail");
        assert!(err.0.contains("[gpu.sim]"));
    }
}
