//! Capture and restore of Linux processes from outside.
//!
//! Capture freezes every thread with ptrace, reads registers, memory and kernel state (from
//! `/proc`, ptrace, and a few system calls injected into the stopped threads) and writes them
//! through `stasis-image`. Restore builds a parked child into the saved process by injecting
//! system calls into it. Nothing is ever loaded into the program.
#![forbid(unsafe_code)]

pub mod capture;
pub mod error;
pub mod freeze;
pub mod helper;
pub mod kernel_maps;
pub mod lazy;
pub mod proc;
pub mod ptyqueue;
pub mod regs;
pub mod restore;
pub mod sockdiag;
pub mod tracking;
pub mod vdso;

pub use error::{CoreError, CoreResult};
