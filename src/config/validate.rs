//! The checks serde cannot express, each returning the offending key path and the message.

use std::collections::{BTreeMap, BTreeSet};

use super::errors::{Seg, key_path};
use super::{
    Backend, Config, DEFAULT_OLLAMA_URL, OnEvict, ProbeChoice, SAMPLE_INTERVAL_MAX, SAMPLE_INTERVAL_MIN,
    SIM_RELEASE_LAG_MAX, TOKEN_ENV, exposure_problem, token_is_usable,
};
use crate::units::Span;

impl Config {
    pub(super) fn validate_devices(&self, totals: &[u64]) -> Result<(), (Vec<Seg>, String)> {
        let usable: Vec<u64> = totals.iter().map(|t| t.saturating_sub(self.gpu.reserve_mib.0)).collect();
        for (id, model) in &self.models {
            let at = |field: &str| key_path(&["models", id, field]);
            if let Some(device) = model.device {
                let Some(&room) = usable.get(device as usize) else {
                    let known = if totals.is_empty() {
                        "there are no GPU devices".to_string()
                    } else {
                        format!("devices are 0..={}", totals.len() - 1)
                    };
                    return Err((at("device"), format!("device {device} does not exist ({known})")));
                };
                if let Some(vram) = model.vram
                    && vram.0 > room
                {
                    return Err((at("vram"), format!("{vram} does not fit on GPU {device}: {room} MiB usable")));
                }
            } else if let Some(vram) = model.vram
                && let Some(&room) = usable.iter().max()
                && vram.0 > room
            {
                return Err((at("vram"), format!("{vram} does not fit on any GPU: the largest has {room} MiB usable")));
            }
        }
        Ok(())
    }

