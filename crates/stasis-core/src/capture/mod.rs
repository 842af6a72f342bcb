//! Capturing a frozen job: every process, the open file descriptions and shared memory they
//! share, and the page data, in one cut.

pub(crate) mod content;
mod early;
mod files;
mod inotify;
mod memory;
mod precopy;
mod process;
mod snapshot;
pub(crate) mod sockets;
mod spare;
mod sysv;
mod threads;

use std::collections::HashMap;

use stasis_image::manifest::{
    OpenFile, ProcessImage, Pty, SavedFile, SharedMemory, SysvMsgQueue, SysvSem, SysvShm,
    TermModes, VmaKind,
};
use stasis_image::pack::PackWriter;

pub use crate::tracking::{Unchanged, WriteTracking};
pub use crate::vdso::{VdsoInfo, vdso_info};
pub use content::FileContents;
pub use early::{EarlyMaps, FlagCheck, IN_FREEZE_BUDGET, KnownFlags, PendingFlagCheck, Reading};
pub use memory::vma_kind;
pub use precopy::{Precopy, precopy_job};
pub use process::{JobTables, capture_process, capture_zombie};
pub use spare::keep_ready as keep_copy_buffers;

use std::os::fd::{AsFd, BorrowedFd};

use crate::error::{CoreError, CoreResult, SysContext};
use crate::freeze::FrozenJob;
use crate::proc;

/// What a checkpoint captures besides the processes themselves.
#[derive(Debug, Clone, Copy, Default)]
pub struct CaptureOptions {
    /// The job has an IPC namespace of its own: its SysV objects are saved.
    pub ipc_namespace: bool,
    /// Leave private memory in copy-on-write snapshots, to be read once the job runs again
    /// ([`CapturedJob::read_snapshots`]).
    pub snapshot: bool,
    /// Keep the content of every regular file open in the job, and of every file mapped
    /// shared, in the image (`--save-files`).
    pub save_files: bool,
}

/// What a supervisor prepares so that checkpoints of its job stall it less and read less.
#[derive(Debug, Default)]
pub struct Speedups<'a> {
    /// Write tracking, kept from one checkpoint to the next (its cut started).
    pub tracking: Option<&'a mut WriteTracking>,
    /// Mappings of the job's processes with their flags, read before the freeze
    /// ([`EarlyMaps::plan`]).
    pub early_maps: EarlyMaps,
}

/// A captured job, ready to be written into a manifest.
#[derive(Debug)]
pub struct CapturedJob {
    /// Processes, parents before children (zombies last).
    pub processes: Vec<ProcessImage>,
    /// Open file descriptions.
    pub files: Vec<OpenFile>,
    /// Shared memory objects.
    pub shared_memory: Vec<SharedMemory>,
    /// SysV shared memory segments of the job's IPC namespace.
    pub sysv_shm: Vec<SysvShm>,
    /// SysV semaphore sets of the job's IPC namespace.
    pub sysv_sem: Vec<SysvSem>,
    /// SysV message queues of the job's IPC namespace.
    pub sysv_msg: Vec<SysvMsgQueue>,
    /// Pseudo-terminal pairs.
    pub ptys: Vec<Pty>,
    /// Files whose content was saved (`--save-files`).
    pub saved_files: Vec<SavedFile>,
    /// The vdso the job runs with.
    pub vdso_blake3: String,
    /// Each frozen process's `syscall` instruction (host pid → address), for thawing.
    pub insns: HashMap<i32, u64>,
    /// Private memory still to be read from copy-on-write snapshots (see
    /// [`CapturedJob::read_snapshots`]).
    pub pending: Vec<snapshot::PendingMemory>,
    /// Snapshots read and killed, not collected yet (see [`CapturedJob::end_snapshots`]).
    ending: Vec<snapshot::Snapshot>,
    /// Bytes of private memory write tracking knew unchanged (not read).
    pub unchanged_bytes: u64,
    /// Bytes of private memory stored by the pre-copy and found unchanged at the cut (not
    /// read again).
    pub precopied_bytes: u64,
    /// Bytes of private memory copied out while the job was frozen, instead of read from a
    /// snapshot (little was left to read once the unchanged pages were known).
    pub copied_bytes: u64,
    /// With write tracking, the most bytes the next cut may copy out of each process (see
    /// [`keep_copy_buffers`]).
    pub copy_bounds: Vec<usize>,
    /// Mappings whose flags were read early ([`EarlyMaps`]), by host pid.
    early_flags: FlagCheck,
    /// The smaps readings taken while the job was frozen.
    readings: Vec<Reading>,
    /// The bytes taken out of the job's pseudo-terminal pairs: put back when dropped (do
    /// so before the job runs again), or discarded when the job ends with the checkpoint.
    pub pty_bytes: Vec<crate::ptyqueue::PutBack>,
}

