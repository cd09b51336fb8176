//! The status document (a public contract, documented in docs/http-api.md): what `GET /vramgate/status` returns and what
//! `vramgate status --json` prints, the same bytes. The CLI deserializes it to draw its table, so
//! both directions live here.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::gpu::{Level, NamedUsage, ProbeKind};

/// The whole document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The daemon's version.
    pub version: String,
    /// The probe in use.
    pub probe: ProbeKind,
    /// One entry per device; empty without a GPU.
    pub devices: Vec<DeviceStatus>,
    /// True when vramgate cannot do its whole job (no GPU, a failing probe); see the reasons.
    pub degraded: bool,
    /// Why, one sentence each.
    pub degraded_reasons: Vec<String>,
    /// Managed models.
    pub models: Vec<ModelStatus>,
    /// Leases held.
    pub leases: Vec<LeaseStatus>,
    /// Requests waiting in the queue (loads and leases), in the order they will be served.
    #[serde(default)]
    pub queue: Vec<QueueEntry>,
    /// The current mode, if one was set.
    pub mode: Option<String>,
    /// Each Ollama server that models use: whether it answers and what it has loaded, including
    /// models loaded into it directly (not through vramgate).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ollama: Vec<OllamaStatus>,
    /// When the device readings were taken.
    pub sampled_at: Option<DateTime<Utc>>,
    /// The level boundaries and the reserve every device is judged by (what a bar draws).
    #[serde(default)]
    pub limits: Option<crate::history::Limits>,
}

/// One device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// Index as the probe enumerates devices.
    pub index: u32,
    /// Device name.
    pub name: String,
    /// The probe that read it.
    pub probe: ProbeKind,
    /// Installed memory.
    pub total_mib: u64,
    /// In use, by anyone.
    pub used_mib: u64,
    /// Not in use.
    pub free_mib: u64,
    /// `total - reserve_mib`: what vramgate will ever hand out.
    pub usable_mib: u64,
    /// From used/total and the thresholds.
    pub level: Level,
    /// Busy percentage; null where unknown.
    pub utilization_pct: Option<u32>,
    /// Celsius; null where unknown.
    pub temperature_c: Option<i32>,
    /// Who uses the memory, per process.
    pub processes: Vec<ProcessStatus>,
    /// Why `processes` cannot be known on this device (AMD sysfs), when that is the case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes_unavailable: Option<String>,
    /// Consumers without a pid (the sim device's named files).
    #[serde(default)]
    pub named_consumers: Vec<NamedUsage>,
    /// Problems with the last reading that did not stop it.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Why this device's latest reading failed (a GPU fallen off the bus), while the other
    /// devices were read: the figures above are its last good ones, and it admits nothing (its
    /// free memory counts as zero) until it answers again. Absent for a device read normally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One process on a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStatus {
    /// Process id.
    pub pid: u32,
    /// VRAM it holds; null where the driver does not say (NVML's "not available"): never 0 for
    /// unknown.
    pub used_mib: Option<u64>,
    /// Process name.
    pub name: String,
    /// The managed model this process serves, or null for a foreign process.
    pub model: Option<String>,
}

