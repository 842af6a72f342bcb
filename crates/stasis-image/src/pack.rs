//! The page pack: one file of independently compressed chunks.
//!
//! Layout: a 16-byte header (`STASISPK`, format version u32 LE, reserved u32), then frames.
//! A frame is a 16-byte header (`CHNK`, stored length u32, raw length u32, flags u32 with bit 0
//! = zstd) followed by the stored bytes. The manifest's [`ChunkRef`] gives each frame's offset
//! and the blake3 of its raw bytes, checked on every read.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{ImageError, ImageResult, io};
use crate::manifest::{ChunkRef, FORMAT_VERSION};

/// Magic bytes at the start of a pack file.
pub const PACK_MAGIC: &[u8; 8] = b"STASISPK";
const FRAME_MAGIC: &[u8; 4] = b"CHNK";
/// Size of the pack header and of each frame header.
pub const HEADER_LEN: u64 = 16;
/// Largest raw chunk the format allows (a size cap for readers).
pub const MAX_CHUNK: u32 = 16 << 20;
/// File name of the pack inside a generation directory.
pub const PACK_FILE: &str = "pages.pack";

/// Whether chunks are compressed when written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Store raw bytes.
    None,
    /// zstd at this level, kept only when it saves at least 1/8.
    Zstd(i32),
}

/// Appends chunks to a pack file. Compression is tried on every chunk until it stops
/// paying, then only on probes spaced further and further apart (up to every 33rd chunk),
/// so that incompressible data costs little more than storing it raw.
#[derive(Debug)]
pub struct PackWriter {
    file: BufWriter<File>,
    path: PathBuf,
    offset: u64,
    compression: Compression,
    chunks: Vec<ChunkRef>,
    /// Chunks still to store without trying compression (it did not pay lately).
    skip: u32,
    /// Grows with every chunk in a row that does not compress (1, 2, 4 … 32): from 2 on,
    /// that many chunks are stored without trying; back to 0 once compression pays.
    backoff: u32,
}

impl PackWriter {
    /// Creates a new pack file at `path` (mode 0600).
    pub fn create(path: &Path, compression: Compression) -> ImageResult<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io(path))?;
        let mut file = BufWriter::with_capacity(1 << 20, file);
        let mut header = Vec::with_capacity(16);
        header.extend_from_slice(PACK_MAGIC);
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        file.write_all(&header).map_err(io(path))?;
        Ok(PackWriter {
            file,
            path: path.to_owned(),
            offset: HEADER_LEN,
            compression,
            chunks: Vec::new(),
            skip: 0,
            backoff: 0,
        })
    }

    /// Stores one chunk and returns its index.
    pub fn add(&mut self, raw: &[u8]) -> ImageResult<u32> {
        let raw_len = u32::try_from(raw.len())
            .ok()
            .filter(|&l| l <= MAX_CHUNK)
            .ok_or_else(|| ImageError::TooLarge {
                path: self.path.clone(),
                what: "chunk",
                offset: self.offset,
                size: raw.len() as u64,
                limit: u64::from(MAX_CHUNK),
            })?;
        let compressed = match self.compression {
            Compression::Zstd(_) if self.skip > 0 => {
                self.skip -= 1;
                None
            }
            Compression::Zstd(level) => {
                let c = zstd::bulk::compress(raw, level)
                    .ok()
                    .filter(|c| c.len() < raw.len() - raw.len() / 8);
                // Incompressible data (random, already compressed) is probed, not
                // compressed chunk after chunk for nothing.
                // One chunk that does not compress proves little; from the second in a
                // row on, chunks are skipped between probes.
                self.backoff = match (c.is_some(), self.backoff) {
                    (true, _) => 0,
                    (false, 0) => 1,
                    (false, b) => (b * 2).min(32),
                };
                self.skip = if self.backoff > 1 { self.backoff } else { 0 };
                c
            }
            Compression::None => None,
        };
        let stored: &[u8] = compressed.as_deref().unwrap_or(raw);
        let stored_len = u32::try_from(stored.len()).unwrap_or(u32::MAX);
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(FRAME_MAGIC);
        header[4..8].copy_from_slice(&stored_len.to_le_bytes());
        header[8..12].copy_from_slice(&raw_len.to_le_bytes());
        header[12..16].copy_from_slice(&u32::from(compressed.is_some()).to_le_bytes());
        self.file.write_all(&header).map_err(io(&self.path))?;
        self.file.write_all(stored).map_err(io(&self.path))?;
        self.chunks.push(ChunkRef {
            offset: self.offset,
            stored_len,
            raw_len,
            zstd: compressed.is_some(),
            blake3: blake3::hash(raw).to_hex().to_string(),
        });
        self.offset += HEADER_LEN + u64::from(stored_len);
        crate::fault::point("pack-chunk");
        Ok(u32::try_from(self.chunks.len() - 1).unwrap_or(u32::MAX))
    }

    /// Raw length of chunk `index`, if it was written by this writer.
    pub fn chunk_len(&self, index: u32) -> Option<u32> {
        self.chunks.get(index as usize).map(|c| c.raw_len)
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.offset
    }

    /// Flushes and syncs the file; returns the chunk table for the manifest.
    pub fn finish(self) -> ImageResult<Vec<ChunkRef>> {
        let file = self.file.into_inner().map_err(|e| ImageError::Io {
            path: self.path.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io(&self.path))?;
        crate::fault::point("pack-finished");
        Ok(self.chunks)
    }
}

