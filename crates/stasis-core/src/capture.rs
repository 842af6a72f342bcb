//! Capturing one frozen process into saved state and page chunks.

use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};

use stasis_image::manifest::{
    Fd, FileId, Itimer, MmFields, OpenFile, PageRun, PosixTimer, ProcessImage, Rlimit, Rseq,
    SigAction, ThreadImage, Vma, VmaKind,
};
use stasis_image::pack::PackWriter;
use stasis_sys::inject::{Injector, find_syscall_insn};
use stasis_sys::{Errno, fd as sysfd, mem, process, ptrace};

use crate::error::{CoreError, CoreResult, SysContext, io_err};
use crate::freeze::{Frozen, stack_scratch};
use crate::proc::{self, MapEntry};

const PAGE: u64 = 4096;
/// Pages per chunk of saved memory (1 MiB).
const RUN_PAGES: usize = 256;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;
const NUM_RLIMITS: u32 = 16;

/// Where the `syscall` instruction used for injection lives, and the vdso's bytes.
#[derive(Debug, Clone)]
pub struct VdsoInfo {
    /// Address of a `syscall` instruction inside the process's `[vdso]`.
    pub syscall_insn: u64,
    /// blake3 of the vdso contents.
    pub blake3: String,
}

/// Finds the process's vdso and a `syscall` instruction in it.
pub fn vdso_info(pid: i32, maps: &[MapEntry]) -> CoreResult<VdsoInfo> {
    let vdso = maps
        .iter()
        .find(|m| m.path == "[vdso]")
        .ok_or_else(|| CoreError::Unsupported {
            pid,
            what: "the address space".into(),
            why: "it has no [vdso] mapping".into(),
        })?;
    let len = usize::try_from(vdso.end - vdso.start).unwrap_or(0);
    let bytes =
        mem::read_vec(pid, vdso.start, len).ctx(|| format!("reading the vdso of process {pid}"))?;
    let off = find_syscall_insn(&bytes).ok_or_else(|| CoreError::Unsupported {
        pid,
        what: "the vdso".into(),
        why: "no syscall instruction found in it".into(),
    })?;
    Ok(VdsoInfo {
        syscall_insn: vdso.start + off as u64,
        blake3: blake3::hash(&bytes).to_hex().to_string(),
    })
}

/// Classifies a mapping by its `/proc` name; `Err` for mappings Stasis cannot save yet.
pub fn vma_kind(pid: i32, m: &MapEntry) -> CoreResult<VmaKind> {
    let unsupported = |why: &str| CoreError::Unsupported {
        pid,
        what: format!("mapping {:#x}-{:#x} {}", m.start, m.end, m.path),
        why: why.into(),
    };
    Ok(match m.path.as_str() {
        "" => VmaKind::Anon,
        "[heap]" => VmaKind::Heap,
        "[stack]" => VmaKind::Stack,
        "[vdso]" => VmaKind::Vdso,
        "[vvar]" => VmaKind::Vvar,
        "[vvar_vclock]" => VmaKind::VvarVclock,
        "[vsyscall]" => VmaKind::Vsyscall,
        p if p.starts_with("[anon:") => VmaKind::Anon,
        p if p.starts_with("[anon_shmem:") => VmaKind::Anon,
        p if p.ends_with(" (deleted)") => {
            return Err(unsupported(
                "the mapped file was deleted (memfd, SysV shm and unlinked files are not supported yet)",
            ));
        }
        p if p.starts_with('/') && m.inode != 0 => VmaKind::File,
        _ => {
            return Err(unsupported(
                "special mappings of this kind are not supported",
            ));
        }
    })
}

