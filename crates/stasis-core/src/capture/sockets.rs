//! Capturing sockets: their kind, name, peer and the data queued for them, read without
//! consuming it (`MSG_PEEK`, message by message with `SO_PEEK_OFF`) — or, for a TCP
//! connection inside the job whose sender still holds data its receiver had no room for,
//! taken out of the connection and put back through the sender before the job runs again
//! ([`drain_tcp`], [`Refill`]).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{MsgFlags, getsockopt, recv, sockopt};
use stasis_image::hex;
use stasis_image::manifest::{OpenFile, SocketOptions};
use stasis_image::pack::PackWriter;
use stasis_sys::fd as sysfd;

use crate::sockdiag::{InetSocket, STATE_ESTABLISHED, STATE_LISTEN, TCP_CLOSE_WAIT, UnixSocket};

/// Largest datagram read while peeking.
const MAX_MESSAGE: usize = 256 << 10;

/// The messages queued for reading on `s` (one for a stream), each stored as chunks.
/// `Err` says why they cannot be read without disturbing the socket.
fn queued(s: &OwnedFd, u: &UnixSocket, pack: &mut PackWriter) -> Result<Vec<Vec<u32>>, String> {
    let peek = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    let mut store = |data: &[u8]| -> Result<Vec<u32>, String> {
        data.chunks(1 << 20)
            .map(|c| pack.add(c).map_err(|e| e.to_string()))
            .collect()
    };
    if u.kind == libc::SOCK_STREAM {
        if u.rqueue == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; u.rqueue as usize];
        let n = recv(s.as_raw_fd(), &mut buf, peek)
            .map_err(|e| format!("peeking at its queued data: {e}"))?;
        if n != buf.len() {
            return Err(format!(
                "only {n} of its {} queued bytes could be read",
                buf.len()
            ));
        }
        return Ok(vec![store(&buf)?]);
    }
    let original = sysfd::peek_offset(s.as_fd()).map_err(|e| e.to_string())?;
    sysfd::set_peek_offset(s.as_fd(), 0)
        .map_err(|e| format!("cannot read its queued messages: {e}"))?;
    let mut messages = Vec::new();
    let mut buf = vec![0u8; MAX_MESSAGE];
    let result = loop {
        match recv(s.as_raw_fd(), &mut buf, peek) {
            Ok(n) => match store(&buf[..n]) {
                Ok(m) => messages.push(m),
                Err(e) => break Err(e),
            },
            Err(nix::errno::Errno::EAGAIN) => break Ok(()),
            Err(e) => break Err(format!("peeking at its queued messages: {e}")),
        }
        if messages.len() > 1 << 20 {
            break Err("too many queued messages".into());
        }
    };
    sysfd::set_peek_offset(s.as_fd(), original).map_err(|e| e.to_string())?;
    result.map(|()| messages)
}

/// Captures a unix socket fetched from the job (`ours` is a duplicate of it); `connect_to`
/// names the job's listening socket whose accept queue holds its connection, if it has not
/// been accepted yet. `Err` says why it cannot be captured.
pub fn capture_unix(
    ours: &OwnedFd,
    u: &UnixSocket,
    peer_in_job: bool,
    connect_to: Option<String>,
    flags: i32,
    pack: &mut PackWriter,
) -> Result<OpenFile, String> {
    let listening = u.state == STATE_LISTEN;
    if connect_to.is_some() {
        let unread = sysfd::unsent_bytes(ours.as_fd()).map_err(|e| e.to_string())?;
        if unread > 0 {
            return Err(format!(
                "its connection waits to be accepted with {unread} bytes the server has not read yet"
            ));
        }
    }
    let queued = if listening {
        Vec::new()
    } else {
        queued(ours, u, pack)?
    };
    if !queued.is_empty() && u.peer == 0 && u.name.as_deref().is_none_or(<[u8]>::is_empty) {
        return Err(
            "it holds queued messages but has neither a peer nor a name to refill them through"
                .into(),
        );
    }
    Ok(OpenFile::UnixSocket {
        ino: u.ino,
        socket_type: u.kind,
        flags,
        listening,
        name: u.name.as_deref().filter(|n| !n.is_empty()).map(hex::encode),
        peer: u.peer,
        peer_in_job,
        queued,
        shutdown: u.shutdown,
        connect_to,
    })
}

