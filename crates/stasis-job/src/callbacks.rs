//! The supervisor's side of libstasis: the connections of the job's processes that registered
//! callbacks (`Request::Attach`), and the events sent to them around every checkpoint.
//!
//! Before the job is frozen, every attached process gets `{"event":"pre_checkpoint",…}` and
//! the supervisor waits (up to the callback timeout, for all of them together) for each
//! `{"ready":true,"seq":S}`. After the checkpoint, when the job continues, each gets
//! `{"event":"resumed","generation":N}` (0 when the checkpoint failed). A process that
//! attaches again after a restart gets `{"event":"restarted","generation":N}`.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{MsgFlags, send};
use serde::Deserialize;

/// How long a checkpoint waits for pre-checkpoint callbacks unless told otherwise.
pub const DEFAULT_CALLBACK_TIMEOUT: Duration = Duration::from_secs(10);

/// One attached process.
#[derive(Debug)]
struct Attached {
    stream: UnixStream,
    /// Its pid inside the job.
    pid: u32,
    /// Bytes read but not yet a whole line.
    buf: Vec<u8>,
}

#[derive(Deserialize)]
struct Ready {
    ready: bool,
    #[serde(default)]
    seq: u64,
}

/// The processes of the job that use libstasis.
#[derive(Debug)]
pub struct Callbacks {
    attached: Vec<Attached>,
    timeout: Duration,
    seq: u64,
}

impl Attached {
    fn send(&self, msg: &serde_json::Value) -> bool {
        let mut bytes = serde_json::to_vec(msg).unwrap_or_default();
        bytes.push(b'\n');
        // Small messages on a socket whose peer reads them: a full buffer means a stuck peer.
        matches!(send(self.stream.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT), Ok(n) if n == bytes.len())
    }

    /// Reads what is there; true if a `ready` for `seq` came. `Err` when the peer is gone.
    fn read_ready(&mut self, seq: u64) -> Result<bool, ()> {
        let mut chunk = [0u8; 512];
        let mut found = false;
        loop {
            match (&self.stream).read(&mut chunk) {
                Ok(0) => return Err(()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Err(()),
            }
        }
        while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            // A late answer to an earlier checkpoint has another sequence number.
            if serde_json::from_slice::<Ready>(&line).is_ok_and(|r| r.ready && r.seq == seq) {
                found = true;
            }
        }
        Ok(found)
    }
}

impl Callbacks {
    /// No process attached yet; pre-checkpoint callbacks get `timeout` (default 10 s).
    pub fn new(timeout: Option<Duration>) -> Self {
        Callbacks {
            attached: Vec::new(),
            timeout: timeout.unwrap_or(DEFAULT_CALLBACK_TIMEOUT),
            seq: 0,
        }
    }

    /// Keeps a process's connection. A process that attaches again after a restart
    /// (`restarted`) is told the generation the job was restarted from.
    pub fn attach(&mut self, stream: UnixStream, pid: u32, restarted: bool, from: Option<u32>) {
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let a = Attached {
            stream,
            pid,
            buf: Vec::new(),
        };
        let msg = match (restarted, from) {
            (true, Some(generation)) => {
                serde_json::json!({"event": "restarted", "generation": generation})
            }
            _ => serde_json::json!({"event": "attached"}),
        };
        if a.send(&msg) {
            self.attached.push(a);
        }
    }

    /// Runs every attached process's pre-checkpoint callbacks and waits until all are ready
    /// (and have left their critical sections), or the timeout passes. Returns the job pids
    /// of the processes that were not ready in time. Processes that went away are dropped.
    pub fn pre_checkpoint(&mut self, generation: u32) -> Vec<u32> {
        if self.attached.is_empty() {
            return Vec::new();
        }
        self.seq += 1;
        let seq = self.seq;
        let msg =
            serde_json::json!({"event": "pre_checkpoint", "seq": seq, "generation": generation});
        self.attached.retain(|a| a.send(&msg));
        let mut waiting: Vec<usize> = (0..self.attached.len()).collect();
        let mut gone = Vec::new();
        let deadline = Instant::now() + self.timeout;
        while !waiting.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let ms = u16::try_from(left.as_millis().clamp(1, 1000)).unwrap_or(1000);
            let mut fds: Vec<PollFd> = waiting
                .iter()
                .map(|&i| PollFd::new(self.attached[i].stream.as_fd(), PollFlags::POLLIN))
                .collect();
            let _ = poll(&mut fds, PollTimeout::from(ms));
            drop(fds);
            waiting.retain(|&i| match self.attached[i].read_ready(seq) {
                Ok(ready) => !ready,
                Err(()) => {
                    gone.push(i);
                    false
                }
            });
        }
        let late = waiting.iter().map(|&i| self.attached[i].pid).collect();
        let mut i = 0;
        self.attached.retain(|_| {
            i += 1;
            !gone.contains(&(i - 1))
        });
        late
    }

    /// Tells every attached process that the job runs again after a checkpoint that wrote
    /// `generation` (0: the checkpoint failed).
    pub fn resumed(&mut self, generation: u32) {
        let msg = serde_json::json!({"event": "resumed", "generation": generation});
        self.attached.retain(|a| a.send(&msg));
    }
}
