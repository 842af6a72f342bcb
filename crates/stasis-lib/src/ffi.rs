//! The C ABI. `include/stasis.h` is generated from this file by cbindgen
//! (`crates/stasis-lib/cbindgen.toml`; `STASIS_BLESS=1 cargo test -p libstasis --test header`
//! rewrites it, and the same test fails when it drifts): the doc comments here are the
//! header's, written for C programmers.

use std::ffi::{c_int, c_uint, c_void};

use crate::client::{self, Callback, Phase, Requested};
use crate::error::Error;

/// Callback phase: before the job is frozen for a checkpoint.
pub const STASIS_PRE_CHECKPOINT: c_int = 0;
/// Callback phase: after a checkpoint, the job continuing.
pub const STASIS_POST_CHECKPOINT: c_int = 1;
/// Callback phase: after a restart from a checkpoint.
pub const STASIS_POST_RESTART: c_int = 2;

/// Success.
pub const STASIS_OK: c_int = 0;
/// Not running under Stasis: nothing was done.
pub const STASIS_NOT_ACTIVE: c_int = 1;
/// A blocking checkpoint request returns this in the process restarted from that checkpoint.
pub const STASIS_RESTARTED: c_int = 2;
/// Invalid argument: unknown phase, null callback, leave without enter.
pub const STASIS_EINVAL: c_int = -1;
/// The supervisor could not be reached, or refused (the checkpoint failed).
pub const STASIS_EFAIL: c_int = -2;
/// A blocking checkpoint request made inside a critical section or from a callback (it would
/// wait for itself).
pub const STASIS_EDEADLK: c_int = -3;

/// What a callback receives.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct StasisEvent {
    /// STASIS_PRE_CHECKPOINT, STASIS_POST_CHECKPOINT or STASIS_POST_RESTART.
    pub phase: c_int,
    /// Pre-checkpoint: the number the generation will most likely get. Post-checkpoint: the
    /// generation written, 0 if the checkpoint failed. Post-restart: the generation restarted
    /// from.
    pub generation: c_uint,
    /// 1 after a restart, else 0.
    pub is_restart: c_int,
}

/// A callback: called with the event (valid during the call only) and the argument given to
/// stasis_register(). It runs on the library's own thread and may call any function,
/// including this library's (but a blocking stasis_request_checkpoint() is refused there).
pub type StasisCallback = Option<extern "C" fn(event: *const StasisEvent, arg: *mut c_void)>;

fn code(e: &Error) -> c_int {
    match e {
        Error::BadPhase(_) | Error::NullCallback | Error::NotInside => STASIS_EINVAL,
        Error::WouldDeadlock => STASIS_EDEADLK,
        Error::Thread(_) | Error::Io { .. } | Error::Refused(_) => STASIS_EFAIL,
    }
}

/// Whether this process runs under Stasis: 1 when STASIS_CONTROL is set and the job's
/// supervisor accepts connections on it, else 0. Checked on the first call, then remembered.
///
/// Thread-safe. Async-signal-safe once a first call has returned outside a signal handler
/// (that call reads the environment and connects).
#[unsafe(no_mangle)]
pub extern "C" fn stasis_is_active() -> c_int {
    c_int::from(client::is_active())
}

/// Registers cb(event, arg) to run in phase (STASIS_PRE_CHECKPOINT, STASIS_POST_CHECKPOINT or
/// STASIS_POST_RESTART) of every checkpoint of this job from now on, for the life of this
/// process (there is no unregister; a forked child starts with none). Callbacks run one after
/// another on the library's own thread, those of one phase in registration order; a checkpoint
/// waits for every process's pre-checkpoint callbacks, up to the supervisor's
/// --callback-timeout. The first registration starts that thread and returns once the
/// supervisor has taken this process on (at most 5 s).
///
/// Returns STASIS_OK; STASIS_NOT_ACTIVE outside Stasis (nothing registered); STASIS_EINVAL for
/// an unknown phase or a null cb; STASIS_EFAIL if the thread cannot be started.
///
/// Thread-safe. Not async-signal-safe (takes a lock, allocates, may start a thread).
#[unsafe(no_mangle)]
pub extern "C" fn stasis_register(phase: c_int, cb: StasisCallback, arg: *mut c_void) -> c_int {
    let Some(phase) = Phase::from_raw(phase) else {
        return code(&Error::BadPhase(phase));
    };
    let Some(func) = cb else {
        return code(&Error::NullCallback);
    };
    let cb = Callback::C {
        func,
        arg: arg.expose_provenance(),
    };
    match client::register(phase, cb) {
        Ok(true) => STASIS_OK,
        Ok(false) => STASIS_NOT_ACTIVE,
        Err(e) => code(&e),
    }
}

/// Enters a critical section: no checkpoint is taken while any thread of the job is inside
/// one. Sections nest per thread and may be used from any thread; leave on the thread that
/// entered. Waits while a checkpoint is under way (from the end of the pre-checkpoint
/// callbacks until the post-checkpoint or post-restart callbacks are done); those callbacks
/// themselves may enter. Outside Stasis it only counts the nesting.
///
/// Returns STASIS_OK.
///
/// Thread-safe. Not async-signal-safe (takes a lock, may wait).
#[unsafe(no_mangle)]
pub extern "C" fn stasis_critical_enter() -> c_int {
    client::critical_enter();
    STASIS_OK
}

/// Leaves the critical section this thread entered last.
///
/// Returns STASIS_OK; STASIS_EINVAL if this thread is not inside a critical section.
///
/// Thread-safe. Not async-signal-safe (takes a lock).
#[unsafe(no_mangle)]
pub extern "C" fn stasis_critical_leave() -> c_int {
    match client::critical_leave() {
        Ok(()) => STASIS_OK,
        Err(e) => code(&e),
    }
}

/// Asks the job's supervisor for a checkpoint of the whole job, which continues afterwards
/// (like `stasis checkpoint NAME`), with every process's callbacks. The calling thread is
/// frozen with the rest of the job.
///
/// blocking == 0: returns once the request is sent; STASIS_OK, STASIS_NOT_ACTIVE outside
/// Stasis, STASIS_EFAIL if the supervisor cannot be reached.
///
/// blocking != 0: returns once the generation is written: STASIS_OK, or STASIS_RESTARTED in a
/// process restarted from that very checkpoint; STASIS_NOT_ACTIVE outside Stasis;
/// STASIS_EDEADLK inside a critical section or from a callback (the checkpoint would wait for
/// the caller); STASIS_EFAIL if the checkpoint failed.
///
/// Thread-safe. blocking == 0 is async-signal-safe once stasis_is_active() has returned
/// outside a signal handler: it then makes only the system calls socket(), connect(), send()
/// and close(), and keeps errno. blocking != 0 is not async-signal-safe (allocates).
#[unsafe(no_mangle)]
pub extern "C" fn stasis_request_checkpoint(blocking: c_int) -> c_int {
    if blocking == 0 {
        let errno = nix::errno::Errno::last_raw();
        let rc = match client::request_checkpoint_nowait() {
            Ok(true) => STASIS_OK,
            Ok(false) => STASIS_NOT_ACTIVE,
            Err(_) => STASIS_EFAIL,
        };
        nix::errno::Errno::set_raw(errno);
        return rc;
    }
    match client::request_checkpoint(true) {
        Ok(Requested::NotActive) => STASIS_NOT_ACTIVE,
        Ok(Requested::Sent | Requested::Written(_)) => STASIS_OK,
        Ok(Requested::Restarted) => STASIS_RESTARTED,
        Err(e) => code(&e),
    }
}
