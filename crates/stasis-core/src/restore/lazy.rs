//! Preparing a process for lazy restore: which mappings load lazily, and arming its
//! userfaultfd once everything else is restored (see [`crate::lazy`]).

use std::collections::BTreeMap;

use stasis_image::OpenGeneration;
use stasis_image::manifest::{PageRun, ProcessImage, Vma, VmaKind};
use stasis_sys::mem;
use stasis_sys::process::{pidfd_getfd, pidfd_open};
use stasis_sys::uffd::{LAZY_USERFAULTFD_FLAGS, LazyMemoryFd, present_ranges};

use super::child::{Child, sys};
use crate::error::{CoreError, CoreResult};
use crate::lazy::{LazyProcess, Piece};

const PAGE: u64 = 4096;

/// The mappings of one process left empty for lazy loading, and their saved pieces.
#[derive(Debug, Default)]
pub(super) struct LazyPlan {
    ranges: Vec<(u64, u64)>,
    pending: BTreeMap<u64, Piece>,
    /// Pages the restore itself makes the kernel write (rseq areas): filled eagerly.
    eager: Vec<(u64, u64)>,
    /// Record which pages the program writes while they load (for write tracking).
    record_writes: bool,
}

impl LazyPlan {
    /// A plan for process `p`.
    pub fn new(p: &ProcessImage, record_writes: bool) -> Self {
        let eager = p
            .threads
            .iter()
            .filter(|t| t.rseq.ptr != 0)
            .map(|t| {
                (
                    t.rseq.ptr & !(PAGE - 1),
                    (t.rseq.ptr + u64::from(t.rseq.len)).div_ceil(PAGE) * PAGE,
                )
            })
            .collect();
        LazyPlan {
            eager,
            record_writes,
            ..Default::default()
        }
    }

    /// Whether mapping `v` loads lazily: private anonymous memory (the only kind a
    /// userfaultfd serves missing pages of, besides shared memory restored whole) with
    /// saved pages, that a fork copies as it is (the loader hands a forked child a copy of
    /// what is still missing).
    pub fn takes(&self, v: &Vma) -> bool {
        matches!(v.kind, VmaKind::Anon | VmaKind::Heap | VmaKind::Stack)
            && v.file.is_none()
            && v.shmem.is_none()
            && v.sysv.is_none()
            && !v.shared
            && !v.pages.is_empty()
            && !v.advice.iter().any(|a| a.changes_fork())
    }

    /// Records mapping `v` (taken with [`LazyPlan::takes`]) as left empty, but for the
    /// runs the restore needs early (rseq areas, which the kernel writes before the thread
    /// runs): those are returned, to be filled now.
    pub fn add<'v>(&mut self, v: &'v Vma, chunk_len: impl Fn(u32) -> u64) -> Vec<&'v PageRun> {
        self.ranges.push((v.start, v.end));
        let mut now = Vec::new();
        for r in &v.pages {
            let end = r.addr + chunk_len(r.chunk);
            if self.eager.iter().any(|&(s, e)| r.addr < e && s < end) {
                now.push(r);
                continue;
            }
            self.pending.insert(
                r.addr,
                Piece {
                    end,
                    chunk: r.chunk,
                    offset: 0,
                },
            );
        }
        now
    }

    /// Has the process make a userfaultfd (which sees kernel faults and follows forks),
    /// takes it over and registers the empty mappings on it. Call after every other restore
    /// step that runs code in the process, before its capabilities are dropped. `None` when
    /// nothing loads lazily — also when the process may not make such a userfaultfd (no
    /// `CAP_SYS_PTRACE` there): its memory is then filled now.
    pub fn arm(
        mut self,
        c: &mut Child,
        image: &mut OpenGeneration,
    ) -> CoreResult<Option<LazyProcess>> {
        if self.ranges.is_empty() {
            return Ok(None);
        }
        self.ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (s, e) in self.ranges {
            match merged.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => merged.push((s, e)),
            }
        }
        // No page left for loading may exist yet: it would never be loaded.
        let path = format!("/proc/{}/pagemap", c.pid);
        let pagemap =
            std::fs::File::open(&path).map_err(|source| CoreError::Io { path, source })?;
        for &(s, e) in &merged {
            let present = present_ranges(&pagemap, c.pid, s, e)
                .map_err(sys("listing pages of memory left for lazy loading"))?;
            for (a, b) in present {
                let hit = self
                    .pending
                    .range(..b)
                    .next_back()
                    .filter(|(_, p)| p.end > a);
                if let Some((at, _)) = hit {
                    return Err(CoreError::Incompatible(format!(
                        "restoring process {}: memory at {:#x} left for lazy loading was written during the restore; restart with --eager",
                        c.pid,
                        a.max(*at)
                    )));
                }
            }
        }
        let Ok(fd) = c.call(
            "making a userfaultfd for lazy loading",
            libc::SYS_userfaultfd,
            &[LAZY_USERFAULTFD_FLAGS],
        ) else {
            for (&start, piece) in &self.pending {
                let data = image.chunk(piece.chunk)?;
                mem::write(c.pid, start, &data)
                    .map_err(sys("filling memory lazy loading was refused for"))?;
            }
            return Ok(None);
        };
        let fd = i32::try_from(fd).unwrap_or(-1);
        let taken = pidfd_open(c.pid).and_then(|p| pidfd_getfd(&p, fd, c.pid));
        c.call(
            "closing its userfaultfd",
            libc::SYS_close,
            &[u64::try_from(fd).unwrap_or(u64::MAX)],
        )?;
        let uffd = LazyMemoryFd::new(
            taken.map_err(sys("taking over a userfaultfd"))?,
            c.pid,
            self.record_writes,
        )
        .map_err(sys("setting up a userfaultfd for lazy loading"))?;
        for &(s, e) in &merged {
            uffd.register(s, e)
                .map_err(sys("registering memory for lazy loading"))?;
        }
        Ok(Some(LazyProcess {
            fd: uffd,
            pid: c.pid,
            pending: self.pending,
            ranges: merged,
            moved: Vec::new(),
            forked: false,
            asked: Default::default(),
            handing: None,
        }))
    }
}
