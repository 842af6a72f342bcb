//! What the kernel's `sock_diag` netlink interface says about unix sockets: type, state,
//! peer, name, queue lengths and shutdown state — things `/proc` does not show, above all
//! which socket is connected to which.

use std::collections::HashMap;

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};

use crate::error::{CoreError, CoreResult};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const UDIAG_SHOW_NAME: u32 = 1;
const UDIAG_SHOW_PEER: u32 = 4;
const UDIAG_SHOW_ICONS: u32 = 8;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_ICONS: u16 = 3;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_SHUTDOWN: u16 = 6;

/// Socket state values (`TCP_*` names, as the kernel uses them for unix sockets too).
pub const STATE_ESTABLISHED: u8 = 1;
/// A listening socket.
pub const STATE_LISTEN: u8 = 10;

/// One unix socket of our network namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnixSocket {
    /// Inode (as in `socket:[INODE]`).
    pub ino: u64,
    /// `SOCK_STREAM`, `SOCK_DGRAM` or `SOCK_SEQPACKET`.
    pub kind: i32,
    /// [`STATE_ESTABLISHED`], [`STATE_LISTEN`], or unconnected (7).
    pub state: u8,
    /// Inode of the connected peer (0: none).
    pub peer: u64,
    /// Bound name: a path, or an abstract name starting with a NUL byte.
    pub name: Option<Vec<u8>>,
    /// Bytes (stream) or data (datagram) queued for reading; pending connections when
    /// listening.
    pub rqueue: u32,
    /// Shutdown bits: 1 = no more receiving, 2 = no more sending.
    pub shutdown: u8,
    /// Listening: the inodes of the sockets whose connections wait to be accepted.
    pub pending: Vec<u64>,
}

fn err(what: &str) -> CoreError {
    CoreError::Io {
        path: "sock_diag".into(),
        source: std::io::Error::other(what.to_owned()),
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |x| u32::from_ne_bytes(x.try_into().unwrap_or_default()))
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |x| u16::from_ne_bytes(x.try_into().unwrap_or_default()))
}

fn parse_socket(msg: &[u8]) -> UnixSocket {
    // unix_diag_msg: family, type, state, pad (u8 each), ino u32, cookie u32[2].
    let mut s = UnixSocket {
        kind: i32::from(msg[1]),
        state: msg[2],
        ino: u64::from(u32_at(msg, 4)),
        ..UnixSocket::default()
    };
    let mut at = 16;
    while at + 4 <= msg.len() {
        let len = usize::from(u16_at(msg, at));
        let kind = u16_at(msg, at + 2);
        if len < 4 || at + len > msg.len() {
            break;
        }
        let data = &msg[at + 4..at + len];
        match kind {
            UNIX_DIAG_NAME => {
                let mut name = data.to_vec();
                if name.first() != Some(&0) {
                    while name.last() == Some(&0) {
                        name.pop();
                    }
                }
                s.name = Some(name);
            }
            UNIX_DIAG_PEER => s.peer = u64::from(u32_at(data, 0)),
            UNIX_DIAG_ICONS => {
                s.pending = data
                    .chunks_exact(4)
                    .map(|c| u64::from(u32_at(c, 0)))
                    .collect();
            }
            UNIX_DIAG_RQLEN => s.rqueue = u32_at(data, 0),
            UNIX_DIAG_SHUTDOWN => s.shutdown = data.first().copied().unwrap_or(0),
            _ => {}
        }
        at += len.div_ceil(4) * 4;
    }
    s
}

