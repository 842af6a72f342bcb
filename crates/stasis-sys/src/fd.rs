//! Descriptor operations missing from `nix`: `tee` without consuming, pipe sizes, `dup` to a
//! floor, `close_range`.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use crate::error::{SysError, SysResult, check};

/// Copies up to `len` bytes queued in pipe `from` into pipe `to` without consuming them.
pub fn tee(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> SysResult<usize> {
    // SAFETY: both descriptors are live for the call; tee takes no pointers.
    let n = check(
        unsafe {
            libc::tee(
                from.as_raw_fd(),
                to.as_raw_fd(),
                len,
                libc::SPLICE_F_NONBLOCK,
            )
        } as libc::c_long,
        "tee",
        0,
    )?;
    Ok(n.unsigned_abs() as usize)
}

/// Bytes queued in a pipe or socket (`FIONREAD`).
pub fn queued_bytes(fd: BorrowedFd<'_>) -> SysResult<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to a valid pointer.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &raw mut n) }.into();
    check(ret, "ioctl(FIONREAD)", 0)?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Bytes a socket has sent that its peer has not yet taken (`SIOCOUTQ`: for TCP, sent but
/// not acknowledged plus not yet sent; for a unix socket, data not yet read by the peer).
pub fn unsent_bytes(fd: BorrowedFd<'_>) -> SysResult<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int to a valid pointer.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut n) }.into();
    check(ret, "ioctl(SIOCOUTQ)", 0)?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Whether a TCP socket is corked (`TCP_CORK`): data it was given waits to be sent.
pub fn tcp_corked(fd: BorrowedFd<'_>) -> SysResult<bool> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes to a valid int and updates `len`.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            (&raw mut v).cast(),
            &raw mut len,
        )
    }
    .into();
    check(ret, "getsockopt(TCP_CORK)", 0)?;
    Ok(v != 0)
}

/// `F_GETPIPE_SZ`.
pub fn pipe_size(fd: BorrowedFd<'_>) -> SysResult<usize> {
    // SAFETY: fcntl with an integer command on a live descriptor.
    let n = check(
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) }.into(),
        "fcntl(F_GETPIPE_SZ)",
        0,
    )?;
    Ok(n.unsigned_abs() as usize)
}

/// `F_SETPIPE_SZ`.
pub fn set_pipe_size(fd: BorrowedFd<'_>, size: usize) -> SysResult<()> {
    // SAFETY: fcntl with integer arguments on a live descriptor.
    check(
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) }.into(),
        "fcntl(F_SETPIPE_SZ)",
        0,
    )
    .map(drop)
}

/// Duplicates `fd` to the lowest free number at or above `floor` (not close-on-exec).
pub fn dup_at_least(fd: BorrowedFd<'_>, floor: RawFd) -> SysResult<OwnedFd> {
    // SAFETY: F_DUPFD returns a fresh descriptor that we then own.
    let n = check(
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD, floor) }.into(),
        "fcntl(F_DUPFD)",
        0,
    )?;
    // SAFETY: n is a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(n).unwrap_or(-1)) })
}

/// Duplicates descriptor number `fd` of this process (e.g. our own stdin) to the lowest free
/// number at or above `floor`.
pub fn dup_raw_at_least(fd: RawFd, floor: RawFd) -> SysResult<OwnedFd> {
    // SAFETY: F_DUPFD on a plain number; the kernel rejects it if it is not open, and the
    // returned descriptor is new and owned by us.
    let n = check(
        unsafe { libc::fcntl(fd, libc::F_DUPFD, floor) }.into(),
        "fcntl(F_DUPFD)",
        0,
    )?;
    // SAFETY: n is a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(n).unwrap_or(-1)) })
}

/// Gives the calling thread a descriptor table of its own, holding only descriptors 0-2
/// (`unshare(CLONE_FILES)`, then `close_range` from 3). For a helper thread that opens what
/// it needs itself: the process's table is then no longer shared, and growing it does not
/// wait for an RCU grace period (the kernel waits whenever other threads might be reading
/// the old table; on a virtual machine, 15 ms). Call it before this thread holds any
/// descriptor of its own.
pub fn own_table_with_stdio_only() -> SysResult<()> {
    check(
        // SAFETY: unshare takes flags only; it gives this thread a copy of the table.
        unsafe { libc::unshare(libc::CLONE_FILES) }.into(),
        "unshare(CLONE_FILES)",
        0,
    )?;
    check(
        // SAFETY: close_range takes integers; it closes descriptors of this thread's own
        // copy of the table, which no object of this thread owns yet (the caller's
        // contract): the rest of the process keeps its descriptors open.
        unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) },
        "close_range",
        0,
    )
    .map(drop)
}

/// Descriptor status flags (`F_GETFL`).
pub fn status_flags(fd: BorrowedFd<'_>) -> SysResult<i32> {
    // SAFETY: fcntl with an integer command on a live descriptor.
    let n = check(
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) }.into(),
        "fcntl(F_GETFL)",
        0,
    )?;
    Ok(i32::try_from(n).unwrap_or(0))
}

