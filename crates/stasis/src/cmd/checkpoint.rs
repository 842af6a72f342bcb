//! `stasis checkpoint`: a new generation of a running job — or, with `--pid`, of a process
//! tree that `stasis run` did not start.

use anyhow::{Context, Result, bail};
use stasis_job::control::{CheckpointReport, Request, Response, request};
use stasis_job::paths;

use super::supervise::ImageArgs;
use crate::output::{bytes, emit};

/// Arguments of `stasis checkpoint`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Job name.
    name: String,
    /// End the job right after the snapshot (no instruction of it runs after).
    #[arg(long)]
    kill: bool,
    /// Then keep only the newest N generations of the job (this time only; see `run --keep`).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    keep: Option<u32>,
    /// Checkpoint the process tree rooted at PID, which `stasis run` did not start, as job
    /// NAME (you must be allowed to trace it); restart it with `stasis restart NAME`.
    #[arg(long, value_name = "PID")]
    pid: Option<i32>,
    /// Keep the content of the job's open files (and files it maps shared) in this
    /// generation, so that it can restart where they are missing (see `run --save-files`).
    #[arg(long)]
    save_files: bool,
    /// Where and how to store images (with `--pid`; a running job's supervisor decides).
    #[command(flatten)]
    images: ImageArgs,
}

/// Prints a checkpoint's report.
fn show(json: bool, r: &CheckpointReport) {
    emit(json, r, || describe(r));
}

/// Runs the verb.
pub fn run(a: Args, json: bool) -> Result<i32> {
    if let Some(pid) = a.pid {
        let mut spec = a.images.spec(&a.name);
        spec.policy.save_files = a.save_files;
        let mut r = stasis_job::foreign::checkpoint_pid(&spec, pid, a.kill)
            .with_context(|| format!("checkpoint of process {pid} as job {:?}", a.name))?;
        if let Some(keep) = a.keep {
            let dir = paths::job_dir(&spec.images_root, &a.name);
            r.removed = stasis_image::generation::prune_generations(&dir, keep)?;
        }
        show(json, &r);
        return Ok(0);
    }
    let socket = paths::socket_path(&a.name)?;
    match request(
        &a.name,
        &socket,
        &Request::Checkpoint {
            kill: a.kill,
            keep: a.keep,
            save_files: a.save_files,
        },
    )? {
        Response::Checkpoint(r) => {
            show(json, &r);
            Ok(0)
        }
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the supervisor: {other:?}"),
    }
}

/// How much memory was not read at the cut: known unchanged since the last generation, or
/// read before the cut by a pre-copy (and the moment the job was frozen for that).
fn reads(r: &CheckpointReport) -> String {
    let mut out = String::new();
    if r.unchanged_bytes > 0 {
        out += &format!(
            "\n  {} unchanged since the generation before (referenced, not read)",
            bytes(r.unchanged_bytes)
        );
    }
    if r.precopied_bytes > 0 {
        out += &format!(
            "\n  {} read before the cut while the job ran (pre-copy; frozen {:.1} ms for it)",
            bytes(r.precopied_bytes),
            r.precopy_frozen_ms
        );
    }
    out
}

fn describe(r: &CheckpointReport) -> String {
    format!(
        "generation {} written to {}\n  frozen {:.1} ms, total {:.1} ms, memory {} stored as {}{}{}{}{}",
        r.generation,
        r.path,
        r.frozen_ms,
        r.total_ms,
        bytes(r.memory_bytes),
        bytes(r.stored_bytes),
        reads(r),
        if r.killed {
            "\n  the job was stopped"
        } else {
            ""
        },
        if r.removed.is_empty() {
            String::new()
        } else {
            format!(
                "\n  removed older generation(s) {}",
                r.removed
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        if r.callbacks_late.is_empty() {
            String::new()
        } else {
            format!(
                "\n  callbacks not done within the callback timeout in job pid(s) {}; checkpointed without waiting",
                r.callbacks_late
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    )
}
