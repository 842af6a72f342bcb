//! The manifest of a new generation, from a captured job: shared by the supervisor and by
//! `checkpoint --pid`.

use stasis_core::capture::CapturedJob;
use stasis_image::manifest::{JobInfo, Manifest, Namespaces};
use stasis_sys::process;

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}

/// What the caller knows of the job that the capture does not.
pub(crate) struct JobFacts {
    pub name: String,
    pub reason: String,
    pub command: Vec<String>,
    pub namespaces: Namespaces,
    /// The job's clocks at the cut (its own view, time-namespace offsets included).
    pub monotonic_ns: u64,
    pub boottime_ns: u64,
    /// The content of the job's files was saved (`--save-files`).
    pub save_files: bool,
}

/// The manifest for `captured` (its saved state is moved out; `insns` and pending
/// snapshots stay). Its generation number and chunks are filled in when it is written.
pub(crate) fn manifest(facts: JobFacts, captured: &mut CapturedJob) -> Manifest {
    Manifest {
        job: JobInfo {
            name: facts.name,
            generation: 0,
            created_unix_ms: now_ms(),
            reason: facts.reason,
            command: facts.command,
            namespaces: facts.namespaces,
            monotonic_ns: facts.monotonic_ns,
            boottime_ns: facts.boottime_ns,
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            host: read_trimmed("/proc/sys/kernel/hostname"),
            vdso_blake3: std::mem::take(&mut captured.vdso_blake3),
            uid: process::uid(),
            gid: process::gid(),
            save_files: facts.save_files,
        },
        processes: std::mem::take(&mut captured.processes),
        files: std::mem::take(&mut captured.files),
        shared_memory: std::mem::take(&mut captured.shared_memory),
        sysv_shm: std::mem::take(&mut captured.sysv_shm),
        sysv_sem: std::mem::take(&mut captured.sysv_sem),
        sysv_msg: std::mem::take(&mut captured.sysv_msg),
        ptys: std::mem::take(&mut captured.ptys),
        saved_files: std::mem::take(&mut captured.saved_files),
        packs: Vec::new(),
        chunks: Default::default(),
    }
}
