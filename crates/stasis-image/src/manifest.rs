//! The manifest: saved state of every process of a job, as plain data.
//!
//! These structs are the on-disk state only; runtime objects live in `stasis-core`. Fields
//! added later carry `#[serde(default)]` so that older manifests of the same major format
//! version still read.

use serde::{Deserialize, Serialize};

/// Format version of the manifest and page pack written by this build.
pub const FORMAT_VERSION: u32 = 3;

/// Regular files up to this size (1 MiB) get a content hash ([`FileId::blake3`]) at
/// checkpoint time, checked at restart; larger ones are checked by size and mtime only.
pub const CONTENT_HASH_LIMIT: u64 = 1 << 20;

/// One generation of one job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Job-wide facts.
    pub job: JobInfo,
    /// Every process captured, parents before children.
    pub processes: Vec<ProcessImage>,
    /// Open file descriptions of the whole job, referenced by descriptors (several
    /// descriptors, in one or several processes, may share one).
    pub files: Vec<OpenFile>,
    /// Shared memory objects (shared anonymous memory, memfd, deleted files mapped shared),
    /// referenced by mappings; one copy in the image however many processes map them.
    #[serde(default)]
    pub shared_memory: Vec<SharedMemory>,
    /// SysV shared memory segments of the job's IPC namespace.
    #[serde(default)]
    pub sysv_shm: Vec<SysvShm>,
    /// SysV semaphore sets of the job's IPC namespace.
    #[serde(default)]
    pub sysv_sem: Vec<SysvSem>,
    /// SysV message queues of the job's IPC namespace.
    #[serde(default)]
    pub sysv_msg: Vec<SysvMsgQueue>,
    /// Pseudo-terminal pairs the job holds (either end), with their modes.
    #[serde(default)]
    pub ptys: Vec<Pty>,
    /// Regular files whose content the image keeps (`--save-files`), one entry per path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub saved_files: Vec<SavedFile>,
    /// Pack files (in the job's `packs/` directory) that hold this generation's data; the
    /// first is the one this generation wrote, the others older ones it shares data with.
    pub packs: Vec<String>,
    /// Where each chunk's bytes live, referenced by chunk index. Stored in binary after the
    /// JSON body (see [`crate::index`]), not in the JSON.
    #[serde(skip)]
    pub chunks: crate::index::ChunkIndex,
}

/// A regular file kept in the image (`--save-files`): recreated at restart where it is
/// missing, reopened where it is unchanged.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SavedFile {
    /// Its path.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`), given back to a recreated file.
    pub mode: u32,
    /// Modification time, nanoseconds since the epoch, given back to a recreated file.
    pub mtime_ns: i64,
    /// blake3 of the whole content, hex: a file at the path with this content and size is
    /// the saved one.
    pub blake3: String,
    /// The job had it open for writing (or mapped shared and writable): a different file at
    /// the path is the job's own later output, moved aside at restart rather than refused.
    pub written: bool,
    /// The content, as runs of chunks; bytes no run covers are zero (holes).
    pub data: Vec<FileRun>,
}

/// A run of a saved file's bytes, stored as one chunk of the pack.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileRun {
    /// Offset in the file of the first byte.
    pub offset: u64,
    /// Chunk index in [`Manifest::chunks`]; its raw length is the run's length.
    pub chunk: u32,
}

/// A SysV shared memory segment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SysvShm {
    /// Its key (0: `IPC_PRIVATE`).
    pub key: i32,
    /// Its id (restored as is).
    pub id: i32,
    /// Permission bits.
    pub mode: u32,
    /// Size in bytes.
    pub size: u64,
    /// Marked for removal (`IPC_RMID`) once detached everywhere.
    pub removed: bool,
    /// Saved pages: `addr` is the offset in the segment.
    pub pages: Vec<PageRun>,
}

/// A SysV semaphore set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SysvSem {
    /// Its key (0: `IPC_PRIVATE`).
    pub key: i32,
    /// Its id (restored as is).
    pub id: i32,
    /// Permission bits.
    pub mode: u32,
    /// The value of each semaphore.
    pub values: Vec<u16>,
}

