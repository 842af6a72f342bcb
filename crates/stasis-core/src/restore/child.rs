//! A process being rebuilt by remote control: injected calls and argument memory.

use stasis_sys::inject::Injector;
use stasis_sys::ptrace::{self, options};
use stasis_sys::wait::{WaitStatus, wait_pid};
use stasis_sys::{SysError, mem};

use crate::error::{CoreError, CoreResult};

/// Wraps a system-call error with what we were doing.
pub(super) fn sys(context: &str) -> impl FnOnce(SysError) -> CoreError + '_ {
    move |source| CoreError::Sys {
        context: context.to_owned(),
        source,
    }
}

/// Options every restore tracee gets (inherited by auto-attached children and threads).
pub(super) const TRACE_OPTIONS: u64 = options::TRACECLONE | options::TRACEFORK | options::EXITKILL;

/// A traced process being rebuilt.
#[derive(Debug)]
pub(super) struct Child {
    /// Its pid in the restorer's view.
    pub pid: i32,
    /// Injection into its main thread.
    pub inj: Injector,
    /// Scratch memory in it for call arguments.
    pub scratch: u64,
}

impl Child {
    /// A seized, stopped process with a `syscall` instruction at `insn`; scratch memory is
    /// taken below its stack pointer until a scratch page is mapped.
    pub fn new(pid: i32, insn: u64) -> CoreResult<Self> {
        let regs = ptrace::get_regs(pid).map_err(sys("reading a restore child's registers"))?;
        Ok(Child {
            pid,
            inj: Injector::new(pid, insn),
            scratch: (regs.rsp - 4096) & !15,
        })
    }

    /// Injects `nr(args)`, naming `what` on failure.
    pub fn call(&mut self, what: &str, nr: i64, args: &[u64]) -> CoreResult<u64> {
        let pid = self.pid;
        self.inj
            .call("injected syscall", nr, args)
            .map_err(|source| CoreError::Sys {
                context: format!("restoring process {pid}: {what}"),
                source,
            })
    }

    /// Writes `data` at scratch offset `offset`; returns its address.
    pub fn put(&self, offset: u64, data: &[u8]) -> CoreResult<u64> {
        mem::write(self.pid, self.scratch + offset, data)
            .map_err(sys("writing restorer arguments"))?;
        Ok(self.scratch + offset)
    }

    /// Writes 64-bit words at scratch offset `offset`.
    pub fn put_words(&self, offset: u64, w: &[u64]) -> CoreResult<u64> {
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.put(offset, &bytes)
    }

    /// Writes a NUL-terminated string at scratch offset `offset`.
    pub fn put_str(&self, offset: u64, s: &str) -> CoreResult<u64> {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.put(offset, &b)
    }

    /// Forks a child of this process with `clone3`, with pid `set_tid` when given; returns
    /// the new process, seized (options inherited) and stopped.
    pub fn fork(&mut self, set_tid: Option<i32>, flags: u64, exit_signal: u64) -> CoreResult<i32> {
        let tid_at = self.put(
            512,
            &u64::try_from(set_tid.unwrap_or(0))
                .unwrap_or(0)
                .to_le_bytes(),
        )?;
        let (st, sts) = if set_tid.is_some() {
            (tid_at, 1)
        } else {
            (0, 0)
        };
        let args = self.put_words(0, &[flags, 0, 0, 0, exit_signal, 0, 0, 0, st, sts, 0])?;
        self.inj.new_threads.clear();
        let what = format!("creating process or thread {}", set_tid.unwrap_or(0));
        self.call(&what, libc::SYS_clone3, &[args, 88])?;
        let new = self
            .inj
            .new_threads
            .pop()
            .ok_or(CoreError::Vanished(set_tid.unwrap_or(0)))?;
        wait_stopped(new)?;
        Ok(new)
    }
}

/// Waits until a new tracee reports its first stop.
pub(super) fn wait_stopped(pid: i32) -> CoreResult<()> {
    loop {
        match wait_pid(pid, 0)
            .map_err(sys("waiting for a new process to stop"))?
            .1
        {
            WaitStatus::Stopped { .. } => return Ok(()),
            WaitStatus::Exited(_) | WaitStatus::Signaled(_) => {
                return Err(CoreError::Vanished(pid));
            }
            _ => {}
        }
    }
}

/// Seizes a parked child of ours and stops it.
pub(super) fn seize_stopped(pid: i32) -> CoreResult<()> {
    ptrace::seize(pid, TRACE_OPTIONS).map_err(sys("seizing the restore child"))?;
    ptrace::interrupt(pid).map_err(sys("stopping the restore child"))?;
    wait_stopped(pid)
}
