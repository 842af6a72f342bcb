//! Capturing descriptors: open file descriptions shared across the job, pipes with their
//! queued data, and connections to the outside world at stdio.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use stasis_image::manifest::{EpollWatch, Fd, OpenFile};
use stasis_image::pack::PackWriter;
use stasis_sys::{fd as sysfd, process};

use super::content::{FileContents, Found};
use super::memory::SharedObjects;
use super::sockets;
use crate::error::{CoreError, CoreResult, SysContext, io_err};
use crate::proc;
use crate::sockdiag::UnixSocket;

/// The job-wide table of open file descriptions being built.
#[derive(Debug, Default)]
pub struct FileTable {
    /// Descriptions, in manifest order.
    pub files: Vec<OpenFile>,
    /// For each description, one (pid, fd) holding it and its `/proc` link target.
    owners: Vec<(i32, i32, String)>,
    /// Pipes whose queued data is already saved.
    pipes_with_data: HashSet<u64>,
    kcmp_refused: bool,
    /// Inodes of every socket some process of the job holds.
    job_sockets: HashSet<u64>,
    /// Unix sockets of the network namespace (read on first use).
    unix: Option<HashMap<u64, UnixSocket>>,
    /// TCP and UDP sockets of the network namespace (read on first use).
    inet: Option<HashMap<u64, crate::sockdiag::InetSocket>>,
    /// Indices of the pseudo-terminal pairs whose master the job (or, for the job's
    /// terminal, the supervisor) holds: their slaves are part of the job.
    pty_pairs: HashSet<u32>,
    /// A copy of the master of each pair met so far, for reading the pair's state.
    pub(super) pty_masters: HashMap<u32, OwnedFd>,
    /// The processes of the job.
    pids: Vec<i32>,
    /// Bytes taken out of TCP connections of the job, put back when the table is dropped
    /// (before the job runs again).
    refills: Vec<sockets::Refill>,
}

/// The index of a pseudo-terminal slave path (`/dev/pts/N`).
fn pts_index(path: &str) -> Option<u32> {
    path.strip_prefix("/dev/pts/")?.parse().ok()
}

/// Whether a descriptor target is a pseudo-terminal master.
fn is_ptmx(path: &str) -> bool {
    path == "/dev/ptmx" || path == "/dev/pts/ptmx"
}

fn is_terminal(path: &str, meta: &std::fs::Metadata) -> bool {
    let major = (meta.rdev() >> 8) & 0xfff;
    meta.file_type().is_char_device()
        && (path.starts_with("/dev/pts/")
            || path.starts_with("/dev/tty")
            || path == "/dev/console"
            || (136..=143).contains(&major))
}

fn pipe_data(pid: i32, ours: &OwnedFd, fd: i32, pack: &mut PackWriter) -> CoreResult<Vec<u32>> {
    let queued = sysfd::queued_bytes(ours.as_fd())
        .ctx(|| format!("reading the queue of pipe {fd} of process {pid}"))?;
    if queued == 0 {
        return Ok(Vec::new());
    }
    let capacity = sysfd::pipe_size(ours.as_fd()).ctx(|| "reading a pipe's size".into())?;
    let (r, w) = nix::unistd::pipe().map_err(|e| CoreError::Sys {
        context: "creating a pipe".into(),
        source: stasis_sys::SysError::new("pipe", 0, e),
    })?;
    sysfd::set_pipe_size(w.as_fd(), capacity.max(queued)).ctx(|| "sizing a copy pipe".into())?;
    // tee(2) copies without consuming: the job finds its data untouched.
    let n = sysfd::tee(ours.as_fd(), w.as_fd(), queued)
        .ctx(|| format!("copying the data queued in pipe {fd} of process {pid}"))?;
    drop(w);
    let mut data = Vec::with_capacity(n);
    std::io::Read::read_to_end(&mut std::fs::File::from(r), &mut data)
        .map_err(io_err("pipe copy"))?;
    data.chunks(1 << 20)
        .map(|piece| Ok(pack.add(piece)?))
        .collect()
}

