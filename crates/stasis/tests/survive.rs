//! What must survive a checkpoint: threads (registers, extended FPU state, TLS, masks,
//! alternate stacks, rseq, robust lists, blocked syscalls), process state (signals, timers,
//! cwd, umask, rlimits, comm, /proc views, auxv, brk), descriptors and mappings, and an
//! unmodified python3. Each program checks itself after "go" (see `tests/programs`); each
//! is run through `checkpoint --kill` and restart, and through a checkpoint that leaves it
//! running, dynamic and static where that means something.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{EXIT_CHECKPOINTED, Env, Job, assert_all_pass, program};

/// The environment variable procstate expects, and its value.
const TEST_VAR: (&str, &str) = ("STASIS_TEST_VAR", "value from the test");

/// Like [`Env::start`], with extra environment variables for the job.
fn start_with_env(env: &Env, name: &str, prog: &Path, args: &[&str], vars: &[(&str, &str)]) -> Job {
    let out = env.work.join(format!("{name}.out"));
    let err = env.work.join(format!("{name}.err"));
    let mut cmd = env.cmd();
    cmd.args(["run", "--name", name, "--"])
        .arg(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("out file"))
        .stderr(std::fs::File::create(&err).expect("err file"));
    for (k, v) in vars {
        cmd.env(k, v);
    }
    Job {
        name: name.to_owned(),
        child: cmd.spawn().expect("spawn stasis run"),
        out,
    }
}

/// What to run: a program, its arguments after WORKDIR, extra environment.
struct Subject {
    prog: PathBuf,
    args: Vec<String>,
    vars: Vec<(&'static str, &'static str)>,
}

impl Subject {
    fn c(name: &str, static_link: bool) -> Subject {
        Subject {
            prog: program(name, static_link),
            args: vec![],
            vars: vec![],
        }
    }

    fn python() -> Subject {
        Subject {
            prog: PathBuf::from("/usr/bin/python3"),
            args: vec![
                common::repo()
                    .join("tests/programs/pystate.py")
                    .to_string_lossy()
                    .into_owned(),
            ],
            vars: vec![],
        }
    }

    fn with_var(mut self, var: (&'static str, &'static str)) -> Subject {
        self.vars.push(var);
        self
    }

    /// Starts it as job `name` with WORKDIR first, and waits for READY.
    fn start(&self, env: &Env, name: &str) -> Job {
        let work = env.work.to_string_lossy().into_owned();
        let mut args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        args.push(&work);
        let job = start_with_env(env, name, &self.prog, &args, &self.vars);
        env.wait_output(&job, "READY\n");
        job
    }
}

/// Output after the READY line.
fn after_ready(out: &str) -> &str {
    out.split_once("READY\n").map_or("", |(_, rest)| rest)
}

/// start → READY → `checkpoint --kill` → (dead for a while) → restart → go → all checks pass.
/// Returns the program's output.
fn kill_and_restart(s: &Subject, prefix: &str) -> String {
    let env = Env::new();
    let name = env.name(prefix);
    let mut job = s.start(&env, &name);
    let report = env.checkpoint(&name, true);
    assert_eq!(report["generation"], 1, "{report}");
    assert_eq!(report["killed"], true, "{report}");
    assert_eq!(
        job.wait(),
        EXIT_CHECKPOINTED,
        "run exits with the checkpointed status; stderr: {}",
        env.stderr(&job)
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        after_ready(&env.output(&job)),
        "",
        "nothing runs after checkpoint --kill"
    );
    let mut restarted = env.restart(&job, &[]);
    env.go();
    let code = restarted.wait();
    let out = env.output(&job);
    assert_eq!(
        code,
        0,
        "restarted program succeeds; output:\n{out}\nstasis stderr:\n{}",
        env.stderr(&job)
    );
    assert_all_pass(&out);
    out
}

/// start → READY → checkpoint (job keeps running) → go → all checks pass. Returns the env
/// and the job (finished) for further rounds.
fn checkpoint_and_continue(s: &Subject, prefix: &str) -> (Env, Job) {
    let env = Env::new();
    let name = env.name(prefix);
    let mut job = s.start(&env, &name);
    let report = env.checkpoint(&name, false);
    assert_eq!(report["generation"], 1, "{report}");
    assert_eq!(report["killed"], false, "{report}");
    env.go();
    let code = job.wait();
    let out = env.output(&job);
    assert_eq!(
        code,
        0,
        "the checkpointed program goes on and succeeds; output:\n{out}\nstasis stderr:\n{}",
        env.stderr(&job)
    );
    assert_all_pass(&out);
    (env, job)
}

