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
    /// Of those, raw bytes this generation shares with older ones (stored in their packs).
    pub shared_bytes: u64,
    /// Bytes of the pack this generation wrote.
    pub stored_bytes: u64,
}

/// Reads the manifest and every chunk of the generation in `dir` (in its own pack and in
/// the older packs it shares), checking every checksum and content address.
pub fn verify(dir: &Path) -> ImageResult<VerifyReport> {
    let mut generation = OpenGeneration::open(dir)?;
    let mut raw_bytes = 0;
    for i in 0..generation.manifest.chunks.len() {
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        raw_bytes += generation.chunk(index)?.len() as u64;
    }
    let chunks = &generation.manifest.chunks;
    Ok(VerifyReport {
        generation: generation.manifest.job.generation,
        processes: generation.manifest.processes.len(),
        chunks: chunks.len(),
        raw_bytes,
        shared_bytes: raw_bytes - chunks.raw_bytes_in(0),
        stored_bytes: chunks.stored_bytes_in(0),
    })
}
