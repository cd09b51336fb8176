//! The `none` probe: no GPU at all. vramgate still runs (status, events, later CPU-only models),
//! and status says why it is degraded.

use super::{DeviceSnapshot, Probe, ProbeError, ProbeKind};

/// A probe that reports no devices.
pub struct NoneProbe;

impl Probe for NoneProbe {
    fn kind(&self) -> ProbeKind {
        ProbeKind::None
    }

    fn sample(&mut self) -> Result<Vec<DeviceSnapshot>, ProbeError> {
        Ok(Vec::new())
    }
}
