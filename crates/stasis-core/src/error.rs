//! Errors of capture and restore; each names the process, file or resource concerned.

use stasis_image::ImageError;
use stasis_sys::SysError;

/// Capture or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A system call on the job's processes failed.
    #[error("{context}: {source}")]
    Sys {
        /// What we were doing.
        context: String,
        /// The failed call.
        source: SysError,
    },
    /// Reading `/proc` or another file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The image could not be read or written.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The process holds something Stasis cannot capture yet.
    #[error("process {pid}: cannot checkpoint {what}: {why}")]
    Unsupported {
        /// Process (pid as seen by the supervisor).
        pid: i32,
        /// The resource.
        what: String,
        /// Why, and what to do.
        why: String,
    },
    /// A file the process had open or mapped is missing or changed since the checkpoint.
    #[error(
        "{path}: {detail}; restore refused: put the file back as it was at the checkpoint, or checkpoint with --save-files so that the image keeps it (--force restores anyway)"
    )]
    FileChanged {
        /// The file.
        path: String,
        /// What changed.
        detail: String,
    },
    /// A file the image keeps (`--save-files`) exists at restart but differs from the saved
    /// copy, and the job only read it: it is not overwritten.
    #[error(
        "{path}: {detail} since the checkpoint, and the image keeps this file as it was then; restore refused: move this file away and restart (Stasis then recreates it from the image), or restart with --force to use it as it is"
    )]
    SavedFileDiffers {
        /// The file.
        path: String,
        /// What differs.
        detail: String,
    },
    /// This machine cannot run the image (other kernel vdso, missing CPU features, …).
    #[error("cannot restore on this machine: {0}")]
    Incompatible(String),
    /// The process went away while being captured.
    #[error("process {0} exited during the checkpoint")]
    Vanished(i32),
    /// The process, a child of the caller, exited while being frozen, and its exit status
    /// was collected (the caller will not see it in `wait` any more).
    #[error("process {pid} exited during the checkpoint")]
    Exited {
        /// The process.
        pid: i32,
        /// Its exit code, or 128 + the signal that killed it.
        code: i32,
    },
    /// A mapping's flags changed between the reading before the freeze and the cut.
    #[error(
        "process {pid} changed mapping {what} while it was being checkpointed ({why}); the checkpoint was not kept: take it again"
    )]
    ChangedDuringCheckpoint {
        /// The process.
        pid: i32,
        /// The mapping.
        what: String,
        /// What changed.
        why: String,
    },
}

/// Result of capture and restore.
pub type CoreResult<T> = Result<T, CoreError>;

/// Extension to attach context to system-call errors.
pub trait SysContext<T> {
    /// Wraps a `SysError` with a description of what we were doing.
    fn ctx(self, context: impl FnOnce() -> String) -> CoreResult<T>;
}

impl<T> SysContext<T> for Result<T, SysError> {
    fn ctx(self, context: impl FnOnce() -> String) -> CoreResult<T> {
        self.map_err(|source| CoreError::Sys {
            context: context(),
            source,
        })
    }
}

/// Wraps an io error with its path.
pub fn io_err(path: impl Into<String>) -> impl FnOnce(std::io::Error) -> CoreError {
    let path = path.into();
    move |source| CoreError::Io { path, source }
}
