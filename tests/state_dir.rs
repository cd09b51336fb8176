//! End-to-end: the state directory. One daemon per state directory (a second refuses and leaves
//! the first alone), and a state database that cannot be used stops the daemon at start-up with
//! an error naming the file.

mod common;

use std::time::Duration;

use common::sim_daemon::on_10000_mib as start;
use common::{fake_model, sim_config};

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test]
async fn a_second_daemon_on_the_same_state_dir_refuses_and_leaves_the_first_alone() {
    let first = start(|sim| fake_model(sim, "a", 100, "", ""), "");
    let (_, body) = first.load("a").await;
    let pid = body["pid"].as_u64().unwrap() as u32;
    let config = first.dir.path().join("vramgate.toml");
    let output = common::output(
        common::vramgate()
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .env("XDG_STATE_HOME", first.dir.path().join("state")),
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("another vramgate daemon") && stderr.contains("state directory"), "{stderr}");
    assert!(vramgate::gpu::pid_is_alive(pid), "the first daemon's model survived");
    assert_eq!(first.model("a").await["state"], "ready");
}

#[tokio::test]
async fn a_corrupt_state_database_stops_the_daemon_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("state.db"), b"not a database ".repeat(200)).unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, format!("[server]\nstate_dir = \"{}\"\n[gpu]\nprobe = \"none\"\n", dir.path().display()))
        .unwrap();
    let output = common::output(common::vramgate().args(["serve", "--listen", "127.0.0.1:0", "--config"]).arg(&config));
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("state.db") && stderr.contains("move it aside"), "{stderr}");
}

/// A state database that cannot be opened stops the daemon at start-up with exit 1 and an error
/// naming the file (here `state.db` is a directory: root could write anywhere else).
#[test]
fn an_unusable_state_database_stops_the_daemon_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let db = state.join("vramgate").join("state.db");
    std::fs::create_dir_all(&db).unwrap();
    let config = dir.path().join("vramgate.toml");
    std::fs::write(&config, sim_config(&dir.path().join("sim"), 8000, "50ms", "")).unwrap();
    let output = common::output_within(
        common::vramgate()
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .env("XDG_STATE_HOME", &state),
        20 * SECOND,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&db.display().to_string()), "the error names {}: {stderr}", db.display());
    assert!(!String::from_utf8_lossy(&output.stdout).contains("listening"), "it must not start serving");
}
