//! Pack files: compressed frames of new blobs, and the writer that deduplicates them.
//!
//! Layout: a 16-byte header (`STASISPK`, format version u32 LE, reserved u32), then frames,
//! then the trailer. A frame is a 16-byte header (`CHNK`, stored length u32, raw length u32,
//! flags u32 with bit 0 = zstd) followed by the stored bytes. The trailer lists the content
//! address of every blob of every frame ([`PackHashes`]). A generation's [`ChunkIndex`] says
//! which blobs of which frames make up each chunk; every blob is checked against its content
//! address on every read.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::compress::{self, Done, Pipeline};
use crate::error::{ImageError, ImageResult, io};
use crate::fault;
use crate::index::{BLOB_LEN, Blob, BlobHash, BuildBlobHasher, ChunkIndex, Frame, blob_hash};
use crate::manifest::FORMAT_VERSION;
use crate::sink::Sink;

/// Magic bytes at the start of a pack file.
pub const PACK_MAGIC: &[u8; 8] = b"STASISPK";
const FRAME_MAGIC: &[u8; 4] = b"CHNK";
/// Size of the pack header and of each frame header.
pub const HEADER_LEN: u64 = 16;
/// Largest raw chunk or frame the format allows (a size cap for readers).
pub const MAX_CHUNK: u32 = 16 << 20;
/// Magic bytes that start the footer ending a pack.
const TRAILER_MAGIC: &[u8; 8] = b"STASISHT";
/// Length of the footer that ends a pack (see [`PackHashes`]).
const FOOTER_LEN: u64 = 32;
/// Length of a frame's record in the trailer.
const TRAILER_FRAME: usize = 16;

/// Whether frames are compressed when written. A frame is stored compressed only when
/// zstd saves at least 1/8 of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Store raw bytes.
    None,
    /// zstd at `level`, on the compression thread beside the writer ([`crate::compress`]).
    Zstd {
        /// zstd's level (negative levels are faster).
        level: i32,
        /// Whether every frame waits for its turn at the compressor (`true`: the smallest
        /// pack, however long compression takes), or a frame that comes while the
        /// compressor is busy is stored raw (`false`: compression never holds up the
        /// checkpoint much; data that compresses far faster than it is written is then
        /// compressed by the writer itself).
        wait: bool,
    },
}

impl Compression {
    /// The default: zstd level 1 on the spare core, never holding up the checkpoint much.
    /// (Its negative levels were 1.3-1.4 times faster on our data with about the same
    /// ratio, but they leave literals without entropy coding: bytes of skewed values
    /// that do not repeat, such as 4-bit numbers, did not compress at all.)
    pub const FAST: Compression = Compression::Zstd {
        level: 1,
        wait: false,
    };
    /// For images whose size matters more than the time taken (a slow or remote disk):
    /// zstd level 3, every frame tried (but for the probing of data that does not
    /// compress at all).
    pub const SMALL: Compression = Compression::Zstd {
        level: 3,
        wait: true,
    };
}

/// Bytes saved per second of compression below which a frame is not worth compressing
/// unless frames wait for the compressor (see [`PackWriter::note_compressed`]): compressing
/// it costs more time than writing the bytes saved would on a disk of 500 MB/s. zstd level
/// 1 on our machines (`zstd -b1 -B1048576`, zero pages left out as checkpoints do): a
/// Python heap (a dict of 1.5 million entries, 7.4 times smaller) saves 0.86 GB/s, numbers
/// half of whose bytes compress 0.19 GB/s, repeated text 17 GB/s.
const MIN_SAVING_RATE: f64 = 5e8;
/// Frames smaller than this are compressed by the writer itself (handing them to the
/// compression thread and back costs more than compressing them).
const SMALL_FRAME: usize = 64 << 10;
/// Frames stored raw at most between two probes of data not worth compressing: a probe of
/// numbers compressing at 0.5 GB/s costs four times what storing the frame raw does.
const MAX_BACKOFF: u32 = 128;
/// Frames stored raw after a frame that compressed too slowly, at least.
const SLOW_BACKOFF: u32 = 16;
/// Bytes saved per second of compression from which the writer compresses a frame itself
/// when the compression thread is busy, rather than store it raw: compressing such data
/// costs less than copying it into the pack.
const INLINE_SAVING_RATE: f64 = 4e9;

/// Where the blobs of a chunk made of blobs already stored lie
/// ([`PackWriter::add_reused`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Reused {
    /// The base generation's (indices into its index's blobs).
    #[default]
    Base,
    /// This writer's staged blobs ([`PackWriter::stage`]).
    Staged,
}

/// The chunks of an earlier generation that a new one may reference instead of writing
/// them again.
#[derive(Debug, Clone, Default)]
pub struct Base {
    /// Its chunk index.
    pub index: ChunkIndex,
    /// The pack names its frames refer to; the first is the pack that generation wrote,
    /// which names it uniquely (generation numbers may be reused after a removal).
    pub packs: Vec<String>,
    /// Its private anonymous memory, by process (pid in the job), for pages known to be
    /// unchanged since.
    pub memory: HashMap<i32, BaseMemory>,
}

/// Where a base generation keeps one process's private anonymous pages.
#[derive(Debug, Clone, Default)]
pub struct BaseMemory {
    /// Saved runs: (first address, end address, index of the first blob in the base's
    /// index), sorted by address. A run's pages are its blobs, one each, in order.
    pub runs: Vec<(u64, u64, u32)>,
}

