//! `vramgate plan --measure`: the plan done for real, then put back as it was.
//!
//! Unlike the rest of `plan`, this drives the daemon: it loads each model of the set alone
//! (measuring its load time and footprint), then all of them together, then sends each its
//! warmup request at the same time while the readings are watched for the peak, and finally
//! unloads every model it loaded. Models already loaded and leases are left alone and counted as
//! they are; the measurement stops (and says why) before any load that would evict anything,
//! never doing it. It stops at the first failure or when `cancel` fires (the client went away)
//! and restores what it changed either way; a measurement that stopped early gives NO-GO.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::report::{DeviceUse, Measurement, ModelMeasurement};
use super::{Footprint, Inputs, Source};
use crate::arbiter::{ArbiterHandle, ArbiterView};
use crate::config::Warmup;
use crate::monitor::GpuView;

/// How long a step waits for a reading that shows what it needs.
const READING_WAIT: Duration = Duration::from_secs(10);
/// How long the concurrent requests of the peak step may take.
const REQUEST_WAIT: Duration = Duration::from_secs(120);

/// What the measurement drives and reads.
pub struct Rig {
    /// The arbiter: loads, unloads, the status view.
    pub arbiter: ArbiterHandle,
    /// The monitor's readings.
    pub gpu: watch::Receiver<Arc<GpuView>>,
    /// Each model's warmup request, by id (the request of the peak step).
    pub warmups: HashMap<String, Warmup>,
    /// The monitor's sampler, made to sample every 20 ms while the plan measures.
    pub sampler: crate::monitor::Sampler,
}

/// Measures `set` and returns what it saw, with the measured footprints written into `inputs`
/// (as [`Source::Peak`]) for the verdict. Always restores what it loaded before returning.
pub async fn measure(rig: &Rig, inputs: &mut Inputs, cancel: &CancellationToken) -> Measurement {
    // Short peaks (a request's working memory) last less than a normal sample interval.
    let _fast = rig.sampler.fast();
    let mut measurement = Measurement { baseline: device_use(&rig.gpu.borrow()), ..Measurement::default() };
    let loaded_before: Vec<String> = resident_ids(&rig.arbiter.view());
    let mut loaded_by_us: Vec<String> = Vec::new();
    let outcome = run(rig, inputs, cancel, &loaded_before, &mut loaded_by_us, &mut measurement).await;
    if let Err(why) = outcome {
        measurement.interrupted = Some(why);
    }
    // Put things back: whatever this plan loaded is unloaded again, newest first.
    for id in loaded_by_us.iter().rev() {
        match rig.arbiter.unload(id).await {
            Ok(unloaded) if unloaded.was_loaded => measurement.restored.push(id.clone()),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(model = %id, "plan: cannot unload again: {e}");
                let note = format!("{id} could not be unloaded again: {e}");
                measurement.interrupted = Some(match measurement.interrupted.take() {
                    Some(why) => format!("{why}; {note}"),
                    None => note,
                });
            }
        }
    }
    measurement.restored.reverse();
    measurement
}

