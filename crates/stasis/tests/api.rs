//! libstasis (issue 6): the examples in `examples/{c,rust,python}` run under the real
//! supervisor — callbacks in every phase (continue and restart) and their order, the callback
//! timeout, critical sections held by several threads (and one held through a checkpoint
//! request), checkpoints requested from inside (blocking and not, and from a signal handler),
//! a job of several processes, fork() — linked with `libstasis.so` and with `libstasis.a`, and
//! without Stasis (every call a no-op, no thread, no socket, the same output).
#![allow(missing_docs)]

mod common;

#[path = "../../../examples/rust/callbacks.rs"]
mod rust_example;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{EXIT_CHECKPOINTED, Env, Job, assert_all_pass, repo, stasis_bin};

/// Where `libstasis.so` and `libstasis.a` are: `$STASIS_TEST_LIB_DIR`, else in `deps/` next
/// to the `stasis` binary (where cargo builds them, as a dev-dependency of this package), else
/// next to it (the staged copy of `scripts/test.sh`).
fn lib_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STASIS_TEST_LIB_DIR") {
        return PathBuf::from(dir);
    }
    let bin = stasis_bin();
    let dir = bin.parent().expect("stasis binary has a directory");
    if dir.join("deps/libstasis.so").exists() {
        dir.join("deps")
    } else {
        dir.to_path_buf()
    }
}

/// Compiles `examples/c/callbacks.c` against `include/stasis.h` and `libstasis.so`.
fn c_example(env: &Env) -> PathBuf {
    compile_c_example(env, false)
}

/// Compiles `examples/c/callbacks.c` against `include/stasis.h` and `libstasis.a`.
fn c_example_static(env: &Env) -> PathBuf {
    compile_c_example(env, true)
}

