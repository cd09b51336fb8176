//! Config check is the whole truth, end to end: values `serve` cannot handle (issue 11: an
//! overflowing `ready_timeout`, a `stall_timeout` or `sample_interval` of 300 billion years) are
//! refused by `config check` and by `serve` alike, exit 2 with the key and the line, never a
//! panic (exit 101); a config file that is not UTF-8 is placed by file and line.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

/// How long a `serve` that must refuse its config may take: it refuses before it starts anything.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(20);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Writes `contents` as `vramgate.toml` in a fresh temp dir.
fn config_file(contents: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vramgate.toml");
    std::fs::write(&path, contents).expect("write config");
    (dir, path)
}

fn check(path: &Path) -> Output {
    common::output(common::vramgate().args(["config", "check"]).arg(path))
}

/// `serve` on the config, on a free port, with its state in `dir`; it must exit by itself.
fn serve(dir: &Path, path: &Path) -> Output {
    common::output_within(
        common::vramgate()
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(path)
            .env("XDG_STATE_HOME", dir.join("state")),
        REFUSAL_DEADLINE,
    )
}

/// Both commands refuse the config with exit 2 and an error that contains every one of `words`;
/// `config check` first, so that a config it wrongly accepts is reported as that (and `serve` is
/// not left to run until its deadline).
fn refused_by_check_and_serve(contents: &[u8], words: &[&str]) {
    let (dir, path) = config_file(contents);
    let shown = text(contents);
    let assert_refused = |command: &str, output: Output| {
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{command} on\n{shown}\nstderr: {stderr}");
        assert!(!stderr.contains("panicked"), "{command} on\n{shown}\nstderr: {stderr}");
        assert!(stderr.contains(&format!("invalid config: {}", path.display())), "{command}: {stderr}");
        for word in words {
            assert!(stderr.contains(word), "{command} on\n{shown}\nmissing {word:?} in: {stderr}");
        }
    };
    assert_refused("vramgate config check", check(&path));
    assert_refused("vramgate serve", serve(dir.path(), &path));
}

#[test]
fn the_values_of_issue_11_are_refused_with_key_and_line_by_check_and_serve() {
    let cases = [
        ("[gpu]\nprobe = \"none\"\n[defaults]\nready_timeout = 18446744073709551615\n", "defaults.ready_timeout", 4),
        ("[gpu]\nprobe = \"none\"\n[proxy]\nstall_timeout = \"300000000000y\"\n", "proxy.stall_timeout", 4),
        ("[gpu]\nprobe = \"none\"\nsample_interval = \"300000000000y\"\n", "gpu.sample_interval", 3),
    ];
    for (config, key, line) in cases {
        refused_by_check_and_serve(
            config.as_bytes(),
            &[&format!("line {line}"), &format!("key `{key}`"), "too large, at most 1year"],
        );
    }
}

#[test]
fn sizes_and_durations_past_the_documented_bounds_are_refused() {
    let cases = [
        ("[gpu]\nprobe = \"none\"\nreserve_mib = \"99999999999999999999G\"\n", "gpu.reserve_mib", 3, "at most 16TiB"),
        ("[gpu]\nprobe = \"none\"\n[proxy]\nmax_body = \"17TiB\"\n", "proxy.max_body", 4, "at most 16TiB"),
        (
            "[gpu]\nprobe = \"none\"\n[scheduler]\nqueue_timeout = \"366d\"\n",
            "scheduler.queue_timeout",
            4,
            "at most 1year",
        ),
        ("[gpu]\nprobe = \"none\"\nsample_interval = \"61s\"\n", "gpu.sample_interval", 3, "at most 1m"),
    ];
    for (config, key, line, bound) in cases {
        refused_by_check_and_serve(config.as_bytes(), &[&format!("line {line}"), &format!("key `{key}`"), bound]);
    }
}

#[test]
fn the_largest_values_within_the_bounds_are_accepted() {
    let config = "[gpu]\nprobe = \"none\"\nsample_interval = \"1m\"\nchange_threshold_mib = \"16TiB\"\n\
                  [scheduler]\nqueue_timeout = \"1y\"\nmax_wait_before_swap = 31557600\n\
                  [defaults]\nttl = \"1y\"\nready_timeout = \"365d\"\nstop_timeout = \"1y\"\n\
                  [proxy]\nmax_body = \"16TiB\"\nstall_timeout = \"1y\"\nclient_timeout = 31557600.0\n";
    let (_dir, path) = config_file(config.as_bytes());
    let output = check(&path);
    assert_eq!(output.status.code(), Some(0), "{config}\nstderr: {}", text(&output.stderr));
}

#[test]
fn a_config_file_with_invalid_utf8_on_line_3_says_so_with_its_path() {
    let contents = b"[gpu]\nprobe = \"none\"\n# r\xE9serve for the desktop\nreserve_mib = 512\n";
    refused_by_check_and_serve(contents, &["line 3", "not valid UTF-8", "0xE9"]);
}
