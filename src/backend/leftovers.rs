//! The start-up reaper: stops what an earlier daemon left running (it crashed or was killed
//! with `kill -9` before its keepers could sweep), before the new daemon admits anything.
//!
//! Records come from the state database (`crate::store`): each names a model's process group
//! and the start time of the group's leader. The reaper must never stop a process that merely
//! reuses a recorded pid, so a group counts as a leftover only when it is provably the recorded
//! one (see [`reap_leftovers`]).

use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::process::proc_stat_field;

/// How far the start time of a recorded group leader, read as wall-clock time, may lie from the
/// time the record was written: farther means the record is from an earlier boot, whose ticks
/// say nothing about today's processes.
const SAME_BOOT_SLACK_SECS: u64 = 10;

/// How long leftovers of an earlier daemon get to stop after SIGTERM before SIGKILL.
pub const LEFTOVER_GRACE: Duration = Duration::from_secs(2);
/// How often the start-up reaper looks whether the leftovers have stopped.
const LEFTOVER_POLL: Duration = Duration::from_millis(10);

/// Stops every leftover of the groups recorded by an earlier daemon, all at once: each live
/// process of a recorded process group that started no earlier than the group's leader, even
/// when the leader itself (the keeper) is gone. SIGTERM to all, then (after at most `grace` for
/// all together, not each) SIGKILL to what is left. Returns, for each record in order, the pids
/// it stopped. The `/proc` scans run on the blocking pool and the waits are timers: the runtime
/// is never blocked.
///
/// Safe against pid reuse: a leader pid alive with another start time is someone else's group;
/// a record from another boot (by the kernel's boot id, or where the record has none, by its
/// start ticks read as wall-clock time against when it was written) is not ours; and while any
/// member of our group lives, the kernel reuses neither its id as a new pid nor as a new group
/// id.
pub async fn reap_leftovers(records: &[crate::store::RecordedProcess], grace: Duration) -> Vec<Vec<u32>> {
    let count = records.len();
    let owned = records.to_vec();
    let targets: Vec<Option<Target>> = tokio::task::spawn_blocking(move || {
        owned.iter().map(|recorded| Target::of(recorded).filter(Target::is_ours)).collect()
    })
    .await
    .unwrap_or_else(|_| vec![None; count]);
    let scan = || async { tokio::task::spawn_blocking(scan_processes).await.unwrap_or_default() };
    let members = |processes: &[ProcEntry]| -> Vec<Vec<u32>> {
        targets.iter().map(|t| t.as_ref().map(|t| t.members(processes)).unwrap_or_default()).collect()
    };
    let found = members(&scan().await);
    if found.iter().all(Vec::is_empty) {
        return found;
    }
    for pid in found.iter().flatten() {
        send(*pid, Signal::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + grace;
    let mut left = members(&scan().await);
    while left.iter().any(|pids| !pids.is_empty()) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(LEFTOVER_POLL).await;
        left = members(&scan().await);
    }
    for pid in left.iter().flatten() {
        send(*pid, Signal::SIGKILL);
    }
    found
}

/// Sends `signal` to the single process `pid` (read from `/proc`). A value that is not a
/// positive `pid_t` is skipped: cast, it would name a process group (negative) or this one (0).
fn send(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid)
        && pid > 0
    {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
    }
}

/// A recorded group, as the reaper needs it.
#[derive(Debug, Clone)]
struct Target {
    pgid: u32,
    start_ticks: u64,
    recorded_at: i64,
    boot_id: Option<String>,
}

impl Target {
    /// The record's group, unless it is this daemon's own process or group, or init's.
    fn of(recorded: &crate::store::RecordedProcess) -> Option<Target> {
        let record = &recorded.record;
        let me = std::process::id();
        if record.pgid <= 1 || record.pgid == me || proc_stat_field(me, 5) == Some(u64::from(record.pgid)) {
            return None;
        }
        Some(Target {
            pgid: record.pgid,
            start_ticks: record.start_ticks,
            recorded_at: record.started_at.timestamp(),
            boot_id: recorded.boot_id.clone(),
        })
    }

    /// Whether the recorded group is still the one the record means (reads `/proc`).
    fn is_ours(&self) -> bool {
        let boot = match (self.boot_id.as_deref(), crate::store::this_boot_id()) {
            (Some(recorded), Some(now)) => Some(recorded == now),
            _ => None,
        };
        match (proc_stat_field(self.pgid, 22), boot) {
            // Ticks count from boot: a record of another boot says nothing about today's pids.
            (_, Some(false)) => false,
            // Another process has the recorded leader's pid: the group is not ours.
            (Some(ticks), _) if ticks != self.start_ticks => false,
            // The leader itself, by pid and start time: ours.
            (Some(_), _) => true,
            // The leader is gone and the record is of this boot by its id.
            (None, Some(true)) => true,
            // The leader is gone and the record has no boot id: trust it only if its start
            // ticks, read as wall-clock time, match when it was written.
            (None, None) => started_this_boot(self.start_ticks, self.recorded_at),
        }
    }

