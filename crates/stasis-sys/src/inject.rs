//! Running system calls inside a stopped tracee ("injection").
//!
//! The tracee must be in a ptrace stop. We save its registers, point `rip` at an existing
//! `syscall` instruction (found in its `[vdso]`, so nothing is written into its code), load the
//! number and arguments, set `orig_rax = -1` so the kernel's restart logic cannot touch the
//! injected call, single-step, read `rax`, and put the registers back.

use crate::error::{Errno, SysError, SysResult};
use crate::ptrace;
use crate::wait::{WaitStatus, wait_pid};

/// One stopped thread that system calls can be injected into.
#[derive(Debug)]
pub struct Injector {
    tid: i32,
    insn: u64,
    /// Threads and processes created by injected `clone`/`clone3`/`fork` calls
    /// (auto-attached, not yet waited for).
    pub new_threads: Vec<i32>,
    /// Signals that arrived while injecting and were held back; the caller re-queues them.
    pub deferred_signals: Vec<i32>,
}

impl Injector {
    /// Prepares injection into `tid`, using the `syscall` instruction at address `insn`.
    pub fn new(tid: i32, insn: u64) -> Self {
        Injector {
            tid,
            insn,
            new_threads: Vec::new(),
            deferred_signals: Vec::new(),
        }
    }

    /// The thread injected into.
    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// Address of the `syscall` instruction used.
    pub fn insn(&self) -> u64 {
        self.insn
    }

    /// Moves the `syscall` instruction used (after the vdso moved).
    pub fn set_insn(&mut self, insn: u64) {
        self.insn = insn;
    }

    /// Runs `nr(args…)` in the tracee and returns the raw result (`-errno` on failure).
    pub fn raw(&mut self, nr: i64, args: &[u64]) -> SysResult<i64> {
        let saved = ptrace::get_regs(self.tid)?;
        let mut r = saved;
        r.rip = self.insn;
        r.rax = nr as u64;
        r.orig_rax = u64::MAX;
        let slots = [
            &mut r.rdi, &mut r.rsi, &mut r.rdx, &mut r.r10, &mut r.r8, &mut r.r9,
        ];
        for (slot, value) in slots
            .into_iter()
            .zip(args.iter().copied().chain(std::iter::repeat(0)))
        {
            *slot = value;
        }
        ptrace::set_regs(self.tid, &r)?;
        ptrace::singlestep(self.tid, 0)?;
        loop {
            match wait_pid(self.tid, 0)?.1 {
                WaitStatus::Stopped {
                    sig: libc::SIGTRAP,
                    event: 0,
                } => break,
                WaitStatus::Stopped {
                    sig: libc::SIGTRAP,
                    event,
                } if event == libc::PTRACE_EVENT_CLONE
                    || event == libc::PTRACE_EVENT_FORK
                    || event == libc::PTRACE_EVENT_VFORK =>
                {
                    let child = ptrace::event_msg(self.tid)?;
                    self.new_threads.push(i32::try_from(child).unwrap_or(-1));
                    ptrace::singlestep(self.tid, 0)?;
                }
                WaitStatus::Stopped { event, .. } if event != 0 => ptrace::singlestep(self.tid, 0)?,
                WaitStatus::Stopped { sig, .. } => {
                    self.deferred_signals.push(sig);
                    ptrace::singlestep(self.tid, 0)?;
                }
                WaitStatus::Exited(_) | WaitStatus::Signaled(_) => {
                    return Err(SysError::new("injected syscall", self.tid, Errno::ESRCH));
                }
                WaitStatus::Continued | WaitStatus::StillAlive => {}
            }
        }
        let ret = ptrace::get_regs(self.tid)?.rax as i64;
        ptrace::set_regs(self.tid, &saved)?;
        Ok(ret)
    }

    /// Like [`Injector::raw`], but turns a negative result into an error named `op`.
    pub fn call(&mut self, op: &'static str, nr: i64, args: &[u64]) -> SysResult<u64> {
        let ret = self.raw(nr, args)?;
        if (-4095..0).contains(&ret) {
            let errno = i32::try_from(-ret).unwrap_or(libc::EINVAL);
            return Err(SysError::new(op, self.tid, Errno::from_raw(errno)));
        }
        Ok(ret as u64)
    }
}

/// Finds the offset of a `syscall` instruction (`0f 05`) in a code blob (e.g. the vdso).
pub fn find_syscall_insn(code: &[u8]) -> Option<usize> {
    code.windows(2).position(|w| w == [0x0f, 0x05])
}
