//! Whole jobs: process trees (pids, parents, sessions, groups, zombies, orphans), pipes
//! between processes with data in flight, open file descriptions shared across fork, memory
//! shared between processes, real multi-process programs (a shell pipeline, a python
//! multiprocessing pool), refusals that must leave every process running, and repeated
//! cycles. Each program checks itself (see `tests/programs/tree.c` and `t_*`); each is run
//! through `checkpoint --kill` and restart, and through a checkpoint that leaves it running.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{EXIT_CHECKPOINTED, Env, Job, assert_all_pass, program};
use serde_json::Value;

/// What to run: a program and its arguments; `{work}` stands for the work directory.
struct Subject {
    prog: PathBuf,
    args: Vec<String>,
}

impl Subject {
    /// A C program of `tests/programs`, WORKDIR first, then `extra`.
    fn c(name: &str, extra: &[&str]) -> Subject {
        let mut args = vec!["{work}".to_owned()];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        Subject {
            prog: program(name, false),
            args,
        }
    }

    fn args(&self, env: &Env) -> Vec<String> {
        let work = env.work.to_string_lossy();
        self.args
            .iter()
            .map(|a| a.replace("{work}", &work))
            .collect()
    }

    fn start(&self, env: &Env, name: &str) -> Job {
        let args = self.args(env);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        env.start(name, &self.prog, &args)
    }
}

/// Output after the READY line.
fn after_ready(out: &str) -> &str {
    out.split_once("READY\n").map_or("", |(_, rest)| rest)
}

/// Kills the job when the test ends, whatever happened (for detached restarts).
struct KillOnDrop<'a>(&'a Env, String);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.stasis(&["kill", &self.1]);
    }
}

