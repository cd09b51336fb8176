//! `[models.NAME]` as written, and the `ModelSpec` built from it with every default applied.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Config;
use crate::units::{Mib, Span};

/// `[models.NAME] backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A supervised server process (llama-server, whisper.cpp server, vLLM, any command with an
    /// HTTP health check).
    Process,
    /// A model inside a running Ollama, loaded and released through its HTTP API.
    Ollama,
    /// A model inside a client application, which attaches to vramgate and follows its
    /// placement instructions.
    External,
}

impl Backend {
    /// The name used in config and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Process => "process",
            Backend::Ollama => "ollama",
            Backend::External => "external",
        }
    }
}

/// `[models.NAME] on_evict`: what happens to a model chosen to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnEvict {
    /// It is released.
    #[default]
    Unload,
    /// It moves to its CPU form and keeps serving (slower), using no GPU memory.
    Cpu,
}

/// The default Ollama address.
pub const DEFAULT_OLLAMA_URL: &str = "http://127.0.0.1:11434";

/// A command as one shell-like string or as a list of arguments.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum CommandLine {
    /// `cmd = "llama-server --port ${PORT}"`, split like a POSIX shell would (quotes respected,
    /// nothing expanded).
    Line(String),
    /// `cmd = ["llama-server", "--port", "${PORT}"]`.
    Args(Vec<String>),
}

impl CommandLine {
    /// The argument vector, or why the string cannot be split.
    pub fn argv(&self) -> Result<Vec<String>, String> {
        match self {
            CommandLine::Line(line) => {
                shlex::split(line).ok_or_else(|| format!("cannot split {line:?} into arguments (unbalanced quotes?)"))
            }
            CommandLine::Args(args) => Ok(args.clone()),
        }
    }
}

/// `[models.NAME]`: one model. Unset timing and priority keys come from `[defaults]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// How the model is run.
    pub backend: Backend,
    /// The server command; `${PORT}`, `${MODEL_ID}` and `${DEVICE}` are expanded. A program
    /// path with a slash is relative to `cwd`, else to the config file's directory; a bare name
    /// is looked up on `PATH`.
    #[serde(default)]
    pub cmd: Option<CommandLine>,
    /// Readiness check: a path on the upstream (`/health`), a full URL, or `none`.
    #[serde(default)]
    pub health: Option<String>,
    /// Declared footprint; a measured footprint may raise it.
    #[serde(default)]
    pub vram: Option<Mib>,
    /// Higher wins.
    #[serde(default)]
    pub priority: Option<i32>,
    /// Idle time before unload; `0` = never.
    #[serde(default)]
    pub ttl: Option<Span>,
    /// Not evicted before it has been resident this long.
    #[serde(default)]
    pub min_residency: Option<Span>,
    /// How long it may take to become ready.
    #[serde(default)]
    pub ready_timeout: Option<Span>,
    /// Grace between SIGTERM and SIGKILL.
    #[serde(default)]
    pub stop_timeout: Option<Span>,
    /// How long to wait for its memory to come back after its processes exit.
    #[serde(default)]
    pub release_timeout: Option<Span>,
    /// Never evicted, never unloaded for idleness.
    #[serde(default)]
    pub pinned: bool,
    /// Loaded at start-up.
    #[serde(default)]
    pub preload: bool,
    /// The device to use; omitted = vramgate places it.
    #[serde(default)]
    pub device: Option<u32>,
    /// Other names requests may use.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Extra environment for the process.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory of the process; a relative one is relative to the config file's
    /// directory. Default: the daemon's working directory.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// A request sent once after the model is ready, before any real request reaches it.
    #[serde(default)]
    pub warmup: Option<Warmup>,
    /// The CPU form of a process model (e.g. llama-server with `-ngl 0`), same expansions and
    /// path rules as `cmd`.
    #[serde(default)]
    pub cpu_cmd: Option<CommandLine>,
    /// A process model's GGUF weights file, when its `cmd` does not name it with `-m`/`--model`:
    /// its header gives the footprint estimate used before the model was ever measured. A
    /// relative path is relative to `cwd`, else to the config file's directory.
    #[serde(default)]
    pub weights: Option<PathBuf>,
    /// What eviction does to it: `unload` (default) or `cpu` (needs a CPU form).
    #[serde(default)]
    pub on_evict: OnEvict,
    /// Ollama's name of the model (`backend = "ollama"`), e.g. `llama3.2:3b`.
    #[serde(default)]
    pub ollama_model: Option<String>,
    /// Ollama's address (`backend = "ollama"`); default `http://127.0.0.1:11434`.
    #[serde(default)]
    pub url: Option<String>,
    /// Ollama options sent with the load (`backend = "ollama"`), e.g. `{ num_ctx = 8192 }`.
    #[serde(default)]
    pub options: BTreeMap<String, serde_json::Value>,
    /// How long an attached app may take to acknowledge an instruction (`backend = "external"`)
    /// before it is marked unresponsive. Default 30s.
    #[serde(default)]
    pub ack_timeout: Option<Span>,
}

