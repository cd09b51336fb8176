//! The stand-in NVML library (`tests/fixtures/nvml_standin/`): built here with the C compiler,
//! once per source text and variant, into cargo's target directory (never installed or packaged),
//! and the state file that scripts it. docs/development.md describes the format.

use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Where the stand-in's source is.
const SOURCE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/nvml_standin");

/// Its files: the ones compiled, and the header they share (part of the cache key).
const SOURCES: [&str; 2] = ["state.c", "nvml.c"];
const HEADER: &str = "standin.h";

/// How it is compiled (part of the cache key too): a shared object exporting only the NVML entry
/// points (and the call counter), under the real library's soname.
const FLAGS: &[&str] =
    &["-shared", "-fPIC", "-fvisibility=hidden", "-O1", "-Wall", "-Wextra", "-Wl,-soname,libnvidia-ml.so.1"];
const LIBRARIES: &[&str] = &["-ldl", "-lpthread"];

/// The file name the stand-in reads its state from when it sits beside the library (the stand-in
/// also honours `VRAMGATE_NVML_STANDIN_STATE`, which a daemon started by `Daemon::start` lacks).
pub const STATE_FILE: &str = "nvml-standin.state";

/// Which symbols the stand-in exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// Every entry point, as a current driver.
    Full,
    /// No `nvmlDevice…RunningProcesses_v3`, as a driver older than the API version the wrapper
    /// asks for (the `_v2` and unversioned ones remain).
    WithoutV3,
    /// No `nvmlDeviceGetMemoryInfo_v2` (the v1 call remains).
    WithoutMemoryV2,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Full => "full",
            Variant::WithoutV3 => "without-v3",
            Variant::WithoutMemoryV2 => "without-memory-v2",
        }
    }

    fn defines(self) -> &'static [&'static str] {
        match self {
            Variant::Full => &[],
            Variant::WithoutV3 => &["-DSTANDIN_WITHOUT_V3"],
            Variant::WithoutMemoryV2 => &["-DSTANDIN_WITHOUT_MEMORY_V2"],
        }
    }
}

/// The built stand-in, `…/libnvidia-ml.so.1`, compiling it if this source, variant, compiler and
/// these flags have not been compiled yet (older builds of the variant are then removed). Test
/// binaries run in parallel: each compiles to a name of its own and renames it into place, so a
/// reader never sees a half-written library and the last rename wins harmlessly.
pub fn library(variant: Variant) -> PathBuf {
    // One build at a time within a test binary (its tests share the result).
    static BUILDING: Mutex<()> = Mutex::new(());
    let _guard = BUILDING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for file in SOURCES.iter().chain([&HEADER]) {
        let text = std::fs::read(Path::new(SOURCE_DIR).join(file))
            .unwrap_or_else(|e| panic!("read tests/fixtures/nvml_standin/{file}: {e}"));
        (file, text).hash(&mut hasher);
    }
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    (variant, &compiler, FLAGS, LIBRARIES).hash(&mut hasher);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("nvml-standin").join(format!(
        "{}-{:016x}",
        variant.name(),
        hasher.finish()
    ));
    let library = dir.join("libnvidia-ml.so.1");
    if library.exists() {
        return library;
    }
    std::fs::create_dir_all(&dir).expect("create the stand-in's build directory");
    let partial = dir.join(format!(".libnvidia-ml.so.1.{}", std::process::id()));
    let output = Command::new(&compiler)
        .args(FLAGS)
        .args(variant.defines())
        .arg("-o")
        .arg(&partial)
        .args(SOURCES.iter().map(|file| Path::new(SOURCE_DIR).join(file)))
        .args(LIBRARIES)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {compiler:?} to build the NVML stand-in: {e}"));
    assert!(output.status.success(), "building the NVML stand-in failed:\n{}", String::from_utf8_lossy(&output.stderr));
    std::fs::rename(&partial, &library).expect("move the stand-in into place");
    prune_older_builds(&dir, variant);
    library
}

