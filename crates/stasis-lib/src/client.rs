//! The library's state, its thread, and the protocol with the job's supervisor.
//!
//! The supervisor exports `STASIS_CONTROL` (its control socket) into the job's environment.
//! Once a callback is registered, one thread of ours connects and sends
//! `{"op":"attach","pid":P,"restarted":false}`; the supervisor keeps the connection and sends
//! events on it, one JSON line each:
//!
//! - `{"event":"pre_checkpoint","seq":S,"generation":G}`: we run the pre-checkpoint callbacks,
//!   close critical sections to new entries, wait until every thread has left them, and answer
//!   `{"ready":true,"seq":S}`;
//! - `{"event":"resumed","generation":G}` (G is 0 when the checkpoint failed): we run the
//!   post-checkpoint callbacks, then reopen critical sections;
//! - after a restart our connection comes back closed (end of file): we connect again with
//!   `"restarted":true` and receive `{"event":"restarted","generation":G}`: we run the
//!   post-restart callbacks, then reopen critical sections;
//! - `{"event":"attached"}`: the attach was accepted.
//!
//! A forked child inherits none of this: `pthread_atfork` handlers hold the state's lock across
//! `fork()`, and in the child reset the state and close the inherited connection (which would
//! otherwise keep the parent attached after it exits).

use std::cell::Cell;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr, send, socket};
use serde::Deserialize;

use crate::error::Error;
use crate::ffi::StasisEvent;

/// When a callback runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Before the job is frozen for a checkpoint.
    PreCheckpoint,
    /// After a checkpoint, when the job continues.
    PostCheckpoint,
    /// After the job was restarted from a checkpoint.
    PostRestart,
}

impl Phase {
    /// The phase of a C constant (`STASIS_PRE_CHECKPOINT`…).
    pub fn from_raw(raw: i32) -> Option<Phase> {
        match raw {
            crate::ffi::STASIS_PRE_CHECKPOINT => Some(Phase::PreCheckpoint),
            crate::ffi::STASIS_POST_CHECKPOINT => Some(Phase::PostCheckpoint),
            crate::ffi::STASIS_POST_RESTART => Some(Phase::PostRestart),
            _ => None,
        }
    }

    /// The C constant of this phase.
    pub fn raw(self) -> i32 {
        match self {
            Phase::PreCheckpoint => crate::ffi::STASIS_PRE_CHECKPOINT,
            Phase::PostCheckpoint => crate::ffi::STASIS_POST_CHECKPOINT,
            Phase::PostRestart => crate::ffi::STASIS_POST_RESTART,
        }
    }
}

/// What a callback is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// The phase being run.
    pub phase: Phase,
    /// The generation being written (pre-checkpoint: the number it will most likely get),
    /// written (post-checkpoint; 0 if the checkpoint failed), or restarted from.
    pub generation: u32,
    /// This process was restarted from a checkpoint.
    pub is_restart: bool,
}

/// A C callback (a non-null `stasis_callback`).
pub(crate) type CFunc = extern "C" fn(*const StasisEvent, *mut std::ffi::c_void);

/// A registered callback.
pub(crate) enum Callback {
    /// From the C API.
    C {
        /// The function.
        func: CFunc,
        /// Its argument, as an exposed address.
        arg: usize,
    },
    /// From the Rust API.
    Rust(Box<dyn Fn(&Event) + Send + Sync>),
}

impl Callback {
    fn call(&self, event: &Event) {
        match self {
            Callback::C { func, arg } => {
                let raw = StasisEvent {
                    phase: event.phase.raw(),
                    generation: event.generation,
                    is_restart: i32::from(event.is_restart),
                };
                func(&raw, std::ptr::with_exposed_provenance_mut(*arg));
            }
            Callback::Rust(f) => {
                // A panicking callback must not take the library's thread down.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(event)));
            }
        }
    }
}

struct State {
    /// The process this state belongs to (a forked child starts afresh).
    pid: u32,
    callbacks: Vec<(Phase, Arc<Callback>)>,
    /// Our thread runs.
    thread: bool,
    /// The supervisor has taken this process on (it will be told of checkpoints).
    attached: bool,
    /// A checkpoint is under way: no thread may enter a critical section.
    closed: bool,
    /// Threads inside a critical section.
    inside: u32,
    /// Our thread's connection to the supervisor, while it has one.
    conn: Option<RawFd>,
}

