//! Module boundaries the compiler does not enforce: the scheduling engine
//! (`src/arbiter/engine/`) does no I/O and reads no clock. Time is an argument of its inputs and
//! everything slow goes through its `Effects`, so its transitions can be tested as tables
//! (`src/arbiter/engine/tests.rs`) without processes, sockets or sleeps.

use std::path::Path;

/// What the engine's sources must not mention, and why.
const FORBIDDEN: &[(&str, &str)] = &[
    ("Instant::now", "reads the clock: time is the `now` of its input"),
    ("Utc::now", "reads the wall clock"),
    ("SystemTime", "reads the wall clock"),
    ("tokio::spawn", "starts a task: ask the shell through `Effects`"),
    ("tokio::time", "sleeps or reads tokio's clock"),
    ("spawn_blocking", "runs blocking work"),
    ("std::fs", "reads or writes files"),
    ("std::net", "opens sockets"),
    ("std::process", "starts processes"),
    ("reqwest", "talks HTTP"),
    ("proc_stat_field", "reads /proc: the shell passes a `ProcTable`"),
    ("group_members", "reads /proc"),
    ("free_port", "binds a socket"),
    ("store::Store", "writes the database: `Effects::persist`"),
    ("StoreWriter", "writes the database: `Effects::persist`"),
    ("EventBus", "publishes directly: `Effects::emit`"),
];

#[test]
fn the_engine_does_no_io_and_reads_no_clock() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/arbiter/engine");
    let mut checked = 0;
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("the engine's sources") {
        let path = entry.expect("a directory entry").path();
        // The tests drive the engine from outside: they may build clocks and channels.
        if path.extension().is_none_or(|e| e != "rs") || path.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable source");
        checked += 1;
        for (number, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            for (word, why) in FORBIDDEN {
                if code.contains(word) {
                    found.push(format!("{}:{}: `{word}` {why}", path.display(), number + 1));
                }
            }
        }
    }
    assert!(checked >= 8, "the engine's files were not found in {}", dir.display());
    assert!(found.is_empty(), "the engine must stay pure:\n{}", found.join("\n"));
}

/// No source file grows past what a reader can hold: the largest files are split by job.
#[test]
fn no_source_file_is_over_the_size_limit() {
    const LIMIT: usize = 760;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![root];
    let mut over = Vec::new();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("a source directory") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let lines = std::fs::read_to_string(&path).expect("readable source").lines().count();
                if lines > LIMIT {
                    over.push(format!("{}: {lines} lines", path.display()));
                }
            }
        }
    }
    assert!(over.is_empty(), "split these by job (limit {LIMIT} lines):\n{}", over.join("\n"));
}
