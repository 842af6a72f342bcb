//! libstasis from Rust: callbacks in every phase and critical sections.
//!
//! `cargo run -p libstasis --example callbacks -- WORKDIR` (or under Stasis:
//! `stasis run --name rs -- target/debug/examples/callbacks WORKDIR`). Prints an `EVENT` line
//! per callback and ends with `DONE 0` once `WORKDIR/go` exists; `$EXAMPLE_WORKDIR`, when set,
//! gives `WORKDIR`. Without Stasis every call is a no-op and the program behaves the same.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use stasis::{CriticalSection, Event, Phase};

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn on_event(e: &Event) {
    let phase = match e.phase {
        Phase::PreCheckpoint => "pre",
        Phase::PostCheckpoint => "post",
        Phase::PostRestart => "restart",
    };
    say(&format!(
        "EVENT {phase} rust gen={} restart={}",
        e.generation,
        u8::from(e.is_restart)
    ));
}

/// Runs the example.
pub fn main() {
    let workdir: PathBuf = std::env::var_os("EXAMPLE_WORKDIR")
        .or_else(|| std::env::args_os().nth(1))
        .map_or_else(|| PathBuf::from("."), PathBuf::from);
    let active = stasis::is_active();
    say(&format!("ACTIVE {}", u8::from(active)));
    let mut failures = 0;
    for phase in [
        Phase::PreCheckpoint,
        Phase::PostCheckpoint,
        Phase::PostRestart,
    ] {
        match stasis::register(phase, on_event) {
            Ok(registered) if registered == active => {}
            other => {
                say(&format!("FAIL register {phase:?}: {other:?}"));
                failures += 1;
            }
        }
    }
    say("READY");
    while !workdir.join("go").exists() {
        let _section = CriticalSection::enter();
        std::thread::sleep(Duration::from_millis(10));
        drop(_section);
        std::thread::sleep(Duration::from_millis(10));
    }
    say(&format!("DONE {failures}"));
}