impl BaseMemory {
    /// The base blob holding the page at `addr`, if the base saved it (pages it did not
    /// save were zero).
    pub fn blob_at(&self, addr: u64) -> Option<u32> {
        let i = self.runs.partition_point(|r| r.1 <= addr);
        let &(start, end, first) = self.runs.get(i)?;
        (start <= addr && addr < end)
            .then(|| first + u32::try_from((addr - start) / BLOB_LEN as u64).unwrap_or(u32::MAX))
    }
}

impl Base {
    /// The name of the pack the base generation wrote: its identity.
    pub fn name(&self) -> Option<&str> {
        self.packs.first().map(String::as_str)
    }
}

/// Where a known blob lies.
#[derive(Debug, Clone, Copy)]
enum Known {
    /// In a frame of the index being built.
    Ours(u32, u32, u32),
    /// In a frame of the base (frame index in the base).
    Base(u32, u32, u32),
}

/// Blobs by content address, each where it lies in a base generation: built from the
/// base's index, or carried over from the writer that wrote the base.
#[derive(Debug, Default)]
pub struct KnownBlobs(HashMap<BlobHash, Known, BuildBlobHasher>);

impl KnownBlobs {
    /// Every blob of `index`.
    fn of(index: &ChunkIndex) -> Self {
        let mut known =
            HashMap::with_capacity_and_hasher(index.blobs.len(), BuildBlobHasher::default());
        for b in &index.blobs {
            known.insert(b.hash, Known::Base(b.frame, b.start, b.len));
        }
        KnownBlobs(known)
    }

    /// Blobs in the frames the generation reaches, as a base (count, for tests).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// None known.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What a finished pack writer produced.
#[derive(Debug)]
pub struct Written {
    /// The chunk index of the generation.
    pub index: ChunkIndex,
    /// Pack names its frames refer to; the first is the pack this writer wrote.
    pub packs: Vec<String>,
    /// The blobs the writer knew, by content address ([`Written::known_as_base`]).
    known: KnownBlobs,
    /// Base frame index → frame index in ours.
    imported: Vec<u32>,
}

impl Written {
    /// The blobs the generation reaches (those of its frames), by content address, for a
    /// writer that takes it as its base: one pass over every blob known, which need not
    /// delay the checkpoint ([`crate::generation::ToCarry`]).
    pub(crate) fn known_as_base(known: KnownBlobs, imported: &[u32]) -> KnownBlobs {
        let mut known = known;
        // As a base, the blobs written here lie in our frames, the base's in the frames
        // imported from it (the others are out of reach).
        known.0.retain(|_, k| {
            let ours = match *k {
                Known::Ours(f, s, l) => Some((f, s, l)),
                Known::Base(f, s, l) => imported
                    .get(f as usize)
                    .filter(|&&o| o != NOT_IMPORTED)
                    .map(|&f| (f, s, l)),
            };
            ours.map(|(f, s, l)| *k = Known::Base(f, s, l)).is_some()
        });
        known
    }

    /// Splits into the index, the packs, and what [`Written::known_as_base`] takes.
    pub(crate) fn into_parts(self) -> (ChunkIndex, Vec<String>, (KnownBlobs, Vec<u32>)) {
        (self.index, self.packs, (self.known, self.imported))
    }
}

/// Stores chunks: each is cut into blobs, a blob already known (written earlier by this
/// writer or present in the base generation) is referenced where it lies, and the new blobs
/// of a chunk are written as one frame. Frames are compressed on the compression thread
/// ([`crate::compress`]) and placed in the pack as they come back, in any order (each
/// frame's offset is in the index). Compression is tried on every frame until it stops
/// paying, then only on probes spaced further and further apart (up to every 129th frame),
/// so that incompressible data costs little more than storing it raw.
#[derive(Debug)]
pub struct PackWriter {
    file: Sink,
    path: PathBuf,
    offset: u64,
    compression: Compression,
    index: ChunkIndex,
    packs: Vec<String>,
    known: KnownBlobs,
    base: Base,
    /// Base frame index → frame index in ours ([`NOT_IMPORTED`] for frames not referenced
    /// so far).
    imported: Vec<u32>,
    /// Frames still to store without trying compression (it did not pay lately).
    skip: u32,
    /// Grows with every frame in a row that does not compress (1, 2, 4 … 128; from 16 on
    /// for one that compresses too slowly): from 2 on, that many frames are stored without
    /// trying; back to 0 once compression pays ([`PackWriter::note_compressed`]).
    backoff: u32,
    /// Raw bytes of blobs written (not deduplicated).
    new_bytes: u64,
    /// The compression thread, taken at the first frame tried.
    pipeline: Option<Pipeline>,
    /// Whether the compression thread could not be had (frames are compressed here).
    no_pipeline: bool,
    /// What compression of recent frames took and saved: frames of [`SMALL_FRAME`] or
    /// more (timed in CPU time on the compression thread, by the clock when the writer
    /// compresses one itself), and smaller ones (timed by the clock on the writer's:
    /// reading a thread's CPU time is a system call, 1-2 us for two, as much as
    /// compressing a page takes).
    measured: [Measured; 2],
    /// The context for frames compressed by the writer itself, and its output buffer.
    inline: (Context<compress::Context>, Vec<u8>),
    /// Blobs stored ahead of the chunks that will use them ([`PackWriter::stage`]).
    staged: Vec<Blob>,
    /// The content addresses of the blobs of the frames written so far, for the trailer.
    hashes: PackHashes,
}

/// A zstd context kept for reuse (the crate's types do not implement `Debug`).
struct Context<T>(T);

impl<T> std::fmt::Debug for Context<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("zstd context")
    }
}

/// What compression of recent frames took and saved: sums that halve whenever the raw
/// bytes tried pass [`Measured::WINDOW`], so that they follow the data, and that one frame
/// timed badly (an interrupt, a page fault in the middle of a small one) moves little.
#[derive(Debug, Default, Clone, Copy)]
struct Measured {
    raw: f64,
    saved: f64,
    secs: f64,
}

