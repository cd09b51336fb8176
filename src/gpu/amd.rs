//! The `amd` probe: amdgpu's Linux sysfs files under `/sys/class/drm/card*/device/`.
//!
//! sysfs gives totals, utilization and temperature but no per-process figures, so the device entry
//! says so instead of inventing numbers. The root is injectable (`[gpu.amd] sysfs_root`) so the
//! probe is tested against a fake tree.

use std::fs;
use std::path::{Path, PathBuf};

use super::{DeviceSnapshot, GpuPids, Probe, ProbeError, ProbeKind};

const BYTES_PER_MIB: u64 = 1 << 20;
const NO_PROCESSES: &str = "amdgpu sysfs does not report per-process VRAM";

/// One AMD card found under the root.
#[derive(Debug, Clone)]
struct Card {
    /// `ROOT/cardN/device`.
    device_dir: PathBuf,
    name: String,
}

/// The probe over a sysfs root.
pub struct AmdProbe {
    cards: Vec<Card>,
}

impl AmdProbe {
    /// Finds every `cardN` with `mem_info_vram_total`; fails if there is none.
    pub fn open(root: &Path) -> Result<AmdProbe, ProbeError> {
        let entries = fs::read_dir(root).map_err(|e| ProbeError(format!("cannot read {}: {e}", root.display())))?;
        let mut numbered: Vec<(u32, PathBuf)> = entries
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                // `card0` is a GPU; `card0-DP-1` is one of its connectors.
                let number: u32 = name.strip_prefix("card")?.parse().ok()?;
                Some((number, entry.path().join("device")))
            })
            .filter(|(_, device_dir)| device_dir.join("mem_info_vram_total").exists())
            .collect();
        numbered.sort();
        if numbered.is_empty() {
            return Err(ProbeError(format!("no amdgpu device with mem_info_vram_total under {}", root.display())));
        }
        let cards = numbered
            .into_iter()
            .map(|(number, device_dir)| {
                let name = card_name(&device_dir, number);
                Card { device_dir, name }
            })
            .collect();
        Ok(AmdProbe { cards })
    }
}

