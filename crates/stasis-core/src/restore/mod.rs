//! Restoring a job by remote control.
//!
//! The restorer stages every descriptor the job needs ([`stage`]), creates all processes
//! parked and traced with their original pids and parents ([`tree`]), rebuilds each one by
//! injected system calls — address space ([`memory`]), descriptors, process-wide state,
//! threads and signals ([`state`]) — and only then loads every thread's registers and lets
//! the whole job run at once.

mod child;
mod files;
mod inotify;
mod lazy;
mod memory;
mod sockets;
mod stage;
mod state;
mod tree;

use stasis_image::OpenGeneration;
use stasis_image::manifest::{Manifest, ProcessImage};
use stasis_sys::inject::{Injector, find_syscall_insn};
use stasis_sys::{mem, process, ptrace};

use crate::error::{CoreError, CoreResult, SysContext};
use crate::lazy::PendingMemory;
use crate::tracking::WriteTracking;
use crate::{proc, regs};
use child::{Child, sys};
use stage::Staged;

pub use files::{FileReport, check_file, check_files, prepare_files};
pub use stasis_sys::uffd::check_lazy_allowed;

const SCRATCH_LEN: u64 = 16 * 4096;
const RSEQ_FLAG_UNREGISTER: u64 = 1;

/// How to restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Restore even if files changed since the checkpoint.
    pub force: bool,
    /// The caller already made the files ready ([`prepare_files`], which checks them): they
    /// are not checked again.
    pub files_prepared: bool,
    /// Ask for the saved pids (the caller created a pid namespace for its children).
    pub set_pids: bool,
    /// A descriptor (open in the caller, inherited by the restored processes) of the mount
    /// namespace they must enter: the one with the job's own `/proc`.
    pub mount_ns: Option<i32>,
    /// Protect the restored memory for write tracking (see [`RestoredJob::tracking`]).
    pub track_writes: bool,
    /// Leave private anonymous memory to be loaded on first touch and in the background
    /// ([`RestoredJob::lazy`]); needs `CAP_SYS_PTRACE` ([`check_lazy_allowed`]).
    pub lazy: bool,
}

/// A restored, running job.
#[derive(Debug)]
pub struct RestoredJob {
    /// The root process's pid in the caller's view (a child of the caller).
    pub root: i32,
    /// Processes restored (zombies included).
    pub processes: usize,
    /// The master of the job's terminal (a new pseudo-terminal with the saved modes), when
    /// the job had one: the caller relays it.
    pub terminal: Option<std::os::fd::OwnedFd>,
    /// Write tracking of the restored processes from the restored generation on (with
    /// [`RestoreOptions::track_writes`]): a checkpoint that builds on that generation
    /// reads only the pages written since the restart.
    pub tracking: WriteTracking,
    /// Memory still to be loaded (with [`RestoreOptions::lazy`]): the caller serves it
    /// until it is empty, and must finish it before the job is checkpointed.
    pub lazy: PendingMemory,
}

/// Checks that this machine can run the image: the same vdso.
pub fn check_machine(vdso_blake3: &str) -> CoreResult<()> {
    let (base, len) = own_vdso()?;
    let ours = blake3::hash(&mem::own_bytes(base, len))
        .to_hex()
        .to_string();
    if ours != vdso_blake3 {
        return Err(CoreError::Incompatible(
            "this kernel's vdso differs from the one the job ran with (another kernel version or build); restore on a machine running the same kernel".into(),
        ));
    }
    Ok(())
}

fn own_vdso() -> CoreResult<(u64, usize)> {
    let maps = proc::maps(std::process::id() as i32)?;
    let v = maps
        .iter()
        .find(|m| m.path == "[vdso]")
        .ok_or_else(|| CoreError::Incompatible("this process has no vdso".into()))?;
    Ok((v.start, usize::try_from(v.end - v.start).unwrap_or(0)))
}

/// The current monotonic and boot-time clocks of the caller, in nanoseconds.
pub fn clocks_now() -> (u64, u64) {
    (
        process::clock_ns(libc::CLOCK_MONOTONIC),
        process::clock_ns(libc::CLOCK_BOOTTIME),
    )
}

/// Refuses a CPU lacking XSAVE features the image's threads use.
fn check_cpu(probe: i32, m: &Manifest) -> CoreResult<()> {
    let current = regs::xstate_features(
        &ptrace::get_xstate(probe).map_err(sys("reading this CPU's extended state"))?,
    )
    .unwrap_or(0);
    for t in m.processes.iter().flat_map(|p| &p.threads) {
        let saved = regs::xstate_features(&t.xstate).unwrap_or(0);
        if saved & !current != 0 {
            return Err(CoreError::Incompatible(format!(
                "the image uses CPU state features {saved:#x} but this CPU offers only {current:#x}; restore on a CPU with the same features"
            )));
        }
    }
    Ok(())
}