fn file_id(path: &str, meta: &std::fs::Metadata) -> FileId {
    FileId {
        path: path.to_owned(),
        size: meta.len(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        ino: meta.ino(),
        regular: meta.file_type().is_file(),
    }
}

/// Injects a call into `tid` using stack scratch memory for a `len`-byte out-argument and
/// returns the bytes written there.
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

fn capture_thread(pid: i32, t: &crate::freeze::FrozenThread, insn: u64) -> CoreResult<ThreadImage> {
    let tid = t.tid;
    let regs = ptrace::get_regs(tid).ctx(|| format!("reading registers of thread {tid}"))?;
    let xstate =
        ptrace::get_xstate(tid).ctx(|| format!("reading extended state of thread {tid}"))?;
    let sigmask =
        ptrace::get_sigmask(tid).ctx(|| format!("reading the signal mask of thread {tid}"))?;
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

fn capture_sigactions(inj: &mut Injector, scratch: u64) -> CoreResult<Vec<SigAction>> {
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

fn capture_timers(
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

/// Reads memory, falling back to `/proc/PID/mem` for ranges `process_vm_readv` refuses
/// (e.g. `PROT_NONE` pages that hold data).
fn read_memory(pid: i32, addr: u64, buf: &mut [u8]) -> CoreResult<()> {
    if mem::read(pid, addr, buf).is_ok_and(|n| n == buf.len()) {
        return Ok(());
    }
    let path = format!("/proc/{pid}/mem");
    let f = std::fs::File::open(&path).map_err(io_err(&path))?;
    f.read_exact_at(buf, addr)
        .map_err(io_err(format!("{path} at {addr:#x}")))
}

fn capture_pages(
    pid: i32,
    m: &MapEntry,
    kind: VmaKind,
    pack: &mut PackWriter,
) -> CoreResult<Vec<PageRun>> {
    if matches!(
        kind,
        VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock | VmaKind::Vsyscall
    ) || (kind == VmaKind::File && m.shared)
    {
        return Ok(Vec::new());
    }
    let pagemap = proc::pagemap(pid, m.start, m.end)?;
    let wanted = |e: u64| {
        if kind == VmaKind::File {
            (e & PM_PRESENT != 0 && e & PM_FILE == 0) || e & PM_SWAPPED != 0
        } else {
            e & (PM_PRESENT | PM_SWAPPED) != 0
        }
    };
    let mut runs = Vec::new();
    let mut buf = vec![0u8; RUN_PAGES * PAGE as usize];
    let mut i = 0;
    while i < pagemap.len() {
        if !wanted(pagemap[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < pagemap.len() && i - start < RUN_PAGES && wanted(pagemap[i]) {
            i += 1;
        }
        let addr = m.start + start as u64 * PAGE;
        let data = &mut buf[..(i - start) * PAGE as usize];
        read_memory(pid, addr, data)?;
        // Store the non-zero sub-runs only.
        let mut p = 0;
        let pages: Vec<&[u8]> = data.chunks(PAGE as usize).collect();
        while p < pages.len() {
            if pages[p].iter().all(|&b| b == 0) {
                p += 1;
                continue;
            }
            let s = p;
            while p < pages.len() && !pages[p].iter().all(|&b| b == 0) {
                p += 1;
            }
            let chunk = pack.add(&data[s * PAGE as usize..p * PAGE as usize])?;
            runs.push(PageRun {
                addr: addr + s as u64 * PAGE,
                chunk,
            });
        }
    }
    Ok(runs)
}

fn capture_vmas(pid: i32, maps: &[MapEntry], pack: &mut PackWriter) -> CoreResult<Vec<Vma>> {
    let mut out = Vec::with_capacity(maps.len());
    for m in maps {
        let kind = vma_kind(pid, m)?;
        let file = if kind == VmaKind::File {
            let meta = std::fs::metadata(&m.path).map_err(io_err(&m.path))?;
            if meta.ino() != m.inode {
                return Err(CoreError::Unsupported {
                    pid,
                    what: format!("mapping of {}", m.path),
                    why: "the file was replaced after it was mapped".into(),
                });
            }
            Some(file_id(&m.path, &meta))
        } else {
            None
        };
        let pages = capture_pages(pid, m, kind, pack)?;
        out.push(Vma {
            start: m.start,
            end: m.end,
            prot: m.prot,
            shared: m.shared,
            growsdown: m.has_flag("gd"),
            kind,
            file,
            offset: m.offset,
            pages,
        });
    }
    Ok(out)
}

fn is_terminal(path: &str, meta: &std::fs::Metadata) -> bool {
    let major = (meta.rdev() >> 8) & 0xfff;
    meta.file_type().is_char_device()
        && (path.starts_with("/dev/pts/")
            || path.starts_with("/dev/tty")
            || path == "/dev/console"
            || (136..=143).contains(&major))
}

fn capture_pipe_data(
    pid: i32,
    pidfd: &std::os::fd::OwnedFd,
    fd: i32,
    pack: &mut PackWriter,
) -> CoreResult<(u64, Vec<u32>)> {
    let ours = process::pidfd_getfd(pidfd, fd, pid)
        .ctx(|| format!("fetching pipe descriptor {fd} of process {pid}"))?;
    let capacity = sysfd::pipe_size(ours.as_fd())
        .ctx(|| format!("reading the size of pipe {fd} of process {pid}"))?;
    let queued =
        sysfd::queued_bytes(ours.as_fd()).ctx(|| format!("reading the queue of pipe {fd}"))?;
    let mut chunks = Vec::new();
    if queued > 0 {
        let (r, w) = nix::unistd::pipe().map_err(|e| CoreError::Sys {
            context: "creating a pipe".into(),
            source: stasis_sys::SysError::new("pipe", 0, e),
        })?;
        sysfd::set_pipe_size(w.as_fd(), capacity.max(queued))
            .ctx(|| "sizing a copy pipe".into())?;
        let n = sysfd::tee(ours.as_fd(), w.as_fd(), queued)
            .ctx(|| format!("copying the data queued in pipe {fd} of process {pid}"))?;
        drop(w);
        let mut data = Vec::with_capacity(n);
        std::io::Read::read_to_end(&mut std::fs::File::from(r), &mut data)
            .map_err(io_err("pipe copy"))?;
        for piece in data.chunks(1 << 20) {
            chunks.push(pack.add(piece)?);
        }
    }
    Ok((capacity as u64, chunks))
}

fn capture_fds(pid: i32, pack: &mut PackWriter) -> CoreResult<(Vec<OpenFile>, Vec<Fd>)> {
    let entries = proc::fds(pid)?;
    let pidfd = process::pidfd_open(pid).ctx(|| format!("opening a pidfd for process {pid}"))?;
    let mut files: Vec<OpenFile> = Vec::new();
    let mut owners: Vec<i32> = Vec::new();
    let mut fds = Vec::new();
    let mut kcmp_works = true;
    let mut pipes_with_data: Vec<u64> = Vec::new();
    for e in &entries {
        let cloexec = e.flags & libc::O_CLOEXEC != 0;
        let flags = e.flags & !libc::O_CLOEXEC;
        // Descriptors sharing one open file description (dup, inherited) share one entry.
        let mut shared_with = None;
        if kcmp_works {
            for (i, &owner) in owners.iter().enumerate() {
                match process::same_file_description(pid, owner, e.fd) {
                    Ok(true) => {
                        shared_with = Some(i);
                        break;
                    }
                    Ok(false) => {}
                    Err(_) => {
                        kcmp_works = false;
                        break;
                    }
                }
            }
        }
        if let Some(i) = shared_with {
            fds.push(Fd {
                fd: e.fd,
                file: u32::try_from(i).unwrap_or(0),
                cloexec,
            });
            continue;
        }
        let unsupported = |why: &str| CoreError::Unsupported {
            pid,
            what: format!("descriptor {} ({})", e.fd, e.target),
            why: why.into(),
        };
        let file = if let Some(inode) = e
            .target
            .strip_prefix("pipe:[")
            .and_then(|s| s.strip_suffix(']'))
        {
            let inode: u64 = inode.parse().unwrap_or(0);
            let write_end = flags & libc::O_ACCMODE == libc::O_WRONLY;
            let (capacity, data) = if !write_end && !pipes_with_data.contains(&inode) {
                pipes_with_data.push(inode);
                capture_pipe_data(pid, &pidfd, e.fd, pack)?
            } else {
                let ours = process::pidfd_getfd(&pidfd, e.fd, pid)
                    .ctx(|| format!("fetching pipe descriptor {} of process {pid}", e.fd))?;
                (
                    sysfd::pipe_size(ours.as_fd()).unwrap_or(65536) as u64,
                    Vec::new(),
                )
            };
            OpenFile::Pipe {
                inode,
                write_end,
                flags,
                capacity,
                data,
            }
        } else if e.target.starts_with("socket:") && e.fd <= 2 {
            OpenFile::Stdio {
                path: e.target.clone(),
                flags,
            }
        } else if e.target.starts_with("socket:") {
            return Err(unsupported("sockets are not supported yet"));
        } else if e.target.starts_with("anon_inode:") {
            return Err(unsupported(
                "this kind of descriptor (eventfd, epoll, timerfd, signalfd, io_uring, …) is not supported yet",
            ));
        } else if e.target.ends_with(" (deleted)") {
            return Err(unsupported(
                "the file was deleted while open; unlinked files are not supported yet",
            ));
        } else if e.target.starts_with('/') {
            let link = format!("/proc/{pid}/fd/{}", e.fd);
            let meta = std::fs::metadata(&link).map_err(io_err(&link))?;
            if meta.file_type().is_fifo() || meta.file_type().is_socket() {
                return Err(unsupported(
                    "named pipes and socket files are not supported yet",
                ));
            }
            if is_terminal(&e.target, &meta) {
                OpenFile::Stdio {
                    path: e.target.clone(),
                    flags,
                }
            } else {
                OpenFile::Path {
                    file: file_id(&e.target, &meta),
                    flags,
                    pos: e.pos,
                }
            }
        } else {
            return Err(unsupported("unknown descriptor kind"));
        };
        files.push(file);
        owners.push(e.fd);
        fds.push(Fd {
            fd: e.fd,
            file: u32::try_from(files.len() - 1).unwrap_or(0),
            cloexec,
        });
    }
    // A pipe with only one end in the process, at a standard descriptor, leads outside the
    // job (e.g. `stasis run … | tee log`): it is reconnected to the restarting command's stdio.
    for i in 0..files.len() {
        if let OpenFile::Pipe { inode, flags, .. } = files[i] {
            let both_ends = files
                .iter()
                .filter(|f| matches!(f, OpenFile::Pipe { inode: other, .. } if *other == inode))
                .count()
                > 1;
            let lowest = fds
                .iter()
                .filter(|d| d.file as usize == i)
                .map(|d| d.fd)
                .min()
                .unwrap_or(i32::MAX);
            if !both_ends && lowest <= 2 {
                files[i] = OpenFile::Stdio {
                    path: format!("pipe:[{inode}]"),
                    flags,
                };
            }
        }
    }
    Ok((files, fds))
}

fn hex_field(pid_path: &str, key: &str) -> CoreResult<u64> {
    Ok(u64::from_str_radix(&proc::status_field(pid_path, key)?, 16).unwrap_or(0))
}

/// Captures one frozen process: threads, memory (page data into `pack`), descriptors and
/// process-wide state. `ppid` is its parent's pid in the job's namespace.
pub fn capture_process(
    frozen: &Frozen,
    ppid: i32,
    pack: &mut PackWriter,
) -> CoreResult<(ProcessImage, VdsoInfo)> {
    let pid = frozen.pid;
    let pid_path = format!("/proc/{pid}");
    let maps = proc::maps(pid)?;
    let vdso = vdso_info(pid, &maps)?;
    let threads = frozen
        .threads
        .iter()
        .map(|t| capture_thread(pid, t, vdso.syscall_insn))
        .collect::<CoreResult<Vec<_>>>()?;

    let main = frozen.threads[0].tid;
    let scratch = stack_scratch(main)?;
    let mut inj = Injector::new(main, vdso.syscall_insn);
    let sigactions = capture_sigactions(&mut inj, scratch)?;
    let brk = inj
        .call("brk", libc::SYS_brk, &[0])
        .ctx(|| format!("reading the program break of process {pid}"))?;
    let (itimers, posix_timers) = capture_timers(pid, &mut inj, scratch)?;
    let shared_pending = ptrace::peek_siginfo(main, true)
        .ctx(|| format!("reading shared pending signals of process {pid}"))?
        .iter()
        .map(|s| s.to_vec())
        .collect();

    let mut rlimits = Vec::new();
    for resource in 0..NUM_RLIMITS {
        match process::prlimit(pid, resource, None) {
            Ok((cur, max)) => rlimits.push(Rlimit { resource, cur, max }),
            Err(e) if e.errno == Errno::EINVAL => {}
            Err(e) => {
                return Err(e)
                    .ctx(|| format!("reading resource limit {resource} of process {pid}"));
            }
        }
    }
    let st = proc::stat(pid)?;
    let personality = std::fs::read_to_string(format!("{pid_path}/personality"))
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
        .unwrap_or(0);
    let (files, fds) = capture_fds(pid, pack)?;
    let vmas = capture_vmas(pid, &maps, pack)?;
    let image = ProcessImage {
        pid: proc::ns_pid(&pid_path)?,
        ppid,
        exe: proc::link(pid, "exe")?,
        cmdline: proc::cmdline(pid),
        cwd: proc::link(pid, "cwd")?,
        umask: u32::from_str_radix(&proc::status_field(&pid_path, "Umask")?, 8).unwrap_or(0o022),
        mm: MmFields {
            start_code: st.start_code,
            end_code: st.end_code,
            start_data: st.start_data,
            end_data: st.end_data,
            start_brk: st.start_brk,
            brk,
            start_stack: st.start_stack,
            arg_start: st.arg_start,
            arg_end: st.arg_end,
            env_start: st.env_start,
            env_end: st.env_end,
        },
        auxv: proc::auxv(pid)?,
        rlimits,
        sigactions,
        shared_pending,
        itimers,
        posix_timers,
        caps: [
            hex_field(&pid_path, "CapInh")?,
            hex_field(&pid_path, "CapPrm")?,
            hex_field(&pid_path, "CapEff")?,
        ],
        personality,
        threads,
        vmas,
        files,
        fds,
    };
    Ok((image, vdso))
}