impl State {
    /// Forgets everything of the parent's in a forked child: its callbacks (without dropping
    /// them: their destructors belong to the parent), its thread, its connection (closed
    /// here: the child must not keep the parent attached). The forking thread's own critical
    /// sections are the child's.
    fn reset_in_child(&mut self) {
        self.pid = std::process::id();
        std::mem::forget(std::mem::take(&mut self.callbacks));
        self.thread = false;
        self.attached = false;
        self.closed = false;
        self.inside = u32::from(DEPTH.get() > 0);
        if let Some(fd) = self.conn.take() {
            let _ = nix::unistd::close(fd);
        }
    }
}

struct Lib {
    state: Mutex<State>,
    changed: Condvar,
}

thread_local! {
    /// How deeply this thread is nested in critical sections.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// This is the library's own thread.
    static LIB_THREAD: Cell<bool> = const { Cell::new(false) };
    /// The state's lock, held by the forking thread across `fork()`.
    static FORK_GUARD: Cell<Option<MutexGuard<'static, State>>> = const { Cell::new(None) };
}

fn lib() -> &'static Lib {
    static LIB: OnceLock<Lib> = OnceLock::new();
    LIB.get_or_init(|| {
        crate::atfork::register(before_fork, after_fork_in_parent, after_fork_in_child);
        Lib {
            state: Mutex::new(State {
                pid: std::process::id(),
                callbacks: Vec::new(),
                thread: false,
                attached: false,
                closed: false,
                inside: 0,
                conn: None,
            }),
            changed: Condvar::new(),
        }
    })
}

/// `pthread_atfork` prepare handler: no other thread holds the state's lock during `fork()`,
/// so the child finds it consistent.
extern "C" fn before_fork() {
    let guard = lib().state.lock().unwrap_or_else(|e| e.into_inner());
    FORK_GUARD.set(Some(guard));
}

extern "C" fn after_fork_in_parent() {
    drop(FORK_GUARD.take());
}

extern "C" fn after_fork_in_child() {
    if let Some(mut guard) = FORK_GUARD.take() {
        guard.reset_in_child();
    }
}

impl Lib {
    fn lock(&self) -> MutexGuard<'_, State> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.pid != std::process::id() {
            // A child made without the fork handlers (a raw clone()).
            s.reset_in_child();
        }
        s
    }

    fn set_closed(&self, closed: bool) {
        self.lock().closed = closed;
        self.changed.notify_all();
    }
}

/// The supervisor's control socket, from `STASIS_CONTROL` (read once).
struct Control {
    path: PathBuf,
    /// Its address, made once so that a request from a signal handler need not.
    addr: Option<UnixAddr>,
}

fn control_socket() -> Option<&'static Control> {
    static CONTROL: OnceLock<Option<Control>> = OnceLock::new();
    CONTROL
        .get_or_init(|| {
            let path = PathBuf::from(std::env::var_os("STASIS_CONTROL").filter(|v| !v.is_empty())?);
            let addr = UnixAddr::new(&path).ok();
            Some(Control { path, addr })
        })
        .as_ref()
}

/// The supervisor's control socket, from `STASIS_CONTROL` (read once).
pub(crate) fn control() -> Option<&'static Path> {
    control_socket().map(|c| c.path.as_path())
}

/// Whether this process runs under a Stasis supervisor: `STASIS_CONTROL` is set and the
/// supervisor's socket accepts a connection (checked once, then remembered).
pub fn is_active() -> bool {
    static REACHABLE: OnceLock<bool> = OnceLock::new();
    control().is_some_and(|p| *REACHABLE.get_or_init(|| UnixStream::connect(p).is_ok()))
}

