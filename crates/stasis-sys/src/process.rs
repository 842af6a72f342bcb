//! Creating processes: the job's program, the namespace init, and parked restore children
//! with chosen pids (`clone3` + `set_tid`).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::error::{Errno, SysError, SysResult, check};

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Forks this process with `clone3`, asking for pid `set_tid` in the innermost pid namespace
/// when given. Returns 0 in the child and the child's pid in the parent.
fn clone3_fork(set_tid: Option<i32>) -> SysResult<i32> {
    let tids = [set_tid.unwrap_or(0)];
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: if set_tid.is_some() {
            tids.as_ptr() as u64
        } else {
            0
        },
        set_tid_size: u64::from(set_tid.is_some()),
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without CLONE_VM behaves like fork: the child gets a copy of our address
    // space. Callers only run async-signal-safe code in the child before exec or _exit.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &raw const args,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    let ret = check(ret, "clone3", set_tid.unwrap_or(0))?;
    Ok(i32::try_from(ret).unwrap_or(-1))
}

fn child_exit(code: i32) -> ! {
    // SAFETY: _exit is async-signal-safe and never returns.
    unsafe { libc::_exit(code) }
}

fn reset_signals_in_child() {
    // SAFETY: only async-signal-safe calls (sigprocmask, signal) on valid arguments.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &raw const set, std::ptr::null_mut());
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }
}

/// What the job's program is started with.
#[derive(Debug)]
pub struct ExecSpec {
    /// Resolved path of the program.
    pub path: CString,
    /// Arguments, including argv\[0\].
    pub argv: Vec<CString>,
    /// Environment, as `KEY=VALUE`.
    pub envp: Vec<CString>,
    /// A mount namespace to enter before exec (a descriptor of `/proc/PID/ns/mnt`), and the
    /// directory to return to in it.
    pub mount_ns: Option<(OwnedFd, CString)>,
    /// A terminal (the slave of a pseudo-terminal) to become the program's controlling
    /// terminal and its stdin, stdout and stderr, in a session of its own.
    pub terminal: Option<OwnedFd>,
}

/// Forks and executes `spec` in the child with default signal handling. Fails with the
/// child's `execve` error if the program could not be started.
pub fn spawn(spec: &ExecSpec) -> SysResult<i32> {
    let mut argv: Vec<*const libc::c_char> = spec.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = spec.envp.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| SysError::new("pipe2", 0, e))?;
    let pid = clone3_fork(None)?;
    if pid == 0 {
        reset_signals_in_child();
        // SAFETY: argv and envp are NULL-terminated arrays of pointers to live C strings
        // prepared before the fork; setns, chdir, setsid, ioctl, dup2, write and _exit are
        // async-signal-safe.
        unsafe {
            if let Some((ns, cwd)) = &spec.mount_ns
                && (libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) != 0
                    || libc::chdir(cwd.as_ptr()) != 0)
            {
                let errno = *libc::__errno_location();
                libc::write(err_w.as_raw_fd(), errno.to_ne_bytes().as_ptr().cast(), 4);
                child_exit(127);
            }
            if let Some(tty) = &spec.terminal {
                let t = tty.as_raw_fd();
                if libc::setsid() < 0
                    || libc::ioctl(t, libc::TIOCSCTTY, 0) != 0
                    || libc::dup2(t, 0) < 0
                    || libc::dup2(t, 1) < 0
                    || libc::dup2(t, 2) < 0
                {
                    let errno = *libc::__errno_location();
                    libc::write(err_w.as_raw_fd(), errno.to_ne_bytes().as_ptr().cast(), 4);
                    child_exit(127);
                }
            }
            libc::execve(spec.path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            let errno = *libc::__errno_location();
            let bytes = errno.to_ne_bytes();
            libc::write(err_w.as_raw_fd(), bytes.as_ptr().cast(), 4);
        }
        child_exit(127);
    }
    drop(err_w);
    let mut buf = [0u8; 4];
    let n = nix::unistd::read(&err_r, &mut buf).unwrap_or(0);
    if n == 4 {
        let _ = crate::wait::wait_pid(pid, 0);
        return Err(SysError::new(
            "execve",
            pid,
            Errno::from_raw(i32::from_ne_bytes(buf)),
        ));
    }
    Ok(pid)
}

