//! Copy-on-write snapshots: the job is frozen only while its metadata is captured; its
//! private memory is read afterwards, while it runs again, from a snapshot of each process.
//!
//! The snapshot is a child of the frozen process created by an injected `clone3`: it shares
//! the process's memory copy-on-write as of the cut and its descriptor table
//! (`CLONE_FILES`, so no open file gains a reference). Its exit signal is none: the process
//! is never sent `SIGCHLD`, and `wait` without `__WALL` never reports it. The snapshot is
//! born traced and stopped (the ptrace options of its parent) and never runs an
//! instruction. When its memory has been read it is killed, and its parent — briefly
//! frozen again — reaps it with an injected `wait4`, so that no zombie is left behind.
//!
//! When write tracking leaves little to read (an incremental checkpoint), the pages are
//! instead copied out of the frozen process into the supervisor's memory and stored from
//! there once the job runs: copying a few MiB costs less than the fork, which copies every
//! page table, and the job is not slowed afterwards by copy-on-write faults.

use stasis_image::manifest::{PageRun, VmaKind};
use stasis_image::pack::PackWriter;
use stasis_sys::inject::Injector;
use stasis_sys::wait::{WaitStatus, wait_pid};
use stasis_sys::{mem, process, ptrace};

use super::memory::{CopiedPages, Source, private_pages};
use crate::error::{CoreError, CoreResult, SysContext};
use crate::freeze::{Frozen, freeze, stack_scratch};
use crate::proc::{self, MapEntry};
use crate::tracking::Unchanged;

const CLONE_ARGS_SIZE: u64 = 88;

/// A snapshot child of one process of the job.
#[derive(Debug)]
pub struct Snapshot {
    /// The snapshot (host pid).
    pub pid: i32,
    /// The process it copies (host pid).
    pub parent: i32,
    /// The snapshot's pid as its parent sees it.
    ns_pid: i32,
    /// A `syscall` instruction in the parent (for reaping).
    insn: u64,
    released: bool,
}

/// Private memory of one process still to be read from its snapshot.
#[derive(Debug)]
pub struct PendingMemory {
    /// Index of the process in the captured job.
    pub process: usize,
    /// Where to read it from.
    pub source: PendingSource,
    /// Mappings whose pages are to be read: (index in the process's mappings, mapping,
    /// kind).
    pub vmas: Vec<(usize, MapEntry, VmaKind)>,
    /// Pages known unchanged since the base generation: not read.
    pub unchanged: Unchanged,
}

/// Where a process's pending private memory is read from.
#[derive(Debug)]
pub enum PendingSource {
    /// Its copy-on-write snapshot.
    Snapshot(Snapshot),
    /// The pages copied out of process `pid` while it was frozen: little was left to read
    /// once write tracking's unchanged pages were known, and copying that costs less than
    /// a snapshot (forking copies every page table).
    Copied {
        /// The process (host pid).
        pid: i32,
        /// The pages.
        pages: CopiedPages,
    },
}

/// Whether a mapping's private pages can be read from a snapshot: not those the kernel
/// leaves out of a child (`MADV_DONTFORK`) or wipes in it (`MADV_WIPEONFORK`).
pub(super) fn snapshot_can_read(m: &MapEntry) -> bool {
    !m.has_flag("dc") && !m.has_flag("wf")
}

