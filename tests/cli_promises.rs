//! End-to-end: promises the docs make that no other test held the code to: `vramgate run`'s signal
//! handling and exit statuses, `events` and `logs -f` following a daemon, `mode` without a name,
//! the state database, footprints (undeclared and measured above the declared size), Ollama's
//! reconnect backoff, the reasons of `lease_released`, and the failure cooldown's first value.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Daemon, KillOnDrop, fake_model, model_in as model, sim_config, undeclared_fake_model};
use nix::sys::signal::Signal;
use serde_json::json;

const SECOND: Duration = Duration::from_secs(1);

/// An 8000 MiB sim device without reserve, plus `rest`.
fn start(rest: impl Fn(&Path) -> String) -> Daemon {
    Daemon::start(|sim| format!("{}{}", sim_config(sim, 8000, "50ms", "reserve_mib = 0"), rest(sim)))
}

/// Sends `signal` to one process (not its group).
fn signal(pid: u32, signal: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).expect("kill");
}

/// Waits until `path` exists with some text in it, and returns the text; panics after `deadline`.
fn wait_for_file(path: &Path, deadline: Duration, what: &str) -> String {
    let end = Instant::now() + deadline;
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && !text.is_empty()
        {
            return text;
        }
        assert!(Instant::now() < end, "{what}: {} not written within {deadline:?}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The lines a pipe produces, as they come.
fn lines_of(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Reads lines until one contains `needle`; panics (with what came) after `deadline`.
fn wait_line(lines: &mpsc::Receiver<String>, needle: &str, deadline: Duration) -> String {
    let end = Instant::now() + deadline;
    let mut seen = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("no line containing {needle:?} within {deadline:?}; got:\n{}", seen.join("\n")),
        }
    }
}

/// A shell command for `vramgate run` that writes `started` once running, writes the name of a
/// trapped signal (TERM, INT) into `caught` and exits with `exit_on_signal`.
fn trapping_command(dir: &Path, exit_on_signal: u8) -> (Vec<String>, PathBuf, PathBuf) {
    let (started, caught) = (dir.join("started"), dir.join("caught"));
    let script = format!(
        "trap 'echo TERM > {c}; exit {e}' TERM; trap 'echo INT > {c}; exit {e}' INT; echo up > {s}; \
         while :; do sleep 0.05; done",
        c = caught.display(),
        s = started.display(),
        e = exit_on_signal
    );
    (vec!["sh".into(), "-c".into(), script], started, caught)
}

/// A `vramgate run` in a process group of its own, which its command shares: when the test ends,
/// however it ends, the whole group is killed, so a command whose SIGTERM never came (the very
/// failure these tests look for) does not loop on forever.
struct RunGroup(KillOnDrop);

impl RunGroup {
    fn pid(&self) -> u32 {
        self.0.pid()
    }
}

impl Drop for RunGroup {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.0.pid() as i32), Signal::SIGKILL);
    }
}

/// Starts `vramgate run --vram 100MiB -- COMMAND` against `daemon`, stdin not a terminal.
fn spawn_run(daemon: &Daemon, command: &[String]) -> RunGroup {
    use std::os::unix::process::CommandExt;
    let mut run = common::vramgate();
    run.args(["run", "--vram", "100MiB", "--url", &daemon.url, "--"])
        .args(command)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    RunGroup(KillOnDrop::spawn(&mut run))
}

// ----- vramgate run -----

