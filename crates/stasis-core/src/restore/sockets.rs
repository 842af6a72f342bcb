//! Recreating unix sockets in the restorer, to be inherited by the job.
//!
//! A connection between two sockets of the job becomes a fresh connected pair; a listening
//! or bound socket is bound again at its name (a stale socket file left at that path is
//! removed first); a connection to a peer outside the job comes back closed, after the data
//! already queued for it. Queued data is refilled through the peer end, message by message,
//! and shutdown state is applied last.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;

use nix::sys::socket::{
    AddressFamily, Backlog, MsgFlags, Shutdown, SockFlag, SockType, SockaddrStorage, UnixAddr,
    bind, connect, listen, send, setsockopt, shutdown, socket, socketpair, sockopt,
};
use stasis_image::manifest::{OpenFile, SocketOptions};
use stasis_image::{OpenGeneration, hex};
use stasis_sys::SysError;

use super::child::sys;
use crate::error::{CoreError, CoreResult};

fn errno(context: &'static str) -> impl FnOnce(nix::errno::Errno) -> CoreError {
    move |e| sys(context)(SysError::new(context, 0, e))
}

fn sock_type(t: i32) -> CoreResult<SockType> {
    match t {
        libc::SOCK_STREAM => Ok(SockType::Stream),
        libc::SOCK_DGRAM => Ok(SockType::Datagram),
        libc::SOCK_SEQPACKET => Ok(SockType::SeqPacket),
        other => Err(CoreError::Incompatible(format!(
            "unknown unix socket type {other}"
        ))),
    }
}

/// The address of a saved socket name; `unlink_stale` first removes a socket file left at a
/// path name (before binding it again).
fn address(name: &str, unlink_stale: bool) -> CoreResult<UnixAddr> {
    let bytes =
        hex::decode(name).ok_or_else(|| CoreError::Incompatible("malformed socket name".into()))?;
    if let Some(abstract_name) = bytes.strip_prefix(&[0]) {
        return UnixAddr::new_abstract(abstract_name).map_err(errno("abstract socket name"));
    }
    let path = std::path::PathBuf::from(String::from_utf8_lossy(&bytes).into_owned());
    if unlink_stale && std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(&path);
    }
    UnixAddr::new(&path).map_err(errno("socket path"))
}

/// The sockets being recreated, by inode.
#[derive(Debug, Default)]
pub(super) struct Sockets {
    ends: HashMap<u64, OwnedFd>,
    /// The far end of a pair whose near end was connected outside the job: kept until the
    /// queued data is refilled, then closed.
    outside: HashMap<u64, OwnedFd>,
}

impl Sockets {
    /// Recreates socket `ino` described by `f` and returns a descriptor of it.
    pub fn stage(
        &mut self,
        f: &OpenFile,
        peer_of: impl Fn(u64) -> Option<u64>,
    ) -> CoreResult<OwnedFd> {
        let OpenFile::UnixSocket {
            ino,
            socket_type,
            listening,
            name,
            peer,
            peer_in_job,
            connect_to,
            ..
        } = f
        else {
            return Err(CoreError::Incompatible("not a socket".into()));
        };
        let ty = sock_type(*socket_type)?;
        if !self.ends.contains_key(ino) {
            if let Some(listener) = connect_to {
                // Waiting in the accept queue of a listening socket of the job, which is
                // bound and listening again by now: connect to it again.
                let s = socket(AddressFamily::Unix, ty, SockFlag::SOCK_CLOEXEC, None)
                    .map_err(errno("socket"))?;
                connect(s.as_raw_fd(), &address(listener, false)?)
                    .map_err(errno("connecting to a restored listening socket"))?;
                self.ends.insert(*ino, s);
            } else if *peer != 0 && *peer_in_job && peer_of(*peer) == Some(*ino) {
                let (a, b) = socketpair(AddressFamily::Unix, ty, None, SockFlag::SOCK_CLOEXEC)
                    .map_err(errno("socketpair"))?;
                self.ends.insert(*ino, a);
                self.ends.insert(*peer, b);
            } else if *peer != 0 && !*peer_in_job {
                let (a, b) = socketpair(AddressFamily::Unix, ty, None, SockFlag::SOCK_CLOEXEC)
                    .map_err(errno("socketpair"))?;
                self.ends.insert(*ino, a);
                self.outside.insert(*ino, b);
            } else {
                let s = socket(AddressFamily::Unix, ty, SockFlag::SOCK_CLOEXEC, None)
                    .map_err(errno("socket"))?;
                if let Some(name) = name
                    && (*listening || *peer == 0)
                {
                    bind(s.as_raw_fd(), &address(name, true)?)
                        .map_err(errno("binding a unix socket at its name"))?;
                }
                if *listening {
                    listen(&s, Backlog::new(128).map_err(errno("listen backlog"))?)
                        .map_err(errno("listen"))?;
                }
                self.ends.insert(*ino, s);
            }
        }
        self.ends[ino].try_clone().map_err(|e| CoreError::Io {
            path: format!("socket:[{ino}]"),
            source: e,
        })
    }

