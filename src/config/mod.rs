//! The configuration file: schema, defaults, and validation whose errors name the key and line.
//!
//! Parsing is serde over `toml` (unknown keys are errors: they are almost always typos). Checks
//! that serde cannot express (`warning_pct` below `critical_pct`, a sim device of 0 MiB) run
//! after, and find the offending key's line by walking the same text with `toml_edit`, which keeps
//! positions.
//!
//! Relative paths in a model's `cmd`, `cpu_cmd` and `cwd` are anchored to the config file, so a
//! config works whatever directory the daemon is started from: `cwd` is resolved against the
//! config file's directory, and a program path with a slash (`./server.sh`, `bin/server`) against
//! the model's `cwd` if it has one, else the config file's directory. A bare program name
//! (`llama-server`) is looked up on `PATH` when the model starts, as a shell would.
//!
//! The files, by job: this one holds `Config` and reading it (`load`, `parse`, the device and
//! exposure checks, warnings); `sections` the tables other than `[models]`; `models` a model as
//! written (`ModelConfig`) and as the daemon uses it (`ModelSpec`, whose `BackendSpec` carries
//! only its own backend's settings); `validate` the checks serde cannot express; `errors` the
//! error type, key paths, line lookup and typo suggestions.

mod errors;
mod models;
mod sections;
mod validate;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use errors::ConfigError;
use errors::{Seg, key_path, locate, render_path, with_suggestion};
pub use models::{
    Backend, BackendSpec, CommandLine, DEFAULT_ACK_TIMEOUT, DEFAULT_OLLAMA_URL, ExternalSpec, ModelConfig, ModelSpec,
    OllamaSpec, OnEvict, ProcessSpec, Warmup, find_program,
};
pub use sections::*;

/// The default address of the daemon and of the CLI's `--url`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9777";

/// The whole configuration. Every key is optional; an empty file is the defaults.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[server]`.
    pub server: ServerConfig,
    /// `[gpu]`.
    pub gpu: GpuConfig,
    /// `[scheduler]`.
    pub scheduler: SchedulerConfig,
    /// `[defaults]`: applied to every model that does not set its own value.
    pub defaults: DefaultsConfig,
    /// `[proxy]`: the OpenAI-compatible surface.
    pub proxy: ProxyConfig,
    /// `[models.NAME]`, by name.
    pub models: BTreeMap<String, ModelConfig>,
    /// `[aliases]`: a name with candidate models in preference order; a request for it gets the
    /// first that is ready, else the first that fits, else waits for the first.
    pub aliases: BTreeMap<String, Vec<String>>,
    /// `[modes.NAME]`: named desired states, applied with `vramgate mode NAME`.
    pub modes: BTreeMap<String, ModeConfig>,
    /// The text and file the config came from, kept so that checks that need the devices (which
    /// only the probe knows) can still point at the offending line.
    #[serde(skip)]
    source: Option<(Option<PathBuf>, SourceText)>,
    /// The config file's directory (absolute): what relative paths in models are resolved
    /// against. `None` for a config not read from a file (then they stay relative to the
    /// daemon's working directory).
    #[serde(skip)]
    base_dir: Option<PathBuf>,
}

/// A config file's text, kept for error positions. Its `Debug` form gives only the length: the
/// text may hold `server.token`.
#[derive(Clone, Default)]
struct SourceText(String);