/// Waits (at most 20 s) for a `run`/`restart` command to exit; returns its exit code. On
/// timeout, kills it and fails with the program's output and stasis' stderr.
fn finish(env: &Env, job: &mut Job) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = job.child.try_wait().expect("try_wait") {
            return s.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = job.child.kill();
            let _ = job.child.wait();
            panic!(
                "job {} did not finish within 20 s; output:\n{}\nstasis stderr:\n{}",
                job.name,
                env.output(job),
                env.stderr(job)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Restarts the job and creates `go` once the job runs again (an inotify watch sees only
/// what happens after that).
fn restart_then_go(env: &Env, job: &Job) -> Job {
    let restarted = env.restart(job, &[]);
    let err = env.work.join(format!("{}.restart.err", job.name));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fs::read_to_string(&err)
        .unwrap_or_default()
        .contains("restarted")
    {
        assert!(
            Instant::now() < deadline,
            "restart did not report: {}",
            fs::read_to_string(&err).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    env.go();
    restarted
}

/// start → READY → `checkpoint --kill` → (dead for a while) → restart → go → every check
/// passes. Returns the env, the job and the program's output.
fn kill_and_restart(s: &Subject, prefix: &str) -> (Env, Job, String) {
    let env = Env::new();
    let name = env.name(prefix);
    let mut job = s.start(&env, &name);
    env.wait_output(&job, "READY\n");
    let report = env.checkpoint(&name, true);
    assert_eq!(report["generation"], 1, "{report}");
    assert_eq!(report["killed"], true, "{report}");
    assert_eq!(
        job.wait(),
        EXIT_CHECKPOINTED,
        "run exits with the checkpointed status; stderr: {}",
        env.stderr(&job)
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        after_ready(&env.output(&job)),
        "",
        "nothing runs after checkpoint --kill"
    );
    let mut restarted = restart_then_go(&env, &job);
    let code = finish(&env, &mut restarted);
    let out = env.output(&job);
    assert_eq!(
        code,
        0,
        "restarted program succeeds; output:\n{out}\nstasis stderr:\n{}",
        env.stderr(&job)
    );
    assert_all_pass(&out);
    (env, restarted, out)
}

/// start → READY → checkpoint (the job runs on) → go → every check passes.
fn checkpoint_and_continue(s: &Subject, prefix: &str) -> (Env, Job, String) {
    let env = Env::new();
    let name = env.name(prefix);
    let mut job = s.start(&env, &name);
    env.wait_output(&job, "READY\n");
    let report = env.checkpoint(&name, false);
    assert_eq!(report["generation"], 1, "{report}");
    assert_eq!(report["killed"], false, "{report}");
    env.go();
    let code = finish(&env, &mut job);
    let out = env.output(&job);
    assert_eq!(
        code,
        0,
        "the checkpointed program goes on and succeeds; output:\n{out}\nstasis stderr:\n{}",
        env.stderr(&job)
    );
    assert_all_pass(&out);
    (env, job, out)
}

// ---------- 1. process tree ----------

/// The tree program's own checks, plus: the root is pid 2 and every process reported.
fn check_tree(out: &str) {
    assert!(out.contains("root pid 2\n"), "the root is pid 2:\n{out}");
    for who in ["R", "A", "B", "C", "D", "E", "F", "O2"] {
        assert!(
            out.contains(&format!("PASS {who}: ids pid/ppid/pgrp/sid now")),
            "{who} checked its ids after the cut:\n{out}"
        );
    }
    for line in [
        "PASS R: child Z (3) exited with 42",
        "exited with 43 (status 0x2b00",
        "PASS O2: orphan O2 is init's child after the cut: got 1",
        "PASS R: every process finished: 7 passed, 0 failed",
    ] {
        assert!(out.contains(line), "missing {line:?}:\n{out}");
    }
}

#[test]
fn tree_survives_kill_and_restart() {
    let (_, _, out) = kill_and_restart(&Subject::c("tree", &["main"]), "tree");
    check_tree(&out);
}

/// The generation written while the tree ran on also restarts, after the job finished
/// (every pid is free again): the program passes its checks a second time.
#[test]
fn tree_survives_a_checkpoint_that_continues() {
    let (env, job, out) = checkpoint_and_continue(&Subject::c("tree", &["main"]), "tree-cont");
    check_tree(&out);
    // The restored stdout is reopened at its saved offset, just after READY: cut the first
    // run's checks off so that only the second run's remain.
    let ready_end = out.find("READY\n").expect("READY") + "READY\n".len();
    fs::OpenOptions::new()
        .write(true)
        .open(&job.out)
        .and_then(|f| f.set_len(ready_end as u64))
        .expect("truncate output");
    let mut restarted = env.restart(&job, &[]);
    let code = finish(&env, &mut restarted);
    let out = env.output(&job);
    assert_eq!(
        code,
        0,
        "output:\n{out}\nstasis stderr:\n{}",
        env.stderr(&job)
    );
    assert_all_pass(&out);
    check_tree(&out);
}

/// A zombie killed by a signal (SIGUSR2) before the cut is reaped after it, with that
/// signal as its status.
#[test]
fn a_zombie_killed_by_a_signal_survives_kill_and_restart() {
    let (_, _, out) = kill_and_restart(&Subject::c("tree", &["sigzombie"]), "tree-sigzombie");
    assert!(
        out.contains("PASS R: child ZS (3) killed by signal 12"),
        "{out}"
    );
}

#[test]
fn a_zombie_killed_by_a_signal_survives_a_checkpoint_that_continues() {
    let (_, _, out) =
        checkpoint_and_continue(&Subject::c("tree", &["sigzombie"]), "tree-sigzombie-cont");
    assert!(
        out.contains("PASS R: child ZS (3) killed by signal 12"),
        "{out}"
    );
}

/// Sessions and groups that inheritance alone cannot rebuild: each mode of tree.c checks
/// the ids of every process after the cut (see its header).
fn ids_case(mode: &str, who: &[&str]) {
    for kill in [true, false] {
        let s = Subject::c("tree", &[mode]);
        let (_, _, out) = if kill {
            kill_and_restart(&s, mode)
        } else {
            checkpoint_and_continue(&s, mode)
        };
        for w in who {
            assert!(
                out.contains(&format!("PASS {w}: ids pid/ppid/pgrp/sid now")),
                "{w} checked its ids (kill: {kill}):\n{out}"
            );
        }
    }
}

/// S forks S1 and then calls setsid(): S1 stays in the root's session and group.
#[test]
fn a_child_forked_before_its_parents_setsid_keeps_its_session() {
    ids_case("setsid-after-fork", &["R", "S", "S1"]);
}

/// GM is in the process group of GL, which exited (and was reaped) before the cut, while
/// GM's parent R lives: a keeper with GL's pid recreates the group for GM to join.
#[test]
fn a_process_group_whose_leader_exited_survives() {
    ids_case("dead-group-leader", &["R", "GM"]);
}

/// The daemon double fork: DB, an orphan, is in the session (and group) of DA, which
/// exited before the cut.
#[test]
fn an_orphan_in_a_session_whose_leader_exited_survives() {
    ids_case("dead-session-leader", &["R", "DB"]);
}

// ---------- 2. pipes ----------

fn check_pipes(out: &str) {
    for line in [
        "PASS root: pipe A holds 258944 bytes before the cut",
        "PASS root: pipe A size 262144 after the cut",
        "PASS root: pipe A: every record of W1 read exactly once",
        "PASS root: pipe A: every record of W2 read exactly once",
        "PASS R3: pipe B: 1000000 bytes until EOF",
        "PASS R3: pipe B: every byte as sent, in order",
        "PASS R3: pipe C (writer gone): 5000 bytes then EOF",
    ] {
        assert!(out.contains(line), "missing {line:?}:\n{out}");
    }
}

#[test]
fn pipes_between_processes_survive_kill_and_restart() {
    let (_, _, out) = kill_and_restart(&Subject::c("t_pipes", &[]), "pipes");
    check_pipes(&out);
}

#[test]
fn pipes_between_processes_survive_a_checkpoint_that_continues() {
    let (_, _, out) = checkpoint_and_continue(&Subject::c("t_pipes", &[]), "pipes-cont");
    check_pipes(&out);
}

// ---------- 3. shared open file descriptions ----------

fn check_sharedfd(env: &Env, out: &str) {
    for line in [
        "PASS root: shared offset right after the cut is 480",
        "PASS root: kcmp: K1's dup is the root's description",
        "PASS root: kcmp: K2's fd 50 is the root's description",
        "PASS root: kcmp: K1's own open is another description",
        "PASS K1: own description's offset is 16",
        "PASS K2: shared offset at the end is 960",
        "PASS K2: the shared offset was right after each of my writes",
        "PASS root: append.log holds every line once, in order (60 lines",
    ] {
        assert!(out.contains(line), "missing {line:?}:\n{out}");
    }
    let dat = fs::read_to_string(env.work.join("shared.dat")).unwrap();
    assert_eq!(dat.len(), 60 * 16, "shared.dat: {dat}");
    for (i, rec) in dat.as_bytes().chunks(16).enumerate() {
        assert!(
            rec.starts_with(format!("{i:05} ").as_bytes()),
            "record {i} of shared.dat: {dat}"
        );
    }
}

#[test]
fn shared_file_descriptions_survive_kill_and_restart() {
    let (env, _, out) = kill_and_restart(&Subject::c("t_sharedfd", &[]), "sharedfd");
    check_sharedfd(&env, &out);
}

#[test]
fn shared_file_descriptions_survive_a_checkpoint_that_continues() {
    let (env, _, out) = checkpoint_and_continue(&Subject::c("t_sharedfd", &[]), "sharedfd-cont");
    check_sharedfd(&env, &out);
}

// ---------- 4. shared memory ----------

/// Removes the program's POSIX shm objects, whatever happened.
struct ShmCleanup(PathBuf);

impl Drop for ShmCleanup {
    fn drop(&mut self) {
        let h = fnv1a(self.0.to_string_lossy().as_bytes());
        for s in ["a", "b"] {
            let _ = fs::remove_file(format!("/dev/shm/stasis-t-{h:08x}-{s}"));
        }
    }
}

/// The hash t_shm names its objects by (FNV-1a of the work directory).
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(2_166_136_261u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(16_777_619)
    })
}

fn check_shm(out: &str) {
    for region in ["anon", "shmA", "shmB", "memfd", "memfd partial"] {
        for who in ["P0", "C1", "C2", "C3", "C1a"] {
            let line = format!("PASS {who}: {region}: the turn word went round 20 times");
            assert!(out.contains(&line), "missing {line:?}:\n{out}");
        }
    }
    for line in [
        "PASS P0: every process's slot in every region survived",
        "PASS P0: pages written only by a process that exited before the cut survived",
        "PASS P0: shared counter is 200000",
        "PASS P0: shmA's file holds the data",
    ] {
        assert!(out.contains(line), "missing {line:?}:\n{out}");
    }
    assert_eq!(
        out.matches("private copy-on-write memory holds my own data")
            .count(),
        5,
        "{out}"
    );
}

#[test]
fn shared_memory_survives_kill_and_restart() {
    let env = Env::new();
    let _cleanup = ShmCleanup(env.work.clone());
    let s = Subject::c("t_shm", &[]);
    let name = env.name("shm");
    let mut job = s.start(&env, &name);
    env.wait_output(&job, "READY\n");
    let report = env.checkpoint(&name, true);
    assert_eq!(report["killed"], true, "{report}");
    assert_eq!(job.wait(), EXIT_CHECKPOINTED, "{}", env.stderr(&job));
    let mut restarted = restart_then_go(&env, &job);
    let code = finish(&env, &mut restarted);
    let out = env.output(&job);
    assert_eq!(
        code,
        0,
        "restarted program succeeds; output:\n{out}\nstasis stderr:\n{}",
        env.stderr(&job)
    );
    assert_all_pass(&out);
    check_shm(&out);
}

#[test]
fn shared_memory_survives_a_checkpoint_that_continues() {
    let env = Env::new();
    let _cleanup = ShmCleanup(env.work.clone());
    let s = Subject::c("t_shm", &[]);
    let name = env.name("shm-cont");
    let mut job = s.start(&env, &name);
    env.wait_output(&job, "READY\n");
    let report = env.checkpoint(&name, false);
    assert_eq!(report["killed"], false, "{report}");
    env.go();
    let code = finish(&env, &mut job);
    let out = env.output(&job);
    assert_eq!(
        code,
        0,
        "output:\n{out}\nstasis stderr:\n{}",
        env.stderr(&job)
    );
    assert_all_pass(&out);
    check_shm(&out);
}

// ---------- 5. real programs ----------

/// Lines in a file so far.
fn line_count(path: &Path) -> usize {
    fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

/// Waits until `path` has at least `n` lines.
fn wait_lines(env: &Env, job: &Job, path: &Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while line_count(path) < n {
        assert!(
            Instant::now() < deadline,
            "{} has {} lines, waited for {n}; output:\n{}\nstasis stderr:\n{}",
            path.display(),
            line_count(path),
            env.output(job),
            env.stderr(job)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

const PIPELINE_ITEMS: &str = "300";

fn pipeline_subject() -> Subject {
    Subject {
        prog: PathBuf::from("/bin/sh"),
        args: vec![
            common::repo()
                .join("tests/programs/t_pipeline.sh")
                .to_string_lossy()
                .into_owned(),
            "{work}".into(),
            program("t_producer", false).to_string_lossy().into_owned(),
            PIPELINE_ITEMS.into(),
        ],
    }
}

/// The pipeline run directly, without Stasis: (stdout, the stream file).
fn pipeline_reference() -> (String, String) {
    let dir = tempfile::Builder::new()
        .prefix("stasis-pipe-ref-")
        .tempdir()
        .expect("tempdir");
    let o = Command::new("/bin/sh")
        .arg(common::repo().join("tests/programs/t_pipeline.sh"))
        .arg(dir.path())
        .arg(program("t_producer", false))
        .arg(PIPELINE_ITEMS)
        .stdin(Stdio::null())
        .output()
        .expect("sh runs");
    assert!(o.status.success(), "uninterrupted pipeline: {o:?}");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(out.lines().count(), 301, "{out}");
    assert!(out.ends_with("END 0\n"), "{out}");
    (out, fs::read_to_string(dir.path().join("stream")).unwrap())
}

/// Two rounds of `checkpoint --kill` mid-stream and restart (the second one of the
/// restarted job), then the pipeline runs to its end.
#[test]
fn shell_pipeline_survives_kill_and_restart_mid_stream() {
    let (want_out, want_stream) = pipeline_reference();
    let env = Env::new();
    let name = env.name("pipeline");
    let mut job = pipeline_subject().start(&env, &name);
    let stream = env.work.join("stream");
    for (generation, lines) in [(1, 80), (2, 180)] {
        wait_lines(&env, &job, &stream, lines);
        let report = env.checkpoint(&name, true);
        assert_eq!(report["generation"], generation, "{report}");
        assert_eq!(report["killed"], true, "{report}");
        assert_eq!(job.wait(), EXIT_CHECKPOINTED, "{}", env.stderr(&job));
        let at_kill = line_count(&stream);
        assert!(at_kill < 300, "checkpointed mid-stream ({at_kill} lines)");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(line_count(&stream), at_kill, "nothing runs after --kill");
        assert_eq!(env.output(&job), "", "sort has printed nothing yet");
        job = env.restart(&job, &[]);
    }
    let code = finish(&env, &mut job);
    let out = env.output(&job);
    assert_eq!(
        code,
        0,
        "output:\n{out}\nstasis stderr:\n{}",
        env.stderr(&job)
    );
    assert_eq!(
        fs::read_to_string(&stream).unwrap(),
        want_stream,
        "tee's copy of the stream is the uninterrupted one"
    );
    assert_eq!(
        out, want_out,
        "the consumer's output is the uninterrupted one"
    );
}

#[test]
fn shell_pipeline_survives_checkpoints_that_continue() {
    let (want_out, want_stream) = pipeline_reference();
    let env = Env::new();
    let name = env.name("pipeline-cont");
    let mut job = pipeline_subject().start(&env, &name);
    let stream = env.work.join("stream");
    for (generation, lines) in [(1, 60), (2, 150)] {
        wait_lines(&env, &job, &stream, lines);
        let report = env.checkpoint(&name, false);
        assert_eq!(report["generation"], generation, "{report}");
    }
    let code = finish(&env, &mut job);
    let out = env.output(&job);
    assert_eq!(
        code,
        0,
        "output:\n{out}\nstasis stderr:\n{}",
        env.stderr(&job)
    );
    assert_eq!(fs::read_to_string(&stream).unwrap(), want_stream);
    assert_eq!(out, want_out);
}

fn pool_subject() -> Subject {
    Subject {
        prog: PathBuf::from("/usr/bin/python3"),
        args: vec![
            common::repo()
                .join("tests/programs/t_pool.py")
                .to_string_lossy()
                .into_owned(),
            "{work}".into(),
        ],
    }
}

fn result_line(out: &str) -> Option<String> {
    out.lines()
        .find(|l| l.starts_with("RESULT "))
        .map(str::to_owned)
}

/// The pool run directly, without Stasis: its RESULT line.
fn pool_reference() -> String {
    let dir = tempfile::Builder::new()
        .prefix("stasis-pool-ref-")
        .tempdir()
        .expect("tempdir");
    let o = Command::new("/usr/bin/python3")
        .arg(common::repo().join("tests/programs/t_pool.py"))
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("python3 runs");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "uninterrupted pool: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    result_line(&out).expect("RESULT line")
}

fn progress(out: &str) -> Vec<u32> {
    out.lines()
        .filter_map(|l| l.strip_prefix("progress ")?.parse().ok())
        .collect()
}

fn check_pool(out: &str, reference: &str) {
    assert_all_pass(out);
    assert_eq!(
        progress(out),
        (1..=150).collect::<Vec<_>>(),
        "every result exactly once, in order"
    );
    assert_eq!(
        result_line(out).as_deref(),
        Some(reference),
        "same result as an uninterrupted run"
    );
}

/// Two rounds of `checkpoint --kill` and restart (the second one of the restarted pool),
/// then the pool runs to its end.
#[test]
fn python_pool_survives_kill_and_restart() {
    let reference = pool_reference();
    let env = Env::new();
    let name = env.name("pool");
    let mut job = pool_subject().start(&env, &name);
    for (generation, at) in [(1, 40), (2, 100)] {
        env.wait_output(&job, &format!("progress {at}\n"));
        let report = env.checkpoint(&name, true);
        assert_eq!(report["generation"], generation, "{report}");
        assert_eq!(report["killed"], true, "{report}");
        assert_eq!(job.wait(), EXIT_CHECKPOINTED, "{}", env.stderr(&job));
        let at_kill = progress(&env.output(&job)).len();
        assert!(at_kill < 150, "checkpointed mid-way");
        job = env.restart(&job, &[]);
    }
    let code = finish(&env, &mut job);
    let out = env.output(&job);
    assert_eq!(
        code,
        0,
        "output:\n{out}\nstasis stderr:\n{}",
        env.stderr(&job)
    );
    check_pool(&out, &reference);
}

#[test]
fn python_pool_survives_checkpoints_that_continue() {
    let reference = pool_reference();
    let env = Env::new();
    let name = env.name("pool-cont");
    let mut job = pool_subject().start(&env, &name);
    for (generation, at) in [(1, 30), (2, 80)] {
        env.wait_output(&job, &format!("progress {at}\n"));
        let report = env.checkpoint(&name, false);
        assert_eq!(report["generation"], generation, "{report}");
    }
    let code = finish(&env, &mut job);
    let out = env.output(&job);
    assert_eq!(
        code,
        0,
        "output:\n{out}\nstasis stderr:\n{}",
        env.stderr(&job)
    );
    check_pool(&out, &reference);
}

// ---------- 6. refusals ----------

/// Beats of each process so far.
fn beats(out: &str, who: &str) -> usize {
    out.lines()
        .filter(|l| l.starts_with(&format!("beat {who} ")))
        .count()
}

/// The pid on the host (as `stasis` names it) of the process `job_pid` of job `name`: the
/// process in the pid namespace of the job's root whose innermost pid is `job_pid`.
fn host_pid(env: &Env, name: &str, job_pid: i32) -> i32 {
    let st = json(&env.ok(&["--json", "status", name]));
    let root = st["pid"].as_i64().expect("status has the root's pid");
    let ns = |p: &str| fs::read_link(format!("/proc/{p}/ns/pid")).ok();
    let root_ns = ns(&root.to_string()).expect("the root's pid namespace");
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|p| p.parse::<i32>().is_ok())
        .find(|p| {
            let inner = fs::read_to_string(format!("/proc/{p}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("NSpid:"))?
                        .split_whitespace()
                        .last()?
                        .parse::<i32>()
                        .ok()
                });
            inner == Some(job_pid) && ns(p).as_ref() == Some(&root_ns)
        })
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no process {job_pid} in job {name}"))
}

/// Runs t_holder in `mode`: every checkpoint (plain and --kill) must fail naming the holder
/// and `what`, leave every process running, write no generation; then the job finishes
/// and passes its checks.
fn refused(mode: &str, what: impl Fn(&str) -> Vec<String>) {
    let env = Env::new();
    let name = env.name(&format!("refuse-{mode}"));
    let mut job = Subject::c("t_holder", &[mode, "30"]).start(&env, &name);
    env.wait_output(&job, "READY\n");
    let out = env.output(&job);
    let holder = out
        .lines()
        .find_map(|l| l.strip_prefix(&format!("holder {mode} ")))
        .unwrap_or_else(|| panic!("holder line:\n{out}"))
        .to_owned();
    let field = |k: &str| {
        holder
            .split_whitespace()
            .find_map(|f| f.strip_prefix(&format!("{k}=")))
            .unwrap()
            .to_owned()
    };
    let (pid, fd) = (field("pid"), field("fd"));
    let host = host_pid(&env, &name, pid.parse().unwrap());
    for kill in [false, true] {
        let mut args = vec!["checkpoint", name.as_str()];
        if kill {
            args.push("--kill");
        }
        let err = env.fails(&args);
        assert!(
            err.contains(&format!("process {host}")) || err.contains(&format!("process {pid}")),
            "the error names the process (pid {pid} in the job, {host} on the host): {err}"
        );
        for w in what(&fd) {
            assert!(err.contains(&w), "the error names {w:?}: {err}");
        }
        // Every process runs on.
        let out = env.output(&job);
        let before: Vec<usize> = ["R", "W1", "W2", "W2a"]
            .iter()
            .map(|w| beats(&out, w))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = env.output(&job);
            let now: Vec<usize> = ["R", "W1", "W2", "W2a"]
                .iter()
                .map(|w| beats(&out, w))
                .collect();
            if now.iter().zip(&before).all(|(n, b)| *n >= b + 2) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "after a refused checkpoint (kill: {kill}) every process beats on: {before:?} → {now:?}\n{out}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            matches!(job.child.try_wait(), Ok(None)),
            "the job is still running"
        );
    }
    let leftovers: Vec<String> = fs::read_dir(env.job_dir(&name))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.contains("gen-"))
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "no generation written: {leftovers:?}");
    env.go();
    let code = finish(&env, &mut job);
    let out = env.output(&job);
    assert_eq!(
        code,
        0,
        "output:\n{out}\nstasis stderr:\n{}",
        env.stderr(&job)
    );
    assert_all_pass(&out);
}

/// The job is started by `stasis run` with its stdio on regular files: the error names the
/// descriptor (number and target) and why.
#[test]
fn a_pidfd_is_refused_and_the_job_runs_on() {
    refused("pidfd", |fd| {
        vec![
            format!("descriptor {fd} (anon_inode:[pidfd])"),
            "not supported".to_owned(),
        ]
    });
}

/// W2a shares W2's descriptor table (created with clone(CLONE_FILES)): restored the same
/// way, kcmp says the table is still W2's.
#[test]
fn a_descriptor_table_shared_with_the_parent_survives() {
    let line = "PASS W2a: my descriptor table is still W2's";
    held_resource_survives("clone-files", line, line);
}

/// A process already traced by another process of the job cannot be frozen: the processes
/// frozen before it must be let go.
#[test]
fn a_process_that_cannot_be_frozen_leaves_every_process_running() {
    refused("ptraced", |_| vec!["ptrace".to_owned()]);
}

/// An eventfd, a unix socketpair (at fds >= 3) and a FIFO held by a process at depth 2
/// are supported (they were refusals in earlier releases): they must come back working —
/// the eventfd with its count, the socketpair and the FIFO with their queued bytes.
/// Runs `t_holder` holding `resource` across checkpoint --kill/restart and across a
/// checkpoint that continues; each run's output must contain the expected line.
fn held_resource_survives(resource: &str, after_restart: &str, after_continue: &str) {
    let s = Subject::c("t_holder", &[resource, "0"]);
    let (_, _, out) = kill_and_restart(&s, resource);
    assert!(out.contains(after_restart), "{out}");
    let (_, _, out) = checkpoint_and_continue(&s, &format!("{resource}-cont"));
    assert!(out.contains(after_continue), "{out}");
}

#[test]
fn an_eventfd_deep_in_the_tree_survives() {
    let line = "PASS W2a: the eventfd still counts: read 12";
    held_resource_survives("eventfd", line, line);
}

#[test]
fn a_fifo_deep_in_the_tree_survives() {
    let line = "PASS W2a: the fifo delivers the queued ping";
    held_resource_survives("fifo", line, line);
}

/// An inotify watch of the work directory: its path is found from the inode the kernel
/// names, and the restored watch reports the creation of `go`.
#[test]
fn an_inotify_watch_deep_in_the_tree_survives() {
    let line = "PASS W2a: inotify reported the creation of go";
    held_resource_survives("inotify", line, line);
}

#[test]
fn a_socketpair_deep_in_the_tree_survives() {
    held_resource_survives(
        "socketpair",
        "PASS W2a: the socketpair delivers the queued ping",
        "PASS W2a: the socketpair carries a pong back",
    );
}

// ---------- 7. cycles ----------

fn json(text: &str) -> Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn alive(out: &str) -> Vec<usize> {
    out.lines()
        .filter_map(|l| l.strip_prefix("alive ")?.parse().ok())
        .collect()
}

/// Waits until the program printed `more` new "alive" lines after `from`.
fn wait_alive(env: &Env, job: &Job, from: usize, more: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = alive(&env.output(job)).len();
        if n >= from + more {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "no progress ({n} alive lines, wanted {}); output:\n{}\nlog:\n{}",
            from + more,
            env.output(job),
            fs::read_to_string(env.job_dir(&job.name).join("output.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn ten_cycles_of_a_multi_process_job() {
    const CYCLES: u64 = 10;
    let env = Env::new();
    let name = env.name("tree-cycles");
    let mut job = Subject::c("t_cycle", &[]).start(&env, &name);
    let _guard = KillOnDrop(&env, name.clone());
    env.wait_output(&job, "READY\n");
    let mut seen = wait_alive(&env, &job, 0, 2);
    for cycle in 1..=CYCLES {
        let r = env.checkpoint(&name, false);
        assert_eq!(r["generation"], 2 * cycle - 1, "cycle {cycle}");
        seen = wait_alive(&env, &job, seen, 2);
        let r = env.checkpoint(&name, true);
        assert_eq!(r["generation"], 2 * cycle, "cycle {cycle}");
        if cycle == 1 {
            assert_eq!(job.wait(), EXIT_CHECKPOINTED, "{}", env.stderr(&job));
        }
        let o = env.stasis(&["--json", "restart", &name, "--detach"]);
        assert!(
            o.status.success(),
            "cycle {cycle}: restart --detach failed: {}{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
        let st = json(&String::from_utf8_lossy(&o.stdout));
        assert_eq!(st["restarted_from"], 2 * cycle, "cycle {cycle}: {st}");
        seen = wait_alive(&env, &job, seen, 2);
        let out = env.output(&job);
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
            "the program did not finish:\n{}\nlog:\n{}",
            env.output(&job),
            fs::read_to_string(env.job_dir(&name).join("output.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = env.output(&job);
    assert_all_pass(&out);
    assert_eq!(out.matches("READY").count(), 1, "started once:\n{out}");
    let a = alive(&out);
    assert_eq!(
        a,
        (1..=a.len()).collect::<Vec<_>>(),
        "every progress line exactly once, in order"
    );
}
