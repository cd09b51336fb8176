//! What installing vramgate like a daemon needs: shell completions and man pages generated from
//! the command line's own definitions, the systemd units in `dist/systemd/` (checked structurally
//! always, and by `systemd-analyze verify` where it is installed), and the readiness
//! notification the units' `Type=notify` relies on.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;

/// The repository's unit files: (where it is installed, its path here).
fn units() -> [(&'static str, PathBuf); 2] {
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/systemd");
    [("user", dist.join("user/vramgate.service")), ("system", dist.join("system/vramgate.service"))]
}

/// Runs `vramgate ARGS` through the test harness (`common::vramgate()`: no daemon, no user
/// files), with a fresh scratch directory for the test's own files.
fn vramgate(args: &[&str]) -> (Output, tempfile::TempDir) {
    let scratch = tempfile::tempdir().expect("tempdir");
    let output = common::output(common::vramgate().args(args));
    (output, scratch)
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("utf-8 stdout")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Shell completions

#[test]
fn completions_generate_for_bash_zsh_and_fish() {
    // Each shell's own marker that the text is a completion script for `vramgate`, and the
    // interpreter that can check its syntax without running it, where installed.
    let shells = [
        ("bash", "complete -F _vramgate", ["bash", "-n"]),
        ("zsh", "#compdef vramgate", ["zsh", "-n"]),
        ("fish", "complete -c vramgate", ["fish", "--no-execute"]),
    ];
    for (shell, marker, syntax_check) in shells {
        let (output, home) = vramgate(&["completions", shell]);
        assert!(output.status.success(), "{shell}: {:?}\n{}", output.status, stderr(&output));
        let script = stdout(&output);
        assert!(script.contains(marker), "{shell}: no {marker:?} in\n{script}");
        // hermetic: a list of subcommand names to find in the script; nothing runs
        for subcommand in ["serve", "status", "events", "load", "unload", "run", "config", "completions", "man"] {
            assert!(script.contains(subcommand), "{shell}: the script does not offer {subcommand}");
        }
        // Options of subcommands are completed too, not just the subcommand names.
        assert!(script.contains("listen") && script.contains("json"), "{shell}: options missing");

        let path = home.path().join(format!("vramgate.{shell}"));
        std::fs::write(&path, &script).expect("write script");
        match Command::new(syntax_check[0]).arg(syntax_check[1]).arg(&path).output() {
            Ok(checked) => assert!(
                checked.status.success(),
                "{} {} rejects the script: {}",
                syntax_check[0],
                syntax_check[1],
                String::from_utf8_lossy(&checked.stderr)
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("{} not installed: the {shell} script's syntax is not checked", syntax_check[0]);
            }
            Err(e) => panic!("cannot run {}: {e}", syntax_check[0]),
        }
    }
}

/// Runs the bash script's completion function for `words` (the cursor on the last word) and
/// returns what it offers.
fn bash_completes(script: &Path, words: &[&str]) -> Vec<String> {
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let current = words.last().expect("a word");
    let previous = words.len().checked_sub(2).map_or("", |i| words[i]);
    let program = format!(
        "source '{}'; COMP_WORDS=({}); COMP_CWORD={}; _vramgate vramgate '{current}' '{previous}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        quoted.join(" "),
        words.len() - 1
    );
    let output = common::output(Command::new("bash").args(["--norc", "--noprofile", "-c", &program]));
    assert!(output.status.success(), "{}", stderr(&output));
    stdout(&output).lines().map(str::to_owned).collect()
}

#[test]
fn the_bash_script_completes_subcommands_options_and_shells() {
    let (output, home) = vramgate(&["completions", "bash"]);
    assert!(output.status.success());
    let script = home.path().join("vramgate.bash");
    std::fs::write(&script, &output.stdout).expect("write script");
    // hermetic: completion candidates; bash runs the completion function, not vramgate
    assert_eq!(bash_completes(&script, &["vramgate", "s"]), ["serve", "status"]);
    assert_eq!(bash_completes(&script, &["vramgate", "serve", "--li"]), ["--listen"]);
    let shells = bash_completes(&script, &["vramgate", "completions", ""]);
    for shell in ["bash", "zsh", "fish"] {
        assert!(shells.iter().any(|s| s == shell), "{shell} not offered: {shells:?}");
    }
}

#[test]
fn an_unknown_shell_is_a_clear_error() {
    let (output, _home) = vramgate(&["completions", "tcsh"]);
    assert_eq!(output.status.code(), Some(2), "{:?}", output.status);
    assert!(output.stdout.is_empty(), "nothing on stdout: {}", stdout(&output));
    let error = stderr(&output);
    assert!(error.contains("invalid value 'tcsh'"), "{error}");
    assert!(error.contains("bash") && error.contains("zsh") && error.contains("fish"), "names the shells: {error}");

    let (output, _home) = vramgate(&["completions"]);
    assert_eq!(output.status.code(), Some(2), "{:?}", output.status);
    assert!(stderr(&output).contains("<SHELL>"), "{}", stderr(&output));
}

// ---------------------------------------------------------------------------------------------
// Man pages

#[test]
fn man_prints_vramgate_1_in_roff_with_its_subcommands() {
    let (output, _home) = vramgate(&["man"]);
    assert!(output.status.success(), "{:?}\n{}", output.status, stderr(&output));
    let page = stdout(&output);
    assert!(page.lines().any(|line| line.starts_with(".TH vramgate 1 ")), "no .TH line:\n{page}");
    for section in [".SH NAME", ".SH SYNOPSIS", ".SH DESCRIPTION", ".SH SUBCOMMANDS"] {
        assert!(page.contains(section), "no {section}:\n{page}");
    }
    // roff escapes the dash: each subcommand is listed by the name of its own page.
    // hermetic: a list of subcommand names to find in the page; nothing runs
    for subcommand in ["serve", "status", "events", "run", "config", "completions", "man"] {
        let reference = format!("vramgate\\-{subcommand}(1)");
        assert!(page.contains(&reference), "no {reference} in\n{page}");
    }
    assert!(!page.contains("vramgate\\-help(1)"), "clap's help subcommand gets no page:\n{page}");
}

#[test]
fn man_dir_writes_a_page_per_subcommand_and_lists_them() {
    let home = tempfile::tempdir().expect("tempdir");
    let dir = home.path().join("share/man/man1");
    let dir_arg = dir.to_str().expect("utf-8 temp path");
    let (output, _home) = vramgate(&["man", "--dir", dir_arg]);
    assert!(output.status.success(), "{:?}\n{}", output.status, stderr(&output));
    let listed: Vec<PathBuf> = stdout(&output).lines().map(PathBuf::from).collect();
    for name in ["vramgate", "vramgate-serve", "vramgate-status", "vramgate-run", "vramgate-config-check"] {
        let path = dir.join(format!("{name}.1"));
        assert!(listed.contains(&path), "{} not listed in {listed:?}", path.display());
        let page = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(page.lines().any(|line| line.starts_with(&format!(".TH {name} 1 "))), "{name}:\n{page}");
    }
    let serve = std::fs::read_to_string(dir.join("vramgate-serve.1")).expect("serve page");
    for option in ["\\-\\-config", "\\-\\-listen", "VRAMGATE_CONFIG"] {
        assert!(serve.contains(option), "the serve page documents {option}:\n{serve}");
    }
    for path in &listed {
        assert!(path.is_file(), "{} listed but not written", path.display());
    }
}

#[test]
fn man_dir_that_cannot_be_created_is_a_clear_error() {
    let home = tempfile::tempdir().expect("tempdir");
    let file = home.path().join("not-a-dir");
    std::fs::write(&file, "").expect("write");
    let target = file.join("man1");
    let (output, _home) = vramgate(&["man", "--dir", target.to_str().expect("utf-8")]);
    assert_eq!(output.status.code(), Some(1), "{:?}", output.status);
    let error = stderr(&output);
    assert!(error.contains("cannot create the directory") && error.contains("not-a-dir"), "{error}");
}

// ---------------------------------------------------------------------------------------------
// systemd units

/// A unit file: section → key → every value the key was given, in order (systemd allows repeats).
type Unit = BTreeMap<String, BTreeMap<String, Vec<String>>>;

/// Parses a unit file as systemd reads it: `[Section]` headers, `Key=Value` lines, `#` and `;`
/// comments, backslash-continued lines. Anything else names its line.
fn parse_unit(path: &Path) -> Unit {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut unit = Unit::new();
    let mut section: Option<String> = None;
    let mut pending = String::new();
    for (index, raw) in text.lines().enumerate() {
        let number = index + 1;
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';')) {
            continue;
        }
        if let Some(continued) = line.strip_suffix('\\') {
            pending.push_str(continued);
            pending.push(' ');
            continue;
        }
        let line = format!("{pending}{line}");
        pending.clear();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            unit.entry(name.to_owned()).or_default();
            section = Some(name.to_owned());
            continue;
        }
        let (key, value) =
            line.split_once('=').unwrap_or_else(|| panic!("{}:{number}: not Key=Value: {raw:?}", path.display()));
        let section = section.as_ref().unwrap_or_else(|| panic!("{}:{number}: key before any section", path.display()));
        let key = key.trim();
        assert!(
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric()),
            "{}:{number}: bad key {key:?}",
            path.display()
        );
        unit.entry(section.clone()).or_default().entry(key.to_owned()).or_default().push(value.trim().to_owned());
    }
    assert!(pending.is_empty(), "{}: ends inside a continued line", path.display());
    unit
}

