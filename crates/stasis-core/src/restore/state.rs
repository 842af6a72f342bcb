//! Restoring descriptors, process-wide state, threads and signals of a rebuilt process.

use std::collections::HashMap;

use stasis_image::manifest::{Itimer, Manifest, OpenFile, ProcessImage, ThreadImage};
use stasis_sys::inject::Injector;
use stasis_sys::{mem, ptrace};

use super::RestoreOptions;
use super::child::{Child, sys};
use super::stage::Staged;
use crate::error::{CoreResult, SysContext};
use crate::proc;

const SS_DISABLE: i32 = 2;
const CAP_VERSION_3: u32 = 0x2008_0522;
const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;

/// Makes each pseudo-terminal whose session `p` leads its controlling terminal again, with
/// its foreground process group (every group exists by now). Runs while the staged slaves
/// are still open in `p`.
pub(super) fn restore_controlling_terminal(
    c: &mut Child,
    m: &Manifest,
    p: &ProcessImage,
    st: &Staged,
) -> CoreResult<()> {
    if p.sid != p.pid {
        return Ok(());
    }
    for pty in m.ptys.iter().filter(|t| t.session == Some(p.pid)) {
        let Some(&fd) = st.pty_slaves.get(&pty.index) else {
            continue;
        };
        c.call(
            "making a pseudo-terminal its session's controlling terminal",
            libc::SYS_ioctl,
            &[fd as u64, libc::TIOCSCTTY, 0],
        )?;
        if let Some(fg) = pty.foreground {
            let at = c.put(0, &fg.to_ne_bytes())?;
            c.call(
                &format!("making process group {fg} the terminal's foreground"),
                libc::SYS_ioctl,
                &[fd as u64, libc::TIOCSPGRP, at],
            )?;
        }
    }
    Ok(())
}

pub(super) fn install_fds(
    c: &mut Child,
    m: &Manifest,
    p: &ProcessImage,
    st: &Staged,
) -> CoreResult<()> {
    for fd in &p.fds {
        // Each standard descriptor leading outside the job gets the restarting command's own
        // descriptor of the same number (a terminal's 0, 1 and 2 share one description).
        let from = match &m.files[fd.file as usize] {
            OpenFile::Stdio { .. } if (0..=2).contains(&fd.fd) => st.stdio[fd.fd as usize],
            _ => st.files[fd.file as usize],
        };
        let flags = if fd.cloexec { libc::O_CLOEXEC } else { 0 };
        c.call(
            &format!("installing descriptor {}", fd.fd),
            libc::SYS_dup3,
            &[from as u64, fd.fd as u64, flags as u64],
        )?;
    }
    // A child sharing this table (CLONE_FILES), rebuilt later, still needs the staged
    // descriptors: it closes them, for both.
    if m.processes
        .iter()
        .any(|q| q.shares_parent_files && q.ppid == p.pid && q.zombie.is_none())
    {
        return Ok(());
    }
    c.call(
        "closing staged descriptors",
        libc::SYS_close_range,
        &[st.base as u64, u64::from(u32::MAX), 0],
    )?;
    let present: Vec<i32> = proc::fds(c.pid)?.iter().map(|e| e.fd).collect();
    for fd in present {
        if !p.fds.iter().any(|f| f.fd == fd) {
            c.call(
                "closing inherited descriptors",
                libc::SYS_close,
                &[fd as u64],
            )?;
        }
    }
    Ok(())
}

pub(super) fn restore_process_state(c: &mut Child, p: &ProcessImage) -> CoreResult<()> {
    let cwd = c.put_str(0, &p.cwd)?;
    c.call(
        &format!("changing directory to {}", p.cwd),
        libc::SYS_chdir,
        &[cwd],
    )?;
    c.call("umask", libc::SYS_umask, &[u64::from(p.umask)])?;
    c.call("personality", libc::SYS_personality, &[p.personality])?;
    for r in &p.rlimits {
        let lim = c.put_words(0, &[r.cur, r.max])?;
        if let Err(e) = c.call(
            &format!("resource limit {}", r.resource),
            libc::SYS_prlimit64,
            &[0, u64::from(r.resource), lim, 0],
        ) {
            tracing::warn!("{e}; keeping the restarting user's limit");
        }
    }
    for a in &p.sigactions {
        let act = c.put_words(0, &[a.handler, a.flags, a.restorer, a.mask])?;
        c.call(
            &format!("signal disposition {}", a.sig),
            libc::SYS_rt_sigaction,
            &[a.sig as u64, act, 0, 8],
        )?;
    }
    for (which, t) in p.itimers.iter().enumerate() {
        let Some(value_us) = itimer_restart_value(t) else {
            continue;
        };
        let v = c.put_words(
            0,
            &[
                t.interval_us / 1_000_000,
                t.interval_us % 1_000_000,
                value_us / 1_000_000,
                value_us % 1_000_000,
            ],
        )?;
        c.call("interval timer", libc::SYS_setitimer, &[which as u64, v, 0])?;
    }
    Ok(())
}