/// Every unix socket of our network namespace, by inode.
pub fn unix_sockets() -> CoreResult<HashMap<u64, UnixSocket>> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .map_err(|e| err(&format!("cannot open a sock_diag socket: {e}")))?;
    let mut req = Vec::with_capacity(40);
    req.extend_from_slice(&40u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[libc::AF_UNIX as u8, 0, 0, 0]);
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(
        &(UDIAG_SHOW_NAME | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS | UDIAG_SHOW_RQLEN).to_ne_bytes(),
    );
    req.extend_from_slice(&[0u8; 8]);
    sendto(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &req,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(|e| err(&format!("sock_diag request: {e}")))?;
    let mut out = HashMap::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = recv(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &mut buf,
            MsgFlags::empty(),
        )
        .map_err(|e| err(&format!("sock_diag reply: {e}")))?;
        let mut at = 0;
        while at + 16 <= n {
            let len = u32_at(&buf, at) as usize;
            let kind = u16_at(&buf, at + 4);
            if len < 16 || at + len > n {
                return Err(err("malformed sock_diag reply"));
            }
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => return Err(err("sock_diag refused the request")),
                _ => {
                    let s = parse_socket(&buf[at + 16..at + len]);
                    out.insert(s.ino, s);
                }
            }
            at += len.div_ceil(4) * 4;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};

    use super::*;

    fn ino(fd: &impl std::os::fd::AsFd) -> u64 {
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd());
        std::fs::metadata(format!("/proc/self/fd/{raw}"))
            .map(|m| m.ino())
            .unwrap_or(0)
    }

    #[test]
    fn sees_tcp_listeners_and_connections() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        std::io::Write::write_all(&mut &c, b"abc").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let all = inet_sockets();
        let sl = &all[&ino(&l)];
        assert_eq!(
            (sl.state, sl.local),
            (STATE_LISTEN, l.local_addr().unwrap())
        );
        let (sc, sa) = (&all[&ino(&c)], &all[&ino(&a)]);
        assert_eq!((sc.local, sc.remote), (sa.remote, sa.local));
        assert_eq!((sa.state, sa.rx_queue), (STATE_ESTABLISHED, 3));
    }

    #[test]
    fn sees_pairs_names_queues_and_shutdown() {
        let (a, b) = UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut &a, b"hello").unwrap();
        b.shutdown(std::net::Shutdown::Write).unwrap();
        let dir = tempfile_dir();
        let path = dir.join("sock");
        let l = UnixListener::bind(&path).unwrap();
        let d = UnixDatagram::unbound().unwrap();
        let all = unix_sockets().unwrap();
        let (sa, sb) = (&all[&ino(&a)], &all[&ino(&b)]);
        assert_eq!((sa.peer, sb.peer), (ino(&b), ino(&a)));
        assert_eq!((sa.kind, sa.state), (libc::SOCK_STREAM, STATE_ESTABLISHED));
        assert_eq!(sb.rqueue, 5, "bytes queued for b");
        assert_eq!(sb.shutdown & 2, 2, "b shut down writing");
        let sl = &all[&ino(&l)];
        assert_eq!(sl.state, STATE_LISTEN);
        assert_eq!(
            sl.name.as_deref(),
            Some(path.as_os_str().as_encoded_bytes())
        );
        assert_eq!(all[&ino(&d)].kind, libc::SOCK_DGRAM);
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("stasis-sockdiag-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

/// One TCP or UDP socket of our network namespace, from `/proc/net/{tcp,udp}{,6}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InetSocket {
    /// Inode (as in `socket:[INODE]`).
    pub ino: u64,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: i32,
    /// Local address.
    pub local: std::net::SocketAddr,
    /// Remote address (unspecified with port 0 when not connected).
    pub remote: std::net::SocketAddr,
    /// TCP state (`TCP_ESTABLISHED` = 1, `TCP_CLOSE` = 7, `TCP_LISTEN` = 10, …); UDP: 1
    /// when connected, 7 otherwise.
    pub state: u8,
    /// Bytes sent but not yet acknowledged (TCP) / queued for sending.
    pub tx_queue: u32,
    /// Bytes waiting to be read; for a listening socket, connections waiting to be accepted.
    pub rx_queue: u32,
}

/// Makes every TCP socket of process `pid` close with a reset (`SO_LINGER` on, zero
/// timeout), so that killing the process leaves no `TIME_WAIT` behind to hold its ports
/// against a restart. Sockets that cannot be fetched are skipped.
pub fn reset_tcp_on_close(pid: i32) {
    let tcp = inet_sockets();
    let Ok(pidfd) = stasis_sys::process::pidfd_open(pid) else {
        return;
    };
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let ino = target.to_str().and_then(|t| {
            t.strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse::<u64>()
                .ok()
        });
        if ino
            .and_then(|i| tcp.get(&i))
            .is_some_and(|s| s.protocol == libc::IPPROTO_TCP)
            && let Ok(ours) = stasis_sys::process::pidfd_getfd(&pidfd, fd, pid)
        {
            let linger = nix::sys::socket::sockopt::Linger;
            let _ = nix::sys::socket::setsockopt(
                &ours,
                linger,
                &libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            );
        }
    }
}

/// TCP `CLOSE_WAIT`: the peer closed its side.
pub const TCP_CLOSE_WAIT: u8 = 8;

fn parse_addr(text: &str, v6: bool) -> Option<std::net::SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip: std::net::IpAddr = if v6 {
        let mut bytes = [0u8; 16];
        for (i, word) in (0..4).map(|i| ip.get(i * 8..i * 8 + 8)).enumerate() {
            let w = u32::from_str_radix(word?, 16).ok()?;
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        std::net::Ipv6Addr::from(bytes).into()
    } else {
        std::net::Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.to_le_bytes()).into()
    };
    Some(std::net::SocketAddr::new(ip, port))
}

/// Every TCP and UDP socket of our network namespace, by inode.
pub fn inet_sockets() -> HashMap<u64, InetSocket> {
    all_inet()
        .into_iter()
        .filter(|s| s.ino != 0)
        .map(|s| (s.ino, s))
        .collect()
}

/// TCP connections that a listening socket of our network namespace holds but that nobody
/// has accepted yet (established or being established; no inode, no descriptor).
pub fn pending_connections() -> Vec<InetSocket> {
    all_inet()
        .into_iter()
        .filter(|s| s.ino == 0 && s.protocol == libc::IPPROTO_TCP && matches!(s.state, 1 | 3))
        .collect()
}

/// Every entry of `/proc/net/{tcp,udp}{,6}`.
fn all_inet() -> Vec<InetSocket> {
    let mut out = Vec::new();
    for (file, protocol, v6) in [
        ("tcp", libc::IPPROTO_TCP, false),
        ("tcp6", libc::IPPROTO_TCP, true),
        ("udp", libc::IPPROTO_UDP, false),
        ("udp6", libc::IPPROTO_UDP, true),
    ] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/net/{file}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let parsed = (|| {
                let (tx, rx) = f.get(4)?.split_once(':')?;
                Some(InetSocket {
                    ino: f.get(9)?.parse().ok()?,
                    protocol,
                    local: parse_addr(f.get(1)?, v6)?,
                    remote: parse_addr(f.get(2)?, v6)?,
                    state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                    tx_queue: u32::from_str_radix(tx, 16).ok()?,
                    rx_queue: u32::from_str_radix(rx, 16).ok()?,
                })
            })();
            out.extend(parsed);
        }
    }
    out
}