async fn run(
    rig: &Rig,
    inputs: &mut Inputs,
    cancel: &CancellationToken,
    loaded_before: &[String],
    loaded_by_us: &mut Vec<String>,
    measurement: &mut Measurement,
) -> Result<(), String> {
    // Admission's order (highest priority, then largest), the order the verdict placed them in.
    let set: Vec<String> = super::admission_order(&inputs.models).iter().map(|m| m.id.clone()).collect();
    let mut loaded_before = loaded_before.to_vec();
    // 1. Each model alone.
    for id in &set {
        check(cancel)?;
        // Loaded by someone else meanwhile: it is theirs, measured where it is and left alone.
        if !loaded_before.contains(id) && resident_ids(&rig.arbiter.view()).contains(id) {
            loaded_before.push(id.clone());
        }
        if loaded_before.contains(id) {
            let mib = model_mib(&rig.arbiter.view(), id);
            if let Some(mib) = mib {
                set_measured(inputs, id, mib);
            }
            measurement.models.push(ModelMeasurement { id: id.clone(), load_s: None, alone_mib: mib, peak_mib: None });
            continue;
        }
        if let Some(why) = would_disturb(rig, std::slice::from_ref(id)).await? {
            return Err(format!("{id} was not loaded: {why}"));
        }
        let started = Instant::now();
        loaded_by_us.push(id.clone());
        cancellable(cancel, rig.arbiter.load(id, true)).await?.map_err(|e| format!("loading {id} failed: {e}"))?;
        let load_s = started.elapsed().as_secs_f64();
        let mib = wait_measured(rig, id, cancel).await?;
        measurement.models.push(ModelMeasurement {
            id: id.clone(),
            load_s: Some(load_s),
            alone_mib: Some(mib),
            peak_mib: None,
        });
        set_measured(inputs, id, mib);
        cancellable(cancel, rig.arbiter.unload(id)).await?.map_err(|e| format!("unloading {id} failed: {e}"))?;
        loaded_by_us.retain(|loaded| loaded != id);
    }
    // 2. All of them together, one after another in admission's order, each only if loading it
    // evicts nothing at all (not a model outside the set, not one of the set already loaded).
    for id in &set {
        if loaded_before.contains(id) {
            continue;
        }
        check(cancel)?;
        if resident_ids(&rig.arbiter.view()).contains(id) {
            loaded_before.push(id.clone());
            continue;
        }
        if let Some(why) = would_disturb(rig, std::slice::from_ref(id)).await? {
            return Err(format!("the set was not loaded together: loading {id} now {why}"));
        }
        loaded_by_us.push(id.clone());
        cancellable(cancel, rig.arbiter.load(id, true)).await?.map_err(|e| format!("loading {id} failed: {e}"))?;
    }
    for id in &set {
        wait_measured(rig, id, cancel).await?;
    }
    let mut gpu = rig.gpu.clone();
    fresh_reading(&mut gpu, cancel).await?;
    measurement.together = device_use(&gpu.borrow());
    // 3. Every model serves its request at once; the readings are watched for the peak.
    let view = rig.arbiter.view();
    let http = reqwest::Client::new();
    let requests = set.iter().filter_map(|id| {
        let warmup = rig.warmups.get(id)?;
        let upstream = view.models.iter().find(|m| &m.id == id)?.upstream.clone()?;
        let url = format!("{upstream}{}", warmup.path);
        let request = http.post(url).json(&warmup.body).timeout(REQUEST_WAIT).send();
        let id = id.clone();
        Some(async move {
            match request.await {
                Ok(answer) if answer.status().is_success() => Ok(()),
                Ok(answer) => Err(format!("{id}'s warmup request was answered {}", answer.status())),
                Err(e) => Err(format!("{id}'s warmup request failed: {e}")),
            }
        })
    });
    let requests = futures_util::future::join_all(requests);
    let mut peak: HashMap<u32, u64> = measurement.together.iter().map(|u| (u.device, u.used_mib)).collect();
    tokio::pin!(requests);
    let answers = loop {
        tokio::select! {
            answers = &mut requests => break answers,
            changed = gpu.changed() => {
                if changed.is_err() {
                    return Err("the monitor stopped".into());
                }
                for used in device_use(&gpu.borrow()) {
                    let at = peak.entry(used.device).or_default();
                    *at = (*at).max(used.used_mib);
                }
            }
            () = cancel.cancelled() => return Err("cancelled".into()),
        }
    };
    if let Some(failed) = answers.into_iter().find_map(Result::err) {
        return Err(format!("while every model served at once, {failed}"));
    }
    // One more reading after the last answer, which may have held memory until then.
    fresh_reading(&mut gpu, cancel).await?;
    for used in device_use(&gpu.borrow()) {
        let at = peak.entry(used.device).or_default();
        *at = (*at).max(used.used_mib);
    }
    let mut peaks: Vec<DeviceUse> = peak.into_iter().map(|(device, used_mib)| DeviceUse { device, used_mib }).collect();
    peaks.sort_by_key(|u| u.device);
    measurement.peak = peaks;
    let view = rig.arbiter.view();
    for entry in &mut measurement.models {
        entry.peak_mib = view.models.iter().find(|m| m.id == entry.id).and_then(|m| m.peak_mib);
        if let Some(peak) = entry.peak_mib {
            let mib = entry.alone_mib.unwrap_or(0).max(peak);
            set_measured(inputs, &entry.id, mib);
        }
    }
    Ok(())
}

