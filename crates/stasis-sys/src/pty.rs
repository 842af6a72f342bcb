//! Pseudo-terminals: opening pairs, reading and setting their modes, window size, session
//! and foreground process group, and raw mode for relaying a terminal.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::error::{Errno, SysError, SysResult};

/// The modes and window size of a terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermState {
    /// Input modes (`c_iflag`).
    pub iflag: u32,
    /// Output modes (`c_oflag`).
    pub oflag: u32,
    /// Control modes (`c_cflag`).
    pub cflag: u32,
    /// Local modes (`c_lflag`).
    pub lflag: u32,
    /// Line discipline.
    pub line: u8,
    /// Control characters.
    pub cc: [u8; 32],
    /// Window size: rows, columns, x pixels, y pixels.
    pub winsize: [u16; 4],
}

fn check(call: &'static str, r: libc::c_int) -> SysResult<libc::c_int> {
    if r < 0 {
        Err(SysError::new(call, 0, Errno::last()))
    } else {
        Ok(r)
    }
}

/// Opens a new pseudo-terminal master (unlocked, not our controlling terminal) and returns
/// it with its index (`/dev/pts/N`).
pub fn open_master() -> SysResult<(OwnedFd, u32)> {
    let fd = nix::fcntl::open(
        "/dev/ptmx",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NOCTTY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| SysError::new("open /dev/ptmx", 0, e))?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from the pointer, which is valid for the call.
    check("TIOCSPTLCK", unsafe {
        libc::ioctl(fd.as_raw_fd(), libc::TIOCSPTLCK, &unlock)
    })?;
    let index = index(fd.as_fd())?;
    Ok((fd, index))
}

/// The index of the pair whose master `master` is.
pub fn index(master: BorrowedFd<'_>) -> SysResult<u32> {
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes one unsigned int through the pointer, valid for the call.
    check("TIOCGPTN", unsafe {
        libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut n)
    })?;
    Ok(n)
}

/// Opens the slave of `master` (without a path lookup), with `O_*` status `flags`; it never
/// becomes the caller's controlling terminal.
pub fn open_slave(master: BorrowedFd<'_>, flags: i32) -> SysResult<OwnedFd> {
    let flags = (flags & (libc::O_ACCMODE | libc::O_NONBLOCK | libc::O_APPEND))
        | libc::O_NOCTTY
        | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes its flags by value and returns a new descriptor we own.
    let fd = check("TIOCGPTPEER", unsafe {
        libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags)
    })?;
    // SAFETY: the ioctl just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads the modes and window size of terminal `fd` (either side of a pair).
pub fn get_state(fd: BorrowedFd<'_>) -> SysResult<TermState> {
    let t = nix::sys::termios::tcgetattr(fd).map_err(|e| SysError::new("tcgetattr", 0, e))?;
    let raw: libc::termios = t.into();
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one struct winsize through the pointer, valid for the call.
    check("TIOCGWINSZ", unsafe {
        libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws)
    })?;
    let mut cc = [0u8; 32];
    cc.copy_from_slice(&raw.c_cc[..32]);
    Ok(TermState {
        iflag: raw.c_iflag,
        oflag: raw.c_oflag,
        cflag: raw.c_cflag,
        lflag: raw.c_lflag,
        line: raw.c_line,
        cc,
        winsize: [ws.ws_row, ws.ws_col, ws.ws_xpixel, ws.ws_ypixel],
    })
}

/// Sets the modes of terminal `fd` (at once, `TCSANOW`).
pub fn set_modes(fd: BorrowedFd<'_>, s: &TermState) -> SysResult<()> {
    let mut t = nix::sys::termios::tcgetattr(fd).map_err(|e| SysError::new("tcgetattr", 0, e))?;
    {
        let mut raw: libc::termios = t.clone().into();
        raw.c_iflag = s.iflag;
        raw.c_oflag = s.oflag;
        raw.c_cflag = s.cflag;
        raw.c_lflag = s.lflag;
        raw.c_line = s.line;
        raw.c_cc[..32].copy_from_slice(&s.cc);
        t = raw.into();
    }
    nix::sys::termios::tcsetattr(fd, nix::sys::termios::SetArg::TCSANOW, &t)
        .map_err(|e| SysError::new("tcsetattr", 0, e))
}

/// Sets the window size of terminal `fd`.
pub fn set_winsize(fd: BorrowedFd<'_>, winsize: [u16; 4]) -> SysResult<()> {
    let ws = libc::winsize {
        ws_row: winsize[0],
        ws_col: winsize[1],
        ws_xpixel: winsize[2],
        ws_ypixel: winsize[3],
    };
    // SAFETY: TIOCSWINSZ reads one struct winsize through the pointer, valid for the call.
    check("TIOCSWINSZ", unsafe {
        libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws)
    })?;
    Ok(())
}

fn get_pid(master: BorrowedFd<'_>, request: libc::Ioctl) -> Option<i32> {
    let mut pid: libc::pid_t = 0;
    // SAFETY: the request writes one pid_t through the pointer, valid for the call.
    let r = unsafe { libc::ioctl(master.as_raw_fd(), request, &mut pid) };
    (r == 0 && pid > 0).then_some(pid)
}

/// The session whose controlling terminal the pair of `master` is (pid in the caller's
/// namespace), if any.
pub fn session(master: BorrowedFd<'_>) -> Option<i32> {
    get_pid(master, libc::TIOCGSID)
}

/// The foreground process group of the pair of `master` (in the caller's namespace).
pub fn foreground(master: BorrowedFd<'_>) -> Option<i32> {
    get_pid(master, libc::TIOCGPGRP)
}

/// Bytes queued for reading on `fd` (`FIONREAD`): on a master, the slave's unread output;
/// on a slave, the input not yet read by the program.
pub fn queued(fd: BorrowedFd<'_>) -> SysResult<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, valid for the call.
    check("FIONREAD", unsafe {
        libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n)
    })?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Whether `fd` is a terminal.
pub fn is_terminal(fd: BorrowedFd<'_>) -> bool {
    nix::unistd::isatty(fd).unwrap_or(false)
}

/// Puts terminal `fd` into raw mode (for relaying it to a pseudo-terminal whose own modes
/// do the line editing); returns the modes to put back.
pub fn make_raw(fd: BorrowedFd<'_>) -> SysResult<nix::sys::termios::Termios> {
    use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
    let saved = tcgetattr(fd).map_err(|e| SysError::new("tcgetattr", 0, e))?;
    let mut raw = saved.clone();
    cfmakeraw(&mut raw);
    tcsetattr(fd, SetArg::TCSANOW, &raw).map_err(|e| SysError::new("tcsetattr", 0, e))?;
    Ok(saved)
}

/// Puts back modes saved by [`make_raw`], once pending output is written.
pub fn restore_modes(fd: BorrowedFd<'_>, saved: &nix::sys::termios::Termios) {
    let _ = nix::sys::termios::tcsetattr(fd, nix::sys::termios::SetArg::TCSADRAIN, saved);
}
