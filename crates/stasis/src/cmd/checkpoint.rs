//! `stasis checkpoint`: a new generation of a running job.

use anyhow::{Result, bail};
use stasis_job::control::{Request, Response, request};
use stasis_job::paths;

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
}

/// Runs the verb.
pub fn run(a: Args, json: bool) -> Result<i32> {
    let socket = paths::socket_path(&a.name)?;
    match request(
        &a.name,
        &socket,
        &Request::Checkpoint {
            kill: a.kill,
            keep: a.keep,
        },
    )? {
        Response::Checkpoint(r) => {
            emit(json, &r, || {
                format!(
                    "generation {} written to {}\n  frozen {:.1} ms, total {:.1} ms, memory {} stored as {}{}{}",
                    r.generation,
                    r.path,
                    r.frozen_ms,
                    r.total_ms,
                    bytes(r.memory_bytes),
                    bytes(r.stored_bytes),
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
                    }
                )
            });
            Ok(0)
        }
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the supervisor: {other:?}"),
    }
}
