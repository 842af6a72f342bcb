//! Capturing one frozen process into its saved state.

use stasis_image::manifest::{MmFields, ProcessImage, Rlimit, Vma, VmaKind};
use stasis_image::pack::{PackWriter, Reused};
use stasis_sys::inject::Injector;
use stasis_sys::{Errno, process, ptrace};

use super::content::FileContents;
use super::early::{EarlyMaps, ExactFlags, FlagsFrom};
use super::files::FileTable;
use super::memory::{
    CopiedPages, SharedObjects, Source, advice_of, capture_vmas, pages_to_copy, private_pages,
};
use super::snapshot::{PendingMemory, PendingSource, snapshot_can_read, take};
use super::threads::{capture_sigactions, capture_thread, capture_timers};
use crate::error::{CoreError, CoreResult, SysContext};
use crate::freeze::{Frozen, stack_scratch};
use crate::proc::{self, MapEntry};
use crate::tracking::{Unchanged, WriteTracking};
use crate::vdso::{VdsoInfo, vdso_info};

const NUM_RLIMITS: u32 = 16;

fn hex_field(pid_path: &str, key: &str) -> CoreResult<u64> {
    Ok(u64::from_str_radix(&proc::status_field(pid_path, key)?, 16).unwrap_or(0))
}

/// Job-wide tables filled while capturing the processes of one job.
#[derive(Debug)]
pub struct JobTables<'a> {
    /// Page pack being written.
    pub pack: &'a mut PackWriter,
    /// Open file descriptions.
    pub files: FileTable,
    /// Shared memory objects.
    pub shared: SharedObjects,
    /// Content hashes and saved contents of the job's files.
    pub contents: FileContents,
    /// With copy-on-write snapshots: the private memory still to be read from them (one
    /// entry per process). `None`: memory is read while the job is frozen.
    pub pending: Option<&'a mut Vec<PendingMemory>>,
    /// Write tracking kept between checkpoints, if any.
    pub tracking: Option<&'a mut WriteTracking>,
    /// Pages write tracking knew unchanged since the base generation, over all processes
    /// so far.
    pub unchanged_pages: u64,
    /// Pages write tracking knew unchanged since this checkpoint's pre-copy (stored then).
    pub precopied_pages: u64,
    /// Mappings with flags read before the freeze.
    pub early_maps: &'a EarlyMaps,
    /// Mappings whose flags were read early, by process, to check afterwards.
    pub early_flags: Vec<(i32, Vec<MapEntry>)>,
    /// smaps being read while the job is frozen, for processes whose flags are carried.
    pub(crate) exact: Option<ExactFlags>,
    /// With write tracking, the most bytes the next cut may copy out of each process
    /// captured (see [`COPY_SHARE`]).
    pub copy_bounds: Vec<usize>,
}

/// A process's private memory is copied out while it is frozen, instead of read from a
/// copy-on-write snapshot, when what is left to read once write tracking's unchanged pages
/// are known is at most this share of its anonymous memory. Measured on a 1 GiB process:
/// copying 2600 scattered pages (10 MiB) took 9 ms where the fork took 20-30 ms; copying
/// 80 MiB, 80 ms. Into buffers kept from the checkpoint before (`spare`), 2600 pages take
/// 2-6 ms to find and 2-3 ms to copy, and 10,500 pages at 4 GiB 8 and 9 ms (32 ms into
/// fresh memory, up to 120 ms on the first cut).
const COPY_SHARE: u64 = 64;

/// The runs of pages of process `pid` to copy at the cut, when few enough (see
/// [`COPY_SHARE`]); `deferred` are the mappings whose pages are pending, `anon` the pages
/// of anonymous memory of the process ([`proc::anon_pages`]).
fn runs_to_copy(
    pid: i32,
    anon: u64,
    deferred: &[(usize, MapEntry, VmaKind)],
    unchanged: &Unchanged,
) -> CoreResult<Option<Vec<(u64, usize)>>> {
    let known = unchanged.known_pages();
    // Written tracked pages (some perhaps not present) and untracked anonymous ones (as
    // smaps last counted them; 0 where the flags came from the kernel's list): when
    // even a fair share of those is too much, the exact count is not worth reading.
    let untracked: u64 = deferred
        .iter()
        .filter(|(_, m, _)| !unchanged.is_tracked(m.start))
        .map(|(_, m, _)| m.anon_pages)
        .sum();
    let at_most = unchanged.tracked_pages() - known + untracked;
    if known == 0 || at_most * 8 > anon {
        return Ok(None);
    }
    let mut runs = Vec::new();
    for (_, m, kind) in deferred {
        runs.extend(pages_to_copy(pid, m, *kind, unchanged)?);
    }
    let pages = runs.iter().map(|r| r.1 as u64).sum::<u64>() / 4096;
    Ok((pages * COPY_SHARE <= anon).then_some(runs))
}

