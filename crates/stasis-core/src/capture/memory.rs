//! Capturing memory: mappings, their saved pages, and shared memory objects.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{FileExt, MetadataExt};

use stasis_image::manifest::{Advice, PageRun, SharedMemory, Vma, VmaKind};
use stasis_image::pack::{PackWriter, Reused};
use stasis_sys::mem;
use stasis_sys::uffd::{self, WrittenRange};

use super::content::{FileContents, Found};
use crate::error::{CoreError, CoreResult, io_err};
use crate::proc::{self, MapEntry};
use crate::tracking::{Cursor, States, Unchanged};

const PAGE: u64 = 4096;
/// Pages per chunk of saved memory (1 MiB).
const RUN_PAGES: usize = 256;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;

/// Classifies a mapping by its `/proc` name; `Err` for mappings Stasis cannot save yet.
pub fn vma_kind(pid: i32, m: &MapEntry) -> CoreResult<VmaKind> {
    let unsupported = |why: &str| CoreError::Unsupported {
        pid,
        what: format!("mapping {:#x}-{:#x} {}", m.start, m.end, m.path),
        why: why.into(),
    };
    Ok(match m.path.as_str() {
        "" => VmaKind::Anon,
        "[heap]" => VmaKind::Heap,
        "[stack]" => VmaKind::Stack,
        "[vdso]" => VmaKind::Vdso,
        "[vvar]" => VmaKind::Vvar,
        "[vvar_vclock]" => VmaKind::VvarVclock,
        "[vsyscall]" => VmaKind::Vsyscall,
        p if p.starts_with("[anon:") => VmaKind::Anon,
        p if p.starts_with("/SYSV") && m.shared => VmaKind::SysvShm,
        p if m.shared && (p.starts_with("[anon_shmem:") || p.ends_with(" (deleted)")) => {
            VmaKind::Shmem
        }
        p if p.ends_with(" (deleted)") => {
            return Err(unsupported(
                "a private mapping of a deleted file cannot be restored (its unmodified pages are gone with the file)",
            ));
        }
        p if p.starts_with('/') && m.inode != 0 => VmaKind::File,
        _ => {
            return Err(unsupported(
                "special mappings of this kind are not supported",
            ));
        }
    })
}

/// Reads memory, falling back to `/proc/PID/mem` for ranges `process_vm_readv` refuses
/// (e.g. `PROT_NONE` pages that hold data).
fn read_memory(pid: i32, addr: u64, buf: &mut [u8]) -> CoreResult<()> {
    if mem::read(pid, addr, buf).is_ok_and(|n| n == buf.len()) {
        return Ok(());
    }
    let path = format!("/proc/{pid}/mem");
    let f = std::fs::File::open(&path).map_err(io_err(&path))?;
    f.read_exact_at(buf, addr)
        .map_err(io_err(format!("{path} at {addr:#x}")))
}

