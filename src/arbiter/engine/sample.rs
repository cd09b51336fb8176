//! A new GPU reading: which process is whose (models, lease holders' jobs, apps), footprints
//! learned, and pressure relief.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::model::{Placement, Reason};
use super::{Effects, Engine, ProcTable, StoreWrite};
use crate::config::Backend;
use crate::gpu::Level;
use crate::monitor::GpuView;
use crate::policy;

impl<E: Effects> Engine<E> {
    /// Attributes the reading's processes to models, learns footprints, relieves pressure.
    pub(super) fn on_sample(&mut self, view: Arc<GpuView>, procs: ProcTable) {
        self.seen = view.clone();
        // Servers vramgate spawned (each under a keeper that leads its process group) and the
        // processes of apps holding external models; one app may hold several models.
        let mut servers: HashMap<u32, usize> = HashMap::new();
        let mut apps: HashMap<u32, Vec<usize>> = HashMap::new();
        for (i, model) in self.models.iter().enumerate() {
            // A CPU form's processes are not the model's GPU footprint: what they use anyway
            // counts as foreign.
            if model.placement == Placement::Cpu {
                continue;
            }
            if let Some(process) = &model.process {
                servers.insert(process.pid, i);
                // Its group, led by its keeper: the workers a wrapper starts are in it.
                servers.insert(process.group, i);
            }
            if let Some(pid) = model.attachment.as_ref().and_then(|a| a.pid).or(model.oneshot.flatten())
                && model.on_gpu()
            {
                apps.entry(pid).or_default().push(i);
            }
        }
        let mut process_models = HashMap::new();
        let mut usage: HashMap<usize, u64> = HashMap::new();
        let mut holder_usage: HashMap<(u32, u32), u64> = HashMap::new();
        let mut app_pids: HashMap<u32, Vec<String>> = HashMap::new();
        // Processes of a model whose memory the driver does not report (NVML's "not available"),
        // by (device, model): the model is counted at its size instead, once.
        let mut unmeasured: BTreeMap<(u32, usize), Vec<u32>> = BTreeMap::new();
        for device in &view.devices {
            // A list whose pids are not vramgate's (a container without the host's pid
            // namespace) cannot be attributed: what it lists is foreign, and the models placed
            // here are counted at their size, as for a list that cannot be read.
            let other_namespace = self.namespaces.observe(device, &procs);
            // A list the probe could not read (NVML refused it, amdgpu has none) is not an empty
            // one: the models placed here that have processes are counted at their size.
            if device.processes_unavailable.is_some() || other_namespace {
                for (i, model) in self.models.iter().enumerate() {
                    let has_processes = servers.values().any(|&s| s == i) || apps.values().any(|m| m.contains(&i));
                    if has_processes && model.device == Some(device.index) {
                        unmeasured.entry((device.index, i)).or_default();
                    }
                }
            }
            if other_namespace {
                continue;
            }
            let holders: BTreeSet<u32> = self
                .leases
                .values()
                .filter(|l| l.model.is_none() && l.device == Some(device.index))
                .filter_map(|l| l.pid)
                .collect();
            for p in &device.processes {
                if let Some(models) = apps.get(&p.pid)
                    && p.used_mib.is_none()
                {
                    // Only a model placed on this device stands for the process's memory here:
                    // elsewhere (an app's context on another GPU) the memory stays foreign.
                    for &i in models.iter().filter(|&&i| self.models[i].device == Some(device.index)) {
                        unmeasured.entry((device.index, i)).or_default().push(p.pid);
                    }
                    process_models.insert(p.pid, self.models[models[0]].spec.id.clone());
                    app_pids.insert(p.pid, models.iter().map(|&i| self.models[i].spec.id.clone()).collect());
                    continue;
                }
                let figure = p.used_mib.unwrap_or(0);
                if let Some(models) = apps.get(&p.pid) {
                    // Shared by its models in proportion to what they declare, so the process
                    // is counted once.
                    let declared: Vec<u64> =
                        models.iter().map(|&i| self.models[i].spec.declared_mib.unwrap_or(1).max(1)).collect();
                    let total: u64 = declared.iter().fold(0u64, |sum, d| sum.saturating_add(*d)).max(1);
                    for (&i, share) in models.iter().zip(declared) {
                        let part = u64::try_from(u128::from(figure) * u128::from(share) / u128::from(total))
                            .unwrap_or(u64::MAX);
                        let used = usage.entry(i).or_default();
                        *used = used.saturating_add(part);
                    }
                    process_models.insert(p.pid, self.models[models[0]].spec.id.clone());
                    app_pids.insert(p.pid, models.iter().map(|&i| self.models[i].spec.id.clone()).collect());
                    continue;
                }
                // A worker of a model's server: in the group its keeper leads, or below the
                // keeper or the server (a worker that left the group with setsid). Only for
                // servers vramgate spawned; an app's own jobs are not its model.
                let server = servers
                    .get(&p.pid)
                    .copied()
                    .or_else(|| servers.get(&procs.group(p.pid)?).copied())
                    .or_else(|| procs.lineage(p.pid).find_map(|pid| servers.get(&pid).copied()));
                if let Some(i) = server {
                    process_models.insert(p.pid, self.models[i].spec.id.clone());
                    self.models[i].gpu_pids.insert(p.pid);
                    self.models[i].gpu_devices.insert(device.index);
                    if p.used_mib.is_none() {
                        if self.models[i].device == Some(device.index) {
                            unmeasured.entry((device.index, i)).or_default().push(p.pid);
                        }
                        continue;
                    }
                    let used = usage.entry(i).or_default();
                    *used = used.saturating_add(figure);
                } else if let Some(holder) = procs.lineage(p.pid).find(|pid| holders.contains(pid)) {
                    // Without a figure the job's use stays foreign on top of the hold (safe).
                    let used = holder_usage.entry((holder, device.index)).or_default();
                    *used = used.saturating_add(figure);
                }
            }
        }
        // A model with a process the driver gives no figure for is counted at its size (declared,
        // else measured, else what it reserved to load), once, whatever it measurably uses
        // besides: the rest of the figure-less process's memory is in the device's use, and
        // attributing the model's size to that process keeps it from being counted again as
        // foreign. Its footprint is not learned from such a reading.
        let mut assumed: HashMap<(u32, u32), u64> = HashMap::new();
        let mut blind: HashMap<u32, Vec<(String, u64)>> = HashMap::new();
        let mut unmeasured_models = BTreeSet::new();
        for ((device, i), pids) in unmeasured {
            let model = &self.models[i];
            // Only a ready model's memory is all there: a loading one has used part of its
            // reservation so far (its reservation counts on its own meanwhile), so assuming its
            // size would hide the rest of the device's use; its processes count as foreign.
            if !matches!(model.phase, super::Phase::Ready { .. }) {
                continue;
            }
            let size = model.footprint().max(model.reserved_mib);
            let known = usage.get(&i).copied().unwrap_or(0);
            if pids.is_empty() {
                // No process to hang it on (the list was unreadable): counted on the device.
                blind.entry(device).or_default().push((model.spec.id.clone(), size.saturating_sub(known)));
            }
            let mut first = true;
            for pid in pids {
                let share = if first { size.saturating_sub(known) } else { 0 };
                first = false;
                let entry = assumed.entry((device, pid)).or_default();
                *entry = entry.saturating_add(share);
            }
            usage.insert(i, known.max(size));
            unmeasured_models.insert(i);
        }
        self.assumed_mib = assumed;
        self.blind_mib = blind;
        self.process_models = process_models;
        self.holder_usage = holder_usage;
        self.app_pids = app_pids;
        for i in 0..self.models.len() {
            let used = usage.get(&i).copied().unwrap_or(0);
            let model = &mut self.models[i];
            // Ollama models are measured from `/api/ps`.
            if !model.on_gpu() || model.spec.kind() == Backend::Ollama {
                continue;
            }
            model.current_mib = used;
            if matches!(model.phase, super::Phase::Ready { .. }) && !unmeasured_models.contains(&i) {
                model.peak_mib = Some(model.peak_mib.unwrap_or(0).max(used));
            }
            // An app's process may hold more than the model: its use is not learned as the
            // model's footprint; nor is a size assumed for want of a figure.
            if matches!(model.phase, super::Phase::Ready { .. })
                && !unmeasured_models.contains(&i)
                && model.spec.kind() == Backend::Process
                && (used > model.learned_mib.unwrap_or(0) || (model.learned_scaled && used > 0))
            {
                model.learned_mib = Some(used);
                model.learned_scaled = false;
                let write = StoreWrite::Footprint {
                    model: model.spec.id.clone(),
                    mib: used,
                    estimate_mib: model.estimated_mib,
                };
                self.fx.persist(write);
            }
        }
        self.relieve_pressure(&view);
    }

    /// At emergency, releases idle models one at a time, lowest priority first, until the level
    /// is below critical.
    fn relieve_pressure(&mut self, view: &GpuView) {
        for device in &view.devices {
            // A device that cannot be read shows its last good level: nothing to act on.
            if device.error.is_some() {
                self.pressure.remove(&device.index);
                continue;
            }
            if device.level == Level::Emergency {
                self.pressure.insert(device.index);
            } else if device.level < Level::Critical {
                self.pressure.remove(&device.index);
            }
        }
        for device in self.pressure.clone() {
            let releasing = self
                .models
                .iter()
                .any(|m| matches!(m.phase, super::Phase::Unloading { .. }) && m.device == Some(device));
            if releasing {
                continue;
            }
            let (_, residents, _) = self.policy_inputs();
            if let Some(victim) = policy::pressure_victim(device, &residents, self.millis(self.now))
                && let Ok(i) = self.index(&victim)
            {
                let _ = self.begin_unload(i, Reason::Pressure);
            }
        }
    }
}
