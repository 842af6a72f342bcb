//! `stasis bench`: measures checkpoint and restart against baselines taken in the same run.
//!
//! For each workload (memory size, pattern, processes) it starts `stasis bench-workload` as
//! a detached job and measures: the largest stall the program itself observes during a
//! checkpoint that lets it run on, that checkpoint's wall time and bytes, a second
//! checkpoint after 1% of the pages changed, `checkpoint --kill`, `restart --detach` until
//! the job runs again and until all its memory is loaded (lazy restart, where allowed),
//! and `restart --detach --eager`. Baselines on the same bytes in the same directory: `dd
//! conv=fsync` (writing) and `cat` to `/dev/null` (reading); and the time to fill as much
//! fresh memory in a plain process (the least a restore's loading can cost). Restarts and
//! `cat` read the image from the disk: its files are dropped from the page cache first.
//! Reading and loading an image, and filling fresh memory, are timed [`REPEATS`] times and
//! reported as medians (every time in the JSON): on our virtual machines, filling fresh
//! memory takes several times as long at random moments, in any program. Prints a table,
//! writes JSON and an SVG chart.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use stasis_job::control::{Request, Response, request};
use stasis_job::paths;

/// Arguments of `stasis bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Memory sizes in MiB of the single-process random workloads.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = [64u64, 256, 1024, 4096])]
    sizes: Vec<u64>,
    /// Size in MiB of the extra workloads: compressible, half-compressible numbers (with
    /// default compression and with none), sparse, and a 4-process job.
    #[arg(long, default_value_t = 256)]
    extra_size: u64,
    /// Directory for images and baselines (default: a new directory under the temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench.json")]
    json_out: PathBuf,
    /// Where to write the SVG chart.
    #[arg(long, default_value = "bench.svg")]
    svg_out: PathBuf,
}

/// How many times lazy restarts, `cat` and the fill of fresh memory are timed per workload.
const REPEATS: usize = 3;

/// The median of `v` (the mean of the middle two for an even count; NaN when empty).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

struct Case {
    mib: u64,
    pattern: &'static str,
    procs: usize,
    /// `--compress` of the job.
    compress: &'static str,
}

