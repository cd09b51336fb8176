//! Daemons on a simulated device of a fixed size, sampled every 50 ms, without a reserve: the
//! `start` of most end-to-end test files, each of which imports one of these as `start`.

use std::path::Path;

use super::{Daemon, sim_config};

/// A 10000 MiB sim device (no reserve) sampled every 50 ms, with `scheduler` (a `[scheduler]`
/// section, or nothing) and the given models.
pub fn on_10000_mib(models: impl Fn(&Path) -> String, scheduler: &str) -> Daemon {
    Daemon::start(|sim| format!("{}{scheduler}\n{}", sim_config(sim, 10000, "50ms", "reserve_mib = 0"), models(sim)))
}

/// An 8000 MiB sim device without reserve, plus `rest`.
pub fn on_8000_mib(rest: impl Fn(&Path) -> String) -> Daemon {
    Daemon::start(|sim| format!("{}{}", sim_config(sim, 8000, "50ms", "reserve_mib = 0"), rest(sim)))
}
