//! The chunk index of a generation: where each chunk's bytes live.
//!
//! Data is content-addressed in *blobs* of at most [`BLOB_LEN`] bytes, identified by their
//! 128-bit XXH3 hash. (A job's blobs are only ever matched against the same job's own
//! images, written and read by one user, so a non-cryptographic hash suffices: an accidental
//! collision is about as likely as 2^-90 per checkpoint, and a program that crafted one
//! would only confuse its own restart. It hashes at memory speed, where blake3 on 4 KiB
//! inputs took a third of a checkpoint's time.) New blobs are written in compressed *frames* to the pack file of
//! the generation that first stored them; a blob unchanged since the previous generation is
//! not written again but referenced where it already lies, in an older pack. A *chunk*, the
//! unit the manifest refers to (a run of pages, a pipe's contents, …), is a sequence of
//! blobs.
//!
//! The index is binary (it has one entry per page of saved memory) and follows the
//! manifest's JSON body in the manifest file; its layout is in `docs/image-format.md`.

use crate::pack::MAX_CHUNK;

/// Largest blob: the unit of deduplication (one page).
pub const BLOB_LEN: usize = 4096;
/// Magic bytes that start the index section.
pub const INDEX_MAGIC: &[u8; 8] = b"STASISCX";
/// Length of the index section's header.
pub const INDEX_HEADER: usize = 24;
/// Largest index section the reader accepts (about 9 million blobs: 36 GiB of pages).
pub const MAX_INDEX: u64 = 256 << 20;
const FRAME_RECORD: usize = 24;
const BLOB_RECORD: usize = 28;
const CHUNK_RECORD: usize = 4;

/// The content address of a blob: its XXH3-128 hash, little-endian.
pub type BlobHash = [u8; 16];

/// Hashes a blob.
pub fn blob_hash(data: &[u8]) -> BlobHash {
    xxhash_rust::xxh3::xxh3_128(data).to_le_bytes()
}

/// A hasher for maps keyed by [`BlobHash`]: the key is already a well-mixed hash, so its
/// first eight bytes serve (SipHash over a million keys per checkpoint showed in profiles).
#[derive(Debug, Default, Clone, Copy)]
pub struct BlobHasher(u64);

impl std::hash::Hasher for BlobHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
    }

    fn write_usize(&mut self, _len: usize) {
        // The length prefix of a fixed-size key says nothing.
    }
}

/// Builds [`BlobHasher`]s.
pub type BuildBlobHasher = std::hash::BuildHasherDefault<BlobHasher>;

/// Appends a record of `size` bytes per item of `items`, each filled in place by `put`
/// (not field by field at the end of `out`: the index has a record per page).
fn put_records<T>(out: &mut Vec<u8>, items: &[T], size: usize, put: impl Fn(&T, &mut [u8])) {
    let at = out.len();
    out.resize(at + items.len() * size, 0);
    for (item, rec) in items.iter().zip(out[at..].chunks_exact_mut(size)) {
        put(item, rec);
    }
}

/// One compressed frame of a pack file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// Index into the manifest's `packs` (0: the pack this generation wrote).
    pub pack: u32,
    /// Offset of the frame header in the pack.
    pub offset: u64,
    /// Bytes stored after the header.
    pub stored_len: u32,
    /// Bytes after decompression.
    pub raw_len: u32,
    /// Compressed with zstd.
    pub zstd: bool,
}

/// One blob: a slice of a frame's raw bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blob {
    /// Index into [`ChunkIndex::frames`].
    pub frame: u32,
    /// Offset in the frame's raw bytes.
    pub start: u32,
    /// Length.
    pub len: u32,
    /// Content address, checked on every read.
    pub hash: BlobHash,
}

/// Frames, blobs and chunks of one generation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkIndex {
    /// Frames referenced, in this generation's pack or older ones.
    pub frames: Vec<Frame>,
    /// Blobs, chunk after chunk.
    pub blobs: Vec<Blob>,
    /// For each chunk, the index of its first blob; it runs to the next chunk's first blob.
    pub starts: Vec<u32>,
}

impl ChunkIndex {
    /// Number of chunks.
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    /// No chunks.
    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// The blobs of chunk `i` (empty when out of range).
    pub fn blobs_of(&self, i: u32) -> &[Blob] {
        let i = i as usize;
        let Some(&first) = self.starts.get(i) else {
            return &[];
        };
        let end = self
            .starts
            .get(i + 1)
            .map_or(self.blobs.len(), |&e| e as usize);
        self.blobs
            .get(first as usize..end.max(first as usize))
            .unwrap_or(&[])
    }

    /// Raw length of chunk `i`.
    pub fn chunk_len(&self, i: u32) -> u64 {
        self.blobs_of(i).iter().map(|b| u64::from(b.len)).sum()
    }

    /// Raw bytes of all chunks.
    pub fn raw_bytes(&self) -> u64 {
        self.blobs.iter().map(|b| u64::from(b.len)).sum()
    }

    /// Bytes stored in frames of `pack` (0: the generation's own), headers included.
    pub fn stored_bytes_in(&self, pack: u32) -> u64 {
        self.frames
            .iter()
            .filter(|f| f.pack == pack)
            .map(|f| u64::from(f.stored_len) + crate::pack::HEADER_LEN)
            .sum()
    }

    /// Raw bytes of the blobs that lie in `pack`'s frames.
    pub fn raw_bytes_in(&self, pack: u32) -> u64 {
        self.blobs
            .iter()
            .filter(|b| {
                self.frames
                    .get(b.frame as usize)
                    .is_some_and(|f| f.pack == pack)
            })
            .map(|b| u64::from(b.len))
            .sum()
    }