impl CapturedJob {
    /// Puts the bytes taken out of the job's pseudo-terminals back: call before the job
    /// runs again.
    pub fn put_back_pty_bytes(&mut self) {
        self.pty_bytes.clear();
    }

    /// Drops the bytes taken out of the job's pseudo-terminals: the job ends with this
    /// checkpoint, whose image delivers them at restart.
    pub fn discard_pty_bytes(&mut self) {
        for p in self.pty_bytes.drain(..) {
            p.discard();
        }
    }

    /// The check that the mappings whose flags came from [`EarlyMaps`] still have them
    /// ([`FlagCheck::run`]); taken once.
    pub fn take_flag_check(&mut self) -> FlagCheck {
        std::mem::take(&mut self.early_flags)
    }

    /// The smaps readings taken while the job was frozen, for the next checkpoint
    /// ([`KnownFlags`]); taken once.
    pub fn take_readings(&mut self) -> Vec<Reading> {
        std::mem::take(&mut self.readings)
    }

    /// Reads the private memory of every process from its copy-on-write snapshot into
    /// `pack` (the job may run meanwhile), then ends the snapshots. On error the snapshots
    /// are ended too. Write tracking, if any, protects the job's pages again first, while
    /// the snapshots still tell which pages the job wrote since the cut.
    pub fn read_snapshots(
        &mut self,
        pack: &mut PackWriter,
        tracking: Option<&mut WriteTracking>,
    ) -> CoreResult<()> {
        if let Some(t) = tracking {
            let t0 = std::time::Instant::now();
            t.protect_after_thaw();
            tracing::debug!(
                protect_ms = t0.elapsed().as_secs_f64() * 1e3,
                "pages protected again"
            );
        }
        for p in std::mem::take(&mut self.pending) {
            for (vma, pages) in p.read(pack)? {
                if let Some(v) = self.processes[p.process].vmas.get_mut(vma) {
                    v.pages = pages;
                }
            }
            if let snapshot::PendingSource::Snapshot(mut snapshot) = p.source {
                snapshot.kill();
                self.ending.push(snapshot);
            }
        }
        Ok(())
    }

    /// Collects the snapshots [`CapturedJob::read_snapshots`] killed, each reaped by its
    /// parent (frozen for a moment). A snapshot takes a while to die (its address space
    /// torn down, page by page): whatever the caller does in between overlaps it. Until
    /// collected here, no process of the job can see it exit. (Dropped uncollected, they
    /// are collected then.)
    pub fn end_snapshots(&mut self) -> CoreResult<()> {
        for snapshot in std::mem::take(&mut self.ending) {
            snapshot.release()?;
        }
        Ok(())
    }
}

/// The parent of host process `pid` as the job sees it: 0 for the supervisor, 1 for the
/// job's init, else its pid in the job's namespace.
fn job_ppid(pid: i32, supervisor: i32, init: Option<i32>) -> CoreResult<i32> {
    let host = proc::stat(pid)?.ppid;
    if host == supervisor {
        Ok(0)
    } else if Some(host) == init {
        Ok(1)
    } else {
        proc::ns_pid(&format!("/proc/{host}"))
    }
}

