//! The demo's sample computation: counts primes in `[0, limit)` with two threads, one slice
//! at a time, printing its progress; deterministic, so a restarted run must print the same
//! answer as an uninterrupted one.

use std::time::Duration;

use anyhow::Result;

/// Arguments of the sample computation.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Count primes below this number.
    #[arg(long, default_value_t = 2_000_000)]
    pub limit: u64,
    /// Number of slices (progress lines).
    #[arg(long, default_value_t = 20)]
    pub slices: u64,
    /// Pause after each slice, milliseconds.
    #[arg(long, default_value_t = 150)]
    pub pause_ms: u64,
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Counts primes in `[from, to)` split over two threads.
pub fn count(from: u64, to: u64) -> u64 {
    let mid = from + (to - from) / 2;
    let other = std::thread::spawn(move || (mid..to).filter(|&n| is_prime(n)).count() as u64);
    let mine = (from..mid).filter(|&n| is_prime(n)).count() as u64;
    mine + other.join().unwrap_or(0)
}

/// The answer an uninterrupted run gives.
pub fn expected(limit: u64) -> u64 {
    count(0, limit)
}

/// Runs the computation.
pub fn run(a: Args, _json: bool) -> Result<i32> {
    let step = a.limit.div_ceil(a.slices);
    let mut total = 0;
    for i in 0..a.slices {
        let from = i * step;
        let to = ((i + 1) * step).min(a.limit);
        total += count(from, to);
        println!(
            "sample: slice {}/{} done, {} primes so far",
            i + 1,
            a.slices,
            total
        );
        std::thread::sleep(Duration::from_millis(a.pause_ms));
    }
    println!("sample: answer = {total} primes below {}", a.limit);
    Ok(0)
}
