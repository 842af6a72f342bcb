//! `stasis rm`: remove one generation of a job, or all of its images.
//!
//! Removal is crash-safe (a generation is renamed to a hidden name, then deleted). While the
//! job runs, only an older generation may be removed: never the newest, never everything.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use stasis_image::generation::{list_generations, remove_generation, remove_job_dir};
use stasis_job::JobError;
use stasis_job::control::{Request, Response, request};
use stasis_job::paths;

use crate::output::emit;

/// Arguments of `stasis rm`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Job name.
    name: String,
    /// Remove only this generation (default: every generation and the job's directory).
    #[arg(long, value_name = "N")]
    generation: Option<u32>,
    /// Root directory of job images.
    #[arg(long, env = "STASIS_IMAGES")]
    images: Option<PathBuf>,
}

/// Whether a supervisor serves job `name`: `Some(how we know)` if it does or may (a busy
/// supervisor that does not answer still owns the name).
fn running(name: &str) -> Result<Option<String>> {
    let socket = paths::socket_path(name)?;
    Ok(match request(name, &socket, &Request::Status) {
        Err(JobError::NotRunning { .. }) => None,
        Ok(Response::Status(s)) => Some(format!("supervisor pid {}", s.supervisor_pid)),
        Ok(other) => Some(format!("its supervisor answered {other:?}")),
        Err(e) => Some(format!("its supervisor did not answer: {e}")),
    })
}

/// Runs the verb.
pub fn run(a: Args, json: bool) -> Result<i32> {
    let name = &a.name;
    let root = a.images.unwrap_or_else(paths::default_images_root);
    let job_dir = paths::existing_job_dir(&root, name)?;
    let running = running(name)?;
    match a.generation {
        Some(n) => {
            if let Some(how) = &running
                && list_generations(&job_dir).last() == Some(&n)
            {
                bail!(
                    "job {name:?} is running ({how}) and generation {n} is its newest, the one a restart would use; \
                     stop the job first (`stasis kill {name}` or `stasis checkpoint {name} --kill`) or remove an older generation"
                );
            }
            remove_generation(&job_dir, n).with_context(|| {
                format!(
                    "cannot remove generation {n} of job {name:?} in {}; `stasis history {name}` lists its generations",
                    job_dir.display()
                )
            })?;
            emit(
                json,
                &serde_json::json!({ "name": name, "generation": n, "path": job_dir.join(format!("gen-{n:04}")) }),
                || format!("removed generation {n} of job {name:?}"),
            );
        }
        None => {
            if let Some(how) = &running {
                bail!(
                    "job {name:?} is running ({how}); its images are not removed while it runs: \
                     `stasis kill {name}` first, or remove one older generation with --generation N"
                );
            }
            remove_job_dir(&job_dir).with_context(|| {
                format!(
                    "cannot remove the images of job {name:?} at {}; check that you may write to {}, then run `stasis rm {name}` again",
                    job_dir.display(),
                    root.display()
                )
            })?;
            emit(
                json,
                &serde_json::json!({ "name": name, "generation": null, "path": job_dir }),
                || {
                    format!(
                        "removed every image of job {name:?} ({})",
                        job_dir.display()
                    )
                },
            );
        }
    }
    Ok(0)
}
