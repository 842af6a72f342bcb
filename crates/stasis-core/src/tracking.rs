//! Write tracking between checkpoints: which private anonymous pages of each process were
//! written since the cut of the generation a new one builds on. The others are unchanged,
//! so the new generation references the base's blobs for them without reading them.
//!
//! At each cut (the job frozen) every private anonymous mapping of a process is registered
//! with a userfaultfd of Stasis's (made by the process through an injected call, then taken
//! over, so its descriptor table ends as it was) in asynchronous write-protect mode, and
//! one `PAGEMAP_SCAN` pass per mapping lists the pages written since they were last
//! protected. The pages are protected again once the job runs again, not while it stands
//! still ([`WriteTracking::protect_after_thaw`]): the pages it wrote between the cut and
//! that moment are those no longer shared with the cut's copy-on-write snapshot, and are
//! carried over to be read at the next cut. The program never stops for any of it: its
//! first write to a protected page costs one minor fault. A page is trusted as unchanged
//! only when
//! - its process was tracked since the cut of exactly the base generation (the base's pack
//!   names it; a checkpoint that failed ends the trust);
//! - its mapping is registered with this process's tracker (after an `exec` registration
//!   fails and a new tracker is made; mappings created, moved or registered by the program
//!   itself since carry no protection and read as written);
//! - the scan does not report it written, nor was it carried over.
//!
//! A restart protects the memory it restored the same way, dated from the generation it
//! restored ([`WriteTracking::restored`]).
//!
//! Anything else is read from memory as without tracking. Kernels without
//! `UFFD_FEATURE_WP_ASYNC` (before 6.7) simply get no tracking.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fs::File;

use stasis_image::pack::{Base, BaseMemory, Reused};
use stasis_sys::inject::Injector;
use stasis_sys::process::{pidfd_getfd, pidfd_open};
use stasis_sys::uffd::{self, USERFAULTFD_FLAGS, WriteTracker, WrittenRange, written_ranges};
use stasis_sys::{Errno, SysError};

use crate::proc::MapEntry;

/// Mappings smaller than this many pages are not tracked: they are read every time.
const MIN_TRACKED_PAGES: u64 = 16;
/// Processes with less trackable memory than this many pages are not tracked: reading it
/// all costs little, and each tracker is a descriptor the supervisor holds.
const MIN_PROCESS_PAGES: u64 = 256;
/// At most this many processes of a job are tracked, so that trackers never take the
/// supervisor's descriptors (its descriptor limit is the job's, left as it is).
const MAX_TRACKED_PROCESSES: usize = 256;
const PAGE: u64 = 4096;
/// Bytes protected by one `PAGEMAP_SCAN` pass while the job runs (see
/// [`WriteTracking::precopy_protect_running`]).
const PROTECT_PIECE: u64 = 16 << 20;

/// Write tracking of one job's processes, kept by its supervisor from one checkpoint to the
/// next.
#[derive(Debug, Default)]
pub struct WriteTracking {
    processes: HashMap<i32, Tracked>,
    /// Processes seen at the cut in progress.
    seen: HashMap<i32, CutState>,
    /// The generation being written at the cut in progress (its pack name).
    generation: String,
    /// Protect the pages again after this cut (not needed when the job is killed).
    rearm: bool,
    /// Set once the kernel refused tracking: nothing more is tried.
    unsupported: bool,
    /// Pre-copies of the cut in progress, by process: where the memory read while the job
    /// ran lies among the writer's staged blobs ([`WriteTracking::precopied`]).
    precopies: HashMap<i32, BaseMemory>,
    /// Processes whose pre-copy must first take off the protection of an earlier tracking
    /// (its markers in pages never touched read as pages swapped out).
    unprotect_first: HashSet<i32>,
}

#[derive(Debug)]
struct Tracked {
    tracker: WriteTracker,
    /// The generation (its pack name) whose cut the tracking dates from.
    since: Option<String>,
    /// Pages to read at the next cut although not reported written: those the job may
    /// have written between the cut of `since` and the moment they were protected again.
    carry: Vec<(u64, u64)>,
}

/// A process at the cut in progress.
#[derive(Debug, Default)]
struct CutState {
    /// Its registered ranges.
    tracked: Vec<(u64, u64)>,
    /// Set once its pages are protected again after the cut: tracking then dates from the
    /// generation being written.
    protected: bool,
    /// See [`Tracked::carry`].
    carry: Vec<(u64, u64)>,
}

/// What tracking knows of one process's pages at a cut.
#[derive(Debug, Default)]
pub struct Unchanged {
    /// Ranges whose pages are tracked (sorted, disjoint).
    tracked: Vec<(u64, u64)>,
    /// Tracked ranges written since the base's cut (sorted, disjoint).
    written: Vec<(u64, u64)>,
    /// Where the base keeps the process's pages.
    base: BaseMemory,
    /// Where the blobs `base` names lie: the base generation's, or the writer's staged
    /// ones (a pre-copy of this very cut).
    reused: Reused,
    /// What the written ranges held at the cut, as its scan found them (sorted, disjoint;
    /// ranges carried from earlier cuts are not in it).
    states: Vec<WrittenRange>,
}

