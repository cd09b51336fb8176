//! The test harness's rule, checked: no test may reach the user's daemon, home, state directory or
//! default port. Every `vramgate` a test runs goes through `common::vramgate()` (an isolated home,
//! state and config directory, and a `VRAMGATE_URL` where no daemon listens), and every `serve` a
//! test starts listens on a port it names (`--listen`, port 0 in practice). `.ci/run` also runs the
//! whole suite beside a daemon on the default port and state directory, which catches what a
//! source scan cannot.

mod common;

use std::path::{Path, PathBuf};

/// Every Rust file under `tests/`, except the harness that defines the rule.
fn test_sources() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut found = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read tests/") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") && path != root.join("common/mod.rs") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// The places in `text` that break the rule, as `line: what`.
fn violations(text: &str) -> Vec<String> {
    // Built from pieces so that this file does not match its own patterns.
    let bin_call = ["bin", "()"].concat();
    let direct = [
        format!("Command::new({bin_call})"),
        format!("Command::new(common::{bin_call})"),
        ["env!(\"CARGO_BIN_EXE_", "vramgate\")"].concat(),
    ];
    let serve = ["\"ser", "ve\""].concat();
    let exempt = ["hermetic", ":"].concat();
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        for pattern in &direct {
            if line.contains(pattern.as_str()) {
                found.push(format!("{number}: `{pattern}` (use common::vramgate())"));
            }
        }
        // A line that is not a daemon start (a list of names, arguments refused before anything
        // starts) says why with a `hermetic: …` comment on it or on the line before.
        let explained = line.contains(exempt.as_str()) || index > 0 && lines[index - 1].contains(exempt.as_str());
        if let Some(at) = line.find(serve.as_str())
            && !explained
        {
            // The statement that starts `serve` must name the port (or only ask for help);
            // `--listen` follows within a few lines when the arguments are split across lines.
            let statement: String = lines[index..].iter().take(4).copied().collect::<Vec<_>>().join("\n");
            let statement = &statement[at..];
            if !statement.contains("--listen") && !statement.contains("--help") {
                found.push(format!("{number}: `serve` without `--listen` (it would take the default port 9777)"));
            }
        }
    }
    found
}

#[test]
fn every_test_runs_vramgate_through_the_isolating_harness() {
    let mut offenders = Vec::new();
    for path in test_sources() {
        let text = std::fs::read_to_string(&path).expect("read a test source");
        for violation in violations(&text) {
            offenders.push(format!("{}:{violation}", path.display()));
        }
    }
    assert!(offenders.is_empty(), "tests that could reach the user's daemon or state:\n{}", offenders.join("\n"));
}

#[test]
fn the_check_catches_each_kind_of_escape() {
    let bin_call = ["bin", "()"].concat();
    assert_eq!(violations(&format!("let c = Command::new({bin_call}).arg(\"status\");")).len(), 1);
    assert_eq!(violations(&format!("let c = std::process::Command::new(common::{bin_call});")).len(), 1);
    let serve = ["\"ser", "ve\""].concat();
    assert_eq!(violations(&format!("common::vramgate().args([{serve}, \"--config\"]);")).len(), 1);
    let exempt = ["// hermetic", ": a list of names"].concat();
    assert!(violations(&format!("{exempt}\nfor name in [{serve}, \"status\"] {{}}")).is_empty());
    assert!(violations(&format!("common::vramgate().args([{serve}, \"--listen\", \"127.0.0.1:0\"]);")).is_empty());
    assert!(
        violations(&format!("common::vramgate()\n    .args([\n        {serve},\n        \"--listen\",\n")).is_empty()
    );
}

#[test]
fn the_harness_points_commands_away_from_the_user() {
    let command = common::vramgate();
    let envs: std::collections::HashMap<_, _> =
        command.get_envs().map(|(k, v)| (k.to_string_lossy().into_owned(), v.map(|v| v.to_owned()))).collect();
    let home = common::isolated_home();
    assert_eq!(envs["HOME"].as_deref(), Some(home.as_os_str()));
    assert!(home.starts_with(env!("CARGO_TARGET_TMPDIR")), "{}", home.display());
    assert_eq!(envs["XDG_STATE_HOME"].as_deref(), Some(home.join(".local/state").as_os_str()));
    assert_eq!(envs["VRAMGATE_URL"].as_deref(), Some(std::ffi::OsStr::new(common::NO_DAEMON_URL)));
    assert_eq!(envs["VRAMGATE_CONFIG"], None, "the user's VRAMGATE_CONFIG is removed");
    assert_eq!(envs["VRAMGATE_TOKEN"], None, "the user's VRAMGATE_TOKEN is removed");

    // A CLI command that names no daemon fails at once, naming the harmless address.
    let output = common::output(common::vramgate().arg("status"));
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains(common::NO_DAEMON_URL));
}

#[test]
fn a_command_gets_its_output_within_a_deadline() {
    let output = common::output(std::process::Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]));
    assert_eq!(output.status.code(), Some(3));
    assert_eq!((output.stdout.as_slice(), output.stderr.as_slice()), (&b"out\n"[..], &b"err\n"[..]));
}

#[test]
#[should_panic(expected = "did not finish within")]
fn a_command_that_hangs_fails_the_test_instead_of_hanging_it() {
    common::output_within(std::process::Command::new("sleep").arg("30"), std::time::Duration::from_millis(200));
}
