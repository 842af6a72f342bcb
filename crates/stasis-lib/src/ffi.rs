//! The C ABI (`include/stasis.h`). Every function is a cheap no-op when the program does not
//! run under Stasis.
//!
//! Return values: `STASIS_OK` (0) on success, `STASIS_NOT_ACTIVE` (1) when not under Stasis
//! (nothing done), `STASIS_RESTARTED` (2) from a blocking checkpoint request when the process
//! resumes from that checkpoint after a restart, a negative `STASIS_E*` on error.

use std::ffi::c_void;

use crate::client::{self, CFunc, Callback, Phase, Requested};
use crate::error::Error;

/// Callback phase: before the job is frozen for a checkpoint.
pub const STASIS_PRE_CHECKPOINT: i32 = 0;
/// Callback phase: after a checkpoint, the job continuing.
pub const STASIS_POST_CHECKPOINT: i32 = 1;
/// Callback phase: after a restart.
pub const STASIS_POST_RESTART: i32 = 2;

/// Success.
pub const STASIS_OK: i32 = 0;
/// Not running under Stasis: nothing was done.
pub const STASIS_NOT_ACTIVE: i32 = 1;
/// A blocking checkpoint request returns this in the process restarted from that checkpoint.
pub const STASIS_RESTARTED: i32 = 2;
/// Invalid argument (unknown phase, null callback, leave without enter).
pub const STASIS_EINVAL: i32 = -1;
/// The supervisor could not be reached, or refused (the checkpoint failed).
pub const STASIS_EFAIL: i32 = -2;
/// A blocking checkpoint request made inside a critical section or from a callback.
pub const STASIS_EDEADLK: i32 = -3;

/// What a callback receives (`struct stasis_event`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct StasisEvent {
    /// `STASIS_PRE_CHECKPOINT`, `STASIS_POST_CHECKPOINT` or `STASIS_POST_RESTART`.
    pub phase: i32,
    /// The generation (see [`crate::Event::generation`]).
    pub generation: u32,
    /// 1 after a restart, else 0.
    pub is_restart: i32,
}

fn code(e: &Error) -> i32 {
    match e {
        Error::BadPhase(_) | Error::NullCallback | Error::NotInside => STASIS_EINVAL,
        Error::WouldDeadlock => STASIS_EDEADLK,
        Error::Thread(_) | Error::Io { .. } | Error::Refused(_) => STASIS_EFAIL,
    }
}

/// `int stasis_is_active(void)`: 1 under a reachable Stasis supervisor, else 0.
#[unsafe(no_mangle)]
pub extern "C" fn stasis_is_active() -> i32 {
    i32::from(client::is_active())
}

/// `int stasis_register(int phase, void (*cb)(const struct stasis_event *, void *), void *arg)`.
#[unsafe(no_mangle)]
pub extern "C" fn stasis_register(phase: i32, cb: Option<CFunc>, arg: *mut c_void) -> i32 {
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

/// `int stasis_critical_enter(void)`: nestable, from any thread; waits while a checkpoint is
/// under way.
#[unsafe(no_mangle)]
pub extern "C" fn stasis_critical_enter() -> i32 {
    client::critical_enter();
    STASIS_OK
}

/// `int stasis_critical_leave(void)`.
#[unsafe(no_mangle)]
pub extern "C" fn stasis_critical_leave() -> i32 {
    match client::critical_leave() {
        Ok(()) => STASIS_OK,
        Err(e) => code(&e),
    }
}

/// `int stasis_request_checkpoint(int blocking)`.
#[unsafe(no_mangle)]
pub extern "C" fn stasis_request_checkpoint(blocking: i32) -> i32 {
    match client::request_checkpoint(blocking != 0) {
        Ok(Requested::NotActive) => STASIS_NOT_ACTIVE,
        Ok(Requested::Sent | Requested::Written(_)) => STASIS_OK,
        Ok(Requested::Restarted) => STASIS_RESTARTED,
        Err(e) => code(&e),
    }
}
