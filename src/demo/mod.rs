//! `vramgate serve --demo`: the daemon on a simulated 8 GiB GPU with a "desktop" and three demo
//! models, all inside one temp dir, so that a newcomer without a GPU sees the main job (loading
//! on demand, and evicting to make room) with nothing but the `vramgate` binary.
//!
//! The demo models are [`model_server`] run by this same binary (`vramgate demo-model`, hidden
//! from `--help`), so the demo works after `cargo install` with nothing else on disk. The setup is
//! an ordinary config file written into the temp dir and loaded like any other, so the user can
//! read it, and the demo exercises the same paths as a real setup.
//!
//! The numbers are chosen so that one sequence shows an eviction: usable memory is 8192 − 512 =
//! 7680 MiB = desktop 1024 + `llm` 5120 + `stt` 1536, so with `llm` and `stt` loaded the GPU is
//! full, and asking for `vision` (3072) must evict one of them. `stt` has the higher priority, so
//! the victim is `llm`, whatever was used last.

pub mod model_server;

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// The simulated device's name, as status shows it.
pub const DEVICE_NAME: &str = "Demo GPU (simulated 8 GiB)";
/// The simulated device's size.
pub const DEVICE_MIB: u64 = 8192;
/// What the config keeps free (the default `gpu.reserve_mib`, written out so the file explains it).
pub const RESERVE_MIB: u64 = 512;
/// What the simulated desktop session uses, as the named consumer `desktop`.
pub const DESKTOP_MIB: u64 = 1024;

/// One model of the demo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoModel {
    /// The model id requests name.
    pub id: &'static str,
    /// What it stands for, for the printed overview and the config's comments.
    pub kind: &'static str,
    /// Its simulated footprint (declared and claimed).
    pub mib: u64,
    /// Its priority: a request may evict only models of priority at most its own.
    pub priority: i32,
    /// Other names requests may use.
    pub aliases: &'static [&'static str],
    /// How long it takes to "load its weights", so loading is visible in status and events.
    pub load_delay: &'static str,
    /// Its canned answer to every chat, completion and transcription.
    pub reply: &'static str,
}

/// The demo's models. `stt` outranks the others because live speech cannot wait for a reload.
pub const MODELS: [DemoModel; 3] = [
    DemoModel {
        id: "llm",
        kind: "chat LLM",
        mib: 5120,
        priority: 50,
        aliases: &["chat"],
        load_delay: "1500ms",
        reply: "Hello! This is vramgate's demo model `llm`, a stand-in for a 5 GiB chat LLM on a simulated GPU. \
                vramgate started me when your request came in, and it unloads me after 10 idle minutes, or \
                earlier when a model of equal or higher priority needs the room.",
    },
    DemoModel {
        id: "stt",
        kind: "speech-to-text model",
        mib: 1536,
        priority: 80,
        aliases: &[],
        load_delay: "1s",
        reply: "This is vramgate's demo model `stt`, a stand-in for a 1.5 GiB speech-to-text model: a real one \
                would write out what was said in your audio.",
    },
    DemoModel {
        id: "vision",
        kind: "vision model",
        mib: 3072,
        priority: 50,
        aliases: &[],
        load_delay: "1500ms",
        reply: "This is vramgate's demo model `vision`, a stand-in for a 3 GiB vision model: a real one would \
                describe your picture. If the GPU was full, vramgate made room by evicting an idle model of \
                equal or lower priority; `vramgate status` shows which.",
    },
];

/// The delay between streamed words: slow enough to see the streaming, fast enough not to bore.
const TOKEN_DELAY: &str = "20ms";

/// The demo's temp dir: its config, state, logs and simulated device. Removed by
/// [`Demo::remove`] (or, failing that, when dropped).
#[derive(Debug)]
pub struct Demo {
    dir: tempfile::TempDir,
    config_path: PathBuf,
}

