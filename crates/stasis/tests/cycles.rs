//! Repeated cycles on a multi-threaded, self-checking program: twenty rounds of
//! `checkpoint` (the job runs on), `checkpoint --kill`, `restart --detach`; then the program
//! finishes and must report that every one of its checks passed.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::{EXIT_CHECKPOINTED, Env, assert_all_pass, program};
use serde_json::Value;

const CYCLES: u32 = 20;

fn json(text: &str) -> Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Kills the job when the test ends, whatever happened.
struct KillOnDrop<'a>(&'a Env, String);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.stasis(&["kill", &self.1]);
    }
}

fn alive_lines(out: &str) -> usize {
    out.lines().filter(|l| l.starts_with("alive ")).count()
}

/// Waits until the program printed `more` new "alive" lines after `from`.
fn wait_progress(env: &Env, job: &common::Job, from: usize, more: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = alive_lines(&env.output(job));
        if n >= from + more {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "the program made no progress ({n} alive lines, wanted {}); output:\n{}\nlog:\n{}",
            from + more,
            env.output(job),
            fs::read_to_string(env.job_dir(&job.name).join("output.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn twenty_checkpoint_kill_restart_cycles() {
    let env = Env::new();
    let name = env.name("cycles");
    let prog = program("selfcheck", false);
    let mut job = env.start(&name, &prog, &[env.work.to_str().unwrap(), "3"]);
    let _guard = KillOnDrop(&env, name.clone());
    env.wait_output(&job, "READY");
    let mut seen = wait_progress(&env, &job, 0, 3);
    let out_path = fs::canonicalize(&job.out).unwrap();
    for cycle in 1..=CYCLES {
        let r = env.checkpoint(&name, false);
        assert_eq!(r["generation"], 2 * cycle - 1, "cycle {cycle}");
        assert_eq!(r["killed"], false);
        seen = wait_progress(&env, &job, seen, 2);

        let r = env.checkpoint(&name, true);
        assert_eq!(r["generation"], 2 * cycle, "cycle {cycle}");
        assert_eq!(r["killed"], true);
        if cycle == 1 {
            assert_eq!(job.wait(), EXIT_CHECKPOINTED, "{}", env.stderr(&job));
        }
        let stopped_at = env.output(&job).len();

        let t0 = Instant::now();
        let o = env.stasis(&["--json", "restart", &name, "--detach"]);
        let took = t0.elapsed();
        assert!(
            o.status.success(),
            "cycle {cycle}: restart --detach failed: {}{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
        assert!(
            took < Duration::from_secs(5),
            "cycle {cycle}: restart --detach took {took:?}"
        );
        let st = json(&String::from_utf8_lossy(&o.stdout));
        assert_eq!(st["name"], name.as_str());
        assert_eq!(st["state"], "running");
        assert_eq!(st["restarted_from"], 2 * cycle);
        let pid = st["pid"].as_i64().unwrap();
        // The restored program writes on into the same regular file, right where it stopped.
        let fd1 = fs::read_link(format!("/proc/{pid}/fd/1")).unwrap();
        assert_eq!(fd1, out_path, "cycle {cycle}: stdout is the same file");
        assert!(fs::metadata(&fd1).unwrap().is_file());
        let now = json(&env.ok(&["--json", "status", &name]));
        assert_eq!(now["pid"].as_i64(), Some(pid));
        assert_eq!(now["latest_generation"], 2 * cycle);
        seen = wait_progress(&env, &job, seen, 2);
        let out = env.output(&job);
        assert!(
            !out[..stopped_at].contains('\0') && !out[stopped_at..].contains('\0'),
            "cycle {cycle}: no hole in the output"
        );
        assert!(
            !out.contains("FAIL"),
            "cycle {cycle}: the program reports a failure:\n{out}"
        );
    }
    env.go();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !env.output(&job).contains("DONE") {
        assert!(
            Instant::now() < deadline,
            "the program did not finish:\n{}",
            env.output(&job)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The detached supervisor ends with its program.
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.stasis(&["status", &name]).status.success() {
        assert!(
            Instant::now() < deadline,
            "the detached supervisor did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = env.output(&job);
    assert_all_pass(&out);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("PASS thread")).count(),
        3,
        "{out}"
    );
    assert_eq!(
        out.matches("READY").count(),
        1,
        "the program started once:\n{out}"
    );
    let alive: Vec<usize> = out
        .lines()
        .filter_map(|l| l.strip_prefix("alive ")?.parse().ok())
        .collect();
    assert_eq!(
        alive,
        (1..=alive.len()).collect::<Vec<_>>(),
        "every progress line exactly once, in order"
    );
    let list = env.ok(&["--json", "list"]);
    let row = json(&list)
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name.as_str())
        .cloned()
        .unwrap();
    assert_eq!(
        row["generations"].as_array().unwrap().len(),
        2 * CYCLES as usize
    );
    env.ok(&["verify", env.job_dir(&name).to_str().unwrap()]);
}