/// One managed model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelStatus {
    /// Model id.
    pub id: String,
    /// `process`, `ollama` or `external`.
    pub backend: String,
    /// `unloaded`, `loading`, `ready`, `unloading` or `failed`.
    pub state: String,
    /// Device it is placed on.
    pub device: Option<u32>,
    /// Footprint: max(declared, measured).
    pub vram_mib: u64,
    /// Requests in flight.
    pub in_use: u32,
    /// Never evicted.
    pub pinned: bool,
    /// Higher wins.
    pub priority: i32,
    /// RFC 3339, or null if never used.
    pub last_used: Option<DateTime<Utc>>,
    /// Where its server listens while it runs.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Its server's pid while it runs.
    #[serde(default)]
    pub pid: Option<u32>,
    /// The footprint measured (largest seen, kept across restarts).
    #[serde(default)]
    pub measured_mib: Option<u64>,
    /// The footprint declared in the config.
    #[serde(default)]
    pub declared_mib: Option<u64>,
    /// The most it was seen using since it last became ready (null until measured).
    #[serde(default)]
    pub peak_mib: Option<u64>,
    /// The footprint estimated from the weights file's GGUF header for the command's flags
    /// (process models only); used for admission until one is measured.
    #[serde(default)]
    pub estimated_mib: Option<u64>,
    /// Failed starts in a row.
    #[serde(default)]
    pub failures: u32,
    /// For a failed model: seconds until the next automatic try.
    #[serde(default)]
    pub retry_in_s: Option<u64>,
    /// The last start error.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Other names it answers to.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Where it runs while loaded: `gpu` or `cpu` (its CPU form, using no GPU memory); null
    /// when not loaded.
    #[serde(default)]
    pub placement: Option<String>,
    /// When its idle TTL unloads it if nobody uses it meanwhile; null when it is not loaded, in
    /// use, pinned, or has no TTL.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    /// Why it needs attention (an Ollama that cannot be reached, an app that stopped
    /// acknowledging), or null.
    #[serde(default)]
    pub note: Option<String>,
    /// External models: the app attached to it (its holder name), or null.
    #[serde(default)]
    pub attached: Option<String>,
    /// Why it is in its state: the `reason` of the `model_state` event that put it there
    /// (`requested`, `idle`, `evicted_for:vision`, `crashed`, …; an unload's cause, not the
    /// `released` that ends it), or null before its first change.
    #[serde(default)]
    pub state_reason: Option<String>,
}

/// One Ollama server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OllamaStatus {
    /// Its base URL.
    pub url: String,
    /// Whether its last `/api/ps` answered; null before the first try.
    pub reachable: Option<bool>,
    /// Why it does not answer.
    #[serde(default)]
    pub error: Option<String>,
    /// What it has loaded.
    pub models: Vec<OllamaModelStatus>,
}

/// A model loaded in Ollama.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OllamaModelStatus {
    /// Ollama's name for it.
    pub name: String,
    /// GPU memory it holds.
    pub vram_mib: u64,
    /// The vramgate model it is, or null if someone loaded it into Ollama directly (its memory
    /// is counted as Ollama's, not evictable by vramgate).
    pub managed_as: Option<String>,
}

/// One lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseStatus {
    /// Lease id.
    pub id: String,
    /// Who holds it.
    pub holder: String,
    /// Device.
    pub device: u32,
    /// Memory held.
    pub vram_mib: u64,
    /// Whether it excludes every other user of the device.
    pub exclusive: bool,
    /// For a model lease: the model kept in use.
    #[serde(default)]
    pub model: Option<String>,
    /// Its priority.
    #[serde(default)]
    pub priority: i32,
    /// When it was granted (null from a daemon that does not say).
    #[serde(default)]
    pub granted_at: Option<DateTime<Utc>>,
}

/// One request waiting in the queue: a load (a `vramgate load`, a request through the proxy, a
/// model lease, a preload) or a memory lease (`vramgate run`, `POST /vramgate/leases`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueEntry {
    /// Who waits: the model id of a load, the holder of a lease.
    pub requester: String,
    /// `load` or `lease`.
    pub kind: String,
    /// For a load: the model.
    #[serde(default)]
    pub model: Option<String>,
    /// For a lease: who holds it once granted.
    #[serde(default)]
    pub holder: Option<String>,
    /// For a lease: the holder's pid, if it gave one.
    #[serde(default)]
    pub pid: Option<u32>,
    /// The device asked for; null when vramgate may choose.
    #[serde(default)]
    pub device: Option<u32>,
    /// The memory it needs.
    pub vram_mib: u64,
    /// Its priority (higher is served first).
    pub priority: i32,
    /// What it waits for, with the numbers as of the arbiter's last look at it (every reading):
    /// e.g. `needs 7000 MiB on GPU 0; 2680 MiB available (usable 7680, foreign 0); held by: llm
    /// 5000 MiB (in use)`. Null until the arbiter has looked at it.
    #[serde(default)]
    pub reason: Option<String>,
    /// When it was queued.
    pub since: DateTime<Utc>,
}
