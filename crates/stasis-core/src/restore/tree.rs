//! Creating a job's processes with their original pids, parents, sessions and process groups.
//!
//! Every process is first created as a copy of the restorer, parked and traced: the root by
//! the restorer itself, every other process by injecting `clone3` (with `set_tid`) into its
//! parent, so parent links are real. An orphan (parent: the job's init) is forked by a
//! short-lived helper that is then killed, so the kernel re-parents it to init. A zombie is
//! forked by its parent and made to exit with its saved status at once. Sessions and groups
//! are set right after each process is created, before its children inherit them.

use std::collections::{HashMap, HashSet};

use stasis_image::manifest::Manifest;
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
        let pid = z.call("getpid", libc::SYS_getpid, &[])?;
        let _ = z.inj.raw(libc::SYS_kill, &[pid, sig as u64]);
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

fn create_into(tree: &mut Tree, m: &Manifest, opts: &RestoreOptions, insn: u64) -> CoreResult<()> {
    let ids: HashSet<i32> = m
        .processes
        .iter()
        .flat_map(|p| std::iter::once(p.pid).chain(p.threads.iter().map(|t| t.tid)))
        .collect();
    let mut helper_pid = ids.iter().copied().max().unwrap_or(2) + 1;
    let mut index: HashMap<i32, usize> = HashMap::new();
    let mut deferred_groups = Vec::new();
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
            let pc = tree.children[pi].as_mut().ok_or_else(|| {
                CoreError::Incompatible(format!("process {} has a zombie parent", p.pid))
            })?;
            pc.fork(set, 0, libc::SIGCHLD as u64)?
        } else if p.ppid == 1 && opts.set_pids {
            let helper = process::spawn_parked(Some(helper_pid))
                .map_err(sys("creating a helper process"))?;
            helper_pid += 1;
            seize_stopped(helper.pid)?;
            let new = Child::new(helper.pid, insn)?.fork(set, 0, libc::SIGCHLD as u64);
            let _ = process::kill(helper.pid, libc::SIGKILL);
            while !matches!(
                wait_pid(helper.pid, 0),
                Ok((_, WaitStatus::Exited(_) | WaitStatus::Signaled(_))) | Err(_)
            ) {}
            new?
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
        let mut c = Child::new(host, insn)?;
        if opts.set_pids {
            if p.sid != 0 && p.sid == p.pid {
                c.call("starting its session (setsid)", libc::SYS_setsid, &[])?;
            } else if p.pgid != 0 && p.pgid == p.pid {
                c.call(
                    "leading its process group (setpgid)",
                    libc::SYS_setpgid,
                    &[0, 0],
                )?;
            } else if p.pgid != 0 {
                deferred_groups.push(i);
            }
        }
        tree.children[i] = Some(c);
        index.insert(p.pid, i);
    }
    for i in deferred_groups {
        let pgid = m.processes[i].pgid;
        if let Some(c) = tree.children[i].as_mut() {
            c.call(
                &format!("joining process group {pgid}"),
                libc::SYS_setpgid,
                &[0, pgid as u64],
            )?;
        }
    }
    Ok(())
}