impl Measured {
    /// Raw bytes the sums cover at most, about.
    const WINDOW: f64 = 4.0 * 1048576.0;
    /// Raw bytes tried before the rate is trusted: a megabyte of small frames is about
    /// 250 calls, which a few timed badly do not sway.
    const EVIDENCE: f64 = 1048576.0;

    fn add(&mut self, raw: usize, saved: usize, took: Duration) {
        self.raw += raw as f64;
        self.saved += saved as f64;
        self.secs += took.as_secs_f64();
        if self.raw > Self::WINDOW {
            self.raw /= 2.0;
            self.saved /= 2.0;
            self.secs /= 2.0;
        }
    }

    /// Bytes saved per second of compression, once enough was tried.
    fn rate(&self) -> Option<f64> {
        (self.raw >= Self::EVIDENCE).then(|| self.saved / self.secs.max(1e-9))
    }
}

/// In [`PackWriter`]'s table of base frames imported: not (yet).
const NOT_IMPORTED: u32 = u32::MAX;

impl PackWriter {
    /// Creates a new pack file at `path` (mode 0600), deduplicating against `base`. The
    /// file's name (without directory) is how indexes refer to it.
    pub fn create(path: &Path, compression: Compression, base: Base) -> ImageResult<Self> {
        Self::create_with(path, compression, base, None)
    }

    /// Like [`PackWriter::create`], with `base`'s blobs by content address when the caller
    /// has them (from [`Written::known`] of the writer that wrote `base`): building them
    /// again from its index is a random insert per page of the job.
    pub fn create_with(
        path: &Path,
        compression: Compression,
        base: Base,
        known: Option<KnownBlobs>,
    ) -> ImageResult<Self> {
        let mut file = Sink::create(path)?;
        let mut header = Vec::with_capacity(16);
        header.extend_from_slice(PACK_MAGIC);
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        file.write(&header)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let known = known.unwrap_or_else(|| KnownBlobs::of(&base.index));
        // A generation is mostly the size of the one before: its index grows once.
        let mut index = ChunkIndex::default();
        index.blobs.reserve(base.index.blobs.len());
        index.starts.reserve(base.index.starts.len());
        Ok(PackWriter {
            file,
            path: path.to_owned(),
            offset: HEADER_LEN,
            compression,
            index,
            packs: vec![name],
            known,
            base,
            imported: Vec::new(),
            skip: 0,
            backoff: 0,
            new_bytes: 0,
            pipeline: None,
            no_pipeline: false,
            measured: [Measured::default(); 2],
            inline: (Context(None), Vec::new()),
            staged: Vec::new(),
            hashes: PackHashes::default(),
        })
    }

    /// Makes room for about `blobs` more new blobs (the pages a pre-copy is about to
    /// stage), so that the tables do not grow step by step.
    pub fn reserve_blobs(&mut self, blobs: usize) {
        self.known.0.reserve(blobs);
        self.staged.reserve(blobs);
        self.index.blobs.reserve(blobs);
    }

    /// Stores one chunk and returns its index.
    pub fn add(&mut self, raw: &[u8]) -> ImageResult<u32> {
        if raw.len() > MAX_CHUNK as usize {
            return Err(ImageError::TooLarge {
                path: self.path.clone(),
                what: "chunk",
                offset: self.offset,
                size: raw.len() as u64,
                limit: u64::from(MAX_CHUNK),
            });
        }
        let chunk = u32::try_from(self.index.starts.len()).unwrap_or(u32::MAX);
        self.index
            .starts
            .push(u32::try_from(self.index.blobs.len()).unwrap_or(u32::MAX));
        // New blobs of this chunk go to one frame, written last; until then they name it
        // by a placeholder (base frames imported meanwhile take the indices before it).
        const PENDING: u32 = u32::MAX;
        let first_blob = self.index.blobs.len();
        let mut fresh_hashes = Vec::new();
        // Where the new blobs lie in `raw`, while they follow each other from its start
        // (the usual case: a chunk of fresh data is written as it is, not copied).
        let mut fresh_prefix = 0;
        let mut fresh: Option<Vec<u8>> = None;
        for (i, piece) in raw.chunks(BLOB_LEN).enumerate() {
            let hash = blob_hash(piece);
            let len = piece.len() as u32;
            let (frame, start) = match self.known.0.get(&hash) {
                Some(&Known::Ours(f, s, l)) if l == len => (f, s),
                Some(&Known::Base(f, s, l)) if l == len => (self.import(f)?, s),
                _ => {
                    let start = match &mut fresh {
                        None if fresh_prefix == i * BLOB_LEN => {
                            fresh_prefix += piece.len();
                            i * BLOB_LEN
                        }
                        None => {
                            let mut copy = raw[..fresh_prefix].to_vec();
                            copy.extend_from_slice(piece);
                            fresh = Some(copy);
                            fresh_prefix
                        }
                        Some(copy) => {
                            copy.extend_from_slice(piece);
                            copy.len() - piece.len()
                        }
                    } as u32;
                    self.known.0.insert(hash, Known::Ours(PENDING, start, len));
                    fresh_hashes.push(hash);
                    (PENDING, start)
                }
            };
            self.index.blobs.push(Blob {
                frame,
                start,
                len,
                hash,
            });
        }
        let fresh: &[u8] = fresh.as_deref().unwrap_or(&raw[..fresh_prefix]);
        if !fresh.is_empty() {
            // The frame's number is its place in the index, taken now; its place in the
            // pack when it is written ([`PackWriter::place`]).
            let frame = u32::try_from(self.index.frames.len()).unwrap_or(u32::MAX - 1);
            self.index.frames.push(Frame {
                pack: 0,
                offset: 0,
                stored_len: 0,
                raw_len: fresh.len() as u32,
                zstd: false,
            });
            for b in &mut self.index.blobs[first_blob..] {
                if b.frame == PENDING {
                    b.frame = frame;
                }
            }
            for h in &fresh_hashes {
                if let Some(Known::Ours(f, _, _)) = self.known.0.get_mut(h) {
                    *f = frame;
                }
            }
            self.write_frame(frame, fresh, fresh_hashes)?;
        }
        Ok(chunk)
    }