    /// Binds every TCP/UDP socket that has an address of its own (listeners, bound and UDP
    /// sockets), and every listening unix socket, before any connection is rebuilt:
    /// rebuilding a connection takes loopback ports, which must not be one of the job's, and
    /// a connection not yet accepted is queued again on its listening socket.
    pub fn bind_first(&mut self, files: &[OpenFile]) -> CoreResult<()> {
        for f in files {
            if let OpenFile::UnixSocket {
                listening: true, ..
            } = f
            {
                self.stage(f, |_| None)?;
            }
            if let OpenFile::InetSocket {
                protocol, remote, ..
            } = f
                && (*protocol != libc::IPPROTO_TCP || remote.is_none())
            {
                self.stage_inet(f, |_| None)?;
            }
        }
        Ok(())
    }

    /// Recreates TCP or UDP socket `f` and returns a descriptor of it.
    pub fn stage_inet(
        &mut self,
        f: &OpenFile,
        peer_of: impl Fn(u64) -> Option<u64>,
    ) -> CoreResult<OwnedFd> {
        let OpenFile::InetSocket {
            ino,
            protocol,
            listening,
            local,
            remote,
            peer,
            peer_in_job,
            options,
            pending_accept,
            ..
        } = f
        else {
            return Err(CoreError::Incompatible("not an inet socket".into()));
        };
        let bad = |what: &str| CoreError::Incompatible(format!("socket {ino}: malformed {what}"));
        let local: SocketAddr = local.parse().map_err(|_| bad("local address"))?;
        if !self.ends.contains_key(ino) {
            let tcp = *protocol == libc::IPPROTO_TCP;
            if let Some(r) = remote.as_deref().filter(|_| tcp && *pending_accept) {
                // Waiting in the accept queue of a listening socket of the job, which is
                // bound and listening again by now: connect to it again.
                let r: SocketAddr = r.parse().map_err(|_| bad("remote address"))?;
                let family = if r.is_ipv6() {
                    AddressFamily::Inet6
                } else {
                    AddressFamily::Inet
                };
                let s = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
                    .map_err(errno("socket"))?;
                apply(&s, options, tcp)?;
                connect(s.as_raw_fd(), &SockaddrStorage::from(r)).map_err(|e| {
                    CoreError::Incompatible(format!(
                        "cannot queue a connection to the job's listening socket at {r} again: {e}"
                    ))
                })?;
                self.ends.insert(*ino, s);
            } else if tcp && remote.is_some() {
                let (near, far) = connected_pair(local)?;
                apply(&near, options, tcp)?;
                if *peer_in_job && peer_of(*peer) == Some(*ino) {
                    self.ends.insert(*peer, far);
                } else {
                    self.outside.insert(*ino, far);
                }
                self.ends.insert(*ino, near);
            } else {
                let family = if local.is_ipv6() {
                    AddressFamily::Inet6
                } else {
                    AddressFamily::Inet
                };
                let ty = if tcp {
                    SockType::Stream
                } else {
                    SockType::Datagram
                };
                let s =
                    socket(family, ty, SockFlag::SOCK_CLOEXEC, None).map_err(errno("socket"))?;
                apply(&s, options, tcp)?;
                if local.port() != 0 {
                    setsockopt(&s, sockopt::ReuseAddr, &true).map_err(errno("SO_REUSEADDR"))?;
                    bind(s.as_raw_fd(), &SockaddrStorage::from(local)).map_err(|e| {
                        CoreError::Incompatible(format!(
                            "cannot bind a socket to {local} again: {e} (another program holds the port, or connections of the old run linger in TIME_WAIT for up to a minute: retry then)"
                        ))
                    })?;
                    setsockopt(&s, sockopt::ReuseAddr, &options.reuse_addr)
                        .map_err(errno("SO_REUSEADDR"))?;
                }
                if *listening {
                    listen(&s, Backlog::MAXCONN).map_err(errno("listen"))?;
                }
                if let Some(r) = remote.as_deref().filter(|_| !tcp) {
                    let r: SocketAddr = r.parse().map_err(|_| bad("remote address"))?;
                    connect(s.as_raw_fd(), &SockaddrStorage::from(r))
                        .map_err(errno("connecting a UDP socket"))?;
                }
                self.ends.insert(*ino, s);
            }
        }
        self.ends[ino].try_clone().map_err(|e| CoreError::Io {
            path: format!("socket:[{ino}]"),
            source: e,
        })
    }