/// `product_name` where the driver provides it, else the PCI id, else the card number.
fn card_name(device_dir: &Path, number: u32) -> String {
    if let Some(name) = read_trimmed(&device_dir.join("product_name")).filter(|n| !n.is_empty()) {
        return name;
    }
    match read_trimmed(&device_dir.join("device")) {
        Some(id) => format!("AMD GPU {id} (card{number})"),
        None => format!("AMD GPU (card{number})"),
    }
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn read_u64(path: &Path) -> Result<u64, ProbeError> {
    let text = fs::read_to_string(path).map_err(|e| ProbeError(format!("cannot read {}: {e}", path.display())))?;
    text.trim()
        .parse()
        .map_err(|_| ProbeError(format!("{}: expected an integer, found {:?}", path.display(), text.trim())))
}

/// The first `hwmon*/temp1_input` (millidegrees Celsius), if any.
fn read_temperature(device_dir: &Path) -> Option<i32> {
    let mut hwmons: Vec<PathBuf> =
        fs::read_dir(device_dir.join("hwmon")).ok()?.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    hwmons.sort();
    hwmons.iter().find_map(|dir| {
        let millideg: i64 = read_trimmed(&dir.join("temp1_input"))?.parse().ok()?;
        i32::try_from(millideg / 1000).ok()
    })
}

impl Probe for AmdProbe {
    fn kind(&self) -> ProbeKind {
        ProbeKind::Amd
    }

    /// amdgpu sysfs never lists processes, so a release has no list to watch: it is complete
    /// once the process is stopped, and the memory it still holds is in the device's use, counted
    /// as foreign, until a reading shows it back. (Treating the missing list as unreadable would
    /// make every release wait its whole `release_timeout` for a list that never comes.)
    fn gpu_pids(&mut self) -> Result<GpuPids, ProbeError> {
        Ok(GpuPids::default())
    }

    fn sample(&mut self) -> Result<Vec<DeviceSnapshot>, ProbeError> {
        // Each card on its own: one whose files fail is reported failed, the others read.
        Ok(self
            .cards
            .iter()
            .enumerate()
            .map(|(index, card)| {
                read_card(index as u32, card).unwrap_or_else(|e| DeviceSnapshot::failed(index as u32, &card.name, e.0))
            })
            .collect())
    }
}

/// One reading of one card.
fn read_card(index: u32, card: &Card) -> Result<DeviceSnapshot, ProbeError> {
    let total_mib = read_u64(&card.device_dir.join("mem_info_vram_total"))? / BYTES_PER_MIB;
    let used_mib = read_u64(&card.device_dir.join("mem_info_vram_used"))? / BYTES_PER_MIB;
    let utilization_pct = read_trimmed(&card.device_dir.join("gpu_busy_percent")).and_then(|s| s.parse().ok());
    Ok(DeviceSnapshot {
        index,
        name: card.name.clone(),
        total_mib,
        used_mib,
        free_mib: total_mib.saturating_sub(used_mib),
        utilization_pct,
        temperature_c: read_temperature(&card.device_dir),
        processes: Vec::new(),
        processes_unavailable: Some(NO_PROCESSES.to_string()),
        named: Vec::new(),
        warnings: Vec::new(),
        failed: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// Builds `root/cardN/device/...` as amdgpu lays it out.
    fn fake_card(root: &Path, number: u32, total: u64, used: u64, extra: &[(&str, &str)]) -> PathBuf {
        let device = root.join(format!("card{number}")).join("device");
        fs::create_dir_all(&device).unwrap();
        fs::write(device.join("mem_info_vram_total"), format!("{total}\n")).unwrap();
        fs::write(device.join("mem_info_vram_used"), format!("{used}\n")).unwrap();
        for (name, text) in extra {
            let path = device.join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }
        device
    }

    #[test]
    fn reads_memory_utilization_and_temperature() {
        let root = tempfile::tempdir().unwrap();
        fake_card(
            root.path(),
            0,
            16 * GIB,
            4 * GIB,
            &[
                ("gpu_busy_percent", "37\n"),
                ("hwmon/hwmon3/temp1_input", "51000\n"),
                ("product_name", "Radeon RX 7800 XT\n"),
            ],
        );
        // A connector directory and a non-amdgpu card must be skipped.
        fs::create_dir_all(root.path().join("card0-DP-1")).unwrap();
        fs::create_dir_all(root.path().join("card1/device")).unwrap();
        let mut probe = AmdProbe::open(root.path()).unwrap();
        let devices = probe.sample().unwrap();
        assert_eq!(devices.len(), 1);
        let d = &devices[0];
        assert_eq!(d.name, "Radeon RX 7800 XT");
        assert_eq!((d.total_mib, d.used_mib, d.free_mib), (16384, 4096, 12288));
        assert_eq!(d.utilization_pct, Some(37));
        assert_eq!(d.temperature_c, Some(51));
        assert!(d.processes.is_empty());
        assert_eq!(d.processes_unavailable.as_deref(), Some(NO_PROCESSES));
    }

    #[test]
    fn cards_are_ordered_by_number_and_missing_extras_are_unknown() {
        let root = tempfile::tempdir().unwrap();
        fake_card(root.path(), 10, 8 * GIB, GIB, &[("device", "0x73bf\n")]);
        fake_card(root.path(), 2, 4 * GIB, 0, &[]);
        let mut probe = AmdProbe::open(root.path()).unwrap();
        let devices = probe.sample().unwrap();
        assert_eq!(devices.iter().map(|d| d.total_mib).collect::<Vec<_>>(), vec![4096, 8192]);
        assert_eq!(devices[0].name, "AMD GPU (card2)");
        assert_eq!(devices[1].name, "AMD GPU 0x73bf (card10)");
        assert_eq!(devices[1].index, 1);
        assert_eq!(devices[0].utilization_pct, None);
        assert_eq!(devices[0].temperature_c, None);
    }

    #[test]
    fn no_cards_is_an_error_naming_the_root() {
        let root = tempfile::tempdir().unwrap();
        let err = AmdProbe::open(root.path()).err().unwrap();
        assert!(err.0.contains(&root.path().display().to_string()), "{err}");
        let missing = AmdProbe::open(&root.path().join("absent")).err().unwrap();
        assert!(missing.0.contains("cannot read"), "{missing}");
    }

    #[test]
    fn a_garbled_file_fails_the_sample_with_its_path() {
        let root = tempfile::tempdir().unwrap();
        let device = fake_card(root.path(), 0, 8 * GIB, GIB, &[]);
        let mut probe = AmdProbe::open(root.path()).unwrap();
        fs::write(device.join("mem_info_vram_used"), "busy").unwrap();
        let devices = probe.sample().expect("the other cards are still read");
        let err = devices[0].failed.as_deref().expect("the card is reported failed");
        assert!(err.contains("mem_info_vram_used") && err.contains("busy"), "{err}");
    }
}