/// A SysV message queue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SysvMsgQueue {
    /// Its key (0: `IPC_PRIVATE`).
    pub key: i32,
    /// Its id (restored as is).
    pub id: i32,
    /// Permission bits.
    pub mode: u32,
    /// Capacity in bytes (`msg_qbytes`).
    pub qbytes: u64,
    /// Queued messages, oldest first.
    pub messages: Vec<SysvMessage>,
}

/// One queued SysV message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SysvMessage {
    /// Its type (`mtype`).
    pub mtype: i64,
    /// Its bytes, as chunks of the pack (none when empty).
    pub data: Vec<u32>,
}

/// A pseudo-terminal pair of the job: both ends inside it, or the job's own terminal whose
/// master the supervisor holds and relays.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pty {
    /// Its index at checkpoint time (`/dev/pts/N`; identity within the image).
    pub index: u32,
    /// The job's terminal: its master was held by the supervisor, not by the job.
    pub job_terminal: bool,
    /// Terminal modes.
    pub modes: TermModes,
    /// Window size: rows, columns, x pixels, y pixels.
    pub winsize: [u16; 4],
    /// The session (pid in the job) whose controlling terminal it is.
    pub session: Option<i32>,
    /// Its foreground process group (pid in the job).
    pub foreground: Option<i32>,
    /// Output its programs wrote that the master's reader had not read, as chunks.
    #[serde(default)]
    pub output: Vec<u32>,
    /// Input its programs had not read (taken only in non-canonical mode), as chunks.
    #[serde(default)]
    pub input: Vec<u32>,
}

/// `termios` modes of a terminal.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TermModes {
    /// `c_iflag`.
    pub iflag: u32,
    /// `c_oflag`.
    pub oflag: u32,
    /// `c_cflag`.
    pub cflag: u32,
    /// `c_lflag`.
    pub lflag: u32,
    /// Line discipline.
    pub line: u8,
    /// Control characters (`c_cc`).
    pub cc: Vec<u8>,
}

/// A shared memory object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SharedMemory {
    /// Its inode at checkpoint time (identity within the image).
    pub inode: u64,
    /// What `/proc` called it (`/dev/zero (deleted)`, `/memfd:x (deleted)`, …).
    pub name: String,
    /// Size in bytes (the furthest extent mapped).
    pub size: u64,
    /// Saved pages: `addr` is the offset in the object.
    pub pages: Vec<PageRun>,
}

/// Job-wide facts of a generation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobInfo {
    /// Job name.
    pub name: String,
    /// Generation number.
    pub generation: u32,
    /// When the checkpoint was taken (Unix time, milliseconds).
    pub created_unix_ms: u64,
    /// How it was taken (`"checkpoint"`, `"checkpoint --kill"`, …).
    pub reason: String,
    /// The command line the job was started with.
    pub command: Vec<String>,
    /// Namespaces the job ran in.
    pub namespaces: Namespaces,
    /// `CLOCK_MONOTONIC` as the job saw it at the cut, in nanoseconds.
    pub monotonic_ns: u64,
    /// `CLOCK_BOOTTIME` as the job saw it at the cut, in nanoseconds.
    pub boottime_ns: u64,
    /// Kernel release of the machine that took it.
    pub kernel: String,
    /// Host name of the machine that took it.
    pub host: String,
    /// blake3 of the `[vdso]` the job ran with: a restore needs the same one.
    pub vdso_blake3: String,
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
    /// Taken with `--save-files` (a job restarted from it keeps saving its files).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub save_files: bool,
}

/// Which namespaces the job ran in.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Namespaces {
    /// A user namespace owned by the supervisor.
    pub user: bool,
    /// A pid namespace (original pids restorable).
    pub pid: bool,
    /// An IPC namespace (SysV ids restorable).
    #[serde(default)]
    pub ipc: bool,
    /// A time namespace (monotonic clock kept continuous).
    pub time: bool,
}

