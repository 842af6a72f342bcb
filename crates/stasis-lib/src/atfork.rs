//! `pthread_atfork`, the one call of the library that needs `unsafe`.

/// Registers fork handlers: `prepare` runs in the forking thread before `fork()`, `parent` in
/// it after, `child` in the child's only thread. They must not unwind.
pub(crate) fn register(prepare: extern "C" fn(), parent: extern "C" fn(), child: extern "C" fn()) {
    // SAFETY: pthread_atfork only stores the three function pointers; they are `extern "C"`
    // functions of this library, which lives as long as the program (it is never unloaded
    // while registered: a dlclose()d libstasis would leave dangling handlers, as any library
    // using pthread_atfork would).
    let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    // Fails only without memory for the three pointers: the lock-reset in `Lib::lock` still
    // keeps a child from using its parent's state.
    let _ = rc;
}
