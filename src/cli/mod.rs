//! The command line: one subcommand per file. Everything except `serve`, `config check`,
//! `completions` and `man` talks to a running daemon over HTTP.

mod completions;
mod config_check;
mod events;
mod man;
mod models;
mod plan;
mod run;
mod serve;
mod status;
mod top;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Exit status for a bad config file or bad arguments (clap uses 2 for the latter too).
pub const EXIT_CONFIG: u8 = 2;
/// Exit status for everything else that failed.
pub const EXIT_FAILURE: u8 = 1;

/// vramgate: the one daemon that owns the GPU-memory question for local AI.
///
/// It measures VRAM per device and per process, reports pressure levels and events, decides what
/// may load, evicts what is idle, queues what must wait, supervises model server processes and
/// grants VRAM leases to any job.
#[derive(Debug, Parser)]
#[command(name = "vramgate", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (monitoring only when there is no config file).
    Serve(serve::ServeArgs),
    /// Show devices, levels, processes, models and leases of a running daemon.
    Status(status::StatusArgs),
    /// Follow the daemon's event stream (levels, VRAM, models, leases, probe failures).
    Events(events::EventsArgs),
    /// A live view of the daemon in the terminal: devices, models, leases, queue, events; keys
    /// load and unload models and switch modes.
    Top(top::TopArgs),
    /// Load a model and wait until it is ready (evicting idle models if needed).
    Load(models::ModelArgs),
    /// Unload a model and wait until its memory is back.
    Unload(models::ModelArgs),
    /// Print a model server's output.
    Logs(models::LogsArgs),
    /// Apply a `[modes.NAME]` (releases and CPU placements first, then loads), or show modes.
    Mode(models::ModeArgs),
    /// Will these models fit together? GO, MARGINAL or NO-GO (exit 0, 3, 4), from what is known
    /// or, with --measure, measured for real and put back.
    Plan(plan::PlanArgs),
    /// Hold a VRAM lease while a command runs; exit with the command's status (75 if no lease).
    Run(run::RunArgs),
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run the demo model server that `serve --demo` starts for its models (not for users: it
    /// is hidden from the help, and kept in this binary so the demo needs no other file).
    #[command(hide = true)]
    DemoModel(crate::demo::model_server::ModelServerArgs),
    /// Run a model command under a keeper that takes every process it starts down with the
    /// daemon (the daemon starts it for each model; not for users, so hidden from the help).
    #[command(hide = true)]
    Keeper(crate::keeper::KeeperArgs),
    /// Print the shell completion script (bash, zsh, fish, elvish or powershell) on stdout.
    Completions(completions::CompletionsArgs),
    /// Print the man page vramgate(1) on stdout, or write every page into a directory (--dir).
    Man(man::ManArgs),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a config file: exit 0 if good, 2 with the key and line if not.
    Check {
        /// The TOML file to check.
        file: PathBuf,
    },
}

/// Where the daemon is, for the subcommands that talk to it.
#[derive(Debug, Clone, Args)]
pub struct DaemonUrl {
    /// The daemon's URL.
    #[arg(long, env = "VRAMGATE_URL", default_value_t = crate::client::default_url())]
    pub url: String,
}

/// Parses the arguments and runs the subcommand.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Status(args) => with_runtime(status::run(args)),
        Command::Events(args) => with_runtime(events::run(args)),
        Command::Top(args) => with_runtime(top::run(args)),
        Command::Load(args) => with_runtime(models::load(args)),
        Command::Unload(args) => with_runtime(models::unload(args)),
        Command::Logs(args) => with_runtime(models::logs(args)),
        Command::Mode(args) => with_runtime(models::mode(args)),
        Command::Plan(args) => plan::main(args),
        Command::Run(args) => match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime.block_on(run::run(args)).unwrap_or_else(|e| fail(&e)),
            Err(e) => fail(&anyhow::anyhow!("cannot start the async runtime: {e}")),
        },
        Command::Config(ConfigCommand::Check { file }) => config_check::run(&file),
        Command::DemoModel(args) => crate::demo::model_server::main(args),
        Command::Keeper(args) => crate::keeper::main(args),
        Command::Completions(args) => completions::run(args),
        Command::Man(args) => man::run(args),
    }
}

/// Runs a client subcommand on a small runtime, printing its error the one way all share.
fn with_runtime(task: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return fail(&anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(error: &anyhow::Error) -> ExitCode {
    eprintln!("vramgate: {error:#}");
    ExitCode::from(EXIT_FAILURE)
}

/// Writes a line to stdout; a closed pipe (`vramgate events | head`) ends the command quietly
/// instead of panicking like `println!` would.
pub(crate) fn print_line(line: &str) -> bool {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|_| out.flush()).is_ok()
}