/// Sets descriptor status flags (`F_SETFL`: `O_APPEND`, `O_NONBLOCK`, …).
pub fn set_status_flags(fd: BorrowedFd<'_>, flags: i32) -> SysResult<()> {
    // SAFETY: fcntl with integer arguments on a live descriptor.
    check(
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) }.into(),
        "fcntl(F_SETFL)",
        0,
    )
    .map(drop)
}

/// Returns an error built from an io error, for callers that mix std and raw calls.
pub fn from_io(op: &'static str, e: &std::io::Error) -> SysError {
    SysError::new(
        op,
        0,
        nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    )
}

/// Creates a signalfd for a raw 64-bit signal mask (real-time signals included).
pub fn signalfd(mask: u64, flags: i32) -> SysResult<OwnedFd> {
    // SAFETY: the kernel reads 8 bytes of mask from a live local; the returned descriptor is
    // new and owned by us.
    let n = check(
        unsafe { libc::syscall(libc::SYS_signalfd4, -1, &raw const mask, 8usize, flags) },
        "signalfd4",
        0,
    )?;
    // SAFETY: n is a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(n).unwrap_or(-1)) })
}

/// Sets the expiration count of a timerfd (`TFD_IOC_SET_TICKS`).
pub fn timerfd_set_ticks(fd: BorrowedFd<'_>, ticks: u64) -> SysResult<()> {
    const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;
    // SAFETY: the ioctl reads one u64 from a live local.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS, &raw const ticks) };
    check(ret.into(), "ioctl(TFD_IOC_SET_TICKS)", 0).map(drop)
}

/// Creates a timerfd on `clock` armed to expire in `value_ns` (0: disarmed) and then every
/// `interval_ns`.
pub fn timerfd(clock: i32, value_ns: u64, interval_ns: u64) -> SysResult<OwnedFd> {
    let ts = |ns: u64| libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    let spec = libc::itimerspec {
        it_interval: ts(interval_ns),
        it_value: ts(value_ns),
    };
    // SAFETY: timerfd_create takes integers; the returned descriptor is new and owned by us.
    let n = check(
        unsafe { libc::timerfd_create(clock, libc::TFD_CLOEXEC) }.into(),
        "timerfd_create",
        0,
    )?;
    // SAFETY: n is a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(i32::try_from(n).unwrap_or(-1)) };
    // SAFETY: spec is a live itimerspec; the old value is not requested.
    let ret =
        unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &raw const spec, std::ptr::null_mut()) };
    check(ret.into(), "timerfd_settime", 0)?;
    Ok(fd)
}

/// `SO_PEEK_OFF` of a socket (−1: peeking always starts at the head of the queue).
pub fn peek_offset(fd: BorrowedFd<'_>) -> SysResult<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into a live int.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            (&raw mut v).cast(),
            &raw mut len,
        )
    };
    check(ret.into(), "getsockopt(SO_PEEK_OFF)", 0)?;
    Ok(v)
}

/// Sets `SO_PEEK_OFF` of a socket.
pub fn set_peek_offset(fd: BorrowedFd<'_>, off: i32) -> SysResult<()> {
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: setsockopt reads `len` bytes from a live int.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            (&raw const off).cast(),
            len,
        )
    };
    check(ret.into(), "setsockopt(SO_PEEK_OFF)", 0).map(drop)
}

/// A new inotify instance with status `flags` (`O_NONBLOCK` honoured).
pub fn inotify_init(flags: i32) -> SysResult<OwnedFd> {
    let flags = (flags & libc::O_NONBLOCK) | libc::IN_CLOEXEC;
    // SAFETY: inotify_init1 takes flags and returns a new descriptor or -1.
    let fd = unsafe { libc::inotify_init1(flags) };
    if fd < 0 {
        return Err(SysError::last("inotify_init1", 0));
    }
    // SAFETY: the descriptor was just created and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds a watch of `path` with event mask `mask`; returns its watch descriptor.
pub fn inotify_add(fd: BorrowedFd<'_>, path: &std::ffi::CStr, mask: u32) -> SysResult<i32> {
    // SAFETY: path is a valid NUL-terminated string for the duration of the call.
    let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) };
    if wd < 0 {
        return Err(SysError::last("inotify_add_watch", 0));
    }
    Ok(wd)
}

/// Removes watch `wd`.
pub fn inotify_remove(fd: BorrowedFd<'_>, wd: i32) -> SysResult<()> {
    // SAFETY: inotify_rm_watch takes integers.
    if unsafe { libc::inotify_rm_watch(fd.as_raw_fd(), wd) } < 0 {
        return Err(SysError::last("inotify_rm_watch", wd));
    }
    Ok(())
}

/// Our standard input, borrowed for the life of the process.
pub fn stdin() -> BorrowedFd<'static> {
    // SAFETY: descriptor 0 is never closed by Stasis; at worst it is not open and calls on
    // it fail with EBADF.
    unsafe { BorrowedFd::borrow_raw(0) }
}