    /// Stores one chunk made of blobs already stored — of the base, or staged — (indices
    /// into that table, checked), without reading or hashing their bytes; returns its
    /// index.
    pub fn add_reused(&mut self, from: Reused, blobs: &[u32]) -> ImageResult<u32> {
        let first = self.index.blobs.len();
        let added = self.append_reused(from, blobs).and_then(|()| {
            let size: u64 = self.index.blobs[first..]
                .iter()
                .map(|b| u64::from(b.len))
                .sum();
            match size > u64::from(MAX_CHUNK) {
                true => Err(ImageError::TooLarge {
                    path: self.path.clone(),
                    what: "chunk",
                    offset: self.offset,
                    size,
                    limit: u64::from(MAX_CHUNK),
                }),
                false => Ok(()),
            }
        });
        if added.is_err() {
            self.index.blobs.truncate(first);
        }
        added?;
        let chunk = u32::try_from(self.index.starts.len()).unwrap_or(u32::MAX);
        self.index
            .starts
            .push(u32::try_from(first).unwrap_or(u32::MAX));
        Ok(chunk)
    }

    /// Appends `blobs` (of `from`) to the index's blobs, their frames in our index (a
    /// base frame imported once per stretch of blobs in it).
    fn append_reused(&mut self, from: Reused, blobs: &[u32]) -> ImageResult<()> {
        self.index.blobs.reserve(blobs.len());
        // The last base frame imported, and its index in ours.
        let mut last: Option<(u32, u32)> = None;
        for &b in blobs {
            let table = match from {
                Reused::Base => &self.base.index.blobs,
                Reused::Staged => &self.staged,
            };
            let blob = *table.get(b as usize).ok_or_else(|| ImageError::Corrupt {
                path: self.path.clone(),
                offset: 0,
                what: match from {
                    Reused::Base => format!("base generation's blob {b}"),
                    Reused::Staged => format!("staged blob {b}"),
                },
            })?;
            let frame = match (from, last) {
                (Reused::Staged, _) => blob.frame,
                (Reused::Base, Some((theirs, ours))) if theirs == blob.frame => ours,
                (Reused::Base, _) => {
                    let ours = self.import(blob.frame)?;
                    last = Some((blob.frame, ours));
                    ours
                }
            };
            self.index.blobs.push(Blob { frame, ..blob });
        }
        Ok(())
    }

    /// Whether blob `next` lies right after blob `last` (both of `from`), in the same frame.
    pub fn reused_blob_follows(&self, from: Reused, last: u32, next: u32) -> bool {
        let blobs = match from {
            Reused::Base => &self.base.index.blobs,
            Reused::Staged => &self.staged,
        };
        match (blobs.get(last as usize), blobs.get(next as usize)) {
            (Some(a), Some(b)) => a.frame == b.frame && a.start.checked_add(a.len) == Some(b.start),
            _ => false,
        }
    }

    /// How many of the `at_most` blobs after blob `first` (of `from`) each follow the one
    /// before ([`PackWriter::reused_blob_follows`]).
    pub fn reused_blobs_following(&self, from: Reused, first: u32, at_most: usize) -> usize {
        let blobs = match from {
            Reused::Base => &self.base.index.blobs,
            Reused::Staged => &self.staged,
        };
        let first = first as usize;
        let Some(last) = blobs.len().checked_sub(1) else {
            return 0;
        };
        let Some(run) = blobs.get(first..=first.saturating_add(at_most).min(last)) else {
            return 0;
        };
        run.windows(2)
            .take_while(|w| {
                w[0].frame == w[1].frame && w[0].start.checked_add(w[0].len) == Some(w[1].start)
            })
            .count()
    }

    /// Stores `raw` (at most [`MAX_CHUNK`] bytes) as blobs that no chunk uses yet, as
    /// [`PackWriter::add`] would (blobs known already are referenced, not written again);
    /// returns the index of the first of its blobs among those staged, the others following
    /// in order. A pre-copy stores memory this way while the job still runs; the chunks
    /// of the pages found unchanged at the cut are then made of the staged blobs
    /// ([`PackWriter::add_reused`]). Staged blobs no chunk uses cost their bytes in
    /// the pack, nothing else.
    pub fn stage(&mut self, raw: &[u8]) -> ImageResult<u32> {
        let first = u32::try_from(self.staged.len()).unwrap_or(u32::MAX);
        self.add(raw)?;
        let start = self.index.starts.pop().unwrap_or(0) as usize;
        self.staged.extend(self.index.blobs.drain(start..));
        Ok(first)
    }

    /// The generation this writer shares unchanged data with.
    pub fn base(&self) -> &Base {
        &self.base
    }

    /// The name of the pack being written: the new generation's identity once finished.
    pub fn name(&self) -> &str {
        &self.packs[0]
    }