/// `[models.NAME] warmup = { path = "/v1/chat/completions", body = { ... } }`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Warmup {
    /// Path on the model's server.
    pub path: String,
    /// JSON body, POSTed.
    pub body: serde_json::Value,
}

/// How long an external model's app may take to acknowledge an instruction, unless its
/// `ack_timeout` says otherwise.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// A model with every default applied: what the arbiter and the backends work from.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The model id (the `[models.ID]` key).
    pub id: String,
    /// How it is run, with what only that backend needs.
    pub backend: BackendSpec,
    /// Declared footprint.
    pub declared_mib: Option<u64>,
    /// Higher wins.
    pub priority: i32,
    /// Idle time before unload; zero = never.
    pub ttl: Duration,
    /// Minimum time resident before it may be evicted.
    pub min_residency: Duration,
    /// Start-up limit.
    pub ready_timeout: Duration,
    /// SIGTERM grace.
    pub stop_timeout: Duration,
    /// Memory-back wait.
    pub release_timeout: Duration,
    /// Never evicted.
    pub pinned: bool,
    /// Loaded at start-up.
    pub preload: bool,
    /// Fixed device.
    pub device: Option<u32>,
    /// Other names.
    pub aliases: Vec<String>,
    /// Sent once when ready, before real requests (process and Ollama models; validation
    /// refuses it for external ones).
    pub warmup: Option<Warmup>,
    /// What eviction does to it.
    pub on_evict: OnEvict,
}

/// A model's backend with the settings that only it has: a process model carries no Ollama
/// URL and an Ollama model no command, by construction rather than by convention.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendSpec {
    /// A supervised server process.
    Process(ProcessSpec),
    /// A model inside a running Ollama.
    Ollama(OllamaSpec),
    /// A model inside an attached app.
    External(ExternalSpec),
}

/// What starting a process model needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessSpec {
    /// The command, split, before expansion; a relative program path already resolved (see the
    /// module docs).
    pub argv: Vec<String>,
    /// Readiness check: `None` = ready as soon as spawned; `Some(path or URL)`.
    pub health: Option<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Working directory, resolved against the config file's directory.
    pub cwd: Option<PathBuf>,
    /// The CPU form's command, split.
    pub cpu_argv: Option<Vec<String>>,
    /// The weights file named by `weights`, resolved (see [`ModelConfig::weights`]).
    pub weights: Option<PathBuf>,
}

/// Where an Ollama model lives and how it is loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct OllamaSpec {
    /// Ollama's name of it (`ollama_model`).
    pub model: String,
    /// Ollama's base URL, without a trailing slash.
    pub url: String,
    /// Load options.
    pub options: serde_json::Map<String, serde_json::Value>,
}

