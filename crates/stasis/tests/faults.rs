//! Fault injection: the supervisor is killed (`STASIS_FAULT`, see stasis_image::fault) at
//! every point of a checkpoint. Afterwards every generation that exists verifies and the
//! newest one restarts, the half-written one is ignored and cleaned up by the next
//! checkpoint, and the restarted program carries on exactly from its cut. Also: the
//! checkpoint client killed mid-request (the job runs on), and a process of the job killed
//! while frozen (the checkpoint fails, never hangs).

mod common;

use std::fs;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Env, Job, assert_all_pass, program};
use serde_json::Value;

const TICKS: u32 = 120;

fn ticks(out: &str) -> Vec<u32> {
    out.lines()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .collect()
}

/// `stasis run` of the counter with `STASIS_FAULT=fault` in the supervisor's environment.
fn start_with_fault(env: &Env, name: &str, fault: &str) -> Job {
    let out = env.work.join(format!("{name}.out"));
    let child = env
        .cmd()
        .env("STASIS_FAULT", fault)
        .args(["run", "--name", name, "--"])
        .arg(program("counter", false))
        .args([env.work.to_str().unwrap(), &TICKS.to_string()])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(env.work.join(format!("{name}.err"))).unwrap())
        .spawn()
        .unwrap();
    Job {
        name: name.to_owned(),
        child,
        out,
    }
}

