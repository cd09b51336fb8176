//! [`StoreWriter`]: the running daemon's writes to the state database, off the async runtime.
//!
//! A write is a message to one thread that owns the database connection and applies the writes
//! in the order they were sent. Sending never blocks: the arbiter records a spawn or a
//! measurement and goes on, however slow or full the disk. A write that fails stays at the head
//! of the queue (later ones wait behind it, so that a process's `forget` never overtakes its
//! `record`) and is retried every [`WRITE_RETRY`], so the failure clears by itself once the disk
//! has room again, without waiting for the next write to come along.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{oneshot, watch};

use super::{ProcessRecord, Store, StoreError};

/// How often a failed write is retried.
pub const WRITE_RETRY: Duration = Duration::from_secs(1);
/// Writes kept while the database refuses them. Beyond it the oldest is dropped (and logged):
/// memory stays bounded however long the disk stays full. Writes are a few per model start, so
/// this is hours of churn.
const MAX_PENDING: usize = 10_000;

/// One write to the state database.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Write {
    /// [`Store::record_process`].
    RecordProcess(ProcessRecord),
    /// [`Store::forget_process`].
    ForgetProcess(u32),
    /// [`Store::record_footprint`], measured when the write was sent.
    RecordFootprint { model: String, mib: u64, estimate_mib: Option<u64>, measured_at: DateTime<Utc> },
}

/// What the writer thread writes to: the [`Store`], or a fake in tests.
pub(crate) trait WriteTarget: Send + 'static {
    /// Applies one write.
    fn apply(&mut self, write: &Write) -> Result<(), StoreError>;
}

impl WriteTarget for Store {
    fn apply(&mut self, write: &Write) -> Result<(), StoreError> {
        match write {
            Write::RecordProcess(record) => self.record_process(record),
            Write::ForgetProcess(pid) => self.forget_process(*pid),
            Write::RecordFootprint { model, mib, estimate_mib, measured_at } => {
                self.record_footprint_at(model, *mib, *estimate_mib, *measured_at)
            }
        }
    }
}

enum Job {
    Write(Write),
    /// Answered once every write sent before it has been tried: `Err` with the failure when some
    /// are still waiting for the disk.
    Flush(oneshot::Sender<Result<(), String>>),
}

/// A handle on the writer thread: cheap to clone, and no method blocks. The thread ends (after
/// one last try of what is pending) when every handle is dropped.
#[derive(Clone)]
pub struct StoreWriter {
    jobs: mpsc::Sender<Job>,
    failure: watch::Receiver<Option<String>>,
}

impl StoreWriter {
    /// Moves `store` onto a writer thread of its own. Read what start-up needs
    /// ([`Store::processes`], [`Store::footprints`]) before.
    pub fn start(store: Store) -> std::io::Result<StoreWriter> {
        StoreWriter::start_with_retry(store, WRITE_RETRY)
    }

    /// [`StoreWriter::start`] with another retry interval (tests use milliseconds).
    pub fn start_with_retry(store: Store, retry: Duration) -> std::io::Result<StoreWriter> {
        StoreWriter::start_on(store, retry)
    }

    pub(crate) fn start_on(target: impl WriteTarget, retry: Duration) -> std::io::Result<StoreWriter> {
        let (jobs, queue) = mpsc::channel();
        let (report, failure) = watch::channel(None);
        std::thread::Builder::new()
            .name("vramgate-store".into())
            .spawn(move || write_loop(target, queue, report, retry))?;
        Ok(StoreWriter { jobs, failure })
    }

    fn send(&self, write: Write) {
        if self.jobs.send(Job::Write(write)).is_err() {
            // Only if the thread panicked: say so rather than lose records silently.
            tracing::error!("the state database writer has stopped; a write was lost");
        }
    }

    /// Remembers a spawned process (see [`Store::record_process`]).
    pub fn record_process(&self, record: ProcessRecord) {
        self.send(Write::RecordProcess(record));
    }

    /// Forgets a process that has exited and been reaped.
    pub fn forget_process(&self, pid: u32) {
        self.send(Write::ForgetProcess(pid));
    }

    /// Stores a model's measured footprint, timestamped now.
    pub fn record_footprint(&self, model: &str, mib: u64) {
        self.record_footprint_estimated(model, mib, None);
    }

    /// [`StoreWriter::record_footprint`] with the header estimate the model had when measured.
    pub fn record_footprint_estimated(&self, model: &str, mib: u64, estimate_mib: Option<u64>) {
        self.send(Write::RecordFootprint { model: model.to_string(), mib, estimate_mib, measured_at: Utc::now() });
    }

