//! The simulated device (its file format is a public contract, documented in docs/configuration.md): tests, demos and CI have no GPU, so a directory of
//! small files plays one.
//!
//! A process claims VRAM on device N by writing an integer MiB into `DIR/N/<pid>`; it counts while
//! the pid lives. A file whose name is not a number (`DIR/0/desktop`) is a named foreign consumer
//! and always counts. The directory is read on every sample, so a test changes the "GPU" by writing
//! files.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use super::{
    DeviceSnapshot, NamedUsage, Probe, ProbeError, ProbeKind, ProcessUsage, pid_is_alive, process_name_or_unknown,
};
use crate::config::SimConfig;

/// One simulated device: a name and a size.
#[derive(Debug, Clone)]
struct SimDevice {
    name: String,
    total_mib: u64,
}

/// The probe over a sim directory.
pub struct SimProbe {
    dir: PathBuf,
    devices: Vec<SimDevice>,
}

impl SimProbe {
    /// Creates `DIR/N` for every configured device so that writers find their directory.
    pub fn open(config: &SimConfig) -> Result<SimProbe, ProbeError> {
        let devices: Vec<SimDevice> =
            config.devices.iter().map(|d| SimDevice { name: d.name.clone(), total_mib: d.total_mib.0 }).collect();
        for index in 0..devices.len() {
            let path = config.dir.join(index.to_string());
            fs::create_dir_all(&path).map_err(|e| ProbeError(format!("sim: cannot create {}: {e}", path.display())))?;
        }
        Ok(SimProbe { dir: config.dir.clone(), devices })
    }
}

impl Probe for SimProbe {
    fn kind(&self) -> ProbeKind {
        ProbeKind::Sim
    }

    fn sample(&mut self) -> Result<Vec<DeviceSnapshot>, ProbeError> {
        self.devices
            .iter()
            .enumerate()
            .map(|(index, device)| {
                let reading = read_device_dir(&self.dir.join(index.to_string()), pid_is_alive)?;
                let used_mib = reading.used_mib();
                Ok(DeviceSnapshot {
                    index: index as u32,
                    name: device.name.clone(),
                    total_mib: device.total_mib,
                    used_mib,
                    free_mib: device.total_mib.saturating_sub(used_mib),
                    utilization_pct: None,
                    temperature_c: None,
                    processes: reading.processes,
                    processes_unavailable: None,
                    named: reading.named,
                    warnings: reading.warnings,
                })
            })
            .collect()
    }
}

/// What one device directory holds.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct DirReading {
    pub processes: Vec<ProcessUsage>,
    pub named: Vec<NamedUsage>,
    pub warnings: Vec<String>,
}

impl DirReading {
    fn used_mib(&self) -> u64 {
        let by_pid: u64 = self.processes.iter().map(|p| p.used_mib).sum();
        let named: u64 = self.named.iter().map(|n| n.used_mib).sum();
        by_pid.saturating_add(named)
    }
}