/// A rebuilt process waiting to be released: its threads (restorer's view) and their state.
struct Rebuilt {
    tids: Vec<i32>,
    /// Its memory left for lazy loading.
    lazy: Option<crate::lazy::LazyProcess>,
}

fn rebuild(
    c: &mut Child,
    image: &mut OpenGeneration,
    m: &Manifest,
    p: &ProcessImage,
    st: &Staged,
    vdso_off: u64,
    opts: &RestoreOptions,
) -> CoreResult<Rebuilt> {
    let rseq = ptrace::get_rseq(c.pid).map_err(sys("reading the inherited rseq registration"))?;
    if rseq.abi_pointer != 0 {
        c.call(
            "unregistering the inherited rseq area",
            libc::SYS_rseq,
            &[
                rseq.abi_pointer,
                u64::from(rseq.len),
                RSEQ_FLAG_UNREGISTER,
                u64::from(rseq.signature),
            ],
        )?;
    }
    if let Some(ns) = opts.mount_ns {
        c.call(
            "entering the job's mount namespace",
            libc::SYS_setns,
            &[ns as u64, libc::CLONE_NEWNS as u64],
        )?;
    }
    memory::teardown_and_move_specials(c, p, vdso_off)?;
    let scratch = memory::free_area(&p.vmas, &[], SCRATCH_LEN)?;
    let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED) as u64;
    c.call(
        "mapping scratch memory",
        libc::SYS_mmap,
        &[
            scratch,
            SCRATCH_LEN,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            anon,
            u64::MAX,
            0,
        ],
    )?;
    c.scratch = scratch;
    let mut plan = opts.lazy.then(|| lazy::LazyPlan::new(p, opts.track_writes));
    memory::map_memory(c, image, p, st, plan.as_mut())?;
    memory::set_mm(c, p, st.exes.get(&p.exe).copied().unwrap_or(-1))?;
    state::restore_controlling_terminal(c, m, p, st)?;
    state::install_fds(c, m, p, st)?;
    state::restore_epoll(c, p, m)?;
    state::restore_process_state(c, p)?;
    let tids = state::create_threads(c, p, opts)?;
    let insn = c.inj.insn();
    let mut injs: Vec<Injector> = Vec::new();
    for (host, t) in tids.iter().zip(&p.threads) {
        injs.push(state::restore_thread_state(c, *host, t, insn)?);
    }
    state::restore_posix_timers(c, p, &std::collections::HashMap::new())?;
    state::queue_signals(c, p, &mut injs)?;
    let lazy = plan.map(|plan| plan.arm(c, image)).transpose()?.flatten();
    state::drop_caps(c, p)?;
    c.call(
        "unmapping scratch memory",
        libc::SYS_munmap,
        &[scratch, SCRATCH_LEN],
    )?;
    Ok(Rebuilt { tids, lazy })
}

fn release(p: &ProcessImage, r: &Rebuilt) -> CoreResult<()> {
    for (host, t) in r.tids.iter().zip(&p.threads) {
        ptrace::set_xstate(*host, &t.xstate)
            .ctx(|| format!("restoring extended state of thread {}", t.tid))?;
        let saved = ptrace::regs_from_words(&t.regs)
            .ok_or_else(|| CoreError::Incompatible("bad register record".into()))?;
        ptrace::set_regs(*host, &regs::for_restore(&saved))
            .ctx(|| format!("restoring registers of thread {}", t.tid))?;
    }
    Ok(())
}

