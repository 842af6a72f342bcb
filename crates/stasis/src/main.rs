//! `stasis`: transparent checkpoint and restart of Linux processes.
//!
//! A thin command line over `stasis-job`: one module per verb under `cmd/`.

mod cmd;
mod output;

use clap::{Parser, Subcommand};

/// Transparent checkpoint and restart of Linux processes.
#[derive(Debug, Parser)]
#[command(name = "stasis", version, about, propagate_version = true)]
struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a program as a job under a supervisor that can checkpoint it.
    Run(cmd::run::Args),
    /// Take a checkpoint of a running job (a new generation of images).
    Checkpoint(cmd::checkpoint::Args),
    /// Restart a job from its images.
    Restart(cmd::restart::Args),
    /// Show a running job's state.
    Status(cmd::status::Args),
    /// List running jobs and jobs with images.
    List(cmd::list::Args),
    /// End a running job.
    Kill(cmd::kill::Args),
    /// List a job's generations: when, how big, how many processes, why taken.
    History(cmd::history::Args),
    /// Remove one generation of a job (--generation N), or all of its images.
    Rm(cmd::rm::Args),
    /// Describe a generation (or the newest generation of a job directory).
    Inspect(cmd::inspect::Args),
    /// Check every checksum of a generation.
    Verify(cmd::verify::Args),
    /// Run a demo: start a computation, checkpoint it, kill it, restart it, check the answer.
    Demo(cmd::demo::Args),
    /// Measure checkpoint and restart against same-run baselines (dd, cat); table, JSON, SVG.
    Bench(cmd::bench::Args),
    /// The workload `stasis bench` checkpoints.
    #[command(hide = true)]
    BenchWorkload(cmd::bench_workload::Args),
    /// The demo's sample computation (a deterministic, multi-threaded workload).
    #[command(hide = true)]
    Sample(cmd::sample::Args),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STASIS_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let json = cli.json;
    // Verbs that only print end quietly when their reader goes away (`stasis inspect | head`).
    if matches!(
        cli.command,
        Command::Status(_)
            | Command::List(_)
            | Command::History(_)
            | Command::Inspect(_)
            | Command::Verify(_)
    ) {
        stasis_sys::process::default_sigpipe();
    }
    let result = match cli.command {
        Command::Run(a) => cmd::run::run(a, json),
        Command::Checkpoint(a) => cmd::checkpoint::run(a, json),
        Command::Restart(a) => cmd::restart::run(a, json),
        Command::Status(a) => cmd::status::run(a, json),
        Command::List(a) => cmd::list::run(a, json),
        Command::Kill(a) => cmd::kill::run(a, json),
        Command::History(a) => cmd::history::run(a, json),
        Command::Rm(a) => cmd::rm::run(a, json),
        Command::Inspect(a) => cmd::inspect::run(a, json),
        Command::Verify(a) => cmd::verify::run(a, json),
        Command::Demo(a) => cmd::demo::run(a, json),
        Command::Sample(a) => cmd::sample::run(a, json),
        Command::Bench(a) => cmd::bench::run(a, json),
        Command::BenchWorkload(a) => cmd::bench_workload::run(a, json),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            if json {
                println!("{}", serde_json::json!({ "error": format!("{e:#}") }));
            } else {
                eprintln!("stasis: error: {e:#}");
            }
            std::process::exit(1);
        }
    }
}