    /// Why the database refuses writes right now (naming the file), or `None` when the latest
    /// try succeeded. Goes back to `None` by itself once a retry succeeds.
    pub fn write_failure(&self) -> Option<String> {
        self.failure.borrow().clone()
    }

    /// A receiver of [`StoreWriter::write_failure`]'s changes, to await them (`changed()`).
    pub fn failures(&self) -> watch::Receiver<Option<String>> {
        self.failure.clone()
    }

    /// Waits until every write sent before this call has been tried, at most `within`: `Ok`
    /// when all are applied, else the reason (a failure, or that the time ran out). For
    /// shutdown, so that the last records reach the disk before the daemon exits.
    pub async fn flush(&self, within: Duration) -> Result<(), String> {
        let (answer, answered) = oneshot::channel();
        if self.jobs.send(Job::Flush(answer)).is_err() {
            return Err("the state database writer has stopped".into());
        }
        match tokio::time::timeout(within, answered).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err("the state database writer has stopped".into()),
            Err(_) => {
                Err(format!("writes to the state database still pending after {}", crate::units::Rounded(within)))
            }
        }
    }
}

/// The writer thread: waits for jobs, applies pending writes in order, keeps the failed one at
/// the head and retries it every `retry`.
fn write_loop(
    mut target: impl WriteTarget,
    queue: mpsc::Receiver<Job>,
    report: watch::Sender<Option<String>>,
    retry: Duration,
) {
    let mut pending: VecDeque<Write> = VecDeque::new();
    let mut flushes: Vec<oneshot::Sender<Result<(), String>>> = Vec::new();
    loop {
        // Idle: sleep until a job. Behind a failed write: also wake to retry it.
        let first = if pending.is_empty() {
            queue.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
        } else {
            queue.recv_timeout(retry)
        };
        let closed = match first {
            Ok(job) => {
                take(job, &mut pending, &mut flushes);
                // Take what else is queued, so that one pass applies the lot.
                while let Ok(job) = queue.try_recv() {
                    take(job, &mut pending, &mut flushes);
                }
                false
            }
            Err(mpsc::RecvTimeoutError::Timeout) => false,
            Err(mpsc::RecvTimeoutError::Disconnected) => true,
        };
        let result = apply_pending(&mut target, &mut pending);
        report.send_if_modified(|current| {
            let next = result.as_ref().err().map(|e| e.to_string());
            match (&*current, &next) {
                (None, Some(failure)) => tracing::error!("{failure}; retrying every {}", crate::units::Rounded(retry)),
                (Some(_), None) => tracing::info!("the state database accepts writes again"),
                _ => {}
            }
            let changed = *current != next;
            *current = next;
            changed
        });
        for flush in flushes.drain(..) {
            let _ = flush.send(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        }
        if closed {
            if let Err(e) = result {
                tracing::error!("{e}; {} write(s) lost at shutdown", pending.len());
            }
            return;
        }
    }
}

fn take(job: Job, pending: &mut VecDeque<Write>, flushes: &mut Vec<oneshot::Sender<Result<(), String>>>) {
    match job {
        Job::Write(write) => {
            if pending.len() >= MAX_PENDING
                && let Some(dropped) = pending.pop_front()
            {
                tracing::error!("the state database has refused writes for long; dropped {dropped:?}");
            }
            pending.push_back(write);
        }
        Job::Flush(answer) => flushes.push(answer),
    }
}

/// Applies pending writes from the head until one fails (it stays at the head).
fn apply_pending(target: &mut impl WriteTarget, pending: &mut VecDeque<Write>) -> Result<(), StoreError> {
    while let Some(write) = pending.front() {
        target.apply(write)?;
        pending.pop_front();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A target that logs what it applied and refuses every write while `full` is set.
    #[derive(Clone, Default)]
    struct FakeDisk {
        applied: Arc<Mutex<Vec<Write>>>,
        full: Arc<Mutex<bool>>,
    }

    impl WriteTarget for FakeDisk {
        fn apply(&mut self, write: &Write) -> Result<(), StoreError> {
            if *self.full.lock().unwrap() {
                return Err(StoreError { path: PathBuf::from("/fake/state.db"), message: "the disk is full".into() });
            }
            self.applied.lock().unwrap().push(write.clone());
            Ok(())
        }
    }

    fn record(pid: u32) -> ProcessRecord {
        ProcessRecord { pid, pgid: pid, start_ticks: 1, model: "m".into(), started_at: Utc::now() }
    }

    const SECOND: Duration = Duration::from_secs(1);

    /// A write in a few words, to compare sequences.
    fn describe(write: &Write) -> String {
        match write {
            Write::RecordProcess(r) => format!("record {}", r.pid),
            Write::ForgetProcess(pid) => format!("forget {pid}"),
            Write::RecordFootprint { model, mib, .. } => format!("footprint {model} {mib}"),
        }
    }

    fn applied(disk: &FakeDisk) -> Vec<String> {
        disk.applied.lock().unwrap().iter().map(describe).collect()
    }

    #[tokio::test]
    async fn writes_are_applied_in_the_order_sent() {
        let disk = FakeDisk::default();
        let writer = StoreWriter::start_on(disk.clone(), Duration::from_millis(5)).unwrap();
        let mut expected = Vec::new();
        for pid in 1..=50 {
            writer.record_process(record(pid));
            writer.forget_process(pid);
            expected.extend([format!("record {pid}"), format!("forget {pid}")]);
        }
        writer.record_footprint("m", 7);
        expected.push("footprint m 7".to_string());
        writer.flush(5 * SECOND).await.expect("all applied");
        assert_eq!(applied(&disk), expected);
        assert_eq!(writer.write_failure(), None);
    }

    #[tokio::test]
    async fn a_failure_is_reported_then_cleared_by_a_retry_and_nothing_is_lost() {
        let disk = FakeDisk::default();
        *disk.full.lock().unwrap() = true;
        let writer = StoreWriter::start_on(disk.clone(), Duration::from_millis(5)).unwrap();
        let mut failures = writer.failures();
        writer.record_process(record(1));
        writer.forget_process(1);
        writer.record_process(record(2));
        let failure = tokio::time::timeout(5 * SECOND, failures.wait_for(|f| f.is_some()))
            .await
            .expect("the failure is reported")
            .unwrap()
            .clone();
        let failure = failure.unwrap();
        assert!(failure.contains("/fake/state.db") && failure.contains("full"), "{failure}");
        assert_eq!(writer.write_failure().as_deref(), Some(failure.as_str()));
        // A flush reports the failure instead of hanging.
        let flushed = writer.flush(5 * SECOND).await;
        assert!(flushed.as_ref().is_err_and(|e| e.contains("/fake/state.db")), "{flushed:?}");
        assert!(disk.applied.lock().unwrap().is_empty());

        // Space again: the retry (no new write needed) applies the queue in order and clears.
        *disk.full.lock().unwrap() = false;
        tokio::time::timeout(5 * SECOND, failures.wait_for(|f| f.is_none()))
            .await
            .expect("the failure clears by itself")
            .unwrap();
        assert_eq!(writer.write_failure(), None);
        assert_eq!(applied(&disk), ["record 1", "forget 1", "record 2"]);
        writer.flush(5 * SECOND).await.expect("nothing pending");
    }

    #[tokio::test]
    async fn writes_reach_the_real_database_and_survive_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let writer = StoreWriter::start_with_retry(Store::open(dir.path()).unwrap(), Duration::from_millis(5)).unwrap();
        writer.record_process(record(10));
        writer.record_process(record(20));
        writer.forget_process(10);
        writer.record_footprint("llm", 6646);
        writer.record_footprint("llm", 6700);
        writer.flush(5 * SECOND).await.expect("applied");
        drop(writer);
        let store = Store::open(dir.path()).unwrap();
        let pids: Vec<u32> = store.processes().unwrap().iter().map(|p| p.record.pid).collect();
        assert_eq!(pids, vec![20]);
        assert_eq!(store.footprints().unwrap()["llm"], 6700, "the later measurement wins");
    }

    #[test]
    fn sending_does_not_wait_for_the_disk() {
        // A disk that takes 50 ms a write (5 s for all): a hundred sends still return at once.
        struct SlowDisk;
        impl WriteTarget for SlowDisk {
            fn apply(&mut self, _: &Write) -> Result<(), StoreError> {
                std::thread::sleep(Duration::from_millis(50));
                Ok(())
            }
        }
        let writer = StoreWriter::start_on(SlowDisk, Duration::from_millis(5)).unwrap();
        let started = std::time::Instant::now();
        for pid in 0..100 {
            writer.record_process(record(pid));
        }
        assert!(started.elapsed() < SECOND, "sending waited for the disk: {:?}", started.elapsed());
    }
}