/// Bytes taken out of a TCP connection of the job, written back into it through its sending
/// end when dropped — before the job runs again, whether the checkpoint succeeded or not.
#[derive(Debug)]
pub struct Refill {
    sender: OwnedFd,
    data: Vec<u8>,
}

impl Refill {
    /// Bytes to put back through `sender`.
    pub fn new(sender: OwnedFd, data: Vec<u8>) -> Self {
        Refill { sender, data }
    }
}

impl Drop for Refill {
    fn drop(&mut self) {
        if let Err(e) = push_all(&self.sender, None, &self.data) {
            tracing::error!(
                "bytes in flight between two TCP sockets of the job could not all be put back: {e}"
            );
        }
    }
}

/// Sends all of `data` through `sender` without blocking: while the receiver's buffer and the
/// sender's fill, their sizes (`near`: the receiving end, when we hold it) are raised —
/// forced past the system limits where we may — until everything fits. `Err` says how much
/// did not fit.
pub fn push_all(sender: &OwnedFd, near: Option<&OwnedFd>, data: &[u8]) -> Result<(), String> {
    let mut sent = 0;
    let mut grown = false;
    let deadline = Instant::now() + Duration::from_secs(2);
    while sent < data.len() {
        match nix::sys::socket::send(
            sender.as_raw_fd(),
            &data[sent..],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        ) {
            Ok(n) => sent += n,
            Err(nix::errno::Errno::EAGAIN) if !grown => {
                grown = true;
                let want = (data.len() - sent).saturating_mul(2).min(1 << 30);
                let want = want.max(getsockopt(sender, sockopt::SndBuf).unwrap_or(0) * 2);
                if nix::sys::socket::setsockopt(sender, sockopt::SndBufForce, &want).is_err() {
                    let _ = nix::sys::socket::setsockopt(sender, sockopt::SndBuf, &want);
                }
                if let Some(near) = near
                    && nix::sys::socket::setsockopt(near, sockopt::RcvBufForce, &want).is_err()
                {
                    let _ = nix::sys::socket::setsockopt(near, sockopt::RcvBuf, &want);
                }
            }
            Err(nix::errno::Errno::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => {
                return Err(format!(
                    "{} of {} bytes do not fit in the connection's buffers ({e}); raising net.core.wmem_max and net.core.rmem_max, or running as root, makes room",
                    data.len() - sent,
                    data.len()
                ));
            }
        }
    }
    Ok(())
}

/// Takes every byte in flight towards `receiver` out of its connection: what its receive
/// queue holds and what its peer `sender` (a socket of the job too) still holds because the
/// receiver had no room. The caller must hand the bytes to a [`Refill`] at once, error or
/// not (`Err` carries what was taken). Refused up front, taking nothing, when the sender
/// keeps data back on purpose (`TCP_CORK`): it would not come out.
pub fn drain_tcp(receiver: &OwnedFd, sender: &OwnedFd) -> Result<Vec<u8>, (Vec<u8>, String)> {
    if sysfd::tcp_corked(sender.as_fd()).unwrap_or(false) {
        return Err((
            Vec::new(),
            "its peer is corked (TCP_CORK) with data not yet sent".into(),
        ));
    }
    let mut data = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match recv(receiver.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => return Ok(data),
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(nix::errno::Errno::EAGAIN) => {
                let held = sysfd::unsent_bytes(sender.as_fd()).unwrap_or(0);
                if held == 0 {
                    return Ok(data);
                }
                if Instant::now() > deadline {
                    return Err((
                        data,
                        format!("its peer keeps {held} bytes unsent although there is room"),
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err((data, format!("reading its data in flight: {e}"))),
        }
    }
}

/// The datagrams queued on UDP socket `s`, oldest first, with their senders, read without
/// consuming them (a temporary `SO_PEEK_OFF`, put back afterwards).
fn peek_datagrams(s: &OwnedFd) -> Result<Vec<(std::net::SocketAddr, Vec<u8>)>, String> {
    use nix::sys::socket::{SockaddrStorage, recvmsg};
    let original = sysfd::peek_offset(s.as_fd()).map_err(|e| e.to_string())?;
    sysfd::set_peek_offset(s.as_fd(), 0)
        .map_err(|e| format!("cannot read its queued datagrams: {e}"))?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let result = loop {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let got = recvmsg::<SockaddrStorage>(
            s.as_raw_fd(),
            &mut iov,
            None,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        );
        let (n, from) = match got {
            Ok(m) => (m.bytes, m.address),
            Err(nix::errno::Errno::EAGAIN) => break Ok(()),
            Err(e) => break Err(format!("peeking at its queued datagrams: {e}")),
        };
        let from = from.and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| std::net::SocketAddr::V4((*v4).into()))
                .or_else(|| {
                    a.as_sockaddr_in6()
                        .map(|v6| std::net::SocketAddr::V6((*v6).into()))
                })
        });
        match from {
            Some(from) => out.push((from, buf[..n].to_vec())),
            None => break Err("a queued datagram has no sender address".into()),
        }
        if out.len() > 1 << 20 {
            break Err("too many queued datagrams".into());
        }
    };
    sysfd::set_peek_offset(s.as_fd(), original).map_err(|e| e.to_string())?;
    result.map(|()| out)
}

/// Captures a TCP or UDP socket fetched from the job (`ours` is a duplicate of it);
/// `peer` is the inode of the other end of its connection when that end is in the job;
/// `pending_accept`: the connection waits in the accept queue of a listening socket of the
/// job; `drained`: the bytes in flight towards it, already taken out of the connection
/// ([`drain_tcp`]), instead of what its receive queue shows. `Err` says why it cannot be
/// captured. Datagrams queued on a UDP socket are kept with their senders when those are on
/// this host (loopback); others are dropped, as UDP may.
pub fn capture_inet(
    ours: &OwnedFd,
    s: &InetSocket,
    peer: Option<u64>,
    pending_accept: bool,
    drained: Option<&[u8]>,
    flags: i32,
    pack: &mut PackWriter,
) -> Result<OpenFile, String> {
    let tcp = s.protocol == libc::IPPROTO_TCP;
    let listening = tcp && s.state == STATE_LISTEN;
    let connected = s.state == STATE_ESTABLISHED || (tcp && s.state == TCP_CLOSE_WAIT);
    if tcp && !listening && !connected && s.state != 7 {
        return Err(format!(
            "TCP connections in state {} (opening or closing) are not supported yet",
            s.state
        ));
    }
    let mut queued = Vec::new();
    let mut senders = Vec::new();
    if !tcp && s.rx_queue > 0 {
        for (from, data) in peek_datagrams(ours)? {
            // A datagram from another host cannot be sent again with its sender's address;
            // UDP may lose it, and so does the restore.
            if from.ip().is_loopback() {
                queued.push(
                    data.chunks(1 << 20)
                        .map(|c| pack.add(c).map_err(|e| e.to_string()))
                        .collect::<Result<Vec<_>, _>>()?,
                );
                senders.push(from.to_string());
            }
        }
    }
    if let Some(data) = drained.filter(|d| !d.is_empty()) {
        queued.push(
            data.chunks(1 << 20)
                .map(|c| pack.add(c).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()?,
        );
    } else if tcp && connected && s.rx_queue > 0 {
        let mut buf = vec![0u8; s.rx_queue as usize];
        let n = recv(
            ours.as_raw_fd(),
            &mut buf,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        )
        .map_err(|e| format!("peeking at its queued data: {e}"))?;
        if n != buf.len() {
            return Err(format!(
                "only {n} of its {} queued bytes could be read",
                buf.len()
            ));
        }
        queued.push(
            buf.chunks(1 << 20)
                .map(|c| pack.add(c).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()?,
        );
    }
    let options = SocketOptions {
        reuse_addr: getsockopt(ours, sockopt::ReuseAddr).unwrap_or(false),
        reuse_port: getsockopt(ours, sockopt::ReusePort).unwrap_or(false),
        v6only: s.local.is_ipv6() && getsockopt(ours, sockopt::Ipv6V6Only).unwrap_or(false),
        nodelay: tcp && getsockopt(ours, sockopt::TcpNoDelay).unwrap_or(false),
        keepalive: getsockopt(ours, sockopt::KeepAlive).unwrap_or(false),
    };
    Ok(OpenFile::InetSocket {
        senders,
        ino: s.ino,
        protocol: s.protocol,
        flags,
        listening,
        local: s.local.to_string(),
        remote: connected.then(|| s.remote.to_string()),
        peer: peer.unwrap_or(0),
        peer_in_job: peer.is_some() && s.state == STATE_ESTABLISHED,
        queued,
        options,
        pending_accept,
    })
}