/// The saved state of one process.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProcessImage {
    /// Pid inside the job's pid namespace.
    pub pid: i32,
    /// Parent pid inside the job's pid namespace (0: the supervisor, 1: the job's init).
    pub ppid: i32,
    /// Process group inside the job's pid namespace (0: led from outside the job).
    #[serde(default)]
    pub pgid: i32,
    /// Session inside the job's pid namespace (0: led from outside the job).
    #[serde(default)]
    pub sid: i32,
    /// A zombie: its raw wait status. Zombies have no threads, memory or descriptors.
    #[serde(default)]
    pub zombie: Option<i32>,
    /// It shares its descriptor table with its parent (created with `CLONE_FILES`): it is
    /// created the same way again, and its descriptors are the parent's.
    #[serde(default)]
    pub shares_parent_files: bool,
    /// `/proc/PID/exe` target.
    pub exe: String,
    /// Command line, for display.
    pub cmdline: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// File-creation mask.
    pub umask: u32,
    /// Memory-layout fields for `PR_SET_MM_MAP`.
    pub mm: MmFields,
    /// Auxiliary vector as saved words.
    pub auxv: Vec<u64>,
    /// Resource limits.
    pub rlimits: Vec<Rlimit>,
    /// Dispositions of signals 1..=64 (all but SIGKILL and SIGSTOP).
    pub sigactions: Vec<SigAction>,
    /// Process-wide pending signals, each a raw 128-byte siginfo.
    #[serde(with = "crate::hex::list")]
    pub shared_pending: Vec<Vec<u8>>,
    /// `ITIMER_REAL`, `ITIMER_VIRTUAL`, `ITIMER_PROF`: interval and value, in microseconds.
    pub itimers: Vec<Itimer>,
    /// POSIX timers.
    #[serde(default)]
    pub posix_timers: Vec<PosixTimer>,
    /// Capability sets (inheritable, permitted, effective).
    pub caps: [u64; 3],
    /// `personality(2)` value.
    pub personality: u64,
    /// Threads, the main thread first.
    pub threads: Vec<ThreadImage>,
    /// Memory mappings in address order.
    pub vmas: Vec<Vma>,
    /// The descriptor table.
    pub fds: Vec<Fd>,
}

/// Memory-layout fields of `struct prctl_mm_map`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

/// One resource limit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rlimit {
    /// `RLIMIT_*` number.
    pub resource: u32,
    /// Soft limit.
    pub cur: u64,
    /// Hard limit.
    pub max: u64,
}

/// A kernel `struct sigaction` for one signal.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SigAction {
    /// Signal number.
    pub sig: i32,
    /// Handler address (0 = default, 1 = ignore).
    pub handler: u64,
    /// `SA_*` flags.
    pub flags: u64,
    /// `sa_restorer`.
    pub restorer: u64,
    /// Mask blocked during the handler.
    pub mask: u64,
}

/// An interval timer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Itimer {
    /// Interval, microseconds.
    pub interval_us: u64,
    /// Time to next expiry, microseconds (0: disarmed).
    pub value_us: u64,
}

/// A POSIX timer (`timer_create`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PosixTimer {
    /// Timer id.
    pub id: i32,
    /// Clock id.
    pub clock: i32,
    /// `SIGEV_*` notify kind.
    pub notify: i32,
    /// Signal number.
    pub signo: i32,
    /// `sigev_value`.
    pub value: u64,
    /// Target thread for `SIGEV_THREAD_ID`.
    pub notify_tid: i32,
    /// Interval, nanoseconds.
    pub interval_ns: u64,
    /// Time to next expiry, nanoseconds (0: disarmed).
    pub value_ns: u64,
}

/// The saved state of one thread.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ThreadImage {
    /// Thread id inside the job's pid namespace.
    pub tid: i32,
    /// General registers (`user_regs_struct` as 27 words), as captured.
    pub regs: Vec<u64>,
    /// XSAVE area (`NT_X86_XSTATE`).
    #[serde(with = "crate::hex")]
    pub xstate: Vec<u8>,
    /// Blocked signals.
    pub sigmask: u64,
    /// Per-thread pending signals, raw siginfo each.
    #[serde(with = "crate::hex::list")]
    pub pending: Vec<Vec<u8>>,
    /// rseq registration.
    pub rseq: Rseq,
    /// Robust futex list head and length.
    pub robust_list: (u64, u64),
    /// `clear_child_tid` address.
    pub clear_child_tid: u64,
    /// Alternate signal stack: `ss_sp`, `ss_flags`, `ss_size`.
    pub sigaltstack: (u64, i32, u64),
    /// Thread name.
    pub comm: String,
}

/// A thread's rseq registration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rseq {
    /// Address of `struct rseq` (0: none).
    pub ptr: u64,
    /// Registered length.
    pub len: u32,
    /// Signature.
    pub signature: u32,
}

