//! The tables other than `[models]`: `[server]` (and its token), `[gpu]`, `[scheduler]`, `[proxy]`, `[defaults]`, `[modes]`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::DEFAULT_LISTEN;
use crate::gpu::Thresholds;
use crate::units::{Mib, Span};

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
    /// The origins browser pages may call the API from (CORS): exact origins
    /// (`https://chat.example`), patterns with one `*` (`http://localhost:*`), or `"*"` for any;
    /// empty = none. Default: [`DEFAULT_CORS_ORIGINS`].
    pub cors_origins: Vec<String>,
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
            cors_origins: DEFAULT_CORS_ORIGINS.iter().map(|o| o.to_string()).collect(),
        }
    }
}

/// Ollama's default allowed origins (its `OLLAMA_ORIGINS` defaults), vramgate's default
/// `server.cors_origins`: loopback hosts on any port over http and https, and the schemes of
/// desktop apps and editor web views.
pub const DEFAULT_CORS_ORIGINS: &[&str] = &[
    "http://localhost",
    "https://localhost",
    "http://localhost:*",
    "https://localhost:*",
    "http://127.0.0.1",
    "https://127.0.0.1",
    "http://127.0.0.1:*",
    "https://127.0.0.1:*",
    "http://0.0.0.0",
    "https://0.0.0.0",
    "http://0.0.0.0:*",
    "https://0.0.0.0:*",
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
];

/// Why a `server.cors_origins` entry cannot be used, if it cannot: empty, more than one `*`, or
/// neither `*` nor an origin (`scheme://host[:port]`, no path).
pub fn cors_origin_problem(pattern: &str) -> Option<String> {
    if pattern == "*" {
        return None;
    }
    if pattern.is_empty() {
        return Some("an origin may not be empty".into());
    }
    if pattern.matches('*').count() > 1 {
        return Some(format!("{pattern:?} has more than one `*`; one is allowed (e.g. \"http://localhost:*\")"));
    }
    if pattern.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some(format!("{pattern:?} contains whitespace"));
    }
    let Some((scheme, rest)) = pattern.split_once("://") else {
        return Some(format!(
            "{pattern:?} is not an origin: write scheme://host[:port] (e.g. \"http://localhost:3000\"), or \"*\" for any"
        ));
    };
    if scheme.is_empty() || rest.trim_end_matches('/').contains('/') {
        return Some(format!("{pattern:?} is not an origin: write scheme://host[:port], without a path"));
    }
    None
}

/// The environment variable that sets the API token; it wins over `server.token`, so that a
/// secret can stay out of a config file that is shared or checked in.
pub const TOKEN_ENV: &str = "VRAMGATE_TOKEN";

/// An API token. Its `Debug` form and its serialized form never show the secret, so neither a
/// log line nor a config dump can leak it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Token(pub(super) String);

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
    /// `[gpu.nvml]`.
    pub nvml: NvmlConfig,
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
            nvml: NvmlConfig::default(),
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

/// The shortest `[gpu] sample_interval`: sampling more often only burns CPU (and driver calls).
pub const SAMPLE_INTERVAL_MIN: std::time::Duration = std::time::Duration::from_millis(10);

/// The longest `[gpu] sample_interval`: a monitor that looks less than once a minute cannot
/// notice memory pressure in time to act on it, and a longer one is a unit mistake.
pub const SAMPLE_INTERVAL_MAX: std::time::Duration = std::time::Duration::from_secs(60);

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

/// The library `[gpu.nvml] library` names by default: the driver's, found by the dynamic loader's
/// search path (`ld.so.conf`, `LD_LIBRARY_PATH`).
pub const NVML_DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

/// `[gpu.nvml]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NvmlConfig {
    /// The NVML library to load: a path, or a bare file name for the loader's search path. `None`
    /// is the system's [`NVML_DEFAULT_LIBRARY`]. WSL keeps it in `/usr/lib/wsl/lib`, NixOS in
    /// `/run/opengl-driver/lib`, where the loader may not look.
    pub library: Option<PathBuf>,
}

impl NvmlConfig {
    /// The library to load.
    pub fn library(&self) -> &std::path::Path {
        self.library.as_deref().unwrap_or(std::path::Path::new(NVML_DEFAULT_LIBRARY))
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
    /// Most callers waiting for one model to load (a burst against a cold model): beyond it,
    /// 503 with `Retry-After`. Each holds its request body, so this bounds memory.
    pub max_waiters_per_model: u32,
    /// Most callers waiting for models to load, in total.
    pub max_waiters: u32,
    /// While a load waits for a victim's memory to come back, read the incoming model's weights
    /// file into the page cache, so the release and the disk read overlap.
    pub prefetch: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_parallel_loads: 1,
            resident_cap: 0,
            queue_timeout: Span(std::time::Duration::from_secs(60)),
            max_queue: 512,
            max_wait_before_swap: Span(std::time::Duration::from_secs(5)),
            max_waiters_per_model: 256,
            max_waiters: 1024,
            prefetch: true,
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
    /// that would go over it gets a 503 with `Retry-After`. Unset: 1 GiB, or `max_body` when that
    /// is larger (see [`ProxyConfig::buffered_budget`]).
    pub max_buffered: Option<Mib>,
}

impl ProxyConfig {
    /// The bytes of request bodies the proxy may hold at once: `max_buffered`, or when it is not
    /// set, 1 GiB or `max_body` if larger (a body `max_body` allows must always fit).
    pub fn buffered_budget(&self) -> Mib {
        self.max_buffered.unwrap_or(Mib(self.max_body.0.max(1024)))
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            max_body: Mib(256),
            first_byte_timeout: Span(std::time::Duration::from_secs(600)),
            stall_timeout: Span(std::time::Duration::from_secs(300)),
            client_timeout: Span(std::time::Duration::from_secs(300)),
            max_buffered: None,
        }
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