fn compile_c_example(env: &Env, static_lib: bool) -> PathBuf {
    let lib = lib_dir();
    let file = if static_lib {
        "libstasis.a"
    } else {
        "libstasis.so"
    };
    assert!(lib.join(file).exists(), "no {file} in {}", lib.display());
    let out = env.work.join(if static_lib {
        "callbacks-static"
    } else {
        "callbacks"
    });
    let mut gcc = Command::new("gcc");
    gcc.args(["-O1", "-g", "-pthread", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(repo().join("include"))
        .arg("-o")
        .arg(&out)
        .arg(repo().join("examples/c/callbacks.c"));
    if static_lib {
        gcc.arg(lib.join(file));
    } else {
        gcc.arg("-L")
            .arg(&lib)
            .arg("-lstasis")
            // RPATH (not RUNPATH): found before $LD_LIBRARY_PATH, which cargo sets.
            .arg("-Wl,--disable-new-dtags")
            .arg(format!("-Wl,-rpath,{}", lib.display()));
    }
    let o = gcc.output().expect("gcc runs");
    assert!(
        o.status.success(),
        "gcc failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn work(env: &Env) -> &str {
    env.work.to_str().expect("utf-8 work dir")
}

/// The `EVENT …` lines of the output, in order.
fn events(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("EVENT "))
        .map(str::to_owned)
        .collect()
}

fn position(events: &[String], wanted: &str) -> usize {
    events
        .iter()
        .position(|e| e == wanted)
        .unwrap_or_else(|| panic!("no event {wanted:?} in {events:#?}"))
}

/// Checkpoint --kill, then restart; returns the restarted job.
fn kill_and_restart(env: &Env, job: &mut Job) -> Job {
    env.checkpoint(&job.name, true);
    assert_eq!(job.wait(), EXIT_CHECKPOINTED);
    env.restart(job, &[])
}

fn finish(env: &Env, job: &mut Job) {
    env.go();
    assert_eq!(job.wait(), 0, "{}{}", env.output(job), env.stderr(job));
    assert_all_pass(&env.output(job));
}

#[test]
fn c_callbacks_run_in_order_after_checkpoint_and_restart() {
    let env = Env::new();
    let prog = c_example(&env);
    let name = env.name("api-basic");
    let mut job = env.start_with(&name, &[], &prog, &[work(&env), "basic"]);
    env.wait_output(&job, "READY");
    assert!(env.output(&job).contains("ACTIVE 1"));
    let report = env.checkpoint(&name, false);
    assert_eq!(report["generation"], 1);
    env.wait_output(&job, "EVENT post first proc=0 gen=1 restart=0");
    let ev = events(&env.output(&job));
    let pre1 = position(&ev, "pre first proc=0 gen=1 restart=0");
    let pre2 = position(&ev, "pre second proc=0 gen=1 restart=0");
    let post = position(&ev, "post first proc=0 gen=1 restart=0");
    assert!(pre1 < pre2 && pre2 < post, "order: {ev:#?}");
    assert!(
        !ev.iter().any(|e| e.starts_with("restart")),
        "no restart yet: {ev:#?}"
    );

    let mut job = kill_and_restart(&env, &mut job);
    env.wait_output(&job, "EVENT restart first proc=0 gen=2 restart=1");
    let ev = events(&env.output(&job));
    position(&ev, "pre first proc=0 gen=2 restart=0");
    assert!(
        !ev.iter()
            .any(|e| e.starts_with("post") && e.contains("gen=2")),
        "no post-checkpoint callback after --kill: {ev:#?}"
    );
    finish(&env, &mut job);
}

#[test]
fn c_callback_overrunning_the_timeout_is_reported_and_the_checkpoint_proceeds() {
    let env = Env::new();
    let prog = c_example(&env);
    let name = env.name("api-slow");
    let mut job = env.start_with(
        &name,
        &["--callback-timeout", "500ms"],
        &prog,
        &[work(&env), "slow"],
    );
    env.wait_output(&job, "READY");
    let t0 = Instant::now();
    let report = env.checkpoint(&name, false);
    let took = t0.elapsed();
    // The callback sleeps 3 s; the checkpoint waited for it (about 0.5 s), then went on
    // without it (the callback had not ended when the checkpoint answered).
    assert!(
        took >= Duration::from_millis(450),
        "checkpoint took {took:?}"
    );
    let late = report["callbacks_late"].as_array().expect("callbacks_late");
    assert_eq!(late.len(), 1, "{report}");
    assert!(
        env.output(&job)
            .contains("EVENT pre slow-begin proc=0 gen=1")
    );
    assert!(!env.output(&job).contains("slow-end"));
    // The callback finishes after the checkpoint; post-checkpoint callbacks follow it.
    env.wait_output(&job, "EVENT post first proc=0 gen=1 restart=0");
    let ev = events(&env.output(&job));
    assert!(
        position(&ev, "pre slow-end proc=0 gen=1")
            < position(&ev, "post first proc=0 gen=1 restart=0")
    );
    // The next checkpoint is not confused by the late answer: it waits for this one's
    // callback (300 ms, within the timeout).
    let t0 = Instant::now();
    let report = env.checkpoint(&name, false);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(280),
        "second checkpoint took {took:?}"
    );
    assert_eq!(report["generation"], 2);
    assert!(report.get("callbacks_late").is_none(), "{report}");
    env.wait_output(&job, "EVENT post first proc=0 gen=2 restart=0");
    finish(&env, &mut job);
}

/// With `--callback-overrun fail`, callbacks that overrun the timeout make the checkpoint
/// fail: no generation is written, the job runs on, and the next checkpoint (whose callback
/// is quick) is taken.
#[test]
fn c_callback_overrun_can_fail_the_checkpoint() {
    let env = Env::new();
    let prog = c_example(&env);
    let name = env.name("api-fail");
    let mut job = env.start_with(
        &name,
        &["--callback-timeout", "500ms", "--callback-overrun", "fail"],
        &prog,
        &[work(&env), "slow"],
    );
    env.wait_output(&job, "READY");
    let err = env.fails(&["checkpoint", &name]);
    assert!(
        err.contains("did not finish within the callback timeout") && err.contains("runs on"),
        "{err}"
    );
    assert!(
        !env.job_dir(&name).join("gen-0001").exists(),
        "no generation was written"
    );
    env.wait_output(&job, "pre slow-end proc=0 gen=1");
    let report = env.checkpoint(&name, false);
    assert_eq!(report["generation"], 1, "{report}");
    env.wait_output(&job, "EVENT post first proc=0 gen=1 restart=0");
    finish(&env, &mut job);
}

#[test]
fn c_critical_sections_of_several_threads_keep_the_checkpoint_out() {
    let env = Env::new();
    let prog = c_example(&env);
    let name = env.name("api-crit");
    let mut job = env.start_with(&name, &[], &prog, &[work(&env), "critical"]);
    env.wait_output(&job, "READY");
    for g in 1..=3 {
        env.checkpoint(&name, false);
        env.wait_output(&job, &format!("EVENT post first proc=0 gen={g} restart=0"));
    }
    let mut job = kill_and_restart(&env, &mut job);
    env.wait_output(&job, "EVENT restart first proc=0 gen=4 restart=1");
    env.checkpoint(&name, false);
    env.wait_output(&job, "EVENT post first proc=0 gen=5 restart=0");
    // Any thread found inside a section by a post callback printed a FAIL line.
    finish(&env, &mut job);
}

#[test]
fn c_checkpoint_requested_from_inside_blocking_and_not() {
    let env = Env::new();
    let prog = c_example(&env);
    let name = env.name("api-req");
    let mut job = env.start_with(&name, &[], &prog, &[work(&env), "request"]);
    env.wait_output(&job, "NONBLOCKING-DONE");
    env.wait_output(&job, "CONTINUED");
    let out = env.output(&job);
    assert!(out.contains("REQUEST rc=0"), "{out}");
    // Generation 1 came from the non-blocking request, 2 from the blocking one.
    assert!(env.job_dir(&name).join("gen-0002").is_dir());
    assert!(!env.job_dir(&name).join("gen-0003").exists());
    env.ok(&["kill", &name]);
    job.wait();
    // Restarted from the blocking request's own checkpoint: the call returns again, saying so.
    let mut job = env.restart(&job, &["--generation", "2"]);
    env.wait_output(&job, "RESTARTED");
    env.wait_output(&job, "EVENT restart first proc=0 gen=2 restart=1");
    assert!(env.output(&job).contains("REQUEST rc=2"));
    finish(&env, &mut job);
}

#[test]
fn c_every_process_of_a_job_runs_its_callbacks() {
    let env = Env::new();
    let prog = c_example(&env);
    let name = env.name("api-multi");
    let mut job = env.start_with(&name, &[], &prog, &[work(&env), "multi"]);
    for p in 0..3 {
        env.wait_output(&job, &format!("READY proc={p}"));
    }
    env.checkpoint(&name, false);
    for p in 0..3 {
        env.wait_output(&job, &format!("EVENT post first proc={p} gen=1 restart=0"));
    }
    // Every process's pre-checkpoint callbacks finished before any process was frozen.
    let ev = events(&env.output(&job));
    let last_pre = (0..3)
        .map(|p| position(&ev, &format!("pre done proc={p} gen=1")))
        .max();
    let first_post = (0..3)
        .map(|p| position(&ev, &format!("post first proc={p} gen=1 restart=0")))
        .min();
    assert!(last_pre < first_post, "{ev:#?}");
    let mut job = kill_and_restart(&env, &mut job);
    for p in 0..3 {
        env.wait_output(
            &job,
            &format!("EVENT restart first proc={p} gen=2 restart=1"),
        );
    }
    finish(&env, &mut job);
}

/// The lines of a run without Stasis, sorted (the processes of `multi` and `fork` interleave
/// theirs).
fn sorted_lines(out: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort_unstable();
    lines
}

/// A forked child inherits none of its parent's registrations, thread or connection: the
/// middle process of three registers, forks and exits; its child registers its own callbacks,
/// and no checkpoint waits for the middle one (its connection is not kept open by the child).
/// A child forked inside a critical section is inside it, once.
#[test]
fn c_fork_children_inherit_nothing() {
    let env = Env::new();
    let prog = c_example(&env);
    let name = env.name("api-fork");
    let mut job = env.start_with(
        &name,
        &["--callback-timeout", "5s"],
        &prog,
        &[work(&env), "fork"],
    );
    env.wait_output(&job, "READY proc=0");
    env.wait_output(&job, "READY proc=2");
    let report = env.checkpoint(&name, false);
    assert_eq!(report["generation"], 1, "{report}");
    assert!(
        report.get("callbacks_late").is_none(),
        "a checkpoint waited for the exited middle process: {report}"
    );
    env.wait_output(&job, "EVENT post child proc=2 gen=1 restart=0");
    env.wait_output(&job, "EVENT post first proc=0 gen=1 restart=0");
    let ev = events(&env.output(&job));
    position(&ev, "pre first proc=0 gen=1 restart=0");
    position(&ev, "pre child proc=2 gen=1 restart=0");
    let mut job = kill_and_restart(&env, &mut job);
    env.wait_output(&job, "EVENT restart child proc=2 gen=2 restart=1");
    env.wait_output(&job, "EVENT restart first proc=0 gen=2 restart=1");
    let ev = events(&env.output(&job));
    // The middle process exited before any checkpoint; nobody inherited its callbacks or the
    // first process's.
    for e in &ev {
        let words: Vec<&str> = e.split(' ').collect();
        assert!(
            matches!(
                words[..],
                [_, "first" | "second", "proc=0", ..] | [_, "child", "proc=2", ..]
            ),
            "callbacks of a parent ran in a child: {e:?} in {ev:#?}"
        );
    }
    finish(&env, &mut job);
}

/// A checkpoint requested while a thread holds a critical section waits until it leaves
/// (the pre-checkpoint callbacks run meanwhile), and once they have run no thread enters a
/// new section until the checkpoint is over (its post-checkpoint callbacks done).
#[test]
fn c_critical_section_held_delays_the_checkpoint() {
    let env = Env::new();
    let prog = c_example(&env);
    let name = env.name("api-hold");
    let mut job = env.start_with(&name, &[], &prog, &[work(&env), "hold"]);
    env.wait_output(&job, "READY");
    let mut checkpoint = env
        .cmd()
        .args(["--json", "checkpoint", &name])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn stasis checkpoint");
    env.wait_output(&job, "EVENT pre second proc=0 gen=1 restart=0");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        checkpoint.try_wait().expect("try_wait").is_none(),
        "the checkpoint did not wait for the section: {}",
        env.output(&job)
    );
    assert!(!env.output(&job).contains("EVENT post"));
    std::fs::File::create(env.work.join("release")).expect("release file");
    let o = checkpoint.wait_with_output().expect("checkpoint ends");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("checkpoint prints JSON");
    assert_eq!(report["generation"], 1, "{report}");
    assert!(report.get("callbacks_late").is_none(), "{report}");
    env.wait_output(&job, "LATE-ENTERED");
    let out = env.output(&job);
    let line = |wanted: &str| {
        out.lines()
            .position(|l| l.starts_with(wanted))
            .unwrap_or_else(|| panic!("no {wanted:?} in {out}"))
    };
    assert!(
        line("RELEASING") < line("EVENT post first proc=0 gen=1"),
        "{out}"
    );
    assert!(
        line("EVENT post first proc=0 gen=1") < line("LATE-ENTERED"),
        "{out}"
    );
    assert!(out.contains("LATE-ENTERED post=1"), "{out}");
    finish(&env, &mut job);
}