/// Where pages are read from.
#[derive(Debug, Clone, Copy)]
pub(super) enum Source<'a> {
    /// The (frozen) process itself, through `process_vm_readv`.
    Live,
    /// Its copy-on-write snapshot, through this `/proc/PID/mem` (see [`super::snapshot`]).
    Mem(&'a std::fs::File),
    /// Pages copied out of it while it was frozen: exactly those to read.
    Copied(&'a CopiedPages),
}

/// Private pages copied out of a frozen process, stored once it runs again: a copy takes a
/// fraction of the time storing takes (hashing, compressing, writing).
#[derive(Debug, Default)]
pub struct CopiedPages {
    /// (address, length, offset in `data`): sorted by address, disjoint.
    runs: Vec<(u64, u64, usize)>,
    data: Vec<u8>,
}

impl CopiedPages {
    fn run_at(&self, addr: u64) -> Option<&(u64, u64, usize)> {
        let i = self.runs.partition_point(|r| r.0 + r.1 <= addr);
        self.runs.get(i).filter(|r| r.0 <= addr)
    }

    /// Whether the page at `addr` was copied.
    fn contains(&self, addr: u64) -> bool {
        self.run_at(addr).is_some()
    }

    /// The copied bytes `[addr, addr + len)` when they were copied as part of one run.
    fn slice(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let &(start, run_len, off) = self.run_at(addr)?;
        let from = off + usize::try_from(addr - start).ok()?;
        (addr + len as u64 <= start + run_len).then(|| self.data.get(from..from + len))?
    }

    /// Fills `out` with the copied bytes from `addr` on (every page of it copied).
    fn read(&self, mut addr: u64, out: &mut [u8]) -> CoreResult<()> {
        let mut done = 0;
        while done < out.len() {
            let &(start, len, off) = self.run_at(addr).ok_or_else(|| {
                CoreError::Incompatible(format!("page {addr:#x} was not copied at the cut"))
            })?;
            let from = off + (addr - start) as usize;
            let n = ((start + len - addr) as usize).min(out.len() - done);
            out[done..done + n].copy_from_slice(&self.data[from..from + n]);
            done += n;
            addr += n as u64;
        }
        Ok(())
    }

    /// Copies the `runs` (address, length; sorted, disjoint) of frozen process `pid`: with
    /// one system call per 1024 runs (an incremental checkpoint's runs are often single
    /// pages), falling back to reading a run on its own where that fails.
    pub(super) fn gather(pid: i32, runs: &[(u64, usize)]) -> CoreResult<CopiedPages> {
        let total: usize = runs.iter().map(|r| r.1).sum();
        let mut data = super::spare::buffer(total);
        let got = mem::read_gather(pid, runs, &mut data).unwrap_or(0);
        let mut copied = Vec::with_capacity(runs.len());
        let mut off = 0;
        for &(addr, len) in runs {
            if off + len > got {
                read_memory(pid, addr, &mut data[off..off + len])?;
            }
            copied.push((addr, len as u64, off));
            off += len;
        }
        Ok(CopiedPages { runs: copied, data })
    }

    /// Bytes copied.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether nothing was copied.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

impl Drop for CopiedPages {
    fn drop(&mut self) {
        super::spare::give_back(std::mem::take(&mut self.data));
    }
}

/// What [`walk_pages`] calls for each stretch of pages known unchanged: (first address,
/// the base blob of the first page, the others' following one per page, or `None` for
/// zero pages; pages).
type KnownPages<'a> = dyn FnMut(u64, Option<u32>, usize) -> CoreResult<()> + 'a;

/// Walks the pages of mapping `m` of process `pid` in address order: `known`, if given, gets
/// each stretch of pages `unchanged` knows ([`KnownPages`]; without it, they are skipped), `run` each run of at most
/// [`RUN_PAGES`] consecutive pages to read — pages not known whose pagemap entry (from
/// `source`) is `wanted` and that `skip` does not leave out (by `base` address).
#[allow(clippy::too_many_arguments)]
fn walk_pages(
    pid: i32,
    m: &MapEntry,
    wanted: impl Fn(u64) -> bool,
    base: impl Fn(u64) -> u64,
    skip: impl Fn(u64) -> bool,
    source: Source<'_>,
    unchanged: &Unchanged,
    mut known: Option<&mut KnownPages<'_>>,
    mut run: impl FnMut(u64, usize) -> CoreResult<()>,
) -> CoreResult<()> {
    let pages = usize::try_from((m.end - m.start) / PAGE).unwrap_or(0);
    let mut pagemap = PagemapWindow::new(pid, m.start);
    // Private anonymous memory: pagemap's `PM_FILE` never matters there, so long stretches
    // are looked at by a scan that skips what has no page tables.
    let scannable = m.inode == 0 && !m.shared && !matches!(source, Source::Copied(_));
    let addr_of = |i: usize| m.start + i as u64 * PAGE;
    // What the written pages held at the cut, as its scan saw them: the frozen process
    // itself is read (not a snapshot of it), so pagemap would tell the same.
    let mut states = matches!(source, Source::Live).then(|| unchanged.states(m.start));
    let mut unchanged = unchanged.cursor(m.start);
    let mut i = 0;
    // Where the stretch of pages to read (not known unchanged) that page `i` is in ends:
    // pagemap is read no further.
    let mut stop = 0;
    let page_of =
        |addr: u64| usize::try_from((addr.max(m.start) - m.start) / PAGE).unwrap_or(pages);
    let entry = |pagemap: &mut PagemapWindow,
                 states: &mut Option<States<'_>>,
                 i: usize,
                 stop: usize|
     -> CoreResult<u64> {
        if let Some(state) = states.as_mut().and_then(|s| s.at(addr_of(i))) {
            return Ok(state_entry(&state));
        }
        match source {
            Source::Copied(c) => Ok(if c.contains(addr_of(i)) {
                PM_PRESENT
            } else {
                0
            }),
            _ => pagemap.entry(i, stop),
        }
    };
    while i < pages {
        if let Some(blob) = unchanged.at(addr_of(i)) {
            match known.as_mut() {
                Some(known) => {
                    let end = page_of(unchanged.known_run_until(addr_of(i))).clamp(i + 1, pages);
                    known(addr_of(i), blob, end - i)?;
                    i = end;
                }
                None => i = page_of(unchanged.known_until(addr_of(i))).max(i + 1),
            }
            continue;
        }
        let next_stop = |u: &Cursor<'_>, i: usize, stop: &mut usize| {
            if i >= *stop {
                *stop = page_of(u.read_until(addr_of(i))).clamp(i + 1, pages);
            }
        };
        next_stop(&unchanged, i, &mut stop);
        // Written pages the cut found not there (never touched, or dropped): none to read.
        if let Some(absent) = states
            .as_mut()
            .and_then(|s| s.at(addr_of(i)))
            .filter(|s| !s.present && !s.swapped)
        {
            i = page_of(absent.end).clamp(i + 1, stop);
            continue;
        }
        if scannable {
            let next = pagemap.absent_until(i, stop)?;
            if next > i {
                i = next;
                continue;
            }
        }
        let want = |pagemap: &mut PagemapWindow,
                    states: &mut Option<States<'_>>,
                    i: usize,
                    stop: usize|
         -> CoreResult<bool> {
            Ok(wanted(entry(pagemap, states, i, stop)?) && !skip(base(addr_of(i))))
        };
        if !want(&mut pagemap, &mut states, i, stop)? {
            i += 1;
            continue;
        }
        let start = i;
        i += 1;
        while i < pages && i - start < RUN_PAGES && unchanged.at(addr_of(i)).is_none() {
            next_stop(&unchanged, i, &mut stop);
            if !want(&mut pagemap, &mut states, i, stop)? {
                break;
            }
            i += 1;
        }
        run(addr_of(start), i - start)?;
    }
    Ok(())
}

/// The pagemap entry bits ([`PM_PRESENT`], [`PM_SWAPPED`]) of a page in `state`.
fn state_entry(state: &WrittenRange) -> u64 {
    match (state.present, state.swapped) {
        (true, _) => PM_PRESENT,
        (false, true) => PM_SWAPPED,
        (false, false) => 0,
    }
}

/// Reads `data.len()` bytes at `addr` of process `pid` from `source`.
fn read_from(source: Source<'_>, pid: i32, addr: u64, data: &mut [u8]) -> CoreResult<()> {
    match source {
        Source::Live => read_memory(pid, addr, data),
        Source::Mem(f) => f
            .read_exact_at(data, addr)
            .map_err(io_err(format!("/proc/{pid}/mem at {addr:#x}"))),
        Source::Copied(c) => c.read(addr, data),
    }
}

/// Saves the wanted pages of `[start, end)` (see [`walk_pages`]): pages are read in runs
/// from `source`, zero pages dropped, and each non-zero run stored as a chunk. `base` maps
/// an address to the run's recorded address (the address itself, or an offset in a shared
/// memory object); `skip` leaves out pages already saved (by recorded address). Pages
/// `unchanged` knows are not read: they refer to the base generation's blobs (or, zero
/// there, are left out).
#[allow(clippy::too_many_arguments)]
fn save_pages(
    pid: i32,
    m: &MapEntry,
    wanted: impl Fn(u64) -> bool,
    base: impl Fn(u64) -> u64,
    skip: impl Fn(u64) -> bool,
    pack: &mut PackWriter,
    source: Source<'_>,
    unchanged: &Unchanged,
) -> CoreResult<Vec<PageRun>> {
    let runs = std::cell::RefCell::new(Vec::new());
    let pack = std::cell::RefCell::new(pack);
    let mut reused = ReusedRun::new(unchanged.reused());
    let mut buf = Vec::new();
    walk_pages(
        pid,
        m,
        wanted,
        &base,
        skip,
        source,
        unchanged,
        Some(&mut |addr, blob, pages| match blob {
            Some(blob) => reused.push_run(
                addr,
                blob,
                pages,
                &mut pack.borrow_mut(),
                &mut runs.borrow_mut(),
            ),
            None => Ok(()),
        }),
        |addr, pages| {
            let len = pages * PAGE as usize;
            // Pages copied at the cut are stored from where they lie.
            let copied = match source {
                Source::Copied(c) => c.slice(addr, len),
                _ => None,
            };
            let data: &[u8] = match copied {
                Some(copied) => copied,
                None => {
                    let data = scratch(&mut buf, len);
                    read_from(source, pid, addr, data)?;
                    data
                }
            };
            for_each_nonzero(data, |offset, bytes| {
                let chunk = pack.borrow_mut().add(bytes)?;
                runs.borrow_mut().push(PageRun {
                    addr: base(addr + offset as u64),
                    chunk,
                });
                Ok(())
            })
        },
    )?;
    let mut runs = runs.into_inner();
    reused.flush(pack.into_inner(), &mut runs)?;
    runs.sort_unstable_by_key(|r| r.addr);
    Ok(runs)
}

/// The first `len` bytes of `buf`, grown to hold them: a mapping's read buffer is made as
/// large as its longest run read, when one is. A mapping whose pages are all known or
/// copied needs none: zeroing 1 MiB for each took 23% of the CPU time of checkpoints of a
/// process with 20,000 small mappings.
fn scratch(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    &mut buf[..len]
}

/// Calls `f` with (offset, bytes) for each stretch of whole pages of `data` that are not
/// all zero: zero pages are never stored.
fn for_each_nonzero(
    data: &[u8],
    mut f: impl FnMut(usize, &[u8]) -> CoreResult<()>,
) -> CoreResult<()> {
    let page = PAGE as usize;
    let zero = |p: usize| is_zero(&data[p * page..(p + 1) * page]);
    let pages = data.len() / page;
    let mut p = 0;
    while p < pages {
        if zero(p) {
            p += 1;
            continue;
        }
        let s = p;
        while p < pages && !zero(p) {
            p += 1;
        }
        f(s * page, &data[s * page..p * page])?;
    }
    Ok(())
}

/// Whether `bytes` are all zero: 128 bytes at a time (which the compiler turns into a few
/// vector instructions), stopping at the first block that is not. Checking byte after
/// byte was 15% of a 64 MiB checkpoint's profile.
fn is_zero(bytes: &[u8]) -> bool {
    let blocks = bytes.chunks_exact(128);
    let rest = blocks.remainder();
    blocks
        .into_iter()
        .all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0)
        && rest.iter().all(|&x| x == 0)
}