    /// The checks serde cannot express. Returns the offending key and the message.
    pub(super) fn validate(&self) -> Result<(), (Vec<Seg>, String)> {
        if let Some(token) = &self.server.token
            && !token_is_usable(&token.0)
        {
            // A header value cannot carry it, so no client could ever authenticate.
            return Err((
                key_path(&["server", "token"]),
                format!("(or {TOKEN_ENV}) must be a non-empty string of visible ASCII characters (no spaces)"),
            ));
        }
        if let Some(message) = exposure_problem(&self.server) {
            return Err((key_path(&["server", "listen"]), message));
        }
        let gpu = &self.gpu;
        for (key, value) in
            [("warning_pct", gpu.warning_pct), ("critical_pct", gpu.critical_pct), ("emergency_pct", gpu.emergency_pct)]
        {
            if !(value > 0.0 && value <= 100.0) {
                return Err((
                    key_path(&["gpu", key]),
                    format!("must be a percentage above 0 and at most 100, found {value}"),
                ));
            }
        }
        if gpu.warning_pct >= gpu.critical_pct {
            return Err((
                key_path(&["gpu", "warning_pct"]),
                format!("must be below gpu.critical_pct ({}), found {}", gpu.critical_pct, gpu.warning_pct),
            ));
        }
        if gpu.critical_pct >= gpu.emergency_pct {
            return Err((
                key_path(&["gpu", "critical_pct"]),
                format!("must be below gpu.emergency_pct ({}), found {}", gpu.emergency_pct, gpu.critical_pct),
            ));
        }
        if !(SAMPLE_INTERVAL_MIN..=SAMPLE_INTERVAL_MAX).contains(&gpu.sample_interval.get()) {
            return Err((
                key_path(&["gpu", "sample_interval"]),
                format!(
                    "must be at least {} and at most {}, found {}",
                    Span(SAMPLE_INTERVAL_MIN),
                    Span(SAMPLE_INTERVAL_MAX),
                    gpu.sample_interval
                ),
            ));
        }
        if let Some(library) = &gpu.nvml.library
            && library.as_os_str().is_empty()
        {
            return Err((
                key_path(&["gpu", "nvml", "library"]),
                "must name the NVML library (a path such as /usr/lib/wsl/lib/libnvidia-ml.so.1), found an empty string; \
                 leave it out for the system's libnvidia-ml.so.1"
                    .into(),
            ));
        }
        if gpu.probe == ProbeChoice::Sim && gpu.sim.is_none() {
            return Err((
                key_path(&["gpu", "probe"]),
                "probe = \"sim\" needs a [gpu.sim] section with `dir` and `devices`".into(),
            ));
        }
        if let Some(sim) = &gpu.sim {
            if sim.devices.is_empty() {
                return Err((key_path(&["gpu", "sim", "devices"]), "needs at least one device".into()));
            }
            if sim.release_lag.get() > SIM_RELEASE_LAG_MAX {
                return Err((
                    key_path(&["gpu", "sim", "release_lag"]),
                    format!(
                        "must be at most {} (drivers return memory within about a second), found {}",
                        Span(SIM_RELEASE_LAG_MAX),
                        sim.release_lag
                    ),
                ));
            }
            for (index, device) in sim.devices.iter().enumerate() {
                let at = |field: &str| {
                    vec![
                        Seg::Key("gpu".into()),
                        Seg::Key("sim".into()),
                        Seg::Key("devices".into()),
                        Seg::Index(index),
                        Seg::Key(field.into()),
                    ]
                };
                if device.total_mib.0 == 0 {
                    return Err((at("total_mib"), "a device needs some memory, found 0".into()));
                }
                if device.total_mib <= gpu.reserve_mib {
                    return Err((
                        at("total_mib"),
                        format!(
                            "{} leaves nothing usable after gpu.reserve_mib ({})",
                            device.total_mib, gpu.reserve_mib
                        ),
                    ));
                }
                if device.name.trim().is_empty() {
                    return Err((at("name"), "must not be empty".into()));
                }
            }
        }
        if self.scheduler.max_queue == 0 {
            return Err((
                key_path(&["scheduler", "max_queue"]),
                "must be at least 1, found 0 (every request passes through the queue; to fail instead of \
                 waiting, send a `wait` of 0 or set queue_timeout)"
                    .into(),
            ));
        }
        for (key, value) in [
            ("max_waiters_per_model", self.scheduler.max_waiters_per_model),
            ("max_waiters", self.scheduler.max_waiters),
        ] {
            if value == 0 {
                return Err((
                    key_path(&["scheduler", key]),
                    "must be at least 1, found 0 (a request for a model that is not loaded waits for it)".into(),
                ));
            }
        }
        if self.scheduler.max_parallel_loads == 0 {
            return Err((key_path(&["scheduler", "max_parallel_loads"]), "must be at least 1, found 0".into()));
        }
        if self.proxy.max_body.0 == 0 {
            return Err((key_path(&["proxy", "max_body"]), "must be at least 1MiB".into()));
        }
        if self.defaults.ready_timeout.is_zero() {
            return Err((key_path(&["defaults", "ready_timeout"]), "must be longer than 0".into()));
        }
        self.validate_http_bounds()?;
        self.validate_models()
    }