/// What a mapping is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VmaKind {
    /// Anonymous memory.
    Anon,
    /// A mapping of a file.
    File,
    /// `[heap]`.
    Heap,
    /// `[stack]`.
    Stack,
    /// `[vdso]`.
    Vdso,
    /// `[vvar]`.
    Vvar,
    /// `[vvar_vclock]`.
    VvarVclock,
    /// `[vsyscall]` (fixed by the kernel, never restored).
    Vsyscall,
    /// A shared memory object (see [`Vma::shmem`]).
    Shmem,
    /// A SysV shared memory segment (see [`Vma::sysv`]).
    SysvShm,
}

/// One memory mapping.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Vma {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// `PROT_*` bits.
    pub prot: i32,
    /// `MAP_SHARED` (else private).
    pub shared: bool,
    /// Grows down (a stack).
    pub growsdown: bool,
    /// What it is.
    pub kind: VmaKind,
    /// The file mapped, for file mappings.
    pub file: Option<FileId>,
    /// File offset.
    pub offset: u64,
    /// Saved page runs (pages absent here are zero, or come from the file).
    pub pages: Vec<PageRun>,
    /// For [`VmaKind::Shmem`]: index into [`Manifest::shared_memory`]; `offset` is the
    /// offset in the object, and the pages are the object's.
    #[serde(default)]
    pub shmem: Option<u32>,
    /// For [`VmaKind::SysvShm`]: the segment's id; `offset` is the offset in it.
    #[serde(default)]
    pub sysv: Option<i32>,
    /// Advice the program gave the mapping with `madvise` that the kernel keeps on it
    /// (and shows in smaps' `VmFlags`): given again at restart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advice: Vec<Advice>,
    /// Mapped with `MAP_NORESERVE` (smaps `nr`): no swap space set aside for it, so that a
    /// reservation larger than the machine's memory maps at restart too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub noreserve: bool,
}

/// `madvise` advice a mapping keeps, restored with it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Advice {
    /// `MADV_DONTFORK` (`dc`): a forked child does not get the mapping.
    DontFork,
    /// `MADV_WIPEONFORK` (`wf`): a forked child gets the mapping zeroed.
    WipeOnFork,
    /// `MADV_DONTDUMP` (`dd`): left out of core dumps.
    DontDump,
    /// `MADV_HUGEPAGE` (`hg`): backed by transparent huge pages where possible.
    HugePage,
    /// `MADV_NOHUGEPAGE` (`nh`): never backed by transparent huge pages.
    NoHugePage,
}

impl Advice {
    /// Every advice with the `VmFlags` name smaps shows for it.
    pub const ALL: [(Advice, &'static str); 5] = [
        (Advice::DontFork, "dc"),
        (Advice::WipeOnFork, "wf"),
        (Advice::DontDump, "dd"),
        (Advice::HugePage, "hg"),
        (Advice::NoHugePage, "nh"),
    ];

    /// Whether a forked child gets something other than a copy of the mapping: such
    /// mappings are loaded at once at a lazy restart, never through a userfaultfd whose
    /// fork events would hand the child a copy.
    pub fn changes_fork(self) -> bool {
        matches!(self, Advice::DontFork | Advice::WipeOnFork)
    }
}

/// A contiguous run of saved pages, stored as one chunk of the pack.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PageRun {
    /// Address of the first byte.
    pub addr: u64,
    /// Chunk index in [`Manifest::chunks`]; its raw length is the run's length.
    pub chunk: u32,
}

/// Identity of a file at checkpoint time, checked again at restore.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileId {
    /// Path.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Inode number (informational: it changes when a file is copied elsewhere).
    pub ino: u64,
    /// Regular file (size/mtime are checked) or device (not).
    pub regular: bool,
    /// blake3 of the content, hex, for regular files of at most [`CONTENT_HASH_LIMIT`]
    /// bytes that were checked (not for files open only for writing). When present, the
    /// content decides at restart, not the mtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
}

