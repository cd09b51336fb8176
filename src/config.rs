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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::gpu::Thresholds;
use crate::units::{Mib, Span};

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

/// `[server]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the HTTP API listens on; loopback by default because the API can stop processes.
    pub listen: SocketAddr,
    /// Embedded database and logs. Default: `$XDG_STATE_HOME/vramgate`, else
    /// `~/.local/state/vramgate`.
    pub state_dir: Option<PathBuf>,
    /// A `[modes.NAME]` applied once at start-up.
    pub initial_mode: Option<String>,
    /// The bearer token every route but `/vramgate/health` requires; `None` = no authentication.
    /// `VRAMGATE_TOKEN`, when set and not empty, overrides it (see [`TOKEN_ENV`]).
    pub token: Option<Token>,
    /// Lets a non-loopback `listen` run without a token. Off by default: the API starts and
    /// stops processes, so exposing it without credentials must be a deliberate choice.
    pub allow_unauthenticated: bool,
    /// Client connections served at once; beyond it new connections wait in the listen backlog
    /// until one closes.
    pub max_connections: u32,
    /// How long a request's head may take to arrive (also the wait for the next request on an
    /// idle keep-alive connection) before the connection is closed; `0` = never.
    pub header_read_timeout: Span,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            state_dir: None,
            initial_mode: None,
            token: None,
            allow_unauthenticated: false,
            max_connections: 1024,
            header_read_timeout: Span(std::time::Duration::from_secs(30)),
        }
    }
}

/// The environment variable that sets the API token; it wins over `server.token`, so that a
/// secret can stay out of a config file that is shared or checked in.
pub const TOKEN_ENV: &str = "VRAMGATE_TOKEN";

/// An API token. Its `Debug` form and its serialized form never show the secret, so neither a
/// log line nor a config dump can leak it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Token(String);

impl Token {
    /// A token with this secret.
    pub fn new(secret: impl Into<String>) -> Token {
        Token(secret.into())
    }

    /// The secret, for the one place that compares it.
    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Serialize for Token {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("<redacted>")
    }
}

/// Whether a token can travel in an `Authorization` header as is: visible ASCII, no spaces (a
/// header value may not carry anything else, so no client could ever present it).
pub fn token_is_usable(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic())
}

/// `VRAMGATE_TOKEN`, if it is set and not empty.
pub fn token_from_env() -> Option<Token> {
    std::env::var(TOKEN_ENV).ok().filter(|v| !v.is_empty()).map(Token)
}

/// Whether an address reaches only this machine (IPv4 127.0.0.0/8, IPv6 `::1`, and `::1`'s
/// IPv4-mapped forms).
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// Why `listen` may not run as configured: a non-loopback address without a token and without
/// `allow_unauthenticated`. `None` when it may.
pub fn exposure_problem(server: &ServerConfig) -> Option<String> {
    if is_loopback(&server.listen) || server.token.is_some() || server.allow_unauthenticated {
        return None;
    }
    Some(format!(
        "{} is reachable from other machines, but no token is set: anyone who can reach it could start and \
         stop processes. Set server.token (or the {TOKEN_ENV} environment variable) so that clients must send \
         `Authorization: Bearer TOKEN`, listen on a loopback address (127.0.0.1) in server.listen, or set \
         server.allow_unauthenticated = true to expose it without credentials on purpose",
        server.listen
    ))
}

/// `[modes.NAME]`: which models go where. Applying it releases and demotes first, then loads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModeConfig {
    /// Loaded on the GPU (promoted from the CPU if they are there).
    pub gpu: Vec<String>,
    /// A synonym of `gpu`.
    pub load: Vec<String>,
    /// Placed on the CPU (demoted if they are on the GPU); they need a CPU form.
    pub cpu: Vec<String>,
    /// Unloaded.
    pub unload: Vec<String>,
}

impl ModeConfig {
    /// `gpu` and `load` together, in that order, without repeats.
    pub fn gpu_models(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for id in self.gpu.iter().chain(&self.load) {
            if !out.contains(id) {
                out.push(id.clone());
            }
        }
        out
    }
}

/// The daemon's default listen address.
pub fn default_listen() -> SocketAddr {
    // A constant literal; parsing it cannot fail.
    DEFAULT_LISTEN.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9777)))
}

/// `[gpu] probe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeChoice {
    /// NVML, then AMD sysfs, then none.
    #[default]
    Auto,
    /// NVIDIA only; failing to load NVML is an error.
    Nvml,
    /// AMD sysfs only; finding no card is an error.
    Amd,
    /// The simulated device of `[gpu.sim]`.
    Sim,
    /// No GPU.
    None,
}

impl ProbeChoice {
    /// The word used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeChoice::Auto => "auto",
            ProbeChoice::Nvml => "nvml",
            ProbeChoice::Amd => "amd",
            ProbeChoice::Sim => "sim",
            ProbeChoice::None => "none",
        }
    }
}

impl fmt::Display for ProbeChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[gpu]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// Where readings come from.
    pub probe: ProbeChoice,
    /// Kept free on every device: `usable = total - reserve`.
    pub reserve_mib: Mib,
    /// How often the monitor samples.
    pub sample_interval: Span,
    /// Start of the `warning` level, percent of total.
    pub warning_pct: f64,
    /// Start of the `critical` level.
    pub critical_pct: f64,
    /// Start of the `emergency` level.
    pub emergency_pct: f64,
    /// A `vram_changed` event is sent when a device's used memory moved at least this much since
    /// the last one (seed 001's 100 MB).
    pub change_threshold_mib: Mib,
    /// `[gpu.sim]`, required when `probe = "sim"`.
    pub sim: Option<SimConfig>,
    /// `[gpu.amd]`.
    pub amd: AmdConfig,
}

impl Default for GpuConfig {
    fn default() -> Self {
        let t = Thresholds::default();
        GpuConfig {
            probe: ProbeChoice::Auto,
            reserve_mib: Mib(512),
            sample_interval: Span(std::time::Duration::from_millis(500)),
            warning_pct: t.warning_pct,
            critical_pct: t.critical_pct,
            emergency_pct: t.emergency_pct,
            change_threshold_mib: Mib(100),
            sim: None,
            amd: AmdConfig::default(),
        }
    }
}

impl GpuConfig {
    /// The level boundaries.
    pub fn thresholds(&self) -> Thresholds {
        Thresholds { warning_pct: self.warning_pct, critical_pct: self.critical_pct, emergency_pct: self.emergency_pct }
    }
}

