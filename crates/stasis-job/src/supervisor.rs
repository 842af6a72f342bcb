//! The supervisor: one process per job that owns its namespaces, is the parent of its
//! program, takes checkpoints on request and restarts jobs from images.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use stasis_core::capture::{
    CaptureOptions, EarlyMaps, KnownFlags, Precopy, Speedups, WriteTracking, capture_job,
    precopy_job,
};
use stasis_core::freeze::{freeze_job, freeze_job_serving};
use stasis_core::lazy::PendingMemory;
use stasis_core::restore::{
    FileReport, RestoreOptions, check_lazy_allowed, check_machine, clocks_now, prepare_files,
    restore_job,
};
use stasis_image::fault;
use stasis_image::generation::{Carried, list_generations, prune_generations, resolve};
use stasis_image::manifest::Namespaces;
use stasis_image::pack::Compression;
use stasis_image::{GenerationWriter, OpenGeneration};
use stasis_sys::process::{self, ExecSpec};
use stasis_sys::wait::{WaitStatus, wait_pid};

use crate::callbacks::Callbacks;
use crate::control::{
    CheckpointReport, JobStatus, MemoryRestore, Request, Response, read_message, request,
    write_message,
};
use crate::error::{JobError, JobResult, io_err};
use crate::namespaces::{self, NamespaceSetup};
use crate::paths;
use crate::policy::{CheckpointPolicy, signal_name};
use crate::record;
use crate::terminal::Terminal;

/// Exit status of `run`/`restart` when the job was stopped by `checkpoint --kill`
/// (`EX_TEMPFAIL`: the work is not done, restart it).
pub const EXIT_CHECKPOINTED: i32 = 75;
const SI_KERNEL: i32 = 0x80;

/// Where and how a job keeps its images.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// Job name.
    pub name: String,
    /// Root of the image directories; the job's are in `root/name`.
    pub images_root: PathBuf,
    /// Compression of page data.
    pub compression: Compression,
    /// Checkpoints the supervisor takes by itself (interval, signal) and retention.
    pub policy: CheckpointPolicy,
}

/// How the job's program comes to be.
#[derive(Debug, Clone)]
pub enum Start {
    /// Start a program.
    Run {
        /// Program and arguments.
        command: Vec<String>,
    },
    /// Restart from a generation.
    Restart {
        /// Generation number, newest when `None`.
        generation: Option<u32>,
        /// Restore even if files changed.
        force: bool,
        /// Load all memory before the job runs (else private memory loads lazily where
        /// this process may: see [`check_lazy_allowed`]).
        eager: bool,
    },
}

/// Memory of a restarted job still loading, with the generation it comes from.
#[derive(Debug)]
struct LazyLoad {
    memory: PendingMemory,
    image: OpenGeneration,
    since: Instant,
    /// Load in the background (else only what the job touches, until a checkpoint: the
    /// `no-prefetch` test point).
    background: bool,
    /// Once loaded: handing the memory over to write tracking, one slice at a time.
    handing: Option<HandOver>,
}

/// A hand-over of loaded memory to write tracking under way.
#[derive(Debug)]
struct HandOver {
    /// When the next slice is due.
    next: Instant,
    /// Bytes per slice.
    slice: u64,
    /// How long the job runs between two slices.
    gap: Duration,
    /// Write tracking has been given the processes (at the first slice).
    begun: bool,
}

/// Bytes loaded between two looks at the control socket and signals.
const PREFETCH_SLICE: u64 = 8 << 20;
/// Bytes of loaded memory handed over to write tracking per freeze of the job, in whole
/// mappings (at least one, however large): about 2 ms of page-table walking here.
const HAND_OVER_SLICE: u64 = 64 << 20;
/// How long the job runs between two slices of the hand-over.
const HAND_OVER_GAP: Duration = Duration::from_millis(5);

/// A running supervisor.
#[derive(Debug)]
pub struct Supervisor {
    spec: JobSpec,
    job_dir: PathBuf,
    socket: PathBuf,
    listener: UnixListener,
    signals: OwnedFd,
    ns: NamespaceSetup,
    init: Option<process::Init>,
    pid: i32,
    job_pid: i32,
    command: Vec<String>,
    time_offsets: (i64, i64),
    restarted_from: Option<u32>,
    checkpoints: u32,
    killed_by_checkpoint: bool,
    exit: Option<i32>,
    unpublished: bool,
    /// The job's pseudo-terminal, relayed to our stdio.
    terminal: Option<Terminal>,
    /// The job's processes that use libstasis.
    callbacks: Callbacks,
    /// Which pages the job wrote since the last checkpoint (none with
    /// `--no-write-tracking`).
    tracking: Option<WriteTracking>,
    /// Memory of the restarted job still loading.
    lazy: Option<LazyLoad>,
    /// How the restarted job's memory was restored (for `status`).
    memory: Option<MemoryRestore>,
    /// Why the job was killed while its memory loaded: the supervisor fails with it.
    lazy_failure: Option<String>,
    /// What the last checkpoint's writer left for the next one (its generation's index and
    /// blobs), so that it need not read them back; being put in shape on the helper thread.
    carried: Option<stasis_core::helper::Beside<Carried>>,
    /// The buffers the next cut copies into, being backed on the helper thread after the
    /// last checkpoint: waited for before the next freeze (the helper reads smaps while
    /// the job stands frozen).
    copy_buffers: Option<stasis_core::helper::Beside<()>>,
    /// The mapping flags the last checkpoint read, carried to the next one.
    known_flags: KnownFlags,
}

