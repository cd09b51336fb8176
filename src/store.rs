//! The embedded state database (SQLite, bundled): what must survive the daemon.
//!
//! Two tables: the processes the daemon started (so a daemon restarted after a crash or `kill -9`
//! finds and stops leftovers before it admits anything) and the measured footprints of models (so
//! admission uses real numbers). [`Store`] is the synchronous database, used as is at start-up
//! (open, read the records, forget the reaped leftovers); once the daemon runs, writes go through
//! a [`StoreWriter`], whose dedicated thread owns the connection, so that a slow or full disk
//! (SQLite waits up to its busy timeout) never stalls the async runtime.

mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, ErrorCode, OpenFlags, params};

pub use writer::{StoreWriter, WRITE_RETRY};

/// A process the daemon started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessRecord {
    /// Process id of the model's command.
    pub pid: u32,
    /// Its process group, led by the command's keeper (see `crate::keeper`); the restarted
    /// daemon stops every process left in it.
    pub pgid: u32,
    /// The kernel's start time of the group's leader (`/proc/<pgid>/stat` field 22), which
    /// tells a leftover from an unrelated process that later got the same pid.
    pub start_ticks: u64,
    /// The model it served.
    pub model: String,
    /// When it was started.
    pub started_at: DateTime<Utc>,
}

