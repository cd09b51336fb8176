//! The plan's report: the JSON that `POST /vramgate/plan` answers and `vramgate plan --json`
//! prints, and the text a person reads (the verdict first, then a table per device).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::{Judgement, Verdict};

/// What `--measure` saw, step by step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// Each device's use before the plan changed anything.
    pub baseline: Vec<DeviceUse>,
    /// Each model of the set measured alone (models already loaded are measured where they are).
    pub models: Vec<ModelMeasurement>,
    /// Each device's use with the whole set loaded.
    pub together: Vec<DeviceUse>,
    /// Each device's highest use while every model of the set served a request at once.
    pub peak: Vec<DeviceUse>,
    /// What the plan loaded and unloaded again to put things back as they were.
    pub restored: Vec<String>,
    /// Set when the measurement stopped early (a load failed, the client went away): why.
    pub interrupted: Option<String>,
}

/// A device's use at one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceUse {
    /// The device index.
    pub device: u32,
    /// MiB in use.
    pub used_mib: u64,
}

/// One model measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMeasurement {
    /// The model id.
    pub id: String,
    /// Seconds from the load request to ready (null for a model that was already loaded).
    pub load_s: Option<f64>,
    /// What it used at rest, alone.
    pub alone_mib: Option<u64>,
    /// The most it used while serving its request beside the others.
    pub peak_mib: Option<u64>,
}

/// The whole answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanReport {
    /// `vramgate plan`'s exit status for the verdict (`verdict` is the judgement's).
    pub exit_code: i32,
    /// The set judged.
    pub models: Vec<String>,
    /// The placement and its numbers.
    #[serde(flatten)]
    pub judgement: Judgement,
    /// Present with `--measure`.
    pub measurement: Option<Measurement>,
}

impl PlanReport {
    /// A report for `judgement` of `models`.
    pub fn new(models: Vec<String>, mut judgement: Judgement, measurement: Option<Measurement>) -> PlanReport {
        // A measurement that stopped early proved nothing: whatever the known figures say, the
        // answer is no until a measurement runs through.
        if measurement.as_ref().is_some_and(|m| m.interrupted.is_some()) {
            judgement.verdict = Verdict::NoGo;
        }
        PlanReport { exit_code: judgement.verdict.exit_code(), models, judgement, measurement }
    }

    /// GO, MARGINAL or NO-GO.
    pub fn verdict(&self) -> Verdict {
        self.judgement.verdict
    }

    /// The text a person reads: the verdict and why first, then a table per device, then what
    /// would be evicted and what could be done.
    pub fn render(&self) -> String {
        let j = &self.judgement;
        let mut out = String::new();
        let set = self.models.join(", ");
        let stopped = self.measurement.as_ref().and_then(|m| m.interrupted.as_deref());
        let _ = match (self.verdict(), stopped) {
            (_, Some(why)) => writeln!(out, "NO-GO: the measurement of {set} stopped early: {why}"),
            (verdict, None) => self.headline(&mut out, verdict, &set),
        };
        if stopped.is_none() {
            for unplaced in &j.unplaced {
                let _ = writeln!(out, "  {}: {}", unplaced.id, unplaced.reason);
            }
        }
        self.tables(&mut out);
        // Padded columns leave trailing blanks on the last one.
        out.lines().map(str::trim_end).collect::<Vec<_>>().join("\n") + "\n"
    }

    fn headline(&self, out: &mut String, verdict: Verdict, set: &str) -> std::fmt::Result {
        let j = &self.judgement;
        match verdict {
            Verdict::Go => {
                writeln!(out, "GO: {set} fit together, with at least {}% of usable memory left free.", j.margin_pct)
            }
            Verdict::Marginal => writeln!(
                out,
                "MARGINAL: {set} fit together, but with less than {}% of usable memory left free.",
                j.margin_pct
            ),
            Verdict::NoGo => writeln!(out, "NO-GO: {set} do not fit together."),
        }
    }

    /// A table per device, then what would be evicted, what could be done, what was restored.
    fn tables(&self, out: &mut String) {
        let j = &self.judgement;
        let measured = self.measurement.as_ref();
        for device in &j.devices {
            let _ = writeln!(
                out,
                "\nGPU {}: {} MiB usable, {} MiB foreign, {} MiB leased",
                device.index, device.usable_mib, device.foreign_mib, device.leases_mib
            );
            if measured.is_some() {
                let _ = writeln!(
                    out,
                    "  {:<20} {:>9}  {:<10} {:>9} {:>9} {:>8}",
                    "model", "MiB", "source", "alone", "peak", "load"
                );
            } else {
                let _ = writeln!(out, "  {:<20} {:>9}  {:<10}", "model", "MiB", "source");
            }
            for model in &device.models {
                let source = format!("{:?}", model.source).to_lowercase();
                let loaded = if model.resident { "  (loaded)" } else { "" };
                let Some(m) = measured else {
                    let _ = writeln!(out, "  {:<20} {:>9}  {:<10}{loaded}", model.id, model.mib, source);
                    continue;
                };
                let m = m.models.iter().find(|x| x.id == model.id);
                let mib = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
                let load = m.and_then(|m| m.load_s).map_or_else(|| "-".to_string(), |s| format!("{s:.1}s"));
                let _ = writeln!(
                    out,
                    "  {:<20} {:>9}  {:<10} {:>9} {:>9} {:>8}{loaded}",
                    model.id,
                    model.mib,
                    source,
                    mib(m.and_then(|m| m.alone_mib)),
                    mib(m.and_then(|m| m.peak_mib)),
                    load,
                );
            }
            for (id, mib) in &device.others {
                let _ = writeln!(out, "  {:<20} {:>9}  {:<10}", id, mib, "stays");
            }
            let _ = writeln!(
                out,
                "  free after: {} MiB ({:.1}% of usable; margin {}%)",
                device.headroom_mib, device.headroom_pct, j.margin_pct
            );
            if let Some(m) = measured {
                let at = |uses: &[DeviceUse]| {
                    uses.iter()
                        .find(|u| u.device == device.index)
                        .map_or_else(|| "-".to_string(), |u| format!("{} MiB", u.used_mib))
                };
                let _ = writeln!(
                    out,
                    "  measured: {} before, {} with the set loaded, {} at the peak while all served",
                    at(&m.baseline),
                    at(&m.together),
                    at(&m.peak)
                );
            }
        }
        if !j.evictions.is_empty() {
            let _ = writeln!(out, "\nLoading the set would evict:");
            for e in &j.evictions {
                let _ = writeln!(out, "  {} (GPU {}, for {})", e.id, e.device, e.for_model);
            }
        }
        if !j.suggestions.is_empty() {
            let _ = writeln!(out, "\nWhat could be done:");
            for s in &j.suggestions {
                let _ = writeln!(out, "  - {s}");
            }
        }
        if let Some(m) = measured
            && !m.restored.is_empty()
        {
            let _ = writeln!(out, "\nRestored: unloaded {} again.", m.restored.join(", "));
        }
    }
}