extern "C" fn on_sigchld(_: libc::c_int) {}

/// The job's init, as seen by the supervisor.
#[derive(Debug)]
pub struct Init {
    /// Its pid in the supervisor's view.
    pub pid: i32,
    /// The supervisor's end of the lifeline: when it closes (the supervisor exits, however
    /// it dies), init exits, which takes the whole pid namespace down.
    pub lifeline: OwnedFd,
    /// Init mounted a `/proc` of the job's pid namespace in a mount namespace of its own
    /// (`/proc/PID/ns/mnt` of init), which the job's processes enter.
    pub own_proc: bool,
}

/// Forks the namespace's init: it reaps every child reparented to it, and exits when the
/// supervisor's end of the lifeline pipe closes.
pub fn spawn_init() -> SysResult<Init> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| SysError::new("pipe2", 0, e))?;
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| SysError::new("pipe2", 0, e))?;
    let pid = clone3_fork(None)?;
    if pid == 0 {
        // SAFETY: async-signal-safe calls only, with valid arguments; the loop never returns.
        unsafe {
            libc::close(w.as_raw_fd());
            libc::prctl(libc::PR_SET_NAME, c"stasis-init".as_ptr());
            // A /proc of the job's own pid namespace, in a mount namespace of our own that
            // the job's processes enter; report whether it worked.
            let mut ok: u8 = 0;
            if libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) == 0
                && libc::mount(
                    c"proc".as_ptr(),
                    c"/proc".as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                ) == 0
            {
                ok = 1;
            }
            libc::write(ready_w.as_raw_fd(), (&raw const ok).cast(), 1);
            libc::close(ready_w.as_raw_fd());
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&raw mut all);
            libc::sigprocmask(libc::SIG_SETMASK, &raw const all, std::ptr::null_mut());
            for sig in 1..=31 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            libc::signal(libc::SIGCHLD, on_sigchld as *const () as libc::sighandler_t);
            let mut wait_mask: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&raw mut wait_mask);
            libc::sigdelset(&raw mut wait_mask, libc::SIGCHLD);
            let mut pfd = libc::pollfd {
                fd: r.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            loop {
                let mut status = 0;
                while libc::waitpid(-1, &raw mut status, libc::WNOHANG | libc::__WALL) > 0 {}
                pfd.revents = 0;
                let n = libc::ppoll(&raw mut pfd, 1, std::ptr::null(), &raw const wait_mask);
                if n > 0 && pfd.revents != 0 {
                    libc::_exit(0);
                }
            }
        }
    }
    drop(r);
    drop(ready_w);
    let mut ok = [0u8; 1];
    let n = nix::unistd::read(&ready_r, &mut ok).unwrap_or(0);
    let own_proc = n == 1 && ok[0] == 1;
    Ok(Init {
        pid,
        lifeline: w,
        own_proc,
    })
}

/// A forked copy of this process that blocks in `read` forever, waiting to be seized and
/// rebuilt by the restorer. It exits if the restorer goes away.
#[derive(Debug)]
pub struct ParkedChild {
    /// Its pid.
    pub pid: i32,
    /// Keeps the child parked; dropping it lets the child exit (until it has been rebuilt).
    pub release: OwnedFd,
}

