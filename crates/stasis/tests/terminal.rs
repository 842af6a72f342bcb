//! Standard streams that lead outside the job: a pseudo-terminal, and pipes read by the test.
//! After `checkpoint --kill`, `restart` with its stdout redirected to a file must connect the
//! program's stdout to that file: the program's further lines appear there.

mod common;

use std::fs;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{EXIT_CHECKPOINTED, Env, assert_all_pass, program, stasis_bin};
use serde_json::Value;

const TICKS: u64 = 150;

fn ticks(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("tick ")?.parse().ok())
        .collect()
}

/// Descriptor -> open-file record of the newest generation's only process.
fn saved_fd(env: &Env, name: &str, fd: i64) -> Value {
    let m: Value = serde_json::from_str(
        env.ok(&["--json", "inspect", env.job_dir(name).to_str().unwrap()])
            .trim(),
    )
    .unwrap();
    let p = &m["processes"][0];
    let entry = p["fds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["fd"] == fd)
        .unwrap_or_else(|| panic!("fd {fd} saved: {p}"));
    // Open files are a job-wide table (older images: per process).
    let files = if m["files"].is_array() {
        &m["files"]
    } else {
        &p["files"]
    };
    files[entry["file"].as_u64().unwrap() as usize].clone()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool, show: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            show()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Restarts the job (stdin /dev/null, stdout and stderr to files) and checks that the ticks
/// the program prints from then on land in the restart command's stdout, continuing exactly
/// after `before`, the ticks printed before the checkpoint.
fn restart_into_file(env: &Env, name: &str, before: &[u64]) {
    assert!(!before.is_empty());
    assert_eq!(
        before,
        (1..=before.len() as u64).collect::<Vec<_>>(),
        "ticks before the checkpoint"
    );
    let out_path = env.work.join(format!("{name}.restart.out"));
    let err_path = env.work.join(format!("{name}.restart.err"));
    let mut restart = env
        .cmd()
        .args(["restart", name])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = restart.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = restart.kill();
            panic!("the restarted job did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = fs::read_to_string(&out_path).unwrap();
    let err = fs::read_to_string(&err_path).unwrap();
    assert_eq!(status.code(), Some(0), "restart failed: {err}");
    let after = ticks(&out);
    assert_eq!(
        after,
        (before.len() as u64 + 1..=TICKS).collect::<Vec<_>>(),
        "the restarted program's lines go to the restart command's stdout (a file):\n{out}\nstderr of restart:\n{err}"
    );
    assert_all_pass(&out);
}

#[test]
fn terminal_stdout_is_reconnected_to_the_restart_commands_stdout() {
    let env = Env::new();
    let name = env.name("tty");
    let prog = program("counter", false);
    let tty_out = env.work.join("tty.out");
    let inner = format!(
        "'{}' run --name {name} -- '{}' '{}' {TICKS}",
        stasis_bin().display(),
        prog.display(),
        env.work.display()
    );
    // util-linux script: the job's stdin, stdout and stderr are the slave of a new pty.
    let mut script = Command::new("script")
        .args(["-qfec", &inner, "/dev/null"])
        .env("STASIS_IMAGES", &env.images)
        .env("XDG_RUNTIME_DIR", &env.runtime)
        .env_remove("STASIS_LOG")
        .current_dir(&env.work)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&tty_out).unwrap())
        .stderr(fs::File::create(env.work.join("script.err")).unwrap())
        .spawn()
        .expect("script (util-linux) runs");
    let read = || fs::read_to_string(&tty_out).unwrap_or_default();
    wait_for(
        "tick 20 on the terminal",
        || read().contains("tick 20\r\n"),
        read,
    );
    let file = saved_fd_after_kill(&env, &name);
    let status = script.wait().unwrap();
    assert_eq!(status.code(), Some(EXIT_CHECKPOINTED), "{}", read());
    for fd in 0..=2 {
        let f = if fd == 1 {
            file.clone()
        } else {
            saved_fd(&env, &name, fd)
        };
        assert_eq!(f["kind"], "stdio", "fd {fd}: {f}");
        assert!(
            f["path"].as_str().unwrap().starts_with("/dev/pts/"),
            "fd {fd} was the terminal: {f}"
        );
    }
    restart_into_file(&env, &name, &ticks(&read()));
}

/// `checkpoint --kill` of a job; returns the saved record of its fd 1.
fn saved_fd_after_kill(env: &Env, name: &str) -> Value {
    let r = env.checkpoint(name, true);
    assert_eq!(r["generation"], 1);
    saved_fd(env, name, 1)
}

#[test]
fn pipe_stdio_is_reconnected_to_the_restart_commands_stdio() {
    let env = Env::new();
    let name = env.name("pipe");
    let prog = program("counter", false);
    let mut child = env
        .cmd()
        .args(["run", "--name", &name, "--"])
        .arg(&prog)
        .args([env.work.to_str().unwrap(), &TICKS.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(env.work.join(format!("{name}.err"))).unwrap())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let seen = Arc::new(Mutex::new(String::new()));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
        })
    };
    let read = || seen.lock().unwrap().clone();
    wait_for("tick 20 in the pipe", || read().contains("tick 20\n"), read);
    let fd1 = saved_fd_after_kill(&env, &name);
    assert_eq!(child.wait().unwrap().code(), Some(EXIT_CHECKPOINTED));
    reader.join().unwrap();
    drop(stdin);
    for (fd, f) in [(0, saved_fd(&env, &name, 0)), (1, fd1)] {
        assert_eq!(f["kind"], "stdio", "fd {fd}: {f}");
        assert!(
            f["path"].as_str().unwrap().starts_with("pipe:["),
            "fd {fd} was a pipe to the test: {f}"
        );
    }
    restart_into_file(&env, &name, &ticks(&read()));
}