fn contains(ranges: &[(u64, u64)], addr: u64) -> bool {
    let i = ranges.partition_point(|r| r.1 <= addr);
    ranges.get(i).is_some_and(|r| r.0 <= addr)
}

impl Unchanged {
    /// For a page unchanged since the base's cut, `Some` of the base blob holding it (`None`
    /// inside: it was not saved, being zero); `None` when it must be read.
    pub fn lookup(&self, addr: u64) -> Option<Option<u32>> {
        (contains(&self.tracked, addr) && !contains(&self.written, addr))
            .then(|| self.base.blob_at(addr))
    }

    /// A cursor for lookups at increasing addresses from `addr` on: each lookup costs
    /// amortized constant time, where [`Unchanged::lookup`] searches.
    pub fn cursor(&self, addr: u64) -> Cursor<'_> {
        Cursor {
            u: self,
            t: self.tracked.partition_point(|r| r.1 <= addr),
            w: self.written.partition_point(|r| r.1 <= addr),
            b: self.base.runs.partition_point(|r| r.1 <= addr),
        }
    }

    /// Lookups of what written pages held at the cut, at increasing addresses from `addr`
    /// on: in memory, swapped out, or nothing (as pagemap would tell of the frozen process,
    /// without reading it page after page).
    pub fn states(&self, addr: u64) -> States<'_> {
        States {
            s: &self.states,
            i: self.states.partition_point(|r| r.end <= addr),
        }
    }

    /// Where the blobs [`Unchanged::lookup`] names lie: the base generation's, or the
    /// writer's staged blobs (a pre-copy of this cut).
    pub fn reused(&self) -> Reused {
        self.reused
    }

    /// Pages tracked, written or not.
    pub fn tracked_pages(&self) -> u64 {
        self.tracked.iter().map(|(s, e)| e - s).sum::<u64>() / PAGE
    }

    /// Whether the page at `addr` is tracked.
    pub fn is_tracked(&self, addr: u64) -> bool {
        contains(&self.tracked, addr)
    }

    /// Pages known unchanged whose content the base holds (not zero there): those taken
    /// from it rather than read.
    pub fn saved_pages(&self) -> u64 {
        let runs: Vec<(u64, u64)> = self.base.runs.iter().map(|r| (r.0, r.1)).collect();
        let kept = intersection(&runs, &self.tracked);
        let bytes = kept.iter().map(|(s, e)| e - s).sum::<u64>()
            - intersection(&kept, &self.written)
                .iter()
                .map(|(s, e)| e - s)
                .sum::<u64>();
        bytes / PAGE
    }

    /// Pages known unchanged: tracked and not written.
    pub fn known_pages(&self) -> u64 {
        let overlap: u64 = self
            .tracked
            .iter()
            .map(|&(ts, te)| {
                let first = self.written.partition_point(|w| w.1 <= ts);
                self.written[first..]
                    .iter()
                    .take_while(|w| w.0 < te)
                    .map(|&(ws, we)| we.min(te) - ws.max(ts))
                    .sum::<u64>()
            })
            .sum();
        self.tracked_pages() - overlap / PAGE
    }
}

/// Lookups of [`Unchanged::states`] at increasing addresses.
#[derive(Debug)]
pub struct States<'a> {
    s: &'a [WrittenRange],
    i: usize,
}

impl States<'_> {
    /// The range of written pages holding `addr` and its state at the cut, if the cut's
    /// scan saw it; `addr` must not be below the previous one's.
    pub fn at(&mut self, addr: u64) -> Option<WrittenRange> {
        while self.s.get(self.i).is_some_and(|r| r.end <= addr) {
            self.i += 1;
        }
        self.s.get(self.i).filter(|r| r.start <= addr).copied()
    }
}

/// Lookups in an [`Unchanged`] at increasing addresses.
#[derive(Debug)]
pub struct Cursor<'a> {
    u: &'a Unchanged,
    t: usize,
    w: usize,
    b: usize,
}

impl Cursor<'_> {
    /// [`Unchanged::lookup`] for `addr`, which must not be below the previous one's.
    pub fn at(&mut self, addr: u64) -> Option<Option<u32>> {
        let advance = |i: &mut usize, r: &[(u64, u64)]| {
            while r.get(*i).is_some_and(|x| x.1 <= addr) {
                *i += 1;
            }
            r.get(*i).is_some_and(|x| x.0 <= addr)
        };
        if !advance(&mut self.t, &self.u.tracked) || advance(&mut self.w, &self.u.written) {
            return None;
        }
        let runs = &self.u.base.runs;
        while runs.get(self.b).is_some_and(|r| r.1 <= addr) {
            self.b += 1;
        }
        Some(
            runs.get(self.b)
                .filter(|r| r.0 <= addr)
                .map(|r| r.2 + u32::try_from((addr - r.0) / PAGE).unwrap_or(u32::MAX)),
        )
    }

    /// After [`Cursor::at`] said the page at `addr` is known unchanged: where the pages
    /// known unchanged from `addr` on end (the end of its tracked range, or the start of
    /// the next written range).
    pub fn known_until(&self, addr: u64) -> u64 {
        let tracked_end = self.u.tracked.get(self.t).map_or(addr, |t| t.1);
        let written = self.u.written.get(self.w).map_or(u64::MAX, |w| w.0);
        tracked_end.min(written).max(addr + PAGE)
    }

    /// After [`Cursor::at`] said the page at `addr` is known unchanged: where the pages from
    /// `addr` on stop being known unchanged with the base's blobs for them following on,
    /// one per page (or with none, zero there): [`Cursor::known_until`], cut at the edges
    /// of the base's runs.
    pub fn known_run_until(&self, addr: u64) -> u64 {
        let edge = match self.u.base.runs.get(self.b) {
            Some(r) if r.0 <= addr => r.1,
            Some(r) => r.0,
            None => u64::MAX,
        };
        self.known_until(addr).min(edge).max(addr + PAGE)
    }

    /// After [`Cursor::at`] said the page at `addr` must be read: an address up to which
    /// the pages from `addr` on must be read too (the end of its written range, or the
    /// start of the next tracked range), where pages known unchanged may begin. (Written
    /// pages need not exist: never-touched pages count as written.)
    pub fn read_until(&self, addr: u64) -> u64 {
        let tracked = self.u.tracked.get(self.t);
        match tracked {
            Some(t) if t.0 <= addr => self
                .u
                .written
                .get(self.w)
                .filter(|w| w.0 <= addr)
                .map_or(addr + PAGE, |w| w.1.min(t.1)),
            Some(t) => t.0,
            None => u64::MAX,
        }
    }
}