impl Demo {
    /// Creates the temp dir (under `$TMPDIR`), the desktop's claim and the config, whose models
    /// run `exe demo-model`.
    pub fn create(exe: &Path) -> anyhow::Result<Demo> {
        let dir = tempfile::Builder::new()
            .prefix("vramgate-demo-")
            .tempdir()
            .context("cannot create a temp dir for the demo (is $TMPDIR writable?)")?;
        let device_dir = dir.path().join("sim").join("0");
        std::fs::create_dir_all(&device_dir)
            .with_context(|| format!("cannot create the simulated device {}", device_dir.display()))?;
        let desktop = device_dir.join("desktop");
        std::fs::write(&desktop, DESKTOP_MIB.to_string())
            .with_context(|| format!("cannot write the desktop's claim {}", desktop.display()))?;
        let text = config_text(dir.path(), exe)?;
        let config_path = dir.path().join("vramgate.toml");
        std::fs::write(&config_path, text)
            .with_context(|| format!("cannot write the demo config {}", config_path.display()))?;
        Ok(Demo { dir, config_path })
    }

    /// The temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The config file in it.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Removes the temp dir and everything in it.
    pub fn remove(self) -> std::io::Result<()> {
        self.dir.close()
    }

    /// What `serve --demo` prints after the listening line: the setup and three things to try.
    pub fn intro(&self, addr: SocketAddr, vramgate: &str) -> String {
        intro(addr, vramgate, self.config_path(), self.dir())
    }
}

/// A TOML string literal (quoted and escaped).
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// A path as a TOML string literal; the config is UTF-8, so the path must be too.
fn toml_path(path: &Path) -> anyhow::Result<String> {
    path.to_str().map(toml_string).with_context(|| format!("the path {} is not UTF-8", path.display()))
}

/// The demo's config file for a temp dir `dir` and the binary `exe` that serves the models.
pub fn config_text(dir: &Path, exe: &Path) -> anyhow::Result<String> {
    let sim_dir = dir.join("sim");
    let exe_toml = toml_path(exe).context("cannot name this vramgate binary in the demo config")?;
    let sim_toml = toml_path(&sim_dir)?;
    let usable = DEVICE_MIB - RESERVE_MIB;
    let mut text = format!(
        "# The config of `vramgate serve --demo`, written into its temp dir and removed with it.\n\
         #\n\
         # A simulated GPU: each file in the directory `[gpu.sim] dir`/0 is a user of its memory\n\
         # (a pid's file counts while that process lives). The file `desktop` plays a desktop\n\
         # session using {desktop} MiB; each demo model writes its own file once it has loaded.\n\
         \n\
         [server]\n\
         state_dir = {state}\n\
         \n\
         [gpu]\n\
         probe = \"sim\"\n\
         # Kept free: {total} - {reserve} = {usable} MiB usable = desktop {desktop} + llm {llm} + stt {stt}.\n\
         reserve_mib = {reserve}\n\
         \n\
         [gpu.sim]\n\
         dir = {sim_toml}\n\
         devices = [{{ name = {name}, total_mib = {total} }}]\n\
         \n\
         # Models unload after 10 idle minutes (the default ttl). Each is the demo model server built\n\
         # into vramgate, with its own size, load time and canned answer.\n",
        llm = MODELS[0].mib,
        stt = MODELS[1].mib,
        state = toml_path(&dir.join("state"))?,
        name = toml_string(DEVICE_NAME),
        total = DEVICE_MIB,
        reserve = RESERVE_MIB,
        desktop = DESKTOP_MIB,
    );
    for model in &MODELS {
        let args = [
            "demo-model",
            "--port",
            "${PORT}",
            "--sim-dir",
            // Already checked to be UTF-8 above; an empty string cannot happen.
            sim_dir.to_str().unwrap_or_default(),
            "--vram",
            &model.mib.to_string(),
            "--name",
            model.id,
            "--load-delay",
            model.load_delay,
            "--token-delay",
            TOKEN_DELAY,
            "--reply",
            model.reply,
        ];
        let cmd: Vec<String> = std::iter::once(exe_toml.clone()).chain(args.iter().map(|a| toml_string(a))).collect();
        let aliases: Vec<String> = model.aliases.iter().map(|a| toml_string(a)).collect();
        let _ = write!(
            text,
            "\n# {id}: a {kind}, {size}, priority {priority}\n[models.{id}]\nbackend = \"process\"\ncmd = [{cmd}]\nvram = {mib}\npriority = {priority}\n",
            kind = model.kind,
            size = gib(model.mib),
            id = model.id,
            cmd = cmd.join(", "),
            mib = model.mib,
            priority = model.priority,
        );
        if !aliases.is_empty() {
            let _ = writeln!(text, "aliases = [{}]", aliases.join(", "));
        }
    }
    Ok(text)
}