/// Captures an eventfd, timerfd, signalfd or epoll instance from its fdinfo; `Err` says why
/// the descriptor cannot be captured.
fn anon_inode(pid: i32, e: &proc::FdEntry, flags: i32) -> Result<OpenFile, String> {
    let field = |k: &str| {
        proc::info_field(&e.info, k).ok_or_else(|| format!("its fdinfo has no {k} field"))
    };
    match e.target.as_str() {
        "anon_inode:[eventfd]" => Ok(OpenFile::EventFd {
            count: u64::from_str_radix(field("eventfd-count")?, 16).map_err(|x| x.to_string())?,
            semaphore: proc::info_field(&e.info, "eventfd-semaphore") == Some("1"),
            flags,
        }),
        "anon_inode:[timerfd]" => Ok(OpenFile::TimerFd {
            clock: field("clockid")?.parse().map_err(|_| "bad clockid")?,
            flags,
            interval_ns: proc::timespec_ns(field("it_interval")?),
            value_ns: proc::timespec_ns(field("it_value")?),
            ticks: field("ticks")?.parse().map_err(|_| "bad ticks")?,
        }),
        "anon_inode:[signalfd]" => Ok(OpenFile::SignalFd {
            mask: u64::from_str_radix(field("sigmask")?, 16).map_err(|x| x.to_string())?,
            flags,
        }),
        "anon_inode:[eventpoll]" => {
            let owner = proc::ns_pid(&format!("/proc/{pid}")).map_err(|x| x.to_string())?;
            let watches = proc::epoll_watches(&e.info)
                .into_iter()
                .map(|(fd, events, data)| EpollWatch { fd, events, data })
                .collect();
            Ok(OpenFile::Epoll {
                flags,
                owner,
                watches,
            })
        }
        "anon_inode:inotify" => Ok(OpenFile::Inotify {
            flags,
            watches: super::inotify::watches(pid, &e.info)?,
        }),
        other => Err(format!(
            "{other} descriptors (io_uring, fanotify, pidfd, …) are not supported yet"
        )),
    }
}

impl FileTable {
    /// A descriptor of socket `ino`, fetched from whichever process of the job holds it.
    fn fetch_socket(&self, ino: u64) -> Option<OwnedFd> {
        let target = format!("socket:[{ino}]");
        self.pids.iter().find_map(|&pid| {
            let e = proc::fds(pid)
                .ok()?
                .into_iter()
                .find(|e| e.target == target)?;
            let pidfd = process::pidfd_open(pid).ok()?;
            process::pidfd_getfd(&pidfd, e.fd, pid).ok()
        })
    }

    /// The name (hex) of the job's listening unix socket whose accept queue holds the
    /// connection of socket `ino`, if any.
    fn unix_listener_of(&self, ino: u64) -> Option<String> {
        self.unix.as_ref()?.values().find_map(|l| {
            (l.state == crate::sockdiag::STATE_LISTEN
                && l.pending.contains(&ino)
                && self.job_sockets.contains(&l.ino))
            .then(|| l.name.as_deref().map(stasis_image::hex::encode))
            .flatten()
        })
    }

    /// The not yet accepted connection, held by a listening socket of the job, whose client
    /// end is TCP socket `s`.
    fn tcp_pending_of(
        &self,
        s: &crate::sockdiag::InetSocket,
    ) -> Option<crate::sockdiag::InetSocket> {
        let listens_there = self.inet.as_ref()?.values().any(|l| {
            l.state == crate::sockdiag::STATE_LISTEN
                && self.job_sockets.contains(&l.ino)
                && l.local.port() == s.remote.port()
                && (l.local.ip().is_unspecified() || l.local.ip() == s.remote.ip())
        });
        if !listens_there {
            return None;
        }
        crate::sockdiag::pending_connections()
            .into_iter()
            .find(|p| p.local == s.remote && p.remote == s.local)
    }

