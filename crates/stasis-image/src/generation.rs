//! Generations: numbered directories of a job's images, written atomically.
//!
//! A generation is built in `.tmp-gen-<pid>-<nanos>` inside the job directory, synced, and
//! renamed to `gen-NNNN` only when complete; the job directory is synced after the rename. A
//! crash or error at any point leaves earlier generations untouched; leftovers of dead writers
//! are removed the next time a generation is written.
//!
//! Removal mirrors this: a generation (or a whole job directory) is first renamed to a hidden
//! `.rm-…` name, which is never read as a generation, then deleted; a leftover of an
//! interrupted removal is deleted by the next removal or the next generation written.
//!
//! Page data lives in pack files in the job's `packs/` directory, shared between
//! generations: a generation references the blobs of its predecessor that did not change
//! instead of writing them again ([`crate::index`]). A pack is deleted only when no
//! generation references it any more, by a mark-and-sweep pass ([`collect_garbage`]) that
//! runs under an exclusive lock on the job directory's `.lock` file, which every writer
//! holds shared while it writes: a pack being written, or referenced by a generation being
//! written, is never swept.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{ImageError, ImageResult, io};
use crate::index::{Blob, ChunkIndex, Frame, INDEX_HEADER, MAX_INDEX, blob_hash};
use crate::manifest::{FORMAT_VERSION, Manifest, ProcessImage, VmaKind, is_pack_name};
use crate::pack::{Base, BaseMemory, Compression, KnownBlobs, PackReader, PackWriter, Written};
use crate::readahead::{FrameBytes, FrameReads};

/// Magic bytes at the start of a manifest file.
pub const MANIFEST_MAGIC: &[u8; 8] = b"STASISMF";
/// File name of the manifest inside a generation directory.
pub const MANIFEST_FILE: &str = "manifest";
/// Largest manifest body the reader accepts.
pub const MAX_MANIFEST: u64 = 256 << 20;
const MANIFEST_HEADER: usize = 24;

/// Directory of a job's pack files.
pub const PACKS_DIR: &str = "packs";
/// Lock file of a job's packs (in [`PACKS_DIR`]): shared by writers, exclusive for garbage
/// collection.
pub const LOCK_FILE: &str = ".lock";

/// Path of generation `n` in `job_dir`.
pub fn generation_dir(job_dir: &Path, n: u32) -> PathBuf {
    job_dir.join(format!("gen-{n:04}"))
}

/// Generation numbers present in `job_dir`, ascending (empty if it does not exist). Only
/// directories named `gen-NNNN` count: temporaries (`.tmp-gen-…`) and generations being
/// removed (`.rm-gen-…`) are not generations.
pub fn list_generations(job_dir: &Path) -> Vec<u32> {
    let mut gens: Vec<u32> = fs::read_dir(job_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("gen-")?.parse().ok())
        .collect();
    gens.sort_unstable();
    gens
}

/// The directory of generation `n`, or of the newest one when `n` is `None`.
pub fn resolve(job_dir: &Path, n: Option<u32>) -> ImageResult<PathBuf> {
    let gens = list_generations(job_dir);
    let pick = match n {
        Some(n) if gens.contains(&n) => n,
        Some(n) => {
            return Err(ImageError::NoGeneration {
                path: job_dir.to_owned(),
                detail: format!("generation {n} not found; present: {gens:?}"),
            });
        }
        None => *gens.last().ok_or_else(|| ImageError::NoGeneration {
            path: job_dir.to_owned(),
            detail: "no checkpoint has been taken".into(),
        })?,
    };
    Ok(generation_dir(job_dir, pick))
}

/// Creates a directory (and its parents) private to its owner (mode 0700).
pub fn create_private_dir(dir: &Path) -> ImageResult<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    Ok(())
}

/// Opens (creating it 0600 if missing) the lock file of `job_dir`'s packs.
fn lock_file(job_dir: &Path) -> ImageResult<fs::File> {
    let path = job_dir.join(PACKS_DIR).join(LOCK_FILE);
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io(&path))
}

/// The chunks of the newest generation of `job_dir`, for a new generation to share; none
/// when there is no generation, or when its manifest or one of its packs cannot be read (the
/// new generation is then written in full).
fn newest_base(job_dir: &Path) -> Base {
    let Some(&n) = list_generations(job_dir).last() else {
        return Base::default();
    };
    let Ok(mut m) = read_manifest(&generation_dir(job_dir, n).join(MANIFEST_FILE)) else {
        return Base::default();
    };
    let packs = job_dir.join(PACKS_DIR);
    let readers = m
        .packs
        .iter()
        .map(|p| PackReader::open(&packs.join(p)))
        .collect::<ImageResult<Vec<_>>>();
    let Ok(mut readers) = readers else {
        return Base::default();
    };
    if attach_hashes(&mut m.chunks, &mut readers).is_err() {
        return Base::default();
    }
    let memory = m
        .processes
        .iter()
        .map(|p| (p.pid, base_memory(p, &m.chunks)))
        .collect();
    Base {
        index: m.chunks,
        packs: m.packs,
        memory,
    }
}

