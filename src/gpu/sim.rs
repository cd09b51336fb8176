//! The simulated device (its file format is a public contract, documented in docs/configuration.md): tests, demos and CI have no GPU, so a directory of
//! small files plays one.
//!
//! A process claims VRAM on device N by writing an integer MiB into `DIR/N/<pid>`; it counts while
//! the pid lives, and for `release_lag` after (a real driver hands memory back some hundred
//! milliseconds after the process is gone, and NVML lists the pid until then). A file whose name
//! is not a number (`DIR/0/desktop`) is a named foreign consumer and always counts. The directory
//! is read on every sample, so a test changes the "GPU" by writing files.

use std::collections::HashMap;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{
    DeviceSnapshot, NamedUsage, Probe, ProbeError, ProbeKind, ProcessUsage, pid_is_alive, process_name_or_unknown,
};
use crate::config::SimConfig;
use crate::units::MAX_SIZE;

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
    /// One per device: the claims of departed pids still held back (see [`ReleaseLag`]).
    lags: Vec<ReleaseLag>,
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
        let lags = devices.iter().map(|_| ReleaseLag::new(config.release_lag.get())).collect();
        Ok(SimProbe { dir: config.dir.clone(), devices, lags })
    }
}

impl Probe for SimProbe {
    fn kind(&self) -> ProbeKind {
        ProbeKind::Sim
    }

    fn sample(&mut self) -> Result<Vec<DeviceSnapshot>, ProbeError> {
        let now = Instant::now();
        let readings = self
            .devices
            .iter()
            .zip(self.lags.iter_mut())
            .enumerate()
            .map(|(index, (device, lag))| {
                let dir = self.dir.join(index.to_string());
                // `.lost` plays a device that stopped answering (NVML's GPU_IS_LOST): only this
                // one fails; the others are read as usual.
                if let Some(reason) = read_marker(&dir.join(LOST)) {
                    return DeviceSnapshot::failed(index as u32, &device.name, format!("sim: GPU is lost ({reason})"));
                }
                match read_device_dir(&dir, pid_is_alive, now, lag) {
                    Ok(reading) => snapshot(index as u32, device, &dir, reading),
                    Err(e) => DeviceSnapshot::failed(index as u32, &device.name, e.0),
                }
            })
            .collect();
        Ok(readings)
    }
}

/// One device's snapshot from its directory's reading.
fn snapshot(index: u32, device: &SimDevice, dir: &Path, reading: DirReading) -> DeviceSnapshot {
    let used_mib = reading.used_mib();
    // `.unlisted` plays a driver that refuses the process list (NVML's NO_PERMISSION): the
    // memory is in use, who uses it is unknown.
    let (mut processes, processes_unavailable) = match read_marker(&dir.join(UNLISTED)) {
        Some(reason) => (Vec::new(), Some(format!("sim: process list unreadable ({reason})"))),
        None => (reading.processes, None),
    };
    // `.unmeasured` plays a driver that lists processes without their memory (NVML's "not
    // available" in containers and under WDDM): listed, counted in the device's use, no figure.
    // Their warning is written once per device and pid where status is assembled
    // (`monitor::figureless_warnings`), as for NVML.
    let warnings = reading.warnings;
    if read_marker(&dir.join(UNMEASURED)).is_some() {
        for process in &mut processes {
            process.used_mib = None;
        }
    }
    // `.foreign-namespace` plays vramgate in a container without the host's pid namespace: the
    // driver lists each process under its pid on the host, which does not exist here.
    if read_marker(&dir.join(FOREIGN_NAMESPACE)).is_some() {
        for process in &mut processes {
            process.pid = host_pid(process.pid);
            process.name = "unknown".into();
        }
    }
    DeviceSnapshot {
        index,
        name: device.name.clone(),
        total_mib: device.total_mib,
        used_mib,
        free_mib: device.total_mib.saturating_sub(used_mib),
        utilization_pct: None,
        temperature_c: None,
        processes,
        processes_unavailable,
        named: reading.named,
        warnings,
        failed: None,
    }
}

/// The marker file that makes a device list its processes without their memory while it exists.
pub const UNMEASURED: &str = ".unmeasured";