/// How tracking dates from the pre-copy of the generation whose pack is `generation`: a
/// name no pack has.
fn precopy_name(generation: &str) -> String {
    format!("{generation} (pre-copy)")
}

/// Whether mapping `m` is tracked: private anonymous memory, large enough to pay.
fn trackable(m: &MapEntry) -> bool {
    !m.shared
        && m.prot != libc::PROT_NONE
        && (m.path.is_empty()
            || m.path == "[heap]"
            || m.path == "[stack]"
            || m.path.starts_with("[anon:"))
        && (m.end - m.start) / PAGE >= MIN_TRACKED_PAGES
}

impl WriteTracking {
    /// No process tracked yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a cut. `rearm`: protect the pages again for the next checkpoint (false when
    /// the job is killed after this one).
    pub fn start_cut(&mut self, rearm: bool) {
        self.seen.clear();
        self.precopies.clear();
        self.unprotect_first.clear();
        self.rearm = rearm;
    }

    /// The job runs again after the cut: protects every tracked page that exists again, and
    /// notes the pages the job may have written since the cut, to be read at the next one:
    /// those protected in this pass that a write since the cut copied away from the
    /// copy-on-write snapshot (`PM_MMAP_EXCLUSIVE` in pagemap; in memory a fork leaves out
    /// or wipes, every such page), and those swapped out (pagemap cannot tell). A page
    /// absent now is left unprotected: the next cut finds it written, and absent, zero.
    /// Protecting here rather than at the cut keeps the time the job stands still short: a
    /// first protection of 1 GiB takes about 6-10 ms.
    pub fn protect_after_thaw(&mut self) {
        if !self.rearm {
            return;
        }
        for (&pid, state) in &mut self.seen {
            if !self.processes.contains_key(&pid) || state.protected {
                continue;
            }
            match protect_and_carry(pid, &state.tracked) {
                Ok(carry) => {
                    state.carry = carry;
                    state.protected = true;
                }
                Err(e) => tracing::debug!(pid, error = %e, "pages not protected again"),
            }
        }
    }

    /// Process `pid`, still frozen at the cut, had its memory read without a snapshot:
    /// protects the pages read, `copied` (sorted), so that tracking dates from this cut
    /// with nothing carried over. Only those pages are walked (with the others less than
    /// 2 MiB apart, protected already or, rarely, never touched: the cheaper pass that
    /// looks only at protection leaves markers in those); the rest stayed protected, and
    /// pages absent stay unprotected.
    pub(crate) fn protect_frozen(&mut self, pid: i32, copied: &[(u64, u64)]) {
        if !self.rearm || !self.processes.contains_key(&pid) {
            return;
        }
        let Some(state) = self.seen.get_mut(&pid) else {
            return;
        };
        // One scan per stretch of nearby ranges: pages between them are protected already
        // and scanned cheaply, where a scan per range (often one page) adds up.
        let stretches = coalesced(&state.tracked, copied, 512 * PAGE);
        match written_in(pid, &stretches, Protect::All) {
            Ok(_) => {
                state.carry.clear();
                state.protected = true;
            }
            Err(e) => tracing::debug!(pid, error = %e, "pages not protected at the cut"),
        }
    }

    /// The generation written at the cut is in place: tracking dates from it for the
    /// processes protected again after it.
    pub fn committed(&mut self) {
        let seen = std::mem::take(&mut self.seen);
        self.processes.retain(|pid, _| seen.contains_key(pid));
        for (pid, state) in seen {
            if let Some(t) = self.processes.get_mut(&pid) {
                t.since = state.protected.then(|| self.generation.clone());
                t.carry = state.carry;
            }
        }
    }

    /// The generation written at the cut was not kept: what was written before the cut is
    /// unknown from now on.
    pub fn abandoned(&mut self) {
        self.seen.clear();
        self.precopies.clear();
        for t in self.processes.values_mut() {
            t.since = None;
            t.carry.clear();
        }
    }

