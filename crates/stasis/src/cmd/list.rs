//! `stasis list`: running jobs and jobs with images.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;
use stasis_image::generation::list_generations;
use stasis_job::control::{Request, Response, request};
use stasis_job::paths;

use crate::output::emit;

/// Arguments of `stasis list`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Root directory of job images.
    #[arg(long, env = "STASIS_IMAGES")]
    images: Option<PathBuf>,
}

#[derive(Debug, Default, Serialize)]
struct Row {
    name: String,
    running: bool,
    pid: Option<i32>,
    generations: Vec<u32>,
}

/// Runs the verb.
pub fn run(a: Args, json: bool) -> Result<i32> {
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let runtime = paths::runtime_dir()?;
    for e in std::fs::read_dir(&runtime)?.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(name) = file.strip_suffix(".sock") else {
            continue;
        };
        if let Ok(Response::Status(s)) = request(name, &e.path(), &Request::Status) {
            let row = rows.entry(name.to_owned()).or_default();
            row.name = name.to_owned();
            row.running = true;
            row.pid = Some(s.pid);
        }
    }
    let root = a.images.unwrap_or_else(paths::default_images_root);
    for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            // Not a job: a removal in progress (`.rm-…`) or another hidden entry.
            continue;
        }
        let gens = list_generations(&e.path());
        if gens.is_empty() && !rows.contains_key(&name) {
            continue;
        }
        let row = rows.entry(name.clone()).or_default();
        row.name = name;
        row.generations = gens;
    }
    let rows: Vec<Row> = rows.into_values().collect();
    emit(json, &rows, || {
        let mut t = format!(
            "{:<24} {:<10} {:<8} {}",
            "JOB", "STATE", "PID", "GENERATIONS"
        );
        for r in &rows {
            t.push_str(&format!(
                "\n{:<24} {:<10} {:<8} {}",
                r.name,
                if r.running { "running" } else { "stopped" },
                r.pid.map_or("-".into(), |p| p.to_string()),
                if r.generations.is_empty() {
                    "-".into()
                } else {
                    format!(
                        "{} (newest {})",
                        r.generations.len(),
                        r.generations[r.generations.len() - 1]
                    )
                }
            ));
        }
        t
    });
    Ok(0)
}