    /// Refills queued data and applies shutdown state, once every socket is staged.
    pub fn finish(mut self, image: &mut OpenGeneration, files: &[OpenFile]) -> CoreResult<()> {
        let by_ino: HashMap<u64, &OpenFile> = files
            .iter()
            .filter_map(|f| {
                if let OpenFile::UnixSocket { ino, .. } = f {
                    Some((*ino, f))
                } else {
                    None
                }
            })
            .collect();
        self.refill_datagrams(image, files)?;
        for f in files {
            if matches!(f, OpenFile::InetSocket { protocol, .. } if *protocol != libc::IPPROTO_TCP)
            {
                continue;
            }
            let (OpenFile::UnixSocket {
                ino, peer, queued, ..
            }
            | OpenFile::InetSocket {
                ino, peer, queued, ..
            }) = f
            else {
                continue;
            };
            if queued.is_empty() {
                continue;
            }
            // Through the far end of its connection, or else — a bound socket receiving from
            // anyone — from a new socket sending to its name.
            let temp;
            let far = match self.outside.get(ino).or_else(|| self.ends.get(peer)) {
                Some(f) => f,
                None => {
                    let OpenFile::UnixSocket {
                        name: Some(name),
                        socket_type,
                        ..
                    } = f
                    else {
                        return Err(CoreError::Incompatible(format!(
                            "socket {ino} has queued data but no peer or name to refill it from"
                        )));
                    };
                    let s = socket(
                        AddressFamily::Unix,
                        sock_type(*socket_type)?,
                        SockFlag::SOCK_CLOEXEC,
                        None,
                    )
                    .map_err(errno("socket"))?;
                    connect(s.as_raw_fd(), &address(name, false)?)
                        .map_err(errno("connecting to a restored socket to refill it"))?;
                    temp = s;
                    &temp
                }
            };
            for message in queued {
                let mut data = Vec::new();
                for &c in message {
                    data.extend_from_slice(&image.chunk(c)?);
                }
                if data.is_empty() {
                    // An empty datagram is a message too.
                    send(far.as_raw_fd(), &data, MsgFlags::MSG_DONTWAIT)
                        .map_err(errno("refilling a socket"))?;
                    continue;
                }
                crate::capture::sockets::push_all(far, self.ends.get(ino), &data).map_err(
                    |why| {
                        CoreError::Incompatible(format!(
                            "refilling socket {ino} with the data queued for it: {why}"
                        ))
                    },
                )?;
            }
        }
        self.outside.clear();
        for f in files {
            let OpenFile::UnixSocket {
                ino,
                peer,
                shutdown: bits,
                ..
            } = f
            else {
                continue;
            };
            let Some(end) = self.ends.get(ino) else {
                continue;
            };
            if bits & 2 != 0 {
                shutdown(end.as_fd().as_raw_fd(), Shutdown::Write)
                    .map_err(errno("shutting a socket down for writing"))?;
            }
            let peer_sends = by_ino.get(peer).is_some_and(
                |p| matches!(p, OpenFile::UnixSocket { shutdown: b, .. } if b & 2 != 0),
            );
            if bits & 1 != 0 && !peer_sends {
                shutdown(end.as_fd().as_raw_fd(), Shutdown::Read)
                    .map_err(errno("shutting a socket down for reading"))?;
            }
        }
        Ok(())
    }
}