/// Reads one device directory. Files of dead pids are ignored and deleted (best effort: another
/// writer may race us); a file with garbage is reported in `warnings` and counts as nothing. An
/// empty file counts as 0 without a warning, because `echo 500 > file` truncates before it writes
/// and a sample can land in between.
pub(crate) fn read_device_dir(dir: &Path, is_alive: impl Fn(u32) -> bool) -> Result<DirReading, ProbeError> {
    let mut reading = DirReading::default();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        // Someone removed the directory: the device is simply empty until it is back.
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(reading),
        Err(e) => return Err(ProbeError(format!("sim: cannot read {}: {e}", dir.display()))),
    };
    let mut names: Vec<(String, PathBuf)> = entries
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_type().map(|t| t.is_file()).unwrap_or(false))
        .filter_map(|entry| entry.file_name().into_string().ok().map(|name| (name, entry.path())))
        // Editors' and atomic writers' temporary files are not consumers.
        .filter(|(name, _)| !name.starts_with('.'))
        .collect();
    names.sort();
    for (name, path) in names {
        let pid = name.parse::<u32>().ok();
        if let Some(pid) = pid
            && !is_alive(pid)
        {
            let _ = fs::remove_file(&path);
            continue;
        }
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            // Deleted between listing and reading: its owner just released it.
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => {
                reading.warnings.push(format!("sim file {}: cannot read: {e}", path.display()));
                continue;
            }
        };
        let trimmed = text.trim();
        let used_mib = if trimmed.is_empty() {
            0
        } else {
            match trimmed.parse::<u64>() {
                Ok(v) => v,
                Err(_) => {
                    let shown: String = trimmed.chars().take(40).collect();
                    reading.warnings.push(format!(
                        "sim file {}: expected an integer number of MiB, found {shown:?}; ignored",
                        path.display()
                    ));
                    continue;
                }
            }
        };
        match pid {
            Some(pid) => reading.processes.push(ProcessUsage { pid, used_mib, name: process_name_or_unknown(pid) }),
            None => reading.named.push(NamedUsage { name, used_mib }),
        }
    }
    reading.processes.sort_by_key(|p| p.pid);
    Ok(reading)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SimDeviceConfig;
    use crate::units::Mib;

    fn write(dir: &Path, name: &str, text: &str) {
        fs::write(dir.join(name), text).expect("write sim file");
    }

    #[test]
    fn live_pids_and_named_files_count() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "100", "900\n");
        write(tmp.path(), "desktop", "1200");
        let reading = read_device_dir(tmp.path(), |_| true).unwrap();
        assert_eq!(reading.processes.len(), 1);
        assert_eq!(reading.processes[0].pid, 100);
        assert_eq!(reading.processes[0].used_mib, 900);
        assert_eq!(reading.named, vec![NamedUsage { name: "desktop".into(), used_mib: 1200 }]);
        assert_eq!(reading.used_mib(), 2100);
        assert!(reading.warnings.is_empty());
    }

    #[test]
    fn dead_pid_is_ignored_and_its_file_removed() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "100", "900");
        write(tmp.path(), "200", "300");
        let reading = read_device_dir(tmp.path(), |pid| pid == 200).unwrap();
        assert_eq!(reading.processes.iter().map(|p| p.pid).collect::<Vec<_>>(), vec![200]);
        assert_eq!(reading.used_mib(), 300);
        assert!(!tmp.path().join("100").exists(), "a dead pid's file is cleaned up");
    }

    #[test]
    fn named_files_count_whatever_pids_are_alive() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "desktop", "500");
        let reading = read_device_dir(tmp.path(), |_| false).unwrap();
        assert_eq!(reading.used_mib(), 500);
    }

    #[test]
    fn garbage_is_reported_not_fatal() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "100", "lots of memory");
        write(tmp.path(), "desktop", "-5");
        write(tmp.path(), "game", "700");
        let reading = read_device_dir(tmp.path(), |_| true).unwrap();
        assert_eq!(reading.used_mib(), 700);
        assert_eq!(reading.warnings.len(), 2, "{:?}", reading.warnings);
        assert!(reading.warnings.iter().any(|w| w.contains("lots of memory") && w.contains("100")));
        assert!(reading.warnings.iter().any(|w| w.contains("\"-5\"") && w.contains("desktop")));
    }

    #[test]
    fn empty_files_and_hidden_files_count_as_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "desktop", "");
        write(tmp.path(), ".desktop.swp", "garbage");
        let reading = read_device_dir(tmp.path(), |_| true).unwrap();
        assert_eq!(reading.used_mib(), 0);
        assert!(reading.warnings.is_empty());
    }

    #[test]
    fn a_missing_directory_is_an_empty_device() {
        let tmp = tempfile::tempdir().unwrap();
        let reading = read_device_dir(&tmp.path().join("nope"), |_| true).unwrap();
        assert_eq!(reading, DirReading::default());
    }

    #[test]
    fn probe_reports_each_device_with_free_memory() {
        let tmp = tempfile::tempdir().unwrap();
        let config = SimConfig {
            dir: tmp.path().to_path_buf(),
            devices: vec![
                SimDeviceConfig { name: "Sim 8G".into(), total_mib: Mib(8192) },
                SimDeviceConfig { name: "Sim 1G".into(), total_mib: Mib(1024) },
            ],
        };
        let mut probe = SimProbe::open(&config).unwrap();
        write(&tmp.path().join("0"), &std::process::id().to_string(), "1000");
        write(&tmp.path().join("1"), "desktop", "2000");
        let devices = probe.sample().unwrap();
        assert_eq!(devices.len(), 2);
        assert_eq!((devices[0].used_mib, devices[0].free_mib), (1000, 7192));
        assert_eq!(devices[0].processes[0].pid, std::process::id());
        // Over-subscribed: used is what was claimed, free never goes below zero.
        assert_eq!((devices[1].used_mib, devices[1].free_mib), (2000, 0));
    }
}