/// A section held past `--callback-timeout` is reported like a slow callback (the process is
/// named as late) and the checkpoint proceeds; the section is left afterwards.
#[test]
fn c_critical_section_held_past_the_timeout_is_reported() {
    let env = Env::new();
    let prog = c_example(&env);
    let name = env.name("api-holdlate");
    let mut job = env.start_with(
        &name,
        &["--callback-timeout", "500ms"],
        &prog,
        &[work(&env), "hold"],
    );
    env.wait_output(&job, "READY");
    let report = env.checkpoint(&name, false);
    assert_eq!(report["generation"], 1, "{report}");
    let late = report["callbacks_late"].as_array().expect("callbacks_late");
    assert_eq!(late.len(), 1, "{report}");
    assert!(!env.output(&job).contains("RELEASING"));
    std::fs::File::create(env.work.join("release")).expect("release file");
    env.wait_output(&job, "RELEASING");
    env.wait_output(&job, "EVENT post first proc=0 gen=1 restart=0");
    finish(&env, &mut job);
}

/// `stasis_request_checkpoint(0)` from a signal handler that interrupts a thread busy in
/// malloc() and in the library's critical sections: each of three signals gets its checkpoint,
/// and errno is kept.
#[test]
fn c_checkpoint_requested_from_a_signal_handler() {
    let env = Env::new();
    let prog = c_example(&env);
    let name = env.name("api-signal");
    let mut job = env.start_with(&name, &[], &prog, &[work(&env), "signal"]);
    env.wait_output(&job, "SIGNALLED");
    for g in 1..=3 {
        env.wait_output(&job, &format!("EVENT post first proc=0 gen={g} restart=0"));
        assert!(env.job_dir(&name).join(format!("gen-000{g}")).is_dir());
    }
    assert!(!env.job_dir(&name).join("gen-0004").exists());
    finish(&env, &mut job);
}

