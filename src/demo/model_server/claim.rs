//! The demo model server's claim on the simulated device: the file `SIM_DIR/N/<pid>` holding the
//! MiB it "uses", kept in step with what it has loaded and what its requests in flight add.

use std::path::{Path, PathBuf};

use super::err;

/// The paths of this process's claim on the simulated device.
pub(super) struct ClaimFiles {
    pub(super) dir: PathBuf,
    pub(super) file: PathBuf,
    /// Written first and renamed over `file`, so the daemon never reads a half-written number;
    /// the leading dot makes the daemon skip it.
    pub(super) tmp: PathBuf,
}

/// What this process currently claims on the simulated device.
pub(super) struct Claim {
    pub(super) files: Option<ClaimFiles>,
    pub(super) base_mib: u64,
    pub(super) grow_mib: u64,
    pub(super) in_flight: u64,
    /// True once the weights are "loaded"; before, nothing is claimed.
    pub(super) active: bool,
}

impl Claim {
    pub(super) fn mib(&self) -> u64 {
        if self.active { self.base_mib.saturating_add(self.grow_mib.saturating_mul(self.in_flight)) } else { 0 }
    }

    /// Makes the claim file match the current claim: written when positive, removed at zero.
    /// Called with the claim locked, so concurrent requests never race on the shared tmp file.
    pub(super) fn sync(&self) {
        let Some(files) = &self.files else { return };
        let mib = self.mib();
        if mib == 0 {
            remove_claim_file(&files.file);
            return;
        }
        let written = std::fs::create_dir_all(&files.dir)
            .and_then(|()| std::fs::write(&files.tmp, mib.to_string()))
            .and_then(|()| std::fs::rename(&files.tmp, &files.file));
        if let Err(e) = written {
            err(&format!("fake-model: cannot write claim file {}: {e}", files.file.display()));
        }
    }
}

fn remove_claim_file(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => err(&format!("fake-model: cannot remove claim file {}: {e}", path.display())),
    }
}