/// An open file description, possibly shared by several descriptors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OpenFile {
    /// A file or device opened by path.
    Path {
        /// The file.
        file: FileId,
        /// `O_*` status flags (access mode, `O_APPEND`, `O_NONBLOCK`, …).
        flags: i32,
        /// File offset.
        pos: u64,
    },
    /// A connection to the world outside the job through its standard streams: a terminal,
    /// or a pipe or socket whose other end is outside the job. On restart it is connected to
    /// the restart command's own stdin, stdout or stderr.
    Stdio {
        /// What it was at checkpoint time (`/dev/pts/3`, `pipe:[1234]`, …).
        path: String,
        /// `O_*` status flags.
        flags: i32,
    },
    /// An eventfd.
    EventFd {
        /// Counter value.
        count: u64,
        /// `EFD_SEMAPHORE`.
        semaphore: bool,
        /// `O_*` status flags.
        flags: i32,
    },
    /// A timerfd; the remaining time is relative to the cut.
    TimerFd {
        /// Clock id.
        clock: i32,
        /// `O_*` status flags.
        flags: i32,
        /// Interval, nanoseconds.
        interval_ns: u64,
        /// Time to the next expiry, nanoseconds (0: disarmed).
        value_ns: u64,
        /// Expirations not yet read.
        ticks: u64,
    },
    /// A signalfd.
    SignalFd {
        /// Signals it accepts.
        mask: u64,
        /// `O_*` status flags.
        flags: i32,
    },
    /// An epoll instance and its registrations (re-added inside `owner`, whose descriptor
    /// numbers they name).
    Epoll {
        /// `O_*` status flags.
        flags: i32,
        /// Process (pid in the job) whose descriptor table the registrations name.
        owner: i32,
        /// Registrations.
        watches: Vec<EpollWatch>,
    },
    /// A descriptor of a shared memory object (memfd).
    Memfd {
        /// Index into [`Manifest::shared_memory`].
        shmem: u32,
        /// `O_*` status flags.
        flags: i32,
        /// File offset.
        pos: u64,
    },
    /// A unix socket.
    UnixSocket {
        /// Its inode at checkpoint time (identity within the image).
        ino: u64,
        /// `SOCK_STREAM` (1), `SOCK_DGRAM` (2) or `SOCK_SEQPACKET` (5).
        socket_type: i32,
        /// `O_*` status flags.
        flags: i32,
        /// Listening for connections.
        listening: bool,
        /// Bound name, hex: a path, or an abstract name starting with a NUL byte.
        name: Option<String>,
        /// Inode of the connected peer (0: none).
        peer: u64,
        /// The peer is a socket of the job (else the connection is restored closed).
        peer_in_job: bool,
        /// Queued incoming messages (a stream has one), each as chunks of the pack.
        queued: Vec<Vec<u32>>,
        /// Shutdown bits: 1 = receiving, 2 = sending.
        shutdown: u8,
        /// A connection not yet accepted by the job's listening socket of this name (hex):
        /// restored by connecting to it again.
        #[serde(default)]
        connect_to: Option<String>,
    },
    /// A TCP or UDP socket.
    InetSocket {
        /// Its inode at checkpoint time (identity within the image).
        ino: u64,
        /// `IPPROTO_TCP` (6) or `IPPROTO_UDP` (17).
        protocol: i32,
        /// `O_*` status flags.
        flags: i32,
        /// Listening for connections (TCP).
        listening: bool,
        /// Local address (`127.0.0.1:8080`, `[::1]:80`); port 0 when unbound.
        local: String,
        /// Remote address of a connected socket.
        remote: Option<String>,
        /// Inode of the other end of a connection inside the job (0: none).
        peer: u64,
        /// The connection leads to a socket of the job (else it is restored closed).
        peer_in_job: bool,
        /// Queued incoming bytes (TCP: one message; UDP: one per datagram).
        queued: Vec<Vec<u32>>,
        /// UDP: the sender of each queued datagram (`127.0.0.1:4000`), index-aligned with
        /// `queued`.
        #[serde(default)]
        senders: Vec<String>,
        /// TCP: a connection waiting in the accept queue of a listening socket of the job
        /// (at `remote`), restored by connecting to it again.
        #[serde(default)]
        pending_accept: bool,
        /// Socket options.
        options: SocketOptions,
    },
    /// One end of a pseudo-terminal pair of [`Manifest::ptys`].
    Pty {
        /// The pair's index at checkpoint time.
        index: u32,
        /// This is the master (`/dev/ptmx`) end.
        master: bool,
        /// `O_*` status flags.
        flags: i32,
    },
    /// An inotify instance and its watches.
    Inotify {
        /// `O_*` status flags.
        flags: i32,
        /// Watches, re-added in order of their descriptors.
        watches: Vec<InotifyWatch>,
    },
    /// A named pipe (FIFO), reopened by path.
    Fifo {
        /// Its path.
        path: String,
        /// Its inode: the descriptions of one FIFO share it.
        inode: u64,
        /// `O_*` status flags (access mode included).
        flags: i32,
        /// Unread bytes, as chunks of the pack (stored once per FIFO).
        data: Vec<u32>,
    },
    /// One end of a pipe.
    Pipe {
        /// Pipe inode: both ends of one pipe share it.
        inode: u64,
        /// This is the write end.
        write_end: bool,
        /// `O_*` status flags.
        flags: i32,
        /// Capacity (`F_GETPIPE_SZ`).
        capacity: u64,
        /// Unread bytes, as chunks of the pack (stored once, with the read end).
        data: Vec<u32>,
    },
}