/// Reads and checks chunks of a pack file.
#[derive(Debug)]
pub struct PackReader {
    file: File,
    path: PathBuf,
    len: u64,
}

impl PackReader {
    /// Opens a pack and checks its header.
    pub fn open(path: &Path) -> ImageResult<Self> {
        let mut file = File::open(path).map_err(io(path))?;
        let len = file.metadata().map_err(io(path))?.len();
        let mut header = [0u8; 16];
        if len < HEADER_LEN {
            return Err(ImageError::Truncated {
                path: path.to_owned(),
                offset: len,
                expected: HEADER_LEN - len,
            });
        }
        file.read_exact(&mut header).map_err(io(path))?;
        if &header[..8] != PACK_MAGIC {
            return Err(ImageError::BadMagic {
                path: path.to_owned(),
                what: "page pack",
            });
        }
        let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        if version != FORMAT_VERSION {
            return Err(ImageError::UnsupportedVersion {
                path: path.to_owned(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        Ok(PackReader {
            file,
            path: path.to_owned(),
            len,
        })
    }

    /// The pack's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads one chunk, checking its frame against `chunk` and its blake3.
    pub fn read(&mut self, chunk: &ChunkRef) -> ImageResult<Vec<u8>> {
        let corrupt = |what: &str| ImageError::Corrupt {
            path: self.path.clone(),
            offset: chunk.offset,
            what: what.to_owned(),
        };
        if chunk.raw_len > MAX_CHUNK || chunk.stored_len > MAX_CHUNK {
            return Err(ImageError::TooLarge {
                path: self.path.clone(),
                what: "chunk",
                offset: chunk.offset,
                size: u64::from(chunk.raw_len.max(chunk.stored_len)),
                limit: u64::from(MAX_CHUNK),
            });
        }
        let end = chunk.offset + HEADER_LEN + u64::from(chunk.stored_len);
        if end > self.len {
            return Err(ImageError::Truncated {
                path: self.path.clone(),
                offset: self.len,
                expected: end - self.len,
            });
        }
        self.file
            .seek(SeekFrom::Start(chunk.offset))
            .map_err(io(&self.path))?;
        let mut header = [0u8; 16];
        self.file.read_exact(&mut header).map_err(io(&self.path))?;
        let word =
            |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        if &header[..4] != FRAME_MAGIC
            || word(4) != chunk.stored_len
            || word(8) != chunk.raw_len
            || (word(12) & 1 == 1) != chunk.zstd
        {
            return Err(corrupt("chunk frame header"));
        }
        let mut stored = vec![0u8; chunk.stored_len as usize];
        self.file.read_exact(&mut stored).map_err(io(&self.path))?;
        let raw = if chunk.zstd {
            zstd::bulk::decompress(&stored, chunk.raw_len as usize)
                .map_err(|_| corrupt("zstd data"))?
        } else {
            stored
        };
        if raw.len() != chunk.raw_len as usize
            || blake3::hash(&raw).to_hex().as_str() != chunk.blake3
        {
            return Err(corrupt("chunk blake3"));
        }
        Ok(raw)
    }
}