/// The value to arm a saved itimer with, or `None` when it was disarmed.
///
/// A periodic `ITIMER_REAL` that has fired is re-armed by the kernel only when its SIGALRM
/// is dequeued; until then `getitimer` reports value 0 with the interval still set. That
/// state cannot be recreated (`setitimer` with value 0 disarms and forgets the interval),
/// so such a timer is armed to fire one interval from now: the pending SIGALRM, restored
/// with the other pending signals, is taken first, and the timer goes on as before.
fn itimer_restart_value(t: &Itimer) -> Option<u64> {
    match (t.value_us, t.interval_us) {
        (0, 0) => None,
        (0, interval) => Some(interval),
        (value, _) => Some(value),
    }
}

pub(super) fn restore_posix_timers(
    c: &mut Child,
    p: &ProcessImage,
    tids: &HashMap<i32, i32>,
) -> CoreResult<()> {
    if p.posix_timers.is_empty() {
        return Ok(());
    }
    c.call(
        "enabling timer id restore (PR_TIMER_CREATE_RESTORE_IDS)",
        libc::SYS_prctl,
        &[PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0],
    )?;
    for t in &p.posix_timers {
        // struct sigevent: value (8), signo (4), notify (4), tid (4), padding.
        let mut ev = vec![0u8; 64];
        ev[..8].copy_from_slice(&t.value.to_le_bytes());
        ev[8..12].copy_from_slice(&t.signo.to_le_bytes());
        ev[12..16].copy_from_slice(&t.notify.to_le_bytes());
        let tid = tids.get(&t.notify_tid).copied().unwrap_or(t.notify_tid);
        ev[16..20].copy_from_slice(&tid.to_le_bytes());
        let evp = c.put(0, &ev)?;
        let idp = c.put(128, &t.id.to_le_bytes())?;
        c.call(
            &format!("POSIX timer {}", t.id),
            libc::SYS_timer_create,
            &[t.clock as u64, evp, idp],
        )?;
        if t.value_ns != 0 {
            let spec = c.put_words(
                256,
                &[
                    t.interval_ns / 1_000_000_000,
                    t.interval_ns % 1_000_000_000,
                    t.value_ns / 1_000_000_000,
                    t.value_ns % 1_000_000_000,
                ],
            )?;
            c.call(
                &format!("arming POSIX timer {}", t.id),
                libc::SYS_timer_settime,
                &[t.id as u64, 0, spec, 0],
            )?;
        }
    }
    c.call(
        "disabling timer id restore",
        libc::SYS_prctl,
        &[PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0],
    )?;
    Ok(())
}

/// Recreates the process's other threads with an injected `clone3` (their saved tids when
/// pids are restored); returns every thread's pid in the restorer's view, main first.
pub(super) fn create_threads(
    c: &mut Child,
    p: &ProcessImage,
    opts: &RestoreOptions,
) -> CoreResult<Vec<i32>> {
    let mut host_tids = vec![c.pid];
    let flags = (libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM) as u64;
    for t in &p.threads[1..] {
        host_tids.push(c.fork(opts.set_pids.then_some(t.tid), flags, 0)?);
    }
    Ok(host_tids)
}