/// Pre-copy: stores the private pages present (or swapped out) in mapping `m` of process
/// `pid`, which runs, as staged blobs of `pack` ([`PackWriter::stage`]); returns where
/// they lie, as runs (first address, end address, first staged blob). Zero pages are left
/// out: a run's pages are its blobs, one each, in order. The caller protected the pages
/// against writes first, so that a page written while (or after) being read here shows as
/// written at the cut.
pub(super) fn stage_pages(
    pid: i32,
    m: &MapEntry,
    pack: &mut PackWriter,
) -> CoreResult<Vec<(u64, u64, u32)>> {
    let mut staged = Vec::new();
    let mut buf = Vec::new();
    walk_pages(
        pid,
        m,
        private_wanted(VmaKind::Anon),
        |a| a,
        |_| false,
        Source::Live,
        &Unchanged::default(),
        None,
        |addr, pages| {
            let data = scratch(&mut buf, pages * PAGE as usize);
            read_memory(pid, addr, data)?;
            for_each_nonzero(data, |offset, bytes| {
                let start = addr + offset as u64;
                staged.push((start, start + bytes.len() as u64, pack.stage(bytes)?));
                Ok(())
            })
        },
    )?;
    Ok(staged)
}

/// `/proc/PID/pagemap` of one mapping, read a window at a time as the pages are visited:
/// stretches that write tracking knows unchanged are never walked.
struct PagemapWindow {
    pid: i32,
    /// Opened at the first entry asked for.
    pagemap: Option<proc::Pagemap>,
    start: u64,
    first: usize,
    entries: Vec<u64>,
    /// Pages `[scanned.0, scanned.1)` were scanned ([`PagemapWindow::absent_until`]); the
    /// runs of those that exist, by page index (first, end, present).
    scanned: (usize, usize),
    existing: Vec<(usize, usize, bool)>,
    /// The kernel has no `PAGEMAP_SCAN`.
    no_scan: bool,
}