/// What the engine needs to know of an external model's app.
#[derive(Debug, Clone, PartialEq)]
pub struct ExternalSpec {
    /// How long the app may take to acknowledge an instruction.
    pub ack_timeout: Duration,
}

impl BackendSpec {
    /// The plain kind, as written in config and shown in status and events.
    pub fn kind(&self) -> Backend {
        match self {
            BackendSpec::Process(_) => Backend::Process,
            BackendSpec::Ollama(_) => Backend::Ollama,
            BackendSpec::External(_) => Backend::External,
        }
    }
}

impl ModelSpec {
    /// The plain kind of its backend.
    pub fn kind(&self) -> Backend {
        self.backend.kind()
    }

    /// Its process settings, if it is a process model.
    pub fn process(&self) -> Option<&ProcessSpec> {
        match &self.backend {
            BackendSpec::Process(process) => Some(process),
            _ => None,
        }
    }

    /// Its Ollama settings, if it is an Ollama model.
    pub fn ollama(&self) -> Option<&OllamaSpec> {
        match &self.backend {
            BackendSpec::Ollama(ollama) => Some(ollama),
            _ => None,
        }
    }

    /// Its app's settings, if it is an external model.
    pub fn external(&self) -> Option<&ExternalSpec> {
        match &self.backend {
            BackendSpec::External(external) => Some(external),
            _ => None,
        }
    }

    /// Whether it has a form that runs without GPU memory.
    pub fn has_cpu_form(&self) -> bool {
        match &self.backend {
            BackendSpec::Process(process) => process.cpu_argv.is_some(),
            BackendSpec::Ollama(_) | BackendSpec::External(_) => true,
        }
    }

    /// What protocol requests for it speak upstream.
    pub fn upstream_kind(&self) -> crate::arbiter::gate::UpstreamKind {
        use crate::arbiter::gate::UpstreamKind;
        match &self.backend {
            BackendSpec::Process(_) => UpstreamKind::OpenAi,
            BackendSpec::Ollama(ollama) => {
                UpstreamKind::Ollama { model: ollama.model.clone(), options: ollama.options.clone() }
            }
            BackendSpec::External(_) => UpstreamKind::External,
        }
    }
}

impl Config {
    /// A model's working directory, resolved against the config file's directory.
    fn model_cwd(&self, model: &ModelConfig) -> Option<PathBuf> {
        let cwd = model.cwd.as_ref()?;
        Some(match &self.base_dir {
            Some(base) if cwd.is_relative() => normalized_join(base, cwd),
            _ => cwd.clone(),
        })
    }

    /// A model's command split, with a relative program path resolved (see the module docs).
    pub(super) fn model_argv(&self, model: &ModelConfig, command: Option<&CommandLine>) -> Option<Vec<String>> {
        let mut argv = command?.argv().ok()?;
        if let Some(program) = argv.first_mut()
            && let Some(resolved) = self.resolve_program(model, program)
        {
            *program = resolved;
        }
        Some(argv)
    }

    /// The absolute path of a relative program path with a slash; `None` for a bare name (looked
    /// up on PATH), an absolute path, or a config not read from a file.
    fn resolve_program(&self, model: &ModelConfig, program: &str) -> Option<String> {
        let path = Path::new(program);
        if !program.contains('/') || path.is_absolute() {
            return None;
        }
        let base = self.model_cwd(model).or_else(|| self.base_dir.clone())?;
        if base.is_relative() {
            return None;
        }
        normalized_join(&base, path).to_str().map(str::to_string)
    }

