//! End-to-end: a restarted daemon stops what an earlier one left running before it admits
//! anything, all leftovers at once (one grace period for all, not one each), and it still does
//! for records written by a version of vramgate that did not keep the boot id.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::release::{logged_events, pid_gone_within};
use common::{Daemon, KillOnDrop, sim_config};
use vramgate::store::{ProcessRecord, Store};

const SECOND: Duration = Duration::from_secs(1);
/// The daemon's grace for leftovers between SIGTERM and SIGKILL
/// (`vramgate::backend::leftovers::LEFTOVER_GRACE`).
const GRACE: Duration = vramgate::backend::leftovers::LEFTOVER_GRACE;

/// A stand-in leftover: `sleep` leading a process group of its own and ignoring SIGTERM, so that
/// only the SIGKILL after the grace stops it.
fn stubborn_leftover() -> KillOnDrop {
    let mut command = Command::new("sleep");
    command.arg("60").process_group(0);
    // SAFETY: only sigaction between fork and exec (async-signal-safe); an ignored signal stays
    // ignored across exec.
    unsafe {
        command.pre_exec(|| {
            nix::sys::signal::signal(nix::sys::signal::Signal::SIGTERM, nix::sys::signal::SigHandler::SigIgn)
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    KillOnDrop::spawn(&mut command)
}

/// The record a daemon that had started `pid` would have left.
fn record_of(pid: u32) -> ProcessRecord {
    ProcessRecord {
        pid,
        pgid: pid,
        start_ticks: vramgate::backend::process::proc_stat_field(pid, 22).expect("its start time"),
        model: "llm".into(),
        started_at: chrono::Utc::now(),
    }
}

/// A daemon on `state` (and an empty sim device).
fn start_on(state: &Path) -> Daemon {
    let state = state.display().to_string();
    Daemon::start(move |sim| format!("[server]\nstate_dir = {state:?}\n{}", sim_config(sim, 10000, "50ms", "")))
}

/// The pids the daemon reported as reaped leftovers, sorted.
fn reaped(daemon: &Daemon) -> Vec<u32> {
    let mut pids: Vec<u32> = logged_events(daemon, "leftover_reaped")
        .iter()
        .filter_map(|event| event["pid"].as_u64().and_then(|pid| u32::try_from(pid).ok()))
        .collect();
    pids.sort_unstable();
    pids
}

#[test]
fn leftovers_are_stopped_together_before_the_daemon_listens() {
    const LEFTOVERS: u32 = 4;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let leftovers: Vec<KillOnDrop> = (0..LEFTOVERS).map(|_| stubborn_leftover()).collect();
    let mut pids: Vec<u32> = leftovers.iter().map(KillOnDrop::pid).collect();
    pids.sort_unstable();
    {
        let store = Store::open(&state).unwrap();
        for pid in &pids {
            store.record_process(&record_of(*pid)).unwrap();
        }
    }
    let started = Instant::now();
    let daemon = start_on(&state);
    let took = started.elapsed();
    assert_eq!(reaped(&daemon), pids, "{}", daemon.log());
    for pid in &pids {
        assert!(pid_gone_within(*pid, SECOND), "leftover {pid} still runs");
    }
    // Each ignores SIGTERM, so each needs the whole grace: one after the other, four graces
    // (8 s) would pass before the daemon listens; together, one (plus start-up).
    assert!(took >= GRACE, "the daemon listened before the grace ran out: {took:?}");
    assert!(took < 2 * GRACE + SECOND, "the daemon took {took:?} to reap {LEFTOVERS} leftovers");
    // The records are forgotten: the next daemon has nothing to reap.
    drop(daemon);
    assert!(Store::open(&state).unwrap().processes().unwrap().is_empty());
}

/// A state database from before process records carried the kernel's boot id: the daemon
/// migrates it and still stops the leftover that its record names (by pid and start time).
#[test]
fn a_leftover_recorded_by_an_older_version_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let leftover = stubborn_leftover();
    let record = record_of(leftover.pid());
    {
        let old = rusqlite::Connection::open(state.join("state.db")).unwrap();
        old.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE processes (pid INTEGER PRIMARY KEY, pgid INTEGER NOT NULL, start_ticks INTEGER NOT NULL, model TEXT NOT NULL, started_at TEXT NOT NULL);
             CREATE TABLE footprints (model TEXT PRIMARY KEY, mib INTEGER NOT NULL, measured_at TEXT NOT NULL);",
        )
        .unwrap();
        old.execute(
            "INSERT INTO processes VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![
                record.pid,
                record.pgid,
                record.start_ticks as i64,
                record.model,
                record.started_at.to_rfc3339()
            ],
        )
        .unwrap();
    }
    let daemon = start_on(&state);
    assert_eq!(reaped(&daemon), vec![leftover.pid()], "{}", daemon.log());
    assert!(pid_gone_within(leftover.pid(), SECOND), "the leftover still runs");
}

/// A record written in another boot names nobody today: the live process that has its pid and
/// start time is left alone (and the record is dropped).
#[test]
fn a_record_of_another_boot_stops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let bystander = stubborn_leftover();
    Store::open(&state).unwrap().record_process_of_boot(&record_of(bystander.pid()), Some("an-earlier-boot")).unwrap();
    let daemon = start_on(&state);
    assert_eq!(reaped(&daemon), Vec::<u32>::new(), "{}", daemon.log());
    assert!(vramgate::gpu::pid_is_alive(bystander.pid()), "a process of this boot was stopped");
    drop(daemon);
    assert!(Store::open(&state).unwrap().processes().unwrap().is_empty(), "the stale record is dropped");
}