    /// At the cut, with process `pid` (pid `ns_pid` in the job) frozen: registers its
    /// mappings and learns which of its pages are unchanged since the base generation's
    /// cut. `generation` names the generation being written; `inj` runs calls in the
    /// process. Never fails: what cannot be tracked is read.
    pub(crate) fn cut(
        &mut self,
        pid: i32,
        ns_pid: i32,
        maps: &[MapEntry],
        inj: &mut Injector,
        base: &Base,
        generation: &str,
    ) -> Unchanged {
        if self.unsupported {
            return Unchanged::default();
        }
        let since = |t: &Self| t.processes.get(&pid).and_then(|t| t.since.clone());
        let before = since(self);
        let precopy = self.precopies.remove(&pid);
        let scanned = self.register(pid, maps, inj).and_then(|tracked| {
            let (written, states) = written_and_states(&open_pagemap(pid)?, pid, &tracked)?;
            Ok((tracked, written, states))
        });
        let (tracked, mut written, states) = match scanned {
            Ok(x) => x,
            Err(e) => {
                self.give_up(pid, &e);
                return Unchanged::default();
            }
        };
        // A tracker made anew (first checkpoint, exec) knows nothing of the past.
        let after = since(self).filter(|_| before == since(self));
        if let Some(t) = self.processes.get(&pid) {
            written.extend_from_slice(&t.carry);
        }
        self.generation = generation.to_owned();
        self.seen.insert(
            pid,
            CutState {
                tracked: tracked.clone(),
                ..CutState::default()
            },
        );
        let (base, reused) = match (after, precopy) {
            (Some(s), Some(p)) if s == precopy_name(generation) => (p, Reused::Staged),
            (Some(s), _) if Some(s.as_str()) == base.name() => match base.memory.get(&ns_pid) {
                Some(b) => (b.clone(), Reused::Base),
                None => return Unchanged::default(),
            },
            _ => return Unchanged::default(),
        };
        Unchanged {
            tracked,
            written: normalized(written),
            base,
            reused,
            states,
        }
    }

    /// Whether process `pid`'s next cut, for a generation built on `base`, would read all
    /// its tracked memory: it is not tracked since that base. A pre-copy then pays.
    pub fn reads_everything(&self, pid: i32, base: &Base) -> bool {
        !self.unsupported
            && self
                .processes
                .get(&pid)
                .is_none_or(|t| t.since.is_none() || t.since.as_deref() != base.name())
    }

    /// Pre-copy, with process `pid` frozen before the cut of generation `generation`:
    /// registers its trackable mappings. Returns the ranges tracked (empty when none are):
    /// once the job runs again, the caller protects them
    /// ([`WriteTracking::precopy_protect_running`]), reads them, then hands where it stored
    /// them to [`WriteTracking::precopied`]. The tracker then dates from the pre-copy,
    /// which only this cut trusts.
    pub(crate) fn precopy_protect(
        &mut self,
        pid: i32,
        maps: &[MapEntry],
        inj: &mut Injector,
        generation: &str,
    ) -> Vec<(u64, u64)> {
        if self.unsupported {
            return Vec::new();
        }
        // No scan while frozen: the protection pass that follows, the job running, is one.
        if self.processes.contains_key(&pid) {
            self.unprotect_first.insert(pid);
        }
        match self.register(pid, maps, inj) {
            Ok(tracked) => match self.processes.get_mut(&pid) {
                Some(t) if !tracked.is_empty() => {
                    t.since = Some(precopy_name(generation));
                    t.carry.clear();
                    tracked
                }
                _ => Vec::new(),
            },
            Err(e) => {
                self.give_up(pid, &e);
                Vec::new()
            }
        }
    }