/// The same program linked with `libstasis.a` instead of `libstasis.so`: callbacks after a
/// checkpoint and after a restart.
#[test]
fn c_static_library_under_stasis() {
    let env = Env::new();
    let prog = c_example_static(&env);
    let name = env.name("api-static");
    let mut job = env.start_with(&name, &[], &prog, &[work(&env), "basic"]);
    env.wait_output(&job, "READY");
    assert!(env.output(&job).contains("ACTIVE 1"));
    env.checkpoint(&name, false);
    env.wait_output(&job, "EVENT post first proc=0 gen=1 restart=0");
    let mut job = kill_and_restart(&env, &mut job);
    env.wait_output(&job, "EVENT restart first proc=0 gen=2 restart=1");
    finish(&env, &mut job);
}

#[test]
fn examples_without_stasis_are_unchanged() {
    let env = Env::new();
    let shared = c_example(&env);
    let static_lib = c_example_static(&env);
    env.go();
    for mode in [
        "basic", "slow", "critical", "request", "multi", "fork", "hold", "signal",
    ] {
        // Linked with the shared and the static library; not under Stasis at all, and with a
        // STASIS_CONTROL nobody listens on: the same output every time. The program itself
        // checks that the library started no thread and opened no socket.
        let mut first: Option<String> = None;
        for prog in [&shared, &static_lib] {
            for control in [None, Some(env.work.join("nobody.sock"))] {
                let mut cmd = Command::new(prog);
                cmd.args([work(&env), mode]).env_remove("STASIS_CONTROL");
                if let Some(c) = &control {
                    cmd.env("STASIS_CONTROL", c);
                }
                let o = cmd.output().expect("example runs");
                let out = String::from_utf8_lossy(&o.stdout).into_owned();
                let what = format!("{mode} {} {control:?}", prog.display());
                assert!(o.status.success(), "{what}: {out}");
                assert!(out.starts_with("ACTIVE 0\n"), "{what}: {out}");
                assert!(!out.contains("EVENT"), "{what}: {out}");
                assert!(
                    out.contains("PASS no thread of the library outside Stasis"),
                    "{what}: {out}"
                );
                assert_all_pass(&out);
                match &first {
                    None => first = Some(out),
                    Some(f) => assert_eq!(
                        sorted_lines(f),
                        sorted_lines(&out),
                        "{what}: not the same output"
                    ),
                }
            }
        }
    }
    let o = Command::new("python3")
        .arg(repo().join("examples/python/callbacks.py"))
        .arg(work(&env))
        .env("STASIS_LIB", lib_dir().join("libstasis.so"))
        .env_remove("STASIS_CONTROL")
        .output()
        .expect("python3 runs");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.starts_with("ACTIVE 0\n"), "{out}");
    assert_all_pass(&out);
    // The Rust example (this test binary, see `rust_example_entry`).
    let o = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "rust_example_entry", "--nocapture", "--quiet"])
        .args(["--test-threads=1"])
        .env("RUN_RUST_EXAMPLE", "1")
        .env("EXAMPLE_WORKDIR", &env.work)
        .env_remove("STASIS_CONTROL")
        .output()
        .expect("the Rust example runs");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.lines().any(|l| l == "ACTIVE 0"), "{out}");
    assert!(!out.contains("EVENT"), "{out}");
    assert_all_pass(&out);
}

