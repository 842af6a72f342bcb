//! Creating a job's processes with their original pids, parents, sessions and process groups.
//!
//! Every process is first created as a copy of the restorer, parked and traced: the root by
//! the restorer itself, every other process by injecting `clone3` (with `set_tid`) into its
//! parent, so parent links are real. An orphan (parent: the job's init) is forked by a
//! short-lived helper that is then killed, so the kernel re-parents it to init. A zombie is
//! forked by its parent and made to exit with its saved status at once. Sessions and groups
//! are set right after each process is created, before its children inherit them.

use std::collections::{HashMap, HashSet};

use stasis_image::manifest::{Manifest, ProcessImage};
use stasis_sys::process::{self, ParkedChild};
use stasis_sys::ptrace;
use stasis_sys::wait::{WaitStatus, wait_pid};

use super::RestoreOptions;
use super::child::{Child, seize_stopped, sys};
use crate::error::{CoreError, CoreResult};

/// The created processes, index-aligned with `Manifest::processes` (`None` for zombies).
#[derive(Debug)]
pub(super) struct Tree {
    /// One entry per saved process.
    pub children: Vec<Option<Child>>,
    /// Keeps parked children parked until they are rebuilt.
    _parked: Vec<ParkedChild>,
}

impl Tree {
    /// Kills every created process (after a failed restore).
    pub fn kill_all(&self) {
        for c in self.children.iter().flatten() {
            let _ = process::kill(c.pid, libc::SIGKILL);
        }
    }
}