    /// Checks the connections waiting in the accept queue of TCP listening socket `l`: one
    /// whose client is in the job must hold no unread data (it could not be read without
    /// accepting it); one from outside the job is lost at restart, like every connection to
    /// the outside.
    fn check_tcp_backlog(&self, l: &crate::sockdiag::InetSocket) -> Result<(), String> {
        for p in crate::sockdiag::pending_connections() {
            if p.local.port() != l.local.port()
                || !(l.local.ip().is_unspecified() || l.local.ip() == p.local.ip())
            {
                continue;
            }
            let client_in_job = self.inet.as_ref().is_some_and(|all| {
                all.values().any(|c| {
                    c.local == p.remote && c.remote == p.local && self.job_sockets.contains(&c.ino)
                })
            });
            if client_in_job && p.rx_queue > 0 {
                return Err(format!(
                    "a connection from {} waits to be accepted with {} bytes the server has not read yet",
                    p.remote, p.rx_queue
                ));
            }
            if !client_in_job {
                tracing::warn!(
                    "a connection from {} outside the job waits to be accepted at {}: after a restart it is gone",
                    p.remote,
                    l.local
                );
            }
        }
        Ok(())
    }

    /// When TCP peer `peer` (a socket of the job) still holds bytes for socket `s` that `s`
    /// had no room for, takes every byte in flight towards `s` out of the connection, to be
    /// saved, and arranges for them to be put back through the peer before the job runs
    /// again. `None` when the receive queue shows everything.
    fn drain_towards(
        &mut self,
        ours: &OwnedFd,
        s: &crate::sockdiag::InetSocket,
        peer: u64,
    ) -> Result<Option<Vec<u8>>, String> {
        let Some(p) = self.inet.as_ref().and_then(|all| all.get(&peer)).cloned() else {
            return Ok(None);
        };
        if p.tx_queue == 0 {
            return Ok(None);
        }
        if s.state != crate::sockdiag::STATE_ESTABLISHED || p.state != s.state {
            return Err(format!(
                "its peer has closed its side with {} bytes still unsent",
                p.tx_queue
            ));
        }
        let sender = self.fetch_socket(peer).ok_or_else(|| {
            format!("the peer socket {peer} holding data for it cannot be fetched")
        })?;
        let sender_copy = sender
            .try_clone()
            .map_err(|e| format!("duplicating socket {peer}: {e}"))?;
        match sockets::drain_tcp(ours, &sender) {
            Ok(data) => {
                self.refills
                    .push(sockets::Refill::new(sender_copy, data.clone()));
                Ok(Some(data))
            }
            Err((data, why)) => {
                self.refills.push(sockets::Refill::new(sender_copy, data));
                Err(why)
            }
        }
    }