/// Why loading `ids` now would change something outside the set (an eviction, a set that does
/// not fit), from the plan's own judgement on the daemon's current state.
async fn would_disturb(rig: &Rig, ids: &[String]) -> Result<Option<String>, String> {
    let mut inputs = rig.arbiter.plan_inputs(ids).await.map_err(|e| e.to_string())?;
    // A model nothing is known of is admitted with everything free, which evicts nothing.
    for model in &mut inputs.models {
        model.footprint.get_or_insert(Footprint { mib: 0, source: Source::Estimated });
    }
    let judgement = super::judge(&inputs, &HashMap::new(), 0.0);
    if let Some(unplaced) = judgement.unplaced.first() {
        return Ok(Some(format!("{} does not fit: {}", unplaced.id, unplaced.reason)));
    }
    let evicted: Vec<&str> = judgement.evictions.iter().map(|e| e.id.as_str()).collect();
    Ok((!evicted.is_empty()).then(|| format!("it would evict {}", evicted.join(", "))))
}

/// Waits until the model's footprint has been read since it became ready; returns it.
async fn wait_measured(rig: &Rig, id: &str, cancel: &CancellationToken) -> Result<u64, String> {
    let mut view = rig.arbiter.subscribe();
    let deadline = tokio::time::Instant::now() + READING_WAIT;
    loop {
        let seen = view.borrow().models.iter().find(|m| m.id == id).and_then(|m| m.peak_mib.map(|p| p.max(m.vram_mib)));
        if let Some(mib) = seen {
            return Ok(mib);
        }
        tokio::select! {
            changed = tokio::time::timeout_at(deadline, view.changed()) => match changed {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err("the arbiter stopped".into()),
                Err(_) => return Err(format!("no reading measured {id} within {} s", READING_WAIT.as_secs())),
            },
            () = cancel.cancelled() => return Err("cancelled".into()),
        }
    }
}

/// Waits for the next reading.
async fn fresh_reading(gpu: &mut watch::Receiver<Arc<GpuView>>, cancel: &CancellationToken) -> Result<(), String> {
    gpu.mark_unchanged();
    tokio::select! {
        changed = tokio::time::timeout(READING_WAIT, gpu.changed()) => match changed {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err("the monitor stopped".into()),
            Err(_) => Err(format!("no new reading within {} s", READING_WAIT.as_secs())),
        },
        () = cancel.cancelled() => Err("cancelled".into()),
    }
}

async fn cancellable<T>(cancel: &CancellationToken, step: impl std::future::Future<Output = T>) -> Result<T, String> {
    tokio::select! {
        out = step => Ok(out),
        () = cancel.cancelled() => Err("cancelled".into()),
    }
}

fn check(cancel: &CancellationToken) -> Result<(), String> {
    if cancel.is_cancelled() { Err("cancelled".into()) } else { Ok(()) }
}

/// Records a measured footprint: the verdict is judged on it (a reading below what is declared
/// does not lower the figure admission uses).
fn set_measured(inputs: &mut Inputs, id: &str, mib: u64) {
    if let Some(model) = inputs.models.iter_mut().find(|m| m.id == id) {
        let known = model.footprint.filter(|f| f.source != Source::Estimated).map_or(0, |f| f.mib);
        model.footprint = Some(if known > mib {
            Footprint { mib: known, source: model.footprint.map_or(Source::Peak, |f| f.source) }
        } else {
            Footprint { mib, source: Source::Peak }
        });
    }
}

fn device_use(view: &GpuView) -> Vec<DeviceUse> {
    view.devices.iter().map(|d| DeviceUse { device: d.index, used_mib: d.used_mib }).collect()
}

fn resident_ids(view: &ArbiterView) -> Vec<String> {
    view.models.iter().filter(|m| m.state == "ready" || m.state == "loading").map(|m| m.id.clone()).collect()
}

/// What a model loaded before the plan uses on the GPU now: `None` for one on the CPU or not yet
/// measured (its known footprint stands).
fn model_mib(view: &ArbiterView, id: &str) -> Option<u64> {
    let model = view.models.iter().find(|m| m.id == id)?;
    if model.placement.as_deref() == Some("cpu") {
        return None;
    }
    Some(model.peak_mib.unwrap_or(0).max(model.vram_mib)).filter(|mib| *mib > 0)
}
