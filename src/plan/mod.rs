//! `vramgate plan`: will this set of models fit, together, beside what else uses the GPU?
//!
//! Pure: [`judge`] takes what the engine knows (the policy's view of each device, the residents,
//! the holds, each model's known footprint) and places the set the way admission would, one
//! model after another with [`policy::decide`], so the verdict names exactly the evictions a real
//! load of the set would make. The daemon gathers the inputs (`api/plan.rs`), and for
//! `--measure` replaces the known footprints by measured ones first.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::gguf::estimate::Estimate;
use crate::policy::{self, Decision, DeviceState, Hold, Millis, Request, Resident};

pub mod measure;
pub mod report;

/// Below this share of a device's usable memory left free, a plan that fits is MARGINAL: a
/// request's working memory, a fragmentation loss or a desktop that grows can tip it over.
pub const DEFAULT_MARGIN_PCT: f64 = 5.0;

/// Where a footprint figure comes from, most trusted first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Seen while it served (the plan's own measurement, or `peak_mib`).
    Peak,
    /// Measured at rest (`measured_mib`).
    Measured,
    /// Declared in the config (`vram`).
    Declared,
    /// Estimated from the GGUF header (`estimated_mib`).
    Estimated,
}

/// A footprint and where it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Footprint {
    /// MiB.
    pub mib: u64,
    /// Where the figure comes from.
    pub source: Source,
}

impl Footprint {
    /// The figure admission would use: the largest of the declared, measured and peak figures
    /// (the one that is largest names the source), else the estimate; `None` when nothing is
    /// known.
    pub fn known(
        declared: Option<u64>,
        measured: Option<u64>,
        peak: Option<u64>,
        estimated: Option<u64>,
    ) -> Option<Self> {
        let candidates = [(peak, Source::Peak), (measured, Source::Measured), (declared, Source::Declared)];
        let best = candidates
            .iter()
            .filter_map(|(mib, source)| Some(Footprint { mib: (*mib)?, source: *source }))
            .filter(|f| f.mib > 0)
            .max_by_key(|f| f.mib);
        best.or_else(|| estimated.filter(|mib| *mib > 0).map(|mib| Footprint { mib, source: Source::Estimated }))
    }
}

/// One model of the set, as the engine knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFacts {
    /// The model id.
    pub id: String,
    /// Its priority (what it may evict).
    pub priority: i32,
    /// The device its config pins it to.
    pub device: Option<u32>,
    /// What it is known to need.
    pub footprint: Option<Footprint>,
}

/// Everything [`judge`] reads.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// The policy's view of each device (usable, foreign).
    pub devices: Vec<DeviceState>,
    /// The models holding memory now.
    pub residents: Vec<Resident>,
    /// Leases holding memory now.
    pub holds: Vec<Hold>,
    /// The set to judge, in the order given.
    pub models: Vec<ModelFacts>,
    /// The engine's clock, for minimum residency.
    pub now: Millis,
}

/// GO, MARGINAL or NO-GO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Fits with at least the margin free on every device it uses.
    #[serde(rename = "GO")]
    Go,
    /// Fits, but with less than the margin free on some device.
    #[serde(rename = "MARGINAL")]
    Marginal,
    /// Does not fit together (or a footprint is unknown).
    #[serde(rename = "NO-GO")]
    NoGo,
}

impl Verdict {
    /// The exit status of `vramgate plan` (documented in docs/cli.md).
    pub fn exit_code(self) -> i32 {
        match self {
            Verdict::Go => 0,
            Verdict::Marginal => 3,
            Verdict::NoGo => 4,
        }
    }

    /// As printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Go => "GO",
            Verdict::Marginal => "MARGINAL",
            Verdict::NoGo => "NO-GO",
        }
    }
}

/// A model of the set and where it goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placed {
    /// The model id.
    pub id: String,
    /// MiB counted for it.
    pub mib: u64,
    /// Where the figure comes from.
    pub source: Source,
    /// Whether it is loaded there already.
    pub resident: bool,
}

/// One device after the set is placed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DevicePlan {
    /// The device index.
    pub index: u32,
    /// Total minus the reserve.
    pub usable_mib: u64,
    /// Use by processes vramgate does not manage (the desktop, other apps).
    pub foreign_mib: u64,
    /// Held by leases.
    pub leases_mib: u64,
    /// The set's models placed here.
    pub models: Vec<Placed>,
    /// Other models that stay loaded here, with what they hold.
    pub others: Vec<(String, u64)>,
    /// What stays free once the set is loaded.
    pub headroom_mib: u64,
    /// `headroom_mib` as a share of `usable_mib`.
    pub headroom_pct: f64,
}

