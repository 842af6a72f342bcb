//! The command line: detached jobs with status, list, kill, inspect and verify (text and
//! JSON); clear refusals (missing program, duplicate or invalid names, restart of a running
//! job); and privacy: image files, directories and the control socket belong to the owner
//! only, and another user cannot control a job.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{EXIT_CHECKPOINTED, Env, assert_all_pass, program, stasis_bin};
use serde_json::Value;

fn json(text: &str) -> Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn my_uid() -> u32 {
    fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Asserts a clean failure (exit 1, no panic); returns stderr + stdout.
fn refused(env: &Env, args: &[&str]) -> String {
    let o = env.stasis(args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        !text.contains("panicked"),
        "stasis {args:?} panicked:\n{text}"
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "stasis {args:?} should be refused with an error:\n{text}"
    );
    text
}

/// Kills a detached job when the test ends, whatever happened.
struct KillOnDrop<'a>(&'a Env, String);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.stasis(&["kill", &self.1]);
    }
}

/// Waits until `stasis status NAME` fails (the supervisor is gone).
fn wait_gone(env: &Env, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.stasis(&["status", name]).status.success() {
        assert!(Instant::now() < deadline, "job {name} is still running");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_file_contains(path: &Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = fs::read_to_string(path).unwrap_or_default();
        if s.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never contained {needle:?}:\n{s}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ns_pid(pid: i64) -> i64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|v| v.split_whitespace().last()?.parse().ok())
        .unwrap()
}

#[test]
fn detached_job_status_list_inspect_verify_kill() {
    let env = Env::new();
    let name = env.name("detached");
    let prog = program("counter", false);
    let t0 = Instant::now();
    let started = json(&env.ok(&[
        "--json",
        "run",
        "--detach",
        "--name",
        &name,
        "--",
        prog.to_str().unwrap(),
        env.work.to_str().unwrap(),
        "100000",
    ]));
    let _guard = KillOnDrop(&env, name.clone());
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "run --detach returns at once"
    );
    assert_eq!(started["name"], name.as_str());
    assert_eq!(started["state"], "running");
    let log = env.job_dir(&name).join("output.log");
    wait_file_contains(&log, "tick 5\n");

    let st = json(&env.ok(&["--json", "status", &name]));
    assert_eq!(st["name"], name.as_str());
    assert_eq!(st["state"], "running");
    let pid = st["pid"].as_i64().expect("pid");
    assert_eq!(pid, started["pid"].as_i64().unwrap());
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).expect("the job's process exists");
    assert!(
        String::from_utf8_lossy(&cmdline).contains("counter"),
        "pid {pid} is the program"
    );
    assert_eq!(
        st["job_pid"].as_i64().expect("job_pid"),
        ns_pid(pid),
        "job_pid is the program's pid inside its pid namespace"
    );
    let ns = &st["namespaces"];
    for k in ["user", "pid", "time"] {
        assert!(ns[k].is_boolean(), "namespaces.{k} in {st}");
    }
    assert!(ns["notes"].is_array(), "{st}");
    if ns["pid"] == true {
        assert_ne!(st["job_pid"], st["pid"]);
    }
    let text = env.ok(&["status", &name]);
    assert!(
        text.contains(&name) && text.contains("running") && text.contains(&pid.to_string()),
        "{text}"
    );

    let find = |list: &Value| -> Value {
        list.as_array()
            .expect("list is an array")
            .iter()
            .find(|r| r["name"] == name.as_str())
            .cloned()
            .unwrap_or_else(|| panic!("{name} missing from {list}"))
    };
    let row = find(&json(&env.ok(&["--json", "list"])));
    assert_eq!(row["running"], true);
    assert_eq!(row["pid"].as_i64(), Some(pid));
    assert_eq!(row["generations"], serde_json::json!([]));

    let r = env.checkpoint(&name, false);
    assert_eq!(r["generation"], 1);
    let row = find(&json(&env.ok(&["--json", "list"])));
    assert_eq!(row["generations"], serde_json::json!([1]));
    let text = env.ok(&["list"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with(&name) && l.contains("running")),
        "{text}"
    );

    let job_dir = env.job_dir(&name);
    let m = json(&env.ok(&["--json", "inspect", job_dir.to_str().unwrap()]));
    assert_eq!(m["job"]["name"], name.as_str());
    assert_eq!(m["job"]["generation"], 1);
    assert_eq!(m["job"]["reason"], "checkpoint");
    assert_eq!(m["processes"][0]["threads"].as_array().unwrap().len(), 1);
    let nchunks = m["chunks"]["count"].as_u64().unwrap();
    assert!(nchunks > 0);
    assert!(
        m["chunks"]["raw_bytes"].as_u64().unwrap() >= m["chunks"]["new_bytes"].as_u64().unwrap()
    );
    let text = env.ok(&["inspect", job_dir.join("gen-0001").to_str().unwrap()]);
    assert!(
        text.contains(&format!("generation 1 of job \"{name}\""))
            && text.contains("1 thread(s)")
            && text.contains(prog.to_str().unwrap())
            && text.contains("[heap]"),
        "{text}"
    );
    let v = json(&env.ok(&["--json", "verify", job_dir.to_str().unwrap()]));
    assert_eq!(v["generation"], 1);
    assert_eq!(v["processes"], 1);
    assert_eq!(v["chunks"].as_u64(), Some(nchunks));
    assert!(v["raw_bytes"].as_u64().unwrap() > 0);
    assert!(v["stored_bytes"].as_u64().unwrap() > 0);
    let text = env.ok(&["verify", job_dir.to_str().unwrap()]);
    assert!(text.contains("OK"), "{text}");

    let text = env.ok(&["kill", &name]);
    assert!(text.contains("killed"), "{text}");
    wait_gone(&env, &name);
    let text = refused(&env, &["status", &name]);
    assert!(text.contains("no running job"), "{text}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "the program survived kill");
        std::thread::sleep(Duration::from_millis(20));
    }
    let row = find(&json(&env.ok(&["--json", "list"])));
    assert_eq!(row["running"], false);
    assert_eq!(row["generations"], serde_json::json!([1]));
    assert!(
        !env.runtime
            .join("stasis")
            .join(format!("{name}.sock"))
            .exists(),
        "the control socket is removed"
    );
}