/// Registers a callback; starts the library's thread with the first one and waits (up to
/// [`ATTACH_PATIENCE`]) until the supervisor has taken the process on, so that every
/// checkpoint after this returns runs the callback. `Ok(false)` when not under Stasis (nothing
/// is registered).
pub(crate) fn register(phase: Phase, cb: Callback) -> Result<bool, Error> {
    if !is_active() {
        return Ok(false);
    }
    let Some(path) = control() else {
        return Ok(false);
    };
    let lib = lib();
    let mut s = lib.lock();
    s.callbacks.push((phase, Arc::new(cb)));
    if !s.thread {
        std::thread::Builder::new()
            .name("stasis".into())
            .spawn(move || run(path))
            .map_err(Error::Thread)?;
        s.thread = true;
    }
    let deadline = Instant::now() + ATTACH_PATIENCE;
    while !s.attached && s.thread {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        s = lib
            .changed
            .wait_timeout(s, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    Ok(true)
}

/// How long `register` waits for the supervisor to take the process on.
pub const ATTACH_PATIENCE: Duration = Duration::from_secs(5);

/// Enters a critical section (nestable); waits while a checkpoint is under way.
pub fn critical_enter() {
    let depth = DEPTH.get();
    if depth > 0 || control().is_none() {
        DEPTH.set(depth + 1);
        return;
    }
    let lib = lib();
    let mut s = lib.lock();
    // Post-checkpoint and post-restart callbacks run while sections are still closed; they
    // may enter one themselves.
    while s.closed && !LIB_THREAD.get() {
        s = lib.changed.wait(s).unwrap_or_else(|e| e.into_inner());
    }
    s.inside += 1;
    DEPTH.set(1);
}

/// Leaves a critical section.
pub fn critical_leave() -> Result<(), Error> {
    let depth = DEPTH.get();
    if depth == 0 {
        return Err(Error::NotInside);
    }
    DEPTH.set(depth - 1);
    if depth == 1 && control().is_some() {
        let lib = lib();
        let mut s = lib.lock();
        s.inside = s.inside.saturating_sub(1);
        drop(s);
        lib.changed.notify_all();
    }
    Ok(())
}

/// What a checkpoint request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested {
    /// Not under Stasis: nothing was asked.
    NotActive,
    /// Asked; not waited for.
    Sent,
    /// The checkpoint was written (this generation) and the job continues.
    Written(u32),
    /// This process is running again from the checkpoint it asked for, after a restart.
    Restarted,
}

#[derive(Deserialize)]
struct Answer {
    result: String,
    #[serde(default)]
    generation: u32,
    #[serde(default)]
    message: String,
}

/// The checkpoint request, as sent on the control socket.
const CHECKPOINT_REQUEST: &[u8] = b"{\"op\":\"checkpoint\",\"kill\":false}\n";

/// Asks for a checkpoint without waiting for it: `Ok(false)` when not under Stasis. Once
/// [`is_active`] has returned, this is async-signal-safe: it only reads what that call set up
/// and makes system calls (socket, connect, send, close), allocating nothing.
pub(crate) fn request_checkpoint_nowait() -> Result<bool, Errno> {
    let Some(c) = control_socket().filter(|_| is_active()) else {
        return Ok(false);
    };
    let addr = c.addr.as_ref().ok_or(Errno::ENAMETOOLONG)?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    nix::sys::socket::connect(fd.as_raw_fd(), addr)?;
    let mut sent = 0;
    while sent < CHECKPOINT_REQUEST.len() {
        match send(
            fd.as_raw_fd(),
            &CHECKPOINT_REQUEST[sent..],
            MsgFlags::MSG_NOSIGNAL,
        ) {
            Ok(n) => sent += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Asks the supervisor for a checkpoint of the job (it continues afterwards).
pub fn request_checkpoint(blocking: bool) -> Result<Requested, Error> {
    let Some(path) = control().filter(|_| is_active()) else {
        return Ok(Requested::NotActive);
    };
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    if !blocking {
        return match request_checkpoint_nowait() {
            Ok(_) => Ok(Requested::Sent),
            Err(e) => Err(io(e.into())),
        };
    }
    if DEPTH.get() > 0 || LIB_THREAD.get() {
        return Err(Error::WouldDeadlock);
    }
    let stream = UnixStream::connect(path).map_err(io)?;
    send_line_bytes(&stream, CHECKPOINT_REQUEST).map_err(io)?;
    let mut line = String::new();
    let n = BufReader::new(&stream).read_line(&mut line).map_err(io)?;
    if n == 0 {
        // Connections leading out of the job come back closed after a restart.
        return Ok(Requested::Restarted);
    }
    let answer: Answer = serde_json::from_str(&line)
        .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    match answer.result.as_str() {
        "checkpoint" => Ok(Requested::Written(answer.generation)),
        _ => Err(Error::Refused(answer.message)),
    }
}

/// Writes one JSON line without raising `SIGPIPE` (the program may not ignore it).
fn send_line(stream: &UnixStream, msg: &serde_json::Value) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    send_line_bytes(stream, &bytes)
}

/// Writes a whole line without raising `SIGPIPE`.
fn send_line_bytes(stream: &UnixStream, bytes: &[u8]) -> std::io::Result<()> {
    let mut sent = 0;
    while sent < bytes.len() {
        match send(stream.as_raw_fd(), &bytes[sent..], MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => sent += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct Incoming {
    event: String,
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    generation: u32,
}

fn run_callbacks(phase: Phase, generation: u32, is_restart: bool) {
    let callbacks: Vec<Arc<Callback>> = lib()
        .lock()
        .callbacks
        .iter()
        .filter(|(p, _)| *p == phase)
        .map(|(_, c)| Arc::clone(c))
        .collect();
    let event = Event {
        phase,
        generation,
        is_restart,
    };
    for cb in callbacks {
        cb.call(&event);
    }
}

/// Connects, retrying for up to `patience` (a restarted job may run before its new
/// supervisor listens). The connection is recorded as ours under the state's lock, so that a
/// fork() never sees it unrecorded.
fn connect(path: &Path, patience: Duration) -> Option<UnixStream> {
    let deadline = Instant::now() + patience;
    let mut pause = Duration::from_millis(5);
    loop {
        {
            let mut s = lib().lock();
            if let Ok(stream) = UnixStream::connect(path) {
                s.conn = Some(stream.as_raw_fd());
                return Some(stream);
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// The library's thread: attaches to the supervisor and runs the callbacks it asks for; after
/// a restart (the connection reads end of file) attaches again.
fn run(path: &'static Path) {
    LIB_THREAD.set(true);
    let mut restarted = false;
    loop {
        let patience = Duration::from_secs(if restarted { 60 } else { 5 });
        let Some(stream) = connect(path, patience) else {
            break;
        };
        let attach = serde_json::json!({
            "op": "attach",
            "pid": std::process::id(),
            "restarted": restarted,
        });
        if send_line(&stream, &attach).is_ok() {
            serve(&stream);
        }
        // Forgotten before it is closed, so that a fork never closes a reused descriptor.
        lib().lock().conn = None;
        drop(stream);
        restarted = true;
    }
    // The supervisor is gone for good: nothing will ever close critical sections again.
    let lib = lib();
    let mut s = lib.lock();
    s.closed = false;
    s.thread = false;
    s.attached = false;
    drop(s);
    lib.changed.notify_all();
}

/// Serves one connection's events until it ends.
fn serve(stream: &UnixStream) {
    let lib = lib();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let Ok(ev) = serde_json::from_str::<Incoming>(&line) else {
            continue;
        };
        match ev.event.as_str() {
            "pre_checkpoint" => {
                run_callbacks(Phase::PreCheckpoint, ev.generation, false);
                let mut s = lib.lock();
                s.closed = true;
                while s.inside > 0 {
                    s = lib.changed.wait(s).unwrap_or_else(|e| e.into_inner());
                }
                drop(s);
                let ready = serde_json::json!({"ready": true, "seq": ev.seq});
                if send_line(stream, &ready).is_err() {
                    return;
                }
            }
            "resumed" => {
                run_callbacks(Phase::PostCheckpoint, ev.generation, false);
                lib.set_closed(false);
            }
            "restarted" => {
                lib.lock().attached = true;
                run_callbacks(Phase::PostRestart, ev.generation, true);
                lib.set_closed(false);
            }
            _ => {
                lib.lock().attached = true;
                lib.set_closed(false);
            }
        }
    }
}