// ---------- threads ----------

#[test]
fn threads_survive_kill_and_restart() {
    kill_and_restart(&Subject::c("threads", false), "threads");
}

#[test]
fn static_threads_survive_kill_and_restart() {
    kill_and_restart(&Subject::c("threads", true), "threads-static");
}

#[test]
fn threads_survive_a_checkpoint_that_continues() {
    checkpoint_and_continue(&Subject::c("threads", false), "threads-cont");
}

#[test]
fn static_threads_survive_a_checkpoint_that_continues() {
    checkpoint_and_continue(&Subject::c("threads", true), "threads-static-cont");
}

/// The generation written by a checkpoint that left the job running restarts after the job
/// has finished, and passes its checks a second time (threads.c writes no files).
#[test]
fn threads_restart_from_a_continue_checkpoint_after_the_job_finished() {
    let (env, job) = checkpoint_and_continue(&Subject::c("threads", false), "threads-again");
    // The restored stdout is reopened at its saved offset, just after READY: cut the first
    // run's checks off so that only the second run's remain.
    let out = env.output(&job);
    let ready_end = out.find("READY\n").expect("READY") + "READY\n".len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&job.out)
        .and_then(|f| f.set_len(ready_end as u64))
        .expect("truncate output");
    let mut restarted = env.restart(&job, &[]);
    let code = restarted.wait();
    let out = env.output(&job);
    assert_eq!(
        code,
        0,
        "restart of generation 1 succeeds; output:\n{out}\nstasis stderr:\n{}",
        env.stderr(&job)
    );
    assert_all_pass(&out);
}

// ---------- process state ----------

#[test]
fn procstate_survives_kill_and_restart() {
    kill_and_restart(
        &Subject::c("procstate", false).with_var(TEST_VAR),
        "procstate",
    );
}

#[test]
fn static_procstate_survives_kill_and_restart() {
    kill_and_restart(
        &Subject::c("procstate", true).with_var(TEST_VAR),
        "procstate-static",
    );
}

#[test]
fn procstate_survives_a_checkpoint_that_continues() {
    checkpoint_and_continue(
        &Subject::c("procstate", false).with_var(TEST_VAR),
        "procstate-cont",
    );
}

/// Periodic timers whose signals wait, blocked, at the cut: the kernel re-arms them only
/// when the signal is taken, and reports ITIMER_REAL as value 0 meanwhile (t_timers.c).
#[test]
fn timers_with_pending_signals_survive_kill_and_restart() {
    kill_and_restart(&Subject::c("t_timers", false), "timers");
}

#[test]
fn timers_with_pending_signals_survive_a_checkpoint_that_continues() {
    checkpoint_and_continue(&Subject::c("t_timers", false), "timers-cont");
}

// ---------- descriptors and mappings ----------

#[test]
fn fds_survive_kill_and_restart() {
    kill_and_restart(&Subject::c("fds", false), "fds");
}

#[test]
fn static_fds_survive_kill_and_restart() {
    kill_and_restart(&Subject::c("fds", true), "fds-static");
}

#[test]
fn fds_survive_a_checkpoint_that_continues() {
    checkpoint_and_continue(&Subject::c("fds", false), "fds-cont");
}

// ---------- python ----------

/// The RESULT line of pystate.
fn result_line(out: &str) -> Option<String> {
    out.lines()
        .find(|l| l.starts_with("RESULT "))
        .map(str::to_owned)
}

/// pystate run directly, without Stasis and without waiting: the reference result.
fn python_reference() -> String {
    let dir = tempfile::Builder::new()
        .prefix("stasis-pyref-")
        .tempdir()
        .expect("tempdir");
    std::fs::File::create(dir.path().join("go")).expect("go file");
    let o = Command::new("/usr/bin/python3")
        .arg(common::repo().join("tests/programs/pystate.py"))
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("python3 runs");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "uninterrupted pystate: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    result_line(&out).expect("RESULT line")
}

#[test]
fn python_survives_kill_and_restart() {
    let out = kill_and_restart(&Subject::python(), "python");
    assert!(out.contains("progress 150\n") && out.contains("progress 350\n"));
    assert_eq!(
        result_line(&out),
        Some(python_reference()),
        "same final value as an uninterrupted run"
    );
}

#[test]
fn python_survives_a_checkpoint_that_continues() {
    let (env, job) = checkpoint_and_continue(&Subject::python(), "python-cont");
    assert_eq!(
        result_line(&env.output(&job)),
        Some(python_reference()),
        "same final value as an uninterrupted run"
    );
}
