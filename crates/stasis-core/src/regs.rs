//! Register fix-ups for threads caught inside a system call.
//!
//! A thread stopped in an interruptible system call shows `orig_rax` = the call and `rax` =
//! one of the kernel's internal restart codes. The kernel would restart it when the thread
//! resumes, but a restored thread resumes from a fresh stop with `orig_rax = -1`, so the
//! restart is done here: back `rip` up to the `syscall` instruction and reload the number.

use stasis_sys::Regs;

const ERESTARTSYS: i64 = -512;
const ERESTARTNOINTR: i64 = -513;
const ERESTARTNOHAND: i64 = -514;
const ERESTART_RESTARTBLOCK: i64 = -516;
const NR_NANOSLEEP: u64 = 35;
const NR_RESTART_SYSCALL: u64 = 219;
const NR_CLOCK_NANOSLEEP: u64 = 230;

/// Prepares saved registers for a restored thread so that an interrupted system call is
/// re-issued rather than returning `EINTR`.
///
/// For a relative sleep whose remaining time the kernel wrote to the caller's `rem` buffer,
/// the sleep is re-issued for the remaining time only. A thread caught in `restart_syscall`
/// (a sleep already restarted once) gets `EINTR`, since the kernel's restart block is gone.
pub fn for_restore(saved: &Regs) -> Regs {
    let mut r = *saved;
    let orig = r.orig_rax as i64;
    if orig < 0 {
        return r;
    }
    match r.rax as i64 {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
            r.rax = r.orig_rax;
            r.rip -= 2;
        }
        ERESTART_RESTARTBLOCK if r.orig_rax == NR_RESTART_SYSCALL => r.rax = (-libc::EINTR) as u64,
        ERESTART_RESTARTBLOCK => {
            if r.orig_rax == NR_CLOCK_NANOSLEEP
                && r.rsi & (libc::TIMER_ABSTIME as u64) == 0
                && r.r10 != 0
            {
                r.rdx = r.r10;
            } else if r.orig_rax == NR_NANOSLEEP && r.rsi != 0 {
                r.rdi = r.rsi;
            }
            r.rax = r.orig_rax;
            r.rip -= 2;
        }
        _ => {}
    }
    r.orig_rax = u64::MAX;
    r
}

/// The XCR0 feature mask recorded in an XSAVE area as ptrace returns it: the first 8 bytes
/// of the software-reserved area (byte 464; `USER_XSTATE_XCR0_WORD`). An area laid out as a
/// signal frame carries a magic there instead, and the mask at byte 472.
pub fn xstate_features(xstate: &[u8]) -> Option<u64> {
    const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
    let word = |at: usize| {
        xstate
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let magic = u32::from_le_bytes(xstate.get(464..468)?.try_into().ok()?);
    if magic == FP_XSTATE_MAGIC1 {
        word(472)
    } else {
        word(464)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs() -> Regs {
        stasis_sys::ptrace::regs_from_words(&[0; 27]).expect("27 words")
    }

    #[test]
    fn xcr0_is_read_from_the_ptrace_layout() {
        let mut area = vec![0u8; 576];
        area[464..472].copy_from_slice(&0x2ffu64.to_le_bytes());
        assert_eq!(xstate_features(&area), Some(0x2ff));
        assert_eq!(xstate_features(&area[..100]), None);
    }

    #[test]
    fn restartable_call_is_reissued() {
        let mut r = regs();
        r.orig_rax = 0;
        r.rax = (-512i64) as u64;
        r.rip = 0x1002;
        let out = for_restore(&r);
        assert_eq!((out.rax, out.rip, out.orig_rax), (0, 0x1000, u64::MAX));
    }

    #[test]
    fn relative_sleep_resumes_with_remaining_time() {
        let mut r = regs();
        r.orig_rax = NR_CLOCK_NANOSLEEP;
        r.rax = (-516i64) as u64;
        r.rsi = 0;
        r.rdx = 0x5000;
        r.r10 = 0x6000;
        r.rip = 0x2002;
        let out = for_restore(&r);
        assert_eq!(
            (out.rax, out.rdx, out.rip),
            (NR_CLOCK_NANOSLEEP, 0x6000, 0x2000)
        );
    }

    #[test]
    fn restart_syscall_returns_eintr_and_user_code_is_untouched() {
        let mut r = regs();
        r.orig_rax = NR_RESTART_SYSCALL;
        r.rax = (-516i64) as u64;
        assert_eq!(for_restore(&r).rax as i64, -i64::from(libc::EINTR));
        let mut u = regs();
        u.orig_rax = u64::MAX;
        u.rax = 7;
        u.rip = 0x3000;
        assert_eq!(for_restore(&u).rip, 0x3000);
    }
}
