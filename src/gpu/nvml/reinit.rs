//! When the NVML probe re-initialises NVML: only for the errors a fresh NVML can cure, at once the
//! first time, then with a wait that doubles with each try, and that starts over only after the
//! devices have been healthy for a while (so a device that flaps does not make the probe
//! re-initialise NVML every few samples). Pure: time is an argument.

use std::time::{Duration, Instant};

use nvml_wrapper::error::NvmlError;

/// The wait after the first re-initialisation before another may follow while a device still
/// cannot be read. A GPU that fell off the bus may answer again only through a fresh NVML (its
/// handles are stale until then); but an init costs time (seconds on a machine without
/// persistence mode, inside a sample), so the wait doubles with each re-initialisation, up to
/// [`REINIT_MAX_WAIT`], and starts over after sustained health ([`HEALTHY_FOR`]).
pub const REINIT_FIRST_WAIT: Duration = Duration::from_secs(5);

/// The longest wait between re-initialisations while a device stays lost.
pub const REINIT_MAX_WAIT: Duration = Duration::from_secs(300);

/// How long every device must answer, without a failure a re-initialisation could cure, before
/// the wait starts over at [`REINIT_FIRST_WAIT`]...
pub const HEALTHY_FOR: Duration = Duration::from_secs(60);

/// ...and in at least this many samples in a row (a daemon whose sampling stalled has not seen
/// the devices healthy, however long ago its last failure was).
pub const HEALTHY_SAMPLES: u32 = 10;

/// Whether a fresh NVML can cure `error`: a GPU that fell off the bus (`GPU_IS_LOST`), an NVML
/// that lost its initialisation, a reset, or an error the driver does not explain. Anything else
/// (no permission, not supported, an invalid argument, not found) is the device's answer and
/// stays whatever NVML is re-initialised, so it never triggers one.
pub fn reinit_helps(error: &NvmlError) -> bool {
    matches!(error, NvmlError::GpuLost | NvmlError::Uninitialized | NvmlError::Unknown | NvmlError::ResetRequired)
}

/// The wait after `tries` re-initialisations since the devices were last healthy for
/// [`HEALTHY_FOR`]: [`REINIT_FIRST_WAIT`] doubled for each try after the first, at most
/// [`REINIT_MAX_WAIT`].
pub fn reinit_wait(tries: u32) -> Duration {
    REINIT_FIRST_WAIT.saturating_mul(1u32.checked_shl(tries.saturating_sub(1)).unwrap_or(u32::MAX)).min(REINIT_MAX_WAIT)
}

/// The probe's re-initialisation schedule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReinitBackoff {
    /// Re-initialisations since the devices were last healthy for long enough.
    tries: u32,
    /// When the last one was tried.
    last_try: Option<Instant>,
    /// The current run of healthy samples: since when, and how many.
    healthy: Option<(Instant, u32)>,
}

impl ReinitBackoff {
    /// Records one sample: `curable_failure` when a device failed with an error a
    /// re-initialisation could cure ([`reinit_helps`]). A run of healthy samples long enough in
    /// time and count resets the wait.
    pub fn observe(&mut self, curable_failure: bool, now: Instant) {
        if curable_failure {
            self.healthy = None;
            return;
        }
        let (since, samples) = self.healthy.get_or_insert((now, 0));
        *samples = samples.saturating_add(1);
        if *samples >= HEALTHY_SAMPLES && now.saturating_duration_since(*since) >= HEALTHY_FOR {
            self.tries = 0;
            self.last_try = None;
        }
    }

    /// Whether a re-initialisation may happen at `now`: none since the devices were last healthy
    /// for long enough, or the last one is [`reinit_wait`] old.
    pub fn due(&self, now: Instant) -> bool {
        self.last_try.is_none_or(|last| now.saturating_duration_since(last) >= reinit_wait(self.tries))
    }

    /// Records a re-initialisation tried at `now`.
    pub fn tried(&mut self, now: Instant) {
        self.last_try = Some(now);
        self.tries = self.tries.saturating_add(1);
        self.healthy = None;
    }

