//! Restoring one process by remote control.
//!
//! The supervisor stages every descriptor the process needs (files opened and positioned,
//! pipes refilled, terminals) at high descriptor numbers, then forks a parked child (with the
//! original pid when a pid namespace is in use), seizes it, and rebuilds it by injecting
//! system calls: tear down the inherited address space, move `[vvar]`/`[vdso]` to their saved
//! addresses, map and fill every mapping, install descriptors, restore process-wide state,
//! recreate threads with `clone3` + `set_tid`, and finally load registers and detach.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

use nix::fcntl::OFlag;
use stasis_image::OpenGeneration;
use stasis_image::manifest::{FileId, OpenFile, ProcessImage, Vma, VmaKind};
use stasis_sys::inject::{Injector, find_syscall_insn};
use stasis_sys::ptrace::{self, options};
use stasis_sys::wait::{WaitStatus, wait_pid};
use stasis_sys::{SysError, fd as sysfd, mem, process};

use crate::error::{CoreError, CoreResult, SysContext};
use crate::proc;
use crate::regs;

const PAGE: u64 = 4096;
const SCRATCH_LEN: u64 = 16 * PAGE;
const TASK_SIZE: u64 = 0x7fff_ffff_f000;
const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;
const SS_DISABLE: i32 = 2;
const RSEQ_FLAG_UNREGISTER: u64 = 1;
const CAP_VERSION_3: u32 = 0x2008_0522;

/// How to restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Restore even if files changed since the checkpoint.
    pub force: bool,
    /// Ask for the saved pid (the caller created a pid namespace for its children).
    pub set_pids: bool,
}

/// A restored, running process (a child of the caller).
#[derive(Debug)]
pub struct Restored {
    /// Its pid in the caller's view.
    pub pid: i32,
}

/// Checks that this machine can run the image: same vdso, enough CPU state features.
pub fn check_machine(vdso_blake3: &str) -> CoreResult<()> {
    let (base, len) = own_vdso()?;
    let ours = blake3::hash(&mem::own_bytes(base, len))
        .to_hex()
        .to_string();
    if ours != vdso_blake3 {
        return Err(CoreError::Incompatible(
            "this kernel's vdso differs from the one the job ran with (another kernel version or build); restore on a machine running the same kernel".into(),
        ));
    }
    Ok(())
}

fn own_vdso() -> CoreResult<(u64, usize)> {
    let maps = proc::maps(std::process::id() as i32)?;
    let v = maps
        .iter()
        .find(|m| m.path == "[vdso]")
        .ok_or_else(|| CoreError::Incompatible("this process has no vdso".into()))?;
    Ok((v.start, usize::try_from(v.end - v.start).unwrap_or(0)))
}

/// Checks that a file is still the one saved (size and mtime for regular files).
pub fn check_file(id: &FileId) -> CoreResult<()> {
    let meta = std::fs::metadata(&id.path).map_err(|e| CoreError::FileChanged {
        path: id.path.clone(),
        detail: format!("cannot be opened ({e})"),
    })?;
    if id.regular {
        let mtime = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
        if meta.len() != id.size || mtime != id.mtime_ns {
            return Err(CoreError::FileChanged {
                path: id.path.clone(),
                detail: format!(
                    "changed since the checkpoint (size {} -> {}, mtime changed: {})",
                    id.size,
                    meta.len(),
                    mtime != id.mtime_ns
                ),
            });
        }
    }
    Ok(())
}

/// Descriptors prepared in the supervisor, inherited by the parked child.
struct Staged {
    /// Child descriptor number for each entry of `ProcessImage::files`.
    files: Vec<RawFd>,
    /// Child descriptor number for each mapped file path.
    maps: HashMap<String, RawFd>,
    exe: RawFd,
    /// Lowest staged number: everything at or above is closed at the end.
    base: RawFd,
    _keep: Vec<OwnedFd>,
}

fn sys(context: &str) -> impl FnOnce(SysError) -> CoreError + '_ {
    move |source| CoreError::Sys {
        context: context.to_owned(),
        source,
    }
}

