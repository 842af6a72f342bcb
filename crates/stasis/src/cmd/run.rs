//! `stasis run`: start a program as a job.

use anyhow::Result;
use stasis_job::supervisor::Start;

use super::supervise::{ImageArgs, PolicyArgs, launch};

/// Arguments of `stasis run`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Job name (used by checkpoint, restart, status, kill).
    #[arg(long)]
    name: String,
    #[command(flatten)]
    images: ImageArgs,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Return at once; the job runs on in the background, its output in the image directory.
    #[arg(long)]
    detach: bool,
    /// The program and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// Runs the verb.
pub fn run(a: Args, json: bool) -> Result<i32> {
    let mut spec = a.images.spec(&a.name);
    spec.policy = a.policy.policy();
    launch(spec, Start::Run { command: a.command }, a.detach, json)
}
