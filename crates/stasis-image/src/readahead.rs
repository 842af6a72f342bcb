//! Reading frames ahead of their use, past the page cache.
//!
//! A restart reads a pack once, mostly in order, while it copies what it read into the
//! restored processes. Asking the page cache to read ahead (`POSIX_FADV_WILLNEED`) makes the
//! asking thread allocate every cache page and queue every read itself, and the pages must
//! be dropped again afterwards: on our machines that was half the loader's CPU time for a
//! 1 GiB image read from a cold cache. So frames asked for are read with `O_DIRECT` by Linux
//! AIO ([`BlockReader`]) into buffers of ours, in the order asked, a bounded number of bytes
//! ahead, and the disk fills them while the caller copies the frames before. Where direct
//! reads or AIO are not available, asking falls back to the page-cache hint.

use std::collections::{HashSet, VecDeque};
use std::ops::Range;

use stasis_sys::aio::{ALIGN, AlignedBuf, BlockReader};

use crate::error::ImageResult;
use crate::index::Frame;
use crate::pack::PackReader;

/// Reads under way at once at most.
const DEPTH: usize = 16;
/// How many bytes of frames are worth asking for ahead of their use at once: about what
/// [`DEPTH`] reads of 1 MiB frames (as full checkpoints write them) hold. Frames asked for
/// beyond what is under way wait their turn, and one taken before its turn is read then.
pub const READ_AHEAD: u64 = 16 << 20;
/// Bytes read ahead and not yet taken at most.
const BUDGET: usize = 32 << 20;
/// Frames smaller than this are read ahead through the page cache: read directly, each
/// would be a read of its own, where the cache reads a run of them at once (an incremental
/// generation stores each run of changed pages as a small frame).
const MIN_DIRECT: u32 = 64 << 10;
/// Spare buffers kept at most.
const MAX_FREE: usize = DEPTH;

/// A frame's raw bytes as held by the reader of a generation.
#[derive(Debug)]
pub(crate) enum FrameBytes {
    /// Read or decompressed into a vector of its own.
    Owned(Vec<u8>),
    /// Read by a direct read: the frame's raw bytes are `range` of `buf`.
    Read {
        /// The block read.
        buf: AlignedBuf,
        /// Where the raw bytes lie in it.
        range: Range<usize>,
    },
}

impl FrameBytes {
    /// The raw bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            FrameBytes::Owned(v) => v,
            FrameBytes::Read { buf, range } => &buf.bytes()[range.clone()],
        }
    }
}

/// A frame read submitted.
#[derive(Debug)]
struct Submitted {
    frame: u32,
    token: u64,
    /// Where the frame header lies in the block read.
    skip: usize,
    /// Bytes of its buffer.
    len: usize,
    /// A frame asked for after it was taken first: it may never be.
    passed: bool,
}

/// Frames asked for, being read or waiting their turn.
#[derive(Debug, Default)]
pub(crate) struct FrameReads {
    /// `None` until the first frame is asked for, and where AIO is not available.
    reader: Option<BlockReader>,
    /// AIO was tried and is not available.
    no_aio: bool,
    /// Frames asked for and not yet submitted, in order (stale entries are skipped: see
    /// `waiting`).
    queue: VecDeque<u32>,
    /// The frames of `queue` still wanted.
    waiting: HashSet<u32>,
    /// Reads submitted, in order.
    ring: VecDeque<Submitted>,
    /// Bytes of the buffers of `ring`.
    bytes: usize,
    free: Vec<AlignedBuf>,
    /// Frames taken from direct reads.
    taken: u64,
}

impl FrameReads {
    /// Frames taken so far that were read directly.
    pub(crate) fn taken(&self) -> u64 {
        self.taken
    }

    /// Asks for frame `f` (`frames[f]`) to be read ahead, after those asked for before.
    pub(crate) fn ask(&mut self, f: u32, frames: &[Frame], packs: &mut [PackReader]) {
        if self.waiting.contains(&f) || self.ring.iter().any(|s| s.frame == f) {
            return;
        }
        let Some(frame) = frames.get(f as usize) else {
            return;
        };
        if !self.reads_directly(frame, packs) {
            if let Some(pack) = packs.get(frame.pack as usize) {
                pack.read_ahead(frame);
            }
            return;
        }
        self.queue.push_back(f);
        self.waiting.insert(f);
        self.pump(frames, packs);
    }

    /// Asks the page cache to read `frame` ahead if it is not one read directly: such
    /// frames are worth asking for long before their use, the others only [`READ_AHEAD`]
    /// bytes before.
    pub(crate) fn hint(&mut self, frame: &Frame, packs: &mut [PackReader]) {
        if !self.reads_directly(frame, packs)
            && let Some(pack) = packs.get(frame.pack as usize)
        {
            pack.read_ahead(frame);
        }
    }

    /// Whether `frame` is read ahead directly (its pack opened for it at the first call).
    fn reads_directly(&mut self, frame: &Frame, packs: &mut [PackReader]) -> bool {
        if self.reader.is_none() && !self.no_aio {
            self.reader = BlockReader::new(DEPTH);
            self.no_aio = self.reader.is_none();
        }
        self.reader.is_some()
            && frame.stored_len >= MIN_DIRECT
            && packs
                .get_mut(frame.pack as usize)
                .is_some_and(|p| p.direct().is_some())
    }