    fn validate_models(&self) -> Result<(), (Vec<Seg>, String)> {
        // Every name a request may use, with the model that claimed it first.
        let mut names: BTreeMap<&str, &str> = self.models.keys().map(|id| (id.as_str(), id.as_str())).collect();
        for (id, model) in &self.models {
            let at = |field: &str| key_path(&["models", id, field]);
            if id.is_empty() || id.contains('/') || id.chars().any(char::is_whitespace) {
                return Err((
                    key_path(&["models", id]),
                    format!("model id {id:?} must be non-empty, without '/' or spaces"),
                ));
            }
            let misplaced = |keys: &[(&str, bool)]| {
                keys.iter()
                    .find(|(_, set)| *set)
                    .map(|(key, _)| (at(key), format!("does not apply to backend = \"{}\"", model.backend.as_str())))
            };
            match model.backend {
                Backend::Ollama => {
                    if let Some(error) = misplaced(&[
                        ("cmd", model.cmd.is_some()),
                        ("cpu_cmd", model.cpu_cmd.is_some()),
                        ("health", model.health.is_some()),
                        ("env", !model.env.is_empty()),
                        ("cwd", model.cwd.is_some()),
                        ("weights", model.weights.is_some()),
                        ("ack_timeout", model.ack_timeout.is_some()),
                    ]) {
                        return Err(error);
                    }
                    match model.ollama_model.as_deref() {
                        None => {
                            return Err((
                                key_path(&["models", id]),
                                "an ollama model needs `ollama_model`, e.g. ollama_model = \"llama3.2:3b\"".into(),
                            ));
                        }
                        Some(name) if name.trim().is_empty() => {
                            return Err((at("ollama_model"), "must not be empty".into()));
                        }
                        Some(_) => {}
                    }
                    if let Some(url) = &model.url
                        && (!url.starts_with("http://")
                            || url.parse::<axum::http::Uri>().map_or(true, |u| !matches!(u.path(), "" | "/")))
                    {
                        return Err((
                            at("url"),
                            format!(
                                "{url:?} must be Ollama's base URL, http:// without a path, like \"{DEFAULT_OLLAMA_URL}\""
                            ),
                        ));
                    }
                }
                Backend::External => {
                    if let Some(error) = misplaced(&[
                        ("cmd", model.cmd.is_some()),
                        ("cpu_cmd", model.cpu_cmd.is_some()),
                        ("health", model.health.is_some()),
                        ("env", !model.env.is_empty()),
                        ("cwd", model.cwd.is_some()),
                        ("weights", model.weights.is_some()),
                        ("warmup", model.warmup.is_some()),
                        ("ollama_model", model.ollama_model.is_some()),
                        ("url", model.url.is_some()),
                        ("options", !model.options.is_empty()),
                    ]) {
                        return Err(error);
                    }
                    if model.vram.is_none() {
                        return Err((
                            key_path(&["models", id]),
                            "an external model needs `vram`: vramgate reserves it before telling the app to place \
                             the model on the GPU"
                                .into(),
                        ));
                    }
                    if model.ack_timeout.is_some_and(|t| t.is_zero()) {
                        return Err((at("ack_timeout"), "must be longer than 0".into()));
                    }
                }
                Backend::Process => {
                    if let Some(error) = misplaced(&[
                        ("ollama_model", model.ollama_model.is_some()),
                        ("url", model.url.is_some()),
                        ("options", !model.options.is_empty()),
                        ("ack_timeout", model.ack_timeout.is_some()),
                    ]) {
                        return Err(error);
                    }
                    if let Some(cpu_cmd) = &model.cpu_cmd {
                        match cpu_cmd.argv() {
                            Err(e) => return Err((at("cpu_cmd"), e)),
                            Ok(argv) if argv.is_empty() || argv[0].is_empty() => {
                                return Err((at("cpu_cmd"), "is empty: name the program to run".into()));
                            }
                            Ok(_) => {}
                        }
                    } else if model.on_evict == OnEvict::Cpu {
                        return Err((
                            at("on_evict"),
                            "on_evict = \"cpu\" needs a CPU form: set cpu_cmd (e.g. llama-server with -ngl 0)".into(),
                        ));
                    }
                    let Some(cmd) = &model.cmd else {
                        return Err((
                            key_path(&["models", id]),
                            "a process model needs `cmd`, e.g. cmd = [\"llama-server\", \"--port\", \"${PORT}\"]"
                                .into(),
                        ));
                    };
                    match cmd.argv() {
                        Err(e) => return Err((at("cmd"), e)),
                        Ok(argv) if argv.is_empty() || argv[0].is_empty() => {
                            return Err((at("cmd"), "is empty: name the program to run".into()));
                        }
                        Ok(_) => {}
                    }
                }
            }
            if let Some(health) = &model.health
                && !(health == "none" || health.starts_with('/') || health.starts_with("http://"))
            {
                return Err((
                    at("health"),
                    format!("{health:?} must be a path like \"/health\", an http:// URL, or \"none\""),
                ));
            }
            if model.ready_timeout.is_some_and(|t| t.is_zero()) {
                return Err((at("ready_timeout"), "must be longer than 0".into()));
            }
            let mut own = BTreeSet::new();
            for (index, alias) in model.aliases.iter().enumerate() {
                let alias_at = vec![
                    Seg::Key("models".into()),
                    Seg::Key(id.clone()),
                    Seg::Key("aliases".into()),
                    Seg::Index(index),
                ];
                if alias.is_empty() || alias.contains('/') {
                    return Err((alias_at, format!("alias {alias:?} must be non-empty and without '/'")));
                }
                if !own.insert(alias.as_str()) {
                    return Err((alias_at, format!("alias {alias:?} is listed twice")));
                }
                if self.aliases.contains_key(alias) {
                    return Err((alias_at, format!("alias {alias:?} is also defined in [aliases]")));
                }
                if let Some(owner) = names.insert(alias.as_str(), id.as_str()) {
                    let what = if owner == alias {
                        "is the id of another model".to_string()
                    } else {
                        format!("is already an alias of model {owner:?}")
                    };
                    return Err((alias_at, format!("alias {alias:?} {what}")));
                }
            }
        }
        for (name, candidates) in &self.aliases {
            let at = key_path(&["aliases", name]);
            if self.models.contains_key(name) {
                return Err((at, format!("{name:?} is the id of a model; an alias needs a name of its own")));
            }
            if candidates.is_empty() {
                return Err((at, "lists no candidate models".into()));
            }
            for candidate in candidates {
                if !self.models.contains_key(candidate) {
                    let known: Vec<&str> = self.models.keys().map(String::as_str).collect();
                    return Err((at, format!("candidate {candidate:?} is not a model (models: {})", known.join(", "))));
                }
            }
        }
        self.validate_modes()
    }