    /// The live processes of the group that started no earlier than its leader.
    fn members(&self, processes: &[ProcEntry]) -> Vec<u32> {
        processes.iter().filter(|p| p.pgid == self.pgid && p.start_ticks >= self.start_ticks).map(|p| p.pid).collect()
    }
}

/// A live process as `/proc/<pid>/stat` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcEntry {
    pid: u32,
    pgid: u32,
    start_ticks: u64,
}

/// Every live (not zombie) process but this one, with its group and start time, in one pass
/// over `/proc`.
fn scan_processes() -> Vec<ProcEntry> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter_map(|pid| parse_stat(pid, &super::process::proc_stat(pid)?))
        .collect()
}

/// A live process's entry from the text of its `/proc/<pid>/stat`; `None` for a zombie (it holds
/// nothing and only waits for its parent) or unreadable text.
fn parse_stat(pid: u32, stat: &str) -> Option<ProcEntry> {
    let mut fields = super::process::stat_fields(stat)?;
    // Field 3 is the state; pgrp is field 5, starttime field 22 (1-based, as in proc(5)).
    let state = fields.next()?;
    if matches!(state, "Z" | "X") {
        return None;
    }
    let pgid = fields.nth(1)?.parse().ok()?;
    let start_ticks = fields.nth(16)?.parse().ok()?;
    Some(ProcEntry { pid, pgid, start_ticks })
}

/// Whether a process that started `start_ticks` clock ticks after this boot could have been
/// recorded at `recorded_at` (Unix seconds): if not, the record is from an earlier boot.
fn started_this_boot(start_ticks: u64, recorded_at: i64) -> bool {
    let (Some(boot), Some(ticks_per_second)) = (boot_time(), clock_ticks_per_second()) else {
        // Without the boot time, trust the start-time match alone (the old rule).
        return true;
    };
    same_boot(start_ticks, ticks_per_second, boot, recorded_at)
}

/// The pure part of [`started_this_boot`].
fn same_boot(start_ticks: u64, ticks_per_second: u64, boot: i64, recorded_at: i64) -> bool {
    let since_boot = i64::try_from(start_ticks / ticks_per_second.max(1)).unwrap_or(i64::MAX);
    let started = boot.saturating_add(since_boot);
    started.abs_diff(recorded_at) <= SAME_BOOT_SLACK_SECS
}

/// The boot time in Unix seconds (`btime` in `/proc/stat`).
fn boot_time() -> Option<i64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines().find_map(|line| line.strip_prefix("btime "))?.trim().parse().ok()
}