/// A [`ProcessRecord`] as read back, with the boot it was written in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedProcess {
    /// The record.
    pub record: ProcessRecord,
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`) when the record was written;
    /// `None` for records written before the daemon kept it, or where the kernel has none. Start
    /// ticks count from boot, so they identify a process only within the boot that wrote them.
    pub boot_id: Option<String>,
}

/// The store could not be opened or written.
#[derive(Debug, thiserror::Error)]
#[error("state database {path}: {message}")]
pub struct StoreError {
    /// The database file.
    pub path: PathBuf,
    /// What went wrong and what to do.
    pub message: String,
}

/// The open database.
pub struct Store {
    connection: Connection,
    path: PathBuf,
    /// This boot's id, written with each process record.
    boot_id: Option<String>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS processes (
    pid INTEGER PRIMARY KEY,
    pgid INTEGER NOT NULL,
    start_ticks INTEGER NOT NULL,
    model TEXT NOT NULL,
    started_at TEXT NOT NULL,
    boot_id TEXT
);
CREATE TABLE IF NOT EXISTS footprints (
    model TEXT PRIMARY KEY,
    mib INTEGER NOT NULL,
    measured_at TEXT NOT NULL,
    estimate_mib INTEGER
);
";

/// The first 16 bytes of every SQLite database file.
const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// The kernel's id of the running boot, if it has one.
pub fn this_boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(id.trim().to_string()).filter(|id| !id.is_empty())
}

/// Whether SQLite's error says the file is not a database or is damaged (as opposed to a disk,
/// permission or locking problem, where the file itself may be fine).
fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt))
}

/// What to tell the user about an error on the file at `path`. Only a file that really is not
/// SQLite (by its header), or that SQLite found damaged, is worth moving aside: on a full disk
/// or a read-only file system the database is intact, and moving it would lose its records.
fn explain(what: &str, e: &rusqlite::Error, path: &Path) -> String {
    if is_damage(e) {
        return match has_foreign_header(path) {
            Some(true) => format!("{what}: it is not a SQLite database ({e}); move it aside to start afresh"),
            _ => format!("{what}: the database is damaged ({e}); move it aside to start afresh"),
        };
    }
    let hint = match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => "the disk is full: free space on the file system that holds it",
        Some(ErrorCode::ReadOnly | ErrorCode::PermissionDenied | ErrorCode::CannotOpen) => {
            "it cannot be written: check its permissions and that its file system is writable"
        }
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => "another program holds it locked",
        _ => "the file system refused a read or write (full disk, a file size limit, or a read-only file system?)",
    };
    format!("{what} ({e}): {hint}")
}

/// Whether the file at `path` has content that is not a SQLite header: `Some(false)` for a
/// SQLite file or an empty one (a new database), `None` when it cannot be read.
fn has_foreign_header(path: &Path) -> Option<bool> {
    use std::io::Read;
    let mut start = Vec::with_capacity(SQLITE_HEADER.len());
    std::fs::File::open(path).ok()?.take(SQLITE_HEADER.len() as u64).read_to_end(&mut start).ok()?;
    Some(!start.is_empty() && start.as_slice() != SQLITE_HEADER.as_slice())
}

impl Store {
    /// Opens (creating if needed) `state_dir/state.db`. A corrupt or unwritable database is an
    /// error that names the file; nothing is deleted or recreated behind the user's back.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        let path = state_dir.join("state.db");
        let fail = |message: String| StoreError { path: path.clone(), message };
        std::fs::create_dir_all(state_dir)
            .map_err(|e| fail(format!("cannot create the state directory {}: {e}", state_dir.display())))?;
        let connection = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| fail(explain("cannot open it", &e, &path)))?;
        connection.busy_timeout(Duration::from_secs(2)).map_err(|e| fail(explain("cannot configure it", &e, &path)))?;
        // quick_check reads every page: a corrupt file is found now, not halfway through a write.
        let check: String = connection
            .query_row("PRAGMA quick_check", [], |row| row.get(0))
            .map_err(|e| fail(explain("cannot check it", &e, &path)))?;
        if check != "ok" {
            return Err(fail(format!("the database is damaged ({check}); move it aside to start afresh")));
        }
        connection
            .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
            .and_then(|_| connection.execute_batch(SCHEMA))
            .and_then(|_| migrate(&connection))
            .map_err(|e| fail(explain("cannot write it", &e, &path)))?;
        Ok(Store { connection, path, boot_id: this_boot_id() })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fail(&self, what: &str, e: rusqlite::Error) -> StoreError {
        StoreError { path: self.path.clone(), message: explain(what, &e, &self.path) }
    }

    /// Remembers a spawned process, with this boot's id.
    pub fn record_process(&self, record: &ProcessRecord) -> Result<(), StoreError> {
        self.record_process_of_boot(record, self.boot_id.as_deref())
    }

    /// [`Store::record_process`] with a given boot id (tests plant records of other boots).
    pub fn record_process_of_boot(&self, record: &ProcessRecord, boot_id: Option<&str>) -> Result<(), StoreError> {
        self.connection
            .execute(
                "INSERT OR REPLACE INTO processes (pid, pgid, start_ticks, model, started_at, boot_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    record.pid,
                    record.pgid,
                    // Ticks since boot fit in an i64 for 10^8 years; saturate rather than wrap.
                    i64::try_from(record.start_ticks).unwrap_or(i64::MAX),
                    record.model,
                    record.started_at.to_rfc3339(),
                    boot_id
                ],
            )
            .map(|_| ())
            .map_err(|e| self.fail("cannot record a started process", e))
    }

    /// Forgets a process that has exited and been reaped.
    pub fn forget_process(&self, pid: u32) -> Result<(), StoreError> {
        self.connection
            .execute("DELETE FROM processes WHERE pid = ?1", params![pid])
            .map(|_| ())
            .map_err(|e| self.fail("cannot forget a stopped process", e))
    }

    /// Forgets several processes in one transaction (the start-up reaper's leftovers).
    pub fn forget_processes(&mut self, pids: &[u32]) -> Result<(), StoreError> {
        let path = self.path.clone();
        let fail = |e: rusqlite::Error| StoreError {
            message: explain("cannot forget stopped processes", &e, &path),
            path: path.clone(),
        };
        let transaction = self.connection.transaction().map_err(fail)?;
        for pid in pids {
            transaction.execute("DELETE FROM processes WHERE pid = ?1", params![pid]).map_err(fail)?;
        }
        transaction.commit().map_err(fail)
    }

    /// Every recorded process, with the boot it was recorded in.
    pub fn processes(&self) -> Result<Vec<RecordedProcess>, StoreError> {
        let mut statement = self
            .connection
            .prepare("SELECT pid, pgid, start_ticks, model, started_at, boot_id FROM processes ORDER BY pid")
            .map_err(|e| self.fail("cannot read processes", e))?;
        let rows = statement
            .query_map([], |row| {
                let started_at: String = row.get(4)?;
                Ok(RecordedProcess {
                    record: ProcessRecord {
                        pid: row.get(0)?,
                        pgid: row.get(1)?,
                        // A negative value can only come from a hand-edited file: it matches no
                        // process, so the reaper leaves the group alone.
                        start_ticks: u64::try_from(row.get::<_, i64>(2)?).unwrap_or(u64::MAX),
                        model: row.get(3)?,
                        started_at: DateTime::parse_from_rfc3339(&started_at)
                            .map(|t| t.with_timezone(&Utc))
                            .unwrap_or(DateTime::<Utc>::UNIX_EPOCH),
                    },
                    boot_id: row.get(5)?,
                })
            })
            .map_err(|e| self.fail("cannot read processes", e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.fail("cannot read processes", e))
    }

    /// Stores a model's measured footprint (the latest measurement wins: models change).
    pub fn record_footprint(&self, model: &str, mib: u64) -> Result<(), StoreError> {
        self.record_footprint_at(model, mib, None, Utc::now())
    }

    /// [`Store::record_footprint`], measured at `measured_at`, with the header estimate the
    /// model had then (what a later, different estimate is corrected against).
    fn record_footprint_at(
        &self,
        model: &str,
        mib: u64,
        estimate_mib: Option<u64>,
        measured_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let estimate = estimate_mib.map(|e| i64::try_from(e).unwrap_or(i64::MAX));
        self.connection
            .execute(
                "INSERT OR REPLACE INTO footprints (model, mib, measured_at, estimate_mib) VALUES (?1, ?2, ?3, ?4)",
                params![model, i64::try_from(mib).unwrap_or(i64::MAX), measured_at.to_rfc3339(), estimate],
            )
            .map(|_| ())
            .map_err(|e| self.fail("cannot record a footprint", e))
    }

    /// Every measured footprint, by model.
    pub fn footprints(&self) -> Result<HashMap<String, u64>, StoreError> {
        let mut statement = self
            .connection
            .prepare("SELECT model, mib FROM footprints")
            .map_err(|e| self.fail("cannot read footprints", e))?;
        let rows = statement
            .query_map([], |row| Ok((row.get::<_, String>(0)?, u64::try_from(row.get::<_, i64>(1)?).unwrap_or(0))))
            .map_err(|e| self.fail("cannot read footprints", e))?;
        rows.collect::<Result<HashMap<_, _>, _>>().map_err(|e| self.fail("cannot read footprints", e))
    }

    /// For each measured footprint recorded with one, the estimate the model had when it was
    /// measured, by model.
    pub fn footprint_estimates(&self) -> Result<HashMap<String, u64>, StoreError> {
        let mut statement = self
            .connection
            .prepare("SELECT model, estimate_mib FROM footprints WHERE estimate_mib IS NOT NULL")
            .map_err(|e| self.fail("cannot read footprints", e))?;
        let rows = statement
            .query_map([], |row| Ok((row.get::<_, String>(0)?, u64::try_from(row.get::<_, i64>(1)?).unwrap_or(0))))
            .map_err(|e| self.fail("cannot read footprints", e))?;
        rows.collect::<Result<HashMap<_, _>, _>>().map_err(|e| self.fail("cannot read footprints", e))
    }
}

/// Brings a database written by an earlier version up to [`SCHEMA`]: `processes.boot_id` came
/// later (existing rows get NULL: their boot is unknown, and the reaper falls back to comparing
/// start time with the time of the record), and so did `footprints.estimate_mib` (NULL: measured
/// before estimates, nothing to correct against).
fn migrate(connection: &Connection) -> rusqlite::Result<()> {
    let columns = |table: &str| -> rusqlite::Result<Vec<String>> {
        let mut statement = connection.prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))?;
        statement.query_map([], |row| row.get::<_, String>(0))?.collect()
    };
    if !columns("processes")?.iter().any(|name| name == "boot_id") {
        connection.execute_batch("ALTER TABLE processes ADD COLUMN boot_id TEXT DEFAULT NULL")?;
    }
    if !columns("footprints")?.iter().any(|name| name == "estimate_mib") {
        connection.execute_batch("ALTER TABLE footprints ADD COLUMN estimate_mib INTEGER DEFAULT NULL")?;
    }
    Ok(())
}

/// The default state directory: `$XDG_STATE_HOME/vramgate`, else `~/.local/state/vramgate`, else
/// a directory under the system temp dir.
pub fn default_state_dir() -> PathBuf {
    state_dir_for(std::env::var_os("XDG_STATE_HOME"), std::env::var_os("HOME"), std::env::temp_dir())
}

/// [`default_state_dir`] for given values of `XDG_STATE_HOME`, `HOME` and the temp dir (kept
/// apart from the environment so that each case can be tested exactly; an empty variable counts
/// as unset, as the XDG spec says).
fn state_dir_for(
    xdg_state_home: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
    temp_dir: PathBuf,
) -> PathBuf {
    if let Some(dir) = xdg_state_home.filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("vramgate");
    }
    if let Some(home) = home.filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".local/state/vramgate");
    }
    temp_dir.join("vramgate-state")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(pid: u32, model: &str) -> ProcessRecord {
        ProcessRecord { pid, pgid: pid, start_ticks: 12345, model: model.into(), started_at: Utc::now() }
    }

    #[test]
    fn processes_round_trip_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.record_process(&record(100, "llm")).unwrap();
            store.record_process(&record(200, "whisper")).unwrap();
            store.forget_process(100).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let processes = store.processes().unwrap();
        assert_eq!(processes.len(), 1);
        let whisper = &processes[0].record;
        assert_eq!((whisper.pid, whisper.model.as_str(), whisper.start_ticks), (200, "whisper", 12345));
        assert_eq!(processes[0].boot_id, this_boot_id(), "recorded with this boot's id");
        assert!(processes[0].boot_id.is_some(), "Linux has a boot id");
    }

    /// A database written before `processes.boot_id` existed opens, keeps its records (boot
    /// unknown), and takes new ones with the boot id.
    #[test]
    fn a_database_from_before_boot_ids_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let old = Connection::open(dir.path().join("state.db")).unwrap();
            old.execute_batch(
                "PRAGMA journal_mode = WAL;
                 CREATE TABLE processes (pid INTEGER PRIMARY KEY, pgid INTEGER NOT NULL, start_ticks INTEGER NOT NULL, model TEXT NOT NULL, started_at TEXT NOT NULL);
                 CREATE TABLE footprints (model TEXT PRIMARY KEY, mib INTEGER NOT NULL, measured_at TEXT NOT NULL);
                 INSERT INTO processes VALUES (100, 100, 777, 'llm', '2026-01-01T00:00:00+00:00');
                 INSERT INTO footprints VALUES ('llm', 6646, '2026-01-01T00:00:00+00:00');",
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        store.record_process(&record(200, "stt")).unwrap();
        let processes = store.processes().unwrap();
        assert_eq!(processes.len(), 2);
        assert_eq!(
            (processes[0].record.pid, processes[0].record.start_ticks, processes[0].boot_id.clone()),
            (100, 777, None)
        );
        assert_eq!((processes[1].record.pid, processes[1].boot_id.clone()), (200, this_boot_id()));
        assert_eq!(store.footprints().unwrap()["llm"], 6646);
        assert!(store.footprint_estimates().unwrap().is_empty(), "measured before estimates: none to correct against");
        store.record_footprint_at("stt", 1500, Some(1400), Utc::now()).unwrap();
        assert_eq!(store.footprint_estimates().unwrap()["stt"], 1400, "the new column takes values");
        drop(store);
        // Opening again finds the column there and changes nothing.
        assert_eq!(Store::open(dir.path()).unwrap().processes().unwrap(), processes);
    }

    #[test]
    fn footprints_keep_the_latest_measurement() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.record_footprint("llm", 6646).unwrap();
        store.record_footprint("llm", 6700).unwrap();
        store.record_footprint("stt", 1500).unwrap();
        let footprints = store.footprints().unwrap();
        assert_eq!(footprints["llm"], 6700);
        assert_eq!(footprints["stt"], 1500);
        // With the estimate it was measured under; a later measurement without one clears it.
        store.record_footprint_at("llm", 6800, Some(6500), Utc::now()).unwrap();
        assert_eq!(store.footprint_estimates().unwrap().get("llm"), Some(&6500));
        store.record_footprint("llm", 6900).unwrap();
        assert_eq!(store.footprint_estimates().unwrap().get("llm"), None);
    }

    #[test]
    fn a_corrupt_database_is_a_clear_error_and_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let garbage = b"this is not a database, and it must not be replaced silently".repeat(100);
        std::fs::write(&path, &garbage).unwrap();
        let err = Store::open(dir.path()).err().expect("must refuse");
        let message = err.to_string();
        assert!(message.contains("state.db") && message.contains("move it aside"), "{message}");
        assert!(message.contains("not a SQLite database"), "{message}");
        assert_eq!(std::fs::read(&path).unwrap(), garbage, "the file is untouched");
    }

    /// Only damage is worth moving the file aside for: a full disk, a size limit or a
    /// read-only file system leave an intact database that the user needs to keep.
    #[test]
    fn only_a_damaged_or_foreign_file_is_to_be_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = dir.path().join("state.db");
        drop(Store::open(dir.path()).unwrap());
        let foreign = dir.path().join("foreign.db");
        std::fs::write(&foreign, b"#!/bin/sh\necho this is a script, not a database\n").unwrap();
        let failure = |code: i32| rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None);
        for code in [
            rusqlite::ffi::SQLITE_FULL,
            rusqlite::ffi::SQLITE_IOERR,
            rusqlite::ffi::SQLITE_IOERR_WRITE,
            rusqlite::ffi::SQLITE_READONLY,
            rusqlite::ffi::SQLITE_CANTOPEN,
            rusqlite::ffi::SQLITE_BUSY,
        ] {
            for path in [&sqlite, &foreign] {
                let message = explain("cannot read it", &failure(code), path);
                assert!(!message.contains("move it aside"), "code {code}: {message}");
            }
        }
        let full = explain("cannot write it", &failure(rusqlite::ffi::SQLITE_FULL), &sqlite);
        assert!(full.contains("disk is full"), "{full}");
        let foreign_message = explain("cannot read it", &failure(rusqlite::ffi::SQLITE_NOTADB), &foreign);
        assert!(foreign_message.contains("not a SQLite database") && foreign_message.contains("move it aside"));
        let damaged = explain("cannot read it", &failure(rusqlite::ffi::SQLITE_CORRUPT), &sqlite);
        assert!(damaged.contains("damaged") && damaged.contains("move it aside"), "{damaged}");
        assert_eq!(has_foreign_header(&sqlite), Some(false));
        assert_eq!(has_foreign_header(&foreign), Some(true));
    }

    #[test]
    fn an_unusable_state_dir_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "x").unwrap();
        let err = Store::open(&blocker.join("sub")).err().expect("must refuse");
        assert!(err.to_string().contains("cannot create the state directory"), "{err}");
    }

    #[test]
    fn default_state_dir_follows_xdg() {
        let tmp = PathBuf::from("/tmp");
        let some = |s: &str| Some(std::ffi::OsString::from(s));
        assert_eq!(state_dir_for(some("/x/state"), some("/home/u"), tmp.clone()), PathBuf::from("/x/state/vramgate"));
        assert_eq!(state_dir_for(None, some("/home/u"), tmp.clone()), PathBuf::from("/home/u/.local/state/vramgate"));
        assert_eq!(
            state_dir_for(some(""), some("/home/u"), tmp.clone()),
            PathBuf::from("/home/u/.local/state/vramgate")
        );
        assert_eq!(state_dir_for(None, None, tmp.clone()), PathBuf::from("/tmp/vramgate-state"));
        assert_eq!(state_dir_for(some(""), some(""), tmp), PathBuf::from("/tmp/vramgate-state"));
        // And the real one reads the environment the same way (not created).
        assert_eq!(
            default_state_dir(),
            state_dir_for(std::env::var_os("XDG_STATE_HOME"), std::env::var_os("HOME"), std::env::temp_dir())
        );
    }
}