/// Options of an inet socket that change how it binds or behaves.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SocketOptions {
    /// `SO_REUSEADDR`.
    pub reuse_addr: bool,
    /// `SO_REUSEPORT`.
    pub reuse_port: bool,
    /// `IPV6_V6ONLY`.
    pub v6only: bool,
    /// `TCP_NODELAY`.
    pub nodelay: bool,
    /// `SO_KEEPALIVE`.
    pub keepalive: bool,
}

/// One watch of an inotify instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InotifyWatch {
    /// Watch descriptor.
    pub wd: i32,
    /// `IN_*` event mask.
    pub mask: u32,
    /// The watched file or directory.
    pub path: String,
    /// Its inode at checkpoint time (checked on restart).
    pub ino: u64,
}

/// One registration of an epoll instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EpollWatch {
    /// The watched descriptor's number in the owner process.
    pub fd: i32,
    /// `EPOLL*` event mask (including `EPOLLET`, `EPOLLONESHOT`, …).
    pub events: u32,
    /// User data.
    pub data: u64,
}

/// One descriptor of the table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fd {
    /// Descriptor number.
    pub fd: i32,
    /// Index into [`Manifest::files`].
    pub file: u32,
    /// `FD_CLOEXEC`.
    pub cloexec: bool,
}