/// A size for people: `5 GiB`, `1.5 GiB`.
fn gib(mib: u64) -> String {
    if mib.is_multiple_of(1024) { format!("{} GiB", mib / 1024) } else { format!("{:.1} GiB", mib as f64 / 1024.0) }
}

/// The three command lines to try, for a daemon at `addr` run by the command `vramgate`: chat
/// with `llm`, load `stt` (the GPU is then full), ask `vision` (which evicts `llm`). Each works
/// as printed with only curl and the binary; `--url` appears only when the address is not the
/// default, where the CLI finds the daemon by itself.
pub fn try_lines(addr: SocketAddr, vramgate: &str) -> [String; 3] {
    let url = format!("http://{addr}");
    let chat = |model: &str, content: &str| {
        format!(
            "curl -s -w '\\n' {url}/v1/chat/completions -H 'Content-Type: application/json' \
             -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"{content}\"}}]}}'"
        )
    };
    [chat("llm", "Hello"), format!("{vramgate} load stt{}", url_flag(addr)), chat("vision", "What is in this picture?")]
}

/// ` --url http://ADDR` when `addr` is not where the CLI looks by default, else nothing.
fn url_flag(addr: SocketAddr) -> String {
    if needs_url(addr, std::env::var("VRAMGATE_URL").ok().as_deref()) {
        format!(" --url http://{addr}")
    } else {
        String::new()
    }
}

/// Whether a printed `vramgate` line must name the demo's URL: when the demo is not where the CLI
/// looks by default, which is `VRAMGATE_URL` if the user set one (it may name their own daemon),
/// else the default address.
fn needs_url(addr: SocketAddr, env_url: Option<&str>) -> bool {
    match env_url.map(|u| u.trim().trim_end_matches('/')).filter(|u| !u.is_empty()) {
        Some(url) => url != format!("http://{addr}"),
        None => addr != crate::config::default_listen(),
    }
}

/// The block printed after the listening line: what the demo is, where its files are, three
/// lines to try and how to stop it.
pub fn intro(addr: SocketAddr, vramgate: &str, config_path: &Path, dir: &Path) -> String {
    let [chat, load, vision] = try_lines(addr, vramgate);
    let usable = DEVICE_MIB - RESERVE_MIB;
    let mut text = format!(
        "\nvramgate demo: a simulated {total} GPU, {name:?}: {reserve} MiB kept free, {desktop} used\n\
         by a \"desktop\", and three demo models that vramgate loads when a request needs them:\n",
        total = gib(DEVICE_MIB),
        name = DEVICE_NAME,
        reserve = RESERVE_MIB,
        desktop = gib(DESKTOP_MIB),
    );
    for model in &MODELS {
        let aliases =
            if model.aliases.is_empty() { String::new() } else { format!(" (alias {})", model.aliases.join(", ")) };
        let _ = writeln!(
            text,
            "  {:<7} {:>7}  {}{aliases}, priority {}",
            model.id,
            gib(model.mib),
            model.kind,
            model.priority
        );
    }
    let url = url_flag(addr);
    let _ = write!(
        text,
        "Config: {config}\n\
         \n\
         Try these in another terminal, one at a time:\n\
         \n\
         1. Chat with llm: vramgate loads it ({llm}) for the request, then answers.\n\
         {chat}\n\
         \n\
         2. Load stt too: the GPU is now full (desktop {desktop} + llm {llm} + stt {stt} = the {usable} usable).\n\
         {load}\n\
         \n\
         3. Ask vision: there is no room, so vramgate evicts the idle llm (stt has a higher priority and stays).\n\
         {vision}\n\
         \n\
         `{vramgate} status{url}` shows who holds what; `{vramgate} events{url}` follows changes as they happen.\n\
         Ctrl-C stops the demo and removes {dir}.",
        config = config_path.display(),
        llm = gib(MODELS[0].mib),
        stt = gib(MODELS[1].mib),
        desktop = gib(DESKTOP_MIB),
        usable = gib(usable),
        dir = dir.display(),
    );
    text
}

