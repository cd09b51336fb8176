//! `vramgate config check FILE`.

use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;

pub(super) fn run(file: &Path) -> ExitCode {
    match Config::load(file) {
        Ok(config) => {
            // Warnings (a program not found here) do not fail the check: the config may be meant
            // for another machine. They go to stderr, like errors; stdout keeps the one OK line.
            let warnings = config.warnings();
            for warning in &warnings {
                eprintln!("vramgate: warning: {warning}");
            }
            let devices = config.gpu.sim.as_ref().map(|s| format!(", {} simulated device(s)", s.devices.len()));
            let noted = match warnings.len() {
                0 => String::new(),
                1 => ", 1 warning".to_string(),
                n => format!(", {n} warnings"),
            };
            println!(
                "{}: OK (probe {}{}, listen {}{noted})",
                file.display(),
                config.gpu.probe,
                devices.unwrap_or_default(),
                config.server.listen
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vramgate: invalid config: {e}");
            ExitCode::from(super::EXIT_CONFIG)
        }
    }
}