/// Removes the variant's builds of older sources, so edits to the stand-in do not pile up under
/// target/. Best effort: a build another process still has loaded stays mapped until it exits.
fn prune_older_builds(current: &Path, variant: Variant) {
    let Some(parent) = current.parent() else { return };
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    let prefix = format!("{}-", variant.name());
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let stale = name.to_str().is_some_and(|n| {
            n.strip_prefix(&prefix).is_some_and(|hash| hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
        });
        if stale && path != current {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// A test's own copy of the stand-in: a link to the built library in `dir`, so that the stand-in
/// reads `dir/nvml-standin.state` (its state file is found beside the path it was loaded by).
pub fn link_into(dir: &Path, variant: Variant) -> PathBuf {
    std::fs::create_dir_all(dir).expect("create the stand-in's directory");
    let link = dir.join("libnvidia-ml.so.1");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(library(variant), &link).expect("link the stand-in");
    link
}

/// One device the stand-in reports. Figures in MiB; `free` defaults to what `used` and
/// `reserved` leave.
#[derive(Debug, Clone)]
pub struct Device {
    pub name: String,
    pub total_mib: u64,
    pub used_mib: u64,
    pub free_mib: Option<u64>,
    pub reserved_mib: u64,
    /// `None`: NVML answers NOT_SUPPORTED.
    pub utilization_pct: Option<u32>,
    /// `None`: NVML answers NOT_SUPPORTED.
    pub temperature_c: Option<u32>,
    pub mig: bool,
    /// Its UUID (`nvmlDeviceGetUUID`); `None`: the stand-in's default for its index.
    pub uuid: Option<String>,
}

impl Device {
    /// A device of `total_mib` with `used_mib` in use, utilization and temperature known.
    pub fn new(name: &str, total_mib: u64, used_mib: u64) -> Device {
        Device {
            name: name.into(),
            total_mib,
            used_mib,
            free_mib: None,
            reserved_mib: 0,
            utilization_pct: Some(0),
            temperature_c: Some(40),
            mig: false,
            uuid: None,
        }
    }
}

/// Which process list a process is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum List {
    Compute,
    Graphics,
}

/// A process on a device's list.
#[derive(Debug, Clone)]
pub struct Process {
    pub device: u32,
    pub list: List,
    pub pid: u32,
    /// `None`: NVML_VALUE_NOT_AVAILABLE.
    pub used_mib: Option<u64>,
    /// Missing from the count call, present in the fill call (it started in between).
    pub late: bool,
}

/// When an injected error answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    Always,
    Once,
    /// Every call after the first N that match.
    After(u64),
    /// Every call until NVML is next initialised (`nvmlInit_v2`), as a lost GPU that only
    /// answers again once NVML is re-initialised.
    UntilInit,
}

/// An error an entry point answers instead of its result.
#[derive(Debug, Clone)]
pub struct InjectedError {
    /// The exported name, e.g. `nvmlDeviceGetMemoryInfo_v2`.
    pub function: String,
    /// Only calls about this device; `None`: all.
    pub device: Option<u32>,
    /// The `nvmlReturn_t`, e.g. 15 (GPU_IS_LOST).
    pub code: u32,
    pub when: When,
}

/// Codes of `nvmlReturn_t` the tests inject.
pub mod code {
    pub const NOT_SUPPORTED: u32 = 3;
    pub const NO_PERMISSION: u32 = 4;
    pub const INSUFFICIENT_SIZE: u32 = 7;
    pub const DRIVER_NOT_LOADED: u32 = 9;
    pub const GPU_IS_LOST: u32 = 15;
    /// `NVML_ERROR_ARGUMENT_VERSION_MISMATCH`: the struct version the caller set is not known.
    pub const ARGUMENT_VERSION_MISMATCH: u32 = 25;
    pub const UNKNOWN: u32 = 999;
}

/// A call that answers late (a slow or hung driver): it sleeps `ms` before answering, or until
/// the state no longer has this delay.
#[derive(Debug, Clone)]
pub struct Delay {
    /// The exported name, e.g. `nvmlDeviceGetMemoryInfo_v2`.
    pub function: String,
    /// Only calls about this device; `None`: all.
    pub device: Option<u32>,
    pub ms: u64,
}

/// Everything the stand-in reports.
#[derive(Debug, Clone, Default)]
pub struct State {
    pub driver: Option<String>,
    pub devices: Vec<Device>,
    pub processes: Vec<Process>,
    pub errors: Vec<InjectedError>,
    pub delays: Vec<Delay>,
    /// A sim-style claims directory (`DIR/N/<pid>` holding MiB, as the fake model writes): each
    /// live pid's claim is a compute process on device N, and counts as used (and not free).
    pub claims: Option<PathBuf>,
}

impl State {
    /// The state file's text.
    pub fn render(&self) -> String {
        let mut text = String::from("# written by tests/common/nvml.rs\n");
        if let Some(driver) = &self.driver {
            let _ = writeln!(text, "driver {driver}");
        }
        let optional = |v: Option<u32>| v.map_or("na".to_string(), |v| v.to_string());
        for (index, d) in self.devices.iter().enumerate() {
            let free = d.free_mib.unwrap_or(d.total_mib.saturating_sub(d.used_mib).saturating_sub(d.reserved_mib));
            let uuid = d.uuid.as_ref().map(|u| format!(" uuid={u}")).unwrap_or_default();
            let _ = writeln!(
                text,
                "device {index} total={}MiB used={}MiB free={free}MiB reserved={}MiB util={} temp={} mig={}{uuid} name={}",
                d.total_mib,
                d.used_mib,
                d.reserved_mib,
                optional(d.utilization_pct),
                optional(d.temperature_c),
                u8::from(d.mig),
                d.name
            );
        }
        for p in &self.processes {
            let list = if p.list == List::Compute { "compute" } else { "graphics" };
            let figure = p.used_mib.map_or("na".to_string(), |m| format!("{m}MiB"));
            let late = if p.late { " late" } else { "" };
            let _ = writeln!(text, "process {} {list} {} {figure}{late}", p.device, p.pid);
        }
        for e in &self.errors {
            let device = e.device.map(|d| format!(" device={d}")).unwrap_or_default();
            let when = match e.when {
                When::Always => "always".to_string(),
                When::Once => "once".to_string(),
                When::After(n) => format!("after={n}"),
                When::UntilInit => "until_init".to_string(),
            };
            let _ = writeln!(text, "error {}{device} code={} {when}", e.function, e.code);
        }
        for d in &self.delays {
            let device = d.device.map(|n| format!(" device={n}")).unwrap_or_default();
            let _ = writeln!(text, "delay {}{device} ms={}", d.function, d.ms);
        }
        if let Some(claims) = &self.claims {
            let _ = writeln!(text, "claims {}", claims.display());
        }
        text
    }

    /// Replaces the state file in `dir` (atomically: the stand-in never reads half a file).
    pub fn write_to(&self, dir: &Path) {
        super::write_atomically(&dir.join(STATE_FILE), &self.render());
    }
}

/// A `[gpu]` config on the stand-in at `library`, sampled every `interval`, without reserve, and
/// AMD's sysfs root pointed at an empty directory so that `auto` never finds a real card.
pub fn config(probe: &str, library: &Path, interval: &str, empty_dir: &Path) -> String {
    format!(
        "[gpu]\nprobe = \"{probe}\"\nsample_interval = \"{interval}\"\nreserve_mib = 0\n[gpu.nvml]\nlibrary = \"{}\"\n[gpu.amd]\nsysfs_root = \"{}\"\n",
        library.display(),
        empty_dir.display()
    )
}

impl State {
    /// Replaces the state file in `dir` with this state plus `extra` lines (for items `State`
    /// has no field for, such as `late_once` processes).
    pub fn write_with(&self, dir: &Path, extra: &str) {
        super::write_atomically(&dir.join(STATE_FILE), &format!("{}{extra}", self.render()));
    }
}