/// The one value of `section.key`, or a failure naming the file.
fn value<'a>(unit: &'a Unit, path: &Path, section: &str, key: &str) -> &'a str {
    let values = unit.get(section).and_then(|s| s.get(key));
    match values.map(Vec::as_slice) {
        Some([one]) => one,
        other => panic!("{}: [{section}] {key} should be set once, found {other:?}", path.display()),
    }
}

/// A systemd time span: `15s`, `1min 30s`, `500ms`, or a bare number of seconds.
fn systemd_span(text: &str) -> Duration {
    match text.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => humantime::parse_duration(text).unwrap_or_else(|e| panic!("not a time span: {text:?}: {e}")),
    }
}

/// The longest stop the units allow before systemd kills everything (the smaller of the two).
fn unit_stop_timeout() -> Duration {
    units()
        .iter()
        .map(|(_, path)| systemd_span(value(&parse_unit(path), path, "Service", "TimeoutStopSec")))
        .min()
        .expect("two units")
}

/// How long the daemon may take to stop, at most, by its own documented bounds (ARCHITECTURE.md,
/// "Shutdown is bounded"; `src/daemon.rs`): 0.7 s for open connections, 3 s for the model
/// processes (SIGTERM, SIGKILL after 1.5 s), 0.1 s for the monitor and 0.1 s for the runtime.
/// `a_daemon_under_systemd_notifies_ready_and_stopping` measures a real stop against the units.
const DAEMON_WORST_STOP: Duration = Duration::from_millis(700 + 3000 + 100 + 100);