/// How the user should type this binary: `vramgate` when the `vramgate` found on `PATH` is this
/// very file, else its full path (after `cargo run`, it is not on `PATH`), quoted for a shell.
pub fn command_name(exe: &Path) -> String {
    command_name_in(exe, std::env::var_os("PATH").as_deref())
}

/// [`command_name`] with the `PATH` value given.
fn command_name_in(exe: &Path, path_var: Option<&OsStr>) -> String {
    let on_path = path_var
        .into_iter()
        .flat_map(std::env::split_paths)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join("vramgate"))
        .find(|candidate| is_executable(candidate));
    let same = |a: &Path, b: &Path| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if on_path.is_some_and(|found| same(&found, exe)) {
        return "vramgate".to_owned();
    }
    let full = exe.to_string_lossy();
    shlex::try_quote(&full).map(|quoted| quoted.into_owned()).unwrap_or_else(|_| full.into_owned())
}

/// Whether `path` is a file a shell would run (what `PATH` lookup finds first).
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_numbers_fill_the_gpu_with_llm_and_stt_and_vision_needs_llms_room() {
        let usable = DEVICE_MIB - RESERVE_MIB;
        let [llm, stt, vision] = MODELS;
        assert_eq!(DESKTOP_MIB + llm.mib + stt.mib, usable);
        // Evicting stt alone is not enough, evicting llm is: llm is the only possible victim
        // even before priorities are considered.
        assert!(vision.mib > stt.mib && vision.mib <= llm.mib);
        assert!(stt.priority > vision.priority && llm.priority <= vision.priority);
    }

    #[test]
    fn asking_for_vision_on_the_full_gpu_evicts_llm_whichever_was_used_last() {
        use crate::policy::{Decision, DeviceState, Request, Resident, decide};
        let [llm, stt, vision] = MODELS;
        let device = DeviceState { index: 0, usable_mib: DEVICE_MIB - RESERVE_MIB, foreign_mib: DESKTOP_MIB };
        let resident = |model: DemoModel, last_used| Resident {
            id: model.id.to_owned(),
            device: 0,
            footprint_mib: model.mib,
            priority: model.priority,
            in_use: 0,
            pinned: false,
            ready: true,
            last_used,
            resident_since: 0,
            min_residency: 0,
        };
        let request = Request {
            requester: vision.id.to_owned(),
            mib: vision.mib,
            device: None,
            priority: vision.priority,
            exclusive: false,
        };
        for (llm_used, stt_used) in [(1_000, 2_000), (2_000, 1_000)] {
            let residents = [resident(llm, llm_used), resident(stt, stt_used)];
            assert_eq!(
                decide(std::slice::from_ref(&device), &residents, &[], &request, 3_000),
                Decision::Evict { device: 0, victims: vec!["llm".to_owned()] }
            );
        }
        // And stt fits next to llm without evicting anything: the GPU is exactly full.
        let stt_request = Request { requester: "stt".to_owned(), mib: stt.mib, priority: stt.priority, ..request };
        assert_eq!(
            decide(std::slice::from_ref(&device), &[resident(llm, 1_000)], &[], &stt_request, 3_000),
            Decision::Admit { device: 0 }
        );
    }

    #[test]
    fn try_lines_at_the_default_address_name_no_url() {
        let [chat, load, vision] = try_lines(crate::config::default_listen(), "vramgate");
        assert_eq!(
            chat,
            "curl -s -w '\\n' http://127.0.0.1:9777/v1/chat/completions -H 'Content-Type: application/json' \
             -d '{\"model\": \"llm\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'"
        );
        assert_eq!(load, "vramgate load stt");
        assert!(vision.starts_with("curl -s -w '\\n' http://127.0.0.1:9777/v1/chat/completions "), "{vision}");
        assert!(vision.contains("\"model\": \"vision\""), "{vision}");
    }

    #[test]
    fn a_vramgate_url_of_the_users_own_is_overridden_in_the_printed_lines() {
        let default = crate::config::default_listen();
        assert!(!needs_url(default, None));
        assert!(!needs_url(default, Some("")), "an empty VRAMGATE_URL counts as unset");
        assert!(!needs_url(default, Some("http://127.0.0.1:9777/")));
        assert!(needs_url(default, Some("http://192.168.1.5:9777")), "the user's daemon elsewhere");
        let other: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
        assert!(needs_url(other, None));
        assert!(!needs_url(other, Some("http://127.0.0.1:4000")));
    }

    #[test]
    fn try_lines_elsewhere_pass_the_url_to_the_cli() {
        let addr: SocketAddr = "127.0.0.1:40123".parse().unwrap();
        let [chat, load, _] = try_lines(addr, "/opt/my\\ bin/vramgate");
        assert!(chat.contains(" http://127.0.0.1:40123/v1/chat/completions "), "{chat}");
        assert_eq!(load, "/opt/my\\ bin/vramgate load stt --url http://127.0.0.1:40123");
        let text = intro(addr, "vg", Path::new("/tmp/d/vramgate.toml"), Path::new("/tmp/d"));
        assert!(text.contains("`vg status --url http://127.0.0.1:40123`"), "{text}");
        assert!(text.contains("`vg events --url http://127.0.0.1:40123`"), "{text}");
        assert!(text.contains("Config: /tmp/d/vramgate.toml\n"), "{text}");
        assert!(text.ends_with("removes /tmp/d."), "{text}");
        let ipv6: SocketAddr = "[::1]:9777".parse().unwrap();
        assert_eq!(try_lines(ipv6, "vg")[1], "vg load stt --url http://[::1]:9777");
    }

    #[test]
    fn the_command_is_vramgate_only_when_path_finds_this_binary() {
        let dir = tempfile::tempdir().unwrap();
        let bin_dir = dir.path().join("bin");
        std::fs::create_dir(&bin_dir).unwrap();
        let exe = dir.path().join("with space").join("vramgate");
        std::fs::create_dir(exe.parent().unwrap()).unwrap();
        std::fs::write(&exe, "").unwrap();
        std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let quoted = format!("'{}'", exe.display());

        // Not on PATH at all, or another vramgate first on PATH: the full path, quoted.
        assert_eq!(command_name_in(&exe, None), quoted);
        let other = bin_dir.join("vramgate");
        std::fs::write(&other, "").unwrap();
        std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let path_var = std::env::join_paths([&bin_dir, exe.parent().unwrap()]).unwrap();
        assert_eq!(command_name_in(&exe, Some(&path_var)), quoted);

        // PATH finds this binary, also through a symlink.
        std::fs::remove_file(&other).unwrap();
        assert_eq!(command_name_in(&exe, Some(&path_var)), "vramgate");
        std::os::unix::fs::symlink(&exe, &other).unwrap();
        let only_link = std::env::join_paths([&bin_dir]).unwrap();
        assert_eq!(command_name_in(&exe, Some(&only_link)), "vramgate");
    }

    #[test]
    fn the_config_parses_and_runs_this_binary_on_the_temp_dirs_sim_device() {
        let dir = Path::new("/tmp/vramgate-demo-x y");
        let exe = Path::new("/home/me/.cargo/bin/vramgate");
        let text = config_text(dir, exe).unwrap();
        let config = crate::config::Config::parse(&text, None).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(config.gpu.probe, crate::config::ProbeChoice::Sim);
        assert_eq!(config.gpu.reserve_mib.0, RESERVE_MIB);
        assert_eq!(config.server.state_dir.as_deref(), Some(dir.join("state").as_path()));
        let sim = config.gpu.sim.as_ref().unwrap();
        assert_eq!(sim.dir, dir.join("sim"));
        assert_eq!((sim.devices[0].name.as_str(), sim.devices[0].total_mib.0), (DEVICE_NAME, DEVICE_MIB));
        let specs = config.model_specs();
        for model in &MODELS {
            let spec = specs.iter().find(|s| s.id == model.id).unwrap();
            assert_eq!((spec.declared_mib, spec.priority), (Some(model.mib), model.priority));
            let process = spec.process().unwrap();
            assert_eq!(process.argv[..2], [exe.to_str().unwrap(), "demo-model"]);
            let reply_at = process.argv.iter().position(|a| a == "--reply").unwrap();
            assert_eq!(process.argv[reply_at + 1], model.reply);
            assert!(process.argv.windows(2).any(|w| w[0] == "--sim-dir" && w[1] == "/tmp/vramgate-demo-x y/sim"));
            assert_eq!(spec.aliases, model.aliases);
        }
    }
}