    /// A table for the job made of processes `pids`; `terminal` is the index of the
    /// pseudo-terminal the supervisor gave the job, if any.
    pub fn new(pids: &[i32], terminal: Option<u32>) -> Self {
        let pty_pairs = pids
            .iter()
            .flat_map(|&p| proc::fds(p).unwrap_or_default())
            .filter(|e| is_ptmx(&e.target))
            .filter_map(|e| proc::info_field(&e.info, "tty-index")?.parse().ok())
            .chain(terminal)
            .collect();
        let job_sockets = pids
            .iter()
            .flat_map(|p| {
                std::fs::read_dir(format!("/proc/{p}/fd"))
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter_map(|t| {
                t.to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse()
                    .ok()
            })
            .collect();
        FileTable {
            job_sockets,
            pty_pairs,
            pids: pids.to_vec(),
            ..FileTable::default()
        }
    }

    fn unix_sockets(&mut self) -> CoreResult<&HashMap<u64, UnixSocket>> {
        if self.unix.is_none() {
            self.unix = Some(crate::sockdiag::unix_sockets()?);
        }
        Ok(self.unix.get_or_insert_default())
    }

    /// The description `fd` of `pid` shares with one already in the table, if any.
    fn shared_with(&mut self, pid: i32, fd: i32, target: &str) -> Option<u32> {
        if self.kcmp_refused {
            return None;
        }
        for (i, (opid, ofd, otarget)) in self.owners.iter().enumerate() {
            if otarget != target {
                continue;
            }
            match process::same_file_description(*opid, pid, *ofd, fd) {
                Ok(true) => return u32::try_from(i).ok(),
                Ok(false) => {}
                Err(_) => {
                    self.kcmp_refused = true;
                    return None;
                }
            }
        }
        None
    }

    /// Captures the descriptor table of one process.
    pub fn capture_process(
        &mut self,
        pid: i32,
        shared: &mut SharedObjects,
        contents: &mut FileContents,
        pack: &mut PackWriter,
    ) -> CoreResult<Vec<Fd>> {
        let entries = proc::fds(pid)?;
        let pidfd =
            process::pidfd_open(pid).ctx(|| format!("opening a pidfd for process {pid}"))?;
        let mut fds = Vec::with_capacity(entries.len());
        for e in &entries {
            let cloexec = e.flags & libc::O_CLOEXEC != 0;
            let flags = e.flags & !libc::O_CLOEXEC;
            if let Some(file) = self.shared_with(pid, e.fd, &e.target) {
                fds.push(Fd {
                    fd: e.fd,
                    file,
                    cloexec,
                });
                continue;
            }
            let unsupported = |why: &str| CoreError::Unsupported {
                pid,
                what: format!("descriptor {} ({})", e.fd, e.target),
                why: why.into(),
            };
            let file = if let Some(inode) = e
                .target
                .strip_prefix("pipe:[")
                .and_then(|s| s.strip_suffix(']'))
            {
                let inode: u64 = inode.parse().unwrap_or(0);
                let write_end = flags & libc::O_ACCMODE == libc::O_WRONLY;
                let ours = process::pidfd_getfd(&pidfd, e.fd, pid)
                    .ctx(|| format!("fetching pipe descriptor {} of process {pid}", e.fd))?;
                let capacity = sysfd::pipe_size(ours.as_fd()).unwrap_or(65536) as u64;
                let data = if !write_end && self.pipes_with_data.insert(inode) {
                    pipe_data(pid, &ours, e.fd, pack)?
                } else {
                    Vec::new()
                };
                OpenFile::Pipe {
                    inode,
                    write_end,
                    flags,
                    capacity,
                    data,
                }
            } else if let Some(ino) = e
                .target
                .strip_prefix("socket:[")
                .and_then(|x| x.strip_suffix(']'))
            {
                let ino: u64 = ino.parse().unwrap_or(0);
                let unix = self.unix_sockets()?.get(&ino).cloned();
                match unix {
                    Some(u) => {
                        let in_job = u.peer != 0 && self.job_sockets.contains(&u.peer);
                        let connect_to = if u.peer == 0 {
                            self.unix_listener_of(u.ino)
                        } else {
                            None
                        };
                        if u.state == crate::sockdiag::STATE_LISTEN {
                            for client in &u.pending {
                                if !self.job_sockets.contains(client) {
                                    tracing::warn!(
                                        "a connection from outside the job waits to be accepted by unix socket {}: after a restart it is gone",
                                        u.ino
                                    );
                                }
                            }
                        }
                        if e.fd <= 2
                            && !in_job
                            && connect_to.is_none()
                            && u.state != crate::sockdiag::STATE_LISTEN
                        {
                            OpenFile::Stdio {
                                path: e.target.clone(),
                                flags,
                            }
                        } else {
                            let ours = process::pidfd_getfd(&pidfd, e.fd, pid).ctx(|| {
                                format!("fetching socket descriptor {} of process {pid}", e.fd)
                            })?;
                            sockets::capture_unix(&ours, &u, in_job, connect_to, flags, pack)
                                .map_err(|why| unsupported(&why))?
                        }
                    }
                    None => {
                        let inet = self
                            .inet
                            .get_or_insert_with(crate::sockdiag::inet_sockets)
                            .get(&ino)
                            .cloned();
                        match inet {
                            Some(s) => {
                                let peer = self.inet.as_ref().and_then(|all| {
                                    all.values()
                                        .find(|o| {
                                            o.protocol == s.protocol
                                                && o.local == s.remote
                                                && o.remote == s.local
                                                && self.job_sockets.contains(&o.ino)
                                        })
                                        .map(|o| o.ino)
                                });
                                let tcp = s.protocol == libc::IPPROTO_TCP;
                                let pending = if tcp && peer.is_none() {
                                    self.tcp_pending_of(&s)
                                } else {
                                    None
                                };
                                if e.fd <= 2
                                    && peer.is_none()
                                    && pending.is_none()
                                    && s.state != crate::sockdiag::STATE_LISTEN
                                {
                                    OpenFile::Stdio {
                                        path: e.target.clone(),
                                        flags,
                                    }
                                } else {
                                    let ours =
                                        process::pidfd_getfd(&pidfd, e.fd, pid).ctx(|| {
                                            format!(
                                                "fetching socket descriptor {} of process {pid}",
                                                e.fd
                                            )
                                        })?;
                                    if tcp && s.state == crate::sockdiag::STATE_LISTEN {
                                        self.check_tcp_backlog(&s)
                                            .map_err(|why| unsupported(&why))?;
                                    }
                                    if let Some(p) = pending.as_ref().filter(|p| p.rx_queue > 0) {
                                        return Err(unsupported(&format!(
                                            "its connection waits to be accepted with {} bytes the server has not read yet",
                                            p.rx_queue
                                        )));
                                    }
                                    let drained = match peer {
                                        Some(p) if tcp => self
                                            .drain_towards(&ours, &s, p)
                                            .map_err(|why| unsupported(&why))?,
                                        _ => None,
                                    };
                                    sockets::capture_inet(
                                        &ours,
                                        &s,
                                        peer,
                                        pending.is_some(),
                                        drained.as_deref(),
                                        flags,
                                        pack,
                                    )
                                    .map_err(|why| unsupported(&why))?
                                }
                            }
                            None if e.fd <= 2 => OpenFile::Stdio {
                                path: e.target.clone(),
                                flags,
                            },
                            None => {
                                return Err(unsupported(
                                    "sockets of this family (netlink, packet, …) are not supported yet",
                                ));
                            }
                        }
                    }
                }
            } else if is_ptmx(&e.target)
                || pts_index(&e.target).is_some_and(|i| self.pty_pairs.contains(&i))
            {
                let master = is_ptmx(&e.target);
                let index = if master {
                    proc::info_field(&e.info, "tty-index")
                        .and_then(|i| i.parse().ok())
                        .ok_or_else(|| unsupported("its fdinfo gives no tty-index"))?
                } else {
                    pts_index(&e.target).unwrap_or(0)
                };
                if master && !self.pty_masters.contains_key(&index) {
                    let ours = process::pidfd_getfd(&pidfd, e.fd, pid).ctx(|| {
                        format!("fetching pseudo-terminal master {} of process {pid}", e.fd)
                    })?;
                    self.pty_masters.insert(index, ours);
                }
                OpenFile::Pty {
                    index,
                    master,
                    flags,
                }
            } else if e.target.starts_with("anon_inode:") {
                anon_inode(pid, e, flags).map_err(|why| unsupported(&why))?
            } else if e.target.starts_with("/memfd:") || e.target.ends_with(" (deleted)") {
                // A memfd, or a file deleted while open: its content lives only in the
                // kernel, so it is saved as a shared memory object (one copy, shared with
                // any mapping of it) and restored as a memfd.
                let ours = process::pidfd_getfd(&pidfd, e.fd, pid)
                    .ctx(|| format!("fetching descriptor {} of process {pid}", e.fd))?;
                let file = std::fs::File::from(ours);
                let meta = file.metadata().map_err(io_err(&e.target))?;
                if !meta.file_type().is_file() {
                    return Err(unsupported(
                        "it was deleted while open and is not a regular file",
                    ));
                }
                let shmem = shared.capture_file(meta.ino(), &e.target, &file, meta.len(), pack)?;
                OpenFile::Memfd {
                    shmem,
                    flags,
                    pos: e.pos,
                }
            } else if e.target.starts_with('/') {
                let link = format!("/proc/{pid}/fd/{}", e.fd);
                let meta = std::fs::metadata(&link).map_err(io_err(&link))?;
                if meta.file_type().is_socket() {
                    return Err(unsupported(
                        "socket files opened by path are not supported yet",
                    ));
                }
                if meta.file_type().is_fifo() {
                    let readable = flags & libc::O_ACCMODE != libc::O_WRONLY;
                    let data = if readable && self.pipes_with_data.insert(meta.ino()) {
                        let ours = process::pidfd_getfd(&pidfd, e.fd, pid).ctx(|| {
                            format!("fetching FIFO descriptor {} of process {pid}", e.fd)
                        })?;
                        pipe_data(pid, &ours, e.fd, pack)?
                    } else {
                        Vec::new()
                    };
                    OpenFile::Fifo {
                        path: e.target.clone(),
                        inode: meta.ino(),
                        flags,
                        data,
                    }
                } else if is_terminal(&e.target, &meta) {
                    OpenFile::Stdio {
                        path: e.target.clone(),
                        flags,
                    }
                } else {
                    let mode = flags & libc::O_ACCMODE;
                    let found = Found {
                        pid,
                        path: &e.target,
                        meta: &meta,
                        source: &link,
                        checked: mode != libc::O_WRONLY,
                        save: true,
                        written: mode != libc::O_RDONLY,
                    };
                    OpenFile::Path {
                        file: contents.file_id(&found, pack)?,
                        flags,
                        pos: e.pos,
                    }
                }
            } else {
                return Err(unsupported("unknown descriptor kind"));
            };
            self.files.push(file);
            self.owners.push((pid, e.fd, e.target.clone()));
            fds.push(Fd {
                fd: e.fd,
                file: u32::try_from(self.files.len() - 1).unwrap_or(0),
                cloexec,
            });
        }
        // Epoll registrations name descriptors of this process: they must be here.
        for d in &fds {
            if let OpenFile::Epoll { watches, .. } = &self.files[d.file as usize]
                && let Some(w) = watches.iter().find(|w| !fds.iter().any(|f| f.fd == w.fd))
            {
                return Err(CoreError::Unsupported {
                    pid,
                    what: format!("epoll descriptor {}", d.fd),
                    why: format!(
                        "it watches descriptor {} which the process no longer holds",
                        w.fd
                    ),
                });
            }
        }
        Ok(fds)
    }

    /// Finishes the table: a pipe with only one end in the job, held at a standard
    /// descriptor, leads outside the job (e.g. `stasis run … | tee log`) and is reconnected
    /// to the restarting command's stdio.
    pub fn finish(mut self, processes: &[stasis_image::manifest::ProcessImage]) -> Vec<OpenFile> {
        for i in 0..self.files.len() {
            if let OpenFile::Pipe { inode, flags, .. } = self.files[i] {
                let ends = self
                    .files
                    .iter()
                    .filter(|f| matches!(f, OpenFile::Pipe { inode: other, .. } if *other == inode))
                    .count();
                let at_stdio = processes
                    .iter()
                    .flat_map(|p| &p.fds)
                    .any(|d| d.file as usize == i && d.fd <= 2);
                if ends == 1 && at_stdio {
                    self.files[i] = OpenFile::Stdio {
                        path: format!("pipe:[{inode}]"),
                        flags,
                    };
                }
            }
        }
        self.files
    }
}