fn wait_ticks(env: &Env, job: &Job, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while ticks(&env.output(job)).len() < n {
        assert!(Instant::now() < deadline, "no ticks: {}", env.output(job));
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn generations(env: &Env, name: &str) -> Vec<u64> {
    let h: Value =
        serde_json::from_str(env.ok(&["--json", "history", name]).trim()).expect("history JSON");
    h.as_array()
        .expect("an array")
        .iter()
        .map(|g| g["generation"].as_u64().expect("a number"))
        .collect()
}

fn leftovers(env: &Env, name: &str) -> Vec<String> {
    fs::read_dir(env.job_dir(name))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with('.'))
        .collect()
}

/// Pack files of the job that no generation references (what a crash may leave until the
/// next sweep).
fn unreferenced_packs(env: &Env, name: &str) -> Vec<String> {
    let dir = env.job_dir(name);
    let mut live = std::collections::HashSet::new();
    for g in generations(env, name) {
        let m = stasis_image::generation::read_manifest(
            &dir.join(format!("gen-{g:04}")).join("manifest"),
        )
        .unwrap();
        live.extend(m.packs);
    }
    fs::read_dir(dir.join("packs"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".pack") && !live.contains(n))
        .collect()
}

/// Kills the supervisor at `point` during a checkpoint of a restarted job (generation 1,
/// written by `checkpoint --kill`, is the earlier good one); `survives` says whether the
/// interrupted checkpoint's generation is complete by then.
fn supervisor_dies_at(point: &str, kill: bool, survives: bool) {
    let env = Env::new();
    let name = env.name(point);
    let counter = program("counter", false);
    let mut job = env.start(
        &name,
        &counter,
        &[env.work.to_str().unwrap(), &TICKS.to_string()],
    );
    wait_ticks(&env, &job, 10);
    assert_eq!(env.checkpoint(&name, true)["generation"], 1);
    job.wait();
    // Restart with the fault armed in the new supervisor.
    let fault = if point == "pack-chunk" {
        "pack-chunk@3"
    } else {
        point
    };
    let child = env
        .cmd()
        .env("STASIS_FAULT", fault)
        .args(["restart", &name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(env.work.join("faulty.err")).unwrap())
        .spawn()
        .unwrap();
    let mut faulty = Job {
        name: name.clone(),
        child,
        out: job.out.clone(),
    };
    let before = ticks(&env.output(&job)).len();
    wait_ticks(&env, &faulty, before + 5);
    let mut args = vec!["--json", "checkpoint", name.as_str()];
    if kill {
        args.push("--kill");
    }
    let second = env.stasis(&args);
    assert!(
        !second.status.success(),
        "the supervisor died at {point}: {}",
        String::from_utf8_lossy(&second.stdout)
    );
    faulty.wait();
    let printed = ticks(&env.output(&job));
    let want: Vec<u64> = if survives { vec![1, 2] } else { vec![1] };
    assert_eq!(generations(&env, &name), want, "at {point}");
    for g in &want {
        let dir = env.job_dir(&name).join(format!("gen-{g:04}"));
        env.ok(&["verify", dir.to_str().unwrap()]);
    }
    // The newest complete generation restarts; the program carries on from its cut.
    let mut restarted = env.restart(&job, &[]);
    let code = restarted.wait();
    let out = env.output(&job);
    assert_eq!(
        code,
        0,
        "restart after dying at {point}:\n{out}\n{}",
        env.stderr(&restarted)
    );
    assert_all_pass(&out);
    let all = ticks(&out);
    assert!(
        all.iter().max() == Some(&TICKS),
        "the program finished after the restart: {printed:?} then {all:?}"
    );
    // A later checkpoint under that name cleans up the half-written generation.
    let mut again = env.start(
        &name,
        &counter,
        &[env.work.to_str().unwrap(), &TICKS.to_string()],
    );
    wait_ticks(&env, &again, 3);
    env.checkpoint(&name, true);
    again.wait();
    assert_eq!(
        leftovers(&env, &name),
        Vec::<String>::new(),
        "after {point}"
    );
    assert_eq!(
        unreferenced_packs(&env, &name),
        Vec::<String>::new(),
        "the pack of the interrupted checkpoint is swept, after {point}"
    );
}

#[test]
fn supervisor_killed_while_writing_the_pack() {
    supervisor_dies_at("pack-chunk", false, false);
}

#[test]
fn supervisor_killed_after_the_pack_is_synced() {
    supervisor_dies_at("pack-finished", true, false);
}

#[test]
fn supervisor_killed_after_the_manifest_is_written() {
    supervisor_dies_at("manifest-written", false, false);
}

#[test]
fn supervisor_killed_right_after_the_rename() {
    supervisor_dies_at("renamed", true, true);
}

#[test]
fn supervisor_killed_while_the_job_is_frozen() {
    supervisor_dies_at("frozen", false, false);
    supervisor_dies_at("captured", true, false);
}

#[test]
fn supervisor_killed_while_reading_snapshots() {
    supervisor_dies_at("thawed", false, false);
    supervisor_dies_at("snapshots-read", false, false);
}

#[test]
fn supervisor_killed_once_the_generation_is_in_place() {
    supervisor_dies_at("finished", true, true);
}

/// `stasis rm` of an old generation killed between hiding and deleting it, or between
/// deleting it and sweeping the packs no generation references any more: the generation is
/// gone from every listing, the newer one (which shares its data) restarts, and the leftovers
/// are cleaned up by the next removal.
#[test]
fn removal_killed_halfway() {
    removal_killed_at("rm-renamed");
    removal_killed_at("rm-removed");
}

fn removal_killed_at(point: &str) {
    let env = Env::new();
    let name = env.name("rm");
    let mut job = env.start(
        &name,
        &program("counter", false),
        &[env.work.to_str().unwrap(), &TICKS.to_string()],
    );
    wait_ticks(&env, &job, 5);
    env.checkpoint(&name, false);
    env.checkpoint(&name, true);
    job.wait();
    let rm = env
        .cmd()
        .env("STASIS_FAULT", point)
        .args(["rm", &name, "--generation", "1"])
        .output()
        .unwrap();
    assert!(!rm.status.success(), "rm died halfway");
    assert_eq!(generations(&env, &name), vec![2]);
    let mut restarted = env.restart(&job, &[]);
    assert_eq!(restarted.wait(), 0);
    assert_all_pass(&env.output(&job));
    env.ok(&["rm", &name, "--generation", "2"]);
    let left = leftovers(&env, &name);
    assert!(
        left.is_empty(),
        "leftovers cleaned up by the next rm: {left:?}"
    );
    assert_eq!(
        unreferenced_packs(&env, &name),
        Vec::<String>::new(),
        "no generation is left, nor any pack, after {point}"
    );
}

/// The `stasis checkpoint` client is killed while the supervisor checkpoints a large job:
/// the supervisor finishes or drops that checkpoint, the job runs on, and the next
/// checkpoint works.
#[test]
fn checkpoint_client_killed_midway() {
    let env = Env::new();
    let name = env.name("client");
    let mut job = env.start(
        &name,
        &program("memhog", false),
        &[env.work.to_str().unwrap(), "256"],
    );
    env.wait_output(&job, "READY\n");
    let mut client = env.cmd().args(["checkpoint", &name]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(60));
    client.kill().unwrap();
    client.wait().unwrap();
    let r = env.checkpoint(&name, false);
    assert!(r["generation"].as_u64().unwrap() >= 1, "{r}");
    for g in generations(&env, &name) {
        let dir = env.job_dir(&name).join(format!("gen-{g:04}"));
        env.ok(&["verify", dir.to_str().unwrap()]);
    }
    env.go();
    assert_eq!(job.wait(), 0, "{}", env.output(&job));
    assert_all_pass(&env.output(&job));
}

/// A process of the job is killed while the job is frozen: the checkpoint fails with an
/// error (it never hangs) and no generation is written.
#[test]
fn a_job_process_killed_during_the_checkpoint() {
    let env = Env::new();
    let name = env.name("victim");
    let mut job = start_with_fault(&env, &name, "kill-job-process");
    wait_ticks(&env, &job, 5);
    let t = Instant::now();
    let err = env.fails(&["checkpoint", &name]);
    assert!(t.elapsed() < Duration::from_secs(30), "no hang");
    assert!(err.contains("checkpoint"), "{err}");
    job.wait();
    assert!(generations(&env, &name).is_empty());
}

/// On a filesystem that refuses direct I/O (`STASIS_FAULT=no-direct-io` pretends so) packs
/// go through the page cache: a full and an incremental generation verify, and the
/// restarted program's memory checks out.
#[test]
fn packs_go_through_the_page_cache_where_direct_io_is_refused() {
    let env = Env::new();
    let name = env.name("cached");
    let work = env.work.to_str().unwrap();
    let vars = [("STASIS_FAULT", "no-direct-io")];
    let mut job = env.start_with_env(&name, &[], &program("memhog", false), &[work, "32"], &vars);
    env.wait_output(&job, "READY\n");
    env.checkpoint(&name, false);
    fs::write(env.work.join("touch"), b"").unwrap();
    env.wait_output(&job, "TOUCHED 1\n");
    env.checkpoint(&name, true);
    job.wait();
    assert_eq!(generations(&env, &name), vec![1, 2]);
    for g in [1, 2] {
        let dir = env.job_dir(&name).join(format!("gen-{g:04}"));
        env.ok(&["verify", dir.to_str().unwrap()]);
    }
    let mut restarted = env.restart(&job, &[]);
    env.go();
    assert_eq!(restarted.wait(), 0, "{}", env.stderr(&restarted));
    assert_all_pass(&env.output(&restarted));
}