impl PagemapWindow {
    const PAGES: usize = 4096;

    /// A stretch at least this long (16 MiB, a window) is scanned rather than read entry by
    /// entry: pagemap has an entry for every page, there or not, where a scan skips what
    /// has no page tables (a reservation of 64 GiB with a page in every 64 MiB took 135 ms
    /// to read from a snapshot, and a second before tracking left it alone).
    const SCAN_FROM: usize = Self::PAGES;

    fn new(pid: i32, start: u64) -> Self {
        PagemapWindow {
            pid,
            pagemap: None,
            start,
            first: 0,
            entries: Vec::new(),
            scanned: (0, 0),
            existing: Vec::new(),
            no_scan: false,
        }
    }

    /// For private anonymous memory: the first page from `i` on, before `stop`, that may
    /// exist (`stop` when none does); `i` itself when that is not known. Stretches of at
    /// least [`PagemapWindow::SCAN_FROM`] pages are scanned for the pages they have.
    fn absent_until(&mut self, i: usize, stop: usize) -> CoreResult<usize> {
        if !(self.scanned.0..self.scanned.1).contains(&i) {
            if self.no_scan || stop - i < Self::SCAN_FROM {
                return Ok(i);
            }
            let (pid, start) = (self.pid, self.start);
            let addr = |page: usize| start + page as u64 * PAGE;
            let page = |addr: u64| usize::try_from((addr - start) / PAGE).unwrap_or(stop);
            let pagemap = self.pagemap()?;
            match uffd::existing_ranges(pagemap.file(), pid, addr(i), addr(stop)) {
                Ok(found) => {
                    self.existing = found
                        .iter()
                        .map(|e| (page(e.start), page(e.end), e.present))
                        .collect();
                    self.scanned = (i, stop);
                }
                Err(_) => {
                    self.no_scan = true;
                    return Ok(i);
                }
            }
        }
        let next = self.existing_from(i).map_or(self.scanned.1, |r| r.0);
        Ok(next.clamp(i, stop))
    }

