//! What an Ollama's `/api/ps` says, and what vramgate makes of it: footprints, models loaded or
//! dropped behind its back, an Ollama that stopped answering or came back.

use std::time::Duration;

use super::model::{Failure, Phase, Placement, Reason};
use super::{Effects, Engine, StoreWrite};
use crate::arbiter::ArbiterError;
use crate::backend::ollama::{self, OllamaLoaded};
use crate::events::EventKind;

/// How often a reachable Ollama's `/api/ps` is read.
pub(crate) const OLLAMA_POLL: Duration = Duration::from_secs(1);

impl<E: Effects> Engine<E> {
    /// Whether another model on the same Ollama already holds the runner named `name` (two
    /// vramgate models with the same `ollama_model`, e.g. with different options).
    fn ollama_entry_held(&self, url: &str, name: &str, except: usize) -> bool {
        self.models.iter().enumerate().any(|(j, m)| {
            j != except
                && m.spec.ollama().is_some_and(|o| o.url == url && ollama::same_model(&o.model, name))
                && m.holds_memory()
        })
    }

    /// Takes an Ollama model that Ollama has loaded as ready (on the GPU if it holds GPU memory).
    fn adopt_ollama(&mut self, i: usize, vram_mib: u64) {
        let device = self.models[i].spec.device.or_else(|| self.seen.devices.first().map(|d| d.index));
        let now = self.now;
        let model = &mut self.models[i];
        model.generation += 1;
        model.placement = if vram_mib > 0 { Placement::Gpu } else { Placement::Cpu };
        model.device = device;
        model.current_mib = vram_mib;
        model.reserved_mib = 0;
        model.prefers_gpu = false;
        model.resident_since = now;
        model.used_once = true;
        model.gate.touch();
        let placement = model.placement;
        // Ready first, so that its gate carries its upstream.
        self.set_phase(i, Phase::Ready { draining: false }, Reason::Adopted, None);
        self.models[i].open_gate();
        self.fx.emit(EventKind::ModelPlaced {
            model: self.models[i].spec.id.clone(),
            placement: placement.as_str().into(),
            reason: "adopted".into(),
        });
        // Whoever waits for it (a queued load) is served now.
        self.answer_ready(i);
    }

    pub(super) fn on_ollama_ps(&mut self, url: &str, result: Result<Vec<OllamaLoaded>, String>) {
        let Some(server) = self.ollama.get_mut(url) else { return };
        let was = server.reachable;
        match result {
            Ok(loaded) => {
                server.reachable = Some(true);
                server.error = None;
                server.loaded = loaded.clone();
                if was == Some(false) {
                    self.fx.emit(EventKind::OllamaReachability { url: url.into(), reachable: true, error: None });
                }
                for i in 0..self.models.len() {
                    if self.models[i].spec.ollama().is_some_and(|o| o.url == url) {
                        self.judge_listing(i, url, &loaded);
                    }
                }
            }
            Err(error) => {
                server.reachable = Some(false);
                server.error = Some(error.clone());
                server.loaded.clear();
                if was != Some(false) {
                    tracing::warn!("{error}");
                    self.fx.emit(EventKind::OllamaReachability {
                        url: url.into(),
                        reachable: false,
                        error: Some(error.clone()),
                    });
                }
                for i in 0..self.models.len() {
                    let model = &self.models[i];
                    if model.spec.ollama().is_some_and(|o| o.url == url) {
                        self.mark_unreachable(i, &error);
                    }
                }
            }
        }
    }

    /// What one answer of its Ollama means for model `i`.
    fn judge_listing(&mut self, i: usize, url: &str, loaded: &[OllamaLoaded]) {
        let model = &self.models[i];
        let name = model.spec.ollama().map(|o| o.model.clone()).unwrap_or_default();
        let listed = loaded.iter().find(|m| ollama::same_model(&m.name, &name));
        // An answer may have been on its way while the model changed state (a load finished, a
        // release completed): only a settled model is judged by it.
        let settled = self.now.saturating_duration_since(model.changed_at) > 2 * OLLAMA_POLL;
        let held_by_another = self.ollama_entry_held(url, &name, i);
        if model.phase == Phase::Failed(Failure::OllamaUnreachable) {
            // Its Ollama answers again: it may load on the next demand, or it is still loaded
            // there (vramgate asked for keep_alive -1), and is adopted.
            let model = &mut self.models[i];
            model.note = None;
            model.failures = 0;
            model.cooldown_until = None;
            model.last_error = None;
            match listed {
                Some(entry) => self.adopt_ollama(i, entry.vram_mib),
                None => self.set_phase(i, Phase::Unloaded, Reason::OllamaBack, None),
            }
            return;
        }
        match (&model.phase, listed) {
            (Phase::Unloaded | Phase::Failed(_), Some(entry)) if settled && !held_by_another => {
                // Loaded with vramgate's name but not by vramgate now (a release that could not
                // reach Ollama, or a load by hand): it is this model, so it is counted and idles
                // out like one.
                self.adopt_ollama(i, entry.vram_mib);
            }
            (Phase::Ready { .. } | Phase::Loading, Some(entry)) => {
                let ready_on_gpu = matches!(model.phase, Phase::Ready { .. }) && model.placement == Placement::Gpu;
                let learned = entry.vram_mib > model.learned_mib.unwrap_or(0);
                let model = &mut self.models[i];
                model.current_mib = entry.vram_mib;
                if ready_on_gpu {
                    model.peak_mib = Some(model.peak_mib.unwrap_or(0).max(entry.vram_mib));
                }
                if ready_on_gpu && learned {
                    model.learned_mib = Some(entry.vram_mib);
                    let write =
                        StoreWrite::Footprint { model: model.spec.id.clone(), mib: entry.vram_mib, estimate_mib: None };
                    self.fx.persist(write);
                }
            }
            (Phase::Ready { .. }, None) if model.gate.in_use() == 0 && settled => {
                // Unloaded behind vramgate's back (or Ollama restarted).
                self.models[i].gate.close();
                self.models[i].current_mib = 0;
                self.set_phase(i, Phase::Unloaded, Reason::GoneFromOllama, None);
                self.models[i].device = None;
                let id = self.models[i].spec.id.clone();
                self.memory_released(&id);
                // Callers waiting behind a swap of it still want it: load it again for them.
                if !self.models[i].ready_waiters.is_empty() {
                    self.request_load(&id, None, false);
                }
            }
            _ => {}
        }
    }

    /// Its Ollama does not answer: a loaded model is failed (its memory no longer counted on)
    /// until it answers again.
    fn mark_unreachable(&mut self, i: usize, error: &str) {
        let model = &mut self.models[i];
        match model.phase {
            // Already marked; or its own request will fail and be handled there.
            Phase::Failed(Failure::OllamaUnreachable) | Phase::Loading | Phase::Unloading { .. } => return,
            _ => {}
        }
        let id = model.spec.id.clone();
        let message = format!("{error} (retrying with backoff)");
        model.note = Some(message.clone());
        model.last_error = Some(message.clone());
        model.gate.close();
        model.current_mib = 0;
        let already_failed = matches!(model.phase, Phase::Failed(_));
        let failure = ArbiterError::StartFailed { model: id.clone(), message: message.clone() };
        self.fail_ready_waiters(i, &failure);
        let unreachable = Phase::Failed(Failure::OllamaUnreachable);
        if already_failed {
            self.models[i].phase = unreachable;
        } else {
            self.set_phase(i, unreachable, Reason::OllamaUnreachable, Some(message));
        }
        self.models[i].device = None;
        self.memory_released(&id);
    }
}
