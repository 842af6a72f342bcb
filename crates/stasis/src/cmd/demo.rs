//! `stasis demo`: the main job end to end, on a built-in computation.
//!
//! Starts the sample computation as a detached job, lets it run a little, checkpoints it
//! with `--kill`, verifies the image, restarts it in the foreground, and checks that the
//! answer equals that of an uninterrupted run.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Arguments of `stasis demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the demo keeps its images (default: a fresh temporary directory).
    #[arg(long)]
    images: Option<std::path::PathBuf>,
}

fn step(n: u32, text: &str) {
    println!("\n==> step {n}: {text}");
}

fn stasis(images: &std::path::Path, args: &[&str]) -> Result<std::process::Output> {
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .args(args)
        .env("STASIS_IMAGES", images)
        .output()
        .context("running stasis")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    Ok(out)
}

/// Runs the verb.
pub fn run(a: Args, _json: bool) -> Result<i32> {
    let images = match a.images {
        Some(p) => p,
        None => std::env::temp_dir().join(format!("stasis-demo-{}", std::process::id())),
    };
    let name = format!("demo-{}", std::process::id());
    let exe = std::env::current_exe()?.display().to_string();
    let (limit, slices) = ("3000000", "30");
    println!(
        "Stasis demo: a two-threaded prime count is started, checkpointed, killed, restarted,\nand must finish with the same answer as an uninterrupted run. Images go to {}",
        images.display()
    );

    step(1, "start the computation as a detached job");
    println!(
        "$ stasis run --detach --name {name} -- stasis sample --limit {limit} --slices {slices}"
    );
    let out = stasis(
        &images,
        &[
            "run", "--detach", "--name", &name, "--", &exe, "sample", "--limit", limit, "--slices",
            slices,
        ],
    )?;
    if !out.status.success() {
        bail!("could not start the job");
    }
    std::thread::sleep(Duration::from_millis(1500));
    let log = images.join(&name).join("output.log");
    println!("its output so far ({}):", log.display());
    print!("{}", std::fs::read_to_string(&log).unwrap_or_default());

    step(
        2,
        "checkpoint it and kill it (no instruction runs after the snapshot)",
    );
    println!("$ stasis checkpoint --kill {name}");
    if !stasis(&images, &["checkpoint", "--kill", &name])?
        .status
        .success()
    {
        bail!("checkpoint failed");
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = std::fs::read_to_string(&log).unwrap_or_default();

    step(3, "verify the image");
    println!("$ stasis verify {}", images.join(&name).display());
    if !stasis(
        &images,
        &["verify", &images.join(&name).display().to_string()],
    )?
    .status
    .success()
    {
        bail!("verify failed");
    }

    step(
        4,
        "restart it from the image; it continues where it was stopped",
    );
    println!("$ stasis restart {name}");
    let out = stasis(&images, &["restart", &name])?;
    if !out.status.success() {
        bail!("the restarted job failed");
    }
    let full = std::fs::read_to_string(&log).unwrap_or_default();
    let after = full.get(before.len()..).unwrap_or("").to_owned();
    println!("what the restarted job printed:");
    print!("{after}");
    let answer_line = after
        .lines()
        .find(|l| l.contains("answer ="))
        .map(str::to_owned);

    step(5, "compare with an uninterrupted run");
    let want = super::sample::expected(limit.parse()?);
    let got: Option<u64> = answer_line.as_deref().and_then(|l| {
        l.split("answer = ")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    });
    println!(
        "restarted job says: {}",
        answer_line.as_deref().unwrap_or("(no answer)")
    );
    println!("uninterrupted run:  {want} primes below {limit}");
    let resumed = after.lines().next().map(str::to_owned).unwrap_or_default();
    if got == Some(want) && !resumed.contains("slice 1/") {
        println!(
            "\nOK: the restarted job resumed mid-way ({resumed}) and finished with the right answer."
        );
        let _ = std::fs::remove_dir_all(&images);
        Ok(0)
    } else {
        bail!("the restarted job did not finish with the right answer (got {got:?}, want {want})");
    }
}
