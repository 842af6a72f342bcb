//! `stasis bench-workload` (hidden): the program `stasis bench` checkpoints.
//!
//! It fills MIB of memory (random, compressible, mixed or sparse), then a thread timestamps a
//! tight loop with `CLOCK_MONOTONIC` and keeps the largest gap it sees: the stall the
//! program itself observes. Control files in `--dir`: `reset` (start a new measurement),
//! `touch` (change 1% of the pages, then `touched` appears), `report` (the largest gap in
//! microseconds is written to `stall`); the workload writes `ready` once filled. Files are
//! written only when asked: a checkpoint taken while one is open would have the restart
//! look for it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

const PAGE: usize = 4096;

/// Arguments of `stasis bench-workload`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Memory to fill, in MiB.
    #[arg(long)]
    mib: usize,
    /// `random`, `compressible`, `mixed` (numbers: 32 random bits in every 64, about half
    /// compressible) or `sparse` (one page in 16 touched).
    #[arg(long, default_value = "random")]
    pattern: String,
    /// Processes (the others are children of the first, each with its share of memory).
    #[arg(long, default_value_t = 1)]
    procs: usize,
    /// Control directory.
    #[arg(long)]
    dir: PathBuf,
    /// Index of a child process (internal).
    #[arg(long)]
    child: Option<usize>,
}

/// xorshift64*: fast, deterministic, incompressible enough.
fn fill_random(buf: &mut [u8], mut seed: u64) {
    for word in buf.chunks_mut(8) {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        let v = seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_ne_bytes();
        word.copy_from_slice(&v[..word.len()]);
    }
}

fn fill(buf: &mut [u8], pattern: &str, seed: u64) {
    match pattern {
        "compressible" => {
            let text = b"stasis checkpoints whole jobs; this line repeats. ";
            for (i, b) in buf.iter_mut().enumerate() {
                *b = text[i % text.len()] ^ u8::from(i % 4096 == 0);
            }
        }
        "mixed" => {
            fill_random(buf, seed | 1);
            for word in buf.chunks_mut(8) {
                let n = word.len().min(4);
                word[..n].fill(0);
            }
        }
        "sparse" => {
            for (i, page) in buf.chunks_mut(PAGE).step_by(16).enumerate() {
                fill_random(page, seed ^ (i as u64 + 1));
            }
        }
        _ => fill_random(buf, seed | 1),
    }
}

fn write_atomic(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, dir.join(name));
    }
}

/// Runs the verb (never returns while the job lives).
pub fn run(a: Args, _json: bool) -> Result<i32> {
    let share = a.mib.max(1) / a.procs.max(1);
    let mut mem = vec![0u8; share.max(1) << 20];
    fill(
        &mut mem,
        &a.pattern,
        // A seed per process (above bit 0, which `fill` sets): no two fill the same pages.
        0x9e37_79b9_7f4a_7c15 ^ ((a.child.unwrap_or(0) as u64) << 16),
    );
    if let Some(i) = a.child {
        write_atomic(&a.dir, &format!("ready-{i}"), "");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
            std::hint::black_box(&mem);
        }
    }
    let exe = std::env::current_exe().context("finding our executable")?;
    let mut children = Vec::new();
    for i in 1..a.procs {
        children.push(
            std::process::Command::new(&exe)
                .args(["bench-workload", "--mib", &share.to_string(), "--pattern"])
                .arg(&a.pattern)
                .arg("--dir")
                .arg(&a.dir)
                .args(["--child", &i.to_string()])
                .spawn()
                .context("starting a workload process")?,
        );
    }
    while !(1..a.procs).all(|i| a.dir.join(format!("ready-{i}")).exists()) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let max_gap = Arc::new(AtomicU64::new(0));
    let reset = Arc::new(AtomicBool::new(false));
    {
        let (max_gap, reset) = (max_gap.clone(), reset.clone());
        std::thread::spawn(move || {
            let mut last = Instant::now();
            loop {
                let now = Instant::now();
                let gap = u64::try_from((now - last).as_micros()).unwrap_or(u64::MAX);
                if reset.swap(false, Ordering::Relaxed) {
                    max_gap.store(0, Ordering::Relaxed);
                } else if gap > max_gap.load(Ordering::Relaxed) {
                    max_gap.store(gap, Ordering::Relaxed);
                }
                last = now;
            }
        });
    }
    write_atomic(&a.dir, "ready", "");
    let mut round = 1u8;
    loop {
        std::thread::sleep(Duration::from_millis(5));
        if std::fs::remove_file(a.dir.join("reset")).is_ok() {
            reset.store(true, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(1));
        }
        if std::fs::remove_file(a.dir.join("touch")).is_ok() {
            round = round.wrapping_add(1);
            for page in mem.chunks_mut(PAGE).step_by(100) {
                page[0] ^= round;
            }
            write_atomic(&a.dir, "touched", &round.to_string());
        }
        if std::fs::remove_file(a.dir.join("report")).is_ok() {
            write_atomic(
                &a.dir,
                "stall",
                &max_gap.load(Ordering::Relaxed).to_string(),
            );
        }
        std::hint::black_box(&mem);
    }
}
