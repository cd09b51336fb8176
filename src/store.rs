//! The embedded state database (SQLite, bundled): what must survive the daemon.
//!
//! Two tables: the processes the daemon started (so a daemon restarted after a crash or `kill -9`
//! finds and stops leftovers before it admits anything) and the measured footprints of models (so
//! admission uses real numbers). Writes are rare (a spawn, an exit, a measurement) and small, so
//! they run inline; WAL mode keeps them well under a millisecond.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags, params};

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
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS processes (
    pid INTEGER PRIMARY KEY,
    pgid INTEGER NOT NULL,
    start_ticks INTEGER NOT NULL,
    model TEXT NOT NULL,
    started_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS footprints (
    model TEXT PRIMARY KEY,
    mib INTEGER NOT NULL,
    measured_at TEXT NOT NULL
);
";

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
        .map_err(|e| fail(format!("cannot open: {e}")))?;
        connection.busy_timeout(Duration::from_secs(2)).map_err(|e| fail(format!("cannot configure: {e}")))?;
        // quick_check reads every page: a corrupt file is found now, not halfway through a write.
        let check: String = connection
            .query_row("PRAGMA quick_check", [], |row| row.get(0))
            .map_err(|e| fail(format!("is not a usable SQLite database ({e}); move it aside to start afresh")))?;
        if check != "ok" {
            return Err(fail(format!("is corrupt ({check}); move it aside to start afresh")));
        }
        connection
            .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
            .and_then(|_| connection.execute_batch(SCHEMA))
            .map_err(|e| fail(format!("cannot write (read-only or full disk?): {e}")))?;
        Ok(Store { connection, path })
    }

    fn fail(&self, what: &str, e: rusqlite::Error) -> StoreError {
        StoreError { path: self.path.clone(), message: format!("{what}: {e}") }
    }

    /// Remembers a spawned process.
    pub fn record_process(&self, record: &ProcessRecord) -> Result<(), StoreError> {
        self.connection
            .execute(
                "INSERT OR REPLACE INTO processes (pid, pgid, start_ticks, model, started_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![record.pid, record.pgid, record.start_ticks as i64, record.model, record.started_at.to_rfc3339()],
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

    /// Every recorded process.
    pub fn processes(&self) -> Result<Vec<ProcessRecord>, StoreError> {
        let mut statement = self
            .connection
            .prepare("SELECT pid, pgid, start_ticks, model, started_at FROM processes ORDER BY pid")
            .map_err(|e| self.fail("cannot read processes", e))?;
        let rows = statement
            .query_map([], |row| {
                let started_at: String = row.get(4)?;
                Ok(ProcessRecord {
                    pid: row.get(0)?,
                    pgid: row.get(1)?,
                    start_ticks: row.get::<_, i64>(2)? as u64,
                    model: row.get(3)?,
                    started_at: DateTime::parse_from_rfc3339(&started_at)
                        .map(|t| t.with_timezone(&Utc))
                        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH),
                })
            })
            .map_err(|e| self.fail("cannot read processes", e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.fail("cannot read processes", e))
    }

    /// Stores a model's measured footprint (the latest measurement wins: models change).
    pub fn record_footprint(&self, model: &str, mib: u64) -> Result<(), StoreError> {
        self.connection
            .execute(
                "INSERT OR REPLACE INTO footprints (model, mib, measured_at) VALUES (?1, ?2, ?3)",
                params![model, mib as i64, Utc::now().to_rfc3339()],
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
            .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)? as u64)))
            .map_err(|e| self.fail("cannot read footprints", e))?;
        rows.collect::<Result<HashMap<_, _>, _>>().map_err(|e| self.fail("cannot read footprints", e))
    }
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
        assert_eq!((processes[0].pid, processes[0].model.as_str(), processes[0].start_ticks), (200, "whisper", 12345));
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
        assert_eq!(std::fs::read(&path).unwrap(), garbage, "the file is untouched");
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