/// The mappings of frozen process `pid` with their flags as smaps gives them now (read on
/// a thread of its own since the freeze, when it is).
fn exact_flags(tables: &mut JobTables<'_>, pid: i32) -> CoreResult<Vec<MapEntry>> {
    match tables.exact.as_mut() {
        Some(e) => e.get(pid),
        None => proc::maps(pid),
    }
}

/// What [`mend_flags`] needs to read now the mappings a snapshot cannot give after all.
struct Reread<'a> {
    deferred: &'a mut Vec<(usize, MapEntry, VmaKind)>,
    pack: &'a mut PackWriter,
    unchanged: &'a Unchanged,
}

/// Mends what the flags carried from the previous checkpoint (`used`) decided for frozen
/// process `pid`, given `exact`, read from smaps while it stands frozen: the advice
/// recorded for each mapping, its growing down, and with `reread` (a snapshot follows)
/// the private pages of mappings it would lack or hold wiped, read now instead. A mapping
/// whose may-write flag changed without its bounds changing (it was mapped again) is
/// refused: whether a shared file's content counts as written was decided on it.
fn mend_flags(
    pid: i32,
    used: &[MapEntry],
    exact: &[MapEntry],
    vmas: &mut [Vma],
    mut reread: Option<Reread<'_>>,
) -> CoreResult<()> {
    let what = |m: &MapEntry| format!("{:#x}-{:#x} {}", m.start, m.end, m.path);
    let matters = |m: &MapEntry| {
        let flags = (m.has_flag("gd"), m.has_flag("mw"), m.has_flag("nr"));
        (advice_of(m), flags)
    };
    for (i, u) in used.iter().enumerate() {
        // Registering mappings with write tracking at the cut may have merged one with its
        // neighbour since `used` was read: the exact reading's mapping then holds it.
        let j = exact.partition_point(|e| e.end <= u.start);
        let Some(e) = exact.get(j).filter(|e| holds(e, u)) else {
            return Err(CoreError::ChangedDuringCheckpoint {
                pid,
                what: what(u),
                why: "smaps read while it stood frozen does not have it".into(),
            });
        };
        if matters(u) == matters(e) {
            continue;
        }
        let m = MapEntry {
            flags: e.flags.clone(),
            ..u.clone()
        };
        let Some(vma) = vmas.get_mut(i) else {
            continue;
        };
        if vma.kind == VmaKind::File && m.shared && u.has_flag("mw") != m.has_flag("mw") {
            return Err(CoreError::ChangedDuringCheckpoint {
                pid,
                what: what(u),
                why: format!("its flags went from {:?} to {:?}", u.flags, m.flags),
            });
        }
        vma.advice = advice_of(&m);
        vma.growsdown = m.has_flag("gd");
        vma.noreserve = m.has_flag("nr");
        if let Some(r) = reread.as_mut()
            && !snapshot_can_read(&m)
            && let Some(at) = r.deferred.iter().position(|d| d.0 == i)
        {
            let (_, _, kind) = r.deferred.remove(at);
            vma.pages = private_pages(pid, &m, kind, r.pack, Source::Live, r.unchanged)?;
        }
    }
    Ok(())
}

/// Whether mapping `outer` covers all of mapping `inner`: the same kind of mapping of the
/// same object, at the same offset for the part they share.
fn holds(outer: &MapEntry, inner: &MapEntry) -> bool {
    outer.start <= inner.start
        && inner.end <= outer.end
        && (outer.prot, outer.shared, outer.inode) == (inner.prot, inner.shared, inner.inode)
        && outer.dev == inner.dev
        && outer.path == inner.path
        && (outer.inode == 0 || outer.offset + (inner.start - outer.start) == inner.offset)
}

