//! The control protocol between the CLI and a job's supervisor.
//!
//! One JSON request per connection on the job's unix socket, answered by one JSON response;
//! each is a single line. The supervisor serves only peers with its own uid (`SO_PEERCRED`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{JobError, JobResult, io_err};
use crate::namespaces::NamespaceSetup;

/// Largest request or response line accepted.
pub const MAX_MESSAGE: usize = 1 << 20;

/// What the CLI asks of a supervisor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Report the job's state.
    Status,
    /// Take a checkpoint; `kill` ends the job right after it.
    Checkpoint {
        /// End the job after the snapshot.
        kill: bool,
        /// Then keep only this many generations (the newest), whatever the supervisor's own
        /// `--keep` says.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        keep: Option<u32>,
        /// Keep the content of the job's open files in this generation (`--save-files`),
        /// whatever the supervisor's own policy says.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        save_files: bool,
    },
    /// End the job now.
    Kill,
    /// A process of the job that uses libstasis: the supervisor keeps the connection and
    /// sends it checkpoint events ([`crate::callbacks`]).
    Attach {
        /// The process's pid inside the job.
        pid: u32,
        /// It attaches again after its connection came back closed from a restart.
        #[serde(default)]
        restarted: bool,
    },
}

/// The job's state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobStatus {
    /// Job name.
    pub name: String,
    /// `running` or `exited`.
    pub state: String,
    /// The supervisor's pid.
    pub supervisor_pid: u32,
    /// The program's pid as the host sees it.
    pub pid: i32,
    /// The program's pid inside the job.
    pub job_pid: i32,
    /// The command.
    pub command: Vec<String>,
    /// Where images go.
    pub images: String,
    /// Namespaces in use and what was refused.
    pub namespaces: NamespaceSetup,
    /// Generation this run was restarted from, if any.
    pub restarted_from: Option<u32>,
    /// Checkpoints taken by this supervisor.
    pub checkpoints: u32,
    /// Newest generation on disk.
    pub latest_generation: Option<u32>,
    /// How a restarted job's memory was restored (`None` for a job started fresh).
    #[serde(default)]
    pub memory: Option<MemoryRestore>,
}

/// How a restarted job's memory was restored.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MemoryRestore {
    /// Private memory loaded on first touch and in the background (else all before the job
    /// ran).
    pub lazy: bool,
    /// Why not lazily, when lazy loading was not asked away with `--eager`.
    pub eager_because: Option<String>,
    /// Bytes loaded lazily so far.
    pub loaded_bytes: u64,
    /// Bytes to load lazily in all.
    pub total_bytes: u64,
    /// Faults served: first touches of pages not loaded yet.
    pub faults: u64,
    /// Milliseconds from the job running to all its memory loaded (once it is).
    pub loaded_after_ms: Option<f64>,
    /// Milliseconds from the job running to its memory handed over to write tracking, once
    /// it is (after loading, a slice at a time, the job frozen for each).
    #[serde(default)]
    pub handed_over_after_ms: Option<f64>,
    /// Being handed over to write tracking right now (from the moment it is loaded).
    #[serde(default)]
    pub handing_over: bool,
    /// Slices of that hand-over so far.
    #[serde(default)]
    pub hand_over_slices: u32,
    /// The longest the job stood frozen for one of them, milliseconds.
    #[serde(default)]
    pub hand_over_frozen_ms: f64,
}

/// What a checkpoint did and cost.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointReport {
    /// Generation number written.
    pub generation: u32,
    /// Its directory.
    pub path: String,
    /// How long the job was frozen, milliseconds.
    pub frozen_ms: f64,
    /// Total time until the generation was durable, milliseconds.
    pub total_ms: f64,
    /// Bytes of page data captured (raw).
    pub memory_bytes: u64,
    /// Bytes the checkpoint wrote: its pack (page data and the trailer of content
    /// addresses) and its manifest (with the chunk index).
    pub stored_bytes: u64,
    /// Bytes of private memory that write tracking knew unchanged since the generation
    /// this one builds on: not read again, only referenced (pages zero there and still
    /// untouched are not counted).
    #[serde(default)]
    pub unchanged_bytes: u64,
    /// Bytes of private memory copied out while the job was frozen rather than read from a
    /// copy-on-write snapshot afterwards (an incremental checkpoint with little to read).
    #[serde(default)]
    pub copied_bytes: u64,
    /// Bytes of private memory read while the job ran, before the cut (a pre-copy: the
    /// checkpoint would otherwise have read it all from a snapshot), and found unchanged at
    /// the cut: not read again (zero pages are not counted).
    #[serde(default)]
    pub precopied_bytes: u64,
    /// How long the job was frozen for the pre-copy (its pages protected), milliseconds;
    /// 0 without one.
    #[serde(default)]
    pub precopy_frozen_ms: f64,
    /// The job was ended after the snapshot.
    pub killed: bool,
    /// Older generations removed afterwards by the retention policy (`--keep`).
    #[serde(default)]
    pub removed: Vec<u32>,
    /// Job pids of processes whose pre-checkpoint callbacks (or critical sections) were not
    /// done within the callback timeout; the checkpoint went ahead without them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub callbacks_late: Vec<u32>,
}

/// A supervisor's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Status.
    Status(JobStatus),
    /// A checkpoint was written.
    Checkpoint(CheckpointReport),
    /// Done.
    Ok,
    /// The request failed.
    Error {
        /// Why.
        message: String,
    },
}

/// Reads one line-delimited JSON message.
pub fn read_message<T: for<'de> Deserialize<'de>>(stream: &UnixStream) -> std::io::Result<T> {
    let mut line = String::new();
    let mut reader = BufReader::new(stream).take(MAX_MESSAGE as u64);
    reader.read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Writes one line-delimited JSON message.
pub fn write_message<T: Serialize>(mut stream: &UnixStream, msg: &T) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    stream.write_all(&bytes)
}

use std::io::Read as _;

/// Sends `req` to the supervisor of job `name` and returns its answer. A checkpoint may take
/// long; any other request is answered within seconds or fails.
pub fn request(name: &str, socket: &Path, req: &Request) -> JobResult<Response> {
    let stream = UnixStream::connect(socket).map_err(|_| JobError::NotRunning {
        name: name.to_owned(),
        socket: socket.display().to_string(),
    })?;
    let timeout = if matches!(req, Request::Checkpoint { .. }) {
        3600
    } else {
        10
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(timeout)))
        .map_err(io_err(socket.display().to_string()))?;
    write_message(&stream, req).map_err(io_err(socket.display().to_string()))?;
    read_message(&stream).map_err(io_err(socket.display().to_string()))
}