    /// Pre-copy: protects every page `tracked` has (as registered by
    /// [`WriteTracking::precopy_protect`]; present or swapped out) in process `pid`, which
    /// runs: a page the job writes from now on shows as written at the cut. Writes before do
    /// not matter, the pre-copy reading every page afterwards. Pages never touched are left
    /// unprotected (they show as written at the cut, where they are found absent): a
    /// protected one would read as swapped out, and reading it would map a zero page; so a
    /// process tracked before has that protection taken off first. Protecting while the
    /// job runs keeps it from standing still for it (6-10 ms for 1 GiB). Each pass covers at
    /// most [`PROTECT_PIECE`] bytes: a pass holds the address space's lock, which a thread
    /// of the job may wait for. On failure nothing is trusted.
    pub fn precopy_protect_running(&mut self, pid: i32, tracked: &[(u64, u64)]) -> bool {
        let pieces: Vec<(u64, u64)> = tracked
            .iter()
            .flat_map(|&(s, e)| {
                (s..e)
                    .step_by(PROTECT_PIECE as usize)
                    .map(move |p| (p, (p + PROTECT_PIECE).min(e)))
            })
            .collect();
        let unprotected = match self.processes.get(&pid) {
            Some(t) if self.unprotect_first.remove(&pid) => pieces
                .iter()
                .try_for_each(|&(s, e)| t.tracker.unprotect(s, e)),
            _ => Ok(()),
        };
        match unprotected.and_then(|()| written_in(pid, &pieces, Protect::Existing)) {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(pid, error = %e, "pre-copy not protected");
                self.precopied(pid, None);
                false
            }
        }
    }

    /// The pre-copy of process `pid` is stored: `memory` says where (runs of staged blobs,
    /// see [`crate::capture`]'s pre-copy). `None`: it failed, and nothing it read may be
    /// trusted.
    pub fn precopied(&mut self, pid: i32, memory: Option<BaseMemory>) {
        match memory {
            Some(m) => {
                self.precopies.insert(pid, m);
            }
            None => {
                self.precopies.remove(&pid);
                if let Some(t) = self.processes.get_mut(&pid) {
                    t.since = None;
                }
            }
        }
    }

    /// Process `pid`, just restored from generation `generation` (its pack name) and not
    /// yet running, holds exactly that generation's memory: protects it, so that the next
    /// checkpoint, if it builds on that generation, reads only what the job writes from now
    /// on. `inj` runs calls in the process.
    pub(crate) fn restored(
        &mut self,
        pid: i32,
        maps: &[MapEntry],
        inj: &mut Injector,
        generation: &str,
    ) {
        if self.track_anew(pid, maps, inj).is_some() {
            self.trust_from(pid, generation, Vec::new());
        }
    }

    /// With process `pid` frozen: tracks it anew (dropping its tracker, if any), trusting
    /// nothing yet: registers its trackable mappings and protects their pages. Mappings
    /// registered with another userfaultfd are left out (those loading lazily come later,
    /// [`WriteTracking::hand_over_ranges`]). Returns the pages found unprotected, or `None`
    /// when the process is not tracked. `inj` runs calls in the process.
    pub(crate) fn track_anew(
        &mut self,
        pid: i32,
        maps: &[MapEntry],
        inj: &mut Injector,
    ) -> Option<Vec<(u64, u64)>> {
        if self.unsupported {
            return None;
        }
        self.processes.remove(&pid);
        match self.track(pid, maps, inj, Protect::Existing) {
            Ok((_, found)) => self.processes.contains_key(&pid).then_some(found),
            Err(e) => {
                self.give_up(pid, &e);
                None
            }
        }
    }

    /// Hand-over of lazily restored memory ([`crate::lazy`]), with process `pid` frozen:
    /// `ranges`, just unregistered from the userfaultfd that loaded them, hold what was
    /// restored there but for the pages the caller found written: registers them with the
    /// tracker and protects their pages. On failure the process is not tracked any more;
    /// returns whether it still is.
    pub(crate) fn hand_over_ranges(&mut self, pid: i32, ranges: &[(u64, u64)]) -> bool {
        let Some(t) = self.processes.get(&pid) else {
            return false;
        };
        let protected = ranges
            .iter()
            .try_for_each(|&(start, end)| t.tracker.register(start, end))
            .and_then(|()| written_in(pid, ranges, Protect::Existing));
        match protected {
            Ok(_) => true,
            Err(e) => {
                self.give_up(pid, &e);
                false
            }
        }
    }

    /// Process `pid` (tracked anew, [`WriteTracking::track_anew`]) holds generation
    /// `generation`'s memory but for the pages of `carry`: tracking dates from that
    /// generation, and the next cut reads `carry`.
    pub(crate) fn trust_from(&mut self, pid: i32, generation: &str, carry: Vec<(u64, u64)>) {
        if let Some(t) = self.processes.get_mut(&pid) {
            t.since = Some(generation.to_owned());
            t.carry = normalized(carry);
        }
    }

    /// Process `pid` is not tracked (a hand-over could not go on).
    pub(crate) fn forget(&mut self, pid: i32) {
        self.processes.remove(&pid);
    }

    fn give_up(&mut self, pid: i32, e: &SysError) {
        tracing::debug!(pid, error = %e, "no write tracking for this process");
        if matches!(e.errno, Errno::EINVAL | Errno::ENOSYS | Errno::ENOTTY)
            && matches!(e.op, "UFFDIO_API" | "userfaultfd" | "PAGEMAP_SCAN")
        {
            self.unsupported = true;
        }
        self.processes.remove(&pid);
    }

    /// [`WriteTracking::register`], then lists the pages of the registered ranges written
    /// since they were last protected, protecting them as `protect` says ([`written_in`]).
    /// Returns (registered ranges, written ranges).
    #[allow(clippy::type_complexity)]
    fn track(
        &mut self,
        pid: i32,
        maps: &[MapEntry],
        inj: &mut Injector,
        protect: Protect,
    ) -> Result<(Vec<(u64, u64)>, Vec<(u64, u64)>), SysError> {
        let tracked = self.register(pid, maps, inj)?;
        let written = written_in(pid, &tracked, protect)?;
        Ok((tracked, written))
    }

    /// Registers the trackable mappings of `pid` (making it a tracker first if it has none,
    /// or its tracker is bound to an address space the process left); returns the ranges
    /// registered.
    fn register(
        &mut self,
        pid: i32,
        maps: &[MapEntry],
        inj: &mut Injector,
    ) -> Result<Vec<(u64, u64)>, SysError> {
        let trackable: Vec<&MapEntry> = maps.iter().filter(|m| trackable(m)).collect();
        let pages: u64 = trackable.iter().map(|m| (m.end - m.start) / PAGE).sum();
        let room =
            self.processes.contains_key(&pid) || self.processes.len() < MAX_TRACKED_PROCESSES;
        if pages < MIN_PROCESS_PAGES || !room {
            self.processes.remove(&pid);
            return Ok(Vec::new());
        }
        let mut tracked = Vec::new();
        let mut remade = false;
        loop {
            if let Entry::Vacant(e) = self.processes.entry(pid) {
                let tracker = make_tracker(pid, inj)?;
                e.insert(Tracked {
                    tracker,
                    since: None,
                    carry: Vec::new(),
                });
                remade = true;
            }
            let tracker = &self.processes[&pid].tracker;
            tracked.clear();
            let mut stale = None;
            for m in &trackable {
                match tracker.register(m.start, m.end) {
                    Ok(()) => tracked.push((m.start, m.end)),
                    // Bound to an address space the process left (exec): ENOMEM or ESRCH
                    // for ranges the frozen process has mapped.
                    Err(e) if matches!(e.errno, Errno::ENOMEM | Errno::ESRCH) => {
                        stale = Some(e);
                        break;
                    }
                    // Registered by the program itself, or not registrable: read every time.
                    Err(_) => {}
                }
            }
            match stale {
                None => break,
                Some(e) if remade => return Err(e),
                Some(_) => {
                    self.processes.remove(&pid);
                }
            }
        }
        Ok(tracked)
    }
}