/// The marker file that makes a device fail its readings while it exists.
pub const LOST: &str = ".lost";

/// The marker file that makes a device's process list unreadable while it exists.
pub const UNLISTED: &str = ".unlisted";

/// The marker file that makes a device list its processes under pids from another pid
/// namespace while it exists.
pub const FOREIGN_NAMESPACE: &str = ".foreign-namespace";

/// The pid the sim device lists for `pid` under [`FOREIGN_NAMESPACE`]: above Linux's largest
/// possible pid (`PID_MAX_LIMIT`, 2^22), so it exists in no namespace here.
pub fn host_pid(pid: u32) -> u32 {
    pid.saturating_add(1 << 22)
}

/// A marker file's text (its reason), or a plain note when it is empty; `None` when it is absent.
fn read_marker(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let text: String = text.trim().chars().take(200).collect();
    Some(if text.is_empty() { format!("{} present", path.display()) } else { text })
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
        // Claims are bounded one by one (see `read_device_dir`); the sum saturates all the same.
        let by_pid = self.processes.iter().filter_map(|p| p.used_mib).fold(0, u64::saturating_add);
        let named = self.named.iter().map(|n| n.used_mib).fold(0, u64::saturating_add);
        by_pid.saturating_add(named)
    }
}

/// How long a device keeps the memory of a process that has gone, and since when it has seen
/// each departed pid gone. The lag is counted from the first sample that finds the pid dead (the
/// probe cannot know when it died), so the memory comes back `lag` after that sample.
#[derive(Debug, Default)]
pub(crate) struct ReleaseLag {
    lag: Duration,
    dead_since: HashMap<u32, Instant>,
}

impl ReleaseLag {
    pub(crate) fn new(lag: Duration) -> ReleaseLag {
        ReleaseLag { lag, dead_since: HashMap::new() }
    }

    /// Whether the claim of `pid`, found dead at `now`, still counts.
    fn still_held(&mut self, pid: u32, now: Instant) -> bool {
        if self.lag.is_zero() {
            return false;
        }
        let since = *self.dead_since.entry(pid).or_insert(now);
        if now.saturating_duration_since(since) < self.lag {
            return true;
        }
        self.dead_since.remove(&pid);
        false
    }
}