impl fmt::Debug for SourceText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SourceText({} bytes)", self.0.len())
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, Box<ConfigError>> {
        let unreadable = |message: String, line: Option<usize>, column: Option<usize>| {
            Box::new(ConfigError {
                file: Some(path.to_path_buf()),
                key: None,
                line,
                column,
                message,
                source_line: None,
            })
        };
        let bytes =
            std::fs::read(path).map_err(|e| unreadable(format!("cannot read the config file: {e}"), None, None))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            // Place the first bad byte, as for any other error in the file. TOML is UTF-8 only.
            let bytes = e.as_bytes();
            let bad = e.utf8_error().valid_up_to();
            let before = &bytes[..bad];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |nl| nl + 1);
            // Characters, not bytes: what an editor's column shows (the line is valid up to here).
            let column = String::from_utf8_lossy(&before[line_start..]).chars().count() + 1;
            let byte = bytes.get(bad).map(|b| format!(" 0x{b:02X}")).unwrap_or_default();
            unreadable(
                format!(
                    "the config file is not valid UTF-8: byte{byte} cannot start or continue a character (TOML \
                     files are UTF-8; was it saved in another encoding?)"
                ),
                Some(line),
                Some(column),
            )
        })?;
        Config::parse(&text, Some(path))
    }

    /// Parses and validates config text; `file` labels errors and anchors relative paths (see
    /// the module docs).
    pub fn parse(text: &str, file: Option<&Path>) -> Result<Config, Box<ConfigError>> {
        Config::parse_with_token(text, file, token_from_env())
    }

    /// As [`Config::parse`], with the token from the environment given (so tests do not depend
    /// on the environment they run in): `env_token`, when `Some`, replaces `server.token`.
    fn parse_with_token(text: &str, file: Option<&Path>, env_token: Option<Token>) -> Result<Config, Box<ConfigError>> {
        let place = |span: Option<Range<usize>>, key: Option<String>, message: String| {
            ConfigError::at(text, file.map(Path::to_path_buf), span, key, message)
        };
        let deserializer =
            toml::Deserializer::parse(text).map_err(|e| place(e.span(), None, e.message().trim().to_string()))?;
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let mut path: Vec<Seg> = e
                .path()
                .iter()
                .filter_map(|seg| match seg {
                    serde_path_to_error::Segment::Map { key } => Some(Seg::Key(key.clone())),
                    serde_path_to_error::Segment::Seq { index } => Some(Seg::Index(*index)),
                    serde_path_to_error::Segment::Enum { variant } => Some(Seg::Key(variant.clone())),
                    serde_path_to_error::Segment::Unknown => None,
                })
                .collect();
            let message = with_suggestion(e.inner().message().trim());
            // Name the unknown key itself, not only its table, whichever way the path came.
            if let Some(unknown) = message.strip_prefix("unknown field `").and_then(|rest| rest.split('`').next())
                && path.last() != Some(&Seg::Key(unknown.to_string()))
            {
                path.push(Seg::Key(unknown.to_string()));
            }
            let key = (!path.is_empty()).then(|| render_path(&path));
            place(e.inner().span(), key, message)
        })?;
        let mut config = config;
        if let Some(token) = env_token {
            config.server.token = Some(token);
        }
        config.source = Some((file.map(Path::to_path_buf), SourceText(text.to_string())));
        // `absolute` does not follow symlinks: a config linked from elsewhere is anchored where
        // its path says it is, as a shell's `cd "$(dirname "$file")"` would be.
        config.base_dir =
            file.and_then(|f| std::path::absolute(f).ok()).and_then(|f| f.parent().map(Path::to_path_buf));
        if let Err((path, message)) = config.validate() {
            let span = locate(text, &path);
            let mut error = place(span, Some(render_path(&path)), message);
            if path == key_path(&["server", "token"]) {
                // The line holds the secret (or most of it); the key and line number suffice.
                error.source_line = None;
            }
            return Err(error);
        }
        if let Some(sim) = &config.gpu.sim
            && config.gpu.probe == ProbeChoice::Sim
        {
            let totals: Vec<u64> = sim.devices.iter().map(|d| d.total_mib.0).collect();
            config.check_devices(&totals)?;
        }
        Ok(config)
    }

    /// The file the config was read from, if it was read from one (its modification time is the
    /// `modified_at` of models whose weights file is not known).
    pub fn file(&self) -> Option<&Path> {
        self.source.as_ref().and_then(|(file, _)| file.as_deref())
    }

    /// The checks that need the devices: a model's `device` must exist and its `vram` must fit in
    /// that device's usable memory (or, without a fixed device, in the largest one). Run by
    /// `parse` for the sim device and by the daemon once the probe has listed the real devices.
    pub fn check_devices(&self, device_totals_mib: &[u64]) -> Result<(), Box<ConfigError>> {
        let Err((path, message)) = self.validate_devices(device_totals_mib) else { return Ok(()) };
        let (file, SourceText(text)) = self.source.clone().unwrap_or_default();
        let span = locate(&text, &path);
        Err(ConfigError::at(&text, file, span, Some(render_path(&path)), message))
    }

    /// Problems that do not stop the config from loading, placed like errors: a model program
    /// that cannot be found or run on this machine (the config may be meant for another one, so
    /// this is a warning, not an error).
    pub fn warnings(&self) -> Vec<ConfigError> {
        let (file, SourceText(text)) = self.source.clone().unwrap_or_default();
        let mut warnings = Vec::new();
        for (id, model) in &self.models {
            if model.backend != Backend::Process {
                continue;
            }
            for (key, command) in [("cmd", model.cmd.as_ref()), ("cpu_cmd", model.cpu_cmd.as_ref())] {
                let Some(argv) = self.model_argv(model, command) else { continue };
                let Some(program) = argv.first() else { continue };
                // Placeholders are expanded at start: the name is not known yet.
                if program.contains("${") {
                    continue;
                }
                let search_path = model.env.get("PATH").map(std::ffi::OsString::from);
                if let Err(problem) = find_program(program, search_path.as_deref()) {
                    let written = command.and_then(|c| c.argv().ok()).and_then(|a| a.first().cloned());
                    let shown = match written {
                        Some(written) if written != *program => format!("{written:?} (resolved to {program:?})"),
                        _ => format!("{program:?}"),
                    };
                    let path = key_path(&["models", id, key]);
                    let span = locate(&text, &path);
                    let message = format!("program {shown} {problem}; the model cannot start on this machine");
                    warnings.push(*ConfigError::at(&text, file.clone(), span, Some(render_path(&path)), message));
                }
            }
        }
        warnings
    }

    /// Checks `server.listen` against the token after `serve --listen` replaced it: the same
    /// rule as validation, reported as the flag's error (the file has no line for it).
    pub fn check_exposure(&self) -> Result<(), Box<ConfigError>> {
        let Some(message) = exposure_problem(&self.server) else { return Ok(()) };
        let file = self.source.as_ref().and_then(|(file, _)| file.clone());
        Err(Box::new(ConfigError {
            file,
            key: Some("server.listen".into()),
            line: None,
            column: None,
            message: format!("--listen {message}"),
            source_line: None,
        }))
    }
}
