//! Errors of the library.

/// What can go wrong in a call to the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The phase given is not one of the three phases.
    #[error("unknown callback phase {0}")]
    BadPhase(i32),
    /// A callback pointer was null.
    #[error("the callback is null")]
    NullCallback,
    /// `critical_leave` without a matching `critical_enter` on this thread.
    #[error("this thread is not inside a critical section")]
    NotInside,
    /// A blocking checkpoint request would wait for itself: it was made inside a critical
    /// section or from a callback, which the checkpoint waits for.
    #[error(
        "a blocking checkpoint request from inside a critical section or a callback would wait for itself"
    )]
    WouldDeadlock,
    /// The library's thread could not be started.
    #[error("cannot start the library's thread: {0}")]
    Thread(std::io::Error),
    /// The supervisor could not be reached or the connection failed.
    #[error("cannot talk to the job's supervisor at {path}: {source}")]
    Io {
        /// The control socket.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The supervisor answered with an error (e.g. the checkpoint failed).
    #[error("the supervisor refused: {0}")]
    Refused(String),
}
