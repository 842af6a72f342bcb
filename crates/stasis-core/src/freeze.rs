//! Freezing every thread of a process with `PTRACE_SEIZE` + `PTRACE_INTERRUPT`, and letting
//! it go again.
//!
//! Seizing does not send `SIGSTOP`, so the program cannot tell it was stopped. Threads created
//! while we freeze are caught by rescanning `/proc/PID/task` until the set is stable. A signal
//! that was being delivered when a thread stopped is held and re-queued (or saved).

use stasis_sys::inject::Injector;
use stasis_sys::ptrace::{self, SIGINFO_SIZE};
use stasis_sys::wait::{WaitStatus, wait_pid};
use stasis_sys::{Errno, mem};

use crate::error::{CoreError, CoreResult, SysContext};
use crate::proc;

/// One frozen thread.
#[derive(Debug, Clone)]
pub struct FrozenThread {
    /// Thread id in the supervisor's view.
    pub tid: i32,
    /// A signal that was about to be delivered when the thread stopped (raw siginfo).
    pub held_signal: Option<[u8; SIGINFO_SIZE]>,
    /// Its signal mask when it was frozen. While frozen every signal is blocked, so that a
    /// signal arriving during injected calls stays pending instead of being delivered (and
    /// lost) at a single-step; the mask is put back on thaw.
    pub sigmask: u64,
}

/// A process whose threads are all in a ptrace stop, traced by the calling thread.
#[derive(Debug)]
pub struct Frozen {
    /// Process id in the supervisor's view.
    pub pid: i32,
    /// Its threads, the main thread first.
    pub threads: Vec<FrozenThread>,
    released: bool,
}

/// Freezes every thread of `pid`.
pub fn freeze(pid: i32) -> CoreResult<Frozen> {
    freeze_with(pid, None)
}

/// Waits until thread `tid` reports a stop or its end; with `idle`, polls, running `idle`
/// between looks (work the thread may be waiting for, such as its page faults).
fn wait_stop<'a>(tid: i32, idle: Option<&mut (dyn FnMut() + 'a)>) -> CoreResult<WaitStatus> {
    let Some(idle) = idle else {
        return Ok(wait_pid(tid, 0)
            .ctx(|| format!("waiting for thread {tid} to stop"))?
            .1);
    };
    loop {
        match wait_pid(tid, libc::WNOHANG).ctx(|| format!("waiting for thread {tid} to stop"))? {
            (0, _) => {
                idle();
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
            (_, status) => return Ok(status),
        }
    }
}

/// [`freeze`], running `idle` while it waits for a thread to stop (see [`wait_stop`]).
fn freeze_with<'a>(pid: i32, mut idle: Option<&mut (dyn FnMut() + 'a)>) -> CoreResult<Frozen> {
    let mut frozen = Frozen {
        pid,
        threads: Vec::new(),
        released: false,
    };
    loop {
        let tids = proc::tasks(pid).map_err(|_| CoreError::Vanished(pid))?;
        let new: Vec<i32> = tids
            .into_iter()
            .filter(|t| !frozen.threads.iter().any(|f| f.tid == *t))
            .collect();
        if new.is_empty() {
            break;
        }
        for tid in new {
            match ptrace::seize(tid, 0) {
                Ok(()) => {}
                Err(e) if e.errno == Errno::ESRCH => continue,
                Err(e) if e.errno == Errno::EPERM => {
                    return Err(CoreError::Unsupported {
                        pid,
                        what: format!("thread {tid}"),
                        why: "ptrace is refused (is another debugger or Stasis attached?)".into(),
                    });
                }
                Err(e) => return Err(e).ctx(|| format!("freezing thread {tid} of process {pid}")),
            }
            ptrace::interrupt(tid).ctx(|| format!("interrupting thread {tid}"))?;
            let mut held = None;
            match wait_stop(tid, idle.as_deref_mut())? {
                WaitStatus::Stopped { event: 0, sig } if sig != libc::SIGTRAP => {
                    held = Some(
                        ptrace::get_siginfo(tid)
                            .ctx(|| format!("reading the signal held by thread {tid}"))?,
                    );
                }
                WaitStatus::Exited(code) if tid == pid => {
                    return Err(CoreError::Exited { pid, code });
                }
                WaitStatus::Signaled(sig) if tid == pid => {
                    return Err(CoreError::Exited {
                        pid,
                        code: 128 + sig,
                    });
                }
                WaitStatus::Exited(_) | WaitStatus::Signaled(_) => continue,
                _ => {}
            }
            let sigmask = ptrace::get_sigmask(tid)
                .ctx(|| format!("reading the signal mask of thread {tid}"))?;
            ptrace::set_sigmask(tid, u64::MAX)
                .ctx(|| format!("blocking signals in thread {tid}"))?;
            frozen.threads.push(FrozenThread {
                tid,
                held_signal: held,
                sigmask,
            });
        }
    }
    frozen.threads.sort_by_key(|t| (t.tid != pid, t.tid));
    Ok(frozen)
}

