//! Lazy restore: a restored job runs before its memory is loaded.
//!
//! Each lazily restored process's private anonymous mappings are registered on a userfaultfd
//! (made inside the process, kept by the supervisor) in missing-page mode and left empty. A
//! thread touching a page it does not have yet waits until the supervisor copies the page's
//! saved run in ([`PendingMemory::serve`]); meanwhile the supervisor loads the rest in the
//! background ([`PendingMemory::prefetch`]). Pages never saved are zeros. The userfaultfd also
//! reports what changes the address space: a fork (the child misses the same pages, through
//! a userfaultfd of its own), `mremap` (the missing pages move), `MADV_DONTNEED` and `munmap`
//! (the pages there are zeros or gone: they are never loaded). Once a process has every page
//! its userfaultfd is closed, which unregisters its mappings: nothing stays between the
//! program and its memory.

use std::collections::BTreeMap;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use stasis_image::OpenGeneration;
use stasis_image::READ_AHEAD;
use stasis_sys::inject::Injector;
use stasis_sys::uffd::{LazyEvent, LazyMemoryFd};
use stasis_sys::{Errno, SysError};

use crate::error::{CoreError, CoreResult};
use crate::freeze::FrozenJob;
use crate::tracking::{Protect, WriteTracking, normalized, written_in};
use crate::{proc, vdso};

const PAGE: u64 = 4096;
/// A fault on a never-saved page maps zeros over this much around it (within its gap).
const ZERO_WINDOW: u64 = 1 << 20;
/// How far ahead of background loading the page cache is asked to read the frames that
/// are not read directly (shared among the processes still loading, like [`READ_AHEAD`]).
const HINT_AHEAD: u64 = 128 << 20;
/// How long an address space may stay changing (its event not queued) before we give up.
const CHANGING_LIMIT: Duration = Duration::from_secs(10);

/// Saved bytes not loaded yet: `[start, end)` (the key holds `start`) comes from chunk
/// `chunk`, starting `offset` bytes into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub end: u64,
    pub chunk: u32,
    pub offset: u64,
}

/// The missing pages of one address space.
#[derive(Debug)]
pub(crate) struct LazyProcess {
    /// Its userfaultfd.
    pub fd: LazyMemoryFd,
    /// The process it was made in (for messages; a forked child reports its parent's).
    pub pid: i32,
    /// Missing saved pieces by start address (disjoint).
    pub pending: BTreeMap<u64, Piece>,
    /// The ranges registered on it, where they are now (moved by `mremap`, cut by
    /// `munmap`).
    pub ranges: Vec<(u64, u64)>,
    /// Where `mremap` moved pages to since the restart.
    pub moved: Vec<(u64, u64)>,
    /// Made by a fork while loading (its pid unknown: it is not handed over to write
    /// tracking, see [`PendingMemory::begin_hand_over`]).
    pub forked: bool,
    /// How far the pieces were asked for ahead of loading.
    pub asked: AskedTo,
    /// Once loaded, while being handed over to write tracking: the pages the next cut must
    /// read (see [`PendingMemory::hand_over_slice`]).
    pub handing: Option<Vec<(u64, u64)>>,
}

/// Addresses up to which a process's pieces were asked for ahead of loading.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct AskedTo {
    /// To be read ([`OpenGeneration::read_ahead`]).
    pub read: u64,
    /// To be read by the page cache ([`OpenGeneration::hint_ahead`]).
    pub hinted: u64,
}

/// Memory of restored processes still being loaded, kept by the supervisor until every page
/// is in.
#[derive(Debug, Default)]
pub struct PendingMemory {
    processes: Vec<LazyProcess>,
    total: u64,
    loaded: u64,
    faults: u64,
    /// The next process [`PendingMemory::prefetch`] loads from.
    turn: usize,
    /// Chunk buffer, reused.
    buf: Vec<u8>,
    /// The generation loaded from (its pack name): write tracking dates from it.
    pub(crate) base: Option<String>,
}