/// What a generation writer leaves for the next one in the same process, which then starts
/// from it instead of reading the newest generation's manifest and building the map of its
/// blobs again (for 1 GiB of memory: 7 MB of index to read and check, 262144 random
/// inserts). Taken only while that generation is still the newest and its manifest file
/// unchanged.
#[derive(Debug)]
pub struct Carried {
    generation: u32,
    manifest: Option<FileIdentity>,
    base: Base,
    known: KnownBlobs,
}

/// What a finished writer leaves for the next writer of its job
/// ([`GenerationWriter::finish_carrying`]), before [`ToCarry::carry`] puts it in shape: a
/// pass over every blob and every page run, done once the checkpoint is durable (a
/// supervisor has its helper thread do it while it answers).
#[derive(Debug)]
pub struct ToCarry {
    generation: u32,
    manifest_file: Option<FileIdentity>,
    manifest: Manifest,
    known: (KnownBlobs, Vec<u32>),
}

impl ToCarry {
    /// Raw bytes of the chunks of the generation.
    pub fn raw_bytes(&self) -> u64 {
        self.manifest.chunks.raw_bytes()
    }

    /// What [`GenerationWriter::begin_after`] takes.
    pub fn carry(self) -> Carried {
        let manifest = self.manifest;
        Carried {
            generation: self.generation,
            manifest: self.manifest_file,
            base: Base {
                memory: manifest
                    .processes
                    .iter()
                    .map(|p| (p.pid, base_memory(p, &manifest.chunks)))
                    .collect(),
                index: manifest.chunks,
                packs: manifest.packs,
            },
            known: Written::known_as_base(self.known.0, &self.known.1),
        }
    }
}

/// Which file, and which version of it, by its metadata.
#[derive(Debug, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl FileIdentity {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(path).ok()?;
        Some(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
        })
    }
}

impl Carried {
    /// The base and its blobs, if this is still the newest generation of `job_dir`.
    fn take_if_newest(self, job_dir: &Path) -> Option<(Base, KnownBlobs)> {
        let newest = *list_generations(job_dir).last()?;
        let dir = generation_dir(job_dir, newest);
        let packs = job_dir.join(PACKS_DIR);
        (newest == self.generation
            && self.manifest.is_some()
            && FileIdentity::of(&dir.join(MANIFEST_FILE)) == self.manifest
            && self.base.packs.iter().all(|p| packs.join(p).is_file()))
        .then_some((self.base, self.known))
    }
}

/// Puts the content address of each blob of `index` in place, from the trailers of the
/// packs its frames lie in (`packs`, in the order the manifest names them).
fn attach_hashes(index: &mut ChunkIndex, packs: &mut [PackReader]) -> ImageResult<()> {
    let mut wanted = vec![false; packs.len()];
    for f in &index.frames {
        if let Some(w) = wanted.get_mut(f.pack as usize) {
            *w = true;
        }
    }
    for (pack, wanted) in packs.iter_mut().zip(wanted) {
        if wanted {
            pack.hashes()?;
        }
    }
    let attached = index.attach_hashes(|f| {
        packs
            .get(f.pack as usize)?
            .hashes_read()?
            .of_frame(f.offset)
    });
    for pack in packs.iter_mut() {
        pack.forget_hashes();
    }
    attached.map_err(|blob| {
        let frame = index
            .blobs
            .get(blob)
            .and_then(|b| index.frames.get(b.frame as usize));
        let pack = frame.and_then(|f| packs.get(f.pack as usize));
        ImageError::Corrupt {
            path: pack.map_or_else(PathBuf::new, |p| p.path().to_owned()),
            offset: frame.map_or(0, |f| f.offset),
            what: format!(
                "blob {blob} of the index: its frame's trailer lists no content address for it"
            ),
        }
    })
}

/// Where `index` keeps the private anonymous pages of process `p`.
fn base_memory(p: &ProcessImage, index: &ChunkIndex) -> BaseMemory {
    let mut runs: Vec<(u64, u64, u32)> = p
        .vmas
        .iter()
        .filter(|v| !v.shared && matches!(v.kind, VmaKind::Anon | VmaKind::Heap | VmaKind::Stack))
        .flat_map(|v| &v.pages)
        .filter_map(|r| {
            let first = *index.starts.get(r.chunk as usize)?;
            Some((r.addr, r.addr + index.chunk_len(r.chunk), first))
        })
        .collect();
    runs.sort_unstable();
    BaseMemory { runs }
}