impl Sockets {
    /// Sends every datagram queued on a UDP socket of the job to it again, from its sender:
    /// the restored socket of the job bound at the sender's address, or else a temporary
    /// socket bound there. A datagram whose sender's address is taken is dropped (as UDP
    /// may), with a warning.
    fn refill_datagrams(&self, image: &mut OpenGeneration, files: &[OpenFile]) -> CoreResult<()> {
        let bound_at = |addr: &str| {
            files.iter().find_map(|f| match f {
                OpenFile::InetSocket {
                    ino,
                    protocol,
                    local,
                    ..
                } if *protocol != libc::IPPROTO_TCP && local == addr => self.ends.get(ino),
                _ => None,
            })
        };
        for f in files {
            let OpenFile::InetSocket {
                ino,
                protocol,
                local,
                queued,
                senders,
                ..
            } = f
            else {
                continue;
            };
            if *protocol == libc::IPPROTO_TCP || queued.is_empty() {
                continue;
            }
            let bad = || CoreError::Incompatible(format!("socket {ino}: malformed address"));
            let mut to: SocketAddr = local.parse().map_err(|_| bad())?;
            if to.ip().is_unspecified() {
                to.set_ip(if to.is_ipv6() {
                    std::net::Ipv6Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv4Addr::LOCALHOST.into()
                });
            }
            for (message, sender) in queued.iter().zip(senders) {
                let mut data = Vec::new();
                for &c in message {
                    data.extend_from_slice(&image.chunk(c)?);
                }
                let from: SocketAddr = sender.parse().map_err(|_| bad())?;
                let temp;
                let via = match bound_at(sender) {
                    Some(s) => s,
                    None => {
                        let family = if from.is_ipv6() {
                            AddressFamily::Inet6
                        } else {
                            AddressFamily::Inet
                        };
                        let s = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
                            .map_err(errno("socket"))?;
                        if let Err(e) = bind(s.as_raw_fd(), &SockaddrStorage::from(from)) {
                            tracing::warn!(
                                "a datagram queued for {local} from {from} is dropped: {from} cannot be bound again ({e})"
                            );
                            continue;
                        }
                        temp = s;
                        &temp
                    }
                };
                nix::sys::socket::sendto(
                    via.as_raw_fd(),
                    &data,
                    &SockaddrStorage::from(to),
                    MsgFlags::empty(),
                )
                .map_err(errno("refilling a UDP socket"))?;
            }
        }
        Ok(())
    }
}

/// A connected TCP pair over loopback, of the family of `like`: the near end for the
/// restored socket, the far end for its peer (or to be closed).
fn connected_pair(like: SocketAddr) -> CoreResult<(OwnedFd, OwnedFd)> {
    let lo: SocketAddr = if like.is_ipv6() {
        "[::1]:0".parse()
    } else {
        "127.0.0.1:0".parse()
    }
    .map_err(|_| CoreError::Incompatible("loopback address".into()))?;
    let io = |e: std::io::Error| CoreError::Io {
        path: "loopback connection".into(),
        source: e,
    };
    let listener = std::net::TcpListener::bind(lo).map_err(io)?;
    let near = std::net::TcpStream::connect(listener.local_addr().map_err(io)?).map_err(io)?;
    let (far, _) = listener.accept().map_err(io)?;
    Ok((OwnedFd::from(near), OwnedFd::from(far)))
}

/// Applies saved socket options that do not depend on binding.
fn apply(s: &OwnedFd, o: &SocketOptions, tcp: bool) -> CoreResult<()> {
    if o.reuse_port {
        setsockopt(s, sockopt::ReusePort, &true).map_err(errno("SO_REUSEPORT"))?;
    }
    if o.v6only {
        let _ = setsockopt(s, sockopt::Ipv6V6Only, &true);
    }
    if tcp && o.nodelay {
        setsockopt(s, sockopt::TcpNoDelay, &true).map_err(errno("TCP_NODELAY"))?;
    }
    if o.keepalive {
        setsockopt(s, sockopt::KeepAlive, &true).map_err(errno("SO_KEEPALIVE"))?;
    }
    Ok(())
}
