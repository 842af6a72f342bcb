//! Lazy restart: a restarted job runs before its memory is loaded; pages come in on first
//! touch and in the background. t_lazy.c changes its memory in every way that reaches the
//! loader (`MADV_DONTNEED`, `mremap`, `fork`, `munmap`) while most of it is not loaded yet,
//! then checks every page. The `no-prefetch` test point keeps the supervisor from loading in
//! the background, so that the job really acts on memory that is not there yet.
//!
//! Lazy loading needs `CAP_SYS_PTRACE`: without it these tests check that the restart says
//! so and restores eagerly, with the same results. Either way write tracking covers the
//! restored memory: the first checkpoint after the restart reads only what the job wrote.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::{EXIT_CHECKPOINTED, Env, Job, assert_all_pass, is_root, program};
use serde_json::Value;
use stasis_image::generation::read_manifest;

/// Size of t_lazy's region, MiB.
const REGION_MIB: u64 = 64;
const NO_PREFETCH: &[(&str, &str)] = &[("STASIS_FAULT", "no-prefetch")];

/// Starts t_lazy, waits for READY and stops it with `checkpoint --kill` (generation 1).
fn stopped_lazy(env: &Env, prefix: &str) -> Job {
    let name = env.name(prefix);
    let mib = REGION_MIB.to_string();
    let mut job = env.start(
        &name,
        &program("t_lazy", false),
        &[env.work.to_str().unwrap(), &mib],
    );
    env.wait_output(&job, "READY\n");
    env.checkpoint(&name, true);
    assert_eq!(job.wait(), EXIT_CHECKPOINTED, "{}", env.stderr(&job));
    job
}

/// The status's account of the memory of restarted job `job`, once its supervisor answers
/// (`None` if the restart ended first).
fn try_memory(env: &Env, job: &mut Job) -> Option<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = env.stasis(&["--json", "status", &job.name]);
        if o.status.success() {
            let v: Value = serde_json::from_slice(&o.stdout).expect("status prints JSON");
            return Some(v["memory"].clone());
        }
        if job.child.try_wait().expect("restart command").is_some() {
            return None;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted job never answered"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn memory(env: &Env, job: &mut Job) -> Value {
    try_memory(env, job).unwrap_or_else(|| panic!("the restart ended: {}", env.stderr(job)))
}

/// Whether the restart loads lazily: it must as root; otherwise it must say why not.
fn lazily(m: &Value) -> bool {
    if m["lazy"] == true {
        return true;
    }
    assert!(!is_root(), "root restarts lazily: {m}");
    let why = m["eager_because"].as_str().unwrap_or_default();
    assert!(why.contains("CAP_SYS_PTRACE"), "{m}");
    false
}

fn step(env: &Env, job: &Job, k: u32) {
    fs::write(env.work.join(format!("step{k}")), b"").expect("step file");
    env.wait_output(job, &format!("STEP {k}\n"));
}

fn bytes(m: &Value, key: &str) -> u64 {
    m[key].as_u64().unwrap_or_else(|| panic!("{key} in {m}"))
}

#[test]
fn lazily_restarted_job_changes_memory_that_is_not_loaded_yet_and_finds_it_right() {
    let env = Env::new();
    let job = stopped_lazy(&env, "lazy");
    let mut restarted = env.restart_with_env(&job, &[], NO_PREFETCH);
    let m = memory(&env, &mut restarted);
    let lazy = lazily(&m);
    for k in 1..=5 {
        step(&env, &restarted, k);
    }
    let m = memory(&env, &mut restarted);
    if lazy {
        // The job ran all five steps with little of its memory loaded.
        assert!(bytes(&m, "total_bytes") >= REGION_MIB << 20, "{m}");
        assert!(
            bytes(&m, "loaded_bytes") < bytes(&m, "total_bytes") / 4,
            "{m}"
        );
        assert!(bytes(&m, "faults") >= 3, "{m}");
        assert!(m["loaded_after_ms"].is_null(), "{m}");
    }
    // A checkpoint needs all the memory: it loads the rest first; the job runs on. What the
    // job did not write since the restart is known unchanged (write tracking took the
    // memory over once loaded): the region but for the pages the steps changed.
    let r = env.checkpoint(&job.name, false);
    assert_eq!(r["generation"], 2, "{r}");
    let unchanged = r["unchanged_bytes"].as_u64().expect("unchanged_bytes");
    assert!(unchanged >= (REGION_MIB << 20) * 9 / 10, "{r}");
    let m = memory(&env, &mut restarted);
    assert!(m["loaded_after_ms"].is_number(), "{m}");
    env.go();
    assert_eq!(restarted.wait(), 0, "{}", env.stderr(&job));
    let out = env.output(&job);
    assert_all_pass(&out);
    assert!(out.contains("DONE 0\n"), "{out}");

    // The generation written after the lazy restart holds all of the memory: restarted
    // from it (loading in the background this time), the program finds every page again.
    fs::write(&job.out, b"").expect("truncate output");
    env.ungo();
    let mut again = env.restart(&job, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = memory(&env, &mut again);
        if m["loaded_after_ms"].is_number() {
            if lazily(&m) {
                assert_eq!(bytes(&m, "loaded_bytes"), bytes(&m, "total_bytes"), "{m}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "memory never finished loading: {m}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    env.go();
    assert_eq!(
        again.wait(),
        0,
        "{}\n{}",
        env.stderr(&job),
        env.output(&job)
    );
    let out = env.output(&job);
    assert_all_pass(&out);
    assert!(out.contains("DONE 0\n"), "{out}");
}

#[test]
fn damaged_memory_met_while_loading_lazily_ends_the_restart_naming_the_damage() {
    let env = Env::new();
    let job = stopped_lazy(&env, "lazybad");
    let gen1 = env.job_dir(&job.name).join("gen-0001");
    let m = read_manifest(&gen1.join("manifest")).expect("manifest");
    // A chunk in the middle of the region, which nothing touches before `go`.
    let region = m.processes[0]
        .vmas
        .iter()
        .max_by_key(|v| v.end - v.start)
        .expect("mappings");
    let run = &region.pages[region.pages.len() / 3];
    let frame = m.chunks.frames[m.chunks.blobs_of(run.chunk)[0].frame as usize];
    let pack_name = m.packs[frame.pack as usize].clone();
    let pack = env.job_dir(&job.name).join("packs").join(&pack_name);
    let mut b = fs::read(&pack).expect("pack");
    let at = (frame.offset + 16 + u64::from(frame.stored_len) / 2) as usize;
    b[at] ^= 0x40;
    fs::write(&pack, b).expect("damage pack");

    let mut restarted = env.restart_with_env(&job, &[], NO_PREFETCH);
    if try_memory(&env, &mut restarted).is_some_and(|m| lazily(&m)) {
        // The job runs on the pages it has; reaching the damaged one ends it.
        step(&env, &restarted, 1);
        env.go();
    }
    assert_eq!(restarted.wait(), 1, "{}", env.stderr(&job));
    let err = env.stderr(&job);
    assert!(
        err.contains(&pack_name) && err.contains(&format!("offset {}", frame.offset)),
        "the error names the pack and the damaged frame: {err}"
    );
    assert!(!env.output(&job).contains("DONE"), "{}", env.output(&job));
}