fn stasis(images: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(std::env::current_exe()?)
        .args(args)
        .env("STASIS_IMAGES", images)
        .output()
        .context("running stasis")?;
    if !out.status.success() {
        bail!(
            "stasis {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn stasis_json(images: &Path, args: &[&str]) -> Result<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let text = stasis(images, &all)?;
    serde_json::from_str(text.trim()).with_context(|| format!("not JSON: {text}"))
}

fn wait_for(path: &Path, what: &str) -> Result<()> {
    wait_until(|| path.exists(), what)
}

/// Waits until `path` is gone (taken by the workload).
fn wait_gone(path: &Path, what: &str) -> Result<()> {
    wait_until(|| !path.exists(), what)
}

fn wait_until(done: impl Fn() -> bool, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// The largest stall in microseconds the workload in `work` saw since its last reset.
fn reported_stall(work: &Path) -> Result<f64> {
    let _ = std::fs::remove_file(work.join("stall"));
    std::fs::write(work.join("report"), "")?;
    wait_for(&work.join("stall"), "the workload to report its stall")?;
    Ok(std::fs::read_to_string(work.join("stall"))?
        .trim()
        .parse()
        .unwrap_or(f64::NAN))
}

/// Waits until restarted job `name` has all its memory, handed over to write tracking;
/// returns the status's account of it. Polled slowly: each `status` is a process on the
/// cores loading shares; the supervisor itself times loading (`loaded_after_ms`, from the
/// moment the job runs).
fn wait_loaded(name: &str) -> Result<Value> {
    // Asked from here, not by running `stasis status`: starting a process every 50 ms took
    // the one core the loading job leaves free from the supervisor loading it.
    let socket = paths::socket_path(name)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let m = match request(name, &socket, &Request::Status)? {
            Response::Status(s) => serde_json::to_value(&s.memory)?,
            other => bail!("job {name}: unexpected answer to status: {other:?}"),
        };
        if m["loaded_after_ms"].is_number() && m["handing_over"] != true {
            return Ok(m);
        }
        if Instant::now() > deadline {
            bail!("job {name}: memory still loading or handed over after 300 s: {m}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until job `name` no longer answers (its supervisor has ended).
fn wait_ended(images: &Path, name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while stasis(images, &["status", name]).is_ok() {
        if Instant::now() > deadline {
            bail!("job {name} still running after kill");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Drops the job's image files from the page cache, so that what reads them next reads the
/// disk, as a restart on another machine or after a reboot does. False when the kernel
/// refused (the figures then come from the cache).
fn drop_cached(dir: &Path) -> bool {
    let mut ok = true;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            ok &= drop_cached(&path);
        } else if let Ok(f) = std::fs::File::open(&path) {
            ok &= f.sync_data().is_ok() && stasis_sys::cache::drop_cached(&f, 0, 0).is_ok();
        }
    }
    ok
}

/// The machine's CPU time so far from `/proc/stat`: (steal, all), in clock ticks.
fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is counted in user).
    Some((*ticks.get(7)?, ticks.iter().take(8).sum()))
}

/// The share of CPU time the hypervisor took between two [`cpu_times`] readings: on a
/// virtual machine whose host is busy, the figures of a run vary with it.
fn steal_percent(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    let ((s0, t0), (s1, t1)) = (before?, after?);
    (t1 > t0).then(|| 100.0 * (s1 - s0) as f64 / (t1 - t0) as f64)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Times a shell command (a baseline).
fn timed_shell(script: &str) -> Result<f64> {
    let t = Instant::now();
    let st = Command::new("sh").args(["-c", script]).status()?;
    if !st.success() {
        bail!("baseline failed: {script}");
    }
    Ok(ms(t.elapsed()))
}

fn measure(c: &Case, base: &Path) -> Result<Value> {
    let images = base.join("images");
    let name = format!("bench-{}-{}-{}-{}", c.mib, c.pattern, c.procs, c.compress);
    let work = base.join(&name);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let exe = std::env::current_exe()?.display().to_string();
    let (mib, procs) = (c.mib.to_string(), c.procs.to_string());
    let work_s = work.display().to_string();
    stasis(
        &images,
        &[
            "run",
            "--detach",
            "--compress",
            c.compress,
            "--name",
            &name,
            "--",
            &exe,
            "bench-workload",
            "--mib",
            &mib,
            "--pattern",
            c.pattern,
            "--procs",
            &procs,
            "--dir",
            &work_s,
        ],
    )?;
    let result = (|| -> Result<Value> {
        wait_for(&work.join("ready"), "the workload to fill its memory")?;
        std::thread::sleep(Duration::from_millis(300));
        // A checkpoint that lets the job run on, and the stall the program saw.
        std::fs::write(work.join("reset"), "")?;
        std::thread::sleep(Duration::from_millis(50));
        let full = stasis_json(&images, &["checkpoint", &name])?;
        std::thread::sleep(Duration::from_millis(100));
        let stall_us = reported_stall(&work)?;
        // After 1% of the pages changed.
        std::fs::write(work.join("touch"), "")?;
        wait_for(
            &work.join("touched"),
            "the workload to change 1% of its pages",
        )?;
        std::fs::write(work.join("reset"), "")?;
        std::thread::sleep(Duration::from_millis(50));
        let incr = stasis_json(&images, &["checkpoint", &name])?;
        std::thread::sleep(Duration::from_millis(100));
        let incr_stall_us = reported_stall(&work)?;
        let kill = stasis_json(&images, &["checkpoint", &name, "--kill"])?;
        // The baselines copy and read the bytes of the first, full checkpoint.
        let generation = full["path"].as_str().unwrap_or_default().to_owned();
        std::thread::sleep(Duration::from_millis(200));
        // Restarts read the image from the disk (as on another machine), not the cache.
        let job_images = images.join(&name);
        // Lazy restart (where allowed): running at once, memory loading behind. Timed
        // [`REPEATS`] times: the median is reported.
        let mut cold = true;
        let mut lazy = Vec::new();
        for _ in 0..REPEATS {
            cold &= drop_cached(&job_images);
            let t = Instant::now();
            stasis(&images, &["restart", &name, "--detach"])?;
            let restart_ms = ms(t.elapsed());
            // The stall the program sees while its memory loads and goes over to write
            // tracking (measured from the moment it takes the reset).
            std::fs::write(work.join("reset"), "")?;
            wait_gone(
                &work.join("reset"),
                "the restarted workload to start measuring",
            )?;
            let memory = wait_loaded(&name)?;
            let stall_ms = reported_stall(&work)? / 1e3;
            let _ = stasis(&images, &["kill", &name]);
            wait_ended(&images, &name)?;
            lazy.push((restart_ms, memory, stall_ms));
        }
        let restarts: Vec<f64> = lazy.iter().map(|(r, _, _)| *r).collect();
        let loads: Vec<f64> = lazy
            .iter()
            .map(|(_, m, _)| num(m, "loaded_after_ms"))
            .collect();
        let lazy_stalls: Vec<f64> = lazy.iter().map(|(_, _, s)| *s).collect();
        let hand_over_frozen: Vec<f64> = lazy
            .iter()
            .map(|(_, m, _)| num(m, "hand_over_frozen_ms"))
            .collect();
        let residencies: Vec<f64> = restarts.iter().zip(&loads).map(|(r, l)| r + l).collect();
        let memory = &lazy[0].1;
        // Eager restart: all memory loaded before the job runs.
        cold &= drop_cached(&job_images);
        let t = Instant::now();
        stasis(&images, &["restart", &name, "--detach", "--eager"])?;
        let eager_restart_ms = ms(t.elapsed());
        let _ = stasis(&images, &["kill", &name]);
        wait_ended(&images, &name)?;
        let pack = own_pack(Path::new(&generation))?;
        let stored = std::fs::metadata(&pack).map(|m| m.len()).unwrap_or(0);
        let dd = timed_shell(&format!(
            "dd if='{}' of='{}' bs=1M conv=fsync status=none",
            pack.display(),
            base.join("dd.out").display()
        ))?;
        let _ = std::fs::remove_file(base.join("dd.out"));
        let mut cats = Vec::new();
        for _ in 0..REPEATS {
            cold &= drop_cached(&job_images);
            cats.push(timed_shell(&format!(
                "cat '{}' > /dev/null",
                pack.display()
            ))?);
        }
        let bytes = full["memory_bytes"].as_u64().unwrap_or(0);
        let fills: Vec<f64> = (0..REPEATS).map(|_| fill_fresh_memory(bytes)).collect();
        Ok(json!({
            "mib": c.mib,
            "pattern": c.pattern,
            "procs": c.procs,
            "compress": c.compress,
            "in_app_stall_ms": stall_us / 1e3,
            "frozen_ms": full["frozen_ms"],
            "checkpoint_ms": full["total_ms"],
            "checkpoint_bytes": full["stored_bytes"],
            "memory_bytes": full["memory_bytes"],
            "incremental_ms": incr["total_ms"],
            "incremental_bytes": incr["stored_bytes"],
            "incremental_stall_ms": incr_stall_us / 1e3,
            "incremental_unchanged_bytes": incr["unchanged_bytes"],
            "kill_checkpoint_ms": kill["total_ms"],
            "restart_ms": median(&restarts),
            "restart_runs_ms": restarts,
            "restart_lazy": memory["lazy"],
            "residency_ms": median(&residencies),
            "residency_runs_ms": residencies,
            "lazy_load_ms": median(&loads),
            "lazy_stall_ms": median(&lazy_stalls),
            "lazy_stall_runs_ms": lazy_stalls,
            "hand_over_frozen_ms": median(&hand_over_frozen),
            "hand_over_slices": memory["hand_over_slices"],
            "lazy_bytes": memory["total_bytes"],
            "eager_restart_ms": eager_restart_ms,
            "image_bytes": stored,
            "dd_fsync_ms": dd,
            "cat_ms": median(&cats),
            "cat_runs_ms": cats,
            "fill_ms": median(&fills),
            "fill_runs_ms": fills,
            "restarts_read_disk": cold,
        }))
    })();
    let _ = stasis(&images, &["kill", &name]);
    let _ = stasis(&images, &["rm", &name]);
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// Why workload `c` cannot be measured on this machine, if it cannot: it needs its memory
/// and a quarter more of what the kernel counts available (the job, then its restarts, one
/// at a time), and three times its size free in `dir` (the image, its copy by `dd`, the
/// later generations).
fn wont_fit(c: &Case, dir: &Path) -> Option<String> {
    let mib = |bytes: u64| bytes >> 20;
    let need = c.mib << 20;
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())?
        * 1024;
    if need + need / 4 > available {
        return Some(format!(
            "needs {} MiB of memory, {} MiB available",
            mib(need + need / 4),
            mib(available)
        ));
    }
    let fs = nix::sys::statvfs::statvfs(dir).ok()?;
    let free = fs.blocks_available() * fs.fragment_size();
    (3 * need > free).then(|| {
        format!(
            "needs {} MiB free in {}, {} MiB free",
            mib(3 * need),
            dir.display(),
            mib(free)
        )
    })
}

/// Milliseconds to copy `bytes` into memory this process never had, each page faulted in
/// fresh: what filling a restored job's memory costs at the least, whatever the disk.
fn fill_fresh_memory(bytes: u64) -> f64 {
    let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
    let source = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut memory: Vec<u8> = Vec::with_capacity(bytes);
    while memory.len() < bytes {
        let n = source.len().min(bytes - memory.len());
        memory.extend_from_slice(&source[..n]);
    }
    let took = ms(t.elapsed());
    std::hint::black_box(&memory);
    took
}

/// The pack file that generation `dir` wrote.
fn own_pack(dir: &Path) -> Result<PathBuf> {
    use stasis_image::generation::{MANIFEST_FILE, PACKS_DIR, read_manifest};
    let m = read_manifest(&dir.join(MANIFEST_FILE))?;
    let job = dir.parent().context("a generation has a job directory")?;
    Ok(job.join(PACKS_DIR).join(&m.packs[0]))
}

fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

fn table(rows: &[Value]) -> String {
    let mut t = String::from(
        "workload                  stall  frozen  ckpt    dd-fsync ratio  bytes      1%-stall 1%-ckpt  1%/full 1%-bytes   kill    restart resident ld-stall eager   cat(disk) fill(mem)\n",
    );
    for r in rows {
        let mb = |k: &str| num(r, k) / 1048576.0;
        let workload = match r["compress"].as_str() {
            Some("fast") | None => r["pattern"].as_str().unwrap_or("").to_owned(),
            Some(other) => format!("{},{other}", r["pattern"].as_str().unwrap_or("")),
        };
        t.push_str(&format!(
            "{:>5} MiB {:<13} x{} {:>6.1} {:>7.1} {:>7.1} {:>8.1} {:>5.2}  {:>7.1}M {:>8.1} {:>8.1} {:>6.1}% {:>7.1}M {:>7.1} {:>7.1} {:>8.1} {:>8.1} {:>7.1} {:>6.1} {:>9.1}\n",
            r["mib"],
            workload,
            r["procs"],
            num(r, "in_app_stall_ms"),
            num(r, "frozen_ms"),
            num(r, "checkpoint_ms"),
            num(r, "dd_fsync_ms"),
            num(r, "checkpoint_ms") / num(r, "dd_fsync_ms"),
            mb("checkpoint_bytes"),
            num(r, "incremental_stall_ms"),
            num(r, "incremental_ms"),
            100.0 * num(r, "incremental_ms") / num(r, "checkpoint_ms"),
            mb("incremental_bytes"),
            num(r, "kill_checkpoint_ms"),
            num(r, "restart_ms"),
            num(r, "residency_ms"),
            num(r, "lazy_stall_ms"),
            num(r, "eager_restart_ms"),
            num(r, "cat_ms"),
            num(r, "fill_ms"),
        ));
    }
    t
}

/// The spread of the repeated timings behind the table's medians, per single-process
/// random workload.
fn repeats_line(rows: &[Value]) -> String {
    let range = |r: &Value, k: &str| {
        let v: Vec<f64> = r[k]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{lo:.0}-{hi:.0}")
    };
    let parts: Vec<String> = rows
        .iter()
        .filter(|r| r["pattern"] == "random" && r["procs"] == 1)
        .map(|r| {
            format!(
                "{} MiB resident {}, stall while loading {}, cat {}, fill {}",
                r["mib"],
                range(r, "residency_runs_ms"),
                range(r, "lazy_stall_runs_ms"),
                range(r, "cat_runs_ms"),
                range(r, "fill_runs_ms")
            )
        })
        .collect();
    format!(
        "restart, resident, ld-stall (the stall the program saw while its memory loaded and went over to write tracking), cat and fill are medians of {REPEATS} runs (ms): {}",
        parts.join("; ")
    )
}

/// The default compression against none on the same half-compressible workload.
fn compression_line(rows: &[Value]) -> Option<String> {
    let find = |mode: &str| {
        rows.iter()
            .find(|r| r["pattern"] == "mixed" && r["compress"] == mode)
    };
    let (fast, none) = (find("fast")?, find("none")?);
    let mb = |r: &Value| num(r, "checkpoint_bytes") / 1048576.0;
    Some(format!(
        "compression on {} MiB of numbers half compressible: default {:.1} ms, {:.1} MiB; --compress none {:.1} ms, {:.1} MiB (time x{:.2}, bytes x{:.2})",
        fast["mib"],
        num(fast, "checkpoint_ms"),
        mb(fast),
        num(none, "checkpoint_ms"),
        mb(none),
        num(fast, "checkpoint_ms") / num(none, "checkpoint_ms"),
        mb(fast) / mb(none),
    ))
}

fn svg(rows: &[Value]) -> String {
    let pts: Vec<&Value> = rows
        .iter()
        .filter(|r| r["pattern"] == "random" && r["procs"] == 1)
        .collect();
    let series = [
        ("checkpoint_ms", "checkpoint (continues)", "#1f77b4"),
        ("dd_fsync_ms", "dd conv=fsync, same bytes", "#7f7f7f"),
        ("kill_checkpoint_ms", "checkpoint --kill", "#ff7f0e"),
        ("restart_ms", "restart until running", "#2ca02c"),
        ("residency_ms", "restart until all memory loaded", "#9467bd"),
        ("in_app_stall_ms", "stall seen by the program", "#d62728"),
    ];
    let (w, h, left, bottom) = (720.0, 420.0, 70.0, 60.0);
    let xmax = pts.iter().map(|r| num(r, "mib")).fold(1.0, f64::max);
    let ymax = pts
        .iter()
        .flat_map(|r| series.iter().map(move |s| num(r, s.0)))
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max)
        * 1.1;
    let x = |v: f64| left + v / xmax * (w - left - 20.0);
    let y = |v: f64| h - bottom - v / ymax * (h - bottom - 20.0);
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n"
    );
    s.push_str(&format!(
        "<line x1='{left}' y1='{}' x2='{}' y2='{}' stroke='black'/><line x1='{left}' y1='20' x2='{left}' y2='{}' stroke='black'/>\n",
        h - bottom,
        w - 20.0,
        h - bottom,
        h - bottom
    ));
    s.push_str(&format!(
        "<text x='{}' y='{}' text-anchor='middle'>memory (MiB)</text><text x='15' y='{}' transform='rotate(-90 15 {})' text-anchor='middle'>time (ms)</text>\n",
        (w + left) / 2.0,
        h - 15.0,
        h / 2.0,
        h / 2.0
    ));
    for r in &pts {
        s.push_str(&format!(
            "<text x='{}' y='{}' text-anchor='middle'>{}</text>\n",
            x(num(r, "mib")),
            h - bottom + 15.0,
            r["mib"]
        ));
    }
    for i in 0..=4 {
        let v = ymax * f64::from(i) / 4.0;
        s.push_str(&format!(
            "<text x='{}' y='{}' text-anchor='end'>{v:.0}</text>\n",
            left - 5.0,
            y(v) + 4.0
        ));
    }
    for (k, (key, label, color)) in series.iter().enumerate() {
        let line: Vec<String> = pts
            .iter()
            .filter(|r| num(r, key).is_finite())
            .map(|r| format!("{:.1},{:.1}", x(num(r, "mib")), y(num(r, key))))
            .collect();
        s.push_str(&format!(
            "<polyline fill='none' stroke='{color}' stroke-width='2' points='{}'/>\n",
            line.join(" ")
        ));
        s.push_str(&format!(
            "<rect x='{}' y='{}' width='10' height='10' fill='{color}'/><text x='{}' y='{}'>{label}</text>\n",
            left + 15.0,
            30.0 + 16.0 * k as f64,
            left + 30.0,
            39.0 + 16.0 * k as f64
        ));
    }
    s.push_str("</svg>\n");
    s
}

/// Runs the verb.
pub fn run(a: Args, json_out: bool) -> Result<i32> {
    let base = a.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("stasis-bench-{}", std::process::id()))
    });
    std::fs::create_dir_all(&base)?;
    let mut cases: Vec<Case> = a
        .sizes
        .iter()
        .map(|&mib| Case {
            mib,
            pattern: "random",
            procs: 1,
            compress: "fast",
        })
        .collect();
    for (pattern, procs, compress) in [
        ("compressible", 1, "fast"),
        ("mixed", 1, "fast"),
        ("mixed", 1, "none"),
        ("sparse", 1, "fast"),
        ("random", 4, "fast"),
    ] {
        cases.push(Case {
            mib: a.extra_size,
            pattern,
            procs,
            compress,
        });
    }
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    let cpu_before = cpu_times();
    for c in &cases {
        if let Some(why) = wont_fit(c, &base) {
            eprintln!(
                "stasis bench: {} MiB {} x{} skipped: {why}",
                c.mib, c.pattern, c.procs
            );
            skipped.push(json!({"mib": c.mib, "pattern": c.pattern, "procs": c.procs, "why": why}));
            continue;
        }
        eprintln!("stasis bench: {} MiB {} x{} …", c.mib, c.pattern, c.procs);
        rows.push(measure(c, &base)?);
    }
    let steal = steal_percent(cpu_before, cpu_times());
    let _ = std::fs::remove_dir_all(base.join("images"));
    let report = json!({
        "machine": {
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "dir": base.display().to_string(),
            "steal_percent": steal,
        },
        "rows": rows,
        "skipped": skipped,
    });
    std::fs::write(&a.json_out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", a.json_out.display()))?;
    std::fs::write(&a.svg_out, svg(&rows))
        .with_context(|| format!("writing {}", a.svg_out.display()))?;
    if json_out {
        println!("{report}");
    } else {
        print!("{}", table(&rows));
        println!("{}", repeats_line(&rows));
        if let Some(line) = compression_line(&rows) {
            println!("{line}");
        }
        for k in &skipped {
            println!(
                "skipped: {} MiB {} x{}: {}",
                k["mib"],
                k["pattern"].as_str().unwrap_or_default(),
                k["procs"],
                k["why"].as_str().unwrap_or_default()
            );
        }
        if let Some(steal) = steal {
            println!(
                "CPU time taken by the hypervisor (steal) during the run: {steal:.1}% (figures are noisier the higher it is)"
            );
        }
        println!(
            "JSON: {}  chart: {}",
            a.json_out.display(),
            a.svg_out.display()
        );
    }
    Ok(0)
}