/// Refuses processes that share an address space (`CLONE_VM` without `CLONE_THREAD`, e.g.
/// a `vfork` child before it execs) or a descriptor table (`CLONE_FILES`) other than a
/// child sharing its parent's: they would come back as independent copies. Returns the
/// host pids of the children that share their parent's table.
fn refuse_shared_tables(job: &FrozenJob) -> CoreResult<Vec<i32>> {
    use stasis_sys::process::{Shared, share};
    let parent_of = |x: i32| proc::stat(x).map(|s| s.ppid).unwrap_or(0);
    let mut sharing_children = Vec::new();
    for (i, a) in job.processes.iter().enumerate() {
        for b in &job.processes[i + 1..] {
            let refuse = |name: &str| CoreError::Unsupported {
                pid: b.pid,
                what: name.into(),
                why: format!(
                    "it shares it with process {}; processes sharing one are not supported yet",
                    a.pid
                ),
            };
            if share(a.pid, b.pid, Shared::Memory).unwrap_or(false) {
                return Err(refuse(
                    "its address space (CLONE_VM, e.g. vfork before exec)",
                ));
            }
            if share(a.pid, b.pid, Shared::Descriptors).unwrap_or(false) {
                let child = if parent_of(b.pid) == a.pid {
                    b.pid
                } else if parent_of(a.pid) == b.pid {
                    a.pid
                } else {
                    return Err(refuse(
                        "its descriptor table (CLONE_FILES), shared other than between a parent and its child",
                    ));
                };
                if !sharing_children.contains(&child) {
                    sharing_children.push(child);
                }
            }
        }
    }
    Ok(sharing_children)
}

/// Refuses sessions and process groups whose leader has exited, except where the restore
/// can recreate them: for an orphan (a daemon after a double fork), whose session — or, in
/// the restarting command's session, whose group — a helper with the leader's pid leads;
/// for a process whose parent is in the job: a session it shares with its parent, a group
/// it shares with its parent, or a group of its session that a keeper with the leader's pid
/// recreates.
fn check_leaders(processes: &[ProcessImage]) -> CoreResult<()> {
    let alive = |pid: i32| processes.iter().any(|p| p.pid == pid && p.zombie.is_none());
    for p in processes.iter().filter(|p| p.zombie.is_none()) {
        let dead = |x: i32| x != 0 && x != p.pid && !alive(x);
        let parent = processes.iter().find(|q| q.pid == p.ppid && p.ppid > 1);
        let restorable = match parent {
            None => {
                p.ppid == 1
                    && (!dead(p.sid) || p.sid == p.pgid || !dead(p.pgid))
                    && (!dead(p.pgid) || p.sid == 0 || p.sid == p.pgid)
            }
            Some(q) => {
                (!dead(p.sid) || q.sid == p.sid)
                    && (!dead(p.pgid) || q.pgid == p.pgid || p.pgid != p.sid)
            }
        };
        if (dead(p.sid) || dead(p.pgid)) && !restorable {
            let which = if dead(p.sid) {
                format!("session {}", p.sid)
            } else {
                format!("process group {}", p.pgid)
            };
            return Err(CoreError::Unsupported {
                pid: p.pid,
                what: which,
                why: "its leader has exited, and this arrangement cannot be recreated yet".into(),
            });
        }
    }
    Ok(())
}

