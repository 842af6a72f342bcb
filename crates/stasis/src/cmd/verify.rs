//! `stasis verify`: check every checksum of a generation.

use std::path::PathBuf;

use anyhow::Result;
use stasis_image::verify::verify;

use crate::output::{bytes, emit};

/// Arguments of `stasis verify`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A generation directory, or a job's image directory (its newest generation).
    image_dir: PathBuf,
}

/// Runs the verb.
pub fn run(a: Args, json: bool) -> Result<i32> {
    let dir = super::inspect::generation_dir(&a.image_dir)?;
    let r = verify(&dir)?;
    emit(json, &r, || {
        format!(
            "{}: OK — generation {}, {} process(es), {} chunks, {} of page data ({} stored), every checksum matches",
            dir.display(),
            r.generation,
            r.processes,
            r.chunks,
            bytes(r.raw_bytes),
            bytes(r.stored_bytes)
        )
    });
    Ok(0)
}
