//! The only crate of Stasis that contains `unsafe` code.
//!
//! Every raw system call Stasis makes lives here, behind a small safe API: ptrace and
//! injected system calls, reading and writing another process's memory, creating processes
//! with chosen pids, namespaces, pidfds, a BPF iterator of a process's mappings, page-cache
//! control, asynchronous direct reads and writes of image files, and a few descriptor
//! operations the `nix` crate does not cover.
//! Each `unsafe` block carries a `// SAFETY:` line saying why it is sound.
#![allow(unsafe_code)]

pub mod aio;
pub mod bpf;
pub mod btf;
pub mod cache;
pub mod error;
pub mod fd;
pub mod inject;
pub mod mem;
pub mod ns;
pub mod process;
pub mod ptrace;
pub mod pty;
pub mod sysv;
pub mod uffd;
pub mod wait;

pub use error::{Errno, SysError, SysResult};
pub use ptrace::Regs;