/// A generation being written. Dropping it without [`GenerationWriter::finish`] removes it.
#[derive(Debug)]
pub struct GenerationWriter {
    job_dir: PathBuf,
    tmp: PathBuf,
    pack: Option<PackWriter>,
    pack_path: PathBuf,
    done: bool,
    /// Once [`GenerationWriter::prepare`] wrote the manifest: the generation number it
    /// took, and the blobs known.
    prepared: Option<(u32, (KnownBlobs, Vec<u32>))>,
    /// Held shared until the generation is in place: no garbage collection meanwhile.
    _lock: fs::File,
}

impl GenerationWriter {
    /// Starts a generation in `job_dir` (created 0700 if missing) that shares unchanged
    /// data with the newest generation already there.
    pub fn begin(job_dir: &Path, compression: Compression) -> ImageResult<Self> {
        Self::begin_with(job_dir, compression, true)
    }

    /// Starts a generation; `incremental: false` writes every chunk anew instead of sharing
    /// data with the newest generation.
    pub fn begin_with(
        job_dir: &Path,
        compression: Compression,
        incremental: bool,
    ) -> ImageResult<Self> {
        Self::start(job_dir, compression, incremental, None)
    }

    /// Like [`GenerationWriter::begin`], starting from what the writer of the newest
    /// generation left ([`GenerationWriter::finish_carrying`]) when it still is the newest.
    pub fn begin_after(
        job_dir: &Path,
        compression: Compression,
        carried: Option<Carried>,
    ) -> ImageResult<Self> {
        Self::start(job_dir, compression, true, carried)
    }

    fn start(
        job_dir: &Path,
        compression: Compression,
        incremental: bool,
        carried: Option<Carried>,
    ) -> ImageResult<Self> {
        create_private_dir(job_dir)?;
        fs::set_permissions(job_dir, fs::Permissions::from_mode(0o700)).map_err(io(job_dir))?;
        let packs = job_dir.join(PACKS_DIR);
        create_private_dir(&packs)?;
        let lock = lock_file(job_dir)?;
        // Sweep what crashed writers and removals left, if nobody else is writing (reading
        // every generation's manifest only when there is such a leftover: removals sweep
        // after themselves); then hold the lock shared for the whole write.
        if lock.try_lock().is_ok() && remove_stale_temporaries(job_dir) {
            let _ = sweep_packs(job_dir);
        }
        lock.lock_shared().map_err(io(packs.join(LOCK_FILE)))?;
        let (base, known) = match carried.and_then(|c| c.take_if_newest(job_dir)) {
            Some((base, known)) if incremental => (base, Some(known)),
            _ if incremental => (newest_base(job_dir), None),
            _ => (Base::default(), None),
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let stamp = format!("{}-{nanos}", std::process::id());
        let tmp = job_dir.join(format!(".tmp-gen-{stamp}"));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(io(&tmp))?;
        let pack_path = packs.join(format!("pack-{stamp}.pack"));
        let mut w = GenerationWriter {
            job_dir: job_dir.to_owned(),
            tmp,
            pack: None,
            pack_path,
            done: false,
            prepared: None,
            _lock: lock,
        };
        w.pack = Some(PackWriter::create_with(
            &w.pack_path,
            compression,
            base,
            known,
        )?);
        Ok(w)
    }

    /// The page pack being written.
    pub fn pack(&mut self) -> &mut PackWriter {
        self.pack.as_mut().expect("pack is present until finish")
    }

    /// The temporary directory (for tests and fault injection).
    pub fn temp_dir(&self) -> &Path {
        &self.tmp
    }

    /// Writes the manifest, syncs everything and renames the generation into place. The
    /// generation number is chosen here and stored in `manifest.job.generation`.
    pub fn finish(self, manifest: &mut Manifest) -> ImageResult<(u32, PathBuf)> {
        self.publish(manifest).map(|(n, dir, _)| (n, dir))
    }

    /// [`GenerationWriter::finish`], also returning what the next writer of this job can
    /// start from ([`GenerationWriter::begin_after`]), once put in shape ([`ToCarry::carry`]).
    pub fn finish_carrying(self, mut manifest: Manifest) -> ImageResult<(u32, PathBuf, ToCarry)> {
        let (n, dest, known) = self.publish(&mut manifest)?;
        let to_carry = ToCarry {
            generation: n,
            manifest_file: FileIdentity::of(&dest.join(MANIFEST_FILE)),
            manifest,
            known,
        };
        Ok((n, dest, to_carry))
    }

    /// Finishes the pack and writes `manifest` (filling in its chunk index, packs and
    /// generation number), synced, without putting the generation in place yet: the caller
    /// may still decide not to keep it (dropping the writer removes it), and
    /// [`GenerationWriter::finish`] or [`GenerationWriter::finish_carrying`], given this
    /// manifest, then only renames it into place. The pack is no longer written to.
    pub fn prepare(&mut self, manifest: &mut Manifest) -> ImageResult<()> {
        let written = self
            .pack
            .take()
            .expect("pack is present until finish")
            .finish()?;
        let (index, packs, known) = written.into_parts();
        manifest.chunks = index;
        manifest.packs = packs;
        sync_dir(&self.job_dir.join(PACKS_DIR))?;
        let n = self.write_numbered(manifest)?;
        self.prepared = Some((n, known));
        Ok(())
    }

    /// Bytes this generation adds to the disk: its pack (page data and trailer) and its
    /// manifest, once [`GenerationWriter::prepare`] wrote them (before: what exists so far).
    pub fn written_bytes(&self) -> u64 {
        let len = |p: &Path| fs::metadata(p).map_or(0, |m| m.len());
        len(&self.pack_path) + len(&self.tmp.join(MANIFEST_FILE))
    }

    /// Writes `manifest` into the temporary directory as the generation after the newest
    /// one there is, synced; returns that number.
    fn write_numbered(&self, manifest: &mut Manifest) -> ImageResult<u32> {
        let n = list_generations(&self.job_dir).last().map_or(1, |g| g + 1);
        manifest.job.generation = n;
        write_manifest(&self.tmp.join(MANIFEST_FILE), manifest)?;
        sync_dir(&self.tmp)?;
        crate::fault::point("manifest-written");
        Ok(n)
    }

    /// Writes the manifest (unless [`GenerationWriter::prepare`] did) and renames the
    /// generation into place (see [`GenerationWriter::finish`]); returns its number and
    /// directory, and the blobs known.
    fn publish(
        mut self,
        manifest: &mut Manifest,
    ) -> ImageResult<(u32, PathBuf, (KnownBlobs, Vec<u32>))> {
        if self.prepared.is_none() {
            self.prepare(manifest)?;
        }
        let (mut n, known) = self.prepared.take().expect("prepared just above");
        loop {
            let dest = generation_dir(&self.job_dir, n);
            match fs::rename(&self.tmp, &dest) {
                Ok(()) => {
                    self.done = true;
                    crate::fault::point("renamed");
                    sync_dir(&self.job_dir)?;
                    return Ok((n, dest, known));
                }
                // Another writer took the number meanwhile: the next one.
                Err(e) if matches!(e.raw_os_error(), Some(libc_enotempty) if libc_enotempty == 39 || libc_enotempty == 17) =>
                {
                    fs::remove_file(self.tmp.join(MANIFEST_FILE)).map_err(io(&self.tmp))?;
                    n = self.write_numbered(manifest)?;
                }
                Err(e) => {
                    return Err(ImageError::Io {
                        path: dest,
                        source: e,
                    });
                }
            }
        }
    }
}

impl Drop for GenerationWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.tmp);
            let _ = fs::remove_file(&self.pack_path);
        }
    }
}