    /// A model's backend settings, with their defaults applied. Validation guarantees what
    /// each backend needs (a splittable `cmd`, an `ollama_model`); a config built in code
    /// without validation gets empty values instead.
    fn backend_spec(&self, m: &ModelConfig) -> BackendSpec {
        match m.backend {
            Backend::Process => BackendSpec::Process(ProcessSpec {
                argv: self.model_argv(m, m.cmd.as_ref()).unwrap_or_default(),
                health: match m.health.as_deref() {
                    None => Some("/health".to_string()),
                    Some("none") => None,
                    Some(other) => Some(other.to_string()),
                },
                env: m.env.clone(),
                cwd: self.model_cwd(m),
                cpu_argv: self.model_argv(m, m.cpu_cmd.as_ref()),
                weights: m.weights.as_ref().map(|path| match self.model_cwd(m).or_else(|| self.base_dir.clone()) {
                    Some(base) if path.is_relative() => normalized_join(&base, path),
                    _ => path.clone(),
                }),
            }),
            Backend::Ollama => BackendSpec::Ollama(OllamaSpec {
                model: m.ollama_model.clone().unwrap_or_default(),
                url: m.url.as_deref().unwrap_or(DEFAULT_OLLAMA_URL).trim_end_matches('/').to_string(),
                options: m.options.clone().into_iter().collect(),
            }),
            Backend::External => BackendSpec::External(ExternalSpec {
                ack_timeout: m.ack_timeout.map_or(DEFAULT_ACK_TIMEOUT, |s| s.get()),
            }),
        }
    }

    /// Every model with the defaults applied, in id order.
    pub fn model_specs(&self) -> Vec<ModelSpec> {
        let d = &self.defaults;
        self.models
            .iter()
            .map(|(id, m)| ModelSpec {
                id: id.clone(),
                backend: self.backend_spec(m),
                declared_mib: m.vram.map(|v| v.0),
                priority: m.priority.unwrap_or(d.priority),
                // An external model is used inside its app, never through vramgate, so it would
                // always look idle: it idles out only with a `ttl` of its own.
                ttl: match (m.ttl, m.backend) {
                    (Some(ttl), _) => ttl.get(),
                    (None, Backend::External) => Duration::ZERO,
                    (None, _) => d.ttl.get(),
                },
                min_residency: m.min_residency.unwrap_or(d.min_residency).get(),
                ready_timeout: m.ready_timeout.unwrap_or(d.ready_timeout).get(),
                stop_timeout: m.stop_timeout.unwrap_or(d.stop_timeout).get(),
                release_timeout: m.release_timeout.unwrap_or(d.release_timeout).get(),
                pinned: m.pinned,
                preload: m.preload,
                device: m.device,
                aliases: m.aliases.clone(),
                warmup: m.warmup.clone(),
                on_evict: m.on_evict,
            })
            .collect()
    }
}

/// `base/path` without `.` components, so that `./server.sh` reads as `/etc/models/server.sh`
/// in logs and errors (`..` is kept: it may cross a symlink).
fn normalized_join(base: &Path, path: &Path) -> PathBuf {
    let mut out = base.to_path_buf();
    for component in path.components() {
        if component != std::path::Component::CurDir {
            out.push(component);
        }
    }
    out
}

/// Whether `program` can be run: a path (with a slash) must be an executable file; a bare name
/// must be one in a directory of `search_path` (default: this process's `PATH`). The error says
/// what is wrong, to follow "program X".
pub fn find_program(program: &str, search_path: Option<&std::ffi::OsStr>) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &Path| {
        std::fs::metadata(path).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
    };
    if program.contains('/') {
        let path = Path::new(program);
        return match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err("does not exist".into()),
            Err(e) => Err(format!("cannot be read ({e})")),
            Ok(m) if !m.is_file() => Err("is not a file".into()),
            Ok(_) if !executable(path) => Err("is not executable (chmod +x?)".into()),
            Ok(_) => Ok(path.to_path_buf()),
        };
    }
    let search =
        search_path.map(std::ffi::OsStr::to_os_string).or_else(|| std::env::var_os("PATH")).unwrap_or_default();
    std::env::split_paths(&search)
        // An empty PATH entry means the current directory, as for a shell.
        .map(|dir| if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir })
        .map(|dir| dir.join(program))
        .find(|candidate| executable(candidate))
        .ok_or_else(|| "is not found on PATH".to_string())
}