    /// The frame index in ours of base frame `f`, importing it on first use.
    fn import(&mut self, f: u32) -> ImageResult<u32> {
        if let Some(&ours) = self
            .imported
            .get(f as usize)
            .filter(|&&o| o != NOT_IMPORTED)
        {
            return Ok(ours);
        }
        let corrupt = || ImageError::Corrupt {
            path: self.path.clone(),
            offset: 0,
            what: format!("base generation's frame {f}"),
        };
        let mut frame = *self.base.index.frames.get(f as usize).ok_or_else(corrupt)?;
        let name = self
            .base
            .packs
            .get(frame.pack as usize)
            .ok_or_else(corrupt)?;
        frame.pack = match self.packs.iter().position(|p| p == name) {
            Some(p) => p as u32,
            None => {
                self.packs.push(name.clone());
                (self.packs.len() - 1) as u32
            }
        };
        let ours = self.index.frames.len() as u32;
        self.index.frames.push(frame);
        if self.imported.len() <= f as usize {
            self.imported.resize(f as usize + 1, NOT_IMPORTED);
        }
        self.imported[f as usize] = ours;
        Ok(ours)
    }

    /// Stores frame `frame` of new blobs (`hashes`, bytes `raw`): hands it to the
    /// compression thread, compresses it here, or writes it raw (see [`Compression`]).
    fn write_frame(&mut self, frame: u32, raw: &[u8], hashes: Vec<BlobHash>) -> ImageResult<()> {
        self.place_ready(false)?;
        let (level, wait) = match self.compression {
            Compression::Zstd { .. } if self.skip > 0 => {
                self.skip -= 1;
                return self.place(frame, raw, false, raw.len(), &hashes);
            }
            Compression::Zstd { level, wait } => (level, wait),
            Compression::None => return self.place(frame, raw, false, raw.len(), &hashes),
        };
        // Small frames (an incremental checkpoint's runs of changed pages) cost more to
        // hand over than to compress.
        let small = raw.len() < SMALL_FRAME;
        if self.pipeline.is_none() && !self.no_pipeline && !small {
            self.pipeline = Pipeline::take();
            self.no_pipeline = self.pipeline.is_none();
        }
        if wait && !small {
            while self.pipeline.as_ref().is_some_and(Pipeline::busy) {
                self.place_ready(true)?;
            }
        }
        let hashes = match self.pipeline.as_mut().filter(|p| !small && !p.busy()) {
            Some(p) => match p.send(frame, hashes, raw, level) {
                Ok(()) => return Ok(()),
                Err(hashes) => {
                    self.no_pipeline = true;
                    hashes
                }
            },
            None => hashes,
        };
        let compresses_fast = self.measured[0]
            .rate()
            .is_some_and(|r| r >= INLINE_SAVING_RATE);
        if !(small || self.no_pipeline || wait || compresses_fast) {
            return self.place(frame, raw, false, raw.len(), &hashes);
        }
        let (context, out) = &mut self.inline;
        // By the clock (see `measured`).
        let c = compress::compressor(&mut context.0, level);
        let started = std::time::Instant::now();
        let pays = c.is_some_and(|c| compress::compress(c, raw, out));
        let took = started.elapsed();
        let saved = if pays { raw.len() - out.len() } else { 0 };
        let out = std::mem::take(out);
        self.note_compressed(raw.len(), saved, took);
        let placed = match pays {
            true => self.place(frame, &out, true, raw.len(), &hashes),
            false => self.place(frame, raw, false, raw.len(), &hashes),
        };
        self.inline.1 = out;
        placed
    }

    /// Places the frames back from the compression thread: those ready, or (`wait`) the
    /// next one, waiting for it.
    fn place_ready(&mut self, wait: bool) -> ImageResult<()> {
        loop {
            let Some(p) = self.pipeline.as_mut() else {
                return Ok(());
            };
            let done = p.next(wait).map_err(|_| ImageError::Io {
                path: self.path.clone(),
                source: std::io::Error::other(
                    "the compression thread ended with frames under way; the checkpoint is incomplete",
                ),
            })?;
            let Some(done) = done else {
                return Ok(());
            };
            self.place_done(&done)?;
            if let Some(p) = self.pipeline.as_mut() {
                p.recycle(done);
            }
            if wait {
                return Ok(());
            }
        }
    }

    /// Places a frame back from the compression thread.
    fn place_done(&mut self, done: &Done) -> ImageResult<()> {
        self.note_compressed(done.job.raw.len(), done.saved(), done.cpu);
        let job = &done.job;
        self.place(
            job.frame,
            done.stored(),
            done.pays,
            job.raw.len(),
            &job.hashes,
        )
    }

    /// Notes a frame's compression: of `raw` bytes, `saved` (0: it did not pay) in `took`
    /// (CPU time on the compression thread, time by the clock on the writer's).
    ///
    /// Data that does not compress (random, already compressed) is probed rather than
    /// compressed frame after frame: one frame that does not pay proves little; from the
    /// second in a row on, frames are stored raw between probes, spaced further and
    /// further apart (2, 4 … 128 frames). Unless every frame waits for the compressor,
    /// data that compresses too slowly for what it saves is probed the same way, 16 to 128
    /// frames apart: bytes saved per second over recent frames ([`Measured`], frames that
    /// did not pay included, and zstd's cost per call, which weighs in small frames) below
    /// [`MIN_SAVING_RATE`].
    fn note_compressed(&mut self, raw: usize, saved: usize, took: Duration) {
        let measured = &mut self.measured[usize::from(raw < SMALL_FRAME)];
        measured.add(raw, saved, took);
        let waits = matches!(self.compression, Compression::Zstd { wait: true, .. });
        let slow = saved > 0 && !waits && measured.rate().is_some_and(|r| r < MIN_SAVING_RATE);
        self.backoff = match (saved > 0 && !slow, self.backoff) {
            (true, _) => 0,
            (false, b) if slow => (b * 2).clamp(SLOW_BACKOFF, MAX_BACKOFF),
            (false, 0) => 1,
            (false, b) => (b * 2).min(MAX_BACKOFF),
        };
        self.skip = if self.backoff > 1 { self.backoff } else { 0 };
    }

