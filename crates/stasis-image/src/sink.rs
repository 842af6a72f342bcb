//! Where a pack's bytes go as they are written: straight to the disk, or through the page
//! cache.
//!
//! A pack is written once, sequentially, and not read again until a restart (often on
//! another machine, or after the cache has long dropped it). Copying it into the page cache
//! first is wasted work: on our machines that copy (into freshly allocated cache pages) took
//! more than half of a full checkpoint's CPU time, and made `dd conv=fsync` of the same bytes
//! 1.1–2.4 s where `oflag=direct` took 0.5–0.7 s. So a pack is written with `O_DIRECT` in
//! large aligned blocks, which the disk writes while the next ones fill
//! ([`stasis_sys::aio::BlockWriter`]); the last, partial block is padded and the file cut
//! back to its length. Whether the filesystem takes `O_DIRECT` is tried at creation (a
//! block written and cut off again); where it does not, the pack goes through the page
//! cache, with writeback started as the file grows.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use stasis_sys::aio::{ALIGN, BlockWriter};

use crate::error::{ImageResult, io};

/// Bytes gathered before one direct write: one huge page (fresh ones cost much to touch
/// on virtual machines whose host takes free memory back, and a first checkpoint touches
/// every block; 1 GiB wrote as fast from 2 MiB blocks as from 4 MiB ones).
const BLOCK: usize = 2 << 20;
/// Direct writes under way at once.
const DEPTH: usize = 4;
/// Bytes handed to the kernel between two starts of writeback (cached mode).
const WRITEBACK_WINDOW: u64 = 8 << 20;
/// How far behind the writer writeback is awaited (cached mode): bounds the dirty pages a
/// checkpoint leaves in the page cache while keeping the disk's queue fed.
const WRITEBACK_LAG: u64 = 64 << 20;

/// A new file written sequentially, from its start.
#[derive(Debug)]
pub(crate) struct Sink {
    path: PathBuf,
    /// Bytes accepted so far (the file's length once finished).
    len: u64,
    mode: Mode,
}

#[derive(Debug)]
enum Mode {
    /// `O_DIRECT`: bytes gather in an aligned block, written whole.
    Direct(Direct),
    /// Through the page cache.
    Cached(Cached),
}

#[derive(Debug)]
struct Direct {
    blocks: BlockWriter,
    /// Bytes of the block being filled.
    filled: usize,
    /// File offset of that block (a multiple of [`ALIGN`]).
    block_offset: u64,
}

#[derive(Debug)]
struct Cached {
    file: BufWriter<File>,
    /// Offset up to which writeback was started.
    started: u64,
    /// Offset up to which writeback was awaited.
    awaited: u64,
}

impl Cached {
    fn new(file: File) -> Cached {
        Cached {
            file: BufWriter::with_capacity(1 << 20, file),
            started: 0,
            awaited: 0,
        }
    }

    /// Starts writeback of what the kernel holds beyond the last start, and awaits it
    /// [`WRITEBACK_LAG`] behind: the disk writes while the rest is still being read, hashed
    /// and compressed, and the final `fsync` finds little left.
    fn write_behind(&mut self, path: &Path, in_kernel: u64) -> ImageResult<()> {
        if in_kernel < self.started + WRITEBACK_WINDOW {
            return Ok(());
        }
        let file = self.file.get_ref();
        // A failed start is only a lost hint: the final fsync writes and reports.
        let _ = stasis_sys::cache::start_writeback(file, self.started, in_kernel - self.started);
        self.started = in_kernel;
        if self.started > self.awaited + WRITEBACK_LAG + WRITEBACK_WINDOW {
            let to = self.started - WRITEBACK_LAG;
            // Waiting consumes a write error fsync would otherwise report: it is ours to
            // report.
            stasis_sys::cache::await_writeback(file, self.awaited, to - self.awaited)
                .map_err(io(path))?;
            self.awaited = to;
        }
        Ok(())
    }
}