fn open_path(path: &str, flags: i32) -> CoreResult<OwnedFd> {
    let flags = OFlag::from_bits_retain(
        flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_CLOEXEC),
    ) | OFlag::O_NOCTTY;
    nix::fcntl::open(path, flags, nix::sys::stat::Mode::empty()).map_err(|e| {
        CoreError::FileChanged {
            path: path.to_owned(),
            detail: format!("cannot be opened ({e})"),
        }
    })
}

fn stage(image: &mut OpenGeneration, p: &ProcessImage) -> CoreResult<Staged> {
    let max_fd = p.fds.iter().map(|f| f.fd).max().unwrap_or(2);
    let base = (max_fd + 1).max(256);
    let mut keep = Vec::new();
    let push = |fd: OwnedFd, keep: &mut Vec<OwnedFd>| -> CoreResult<RawFd> {
        let high = sysfd::dup_at_least(fd.as_fd(), base).map_err(sys("staging a descriptor"))?;
        let n = high.as_raw_fd();
        keep.push(high);
        Ok(n)
    };
    let mut pipes: HashMap<u64, (OwnedFd, OwnedFd)> = HashMap::new();
    let mut files = Vec::with_capacity(p.files.len());
    for (index, f) in p.files.iter().enumerate() {
        let fd = match f {
            OpenFile::Path { file, flags, pos } => {
                let fd = open_path(&file.path, *flags)?;
                if file.regular || *pos != 0 {
                    let _ = nix::unistd::lseek(
                        fd.as_fd(),
                        i64::try_from(*pos).unwrap_or(0),
                        nix::unistd::Whence::SeekSet,
                    );
                }
                fd
            }
            OpenFile::Stdio { flags, .. } => {
                let lowest = p
                    .fds
                    .iter()
                    .filter(|d| d.file as usize == index)
                    .map(|d| d.fd)
                    .min()
                    .unwrap_or(0);
                let ours = if (0..=2).contains(&lowest) {
                    lowest
                } else if flags & libc::O_ACCMODE == libc::O_RDONLY {
                    0
                } else {
                    1
                };
                sysfd::dup_raw_at_least(ours, base)
                    .map_err(sys("duplicating the restart command's terminal"))?
            }
            OpenFile::Pipe {
                inode,
                write_end,
                flags,
                capacity,
                data,
            } => {
                if !pipes.contains_key(inode) {
                    let (r, w) = nix::unistd::pipe()
                        .map_err(|e| sys("creating a pipe")(SysError::new("pipe", 0, e)))?;
                    sysfd::set_pipe_size(w.as_fd(), usize::try_from(*capacity).unwrap_or(65536))
                        .map_err(sys("sizing a pipe"))?;
                    pipes.insert(*inode, (r, w));
                }
                let (r, w) = &pipes[inode];
                for &chunk in data {
                    let bytes = image.chunk(chunk)?;
                    nix::unistd::write(w, &bytes)
                        .map_err(|e| sys("refilling a pipe")(SysError::new("write", 0, e)))?;
                }
                let end = if *write_end { w } else { r };
                let dup = sysfd::dup_at_least(end.as_fd(), base).map_err(sys("staging a pipe"))?;
                sysfd::set_status_flags(dup.as_fd(), flags & (libc::O_NONBLOCK | libc::O_DIRECT))
                    .map_err(sys("setting pipe flags"))?;
                dup
            }
        };
        files.push(push(fd, &mut keep)?);
    }
    let mut maps = HashMap::new();
    for v in &p.vmas {
        if let Some(id) = &v.file
            && !maps.contains_key(&id.path)
        {
            let writable = v.shared && v.prot & libc::PROT_WRITE != 0;
            let flags = if writable {
                libc::O_RDWR
            } else {
                libc::O_RDONLY
            };
            let fd = open_path(&id.path, flags)?;
            maps.insert(id.path.clone(), push(fd, &mut keep)?);
        }
    }
    // The kernel refuses to replace the exe link while the old exe is still mapped; when the
    // restorer runs the image's own binary, the link is already right and is left alone.
    let same_exe = std::fs::read_link("/proc/self/exe")
        .is_ok_and(|own| own.as_os_str() == std::ffi::OsStr::new(&p.exe));
    let exe = if same_exe {
        -1
    } else {
        push(open_path(&p.exe, libc::O_RDONLY)?, &mut keep)?
    };
    Ok(Staged {
        files,
        maps,
        exe,
        base,
        _keep: keep,
    })
}

