//! Capturing threads and the process state read by injected system calls: signal
//! dispositions, the program break, itimers and POSIX timers.

use stasis_image::manifest::{Itimer, PosixTimer, Rseq, SigAction, ThreadImage};
use stasis_sys::inject::Injector;
use stasis_sys::{mem, process, ptrace};

use crate::error::{CoreResult, SysContext};
use crate::freeze::{FrozenThread, stack_scratch};
use crate::proc;

fn inject_out(
    inj: &mut Injector,
    scratch: u64,
    op: &'static str,
    nr: i64,
    args: &[u64],
    len: usize,
) -> CoreResult<Vec<u8>> {
    let tid = inj.tid();
    inj.call(op, nr, args)
        .ctx(|| format!("{op} in thread {tid}"))?;
    mem::read_vec(tid, scratch, len).ctx(|| format!("reading the result of {op} in thread {tid}"))
}

fn words(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// Captures one frozen thread.
pub fn capture_thread(pid: i32, t: &FrozenThread, insn: u64) -> CoreResult<ThreadImage> {
    let tid = t.tid;
    let regs = ptrace::get_regs(tid).ctx(|| format!("reading registers of thread {tid}"))?;
    let xstate =
        ptrace::get_xstate(tid).ctx(|| format!("reading extended state of thread {tid}"))?;
    let sigmask = t.sigmask;
    let rseq =
        ptrace::get_rseq(tid).ctx(|| format!("reading the rseq registration of thread {tid}"))?;
    let robust =
        process::robust_list(tid).ctx(|| format!("reading the robust list of thread {tid}"))?;
    let mut pending: Vec<Vec<u8>> = ptrace::peek_siginfo(tid, false)
        .ctx(|| format!("reading pending signals of thread {tid}"))?
        .iter()
        .map(|s| s.to_vec())
        .collect();
    if let Some(held) = t.held_signal {
        pending.push(held.to_vec());
    }
    let scratch = stack_scratch(tid)?;
    let mut inj = Injector::new(tid, insn);
    let tid_addr = inject_out(
        &mut inj,
        scratch,
        "prctl(PR_GET_TID_ADDRESS)",
        libc::SYS_prctl,
        &[libc::PR_GET_TID_ADDRESS as u64, scratch],
        8,
    )?;
    let ss = inject_out(
        &mut inj,
        scratch,
        "sigaltstack",
        libc::SYS_sigaltstack,
        &[0, scratch],
        24,
    )?;
    let ss = words(&ss);
    let task = format!("/proc/{pid}/task/{tid}");
    Ok(ThreadImage {
        tid: proc::ns_pid(&task)?,
        regs: ptrace::regs_to_words(&regs),
        xstate,
        sigmask,
        pending,
        rseq: Rseq {
            ptr: rseq.abi_pointer,
            len: rseq.len,
            signature: rseq.signature,
        },
        robust_list: robust,
        clear_child_tid: words(&tid_addr)[0],
        sigaltstack: (
            ss[0],
            i32::try_from(ss[1] & 0xffff_ffff).unwrap_or(0),
            ss[2],
        ),
        comm: std::fs::read_to_string(format!("{task}/comm"))
            .unwrap_or_default()
            .trim_end()
            .to_owned(),
    })
}

/// Reads all 62 signal dispositions by injected `rt_sigaction` calls.
pub fn capture_sigactions(inj: &mut Injector, scratch: u64) -> CoreResult<Vec<SigAction>> {
    let mut out = Vec::with_capacity(64);
    for sig in 1..=64i32 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let b = inject_out(
            inj,
            scratch,
            "rt_sigaction",
            libc::SYS_rt_sigaction,
            &[sig as u64, 0, scratch, 8],
            32,
        )?;
        let w = words(&b);
        out.push(SigAction {
            sig,
            handler: w[0],
            flags: w[1],
            restorer: w[2],
            mask: w[3],
        });
    }
    Ok(out)
}

/// Reads the itimers and POSIX timers by injected calls.
pub fn capture_timers(
    pid: i32,
    inj: &mut Injector,
    scratch: u64,
) -> CoreResult<(Vec<Itimer>, Vec<PosixTimer>)> {
    let mut itimers = Vec::new();
    for which in 0..3u64 {
        let w = words(&inject_out(
            inj,
            scratch,
            "getitimer",
            libc::SYS_getitimer,
            &[which, scratch],
            32,
        )?);
        itimers.push(Itimer {
            interval_us: w[0] * 1_000_000 + w[1],
            value_us: w[2] * 1_000_000 + w[3],
        });
    }
    let mut posix = Vec::new();
    for t in proc::timers(pid) {
        let w = words(&inject_out(
            inj,
            scratch,
            "timer_gettime",
            libc::SYS_timer_gettime,
            &[t.id as u64, scratch],
            32,
        )?);
        let notify_tid = if t.notify == libc::SIGEV_THREAD_ID {
            proc::ns_pid(&format!("/proc/{pid}/task/{}", t.notify_tid)).unwrap_or(t.notify_tid)
        } else {
            0
        };
        posix.push(PosixTimer {
            id: t.id,
            clock: t.clock,
            notify: t.notify,
            signo: t.signo,
            value: t.value,
            notify_tid,
            interval_ns: w[0] * 1_000_000_000 + w[1],
            value_ns: w[2] * 1_000_000_000 + w[3],
        });
    }
    Ok((itimers, posix))
}