fn make_zombie(host: i32, status: i32, insn: u64) -> CoreResult<()> {
    let mut z = Child::new(host, insn)?;
    let sig = status & 0x7f;
    if sig == 0 {
        // exit_group never returns: the injector reports the exit as an error.
        let _ = z.inj.raw(
            libc::SYS_exit_group,
            &[u64::from(((status >> 8) & 0xff) as u32)],
        );
    } else {
        ptrace::set_sigmask(host, 0).map_err(sys("unblocking signals in a zombie-to-be"))?;
        z.put_words(0, &[0, 0, 0, 0])?;
        let act = z.scratch;
        z.call(
            "default disposition",
            libc::SYS_rt_sigaction,
            &[sig as u64, act, 0, 8],
        )?;
        // Let it go with the signal delivered: its default action ends it. As we are no
        // longer its tracer, wait until its parent has a zombie.
        ptrace::detach(host, sig).map_err(sys("ending a zombie-to-be with its signal"))?;
        for _ in 0..2000 {
            if crate::proc::state(host).is_none_or(|(s, _)| s == 'Z') {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        return Err(CoreError::Incompatible(format!(
            "process {host} did not end with signal {sig}"
        )));
    }
    loop {
        match wait_pid(host, 0) {
            Ok((_, WaitStatus::Exited(_) | WaitStatus::Signaled(_))) | Err(_) => return Ok(()),
            Ok(_) => {
                let _ = ptrace::cont(host, 0);
            }
        }
    }
}

/// Dequeues the `SIGCHLD` a zombie's exit left pending in its (still parked) parent.
fn consume_sigchld(parent: &mut Child) -> CoreResult<()> {
    let set = 1u64 << (libc::SIGCHLD - 1);
    let setp = parent.put_words(2048, &[set])?;
    let timeout = parent.put_words(2064, &[0, 0])?;
    let _ = parent
        .inj
        .raw(libc::SYS_rt_sigtimedwait, &[setp, 0, timeout, 8]);
    Ok(())
}

/// Creates every process of `m`, parked and traced, with sessions and groups set.
pub(super) fn create(m: &Manifest, opts: &RestoreOptions, insn: u64) -> CoreResult<Tree> {
    let mut tree = Tree {
        children: (0..m.processes.len()).map(|_| None).collect(),
        _parked: Vec::new(),
    };
    match create_into(&mut tree, m, opts, insn) {
        Ok(()) => Ok(tree),
        Err(e) => {
            tree.kill_all();
            Err(e)
        }
    }
}

/// What a created process still has to do to lead its session or process group. It is done
/// lazily, just before it forks a child that belongs to the new session or group: children
/// forked before stay in the old one, as they were.
#[derive(Debug, Default, Clone, Copy)]
struct Leadership {
    session: bool,
    group: bool,
}

fn lead(c: &mut Child, l: &mut Leadership, session: bool, group: bool) -> CoreResult<()> {
    if session && l.session {
        c.call("starting its session (setsid)", libc::SYS_setsid, &[])?;
        *l = Leadership::default();
    }
    if group && l.group {
        c.call(
            "leading its process group (setpgid)",
            libc::SYS_setpgid,
            &[0, 0],
        )?;
        l.group = false;
    }
    Ok(())
}

/// Forks `p` (pid `set`) as an orphan of the job's init, through a helper that is then
/// killed. When `p`'s session or group leader is gone (a daemon after a double fork), the
/// helper takes that leader's pid and leads the session or group first.
fn fork_orphan(
    p: &ProcessImage,
    set: Option<i32>,
    ids: &HashSet<i32>,
    next_free: &mut i32,
    insn: u64,
) -> CoreResult<i32> {
    let dead = |x: i32| x != 0 && x != p.pid && !ids.contains(&x);
    let helper_pid = if dead(p.sid) {
        p.sid
    } else if dead(p.pgid) {
        p.pgid
    } else {
        *next_free += 1;
        *next_free - 1
    };
    let helper =
        process::spawn_parked(Some(helper_pid)).map_err(sys("creating a helper process"))?;
    seize_stopped(helper.pid)?;
    let result = (|| {
        let mut h = Child::new(helper.pid, insn)?;
        if helper_pid == p.sid {
            h.call(
                "recreating a session whose leader is gone",
                libc::SYS_setsid,
                &[],
            )?;
        } else if helper_pid == p.pgid {
            h.call(
                "recreating a process group whose leader is gone",
                libc::SYS_setpgid,
                &[0, 0],
            )?;
        }
        h.fork(set, 0, libc::SIGCHLD as u64)
    })();
    let _ = process::kill(helper.pid, libc::SIGKILL);
    while !matches!(
        wait_pid(helper.pid, 0),
        Ok((_, WaitStatus::Exited(_) | WaitStatus::Signaled(_))) | Err(_)
    ) {}
    result
}

fn create_into(tree: &mut Tree, m: &Manifest, opts: &RestoreOptions, insn: u64) -> CoreResult<()> {
    let ids: HashSet<i32> = m
        .processes
        .iter()
        .flat_map(|p| std::iter::once(p.pid).chain(p.threads.iter().map(|t| t.tid)))
        .collect();
    let mut next_free = ids.iter().copied().max().unwrap_or(2) + 1;
    let mut index: HashMap<i32, usize> = HashMap::new();
    let mut leadership = vec![Leadership::default(); m.processes.len()];
    let mut joins = Vec::new();
    // Process groups whose leader is gone, each recreated by a keeper process with the
    // leader's pid, forked by the first member's parent: (parent index, keeper, group).
    let mut keepers: Vec<(usize, i32, i32)> = Vec::new();
    let dead_group = |p: &ProcessImage| {
        p.pgid != 0 && p.pgid != p.pid && p.pgid != p.sid && !ids.contains(&p.pgid)
    };
    for (i, p) in m.processes.iter().enumerate() {
        let set = opts.set_pids.then_some(p.pid);
        let parent = if p.ppid > 1 {
            index.get(&p.ppid).copied()
        } else {
            None
        };
        if p.zombie.is_some() && parent.is_none() {
            continue; // an orphaned zombie is reaped by init at once: nothing to recreate
        }
        let host = if let Some(pi) = parent {
            let q = &m.processes[pi];
            let pc = tree.children[pi].as_mut().ok_or_else(|| {
                CoreError::Incompatible(format!("process {} has a zombie parent", p.pid))
            })?;
            lead(pc, &mut leadership[pi], p.sid == q.pid, p.pgid == q.pid)?;
            if opts.set_pids
                && dead_group(p)
                && q.pgid != p.pgid
                && !keepers.iter().any(|k| k.2 == p.pgid)
            {
                let k = pc.fork(Some(p.pgid), 0, libc::SIGCHLD as u64)?;
                keepers.push((pi, k, p.pgid));
                Child::new(k, insn)?.call(
                    "recreating a process group whose leader is gone",
                    libc::SYS_setpgid,
                    &[0, 0],
                )?;
            }
            let flags = if p.shares_parent_files {
                libc::CLONE_FILES as u64
            } else {
                0
            };
            pc.fork(set, flags, libc::SIGCHLD as u64)?
        } else if p.ppid == 1 && opts.set_pids {
            fork_orphan(p, set, &ids, &mut next_free, insn)?
        } else if p.ppid <= 1 {
            let parked = process::spawn_parked(set).map_err(|source| CoreError::Sys {
                context: format!(
                    "creating process {} (is pid {} free in the job's namespace?)",
                    p.pid, p.pid
                ),
                source,
            })?;
            seize_stopped(parked.pid)?;
            let pid = parked.pid;
            tree._parked.push(parked);
            pid
        } else {
            return Err(CoreError::Incompatible(format!(
                "process {}: its parent {} is not in the image",
                p.pid, p.ppid
            )));
        };
        if let Some(status) = p.zombie {
            make_zombie(host, status, insn)?;
            if let Some(pi) = parent
                && let Some(pc) = tree.children[pi].as_mut()
            {
                consume_sigchld(pc)?;
            }
            continue;
        }
        tree.children[i] = Some(Child::new(host, insn)?);
        index.insert(p.pid, i);
        if opts.set_pids {
            leadership[i] = Leadership {
                session: p.sid != 0 && p.sid == p.pid,
                group: p.pgid != 0 && p.pgid == p.pid && p.sid != p.pid,
            };
            if p.pgid != 0
                && p.pgid != p.pid
                && (ids.contains(&p.pgid) || keepers.iter().any(|k| k.2 == p.pgid))
            {
                joins.push(i);
            }
        }
    }
    for (i, l) in leadership.iter_mut().enumerate() {
        if let Some(c) = tree.children[i].as_mut() {
            lead(c, l, true, true)?;
        }
    }
    for i in joins {
        let pgid = m.processes[i].pgid;
        if let Some(c) = tree.children[i].as_mut() {
            c.call(
                &format!("joining process group {pgid}"),
                libc::SYS_setpgid,
                &[0, pgid as u64],
            )?;
        }
    }
    // The groups live on without their keepers, which their parents reap.
    for (pi, keeper, pgid) in keepers {
        let _ = process::kill(keeper, libc::SIGKILL);
        while !matches!(
            wait_pid(keeper, 0),
            Ok((_, WaitStatus::Exited(_) | WaitStatus::Signaled(_))) | Err(_)
        ) {}
        if let Some(pc) = tree.children[pi].as_mut() {
            pc.call(
                "reaping the keeper of a process group",
                libc::SYS_wait4,
                &[pgid as u64, 0, 0, 0],
            )?;
            consume_sigchld(pc)?;
        }
    }
    Ok(())
}