/// Takes a snapshot of `frozen` through its main thread, using `insn`.
pub(super) fn take(frozen: &Frozen, insn: u64) -> CoreResult<Snapshot> {
    let main = frozen.threads[0].tid;
    let pid = frozen.pid;
    let scratch = stack_scratch(main)?;
    let args: Vec<u8> = [libc::CLONE_FILES as u64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect();
    mem::write(main, scratch, &args).ctx(|| format!("preparing a snapshot of process {pid}"))?;
    // The snapshot is born traced (and stopped).
    ptrace::set_options(main, ptrace::options::TRACECLONE)
        .ctx(|| format!("preparing a snapshot of process {pid}"))?;
    let mut inj = Injector::new(main, insn);
    let made = inj
        .call("clone3", libc::SYS_clone3, &[scratch, CLONE_ARGS_SIZE])
        .ctx(|| format!("taking a copy-on-write snapshot of process {pid}"));
    let _ = ptrace::set_options(main, 0);
    made?;
    let child = inj.new_threads.pop().ok_or(CoreError::Vanished(pid))?;
    let mut snapshot = Snapshot {
        pid: child,
        parent: pid,
        ns_pid: 0,
        insn,
        released: false,
    };
    loop {
        match wait_pid(child, 0) {
            Ok((_, WaitStatus::Stopped { .. })) => break,
            Ok((_, WaitStatus::Exited(_) | WaitStatus::Signaled(_))) | Err(_) => {
                snapshot.released = true;
                return Err(CoreError::Vanished(child));
            }
            Ok(_) => {}
        }
    }
    // Should we die, the snapshot must die too: it would otherwise run the program's code.
    ptrace::set_options(child, ptrace::options::EXITKILL)
        .ctx(|| format!("guarding the snapshot of process {pid}"))?;
    snapshot.ns_pid = proc::status_field(&format!("/proc/{child}"), "NSpid")
        .ok()
        .and_then(|f| f.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(child);
    Ok(snapshot)
}

impl PendingMemory {
    /// Bytes copied out of the process at the cut (0 when read from a snapshot).
    pub fn copied_bytes(&self) -> u64 {
        match &self.source {
            PendingSource::Snapshot(_) => 0,
            PendingSource::Copied { pages, .. } => pages.len() as u64,
        }
    }

    /// Reads the pending pages from their source: (mapping index, pages) per mapping.
    ///
    /// A snapshot is read through `/proc/PID/mem`, not `process_vm_readv`: its pages are
    /// shared copy-on-write with the running job, and `process_vm_readv` pins the pages it
    /// reads, which makes the kernel unshare (copy) every one of them first — in a profile,
    /// reading a 1 GiB snapshot that way took 2.5 times as long as reading the frozen job
    /// itself.
    pub fn read(&self, pack: &mut PackWriter) -> CoreResult<Vec<(usize, Vec<PageRun>)>> {
        let mem;
        let (pid, source) = match &self.source {
            PendingSource::Snapshot(s) => {
                let path = format!("/proc/{}/mem", s.pid);
                mem = std::fs::File::open(&path).map_err(crate::error::io_err(&path))?;
                (s.pid, Source::Mem(&mem))
            }
            PendingSource::Copied { pid, pages } => (*pid, Source::Copied(pages)),
        };
        self.vmas
            .iter()
            .map(|(i, m, kind)| {
                Ok((
                    *i,
                    private_pages(pid, m, *kind, pack, source, &self.unchanged)?,
                ))
            })
            .collect()
    }
}

impl Snapshot {
    /// Kills the snapshot and collects its exit as its tracer: it is then a zombie child
    /// of its parent, which never hears of it (no exit signal).
    fn end(&mut self) {
        self.released = true;
        let _ = process::kill(self.pid, libc::SIGKILL);
        while !matches!(
            wait_pid(self.pid, 0),
            Ok((_, WaitStatus::Exited(_) | WaitStatus::Signaled(_))) | Err(_)
        ) {}
    }

    /// Kills the snapshot without waiting for it to die ([`Snapshot::release`] then
    /// collects it). While its tracer has not collected it, its parent cannot see it exit.
    pub fn kill(&mut self) {
        let _ = process::kill(self.pid, libc::SIGKILL);
    }

    /// Has the (frozen) parent reap the ended snapshot through thread `tid`.
    fn reap_in(&self, tid: i32) -> CoreResult<()> {
        Injector::new(tid, self.insn)
            .call(
                "wait4",
                libc::SYS_wait4,
                &[self.ns_pid as u64, 0, libc::__WALL as u64, 0],
            )
            .ctx(|| format!("reaping the snapshot of process {}", self.parent))
            .map(drop)
    }

    /// Ends the snapshot of a running process: kills it, then freezes its parent for a
    /// moment to reap it. A parent that has exited meanwhile left it to the job's init,
    /// which reaps it.
    pub fn release(mut self) -> CoreResult<()> {
        self.end();
        let Ok(parent) = freeze(self.parent) else {
            return Ok(());
        };
        let reaped = self.reap_in(parent.threads[0].tid);
        parent.thaw(Some(self.insn))?;
        reaped
    }

    /// Ends the snapshot of a process that is still frozen (`parent`).
    pub(super) fn release_frozen(mut self, parent: &Frozen) -> CoreResult<()> {
        self.end();
        self.reap_in(parent.threads[0].tid)
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if !self.released {
            self.end();
            if let Ok(parent) = freeze(self.parent) {
                let _ = self.reap_in(parent.threads[0].tid);
                let _ = parent.thaw(Some(self.insn));
            }
        }
    }
}
