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

#[test]
fn mpich_job_finishes_with_the_same_result_after_kill_and_restart() {
    let env = Env::new();
    let bin = env.work.join("mpiring");
    let src = common::repo().join("tests/programs/mpiring.c");
    let cc = Command::new("mpicc.mpich")
        .args(["-O1", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("mpicc runs (install Debian's mpich and libmpich-dev)");
    assert!(
        cc.status.success(),
        "mpicc: {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    // MPICH's default transports (UCX: SysV and POSIX shared memory, unix sockets, TCP).
    let mpiexec = |out: &std::path::Path| {
        let mut c = env.cmd();
        c.stdout(std::fs::File::create(out).expect("out"))
            .stderr(std::process::Stdio::piped());
        c
    };
    let plain = Command::new("mpiexec.mpich")
        .args(["-n", "4"])
        .arg(&bin)
        .arg("120")
        .output()
        .expect("mpiexec runs");
    let want = mpi_result(&String::from_utf8_lossy(&plain.stdout))
        .expect("an uninterrupted run prints RESULT");
    let name = env.name("mpi");
    let out = env.work.join("mpi.out");
    let mut job = mpiexec(&out)
        .args(["run", "--name", &name, "--", "mpiexec.mpich", "-n", "4"])
        .arg(&bin)
        .arg("120")
        .spawn()
        .expect("stasis run");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !std::fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("step 20 ")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the MPI job did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    env.checkpoint(&name, false);
    env.checkpoint(&name, true);
    assert_eq!(job.wait().expect("run").code(), Some(EXIT_CHECKPOINTED));
    let done = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(
        mpi_result(&done).is_none(),
        "the job was stopped before finishing"
    );
    let restarted = env
        .cmd()
        .args(["restart", &name])
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
    let steps: Vec<&str> = after.lines().filter(|l| l.starts_with("step ")).collect();
    assert_eq!(steps.len(), 120, "every step printed exactly once");
}