    /// The first run of scanned pages that exist ending after page `i`.
    fn existing_from(&self, i: usize) -> Option<&(usize, usize, bool)> {
        self.existing
            .get(self.existing.partition_point(|r| r.1 <= i))
    }

    /// `/proc/PID/pagemap`, opened at the first use.
    fn pagemap(&mut self) -> CoreResult<&proc::Pagemap> {
        match self.pagemap {
            Some(ref p) => Ok(p),
            None => Ok(self.pagemap.insert(proc::Pagemap::open(self.pid)?)),
        }
    }

    /// The entry of page `i` of the mapping, reading no further than page `stop` (beyond
    /// which pages need not be looked at).
    fn entry(&mut self, i: usize, stop: usize) -> CoreResult<u64> {
        if (self.scanned.0..self.scanned.1).contains(&i) {
            let found = self.existing_from(i).filter(|r| r.0 <= i);
            return Ok(found.map_or(0, |r| if r.2 { PM_PRESENT } else { PM_SWAPPED }));
        }
        if i < self.first || i >= self.first + self.entries.len() {
            let end = (i + Self::PAGES).min(stop).max(i + 1);
            let start = self.start;
            let entries = self
                .pagemap()?
                .entries(start + i as u64 * PAGE, start + end as u64 * PAGE)?;
            self.entries = entries;
            self.first = i;
        }
        Ok(self.entries.get(i - self.first).copied().unwrap_or(0))
    }
}