fn resolve_program(program: &str) -> JobResult<PathBuf> {
    let spawn_err = |reason: &str| JobError::Spawn {
        program: program.to_owned(),
        reason: reason.to_owned(),
    };
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| spawn_err("not found in PATH"))
}

fn cstring(s: &OsStr) -> JobResult<CString> {
    CString::new(s.as_bytes()).map_err(|_| JobError::Spawn {
        program: s.to_string_lossy().into_owned(),
        reason: "contains a NUL byte".into(),
    })
}

/// Refuses a name some supervisor still serves. Only a socket nobody listens on is stale
/// (and removed); a supervisor too busy to answer (in a long checkpoint) still owns it.
fn ensure_not_running(name: &str, socket: &Path) -> JobResult<()> {
    match request(name, socket, &Request::Status) {
        Err(JobError::NotRunning { .. }) => {
            let _ = std::fs::remove_file(socket);
            Ok(())
        }
        _ => Err(JobError::AlreadyRunning(name.to_owned())),
    }
}

fn bind(socket: &Path) -> JobResult<UnixListener> {
    let listener = UnixListener::bind(socket).map_err(io_err(socket.display().to_string()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(socket.display().to_string()))?;
    listener
        .set_nonblocking(true)
        .map_err(io_err(socket.display().to_string()))?;
    Ok(listener)
}

/// Removes a control socket when dropped, unless disarmed (its path taken).
struct Unbind(Option<PathBuf>);

impl Drop for Unbind {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Supervisor {
    /// Sets up the job: namespaces, init, then the program (started or restored), and the
    /// control socket. Must be called while the process is single-threaded.
    pub fn launch(mut spec: JobSpec, start: Start) -> JobResult<Self> {
        paths::check_name(&spec.name)?;
        let job_dir = if matches!(start, Start::Run { .. }) {
            let dir = paths::job_dir(&spec.images_root, &spec.name);
            paths::private_dir(&spec.images_root)?;
            paths::private_dir(&dir)?;
            dir
        } else {
            paths::existing_job_dir(&spec.images_root, &spec.name)?
        };
        let socket = paths::socket_path(&spec.name)?;
        ensure_not_running(&spec.name, &socket)?;
        // Listening before the program starts: libstasis in it may connect at once.
        let listener = bind(&socket)?;
        // Should the launch fail from here on, nobody will serve the socket: remove it.
        let mut unbind = Unbind(Some(socket.clone()));
        process::ignore_signal(libc::SIGXFSZ);
        process::keep_freed_memory();
        let mut blocked = vec![
            libc::SIGCHLD,
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGWINCH,
        ];
        blocked.extend(spec.policy.signal);
        let signals =
            process::block_signals_to_fd(&blocked).map_err(|e| JobError::Remote(e.to_string()))?;

        let mut tracking = (!spec.policy.no_write_tracking).then(WriteTracking::new);
        let mut lazy = None;
        let mut memory = None;
        let (pid, ns, init, command, offsets, restarted_from, terminal) = match start {
            Start::Run { command } => {
                let program = command.first().ok_or_else(|| JobError::Spawn {
                    program: String::new(),
                    reason: "no program given".into(),
                })?;
                let path = resolve_program(program)?;
                let exec = ExecSpec {
                    path: cstring(path.as_os_str())?,
                    argv: command
                        .iter()
                        .map(|a| cstring(OsStr::new(a)))
                        .collect::<JobResult<_>>()?,
                    // libstasis finds the supervisor through STASIS_CONTROL.
                    envp: std::env::vars_os()
                        .filter(|(k, _)| k != "STASIS_CONTROL" && k != "STASIS_JOB")
                        .chain([
                            ("STASIS_CONTROL".into(), socket.clone().into_os_string()),
                            ("STASIS_JOB".into(), spec.name.clone().into()),
                        ])
                        .map(|(k, v)| {
                            let mut kv = k.as_bytes().to_vec();
                            kv.push(b'=');
                            kv.extend_from_slice(v.as_bytes());
                            CString::new(kv).unwrap_or_default()
                        })
                        .collect(),
                    mount_ns: None,
                    terminal: None,
                };
                let mut ns = namespaces::enter((0, 0));
                let init = start_init(&mut ns)?;
                let mut exec = exec;
                exec.mount_ns = job_mount_ns(init.as_ref())?;
                let terminal = match Terminal::for_new_job()? {
                    Some((t, slave)) => {
                        exec.terminal = Some(slave);
                        Some(t)
                    }
                    None => None,
                };
                let pid = process::spawn(&exec).map_err(|e| JobError::Spawn {
                    program: program.clone(),
                    reason: e.errno.desc().to_owned(),
                })?;
                (pid, ns, init, command, (0, 0), None, terminal)
            }
            Start::Restart {
                generation,
                force,
                eager,
            } => {
                let dir = resolve(&job_dir, generation)?;
                let mut image = OpenGeneration::open(&dir)?;
                let job = image.manifest.job.clone();
                if job.uid != process::uid() {
                    return Err(JobError::Refused(format!(
                        "{}: the image belongs to uid {}, not to you (uid {}); a process cannot be restored as another user",
                        dir.display(),
                        job.uid,
                        process::uid()
                    )));
                }
                check_machine(&job.vdso_blake3)?;
                // Files are checked (and those the image keeps recreated) before anything else
                // is set up: a refused restart changes nothing.
                let files = prepare_files(&mut image, force)?;
                report_files(&spec.name, job.generation, &files);
                // A job whose files were kept goes on keeping them.
                spec.policy.save_files |= job.save_files;
                let (mono, boot) = clocks_now();
                let offsets = (
                    job.monotonic_ns as i64 - mono as i64,
                    job.boottime_ns as i64 - boot as i64,
                );
                // Asked before the namespaces: lazy loading needs CAP_SYS_PTRACE here.
                let eager_because = if eager {
                    None
                } else {
                    check_lazy_allowed().err().map(|e| {
                        format!(
                            "lazy restart needs CAP_SYS_PTRACE (the kernel follows forks of lazily loaded processes, and system calls touching pages not loaded yet, only for it): {}",
                            e.errno.desc()
                        )
                    })
                };
                let mut ns = namespaces::enter(offsets);
                let init = start_init(&mut ns)?;
                // The job must end with its supervisor: once our userfaultfds are gone its
                // missing pages would read as zeros.
                let eager_because = eager_because.or_else(|| {
                    let tied = ns.pid && init.is_some();
                    (!eager && !tied).then(|| {
                        "lazy restart needs a pid namespace for the job (which ends with its supervisor)".to_owned()
                    })
                });
                let lazily = !eager && eager_because.is_none();
                let mount_ns = job_mount_ns(init.as_ref())?;
                let opts = RestoreOptions {
                    force,
                    files_prepared: true,
                    set_pids: ns.pid,
                    mount_ns: mount_ns.as_ref().map(|(fd, _)| fd.as_raw_fd()),
                    track_writes: !spec.policy.no_write_tracking,
                    lazy: lazily,
                };
                let mut restored = restore_job(&mut image, &opts)?;
                let progress = restored.lazy.progress();
                memory = Some(MemoryRestore {
                    lazy: lazily,
                    eager_because,
                    total_bytes: progress.total,
                    loaded_after_ms: restored.lazy.is_empty().then_some(0.0),
                    ..MemoryRestore::default()
                });
                if !restored.lazy.is_empty() {
                    lazy = Some(LazyLoad {
                        memory: std::mem::take(&mut restored.lazy),
                        image,
                        since: Instant::now(),
                        background: !fault::reached("no-prefetch"),
                        handing: None,
                    });
                }
                if let Some(t) = tracking.as_mut() {
                    *t = std::mem::take(&mut restored.tracking);
                }
                let terminal = restored.terminal.take().map(Terminal::adopt);
                let offsets = if ns.time { offsets } else { (0, 0) };
                (
                    restored.root,
                    ns,
                    init,
                    job.command,
                    offsets,
                    Some(job.generation),
                    terminal,
                )
            }
        };
        let job_pid = stasis_core::proc::ns_pid(&format!("/proc/{pid}")).unwrap_or(pid);
        unbind.0 = None;
        Ok(Supervisor {
            job_dir,
            socket,
            listener,
            signals,
            ns,
            init,
            pid,
            job_pid,
            command,
            time_offsets: offsets,
            restarted_from,
            checkpoints: 0,
            killed_by_checkpoint: false,
            exit: None,
            unpublished: false,
            terminal,
            callbacks: Callbacks::new(spec.policy.callback_timeout),
            tracking,
            lazy,
            memory,
            lazy_failure: None,
            carried: None,
            copy_buffers: None,
            known_flags: KnownFlags::default(),
            spec,
        })
    }

    /// The job's current state.
    pub fn status(&self) -> JobStatus {
        JobStatus {
            name: self.spec.name.clone(),
            state: if self.exit.is_some() {
                "exited".into()
            } else {
                "running".into()
            },
            supervisor_pid: std::process::id(),
            pid: self.pid,
            job_pid: self.job_pid,
            command: self.command.clone(),
            images: self.job_dir.display().to_string(),
            namespaces: self.ns.clone(),
            restarted_from: self.restarted_from,
            checkpoints: self.checkpoints,
            latest_generation: list_generations(&self.job_dir).last().copied(),
            memory: self.memory.clone().map(|mut m| {
                if let Some(l) = &self.lazy {
                    let p = l.memory.progress();
                    (m.loaded_bytes, m.total_bytes, m.faults) = (p.loaded, p.total, p.faults);
                    m.handing_over = l.handing.is_some();
                }
                m
            }),
        }
    }

    /// Serves control requests and signals until the program exits; returns its exit status
    /// (128 + signal if killed, [`EXIT_CHECKPOINTED`] after `checkpoint --kill`).
    pub fn serve(mut self) -> JobResult<i32> {
        self.reap();
        let mut next_due = self.spec.policy.interval.map(|i| Instant::now() + i);
        while self.exit.is_none() {
            let mut fds = vec![
                PollFd::new(self.listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
            ];
            if let Some(t) = &self.terminal {
                fds.extend(t.poll_fds());
            }
            // While memory loads in the background, never wait: loading goes on between the
            // other work.
            let timeout = match &self.lazy {
                Some(LazyLoad {
                    handing: Some(h), ..
                }) => poll_timeout(Some(next_due.map_or(h.next, |d| d.min(h.next)))),
                Some(l) if l.background => PollTimeout::ZERO,
                _ => poll_timeout(next_due),
            };
            if let Some(l) = &self.lazy {
                fds.extend(
                    l.memory
                        .fds()
                        .into_iter()
                        .map(|fd| PollFd::new(fd, PollFlags::POLLIN)),
                );
            }
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(JobError::Remote(format!("poll: {e}"))),
            }
            drop(fds);
            if let Some(t) = self.terminal.as_mut() {
                t.relay();
            }
            self.handle_signals();
            if self.exit.is_some() {
                break;
            }
            // Once the job has ended nobody is served any more: a restart may begin at once.
            while self.exit.is_none()
                && let Ok((stream, _)) = self.listener.accept()
            {
                self.handle_client(&stream);
            }
            self.reap();
            self.interval_checkpoint(&mut next_due);
            if self.exit.is_none() && self.load_memory(PREFETCH_SLICE).is_err() {
                break;
            }
        }
        self.shutdown();
        if let Some(message) = self.lazy_failure.take() {
            return Err(JobError::Refused(message));
        }
        let code = self.exit.unwrap_or(0);
        Ok(if self.killed_by_checkpoint {
            EXIT_CHECKPOINTED
        } else {
            code
        })
    }

    /// Loads about `budget` bytes of the restarted job's memory (all of it with
    /// `u64::MAX`), serving its faults. Memory that cannot be loaded (a damaged image) ends
    /// the job: it cannot go on without it.
    fn load_memory(&mut self, budget: u64) -> JobResult<()> {
        let Some(l) = self.lazy.as_mut() else {
            return Ok(());
        };
        if l.handing.is_some() {
            self.hand_over(budget == u64::MAX);
            return Ok(());
        }
        let result = if budget == u64::MAX {
            l.memory.finish(&mut l.image).map(|()| true)
        } else if l.background {
            l.memory.prefetch(&mut l.image, budget)
        } else {
            l.memory.serve(&mut l.image).map(|()| false)
        };
        match result {
            Ok(false) => Ok(()),
            Ok(true) => {
                let ms = l.since.elapsed().as_secs_f64() * 1e3;
                let p = l.memory.progress();
                tracing::debug!(
                    "memory loaded: {} bytes in {ms:.1} ms, {} faults served",
                    p.loaded,
                    p.faults
                );
                if let Some(m) = self.memory.as_mut() {
                    (m.loaded_bytes, m.total_bytes, m.faults) = (p.loaded, p.total, p.faults);
                    m.loaded_after_ms = Some(ms);
                }
                if self.tracking.is_some() {
                    let slice = if fault::armed_as("small-hand-over") {
                        (1, Duration::from_millis(300))
                    } else {
                        (HAND_OVER_SLICE, HAND_OVER_GAP)
                    };
                    l.handing = Some(HandOver {
                        next: Instant::now(),
                        slice: slice.0,
                        gap: slice.1,
                        begun: false,
                    });
                    self.hand_over(budget == u64::MAX);
                } else {
                    self.lazy = None;
                }
                Ok(())
            }
            Err(e) => {
                // Every process of the job ends before the userfaultfds close: after that
                // its missing pages would read as zeros.
                let supervisor = i32::try_from(std::process::id()).unwrap_or(0);
                for pid in stasis_core::proc::descendants(supervisor) {
                    let _ = process::kill(pid, libc::SIGKILL);
                }
                if let Some(init) = &self.init {
                    let _ = process::kill(init.pid, libc::SIGKILL);
                }
                self.lazy = None;
                let message = format!(
                    "job {:?} was killed: its memory could not be loaded from generation {} ({e}); restart it from another generation, or with --eager to check the whole image first",
                    self.spec.name,
                    self.restarted_from.unwrap_or(0)
                );
                log(&format!("stasis: {message}"));
                self.lazy_failure = Some(message.clone());
                Err(JobError::Refused(message))
            }
        }
    }

    /// All memory is loaded: hands it over to write tracking, a slice at a time (or all
    /// that is left, with `all`: a checkpoint is about to freeze the job anyway), so that
    /// the next checkpoint reads only what the job wrote since the restart. Between slices
    /// the job runs for a while, and the faults on pages never saved are served. Done (or
    /// failed: then nothing is trusted), the userfaultfds are closed.
    fn hand_over(&mut self, all: bool) {
        let (Some(l), Some(tracking)) = (self.lazy.as_mut(), self.tracking.as_mut()) else {
            self.lazy = None;
            return;
        };
        let Some(h) = l.handing.as_mut() else {
            return;
        };
        if !all && Instant::now() < h.next {
            let _ = l.memory.serve(&mut l.image);
            return;
        }
        let budget = if all { u64::MAX } else { h.slice };
        let supervisor = i32::try_from(std::process::id()).unwrap_or(0);
        let init = self.init.as_ref().map(|i| i.pid);
        let t0 = Instant::now();
        // Pages never saved are still served (zeros) until the job is frozen: a thread
        // waiting for one in a system call stops only once it has it.
        let (memory, image) = (&mut l.memory, &mut l.image);
        let mut serve = || {
            let _ = memory.serve(image);
        };
        let frozen = match freeze_job_serving(supervisor, init, self.pid, &mut serve) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!("memory not handed over to write tracking: {e}");
                self.note_exit(&e);
                self.lazy = None;
                return;
            }
        };
        let going = h.begun || l.memory.begin_hand_over(tracking, &frozen);
        h.begun = true;
        let outcome = if going {
            l.memory.hand_over_slice(tracking, budget)
        } else {
            Some(0)
        };
        if let Err(e) = frozen.thaw(&HashMap::new()) {
            log(&format!(
                "stasis: job {:?}: resuming after handing a slice of its memory over to write tracking: {e}",
                self.spec.name
            ));
        }
        let frozen_ms = t0.elapsed().as_secs_f64() * 1e3;
        h.next = Instant::now() + h.gap;
        if let Some(m) = self.memory.as_mut() {
            m.hand_over_slices += 1;
            m.hand_over_frozen_ms = m.hand_over_frozen_ms.max(frozen_ms);
            if outcome.is_some_and(|handed| handed > 0) {
                m.handed_over_after_ms = Some(l.since.elapsed().as_secs_f64() * 1e3);
            }
        }
        if let Some(handed) = outcome {
            tracing::debug!(processes = handed, "memory handed over to write tracking");
            self.lazy = None;
        }
    }

    /// Records the job's exit when freezing it collected its exit status.
    fn note_exit(&mut self, e: &stasis_core::error::CoreError) {
        if let stasis_core::error::CoreError::Exited { pid, code } = e
            && *pid == self.pid
        {
            self.exit = Some(*code);
        }
    }

    fn handle_signals(&mut self) {
        while let Some((sig, _sender, code)) = process::read_signalfd(&self.signals) {
            if sig == libc::SIGCHLD {
                self.reap();
            } else if sig == libc::SIGWINCH {
                if let Some(t) = &self.terminal {
                    t.resize();
                }
            } else if Some(sig) == self.spec.policy.signal {
                self.signal_checkpoint(sig);
            } else if code != SI_KERNEL {
                let _ = process::kill(self.pid, sig);
            }
        }
    }

    fn reap(&mut self) {
        loop {
            match wait_pid(-1, libc::WNOHANG) {
                Ok((0, _)) | Err(_) => break,
                Ok((pid, WaitStatus::Exited(c))) if pid == self.pid => self.exit = Some(c),
                Ok((pid, WaitStatus::Signaled(s))) if pid == self.pid => self.exit = Some(128 + s),
                Ok(_) => {}
            }
        }
    }

    /// Withdraws the control socket, once: after that a new supervisor may take the name (so
    /// this one must never remove the path again).
    fn unpublish(&mut self) {
        if !self.unpublished {
            self.unpublished = true;
            let _ = std::fs::remove_file(&self.socket);
        }
    }

    fn shutdown(&mut self) {
        self.unpublish();
        if let Some(init) = self.init.take() {
            let _ = process::kill(init.pid, libc::SIGKILL);
            // The init ends only once every process of its namespace is reaped, and some
            // are our children (the job's program, when it ended with the job unfinished).
            while let Ok((pid, _)) = wait_pid(-1, 0) {
                if pid == init.pid {
                    break;
                }
            }
        }
        // Relays the job's last output and gives our terminal its modes back.
        self.terminal.take();
    }

    fn handle_client(&mut self, stream: &UnixStream) {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let peer = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials);
        // A process of the job may wait for a page of its request, or run a callback that
        // does: its memory is loaded before it is listened to.
        if self.lazy.is_some()
            && let Ok(c) = &peer
            && stasis_core::proc::descendants(i32::try_from(std::process::id()).unwrap_or(0))
                .contains(&c.pid())
            && self.load_memory(u64::MAX).is_err()
        {
            return;
        }
        if !peer.is_ok_and(|c| c.uid() == process::uid()) {
            let _ = write_message(
                stream,
                &Response::Error {
                    message: "permission denied: only the job's owner may control it".into(),
                },
            );
            return;
        }
        let response = match read_message::<Request>(stream) {
            Ok(Request::Status) => Response::Status(self.status()),
            Ok(Request::Checkpoint {
                kill,
                keep,
                save_files,
            }) => match self.take_checkpoint(kill, None, keep, save_files) {
                Ok(r) => Response::Checkpoint(r),
                Err(e) => Response::Error {
                    message: format!(
                        "checkpoint of job {:?} failed, the job runs on: {e}",
                        self.spec.name
                    ),
                },
            },
            Ok(Request::Attach { pid, restarted }) => {
                // Kept open: checkpoint events go to it (no answer now).
                if let Ok(kept) = stream.try_clone() {
                    self.callbacks
                        .attach(kept, pid, restarted, self.restarted_from);
                }
                return;
            }
            Ok(Request::Kill) => {
                let _ = process::kill(self.pid, libc::SIGKILL);
                Response::Ok
            }
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        };
        if self.exit.is_some() {
            // The job ended (checkpoint --kill, kill): withdraw the name before answering, so
            // that a restart issued right after the answer finds it free.
            self.unpublish();
        }
        let _ = write_message(stream, &response);
    }

    /// Takes a checkpoint of the whole job ([`Supervisor::checkpoint_now`]), first running the
    /// pre-checkpoint callbacks of the job's libstasis users (up to the callback timeout;
    /// those late are reported), and telling them afterwards when the job runs on. With
    /// `save_files` (or the policy's), the job's open files are kept in the image.
    pub fn checkpoint(
        &mut self,
        kill: bool,
        reason: &str,
        save_files: bool,
    ) -> JobResult<CheckpointReport> {
        if self.exit.is_some() {
            return Err(JobError::Remote("the job has already exited".into()));
        }
        // A checkpoint reads all memory, and callbacks run code in the job: all of it is
        // loaded first.
        self.load_memory(u64::MAX)?;
        let next = list_generations(&self.job_dir).last().map_or(1, |g| g + 1);
        let late = self.callbacks.pre_checkpoint(next);
        if !late.is_empty() && self.spec.policy.fail_on_late_callbacks {
            self.callbacks.resumed(0);
            return Err(JobError::Refused(format!(
                "pre-checkpoint callbacks of job pid(s) {late:?} did not finish within the callback timeout, so no checkpoint was taken (--callback-overrun fail); the job runs on"
            )));
        }
        if !late.is_empty() {
            log(&format!(
                "stasis: job {:?}: pre-checkpoint callbacks not done within the callback timeout in job pid(s) {late:?}; checkpointing without waiting",
                self.spec.name
            ));
        }
        let save_files = save_files || self.spec.policy.save_files;
        if let Some(t) = self.tracking.as_mut() {
            t.start_cut(!kill);
        }
        let result = self.checkpoint_now(kill, reason, save_files);
        match (self.tracking.as_mut(), result.is_ok()) {
            (Some(t), true) => t.committed(),
            (Some(t), false) => t.abandoned(),
            (None, _) => {}
        }
        match &result {
            Ok(r) if !r.killed => self.callbacks.resumed(r.generation),
            Err(_) if self.exit.is_none() => self.callbacks.resumed(0),
            _ => {}
        }
        result.map(|mut r| {
            r.callbacks_late = late;
            r
        })
    }

    /// Freezes, captures, then resumes (or ends) the job; the generation is renamed into
    /// place only once complete and synced. `reason` is recorded in the manifest
    /// (`checkpoint`, `interval`, `signal SIGUSR1`…).
    fn checkpoint_now(
        &mut self,
        kill: bool,
        reason: &str,
        save_files: bool,
    ) -> JobResult<CheckpointReport> {
        if self.exit.is_some() {
            return Err(JobError::Remote("the job has already exited".into()));
        }
        let t0 = Instant::now();
        let supervisor = i32::try_from(std::process::id()).unwrap_or(0);
        let init = self.init.as_ref().map(|i| i.pid);
        // Before the job is frozen: choosing the generation to share data with (reading its
        // index) and sweeping old packs take time the job need not stand still for.
        let mut writer = GenerationWriter::begin_after(
            &self.job_dir,
            self.spec.compression,
            self.carried.take().and_then(|c| c.wait()),
        )?;
        if let Some(backed) = self.copy_buffers.take() {
            backed.wait();
        }
        let begun_ms = t0.elapsed().as_secs_f64() * 1e3;
        // A checkpoint that would read all of a large process's memory reads most of it
        // first, while the job runs: the cut then reads only what changed meanwhile.
        let precopy = match self.tracking.as_mut() {
            Some(t) if !kill => precopy_job(supervisor, init, self.pid, t, writer.pack())
                .inspect_err(|e| self.note_exit(e))?,
            _ => Precopy::default(),
        };
        if precopy.processes > 0 {
            if fault::reached("slow-precopy") {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            tracing::debug!(
                processes = precopy.processes,
                staged_bytes = precopy.staged_bytes,
                frozen_ms = precopy.frozen_ms,
                read_ms = precopy.read_ms,
                "pre-copied"
            );
        }
        let early_maps = EarlyMaps::plan(
            &stasis_core::proc::descendants(supervisor)
                .into_iter()
                .filter(|&p| Some(p) != init)
                .collect::<Vec<_>>(),
            &std::mem::take(&mut self.known_flags),
        );
        let frozen_at = Instant::now();
        let frozen = freeze_job(supervisor, init, self.pid).inspect_err(|e| self.note_exit(e))?;
        fault::point("frozen");
        if fault::reached("kill-job-process")
            && let Some(victim) = frozen.processes.last()
        {
            let _ = process::kill(victim.pid, libc::SIGKILL);
        }
        let (mono, boot) = clocks_now();
        let terminal = self.terminal.as_ref().map(Terminal::master);
        let opts = CaptureOptions {
            ipc_namespace: self.ns.ipc,
            snapshot: !kill,
            save_files,
        };
        let speedups = Speedups {
            tracking: self.tracking.as_mut(),
            early_maps,
        };
        let captured = match capture_job(
            &frozen,
            supervisor,
            init,
            terminal,
            opts,
            writer.pack(),
            speedups,
        ) {
            Ok(x) => x,
            Err(e) => {
                drop(writer);
                let _ = frozen.thaw(&HashMap::new());
                return Err(e.into());
            }
        };
        fault::point("captured");
        let mut captured = captured;
        let mut frozen = Some(frozen);
        let mut frozen_ms = 0.0;
        let mut flag_check = None;
        if !kill {
            captured.put_back_pty_bytes();
            frozen.take().map(|f| f.thaw(&captured.insns)).transpose()?;
            frozen_ms = frozen_at.elapsed().as_secs_f64() * 1e3;
            fault::point("thawed");
            // Reading smaps again takes as long as it did before the freeze: on a thread
            // of its own, while the snapshots are read and the generation written.
            flag_check = Some(captured.take_flag_check().in_background());
            if fault::reached("slow-reprotect") {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            // The job runs again; its memory is read from copy-on-write snapshots.
            let thawed_at = Instant::now();
            captured.read_snapshots(writer.pack(), self.tracking.as_mut())?;
            fault::point("snapshots-read");
            tracing::debug!(
                begun_ms,
                early_maps_ms = (frozen_at - t0).as_secs_f64() * 1e3 - begun_ms,
                frozen_ms,
                snapshots_read_ms = thawed_at.elapsed().as_secs_f64() * 1e3,
                "checkpoint phases"
            );
        }
        let flag_check = flag_check.unwrap_or_else(|| captured.take_flag_check().in_background());
        captured.end_snapshots()?;
        let mut manifest = record::manifest(
            record::JobFacts {
                name: self.spec.name.clone(),
                reason: reason.to_owned(),
                command: self.command.clone(),
                namespaces: Namespaces {
                    user: self.ns.user,
                    pid: self.ns.pid,
                    ipc: self.ns.ipc,
                    time: self.ns.time,
                },
                monotonic_ns: u64::try_from(mono as i64 + self.time_offsets.0).unwrap_or(0),
                boottime_ns: u64::try_from(boot as i64 + self.time_offsets.1).unwrap_or(0),
                save_files,
            },
            &mut captured,
        );
        // Written and synced while the flags are checked (smaps read again, on the helper
        // thread); put in place only once they are.
        let prepared = writer.prepare(&mut manifest);
        let stored_bytes = writer.written_bytes();
        let waited_at = Instant::now();
        let flags_checked = flag_check.wait();
        tracing::debug!(
            waited_ms = waited_at.elapsed().as_secs_f64() * 1e3,
            "flags checked"
        );
        let checked = prepared
            .map_err(JobError::from)
            .and(flags_checked.map_err(JobError::from));
        match checked {
            Ok(mut readings) => {
                readings.extend(captured.take_readings());
                self.known_flags.replace(readings);
            }
            Err(e) => {
                captured.put_back_pty_bytes();
                if let Some(f) = frozen.take() {
                    f.thaw(&captured.insns)?;
                }
                return Err(e);
            }
        }
        let (generation, path, memory_bytes) = match writer.finish_carrying(manifest) {
            Ok((generation, path, to_carry)) => {
                let memory_bytes = to_carry.raw_bytes();
                // Put in shape for the next checkpoint on the helper thread, while we
                // answer (where there is none, now).
                self.carried = Some(stasis_core::helper::beside(move || to_carry.carry()));
                if !kill && self.tracking.is_some() {
                    // Then the buffers the next cut copies into, backed before it freezes
                    // the job.
                    let bounds = std::mem::take(&mut captured.copy_bounds);
                    self.copy_buffers = Some(stasis_core::helper::beside(move || {
                        stasis_core::capture::keep_copy_buffers(&bounds);
                    }));
                }
                (generation, path, memory_bytes)
            }
            Err(e) => {
                captured.put_back_pty_bytes();
                if let Some(f) = frozen.take() {
                    f.thaw(&captured.insns)?;
                }
                return Err(e.into());
            }
        };
        fault::point("finished");
        tracing::debug!(
            finished_ms = t0.elapsed().as_secs_f64() * 1e3,
            "checkpoint durable"
        );
        if let Some(f) = frozen.take() {
            // The bytes queued in the job's terminals are the image's now: put back, the
            // relay would deliver them before the end, and the restart again.
            captured.discard_pty_bytes();
            // Killing collects the root's exit too (we are its parent and its tracer).
            f.kill()?;
            self.killed_by_checkpoint = true;
            self.exit = Some(128 + libc::SIGKILL);
            frozen_ms = frozen_at.elapsed().as_secs_f64() * 1e3;
        }
        self.checkpoints += 1;
        Ok(CheckpointReport {
            generation,
            path: path.display().to_string(),
            frozen_ms,
            total_ms: t0.elapsed().as_secs_f64() * 1e3,
            memory_bytes,
            stored_bytes,
            unchanged_bytes: captured.unchanged_bytes,
            copied_bytes: captured.copied_bytes,
            precopied_bytes: captured.precopied_bytes,
            precopy_frozen_ms: precopy.frozen_ms,
            killed: kill,
            removed: Vec::new(),
            callbacks_late: Vec::new(),
        })
    }

    /// The job's image directory.
    pub fn job_dir(&self) -> &Path {
        &self.job_dir
    }
}

/// Checkpoint policy: retention after every checkpoint, periodic and signalled checkpoints.
impl Supervisor {
    /// Takes a checkpoint ([`Supervisor::checkpoint`]; `reason` defaults to `checkpoint` or
    /// `checkpoint --kill`), then keeps only the newest `keep` generations (else the
    /// policy's `keep`, if any). A failed removal is logged: the new generation stands.
    pub fn take_checkpoint(
        &mut self,
        kill: bool,
        reason: Option<&str>,
        keep: Option<u32>,
        save_files: bool,
    ) -> JobResult<CheckpointReport> {
        let default = if kill {
            "checkpoint --kill"
        } else {
            "checkpoint"
        };
        let mut report = self.checkpoint(kill, reason.unwrap_or(default), save_files)?;
        if let Some(keep) = keep.or(self.spec.policy.keep) {
            match prune_generations(&self.job_dir, keep) {
                Ok(removed) => report.removed = removed,
                Err(e) => log(&format!(
                    "stasis: job {:?}: generation {} was written, but removing older generations (--keep {keep}) failed: {e}",
                    self.spec.name, report.generation
                )),
            }
        }
        Ok(report)
    }

    /// The checkpoint signal arrived: checkpoint and end the job (the supervisor then exits
    /// with [`EXIT_CHECKPOINTED`]); if that fails the job runs on.
    fn signal_checkpoint(&mut self, sig: i32) {
        if self.exit.is_some() {
            return;
        }
        let reason = format!("signal {}", signal_name(sig));
        match self.take_checkpoint(true, Some(&reason), None, false) {
            Ok(r) => log(&format!(
                "stasis: job {:?}: {} received, generation {} written to {}, job stopped",
                self.spec.name,
                signal_name(sig),
                r.generation,
                r.path
            )),
            Err(e) => log(&format!(
                "stasis: job {:?}: checkpoint on {} failed, the job runs on: {e}",
                self.spec.name,
                signal_name(sig)
            )),
        }
    }

    /// Takes the periodic checkpoint if it is due (the job continues) and schedules the next
    /// one an interval after this one ends; a failure is logged and the job runs on.
    fn interval_checkpoint(&mut self, next_due: &mut Option<Instant>) {
        let (Some(due), Some(interval)) = (*next_due, self.spec.policy.interval) else {
            return;
        };
        if self.exit.is_some() || Instant::now() < due {
            return;
        }
        if let Err(e) = self.take_checkpoint(false, Some("interval"), None, false) {
            log(&format!(
                "stasis: job {:?}: periodic checkpoint failed, the job runs on: {e}",
                self.spec.name
            ));
        }
        *next_due = Some(Instant::now() + interval);
    }
}

/// Writes a line to the supervisor's stderr (the user's terminal, or `output.log` when
/// detached); a failed write is ignored: the job must not suffer for its log.
fn log(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Tells the user what a restart did to the job's files (on the supervisor's stderr).
fn report_files(name: &str, generation: u32, r: &FileReport) {
    for path in &r.recreated {
        log(&format!(
            "stasis: job {name:?}: {path} was missing; recreated from the image"
        ));
    }
    for (path, aside) in &r.moved {
        log(&format!(
            "stasis: job {name:?}: {path} was written after generation {generation}; that version was moved to {aside}, and the file recreated as it was at the checkpoint"
        ));
    }
    for (path, what) in &r.kept {
        log(&format!(
            "stasis: job {name:?}: {path} differs from the copy in the image ({what}); used as it is (--force)"
        ));
    }
}

/// How long the event loop may sleep: at most a second, and not past the next periodic
/// checkpoint (rounded up, so that it is due when the loop wakes).
fn poll_timeout(next_due: Option<Instant>) -> PollTimeout {
    let ms = next_due.map_or(1000, |due| {
        let left = due.saturating_duration_since(Instant::now());
        left.as_micros().div_ceil(1000).min(1000)
    });
    PollTimeout::from(u16::try_from(ms).unwrap_or(1000))
}

fn start_init(ns: &mut NamespaceSetup) -> JobResult<Option<process::Init>> {
    if ns.pid {
        let init = process::spawn_init().map_err(|e| JobError::Spawn {
            program: "stasis-init".into(),
            reason: e.to_string(),
        })?;
        ns.proc = init.own_proc;
        if !init.own_proc {
            ns.notes.push("no private /proc (the kernel refused the mount): the job sees the host's /proc and its host pids there".into());
        }
        Ok(Some(init))
    } else {
        process::set_child_subreaper().map_err(|e| JobError::Remote(e.to_string()))?;
        Ok(None)
    }
}

/// The mount namespace with the job's own `/proc` (init's), to be entered by the job's
/// processes, and our working directory to return to in it.
fn job_mount_ns(init: Option<&process::Init>) -> JobResult<Option<(OwnedFd, CString)>> {
    let Some(init) = init.filter(|i| i.own_proc) else {
        return Ok(None);
    };
    let path = format!("/proc/{}/ns/mnt", init.pid);
    let fd = std::fs::File::open(&path).map_err(io_err(path))?;
    let cwd = std::env::current_dir().map_err(io_err("."))?;
    Ok(Some((OwnedFd::from(fd), cstring(cwd.as_os_str())?)))
}

/// Forks a detached supervisor. Returns `Some(reader)` in the parent, which receives one line
/// from the child (its status as JSON, or an error), and `None` in the child, whose standard
/// input is `/dev/null` and whose output goes to `log`.
pub fn detach(log: &Path) -> JobResult<Option<std::fs::File>> {
    let (r, w) = nix::unistd::pipe().map_err(|e| JobError::Remote(format!("pipe: {e}")))?;
    let in_child = process::daemon_fork().map_err(|e| JobError::Remote(e.to_string()))?;
    if !in_child {
        drop(w);
        return Ok(Some(std::fs::File::from(r)));
    }
    drop(r);
    let _ = process::setsid();
    let null = std::fs::File::open("/dev/null").map_err(io_err("/dev/null"))?;
    use std::os::unix::fs::OpenOptionsExt;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .map_err(io_err(log.display().to_string()))?;
    let _ = nix::unistd::dup2_stdin(&null);
    let _ = nix::unistd::dup2_stdout(&out);
    let _ = nix::unistd::dup2_stderr(&out);
    READY_FD.with(|c| *c.borrow_mut() = Some(w));
    Ok(None)
}

thread_local! {
    static READY_FD: std::cell::RefCell<Option<OwnedFd>> = const { std::cell::RefCell::new(None) };
}

/// In a detached supervisor: tells the waiting parent how the launch went.
pub fn report_ready(line: &str) {
    READY_FD.with(|c| {
        if let Some(fd) = c.borrow_mut().take() {
            let mut l = line.as_bytes().to_vec();
            l.push(b'\n');
            let _ = nix::unistd::write(&fd, &l);
        }
    });
}