    fn validate_modes(&self) -> Result<(), (Vec<Seg>, String)> {
        for (name, mode) in &self.modes {
            // Where each model is placed, to catch one listed twice.
            let mut placed: BTreeMap<&str, &str> = BTreeMap::new();
            for (list, ids) in [("gpu", &mode.gpu), ("load", &mode.load), ("cpu", &mode.cpu), ("unload", &mode.unload)]
            {
                for (index, id) in ids.iter().enumerate() {
                    let at = vec![
                        Seg::Key("modes".into()),
                        Seg::Key(name.clone()),
                        Seg::Key(list.into()),
                        Seg::Index(index),
                    ];
                    let Some(model) = self.models.get(id) else {
                        let known: Vec<&str> = self.models.keys().map(String::as_str).collect();
                        return Err((at, format!("{id:?} is not a model (models: {})", known.join(", "))));
                    };
                    let same = |a: &str, b: &str| a == b || (a == "gpu" && b == "load") || (a == "load" && b == "gpu");
                    if let Some(other) = placed.insert(id.as_str(), list)
                        && !same(other, list)
                    {
                        return Err((at, format!("{id:?} is also listed in `{other}` of this mode")));
                    }
                    if list == "cpu" && model.backend == Backend::Process && model.cpu_cmd.is_none() {
                        return Err((at, format!("{id:?} has no CPU form: set models.{id}.cpu_cmd")));
                    }
                }
            }
        }
        if let Some(initial) = &self.server.initial_mode
            && !self.modes.contains_key(initial)
        {
            let known: Vec<&str> = self.modes.keys().map(String::as_str).collect();
            let list = if known.is_empty() { "none defined".to_string() } else { known.join(", ") };
            return Err((
                key_path(&["server", "initial_mode"]),
                format!("{initial:?} is not a [modes] entry ({list})"),
            ));
        }
        Ok(())
    }
}

/// The longest `server.header_read_timeout` accepted (the server cannot arm a longer one).
const MAX_HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(24 * 60 * 60);

impl Config {
    /// The HTTP server's and the proxy's own bounds (`[server]`, `[proxy]`).
    fn validate_http_bounds(&self) -> Result<(), (Vec<Seg>, String)> {
        if self.server.max_connections == 0 {
            return Err((key_path(&["server", "max_connections"]), "must be at least 1, found 0".into()));
        }
        if self.server.header_read_timeout.get() > MAX_HEADER_READ_TIMEOUT {
            return Err((
                key_path(&["server", "header_read_timeout"]),
                format!(
                    "must be at most {} (or 0 for never), found {}",
                    Span(MAX_HEADER_READ_TIMEOUT),
                    self.server.header_read_timeout
                ),
            ));
        }
        for (index, origin) in self.server.cors_origins.iter().enumerate() {
            if let Some(problem) = super::cors_origin_problem(origin) {
                let mut path = key_path(&["server", "cors_origins"]);
                path.push(Seg::Index(index));
                return Err((path, problem));
            }
        }
        if let Some(max_buffered) = self.proxy.max_buffered
            && max_buffered.0 < self.proxy.max_body.0
        {
            return Err((
                key_path(&["proxy", "max_buffered"]),
                format!(
                    "must be at least proxy.max_body ({}), found {}: a body that size could never be read",
                    self.proxy.max_body, max_buffered
                ),
            ));
        }
        Ok(())
    }
}