/// The tests' binary itself runs the Rust example when `RUN_RUST_EXAMPLE` is set (it is then
/// the job's program); otherwise this does nothing.
#[test]
fn rust_example_entry() {
    if std::env::var_os("RUN_RUST_EXAMPLE").is_some() {
        rust_example::main();
        std::process::exit(0);
    }
}

#[test]
fn rust_and_python_examples_under_stasis() {
    let env = Env::new();
    let me = std::env::current_exe().expect("test binary");
    let python = Path::new("/usr/bin/python3");
    let rust_args = [
        "--exact",
        "rust_example_entry",
        "--nocapture",
        "--quiet",
        "--test-threads=1",
    ];
    let py_script = repo().join("examples/python/callbacks.py");
    let lib = lib_dir().join("libstasis.so");
    for (label, program, args) in [
        ("rust", me.as_path(), rust_args.to_vec()),
        (
            "python",
            python,
            vec![py_script.to_str().expect("utf-8"), work(&env)],
        ),
    ] {
        env.ungo();
        let name = env.name(&format!("api-{label}"));
        // Both examples find their work directory and the library in the environment.
        let mut job = {
            let out = env.work.join(format!("{name}.out"));
            let err = env.work.join(format!("{name}.err"));
            let child = env
                .cmd()
                .args(["run", "--name", &name, "--"])
                .arg(program)
                .args(&args)
                .env("RUN_RUST_EXAMPLE", "1")
                .env("EXAMPLE_WORKDIR", &env.work)
                .env("STASIS_LIB", &lib)
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&out).expect("out file"))
                .stderr(std::fs::File::create(&err).expect("err file"))
                .spawn()
                .expect("spawn stasis run");
            Job {
                name: name.clone(),
                child,
                out,
            }
        };
        env.wait_output(&job, "READY");
        assert!(env.output(&job).contains("ACTIVE 1"), "{label}");
        env.checkpoint(&name, false);
        env.wait_output(&job, &format!("EVENT post {label} gen=1 restart=0"));
        let ev = events(&env.output(&job));
        assert!(
            position(&ev, &format!("pre {label} gen=1 restart=0"))
                < position(&ev, &format!("post {label} gen=1 restart=0"))
        );
        let mut job = kill_and_restart(&env, &mut job);
        env.wait_output(&job, &format!("EVENT restart {label} gen=2 restart=1"));
        finish(&env, &mut job);
    }
}