#[test]
fn systemd_units_have_what_the_daemon_needs() {
    for (scope, path) in units() {
        let unit = parse_unit(&path);
        let sections: Vec<&str> = unit.keys().map(String::as_str).collect();
        assert_eq!(sections, ["Install", "Service", "Unit"], "{}", path.display());
        assert!(!value(&unit, &path, "Unit", "Description").is_empty());
        assert_eq!(value(&unit, &path, "Service", "Type"), "notify", "{}: vramgate sends READY=1", path.display());
        assert_eq!(value(&unit, &path, "Service", "KillMode"), "mixed", "{}", path.display());
        assert_eq!(value(&unit, &path, "Service", "Restart"), "on-failure", "{}", path.display());
        assert_eq!(value(&unit, &path, "Service", "StateDirectory"), "vramgate", "{}", path.display());
        // A bad config exits 2: restarting cannot fix it.
        assert_eq!(value(&unit, &path, "Service", "RestartPreventExitStatus"), "2", "{}", path.display());

        let stop = systemd_span(value(&unit, &path, "Service", "TimeoutStopSec"));
        assert!(
            stop >= 2 * DAEMON_WORST_STOP,
            "{}: TimeoutStopSec={stop:?} leaves no margin over the daemon's worst-case stop {DAEMON_WORST_STOP:?}",
            path.display()
        );

        let exec: Vec<&str> = value(&unit, &path, "Service", "ExecStart").split_whitespace().collect();
        // hermetic: reads the unit's ExecStart; nothing runs
        assert!(exec[0].ends_with("/vramgate") && exec.get(1) == Some(&"serve"), "{}: {exec:?}", path.display());
        let config = exec.iter().position(|w| *w == "--config").and_then(|i| exec.get(i + 1));
        let wanted = match scope {
            "user" => "%E/vramgate/vramgate.toml",
            _ => "/etc/vramgate/vramgate.toml",
        };
        assert_eq!(config, Some(&wanted), "{}: {exec:?}", path.display());

        let target = value(&unit, &path, "Install", "WantedBy");
        let expected_target = if scope == "user" { "default.target" } else { "multi-user.target" };
        assert_eq!(target, expected_target, "{}", path.display());

        if scope == "system" {
            // The daemon's state directory is $XDG_STATE_HOME/vramgate: under StateDirectory=.
            let environment = unit["Service"]["Environment"].join(" ");
            assert!(environment.split_whitespace().any(|v| v == "XDG_STATE_HOME=%S"), "{}", path.display());
            let service = &unit["Service"];
            assert!(!service.contains_key("PrivateDevices"), "{}: the GPUs must stay visible", path.display());
            assert!(!service.contains_key("DeviceAllow"), "{}: the GPUs must stay visible", path.display());
            assert!(!service.contains_key("ProtectClock"), "{}: implies DeviceAllow=", path.display());
            assert!(service.contains_key("DynamicUser") || service.contains_key("User"), "{}", path.display());
        }
    }
}

