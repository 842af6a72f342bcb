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
//! The index is binary and follows the manifest's JSON body in the manifest file; its
//! layout is in `docs/image-format.md`. It lists blobs as *runs* (one record for blobs that
//! follow each other in one frame) and holds no content addresses: those lie with the data,
//! in the trailer of the pack that first stored each blob ([`crate::pack::PackHashes`]),
//! and are put back in place ([`ChunkIndex::attach_hashes`]) when a generation is opened.
//! So a generation that changed 1% of a job's pages writes an index of about the size of
//! what changed, not one record per page of the job (7 MB per GiB before).

use crate::pack::MAX_CHUNK;

/// Largest blob: the unit of deduplication (one page).
pub const BLOB_LEN: usize = 4096;
/// Magic bytes that start the index section.
pub const INDEX_MAGIC: &[u8; 8] = b"STASISCX";
/// Length of the index section's header.
pub const INDEX_HEADER: usize = 28;
/// Largest index section the reader accepts.
pub const MAX_INDEX: u64 = 256 << 20;
/// Most blobs an index may list (256 GiB of pages), checked before anything is allocated
/// for them.
pub const MAX_BLOBS: u32 = 1 << 26;
const FRAME_RECORD: usize = 24;
const RUN_RECORD: usize = 16;
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
    /// Content address, checked on every read (all zero in an index just decoded, until
    /// [`ChunkIndex::attach_hashes`]).
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

    /// Like [`ChunkIndex::encode`], appended to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
        let runs = blob_runs(&self.blobs);
        out.reserve(
            INDEX_HEADER
                + self.frames.len() * FRAME_RECORD
                + runs.len() * RUN_RECORD
                + self.starts.len() * CHUNK_RECORD,
        );
        out.extend_from_slice(INDEX_MAGIC);
        out.extend_from_slice(&count(self.frames.len()));
        out.extend_from_slice(&count(runs.len()));
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
        put_records(out, &runs, RUN_RECORD, |r, rec| {
            rec[..4].copy_from_slice(&r.frame.to_le_bytes());
            rec[4..8].copy_from_slice(&r.start.to_le_bytes());
            rec[8..12].copy_from_slice(&r.count.to_le_bytes());
            rec[12..].copy_from_slice(&r.len.to_le_bytes());
        });
        put_records(out, &self.starts, CHUNK_RECORD, |s, rec| {
            rec.copy_from_slice(&s.to_le_bytes());
        });
        let crc = crc32c::crc32c(&out[records..]);
        out[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes an index section, checking its size against `bytes` before allocating, its
    /// crc32c and every cross-reference (`packs` is the number of packs the manifest names).
    /// The blobs' content addresses are left zero ([`ChunkIndex::attach_hashes`]). `Err`
    /// says what is wrong and at which offset of the section.
    pub fn decode(bytes: &[u8], packs: usize) -> Result<ChunkIndex, (u64, String)> {
        if bytes.len() < INDEX_HEADER {
            return Err((0, "chunk index truncated".into()));
        }
        if &bytes[..8] != INDEX_MAGIC {
            return Err((0, "chunk index: bad magic".into()));
        }
        let word = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let (nframes, nruns, nblobs, nchunks, crc) =
            (word(8), word(12), word(16), word(20), word(24));
        let need = nframes as u64 * FRAME_RECORD as u64
            + nruns as u64 * RUN_RECORD as u64
            + nchunks as u64 * CHUNK_RECORD as u64;
        let have = (bytes.len() - INDEX_HEADER) as u64;
        if need != have {
            return Err((
                INDEX_HEADER as u64,
                format!("chunk index announces {need} bytes of records but holds {have}"),
            ));
        }
        // A run holds at most a frame's worth of whole blobs: the blob count is bounded by
        // the records there are before anything is allocated for it.
        let per_run = u64::from(MAX_CHUNK) / BLOB_LEN as u64;
        if nblobs > MAX_BLOBS || nruns > nblobs || u64::from(nblobs) > u64::from(nruns) * per_run {
            return Err((
                12,
                format!("chunk index announces {nblobs} blobs in {nruns} runs"),
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
        for i in 0..nruns {
            let r = BlobRun {
                frame: rword(at),
                start: rword(at + 4),
                count: rword(at + 8),
                len: rword(at + 12),
            };
            let frame = index
                .frames
                .get(r.frame as usize)
                .ok_or_else(|| (at as u64, format!("blob run {i} names frame {}", r.frame)))?;
            let end = u64::from(r.start) + u64::from(r.count) * u64::from(r.len);
            if r.count == 0 || r.len == 0 || end > u64::from(frame.raw_len) {
                return Err((at as u64, format!("blob run {i} lies beyond its frame")));
            }
            // A frame's blobs lie at multiples of BLOB_LEN, all whole but its last.
            let whole = r.len as usize == BLOB_LEN;
            let tail = r.count == 1 && end == u64::from(frame.raw_len);
            if !(r.start as usize).is_multiple_of(BLOB_LEN) || !(whole || tail) {
                return Err((
                    at as u64,
                    format!("blob run {i} is not made of whole blobs of its frame"),
                ));
            }
            if index.blobs.len() as u64 + u64::from(r.count) > u64::from(nblobs) {
                return Err((at as u64, format!("blob run {i} goes past {nblobs} blobs")));
            }
            index.blobs.extend((0..r.count).map(|k| Blob {
                frame: r.frame,
                start: r.start + k * r.len,
                len: r.len,
                hash: [0; 16],
            }));
            at += RUN_RECORD;
        }
        if index.blobs.len() != nblobs as usize {
            return Err((
                12,
                format!(
                    "chunk index announces {nblobs} blobs, its runs hold {}",
                    index.blobs.len()
                ),
            ));
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

    /// Puts each blob's content address in place, from `hashes_of(frame)`: the addresses of
    /// the blobs a frame holds, in order (as its pack's trailer lists them; `None` for a
    /// frame the trailer does not list). A frame's blobs follow each other from its start,
    /// [`BLOB_LEN`] bytes each but the last; a blob that is not one of them is refused.
    /// `Err` names the first blob without an address.
    pub fn attach_hashes<'a>(
        &mut self,
        mut hashes_of: impl FnMut(&Frame) -> Option<&'a [BlobHash]>,
    ) -> Result<(), usize> {
        let mut last: Option<(u32, &'a [BlobHash])> = None;
        for (i, b) in self.blobs.iter_mut().enumerate() {
            let frame = self.frames.get(b.frame as usize).ok_or(i)?;
            let hashes = match last {
                Some((f, h)) if f == b.frame => h,
                _ => {
                    let h = hashes_of(frame).ok_or(i)?;
                    last = Some((b.frame, h));
                    h
                }
            };
            let k = (b.start as usize) / BLOB_LEN;
            let whole = (frame.raw_len - b.start.min(frame.raw_len)).min(BLOB_LEN as u32);
            if !(b.start as usize).is_multiple_of(BLOB_LEN) || b.len != whole {
                return Err(i);
            }
            b.hash = *hashes.get(k).ok_or(i)?;
        }
        Ok(())
    }
}

/// Consecutive blobs of one frame, of one length, each right after the one before: one
/// record of the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BlobRun {
    frame: u32,
    start: u32,
    count: u32,
    len: u32,
}

/// `blobs` as runs ([`BlobRun`]), in order.
fn blob_runs(blobs: &[Blob]) -> Vec<BlobRun> {
    let mut runs: Vec<BlobRun> = Vec::new();
    for b in blobs {
        if let Some(r) = runs.last_mut()
            && r.frame == b.frame
            && r.len == b.len
            && r.count < u32::MAX
            && u64::from(r.start) + u64::from(r.count) * u64::from(r.len) == u64::from(b.start)
        {
            r.count += 1;
            continue;
        }
        runs.push(BlobRun {
            frame: b.frame,
            start: b.start,
            count: 1,
            len: b.len,
        });
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(frame: u32, start: u32, len: u32) -> Blob {
        Blob {
            frame,
            start,
            len,
            hash: [0; 16],
        }
    }

    fn sample() -> ChunkIndex {
        let frame = |raw_len| Frame {
            pack: 0,
            offset: 16,
            stored_len: raw_len,
            raw_len,
            zstd: false,
        };
        ChunkIndex {
            frames: vec![frame(4 * 4096), frame(4096 + 100)],
            // Two runs in frame 0 (a gap between), the short last blob of frame 1 on its own.
            blobs: vec![
                blob(0, 0, 4096),
                blob(0, 4096, 4096),
                blob(0, 3 * 4096, 4096),
                blob(1, 0, 4096),
                blob(1, 4096, 100),
            ],
            starts: vec![0, 3],
        }
    }

    #[test]
    fn blobs_in_runs_decode_back_the_same() {
        let index = sample();
        assert_eq!(blob_runs(&index.blobs).len(), 4);
        let bytes = index.encode();
        assert_eq!(
            bytes.len(),
            INDEX_HEADER + 2 * FRAME_RECORD + 4 * RUN_RECORD + 2 * 4
        );
        assert_eq!(ChunkIndex::decode(&bytes, 1), Ok(index));
    }

    #[test]
    fn a_run_past_its_frame_or_more_blobs_than_announced_are_refused() {
        let mut bytes = sample().encode();
        // The first run's count (third word of the first run record): 5 pages in a 4-page
        // frame.
        let run = INDEX_HEADER + 2 * FRAME_RECORD;
        bytes[run + 8..run + 12].copy_from_slice(&5u32.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[INDEX_HEADER..]);
        bytes[24..28].copy_from_slice(&crc.to_le_bytes());
        let err = ChunkIndex::decode(&bytes, 1).unwrap_err();
        assert!(err.1.contains("beyond its frame"), "{err:?}");
        bytes[run + 8..run + 12].copy_from_slice(&3u32.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[INDEX_HEADER..]);
        bytes[24..28].copy_from_slice(&crc.to_le_bytes());
        let err = ChunkIndex::decode(&bytes, 1).unwrap_err();
        assert!(err.1.contains("past 5 blobs"), "{err:?}");
    }

    #[test]
    fn a_blob_count_the_runs_cannot_hold_is_refused_before_allocating() {
        let mut bytes = sample().encode();
        bytes[16..20].copy_from_slice(&(MAX_BLOBS - 1).to_le_bytes());
        let err = ChunkIndex::decode(&bytes, 1).unwrap_err();
        assert!(err.1.contains("announces"), "{err:?}");
        // Runs of 1-byte blobs (which no writer makes) are refused too.
        let mut tiny = sample();
        tiny.blobs = vec![blob(0, 0, 1), blob(0, 1, 1)];
        tiny.starts = vec![0];
        let err = ChunkIndex::decode(&tiny.encode(), 1).unwrap_err();
        assert!(err.1.contains("whole blobs"), "{err:?}");
    }

    #[test]
    fn hashes_are_attached_by_place_in_the_frame_and_a_blob_off_the_grid_is_refused() {
        let mut index = sample();
        let h = |n: u8| [n; 16];
        let f0 = [h(1), h(2), h(3), h(4)];
        let f1 = [h(5), h(6)];
        let mut frames_seen = 0;
        index
            .attach_hashes(|f| {
                frames_seen += 1;
                Some(if f.raw_len == 4 * 4096 {
                    &f0[..]
                } else {
                    &f1[..]
                })
            })
            .unwrap();
        let got: Vec<u8> = index.blobs.iter().map(|b| b.hash[0]).collect();
        assert_eq!(got, vec![1, 2, 4, 5, 6]);
        assert_eq!(frames_seen, 2, "looked up once per run of one frame");
        let mut shifted = sample();
        shifted.blobs[1].start = 100;
        assert_eq!(shifted.attach_hashes(|_| Some(&f0[..])), Err(1));
        let mut unlisted = sample();
        assert_eq!(unlisted.attach_hashes(|_| None), Err(0));
    }
}