#[test]
fn missing_program_is_a_clear_error() {
    let env = Env::new();
    let not_exec = env.work.join("not-executable");
    fs::write(&not_exec, b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(&not_exec, fs::Permissions::from_mode(0o644)).unwrap();
    let cases = [
        ("/nonexistent/program", "No such file"),
        ("no-such-program-anywhere", "not found in PATH"),
        (not_exec.to_str().unwrap(), "ermission denied"),
    ];
    for detach in [false, true] {
        for (prog, why) in cases {
            let name = env.name("missing");
            let mut args = vec!["run", "--name", &name];
            if detach {
                args.push("--detach");
            }
            args.extend(["--", prog, "arg"]);
            let t0 = Instant::now();
            let text = refused(&env, &args);
            assert!(
                text.contains(prog) && text.contains("cannot start") && text.contains(why),
                "run {prog} (detach: {detach}): {text}"
            );
            assert!(t0.elapsed() < Duration::from_secs(10));
            let text = refused(&env, &["status", &name]);
            assert!(text.contains("no running job"), "{text}");
            assert!(
                !env.runtime
                    .join("stasis")
                    .join(format!("{name}.sock"))
                    .exists(),
                "no control socket is left behind"
            );
        }
    }
}

#[test]
fn duplicate_name_and_restart_of_a_running_job_are_refused() {
    let env = Env::new();
    let name = env.name("dup");
    let prog = program("counter", false);
    let mut job = env.start(&name, &prog, &[env.work.to_str().unwrap(), "150"]);
    env.wait_output(&job, "tick 5\n");
    let pid = json(&env.ok(&["--json", "status", &name]))["pid"].clone();
    assert_eq!(env.checkpoint(&name, false)["generation"], 1);
    for detach in [false, true] {
        let mut args = vec!["run", "--name", name.as_str()];
        if detach {
            args.push("--detach");
        }
        args.extend(["--", "/bin/sleep", "30"]);
        let text = refused(&env, &args);
        assert!(text.contains("already running"), "{text}");
    }
    for extra in [&[][..], &["--detach"], &["--generation", "1"], &["--force"]] {
        let mut args = vec!["restart", name.as_str()];
        args.extend(extra);
        let text = refused(&env, &args);
        assert!(
            text.contains("already running"),
            "restart {extra:?}: {text}"
        );
    }
    // The first job is untouched: same process, still answering, and it finishes.
    let st = json(&env.ok(&["--json", "status", &name]));
    assert_eq!(st["state"], "running");
    assert_eq!(st["pid"], pid);
    assert_eq!(st["latest_generation"], 1);
    assert_eq!(job.wait(), 0, "{}", env.stderr(&job));
    assert_all_pass(&env.output(&job));
}

#[test]
fn invalid_job_names_are_refused() {
    let env = Env::new();
    let long = "a".repeat(65);
    let bad = [
        "",
        ".hidden",
        "..",
        "a/b",
        "../escape",
        "with space",
        "semi;colon",
        "caf\u{e9}",
        long.as_str(),
    ];
    for name in bad {
        for args in [
            vec!["run", "--name", name, "--", "/bin/true"],
            vec!["run", "--detach", "--name", name, "--", "/bin/true"],
            vec!["restart", name],
            vec!["restart", "--detach", name],
        ] {
            let text = refused(&env, &args);
            assert!(text.contains("invalid job name"), "{args:?}: {text}");
        }
        for verb in ["status", "checkpoint", "kill"] {
            refused(&env, &[verb, name]);
        }
    }
    // Nothing was created outside the image root, nor for the rejected names inside it.
    assert!(!env.root.path().join("escape").exists());
    assert!(!env.images.join("a").exists());
    let inside: Vec<_> = fs::read_dir(&env.images)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(
        inside.is_empty(),
        "directories made for invalid names: {inside:?}"
    );
    // The longest valid name, with every allowed character, works.
    let edge = format!("A-z_0.{}", "9".repeat(58));
    assert_eq!(edge.len(), 64);
    let out = env.ok(&["run", "--name", &edge, "--", "/bin/true"]);
    assert!(out.is_empty(), "{out}");
}

/// Every file under `dir` is 0600 and every directory 0700 (and `dir` itself), all ours.
fn assert_private_tree(dir: &Path, uid: u32) {
    let meta = fs::symlink_metadata(dir).unwrap();
    assert_eq!(meta.uid(), uid, "{} owner", dir.display());
    assert!(meta.is_dir(), "{}", dir.display());
    assert_eq!(
        meta.mode() & 0o7777,
        0o700,
        "{} is a private directory",
        dir.display()
    );
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = fs::symlink_metadata(e.path()).unwrap();
        assert_eq!(m.uid(), uid, "{} owner", e.path().display());
        if m.is_dir() {
            assert_private_tree(&e.path(), uid);
        } else {
            assert!(m.is_file(), "{} is a regular file", e.path().display());
            assert_eq!(
                m.mode() & 0o7777,
                0o600,
                "{} is private to its owner",
                e.path().display()
            );
        }
    }
}