/// `vramgate run`'s help: "If vramgate run is killed, the lease is released within a second and
/// the command gets SIGTERM."
#[tokio::test]
async fn a_sigkilled_vramgate_run_releases_its_lease_and_its_command_gets_sigterm() {
    let daemon = start(|_| String::new());
    let dir = tempfile::tempdir().unwrap();
    let (command, started, caught) = trapping_command(dir.path(), 0);
    let mut run = spawn_run(&daemon, &command);
    wait_for_file(&started, 10 * SECOND, "the command under vramgate run");
    let status =
        daemon.wait_for_status(5 * SECOND, "the lease", |s| s["leases"].as_array().is_some_and(|l| l.len() == 1)).await;
    // The holder is the command's name; the size is the one asked for.
    assert_eq!((&status["leases"][0]["holder"], &status["leases"][0]["vram_mib"]), (&json!("sh"), &json!(100)));
    signal(run.pid(), Signal::SIGKILL);
    common::wait_child(&mut run.0.0, 5 * SECOND).expect("vramgate run dies of SIGKILL");
    let killed = Instant::now();
    assert_eq!(wait_for_file(&caught, 5 * SECOND, "the command's SIGTERM").trim(), "TERM");
    daemon
        .wait_for_status(2 * SECOND, "the lease to go", |s| s["leases"].as_array().is_some_and(|l| l.is_empty()))
        .await;
    assert!(killed.elapsed() < SECOND, "released after {:?}", killed.elapsed());
}

/// `vramgate run` forwards SIGTERM, and SIGINT when stdin is not a terminal, to its command, and
/// exits with the command's own status.
#[tokio::test]
async fn vramgate_run_forwards_sigterm_and_sigint_to_its_command() {
    let daemon = start(|_| String::new());
    for (sent, name) in [(Signal::SIGTERM, "TERM"), (Signal::SIGINT, "INT")] {
        let dir = tempfile::tempdir().unwrap();
        let (command, started, caught) = trapping_command(dir.path(), 3);
        let mut run = spawn_run(&daemon, &command);
        wait_for_file(&started, 10 * SECOND, "the command under vramgate run");
        signal(run.pid(), sent);
        assert_eq!(wait_for_file(&caught, 5 * SECOND, &format!("the forwarded {sent}")).trim(), name);
        let status = common::wait_child(&mut run.0.0, 5 * SECOND).expect("vramgate run exits after its command");
        assert_eq!(status.code(), Some(3), "{sent}: vramgate run exits with the command's status 3");
        daemon
            .wait_for_status(2 * SECOND, "the lease released", |s| s["leases"].as_array().is_some_and(|l| l.is_empty()))
            .await;
    }
}

/// `vramgate run --help`: "128+N  the command was ended by signal N (130: SIGINT, 143: SIGTERM)".
#[tokio::test]
async fn vramgate_run_exits_128_plus_n_when_a_signal_ended_its_command() {
    let daemon = start(|_| String::new());
    for (sent, expected) in [(Signal::SIGTERM, 143), (Signal::SIGINT, 130)] {
        let dir = tempfile::tempdir().unwrap();
        let started = dir.path().join("started");
        // `exec sleep`: the command itself is ended by the signal (no shell to trap it).
        let command = vec!["sh".into(), "-c".into(), format!("echo up > {}; exec sleep 30", started.display())];
        let mut run = spawn_run(&daemon, &command);
        wait_for_file(&started, 10 * SECOND, "the command under vramgate run");
        // Whether the shell has reached `exec sleep` yet does not matter: the shell does not trap
        // the signal either, so the command ends by it in both cases.
        signal(run.pid(), sent);
        let status = common::wait_child(&mut run.0.0, 5 * SECOND).expect("vramgate run exits after its command");
        assert_eq!(status.code(), Some(expected), "{sent}");
    }
}

// ----- events, logs, mode -----

/// `vramgate events` exits 1 when the daemon closes the stream (it stopped).
#[tokio::test]
async fn events_exits_1_when_the_daemon_stops() {
    let mut daemon = Daemon::start_sim(1000, "50ms");
    let mut events = KillOnDrop::spawn(
        common::vramgate().args(["events", "--url", &daemon.url]).stdout(Stdio::piped()).stderr(Stdio::piped()),
    );
    let lines = lines_of(events.0.stdout.take().unwrap());
    // Its subscription cannot be seen: change the device until a line shows it is following.
    let end = Instant::now() + 10 * SECOND;
    let mut high = false;
    loop {
        high = !high;
        daemon.claim("desktop", if high { 800 } else { 0 });
        if lines.recv_timeout(Duration::from_millis(200)).is_ok() {
            break;
        }
        assert!(Instant::now() < end, "vramgate events printed nothing within 10 s");
    }
    daemon.signal(Signal::SIGTERM);
    daemon.wait_exit(5 * SECOND).expect("the daemon stops on SIGTERM");
    let status = common::wait_child(&mut events.0, 5 * SECOND).expect("vramgate events exits once the stream closes");
    let mut stderr = String::new();
    events.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("closed the event stream"), "{stderr}");
}