pub(super) fn restore_thread_state(
    c: &Child,
    tid: i32,
    t: &ThreadImage,
    insn: u64,
) -> CoreResult<Injector> {
    let mut inj = Injector::new(tid, insn);
    let ctx = |what: &str| format!("restoring thread {}: {what}", t.tid);
    inj.call(
        "set_tid_address",
        libc::SYS_set_tid_address,
        &[t.clear_child_tid],
    )
    .ctx(|| ctx("clear_child_tid"))?;
    inj.call(
        "set_robust_list",
        libc::SYS_set_robust_list,
        &[t.robust_list.0, t.robust_list.1],
    )
    .ctx(|| ctx("robust list"))?;
    let (sp, flags, size) = t.sigaltstack;
    let ss = if flags & SS_DISABLE != 0 {
        [0, SS_DISABLE as u64, 0]
    } else {
        [sp, (flags & !1) as u64, size]
    };
    let bytes: Vec<u8> = ss.iter().flat_map(|w| w.to_le_bytes()).collect();
    let area = c.scratch + 2048 + 256 * u64::try_from(t.tid % 4).unwrap_or(0);
    mem::write(c.pid, area, &bytes).map_err(sys("writing sigaltstack"))?;
    inj.call("sigaltstack", libc::SYS_sigaltstack, &[area, 0])
        .ctx(|| ctx("alternate signal stack"))?;
    let mut name = t.comm.as_bytes().to_vec();
    name.truncate(15);
    name.push(0);
    mem::write(c.pid, area, &name).map_err(sys("writing thread name"))?;
    inj.call(
        "prctl(PR_SET_NAME)",
        libc::SYS_prctl,
        &[libc::PR_SET_NAME as u64, area],
    )
    .ctx(|| ctx("name"))?;
    if t.rseq.ptr != 0 {
        inj.call(
            "rseq",
            libc::SYS_rseq,
            &[
                t.rseq.ptr,
                u64::from(t.rseq.len),
                0,
                u64::from(t.rseq.signature),
            ],
        )
        .ctx(|| ctx("rseq registration"))?;
    }
    ptrace::set_sigmask(tid, t.sigmask).ctx(|| ctx("signal mask"))?;
    Ok(inj)
}

pub(super) fn queue_signals(
    c: &mut Child,
    p: &ProcessImage,
    thread_injs: &mut [Injector],
) -> CoreResult<()> {
    let tgid = c.call("getpid", libc::SYS_getpid, &[])?;
    for info in &p.shared_pending {
        let sig = u64::from(u32::from_le_bytes(info[..4].try_into().unwrap_or_default()));
        let at = c.put(0, info)?;
        c.call(
            &format!("re-queueing signal {sig}"),
            libc::SYS_rt_sigqueueinfo,
            &[tgid, sig, at],
        )?;
    }
    for (inj, t) in thread_injs.iter_mut().zip(&p.threads) {
        for info in &t.pending {
            let sig = u64::from(u32::from_le_bytes(info[..4].try_into().unwrap_or_default()));
            let tid = inj
                .call("gettid", libc::SYS_gettid, &[])
                .ctx(|| "gettid".into())?;
            mem::write(c.pid, c.scratch, info).map_err(sys("writing a pending signal"))?;
            inj.call(
                "rt_tgsigqueueinfo",
                libc::SYS_rt_tgsigqueueinfo,
                &[tgid, tid, sig, c.scratch],
            )
            .ctx(|| format!("re-queueing signal {sig} of thread {}", t.tid))?;
        }
    }
    Ok(())
}

pub(super) fn drop_caps(c: &mut Child, p: &ProcessImage) -> CoreResult<()> {
    let [inh, prm, eff] = p.caps;
    let header = c.put(
        0,
        &[CAP_VERSION_3.to_le_bytes(), 0u32.to_le_bytes()].concat(),
    )?;
    let lo = |v: u64| u32::try_from(v & 0xffff_ffff).unwrap_or(0);
    let hi = |v: u64| u32::try_from(v >> 32).unwrap_or(0);
    let data: Vec<u8> = [lo(eff), lo(prm), lo(inh), hi(eff), hi(prm), hi(inh)]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    let data = c.put(64, &data)?;
    c.call(
        "dropping capabilities to the saved ones",
        libc::SYS_capset,
        &[header, data],
    )?;
    Ok(())
}

/// Re-adds the registrations of every epoll instance this process owns, inside the process,
/// so that they name its own descriptor numbers (its later `EPOLL_CTL_MOD`/`DEL` work).
pub(super) fn restore_epoll(c: &mut Child, p: &ProcessImage, m: &Manifest) -> CoreResult<()> {
    for d in &p.fds {
        let OpenFile::Epoll { owner, watches, .. } = &m.files[d.file as usize] else {
            continue;
        };
        if *owner != p.pid || p.fds.iter().any(|o| o.file == d.file && o.fd < d.fd) {
            continue;
        }
        for w in watches {
            let mut ev = w.events.to_le_bytes().to_vec();
            ev.extend_from_slice(&w.data.to_le_bytes());
            let at = c.put(0, &ev)?;
            c.call(
                &format!(
                    "re-registering descriptor {} with epoll descriptor {}",
                    w.fd, d.fd
                ),
                libc::SYS_epoll_ctl,
                &[d.fd as u64, libc::EPOLL_CTL_ADD as u64, w.fd as u64, at],
            )?;
        }
    }
    Ok(())
}
