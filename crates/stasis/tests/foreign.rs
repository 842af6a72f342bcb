//! `stasis checkpoint --pid`: a process tree that `stasis run` did not start is
//! checkpointed by its owner and restarted like any job.

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Env, assert_all_pass, program};
use serde_json::Value;

const TICKS: u64 = 150;

fn ticks(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .collect()
}

fn wait_ticks(path: &std::path::Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while ticks(&fs::read_to_string(path).unwrap_or_default()).len() < n {
        assert!(Instant::now() < deadline, "the program does not tick");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts the counter directly (not under Stasis), its stdout to a file.
fn plain_counter(env: &Env) -> (std::process::Child, std::path::PathBuf) {
    let out = env.work.join("plain.out");
    let child = Command::new(program("counter", false))
        .args([env.work.to_str().unwrap(), &TICKS.to_string()])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        // Not the test's own stderr: a file the test runner opened (a CI log owned by
        // another user) could not be opened again by the restarted program.
        .stderr(fs::File::create(env.work.join("plain.err")).unwrap())
        .spawn()
        .unwrap();
    (child, out)
}

fn restart_and_finish(env: &Env, name: &str, out: &std::path::Path, before: usize) {
    let restarted = env.cmd().args(["restart", name]).output().unwrap();
    let text = fs::read_to_string(out).unwrap();
    assert!(
        restarted.status.success(),
        "restart: {}\n{text}",
        String::from_utf8_lossy(&restarted.stderr)
    );
    assert_all_pass(&text);
    let all = ticks(&text);
    assert_eq!(
        all,
        (1..=TICKS).collect::<Vec<_>>(),
        "every tick once, {before} of them before the checkpoint"
    );
}

#[test]
fn a_process_not_started_by_stasis_is_checkpointed_killed_and_restarted() {
    let env = Env::new();
    let name = env.name("pid");
    let (mut child, out) = plain_counter(&env);
    wait_ticks(&out, 10);
    let pid = child.id().to_string();
    let r: Value = serde_json::from_str(
        env.ok(&["--json", "checkpoint", &name, "--pid", &pid, "--kill"])
            .trim(),
    )
    .unwrap();
    assert_eq!(
        (r["generation"].as_u64(), r["killed"].as_bool()),
        (Some(1), Some(true))
    );
    let status = child.wait().unwrap();
    assert!(!status.success(), "the process was ended by the checkpoint");
    let before = ticks(&fs::read_to_string(&out).unwrap()).len();
    restart_and_finish(&env, &name, &out, before);
}

#[test]
fn a_process_not_started_by_stasis_runs_on_after_a_checkpoint() {
    let env = Env::new();
    let name = env.name("pidc");
    let (mut child, out) = plain_counter(&env);
    wait_ticks(&out, 10);
    let pid = child.id().to_string();
    env.ok(&["checkpoint", &name, "--pid", &pid]);
    let at = ticks(&fs::read_to_string(&out).unwrap()).len();
    wait_ticks(&out, at + 5);
    // The original runs on; it is then ended, and the image restarted from the cut: the
    // restarted program rewrites the ticks after the cut (its file offset is the cut's).
    child.kill().unwrap();
    child.wait().unwrap();
    restart_and_finish(&env, &name, &out, at);
}

#[test]
fn checkpoint_pid_refuses_what_it_cannot_take() {
    let env = Env::new();
    let err = env.fails(&["checkpoint", "none", "--pid", "999999999"]);
    assert!(
        err.contains("999999999") && err.contains("does not exist"),
        "{err}"
    );
    let err = env.fails(&["checkpoint", "init", "--pid", "1"]);
    assert!(err.contains("process 1"), "{err}");
}