    /// Appends frame `frame` (`raw_len` raw bytes, stored as `stored`, zstd or not) to the
    /// pack and records where it lies.
    fn place(
        &mut self,
        frame: u32,
        stored: &[u8],
        zstd: bool,
        raw_len: usize,
        hashes: &[BlobHash],
    ) -> ImageResult<()> {
        let raw_len = raw_len as u32;
        let stored_len = u32::try_from(stored.len()).unwrap_or(u32::MAX);
        self.hashes.push_frame(self.offset, hashes);
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(FRAME_MAGIC);
        header[4..8].copy_from_slice(&stored_len.to_le_bytes());
        header[8..12].copy_from_slice(&raw_len.to_le_bytes());
        header[12..16].copy_from_slice(&u32::from(zstd).to_le_bytes());
        self.file.write(&header)?;
        self.file.write(stored)?;
        if let Some(f) = self.index.frames.get_mut(frame as usize) {
            *f = Frame {
                pack: 0,
                offset: self.offset,
                stored_len,
                raw_len,
                zstd,
            };
        }
        self.offset += HEADER_LEN + u64::from(stored_len);
        self.new_bytes += u64::from(raw_len);
        crate::fault::point("pack-chunk");
        Ok(())
    }

    /// Raw length of chunk `index`, if it was written by this writer.
    pub fn chunk_len(&self, index: u32) -> Option<u64> {
        ((index as usize) < self.index.len()).then(|| self.index.chunk_len(index))
    }

    /// Bytes written to the pack file so far.
    pub fn bytes_written(&self) -> u64 {
        self.offset
    }

    /// Raw bytes stored as new blobs so far (the rest was found in the base or earlier).
    pub fn new_bytes(&self) -> u64 {
        self.new_bytes
    }

    /// Writes the trailer, flushes and syncs the file; returns the index and the packs it
    /// names.
    pub fn finish(mut self) -> ImageResult<Written> {
        while self.pipeline.as_ref().is_some_and(|p| p.in_flight() > 0) {
            self.place_ready(true)?;
        }
        let trailer_at = self.offset;
        self.offset += self.hashes.write(&mut self.file, trailer_at)?;
        self.file.finish()?;
        crate::fault::point("pack-finished");
        Ok(Written {
            index: self.index,
            packs: self.packs,
            known: self.known,
            imported: self.imported,
        })
    }
}

