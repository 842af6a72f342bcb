//! `stasis verify`: check every byte of a generation.

use std::path::Path;

use serde::Serialize;

use crate::error::ImageResult;
use crate::generation::OpenGeneration;

/// What a successful verification covered.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Generation number.
    pub generation: u32,
    /// Processes in the manifest.
    pub processes: usize,
    /// Chunks checked.
    pub chunks: usize,
    /// Raw bytes checked.
    pub raw_bytes: u64,
    /// Bytes stored in the pack.
    pub stored_bytes: u64,
}

/// Reads the manifest and every chunk of the generation in `dir`, checking each checksum.
pub fn verify(dir: &Path) -> ImageResult<VerifyReport> {
    let mut generation = OpenGeneration::open(dir)?;
    let mut raw_bytes = 0;
    let mut stored_bytes = 0;
    for i in 0..generation.manifest.chunks.len() {
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        raw_bytes += generation.chunk(index)?.len() as u64;
        stored_bytes += u64::from(generation.manifest.chunks[i].stored_len);
    }
    Ok(VerifyReport {
        generation: generation.manifest.job.generation,
        processes: generation.manifest.processes.len(),
        chunks: generation.manifest.chunks.len(),
        raw_bytes,
        stored_bytes,
    })
}