/// Forks a parked child with pid `set_tid` (in our pid namespace for children) when given.
pub fn spawn_parked(set_tid: Option<i32>) -> SysResult<ParkedChild> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| SysError::new("pipe2", 0, e))?;
    let pid = clone3_fork(set_tid)?;
    if pid == 0 {
        // SAFETY: async-signal-safe calls on descriptors we own; never returns.
        unsafe {
            libc::close(w.as_raw_fd());
            let mut b = 0u8;
            loop {
                let n = libc::read(r.as_raw_fd(), (&raw mut b).cast(), 1);
                if n == 0 {
                    libc::_exit(126);
                }
            }
        }
    }
    drop(r);
    Ok(ParkedChild { pid, release: w })
}

/// Sends `sig` to a process.
pub fn kill(pid: i32, sig: i32) -> SysResult<()> {
    // SAFETY: kill has no memory-safety preconditions.
    check(unsafe { libc::kill(pid, sig) }.into(), "kill", pid).map(drop)
}

/// `pidfd_open(pid)`.
pub fn pidfd_open(pid: i32) -> SysResult<OwnedFd> {
    // SAFETY: plain syscall; on success the returned descriptor is new and owned by us.
    let fd = check(
        unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) },
        "pidfd_open",
        pid,
    )?;
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).unwrap_or(-1)) })
}

/// `pidfd_getfd`: a duplicate of descriptor `target_fd` of the process behind `pidfd`.
pub fn pidfd_getfd(pidfd: &OwnedFd, target_fd: i32, pid: i32) -> SysResult<OwnedFd> {
    // SAFETY: plain syscall; on success the returned descriptor is new and owned by us.
    let fd = check(
        unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) },
        "pidfd_getfd",
        pid,
    )?;
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).unwrap_or(-1)) })
}

/// `kcmp(KCMP_FILE)`: whether descriptor `fd1` of `pid1` and `fd2` of `pid2` share one open
/// file description.
pub fn same_file_description(pid1: i32, pid2: i32, fd1: i32, fd2: i32) -> SysResult<bool> {
    const KCMP_FILE: i32 = 0;
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, KCMP_FILE, fd1, fd2) };
    Ok(check(r, "kcmp", pid1)? == 0)
}

/// What two processes may share, for [`share`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shared {
    /// The address space (`CLONE_VM`).
    Memory,
    /// The descriptor table (`CLONE_FILES`).
    Descriptors,
}

/// `kcmp`: whether processes `pid1` and `pid2` share `what`.
pub fn share(pid1: i32, pid2: i32, what: Shared) -> SysResult<bool> {
    const KCMP_VM: i32 = 1;
    const KCMP_FILES: i32 = 2;
    let kind = match what {
        Shared::Memory => KCMP_VM,
        Shared::Descriptors => KCMP_FILES,
    };
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, kind, 0, 0) };
    Ok(check(r, "kcmp", pid1)? == 0)
}

/// `get_robust_list(tid)`: the robust futex list head and its length.
pub fn robust_list(tid: i32) -> SysResult<(u64, u64)> {
    let mut head: u64 = 0;
    let mut len: usize = 0;
    // SAFETY: both out-pointers are valid for writes of their types.
    let ret = unsafe { libc::syscall(libc::SYS_get_robust_list, tid, &raw mut head, &raw mut len) };
    check(ret, "get_robust_list", tid)?;
    Ok((head, len as u64))
}

/// `prlimit(pid, resource)`: get (when `new` is None) or set a resource limit.
pub fn prlimit(pid: i32, resource: u32, new: Option<(u64, u64)>) -> SysResult<(u64, u64)> {
    let newlim = new.map(|(c, m)| libc::rlimit64 {
        rlim_cur: c,
        rlim_max: m,
    });
    let mut old = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let newp = newlim.as_ref().map_or(std::ptr::null(), std::ptr::from_ref);
    // SAFETY: newp is null or points at a live rlimit64; old is writable.
    let ret = unsafe { libc::prlimit64(pid, resource as _, newp, &raw mut old) }.into();
    check(ret, "prlimit", pid)?;
    Ok((old.rlim_cur, old.rlim_max))
}

