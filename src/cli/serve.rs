//! `vramgate serve`, and `serve --demo` (the daemon on a simulated GPU with demo models, in a
//! temp dir; see `crate::demo`).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tracing_subscriber::EnvFilter;

use crate::config::Config;
use crate::demo::Demo;

#[derive(Debug, Args)]
pub(super) struct ServeArgs {
    /// Config file (TOML); default: $VRAMGATE_CONFIG. Without one, vramgate monitors whatever GPU
    /// it finds, on defaults.
    // Not clap's `env`: clap would count the variable as a `--config` that conflicts with
    // `--demo`, and the demo must run whatever the user's environment says.
    #[arg(long, short, conflicts_with = "demo")]
    config: Option<PathBuf>,
    /// Address to listen on; overrides `server.listen`. Use port 0 to pick a free port.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Run a self-contained demo on a simulated GPU: no GPU, no config, no other file needed.
    ///
    /// The daemon runs on a simulated 8 GiB GPU with a "desktop" using 1 GiB and three demo
    /// models served by this binary: `llm` (a 5 GiB chat LLM), `stt` (a 1.5 GiB speech-to-text
    /// model, higher priority) and `vision` (a 3 GiB vision model). They load on the first
    /// request and answer OpenAI chat, completions, embeddings and transcriptions with canned
    /// text. After the listening line it prints three commands to try: a chat, a load that fills
    /// the GPU, and a request that evicts a model to make room. Config, state, logs and the
    /// simulated device live in a temp dir, removed when the demo stops (Ctrl-C).
    /// VRAMGATE_CONFIG is ignored.
    #[arg(long)]
    demo: bool,
}

pub(super) fn run(args: ServeArgs) -> ExitCode {
    // Logs go to stderr; stdout carries only the "listening" line, which scripts may read (and,
    // in demo mode, the demo's instructions after it).
    let filter = EnvFilter::try_from_env("VRAMGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    if args.demo {
        return run_demo(args.listen);
    }
    let config_path =
        args.config.or_else(|| std::env::var_os("VRAMGATE_CONFIG").filter(|v| !v.is_empty()).map(PathBuf::from));
    let mut config = match &config_path {
        Some(path) => match Config::load(path) {
            Ok(config) => config,
            Err(e) => {
                eprintln!("vramgate: invalid config: {e}");
                return ExitCode::from(super::EXIT_CONFIG);
            }
        },
        None => {
            // A newcomer's first `serve` on a machine without a GPU shows little; say what next.
            tracing::info!(
                "no config file (--config or VRAMGATE_CONFIG): monitoring the GPUs only, with no models to manage; \
                 `vramgate serve --demo` shows what vramgate does (no GPU needed), and docs/configuration.md \
                 in vramgate's repository says how to declare your models"
            );
            let mut config = Config::default();
            config.server.token = crate::config::token_from_env();
            // Without a file the variable is the only source: check it as the file's would be.
            if config.server.token.as_ref().is_some_and(|t| !crate::config::token_is_usable(t.secret())) {
                eprintln!(
                    "vramgate: invalid config: {} must be a non-empty string of visible ASCII characters (no spaces)",
                    crate::config::TOKEN_ENV
                );
                return ExitCode::from(super::EXIT_CONFIG);
            }
            config
        }
    };
    if let Some(listen) = args.listen {
        config.server.listen = listen;
        // The file's own listen was checked when it was read; the flag's is checked here.
        if let Err(e) = config.check_exposure() {
            eprintln!("vramgate: invalid config: {e}");
            return ExitCode::from(super::EXIT_CONFIG);
        }
    }
    let result = run_daemon(config, |addr| {
        print_listening(addr);
    });
    exit_code(result)
}

/// The first line on stdout, which scripts and tests parse for the bound address.
fn print_listening(addr: SocketAddr) {
    super::print_line(&format!("vramgate {} listening on http://{addr}", env!("CARGO_PKG_VERSION")));
}

/// Runs the daemon on its own runtime until a signal stops it. `ready` gets the bound address.
fn run_daemon(config: Config, ready: impl FnOnce(SocketAddr)) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    let result = runtime.block_on(crate::daemon::run(config, |addr| {
        ready(addr);
        // After the stdout line: a supervisor that starts dependants on READY=1 finds the API up.
        crate::notify::ready(addr);
    }));
    // A probe call stuck in the driver must not keep the process alive after shutdown.
    runtime.shutdown_timeout(Duration::from_millis(100));
    result
}

/// Prints the daemon's error, if any, and picks the exit status: 2 for a bad config, 1 else.
fn exit_code(result: anyhow::Result<()>) -> ExitCode {
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

/// `serve --demo`: writes the demo's config into a fresh temp dir, runs the daemon on it, prints
/// what to try once it listens, and removes the temp dir after the daemon (and so every demo
/// model) has stopped, whether it ran or failed to start.
fn run_demo(listen: Option<SocketAddr>) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("vramgate: the demo runs its models with this binary, but its path is unknown: {e}");
            return ExitCode::from(super::EXIT_FAILURE);
        }
    };
    let demo = match Demo::create(&exe) {
        Ok(demo) => demo,
        Err(e) => {
            eprintln!("vramgate: cannot set up the demo: {e:#}");
            return ExitCode::from(super::EXIT_FAILURE);
        }
    };
    let code = match Config::load(demo.config_path()) {
        Ok(mut config) => {
            if let Some(listen) = listen {
                config.server.listen = listen;
            }
            // On loopback the demo ignores VRAMGATE_TOKEN, as it ignores VRAMGATE_CONFIG: the curl
            // lines it prints send no token, and they must work as printed.
            if crate::config::is_loopback(&config.server.listen) {
                config.server.token = None;
            }
            // The demo runs processes too: exposing it needs a token like any daemon.
            if let Err(e) = config.check_exposure() {
                eprintln!("vramgate: invalid config: {e}");
                ExitCode::from(super::EXIT_CONFIG)
            } else {
                let listen = config.server.listen;
                let vramgate = crate::demo::command_name(&exe);
                let result = run_daemon(config, |addr| {
                    print_listening(addr);
                    super::print_line(&demo.intro(addr, &vramgate));
                });
                let busy = result.as_ref().is_err_and(is_address_in_use);
                let code = exit_code(result);
                if busy {
                    eprintln!(
                        "vramgate: something already listens on {listen} (another vramgate?); \
                     `vramgate serve --demo --listen 127.0.0.1:0` picks a free port"
                    );
                }
                code
            }
        }
        Err(e) => {
            // The config is generated; this is a bug, but the user still gets the exact error.
            eprintln!("vramgate: the demo's generated config is invalid: {e}");
            ExitCode::from(super::EXIT_FAILURE)
        }
    };
    let dir = demo.dir().to_path_buf();
    match demo.remove() {
        Ok(()) => tracing::info!("demo stopped; removed {}", dir.display()),
        Err(e) => eprintln!("vramgate: cannot remove the demo's temp dir {}: {e}", dir.display()),
    }
    code
}

/// Whether the daemon failed because its address is taken.
fn is_address_in_use(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|cause| cause.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::AddrInUse))
}