/// Deletes the pack files of `job_dir` that no generation references, if no writer holds
/// the job's lock (else nothing: the next removal or checkpoint tries again). Returns the
/// packs deleted. Nothing is deleted when any generation's manifest cannot be read, since
/// what it references is then unknown.
pub fn collect_garbage(job_dir: &Path) -> ImageResult<Vec<String>> {
    if !job_dir.join(PACKS_DIR).is_dir() {
        return Ok(Vec::new());
    }
    let lock = lock_file(job_dir)?;
    if lock.try_lock().is_err() {
        return Ok(Vec::new());
    }
    sweep_packs(job_dir)
}

/// The sweep of [`collect_garbage`]; the caller holds the lock exclusively.
fn sweep_packs(job_dir: &Path) -> ImageResult<Vec<String>> {
    let mut live = std::collections::HashSet::new();
    for n in list_generations(job_dir) {
        match read_manifest(&generation_dir(job_dir, n).join(MANIFEST_FILE)) {
            Ok(m) => live.extend(m.packs),
            // What a damaged generation references is unknown: keep every pack.
            Err(_) => return Ok(Vec::new()),
        }
    }
    let packs = job_dir.join(PACKS_DIR);
    let mut removed = Vec::new();
    for entry in fs::read_dir(&packs).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_pack_name(&name) && !live.contains(&name) {
            fs::remove_file(entry.path()).map_err(io(entry.path()))?;
            removed.push(name);
        }
    }
    if !removed.is_empty() {
        sync_dir(&packs)?;
    }
    Ok(removed)
}

