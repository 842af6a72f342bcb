//! Safe wrappers over the ptrace requests Stasis uses.
//!
//! All requests for one tracee must come from the thread that attached to it; callers keep
//! every tracing operation of a checkpoint or restore on one thread.

use crate::error::{SysResult, check};

/// General-purpose registers of one thread (includes `fs_base`/`gs_base`).
pub type Regs = libc::user_regs_struct;

/// Number of 64-bit words in [`Regs`].
pub const REGS_WORDS: usize = 27;

/// Copies registers into a plain array (for saving).
pub fn regs_to_words(r: &Regs) -> Vec<u64> {
    vec![
        r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx, r.rdx,
        r.rsi, r.rdi, r.orig_rax, r.rip, r.cs, r.eflags, r.rsp, r.ss, r.fs_base, r.gs_base, r.ds,
        r.es, r.fs, r.gs,
    ]
}

/// Rebuilds registers from a saved array; `None` if it has the wrong length.
pub fn regs_from_words(w: &[u64]) -> Option<Regs> {
    if w.len() != REGS_WORDS {
        return None;
    }
    Some(Regs {
        r15: w[0],
        r14: w[1],
        r13: w[2],
        r12: w[3],
        rbp: w[4],
        rbx: w[5],
        r11: w[6],
        r10: w[7],
        r9: w[8],
        r8: w[9],
        rax: w[10],
        rcx: w[11],
        rdx: w[12],
        rsi: w[13],
        rdi: w[14],
        orig_rax: w[15],
        rip: w[16],
        cs: w[17],
        eflags: w[18],
        rsp: w[19],
        ss: w[20],
        fs_base: w[21],
        gs_base: w[22],
        ds: w[23],
        es: w[24],
        fs: w[25],
        gs: w[26],
    })
}

/// `PTRACE_O_*` options used when seizing.
pub mod options {
    /// Kill tracees if the tracer exits.
    pub const EXITKILL: u64 = libc::PTRACE_O_EXITKILL as u64;
    /// Auto-attach threads and children created with `clone`.
    pub const TRACECLONE: u64 = libc::PTRACE_O_TRACECLONE as u64;
    /// Auto-attach children created with `fork` (or `clone3` with `SIGCHLD`).
    pub const TRACEFORK: u64 = libc::PTRACE_O_TRACEFORK as u64;
    /// Mark syscall stops with bit 0x80.
    pub const TRACESYSGOOD: u64 = libc::PTRACE_O_TRACESYSGOOD as u64;
}

const NT_X86_XSTATE: usize = 0x202;
const PTRACE_GET_RSEQ_CONFIGURATION: u32 = 0x420f;
/// Size of the buffer used to read extended state (large enough for AMX).
pub const XSTATE_BUF: usize = 16 * 1024;

