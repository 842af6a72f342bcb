//! Capturing a frozen job: every process, the open file descriptions and shared memory they
//! share, and the page data, in one cut.

mod files;
mod memory;
mod process;
mod sockets;
mod threads;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;

use stasis_image::manifest::{
    FileId, OpenFile, PageRun, ProcessImage, SharedMemory, SysvShm, VmaKind,
};
use stasis_image::pack::PackWriter;

pub use crate::vdso::{VdsoInfo, vdso_info};
pub use memory::vma_kind;
pub use process::{JobTables, capture_process, capture_zombie};

use crate::error::{CoreError, CoreResult};
use crate::freeze::FrozenJob;
use crate::proc;

/// Identity of a file as saved in the image.
pub(crate) fn file_id(path: &str, meta: &std::fs::Metadata) -> FileId {
    FileId {
        path: path.to_owned(),
        size: meta.len(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        ino: meta.ino(),
        regular: meta.file_type().is_file(),
    }
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
    /// The vdso the job runs with.
    pub vdso_blake3: String,
    /// Each frozen process's `syscall` instruction (host pid → address), for thawing.
    pub insns: HashMap<i32, u64>,
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

/// Refuses processes that share an address space or a descriptor table (`CLONE_VM`,
/// `CLONE_FILES` without `CLONE_THREAD`, e.g. a `vfork` child before it execs): they would
/// come back as independent copies.
fn refuse_shared_tables(job: &FrozenJob) -> CoreResult<()> {
    use stasis_sys::process::{Shared, share};
    for (i, a) in job.processes.iter().enumerate() {
        for b in &job.processes[i + 1..] {
            for (what, name) in [
                (
                    Shared::Memory,
                    "its address space (CLONE_VM, e.g. vfork before exec)",
                ),
                (Shared::Descriptors, "its descriptor table (CLONE_FILES)"),
            ] {
                if share(a.pid, b.pid, what).unwrap_or(false) {
                    return Err(CoreError::Unsupported {
                        pid: b.pid,
                        what: name.into(),
                        why: format!(
                            "it shares it with process {}; processes sharing one are not supported yet",
                            a.pid
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}

/// Saves every SysV shared memory segment of our IPC namespace (the job's): each is
/// attached read-only here, its non-zero pages stored.
fn capture_sysv(pack: &mut PackWriter) -> CoreResult<Vec<SysvShm>> {
    const SHM_DEST: u32 = 0o1000;
    let text = std::fs::read_to_string("/proc/sysvipc/shm")
        .map_err(crate::error::io_err("/proc/sysvipc/shm"))?;
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(key), Some(id), Some(perms), Some(size)) =
            (f.first(), f.get(1), f.get(2), f.get(3))
        else {
            continue;
        };
        let (Ok(key), Ok(id), Ok(perms), Ok(size)) = (
            key.parse::<i32>(),
            id.parse::<i32>(),
            u32::from_str_radix(perms, 8),
            size.parse::<u64>(),
        ) else {
            continue;
        };
        let data = stasis_sys::sysv::shm_read(id, usize::try_from(size).unwrap_or(0)).map_err(
            |source| CoreError::Sys {
                context: format!("reading SysV shared memory segment {id}"),
                source,
            },
        )?;
        let mut pages = Vec::new();
        for (i, page) in data.chunks(4096).enumerate() {
            if page.iter().any(|&b| b != 0) {
                pages.push(PageRun {
                    addr: i as u64 * 4096,
                    chunk: pack.add(page)?,
                });
            }
        }
        out.push(SysvShm {
            key,
            id,
            mode: perms & 0o777,
            size,
            removed: perms & SHM_DEST != 0,
            pages,
        });
    }
    Ok(out)
}

/// Refuses sessions and process groups whose leader has exited, except where the restore
/// can recreate them: for an orphan (a daemon after a double fork), whose session — or, in
/// the restarting command's session, whose group — a helper with the leader's pid leads.
fn check_leaders(processes: &[ProcessImage]) -> CoreResult<()> {
    let alive = |pid: i32| processes.iter().any(|p| p.pid == pid && p.zombie.is_none());
    for p in processes.iter().filter(|p| p.zombie.is_none()) {
        let dead = |x: i32| x != 0 && x != p.pid && !alive(x);
        let restorable = p.ppid == 1
            && (!dead(p.sid) || p.sid == p.pgid || !dead(p.pgid))
            && (!dead(p.pgid) || p.sid == 0 || p.sid == p.pgid);
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

/// Captures every process of a frozen job into `pack`.
pub fn capture_job(
    job: &FrozenJob,
    supervisor: i32,
    init: Option<i32>,
    ipc_namespace: bool,
    pack: &mut PackWriter,
) -> CoreResult<CapturedJob> {
    refuse_shared_tables(job)?;
    let mut tables = JobTables {
        pack,
        files: files::FileTable::new(&job.processes.iter().map(|f| f.pid).collect::<Vec<_>>()),
        shared: memory::SharedObjects::default(),
    };
    let mut processes = Vec::with_capacity(job.processes.len() + job.zombies.len());
    let mut insns = HashMap::new();
    let mut vdso_blake3 = None;
    for f in &job.processes {
        let ppid = job_ppid(f.pid, supervisor, init)?;
        let (image, vdso) = capture_process(f, ppid, &mut tables)?;
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
    let sysv_shm = if ipc_namespace {
        capture_sysv(tables.pack)?
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
    let files = tables.files.finish(&processes);
    Ok(CapturedJob {
        processes,
        files,
        shared_memory: tables.shared.objects,
        sysv_shm,
        vdso_blake3: vdso_blake3.unwrap_or_default(),
        insns,
    })
}
