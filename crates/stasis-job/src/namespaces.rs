//! Setting up the namespaces a job runs in.
//!
//! An unprivileged supervisor first enters a new user namespace (mapping its own uid and gid
//! onto themselves, so the program keeps seeing its own ids and loses every capability when it
//! execs), then asks for a pid namespace and a time namespace for its children. Root skips the
//! user namespace. Whatever the kernel refuses is reported, and the job runs without it.

use serde::{Deserialize, Serialize};
use stasis_sys::ns;

/// What the job got.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NamespaceSetup {
    /// In a user namespace of our own.
    pub user: bool,
    /// Children go into a new pid namespace (original pids restorable).
    pub pid: bool,
    /// The job has an IPC namespace of its own (SysV ids restorable).
    #[serde(default)]
    pub ipc: bool,
    /// Children go into a new time namespace (monotonic clock continuous across restarts).
    pub time: bool,
    /// The job has a `/proc` of its own pid namespace (in a mount namespace of its own).
    #[serde(default)]
    pub proc: bool,
    /// What was refused, for `status`.
    pub notes: Vec<String>,
}

/// Enters the namespaces. Must be called while single-threaded, before any child exists.
/// `offsets` are the monotonic and boot-time offsets for the time namespace.
pub fn enter(offsets: (i64, i64)) -> NamespaceSetup {
    let mut s = NamespaceSetup::default();
    let uid = stasis_sys::process::uid();
    let gid = stasis_sys::process::gid();
    if uid != 0 || !ns::has_effective_cap(21) {
        match ns::unshare(ns::flags::USER) {
            Ok(()) => match ns::map_own_ids(uid, gid) {
                Ok(()) => s.user = true,
                Err(e) => s
                    .notes
                    .push(format!("user namespace id mapping refused ({e})")),
            },
            Err(e) => s
                .notes
                .push(format!("user namespace refused ({})", e.errno)),
        }
    }
    match ns::unshare(ns::flags::IPC) {
        Ok(()) => s.ipc = true,
        Err(e) => s.notes.push(format!(
            "IPC namespace refused ({}): SysV shared memory cannot be checkpointed",
            e.errno
        )),
    }
    // The last moment a thread can be made: not before the user namespace (unsharing it
    // takes a single thread), not after the pid and time namespaces for our children
    // (clone of a thread then fails with EINVAL).
    if !stasis_core::helper::start() {
        s.notes
            .push("no helper thread: checkpoints read mapping flags on one thread".into());
    }
    stasis_core::kernel_maps::warm_up();
    if !stasis_image::compress::start_thread() {
        s.notes
            .push("no compression thread: checkpoints compress on one thread".into());
    }
    match ns::unshare(ns::flags::PID) {
        Ok(()) => s.pid = true,
        Err(e) => s.notes.push(format!(
            "pid namespace refused ({}): pids change on restart",
            e.errno
        )),
    }
    match ns::unshare(ns::flags::TIME) {
        Ok(()) => match ns::set_time_offsets(offsets.0, offsets.1) {
            Ok(()) => s.time = true,
            Err(e) => s.notes.push(format!(
                "time namespace offsets refused ({e}): CLOCK_MONOTONIC jumps on restart"
            )),
        },
        Err(e) => s.notes.push(format!(
            "time namespace refused ({}): CLOCK_MONOTONIC jumps on restart",
            e.errno
        )),
    }
    s
}