/// How [`written_in`] protects the pages it finds written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protect {
    /// Not at all: it only lists them.
    No,
    /// Those that exist (present or swapped out): pages never touched stay unprotected,
    /// reported written at every cut, and found absent there. Protecting one would leave a
    /// marker that reads as a page swapped out, and protecting a range never touched makes
    /// page tables for it: a 64 GiB reservation of which the job used 4 MiB had 131 MB of
    /// them after a checkpoint, and every later walk of its page tables (smaps, pagemap)
    /// went through them all.
    Existing,
    /// All of them, markers included: for ranges where every page exists, or nearly (a
    /// pass that looks only at protection is about six times cheaper).
    All,
}

/// Written ranges, and the same as ranges of one state each ([`written_and_states`]).
type WrittenAndStates = (Vec<(u64, u64)>, Vec<WrittenRange>);

/// The pages of `ranges` of process `pid` written since they were last protected (or never
/// protected), protected again in the same pass as `protect` says; with
/// [`Protect::Existing`], only those that exist, which it protected, are listed.
pub(crate) fn written_in(
    pid: i32,
    ranges: &[(u64, u64)],
    protect: Protect,
) -> Result<Vec<(u64, u64)>, SysError> {
    let pagemap = open_pagemap(pid)?;
    let mut written = Vec::new();
    match protect {
        Protect::No => written = written_and_states(&pagemap, pid, ranges)?.0,
        // Protecting: only within the ranges given (a mapping the program registered
        // with a userfaultfd of its own is not ours to touch).
        Protect::All => {
            for &(start, end) in ranges {
                written.extend(written_ranges(&pagemap, pid, start, end, true)?);
            }
        }
        Protect::Existing => {
            for &(start, end) in ranges {
                written.extend(uffd::protect_written(&pagemap, pid, start, end)?);
            }
        }
    }
    Ok(written)
}

/// `/proc/PID/pagemap` of process `pid`.
fn open_pagemap(pid: i32) -> Result<File, SysError> {
    let path = format!("/proc/{pid}/pagemap");
    File::open(&path).map_err(|e| SysError::new("open pagemap", pid, io_errno(&e)))
}

/// The pages of `ranges` of process `pid` written since they were last protected (or never
/// protected), without protecting them (through its `pagemap`): as ranges, and as ranges of
/// one state each (in memory, swapped out, or not there). One scan per span of ranges close
/// together rather than one per range (a process with 20,000 small mappings made as many
/// calls at every cut): what lies between them is listed too (a mapping not tracked counts
/// as written throughout) and left out again.
fn written_and_states(
    pagemap: &File,
    pid: i32,
    ranges: &[(u64, u64)],
) -> Result<WrittenAndStates, SysError> {
    let ranges = normalized(ranges.to_vec());
    let mut states = Vec::new();
    for (start, end) in spans(&ranges, SCAN_ACROSS) {
        states.extend(uffd::written_states(pagemap, pid, start, end)?);
    }
    let states = clipped(&states, &ranges);
    let written = normalized(states.iter().map(|r| (r.start, r.end)).collect());
    Ok((written, states))
}