/// Reads and checks chunks of a pack file.
#[derive(Debug)]
pub struct PackReader {
    file: File,
    path: PathBuf,
    len: u64,
    /// The decompression context, made at the first compressed frame and reused.
    decompressor: Option<Context<zstd::bulk::Decompressor<'static>>>,
    /// The pack opened again with `O_DIRECT`, for reading ahead ([`PackReader::direct`]).
    direct: Option<File>,
    /// The filesystem refused direct reads of it.
    direct_refused: bool,
    /// Its trailer, once read ([`PackReader::hashes`]).
    hashes: Option<PackHashes>,
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
            decompressor: None,
            direct: None,
            direct_refused: fault::armed_as("no-direct-io"),
            hashes: None,
        })
    }

    /// The content addresses of the pack's blobs, from its trailer (read and checked at the
    /// first call).
    pub fn hashes(&mut self) -> ImageResult<&PackHashes> {
        if self.hashes.is_none() {
            let read = PackHashes::read(&self.file, &self.path, self.len)?;
            self.hashes = Some(read);
        }
        Ok(self.hashes.as_ref().expect("read just above"))
    }

    /// The trailer, if [`PackReader::hashes`] read it.
    pub fn hashes_read(&self) -> Option<&PackHashes> {
        self.hashes.as_ref()
    }

    /// Lets the trailer go once its addresses are in place (16 bytes per blob of the
    /// pack, 16 MB for 4 GiB, which a restored job's supervisor need not keep).
    pub fn forget_hashes(&mut self) {
        self.hashes = None;
    }

    /// The pack opened again with `O_DIRECT` (at the first call); `None` where the
    /// filesystem refuses direct reads. It is the file already open (reopened through
    /// `/proc/self/fd`), even if the pack was removed or replaced since.
    pub(crate) fn direct(&mut self) -> Option<&File> {
        if self.direct.is_none() && !self.direct_refused {
            let opened = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(stasis_sys::cache::O_DIRECT)
                .open(format!("/proc/self/fd/{}", self.file.as_raw_fd()));
            match opened {
                Ok(f) => self.direct = Some(f),
                Err(_) => self.direct_refused = true,
            }
        }
        self.direct.as_ref()
    }

    /// Stops direct reads of the pack: the filesystem refused one.
    pub(crate) fn refuse_direct(&mut self) {
        self.direct = None;
        self.direct_refused = true;
    }

    /// Where `frame` lies in the pack, header included, checked against the size cap and
    /// the pack's length: (offset, length).
    pub(crate) fn span(&self, frame: &Frame) -> ImageResult<(u64, u64)> {
        if frame.raw_len > MAX_CHUNK || frame.stored_len > MAX_CHUNK {
            return Err(ImageError::TooLarge {
                path: self.path.clone(),
                what: "frame",
                offset: frame.offset,
                size: u64::from(frame.raw_len.max(frame.stored_len)),
                limit: u64::from(MAX_CHUNK),
            });
        }
        let len = HEADER_LEN + u64::from(frame.stored_len);
        let end = frame.offset.saturating_add(len);
        if end > self.len {
            return Err(ImageError::Truncated {
                path: self.path.clone(),
                offset: self.len,
                expected: end - self.len,
            });
        }
        Ok((frame.offset, len))
    }

    /// The error for a damaged part of `frame`.
    fn corrupt(&self, frame: &Frame, what: &str) -> ImageError {
        ImageError::Corrupt {
            path: self.path.clone(),
            offset: frame.offset,
            what: what.to_owned(),
        }
    }

    /// Checks the header read for `frame` against it (and that a raw frame stores as many
    /// bytes as it holds).
    pub(crate) fn check_header(&self, frame: &Frame, header: &[u8]) -> ImageResult<()> {
        let word = |i: usize| {
            header
                .get(i..i + 4)
                .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        };
        if header.get(..4) != Some(&FRAME_MAGIC[..])
            || word(4) != Some(frame.stored_len)
            || word(8) != Some(frame.raw_len)
            || word(12).map(|w| w & 1 == 1) != Some(frame.zstd)
        {
            return Err(self.corrupt(frame, "frame header"));
        }
        if !frame.zstd && frame.stored_len != frame.raw_len {
            return Err(self.corrupt(frame, "frame length"));
        }
        Ok(())
    }

    /// Decompresses the stored bytes of zstd `frame` into `raw` (its old contents
    /// replaced), checking their length.
    pub(crate) fn decompress(
        &mut self,
        frame: &Frame,
        stored: &[u8],
        raw: &mut Vec<u8>,
    ) -> ImageResult<()> {
        raw.clear();
        raw.reserve(frame.raw_len as usize);
        let decompressor = match &mut self.decompressor {
            Some(d) => d,
            None => self.decompressor.insert(Context(
                zstd::bulk::Decompressor::new().map_err(io(&self.path))?,
            )),
        };
        let n = decompressor.0.decompress_to_buffer(stored, raw);
        match n {
            Ok(n) if n == frame.raw_len as usize => {
                raw.truncate(n);
                Ok(())
            }
            Ok(_) => Err(self.corrupt(frame, "frame length")),
            Err(_) => Err(self.corrupt(frame, "zstd data")),
        }
    }

    /// The pack's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads one frame's raw bytes, checking its header against `frame`. (Blobs in it are
    /// checked against their content addresses by the caller.)
    pub fn read_frame(&mut self, frame: &Frame) -> ImageResult<Vec<u8>> {
        let mut raw = Vec::new();
        self.read_frame_into(frame, &mut raw)?;
        Ok(raw)
    }

    /// Asks the kernel to start reading `frame` from disk now, so that reading it later
    /// does not wait.
    pub fn read_ahead(&self, frame: &Frame) {
        // Only a hint: a refusal costs the read its wait on the disk, nothing else.
        let _ = stasis_sys::cache::read_ahead(
            &self.file,
            frame.offset,
            HEADER_LEN + u64::from(frame.stored_len),
        );
    }

    /// Like [`PackReader::read_frame`], into `raw` (its old contents replaced; its memory
    /// reused, which spares allocating and faulting in fresh memory for every frame).
    pub fn read_frame_into(&mut self, frame: &Frame, raw: &mut Vec<u8>) -> ImageResult<()> {
        let (offset, len) = self.span(frame)?;
        let end = offset + len;
        let mut header = [0u8; 16];
        self.file
            .read_exact_at(&mut header, frame.offset)
            .map_err(io(&self.path))?;
        self.check_header(frame, &header)?;
        let at = frame.offset + HEADER_LEN;
        if frame.zstd {
            let mut stored = vec![0u8; frame.stored_len as usize];
            self.file
                .read_exact_at(&mut stored, at)
                .map_err(io(&self.path))?;
            self.decompress(frame, &stored, raw)?;
        } else {
            // Read into the buffer's spare capacity: nothing is zeroed first.
            raw.clear();
            raw.reserve(frame.stored_len as usize);
            let mut file = &self.file;
            file.seek(std::io::SeekFrom::Start(at))
                .and_then(|_| file.take(u64::from(frame.stored_len)).read_to_end(raw))
                .map_err(io(&self.path))?;
            if raw.len() != frame.stored_len as usize {
                return Err(ImageError::Truncated {
                    path: self.path.clone(),
                    offset: at + raw.len() as u64,
                    expected: u64::from(frame.stored_len) - raw.len() as u64,
                });
            }
        }
        // Read once: its cached pages go back to the kernel, which gives them to the
        // reading ahead of the frames that follow.
        let _ = stasis_sys::cache::drop_cached(&self.file, frame.offset, end - frame.offset);
        Ok(())
    }
}

/// The trailer of a pack: the content address of every blob of every frame, so that an
/// index need not repeat them for the blobs it shares with older generations.
///
/// Layout (at the end of the pack, after the last frame): for each frame in the order
/// written, its offset (u64 LE), the index of its first address (u32) and its number of
/// blobs (u32); then the addresses (16 bytes each); then a 32-byte footer: `STASISHT`, the
/// number of frames (u32), the number of addresses (u32), the crc32c of everything from
/// the first frame record on (u32), 0 (u32), and the offset of the first frame record (u64).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PackHashes {
    /// Frame offsets, increasing.
    offsets: Vec<u64>,
    /// Index in `hashes` of each frame's first address, and one past the last frame's.
    firsts: Vec<u32>,
    hashes: Vec<BlobHash>,
}

impl PackHashes {
    /// The addresses of the blobs of the frame at `offset`, in order; `None` for a frame
    /// the pack does not hold.
    pub fn of_frame(&self, offset: u64) -> Option<&[BlobHash]> {
        let i = self.offsets.binary_search(&offset).ok()?;
        let (a, b) = (self.firsts[i] as usize, self.firsts[i + 1] as usize);
        self.hashes.get(a..b)
    }

