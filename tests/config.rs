//! End-to-end: the config file as the daemon and `config check` read it. `config check` names the
//! probe as written and warns (without failing) about model programs it cannot find; a relative
//! model command runs from the config's directory, whatever the daemon's working directory.

mod common;

use common::plain::{PlainDaemon, cli, text};
use common::{fake, sim_config};

#[test]
fn config_check_names_the_probe_as_written_and_warns_about_missing_programs() {
    let dir = tempfile::tempdir().unwrap();
    let sim = dir.path().join("sim");
    let file = dir.path().join("vramgate.toml");
    let mut config = sim_config(&sim, 8192, "250ms", "");
    config.push_str("[models.found]\nbackend = \"process\"\ncmd = \"sh -c true\"\nvram = 100\n\n");
    config.push_str("[models.typo]\nbackend = \"process\"\ncmd = [\"nosuchprogram-xyz\", \"--port\", \"${PORT}\"]\n");
    std::fs::write(&file, &config).unwrap();
    let line = config.lines().position(|l| l.contains("nosuchprogram-xyz")).unwrap() + 1;
    let output = common::output(
        common::vramgate()
            .args(["config", "check"])
            .arg(&file)
            .env_remove("VRAMGATE_URL")
            .env("HOME", dir.path())
            .env("XDG_STATE_HOME", dir.path().join("state")),
    );
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    // A program missing here is a warning: the config may be meant for another machine.
    assert_eq!(output.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("OK (probe sim, 1 simulated device(s)"), "{stdout}");
    assert!(stdout.contains("1 warning"), "{stdout}");
    assert!(
        stderr.contains(&format!(
            "line {line}, column 1, key `models.typo.cmd`: program \"nosuchprogram-xyz\" is not found on PATH"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("models.found"), "{stderr}");
}

#[tokio::test]
async fn a_relative_model_command_runs_from_the_config_directory_whatever_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let sim = dir.path().join("sim");
    let script = dir.path().join("model.sh");
    std::fs::write(&script, format!("#!/bin/sh\nexec '{}' \"$@\"\n", fake())).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut config = sim_config(&sim, 8192, "50ms", "");
    config.push_str(&format!(
        "[models.rel]\nbackend = \"process\"\nvram = 300\n\
         cmd = [\"./model.sh\", \"--port\", \"${{PORT}}\", \"--sim-dir\", \"{}\", \"--vram\", \"300\", \"--name\", \"rel\", \"--load-delay\", \"50ms\"]\n",
        sim.display()
    ));
    let file = dir.path().join("vramgate.toml");
    std::fs::write(&file, config).unwrap();
    // Started from another directory, where `./model.sh` does not exist.
    let daemon = PlainDaemon::start(&file, elsewhere.path(), elsewhere.path());
    let home = tempfile::tempdir().unwrap();
    let output = cli(&daemon.url, home.path(), &["load", "rel"]);
    assert!(output.status.success(), "{}\nlog:\n{}", text(&output.stderr), daemon.log());
    let model = daemon.wait_model("rel", "ready").await;
    assert!(model["pid"].is_u64(), "{model}");
}