/// `[gpu.sim]`: the simulated device (see `gpu::sim`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// The directory of claim files.
    #[serde(default = "default_sim_dir")]
    pub dir: PathBuf,
    /// The devices, in index order.
    #[serde(default = "default_sim_devices")]
    pub devices: Vec<SimDeviceConfig>,
    /// How long a process's claim still counts (and its pid is still listed) after the process
    /// is gone, the way a driver returns memory some time after its process exits. 0 (the
    /// default) frees it at the first sample that finds the pid gone.
    #[serde(default)]
    pub release_lag: Span,
}

/// The longest `[gpu.sim] release_lag`: a driver returns memory within a second or so; a lag of
/// minutes is a unit mistake (a bare number is seconds) that would make every release time out.
pub const SIM_RELEASE_LAG_MAX: std::time::Duration = std::time::Duration::from_secs(60);

fn default_sim_dir() -> PathBuf {
    PathBuf::from("/tmp/vramgate-sim")
}

fn default_sim_devices() -> Vec<SimDeviceConfig> {
    vec![SimDeviceConfig { name: "Sim 8G".into(), total_mib: Mib(8192) }]
}

/// One simulated device.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SimDeviceConfig {
    /// Shown as the device name.
    pub name: String,
    /// Its size.
    pub total_mib: Mib,
}

/// `[gpu.amd]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmdConfig {
    /// Where the `card*` directories are; only tests change it.
    pub sysfs_root: PathBuf,
}

impl Default for AmdConfig {
    fn default() -> Self {
        AmdConfig { sysfs_root: PathBuf::from("/sys/class/drm") }
    }
}

/// `[scheduler]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Loads that may run at once.
    pub max_parallel_loads: u32,
    /// Most models resident at once; 0 = no cap.
    pub resident_cap: u32,
    /// How long a request may wait for memory before it is refused.
    pub queue_timeout: Span,
    /// Most waiting requests (at least 1: every request passes through the queue).
    pub max_queue: u32,
    /// A request waiting for a model that needs a busy model evicted waits at most this long;
    /// then the busy model takes no new requests, finishes those in flight, and is swapped out.
    pub max_wait_before_swap: Span,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_parallel_loads: 1,
            resident_cap: 0,
            queue_timeout: Span(std::time::Duration::from_secs(60)),
            max_queue: 512,
            max_wait_before_swap: Span(std::time::Duration::from_secs(5)),
        }
    }
}

/// `[proxy]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Largest request body accepted (413 above it). Large enough for long audio uploads.
    pub max_body: Mib,
    /// How long a model server may take to start answering a forwarded request (504 after it;
    /// the model is released for eviction). Generous: a long prompt takes a while. `0` = never.
    pub first_byte_timeout: Span,
    /// How long a model server may go silent in the middle of an answer before the stream is
    /// broken off (the model is released for eviction). `0` = never.
    pub stall_timeout: Span,
    /// How long a write to a client may stay blocked (the client stopped reading: hung, stopped,
    /// gone without a FIN) before its connection is closed, releasing the model it held. `0` =
    /// never.
    pub client_timeout: Span,
    /// The most bytes of request bodies the proxy holds in memory at once, across all requests
    /// (each is read whole before it is forwarded, and held while its model loads); a request
    /// that would go over it gets a 503 with `Retry-After`.
    pub max_buffered: Mib,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            max_body: Mib(256),
            first_byte_timeout: Span(std::time::Duration::from_secs(600)),
            stall_timeout: Span(std::time::Duration::from_secs(300)),
            client_timeout: Span(std::time::Duration::from_secs(300)),
            max_buffered: Mib(1024),
        }
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
        if self.proxy.max_buffered.0 < self.proxy.max_body.0 {
            return Err((
                key_path(&["proxy", "max_buffered"]),
                format!(
                    "must be at least proxy.max_body ({}), found {}: a body that size could never be read",
                    self.proxy.max_body, self.proxy.max_buffered
                ),
            ));
        }
        Ok(())
    }
}

/// `[defaults]`: what every model gets unless it says otherwise.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DefaultsConfig {
    /// Idle time before unload; 0 = never.
    pub ttl: Span,
    /// A model is not evicted before it has been resident this long.
    pub min_residency: Span,
    /// How long a model may take to become ready.
    pub ready_timeout: Span,
    /// Grace between SIGTERM and SIGKILL.
    pub stop_timeout: Span,
    /// Higher wins; a request may evict only models of priority at most its own.
    pub priority: i32,
    /// After a model's processes exit, how long to wait for the device to show the memory back.
    pub release_timeout: Span,
}

impl Default for DefaultsConfig {
    fn default() -> Self {
        use std::time::Duration;
        DefaultsConfig {
            ttl: Span(Duration::from_secs(600)),
            min_residency: Span(Duration::ZERO),
            ready_timeout: Span(Duration::from_secs(120)),
            stop_timeout: Span(Duration::from_secs(10)),
            priority: 50,
            release_timeout: Span(Duration::from_secs(5)),
        }
    }
}

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

/// A model with every default applied: what the arbiter and the backends work from.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The model id (the `[models.ID]` key).
    pub id: String,
    /// How it is run.
    pub backend: Backend,
    /// The command, split, before expansion; a relative program path already resolved (see the
    /// module docs).
    pub argv: Vec<String>,
    /// Readiness check: `None` = ready as soon as spawned; `Some(path or URL)`.
    pub health: Option<String>,
    /// Declared footprint.
    pub declared_mib: Option<u64>,
    /// Higher wins.
    pub priority: i32,
    /// Idle time before unload; zero = never.
    pub ttl: std::time::Duration,
    /// Minimum time resident before it may be evicted.
    pub min_residency: std::time::Duration,
    /// Start-up limit.
    pub ready_timeout: std::time::Duration,
    /// SIGTERM grace.
    pub stop_timeout: std::time::Duration,
    /// Memory-back wait.
    pub release_timeout: std::time::Duration,
    /// Never evicted.
    pub pinned: bool,
    /// Loaded at start-up.
    pub preload: bool,
    /// Fixed device.
    pub device: Option<u32>,
    /// Other names.
    pub aliases: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Working directory, resolved against the config file's directory.
    pub cwd: Option<PathBuf>,
    /// Sent once when ready, before real requests.
    pub warmup: Option<Warmup>,
    /// The CPU form's command (process models), split.
    pub cpu_argv: Option<Vec<String>>,
    /// What eviction does to it.
    pub on_evict: OnEvict,
    /// Ollama's name of it (Ollama models).
    pub ollama_model: Option<String>,
    /// Ollama's base URL, without a trailing slash (Ollama models).
    pub url: String,
    /// Ollama load options (Ollama models).
    pub options: serde_json::Map<String, serde_json::Value>,
    /// The external app's acknowledgement limit (external models).
    pub ack_timeout: std::time::Duration,
}

