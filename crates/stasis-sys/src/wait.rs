//! Waiting for children and tracees, with our own decoding of the wait status.
//!
//! `nix` cannot represent real-time signals in its wait status, so ptrace stops with them
//! would be lost; this module decodes the raw status word itself.

use crate::error::{SysError, SysResult, check};

/// What `waitpid` reported about one process or thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStatus {
    /// It exited with this status.
    Exited(i32),
    /// It was killed by this signal.
    Signaled(i32),
    /// It stopped with this signal; `event` is the ptrace event (0 for none).
    Stopped {
        /// The stop signal (`SIGTRAP` for ptrace events).
        sig: i32,
        /// `PTRACE_EVENT_*`, or 0.
        event: i32,
    },
    /// It continued (`WCONTINUED`).
    Continued,
    /// `WNOHANG` and nothing to report.
    StillAlive,
}

impl WaitStatus {
    /// Decodes a raw status word as returned by `waitpid`.
    pub fn decode(status: i32) -> Self {
        let low = status & 0x7f;
        if low == 0 {
            WaitStatus::Exited((status >> 8) & 0xff)
        } else if status & 0xff == 0x7f {
            WaitStatus::Stopped {
                sig: (status >> 8) & 0xff,
                event: (status >> 16) & 0xff,
            }
        } else if status == 0xffff {
            WaitStatus::Continued
        } else {
            WaitStatus::Signaled(low)
        }
    }
}

/// `waitpid(pid, flags | __WALL)`; returns the pid that changed and its status.
pub fn wait_pid(pid: i32, flags: i32) -> SysResult<(i32, WaitStatus)> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid, writable int for the duration of the call.
        let ret = unsafe { libc::waitpid(pid, &mut status, flags | libc::__WALL) };
        if ret == -1 && nix::errno::Errno::last() == nix::errno::Errno::EINTR {
            continue;
        }
        let ret = check(ret.into(), "waitpid", pid)?;
        if ret == 0 {
            return Ok((0, WaitStatus::StillAlive));
        }
        let pid = i32::try_from(ret)
            .map_err(|_| SysError::new("waitpid", pid, nix::errno::Errno::EOVERFLOW))?;
        return Ok((pid, WaitStatus::decode(status)));
    }
}
