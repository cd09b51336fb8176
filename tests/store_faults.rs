//! The state database and the lock file under faults: a full disk (reproduced with a file size
//! limit, `ulimit -f`, which makes every write that would grow a file fail with EFBIG, as
//! ENOSPC does on a full file system; no root needed), and a file that is not a database. Every
//! error names the file; only a file that really is not SQLite is to be moved aside; and the
//! daemon's writer reports a failed write and clears it by itself once writes succeed again.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use vramgate::store::{ProcessRecord, Store, StoreWriter};

const SECOND: Duration = Duration::from_secs(1);

/// Runs `vramgate serve` with its state in `state` under a file size limit of `limit` (as
/// `ulimit -f` takes it: 512-byte blocks, or `unlimited`) until it exits.
fn serve_with_file_limit(dir: &Path, state: &Path, limit: &str) -> Output {
    let config = dir.join("vramgate.toml");
    let text = format!(
        "[server]\nstate_dir = {:?}\n{}",
        state.display().to_string(),
        common::sim_config(&dir.join("sim"), 1000, "50ms", "")
    );
    std::fs::write(&config, text).expect("write the config");
    let mut command = Command::new("sh");
    // SIGXFSZ would kill the daemon at the first write past the limit: ignored, a write fails
    // with EFBIG instead, as one fails with ENOSPC on a full disk. Ignored stays ignored across
    // exec.
    command
        .args(["-c", "trap '' XFSZ; ulimit -f \"$1\" || exit 99; shift; exec \"$@\"", "sh", limit])
        .args([common::bin(), "serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config);
    common::isolate(&mut command);
    common::output_within(&mut command, 20 * SECOND)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn record(pid: u32) -> ProcessRecord {
    ProcessRecord { pid, pgid: pid, start_ticks: 1, model: "llm".into(), started_at: chrono::Utc::now() }
}

/// A state directory holding an intact database with one process record and one footprint.
fn intact_state(dir: &Path) -> PathBuf {
    let state = dir.join("state");
    let store = Store::open(&state).expect("create the database");
    store.record_process(&record(4242)).expect("record");
    store.record_footprint("llm", 6646).expect("footprint");
    state
}

#[test]
fn an_intact_database_on_a_full_disk_is_not_to_be_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let state = intact_state(dir.path());
    let db = state.join("state.db");
    let before = std::fs::read(&db).unwrap();
    // One block: the lock file (a pid) fits; SQLite's shared-memory file does not.
    let output = serve_with_file_limit(dir.path(), &state, "1");
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{message}");
    assert!(message.contains(&db.display().to_string()), "the error names the database: {message}");
    assert!(!message.contains("move it aside"), "wrong advice for an intact database: {message}");
    assert!(message.contains("full disk"), "the error says what to look at: {message}");
    // And it was right not to: the database is untouched and opens with its records.
    assert_eq!(std::fs::read(&db).unwrap(), before);
    let store = Store::open(&state).unwrap();
    assert_eq!(store.processes().unwrap()[0].record.pid, 4242);
    assert_eq!(store.footprints().unwrap()["llm"], 6646);
}

#[test]
fn a_new_database_on_a_full_disk_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let output = serve_with_file_limit(dir.path(), &state, "1");
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{message}");
    assert!(message.contains(&state.join("state.db").display().to_string()), "{message}");
    assert!(!message.contains("move it aside"), "{message}");
}

#[test]
fn a_file_that_is_not_sqlite_is_to_be_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let db = state.join("state.db");
    let garbage = b"not a database: a file that landed here by mistake\n".repeat(200);
    std::fs::write(&db, &garbage).unwrap();
    let output = serve_with_file_limit(dir.path(), &state, "unlimited");
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{message}");
    assert!(message.contains(&db.display().to_string()), "{message}");
    assert!(message.contains("not a SQLite database") && message.contains("move it aside"), "{message}");
    assert_eq!(std::fs::read(&db).unwrap(), garbage, "the file is left alone");
}

#[test]
fn the_lock_file_on_a_full_disk_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // No room at all: the first write, the daemon's pid into its lock file, fails.
    let output = serve_with_file_limit(dir.path(), &state, "0");
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{message}");
    let lock = state.join("daemon.lock").display().to_string();
    assert!(message.contains(&format!("cannot write the lock file {lock}")), "{message}");
}

/// Set in the copy of this test binary that runs the writer under a file size limit.
const LIMITED_CHILD: &str = "VRAMGATE_TEST_STORE_FAULTS_DIR";

/// The writer on a real database and a real "full disk": a file size limit is process-wide, so
/// the test runs itself again in a child process that holds the limit (only this test runs
/// there); the parent checks that the child passed, and what reached the disk.
#[tokio::test]
async fn the_writer_reports_a_full_disk_and_recovers_when_space_returns() {
    if let Some(dir) = std::env::var_os(LIMITED_CHILD) {
        return writer_on_a_full_disk(Path::new(&dir)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let name = "the_writer_reports_a_full_disk_and_recovers_when_space_returns";
    let output = common::output_within(
        Command::new(std::env::current_exe().expect("this test binary"))
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(LIMITED_CHILD, dir.path()),
        60 * SECOND,
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success() && stdout.contains("1 passed"), "the child failed:\n{stdout}\n{}", stderr(&output));
    // Nothing was lost or reordered while the disk was full.
    let store = Store::open(&dir.path().join("state")).unwrap();
    let pids: Vec<u32> = store.processes().unwrap().iter().map(|p| p.record.pid).collect();
    assert_eq!(pids, vec![2], "record 1, forget 1, record 2 applied in order");
    let footprints = store.footprints().unwrap();
    assert_eq!((footprints["before"], footprints["during"]), (1, 2));
}

/// The child's part: writes, fills the "disk", writes more, frees it.
async fn writer_on_a_full_disk(dir: &Path) {
    use nix::libc;
    let state = dir.join("state");
    let db = state.join("state.db").display().to_string();
    let writer = StoreWriter::start_with_retry(Store::open(&state).unwrap(), Duration::from_millis(10)).unwrap();
    writer.record_footprint("before", 1);
    writer.flush(10 * SECOND).await.expect("a write with room");

    // SAFETY: plain libc calls on a local struct; ignoring SIGXFSZ turns the kill into EFBIG.
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit), 0);
        let full = libc::rlimit { rlim_cur: 0, rlim_max: limit.rlim_max };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &full), 0);
    }
    let mut failures = writer.failures();
    writer.record_process(record(1));
    writer.forget_process(1);
    writer.record_process(record(2));
    writer.record_footprint("during", 2);
    let failure = tokio::time::timeout(10 * SECOND, failures.wait_for(Option::is_some))
        .await
        .expect("the failed write is reported")
        .unwrap()
        .clone()
        .unwrap();
    eprintln!("the writer reported: {failure}");
    assert!(failure.contains(&db), "the failure names the database: {failure}");
    assert!(!failure.contains("move it aside"), "{failure}");
    assert!(writer.flush(10 * SECOND).await.is_err(), "a flush says the writes are still pending");

    // Room again (the soft limit back up to what it was): the retry, with no new write, clears.
    // SAFETY: as above.
    unsafe {
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
    tokio::time::timeout(10 * SECOND, failures.wait_for(Option::is_none))
        .await
        .expect("the failure clears once writes succeed")
        .unwrap();
    assert_eq!(writer.write_failure(), None);
    writer.flush(10 * SECOND).await.expect("everything written");
}