    /// How many re-initialisations since the devices were last healthy for long enough.
    pub fn tries(&self) -> u32 {
        self.tries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_errors_a_fresh_nvml_can_cure_reinitialise() {
        for curable in [NvmlError::GpuLost, NvmlError::Uninitialized, NvmlError::Unknown, NvmlError::ResetRequired] {
            assert!(reinit_helps(&curable), "{curable:?}");
        }
        for permanent in [
            NvmlError::NoPermission,
            NvmlError::NotSupported,
            NvmlError::InvalidArg,
            NvmlError::NotFound,
            NvmlError::InsufficientSize(None),
            NvmlError::UnexpectedVariant(25),
            NvmlError::FailedToLoadSymbol("nvmlDeviceGetMemoryInfo_v2".into()),
        ] {
            assert!(!reinit_helps(&permanent), "{permanent:?}");
        }
    }

    /// At once on the first failure, then after a wait that doubles with each try, up to the cap.
    #[test]
    fn reinit_is_bounded_and_backs_off() {
        assert_eq!(reinit_wait(1), REINIT_FIRST_WAIT);
        assert_eq!(reinit_wait(2), 2 * REINIT_FIRST_WAIT);
        assert_eq!(reinit_wait(3), 4 * REINIT_FIRST_WAIT);
        assert_eq!(reinit_wait(40), REINIT_MAX_WAIT, "capped, no overflow");
        assert_eq!(reinit_wait(u32::MAX), REINIT_MAX_WAIT);
        let start = Instant::now();
        let mut backoff = ReinitBackoff::default();
        assert!(backoff.due(start), "the first failure re-initialises at once");
        backoff.tried(start);
        assert!(!backoff.due(start + REINIT_FIRST_WAIT - Duration::from_millis(1)));
        assert!(backoff.due(start + REINIT_FIRST_WAIT));
        backoff.tried(start + REINIT_FIRST_WAIT);
        assert!(!backoff.due(start + 2 * REINIT_FIRST_WAIT), "the second wait is longer");
        assert!(backoff.due(start + 3 * REINIT_FIRST_WAIT));
        let mut later = ReinitBackoff::default();
        later.tried(start + Duration::from_secs(1));
        assert!(!later.due(start), "a clock that went back waits");
    }

    /// A device that comes back after each re-initialisation and fails again soon after (it
    /// flaps) does not reset the wait: each re-initialisation waits longer than the one before.
    /// Only a minute and ten samples of health in a row start it over.
    #[test]
    fn the_wait_starts_over_only_after_sustained_health() {
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut backoff = ReinitBackoff::default();
        backoff.observe(true, at(0));
        backoff.tried(at(0));
        // Healthy for a few samples, then lost again: the wait has grown, not started over.
        for s in 1..5 {
            backoff.observe(false, at(s));
        }
        backoff.observe(true, at(5));
        assert!(backoff.due(at(5)));
        backoff.tried(at(5));
        for s in 6..9 {
            backoff.observe(false, at(s));
        }
        backoff.observe(true, at(9));
        assert!(!backoff.due(at(9)), "flapping must not re-initialise every few samples");
        assert!(!backoff.due(at(14)), "the second wait is 10 s");
        assert!(backoff.due(at(15)));
        assert_eq!(backoff.tries(), 2);
        // A minute of health, but in fewer than ten samples (sampling stalled): not enough.
        let mut stalled = backoff.clone();
        stalled.observe(false, at(20));
        stalled.observe(false, at(90));
        assert_eq!(stalled.tries(), 2);
        // Ten samples, but within less than a minute: not enough either.
        for s in 20..59 {
            backoff.observe(false, at(s));
        }
        assert_eq!(backoff.tries(), 2, "under a minute of health");
        backoff.observe(false, at(80));
        assert_eq!(backoff.tries(), 0, "a minute and ten samples of health");
        assert!(backoff.due(at(80)), "the next failure re-initialises at once");
        backoff.tried(at(81));
        assert!(backoff.due(at(81) + REINIT_FIRST_WAIT), "and the wait is the first one again");
    }
}