    /// Encodes the index section.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// Like [`ChunkIndex::encode`], appended to `out` (one buffer, no copy of the records:
    /// the index has one record per page of saved memory).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
        out.reserve(
            INDEX_HEADER
                + self.frames.len() * FRAME_RECORD
                + self.blobs.len() * BLOB_RECORD
                + self.starts.len() * CHUNK_RECORD,
        );
        out.extend_from_slice(INDEX_MAGIC);
        out.extend_from_slice(&count(self.frames.len()));
        out.extend_from_slice(&count(self.blobs.len()));
        out.extend_from_slice(&count(self.starts.len()));
        let crc_at = out.len();
        out.extend_from_slice(&[0; 4]);
        let records = out.len();
        put_records(out, &self.frames, FRAME_RECORD, |f, rec| {
            rec[..4].copy_from_slice(&f.pack.to_le_bytes());
            rec[4..8].copy_from_slice(&u32::from(f.zstd).to_le_bytes());
            rec[8..16].copy_from_slice(&f.offset.to_le_bytes());
            rec[16..20].copy_from_slice(&f.stored_len.to_le_bytes());
            rec[20..].copy_from_slice(&f.raw_len.to_le_bytes());
        });
        put_records(out, &self.blobs, BLOB_RECORD, |b, rec| {
            rec[..4].copy_from_slice(&b.frame.to_le_bytes());
            rec[4..8].copy_from_slice(&b.start.to_le_bytes());
            rec[8..12].copy_from_slice(&b.len.to_le_bytes());
            rec[12..].copy_from_slice(&b.hash);
        });
        put_records(out, &self.starts, CHUNK_RECORD, |s, rec| {
            rec.copy_from_slice(&s.to_le_bytes());
        });
        let crc = crc32c::crc32c(&out[records..]);
        out[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes an index section, checking its size against `bytes` before allocating, its
    /// crc32c and every cross-reference (`packs` is the number of packs the manifest names).
    /// `Err` says what is wrong and at which offset of the section.
    pub fn decode(bytes: &[u8], packs: usize) -> Result<ChunkIndex, (u64, String)> {
        if bytes.len() < INDEX_HEADER {
            return Err((0, "chunk index truncated".into()));
        }
        if &bytes[..8] != INDEX_MAGIC {
            return Err((0, "chunk index: bad magic".into()));
        }
        let word = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let (nframes, nblobs, nchunks, crc) = (word(8), word(12), word(16), word(20));
        let need = nframes as u64 * FRAME_RECORD as u64
            + nblobs as u64 * BLOB_RECORD as u64
            + nchunks as u64 * CHUNK_RECORD as u64;
        let have = (bytes.len() - INDEX_HEADER) as u64;
        if need != have {
            return Err((
                INDEX_HEADER as u64,
                format!("chunk index announces {need} bytes of records but holds {have}"),
            ));
        }
        let records = &bytes[INDEX_HEADER..];
        if crc32c::crc32c(records) != crc {
            return Err((INDEX_HEADER as u64, "chunk index crc32c mismatch".into()));
        }
        let rword = |i: usize| u32::from_le_bytes(records[i..i + 4].try_into().expect("4 bytes"));
        let mut at = 0;
        let mut index = ChunkIndex {
            frames: Vec::with_capacity(nframes as usize),
            blobs: Vec::with_capacity(nblobs as usize),
            starts: Vec::with_capacity(nchunks as usize),
        };
        for i in 0..nframes {
            let f = Frame {
                pack: rword(at),
                zstd: rword(at + 4) & 1 == 1,
                offset: u64::from_le_bytes(records[at + 8..at + 16].try_into().expect("8")),
                stored_len: rword(at + 16),
                raw_len: rword(at + 20),
            };
            if f.pack as usize >= packs {
                return Err((at as u64, format!("frame {i} names pack {}", f.pack)));
            }
            if f.stored_len > MAX_CHUNK || f.raw_len > MAX_CHUNK {
                return Err((
                    at as u64,
                    format!("frame {i} is larger than the format allows"),
                ));
            }
            index.frames.push(f);
            at += FRAME_RECORD;
        }
        for i in 0..nblobs {
            let mut hash = [0u8; 16];
            hash.copy_from_slice(&records[at + 12..at + 28]);
            let b = Blob {
                frame: rword(at),
                start: rword(at + 4),
                len: rword(at + 8),
                hash,
            };
            let frame = index
                .frames
                .get(b.frame as usize)
                .ok_or_else(|| (at as u64, format!("blob {i} names frame {}", b.frame)))?;
            if u64::from(b.start) + u64::from(b.len) > u64::from(frame.raw_len) {
                return Err((at as u64, format!("blob {i} lies beyond its frame")));
            }
            index.blobs.push(b);
            at += BLOB_RECORD;
        }
        let mut previous = 0;
        for i in 0..nchunks {
            let s = rword(at);
            if s < previous || s > nblobs {
                return Err((at as u64, format!("chunk {i} starts at blob {s}")));
            }
            previous = s;
            index.starts.push(s);
            at += CHUNK_RECORD;
        }
        for i in 0..nchunks {
            if index.chunk_len(i) > u64::from(MAX_CHUNK) {
                return Err((0, format!("chunk {i} is larger than the format allows")));
            }
        }
        Ok(index)
    }
}