/// The state of every pseudo-terminal pair the job's descriptors name: modes and window
/// size (read through the slave), session and foreground group (host pids mapped through
/// `job_pid`).
fn capture_ptys(
    files: &[OpenFile],
    masters: &HashMap<u32, std::os::fd::OwnedFd>,
    terminal: Option<(u32, BorrowedFd<'_>)>,
    job_pid: impl Fn(i32) -> Option<i32>,
    pack: &mut PackWriter,
    put_back: &mut Vec<crate::ptyqueue::PutBack>,
) -> CoreResult<Vec<Pty>> {
    let mut indices: Vec<u32> = files
        .iter()
        .filter_map(|f| match f {
            OpenFile::Pty { index, .. } => Some(*index),
            _ => None,
        })
        .collect();
    indices.sort_unstable();
    indices.dedup();
    let mut out = Vec::new();
    for index in indices {
        let job_terminal = terminal.is_some_and(|(t, _)| t == index);
        let master = match (terminal, masters.get(&index)) {
            (Some((t, fd)), _) if t == index => fd,
            (_, Some(fd)) => fd.as_fd(),
            _ => {
                return Err(CoreError::Unsupported {
                    pid: 0,
                    what: format!("pseudo-terminal /dev/pts/{index}"),
                    why: "its master is not held by the job".into(),
                });
            }
        };
        let what = || format!("reading the modes of pseudo-terminal /dev/pts/{index}");
        let slave = stasis_sys::pty::open_slave(master, libc::O_RDWR).ctx(what)?;
        let state = stasis_sys::pty::get_state(slave.as_fd()).ctx(what)?;
        // The bytes queued inside the pair, taken out and put back before the job runs on.
        let queued = || format!("reading the bytes queued in pseudo-terminal /dev/pts/{index}");
        let ours = master.try_clone_to_owned().map_err(|e| CoreError::Io {
            path: format!("/dev/pts/{index}"),
            source: e,
        })?;
        let (output, input) = crate::ptyqueue::take(master).ctx(queued)?;
        let store = |bytes: &[u8], pack: &mut PackWriter| -> CoreResult<Vec<u32>> {
            bytes.chunks(1 << 20).map(|c| Ok(pack.add(c)?)).collect()
        };
        let (output_chunks, input_chunks) = (store(&output, pack), store(&input, pack));
        put_back.push(crate::ptyqueue::PutBack::new(ours, output, input));
        let (output_chunks, input_chunks) = (output_chunks?, input_chunks?);
        out.push(Pty {
            index,
            job_terminal,
            modes: TermModes {
                iflag: state.iflag,
                oflag: state.oflag,
                cflag: state.cflag,
                lflag: state.lflag,
                line: state.line,
                cc: state.cc.to_vec(),
            },
            winsize: state.winsize,
            session: stasis_sys::pty::session(master).and_then(&job_pid),
            foreground: stasis_sys::pty::foreground(master).and_then(&job_pid),
            output: output_chunks,
            input: input_chunks,
        });
    }
    Ok(out)
}

/// Captures every process of a frozen job into `pack`; `terminal` is the master of the
/// pseudo-terminal the supervisor gave the job, if any; `opts` says what else to keep;
/// `speedups` what the caller prepared (write tracking says which pages are unchanged since
/// the generation `pack` builds on).
pub fn capture_job(
    job: &FrozenJob,
    supervisor: i32,
    init: Option<i32>,
    terminal: Option<BorrowedFd<'_>>,
    opts: CaptureOptions,
    pack: &mut PackWriter,
    speedups: Speedups<'_>,
) -> CoreResult<CapturedJob> {
    let mut snapshots = Vec::new();
    let result = capture_all(
        job,
        supervisor,
        init,
        terminal,
        opts,
        opts.snapshot.then_some(&mut snapshots),
        pack,
        speedups,
    );
    if result.is_err() {
        // The job stays frozen (and will be thawed by the caller): its snapshots end now.
        for p in snapshots {
            if let snapshot::PendingSource::Snapshot(s) = p.source
                && let Some(f) = job.processes.iter().find(|f| f.pid == s.parent)
            {
                let _ = s.release_frozen(f);
            }
        }
        return result;
    }
    result.map(|mut c| {
        c.copied_bytes = snapshots.iter().map(|p| p.copied_bytes()).sum();
        c.pending = snapshots;
        c
    })
}

// The arguments of `capture_job`, plus the snapshot list it keeps for cleaning up on error.
#[allow(clippy::too_many_arguments)]
fn capture_all(
    job: &FrozenJob,
    supervisor: i32,
    init: Option<i32>,
    terminal: Option<BorrowedFd<'_>>,
    opts: CaptureOptions,
    snapshots: Option<&mut Vec<snapshot::PendingMemory>>,
    pack: &mut PackWriter,
    speedups: Speedups<'_>,
) -> CoreResult<CapturedJob> {
    // The processes whose mapping flags are carried have smaps read meanwhile, on the
    // helper thread (see `early`).
    let exact = speedups
        .early_maps
        .carries_any()
        .then(early::ExactFlags::default);
    let sharing_children = refuse_shared_tables(job)?;
    let terminal = match terminal {
        Some(fd) => Some((
            stasis_sys::pty::index(fd).ctx(|| "reading the job terminal's index".into())?,
            fd,
        )),
        None => None,
    };
    let mut tables = JobTables {
        pack,
        files: files::FileTable::new(
            &job.processes.iter().map(|f| f.pid).collect::<Vec<_>>(),
            terminal.map(|(i, _)| i),
        ),
        shared: memory::SharedObjects::default(),
        contents: FileContents::new(opts.save_files),
        pending: snapshots,
        tracking: speedups.tracking,
        unchanged_pages: 0,
        precopied_pages: 0,
        early_maps: &speedups.early_maps,
        early_flags: Vec::new(),
        exact,
        copy_bounds: Vec::new(),
    };
    let mut processes = Vec::with_capacity(job.processes.len() + job.zombies.len());
    let mut insns = HashMap::new();
    let mut vdso_blake3 = None;
    for f in &job.processes {
        let ppid = job_ppid(f.pid, supervisor, init)?;
        let (mut image, vdso) = capture_process(f, processes.len(), ppid, &mut tables)?;
        image.shares_parent_files = sharing_children.contains(&f.pid);
        if vdso_blake3.as_ref().is_some_and(|b| *b != vdso.blake3) {
            return Err(CoreError::Unsupported {
                pid: f.pid,
                what: "its vdso".into(),
                why: "processes of one job run with different vdsos".into(),
            });
        }
        vdso_blake3 = Some(vdso.blake3);
        insns.insert(f.pid, vdso.syscall_insn);
        processes.push(image);
    }
    for &z in &job.zombies {
        processes.push(capture_zombie(z, job_ppid(z, supervisor, init)?)?);
    }
    if init.is_some() {
        check_leaders(&processes)?;
    }
    let uses_sysv = processes
        .iter()
        .flat_map(|p| &p.vmas)
        .any(|v| v.kind == VmaKind::SysvShm);
    let sysv_shm = if opts.ipc_namespace {
        sysv::capture_shm(tables.pack)?
    } else if uses_sysv {
        let p = processes
            .iter()
            .find(|p| p.vmas.iter().any(|v| v.kind == VmaKind::SysvShm))
            .map_or(0, |p| p.pid);
        return Err(CoreError::Unsupported {
            pid: p,
            what: "SysV shared memory".into(),
            why:
                "the job has no IPC namespace of its own, so the segment ids could not be restored"
                    .into(),
        });
    } else {
        Vec::new()
    };
    let host_to_job: HashMap<i32, i32> = job
        .processes
        .iter()
        .map(|f| f.pid)
        .zip(processes.iter().map(|p| p.pid))
        .collect();
    let masters = std::mem::take(&mut tables.files.pty_masters);
    let files = tables.files.finish(&processes);
    let mut put_back = Vec::new();
    let ptys = capture_ptys(
        &files,
        &masters,
        terminal,
        |host| host_to_job.get(&host).copied(),
        tables.pack,
        &mut put_back,
    )?;
    let (sysv_sem, sysv_msg) = if opts.ipc_namespace {
        (sysv::capture_sem()?, sysv::capture_msg(tables.pack)?)
    } else {
        (Vec::new(), Vec::new())
    };
    Ok(CapturedJob {
        processes,
        files,
        shared_memory: tables.shared.objects,
        sysv_shm,
        sysv_sem,
        sysv_msg,
        ptys,
        saved_files: tables.contents.saved,
        vdso_blake3: vdso_blake3.unwrap_or_default(),
        insns,
        pending: Vec::new(),
        ending: Vec::new(),
        unchanged_bytes: tables.unchanged_pages * 4096,
        precopied_bytes: tables.precopied_pages * 4096,
        copied_bytes: 0,
        copy_bounds: tables.copy_bounds,
        early_flags: FlagCheck(tables.early_flags),
        readings: tables.exact.map(|e| e.taken).unwrap_or_default(),
        pty_bytes: put_back,
    })
}
