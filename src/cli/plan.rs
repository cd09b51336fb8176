//! `vramgate plan`: will these models fit together? Asks the daemon (`POST /vramgate/plan`) and
//! prints the report; the exit status is the verdict.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use super::DaemonUrl;
use crate::client::Client;
use crate::plan::report::PlanReport;

/// Arguments of `vramgate plan`.
#[derive(Debug, Args)]
#[command(after_long_help = "\
Without --measure the plan is judged from what the daemon knows now: each model's footprint \
(the largest of its declared `vram`, its measured footprint and its peak; else the estimate from \
its GGUF header) and where it comes from, the memory other processes use on each device now, \
and what admission would evict to load the set. With --measure the daemon loads each model \
alone (its footprint and load time), then all of them together, then sends each its warmup \
request at the same time and watches for the peak; then it unloads what it loaded. Models \
already loaded and leases are left alone and counted as they are; the measurement stops before \
any load that would evict anything, and a measurement that stops early (that, a failed load, a \
warmup answered with an error) is NO-GO with the reason first. Ctrl-C stops the measurement and \
the daemon puts back what it changed.

Verdicts: GO (fits with at least the margin, 5% of usable memory by default, left free on every \
device it uses), MARGINAL (fits with less), NO-GO (does not fit, or a footprint is unknown). For \
llama.cpp models with a GGUF header, the report names the context size (-c) that would fit.

Exit status: 0 GO, 3 MARGINAL, 4 NO-GO, 1 the daemon could not be asked, 2 bad arguments, \
130 interrupted.")]
pub struct PlanArgs {
    /// The models (ids or aliases); default: the --mode's GPU models, else every configured model.
    pub models: Vec<String>,
    /// Plan for the GPU models of `[modes.NAME]`.
    #[arg(long, value_name = "NAME", conflicts_with = "models")]
    pub mode: Option<String>,
    /// Load, stress and unload the models for real (then put things back as they were).
    #[arg(long)]
    pub measure: bool,
    /// Print the report as JSON (the answer of POST /vramgate/plan).
    #[arg(long)]
    pub json: bool,
    /// Also write the report to FILE (JSON with --json, else the text).
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// The share of usable memory (percent) under which a plan that fits is MARGINAL.
    #[arg(long, value_name = "PCT")]
    pub margin: Option<f64>,
    #[command(flatten)]
    pub daemon: DaemonUrl,
}

/// Exit status when Ctrl-C interrupted the plan.
const EXIT_INTERRUPTED: u8 = 130;

/// Runs `vramgate plan`; the exit status is the verdict's.
pub fn main(args: PlanArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return super::fail(&anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    runtime.block_on(async {
        tokio::select! {
            outcome = run(&args) => outcome.map_or_else(|e| super::fail(&e), ExitCode::from),
            _ = tokio::signal::ctrl_c() => {
                eprintln!("vramgate plan: interrupted; the daemon puts back what the plan changed");
                ExitCode::from(EXIT_INTERRUPTED)
            }
        }
    })
}

async fn run(args: &PlanArgs) -> anyhow::Result<u8> {
    let client = Client::new(&args.daemon.url)?;
    let mut body = serde_json::json!({ "models": args.models, "measure": args.measure });
    if let Some(mode) = &args.mode {
        body["mode"] = mode.clone().into();
    }
    if let Some(margin) = args.margin {
        body["margin_pct"] = margin.into();
    }
    if args.measure {
        eprintln!("vramgate plan: measuring (loads, requests and unloads models; Ctrl-C stops and puts things back)");
    }
    let answer = client.plan(&body).await?;
    let report: PlanReport = serde_json::from_value(answer.clone()).context("unreadable plan from the daemon")?;
    let text = if args.json {
        serde_json::to_string_pretty(&answer).context("cannot format the report")?
    } else {
        report.render()
    };
    if let Some(path) = &args.report {
        std::fs::write(path, format!("{}\n", text.trim_end()))
            .with_context(|| format!("cannot write the report to {}", path.display()))?;
    }
    for line in text.trim_end().lines() {
        if !super::print_line(line) {
            break;
        }
    }
    u8::try_from(report.exit_code).context("the daemon answered an exit code out of range")
}
