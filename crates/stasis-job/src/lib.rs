//! Stasis jobs: the supervisor that owns a job's namespaces and processes, the control
//! protocol the CLI speaks to it, and where a job's images and sockets live.
#![forbid(unsafe_code)]

pub mod callbacks;
pub mod control;
pub mod error;
pub mod foreign;
pub mod namespaces;
pub mod paths;
pub mod policy;
mod record;
pub mod supervisor;
pub mod terminal;

pub use error::{JobError, JobResult};
