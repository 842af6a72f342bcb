//! Pre-copy: a checkpoint that would read all of a large process's memory (its first, or
//! the first since write tracking lost track) reads it before the cut, while the job runs.
//!
//! The job is frozen for a moment, while each large process's private anonymous mappings
//! are registered with write tracking (a few milliseconds, where the copy-on-write
//! snapshot's fork takes 20-30 ms for 1 GiB). The job runs again; every page of those
//! mappings is protected against writes, then read and stored as staged blobs of the new
//! generation's pack. At the cut, write tracking tells which pages the job wrote since
//! they were protected: only those are read then (copied at the cut when few, else from a
//! snapshot); the chunks of the others are made of the staged blobs. A page written while
//! the pre-copy read it was written after its protection, so it is read again at the cut:
//! a torn read is never kept.

use std::collections::HashMap;
use std::time::Instant;

use stasis_image::pack::{BaseMemory, PackWriter};
use stasis_sys::inject::Injector;

use super::memory::stage_pages;
use crate::error::{CoreError, CoreResult};
use crate::freeze::freeze_job;
use crate::proc;
use crate::tracking::WriteTracking;
use crate::vdso::vdso_info;

/// A process is pre-copied when at least this many of its anonymous pages are resident
/// (32 MiB): the fork of a copy-on-write snapshot costs per page present (20-30 ms for
/// 1 GiB), and below this it costs about what a second freeze does.
const PRECOPY_MIN_PAGES: u64 = 8192;

/// What a pre-copy did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Precopy {
    /// Processes pre-copied.
    pub processes: usize,
    /// Raw bytes stored.
    pub staged_bytes: u64,
    /// Milliseconds the job stood still (registering its mappings).
    pub frozen_ms: f64,
    /// Milliseconds reading and storing, the job running.
    pub read_ms: f64,
}

/// How many anonymous pages process `pid` has resident: resident pages less those backed
/// by files or shared memory, from `/proc/PID/statm` (kept counts; no page table is
/// walked). It is pre-copied from [`PRECOPY_MIN_PAGES`] on.
fn anon_resident(pid: i32) -> u64 {
    let Ok(statm) = std::fs::read_to_string(format!("/proc/{pid}/statm")) else {
        return 0;
    };
    let fields: Vec<u64> = statm
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    match fields.as_slice() {
        [_, resident, shared, ..] => resident.saturating_sub(*shared),
        _ => 0,
    }
}

/// Pre-copies the large processes of the job below `supervisor` (but its `init`; `root`
/// is the job's first process) that `tracking` would otherwise read whole at the next cut,
/// into `pack` (the generation being written). The cut must follow with the same
/// `tracking` and `pack`. A process whose memory cannot be read while it runs (it exits,
/// unmaps memory meanwhile) is simply not pre-copied; an error storing fails it all.
pub fn precopy_job(
    supervisor: i32,
    init: Option<i32>,
    root: i32,
    tracking: &mut WriteTracking,
    pack: &mut PackWriter,
) -> CoreResult<Precopy> {
    let mut done = Precopy::default();
    let wanted: Vec<(i32, u64)> = proc::descendants(supervisor)
        .into_iter()
        .filter(|&p| Some(p) != init && tracking.reads_everything(p, pack.base()))
        .map(|p| (p, anon_resident(p)))
        .filter(|&(_, pages)| pages >= PRECOPY_MIN_PAGES)
        .collect();
    if wanted.is_empty() {
        return Ok(done);
    }
    // Room for their blobs at once, rather than growing (a table rehashed into freshly
    // faulted memory at every doubling).
    pack.reserve_blobs(wanted.iter().map(|&(_, pages)| pages as usize).sum());
    let wanted: Vec<i32> = wanted.into_iter().map(|(p, _)| p).collect();
    let t0 = Instant::now();
    let frozen = freeze_job(supervisor, init, root)?;
    let mut insns = HashMap::new();
    let mut todo = Vec::new();
    let mut failed = None;
    for f in &frozen.processes {
        let protected = (|| -> CoreResult<()> {
            let maps = proc::maps_without_flags(f.pid)?;
            let insn = vdso_info(f.pid, &maps)?.syscall_insn;
            insns.insert(f.pid, insn);
            if wanted.contains(&f.pid) {
                let mut inj = Injector::new(f.threads[0].tid, insn);
                let tracked = tracking.precopy_protect(f.pid, &maps, &mut inj, pack.name());
                if !tracked.is_empty() {
                    todo.push((f.pid, maps, tracked));
                }
            }
            Ok(())
        })();
        if let Err(e) = protected {
            failed = Some(e);
            break;
        }
    }
    frozen.thaw(&insns)?;
    if let Some(e) = failed {
        for (pid, _, _) in todo {
            tracking.precopied(pid, None);
        }
        return Err(e);
    }
    let t_thawed = Instant::now();
    done.frozen_ms = (t_thawed - t0).as_secs_f64() * 1e3;
    for (pid, maps, tracked) in todo {
        let t_protect = Instant::now();
        if !tracking.precopy_protect_running(pid, &tracked) {
            continue;
        }
        tracing::debug!(
            pid,
            protect_ms = t_protect.elapsed().as_secs_f64() * 1e3,
            "pre-copy protected"
        );
        let mut runs = Vec::new();
        let mut stored = Ok(());
        for &(start, end) in &tracked {
            let Some(m) = maps.iter().find(|m| m.start == start && m.end == end) else {
                continue;
            };
            match stage_pages(pid, m, pack) {
                Ok(r) => runs.extend(r),
                Err(e) => {
                    stored = Err(e);
                    break;
                }
            }
        }
        match stored {
            Ok(()) => {
                done.processes += 1;
                done.staged_bytes += runs.iter().map(|r| r.1 - r.0).sum::<u64>();
                tracking.precopied(pid, Some(BaseMemory { runs }));
            }
            Err(e) => {
                tracking.precopied(pid, None);
                if matches!(e, CoreError::Image(_)) {
                    return Err(e);
                }
                tracing::debug!(pid, error = %e, "not pre-copied");
            }
        }
    }
    done.read_ms = t_thawed.elapsed().as_secs_f64() * 1e3;
    Ok(done)
}
