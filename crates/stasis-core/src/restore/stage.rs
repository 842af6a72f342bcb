//! Staging: everything the restored processes will hold open is prepared in the restorer
//! first, at high descriptor numbers, and inherited by the processes it forks.
//!
//! Files are opened with their saved flags and offset; pipes are created, sized and
//! refilled; stdio connections are duplicated from the restorer's own stdin/stdout/stderr;
//! shared memory objects become memfds filled with their saved pages. Open file
//! descriptions shared by several descriptors — in one process or several — are staged once,
//! so they stay shared.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use nix::fcntl::OFlag;
use nix::sys::epoll::{Epoll, EpollCreateFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use stasis_image::OpenGeneration;
use stasis_image::manifest::{Manifest, OpenFile, Pty};
use stasis_sys::{SysError, fd as sysfd};

use super::child::sys;
use super::sockets::Sockets;
use crate::error::{CoreError, CoreResult};

/// Descriptors staged in the restorer.
#[derive(Debug)]
pub(super) struct Staged {
    /// Descriptor number of each entry of `Manifest::files`.
    pub files: Vec<RawFd>,
    /// Descriptor number of each mapped file, by path.
    pub maps: HashMap<String, RawFd>,
    /// Descriptor number of each process's executable (−1: leave the exe link alone).
    pub exes: HashMap<String, RawFd>,
    /// Descriptor number of each shared memory object.
    pub shmem: Vec<RawFd>,
    /// The restarting command's own stdin, stdout and stderr.
    pub stdio: [RawFd; 3],
    /// Lowest staged number: every process closes everything at or above it at the end.
    pub base: RawFd,
    /// A staged slave of each pseudo-terminal pair, by saved index (for making it a
    /// session's controlling terminal).
    pub pty_slaves: HashMap<u32, RawFd>,
    /// The new master of the job's terminal, for the supervisor to relay.
    pub terminal: Option<OwnedFd>,
    keep: Vec<OwnedFd>,
}

fn open_path(path: &str, flags: i32) -> CoreResult<OwnedFd> {
    let flags = OFlag::from_bits_retain(
        flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_CLOEXEC),
    ) | OFlag::O_NOCTTY;
    nix::fcntl::open(path, flags, nix::sys::stat::Mode::empty()).map_err(|e| {
        CoreError::FileChanged {
            path: path.to_owned(),
            detail: format!("cannot be opened ({e})"),
        }
    })
}

fn errno(context: &'static str) -> impl FnOnce(nix::errno::Errno) -> CoreError {
    move |e| sys(context)(SysError::new(context, 0, e))
}

impl Staged {
    fn push(&mut self, fd: OwnedFd) -> CoreResult<RawFd> {
        let high =
            sysfd::dup_at_least(fd.as_fd(), self.base).map_err(sys("staging a descriptor"))?;
        let n = high.as_raw_fd();
        self.keep.push(high);
        Ok(n)
    }
}

/// A new pseudo-terminal pair with the saved modes and window size: (master, slave).
fn new_pty(pty: &Pty) -> CoreResult<(OwnedFd, OwnedFd)> {
    let (master, _) = stasis_sys::pty::open_master().map_err(sys("opening a pseudo-terminal"))?;
    let slave = stasis_sys::pty::open_slave(master.as_fd(), libc::O_RDWR)
        .map_err(sys("opening a pseudo-terminal slave"))?;
    let mut cc = [0u8; 32];
    let n = pty.modes.cc.len().min(32);
    cc[..n].copy_from_slice(&pty.modes.cc[..n]);
    let state = stasis_sys::pty::TermState {
        iflag: pty.modes.iflag,
        oflag: pty.modes.oflag,
        cflag: pty.modes.cflag,
        lflag: pty.modes.lflag,
        line: pty.modes.line,
        cc,
        winsize: pty.winsize,
    };
    stasis_sys::pty::set_modes(slave.as_fd(), &state)
        .map_err(sys("restoring a pseudo-terminal's modes"))?;
    stasis_sys::pty::set_winsize(master.as_fd(), pty.winsize)
        .map_err(sys("restoring a pseudo-terminal's window size"))?;
    Ok((master, slave))
}