/// The kernel's clock ticks per second (the unit of `/proc/<pid>/stat` start times).
fn clock_ticks_per_second() -> Option<u64> {
    // SAFETY: sysconf has no memory effects.
    let ticks = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|t| *t > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_from_an_earlier_boot_is_not_this_boots_process() {
        // Booted at 1000 s, 100 ticks a second: ticks 5000 mean started at 1050 s.
        assert!(same_boot(5000, 100, 1000, 1050));
        assert!(same_boot(5000, 100, 1000, 1058));
        // Recorded an hour before this boot's process could have started: an earlier boot.
        assert!(!same_boot(5000, 100, 1000, 1050 - 3600));
        assert!(!same_boot(5000, 100, 1000, 1050 + 3600));
        // Absurd values saturate rather than overflow.
        assert!(!same_boot(u64::MAX, 1, i64::MAX, i64::MIN));
        assert!(!same_boot(1, 0, 0, 1_000_000));
    }

    use std::os::unix::process::CommandExt;
    use std::time::Instant;

    use chrono::Utc;

    use crate::store::{ProcessRecord, RecordedProcess};

    /// A stand-in leftover: `sleep` leading a process group of its own, ignoring SIGTERM (so only
    /// the SIGKILL after the grace stops it). Killed and reaped when dropped.
    struct Stubborn(std::process::Child);

    impl Stubborn {
        fn spawn() -> Stubborn {
            let mut command = std::process::Command::new("sleep");
            command.arg("30").process_group(0);
            // SAFETY: between fork and exec only sigaction runs, which is async-signal-safe; an
            // ignored signal stays ignored across exec.
            unsafe {
                command.pre_exec(|| {
                    nix::sys::signal::signal(Signal::SIGTERM, nix::sys::signal::SigHandler::SigIgn)
                        .map(|_| ())
                        .map_err(std::io::Error::from)
                });
            }
            Stubborn(command.spawn().expect("spawn sleep"))
        }

        fn pid(&self) -> u32 {
            self.0.id()
        }

        /// Its record, as the daemon that started it would have written it.
        fn recorded(&self, boot_id: Option<String>) -> RecordedProcess {
            let pid = self.pid();
            RecordedProcess {
                record: ProcessRecord {
                    pid,
                    pgid: pid,
                    start_ticks: proc_stat_field(pid, 22).expect("its start time"),
                    model: "m".into(),
                    started_at: Utc::now(),
                },
                boot_id,
            }
        }

        fn alive(&self) -> bool {
            crate::gpu::pid_is_alive(self.pid())
        }
    }

    impl Drop for Stubborn {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    const GRACE: Duration = Duration::from_millis(500);

    /// Four leftovers that ignore SIGTERM are all stopped within about one grace period: one
    /// after the other they would take four.
    #[tokio::test]
    async fn leftovers_are_stopped_together_within_one_grace() {
        let leftovers: Vec<Stubborn> = (0..4).map(|_| Stubborn::spawn()).collect();
        let records: Vec<RecordedProcess> =
            leftovers.iter().map(|l| l.recorded(crate::store::this_boot_id())).collect();
        let started = Instant::now();
        let stopped = reap_leftovers(&records, GRACE).await;
        let took = started.elapsed();
        assert_eq!(stopped, leftovers.iter().map(|l| vec![l.pid()]).collect::<Vec<_>>());
        // SIGKILL is sent; dying takes the kernel a moment.
        let end = Instant::now() + Duration::from_secs(5);
        while leftovers.iter().any(Stubborn::alive) {
            assert!(Instant::now() < end, "a leftover outlived its SIGKILL");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(took >= GRACE, "SIGTERM was ignored, so the grace ran out: {took:?}");
        assert!(took < 3 * GRACE, "stopping 4 leftovers took {took:?}: one grace each, not one for all");
    }

    /// While the reaper waits out the grace, the runtime (one thread here) runs other tasks.
    #[tokio::test(flavor = "current_thread")]
    async fn the_reaper_does_not_block_the_runtime() {
        let leftover = Stubborn::spawn();
        let records = vec![leftover.recorded(crate::store::this_boot_id())];
        let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let ticker = tokio::spawn({
            let ticks = ticks.clone();
            async move {
                let mut interval = tokio::time::interval(Duration::from_millis(20));
                loop {
                    interval.tick().await;
                    ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
        tokio::task::yield_now().await;
        let before = ticks.load(std::sync::atomic::Ordering::Relaxed);
        let stopped = reap_leftovers(&records, GRACE).await;
        let during = ticks.load(std::sync::atomic::Ordering::Relaxed) - before;
        ticker.abort();
        assert_eq!(stopped, vec![vec![leftover.pid()]]);
        // 500 ms of grace is 25 ticks; a blocking wait would allow at most one.
        assert!(during >= 10, "the runtime ticked {during} times while the reaper waited");
    }

    /// Start ticks count from boot: a record written in another boot names nobody today, even
    /// when a live process has its pid and start time.
    #[tokio::test]
    async fn a_record_of_another_boot_is_left_alone() {
        let bystander = Stubborn::spawn();
        let records = vec![bystander.recorded(Some("another-boot".into()))];
        let stopped = reap_leftovers(&records, GRACE).await;
        assert_eq!(stopped, vec![Vec::<u32>::new()]);
        assert!(bystander.alive(), "a process of this boot was stopped for a record of another");
    }

    /// A live process with the recorded pid that started after the recorded one is someone
    /// else's, and so is its group (whose members all started after the record's start time).
    #[tokio::test]
    async fn a_reused_pid_is_left_alone() {
        let bystander = Stubborn::spawn();
        let mut recorded = bystander.recorded(crate::store::this_boot_id());
        recorded.record.start_ticks -= 1;
        assert_eq!(reap_leftovers(&[recorded], GRACE).await, vec![Vec::<u32>::new()]);
        assert!(bystander.alive());
    }

    #[test]
    fn stat_lines_are_read_past_odd_command_names() {
        let stat = |state: &str| {
            let mut fields = vec![state.to_string(), "1".into(), "4242".into()];
            fields.extend((6..=21).map(|n| n.to_string()));
            fields.push("987654".into());
            fields.extend(["0".into(), "0".into()]);
            format!("4243 (a) b (c) {}", fields.join(" "))
        };
        assert_eq!(parse_stat(4243, &stat("S")), Some(ProcEntry { pid: 4243, pgid: 4242, start_ticks: 987654 }));
        assert_eq!(parse_stat(4243, &stat("Z")), None, "a zombie holds nothing");
        assert_eq!(parse_stat(4243, "4243 (truncated"), None);
        let real = std::fs::read_to_string("/proc/self/stat").unwrap();
        let me = parse_stat(std::process::id(), &real).expect("this process");
        assert_eq!(Some(u64::from(me.pgid)), proc_stat_field(std::process::id(), 5));
        assert_eq!(Some(me.start_ticks), proc_stat_field(std::process::id(), 22));
    }
}
