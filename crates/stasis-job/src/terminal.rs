//! The job's terminal: a job started on a terminal gets a pseudo-terminal of its own, whose
//! master the supervisor holds and relays to its own terminal (put in raw mode meanwhile,
//! so that line editing, job control keys and echo are the job's pseudo-terminal's).
//! Because the pair belongs to the job, its modes, window size, session and foreground
//! process group are part of every checkpoint and come back on restart.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags};
use stasis_sys::pty;

use crate::error::{JobError, JobResult};

/// The master of the job's terminal and the relay between it and the supervisor's stdio.
#[derive(Debug)]
pub struct Terminal {
    master: OwnedFd,
    /// Our stdin's modes before it was put in raw mode.
    saved: Option<nix::sys::termios::Termios>,
    /// Input is still relayed (stdin has not reached end of file).
    input_open: bool,
    /// Output is still relayed (the job still holds the slave).
    output_open: bool,
}

fn stdin() -> BorrowedFd<'static> {
    stasis_sys::fd::stdin()
}

fn sys(what: &str) -> impl FnOnce(stasis_sys::SysError) -> JobError + '_ {
    move |e| JobError::Remote(format!("{what}: {e}"))
}

impl Terminal {
    /// For a job started by a command whose stdin and stdout are terminals: a new pair
    /// with our terminal's modes and size, and the slave for the job. `None` otherwise.
    pub fn for_new_job() -> JobResult<Option<(Self, OwnedFd)>> {
        let ours = stdin();
        if !pty::is_terminal(ours) || !pty::is_terminal(std::io::stdout().as_fd()) {
            return Ok(None);
        }
        let (master, _) = pty::open_master().map_err(sys("opening a pseudo-terminal"))?;
        let slave = pty::open_slave(master.as_fd(), libc::O_RDWR)
            .map_err(sys("opening the job's terminal"))?;
        if let Ok(state) = pty::get_state(ours) {
            let _ = pty::set_modes(slave.as_fd(), &state);
            let _ = pty::set_winsize(master.as_fd(), state.winsize);
        }
        Ok(Some((Self::adopt(master), slave)))
    }

    /// Relays `master` (a restored job's terminal) to our stdio; our terminal, if stdin is
    /// one, lends its window size and goes raw.
    pub fn adopt(master: OwnedFd) -> Self {
        let _ = stasis_sys::fd::set_status_flags(master.as_fd(), libc::O_NONBLOCK);
        let ours = stdin();
        let saved = if pty::is_terminal(ours) {
            if let Ok(state) = pty::get_state(ours) {
                let _ = pty::set_winsize(master.as_fd(), state.winsize);
            }
            pty::make_raw(ours).ok()
        } else {
            None
        };
        Terminal {
            master,
            saved,
            input_open: true,
            output_open: true,
        }
    }

    /// The master, for capturing the pair's state.
    pub fn master(&self) -> BorrowedFd<'_> {
        self.master.as_fd()
    }

    /// Descriptors to poll for relaying: (master, stdin), each if still relayed.
    pub fn poll_fds(&self) -> Vec<PollFd<'_>> {
        let mut v = Vec::new();
        if self.output_open {
            v.push(PollFd::new(self.master.as_fd(), PollFlags::POLLIN));
        }
        if self.input_open {
            v.push(PollFd::new(stdin(), PollFlags::POLLIN));
        }
        v
    }

    /// Moves whatever is ready in either direction, without blocking on the job.
    pub fn relay(&mut self) {
        self.pump_output();
        if self.input_open && readable(stdin()) {
            let mut buf = [0u8; 4096];
            match nix::unistd::read(stdin(), &mut buf) {
                Ok(0) | Err(Errno::EIO | Errno::EBADF) => self.input_open = false,
                Ok(n) => {
                    // Input the job has no room for is dropped, as a terminal would.
                    let _ = nix::unistd::write(&self.master, &buf[..n]);
                }
                Err(_) => {}
            }
        }
    }

    /// Copies the job's pending output to our stdout.
    pub fn pump_output(&mut self) {
        let mut buf = [0u8; 16384];
        let mut out = std::io::stdout().lock();
        while self.output_open {
            match nix::unistd::read(&self.master, &mut buf) {
                Ok(0) | Err(Errno::EIO) => self.output_open = false,
                Ok(n) => {
                    let _ = out.write_all(&buf[..n]);
                }
                Err(Errno::EINTR) => {}
                Err(_) => break,
            }
        }
        let _ = out.flush();
    }

    /// Passes our terminal's new window size on (after `SIGWINCH`).
    pub fn resize(&self) {
        if let Ok(state) = pty::get_state(stdin()) {
            let _ = pty::set_winsize(self.master.as_fd(), state.winsize);
        }
    }
}

fn readable(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).is_ok_and(|n| n > 0)
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.pump_output();
        if let Some(saved) = &self.saved {
            pty::restore_modes(stdin(), saved);
        }
    }
}