#[test]
fn images_and_control_socket_are_private() {
    let env = Env::new();
    let uid = my_uid();
    let name = env.name("private");
    let prog = program("counter", false);
    env.ok(&[
        "run",
        "--detach",
        "--name",
        &name,
        "--",
        prog.to_str().unwrap(),
        env.work.to_str().unwrap(),
        "100000",
    ]);
    let _guard = KillOnDrop(&env, name.clone());
    wait_file_contains(&env.job_dir(&name).join("output.log"), "tick 3\n");
    env.checkpoint(&name, false);
    env.checkpoint(&name, false);
    let job_dir = env.job_dir(&name);
    assert!(job_dir.join("gen-0002/manifest").is_file());
    assert!(job_dir.join("output.log").is_file());
    assert_private_tree(&env.images, uid);

    let sock_dir = env.runtime.join("stasis");
    let d = fs::metadata(&sock_dir).unwrap();
    assert_eq!(d.mode() & 0o7777, 0o700, "socket directory mode");
    assert_eq!(d.uid(), uid);
    let sock = sock_dir.join(format!("{name}.sock"));
    let s = fs::symlink_metadata(&sock).unwrap();
    assert!(s.file_type().is_socket());
    assert_eq!(s.mode() & 0o7777, 0o600, "socket mode");
    assert_eq!(s.uid(), uid);

    if uid == 0 {
        cross_user_control_is_refused(&env, &name, &sock_dir, &sock);
    }
    // (As any other user, the part above is all that can be checked: switching to another
    // uid needs root.)
    let st = json(&env.ok(&["--json", "status", &name]));
    assert_eq!(st["state"], "running");
    assert_eq!(st["checkpoints"], 2);
}