impl Manifest {
    /// Checks the cross-references a reader relies on: chunk indices, page runs inside their
    /// mapping and page-aligned, register and descriptor tables well-formed.
    pub fn validate(&self) -> Result<(), String> {
        let nchunks = self.chunks.len();
        if self.packs.is_empty() {
            return Err("no pack file named".into());
        }
        for p in &self.packs {
            if !is_pack_name(p) {
                return Err(format!("pack file name {p:?} is not a Stasis pack name"));
            }
        }
        if self.processes.is_empty() {
            return Err("no processes".into());
        }
        let run_len = |run: &PageRun| -> Result<u64, String> {
            if run.chunk as usize >= nchunks {
                return Err(format!(
                    "page run at {:#x} names chunk {} of {nchunks}",
                    run.addr, run.chunk
                ));
            }
            let len = self.chunks.chunk_len(run.chunk);
            if !run.addr.is_multiple_of(4096) || !len.is_multiple_of(4096) {
                return Err(format!("page run at {:#x} is not page-aligned", run.addr));
            }
            Ok(len)
        };
        for seg in &self.sysv_shm {
            for run in &seg.pages {
                let end = run
                    .addr
                    .checked_add(run_len(run)?)
                    .ok_or("page run overflows")?;
                if end > seg.size {
                    return Err(format!(
                        "SysV segment {}: page run {:#x} beyond its size {}",
                        seg.id, run.addr, seg.size
                    ));
                }
            }
        }
        for (i, shm) in self.shared_memory.iter().enumerate() {
            // A file's last page runs past its size when the size is not a page multiple
            // (a memfd or deleted file of 3000 bytes is saved as one page).
            let limit = shm.size.div_ceil(4096).saturating_mul(4096);
            for run in &shm.pages {
                let end = run
                    .addr
                    .checked_add(run_len(run)?)
                    .ok_or("page run overflows")?;
                if end > limit {
                    return Err(format!(
                        "shared memory object {i}: page run {:#x} beyond its size {}",
                        run.addr, shm.size
                    ));
                }
            }
        }
        for p in &self.processes {
            if p.threads.is_empty() && p.zombie.is_none() {
                return Err(format!("process {} has no threads", p.pid));
            }
            let siginfo_ok = |s: &Vec<u8>| s.len() == 128;
            if !p.shared_pending.iter().all(siginfo_ok)
                || !p.threads.iter().flat_map(|t| &t.pending).all(siginfo_ok)
            {
                return Err(format!(
                    "process {}: a pending signal record is not 128 bytes",
                    p.pid
                ));
            }
            for t in &p.threads {
                if t.xstate.len() < 576 || t.xstate.len() > 64 * 1024 {
                    return Err(format!(
                        "thread {} has an XSAVE area of {} bytes",
                        t.tid,
                        t.xstate.len()
                    ));
                }
                if t.regs.len() != 27 {
                    return Err(format!(
                        "thread {} has {} register words, expected 27",
                        t.tid,
                        t.regs.len()
                    ));
                }
            }
            for v in &p.vmas {
                if v.start >= v.end || !v.start.is_multiple_of(4096) || !v.end.is_multiple_of(4096)
                {
                    return Err(format!(
                        "process {}: bad mapping {:#x}-{:#x}",
                        p.pid, v.start, v.end
                    ));
                }
                if v.shmem
                    .is_some_and(|s| s as usize >= self.shared_memory.len())
                {
                    return Err(format!(
                        "process {}: mapping {:#x} names a missing shared memory object",
                        p.pid, v.start
                    ));
                }
                for run in &v.pages {
                    let end = run
                        .addr
                        .checked_add(run_len(run)?)
                        .ok_or("page run overflows")?;
                    if run.addr < v.start || end > v.end {
                        return Err(format!(
                            "process {}: page run {:#x}+{} outside mapping {:#x}-{:#x}",
                            p.pid,
                            run.addr,
                            end - run.addr,
                            v.start,
                            v.end
                        ));
                    }
                }
            }
            for fd in &p.fds {
                if fd.fd < 0 || fd.file as usize >= self.files.len() {
                    return Err(format!(
                        "process {}: descriptor {} names file {} of {}",
                        p.pid,
                        fd.fd,
                        fd.file,
                        self.files.len()
                    ));
                }
            }
        }
        for f in &self.files {
            if let OpenFile::Memfd { shmem, .. } = f
                && *shmem as usize >= self.shared_memory.len()
            {
                return Err("a memfd descriptor names a missing shared memory object".into());
            }
            if let OpenFile::UnixSocket { queued, .. } | OpenFile::InetSocket { queued, .. } = f
                && queued.iter().flatten().any(|&c| c as usize >= nchunks)
            {
                return Err("socket data names a missing chunk".into());
            }
            if let OpenFile::Pipe { data, .. } | OpenFile::Fifo { data, .. } = f
                && data.iter().any(|&c| c as usize >= nchunks)
            {
                return Err("pipe data names a missing chunk".into());
            }
        }
        for p in &self.ptys {
            if p.output
                .iter()
                .chain(&p.input)
                .any(|&c| c as usize >= nchunks)
            {
                return Err(format!(
                    "pseudo-terminal {}: queued data names a missing chunk",
                    p.index
                ));
            }
        }
        let mut paths = std::collections::HashSet::new();
        for f in &self.saved_files {
            if !f.path.starts_with('/') || !paths.insert(f.path.as_str()) {
                return Err(format!(
                    "saved file {:?}: not an absolute path, or saved twice",
                    f.path
                ));
            }
            for run in &f.data {
                if run.chunk as usize >= nchunks {
                    return Err(format!(
                        "saved file {}: names chunk {} of {nchunks}",
                        f.path, run.chunk
                    ));
                }
                let end = run
                    .offset
                    .checked_add(self.chunks.chunk_len(run.chunk))
                    .ok_or("saved file run overflows")?;
                if end > f.size {
                    return Err(format!(
                        "saved file {}: run at {} beyond its size {}",
                        f.path, run.offset, f.size
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Whether `name` is a pack file name Stasis writes (`pack-PID-NANOS.pack`: ASCII letters,
/// digits and `-`), so that no manifest can name a file outside the `packs/` directory.
pub fn is_pack_name(name: &str) -> bool {
    name.len() <= 64
        && name.starts_with("pack-")
        && name
            .strip_suffix(".pack")
            .is_some_and(|stem| stem.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}