/// Reads one device directory at `now`. Files of dead pids count until `lag` has passed since
/// they were first found dead, then are ignored and deleted (best effort: another writer may race
/// us); a file with garbage is reported in `warnings` and counts as nothing. An empty file counts
/// as 0 without a warning, because `echo 500 > file` truncates before it writes and a sample can
/// land in between.
pub(crate) fn read_device_dir(
    dir: &Path,
    is_alive: impl Fn(u32) -> bool,
    now: Instant,
    lag: &mut ReleaseLag,
) -> Result<DirReading, ProbeError> {
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
    let mut found_dead = Vec::new();
    for (name, path) in names {
        let pid = name.parse::<u32>().ok();
        if let Some(pid) = pid
            && !is_alive(pid)
        {
            found_dead.push(pid);
            if !lag.still_held(pid, now) {
                let _ = fs::remove_file(&path);
                continue;
            }
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
            // No device holds more than MAX_SIZE: a larger claim is a mistake, and would make
            // every sum over the device's memory overflow.
            match trimmed.parse::<u64>() {
                Ok(v) if v <= MAX_SIZE.0 => v,
                _ => {
                    let shown: String = trimmed.chars().take(40).collect();
                    reading.warnings.push(format!(
                        "sim file {}: expected an integer number of MiB up to {MAX_SIZE}, found {shown:?}; ignored",
                        path.display()
                    ));
                    continue;
                }
            }
        };
        match pid {
            Some(pid) => reading.processes.push(ProcessUsage {
                pid,
                used_mib: Some(used_mib),
                name: process_name_or_unknown(pid),
            }),
            None => reading.named.push(NamedUsage { name, used_mib }),
        }
    }
    // A pid alive again (reused) or whose file is gone starts afresh if it ever dies (again).
    lag.dead_since.retain(|pid, _| found_dead.contains(pid));
    reading.processes.sort_by_key(|p| p.pid);
    Ok(reading)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SimDeviceConfig;
    use crate::units::{Mib, Span};

    fn write(dir: &Path, name: &str, text: &str) {
        fs::write(dir.join(name), text).expect("write sim file");
    }

    /// One reading without a release lag.
    fn read(dir: &Path, is_alive: impl Fn(u32) -> bool) -> Result<DirReading, ProbeError> {
        read_device_dir(dir, is_alive, Instant::now(), &mut ReleaseLag::default())
    }

    fn pids(reading: &DirReading) -> Vec<u32> {
        reading.processes.iter().map(|p| p.pid).collect()
    }

    #[test]
    fn a_departed_pid_keeps_its_memory_for_the_release_lag_then_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "100", "900");
        write(tmp.path(), "200", "300");
        let mut lag = ReleaseLag::new(Duration::from_millis(300));
        let start = Instant::now();
        let only_100_lives = |pid: u32| pid == 100;
        // Found dead now: still listed and counted, as NVML lists a pid until the driver frees it.
        let first = read_device_dir(tmp.path(), only_100_lives, start, &mut lag).unwrap();
        assert_eq!(pids(&first), vec![100, 200]);
        assert_eq!(first.used_mib(), 1200);
        let just_before =
            read_device_dir(tmp.path(), only_100_lives, start + Duration::from_millis(299), &mut lag).unwrap();
        assert_eq!(pids(&just_before), vec![100, 200]);
        assert!(tmp.path().join("200").exists());
        // The lag has passed since the first sample that found it dead: the memory is back.
        let after = read_device_dir(tmp.path(), only_100_lives, start + Duration::from_millis(300), &mut lag).unwrap();
        assert_eq!(pids(&after), vec![100]);
        assert_eq!(after.used_mib(), 900);
        assert!(!tmp.path().join("200").exists(), "a released pid's file is cleaned up");
        assert!(lag.dead_since.is_empty(), "nothing is remembered for a released pid");
    }

    #[test]
    fn the_release_lag_counts_from_the_first_sample_that_finds_the_pid_dead() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "200", "300");
        let mut lag = ReleaseLag::new(Duration::from_millis(300));
        let start = Instant::now();
        let alive = read_device_dir(tmp.path(), |_| true, start, &mut lag).unwrap();
        assert_eq!(pids(&alive), vec![200]);
        // Dies after a second of life: the lag starts now, not at the first sample.
        let died_at = start + Duration::from_secs(1);
        let dead = read_device_dir(tmp.path(), |_| false, died_at, &mut lag).unwrap();
        assert_eq!(pids(&dead), vec![200]);
        let later = read_device_dir(tmp.path(), |_| false, died_at + Duration::from_millis(200), &mut lag).unwrap();
        assert_eq!(later.used_mib(), 300);
        let gone = read_device_dir(tmp.path(), |_| false, died_at + Duration::from_millis(300), &mut lag).unwrap();
        assert_eq!(gone.used_mib(), 0);
    }

    #[test]
    fn a_pid_alive_again_or_a_vanished_file_starts_its_lag_afresh() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "200", "300");
        let mut lag = ReleaseLag::new(Duration::from_millis(300));
        let start = Instant::now();
        read_device_dir(tmp.path(), |_| false, start, &mut lag).unwrap();
        // The pid is reused by a new process before the lag ends; when that one dies, its memory
        // gets a whole lag of its own.
        read_device_dir(tmp.path(), |_| true, start + Duration::from_millis(100), &mut lag).unwrap();
        let redied = start + Duration::from_millis(400);
        let held = read_device_dir(tmp.path(), |_| false, redied, &mut lag).unwrap();
        assert_eq!(held.used_mib(), 300, "a new death, a new lag");
        // A file removed by its writer is forgotten.
        fs::remove_file(tmp.path().join("200")).unwrap();
        read_device_dir(tmp.path(), |_| false, redied + Duration::from_millis(10), &mut lag).unwrap();
        assert!(lag.dead_since.is_empty());
    }

    #[test]
    fn without_a_release_lag_a_dead_pid_is_dropped_at_the_first_sample() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "200", "300");
        let mut lag = ReleaseLag::new(Duration::ZERO);
        let reading = read_device_dir(tmp.path(), |_| false, Instant::now(), &mut lag).unwrap();
        assert_eq!(reading.used_mib(), 0);
        assert!(!tmp.path().join("200").exists());
        assert!(lag.dead_since.is_empty());
    }

    #[test]
    fn live_pids_and_named_files_count() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "100", "900\n");
        write(tmp.path(), "desktop", "1200");
        let reading = read(tmp.path(), |_| true).unwrap();
        assert_eq!(reading.processes.len(), 1);
        assert_eq!(reading.processes[0].pid, 100);
        assert_eq!(reading.processes[0].used_mib, Some(900));
        assert_eq!(reading.named, vec![NamedUsage { name: "desktop".into(), used_mib: 1200 }]);
        assert_eq!(reading.used_mib(), 2100);
        assert!(reading.warnings.is_empty());
    }

    #[test]
    fn dead_pid_is_ignored_and_its_file_removed() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "100", "900");
        write(tmp.path(), "200", "300");
        let reading = read(tmp.path(), |pid| pid == 200).unwrap();
        assert_eq!(reading.processes.iter().map(|p| p.pid).collect::<Vec<_>>(), vec![200]);
        assert_eq!(reading.used_mib(), 300);
        assert!(!tmp.path().join("100").exists(), "a dead pid's file is cleaned up");
    }

    #[test]
    fn named_files_count_whatever_pids_are_alive() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "desktop", "500");
        let reading = read(tmp.path(), |_| false).unwrap();
        assert_eq!(reading.used_mib(), 500);
    }

    #[test]
    fn garbage_is_reported_not_fatal() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "100", "lots of memory");
        write(tmp.path(), "desktop", "-5");
        write(tmp.path(), "game", "700");
        let reading = read(tmp.path(), |_| true).unwrap();
        assert_eq!(reading.used_mib(), 700);
        assert_eq!(reading.warnings.len(), 2, "{:?}", reading.warnings);
        assert!(reading.warnings.iter().any(|w| w.contains("lots of memory") && w.contains("100")));
        assert!(reading.warnings.iter().any(|w| w.contains("\"-5\"") && w.contains("desktop")));
    }

    #[test]
    fn claims_larger_than_any_device_are_ignored_and_sums_do_not_overflow() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "100", &u64::MAX.to_string());
        write(tmp.path(), "desktop", &(MAX_SIZE.0 + 1).to_string());
        write(tmp.path(), "game", &MAX_SIZE.0.to_string());
        write(tmp.path(), "other", &MAX_SIZE.0.to_string());
        let reading = read(tmp.path(), |_| true).unwrap();
        assert_eq!(reading.used_mib(), 2 * MAX_SIZE.0);
        assert_eq!(reading.warnings.len(), 2, "{:?}", reading.warnings);
        assert!(reading.warnings.iter().all(|w| w.contains("up to 16777216MiB")), "{:?}", reading.warnings);
        let saturating = DirReading {
            named: vec![
                NamedUsage { name: "a".into(), used_mib: u64::MAX },
                NamedUsage { name: "b".into(), used_mib: u64::MAX },
            ],
            ..DirReading::default()
        };
        assert_eq!(saturating.used_mib(), u64::MAX);
    }

    #[test]
    fn empty_files_and_hidden_files_count_as_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "desktop", "");
        write(tmp.path(), ".desktop.swp", "garbage");
        let reading = read(tmp.path(), |_| true).unwrap();
        assert_eq!(reading.used_mib(), 0);
        assert!(reading.warnings.is_empty());
    }

    #[test]
    fn a_missing_directory_is_an_empty_device() {
        let tmp = tempfile::tempdir().unwrap();
        let reading = read(&tmp.path().join("nope"), |_| true).unwrap();
        assert_eq!(reading, DirReading::default());
    }

    /// An 8 GiB and a 1 GiB device in `dir`, with no release lag.
    fn two_devices(dir: &Path) -> SimConfig {
        SimConfig {
            dir: dir.to_path_buf(),
            devices: vec![
                SimDeviceConfig { name: "Sim 8G".into(), total_mib: Mib(8192) },
                SimDeviceConfig { name: "Sim 1G".into(), total_mib: Mib(1024) },
            ],
            release_lag: Span::default(),
        }
    }

    #[test]
    fn probe_reports_each_device_with_free_memory() {
        let tmp = tempfile::tempdir().unwrap();
        let config = two_devices(tmp.path());
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

    #[test]
    fn the_probe_holds_a_departed_pid_for_its_configured_release_lag() {
        let tmp = tempfile::tempdir().unwrap();
        let config = SimConfig {
            dir: tmp.path().to_path_buf(),
            devices: vec![SimDeviceConfig { name: "Sim 8G".into(), total_mib: Mib(8192) }],
            // Far longer than this test runs: the claim must still count at the next sample.
            release_lag: Span(Duration::from_secs(3600)),
        };
        let mut probe = SimProbe::open(&config).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        write(&tmp.path().join("0"), &pid.to_string(), "1000");
        let devices = probe.sample().unwrap();
        assert_eq!(devices[0].used_mib, 1000);
        assert_eq!(devices[0].processes.iter().map(|p| p.pid).collect::<Vec<_>>(), vec![pid]);
        assert!(tmp.path().join("0").join(pid.to_string()).exists());
    }

    /// `.unlisted` plays a refused process list: the memory still counts, nobody is listed, and the
    /// release watch sees the device as unreadable rather than empty; `.unmeasured` lists processes
    /// without their figures.
    #[test]
    fn an_unlisted_device_counts_its_memory_but_lists_no_one() {
        let tmp = tempfile::tempdir().unwrap();
        let config = two_devices(tmp.path());
        let mut probe = SimProbe::open(&config).unwrap();
        let me = std::process::id();
        write(&tmp.path().join("0"), &me.to_string(), "1000");
        write(&tmp.path().join("1"), &me.to_string(), "10");
        write(&tmp.path().join("0"), UNLISTED, "NO_PERMISSION\n");
        write(&tmp.path().join("1"), UNMEASURED, "");
        let devices = probe.sample().unwrap();
        assert_eq!(devices[0].used_mib, 1000);
        assert!(devices[0].processes.is_empty());
        assert_eq!(devices[0].processes_unavailable.as_deref(), Some("sim: process list unreadable (NO_PERMISSION)"));
        assert_eq!((devices[1].used_mib, devices[1].processes[0].used_mib), (10, None), "listed, no figure");
        let lists = probe.gpu_pids().unwrap();
        assert_eq!(lists.pids, [me].into(), "device 1 is read");
        assert!(lists.unreadable[&0].contains("NO_PERMISSION"));
        fs::remove_file(tmp.path().join("0").join(UNLISTED)).unwrap();
        let lists = probe.gpu_pids().unwrap();
        assert!(lists.unreadable.is_empty());
        assert_eq!(probe.sample().unwrap()[0].processes.len(), 1);
    }

    /// `.lost` fails one device's reading; the others are read as usual, and it comes back when
    /// the marker goes.
    #[test]
    fn a_lost_device_fails_alone_and_comes_back() {
        let tmp = tempfile::tempdir().unwrap();
        let config = two_devices(tmp.path());
        let mut probe = SimProbe::open(&config).unwrap();
        write(&tmp.path().join("0"), "desktop", "700");
        write(&tmp.path().join("1"), LOST, "");
        let devices = probe.sample().expect("the sample as a whole works");
        assert_eq!((devices[0].used_mib, devices[0].failed.as_deref()), (700, None));
        assert_eq!(devices[1].name, "Sim 1G");
        assert!(devices[1].failed.as_deref().is_some_and(|f| f.starts_with("sim: GPU is lost")), "{devices:?}");
        assert!(probe.gpu_pids().unwrap().unreadable.contains_key(&1), "a lost device's list is unreadable");
        fs::remove_file(tmp.path().join("1").join(LOST)).unwrap();
        assert!(probe.sample().unwrap().iter().all(|d| d.failed.is_none()));
    }
}
