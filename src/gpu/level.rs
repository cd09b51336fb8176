//! Pressure levels computed from used/total, as seed 000's VRAMMonitor did (75 / 87.5 / 95 %).

use serde::{Deserialize, Serialize};

/// How full a device is. Ordered, so `level >= Level::Critical` reads as intended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Below `warning_pct`.
    Ok,
    /// At or above `warning_pct`, below `critical_pct`.
    Warning,
    /// At or above `critical_pct`, below `emergency_pct`.
    Critical,
    /// At or above `emergency_pct`: idle models are released until the level drops.
    Emergency,
}

impl Level {
    /// The lowercase name used in JSON, events and the table.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Critical => "critical",
            Level::Emergency => "emergency",
        }
    }

    /// The level as a number (0 = ok … 3 = emergency), for metrics and alert rules.
    pub fn as_number(self) -> u8 {
        self as u8
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The three boundaries, in percent of total memory. Validated by the config so that
/// `0 < warning < critical < emergency <= 100`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Start of `warning`.
    pub warning_pct: f64,
    /// Start of `critical`.
    pub critical_pct: f64,
    /// Start of `emergency`.
    pub emergency_pct: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds { warning_pct: 75.0, critical_pct: 87.5, emergency_pct: 95.0 }
    }
}

impl Thresholds {
    /// The level of a device using `used_mib` of `total_mib`. Each boundary belongs to the higher
    /// level (exactly 75 % is `warning`). Compared as `used * 100 >= pct * total` so that exact
    /// boundaries are not lost to a division's rounding. A device with no memory is `ok`.
    pub fn level(&self, used_mib: u64, total_mib: u64) -> Level {
        if total_mib == 0 {
            return Level::Ok;
        }
        let used_pct_scaled = used_mib as f64 * 100.0;
        let total = total_mib as f64;
        if used_pct_scaled >= self.emergency_pct * total {
            Level::Emergency
        } else if used_pct_scaled >= self.critical_pct * total {
            Level::Critical
        } else if used_pct_scaled >= self.warning_pct * total {
            Level::Warning
        } else {
            Level::Ok
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_boundary_belongs_to_the_higher_level() {
        let t = Thresholds::default();
        // Seed 000's 8 GiB card: 6144 = 75 %, 7168 = 87.5 %, 7782.4 = 95 %.
        assert_eq!(t.level(6143, 8192), Level::Ok);
        assert_eq!(t.level(6144, 8192), Level::Warning);
        assert_eq!(t.level(7167, 8192), Level::Warning);
        assert_eq!(t.level(7168, 8192), Level::Critical);
        assert_eq!(t.level(7782, 8192), Level::Critical);
        assert_eq!(t.level(7783, 8192), Level::Emergency);
        assert_eq!(t.level(8192, 8192), Level::Emergency);
    }

    #[test]
    fn exact_boundaries_on_a_round_device() {
        let t = Thresholds::default();
        assert_eq!(t.level(749, 1000), Level::Ok);
        assert_eq!(t.level(750, 1000), Level::Warning);
        assert_eq!(t.level(874, 1000), Level::Warning);
        assert_eq!(t.level(875, 1000), Level::Critical);
        assert_eq!(t.level(949, 1000), Level::Critical);
        assert_eq!(t.level(950, 1000), Level::Emergency);
    }

    #[test]
    fn seed_000_examples() {
        let t = Thresholds::default();
        assert_eq!(t.level(6500, 8192), Level::Warning);
        assert_eq!(t.level(7200, 8192), Level::Critical);
        assert_eq!(t.level(7900, 8192), Level::Emergency);
    }

    #[test]
    fn overfull_and_empty_devices() {
        let t = Thresholds::default();
        assert_eq!(t.level(9000, 8192), Level::Emergency);
        assert_eq!(t.level(0, 0), Level::Ok);
        assert_eq!(t.level(0, 8192), Level::Ok);
    }

    #[test]
    fn levels_order_and_number() {
        assert!(Level::Ok < Level::Warning && Level::Warning < Level::Critical);
        assert!(Level::Critical < Level::Emergency);
        assert_eq!(Level::Emergency.as_number(), 3);
        assert_eq!(serde_json::to_string(&Level::Critical).unwrap(), "\"critical\"");
    }
}
