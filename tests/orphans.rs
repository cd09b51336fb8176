//! End-to-end: no process a model starts outlives the daemon, however it was started (through a
//! shell wrapper, a wrapper that exits while its server lives, a server that double-forks out of
//! its process group), even under `kill -9` of the daemon; and a restarted daemon stops what an
//! earlier one left behind (also a server that survived a `kill -9` of daemon and keeper, found in
//! the state database) and runs a single copy of the model, leaving alone a process that merely
//! reuses a recorded pid.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::release::{PidGuard, logged_events, pid_gone_within};
use common::{Daemon, fake_model, sim_config};
use nix::sys::signal::Signal;

const SECOND: Duration = Duration::from_secs(1);

/// A daemon on a 10000 MiB sim device in `sim` (shared by the daemons of one test, so the second
/// sees what the first left) with one model `a` whose command is `sh -c SCRIPT`; `FAKE` in the
/// script stands for the fake model server's command line.
fn start(state: &Path, sim: &Path, script: &str, fake_flags: &str) -> Daemon {
    start_with_keys(state, sim, script, fake_flags, "")
}

/// As [`start`], with more keys for the model.
fn start_with_keys(state: &Path, sim: &Path, script: &str, fake_flags: &str, keys: &str) -> Daemon {
    let fake = format!(
        "{} --port ${{PORT}} --sim-dir {} --vram 100 --name a --load-delay 50ms {fake_flags}",
        common::fake(),
        sim.display()
    );
    let script = script.replace("FAKE", &fake);
    let state = state.display().to_string();
    let sim = sim.to_path_buf();
    Daemon::start(move |_| {
        format!(
            "[server]\nstate_dir = {state:?}\n{}[models.a]\nbackend = \"process\"\ncmd = [\"sh\", \"-c\", {script:?}]\nvram = 100\n{keys}\n",
            sim_config(&sim, 10000, "50ms", "reserve_mib = 0")
        )
    })
}

/// The pids of live fake servers holding a claim on sim device 0.
fn live_servers(sim: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(sim.join("0")) else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| vramgate::gpu::pid_is_alive(*pid))
        .collect()
}