/// Captures one frozen process, the `index`th of its job: threads, memory, descriptors and
/// process-wide state. `ppid` is its parent's pid in the job's namespace.
pub fn capture_process(
    frozen: &Frozen,
    index: usize,
    ppid: i32,
    tables: &mut JobTables<'_>,
) -> CoreResult<(ProcessImage, VdsoInfo)> {
    let pid = frozen.pid;
    let pid_path = format!("/proc/{pid}");
    let t_start = std::time::Instant::now();
    let (maps, flags_from) = tables.early_maps.maps(pid)?;
    if flags_from == FlagsFrom::Early {
        tables.early_flags.push((pid, maps.clone()));
    }
    let vdso = vdso_info(pid, &maps)?;
    let threads = frozen
        .threads
        .iter()
        .map(|t| capture_thread(pid, t, vdso.syscall_insn))
        .collect::<CoreResult<Vec<_>>>()?;

    let main = frozen.threads[0].tid;
    let scratch = stack_scratch(main)?;
    let mut inj = Injector::new(main, vdso.syscall_insn);
    let t_threads = std::time::Instant::now();
    let sigactions = capture_sigactions(&mut inj, scratch)?;
    let t_sigactions = std::time::Instant::now();
    let brk = inj
        .call("brk", libc::SYS_brk, &[0])
        .ctx(|| format!("reading the program break of process {pid}"))?;
    let (itimers, posix_timers) = capture_timers(pid, &mut inj, scratch)?;
    let shared_pending = ptrace::peek_siginfo(main, true)
        .ctx(|| format!("reading shared pending signals of process {pid}"))?
        .iter()
        .map(|s| s.to_vec())
        .collect();

    let mut rlimits = Vec::new();
    for resource in 0..NUM_RLIMITS {
        match process::prlimit(pid, resource, None) {
            Ok((cur, max)) => rlimits.push(Rlimit { resource, cur, max }),
            Err(e) if e.errno == Errno::EINVAL => {}
            Err(e) => {
                return Err(e)
                    .ctx(|| format!("reading resource limit {resource} of process {pid}"));
            }
        }
    }
    let st = proc::stat(pid)?;
    let personality = std::fs::read_to_string(format!("{pid_path}/personality"))
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
        .unwrap_or(0);
    let t_state = std::time::Instant::now();
    let fds =
        tables
            .files
            .capture_process(pid, &mut tables.shared, &mut tables.contents, tables.pack)?;
    let t_fds = std::time::Instant::now();
    let ns_pid = proc::ns_pid(&pid_path)?;
    let unchanged = match tables.tracking.as_deref_mut() {
        Some(t) => {
            let name = tables.pack.name().to_owned();
            t.cut(pid, ns_pid, &maps, &mut inj, tables.pack.base(), &name)
        }
        None => Unchanged::default(),
    };
    let mut anon = 0;
    if tables.tracking.is_some() {
        anon = proc::anon_pages(pid)?;
        let bound = anon * 4096 / COPY_SHARE;
        tables
            .copy_bounds
            .push(usize::try_from(bound).unwrap_or(usize::MAX));
    }
    let t_tracked = std::time::Instant::now();
    if flags_from == FlagsFrom::Carried
        && let Some(exact) = tables.exact.as_mut()
    {
        // Not before: the injected calls above take the job's memory map for writing,
        // which would wait for the page walk.
        exact.read_beside(pid);
    }
    let known_pages = unchanged.known_pages();
    let mut deferred = Vec::new();
    let mut vmas = capture_vmas(
        pid,
        &maps,
        &mut tables.shared,
        &mut tables.contents,
        tables.pack,
        tables.pending.is_some().then_some(&mut deferred),
        &unchanged,
    )?;
    match unchanged.reused() {
        Reused::Staged => tables.precopied_pages += unchanged.saved_pages(),
        Reused::Base => tables.unchanged_pages += unchanged.saved_pages(),
    }
    let t_vmas = std::time::Instant::now();
    let carried = flags_from == FlagsFrom::Carried;
    if tables.pending.is_some() {
        // Little to read: copy it now rather than pay for a snapshot.
        let source = if let Some(runs) = runs_to_copy(pid, anon, &deferred, &unchanged)? {
            let t_found = std::time::Instant::now();
            let pages = CopiedPages::gather(pid, &runs)?;
            let t_copied = std::time::Instant::now();
            if let Some(t) = tables.tracking.as_deref_mut() {
                let copied: Vec<(u64, u64)> =
                    runs.iter().map(|&(a, n)| (a, a + n as u64)).collect();
                t.protect_frozen(pid, &copied);
            }
            if carried {
                let exact = exact_flags(tables, pid)?;
                mend_flags(pid, &maps, &exact, &mut vmas, None)?;
            }
            tracing::debug!(
                pid,
                copied = pages.len(),
                find_ms = (t_found - t_vmas).as_secs_f64() * 1e3,
                copy_ms = (t_copied - t_found).as_secs_f64() * 1e3,
                protect_ms = t_copied.elapsed().as_secs_f64() * 1e3,
                "copied at the cut"
            );
            PendingSource::Copied { pid, pages }
        } else {
            if carried {
                // What the snapshot is to give depends on the flags: the exact ones first.
                let exact = exact_flags(tables, pid)?;
                let reread = Reread {
                    deferred: &mut deferred,
                    pack: tables.pack,
                    unchanged: &unchanged,
                };
                mend_flags(pid, &maps, &exact, &mut vmas, Some(reread))?;
            }
            PendingSource::Snapshot(take(frozen, vdso.syscall_insn)?)
        };
        if let Some(pending) = tables.pending.as_mut() {
            pending.push(PendingMemory {
                process: index,
                source,
                vmas: deferred,
                unchanged,
            });
        }
    } else if carried {
        let exact = exact_flags(tables, pid)?;
        mend_flags(pid, &maps, &exact, &mut vmas, None)?;
    }
    tracing::debug!(
        pid,
        threads_ms = (t_threads - t_start).as_secs_f64() * 1e3,
        sigactions_ms = (t_sigactions - t_threads).as_secs_f64() * 1e3,
        state_ms = (t_state - t_sigactions).as_secs_f64() * 1e3,
        fds_ms = (t_fds - t_state).as_secs_f64() * 1e3,
        tracking_ms = (t_tracked - t_fds).as_secs_f64() * 1e3,
        known_pages,
        vmas_ms = (t_vmas - t_tracked).as_secs_f64() * 1e3,
        snapshot_ms = t_vmas.elapsed().as_secs_f64() * 1e3,
        "capture phases"
    );
    let image = ProcessImage {
        pid: ns_pid,
        ppid,
        pgid: proc::ns_field(pid, "NSpgid"),
        sid: proc::ns_field(pid, "NSsid"),
        zombie: None,
        shares_parent_files: false,
        exe: proc::link(pid, "exe")?,
        cmdline: proc::cmdline(pid),
        cwd: proc::link(pid, "cwd")?,
        umask: u32::from_str_radix(&proc::status_field(&pid_path, "Umask")?, 8).unwrap_or(0o022),
        mm: MmFields {
            start_code: st.start_code,
            end_code: st.end_code,
            start_data: st.start_data,
            end_data: st.end_data,
            start_brk: st.start_brk,
            brk,
            start_stack: st.start_stack,
            arg_start: st.arg_start,
            arg_end: st.arg_end,
            env_start: st.env_start,
            env_end: st.env_end,
        },
        auxv: proc::auxv(pid)?,
        rlimits,
        sigactions,
        shared_pending,
        itimers,
        posix_timers,
        caps: [
            hex_field(&pid_path, "CapInh")?,
            hex_field(&pid_path, "CapPrm")?,
            hex_field(&pid_path, "CapEff")?,
        ],
        personality,
        threads,
        vmas,
        fds,
    };
    Ok((image, vdso))
}

/// The saved state of a zombie: identity, parent and exit status only.
pub fn capture_zombie(pid: i32, ppid: i32) -> CoreResult<ProcessImage> {
    let status = proc::state(pid).map_or(0, |s| s.1);
    Ok(ProcessImage {
        pid: proc::ns_pid(&format!("/proc/{pid}"))?,
        ppid,
        pgid: proc::ns_field(pid, "NSpgid"),
        sid: proc::ns_field(pid, "NSsid"),
        zombie: Some(status),
        ..ProcessImage::default()
    })
}
