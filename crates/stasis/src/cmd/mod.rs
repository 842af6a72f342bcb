//! One module per verb.

pub mod bench;
pub mod bench_workload;
pub mod checkpoint;
pub mod demo;
pub mod history;
pub mod inspect;
pub mod kill;
pub mod list;
pub mod restart;
pub mod rm;
pub mod run;
pub mod sample;
pub mod status;
pub mod supervise;
pub mod verify;