/// CPU time the calling thread has used, in nanoseconds (`CLOCK_THREAD_CPUTIME_ID`): what
/// a piece of work cost, whatever else wanted the cores meanwhile.
pub fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// Monotonic or boot-time clock of this process, in nanoseconds.
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(clock, &raw mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Our own uid.
pub fn uid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

/// Our own gid.
pub fn gid() -> u32 {
    // SAFETY: getgid cannot fail.
    unsafe { libc::getgid() }
}

/// Blocks the given signals in this thread and returns a signalfd that reports them.
pub fn block_signals_to_fd(sigs: &[i32]) -> SysResult<OwnedFd> {
    // SAFETY: sigset manipulation on a local, then sigprocmask/signalfd with valid pointers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        for &s in sigs {
            libc::sigaddset(&raw mut set, s);
        }
        check(
            libc::sigprocmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()).into(),
            "sigprocmask",
            0,
        )?;
        let fd = check(
            libc::signalfd(-1, &raw const set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK).into(),
            "signalfd",
            0,
        )?;
        Ok(OwnedFd::from_raw_fd(i32::try_from(fd).unwrap_or(-1)))
    }
}

/// One signal read from a signalfd: number, sender pid and `si_code`.
pub fn read_signalfd(fd: &OwnedFd) -> Option<(i32, i32, i32)> {
    // SAFETY: signalfd_siginfo is plain data; read fills at most its size.
    unsafe {
        let mut info: libc::signalfd_siginfo = std::mem::zeroed();
        let n = libc::read(
            fd.as_raw_fd(),
            (&raw mut info).cast(),
            std::mem::size_of::<libc::signalfd_siginfo>(),
        );
        if n != std::mem::size_of::<libc::signalfd_siginfo>() as isize {
            return None;
        }
        Some((info.ssi_signo as i32, info.ssi_pid as i32, info.ssi_code))
    }
}

/// Makes this process a child subreaper (orphans below it are reparented to it).
pub fn set_child_subreaper() -> SysResult<()> {
    // SAFETY: prctl with integer arguments.
    check(
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) }.into(),
        "prctl(PR_SET_CHILD_SUBREAPER)",
        0,
    )
    .map(drop)
}

/// Starts a new session for this process (used when detaching from the terminal).
pub fn setsid() -> SysResult<()> {
    nix::unistd::setsid()
        .map(drop)
        .map_err(|e| SysError::new("setsid", 0, e))
}

/// Forks this process; the child continues as a daemon. Returns true in the child.
pub fn daemon_fork() -> SysResult<bool> {
    Ok(clone3_fork(None)? == 0)
}

/// Ignores `sig` in this process (e.g. `SIGXFSZ`, so that writes past a file-size limit
/// fail with `EFBIG` instead of killing us). Children started with [`spawn`] get the default
/// disposition back.
pub fn ignore_signal(sig: i32) {
    // SAFETY: installing SIG_IGN has no memory-safety preconditions.
    unsafe { libc::signal(sig, libc::SIG_IGN) };
}

/// Has the allocator keep memory this process frees for its next allocations (up to
/// 32 MiB each, glibc's limit) instead of handing it back to the kernel at once: memory
/// faulted in afresh costs a page fault per page (on a virtual machine, one in the
/// hypervisor too), and a supervisor allocates and frees the same large buffers at every
/// checkpoint. The process keeps its high-water mark of such memory.
pub fn keep_freed_memory() {
    // SAFETY: mallopt only sets parameters of the C allocator; it touches no memory of
    // ours. A refused value leaves the default.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Gives `SIGPIPE` its default disposition in this process, for a command whose output may
/// be piped into `head`: it then ends quietly when the reader goes away, as `cat` does,
/// instead of failing on `EPIPE`.
pub fn default_sigpipe() {
    // SAFETY: installing SIG_DFL has no memory-safety preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}
