//! The main job end to end: checkpoint, kill, restart of single-threaded programs, dynamic
//! and static; checkpoint that leaves the job running; the built-in demo.

mod common;

use common::{EXIT_CHECKPOINTED, Env, assert_all_pass, program};

/// Ticks printed by the counter program, in order.
fn ticks(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .collect()
}

fn kill_and_restart(static_link: bool) {
    let env = Env::new();
    let name = env.name("counter");
    let prog = program("counter", static_link);
    let mut job = env.start(&name, &prog, &[env.work.to_str().unwrap(), "150"]);
    env.wait_output(&job, "tick 20\n");
    let report = env.checkpoint(&name, true);
    assert_eq!(report["generation"], 1);
    assert_eq!(
        job.wait(),
        EXIT_CHECKPOINTED,
        "run exits with the checkpointed status"
    );
    let at_kill = ticks(&env.output(&job)).len();
    // Keep the job dead longer than the program tolerates as a clock jump.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(
        ticks(&env.output(&job)).len(),
        at_kill,
        "nothing runs after checkpoint --kill"
    );
    let mut restarted = env.restart(&job, &[]);
    assert_eq!(
        restarted.wait(),
        0,
        "restarted program succeeds; stderr: {}",
        env.stderr(&job)
    );
    let out = env.output(&job);
    assert_eq!(
        ticks(&out),
        (1..=150).collect::<Vec<_>>(),
        "every tick exactly once, in order"
    );
    assert_all_pass(&out);
}

#[test]
fn dynamic_program_survives_kill_and_restart() {
    kill_and_restart(false);
}

#[test]
fn static_program_survives_kill_and_restart() {
    kill_and_restart(true);
}

#[test]
fn checkpoint_leaves_the_job_running() {
    let env = Env::new();
    let name = env.name("cont");
    let prog = program("counter", false);
    let mut job = env.start(&name, &prog, &[env.work.to_str().unwrap(), "100"]);
    env.wait_output(&job, "tick 10\n");
    for want in 1..=3 {
        let r = env.checkpoint(&name, false);
        assert_eq!(r["generation"], want);
        assert_eq!(r["killed"], false);
    }
    assert_eq!(job.wait(), 0);
    let out = env.output(&job);
    assert_eq!(ticks(&out), (1..=100).collect::<Vec<_>>());
    assert_all_pass(&out);
    let list = env.ok(&["list"]);
    assert!(
        list.contains(&name) && list.contains("3 (newest 3)"),
        "list shows the generations: {list}"
    );
}

#[test]
fn demo_finishes_with_the_right_answer() {
    let env = Env::new();
    let out = env.ok(&["demo", "--images", env.images.to_str().unwrap()]);
    assert!(
        out.contains("OK: the restarted job resumed mid-way"),
        "{out}"
    );
}

/// A checkpoint whose image cannot be written (the disk is "full": a 4 KiB file-size limit
/// makes every write past it fail with EFBIG, as ENOSPC would) fails with a clear error,
/// leaves no generation and no temporary directory behind, and the job runs on.
#[test]
fn a_checkpoint_that_cannot_be_written_leaves_the_job_running() {
    let env = Env::new();
    let name = env.name("full");
    let prog = program("counter", false);
    let out = env.work.join("full.out");
    let mut child = std::process::Command::new("prlimit")
        .arg("--fsize=4096")
        .arg(common::stasis_bin())
        .args(["run", "--name", &name, "--"])
        .arg(&prog)
        .args([env.work.to_str().unwrap(), "120"])
        .env("STASIS_IMAGES", &env.images)
        .env("XDG_RUNTIME_DIR", &env.runtime)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prlimit (util-linux) runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !std::fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("tick 10\n")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the job did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for kill in [false, true] {
        let mut args = vec!["checkpoint", name.as_str()];
        if kill {
            args.push("--kill");
        }
        let err = env.fails(&args);
        assert!(
            err.contains("the job runs on") && err.contains("File too large"),
            "{err}"
        );
    }
    let leftovers: Vec<String> = std::fs::read_dir(env.job_dir(&name))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        leftovers
            .iter()
            .all(|n| !n.starts_with("gen-") && !n.starts_with(".tmp")),
        "nothing half-written is left: {leftovers:?}"
    );
    assert_eq!(
        child.wait().unwrap().code(),
        Some(0),
        "the job ran to completion"
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(ticks(&text), (1..=120).collect::<Vec<_>>());
    assert_all_pass(&text);
}