/// Root only: uid 65534 must not be able to control root's job, neither through the CLI
/// (same XDG_RUNTIME_DIR and STASIS_IMAGES) nor by talking to the socket directly when the
/// directory permissions are loosened by mistake (the supervisor checks the peer's uid).
fn cross_user_control_is_refused(env: &Env, name: &str, sock_dir: &Path, sock: &Path) {
    let pid = json(&env.ok(&["--json", "status", name]))["pid"].clone();
    // Let uid 65534 reach the runtime and image roots (the test's temporary root is 0700;
    // note that every stasis command of root makes $XDG_RUNTIME_DIR 0700 again when it is
    // under /tmp, so this is done after the last one).
    fs::set_permissions(env.root.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&env.runtime, fs::Permissions::from_mode(0o755)).unwrap();
    let nobody = |args: &[&str]| {
        let o = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(stasis_bin())
            .args(args)
            .env("XDG_RUNTIME_DIR", &env.runtime)
            .env("STASIS_IMAGES", &env.images)
            .env("HOME", "/nonexistent")
            .env_remove("STASIS_LOG")
            .current_dir("/")
            .stdin(Stdio::null())
            .output()
            .expect("setpriv runs");
        (
            o.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stderr),
                String::from_utf8_lossy(&o.stdout)
            ),
        )
    };
    for args in [
        vec!["status", name],
        vec!["--json", "status", name],
        vec!["checkpoint", name],
        vec!["checkpoint", "--kill", name],
        vec!["kill", name],
        vec!["restart", name],
    ] {
        let (code, text) = nobody(&args);
        assert_eq!(code, Some(1), "uid 65534 ran {args:?}: {text}");
        assert!(
            text.contains("belongs to uid 0, not to you (uid 65534)"),
            "{args:?} as uid 65534 is refused because the directories are root's: {text}"
        );
        assert!(
            !text.contains(&format!("\"pid\":{pid}")) && !text.contains("\"state\""),
            "uid 65534 learned the job's status: {text}"
        );
    }
    // A misconfigured, world-accessible socket: the supervisor itself must refuse.
    fs::set_permissions(sock_dir, fs::Permissions::from_mode(0o711)).unwrap();
    fs::set_permissions(sock, fs::Permissions::from_mode(0o666)).unwrap();
    let connect = program("b_connect", false);
    for req in [
        r#"{"op":"status"}"#,
        r#"{"op":"kill"}"#,
        r#"{"op":"checkpoint","kill":true}"#,
    ] {
        let o = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&connect)
            .arg(sock)
            .arg(req)
            .current_dir("/")
            .output()
            .unwrap();
        let answer = String::from_utf8_lossy(&o.stdout);
        assert_eq!(
            o.status.code(),
            Some(0),
            "uid 65534 reaches the opened-up socket: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            answer.contains("permission denied") && !answer.contains("\"state\""),
            "the supervisor answered uid 65534's {req}: {answer}"
        );
    }
    fs::set_permissions(sock, fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(sock_dir, fs::Permissions::from_mode(0o700)).unwrap();
    let st = json(&env.ok(&["--json", "status", name]));
    assert_eq!(st["pid"], pid, "the job is untouched");
    assert_eq!(
        st["checkpoints"], 2,
        "no checkpoint was taken for uid 65534"
    );
    assert_eq!(st["latest_generation"], 2);
}

/// The names of the threads of process `pid`.
fn thread_names(pid: i64) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `--compress` decides what a checkpoint stores: `small` compresses every frame of
/// half-compressible numbers, `none` stores them raw; both images verify. The supervisor
/// made its compression thread before its namespaces (after them the kernel refuses new
/// threads). A mode it does not know is refused, naming the choices.
#[test]
fn compress_modes_decide_what_a_checkpoint_stores() {
    let env = Env::new();
    let mut stored = Vec::new();
    for mode in ["small", "none"] {
        let name = env.name(&format!("compress-{mode}"));
        let dir = env.work.join(&name);
        fs::create_dir_all(&dir).unwrap();
        let args = [
            "bench-workload",
            "--mib",
            "16",
            "--pattern",
            "mixed",
            "--dir",
        ];
        let mut args: Vec<&str> = args.to_vec();
        args.push(dir.to_str().unwrap());
        let mut job = env.start_with(&name, &["--compress", mode], &stasis_bin(), &args);
        let _guard = KillOnDrop(&env, name.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        while !dir.join("ready").exists() {
            assert!(
                Instant::now() < deadline,
                "the workload did not fill its memory"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let st = env.status(&name);
        let supervisor = st["supervisor_pid"].as_i64().expect("supervisor_pid");
        assert!(
            thread_names(supervisor).iter().any(|t| t == "stasis-zstd"),
            "the supervisor's threads: {:?}",
            thread_names(supervisor)
        );
        assert!(
            !st["namespaces"]["notes"]
                .to_string()
                .contains("compression"),
            "{st}"
        );
        let report = env.checkpoint(&name, true);
        stored.push(report["stored_bytes"].as_u64().expect("stored_bytes"));
        assert_eq!(job.wait(), EXIT_CHECKPOINTED, "{}", env.stderr(&job));
        let verified = env.ok(&["verify", env.job_dir(&name).to_str().unwrap()]);
        assert!(verified.contains("every checksum matches"), "{verified}");
    }
    let (small, none) = (stored[0], stored[1]);
    assert!(none >= 16 << 20, "stored raw: {none}");
    assert!(small < none * 7 / 10, "small {small}, none {none}");
    let o = env.stasis(&[
        "run",
        "--compress",
        "bogus",
        "--name",
        "x",
        "--",
        "/bin/true",
    ]);
    let text = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{text}");
    assert!(text.contains("bogus") && text.contains("small"), "{text}");
}