    /// Submits the frames waiting their turn while there is room.
    fn pump(&mut self, frames: &[Frame], packs: &mut [PackReader]) {
        let Some(reader) = &mut self.reader else {
            return;
        };
        while let Some(&f) = self.queue.front() {
            if !self.waiting.contains(&f) {
                self.queue.pop_front();
                continue;
            }
            if !reader.has_room() || self.bytes >= BUDGET {
                // Make room by letting go of a read the caller went past.
                let Some(at) = self.ring.iter().position(|s| s.passed) else {
                    return;
                };
                if let Some(s) = self.ring.remove(at) {
                    self.bytes -= s.len;
                    if let Some((buf, _)) = reader.wait(s.token) {
                        recycle(&mut self.free, buf);
                    }
                }
                continue;
            }
            self.queue.pop_front();
            self.waiting.remove(&f);
            let frame = frames[f as usize];
            let Some(pack) = packs.get_mut(frame.pack as usize) else {
                continue;
            };
            // A frame that is not what the index says is left to the reading that
            // reports it.
            let Ok((offset, len)) = pack.span(&frame) else {
                continue;
            };
            let start = offset - offset % ALIGN as u64;
            let skip = (offset - start) as usize;
            let block = (skip + len as usize).next_multiple_of(ALIGN);
            let Some(file) = pack.direct() else {
                pack.read_ahead(&frame);
                continue;
            };
            let Some(buf) = take_buffer(&mut self.free, block) else {
                pack.read_ahead(&frame);
                continue;
            };
            let len = buf.len();
            match reader.submit(file, start, block, buf) {
                Ok(token) => {
                    self.bytes += len;
                    self.ring.push_back(Submitted {
                        frame: f,
                        token,
                        skip,
                        len,
                        passed: false,
                    });
                }
                Err((_, buf)) => {
                    recycle(&mut self.free, buf);
                    pack.read_ahead(&frame);
                }
            }
        }
    }

    /// Whether frame `f` was submitted and not yet taken.
    pub(crate) fn reading(&self, f: u32) -> bool {
        self.ring.iter().any(|s| s.frame == f)
    }

    /// No longer reads frame `f` ahead if it was not submitted yet: the caller reads it.
    /// The reads submitted were asked for before it: the caller went past them, and they
    /// make room for others when needed.
    pub(crate) fn forget(&mut self, f: u32, frames: &[Frame], packs: &mut [PackReader]) {
        if self.waiting.remove(&f) {
            for s in &mut self.ring {
                s.passed = true;
            }
            self.pump(frames, packs);
        }
    }

    /// Frame `f`'s raw bytes if it was read ahead (waiting for its read); `None` if it
    /// was not (it is no longer asked for: the caller reads it). A compressed frame is
    /// decompressed into `spare`, taken.
    pub(crate) fn take(
        &mut self,
        f: u32,
        frames: &[Frame],
        packs: &mut [PackReader],
        spare: &mut Vec<u8>,
    ) -> ImageResult<Option<FrameBytes>> {
        self.forget(f, frames, packs);
        let Some(at) = self.ring.iter().position(|s| s.frame == f) else {
            return Ok(None);
        };
        for s in self.ring.iter_mut().take(at) {
            s.passed = true;
        }
        let Some(s) = self.ring.remove(at) else {
            return Ok(None);
        };
        self.bytes -= s.len;
        let waited = self.reader.as_mut().and_then(|r| r.wait(s.token));
        let taken = match waited {
            Some((buf, read)) => self.unpack(s, frames, packs, buf, read, spare),
            None => Ok(None),
        };
        self.pump(frames, packs);
        taken
    }

    /// Checks and unpacks the block read for `s` (`read`: the bytes read); `None` where
    /// the read failed or came short, so that the caller reads the frame (and reports
    /// what is wrong).
    fn unpack(
        &mut self,
        s: Submitted,
        frames: &[Frame],
        packs: &mut [PackReader],
        buf: AlignedBuf,
        read: std::io::Result<usize>,
        spare: &mut Vec<u8>,
    ) -> ImageResult<Option<FrameBytes>> {
        let frame = frames[s.frame as usize];
        let pack = &mut packs[frame.pack as usize];
        let (_, len) = pack.span(&frame)?;
        let end = s.skip + len as usize;
        match read {
            Ok(n) if n >= end => {}
            Ok(_) => {
                recycle(&mut self.free, buf);
                return Ok(None);
            }
            Err(e) => {
                if e.kind() == std::io::ErrorKind::InvalidInput {
                    pack.refuse_direct();
                }
                recycle(&mut self.free, buf);
                return Ok(None);
            }
        }
        let header_end = s.skip + crate::pack::HEADER_LEN as usize;
        pack.check_header(&frame, &buf.bytes()[s.skip..header_end])?;
        if frame.zstd {
            let decompressed = pack.decompress(&frame, &buf.bytes()[header_end..end], spare);
            recycle(&mut self.free, buf);
            decompressed?;
            self.taken += 1;
            return Ok(Some(FrameBytes::Owned(std::mem::take(spare))));
        }
        self.taken += 1;
        Ok(Some(FrameBytes::Read {
            buf,
            range: header_end..end,
        }))
    }

    /// Takes back a buffer of frame bytes no longer needed.
    pub(crate) fn recycle(&mut self, buf: AlignedBuf) {
        recycle(&mut self.free, buf);
    }
}

/// A buffer of at least `len` bytes from `free` (the smallest), else a new one; `None`
/// when none can be mapped.
fn take_buffer(free: &mut Vec<AlignedBuf>, len: usize) -> Option<AlignedBuf> {
    let fitting = (0..free.len())
        .filter(|&i| free[i].len() >= len)
        .min_by_key(|&i| free[i].len());
    match fitting {
        Some(i) => Some(free.swap_remove(i)),
        None => AlignedBuf::new(len).ok(),
    }
}

fn recycle(free: &mut Vec<AlignedBuf>, buf: AlignedBuf) {
    if free.len() < MAX_FREE && !buf.is_empty() {
        free.push(buf);
    }
}