/// `vramgate logs -f` keeps printing the lines a model's server writes after it started.
#[tokio::test]
async fn logs_follow_prints_lines_written_after_it_started() {
    let daemon = start(|sim| fake_model(sim, "m", 100, "", "ttl = \"0\""));
    assert_eq!(daemon.load("m").await.0, 200);
    let mut logs = KillOnDrop::spawn(
        common::vramgate().args(["logs", "m", "-f", "--url", &daemon.url]).stdout(Stdio::piped()).stderr(Stdio::null()),
    );
    let lines = lines_of(logs.0.stdout.take().unwrap());
    // The tail first: once it is printed, the command is following.
    wait_line(&lines, "weights loaded", 10 * SECOND);
    let marker = format!("after-follow-{}", std::process::id());
    let response = common::http::client()
        .post(format!("{}/v1/chat/completions", daemon.url))
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": marker}]}))
        .timeout(10 * SECOND)
        .send()
        .await
        .expect("chat");
    assert_eq!(response.status(), 200);
    let line = wait_line(&lines, &marker, 5 * SECOND);
    assert!(line.contains("request"), "{line}");
    assert!(logs.0.try_wait().unwrap().is_none(), "logs -f must keep following");
}

/// `vramgate mode` without a name prints the current mode and the modes defined.
#[tokio::test]
async fn mode_without_a_name_prints_the_current_mode_and_the_modes() {
    let daemon = start(|sim| {
        format!(
            "{}{}[modes.work]\ngpu = [\"a\"]\nunload = [\"b\"]\n[modes.quiet]\nunload = [\"a\", \"b\"]\n",
            fake_model(sim, "a", 1000, "", "ttl = \"0\""),
            fake_model(sim, "b", 1000, "", "ttl = \"0\"")
        )
    });
    let mode = || common::output(common::vramgate().args(["mode", "--url", &daemon.url]));
    let before = mode();
    assert!(before.status.success(), "{}", String::from_utf8_lossy(&before.stderr));
    let text = String::from_utf8_lossy(&before.stdout).to_string();
    assert!(text.lines().next() == Some("current mode: none"), "{text}");
    assert!(text.contains("  work: gpu a; cpu -; unload b"), "{text}");
    assert!(text.contains("  quiet: gpu -; cpu -; unload a, b"), "{text}");
    let (code, body) = daemon.post("/vramgate/mode", json!({"mode": "work"})).await;
    assert_eq!(code, 200, "{body}");
    let after = mode();
    let text = String::from_utf8_lossy(&after.stdout).to_string();
    assert!(text.lines().next() == Some("current mode: work"), "{text}");
    assert_eq!(text.lines().count(), 3, "{text}");
}

// ----- the state database -----

/// A state database that cannot be opened stops the daemon at start-up with exit 1 and an error
/// naming the file (here `state.db` is a directory: root could write anywhere else).
#[test]
fn an_unusable_state_database_stops_the_daemon_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let db = state.join("vramgate").join("state.db");
    std::fs::create_dir_all(&db).unwrap();
    let config = dir.path().join("vramgate.toml");
    std::fs::write(&config, sim_config(&dir.path().join("sim"), 8000, "50ms", "")).unwrap();
    let output = common::output_within(
        common::vramgate()
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .env("XDG_STATE_HOME", &state),
        20 * SECOND,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&db.display().to_string()), "the error names {}: {stderr}", db.display());
    assert!(!String::from_utf8_lossy(&output.stdout).contains("listening"), "it must not start serving");
}

// ----- footprints -----

