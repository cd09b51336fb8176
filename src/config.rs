//! The configuration file: schema, defaults, and validation whose errors name the key and line.
//!
//! Parsing is serde over `toml` (unknown keys are errors: they are almost always typos). Checks
//! that serde cannot express (`warning_pct` below `critical_pct`, a sim device of 0 MiB) run
//! after, and find the offending key's line by walking the same text with `toml_edit`, which keeps
//! positions.

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
    /// `[scheduler]`: read and validated now; used by the arbiter.
    pub scheduler: SchedulerConfig,
    /// `[defaults]`: read and validated now; applied to models by the arbiter.
    pub defaults: DefaultsConfig,
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { listen: default_listen(), state_dir: None }
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
}

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
    /// Most waiting requests; 0 = never queue, fail at once.
    pub max_queue: u32,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_parallel_loads: 1,
            resident_cap: 0,
            queue_timeout: Span(std::time::Duration::from_secs(60)),
            max_queue: 512,
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

    /// Parses and validates config text; `file` only labels errors.
    pub fn parse(text: &str, file: Option<&Path>) -> Result<Config, Box<ConfigError>> {
        let place = |span: Option<Range<usize>>, key: Option<String>, message: String| {
            let (line, column, source_line) = match span {
                Some(span) => {
                    let (line, column) = line_and_column(text, span.start);
                    (Some(line), Some(column), text.lines().nth(line - 1).map(str::to_string))
                }
                None => (None, None, None),
            };
            Box::new(ConfigError { file: file.map(Path::to_path_buf), key, line, column, message, source_line })
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
            let message = e.inner().message().trim().to_string();
            // Name the unknown key itself, not only its table, whichever way the path came.
            if let Some(unknown) = message.strip_prefix("unknown field `").and_then(|rest| rest.split('`').next())
                && path.last() != Some(&Seg::Key(unknown.to_string()))
            {
                path.push(Seg::Key(unknown.to_string()));
            }
            let key = (!path.is_empty()).then(|| render_path(&path));
            place(e.inner().span(), key, message)
        })?;
        if let Err((path, message)) = config.validate() {
            let span = locate(text, &path);
            return Err(place(span, Some(render_path(&path)), message));
        }
        Ok(config)
    }

    /// The checks serde cannot express. Returns the offending key and the message.
    fn validate(&self) -> Result<(), (Vec<Seg>, String)> {
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
        if self.scheduler.max_parallel_loads == 0 {
            return Err((key_path(&["scheduler", "max_parallel_loads"]), "must be at least 1, found 0".into()));
        }
        if self.defaults.ready_timeout.is_zero() {
            return Err((key_path(&["defaults", "ready_timeout"]), "must be longer than 0".into()));
        }
        Ok(())
    }
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
