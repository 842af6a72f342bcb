//! Namespaces: the user, pid and time namespaces a job runs in.

use crate::error::{SysError, SysResult, check};

/// `unshare(flags)`.
pub fn unshare(flags: i32) -> SysResult<()> {
    // SAFETY: unshare takes an integer; it fails cleanly on a multi-threaded caller.
    check(unsafe { libc::unshare(flags) }.into(), "unshare", 0).map(drop)
}

/// Maps our own uid and gid onto themselves in a freshly unshared user namespace, so the
/// program keeps seeing its own ids.
pub fn map_own_ids(uid: u32, gid: u32) -> std::io::Result<()> {
    std::fs::write("/proc/self/setgroups", "deny")?;
    std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1\n"))?;
    std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1\n"))?;
    Ok(())
}

/// Sets the clock offsets of the time namespace our future children will enter.
pub fn set_time_offsets(monotonic_ns: i64, boottime_ns: i64) -> std::io::Result<()> {
    let fmt = |v: i64| {
        let secs = v.div_euclid(1_000_000_000);
        let nanos = v.rem_euclid(1_000_000_000);
        format!("{secs} {nanos}")
    };
    let text = format!(
        "monotonic {}\nboottime {}\n",
        fmt(monotonic_ns),
        fmt(boottime_ns)
    );
    std::fs::write("/proc/self/timens_offsets", text)
}

/// Flags for a namespace set.
pub mod flags {
    /// `CLONE_NEWUSER`.
    pub const USER: i32 = libc::CLONE_NEWUSER;
    /// `CLONE_NEWPID`.
    pub const PID: i32 = libc::CLONE_NEWPID;
    /// `CLONE_NEWTIME`.
    pub const TIME: i32 = 0x80;
    /// `CLONE_NEWIPC`.
    pub const IPC: i32 = libc::CLONE_NEWIPC;
}

/// Whether we hold `cap` in our effective set (read from /proc/self/status).
pub fn has_effective_cap(cap: u32) -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << cap) != 0)
}

/// Error helper for callers mapping io errors.
pub fn io_err(op: &'static str, e: &std::io::Error) -> SysError {
    SysError::new(
        op,
        0,
        nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    )
}
