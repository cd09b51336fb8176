//! Whether a device's process ids are vramgate's own. In a container without the host's pid
//! namespace (`docker run` without `--pid=host`), the driver (NVML) reports host pids: they do
//! not exist in vramgate's `/proc`, or are other processes there, so attribution by pid would
//! count every model's memory as foreign on top of the model itself. A device whose listed pids
//! never exist here is detected from the readings alone, and its models are counted at their
//! size instead (as for a list that cannot be read).

use std::collections::{BTreeMap, BTreeSet};

use super::ProcTable;
use crate::status::DeviceStatus;

/// How many readings in a row must list processes holding memory, none of them here, before a
/// device is taken to report pids from another namespace. One is not enough: a process that
/// exits between the driver's list and the `/proc` read is missing for a moment.
pub(super) const READINGS_TO_DETECT: u32 = 2;

/// How many of the missing pids a message names.
const PIDS_SHOWN: usize = 5;

/// What the readings so far say about each device's pids.
#[derive(Debug, Default)]
pub(super) struct PidNamespaces {
    devices: BTreeMap<u32, DeviceWatch>,
}

#[derive(Debug, Default)]
struct DeviceWatch {
    /// Readings in a row whose processes holding memory were all missing here.
    streak: u32,
    /// Detected: the device's pids are not vramgate's.
    foreign: bool,
    /// Listed pids that existed here in some reading: missing later, they exited (the driver
    /// lists a pid until it has freed its memory), which says nothing about namespaces.
    seen_here: BTreeSet<u32>,
    /// The missing pids of the last reading that counted (for the messages).
    missing: Vec<u32>,
}

impl PidNamespaces {
    /// Takes one reading of `device` with the `/proc` facts about its pids; answers whether the
    /// device's pids are from another pid namespace (so its list cannot be attributed).
    pub(super) fn observe(&mut self, device: &DeviceStatus, procs: &ProcTable) -> bool {
        let watch = self.devices.entry(device.index).or_default();
        // A device that cannot be read, or whose list cannot, says nothing either way.
        if device.error.is_some() || device.processes_unavailable.is_some() {
            return watch.foreign;
        }
        // Processes holding memory. One without a figure is no evidence: WSLg lists its
        // compositor under a pid of another distribution, with no figure, on an ordinary host.
        let holding: Vec<u32> =
            device.processes.iter().filter(|p| p.used_mib.is_some_and(|mib| mib > 0)).map(|p| p.pid).collect();
        watch.seen_here.retain(|pid| device.processes.iter().any(|p| p.pid == *pid));
        let (missing, here): (Vec<u32>, Vec<u32>) = holding.iter().partition(|pid| procs.missing.contains(pid));
        watch.seen_here.extend(here.iter().copied());
        let never_here: Vec<u32> = missing.into_iter().filter(|pid| !watch.seen_here.contains(pid)).collect();
        if !here.is_empty() {
            // A listed pid is a process here: the namespaces match.
            *watch = DeviceWatch { seen_here: std::mem::take(&mut watch.seen_here), ..DeviceWatch::default() };
        } else if never_here.is_empty() {
            // Nothing listed, or only processes seen here before that have exited: the streak
            // breaks, what was detected stays until a listed pid is found here.
            watch.streak = 0;
        } else {
            watch.streak = watch.streak.saturating_add(1);
            if watch.streak >= READINGS_TO_DETECT {
                watch.foreign = true;
                watch.missing = never_here;
            }
        }
        watch.foreign
    }

    /// The devices detected as reporting another namespace's pids, each with some of those pids.
    pub(super) fn foreign_devices(&self) -> impl Iterator<Item = (u32, &[u32])> + '_ {
        self.devices
            .iter()
            .filter(|(_, w)| w.foreign)
            .map(|(index, w)| (*index, &w.missing[..w.missing.len().min(PIDS_SHOWN)]))
    }
}

/// The degraded reason for a device whose pids are not vramgate's.
pub(super) fn degraded_reason(device: u32, pids: &[u32]) -> String {
    format!(
        "GPU {device}: the driver lists processes ({}) that do not exist in vramgate's pid namespace: vramgate runs \
         in a container without the host's pids (run it with --pid=host); models on this GPU are counted at their \
         size, the rest of its use as foreign",
        pid_list(pids)
    )
}

/// The device warning for the same.
pub(super) fn device_warning(pids: &[u32]) -> String {
    format!(
        "pids {} are not in vramgate's pid namespace (a container without --pid=host): processes cannot be \
         attributed to models; models are counted at their declared or measured size and their footprints are \
         not measured",
        pid_list(pids)
    )
}

fn pid_list(pids: &[u32]) -> String {
    pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
}