/// Finds `len` bytes of address space free in the image and outside `avoid`.
fn free_area(vmas: &[Vma], avoid: &[(u64, u64)], len: u64) -> CoreResult<u64> {
    let busy = |a: u64| {
        vmas.iter()
            .map(|v| (v.start, v.end))
            .chain(avoid.iter().copied())
            .any(|(s, e)| a < e && s < a + len)
    };
    let mut addr = 0x1_0000_0000u64;
    while addr + len < TASK_SIZE {
        if !busy(addr) {
            return Ok(addr);
        }
        addr += 0x4000_0000;
    }
    Err(CoreError::Incompatible(
        "no free address range for the restorer's scratch memory".into(),
    ))
}

struct Child {
    pid: i32,
    inj: Injector,
    scratch: u64,
}

impl Child {
    fn call(&mut self, what: &str, nr: i64, args: &[u64]) -> CoreResult<u64> {
        let pid = self.pid;
        self.inj
            .call("injected syscall", nr, args)
            .map_err(|source| CoreError::Sys {
                context: format!("restoring process {pid}: {what}"),
                source,
            })
    }
    fn put(&self, offset: u64, data: &[u8]) -> CoreResult<u64> {
        mem::write(self.pid, self.scratch + offset, data)
            .map_err(sys("writing restorer arguments"))?;
        Ok(self.scratch + offset)
    }
    fn put_words(&self, offset: u64, w: &[u64]) -> CoreResult<u64> {
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.put(offset, &bytes)
    }
    fn put_str(&self, offset: u64, s: &str) -> CoreResult<u64> {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.put(offset, &b)
    }
}

fn seize_stopped(pid: i32) -> CoreResult<()> {
    ptrace::seize(pid, options::TRACECLONE | options::EXITKILL)
        .map_err(sys("seizing the restore child"))?;
    ptrace::interrupt(pid).map_err(sys("stopping the restore child"))?;
    match wait_pid(pid, 0)
        .map_err(sys("waiting for the restore child"))?
        .1
    {
        WaitStatus::Stopped { .. } => Ok(()),
        _ => Err(CoreError::Vanished(pid)),
    }
}

fn teardown_and_move_specials(c: &mut Child, p: &ProcessImage, vdso_off: u64) -> CoreResult<()> {
    let cur = proc::maps(c.pid)?;
    let specials: Vec<_> = cur
        .iter()
        .filter(|m| matches!(m.path.as_str(), "[vvar]" | "[vvar_vclock]" | "[vdso]"))
        .cloned()
        .collect();
    let lo = specials.iter().map(|m| m.start).min().unwrap_or(0);
    let hi = specials.iter().map(|m| m.end).max().unwrap_or(0);
    c.call(
        "unmapping the restorer's memory",
        libc::SYS_munmap,
        &[0, lo],
    )?;
    c.call(
        "unmapping the restorer's memory",
        libc::SYS_munmap,
        &[hi, TASK_SIZE - hi],
    )?;
    let saved = |name: &str| {
        p.vmas.iter().find(|v| {
            matches!(
                (v.kind, name),
                (VmaKind::Vvar, "[vvar]")
                    | (VmaKind::VvarVclock, "[vvar_vclock]")
                    | (VmaKind::Vdso, "[vdso]")
            )
        })
    };
    for m in &specials {
        let s = saved(&m.path).ok_or_else(|| {
            CoreError::Incompatible(format!(
                "this kernel has a {} mapping the image lacks",
                m.path
            ))
        })?;
        if s.end - s.start != m.end - m.start {
            return Err(CoreError::Incompatible(format!(
                "{} differs in size from the image's",
                m.path
            )));
        }
    }
    let temp = free_area(&p.vmas, &[(lo, hi)], hi - lo)?;
    let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
    for step in 0..2 {
        for m in &specials {
            let len = m.end - m.start;
            let (from, to) = if step == 0 {
                (m.start, temp + (m.start - lo))
            } else {
                (temp + (m.start - lo), saved(&m.path).map_or(0, |s| s.start))
            };
            c.call(
                "moving the vdso and vvar",
                libc::SYS_mremap,
                &[from, len, len, flags, to],
            )?;
            if m.path == "[vdso]" {
                c.inj.set_insn(to + vdso_off);
            }
        }
    }
    Ok(())
}