fn req(
    request: u32,
    pid: i32,
    addr: usize,
    data: usize,
    op: &'static str,
) -> SysResult<libc::c_long> {
    nix::errno::Errno::clear();
    // SAFETY: every caller passes either 0 or a pointer to a live buffer sized for `request`;
    // the kernel validates the pid and request.
    let ret = unsafe {
        libc::ptrace(
            request,
            pid,
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    };
    check(ret, op, pid)
}

/// `PTRACE_SEIZE` with the given options.
pub fn seize(tid: i32, opts: u64) -> SysResult<()> {
    req(libc::PTRACE_SEIZE, tid, 0, opts as usize, "PTRACE_SEIZE").map(drop)
}

/// `PTRACE_INTERRUPT`: stop a seized thread.
pub fn interrupt(tid: i32) -> SysResult<()> {
    req(libc::PTRACE_INTERRUPT, tid, 0, 0, "PTRACE_INTERRUPT").map(drop)
}

/// `PTRACE_CONT`, delivering `sig` (0 for none).
pub fn cont(tid: i32, sig: i32) -> SysResult<()> {
    req(libc::PTRACE_CONT, tid, 0, sig as usize, "PTRACE_CONT").map(drop)
}

/// `PTRACE_SINGLESTEP`.
pub fn singlestep(tid: i32, sig: i32) -> SysResult<()> {
    req(
        libc::PTRACE_SINGLESTEP,
        tid,
        0,
        sig as usize,
        "PTRACE_SINGLESTEP",
    )
    .map(drop)
}

/// `PTRACE_DETACH`, delivering `sig` (0 for none).
pub fn detach(tid: i32, sig: i32) -> SysResult<()> {
    req(libc::PTRACE_DETACH, tid, 0, sig as usize, "PTRACE_DETACH").map(drop)
}

/// `PTRACE_SETOPTIONS`.
pub fn set_options(tid: i32, opts: u64) -> SysResult<()> {
    req(
        libc::PTRACE_SETOPTIONS,
        tid,
        0,
        opts as usize,
        "PTRACE_SETOPTIONS",
    )
    .map(drop)
}

/// `PTRACE_GETEVENTMSG` (e.g. the new tid after a clone event).
pub fn event_msg(tid: i32) -> SysResult<u64> {
    let mut msg: libc::c_ulong = 0;
    req(
        libc::PTRACE_GETEVENTMSG,
        tid,
        0,
        &raw mut msg as usize,
        "PTRACE_GETEVENTMSG",
    )?;
    Ok(msg)
}

/// `PTRACE_GETREGS`.
pub fn get_regs(tid: i32) -> SysResult<Regs> {
    // SAFETY: user_regs_struct is plain old data; all-zero is a valid value.
    let mut regs: Regs = unsafe { std::mem::zeroed() };
    req(
        libc::PTRACE_GETREGS,
        tid,
        0,
        &raw mut regs as usize,
        "PTRACE_GETREGS",
    )?;
    Ok(regs)
}

/// `PTRACE_SETREGS`.
pub fn set_regs(tid: i32, regs: &Regs) -> SysResult<()> {
    req(
        libc::PTRACE_SETREGS,
        tid,
        0,
        std::ptr::from_ref(regs) as usize,
        "PTRACE_SETREGS",
    )
    .map(drop)
}

/// Reads the `NT_X86_XSTATE` register set (the XSAVE area), sized as the kernel returns it.
pub fn get_xstate(tid: i32) -> SysResult<Vec<u8>> {
    let mut buf = vec![0u8; XSTATE_BUF];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    req(
        libc::PTRACE_GETREGSET,
        tid,
        NT_X86_XSTATE,
        &raw mut iov as usize,
        "PTRACE_GETREGSET(NT_X86_XSTATE)",
    )?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

/// Writes the `NT_X86_XSTATE` register set.
pub fn set_xstate(tid: i32, xstate: &[u8]) -> SysResult<()> {
    let mut buf = xstate.to_vec();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    req(
        libc::PTRACE_SETREGSET,
        tid,
        NT_X86_XSTATE,
        &raw mut iov as usize,
        "PTRACE_SETREGSET(NT_X86_XSTATE)",
    )
    .map(drop)
}

/// `PTRACE_GETSIGMASK`: the thread's blocked-signal mask as a 64-bit set.
pub fn get_sigmask(tid: i32) -> SysResult<u64> {
    let mut mask: u64 = 0;
    req(
        libc::PTRACE_GETSIGMASK,
        tid,
        8,
        &raw mut mask as usize,
        "PTRACE_GETSIGMASK",
    )?;
    Ok(mask)
}

/// `PTRACE_SETSIGMASK`.
pub fn set_sigmask(tid: i32, mask: u64) -> SysResult<()> {
    req(
        libc::PTRACE_SETSIGMASK,
        tid,
        8,
        &raw const mask as usize,
        "PTRACE_SETSIGMASK",
    )
    .map(drop)
}

/// A thread's rseq registration as reported by `PTRACE_GET_RSEQ_CONFIGURATION`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RseqConfig {
    /// Address of the `struct rseq` (0: none registered).
    pub abi_pointer: u64,
    /// Registered length.
    pub len: u32,
    /// Flags.
    pub flags: u32,
    /// Signature.
    pub signature: u32,
}

#[repr(C)]
#[derive(Default)]
struct RawRseqConfig {
    rseq_abi_pointer: u64,
    rseq_abi_size: u32,
    signature: u32,
    flags: u32,
    pad: u32,
}

/// Reads the thread's rseq registration.
pub fn get_rseq(tid: i32) -> SysResult<RseqConfig> {
    let mut raw = RawRseqConfig::default();
    req(
        PTRACE_GET_RSEQ_CONFIGURATION,
        tid,
        std::mem::size_of::<RawRseqConfig>(),
        &raw mut raw as usize,
        "PTRACE_GET_RSEQ_CONFIGURATION",
    )?;
    Ok(RseqConfig {
        abi_pointer: raw.rseq_abi_pointer,
        len: raw.rseq_abi_size,
        flags: raw.flags,
        signature: raw.signature,
    })
}

/// Size of a kernel `siginfo_t`.
pub const SIGINFO_SIZE: usize = 128;

/// Reads pending signals without dequeuing them: per-thread, or the process-wide queue when
/// `shared` is set. Each entry is a raw 128-byte `siginfo_t`.
pub fn peek_siginfo(tid: i32, shared: bool) -> SysResult<Vec<[u8; SIGINFO_SIZE]>> {
    #[repr(C)]
    struct Args {
        off: u64,
        flags: u32,
        nr: i32,
    }
    let mut out = Vec::new();
    loop {
        let mut buf = [[0u8; SIGINFO_SIZE]; 32];
        let args = Args {
            off: out.len() as u64,
            flags: u32::from(shared),
            nr: 32,
        };
        let n = req(
            libc::PTRACE_PEEKSIGINFO,
            tid,
            &raw const args as usize,
            buf.as_mut_ptr() as usize,
            "PTRACE_PEEKSIGINFO",
        )?;
        let n = usize::try_from(n).unwrap_or(0);
        out.extend_from_slice(&buf[..n]);
        if n < 32 {
            return Ok(out);
        }
    }
}

/// `PTRACE_GETSIGINFO`: the signal that caused the current stop, as a raw siginfo.
pub fn get_siginfo(tid: i32) -> SysResult<[u8; SIGINFO_SIZE]> {
    let mut buf = [0u8; SIGINFO_SIZE];
    req(
        libc::PTRACE_GETSIGINFO,
        tid,
        0,
        buf.as_mut_ptr() as usize,
        "PTRACE_GETSIGINFO",
    )?;
    Ok(buf)
}