/// Whether `done` holds within `deadline` (polled every 5 ms).
fn holds_within(deadline: Duration, done: impl Fn() -> bool) -> bool {
    let end = std::time::Instant::now() + deadline;
    while !done() {
        if std::time::Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// Loads `a`; returns every process of the model: the command, the server (which answers with
/// its pid) and the command's process-group leader.
async fn load_and_collect(daemon: &Daemon) -> Vec<u32> {
    let (code, body) = daemon.load("a").await;
    assert_eq!(code, 200, "{body}\nlog:\n{}", daemon.log());
    let command = body["pid"].as_u64().and_then(|p| u32::try_from(p).ok()).expect("the model's pid");
    let upstream = body["upstream"].as_str().expect("upstream").to_string();
    let health = common::http::get(format!("{upstream}/health")).await.expect("the server answers");
    let server: u32 = health.headers()["x-fake-pid"].to_str().ok().and_then(|p| p.parse().ok()).expect("x-fake-pid");
    let mut pids = vec![command, server];
    if let Some(group) = vramgate::backend::process::proc_stat_field(command, 5) {
        pids.push(group as u32);
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Loads through `script`, kills the daemon with SIGKILL, and checks that every process of the
/// model dies with it; then a second daemon on the same state loads a single copy.
async fn nothing_survives_a_kill_9(script: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (state, sim) = (dir.path().join("state"), dir.path().join("sim"));
    let mut first = start(&state, &sim, script, "");
    let pids = load_and_collect(&first).await;
    let _guards: Vec<PidGuard> = pids.iter().map(|pid| PidGuard::new(*pid)).collect();
    assert_eq!(live_servers(&sim).len(), 1, "one server runs");
    first.signal(Signal::SIGKILL);
    first.wait_exit(5 * SECOND).expect("the daemon died");
    for pid in &pids {
        assert!(pid_gone_within(*pid, 5 * SECOND), "process {pid} of the model outlived the daemon (all: {pids:?})");
    }

    let second = start(&state, &sim, script, "");
    let pids = load_and_collect(&second).await;
    let _guards: Vec<PidGuard> = pids.iter().map(|pid| PidGuard::new(*pid)).collect();
    let servers = live_servers(&sim);
    assert_eq!(servers.len(), 1, "a single copy runs after the restart: {servers:?}");
}

#[tokio::test]
async fn a_server_behind_a_shell_wrapper_dies_with_the_daemon() {
    // The shell waits for the server, then says so: it does not exec it.
    nothing_survives_a_kill_9("FAKE; echo exited").await;
}

#[tokio::test]
async fn a_server_whose_wrapper_exited_dies_with_the_daemon() {
    // The inner shell starts the server in the background and exits at once: the server lives on
    // without its parent, in the model's process group.
    nothing_survives_a_kill_9("sh -c 'FAKE &'; exec sleep 3600").await;
}

#[tokio::test]
async fn a_server_that_double_forks_out_of_the_group_dies_with_the_daemon() {
    // setsid puts the server in a session and process group of its own, and the subshell that
    // started it exits: neither the group nor the parent links lead to it any more.
    nothing_survives_a_kill_9("(setsid FAKE &); exec sleep 3600").await;
}

#[tokio::test]
async fn a_restart_stops_a_group_whose_first_process_is_gone() {
    // The keeper and the daemon both killed with SIGKILL (nothing is left to sweep), and a server
    // that cleared its own parent-death signal: it survives in the recorded group, whose first
    // process is gone. The next daemon must stop it before admitting anything, and say so.
    let dir = tempfile::tempdir().unwrap();
    let (state, sim) = (dir.path().join("state"), dir.path().join("sim"));
    let script = "FAKE; echo exited";
    let mut first = start(&state, &sim, script, "--survive-parent-death");
    let pids = load_and_collect(&first).await;
    let _guards: Vec<PidGuard> = pids.iter().map(|pid| PidGuard::new(*pid)).collect();
    let server = live_servers(&sim);
    assert_eq!(server.len(), 1);
    let server = server[0];
    let group = vramgate::backend::process::proc_stat_field(server, 5).expect("the server's group") as i32;
    // Freeze the daemon first, so its keeper cannot notice a dead parent and sweep before it is
    // killed itself; then the keeper; then the daemon.
    first.signal(Signal::SIGSTOP);
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(group), Signal::SIGKILL);
    first.signal(Signal::SIGKILL);
    first.wait_exit(5 * SECOND).expect("the daemon died");
    // Gone from /proc, not only dead: a zombie leader still holds its pid, and the first
    // process's pid being free is the case to cover.
    assert!(
        holds_within(10 * SECOND, || vramgate::backend::process::proc_stat_field(group as u32, 22).is_none()),
        "the group's first process {group} was not reaped"
    );
    assert!(vramgate::gpu::pid_is_alive(server), "the server survived: a real leftover");

    let second = start(&state, &sim, "FAKE", "");
    let reaped: Vec<u64> =
        logged_events(&second, "leftover_reaped").iter().filter_map(|event| event["pid"].as_u64()).collect();
    assert!(reaped.contains(&u64::from(server)), "leftover_reaped for {server}: {reaped:?}\n{}", second.log());
    assert!(pid_gone_within(server, 2 * SECOND), "the leftover {server} still runs");
    let pids = load_and_collect(&second).await;
    let _guards: Vec<PidGuard> = pids.iter().map(|pid| PidGuard::new(*pid)).collect();
    assert_eq!(live_servers(&sim).len(), 1, "a single copy runs after the restart");
}

#[tokio::test]
async fn an_unload_that_must_kill_leaves_no_escaped_server() {
    // The wrapper ignores SIGTERM, so the stop's grace runs out and it is killed; the server left
    // the group with setsid, so a SIGKILL of the group alone (keeper included) would miss it.
    let dir = tempfile::tempdir().unwrap();
    let (state, sim) = (dir.path().join("state"), dir.path().join("sim"));
    let script = "(setsid FAKE &); trap '' TERM; while :; do sleep 0.05; done";
    let daemon = start_with_keys(&state, &sim, script, "--ignore-sigterm", "stop_timeout = \"100ms\"");
    let pids = load_and_collect(&daemon).await;
    let _guards: Vec<PidGuard> = pids.iter().map(|pid| PidGuard::new(*pid)).collect();
    let (code, body) = daemon.unload("a").await;
    assert_eq!(code, 200, "{body}");
    for pid in &pids {
        assert!(pid_gone_within(*pid, 5 * SECOND), "process {pid} of the model outlived its unload (all: {pids:?})");
    }
    assert!(live_servers(&sim).is_empty(), "no server runs after the unload");
}

/// A graceful stop signals the model's group once: the keeper passes SIGTERM on only to the
/// processes that left the group. A second SIGTERM makes servers such as llama-server abort at
/// once ("second interrupt", exit 1) instead of shutting down cleanly.
#[tokio::test]
async fn an_unload_sends_the_model_one_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let count = dir.path().join("terms");
    // Counts the SIGTERMs it gets, and exits 300 ms after the first.
    let script = format!(
        "n=0; trap 'n=$((n+1)); echo $n > {count}; [ $n -eq 1 ] && (sleep 0.3; kill -USR1 $$) &' TERM; \
         trap 'exit 0' USR1; while :; do sleep 0.05; done",
        count = count.display()
    );
    let daemon = Daemon::start(|sim| {
        format!(
            "{}[models.m]\nbackend = \"process\"\ncmd = {:?}\nhealth = \"none\"\nstop_timeout = \"5s\"\n",
            sim_config(sim, 8192, "50ms", ""),
            ["sh", "-c", &script]
        )
    });
    let (code, body) = daemon.load("m").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = daemon.unload("m").await;
    assert_eq!(code, 200, "{body}");
    let terms = std::fs::read_to_string(&count).expect("the model got a SIGTERM");
    assert_eq!(terms.trim(), "1", "SIGTERMs the model got");
}

/// A command killed by a real-time signal (which has no name in nix) is still seen to end: the
/// keeper reports it, and the model is released as crashed instead of staying "ready".
#[tokio::test]
async fn a_model_killed_by_a_real_time_signal_is_seen_to_crash() {
    let daemon = Daemon::start(|sim| {
        format!(
            "{}[models.m]\nbackend = \"process\"\ncmd = [\"sh\", \"-c\", \"while :; do sleep 0.05; done\"]\nhealth = \"none\"\n",
            sim_config(sim, 8192, "50ms", "")
        )
    });
    let (code, body) = daemon.load("m").await;
    assert_eq!(code, 200, "{body}");
    let pid = body["pid"].as_u64().expect("the command's pid") as i32;
    let realtime = nix::libc::SIGRTMIN() + 1;
    // SAFETY: kill with a plain pid and signal number has no memory effects.
    assert_eq!(unsafe { nix::libc::kill(pid, realtime) }, 0, "signal the command");
    let model = daemon.wait_model_state("m", "unloaded", 5 * SECOND).await;
    assert_eq!(model["state_reason"], "crashed", "{model}");
}

#[tokio::test]
async fn a_restart_reaps_a_model_that_outlived_a_kill_9_of_the_daemon() {
    // A model server's keeper takes it down with the daemon; with the keeper killed too (both
    // by SIGKILL, the daemon frozen first so that it cannot stop the server when its keeper
    // dies), a server that cleared its parent-death signal survives, recorded in the state
    // database as the daemon left it; the next daemon on that state directory must stop it
    // before admitting anything.
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state").display().to_string();
    let config = move |model_flags: &'static str| {
        let state_dir = state_dir.clone();
        move |sim: &std::path::Path| {
            format!(
                "[server]\nstate_dir = \"{state_dir}\"\n{}{}",
                sim_config(sim, 10000, "50ms", "reserve_mib = 0"),
                fake_model(sim, "a", 100, model_flags, "")
            )
        }
    };
    let mut first = Daemon::start(config("--survive-parent-death"));
    let (code, body) = first.load("a").await;
    assert_eq!(code, 200, "{body}");
    let pid = body["pid"].as_u64().unwrap() as u32;
    let upstream = body["upstream"].as_str().unwrap().to_string();
    let _guard = common::release::PidGuard::new(pid);
    let keeper = vramgate::backend::process::proc_stat_field(pid, 5).expect("the server's process group") as i32;
    assert_ne!(keeper as u32, pid, "the server runs under a keeper that leads its group");
    first.signal(nix::sys::signal::Signal::SIGSTOP);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(keeper), nix::sys::signal::Signal::SIGKILL)
        .expect("kill the keeper");
    first.signal(nix::sys::signal::Signal::SIGKILL);
    first.wait_exit(5 * SECOND).expect("the first daemon died");
    // Still serving without its daemon: a real leftover, not a planted record.
    let health = common::http::get(format!("{upstream}/health")).await.expect("the survivor answers");
    assert_eq!(health.status(), 200);

    let second = Daemon::start(config(""));
    // Reaping happens at start-up, before the API listens, so no event-stream client can be
    // subscribed yet: the event is read from the daemon's log, where every published event's
    // JSON is written.
    let reaped = common::release::logged_events(&second, "leftover_reaped");
    assert_eq!(reaped.len(), 1, "one leftover_reaped event; log:\n{}", second.log());
    assert_eq!(reaped[0]["pid"], pid);
    assert_eq!(reaped[0]["model"], "a");
    assert!(common::release::pid_gone_within(pid, 2 * SECOND), "the leftover {pid} still runs");
    // The model starts afresh under the new daemon.
    assert_eq!(second.model("a").await["state"], "unloaded");
    let (code, body) = second.load("a").await;
    assert_eq!(code, 200, "{body}");
    assert_ne!(body["pid"].as_u64(), Some(u64::from(pid)));
}

#[tokio::test]
async fn the_reaper_leaves_a_process_that_merely_reuses_a_recorded_pid_alone() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state").join("vramgate");
    let bystander = {
        use std::os::unix::process::CommandExt;
        common::KillOnDrop::spawn(Command::new("sleep").arg("30").process_group(0))
    };
    let pid = bystander.pid();
    let ticks = vramgate::backend::process::proc_stat_field(pid, 22).unwrap();
    vramgate::store::Store::open(&state)
        .unwrap()
        .record_process(&vramgate::store::ProcessRecord {
            pid,
            pgid: pid,
            start_ticks: ticks + 12345,
            model: "llm".into(),
            started_at: chrono::Utc::now(),
        })
        .unwrap();
    let state_dir = state.display().to_string();
    let daemon = Daemon::start(move |sim| {
        format!("[server]\nstate_dir = \"{state_dir}\"\n{}", sim_config(sim, 10000, "50ms", "reserve_mib = 0"))
    });
    daemon.status().await;
    assert!(vramgate::gpu::pid_is_alive(pid), "a process with another start time is not ours");
    drop(bystander);
}
