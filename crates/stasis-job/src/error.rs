//! Errors of the job layer.

use stasis_core::CoreError;
use stasis_image::ImageError;

/// A job operation failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Capture or restore failed.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// The image could not be read or written.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A file or socket operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or socket.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The job name is not usable.
    #[error("invalid job name {0:?}: use letters, digits, '.', '_' and '-', not starting with '.'")]
    BadName(String),
    /// No running job of that name.
    #[error(
        "no running job named {name:?} (no supervisor answers at {socket}); `stasis list` shows the jobs"
    )]
    NotRunning {
        /// The job.
        name: String,
        /// Where its socket would be.
        socket: String,
    },
    /// A job of that name is already running.
    #[error(
        "a job named {0:?} is already running; choose another --name or `stasis kill` it first"
    )]
    AlreadyRunning(String),
    /// The supervisor refused or failed a request.
    #[error("{0}")]
    Remote(String),
    /// The program could not be started.
    #[error("cannot start {program}: {reason}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        reason: String,
    },
    /// Security check failed.
    #[error("{0}")]
    Refused(String),
    /// A signal given by name or number is not usable as the checkpoint signal.
    #[error("{given:?} cannot be the checkpoint signal: {reason}")]
    BadSignal {
        /// What was given.
        given: String,
        /// Why not.
        reason: String,
    },
}

/// Result of job operations.
pub type JobResult<T> = Result<T, JobError>;

/// Wraps an io error with its path.
pub fn io_err(path: impl Into<String>) -> impl FnOnce(std::io::Error) -> JobError {
    let path = path.into();
    move |source| JobError::Io { path, source }
}