/// Removes what dead writers and removers left in `job_dir`; whether there was anything
/// (then their packs may be unreferenced too).
fn remove_stale_temporaries(job_dir: &Path) -> bool {
    let mut found = false;
    for entry in fs::read_dir(job_dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(".tmp-gen-")) else {
            continue;
        };
        let pid: Option<u32> = rest.split('-').next().and_then(|p| p.parse().ok());
        if !writer_alive(pid) {
            found = true;
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    found | remove_dead_leftovers(job_dir)
}

/// Whether `pid` names another process that is still alive (it may still be writing or
/// removing what it named after itself).
fn writer_alive(pid: Option<u32>) -> bool {
    pid.is_some_and(|p| p != std::process::id() && Path::new(&format!("/proc/{p}")).exists())
}

/// Prefix of a directory being removed: a generation (`.rm-gen-NNNN-PID-NANOS`, in the job
/// directory) or a whole job (`.rm-NAME-PID-NANOS`, in the images root). Such names are never
/// read as generations or jobs.
pub const REMOVING_PREFIX: &str = ".rm-";

fn hidden_name(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{REMOVING_PREFIX}{what}-{}-{nanos}", std::process::id())
}

/// Deletes what interrupted removals left in `dir` (entries named `.rm-…-PID-NANOS` whose
/// remover is gone). Errors are ignored: the next call tries again.
pub fn remove_leftovers(dir: &Path) {
    remove_dead_leftovers(dir);
}

/// [`remove_leftovers`]; whether there was anything to remove.
fn remove_dead_leftovers(dir: &Path) -> bool {
    let mut found = false;
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(REMOVING_PREFIX)) else {
            continue;
        };
        let pid: Option<u32> = rest.rsplit('-').nth(1).and_then(|p| p.parse().ok());
        if !writer_alive(pid) {
            found = true;
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    found
}

/// Moves `dir` out of sight (renamed to `hidden` in the same parent, which is then synced),
/// then deletes it. A crash in between leaves only a hidden leftover that
/// [`remove_leftovers`] deletes later; nothing is ever half-visible.
fn remove_hidden(dir: &Path, hidden: &Path) -> ImageResult<()> {
    fs::rename(dir, hidden).map_err(io(dir))?;
    if let Some(parent) = hidden.parent() {
        sync_dir(parent)?;
    }
    crate::fault::point("rm-renamed");
    match fs::remove_dir_all(hidden) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ImageError::Io {
            path: hidden.to_owned(),
            source: e,
        }),
    }
}

/// Removes generation `n` of `job_dir`, crash-safely: it is first renamed to a hidden
/// `.rm-gen-NNNN-…` name (so it is no longer a generation), then deleted. Leftovers of
/// earlier interrupted removals are deleted too.
pub fn remove_generation(job_dir: &Path, n: u32) -> ImageResult<()> {
    remove_leftovers(job_dir);
    let dir = generation_dir(job_dir, n);
    if !dir.is_dir() {
        return Err(ImageError::NoGeneration {
            path: dir,
            detail: format!(
                "generation {n} not found; present: {:?}",
                list_generations(job_dir)
            ),
        });
    }
    remove_hidden(&dir, &job_dir.join(hidden_name(&format!("gen-{n:04}"))))?;
    crate::fault::point("rm-removed");
    collect_garbage(job_dir)?;
    Ok(())
}

/// Removes a job's whole image directory (every generation and its output log),
/// crash-safely: it is first renamed to a hidden `.rm-NAME-…` name beside it, then deleted.
pub fn remove_job_dir(job_dir: &Path) -> ImageResult<()> {
    let (Some(parent), Some(name)) = (job_dir.parent(), job_dir.file_name()) else {
        return Err(ImageError::NoGeneration {
            path: job_dir.to_owned(),
            detail: "not a job directory".into(),
        });
    };
    remove_leftovers(parent);
    if !job_dir.is_dir() {
        return Err(ImageError::NoGeneration {
            path: job_dir.to_owned(),
            detail: "no such job directory".into(),
        });
    }
    remove_hidden(job_dir, &parent.join(hidden_name(&name.to_string_lossy())))
}

