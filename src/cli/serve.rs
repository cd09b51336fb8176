//! `vramgate serve`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tracing_subscriber::EnvFilter;

use crate::config::Config;

#[derive(Debug, Args)]
pub(super) struct ServeArgs {
    /// Config file (TOML). Without one, vramgate monitors whatever GPU it finds, on defaults.
    #[arg(long, short, env = "VRAMGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on; overrides `server.listen`. Use port 0 to pick a free port.
    #[arg(long)]
    listen: Option<SocketAddr>,
}

pub(super) fn run(args: ServeArgs) -> ExitCode {
    // Logs go to stderr; stdout carries only the "listening" line, which scripts may read.
    let filter = EnvFilter::try_from_env("VRAMGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let mut config = match &args.config {
        Some(path) => match Config::load(path) {
            Ok(config) => config,
            Err(e) => {
                eprintln!("vramgate: invalid config: {e}");
                return ExitCode::from(super::EXIT_CONFIG);
            }
        },
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("vramgate: cannot start the async runtime: {e}");
            return ExitCode::from(super::EXIT_FAILURE);
        }
    };
    let result = runtime.block_on(crate::daemon::run(config, |addr| {
        super::print_line(&format!("vramgate {} listening on http://{addr}", env!("CARGO_PKG_VERSION")));
        crate::notify::ready(addr);
    }));
    // A probe call stuck in the driver must not keep the process alive after shutdown.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<crate::config::ConfigError>().is_some() => {
            eprintln!("vramgate: invalid config: {e}");
            ExitCode::from(super::EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("vramgate: {e:#}");
            ExitCode::from(super::EXIT_FAILURE)
        }
    }
}
