//! `stasis history`: a job's generations, newest last, with what each holds and why it was
//! taken; a damaged generation is listed with its error.

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Result;
use serde::Serialize;
use stasis_image::OpenGeneration;
use stasis_image::generation::{generation_dir, generation_size, list_generations};
use stasis_job::paths;

use crate::output::{bytes, emit};

/// Arguments of `stasis history`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Job name.
    name: String,
    /// Root directory of job images.
    #[arg(long, env = "STASIS_IMAGES")]
    images: Option<PathBuf>,
}

/// One generation as listed.
#[derive(Debug, Serialize)]
struct Row {
    generation: u32,
    path: String,
    /// Creation time, milliseconds since the Unix epoch (from the manifest).
    created_unix_ms: Option<u64>,
    /// Creation time, RFC 3339 UTC.
    created: Option<String>,
    /// Bytes of its files on disk.
    size_bytes: u64,
    processes: Option<usize>,
    /// How it was taken: `checkpoint`, `checkpoint --kill`, `interval`, `signal SIGUSR1`.
    reason: Option<String>,
    /// Why it cannot be read, if it cannot.
    error: Option<String>,
}

/// Runs the verb.
pub fn run(a: Args, json: bool) -> Result<i32> {
    let root = a.images.unwrap_or_else(paths::default_images_root);
    let job_dir = paths::existing_job_dir(&root, &a.name)?;
    let rows: Vec<Row> = list_generations(&job_dir)
        .into_iter()
        .filter_map(|n| {
            let dir = generation_dir(&job_dir, n);
            let mut row = Row {
                generation: n,
                path: dir.display().to_string(),
                created_unix_ms: None,
                created: None,
                size_bytes: generation_size(&dir),
                processes: None,
                reason: None,
                error: None,
            };
            match OpenGeneration::open(&dir) {
                Ok(g) => {
                    let job = &g.manifest.job;
                    row.created_unix_ms = Some(job.created_unix_ms);
                    row.created = Some(
                        humantime::format_rfc3339_seconds(
                            UNIX_EPOCH + Duration::from_millis(job.created_unix_ms),
                        )
                        .to_string(),
                    );
                    row.processes = Some(g.manifest.processes.len());
                    row.reason = Some(job.reason.clone());
                }
                // Removed since it was listed (retention, `stasis rm`): gone, not damaged.
                Err(_) if !dir.exists() => return None,
                Err(e) => row.error = Some(e.to_string()),
            }
            Some(row)
        })
        .collect();
    emit(json, &rows, || {
        if rows.is_empty() {
            return format!(
                "job {:?} has no generations in {}",
                a.name,
                job_dir.display()
            );
        }
        let mut t = format!(
            "{:>5}  {:<21} {:>10}  {:>5}  REASON",
            "GEN", "CREATED (UTC)", "SIZE", "PROCS"
        );
        for r in &rows {
            t.push_str(&format!(
                "\n{:>5}  {:<21} {:>10}  {:>5}  {}",
                r.generation,
                r.created.as_deref().unwrap_or("-"),
                bytes(r.size_bytes),
                r.processes.map_or("-".into(), |p| p.to_string()),
                match (&r.reason, &r.error) {
                    (_, Some(e)) => format!("DAMAGED: {e}"),
                    (Some(reason), None) => reason.clone(),
                    (None, None) => "-".into(),
                }
            ));
        }
        t
    });
    Ok(0)
}