/// Keeps the newest `keep` generations of `job_dir` (at least one: the newest is never
/// removed) and removes the older ones, oldest first, with [`remove_generation`]. Returns the
/// numbers removed.
pub fn prune_generations(job_dir: &Path, keep: u32) -> ImageResult<Vec<u32>> {
    let gens = list_generations(job_dir);
    let excess = gens.len().saturating_sub(keep.max(1) as usize);
    let mut removed = Vec::with_capacity(excess);
    for &n in &gens[..excess] {
        match remove_generation(job_dir, n) {
            Ok(()) => removed.push(n),
            // Someone else removed it meanwhile: it is gone all the same.
            Err(ImageError::NoGeneration { .. }) => {}
            Err(ImageError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            }
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// Bytes a generation added to the disk: its manifest and the pack it wrote (data it shares
/// with older generations is not counted). 0 for what cannot be read.
pub fn generation_size(dir: &Path) -> u64 {
    let manifest = dir.join(MANIFEST_FILE);
    let own = read_manifest(&manifest)
        .ok()
        .and_then(|m| m.packs.first().cloned())
        .and_then(|p| {
            let packs = dir.parent()?.join(PACKS_DIR);
            fs::metadata(packs.join(p)).ok()
        })
        .map_or(0, |m| m.len());
    own + fs::metadata(&manifest).map_or(0, |m| m.len())
}

fn sync_dir(dir: &Path) -> ImageResult<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Writes a manifest file (replacing one at `path`): header (magic, version, crc32c of the
/// body, body length), JSON body, then the binary chunk index.
pub fn write_manifest(path: &Path, manifest: &Manifest) -> ImageResult<()> {
    let body = serde_json::to_vec(manifest).map_err(|e| ImageError::InvalidManifest {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let mut out = Vec::with_capacity(body.len() + MANIFEST_HEADER);
    out.extend_from_slice(MANIFEST_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    manifest.chunks.encode_into(&mut out);
    // Through the page cache: the index lists runs of blobs, not every page (0.5 MB at
    // 1 GiB after 1% changed), and writing it around the cache as a pack is written (a
    // direct write tried first, then cut off; blocks set up) took longer than the copy.
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(path)(e)),
        _ => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    std::io::Write::write_all(&mut f, &out).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Reads and checks a manifest file.
pub fn read_manifest(path: &Path) -> ImageResult<Manifest> {
    let f = fs::File::open(path).map_err(io(path))?;
    let mut bytes = Vec::new();
    // Never more than the header and the largest body the format allows.
    f.take(MANIFEST_HEADER as u64 + MAX_MANIFEST + MAX_INDEX + 1)
        .read_to_end(&mut bytes)
        .map_err(io(path))?;
    decode_manifest(path, &bytes)
}

/// Decodes and checks a manifest file's bytes (`path` only names it in errors): magic,
/// version, size cap, crc32c, JSON, the chunk index, then [`Manifest::validate`].
pub fn decode_manifest(path: &Path, bytes: &[u8]) -> ImageResult<Manifest> {
    let len = bytes.len() as u64;
    if len < MANIFEST_HEADER as u64 {
        return Err(ImageError::Truncated {
            path: path.to_owned(),
            offset: len,
            expected: MANIFEST_HEADER as u64 - len,
        });
    }
    let header = &bytes[..MANIFEST_HEADER];
    if &header[..8] != MANIFEST_MAGIC {
        return Err(ImageError::BadMagic {
            path: path.to_owned(),
            what: "manifest",
        });
    }
    let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(ImageError::UnsupportedVersion {
            path: path.to_owned(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let crc = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
    let body_len = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
    if body_len > MAX_MANIFEST {
        return Err(ImageError::TooLarge {
            path: path.to_owned(),
            what: "manifest body",
            offset: 16,
            size: body_len,
            limit: MAX_MANIFEST,
        });
    }
    let have = len - MANIFEST_HEADER as u64;
    if have < body_len {
        return Err(ImageError::Truncated {
            path: path.to_owned(),
            offset: len,
            expected: body_len - have,
        });
    }
    let body = &bytes[MANIFEST_HEADER..MANIFEST_HEADER + usize::try_from(body_len).unwrap_or(0)];
    if crc32c::crc32c(body) != crc {
        return Err(ImageError::Corrupt {
            path: path.to_owned(),
            offset: MANIFEST_HEADER as u64,
            what: "manifest crc32c".into(),
        });
    }
    let mut manifest: Manifest =
        serde_json::from_slice(body).map_err(|e| ImageError::InvalidManifest {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    let index_at = MANIFEST_HEADER as u64 + body_len;
    let index = &bytes[index_at as usize..];
    if index.len() as u64 > MAX_INDEX {
        return Err(ImageError::TooLarge {
            path: path.to_owned(),
            what: "chunk index",
            offset: index_at,
            size: index.len() as u64,
            limit: MAX_INDEX,
        });
    }
    if index.len() < INDEX_HEADER {
        return Err(ImageError::Truncated {
            path: path.to_owned(),
            offset: len,
            expected: (INDEX_HEADER - index.len()) as u64,
        });
    }
    manifest.chunks = ChunkIndex::decode(index, manifest.packs.len()).map_err(|(at, what)| {
        if what.contains("crc32c") {
            ImageError::Corrupt {
                path: path.to_owned(),
                offset: index_at + at,
                what,
            }
        } else {
            ImageError::InvalidManifest {
                path: path.to_owned(),
                message: format!("{what} (at offset {})", index_at + at),
            }
        }
    })?;
    manifest
        .validate()
        .map_err(|message| ImageError::InvalidManifest {
            path: path.to_owned(),
            message,
        })?;
    Ok(manifest)
}

/// A generation opened for reading.
#[derive(Debug)]
pub struct OpenGeneration {
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest, checked.
    pub manifest: Manifest,
    /// The packs it references, in the order of `manifest.packs`.
    pub packs: Vec<PackReader>,
    /// Frames read last, most recent first: a chunk's blobs mostly lie in one frame.
    cache: Vec<(u32, FrameBytes)>,
    /// Frames asked for by [`OpenGeneration::read_ahead`].
    reads: FrameReads,
}

/// Frames kept decompressed while reading chunks.
const FRAME_CACHE: usize = 4;

impl OpenGeneration {
    /// Opens the generation in `dir`, checking the manifest and the headers of every pack
    /// it references.
    pub fn open(dir: &Path) -> ImageResult<Self> {
        if !dir.is_dir() {
            return Err(ImageError::NoGeneration {
                path: dir.to_owned(),
                detail: "not a directory".into(),
            });
        }
        let mut manifest = read_manifest(&dir.join(MANIFEST_FILE))?;
        let packs_dir = dir
            .parent()
            .map_or_else(|| PathBuf::from(PACKS_DIR), |p| p.join(PACKS_DIR));
        let mut packs = manifest
            .packs
            .iter()
            .map(|p| PackReader::open(&packs_dir.join(p)))
            .collect::<ImageResult<Vec<_>>>()?;
        attach_hashes(&mut manifest.chunks, &mut packs)?;
        Ok(OpenGeneration {
            dir: dir.to_owned(),
            manifest,
            packs,
            cache: Vec::new(),
            reads: FrameReads::default(),
        })
    }

    /// The raw bytes of frame `f`: from the cache, as read ahead, or from its pack (into
    /// the memory of the frame it evicts).
    fn frame(&mut self, f: u32) -> ImageResult<&[u8]> {
        if let Some(at) = self.cache.iter().position(|(i, _)| *i == f) {
            let hit = self.cache.remove(at);
            self.cache.insert(0, hit);
        } else {
            let frame: Frame = self.manifest.chunks.frames[f as usize];
            let mut spare = Vec::new();
            if self.cache.len() >= FRAME_CACHE {
                match self.cache.pop() {
                    Some((_, FrameBytes::Owned(v))) => spare = v,
                    Some((_, FrameBytes::Read { buf, .. })) => self.reads.recycle(buf),
                    None => {}
                }
            }
            let frames = &self.manifest.chunks.frames;
            let bytes = match self.reads.take(f, frames, &mut self.packs, &mut spare)? {
                Some(bytes) => bytes,
                None => {
                    self.packs[frame.pack as usize].read_frame_into(&frame, &mut spare)?;
                    FrameBytes::Owned(spare)
                }
            };
            self.cache.insert(0, (f, bytes));
        }
        Ok(self.cache[0].1.bytes())
    }

    /// How many frames were read directly, ahead of their use ([`OpenGeneration::read_ahead`]
    /// where the filesystem takes direct reads).
    pub fn frames_read_ahead(&self) -> u64 {
        self.reads.taken()
    }

    /// Whether frame `f` is at hand: cached, or being read ahead.
    fn holds(&self, f: u32) -> bool {
        self.cache.iter().any(|(i, _)| *i == f) || self.reads.reading(f)
    }

    /// Reads chunk `index`, every blob checked against its content address.
    pub fn chunk(&mut self, index: u32) -> ImageResult<Vec<u8>> {
        let mut out = Vec::new();
        self.chunk_into(index, &mut out)?;
        Ok(out)
    }

    /// Calls `use_bytes` with chunk `index`, every blob checked against its content
    /// address, copying it as little as it can: a chunk that is one frame is read into
    /// `buf`; one that lies in one frame, blob after blob (as a chunk of unchanged pages
    /// does in an incremental generation), is lent from the frame cache; any other is put
    /// together in `buf`.
    pub fn with_chunk<R>(
        &mut self,
        index: u32,
        buf: &mut Vec<u8>,
        use_bytes: impl FnOnce(&[u8]) -> R,
    ) -> ImageResult<R> {
        let blobs = match self.manifest.chunks.len() > index as usize {
            true => self.manifest.chunks.blobs_of(index),
            false => &[],
        };
        let Some((f, from, len)) = within_frame(blobs).filter(|&(f, _, _)| {
            whole_frame(blobs, &self.manifest.chunks.frames).is_none() || self.holds(f)
        }) else {
            self.chunk_into(index, buf)?;
            return Ok(use_bytes(buf));
        };
        let blobs = blobs.to_vec();
        let raw = self.frame(f)?;
        let bytes = raw.get(from..from + len);
        let damaged = match bytes {
            None => true,
            Some(bytes) => {
                let mut at = 0;
                blobs.iter().any(|b| {
                    let piece = &bytes[at..at + b.len as usize];
                    at += b.len as usize;
                    blob_hash(piece) != b.hash
                })
            }
        };
        match bytes {
            Some(bytes) if !damaged => Ok(use_bytes(bytes)),
            _ => Err(self.damaged_blob(index, f)),
        }
    }

    /// Like [`OpenGeneration::chunk`], into `out` (its old contents replaced, its memory
    /// reused).
    pub fn chunk_into(&mut self, index: u32, out: &mut Vec<u8>) -> ImageResult<()> {
        if index as usize >= self.manifest.chunks.len() {
            return Err(ImageError::InvalidManifest {
                path: self.dir.join(MANIFEST_FILE),
                message: format!("chunk index {index} out of range"),
            });
        }
        let blobs = self.manifest.chunks.blobs_of(index).to_vec();
        if let Some(f) = whole_frame(&blobs, &self.manifest.chunks.frames)
            && !self.holds(f)
        {
            // The chunk is exactly one frame (as a full checkpoint writes them): read into
            // `out` directly, with no copy through the frame cache.
            self.reads
                .forget(f, &self.manifest.chunks.frames, &mut self.packs);
            let frame = self.manifest.chunks.frames[f as usize];
            self.packs[frame.pack as usize].read_frame_into(&frame, out)?;
            let mut at = 0;
            for b in &blobs {
                let piece = &out[at..at + b.len as usize];
                if blob_hash(piece) != b.hash {
                    return Err(self.damaged_blob(index, b.frame));
                }
                at += b.len as usize;
            }
            return Ok(());
        }
        out.clear();
        out.reserve(blobs.iter().map(|b| b.len as usize).sum());
        for b in blobs {
            let raw = self.frame(b.frame)?;
            let piece = raw.get(b.start as usize..(b.start + b.len) as usize);
            match piece {
                Some(piece) if blob_hash(piece) == b.hash => out.extend_from_slice(piece),
                _ => return Err(self.damaged_blob(index, b.frame)),
            }
        }
        Ok(())
    }

    /// The error for a blob of chunk `index` in frame `f` whose bytes do not match its
    /// content address.
    fn damaged_blob(&self, index: u32, f: u32) -> ImageError {
        let frame = self.manifest.chunks.frames[f as usize];
        ImageError::Corrupt {
            path: self.packs[frame.pack as usize].path().to_owned(),
            offset: frame.offset,
            what: format!("blob of chunk {index}: content hash"),
        }
    }

    /// Starts reading chunk `index`'s frames from disk now, after those asked for before,
    /// so that reading them later does not wait for the disk (a hint: a chunk out of range
    /// is ignored). They are read directly into memory of the reader's where the
    /// filesystem allows it ([`crate::readahead`]), else into the page cache.
    pub fn read_ahead(&mut self, index: u32) {
        self.each_frame_not_cached(index, |reads, f, frames, packs| {
            reads.ask(f, frames, packs);
        });
    }

    /// Asks the page cache to start reading those of chunk `index`'s frames that
    /// [`OpenGeneration::read_ahead`] would not read directly (small frames; all where the
    /// filesystem refuses direct reads): those are worth asking for long before their use,
    /// the others only about [`crate::READ_AHEAD`] bytes before.
    pub fn hint_ahead(&mut self, index: u32) {
        self.each_frame_not_cached(index, |reads, f, frames, packs| {
            reads.hint(&frames[f as usize], packs);
        });
    }

    /// Calls `each` with each frame of chunk `index` (once) not in the frame cache.
    fn each_frame_not_cached(
        &mut self,
        index: u32,
        mut each: impl FnMut(&mut FrameReads, u32, &[Frame], &mut [PackReader]),
    ) {
        if index as usize >= self.manifest.chunks.len() {
            return;
        }
        let mut last = None;
        for b in self.manifest.chunks.blobs_of(index) {
            if last != Some(b.frame) {
                last = Some(b.frame);
                if !self.cache.iter().any(|(i, _)| *i == b.frame) {
                    let frames = &self.manifest.chunks.frames;
                    each(&mut self.reads, b.frame, frames, &mut self.packs);
                }
            }
        }
    }
}

/// The frame chunk `blobs` lies in, blob after blob, and where in it (start, length).
fn within_frame(blobs: &[Blob]) -> Option<(u32, usize, usize)> {
    let first = blobs.first()?;
    let mut end = first.start;
    for b in blobs {
        if b.frame != first.frame || b.start != end {
            return None;
        }
        end = end.checked_add(b.len)?;
    }
    Some((
        first.frame,
        first.start as usize,
        (end - first.start) as usize,
    ))
}

/// The frame that chunk `blobs` fills exactly, blob after blob, if there is one.
fn whole_frame(blobs: &[Blob], frames: &[Frame]) -> Option<u32> {
    let f = blobs.first()?.frame;
    let mut at = 0u32;
    for b in blobs {
        if b.frame != f || b.start != at {
            return None;
        }
        at = at.checked_add(b.len)?;
    }
    (frames.get(f as usize)?.raw_len == at).then_some(f)
}