/// Stages every descriptor, mapped file, executable and shared memory object of `m`.
pub(super) fn stage(image: &mut OpenGeneration, m: &Manifest) -> CoreResult<Staged> {
    let max_fd = m
        .processes
        .iter()
        .flat_map(|p| &p.fds)
        .map(|f| f.fd)
        .max()
        .unwrap_or(2);
    let mut st = Staged {
        files: Vec::new(),
        maps: HashMap::new(),
        exes: HashMap::new(),
        shmem: Vec::new(),
        stdio: [-1; 3],
        base: (max_fd + 1).max(256),
        pty_slaves: HashMap::new(),
        terminal: None,
        keep: Vec::new(),
    };
    for n in 0..3 {
        // A closed standard descriptor of ours becomes /dev/null for the job.
        let fd = match sysfd::dup_raw_at_least(n, st.base) {
            Ok(fd) => fd,
            Err(_) => open_path("/dev/null", libc::O_RDWR)?,
        };
        st.stdio[n as usize] = st.push(fd)?;
    }
    for (i, obj) in m.shared_memory.iter().enumerate() {
        let fd = nix::sys::memfd::memfd_create(c"stasis-shmem", nix::sys::memfd::MFdFlags::empty())
            .map_err(errno("memfd_create"))?;
        nix::unistd::ftruncate(&fd, i64::try_from(obj.size).unwrap_or(0))
            .map_err(errno("sizing shared memory"))?;
        let file = std::fs::File::from(fd);
        for run in &obj.pages {
            let bytes = image.chunk(run.chunk)?;
            // The last page of a file may run past its size: only the file's bytes.
            let len = usize::try_from(obj.size.saturating_sub(run.addr))
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            std::os::unix::fs::FileExt::write_all_at(&file, &bytes[..len], run.addr).map_err(
                |e| CoreError::Io {
                    path: format!("shared memory object {i}"),
                    source: e,
                },
            )?;
        }
        let n = st.push(OwnedFd::from(file))?;
        st.shmem.push(n);
    }
    let mut masters: HashMap<u32, OwnedFd> = HashMap::new();
    for pty in &m.ptys {
        let (master, slave) = new_pty(pty)?;
        let mut queued = [Vec::new(), Vec::new()];
        for (bytes, chunks) in queued.iter_mut().zip([&pty.output, &pty.input]) {
            for &c in chunks {
                bytes.extend_from_slice(&image.chunk(c)?);
            }
        }
        crate::ptyqueue::put(master.as_fd(), &queued[0], &queued[1])
            .map_err(sys("putting the bytes queued in a pseudo-terminal back"))?;
        let staged_slave = st.push(slave)?;
        st.pty_slaves.insert(pty.index, staged_slave);
        if pty.job_terminal {
            let copy = master.try_clone().map_err(|e| CoreError::Io {
                path: "the job's terminal".into(),
                source: e,
            })?;
            st.terminal = Some(copy);
        }
        masters.insert(pty.index, master);
    }
    let mut pipes: HashMap<u64, (OwnedFd, OwnedFd)> = HashMap::new();
    let mut sockets = Sockets::default();
    let mut fifos: HashMap<u64, OwnedFd> = HashMap::new();
    sockets.bind_first(&m.files)?;
    let peer_of = |ino: u64| {
        m.files.iter().find_map(|f| match f {
            OpenFile::UnixSocket { ino: i, peer, .. }
            | OpenFile::InetSocket { ino: i, peer, .. }
                if *i == ino =>
            {
                Some(*peer)
            }
            _ => None,
        })
    };
    for (index, f) in m.files.iter().enumerate() {
        let fd = match f {
            OpenFile::Path { file, flags, pos } => {
                let fd = open_path(&file.path, *flags)?;
                if file.regular || *pos != 0 {
                    let _ = nix::unistd::lseek(
                        fd.as_fd(),
                        i64::try_from(*pos).unwrap_or(0),
                        nix::unistd::Whence::SeekSet,
                    );
                }
                fd
            }
            OpenFile::Stdio { flags, .. } => {
                let lowest = m
                    .processes
                    .iter()
                    .flat_map(|p| &p.fds)
                    .filter(|d| d.file as usize == index)
                    .map(|d| d.fd)
                    .min()
                    .unwrap_or(0);
                let ours = if (0..=2).contains(&lowest) {
                    lowest
                } else if flags & libc::O_ACCMODE == libc::O_RDONLY {
                    0
                } else {
                    1
                };
                sysfd::dup_raw_at_least(ours, st.base)
                    .map_err(sys("duplicating the restart command's stdio"))?
            }
            OpenFile::EventFd {
                count,
                semaphore,
                flags,
            } => {
                let efd = if *semaphore {
                    EfdFlags::EFD_SEMAPHORE
                } else {
                    EfdFlags::empty()
                };
                let fd: OwnedFd = EventFd::from_value_and_flags(0, efd)
                    .map_err(errno("eventfd"))?
                    .into();
                if *count > 0 {
                    nix::unistd::write(&fd, &count.to_ne_bytes())
                        .map_err(errno("setting an eventfd's counter"))?;
                }
                sysfd::set_status_flags(fd.as_fd(), flags & libc::O_NONBLOCK)
                    .map_err(sys("setting eventfd flags"))?;
                fd
            }
            OpenFile::TimerFd {
                clock,
                flags,
                interval_ns,
                value_ns,
                ticks,
            } => {
                let fd = sysfd::timerfd(*clock, *value_ns, *interval_ns)
                    .map_err(sys("recreating a timerfd"))?;
                if *ticks > 0 {
                    sysfd::timerfd_set_ticks(fd.as_fd(), *ticks)
                        .map_err(sys("restoring a timerfd's pending expirations"))?;
                }
                sysfd::set_status_flags(fd.as_fd(), flags & libc::O_NONBLOCK)
                    .map_err(sys("setting timerfd flags"))?;
                fd
            }
            OpenFile::SignalFd { mask, flags } => sysfd::signalfd(*mask, flags & libc::O_NONBLOCK)
                .map_err(sys("recreating a signalfd"))?,
            OpenFile::Epoll { flags, .. } => {
                let ep = Epoll::new(EpollCreateFlags::empty()).map_err(errno("epoll_create1"))?;
                sysfd::set_status_flags(ep.0.as_fd(), flags & libc::O_NONBLOCK)
                    .map_err(sys("setting epoll flags"))?;
                ep.0
            }
            OpenFile::Memfd {
                shmem,
                flags: _,
                pos,
            } => {
                let fd = sysfd::dup_raw_at_least(st.shmem[*shmem as usize], st.base)
                    .map_err(sys("staging a memfd"))?;
                let _ = nix::unistd::lseek(
                    fd.as_fd(),
                    i64::try_from(*pos).unwrap_or(0),
                    nix::unistd::Whence::SeekSet,
                );
                fd
            }
            OpenFile::Fifo {
                path,
                inode,
                flags,
                data,
            } => {
                // A keeper opened read-write holds the FIFO open, so that opening either end
                // does not wait for the other, and carries the refilled data.
                if !fifos.contains_key(inode) {
                    let keeper = open_path(path, libc::O_RDWR | libc::O_NONBLOCK)?;
                    for &chunk in data {
                        let bytes = image.chunk(chunk)?;
                        nix::unistd::write(&keeper, &bytes).map_err(errno("refilling a FIFO"))?;
                    }
                    fifos.insert(*inode, keeper);
                }
                let fd = open_path(path, flags | libc::O_NONBLOCK)?;
                sysfd::set_status_flags(fd.as_fd(), *flags).map_err(sys("setting FIFO flags"))?;
                fd
            }
            OpenFile::Pty {
                index,
                master,
                flags,
            } => {
                let pair = masters.get(index).ok_or_else(|| {
                    CoreError::Incompatible(format!(
                        "the image names pseudo-terminal {index} but saves no state for it"
                    ))
                })?;
                if *master {
                    let fd = sysfd::dup_at_least(pair.as_fd(), st.base)
                        .map_err(sys("staging a pseudo-terminal master"))?;
                    sysfd::set_status_flags(fd.as_fd(), flags & libc::O_NONBLOCK)
                        .map_err(sys("setting pseudo-terminal flags"))?;
                    fd
                } else {
                    stasis_sys::pty::open_slave(pair.as_fd(), *flags)
                        .map_err(sys("opening a pseudo-terminal slave"))?
                }
            }
            OpenFile::Inotify { flags, watches } => super::inotify::recreate(*flags, watches)?,
            OpenFile::InetSocket { flags, .. } => {
                let fd = sockets.stage_inet(f, peer_of)?;
                sysfd::set_status_flags(fd.as_fd(), flags & libc::O_NONBLOCK)
                    .map_err(sys("setting socket flags"))?;
                fd
            }
            OpenFile::UnixSocket { flags, .. } => {
                let fd = sockets.stage(f, peer_of)?;
                sysfd::set_status_flags(fd.as_fd(), flags & libc::O_NONBLOCK)
                    .map_err(sys("setting socket flags"))?;
                fd
            }
            OpenFile::Pipe {
                inode,
                write_end,
                flags,
                capacity,
                data,
            } => {
                if !pipes.contains_key(inode) {
                    let (r, w) = nix::unistd::pipe().map_err(errno("pipe"))?;
                    sysfd::set_pipe_size(w.as_fd(), usize::try_from(*capacity).unwrap_or(65536))
                        .map_err(sys("sizing a pipe"))?;
                    pipes.insert(*inode, (r, w));
                }
                let (r, w) = &pipes[inode];
                for &chunk in data {
                    let bytes = image.chunk(chunk)?;
                    nix::unistd::write(w, &bytes).map_err(errno("refilling a pipe"))?;
                }
                let end = if *write_end { w } else { r };
                let dup =
                    sysfd::dup_at_least(end.as_fd(), st.base).map_err(sys("staging a pipe"))?;
                sysfd::set_status_flags(dup.as_fd(), flags & (libc::O_NONBLOCK | libc::O_DIRECT))
                    .map_err(sys("setting pipe flags"))?;
                dup
            }
        };
        let n = st.push(fd)?;
        st.files.push(n);
    }
    sockets.finish(image, &m.files)?;
    for p in &m.processes {
        for v in &p.vmas {
            if let Some(id) = &v.file
                && v.shmem.is_none()
                && !st.maps.contains_key(&id.path)
            {
                let writable = v.shared && v.prot & libc::PROT_WRITE != 0;
                let fd = open_path(
                    &id.path,
                    if writable {
                        libc::O_RDWR
                    } else {
                        libc::O_RDONLY
                    },
                )?;
                let n = st.push(fd)?;
                st.maps.insert(id.path.clone(), n);
            }
        }
        if p.zombie.is_none() && !st.exes.contains_key(&p.exe) {
            // The kernel refuses to replace the exe link while the old exe is still mapped;
            // when the restorer runs the image's own binary the link is already right.
            let same = std::fs::read_link("/proc/self/exe")
                .is_ok_and(|own| own.as_os_str() == std::ffi::OsStr::new(&p.exe));
            let n = if same {
                -1
            } else {
                st.push(open_path(&p.exe, libc::O_RDONLY)?)?
            };
            st.exes.insert(p.exe.clone(), n);
        }
    }
    Ok(st)
}
