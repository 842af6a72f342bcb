//! Real, unmodified programs under Stasis.

mod common;

use std::process::Command;

use common::{EXIT_CHECKPOINTED, Env};

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs (install Debian's redis-tools)");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A free loopback port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[test]
fn redis_keeps_its_keys_across_kill_and_restart() {
    let env = Env::new();
    let name = env.name("redis");
    let port = free_port();
    let p = port.to_string();
    let redis = std::path::Path::new("/usr/bin/redis-server");
    assert!(
        redis.exists(),
        "redis-server is needed (Debian's redis-server; scripts/test.sh installs it as root)"
    );
    let mut job = env.start(
        &name,
        redis,
        &[
            "--port",
            &p,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while redis_cli(port, &["ping"]) != "PONG" {
        assert!(
            std::time::Instant::now() < deadline,
            "redis did not start: {}",
            env.stderr(&job)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for i in 0..200 {
        assert_eq!(
            redis_cli(port, &["set", &format!("key{i}"), &format!("value{i}")]),
            "OK"
        );
    }
    redis_cli(port, &["rpush", "list", "a", "b", "c"]);
    env.checkpoint(&name, true);
    assert_eq!(job.wait(), EXIT_CHECKPOINTED);
    assert_ne!(
        redis_cli(port, &["ping"]),
        "PONG",
        "the server is gone after checkpoint --kill"
    );
    let mut restarted = env.restart(&job, &[]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while redis_cli(port, &["ping"]) != "PONG" {
        assert!(
            std::time::Instant::now() < deadline,
            "restored redis does not answer: {}",
            env.stderr(&job)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(redis_cli(port, &["dbsize"]), "201");
    for i in (0..200).step_by(17) {
        assert_eq!(
            redis_cli(port, &["get", &format!("key{i}")]),
            format!("value{i}")
        );
    }
    assert_eq!(redis_cli(port, &["lrange", "list", "0", "-1"]), "a\nb\nc");
    assert_eq!(redis_cli(port, &["set", "after", "restart"]), "OK");
    assert_eq!(redis_cli(port, &["get", "after"]), "restart");
    redis_cli(port, &["shutdown", "nosave"]);
    assert_eq!(
        restarted.wait(),
        0,
        "redis exits cleanly after restart: {}",
        env.stderr(&job)
    );
}

/// The last `RESULT` line of an MPI run's output.
fn mpi_result(out: &str) -> Option<String> {
    out.lines()
        .rev()
        .find(|l| l.starts_with("RESULT"))
        .map(str::to_owned)
}

/// An MPI implementation from Debian's packages: its compiler wrapper and its launcher
/// (named explicitly: another MPI installed on the machine may own the generic names).
struct Mpi {
    cc: &'static str,
    launcher: &'static [&'static str],
}

const MPICH: Mpi = Mpi {
    cc: "mpicc.mpich",
    launcher: &["mpiexec.mpich", "-n", "4"],
};

const OPEN_MPI: Mpi = Mpi {
    cc: "mpicc.openmpi",
    // Open MPI's launcher gives every rank a pseudo-terminal for its output: lines queued
    // in them at the cut are part of the image.
    launcher: &["mpirun.openmpi", "--oversubscribe", "-n", "4"],
};

impl Mpi {
    /// Compiles tests/programs/mpiring.c.
    fn build(&self, env: &Env) -> std::path::PathBuf {
        let bin = env.work.join(format!("mpiring-{}", self.cc));
        let src = common::repo().join("tests/programs/mpiring.c");
        let cc = Command::new(self.cc)
            .args(["-O1", "-o"])
            .arg(&bin)
            .arg(&src)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "{} runs (install Debian's mpich, libmpich-dev, openmpi-bin, libopenmpi-dev): {e}",
                    self.cc
                )
            });
        assert!(
            cc.status.success(),
            "{}: {}",
            self.cc,
            String::from_utf8_lossy(&cc.stderr)
        );
        bin
    }

    /// The launcher command line for `steps` steps with `pause_ms` between them.
    fn command(&self, bin: &std::path::Path, steps: u32, pause_ms: u32) -> Vec<String> {
        let mut v: Vec<String> = self.launcher.iter().map(|s| s.to_string()).collect();
        v.push(bin.display().to_string());
        v.push(steps.to_string());
        v.push(pause_ms.to_string());
        v
    }

    /// The output of an uninterrupted run, not under Stasis.
    fn reference(&self, bin: &std::path::Path, steps: u32) -> String {
        let cmd = self.command(bin, steps, 0);
        let out = open_mpi_env(Command::new(&cmd[0]))
            .args(&cmd[1..])
            .output()
            .expect("the MPI launcher runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Open MPI refuses root unless told it is fine (CI runs as root); harmless otherwise.
fn open_mpi_env(mut c: Command) -> Command {
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c
}

fn wait_for_file(path: &std::path::Path, what: &str, cond: impl Fn(&str) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if cond(&text) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what} in {}:\n{text}",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Step numbers and values printed by rank 0.
fn steps(out: &str) -> Vec<(u32, String)> {
    out.lines()
        .filter_map(|l| {
            let mut f = l.strip_prefix("step ")?.split_whitespace();
            Some((f.next()?.parse().ok()?, f.next()?.to_owned()))
        })
        .collect()
}

/// A 4-rank job of `mpi`: checkpoint (continue), checkpoint --kill, restart; it finishes
/// with the result of an uninterrupted run, every step printed exactly once.
fn mpi_job_finishes_with_the_same_result_after_kill_and_restart(mpi: &Mpi) {
    let env = Env::new();
    let bin = mpi.build(&env);
    let want = mpi_result(&mpi.reference(&bin, 120)).expect("an uninterrupted run prints RESULT");
    let name = env.name("mpi");
    let out = env.work.join("mpi.out");
    let mut job = open_mpi_env(env.cmd())
        .args(["run", "--name", &name, "--"])
        .args(mpi.command(&bin, 120, 20))
        .stdout(std::fs::File::create(&out).expect("out"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("stasis run");
    wait_for_file(&out, "step 20", |t| t.contains("step 20 "));
    env.checkpoint(&name, false);
    env.checkpoint(&name, true);
    assert_eq!(job.wait().expect("run").code(), Some(EXIT_CHECKPOINTED));
    let done = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(
        mpi_result(&done).is_none(),
        "the job was stopped before finishing"
    );
    let restarted = open_mpi_env(env.cmd())
        .args(["restart", &name])
        .stdout(std::fs::OpenOptions::new().append(true).open(&out).unwrap())
        .output()
        .expect("stasis restart");
    assert!(
        restarted.status.success(),
        "restart: {}",
        String::from_utf8_lossy(&restarted.stderr)
    );
    let after = std::fs::read_to_string(&out).unwrap_or_default();
    assert_eq!(
        mpi_result(&after),
        Some(want),
        "same result as an uninterrupted run"
    );
    let numbers: Vec<u32> = steps(&after).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        numbers,
        (1..=120).collect::<Vec<_>>(),
        "every step printed exactly once"
    );
}

#[test]
fn mpich_job_finishes_with_the_same_result_after_kill_and_restart() {
    mpi_job_finishes_with_the_same_result_after_kill_and_restart(&MPICH);
}

#[test]
fn open_mpi_job_finishes_with_the_same_result_after_kill_and_restart() {
    mpi_job_finishes_with_the_same_result_after_kill_and_restart(&OPEN_MPI);
}

/// 20 checkpoints that let the job continue, then 20 checkpoint --kill / restart cycles of
/// a 4-rank MPICH job: every step is printed exactly once across all the runs, with the
/// value of an uninterrupted run. (The job's stdout is a file: each restart reopens it at
/// the saved offset.)
#[test]
fn mpich_job_survives_twenty_cycles_of_each_kind() {
    const CYCLES: usize = 20;
    let mpi = &MPICH;
    let env = Env::new();
    let bin = mpi.build(&env);
    let name = env.name("mpicyc");
    let out = env.work.join("mpi.out");
    let spawn = |args: Vec<String>, stdout: std::fs::File, log: &str| {
        open_mpi_env(env.cmd())
            .args(args)
            .stdout(stdout)
            .stderr(std::fs::File::create(env.work.join(log)).expect("log"))
            .spawn()
            .expect("stasis")
    };
    let mut args = vec![
        "run".to_owned(),
        "--name".to_owned(),
        name.clone(),
        "--".to_owned(),
    ];
    args.extend(mpi.command(&bin, 1_000_000, 20));
    let mut sup = spawn(args, std::fs::File::create(&out).expect("out"), "run.err");
    let last_step = || {
        steps(&std::fs::read_to_string(&out).unwrap_or_default())
            .last()
            .map_or(0, |s| s.0)
    };
    let progress = |seen: u32, what: &str| {
        wait_for_file(&out, what, |t| steps(t).last().is_some_and(|s| s.0 > seen));
    };
    progress(4, "step 5");
    for _ in 0..CYCLES {
        let seen = last_step();
        let r = env.checkpoint(&name, false);
        assert_eq!(r["killed"], false);
        progress(seen, "progress after a checkpoint");
    }
    for i in 0..CYCLES {
        env.checkpoint(&name, true);
        let code = sup.wait().expect("supervisor").code();
        assert_eq!(code, Some(EXIT_CHECKPOINTED), "cycle {i}");
        let seen = last_step();
        let log = format!("restart-{i:02}.err");
        let null = std::fs::File::create("/dev/null").expect("/dev/null");
        sup = spawn(vec!["restart".into(), name.clone()], null, &log);
        progress(seen, "progress after a restart");
    }
    env.ok(&["kill", &name]);
    let _ = sup.wait();
    let printed = steps(&std::fs::read_to_string(&out).unwrap_or_default());
    let last = printed.last().expect("steps printed").0;
    let reference = steps(&mpi.reference(&bin, last));
    assert_eq!(
        printed.iter().map(|s| s.0).collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>(),
        "every step printed exactly once, in order, across {} runs",
        CYCLES + 1
    );
    for ((n, got), (_, want)) in printed.iter().zip(&reference) {
        assert_eq!(got, want, "step {n} diverged from an uninterrupted run");
    }
}