#[test]
fn the_unit_parser_rejects_what_systemd_would_not_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broken.service");
    std::fs::write(&path, "[Service]\nType=notify\nthis line has no equals sign\n").expect("write");
    let failure = std::panic::catch_unwind(|| parse_unit(&path)).expect_err("rejected");
    let message = failure.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("broken.service:3"), "{message}");
    assert_eq!(systemd_span("15"), Duration::from_secs(15));
    assert_eq!(systemd_span("1min 30s"), Duration::from_secs(90));
}

/// `systemd-analyze verify` on copies of the units whose `ExecStart=` names the binary under test
/// (verify insists that the program exists) and whose `Documentation=` man pages are the ones
/// `vramgate man --dir` writes. It runs without a running systemd, as root in a container too.
/// It reports unknown keys and bad values as warnings with exit status 0, so any line naming the
/// unit fails the test.
#[test]
fn systemd_analyze_verifies_the_units() {
    match Command::new("systemd-analyze").arg("--version").output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => panic!("systemd-analyze --version failed: {}", stderr(&output)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("systemd-analyze not installed: the units get the structural check only");
            return;
        }
        Err(e) => panic!("cannot run systemd-analyze: {e}"),
    }
    let work = tempfile::tempdir().expect("tempdir");
    let man_dir = work.path().join("man");
    let (output, _home) = vramgate(&["man", "--dir", man_dir.join("man1").to_str().expect("utf-8")]);
    assert!(output.status.success(), "{}", stderr(&output));
    // Without `man`, verify cannot look the pages up; checking the rest still counts.
    let has_man = Command::new("man").arg("--version").output().is_ok_and(|o| o.status.success());

    for (scope, path) in units() {
        let text = std::fs::read_to_string(&path).expect("unit");
        let original = text.lines().find(|l| l.starts_with("ExecStart=")).expect("ExecStart");
        let program = original["ExecStart=".len()..].split_whitespace().next().expect("program");
        let copy_dir = work.path().join(scope);
        std::fs::create_dir_all(&copy_dir).expect("mkdir");
        let copy = copy_dir.join("vramgate.service");
        std::fs::write(
            &copy,
            text.replacen(&format!("ExecStart={program}"), &format!("ExecStart={}", common::bin()), 1),
        )
        .expect("write copy");

        let runtime = work.path().join(format!("runtime-{scope}"));
        std::fs::create_dir_all(&runtime).expect("mkdir");
        let mut verify = Command::new("systemd-analyze");
        if scope == "user" {
            verify.arg("--user");
        }
        verify.arg("verify");
        if !has_man {
            verify.arg("--man=no");
        }
        let output = common::output(
            verify
                .arg(&copy)
                .env("MANPATH", &man_dir)
                .env("HOME", work.path())
                .env("XDG_CONFIG_HOME", work.path().join("config"))
                // The user manager wants a runtime directory; a container has none.
                .env("XDG_RUNTIME_DIR", &runtime),
        );
        let complaints: Vec<&str> = std::str::from_utf8(&output.stderr)
            .expect("utf-8")
            .lines()
            .chain(std::str::from_utf8(&output.stdout).expect("utf-8").lines())
            .filter(|line| line.contains("vramgate"))
            .collect();
        assert!(
            output.status.success() && complaints.is_empty(),
            "systemd-analyze verify {} ({scope}): {:?}\n{}",
            path.display(),
            output.status,
            complaints.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Readiness notification (Type=notify)

/// A `vramgate serve` started as systemd would: with `NOTIFY_SOCKET`. Killed when dropped.
struct Service {
    child: Child,
    url: String,
    stderr_path: PathBuf,
}

impl Service {
    /// Starts the daemon on a sim device in `dir` with `notify_socket`, and returns once it has
    /// printed its listening line. `models` is appended to the config.
    fn start(dir: &Path, notify_socket: &Path, models: &str) -> Service {
        let sim = dir.join("sim");
        let config = format!(
            "[gpu]\nprobe = \"sim\"\nsample_interval = \"50ms\"\nreserve_mib = 0\n[gpu.sim]\ndir = \"{}\"\ndevices = [{{ name = \"Sim Test\", total_mib = 8000 }}]\n{models}",
            sim.display()
        );
        let config_path = dir.join("vramgate.toml");
        std::fs::write(&config_path, config).expect("write config");
        let stderr_path = dir.join("stderr.log");
        let mut child = common::vramgate()
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config_path)
            .env("NOTIFY_SOCKET", notify_socket)
            .env("VRAMGATE_LOG", "debug")
            // A state directory of its own: two of these daemons may run at once.
            .env("XDG_STATE_HOME", dir.join("state"))
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
            .spawn()
            .expect("spawn vramgate");
        let stdout = child.stdout.take().expect("stdout");
        let (lines, received) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let mut service = Service { child, url: String::new(), stderr_path };
        let line = received
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no listening line within 20 s; stderr:\n{}", service.log()));
        service.url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no URL in {line:?}"))
            .to_owned();
        service
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// One HTTP/1.1 request on a fresh connection: the status code and the body.
    fn request(&self, method: &str, path: &str) -> (u16, String) {
        let address = self.url.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(address).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        write!(stream, "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .expect("send request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read response");
        let code = response
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
        let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
        (code, body)
    }

    /// Waits up to `deadline` for the daemon to exit.
    fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn terminate(&self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The next datagram on `socket` within `deadline`, as text.
fn next_notification(socket: &UnixDatagram, deadline: Duration, service: &Service) -> String {
    socket.set_read_timeout(Some(deadline)).expect("timeout");
    let mut buf = [0u8; 1024];
    match socket.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!("no notification within {deadline:?} ({e}); stderr:\n{}", service.log()),
    }
}

#[test]
fn a_daemon_under_systemd_notifies_ready_and_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    // A model server that ignores SIGTERM: the slowest stop there is (the daemon's SIGKILL after
    // its grace), which the units' TimeoutStopSec must cover.
    let model = format!(
        "[models.stubborn]\nbackend = \"process\"\ncmd = \"{} --port ${{PORT}} --sim-dir {} --vram 500 --name stubborn --load-delay 50ms --ignore-sigterm\"\nvram = 500\n",
        env!("CARGO_BIN_EXE_vramgate-fake-model"),
        dir.path().join("sim").display()
    );
    let mut service = Service::start(dir.path(), &socket_path, &model);

    let ready = next_notification(&socket, Duration::from_secs(10), &service);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    let status_line = format!("STATUS=listening on {}", service.url);
    assert!(ready.lines().any(|l| l == status_line), "{ready:?} should carry {status_line:?}");
    // Ready means ready: the API answers at once, without a retry.
    let (code, body) = service.request("GET", "/vramgate/health");
    assert_eq!(code, 200, "{body}");

    let (code, body) = service.request("POST", "/vramgate/models/stubborn/load");
    assert_eq!(code, 200, "{body}\n{}", service.log());
    let loaded: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let model_pid = loaded["pid"].as_u64().and_then(|p| u32::try_from(p).ok()).expect("the model's pid");

    let asked_to_stop = Instant::now();
    service.terminate();
    let stopping = next_notification(&socket, Duration::from_secs(5), &service);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    // What KillMode=mixed relies on: SIGTERM to the daemon alone stops its model servers, within
    // the units' TimeoutStopSec.
    let timeout = unit_stop_timeout();
    let status = service.wait_exit(timeout).unwrap_or_else(|| {
        panic!("still running {timeout:?} after SIGTERM, when systemd would kill it:\n{}", service.log())
    });
    let took = asked_to_stop.elapsed();
    assert!(status.success(), "{status:?}\n{}", service.log());
    assert!(took <= DAEMON_WORST_STOP, "took {took:?}, beyond the documented {DAEMON_WORST_STOP:?}");
    assert!(!vramgate::gpu::pid_is_alive(model_pid), "the model server outlived the daemon");
    assert!(service.log().contains("killed"), "the model ignored SIGTERM and was killed:\n{}", service.log());
}

#[test]
fn a_notify_socket_that_cannot_be_reached_is_logged_and_not_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nobody-listens.sock");
    let mut service = Service::start(dir.path(), &missing, "");
    // The notification is sent before the API serves its first request, so the warning is in the
    // log once the daemon has answered.
    let (code, body) = service.request("GET", "/vramgate/health");
    assert_eq!(code, 200, "{body}");
    let log = service.log();
    assert!(
        log.contains("cannot notify systemd through NOTIFY_SOCKET=") && log.contains("nobody-listens.sock"),
        "{log}"
    );
    service.terminate();
    let status = service.wait_exit(unit_stop_timeout()).expect("the daemon exits");
    assert!(status.success(), "{status:?}\n{}", service.log());
}