/// How far loading has come.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadProgress {
    /// Bytes loaded.
    pub loaded: u64,
    /// Bytes to load in all (grows when a process forks while loading).
    pub total: u64,
    /// Faults served (first touches of pages not loaded yet).
    pub faults: u64,
}

/// `ranges` after `mremap` moved `[from, from + len)` to `to`.
fn moved(ranges: &[(u64, u64)], from: u64, to: u64, len: u64) -> Vec<(u64, u64)> {
    let end = from + len;
    let mut out = Vec::new();
    for &(s, e) in ranges {
        if e <= from || end <= s {
            out.push((s, e));
            continue;
        }
        if s < from {
            out.push((s, from));
        }
        if end < e {
            out.push((end, e));
        }
        let (a, b) = (s.max(from), e.min(end));
        out.push((a - from + to, b - from + to));
    }
    out
}

/// `ranges` without `[start, end)`.
fn without(ranges: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(s, e) in ranges {
        if s < start {
            out.push((s, e.min(start)));
        }
        if end < e {
            out.push((s.max(end), e));
        }
    }
    out
}

fn bytes(p: &BTreeMap<u64, Piece>) -> u64 {
    p.iter().map(|(s, x)| x.end - s).sum()
}

/// Removes `[start, end)` from `pending`, splitting pieces that stick out; returns the
/// removed parts.
fn cut(pending: &mut BTreeMap<u64, Piece>, start: u64, end: u64) -> Vec<(u64, Piece)> {
    let mut out = Vec::new();
    let first = pending
        .range(..start)
        .next_back()
        .filter(|(_, p)| p.end > start)
        .map(|(s, _)| *s)
        .unwrap_or(start);
    let keys: Vec<u64> = pending.range(first..end).map(|(s, _)| *s).collect();
    for s in keys {
        let Some(p) = pending.remove(&s) else {
            continue;
        };
        if s < start {
            pending.insert(s, Piece { end: start, ..p });
        }
        if p.end > end {
            pending.insert(
                end,
                Piece {
                    offset: p.offset + (end - s),
                    ..p
                },
            );
        }
        let (a, b) = (s.max(start), p.end.min(end));
        if a < b {
            out.push((
                a,
                Piece {
                    end: b,
                    chunk: p.chunk,
                    offset: p.offset + (a - s),
                },
            ));
        }
    }
    out
}

impl LazyProcess {
    /// Applies one address-space change; a fork yields the child's missing pages.
    fn apply(&mut self, ev: LazyEvent) -> Option<LazyProcess> {
        match ev {
            LazyEvent::Fault { .. } => None,
            LazyEvent::Fork { uffd } => Some(LazyProcess {
                fd: self.fd.child(uffd),
                pid: self.pid,
                pending: self.pending.clone(),
                ranges: self.ranges.clone(),
                moved: self.moved.clone(),
                forked: true,
                asked: self.asked,
                handing: None,
            }),
            LazyEvent::Remap { from, to, len } => {
                self.ranges = moved(&self.ranges, from, to, len);
                // Noted for the hand-over to write tracking.
                self.moved = moved(&self.moved, from, to, len);
                self.moved.push((to, to + len));
                for (s, p) in cut(&mut self.pending, from, from + len) {
                    let moved = s - from + to;
                    self.pending.insert(
                        moved,
                        Piece {
                            end: p.end - from + to,
                            ..p
                        },
                    );
                }
                None
            }
            LazyEvent::Removed { start, end } => {
                cut(&mut self.pending, start, end);
                None
            }
            LazyEvent::Unmapped { start, end } => {
                cut(&mut self.pending, start, end);
                self.ranges = without(&self.ranges, start, end);
                self.moved = without(&self.moved, start, end);
                None
            }
        }
    }
}

impl PendingMemory {
    /// Adds a lazily restored process.
    pub(crate) fn add(&mut self, p: LazyProcess) {
        self.total += bytes(&p.pending);
        self.processes.push(p);
    }

    /// Nothing left to load.
    pub fn is_empty(&self) -> bool {
        self.processes.is_empty()
    }

    /// How far loading has come.
    pub fn progress(&self) -> LoadProgress {
        LoadProgress {
            loaded: self.loaded,
            total: self.total,
            faults: self.faults,
        }
    }