fn map_memory(
    c: &mut Child,
    image: &mut OpenGeneration,
    p: &ProcessImage,
    st: &Staged,
) -> CoreResult<()> {
    for v in &p.vmas {
        if matches!(
            v.kind,
            VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock | VmaKind::Vsyscall
        ) {
            continue;
        }
        let len = v.end - v.start;
        let fill = !v.pages.is_empty();
        let prot = if fill {
            v.prot | libc::PROT_READ | libc::PROT_WRITE
        } else {
            v.prot
        };
        let mut flags = libc::MAP_FIXED
            | if v.shared {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE
            };
        if v.growsdown {
            flags |= libc::MAP_GROWSDOWN;
        }
        let fd: i64 = match &v.file {
            Some(id) => i64::from(st.maps[&id.path]),
            None => {
                flags |= libc::MAP_ANONYMOUS;
                -1
            }
        };
        let offset = if v.file.is_some() { v.offset } else { 0 };
        let what = format!("mapping {:#x}-{:#x}", v.start, v.end);
        let got = c.call(
            &what,
            libc::SYS_mmap,
            &[v.start, len, prot as u64, flags as u64, fd as u64, offset],
        )?;
        if got != v.start {
            return Err(CoreError::Incompatible(format!(
                "{what} landed at {got:#x}"
            )));
        }
        for run in &v.pages {
            let data = image.chunk(run.chunk)?;
            mem::write(c.pid, run.addr, &data).map_err(|source| CoreError::Sys {
                context: format!("filling memory at {:#x}", run.addr),
                source,
            })?;
        }
        if prot != v.prot {
            c.call(&what, libc::SYS_mprotect, &[v.start, len, v.prot as u64])?;
        }
    }
    Ok(())
}

fn set_mm(c: &mut Child, p: &ProcessImage, st: &Staged) -> CoreResult<()> {
    let auxv_bytes: Vec<u8> = p.auxv.iter().flat_map(|w| w.to_le_bytes()).collect();
    let auxv = c.put(1024, &auxv_bytes)?;
    let m = &p.mm;
    let mut map: Vec<u8> = [
        m.start_code,
        m.end_code,
        m.start_data,
        m.end_data,
        m.start_brk,
        m.brk,
        m.start_stack,
        m.arg_start,
        m.arg_end,
        m.env_start,
        m.env_end,
        auxv,
    ]
    .iter()
    .flat_map(|w| w.to_le_bytes())
    .collect();
    map.extend_from_slice(&u32::try_from(auxv_bytes.len()).unwrap_or(0).to_le_bytes());
    map.extend_from_slice(&u32::try_from(st.exe).unwrap_or(u32::MAX).to_le_bytes());
    let addr = c.put(0, &map)?;
    c.call(
        "restoring exe, cmdline, environ, auxv and brk (PR_SET_MM_MAP)",
        libc::SYS_prctl,
        &[PR_SET_MM, PR_SET_MM_MAP, addr, map.len() as u64, 0],
    )?;
    Ok(())
}