/// Consecutive unchanged pages gathered into one chunk of the base's blobs (or of the
/// pre-copy's staged blobs).
#[derive(Debug, Default)]
struct ReusedRun {
    addr: u64,
    blobs: Vec<u32>,
    /// Where its blobs lie.
    from: Reused,
}

impl ReusedRun {
    fn new(from: Reused) -> Self {
        ReusedRun {
            from,
            ..ReusedRun::default()
        }
    }

    /// Adds the page at `addr`, kept in blob `blob`; stores the run so far first when the
    /// page does not continue it, or its blob does not follow the run's last in the same
    /// frame (a chunk inside one frame is read without being put together), or it is full.
    fn push(
        &mut self,
        addr: u64,
        blob: u32,
        pack: &mut PackWriter,
        runs: &mut Vec<PageRun>,
    ) -> CoreResult<()> {
        let next = self.addr + self.blobs.len() as u64 * PAGE;
        let follows = |&last: &u32| pack.reused_blob_follows(self.from, last, blob);
        if !self.blobs.is_empty()
            && (next != addr
                || self.blobs.len() == RUN_PAGES
                || !self.blobs.last().is_some_and(follows))
        {
            self.flush(pack, runs)?;
        }
        if self.blobs.is_empty() {
            self.addr = addr;
        }
        self.blobs.push(blob);
        Ok(())
    }

    /// [`ReusedRun::push`] of the `pages` pages from `addr` on, kept in the blobs from
    /// `blob` on (one each, in order): the pages that simply continue the run are taken
    /// in one go.
    fn push_run(
        &mut self,
        mut addr: u64,
        mut blob: u32,
        mut pages: usize,
        pack: &mut PackWriter,
        runs: &mut Vec<PageRun>,
    ) -> CoreResult<()> {
        while pages > 0 {
            self.push(addr, blob, pack, runs)?;
            let room = RUN_PAGES - self.blobs.len();
            let more = pack.reused_blobs_following(self.from, blob, (pages - 1).min(room));
            self.blobs.extend((1..=more).map(|k| blob + k as u32));
            addr += (1 + more) as u64 * PAGE;
            blob += 1 + more as u32;
            pages -= 1 + more;
        }
        Ok(())
    }

    fn flush(&mut self, pack: &mut PackWriter, runs: &mut Vec<PageRun>) -> CoreResult<()> {
        if !self.blobs.is_empty() {
            runs.push(PageRun {
                addr: self.addr,
                chunk: pack.add_reused(self.from, &self.blobs)?,
            });
            self.blobs.clear();
        }
        Ok(())
    }
}

/// Shared memory objects of a job, by inode; each page is saved once however many
/// processes map it.
#[derive(Debug, Default)]
pub struct SharedObjects {
    /// The objects, in manifest order.
    pub objects: Vec<SharedMemory>,
    index: HashMap<u64, usize>,
    saved: Vec<HashSet<u64>>,
}

impl SharedObjects {
    fn object(&mut self, inode: u64, name: &str) -> usize {
        if let Some(&i) = self.index.get(&inode) {
            return i;
        }
        self.objects.push(SharedMemory {
            inode,
            name: name.to_owned(),
            size: 0,
            pages: Vec::new(),
        });
        self.saved.push(HashSet::new());
        self.index.insert(inode, self.objects.len() - 1);
        self.objects.len() - 1
    }

    /// Saves a shared memory object reached through a descriptor (a memfd): its whole
    /// content, read from `file`, whose size is `size`.
    pub fn capture_file(
        &mut self,
        inode: u64,
        name: &str,
        file: &std::fs::File,
        size: u64,
        pack: &mut PackWriter,
    ) -> CoreResult<u32> {
        let i = self.object(inode, name);
        self.objects[i].size = self.objects[i].size.max(size);
        let mut buf = vec![0u8; RUN_PAGES * PAGE as usize];
        let mut off = 0;
        while off < size {
            let n = usize::try_from((size - off).min(buf.len() as u64)).unwrap_or(0);
            let data = &mut buf[..n.div_ceil(PAGE as usize) * PAGE as usize];
            data.fill(0);
            file.read_at(&mut data[..n], off).map_err(io_err(name))?;
            for (p, page) in data.chunks(PAGE as usize).enumerate() {
                let at = off + p as u64 * PAGE;
                if page.iter().any(|&b| b != 0) && self.saved[i].insert(at) {
                    let chunk = pack.add(page)?;
                    self.objects[i].pages.push(PageRun { addr: at, chunk });
                }
            }
            off += data.len() as u64;
        }
        Ok(u32::try_from(i).unwrap_or(u32::MAX))
    }

