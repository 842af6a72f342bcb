//! `stasis restart`: bring a job back from its images.

use anyhow::Result;
use stasis_job::supervisor::Start;

use super::supervise::{ImageArgs, PolicyArgs, launch};

/// Arguments of `stasis restart`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Job name.
    name: String,
    #[command(flatten)]
    images: ImageArgs,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Generation to restart from (default: the newest).
    #[arg(long)]
    generation: Option<u32>,
    /// Return at once; the job runs on in the background.
    #[arg(long)]
    detach: bool,
    /// Restore even if files the job had open changed since the checkpoint.
    #[arg(long)]
    force: bool,
    /// Load all memory (checking it) before the job runs. By default, where the kernel
    /// allows it (CAP_SYS_PTRACE), the job runs at once and its private memory loads on
    /// first touch and in the background.
    #[arg(long)]
    eager: bool,
}

/// Runs the verb.
pub fn run(a: Args, json: bool) -> Result<i32> {
    let mut spec = a.images.spec(&a.name);
    spec.policy = a.policy.policy();
    launch(
        spec,
        Start::Restart {
            generation: a.generation,
            force: a.force,
            eager: a.eager,
        },
        a.detach,
        json,
    )
}