/// Recreates the job's SysV IPC objects — shared memory segments, semaphore sets, message
/// queues with their messages — with their ids, in our IPC namespace (the job's).
fn recreate_sysv(image: &mut OpenGeneration, m: &Manifest) -> CoreResult<()> {
    for set in &m.sysv_sem {
        stasis_sys::sysv::sem_create(set.key, set.mode, set.id, &set.values).map_err(|source| {
            CoreError::Sys {
                context: format!("recreating SysV semaphore set {}", set.id),
                source,
            }
        })?;
    }
    for q in &m.sysv_msg {
        stasis_sys::sysv::msg_create(q.key, q.mode, q.id, q.qbytes).map_err(|source| {
            CoreError::Sys {
                context: format!("recreating SysV message queue {}", q.id),
                source,
            }
        })?;
        for msg in &q.messages {
            let mut data = Vec::new();
            for &chunk in &msg.data {
                data.extend_from_slice(&image.chunk(chunk)?);
            }
            stasis_sys::sysv::msg_send(q.id, msg.mtype, &data).map_err(|source| {
                CoreError::Sys {
                    context: format!("refilling SysV message queue {}", q.id),
                    source,
                }
            })?;
        }
    }
    for seg in &m.sysv_shm {
        let size = usize::try_from(seg.size).unwrap_or(0);
        stasis_sys::sysv::shm_create(seg.key, size, seg.mode, seg.id).map_err(|source| {
            CoreError::Sys {
                context: format!("recreating SysV shared memory segment {}", seg.id),
                source,
            }
        })?;
        for run in &seg.pages {
            let data = image.chunk(run.chunk)?;
            let at = usize::try_from(run.addr).unwrap_or(usize::MAX);
            if at.checked_add(data.len()).is_none_or(|end| end > size) {
                return Err(CoreError::Incompatible(format!(
                    "SysV segment {}: saved page beyond its size",
                    seg.id
                )));
            }
            stasis_sys::sysv::shm_write(seg.id, at, &data)
                .map_err(sys("filling a SysV segment"))?;
        }
    }
    Ok(())
}

/// Restores every process of generation `image` as descendants of the caller and lets the
/// job run. The caller must be single-threaded while this runs, and reaps the root. Files
/// the image keeps must have been recreated first ([`prepare_files`]).
pub fn restore_job(image: &mut OpenGeneration, opts: &RestoreOptions) -> CoreResult<RestoredJob> {
    // The manifest without its chunk index (a record per page: 31 MB at 4 GiB, 10 ms to
    // copy), which the image keeps for reading the chunks.
    let index = std::mem::take(&mut image.manifest.chunks);
    let m = image.manifest.clone();
    image.manifest.chunks = index;
    if !opts.force && !opts.files_prepared {
        check_files(&m)?;
    }
    let (vdso_base, vdso_len) = own_vdso()?;
    let vdso_off = find_syscall_insn(&mem::own_bytes(vdso_base, vdso_len)).ok_or_else(|| {
        CoreError::Incompatible("no syscall instruction in this kernel's vdso".into())
    })? as u64;
    recreate_sysv(image, &m)?;
    let staged = stage::stage(image, &m)?;
    let mut tree = tree::create(&m, opts, vdso_base + vdso_off)?;
    let mut tracking = WriteTracking::new();
    let mut pending = PendingMemory::default();
    pending.base = m.packs.first().cloned();
    let result = (|| -> CoreResult<Vec<(usize, Rebuilt)>> {
        if let Some(probe) = tree.children.iter().flatten().next() {
            check_cpu(probe.pid, &m)?;
        }
        let mut rebuilt = Vec::new();
        for (i, p) in m.processes.iter().enumerate() {
            if let Some(c) = tree.children[i].as_mut() {
                let mut r = rebuild(c, image, &m, p, &staged, vdso_off, opts)?;
                // Memory loading lazily is registered on another userfaultfd: such a
                // process is tracked from its next checkpoint on.
                let lazily = r.lazy.is_some();
                if let Some(lp) = r.lazy.take() {
                    pending.add(lp);
                }
                rebuilt.push((i, r));
                if let (true, false, Some(name)) = (opts.track_writes, lazily, m.packs.first())
                    && let Ok(maps) = proc::maps_without_flags(c.pid)
                {
                    tracking.restored(c.pid, &maps, &mut c.inj, name);
                }
            }
        }
        for seg in m.sysv_shm.iter().filter(|s| s.removed) {
            stasis_sys::sysv::shm_remove(seg.id)
                .map_err(sys("removing a SysV segment marked for removal"))?;
        }
        for (i, r) in &rebuilt {
            release(&m.processes[*i], r)?;
        }
        Ok(rebuilt)
    })();
    let rebuilt = match result {
        Ok(r) => r,
        Err(e) => {
            tree.kill_all();
            return Err(e);
        }
    };
    // Let the whole job run at once, children's threads first.
    for (_, r) in rebuilt.iter().rev() {
        for &tid in r.tids.iter().rev() {
            ptrace::detach(tid, 0).ctx(|| format!("releasing thread {tid}"))?;
        }
    }
    let root = tree
        .children
        .first()
        .and_then(|c| c.as_ref())
        .map(|c| c.pid)
        .ok_or(CoreError::Vanished(0))?;
    let mut staged = staged;
    let terminal = staged.terminal.take();
    drop(staged);
    Ok(RestoredJob {
        root,
        processes: m.processes.len(),
        terminal,
        tracking,
        lazy: pending,
    })
}