fn install_fds(c: &mut Child, p: &ProcessImage, st: &Staged) -> CoreResult<()> {
    for fd in &p.fds {
        let from = st.files[fd.file as usize];
        let flags = if fd.cloexec { libc::O_CLOEXEC } else { 0 };
        c.call(
            &format!("installing descriptor {}", fd.fd),
            libc::SYS_dup3,
            &[from as u64, fd.fd as u64, flags as u64],
        )?;
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

fn restore_process_state(c: &mut Child, p: &ProcessImage) -> CoreResult<()> {
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
        if t.value_us == 0 {
            continue;
        }
        let v = c.put_words(
            0,
            &[
                t.interval_us / 1_000_000,
                t.interval_us % 1_000_000,
                t.value_us / 1_000_000,
                t.value_us % 1_000_000,
            ],
        )?;
        c.call("interval timer", libc::SYS_setitimer, &[which as u64, v, 0])?;
    }
    Ok(())
}

const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;

fn restore_posix_timers(
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

fn create_threads(c: &mut Child, p: &ProcessImage, opts: &RestoreOptions) -> CoreResult<Vec<i32>> {
    let mut host_tids = vec![c.pid];
    for t in &p.threads[1..] {
        let flags = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM) as u64;
        let set_tid = c.put(512, &u64::try_from(t.tid).unwrap_or(0).to_le_bytes())?;
        let (st, sts) = if opts.set_pids { (set_tid, 1) } else { (0, 0) };
        let args = c.put_words(0, &[flags, 0, 0, 0, 0, 0, 0, 0, st, sts, 0])?;
        c.inj.new_threads.clear();
        c.call(
            &format!("creating thread {}", t.tid),
            libc::SYS_clone3,
            &[args, 88],
        )?;
        let new = c.inj.new_threads.pop().ok_or(CoreError::Vanished(t.tid))?;
        loop {
            match wait_pid(new, 0).map_err(sys("waiting for a new thread"))?.1 {
                WaitStatus::Stopped { .. } => break,
                WaitStatus::Exited(_) | WaitStatus::Signaled(_) => {
                    return Err(CoreError::Vanished(new));
                }
                _ => {}
            }
        }
        host_tids.push(new);
    }
    Ok(host_tids)
}

fn restore_thread_state(
    c: &Child,
    tid: i32,
    t: &stasis_image::manifest::ThreadImage,
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

fn queue_signals(c: &mut Child, p: &ProcessImage, thread_injs: &mut [Injector]) -> CoreResult<()> {
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

fn drop_caps(c: &mut Child, p: &ProcessImage) -> CoreResult<()> {
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

/// Checks that every file the process had open for reading, or mapped, is unchanged. Files
/// open only for writing (logs, output) need only exist: others may have appended to them.
pub fn check_files(p: &ProcessImage) -> CoreResult<()> {
    for f in &p.files {
        if let OpenFile::Path { file, flags, .. } = f {
            if flags & libc::O_ACCMODE == libc::O_WRONLY {
                std::fs::metadata(&file.path).map_err(|e| CoreError::FileChanged {
                    path: file.path.clone(),
                    detail: format!("cannot be opened ({e})"),
                })?;
            } else {
                check_file(file)?;
            }
        }
    }
    for v in &p.vmas {
        if let Some(id) = &v.file {
            check_file(id)?;
        }
    }
    Ok(())
}

/// Restores process `p` of generation `gen` as a new child of the caller and lets it run.
/// The caller must not be multi-threaded while tracing and must reap the child.
pub fn restore_process(
    image: &mut OpenGeneration,
    p: &ProcessImage,
    opts: &RestoreOptions,
) -> CoreResult<Restored> {
    if !opts.force {
        check_files(p)?;
    }
    let (vdso_base, vdso_len) = own_vdso()?;
    let vdso_off = find_syscall_insn(&mem::own_bytes(vdso_base, vdso_len)).ok_or_else(|| {
        CoreError::Incompatible("no syscall instruction in this kernel's vdso".into())
    })? as u64;
    let staged = stage(image, p)?;
    let parked =
        process::spawn_parked(opts.set_pids.then_some(p.pid)).map_err(|source| CoreError::Sys {
            context: format!(
                "creating process {} (is pid {} free in the job's namespace?)",
                p.pid, p.pid
            ),
            source,
        })?;
    let pid = parked.pid;
    seize_stopped(pid)?;

    let current_features = regs::xstate_features(
        &ptrace::get_xstate(pid).map_err(sys("reading this CPU's extended state"))?,
    )
    .unwrap_or(0);
    for t in &p.threads {
        let saved = regs::xstate_features(&t.xstate).unwrap_or(0);
        if saved & !current_features != 0 {
            let _ = process::kill(pid, libc::SIGKILL);
            return Err(CoreError::Incompatible(format!(
                "the image uses CPU state features {saved:#x} but this CPU offers only {current_features:#x}; restore on a CPU with the same features"
            )));
        }
    }

    let result = (|| -> CoreResult<()> {
        let mut c = Child {
            pid,
            inj: Injector::new(pid, vdso_base + vdso_off),
            scratch: 0,
        };
        let rseq = ptrace::get_rseq(pid).map_err(sys("reading the inherited rseq registration"))?;
        if rseq.abi_pointer != 0 {
            c.call(
                "unregistering the inherited rseq area",
                libc::SYS_rseq,
                &[
                    rseq.abi_pointer,
                    u64::from(rseq.len),
                    RSEQ_FLAG_UNREGISTER,
                    u64::from(rseq.signature),
                ],
            )?;
        }
        teardown_and_move_specials(&mut c, p, vdso_off)?;
        let final_specials: Vec<(u64, u64)> = Vec::new();
        let scratch = free_area(&p.vmas, &final_specials, SCRATCH_LEN)?;
        let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED) as u64;
        c.call(
            "mapping scratch memory",
            libc::SYS_mmap,
            &[
                scratch,
                SCRATCH_LEN,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                anon,
                u64::MAX,
                0,
            ],
        )?;
        c.scratch = scratch;
        map_memory(&mut c, image, p, &staged)?;
        set_mm(&mut c, p, &staged)?;
        install_fds(&mut c, p, &staged)?;
        restore_process_state(&mut c, p)?;
        let host_tids = create_threads(&mut c, p, opts)?;
        let insn = c.inj_insn();
        let mut injs = Vec::new();
        for (host, t) in host_tids.iter().zip(&p.threads) {
            injs.push(restore_thread_state(&c, *host, t, insn)?);
        }
        let ns_tids: HashMap<i32, i32> = p.threads.iter().map(|t| (t.tid, t.tid)).collect();
        restore_posix_timers(&mut c, p, &ns_tids)?;
        queue_signals(&mut c, p, &mut injs)?;
        drop_caps(&mut c, p)?;
        c.call(
            "unmapping scratch memory",
            libc::SYS_munmap,
            &[scratch, SCRATCH_LEN],
        )?;
        for (host, t) in host_tids.iter().zip(&p.threads) {
            ptrace::set_xstate(*host, &t.xstate)
                .ctx(|| format!("restoring extended state of thread {}", t.tid))?;
            let saved = ptrace::regs_from_words(&t.regs)
                .ok_or_else(|| CoreError::Incompatible("bad register record".into()))?;
            ptrace::set_regs(*host, &regs::for_restore(&saved))
                .ctx(|| format!("restoring registers of thread {}", t.tid))?;
        }
        for host in host_tids.iter().rev() {
            ptrace::detach(*host, 0).ctx(|| format!("releasing thread {host}"))?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = process::kill(pid, libc::SIGKILL);
        let _ = wait_pid(pid, 0);
        return Err(e);
    }
    drop(parked.release);
    drop(staged);
    Ok(Restored { pid })
}

impl Child {
    fn inj_insn(&self) -> u64 {
        self.inj.insn()
    }
}

/// Reads the job's monotonic and boot-time clocks are the caller's; used for time offsets.
pub fn clocks_now() -> (u64, u64) {
    (
        process::clock_ns(libc::CLOCK_MONOTONIC),
        process::clock_ns(libc::CLOCK_BOOTTIME),
    )
}
