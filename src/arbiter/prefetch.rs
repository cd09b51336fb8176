//! Reading a model's weights file into the page cache while its load waits for a victim's memory
//! to come back, so that the release and the disk read overlap instead of following each other:
//! when the server starts, its reads (or its mmap) find the file in memory.
//!
//! Runs on the blocking pool (file I/O), reads no more than the file, in chunks, and stops at the
//! next chunk once its flag is set (the load was abandoned).

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// How much is read at a time between looks at the stop flag.
const CHUNK: usize = 8 << 20;

/// Reads `path` whole (asking the kernel to read ahead first), unless `stop` is set; logs what
/// it read. Errors (a file gone, no permission) are logged and end it: a prefetch is only ever
/// an optimisation.
pub(crate) fn read_ahead(model: &str, path: &Path, stop: &AtomicBool) {
    let started = Instant::now();
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) => {
            tracing::warn!(model, "cannot prefetch {}: {e}", path.display());
            return;
        }
    };
    // The kernel's own read-ahead for the whole file; the reads below make sure of it.
    let _ = nix::fcntl::posix_fadvise(&file, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED);
    let mut buffer = vec![0u8; CHUNK];
    let mut read: u64 = 0;
    loop {
        if stop.load(Ordering::Relaxed) {
            tracing::info!(
                model,
                "prefetch of {} stopped after {} MiB: the load was abandoned",
                path.display(),
                read >> 20
            );
            return;
        }
        match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => read = read.saturating_add(n as u64),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(model, "prefetch of {} failed after {} MiB: {e}", path.display(), read >> 20);
                return;
            }
        }
    }
    tracing::info!(
        model,
        "prefetched {} ({} MiB) in {} while the memory for it was released",
        path.display(),
        read >> 20,
        crate::units::Rounded(started.elapsed())
    );
}