    fn capture(&mut self, pid: i32, m: &MapEntry, pack: &mut PackWriter) -> CoreResult<u32> {
        let i = self.object(m.inode, &m.path);
        let obj = &mut self.objects[i];
        obj.size = obj.size.max(m.offset + (m.end - m.start));
        let saved = &mut self.saved[i];
        // Every page of the object, whether or not this process faulted it in: another
        // process (perhaps gone) may have written it. Zero pages are dropped anyway.
        let runs = save_pages(
            pid,
            m,
            |_| true,
            |a| m.offset + (a - m.start),
            |off| saved.contains(&off),
            pack,
            Source::Live,
            &Unchanged::default(),
        )?;
        for r in &runs {
            let len = pack.chunk_len(r.chunk).unwrap_or(0);
            saved.extend((r.addr..r.addr + len).step_by(PAGE as usize));
        }
        obj.pages.extend(runs);
        Ok(u32::try_from(i).unwrap_or(u32::MAX))
    }
}

/// Which pagemap entries of a private mapping of kind `kind` are pages to save: for a file
/// mapping, the pages the process wrote (no longer the file's); for anonymous memory, every
/// page present or swapped out.
fn private_wanted(kind: VmaKind) -> fn(u64) -> bool {
    if kind == VmaKind::File {
        |e| (e & PM_PRESENT != 0 && e & PM_FILE == 0) || e & PM_SWAPPED != 0
    } else {
        |e| e & (PM_PRESENT | PM_SWAPPED) != 0
    }
}

/// The private pages of mapping `m` of process `pid` (of kind `kind`, see
/// [`private_wanted`]), read from `source`, except those `unchanged` knows (file mappings
/// are not tracked).
pub(super) fn private_pages(
    pid: i32,
    m: &MapEntry,
    kind: VmaKind,
    pack: &mut PackWriter,
    source: Source<'_>,
    unchanged: &Unchanged,
) -> CoreResult<Vec<PageRun>> {
    let untracked = Unchanged::default();
    let unchanged = if kind == VmaKind::File {
        &untracked
    } else {
        unchanged
    };
    let wanted = private_wanted(kind);
    save_pages(pid, m, wanted, |a| a, |_| false, pack, source, unchanged)
}

/// The runs of pages (address, length) [`private_pages`] would read of mapping `m` of
/// frozen process `pid`, to copy them with [`CopiedPages::gather`].
pub(super) fn pages_to_copy(
    pid: i32,
    m: &MapEntry,
    kind: VmaKind,
    unchanged: &Unchanged,
) -> CoreResult<Vec<(u64, usize)>> {
    let untracked = Unchanged::default();
    let unchanged = if kind == VmaKind::File {
        &untracked
    } else {
        unchanged
    };
    let mut wanted: Vec<(u64, usize)> = Vec::new();
    walk_pages(
        pid,
        m,
        private_wanted(kind),
        |a| a,
        |_| false,
        Source::Live,
        unchanged,
        None,
        |addr, pages| {
            let len = pages * PAGE as usize;
            match wanted.last_mut() {
                Some(last) if last.0 + last.1 as u64 == addr => last.1 += len,
                _ => wanted.push((addr, len)),
            }
            Ok(())
        },
    )?;
    Ok(wanted)
}

fn private_or_deferred(
    pid: i32,
    index: usize,
    m: &MapEntry,
    kind: VmaKind,
    pack: &mut PackWriter,
    deferred: Option<&mut Vec<(usize, MapEntry, VmaKind)>>,
    unchanged: &Unchanged,
) -> CoreResult<Vec<PageRun>> {
    match deferred {
        Some(list) if super::snapshot::snapshot_can_read(m) => {
            list.push((index, m.clone(), kind));
            Ok(Vec::new())
        }
        _ => private_pages(pid, m, kind, pack, Source::Live, unchanged),
    }
}

