//! `vramgate config check FILE`.

use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;

pub(super) fn run(file: &Path) -> ExitCode {
    match Config::load(file) {
        Ok(config) => {
            let devices = config.gpu.sim.as_ref().map(|s| format!(", {} simulated device(s)", s.devices.len()));
            println!(
                "{}: OK (probe {:?}{}, listen {})",
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