    /// Adds the frame about to be written at `offset`, of blobs `hashes`.
    fn push_frame(&mut self, offset: u64, hashes: &[BlobHash]) {
        if self.firsts.is_empty() {
            self.firsts.push(0);
        }
        self.offsets.push(offset);
        self.hashes.extend_from_slice(hashes);
        self.firsts
            .push(u32::try_from(self.hashes.len()).unwrap_or(u32::MAX));
    }

    /// Appends the trailer to `file`, whose frames end at `at`; returns its length.
    fn write(&self, file: &mut Sink, at: u64) -> ImageResult<u64> {
        let mut records = Vec::with_capacity(self.offsets.len() * TRAILER_FRAME);
        for (i, &offset) in self.offsets.iter().enumerate() {
            records.extend_from_slice(&offset.to_le_bytes());
            records.extend_from_slice(&self.firsts[i].to_le_bytes());
            records.extend_from_slice(&(self.firsts[i + 1] - self.firsts[i]).to_le_bytes());
        }
        let hashes = self.hashes.as_flattened();
        let crc = crc32c::crc32c_append(crc32c::crc32c(&records), hashes);
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
        let mut footer = Vec::with_capacity(FOOTER_LEN as usize);
        footer.extend_from_slice(TRAILER_MAGIC);
        footer.extend_from_slice(&count(self.offsets.len()));
        footer.extend_from_slice(&count(self.hashes.len()));
        footer.extend_from_slice(&crc.to_le_bytes());
        footer.extend_from_slice(&0u32.to_le_bytes());
        footer.extend_from_slice(&at.to_le_bytes());
        file.write(&records)?;
        file.write(hashes)?;
        file.write(&footer)?;
        Ok((records.len() + hashes.len() + footer.len()) as u64)
    }

    /// Reads and checks the trailer of the pack `file` (at `path`, `len` bytes long).
    fn read(file: &File, path: &Path, len: u64) -> ImageResult<PackHashes> {
        let corrupt = |offset: u64, what: &str| ImageError::Corrupt {
            path: path.to_owned(),
            offset,
            what: format!("pack trailer: {what}"),
        };
        if len < HEADER_LEN + FOOTER_LEN {
            return Err(ImageError::Truncated {
                path: path.to_owned(),
                offset: len,
                expected: HEADER_LEN + FOOTER_LEN - len,
            });
        }
        let footer_at = len - FOOTER_LEN;
        let mut footer = [0u8; FOOTER_LEN as usize];
        file.read_exact_at(&mut footer, footer_at)
            .map_err(io(path))?;
        if &footer[..8] != TRAILER_MAGIC {
            return Err(ImageError::NoTrailer {
                path: path.to_owned(),
                len,
            });
        }
        let word = |i: usize| u32::from_le_bytes(footer[i..i + 4].try_into().expect("4 bytes"));
        let (frames, hashes, crc) = (word(8) as u64, word(12) as u64, word(16));
        let at = u64::from_le_bytes(footer[24..32].try_into().expect("8 bytes"));
        let size = frames * TRAILER_FRAME as u64 + hashes * 16;
        if at < HEADER_LEN || at.checked_add(size) != Some(footer_at) || word(20) != 0 {
            return Err(corrupt(
                footer_at,
                "sizes do not add up to the pack's length",
            ));
        }
        // Every frame has a header in the frames' part, and at most a frame's worth of
        // blobs: bounds checked before the tables are allocated.
        let per_frame = u64::from(MAX_CHUNK) / BLOB_LEN as u64;
        if frames > (at - HEADER_LEN) / HEADER_LEN || hashes > frames * per_frame {
            return Err(corrupt(
                footer_at,
                "more frames or addresses than the pack can hold",
            ));
        }
        // The addresses are read straight into their table (16 MB at 4 GiB, on the way
        // to a restarted job's first instruction): no copy.
        let mut frame_records = vec![0u8; frames as usize * TRAILER_FRAME];
        let mut out = PackHashes {
            offsets: Vec::with_capacity(frames as usize),
            firsts: Vec::with_capacity(frames as usize + 1),
            hashes: vec![[0u8; 16]; hashes as usize],
        };
        file.read_exact_at(&mut frame_records, at)
            .and_then(|()| {
                let hashes_at = at + frame_records.len() as u64;
                file.read_exact_at(out.hashes.as_flattened_mut(), hashes_at)
            })
            .map_err(io(path))?;
        let crc_of =
            crc32c::crc32c_append(crc32c::crc32c(&frame_records), out.hashes.as_flattened());
        if crc_of != crc {
            return Err(corrupt(at, "crc32c mismatch"));
        }
        out.firsts.push(0);
        for (i, rec) in frame_records.chunks_exact(TRAILER_FRAME).enumerate() {
            let offset = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes"));
            let first = u32::from_le_bytes(rec[8..12].try_into().expect("4 bytes"));
            let count = u32::from_le_bytes(rec[12..16].try_into().expect("4 bytes"));
            let previous = out.offsets.last().copied().unwrap_or(0);
            let next = u64::from(first) + u64::from(count);
            if offset < HEADER_LEN.max(previous + 1)
                || offset >= at
                || Some(&first) != out.firsts.last()
                || next > hashes
                || u64::from(count) > per_frame
            {
                return Err(corrupt(
                    at + (i * TRAILER_FRAME) as u64,
                    &format!("frame record {i}"),
                ));
            }
            out.offsets.push(offset);
            out.firsts.push(next as u32);
        }
        if u64::from(*out.firsts.last().expect("one at least")) != hashes {
            return Err(corrupt(at, "frames do not account for every address"));
        }
        Ok(out)
    }
}