/// An undeclared model's first load reserves everything free until it is measured: a lease that
/// would fit next to its real size waits; once it is ready its footprint is measured, stored in
/// the state database, and the lease is granted.
#[tokio::test]
async fn the_first_load_of_an_undeclared_model_reserves_everything_free() {
    let daemon = start(|sim| undeclared_fake_model(sim, "u", 3000, "--load-delay 2s", "ttl = \"0\""));
    let url = daemon.url.clone();
    let load = tokio::spawn(async move {
        common::http::client().post(format!("{url}/vramgate/models/u/load")).send().await.map(|r| r.status().as_u16())
    });
    daemon.wait_for_status(5 * SECOND, "u loading", |s| model(s, "u")["state"] == "loading").await;
    let url = daemon.url.clone();
    let lease = tokio::spawn(async move {
        common::http::client()
            .post(format!("{url}/vramgate/leases"))
            .json(&json!({"vram": "2000MiB", "holder": "job", "wait": "10s", "ttl": "60s"}))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    // 3000 + 2000 of 8000 would fit, but u's size is unknown while it loads: the lease waits.
    let queued = daemon
        .wait_for_status(5 * SECOND, "the lease queued behind u's load", |s| {
            s["queue"].as_array().is_some_and(|q| !q.is_empty())
        })
        .await;
    assert_eq!(model(&queued, "u")["state"], "loading", "{queued:#}");
    assert_eq!(queued["leases"], json!([]), "granted while u's footprint was unknown: {queued:#}");
    let loaded = tokio::time::timeout(10 * SECOND, load).await.expect("the load answers").unwrap().expect("load");
    assert_eq!(loaded, 200);
    let granted = tokio::time::timeout(10 * SECOND, lease).await.expect("the lease answers").unwrap().expect("lease");
    assert_eq!(granted, 201, "once u is measured at 3000 MiB, 2000 more fit");
    let status = daemon.wait_for_status(5 * SECOND, "u measured", |s| model(s, "u")["measured_mib"] == 3000).await;
    assert_eq!(model(&status, "u")["vram_mib"], 3000);
    let store = vramgate::store::Store::open(&daemon.dir.path().join("state").join("vramgate")).expect("state db");
    let end = Instant::now() + 5 * SECOND;
    while store.footprints().expect("footprints").get("u") != Some(&3000) {
        assert!(Instant::now() < end, "u's footprint not stored: {:?}", store.footprints());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A measured footprint above the declared one is what admission counts: with `vram = 1000`
/// declared and 3000 really used, a 6000 MiB lease (fits next to 1000, not next to 3000, on
/// 8000 MiB) is refused with the numbers.
#[tokio::test]
async fn a_measured_footprint_above_the_declared_one_raises_admission() {
    let daemon = start(|sim| {
        format!(
            "[models.m]\nbackend = \"process\"\ncmd = \"{} --port ${{PORT}} --sim-dir {} --vram 3000 --name m \
             --load-delay 50ms\"\nvram = 1000\nttl = \"0\"\n",
            common::fake(),
            sim.display()
        )
    });
    assert_eq!(daemon.load("m").await.0, 200);
    let status = daemon.wait_for_status(5 * SECOND, "m measured", |s| model(s, "m")["measured_mib"] == 3000).await;
    assert_eq!(
        (model(&status, "m")["declared_mib"].as_u64(), model(&status, "m")["vram_mib"].as_u64()),
        (Some(1000), Some(3000))
    );
    let (code, body) =
        daemon.post("/vramgate/leases", json!({"vram": "6000MiB", "holder": "job", "wait": "0", "priority": 0})).await;
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(code == 503 && message.contains("needs 6000 MiB"), "answered {code}: {body}");
    // And 5000 does fit next to the 3000 measured.
    let (code, body) =
        daemon.post("/vramgate/leases", json!({"vram": "5000MiB", "holder": "job", "wait": "0", "priority": 0})).await;
    assert_eq!(code, 201, "{body}");
    // Learned, not just seen: unloaded, it is still admitted at its measured size next time.
    assert_eq!(daemon.unload("m").await.0, 200);
    let m = daemon.wait_model_state("m", "unloaded", 5 * SECOND).await;
    assert_eq!((m["measured_mib"].as_u64(), m["vram_mib"].as_u64()), (Some(3000), Some(3000)), "{m}");
}

// ----- Ollama -----

/// Docs: while Ollama does not answer, vramgate "waits 2 s, doubling up to 30 s". A
/// listener that closes every connection at once stands in for an Ollama that is down; the times
/// of the daemon's `/api/ps` tries show the pause doubling (only its first steps, to stay fast).
#[tokio::test]
async fn an_ollama_that_does_not_answer_is_retried_with_a_doubling_pause() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let tries = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let seen = tries.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let _ = stream.set_read_timeout(Some(SECOND));
            let mut head = [0u8; 256];
            let read = stream.read(&mut head).unwrap_or(0);
            if String::from_utf8_lossy(&head[..read]).starts_with("GET /api/ps") {
                seen.lock().unwrap().push(Instant::now());
            }
            // Dropped without an answer: the try fails.
        }
    });
    let _daemon = start(move |_| {
        format!("[models.llama]\nbackend = \"ollama\"\nollama_model = \"llama3.2:3b\"\nurl = \"{url}\"\n")
    });
    let end = Instant::now() + 15 * SECOND;
    while tries.lock().unwrap().len() < 3 {
        assert!(Instant::now() < end, "fewer than 3 tries of /api/ps within 15 s: {:?}", tries.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tries = tries.lock().unwrap().clone();
    let (first, second) = (tries[1] - tries[0], tries[2] - tries[1]);
    // Lower bounds at the nominal pauses (a timer never fires early); generous upper bounds, as a
    // loaded machine only makes tries late. The cap and the reset are unit tests of the pure step.
    assert!(first >= Duration::from_millis(1950) && first <= Duration::from_millis(3500), "first pause {first:?}");
    assert!(
        second >= Duration::from_millis(3950) && second <= Duration::from_millis(6500),
        "the pause does not double: {first:?} then {second:?}"
    );
}

// ----- lease_released reasons -----

/// `lease_released` says why: `released` (the holder let go), `disconnected` (a connection-held
/// lease whose client went away), `expired` (a heartbeat lease not renewed within its ttl).
#[tokio::test]
async fn lease_released_says_released_disconnected_or_expired() {
    let daemon = start(|_| String::new());
    let mut events = daemon.events().await;

    let (code, grant) =
        daemon.post("/vramgate/leases", json!({"vram": "100MiB", "holder": "let-go", "ttl": "60s"})).await;
    assert_eq!(code, 201, "{grant}");
    let id = grant["id"].as_str().unwrap();
    let response =
        common::http::client().delete(format!("{}/vramgate/leases/{id}", daemon.url)).send().await.expect("DELETE");
    assert!(response.status().is_success(), "{}", response.status());
    let event = events.next_of("lease_released", 5 * SECOND).await;
    assert_eq!((event["id"].as_str(), event["reason"].as_str()), (Some(id), Some("released")), "{event}");

    let held = common::http::client()
        .post(format!("{}/vramgate/leases", daemon.url))
        .json(&json!({"vram": "100MiB", "holder": "goes-away", "hold": "connection"}))
        .send()
        .await
        .expect("a connection-held lease");
    assert_eq!(held.status(), 200, "a connection-held lease answers 200 with its stream");
    let granted = events.next_of("lease_granted", 5 * SECOND).await;
    drop(held);
    let event = events.next_of("lease_released", 5 * SECOND).await;
    assert_eq!((&event["id"], event["reason"].as_str()), (&granted["id"], Some("disconnected")), "{event}");

    let (code, grant) =
        daemon.post("/vramgate/leases", json!({"vram": "100MiB", "holder": "forgets", "ttl": "300ms"})).await;
    assert_eq!(code, 201, "{grant}");
    let event = events.next_of("lease_released", 5 * SECOND).await;
    assert_eq!((&event["id"], event["reason"].as_str()), (&grant["id"], Some("expired")), "{event}");
}
