//! libstasis: for programs that want to cooperate with Stasis checkpoints.
//!
//! Transparency is the default: no program needs this library. A program that wants to can
//! run callbacks before a checkpoint, after one (the job continuing) and after a restart,
//! keep checkpoints out of critical sections, and ask for a checkpoint of its own job.
//! Outside Stasis every call is a cheap no-op. The C ABI is in `include/stasis.h`; the
//! guarantees are spelled out in `docs/api.md`.
//!
//! ```no_run
//! let _registered = stasis::register(stasis::Phase::PostRestart, |e| {
//!     eprintln!("restarted from generation {}", e.generation);
//! });
//! {
//!     let _section = stasis::CriticalSection::enter();
//!     // no checkpoint is taken while this section is held
//! }
//! ```

// pthread_atfork needs `unsafe`; nothing else outside the C ABI does.
#[allow(unsafe_code)]
mod atfork;
mod client;
mod error;
// The C ABI needs exported, unmangled symbols (`#[unsafe(no_mangle)]`), which the
// `unsafe_code` lint counts as unsafe; nothing else in this crate is.
#[allow(unsafe_code)]
pub mod ffi;

pub use client::{Event, Phase, Requested, is_active};
pub use error::Error;

/// Registers `callback` to run in `phase`, on the library's own thread, in registration order
/// with the other callbacks of that phase. Returns `Ok(false)` (and registers nothing) when the
/// program does not run under Stasis. Callbacks stay registered for the life of the process
/// (a forked child starts with none).
pub fn register(
    phase: Phase,
    callback: impl Fn(&Event) + Send + Sync + 'static,
) -> Result<bool, Error> {
    client::register(phase, client::Callback::Rust(Box::new(callback)))
}

/// Asks the supervisor for a checkpoint of this job (which continues afterwards). With
/// `blocking`, waits until the generation is written; must not be called inside a critical
/// section or from a callback ([`Error::WouldDeadlock`]).
pub fn request_checkpoint(blocking: bool) -> Result<Requested, Error> {
    client::request_checkpoint(blocking)
}

/// A critical section held by this thread: no checkpoint is taken while any thread holds one;
/// entering waits while a checkpoint is under way. Nestable; left when dropped.
#[derive(Debug)]
pub struct CriticalSection {
    // Not Send: a section is left on the thread that entered it.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl CriticalSection {
    /// Enters a critical section (waits while a checkpoint is under way).
    pub fn enter() -> CriticalSection {
        client::critical_enter();
        CriticalSection {
            _not_send: std::marker::PhantomData,
        }
    }
}

impl Drop for CriticalSection {
    fn drop(&mut self) {
        // Cannot fail: this thread entered the section when the guard was made.
        let _ = client::critical_leave();
    }
}
