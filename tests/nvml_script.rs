//! `scripts/nvml-check.sh`, the check for whoever has an NVIDIA GPU, run here on the stand-in
//! driver library: the whole flow (daemon on `probe = "nvml"` in its own temp dir and port, an
//! allocating child, attribution to its pid, free and exit seen in status, the timings table)
//! with a fake allocator (`--alloc-cmd`) whose sim claim file the stand-in's `claims DIR` turns
//! into an NVML process; a failure when status never attributes the allocation; the skip (77)
//! without PyTorch or nvcc; a missing binary named. The timings are not asserted (CI asserts
//! behaviour, never speed): the runs here give a generous `--slack`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::nvml::{self, Device, State, Variant};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/nvml-check.sh");

/// How a fake allocator behaves.
#[derive(Clone, Copy, PartialEq)]
enum Fake {
    /// As a real one: claims on "allocate", gives it back on "free".
    Honest,
    /// Says "allocated" but puts nothing on the device.
    ClaimsNothing,
    /// Says "freed" but keeps its claim until it exits.
    KeepsItsClaim,
    /// Claims 300 ms after saying "allocated": status cannot see it within a shorter interval.
    ClaimsLate,
}

/// A fake allocator following the script's protocol: "allocates" by writing a sim claim file
/// `CLAIMS/<device>/<its pid>` holding the MiB, frees by removing it, as `fake` says.
fn fake_allocator(dir: &Path, fake: Fake) -> PathBuf {
    let path = dir.join(format!("fake-alloc-{}.sh", fake as u8));
    let claim = "echo \"$VRAMGATE_CHECK_MIB\" > \"$dir/.$$.tmp\" && mv \"$dir/.$$.tmp\" \"$dir/$$\"";
    let release = "rm -f \"$dir/$$\"";
    // What it does up to its "allocated" line and after it, and on "free".
    let (allocate, free) = match fake {
        Fake::Honest => (format!("{claim}\necho allocated"), release),
        Fake::ClaimsNothing => ("echo allocated".to_string(), "true"),
        Fake::KeepsItsClaim => (format!("{claim}\necho allocated"), "true"),
        Fake::ClaimsLate => (format!("echo allocated\nsleep 0.3\n{claim}"), release),
    };
    let text = format!(
        "#!/bin/sh\nset -e\ndir=\"$1/$VRAMGATE_CHECK_DEVICE\"\nmkdir -p \"$dir\"\n{allocate}\nread -r _\n{free}\necho freed\nread -r _ || true\n"
    );
    std::fs::write(&path, text).expect("write the fake allocator");
    path
}

/// The stand-in in `dir`: one 8 GiB device whose processes are the live claims under `dir/claims`.
fn standin(dir: &Path) -> PathBuf {
    let library = nvml::link_into(dir, Variant::Full);
    let claims = dir.join("claims");
    std::fs::create_dir_all(&claims).expect("claims dir");
    State {
        driver: Some("550.54.15".into()),
        devices: vec![Device::new("NVIDIA Stand-in", 8192, 300)],
        claims: Some(claims),
        ..State::default()
    }
    .write_to(dir);
    library
}

/// Runs the script with `args`, isolated as every vramgate a test runs (the script isolates the
/// daemon it starts too).
fn script(args: &[&std::ffi::OsStr]) -> Output {
    let mut command = Command::new("bash");
    command.arg(SCRIPT).args(args);
    common::isolate(&mut command);
    common::output_within(&mut command, Duration::from_secs(120))
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// Runs the script on the stand-in with `fake` as its allocator, plus `options`: its exit code
/// and what it said.
fn run_with(fake: Fake, options: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let library = standin(dir.path());
    let alloc = format!("sh {} {}", fake_allocator(dir.path(), fake).display(), dir.path().join("claims").display());
    let mut args: Vec<&std::ffi::OsStr> =
        vec![common::bin().as_ref(), "--library".as_ref(), library.as_os_str(), "--alloc-cmd".as_ref(), alloc.as_ref()];
    args.extend(options.iter().map(|option| std::ffi::OsStr::new(*option)));
    let output = script(&args);
    (output.status.code(), text(&output))
}

#[test]
fn the_script_sees_an_allocation_attributed_and_released_on_the_standin() {
    let (code, said) = run_with(Fake::Honest, &["--mib", "512", "--interval", "100ms", "--slack", "10s"]);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("device 0 (NVIDIA Stand-in, 8192 MiB), sample_interval 100 ms, 512 MiB allocated"), "{said}");
    assert!(said.contains("512 MiB in status"), "the child's figure as status showed it: {said}");
    for step in ["allocation attributed to its pid", "free seen", "exit seen (pid gone from the list)"] {
        let line = said.lines().find(|l| l.starts_with(step)).unwrap_or_else(|| panic!("no '{step}' row: {said}"));
        assert!(line.contains(" ms "), "a latency in the row: {line}");
    }
    assert!(said.trim_end().ends_with("ok"), "{said}");
}

#[test]
fn the_script_fails_clearly_when_status_never_attributes_the_allocation() {
    let (code, said) = run_with(Fake::ClaimsNothing, &["--interval", "50ms", "--timeout", "1s"]);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("FAILED: 1024 MiB allocated by pid"), "{said}");
    assert!(said.contains("was not attributed to it within 1 s; status lists: none"), "{said}");
}

#[test]
fn the_script_fails_clearly_when_status_never_sees_the_memory_freed() {
    let (code, said) = run_with(Fake::KeepsItsClaim, &["--interval", "50ms", "--slack", "10s", "--timeout", "1s"]);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("freed 1024 MiB but status still shows it after 1 s: pid"), "{said}");
}

#[test]
fn the_script_fails_an_attribution_later_than_one_sample_interval() {
    let (code, said) = run_with(Fake::ClaimsLate, &["--interval", "50ms", "--slack", "0ms"]);
    assert_eq!(code, Some(1), "{said}");
    // The whole table is printed, then the verdict names the late step.
    assert!(said.contains("exit seen (pid gone from the list)"), "{said}");
    assert!(said.contains("FAILED: too slow: allocation attributed to its pid: "), "{said}");
    assert!(said.contains("> 50 ms"), "{said}");
}

#[test]
fn the_script_skips_with_77_without_pytorch_or_nvcc() {
    let output = script(&[
        common::bin().as_ref(),
        "--python".as_ref(),
        "false".as_ref(),
        "--nvcc".as_ref(),
        "/nonexistent/nvcc".as_ref(),
    ]);
    let said = text(&output);
    assert_eq!(output.status.code(), Some(77), "{said}");
    assert!(
        said.contains("skipped: no PyTorch (false cannot import torch) and no nvcc (/nonexistent/nvcc not found)"),
        "{said}"
    );
}

#[test]
fn the_script_names_a_missing_binary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("vramgate");
    let output = script(&[missing.as_os_str()]);
    let said = text(&output);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!(
            "FAILED: no vramgate binary at {}: build one with `cargo build --release`",
            missing.display()
        )),
        "{said}"
    );
}