    /// The userfaultfds, to wait on with `poll`.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.processes.iter().map(|p| p.fd.as_fd()).collect()
    }

    /// Serves every fault and change reported so far, without waiting.
    pub fn serve(&mut self, image: &mut OpenGeneration) -> CoreResult<()> {
        let mut i = 0;
        while i < self.processes.len() {
            if self.serve_one(i, image)? {
                i += 1;
            } else {
                self.processes.swap_remove(i);
            }
        }
        Ok(())
    }

    /// Loads about `budget` bytes in the background (serving faults between pieces); lets
    /// go of the processes that have all their memory (but those [`PendingMemory::begin_hand_over`]
    /// wants). Returns whether everything is loaded.
    pub fn prefetch(&mut self, image: &mut OpenGeneration, budget: u64) -> CoreResult<bool> {
        let mut done = 0;
        while done < budget {
            self.serve(image)?;
            let n = self.processes.len();
            let next = (0..n)
                .map(|k| (self.turn + k) % n)
                .find(|&i| !self.processes[i].pending.is_empty());
            let Some(i) = next else {
                break;
            };
            self.turn = i + 1;
            let Some((&start, piece)) = self.processes[i].pending.iter().next() else {
                continue;
            };
            done += piece.end - start;
            self.read_ahead(i, start, image);
            if self.load(i, start, image)? == Outcome::Gone {
                self.processes.swap_remove(i);
            }
        }
        self.processes
            .retain(|p| !p.pending.is_empty() || (!p.forked && p.fd.records_writes()));
        Ok(self.is_loaded())
    }

    /// Asks the disk for the chunks of process `i`'s pieces beyond `start` (where loading
    /// is), so that it reads while we copy: its share of [`READ_AHEAD`] among the
    /// processes still loading (loading takes their pieces in turn, so the chunks are asked
    /// for in about the order they are taken), and for the page cache's reading its share
    /// of [`HINT_AHEAD`].
    fn read_ahead(&mut self, i: usize, start: u64, image: &mut OpenGeneration) {
        let loading = self.processes.iter().filter(|p| !p.pending.is_empty());
        let loading = loading.count().max(1) as u64;
        let p = &mut self.processes[i];
        p.asked.read = ask_ahead(&p.pending, p.asked.read, start, READ_AHEAD / loading, |c| {
            image.read_ahead(c);
        });
        p.asked.hinted = ask_ahead(
            &p.pending,
            p.asked.hinted,
            start,
            HINT_AHEAD / loading,
            |c| {
                image.hint_ahead(c);
            },
        );
    }

    /// Every page is in: only faults on pages never saved are left to serve.
    pub fn is_loaded(&self) -> bool {
        self.processes.iter().all(|p| p.pending.is_empty())
    }

    /// Hand-over to write tracking, first step, with every page loaded and the job frozen
    /// (`frozen` names its processes): each process that recorded the pages it wrote while
    /// they loaded gets a tracker, registered for now on its other mappings only. Returns
    /// whether any process is being handed over (if none, nothing more is to be done but
    /// drop this, which closes the userfaultfds).
    ///
    /// The hand-over then goes one slice at a time ([`PendingMemory::hand_over_slice`]),
    /// the job running in between: moving a range from a userfaultfd to a tracker walks
    /// every page twice (taking the protection off, about 21 ms per GiB here, and putting
    /// it on again, about 11), and all at once that would stop the program for that long.
    pub fn begin_hand_over(&mut self, tracking: &mut WriteTracking, frozen: &FrozenJob) -> bool {
        if self.base.is_none() {
            return false;
        }
        for p in &mut self.processes {
            let main = frozen
                .processes
                .iter()
                .find(|f| f.pid == p.pid)
                .and_then(|f| f.threads.first())
                .map(|t| t.tid);
            let (Some(main), false, true, true) =
                (main, p.forked, p.fd.records_writes(), p.pending.is_empty())
            else {
                continue;
            };
            let begun = proc::maps_without_flags(p.pid).and_then(|maps| {
                let insn = vdso::syscall_insn(p.pid, &maps)?;
                let mut inj = Injector::new(main, insn);
                Ok(tracking.track_anew(p.pid, &maps, &mut inj))
            });
            match begun {
                Ok(found) => p.handing = found,
                Err(e) => {
                    tracing::debug!(pid = p.pid, error = %e, "lazily restored memory not handed over to write tracking");
                }
            }
        }
        self.processes.iter().any(|p| p.handing.is_some())
    }

    /// Hand-over, with the job frozen: moves whole ranges still registered on the
    /// userfaultfds to write tracking, about `budget` bytes (at least one range, however
    /// large). For each, the pages written, zero-filled or dropped since they were filled
    /// (those no longer write-protected) are noted to be read at the next cut; then the
    /// range is unregistered (which takes the protection off every page), registered with
    /// the process's tracker and protected again. A slice never cuts a mapping: the two
    /// halves would be two mappings to the kernel meanwhile, and the program's `mremap`
    /// across them would fail (`EFAULT`). Returns `None` while there is more to hand over;
    /// once everything is, the processes are tracked from the generation they were
    /// restored from, this is to be dropped, and it returns how many processes are tracked
    /// so (those that failed on the way are not).
    pub fn hand_over_slice(&mut self, tracking: &mut WriteTracking, budget: u64) -> Option<usize> {
        let mut left = budget;
        let mut any = false;
        for p in &mut self.processes {
            let Some(mut written) = p.handing.take() else {
                continue;
            };
            // Touching ranges may be one mapping: they go together.
            p.ranges = normalized(std::mem::take(&mut p.ranges));
            let mut n = 0;
            let mut full = false;
            while let Some(&(start, end)) = p.ranges.get(n) {
                if any && end - start > left {
                    full = true;
                    break;
                }
                any = true;
                left = left.saturating_sub(end - start);
                n += 1;
            }
            let slice: Vec<(u64, u64)> = p.ranges.drain(..n).collect();
            if slice.is_empty() {
                p.handing = Some(written);
                if full {
                    break;
                }
                continue;
            }
            // `ranges` is exactly what is registered on this userfaultfd (the events keep
            // it so): unregistering takes the protection off whatever is registered in a
            // range, a tracker's registration included.
            let noted = written_in(p.pid, &slice, Protect::No).and_then(|w| {
                slice
                    .iter()
                    .try_for_each(|&(start, end)| p.fd.unregister(start, end))
                    .map(|()| w)
            });
            let going = match noted {
                Ok(w) => {
                    written.extend(w);
                    tracking.hand_over_ranges(p.pid, &slice)
                }
                Err(e) => {
                    tracing::debug!(pid = p.pid, error = %e, "lazily restored memory not handed over to write tracking");
                    tracking.forget(p.pid);
                    false
                }
            };
            if going {
                p.handing = Some(written);
            }
            if full {
                break;
            }
        }
        let done = self
            .processes
            .iter()
            .all(|p| p.handing.is_none() || p.ranges.is_empty());
        if !done {
            return None;
        }
        let mut handed = 0;
        for p in &mut self.processes {
            if let (Some(mut written), Some(base)) = (p.handing.take(), &self.base) {
                // Pages moved by `mremap` kept their protection: to write tracking they
                // would look unchanged at an address the generation has other pages at.
                written.extend(p.moved.iter().copied());
                tracking.trust_from(p.pid, base, written);
                handed += 1;
            }
        }
        Some(handed)
    }

    /// Loads everything now.
    pub fn finish(&mut self, image: &mut OpenGeneration) -> CoreResult<()> {
        while !self.prefetch(image, u64::MAX)? {}
        Ok(())
    }

    /// Serves process `i`'s events; false when its address space is gone. Changes are
    /// applied first, then the faults read with them (a fault whose page moved meanwhile is
    /// served where its page is now, or just woken).
    fn serve_one(&mut self, i: usize, image: &mut OpenGeneration) -> CoreResult<bool> {
        let mut waiting: Vec<u64> = Vec::new();
        let t0 = Instant::now();
        loop {
            let events = match self.processes[i].fd.events() {
                Ok(e) => e,
                Err(e) => return Err(sys_err(&self.processes[i], e)),
            };
            if events.is_empty() && waiting.is_empty() {
                return Ok(true);
            }
            if events.is_empty() {
                // A change is under way whose event is not queued yet.
                if t0.elapsed() > CHANGING_LIMIT {
                    return Err(sys_err(
                        &self.processes[i],
                        SysError::new("UFFDIO_COPY", self.processes[i].pid, Errno::EAGAIN),
                    ));
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            for ev in events {
                if let LazyEvent::Fault { addr } = ev {
                    self.faults += 1;
                    waiting.push(addr);
                } else if let Some(child) = self.processes[i].apply(ev) {
                    self.total += bytes(&child.pending);
                    self.processes.push(child);
                }
            }
            for addr in std::mem::take(&mut waiting) {
                match self.fault(i, addr, image)? {
                    Outcome::Done => {}
                    Outcome::Gone => return Ok(false),
                    Outcome::Again => waiting.push(addr),
                }
            }
        }
    }

    /// Serves a fault at `addr` of process `i`: its piece, or zeros when it was never saved.
    fn fault(&mut self, i: usize, addr: u64, image: &mut OpenGeneration) -> CoreResult<Outcome> {
        let p = &self.processes[i];
        let holder = p
            .pending
            .range(..=addr)
            .next_back()
            .filter(|(_, x)| x.end > addr)
            .map(|(s, _)| *s);
        if let Some(start) = holder {
            return self.load(i, start, image);
        }
        let lo = p
            .pending
            .range(..addr)
            .next_back()
            .map_or(0, |(_, x)| x.end)
            .max(addr & !(ZERO_WINDOW - 1));
        let hi = p
            .pending
            .range(addr..)
            .next()
            .map_or(u64::MAX, |(s, _)| *s)
            .min((addr | (ZERO_WINDOW - 1)) + 1);
        let fd = &p.fd;
        let r = fd.zero(lo, hi).or_else(|e| {
            // The window may reach past the mapping: the page alone.
            if matches!(e.errno, Errno::ENOENT | Errno::EFAULT | Errno::EINVAL) {
                fd.zero(addr, addr + PAGE)
            } else {
                Err(e)
            }
        });
        if r.as_ref()
            .is_err_and(|e| matches!(e.errno, Errno::ENOENT | Errno::EFAULT))
        {
            // Not mapped there any more: the thread finds out when it retries.
            fd.wake(addr, PAGE);
        }
        self.settle(i, r)
    }

    /// Copies the piece at `start` of process `i` in.
    fn load(&mut self, i: usize, start: u64, image: &mut OpenGeneration) -> CoreResult<Outcome> {
        let Some(piece) = self.processes[i].pending.remove(&start) else {
            return Ok(Outcome::Done);
        };
        let mut buf = std::mem::take(&mut self.buf);
        let outcome = image
            .with_chunk(piece.chunk, &mut buf, |data| {
                self.copy_piece(i, start, piece, data)
            })
            .map_err(CoreError::from);
        self.buf = buf;
        let outcome = outcome??;
        match outcome {
            // Copied pages are skipped when it is tried again.
            Outcome::Again => {
                self.processes[i].pending.insert(start, piece);
            }
            Outcome::Done => self.loaded += piece.end - start,
            Outcome::Gone => {}
        }
        Ok(outcome)
    }

    /// Copies `piece` (at `start`) of process `i` in from `data`, its chunk.
    fn copy_piece(&self, i: usize, start: u64, piece: Piece, data: &[u8]) -> CoreResult<Outcome> {
        let from = usize::try_from(piece.offset).unwrap_or(usize::MAX);
        let len = usize::try_from(piece.end - start).unwrap_or(usize::MAX);
        let slice = data.get(from..from.saturating_add(len)).ok_or_else(|| {
            CoreError::Incompatible(format!(
                "chunk {} is shorter than the memory it should fill at {start:#x}",
                piece.chunk
            ))
        })?;
        let fd = &self.processes[i].fd;
        let r = fd.copy(start, slice).or_else(|e| {
            // The piece may now straddle mappings (after mprotect or a partial munmap):
            // page by page, skipping pages no longer mapped.
            if !matches!(e.errno, Errno::ENOENT | Errno::EFAULT | Errno::EINVAL) {
                return Err(e);
            }
            for (k, page) in slice.chunks(PAGE as usize).enumerate() {
                let at = start + k as u64 * PAGE;
                match fd.copy(at, page) {
                    Ok(()) => {}
                    Err(e) if matches!(e.errno, Errno::ENOENT | Errno::EFAULT) => fd.wake(at, PAGE),
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        });
        self.settle(i, r)
    }

    /// What a copy's result means for process `i`.
    fn settle(&self, i: usize, r: Result<(), SysError>) -> CoreResult<Outcome> {
        match r {
            Ok(()) => Ok(Outcome::Done),
            // The process exec'd or ended: its old memory needs nothing any more.
            Err(e) if e.errno == Errno::ESRCH => Ok(Outcome::Gone),
            // The address space is changing: read its events, then try again.
            Err(e) if e.errno == Errno::EAGAIN => Ok(Outcome::Again),
            // Unmapped in the meantime (its event is on the way): nothing to fill.
            Err(e) if matches!(e.errno, Errno::ENOENT | Errno::EFAULT) => Ok(Outcome::Done),
            Err(e) => Err(sys_err(&self.processes[i], e)),
        }
    }
}

/// Calls `ask` with the chunk of each piece of `pending` from `asked_to` (or `start`, where
/// loading is, if beyond) up to `window` bytes beyond `start`; returns the new `asked_to`.
fn ask_ahead(
    pending: &BTreeMap<u64, Piece>,
    asked_to: u64,
    start: u64,
    window: u64,
    mut ask: impl FnMut(u32),
) -> u64 {
    let limit = start.saturating_add(window.max(PAGE));
    let mut to = asked_to.max(start);
    for (&s, piece) in pending.range(to..) {
        if s >= limit {
            break;
        }
        ask(piece.chunk);
        to = piece.end;
    }
    asked_to.max(to)
}

/// What became of a fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Done,
    /// The address space is gone.
    Gone,
    /// The address space is changing: try again after reading its events.
    Again,
}

fn sys_err(p: &LazyProcess, source: SysError) -> CoreError {
    CoreError::Sys {
        context: format!("loading the memory of restored process {} lazily", p.pid),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(end: u64, chunk: u32, offset: u64) -> Piece {
        Piece { end, chunk, offset }
    }

    #[test]
    fn ranges_follow_mremap_and_munmap() {
        let r = [(0x1000, 0x5000), (0x8000, 0x9000)];
        // The middle of the first range moves up; the rest stays.
        let m = moved(&r, 0x2000, 0x20000, 0x1000);
        assert_eq!(
            m,
            vec![
                (0x1000, 0x2000),
                (0x3000, 0x5000),
                (0x20000, 0x21000),
                (0x8000, 0x9000)
            ]
        );
        assert_eq!(moved(&r, 0x6000, 0x30000, 0x1000), r.to_vec());
        assert_eq!(
            without(&r, 0x4000, 0x8800),
            vec![(0x1000, 0x4000), (0x8800, 0x9000)]
        );
    }

    #[test]
    fn cutting_splits_pieces_at_the_edges_and_keeps_offsets() {
        let mut m = BTreeMap::new();
        m.insert(0x1000, piece(0x5000, 7, 0));
        m.insert(0x8000, piece(0x9000, 8, 0x2000));
        let got = cut(&mut m, 0x2000, 0x8800);
        assert_eq!(
            got,
            vec![
                (0x2000, piece(0x5000, 7, 0x1000)),
                (0x8000, piece(0x8800, 8, 0x2000))
            ]
        );
        assert_eq!(m.get(&0x1000), Some(&piece(0x2000, 7, 0)));
        assert_eq!(m.get(&0x8800), Some(&piece(0x9000, 8, 0x2800)));
        assert_eq!(m.len(), 2);
        assert!(cut(&mut m, 0x3000, 0x8000).is_empty());
    }
}