/// The parts of `states` (sorted, disjoint) inside `ranges` (sorted, disjoint), each with
/// its state.
fn clipped(states: &[WrittenRange], ranges: &[(u64, u64)]) -> Vec<WrittenRange> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < states.len() && j < ranges.len() {
        let (s, e) = (
            states[i].start.max(ranges[j].0),
            states[i].end.min(ranges[j].1),
        );
        if s < e {
            out.push(WrittenRange {
                start: s,
                end: e,
                ..states[i]
            });
        }
        if states[i].end < ranges[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// The widest gap between two ranges that one listing scan covers both across (what lies
/// in the gap is scanned for nothing).
const SCAN_ACROSS: u64 = 1 << 20;

/// `ranges` (sorted, disjoint) joined where less than `gap` apart.
fn spans(ranges: &[(u64, u64)], gap: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for &(s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 + gap => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// `ranges` (sorted, each inside one of `within`, sorted and disjoint) with those less than
/// `gap` apart inside the same range of `within` merged.
fn coalesced(within: &[(u64, u64)], ranges: &[(u64, u64)], gap: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    let mut w = 0;
    let mut last_in = usize::MAX;
    for &(s, e) in ranges {
        while w < within.len() && within[w].1 <= s {
            w += 1;
        }
        match out.last_mut() {
            Some(last) if last_in == w && s < last.1 + gap => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
        last_in = w;
    }
    out
}

/// The parts common to `a` and `b` (each sorted and disjoint), sorted.
fn intersection(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let (s, e) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if s < e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// Sorts ranges and merges those that overlap or touch.
pub(crate) fn normalized(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Protects the written pages of `ranges` of process `pid` that exist ([`Protect::Existing`])
/// and returns those the job may have written since the cut without a trace (see
/// [`WriteTracking::protect_after_thaw`]).
fn protect_and_carry(pid: i32, ranges: &[(u64, u64)]) -> Result<Vec<(u64, u64)>, SysError> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const EXCLUSIVE: u64 = 1 << 56;
    // Pages outside what is protected here stayed protected since the cut (a write to them
    // since would show as written in this very pass), or are absent: only these pages can
    // have been written since the cut without a trace.
    let protected = written_in(pid, ranges, Protect::Existing)?;
    let mut carry: Vec<(u64, u64)> = Vec::new();
    let pagemap = crate::proc::Pagemap::open(pid)
        .map_err(|_| SysError::new("open pagemap", pid, Errno::EIO))?;
    for &(start, end) in &protected {
        let entries = pagemap
            .entries(start, end)
            .map_err(|_| SysError::new("read pagemap", pid, Errno::EIO))?;
        for (i, e) in entries.iter().enumerate() {
            // Still shared with the snapshot: not written since the cut. Absent since
            // (zapped): unprotected, so the next cut finds it written.
            let shared = e & PRESENT != 0 && e & EXCLUSIVE == 0;
            if shared || e & (PRESENT | SWAPPED) == 0 {
                continue;
            }
            let addr = start + i as u64 * PAGE;
            match carry.last_mut() {
                Some(last) if last.1 == addr => last.1 = addr + PAGE,
                _ => carry.push((addr, addr + PAGE)),
            }
        }
    }
    Ok(carry)
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Has frozen process `pid` make a userfaultfd, takes it over and closes the process's
/// descriptor.
fn make_tracker(pid: i32, inj: &mut Injector) -> Result<WriteTracker, SysError> {
    let fd = inj.call("userfaultfd", libc::SYS_userfaultfd, &[USERFAULTFD_FLAGS])?;
    let fd = i32::try_from(fd).unwrap_or(-1);
    let taken = pidfd_open(pid).and_then(|p| pidfd_getfd(&p, fd, pid));
    let closed = inj.call("close", libc::SYS_close, &[fd as u64]);
    let tracker = WriteTracker::new(taken?, pid)?;
    closed?;
    Ok(tracker)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesced_merges_nearby_ranges_only_inside_one_tracked_range() {
        let within = [(0, 100), (100, 200)];
        let r = [(10, 11), (15, 16), (40, 41), (95, 100), (100, 101)];
        assert_eq!(
            coalesced(&within, &r, 10),
            vec![(10, 16), (40, 41), (95, 100), (100, 101)]
        );
        assert_eq!(coalesced(&within, &r, 1000), vec![(10, 100), (100, 101)]);
        assert_eq!(coalesced(&within, &[], 10), vec![]);
    }

    #[test]
    fn spans_join_ranges_close_together_and_what_they_list_is_cut_back_to_the_ranges() {
        let tracked = [(0, 10), (12, 20), (40, 50), (51, 60)];
        assert_eq!(spans(&tracked, 2), vec![(0, 20), (40, 60)]);
        assert_eq!(spans(&tracked, 100), vec![(0, 60)]);
        assert_eq!(spans(&tracked, 0), tracked.to_vec());
        // A scan of a span lists what lies between the ranges (an untracked mapping counts
        // as written throughout): left out again.
        let listed = [(5, 15), (20, 45), (55, 60)];
        assert_eq!(
            intersection(&listed, &tracked),
            vec![(5, 10), (12, 15), (40, 45), (55, 60)]
        );
    }

    #[test]
    fn ranges_are_sorted_and_merged_when_they_overlap_or_touch() {
        let r = normalized(vec![(30, 40), (0, 10), (10, 20), (35, 50), (60, 70)]);
        assert_eq!(r, vec![(0, 20), (30, 50), (60, 70)]);
        assert!(normalized(Vec::new()).is_empty());
    }

    /// Pages at 0x1000-step addresses in a small made-up layout: tracked ranges, written
    /// ranges (some outside the tracked ones, as carried-over pages may be) and base runs.
    fn layout(seed: u64) -> Unchanged {
        let mut x = seed | 1;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut ranges = |count: u64, len: u64| {
            normalized(
                (0..count)
                    .map(|_| {
                        let s = next(200) * PAGE;
                        (s, s + (1 + next(len)) * PAGE)
                    })
                    .collect(),
            )
        };
        let tracked = ranges(6, 40);
        let written = ranges(10, 5);
        let mut first = 0;
        let runs = ranges(8, 20)
            .into_iter()
            .map(|(s, e)| {
                let r = (s, e, first);
                first += u32::try_from((e - s) / PAGE).unwrap();
                r
            })
            .collect();
        Unchanged {
            tracked,
            written,
            base: BaseMemory { runs },
            reused: Reused::Base,
            states: Vec::new(),
        }
    }

    #[test]
    fn the_cursor_agrees_with_the_lookup_everywhere() {
        for seed in 1..200 {
            let u = layout(seed);
            let from = (seed % 7) * PAGE;
            let mut c = u.cursor(from);
            let mut known = 0;
            let mut saved = 0;
            for page in from / PAGE..260 {
                let addr = page * PAGE;
                let want = u.lookup(addr);
                assert_eq!(c.at(addr), want, "seed {seed}, page {page}");
                // The same address twice in a row (save_pages asks so) answers the same.
                assert_eq!(c.at(addr), want, "seed {seed}, page {page} again");
                known += u64::from(want.is_some());
                saved += u64::from(matches!(want, Some(Some(_))));
            }
            if from == 0 {
                assert_eq!(u.known_pages(), known, "seed {seed}");
                assert_eq!(u.saved_pages(), saved, "seed {seed}");
            }
        }
    }

    /// Every page of a stretch `known_run_until` gives is known unchanged, its blob the
    /// first one's plus its place (or zero like the first), and the page after it is not.
    #[test]
    fn known_runs_hold_following_blobs_and_end_where_that_stops() {
        for seed in 1..200 {
            let u = layout(seed);
            let mut c = u.cursor(0);
            let mut page = 0;
            let mut stretches = 0;
            while page < 260 {
                let addr = page * PAGE;
                let Some(first) = c.at(addr) else {
                    page += 1;
                    continue;
                };
                let end = c.known_run_until(addr).min(260 * PAGE);
                assert!(end > addr, "seed {seed}, page {page}");
                for (k, a) in (addr..end).step_by(PAGE as usize).enumerate() {
                    let want = first.map(|b| b + k as u32);
                    assert_eq!(
                        u.lookup(a),
                        Some(want),
                        "seed {seed}, {a:#x} in {addr:#x}-{end:#x}"
                    );
                }
                let after = u.lookup(end);
                let continues = match (first, after) {
                    (Some(b), Some(Some(n))) => n == b + ((end - addr) / PAGE) as u32,
                    (None, Some(None)) => true,
                    _ => false,
                };
                // A stretch may stop at a base run's edge where the next run's blobs happen
                // to follow on; it never stops inside a run of following blobs.
                if continues {
                    assert!(
                        u.base.runs.iter().any(|r| r.0 == end || r.1 == end),
                        "seed {seed}: stretch {addr:#x}-{end:#x} stops inside a run"
                    );
                }
                stretches += 1;
                page = end / PAGE;
            }
            assert!(stretches > 0 || u.known_pages() == 0, "seed {seed}");
        }
    }

    #[test]
    fn states_are_clipped_to_the_tracked_ranges_and_looked_up_in_order() {
        let state = |start, end, present| WrittenRange {
            start,
            end,
            present,
            swapped: false,
        };
        // A span scanned across two tracked ranges: what lies between is left out.
        let scanned = [state(0x1000, 0x5000, true), state(0x5000, 0x9000, false)];
        let tracked = [(0x2000, 0x4000), (0x6000, 0xa000)];
        let states = clipped(&scanned, &tracked);
        assert_eq!(
            states,
            vec![state(0x2000, 0x4000, true), state(0x6000, 0x9000, false)]
        );
        let u = Unchanged {
            tracked: tracked.to_vec(),
            written: vec![(0x2000, 0x4000), (0x6000, 0x9000)],
            states,
            ..Unchanged::default()
        };
        let mut s = u.states(0x1000);
        assert_eq!(s.at(0x1000), None);
        assert!(s.at(0x3000).is_some_and(|r| r.present));
        assert_eq!(s.at(0x4000), None, "between the ranges");
        assert!(s.at(0x8000).is_some_and(|r| !r.present && !r.swapped));
        assert_eq!(s.at(0x9000), None, "written before, not by the cut's scan");
    }

    #[test]
    fn a_lookup_names_the_base_blob_of_the_page() {
        let u = Unchanged {
            tracked: vec![(0x10000, 0x20000)],
            written: vec![(0x12000, 0x13000)],
            base: BaseMemory {
                runs: vec![(0x10000, 0x14000, 7)],
            },
            reused: Reused::Base,
            states: Vec::new(),
        };
        assert_eq!(u.lookup(0x10000), Some(Some(7)));
        assert_eq!(u.lookup(0x11000), Some(Some(8)));
        assert_eq!(u.lookup(0x12000), None, "written");
        assert_eq!(u.lookup(0x13000), Some(Some(10)));
        assert_eq!(
            u.lookup(0x14000),
            Some(None),
            "unchanged, not in the base: zero"
        );
        assert_eq!(u.lookup(0x20000), None, "not tracked");
        assert_eq!(u.known_pages(), 15);
    }
}