impl ModelSpec {
    /// Whether it has a form that runs without GPU memory.
    pub fn has_cpu_form(&self) -> bool {
        match self.backend {
            Backend::Process => self.cpu_argv.is_some(),
            Backend::Ollama | Backend::External => true,
        }
    }

    /// What protocol requests for it speak upstream.
    pub fn upstream_kind(&self) -> crate::arbiter::gate::UpstreamKind {
        use crate::arbiter::gate::UpstreamKind;
        match self.backend {
            Backend::Process => UpstreamKind::OpenAi,
            Backend::Ollama => UpstreamKind::Ollama {
                model: self.ollama_model.clone().unwrap_or_default(),
                options: self.options.clone(),
            },
            Backend::External => UpstreamKind::External,
        }
    }
}

/// A configuration error, placed as precisely as the file allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, when the config came from one.
    pub file: Option<PathBuf>,
    /// The dotted key, e.g. `gpu.warning_pct` or `gpu.sim.devices[1].total_mib`.
    pub key: Option<String>,
    /// 1-based line.
    pub line: Option<usize>,
    /// 1-based column.
    pub column: Option<usize>,
    /// What is wrong and, where possible, what would be right.
    pub message: String,
    /// The text of the offending line, for context.
    pub source_line: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "config".into());
        write!(f, "{file}")?;
        if let Some(line) = self.line {
            write!(f, ", line {line}")?;
            if let Some(column) = self.column {
                write!(f, ", column {column}")?;
            }
        }
        if let Some(key) = &self.key {
            write!(f, ", key `{key}`")?;
        }
        write!(f, ": {}", self.message)?;
        if let (Some(line), Some(text)) = (self.line, &self.source_line) {
            write!(f, "\n{line:>5} | {text}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// An error at `span` of `text` (line, column and the line's text), if the span is known.
    fn at(
        text: &str,
        file: Option<PathBuf>,
        span: Option<Range<usize>>,
        key: Option<String>,
        message: String,
    ) -> Box<Self> {
        let (line, column, source_line) = match span {
            Some(span) => {
                let (line, column) = line_and_column(text, span.start);
                (Some(line), Some(column), text.lines().nth(line - 1).map(str::to_string))
            }
            None => (None, None, None),
        };
        // Whatever went wrong near the token, the error must not carry it to a log: not its line,
        // and not serde's quote of its value.
        let near_token = |text: &str| text.to_ascii_lowercase().contains("token");
        let source_line = source_line.filter(|line| !near_token(line));
        let message = if key.as_deref().is_some_and(near_token) {
            "must be a string of visible ASCII characters (the value is not shown)".to_string()
        } else {
            message
        };
        Box::new(ConfigError { file, key, line, column, message, source_line })
    }
}

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn render_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Builds a key path from literal parts: `path(&["gpu", "warning_pct"])`.
fn key_path(parts: &[&str]) -> Vec<Seg> {
    parts.iter().map(|p| Seg::Key((*p).to_string())).collect()
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, Box<ConfigError>> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Box::new(ConfigError {
                file: Some(path.to_path_buf()),
                key: None,
                line: None,
                column: None,
                message: format!("cannot read the config file: {e}"),
                source_line: None,
            })
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

    /// The checks that need the devices: a model's `device` must exist and its `vram` must fit in
    /// that device's usable memory (or, without a fixed device, in the largest one). Run by
    /// `parse` for the sim device and by the daemon once the probe has listed the real devices.
    pub fn check_devices(&self, device_totals_mib: &[u64]) -> Result<(), Box<ConfigError>> {
        let Err((path, message)) = self.validate_devices(device_totals_mib) else { return Ok(()) };
        let (file, SourceText(text)) = self.source.clone().unwrap_or_default();
        let span = locate(&text, &path);
        Err(ConfigError::at(&text, file, span, Some(render_path(&path)), message))
    }

    fn validate_devices(&self, totals: &[u64]) -> Result<(), (Vec<Seg>, String)> {
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

    /// A model's working directory, resolved against the config file's directory.
    fn model_cwd(&self, model: &ModelConfig) -> Option<PathBuf> {
        let cwd = model.cwd.as_ref()?;
        Some(match &self.base_dir {
            Some(base) if cwd.is_relative() => normalized_join(base, cwd),
            _ => cwd.clone(),
        })
    }

    /// A model's command split, with a relative program path resolved (see the module docs).
    fn model_argv(&self, model: &ModelConfig, command: Option<&CommandLine>) -> Option<Vec<String>> {
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

    /// Every model with the defaults applied, in id order.
    pub fn model_specs(&self) -> Vec<ModelSpec> {
        let d = &self.defaults;
        self.models
            .iter()
            .map(|(id, m)| ModelSpec {
                id: id.clone(),
                backend: m.backend,
                // Validation guarantees a splittable command for process models.
                argv: self.model_argv(m, m.cmd.as_ref()).unwrap_or_default(),
                health: match m.health.as_deref() {
                    None => Some("/health".to_string()),
                    Some("none") => None,
                    Some(other) => Some(other.to_string()),
                },
                declared_mib: m.vram.map(|v| v.0),
                priority: m.priority.unwrap_or(d.priority),
                // An external model is used inside its app, never through vramgate, so it would
                // always look idle: it idles out only with a `ttl` of its own.
                ttl: match (m.ttl, m.backend) {
                    (Some(ttl), _) => ttl.get(),
                    (None, Backend::External) => std::time::Duration::ZERO,
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
                env: m.env.clone(),
                cwd: self.model_cwd(m),
                warmup: m.warmup.clone(),
                cpu_argv: self.model_argv(m, m.cpu_cmd.as_ref()),
                on_evict: m.on_evict,
                ollama_model: m.ollama_model.clone(),
                url: m.url.as_deref().unwrap_or(DEFAULT_OLLAMA_URL).trim_end_matches('/').to_string(),
                options: m.options.clone().into_iter().collect(),
                ack_timeout: m.ack_timeout.map(|s| s.get()).unwrap_or(std::time::Duration::from_secs(30)),
            })
            .collect()
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

    /// The checks serde cannot express. Returns the offending key and the message.
    fn validate(&self) -> Result<(), (Vec<Seg>, String)> {
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
        if gpu.sample_interval.get() < std::time::Duration::from_millis(10) {
            return Err((
                key_path(&["gpu", "sample_interval"]),
                format!("must be at least 10ms, found {}", gpu.sample_interval),
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

/// Serde's "unknown field `vrma`, expected one of `backend`, ..." (or "unknown variant") with
/// "did you mean `vram`?" added when one expected name is close to the one written.
fn with_suggestion(message: &str) -> String {
    let unknown = ["unknown field `", "unknown variant `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split('`').next());
    let Some(unknown) = unknown else { return message.to_string() };
    let Some((head, expected)) = message.split_once(", expected ") else { return message.to_string() };
    // The names are the backticked words of the "expected" part: `a`, `b` or `c`.
    let candidates = expected.split('`').skip(1).step_by(2);
    match closest(unknown, candidates) {
        Some(best) => format!("{head}, did you mean `{best}`? (expected {expected})"),
        None => message.to_string(),
    }
}

/// The candidate nearest to `written` by edit distance (a swap of two neighbours counts as one
/// edit, case is ignored: `VRAM` suggests `vram`), if it is near enough to be the intended one:
/// one edit for names up to four letters, two up to eight, three beyond.
fn closest<'a>(written: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let written = written.to_lowercase();
    let limit = match written.chars().count() {
        0..=4 => 1,
        5..=8 => 2,
        _ => 3,
    };
    candidates
        .map(|candidate| (strsim::osa_distance(&written, candidate), candidate))
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// 1-based line and column of a byte offset.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map(|nl| before.len() - nl).unwrap_or(before.len() + 1);
    (line, column)
}

/// Where a key path sits in the text: the key itself, or, for a key that is absent (its default
/// conflicts with another key), the nearest enclosing table that is present.
fn locate(text: &str, path: &[Seg]) -> Option<Range<usize>> {
    let document = toml_edit::Document::parse(text.to_string()).ok()?;
    let mut item = document.as_item();
    // Inside an inline array or table, navigation continues over values rather than items.
    let mut value: Option<&toml_edit::Value> = None;
    let mut found: Option<Range<usize>> = None;
    for (position, seg) in path.iter().enumerate() {
        match seg {
            Seg::Key(key) => {
                let table: Option<&dyn toml_edit::TableLike> = match value {
                    Some(v) => v.as_inline_table().map(|t| t as &dyn toml_edit::TableLike),
                    None => item.as_table_like(),
                };
                let Some((k, next)) = table.and_then(|t| t.get_key_value(key)) else { return found };
                found = k.span().or_else(|| next.span()).or(found);
                item = next;
                value = next.as_value();
            }
            Seg::Index(index) => {
                if value.is_none()
                    && let Some(tables) = item.as_array_of_tables()
                {
                    let Some(table) = tables.get(*index) else { return found };
                    found = table.span().or(found);
                    return locate_in_table(table, &path[position + 1..], found);
                }
                let Some(element) = value.and_then(|v| v.as_array()).and_then(|a| a.get(*index)) else {
                    return found;
                };
                found = element.span().or(found);
                value = Some(element);
            }
        }
    }
    found
}

/// `locate` continued inside one table of an array of tables (`[[gpu.sim.devices]]`).
fn locate_in_table(table: &toml_edit::Table, rest: &[Seg], found: Option<Range<usize>>) -> Option<Range<usize>> {
    match rest.first() {
        Some(Seg::Key(key)) => match table.get_key_value(key) {
            Some((k, item)) => k.span().or_else(|| item.span()).or(found),
            None => found,
        },
        _ => found,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(text: &str) -> Box<ConfigError> {
        Config::parse(text, Some(Path::new("/etc/vramgate.toml"))).expect_err("config must be rejected")
    }

    #[test]
    fn empty_config_is_all_defaults() {
        let config = Config::parse("", None).unwrap();
        assert_eq!(config.server.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.gpu.probe, ProbeChoice::Auto);
        assert_eq!(config.gpu.reserve_mib, Mib(512));
        assert_eq!(config.gpu.sample_interval.get().as_millis(), 500);
        assert_eq!(config.gpu.thresholds(), Thresholds::default());
        assert_eq!(config.gpu.change_threshold_mib, Mib(100));
        assert_eq!(config.scheduler.max_queue, 512);
        assert_eq!(config.defaults.priority, 50);
    }

    #[test]
    fn design_example_parses() {
        let text = r#"
[server]
listen = "127.0.0.1:9999"
state_dir = "/var/lib/vramgate"

[gpu]
probe = "sim"
reserve_mib = 512
sample_interval = "250ms"
warning_pct = 70.0
critical_pct = 85
emergency_pct = 95.0
[gpu.sim]
dir = "/tmp/vramgate-sim"
devices = [{ name = "Sim 8G", total_mib = 8192 }, { name = "Sim 1.5G", total_mib = "1.5GiB" }]

[scheduler]
max_parallel_loads = 2
queue_timeout = "30s"

[defaults]
ttl = "0"
"#;
        let config = Config::parse(text, None).unwrap();
        assert_eq!(config.server.listen.port(), 9999);
        assert_eq!(config.gpu.probe, ProbeChoice::Sim);
        let sim = config.gpu.sim.unwrap();
        assert_eq!(sim.devices[1].total_mib, Mib(1536));
        assert_eq!(config.gpu.critical_pct, 85.0);
        assert!(config.defaults.ttl.is_zero());
        assert_eq!(config.scheduler.max_parallel_loads, 2);
    }

    #[test]
    fn unknown_key_names_the_key_and_line() {
        let err = parse_err("[gpu]\nprobe = \"none\"\nsampel_interval = \"1s\"\n");
        assert_eq!(err.key.as_deref(), Some("gpu.sampel_interval"));
        assert_eq!(err.line, Some(3));
        let shown = err.to_string();
        assert!(shown.contains("/etc/vramgate.toml, line 3"), "{shown}");
        assert!(shown.contains("sample_interval"), "the message lists the valid keys: {shown}");
    }

    #[test]
    fn unknown_section_is_an_error() {
        let err = parse_err("[gpuu]\nprobe = \"none\"\n");
        assert_eq!(err.key.as_deref(), Some("gpuu"));
        assert_eq!(err.line, Some(1));
    }

    #[test]
    fn wrong_type_names_the_key_and_line() {
        let err = parse_err("\n[gpu]\nwarning_pct = \"high\"\n");
        assert_eq!(err.key.as_deref(), Some("gpu.warning_pct"));
        assert_eq!(err.line, Some(3));
    }

    #[test]
    fn bad_enum_value_names_the_key() {
        let err = parse_err("[gpu]\nprobe = \"cuda\"\n");
        assert_eq!(err.key.as_deref(), Some("gpu.probe"));
        assert_eq!(err.line, Some(2));
        assert!(err.message.contains("nvml"), "lists the choices: {}", err.message);
    }

    #[test]
    fn warning_above_critical_is_placed_on_its_line() {
        let err = parse_err("[gpu]\nprobe = \"none\"\n\nwarning_pct = 90\n");
        assert_eq!(err.key.as_deref(), Some("gpu.warning_pct"));
        assert_eq!(err.line, Some(4));
        assert!(err.message.contains("critical_pct (87.5)"), "{}", err.message);
        assert!(err.to_string().contains("    4 | warning_pct = 90"), "{err}");
    }

    #[test]
    fn critical_above_emergency_and_out_of_range_percentages() {
        let err = parse_err("[gpu]\ncritical_pct = 96\n");
        assert_eq!(err.key.as_deref(), Some("gpu.critical_pct"));
        let err = parse_err("[gpu]\nemergency_pct = 120\n");
        assert_eq!(err.key.as_deref(), Some("gpu.emergency_pct"));
        assert_eq!(err.line, Some(2));
    }

    #[test]
    fn negative_sizes_are_errors_with_the_line() {
        let err = parse_err("[gpu]\nreserve_mib = -512\n");
        assert_eq!(err.key.as_deref(), Some("gpu.reserve_mib"));
        assert_eq!(err.line, Some(2));
        assert!(err.message.contains("negative"), "{}", err.message);
        let err = parse_err("[gpu]\nchange_threshold_mib = \"-1GiB\"\n");
        assert!(err.message.contains("negative"), "{}", err.message);
    }

    #[test]
    fn bad_size_and_duration_strings_quote_the_value() {
        let err = parse_err("[gpu]\nreserve_mib = \"half\"\n");
        assert!(err.message.contains("\"half\""), "{}", err.message);
        let err = parse_err("[gpu]\nsample_interval = \"fast\"\n");
        assert_eq!(err.key.as_deref(), Some("gpu.sample_interval"));
        assert!(err.message.contains("\"fast\""), "{}", err.message);
    }

    #[test]
    fn too_short_sample_interval() {
        let err = parse_err("[gpu]\nsample_interval = \"0\"\n");
        assert_eq!(err.key.as_deref(), Some("gpu.sample_interval"));
        assert_eq!(err.line, Some(2));
    }

    #[test]
    fn sim_probe_without_section() {
        let err = parse_err("[gpu]\nprobe = \"sim\"\n");
        assert_eq!(err.key.as_deref(), Some("gpu.probe"));
        assert_eq!(err.line, Some(2));
    }

    #[test]
    fn sim_device_problems_point_into_the_inline_array() {
        let text = "[gpu]\nprobe = \"sim\"\n[gpu.sim]\ndir = \"/tmp/x\"\ndevices = [\n  { name = \"a\", total_mib = 8192 },\n  { name = \"b\", total_mib = 0 },\n]\n";
        let err = parse_err(text);
        assert_eq!(err.key.as_deref(), Some("gpu.sim.devices[1].total_mib"));
        assert_eq!(err.line, Some(7));
        let err = parse_err("[gpu.sim]\ndevices = []\n");
        assert_eq!(err.key.as_deref(), Some("gpu.sim.devices"));
        assert_eq!(err.line, Some(2));
    }

    #[test]
    fn sim_release_lag_defaults_to_zero_and_is_bounded() {
        let base = "[gpu]\nprobe = \"sim\"\n[gpu.sim]\ndir = \"/tmp/x\"\n";
        let config = Config::parse(base, None).unwrap();
        assert!(config.gpu.sim.unwrap().release_lag.is_zero());
        let config = Config::parse(&format!("{base}release_lag = \"300ms\"\n"), None).unwrap();
        assert_eq!(config.gpu.sim.unwrap().release_lag.get(), std::time::Duration::from_millis(300));
        let err = parse_err(&format!("{base}release_lag = \"2m\"\n"));
        assert_eq!(err.key.as_deref(), Some("gpu.sim.release_lag"));
        assert_eq!(err.line, Some(5));
        assert!(err.message.contains("at most 1m") && err.message.contains("found 2m"), "{err}");
        let err = parse_err(&format!("{base}release_lag = \"soon\"\n"));
        assert_eq!(err.key.as_deref(), Some("gpu.sim.release_lag"), "{err}");
    }

    #[test]
    fn sim_devices_as_array_of_tables() {
        let text = "[gpu]\nprobe = \"sim\"\n[[gpu.sim.devices]]\nname = \"a\"\ntotal_mib = 100\n";
        let err = parse_err(text);
        assert_eq!(err.key.as_deref(), Some("gpu.sim.devices[0].total_mib"));
        assert_eq!(err.line, Some(5), "{err}");
        assert!(err.message.contains("reserve_mib"));
    }

    #[test]
    fn unknown_key_inside_a_sim_device() {
        let err = parse_err("[gpu.sim]\ndevices = [{ name = \"a\", total = 8192 }]\n");
        assert_eq!(err.key.as_deref(), Some("gpu.sim.devices[0].total"));
        assert_eq!(err.line, Some(2));
    }

    #[test]
    fn syntax_error_has_a_line() {
        let err = parse_err("[gpu]\nprobe = \n");
        assert_eq!(err.line, Some(2));
        assert!(err.key.is_none());
    }

    /// Parses with no token from the environment, whatever the test's environment says.
    fn parse_without_env(text: &str) -> Result<Config, Box<ConfigError>> {
        Config::parse_with_token(text, None, None)
    }

    #[test]
    fn non_loopback_listen_without_token_is_refused_naming_the_keys() {
        for listen in ["0.0.0.0:9777", "192.168.1.20:9777", "[::]:9777"] {
            let text = format!("[gpu]\nprobe = \"none\"\n\n[server]\nlisten = \"{listen}\"\n");
            let err = parse_without_env(&text).expect_err(listen);
            assert_eq!(err.key.as_deref(), Some("server.listen"), "{listen}");
            assert_eq!(err.line, Some(5), "{listen}");
            for named in ["server.token", "VRAMGATE_TOKEN", "server.allow_unauthenticated"] {
                assert!(err.message.contains(named), "{listen}: {named} not in {}", err.message);
            }
        }
    }

    #[test]
    fn non_loopback_listen_is_accepted_with_a_token_or_explicitly_unauthenticated() {
        let with_token = parse_without_env("[server]\nlisten = \"0.0.0.0:9777\"\ntoken = \"s3cret\"\n").expect("token");
        assert_eq!(with_token.server.token, Some(Token::new("s3cret")));
        let open = parse_without_env("[server]\nlisten = \"0.0.0.0:9777\"\nallow_unauthenticated = true\n")
            .expect("allow_unauthenticated");
        assert!(open.server.token.is_none());
        // The environment's token counts as a token, and wins over the file's.
        let from_env = Config::parse_with_token(
            "[server]\nlisten = \"0.0.0.0:9777\"\ntoken = \"file\"\n",
            None,
            Some(Token::new("env")),
        )
        .expect("env token");
        assert_eq!(from_env.server.token, Some(Token::new("env")));
        for loopback in ["127.0.0.1:9777", "127.0.0.2:1", "[::1]:9777", "[::ffff:127.0.0.1]:9777"] {
            parse_without_env(&format!("[server]\nlisten = \"{loopback}\"\n")).expect(loopback);
        }
    }

    #[test]
    fn listen_override_is_checked_against_the_token() {
        let mut config = parse_without_env("").expect("empty config");
        config.server.listen = "0.0.0.0:0".parse().expect("address");
        let err = config.check_exposure().expect_err("exposed without a token");
        assert_eq!(err.key.as_deref(), Some("server.listen"));
        assert!(err.message.starts_with("--listen 0.0.0.0:0 "), "{}", err.message);
        config.server.token = Some(Token::new("s3cret"));
        config.check_exposure().expect("with a token");
    }

    #[test]
    fn a_malformed_token_is_not_echoed_by_the_error() {
        for text in [
            "[server]\ntoken = 12345678\n",
            "[server]\ntoken = \"abc\n",
            "server = { token = \"s3cr3t\", bogus = 1 }\n",
        ] {
            let err = parse_without_env(text).expect_err(text);
            let shown = err.to_string();
            for secret in ["12345678", "abc", "s3cr3t"] {
                assert!(!shown.contains(secret), "{text:?}: the error shows the token: {shown}");
            }
        }
    }

    #[test]
    fn unusable_tokens_are_refused() {
        for token in ["", "two words", "tab\\there", "caf\u{e9}"] {
            let err = parse_without_env(&format!("[server]\ntoken = \"{token}\"\n")).expect_err(token);
            assert_eq!(err.key.as_deref(), Some("server.token"), "{token:?}");
            assert_eq!(err.line, Some(2), "{token:?}");
            assert_eq!(err.source_line, None, "the token's line is not echoed");
        }
    }

    #[test]
    fn the_token_never_shows_in_debug_or_serialized_output() {
        let config = parse_without_env("[server]\ntoken = \"s3cret-value\"\n").expect("token");
        assert!(!format!("{config:?}").contains("s3cret-value"));
        let serialized = toml::to_string(&config).expect("serialize");
        assert!(!serialized.contains("s3cret-value"), "{serialized}");
    }

    #[test]
    fn bad_listen_address() {
        let err = parse_err("[server]\nlisten = \"localhost\"\n");
        assert_eq!(err.key.as_deref(), Some("server.listen"));
        assert_eq!(err.line, Some(2));
    }

    #[test]
    fn scheduler_and_defaults_are_checked() {
        let err = parse_err("[scheduler]\nmax_parallel_loads = 0\n");
        assert_eq!(err.key.as_deref(), Some("scheduler.max_parallel_loads"));
        let err = parse_err("[defaults]\nready_timeout = \"0\"\n");
        assert_eq!(err.key.as_deref(), Some("defaults.ready_timeout"));
        let err = parse_err("[defaults]\nttl = \"soon\"\n");
        assert_eq!(err.key.as_deref(), Some("defaults.ttl"));
    }

    const SIM: &str =
        "[gpu]\nprobe = \"sim\"\n[gpu.sim]\ndir = \"/tmp/x\"\ndevices = [{ name = \"a\", total_mib = 8192 }]\n";

    #[test]
    fn models_get_defaults_and_their_own_settings() {
        let text = format!(
            "{SIM}[defaults]\nttl = \"5m\"\npriority = 10\n[models.whisper]\nbackend = \"process\"\ncmd = \"whisper-server --port ${{PORT}} --model 'large v3'\"\nvram = \"1500MiB\"\npriority = 100\npinned = true\naliases = [\"stt\"]\nenv = {{ THREADS = \"4\" }}\n[models.llm]\nbackend = \"process\"\ncmd = [\"llama-server\", \"--port\", \"${{PORT}}\"]\nhealth = \"none\"\n"
        );
        let config = Config::parse(&text, None).unwrap();
        let specs = config.model_specs();
        assert_eq!(specs.len(), 2);
        let llm = &specs[0];
        assert_eq!(llm.id, "llm");
        assert_eq!(llm.priority, 10);
        assert_eq!(llm.ttl.as_secs(), 300);
        assert_eq!(llm.health, None);
        assert_eq!(llm.declared_mib, None);
        let whisper = &specs[1];
        assert_eq!(whisper.argv, vec!["whisper-server", "--port", "${PORT}", "--model", "large v3"]);
        assert_eq!(whisper.health.as_deref(), Some("/health"));
        assert_eq!((whisper.priority, whisper.pinned, whisper.declared_mib), (100, true, Some(1500)));
        assert_eq!(whisper.release_timeout.as_secs(), 5);
        assert_eq!(whisper.env["THREADS"], "4");
    }

    #[test]
    fn a_process_model_without_cmd() {
        let err = parse_err("[models.llm]\nbackend = \"process\"\n");
        assert_eq!(err.key.as_deref(), Some("models.llm"));
        assert_eq!(err.line, Some(1));
        assert!(err.message.contains("needs `cmd`"), "{}", err.message);
    }

    #[test]
    fn backend_specific_keys_are_checked() {
        let ok = Config::parse(
            "[models.llama]\nbackend = \"ollama\"\nollama_model = \"llama3.2:3b\"\noptions = { num_ctx = 8192 }\n\
             [models.clip]\nbackend = \"external\"\nvram = \"1GiB\"\non_evict = \"cpu\"\n",
            None,
        )
        .unwrap();
        let specs = ok.model_specs();
        let llama = specs.iter().find(|m| m.id == "llama").unwrap();
        assert_eq!(llama.url, DEFAULT_OLLAMA_URL);
        assert_eq!(llama.options["num_ctx"], 8192);
        assert!(specs.iter().all(ModelSpec::has_cpu_form));

        let err = parse_err("[models.llama]\nbackend = \"ollama\"\n");
        assert_eq!(err.key.as_deref(), Some("models.llama"));
        assert!(err.message.contains("ollama_model"), "{err}");
        let err = parse_err("[models.llama]\nbackend = \"ollama\"\nollama_model = \"x\"\ncmd = \"x\"\n");
        assert_eq!((err.key.as_deref(), err.line), (Some("models.llama.cmd"), Some(4)));
        let err = parse_err("[models.llama]\nbackend = \"ollama\"\nollama_model = \"x\"\nurl = \"localhost:1\"\n");
        assert_eq!(err.key.as_deref(), Some("models.llama.url"));
        let err = parse_err("[models.clip]\nbackend = \"external\"\n");
        assert!(err.message.contains("needs `vram`"), "{err}");
        let err = parse_err("[models.llm]\nbackend = \"process\"\ncmd = \"x\"\non_evict = \"cpu\"\n");
        assert_eq!(err.key.as_deref(), Some("models.llm.on_evict"));
        assert!(err.message.contains("cpu_cmd"), "{err}");
        let err = parse_err("[models.llm]\nbackend = \"process\"\ncmd = \"x\"\nollama_model = \"y\"\n");
        assert_eq!(err.key.as_deref(), Some("models.llm.ollama_model"));
    }

    #[test]
    fn modes_name_real_models_once_and_cpu_needs_a_cpu_form() {
        let models = "[models.a]\nbackend = \"process\"\ncmd = \"x\"\n[models.b]\nbackend = \"process\"\ncmd = \"y\"\ncpu_cmd = \"y -ngl 0\"\n";
        let ok = Config::parse(
            &format!(
                "[server]\ninitial_mode = \"m\"\n{models}[modes.m]\ngpu = [\"a\"]\nload = [\"a\"]\ncpu = [\"b\"]\n"
            ),
            None,
        )
        .unwrap();
        assert_eq!(ok.modes["m"].gpu_models(), ["a"]);
        let err = parse_err(&format!("{models}[modes.m]\ngpu = [\"zz\"]\n"));
        assert_eq!(err.key.as_deref(), Some("modes.m.gpu[0]"));
        let err = parse_err(&format!("{models}[modes.m]\ngpu = [\"a\"]\nunload = [\"a\"]\n"));
        assert_eq!(err.key.as_deref(), Some("modes.m.unload[0]"));
        assert!(err.message.contains("also listed in `gpu`"), "{err}");
        let err = parse_err(&format!("{models}[modes.m]\ncpu = [\"a\"]\n"));
        assert!(err.message.contains("no CPU form"), "{err}");
        let err = parse_err(&format!("[server]\ninitial_mode = \"x\"\n{models}"));
        assert_eq!((err.key.as_deref(), err.line), (Some("server.initial_mode"), Some(2)));
        let err = parse_err(&format!("{models}[modes.m]\ngpus = [\"a\"]\n"));
        assert!(err.message.contains("gpus"), "{err}");
    }

    #[test]
    fn max_queue_zero_and_an_ollama_url_with_a_path_are_refused() {
        let err = parse_err("[scheduler]\nmax_queue = 0\n");
        assert_eq!((err.key.as_deref(), err.line), (Some("scheduler.max_queue"), Some(2)));
        let err = parse_err(
            "[models.llama]\nbackend = \"ollama\"\nollama_model = \"x\"\nurl = \"http://127.0.0.1:11434/api\"\n",
        );
        assert_eq!(err.key.as_deref(), Some("models.llama.url"));
        assert!(err.message.contains("without a path"), "{err}");
        let ok = Config::parse(
            "[models.llama]\nbackend = \"ollama\"\nollama_model = \"x\"\nurl = \"http://gpu-box:11434/\"\n",
            None,
        )
        .unwrap();
        assert_eq!(ok.model_specs()[0].url, "http://gpu-box:11434");
    }

    #[test]
    fn an_external_model_never_idles_out_unless_it_sets_a_ttl() {
        let config = Config::parse(
            "[defaults]\nttl = \"1m\"\n[models.clip]\nbackend = \"external\"\nvram = 1000\n\
             [models.vlm]\nbackend = \"external\"\nvram = 1000\nttl = \"5m\"\n",
            None,
        )
        .unwrap();
        let specs = config.model_specs();
        assert_eq!(specs[0].ttl, std::time::Duration::ZERO);
        assert_eq!(specs[1].ttl, std::time::Duration::from_secs(300));
    }

    #[test]
    fn an_unknown_backend() {
        let err = parse_err("[models.llm]\nbackend = \"docker\"\ncmd = \"x\"\n");
        assert_eq!(err.key.as_deref(), Some("models.llm.backend"));
        assert_eq!(err.line, Some(2));
        assert!(err.message.contains("process"), "{}", err.message);
    }

    #[test]
    fn a_model_key_typo() {
        let err = parse_err("[models.llm]\nbackend = \"process\"\ncmd = \"x\"\nvrma = \"1G\"\n");
        assert_eq!(err.key.as_deref(), Some("models.llm.vrma"));
        assert_eq!(err.line, Some(4));
        assert!(err.message.starts_with("unknown field `vrma`, did you mean `vram`? (expected"), "{}", err.message);
    }

    #[test]
    fn typos_get_the_closest_known_name_when_it_is_close() {
        let suggestion = |text: &str| parse_err(text).message;
        assert!(suggestion("[gpuu]\n").contains("did you mean `gpu`?"));
        assert!(suggestion("[gpu]\nsampel_interval = \"1s\"\n").contains("did you mean `sample_interval`?"));
        assert!(suggestion("[gpu]\nprobe = \"simm\"\n").contains("did you mean `sim`?"));
        assert!(suggestion("[defaults]\nprioirty = 3\n").contains("did you mean `priority`?"));
        assert!(
            suggestion("[models.a]\nbackend = \"process\"\ncmd = \"x\"\nVRAM = 1\n").contains("did you mean `vram`?")
        );
        // Nothing near: the plain message with the list of valid names, no wild guess.
        let far = suggestion("[gpu]\ncolour = \"green\"\n");
        assert!(!far.contains("did you mean"), "{far}");
        assert!(far.contains("expected one of") && far.contains("`probe`"), "{far}");
        let far = suggestion("[gpu]\nprobe = \"cuda\"\n");
        assert!(!far.contains("did you mean"), "{far}");
    }

    #[test]
    fn probe_choices_read_as_in_the_config() {
        for word in ["auto", "nvml", "amd", "sim", "none"] {
            let probe: ProbeChoice = serde_json::from_value(serde_json::Value::String(word.into())).unwrap();
            assert_eq!(probe.to_string(), word);
        }
    }

    #[test]
    fn relative_paths_in_models_are_anchored_to_the_config_file() {
        let text = "[models.a]\nbackend = \"process\"\ncmd = [\"./bin/server.sh\", \"--port\", \"${PORT}\"]\n\
                    cpu_cmd = \"bin/server.sh --cpu\"\n\
                    [models.b]\nbackend = \"process\"\ncmd = \"./server\"\ncwd = \"work\"\n\
                    [models.c]\nbackend = \"process\"\ncmd = \"llama-server --port ${PORT}\"\ncwd = \"/srv/llama\"\n\
                    [models.d]\nbackend = \"process\"\ncmd = \"/usr/bin/server\"\n";
        let config = Config::parse(text, Some(Path::new("/etc/vramgate/vramgate.toml"))).unwrap();
        let specs = config.model_specs();
        let spec = |id: &str| specs.iter().find(|s| s.id == id).unwrap();
        assert_eq!(spec("a").argv, vec!["/etc/vramgate/bin/server.sh", "--port", "${PORT}"]);
        assert_eq!(
            spec("a").cpu_argv.as_deref(),
            Some(&["/etc/vramgate/bin/server.sh".to_string(), "--cpu".into()][..])
        );
        assert_eq!(spec("a").cwd, None);
        // With a cwd, the program is where it would be from that directory.
        assert_eq!(spec("b").cwd.as_deref(), Some(Path::new("/etc/vramgate/work")));
        assert_eq!(spec("b").argv, vec!["/etc/vramgate/work/server"]);
        // Bare names stay for the PATH lookup; absolute paths stay as they are.
        assert_eq!(spec("c").argv[0], "llama-server");
        assert_eq!(spec("c").cwd.as_deref(), Some(Path::new("/srv/llama")));
        assert_eq!(spec("d").argv[0], "/usr/bin/server");
        // Without a file there is nothing to anchor to.
        let unanchored = Config::parse(text, None).unwrap().model_specs();
        assert_eq!(unanchored[0].argv[0], "./bin/server.sh");
    }

    #[test]
    fn programs_that_cannot_be_found_are_warnings_naming_the_model_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("model.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        let plain = dir.path().join("plain.txt");
        std::fs::write(&plain, "").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let text = "[models.ok]\nbackend = \"process\"\ncmd = \"./model.sh --port ${PORT}\"\ncpu_cmd = \"sh -c true\"\n\
                    [models.typo]\nbackend = \"process\"\ncmd = [\"nosuchprogram-xyz\", \"--port\", \"${PORT}\"]\n\
                    [models.gone]\nbackend = \"process\"\ncmd = \"sh\"\ncpu_cmd = \"./missing.sh\"\n\
                    [models.plain]\nbackend = \"process\"\ncmd = \"./plain.txt\"\n\
                    [models.later]\nbackend = \"process\"\ncmd = \"${MODEL_ID}-server\"\n";
        let file = dir.path().join("vramgate.toml");
        std::fs::write(&file, text).unwrap();
        let config = Config::load(&file).unwrap();
        let warnings = config.warnings();
        let keys: Vec<&str> = warnings.iter().filter_map(|w| w.key.as_deref()).collect();
        assert_eq!(keys, vec!["models.gone.cpu_cmd", "models.plain.cmd", "models.typo.cmd"], "{warnings:?}");
        let typo = warnings[2].to_string();
        assert!(typo.contains(", line 7") && typo.contains("\"nosuchprogram-xyz\" is not found on PATH"), "{typo}");
        let gone = warnings[0].to_string();
        assert!(gone.contains("\"./missing.sh\" (resolved to") && gone.contains("does not exist"), "{gone}");
        assert!(warnings[1].message.contains("is not executable"), "{}", warnings[1]);
    }

    #[test]
    fn a_device_that_does_not_exist_and_vram_larger_than_the_device() {
        let err = parse_err(&format!("{SIM}[models.llm]\nbackend = \"process\"\ncmd = \"x\"\ndevice = 1\n"));
        assert_eq!(err.key.as_deref(), Some("models.llm.device"));
        assert_eq!(err.line, Some(9));
        assert!(err.message.contains("does not exist"), "{}", err.message);
        let err = parse_err(&format!("{SIM}[models.llm]\nbackend = \"process\"\ncmd = \"x\"\nvram = \"9G\"\n"));
        assert_eq!(err.key.as_deref(), Some("models.llm.vram"));
        assert_eq!(err.line, Some(9));
        assert!(err.message.contains("7680 MiB usable"), "{}", err.message);
    }

    #[test]
    fn device_checks_after_the_probe_lists_devices() {
        let config = Config::parse("[models.llm]\nbackend = \"process\"\ncmd = \"x\"\ndevice = 2\n", None).unwrap();
        let err = config.check_devices(&[8192]).unwrap_err();
        assert_eq!((err.key.as_deref(), err.line), (Some("models.llm.device"), Some(4)));
        assert!(config.check_devices(&[8192, 8192, 24576]).is_ok());
    }

    #[test]
    fn two_models_claiming_the_same_alias() {
        let text = "[models.a]\nbackend = \"process\"\ncmd = \"x\"\naliases = [\"chat\"]\n[models.b]\nbackend = \"process\"\ncmd = \"y\"\naliases = [\"chat\"]\n";
        let err = parse_err(text);
        assert_eq!(err.key.as_deref(), Some("models.b.aliases[0]"));
        assert_eq!(err.line, Some(8));
        assert!(err.message.contains("already an alias of model \"a\""), "{}", err.message);
        let err = parse_err(
            "[models.a]\nbackend = \"process\"\ncmd = \"x\"\n[models.b]\nbackend = \"process\"\ncmd = \"y\"\naliases = [\"a\"]\n",
        );
        assert!(err.message.contains("id of another model"), "{}", err.message);
    }

    #[test]
    fn bad_commands_and_health() {
        let err = parse_err("[models.a]\nbackend = \"process\"\ncmd = \"x 'unclosed\"\n");
        assert_eq!(err.key.as_deref(), Some("models.a.cmd"));
        let err = parse_err("[models.a]\nbackend = \"process\"\ncmd = []\n");
        assert_eq!(err.key.as_deref(), Some("models.a.cmd"));
        let err = parse_err("[models.a]\nbackend = \"process\"\ncmd = \"x\"\nhealth = \"health\"\n");
        assert_eq!((err.key.as_deref(), err.line), (Some("models.a.health"), Some(4)));
    }

    #[test]
    fn unreadable_file_is_a_clear_error() {
        let err = Config::load(Path::new("/nonexistent/vramgate.toml")).unwrap_err();
        assert!(err.to_string().contains("cannot read the config file"), "{err}");
    }

    #[test]
    fn line_and_column_arithmetic() {
        assert_eq!(line_and_column("abc", 0), (1, 1));
        assert_eq!(line_and_column("a\nbc", 3), (2, 2));
        assert_eq!(line_and_column("a\n", 2), (2, 1));
    }
}
