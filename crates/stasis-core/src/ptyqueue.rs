//! Bytes queued inside a pseudo-terminal pair: output its programs wrote that the master's
//! reader has not read yet, and input written to the master that the slave's readers have
//! not read yet. They cannot be peeked, so a checkpoint takes them out ([`take`]) and puts
//! them back ([`put`]) before the job runs again; a restart puts them into the new pair.
//!
//! Output goes back in through the slave with output processing (`OPOST`) off, so the
//! master reads exactly the bytes it would have read. Input goes back in through the master
//! with echo, signal characters and input translation off, so the slave's readers get
//! exactly the bytes they would have got, without a second echo. Input is only taken when
//! the slave is not in canonical mode: in canonical mode a partly typed line (which
//! `FIONREAD` does not count) would end up behind the lines put back.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use stasis_sys::SysResult;
use stasis_sys::pty::{self, TermState};

/// How long the queues must stay empty before they count as drained (the pair moves bytes
/// from its buffers to the reading side in a kernel work item, not at once).
const SETTLE: Duration = Duration::from_millis(3);
/// How long putting bytes back may wait for room.
const PUT_DEADLINE: Duration = Duration::from_secs(2);

/// Reads everything queued for reading on `fd` (non-blocking), until it stays empty.
fn drain(fd: BorrowedFd<'_>) -> SysResult<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let mut quiet_since = Instant::now();
    loop {
        let n = pty::queued(fd)?;
        if n == 0 {
            if quiet_since.elapsed() >= SETTLE {
                return Ok(out);
            }
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        match nix::unistd::read(fd, &mut buf[..n.min(4096)]) {
            Ok(0) => return Ok(out),
            Ok(got) => {
                out.extend_from_slice(&buf[..got]);
                quiet_since = Instant::now();
            }
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(stasis_sys::SysError::new("read", 0, e)),
        }
    }
}

/// Writes all of `data` to non-blocking `fd`, waiting for room up to [`PUT_DEADLINE`].
fn write_all(fd: BorrowedFd<'_>, data: &[u8]) -> SysResult<()> {
    let deadline = Instant::now() + PUT_DEADLINE;
    let mut at = 0;
    while at < data.len() {
        match nix::unistd::write(fd, &data[at..]) {
            Ok(n) => at += n,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR)
                if Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(stasis_sys::SysError::new("write", 0, e)),
        }
    }
    Ok(())
}

/// A non-blocking descriptor of the slave of `master`, our own.
fn slave_of(master: BorrowedFd<'_>) -> SysResult<OwnedFd> {
    pty::open_slave(master, libc::O_RDWR | libc::O_NONBLOCK)
}

/// Takes the bytes queued in the pair of `master`: (output, input). `master` may be shared
/// with the job; our reads do not block it.
pub fn take(master: BorrowedFd<'_>) -> SysResult<(Vec<u8>, Vec<u8>)> {
    let slave = slave_of(master)?;
    // Reading the master through a description of our own is not possible (a master is
    // opened once); reads are non-blocking by count, never asking for more than is there.
    let output = drain(master)?;
    let state = pty::get_state(slave.as_fd())?;
    let input = if state.lflag & libc::ICANON == 0 {
        drain(slave.as_fd())?
    } else {
        Vec::new()
    };
    Ok((output, input))
}

/// Puts `output` and `input` back into the pair of `master` (see the module's doc); its
/// modes are unchanged afterwards.
pub fn put(master: BorrowedFd<'_>, output: &[u8], input: &[u8]) -> SysResult<()> {
    if output.is_empty() && input.is_empty() {
        return Ok(());
    }
    let slave = slave_of(master)?;
    let modes = pty::get_state(slave.as_fd())?;
    let result = (|| {
        if !output.is_empty() {
            let raw_out = TermState {
                oflag: modes.oflag & !libc::OPOST,
                ..modes
            };
            pty::set_modes(slave.as_fd(), &raw_out)?;
            write_all(slave.as_fd(), output)?;
        }
        if !input.is_empty() {
            let quiet_in = TermState {
                lflag: modes.lflag
                    & !(libc::ECHO
                        | libc::ECHOE
                        | libc::ECHOK
                        | libc::ECHONL
                        | libc::ECHOCTL
                        | libc::ECHOKE
                        | libc::ISIG
                        | libc::IEXTEN),
                iflag: modes.iflag
                    & !(libc::ICRNL
                        | libc::INLCR
                        | libc::IGNCR
                        | libc::IXON
                        | libc::IXOFF
                        | libc::ISTRIP
                        | libc::IUCLC
                        | libc::PARMRK),
                ..modes
            };
            pty::set_modes(slave.as_fd(), &quiet_in)?;
            let master = nonblocking_copy(master)?;
            write_all(master.as_fd(), input)?;
        }
        Ok(())
    })();
    let back = pty::set_modes(slave.as_fd(), &modes);
    result.and(back)
}

/// A non-blocking way to write to `master` without changing the flags of a description the
/// job shares: a new description of the pair's master is not available, so the write goes
/// through a duplicate while `O_NONBLOCK` is set, then the flags are put back.
fn nonblocking_copy(master: BorrowedFd<'_>) -> SysResult<NonBlocking<'_>> {
    let flags = stasis_sys::fd::status_flags(master)?;
    stasis_sys::fd::set_status_flags(master, flags | libc::O_NONBLOCK)?;
    Ok(NonBlocking { fd: master, flags })
}

/// Puts the status flags of a descriptor back when dropped.
struct NonBlocking<'a> {
    fd: BorrowedFd<'a>,
    flags: i32,
}

impl NonBlocking<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd
    }
}

impl Drop for NonBlocking<'_> {
    fn drop(&mut self) {
        let _ = stasis_sys::fd::set_status_flags(self.fd, self.flags);
    }
}

/// The bytes taken from a pair of the job, put back when dropped — before the job runs
/// again, whether the checkpoint succeeded or not — unless discarded.
#[derive(Debug)]
pub struct PutBack {
    master: OwnedFd,
    output: Vec<u8>,
    input: Vec<u8>,
}

impl PutBack {
    /// Bytes to put back into the pair of `master` (a descriptor of our own).
    pub fn new(master: OwnedFd, output: Vec<u8>, input: Vec<u8>) -> Self {
        PutBack {
            master,
            output,
            input,
        }
    }
}

impl PutBack {
    /// Drops the bytes without putting them back: the job ends with the checkpoint, and
    /// the image delivers them at restart (put back, a relay would deliver them twice).
    pub fn discard(mut self) {
        self.output.clear();
        self.input.clear();
    }
}

impl Drop for PutBack {
    fn drop(&mut self) {
        if let Err(e) = put(self.master.as_fd(), &self.output, &self.input) {
            tracing::error!(
                "bytes queued in a pseudo-terminal of the job (fd {}) could not all be put back: {e}",
                self.master.as_raw_fd()
            );
        }
    }
}