/// The advice mapping `m` carries (from its `VmFlags`).
pub(super) fn advice_of(m: &MapEntry) -> Vec<Advice> {
    Advice::ALL
        .iter()
        .filter(|(_, flag)| m.has_flag(flag))
        .map(|&(a, _)| a)
        .collect()
}

/// Captures every mapping of a process. With `deferred`, the private pages of mappings a
/// copy-on-write snapshot can give are not read now: each such mapping is listed there
/// (index, mapping, kind) and saved with no pages. Pages `unchanged` knows are not read.
pub fn capture_vmas(
    pid: i32,
    maps: &[MapEntry],
    shared: &mut SharedObjects,
    contents: &mut FileContents,
    pack: &mut PackWriter,
    mut deferred: Option<&mut Vec<(usize, MapEntry, VmaKind)>>,
    unchanged: &Unchanged,
) -> CoreResult<Vec<Vma>> {
    let mut out = Vec::with_capacity(maps.len());
    for (index, m) in maps.iter().enumerate() {
        let kind = vma_kind(pid, m)?;
        let mut file = None;
        let mut shmem = None;
        let pages = match kind {
            VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock | VmaKind::Vsyscall => Vec::new(),
            // The segment's content is saved once, from the job's IPC namespace.
            VmaKind::SysvShm => Vec::new(),
            VmaKind::Shmem => {
                shmem = Some(shared.capture(pid, m, pack)?);
                Vec::new()
            }
            VmaKind::File => {
                let meta = std::fs::metadata(&m.path).map_err(io_err(&m.path))?;
                if meta.ino() != m.inode {
                    return Err(CoreError::Unsupported {
                        pid,
                        what: format!("mapping of {}", m.path),
                        why: "the file was replaced after it was mapped".into(),
                    });
                }
                // Shared mappings are data (saved with --save-files); private ones are
                // programs, libraries and the like: checked, never saved.
                let found = Found {
                    pid,
                    path: &m.path,
                    meta: &meta,
                    source: &m.path,
                    checked: true,
                    save: m.shared,
                    written: m.shared && m.has_flag("mw"),
                };
                file = Some(contents.file_id(&found, pack)?);
                if m.shared {
                    Vec::new()
                } else {
                    private_or_deferred(
                        pid,
                        index,
                        m,
                        kind,
                        pack,
                        deferred.as_deref_mut(),
                        &Unchanged::default(),
                    )?
                }
            }
            VmaKind::Anon | VmaKind::Heap | VmaKind::Stack => private_or_deferred(
                pid,
                index,
                m,
                kind,
                pack,
                deferred.as_deref_mut(),
                unchanged,
            )?,
        };
        out.push(Vma {
            start: m.start,
            end: m.end,
            prot: m.prot,
            shared: m.shared,
            growsdown: m.has_flag("gd"),
            kind,
            file,
            offset: m.offset,
            pages,
            shmem,
            sysv: (kind == VmaKind::SysvShm).then(|| i32::try_from(m.inode).unwrap_or(-1)),
            advice: advice_of(m),
            noreserve: m.has_flag("nr"),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_is_zero_until_any_byte_is_set() {
        let mut bytes = vec![0u8; 4096 + 100];
        assert!(is_zero(&bytes));
        for at in [0, 1, 127, 128, 2049, 4095, 4096, 4195] {
            bytes[at] = 0x80;
            assert!(!is_zero(&bytes), "byte {at}");
            bytes[at] = 0;
        }
    }

    #[test]
    fn nonzero_pages_are_handed_out_in_runs() {
        let page = PAGE as usize;
        let mut data = vec![0u8; 6 * page];
        for p in [1, 2, 4] {
            data[p * page + page - 1] = 7;
        }
        let mut runs = Vec::new();
        for_each_nonzero(&data, |at, bytes| {
            runs.push((at / page, bytes.len() / page));
            Ok(())
        })
        .unwrap();
        assert_eq!(runs, vec![(1, 2), (4, 1)]);
    }
}
