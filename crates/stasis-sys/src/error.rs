//! The error type of every system call wrapper in this crate.

pub use nix::errno::Errno;

/// A failed system call: which operation, on which process or thread, and the errno.
#[derive(Debug, thiserror::Error)]
#[error("{op} (pid {pid}): {errno}")]
pub struct SysError {
    /// The operation that failed, e.g. `"PTRACE_SEIZE"`.
    pub op: &'static str,
    /// The process or thread it concerned (0 when none).
    pub pid: i32,
    /// The kernel's answer.
    pub errno: Errno,
}

/// Result of a system call wrapper.
pub type SysResult<T> = Result<T, SysError>;

impl SysError {
    /// Builds an error from the current `errno`.
    pub fn last(op: &'static str, pid: i32) -> Self {
        SysError {
            op,
            pid,
            errno: Errno::last(),
        }
    }
    /// Builds an error from a given errno.
    pub fn new(op: &'static str, pid: i32, errno: Errno) -> Self {
        SysError { op, pid, errno }
    }
}

/// Turns a libc return value (`-1` means failure) into a result.
pub(crate) fn check(ret: libc::c_long, op: &'static str, pid: i32) -> SysResult<libc::c_long> {
    if ret == -1 {
        Err(SysError::last(op, pid))
    } else {
        Ok(ret)
    }
}