impl Sink {
    /// Creates the file at `path` (mode 0600; it must not exist), for direct writes where
    /// the filesystem takes them.
    pub(crate) fn create(path: &Path) -> ImageResult<Sink> {
        let open = |flags: i32| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(flags)
                .open(path)
        };
        let direct = !crate::fault::armed_as("no-direct-io");
        let mode = match direct.then(|| open(stasis_sys::cache::O_DIRECT)) {
            Some(Ok(file)) => match stasis_sys::aio::takes_direct_writes(&file) {
                Ok(true) => Mode::Direct(Direct {
                    blocks: BlockWriter::new(file, BLOCK, DEPTH).map_err(io(path))?,
                    filled: 0,
                    block_offset: 0,
                }),
                Ok(false) => {
                    drop(file);
                    let file = OpenOptions::new().write(true).open(path);
                    Mode::Cached(Cached::new(file.map_err(io(path))?))
                }
                Err(e) => return Err(io(path)(e)),
            },
            // Refused (EINVAL): the filesystem has no direct I/O.
            Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidInput => {
                Mode::Cached(Cached::new(open(0).map_err(io(path))?))
            }
            Some(Err(e)) => return Err(io(path)(e)),
            None => Mode::Cached(Cached::new(open(0).map_err(io(path))?)),
        };
        Ok(Sink {
            path: path.to_owned(),
            len: 0,
            mode,
        })
    }

    /// Whether bytes go straight to the disk.
    #[cfg(test)]
    fn is_direct(&self) -> bool {
        matches!(self.mode, Mode::Direct(_))
    }

    /// Appends `bytes`.
    pub(crate) fn write(&mut self, mut bytes: &[u8]) -> ImageResult<()> {
        self.len += bytes.len() as u64;
        while !bytes.is_empty() {
            let d = match &mut self.mode {
                Mode::Cached(c) => {
                    c.file.write_all(bytes).map_err(io(&self.path))?;
                    let in_kernel = self.len - c.file.buffer().len() as u64;
                    return c.write_behind(&self.path, in_kernel);
                }
                Mode::Direct(d) => d,
            };
            let n = bytes.len().min(BLOCK - d.filled);
            let filled = d.filled;
            let block = d.blocks.block().map_err(io(&self.path))?;
            block[filled..filled + n].copy_from_slice(&bytes[..n]);
            d.filled += n;
            bytes = &bytes[n..];
            if d.filled == BLOCK {
                d.blocks
                    .write(BLOCK, d.block_offset)
                    .map_err(io(&self.path))?;
                d.block_offset += BLOCK as u64;
                d.filled = 0;
            }
        }
        Ok(())
    }

    /// Writes what is left and makes the file durable (`fsync`).
    pub(crate) fn finish(self) -> ImageResult<()> {
        let path = self.path;
        let file = match self.mode {
            Mode::Direct(mut d) => {
                // The last block, padded to the alignment, then the file cut back to its
                // length.
                let (filled, padded) = (d.filled, d.filled.next_multiple_of(ALIGN));
                let block = d.blocks.block().map_err(io(&path))?;
                block[filled..padded].fill(0);
                d.blocks.write(padded, d.block_offset).map_err(io(&path))?;
                let file = d.blocks.into_file().map_err(io(&path))?;
                file.set_len(self.len).map_err(io(&path))?;
                file
            }
            Mode::Cached(c) => c.file.into_inner().map_err(|e| io(&path)(e.into_error()))?,
        };
        file.sync_all().map_err(io(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes of every length class: within a block, across blocks, ending on an alignment
    /// boundary and not.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    fn write_in_pieces(path: &Path, data: &[u8]) -> bool {
        let mut sink = Sink::create(path).unwrap();
        let direct = sink.is_direct();
        let mut rest = data;
        let mut step = 1;
        while !rest.is_empty() {
            let n = step.min(rest.len());
            sink.write(&rest[..n]).unwrap();
            rest = &rest[n..];
            step = step * 3 + 5;
        }
        sink.finish().unwrap();
        direct
    }

    #[test]
    fn a_file_written_in_pieces_reads_back_whole_with_its_exact_length() {
        let dir = tempfile::tempdir().unwrap();
        for len in [
            0,
            1,
            4095,
            4096,
            4097,
            BLOCK - 1,
            BLOCK,
            BLOCK + 1,
            3 * BLOCK + 12345,
        ] {
            let path = dir.path().join(format!("f{len}"));
            let data = pattern(len);
            write_in_pieces(&path, &data);
            assert_eq!(std::fs::read(&path).unwrap(), data, "length {len}");
        }
    }

    #[test]
    fn an_existing_file_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taken");
        std::fs::write(&path, b"keep").unwrap();
        assert!(Sink::create(&path).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
    }
}