/// Scratch memory below a thread's red zone, used for injected calls' arguments.
pub fn stack_scratch(tid: i32) -> CoreResult<u64> {
    let regs = ptrace::get_regs(tid).ctx(|| format!("reading registers of thread {tid}"))?;
    Ok((regs.rsp - 1024) & !15)
}

impl Frozen {
    /// Lets every thread run on, re-queueing held signals through `insn` (a `syscall`
    /// instruction in the process).
    pub fn thaw(mut self, insn: Option<u64>) -> CoreResult<()> {
        self.released = true;
        let insn = insn.or_else(|| {
            let wanted = self.threads.iter().any(|t| t.held_signal.is_some());
            wanted
                .then(|| {
                    proc::maps(self.pid)
                        .ok()
                        .and_then(|m| crate::vdso::syscall_insn(self.pid, &m).ok())
                })
                .flatten()
        });
        let tgid = proc::ns_pid(&format!("/proc/{}", self.pid)).unwrap_or(self.pid);
        let mut first_err = None;
        for t in &self.threads {
            if let (Some(info), Some(insn)) = (t.held_signal, insn) {
                let requeue = || -> CoreResult<()> {
                    let ns_tid = proc::ns_pid(&format!("/proc/{}/task/{}", self.pid, t.tid))?;
                    let scratch = stack_scratch(t.tid)?;
                    mem::write(t.tid, scratch, &info).ctx(|| "writing a held signal".into())?;
                    let sig = i32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
                    Injector::new(t.tid, insn)
                        .call(
                            "rt_tgsigqueueinfo",
                            libc::SYS_rt_tgsigqueueinfo,
                            &[tgid as u64, ns_tid as u64, sig as u64, scratch],
                        )
                        .ctx(|| format!("re-queueing signal {sig} of thread {}", t.tid))?;
                    Ok(())
                };
                if let Err(e) = requeue() {
                    first_err.get_or_insert(e);
                }
            }
            if let Err(e) = ptrace::set_sigmask(t.tid, t.sigmask)
                && e.errno != Errno::ESRCH
            {
                first_err.get_or_insert(CoreError::Sys {
                    context: format!("restoring the signal mask of thread {}", t.tid),
                    source: e,
                });
            }
            if let Err(e) = ptrace::detach(t.tid, 0)
                && e.errno != Errno::ESRCH
            {
                first_err.get_or_insert(CoreError::Sys {
                    context: format!("detaching thread {}", t.tid),
                    source: e,
                });
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Kills the process while it is still frozen: not one more instruction of it runs.
    /// As its tracer we then collect every thread's exit, which releases the zombie to its
    /// real parent (the caller itself reaps it here when it is the parent).
    pub fn kill(mut self) -> CoreResult<()> {
        self.released = true;
        stasis_sys::process::kill(self.pid, libc::SIGKILL)
            .ctx(|| format!("killing process {}", self.pid))?;
        for t in self.threads.iter().rev() {
            while let Ok((_, st)) = wait_pid(t.tid, 0) {
                if matches!(st, WaitStatus::Exited(_) | WaitStatus::Signaled(_)) {
                    break;
                }
            }
        }
        Ok(())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.released {
            for t in &self.threads {
                let _ = ptrace::set_sigmask(t.tid, t.sigmask);
                let _ = ptrace::detach(t.tid, 0);
            }
        }
    }
}

/// Every process of a job, frozen.
#[derive(Debug)]
pub struct FrozenJob {
    /// Frozen processes, parents before children.
    pub processes: Vec<Frozen>,
    /// Zombies of the job (cannot be traced; captured from `/proc`).
    pub zombies: Vec<i32>,
}

/// Freezes every process below `supervisor` except its `init`: the whole job. Processes
/// forked while freezing are caught by rescanning until the set is stable.
pub fn freeze_job(supervisor: i32, init: Option<i32>, root: i32) -> CoreResult<FrozenJob> {
    freeze_set(|| proc::descendants(supervisor), init, root, None)
}

/// [`freeze_job`], running `idle` while it waits for a thread to stop: a thread waiting in
/// the kernel for a page the caller serves (lazy restore) stops only once served.
pub fn freeze_job_serving(
    supervisor: i32,
    init: Option<i32>,
    root: i32,
    idle: &mut dyn FnMut(),
) -> CoreResult<FrozenJob> {
    freeze_set(|| proc::descendants(supervisor), init, root, Some(idle))
}

/// Freezes process `root` and all its descendants (a tree that no supervisor started).
pub fn freeze_tree(root: i32) -> CoreResult<FrozenJob> {
    freeze_set(
        || {
            std::iter::once(root)
                .chain(proc::descendants(root))
                .collect()
        },
        None,
        root,
        None,
    )
}

/// Freezes every process `members` lists (parents before children) except `init`, until
/// the list is stable.
fn freeze_set<'a>(
    members: impl Fn() -> Vec<i32>,
    init: Option<i32>,
    root: i32,
    mut idle: Option<&mut (dyn FnMut() + 'a)>,
) -> CoreResult<FrozenJob> {
    let mut job = FrozenJob {
        processes: Vec::new(),
        zombies: Vec::new(),
    };
    loop {
        let known = |p: i32, job: &FrozenJob| {
            job.processes.iter().any(|f| f.pid == p) || job.zombies.contains(&p)
        };
        let new: Vec<i32> = members()
            .into_iter()
            .filter(|&p| Some(p) != init && !known(p, &job))
            .collect();
        if new.is_empty() {
            break;
        }
        for pid in new {
            match proc::state(pid) {
                Some(('Z', _)) => job.zombies.push(pid),
                None => {}
                Some(_) => match freeze_with(pid, idle.as_deref_mut()) {
                    Ok(f) => job.processes.push(f),
                    Err(CoreError::Vanished(p) | CoreError::Exited { pid: p, .. }) if p != root => {
                    }
                    Err(e) => return Err(e),
                },
            }
        }
    }
    if !job.processes.iter().any(|f| f.pid == root) {
        return Err(CoreError::Vanished(root));
    }
    // Parents before children: descendants() order, root first.
    let order = members();
    job.processes
        .sort_by_key(|f| (f.pid != root, order.iter().position(|&p| p == f.pid)));
    Ok(job)
}

impl FrozenJob {
    /// Lets every process run on; `insns` gives each process's `syscall` instruction (for
    /// re-queueing held signals).
    pub fn thaw(self, insns: &std::collections::HashMap<i32, u64>) -> CoreResult<()> {
        let mut first_err = None;
        for f in self.processes {
            let insn = insns.get(&f.pid).copied();
            if let Err(e) = f.thaw(insn) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Kills every process while still frozen. Their TCP sockets close with a reset, so that
    /// no `TIME_WAIT` keeps their ports from the restarted job.
    pub fn kill(self) -> CoreResult<()> {
        for f in &self.processes {
            crate::sockdiag::reset_tcp_on_close(f.pid);
        }
        let mut first_err = None;
        for f in self.processes {
            if let Err(e) = f.kill() {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}