/// A model that would be unloaded to make room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Eviction {
    /// The model unloaded.
    pub id: String,
    /// For which model of the set.
    pub for_model: String,
    /// The device.
    pub device: u32,
}

/// A model of the set that cannot be placed, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unplaced {
    /// The model id.
    pub id: String,
    /// Why, with the numbers.
    pub reason: String,
}

/// The outcome of [`judge`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Judgement {
    /// GO, MARGINAL or NO-GO.
    pub verdict: Verdict,
    /// The margin MARGINAL is judged against, in percent of usable memory.
    pub margin_pct: f64,
    /// Every device that hosts a model of the set, or all of them when none is placed.
    pub devices: Vec<DevicePlan>,
    /// What loading the set would unload, in order.
    pub evictions: Vec<Eviction>,
    /// The models that do not fit.
    pub unplaced: Vec<Unplaced>,
    /// What could be done instead.
    pub suggestions: Vec<String>,
}

/// Places `inputs.models` as admission would (highest priority first, then largest), evicting
/// what admission would evict for each, and judges the result against `margin_pct`.
/// `estimates` gives, for llama.cpp models, the footprint terms from which a context that fits
/// can be suggested.
pub fn judge(inputs: &Inputs, estimates: &HashMap<String, Estimate>, margin_pct: f64) -> Judgement {
    let in_set = |id: &str| inputs.models.iter().any(|m| m.id == id);
    // The set's models are placed afresh: those loaded now are taken out, then put back where
    // they are (a reload would be free to choose, but the user asks about this machine now).
    // Judged as if no request were in flight and every minimum residency had passed: admission
    // would wait for those and then evict, so a verdict must not turn on this moment's traffic.
    let mut residents: Vec<Resident> = inputs
        .residents
        .iter()
        .filter(|r| !in_set(&r.id))
        .map(|r| Resident { in_use: 0, min_residency: 0, ..r.clone() })
        .collect();
    let order = admission_order(&inputs.models);
    let mut placed: Vec<(u32, Placed)> = Vec::new();
    let mut evictions = Vec::new();
    let mut unplaced = Vec::new();
    let mut suggestions = Vec::new();
    for model in order {
        let Some(footprint) = model.footprint else {
            unplaced.push(Unplaced {
                id: model.id.clone(),
                reason:
                    "its footprint is unknown: declare `vram`, name its GGUF file (`weights`), or run with --measure"
                        .into(),
            });
            continue;
        };
        let now_at = inputs.residents.iter().find(|r| r.id == model.id).map(|r| r.device);
        let request = Request {
            requester: model.id.clone(),
            mib: footprint.mib,
            device: model.device.or(now_at),
            priority: model.priority,
            exclusive: false,
        };
        let decision = policy::decide(&inputs.devices, &residents, &inputs.holds, &request, inputs.now);
        let device = match decision {
            Decision::Admit { device } => device,
            Decision::Evict { device, victims } => {
                residents.retain(|r| !victims.contains(&r.id));
                evictions.extend(victims.into_iter().map(|id| Eviction { id, for_model: model.id.clone(), device }));
                device
            }
            Decision::Wait(shortfall) | Decision::NeverFits(shortfall) => {
                let reason = format!(
                    "needs {} MiB; GPU {} has {} MiB available ({} MiB usable, {} MiB foreign) and nothing more may be evicted for it",
                    footprint.mib,
                    shortfall.device,
                    shortfall.available_mib,
                    shortfall.usable_mib,
                    shortfall.foreign_mib
                );
                if let Some(context) = estimates.get(&model.id).and_then(|e| {
                    let evictable: u64 =
                        shortfall.holders.iter().filter(|h| h.kept_because.is_none()).map(|h| h.mib).sum();
                    let budget = shortfall.available_mib.saturating_add(evictable);
                    // The estimate's terms size the context; what the model was seen to need
                    // beyond its estimate comes off the budget.
                    let budget = budget.saturating_sub(footprint.mib.saturating_sub(e.total_mib()));
                    e.context_fitting(budget).filter(|fits| *fits < e.context)
                }) {
                    suggestions.push(format!(
                        "{}: -c {context} would fit (it is sized for {})",
                        model.id,
                        context_of(estimates, &model.id)
                    ));
                }
                unplaced.push(Unplaced { id: model.id.clone(), reason });
                continue;
            }
        };
        // Placed: it now holds its memory, and later models of the set may not evict it.
        residents.push(Resident {
            id: model.id.clone(),
            device,
            footprint_mib: footprint.mib,
            priority: i32::MAX,
            in_use: 1,
            pinned: true,
            ready: false,
            last_used: inputs.now,
            resident_since: inputs.now,
            min_residency: 0,
        });
        placed.push((
            device,
            Placed {
                id: model.id.clone(),
                mib: footprint.mib,
                source: footprint.source,
                resident: now_at == Some(device),
            },
        ));
    }
    let hosting: Vec<u32> = placed.iter().map(|(device, _)| *device).collect();
    let devices: Vec<DevicePlan> = inputs
        .devices
        .iter()
        .filter(|d| hosting.is_empty() || hosting.contains(&d.index))
        .map(|d| {
            let headroom_mib = policy::available_mib(d, &residents, &inputs.holds);
            let usable = d.usable_mib.max(1);
            DevicePlan {
                index: d.index,
                usable_mib: d.usable_mib,
                foreign_mib: d.foreign_mib,
                leases_mib: inputs.holds.iter().filter(|h| h.device == d.index).map(|h| h.mib).sum(),
                models: placed.iter().filter(|(device, _)| *device == d.index).map(|(_, p)| p.clone()).collect(),
                others: residents
                    .iter()
                    .filter(|r| r.device == d.index && !in_set(&r.id))
                    .map(|r| (r.id.clone(), r.footprint_mib))
                    .collect(),
                headroom_mib,
                headroom_pct: headroom_mib as f64 * 100.0 / usable as f64,
            }
        })
        .collect();
    let tight: Vec<&DevicePlan> =
        devices.iter().filter(|d| !d.models.is_empty() && d.headroom_pct < margin_pct).collect();
    let verdict = if !unplaced.is_empty() {
        Verdict::NoGo
    } else if !tight.is_empty() {
        Verdict::Marginal
    } else {
        Verdict::Go
    };
    if verdict == Verdict::Marginal {
        for device in &tight {
            let margin_mib = (device.usable_mib as f64 * margin_pct / 100.0).ceil() as u64;
            let short = margin_mib.saturating_sub(device.headroom_mib);
            for model in device.models.iter().filter(|m| estimates.contains_key(&m.id)) {
                let fits = estimates.get(&model.id).and_then(|e| {
                    // The estimate less what is missing (and less what the model was seen to
                    // need beyond its estimate): a context that fits is a smaller one.
                    let excess = model.mib.saturating_sub(e.total_mib());
                    let budget = e.total_mib().saturating_sub(short).saturating_sub(excess);
                    e.context_fitting(budget).filter(|fits| *fits < e.context)
                });
                if let Some(context) = fits {
                    suggestions.push(format!(
                        "{}: -c {context} would leave the {margin_pct}% margin free on GPU {} (it is sized for {})",
                        model.id,
                        device.index,
                        context_of(estimates, &model.id)
                    ));
                }
            }
        }
    }
    if verdict == Verdict::NoGo && suggestions.is_empty() {
        suggestions.push(
            "load them in turns: give the models that must stay loaded a higher priority (the others are evicted for them on \
             demand), or put them in separate [modes]"
                .into(),
        );
    }
    if verdict == Verdict::Marginal && suggestions.is_empty() {
        for device in &tight {
            suggestions.push(format!(
                "GPU {}: free memory used outside vramgate ({} MiB now), or shrink a model (a smaller context or quantization)",
                device.index, device.foreign_mib
            ));
        }
    }
    Judgement { verdict, margin_pct, devices, evictions, unplaced, suggestions }
}

/// The set in the order admission would take it: highest priority first, then largest (what
/// both the verdict and `--measure` load in).
pub fn admission_order(models: &[ModelFacts]) -> Vec<&ModelFacts> {
    let mut order: Vec<&ModelFacts> = models.iter().collect();
    order.sort_by(|a, b| {
        let size = |m: &ModelFacts| m.footprint.map_or(0, |f| f.mib);
        b.priority.cmp(&a.priority).then(size(b).cmp(&size(a)))
    });
    order
}

fn context_of(estimates: &HashMap<String, Estimate>, id: &str) -> u64 {
    estimates.get(id).map_or(0, |e| e.context)
}

#[cfg(test)]
mod tests;
