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

/// `tick N` lines. What comes before `tick` on a line is skipped: the job's terminal echoes
/// what reaches it from `script`'s input (at its end of file, `script` sends a control
/// character, echoed as `^@`).
fn ticks(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| {
            l[l.find("tick ")?..]
                .trim_end_matches('\r')
                .strip_prefix("tick ")?
                .parse()
                .ok()
        })
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
    // A job started on a terminal gets a pseudo-terminal of its own, saved with the job.
    for fd in 0..=2 {
        let f = if fd == 1 {
            file.clone()
        } else {
            saved_fd(&env, &name, fd)
        };
        assert_eq!(f["kind"], "pty", "fd {fd}: {f}");
        assert_eq!(f["master"], false, "fd {fd}: {f}");
    }
    let m = manifest(&env, &name);
    assert_eq!(m["ptys"][0]["job_terminal"], true, "{}", m["ptys"]);
    restart_into_file(&env, &name, &ticks(&read()));
}

/// The newest generation's manifest.
fn manifest(env: &Env, name: &str) -> Value {
    serde_json::from_str(
        env.ok(&["--json", "inspect", env.job_dir(name).to_str().unwrap()])
            .trim(),
    )
    .unwrap()
}

/// Runs `shell_command` under util-linux `script` (a new pty), input from a pipe, output
/// to `out`.
fn under_script(env: &Env, shell_command: &str, out: &std::path::Path) -> std::process::Child {
    Command::new("script")
        .args(["-qfec", shell_command, "/dev/null"])
        .env("STASIS_IMAGES", &env.images)
        .env("XDG_RUNTIME_DIR", &env.runtime)
        .env_remove("STASIS_LOG")
        .current_dir(&env.work)
        .stdin(Stdio::piped())
        .stdout(fs::File::create(out).unwrap())
        .stderr(fs::File::create(out.with_extension("err")).unwrap())
        .spawn()
        .expect("script (util-linux) runs")
}

/// Tick numbers of lines `tick N …`.
fn tick_numbers(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| {
            l[l.find("tick ")?..]
                .strip_prefix("tick ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

/// The program's terminal modes (set by itself), its foreground group and session
/// leadership, and its interrupt key survive checkpoint --kill and restart — on the restart
/// command's terminal (whose window size it then sees) and, detached, on a new
/// pseudo-terminal (with the saved window size).
#[test]
fn job_terminal_modes_foreground_group_and_interrupt_key_survive_restart() {
    use std::io::Write;
    let env = Env::new();
    let name = env.name("tty2");
    let prog = program("t_tty", false);
    let stasis = stasis_bin();
    let out1 = env.work.join("run.out");
    let mut run = under_script(
        &env,
        &format!(
            "stty cols 97 rows 30; '{}' run --name {name} -- '{}'",
            stasis.display(),
            prog.display()
        ),
        &out1,
    );
    let read1 = || fs::read_to_string(&out1).unwrap_or_default();
    let modes = "fg=1 leader=1 echo=0 icanon=0 vintr=7";
    wait_for(
        "the program's own modes",
        || read1().contains(&format!("{modes} cols=97")),
        read1,
    );
    // Ctrl-G, the program's interrupt character, interrupts its foreground group.
    run.stdin.as_mut().unwrap().write_all(b"\x07").unwrap();
    wait_for(
        "SIGINT from the terminal",
        || read1().contains("got SIGINT"),
        read1,
    );
    let r = env.checkpoint(&name, true);
    assert_eq!(r["generation"], 1);
    assert_eq!(
        run.wait().unwrap().code(),
        Some(EXIT_CHECKPOINTED),
        "{}",
        read1()
    );
    let m = manifest(&env, &name);
    let pty = &m["ptys"][0];
    assert_eq!(pty["job_terminal"], true, "{pty}");
    assert_eq!(pty["winsize"][1], 97, "{pty}");
    assert!(
        pty["session"].as_i64().is_some() && pty["foreground"].as_i64().is_some(),
        "{pty}"
    );

    // Restart on another terminal, 120 columns wide.
    let out2 = env.work.join("restart.out");
    let mut restart = under_script(
        &env,
        &format!(
            "stty cols 120 rows 30; '{}' restart {name}",
            stasis.display()
        ),
        &out2,
    );
    let read2 = || fs::read_to_string(&out2).unwrap_or_default();
    wait_for(
        "the restored modes on the restart command's terminal",
        || read2().contains(&format!("{modes} cols=120")),
        read2,
    );
    assert_eq!(count(&read2(), "got SIGINT"), 0, "{}", read2());
    restart.stdin.as_mut().unwrap().write_all(b"\x07").unwrap();
    wait_for(
        "SIGINT after the restart",
        || read2().contains("got SIGINT"),
        read2,
    );
    wait_for("more ticks", || tick_numbers(&read2()).len() > 4, read2);
    let after = read2();
    let before = tick_numbers(&read1());
    let numbers = tick_numbers(&after);
    assert!(numbers.len() > 2, "{after}");
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1) && numbers[0] <= before.last().unwrap() + 1,
        "ticks continue in order after {:?}: {after}",
        before.last()
    );
    assert!(
        !after.contains(" fg=0") && !after.contains("leader=0"),
        "{after}"
    );
    let r = env.checkpoint(&name, true);
    assert_eq!(r["generation"], 2);
    assert_eq!(
        restart.wait().unwrap().code(),
        Some(EXIT_CHECKPOINTED),
        "{}",
        read2()
    );

    // Detached: a new pseudo-terminal with the saved size; output goes to the log.
    env.ok(&["restart", &name, "--detach"]);
    let log = env.job_dir(&name).join("output.log");
    let read3 = || fs::read_to_string(&log).unwrap_or_default();
    let last_before = *tick_numbers(&read2()).last().unwrap();
    wait_for(
        "ticks of the detached job",
        || tick_numbers(&read3()).iter().any(|&t| t > last_before + 3),
        read3,
    );
    let log_text = read3();
    assert!(
        log_text.contains(&format!("{modes} cols=120")),
        "{log_text}"
    );
    env.ok(&["kill", &name]);
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
