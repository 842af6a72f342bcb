//! Generations and checkpoint policy, end to end on the real binary: `history` (with a damaged
//! generation), `rm` (refusals while the job runs, crash-safe removal, leftovers cleaned up),
//! `--keep` retention on `checkpoint` and on the supervisor, periodic checkpoints
//! (`--interval`), the checkpoint signal (`--checkpoint-signal`), and failures of the last two
//! leaving the job running. The Slurm batch script built on them is run against a real
//! Slurm by `tests/slurm/run.sh`; here, only that docs/slurm.md shows it unchanged.

mod common;

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{EXIT_CHECKPOINTED, Env, Job, assert_all_pass, program, stasis_bin};
use serde_json::Value;

/// A pid no process can have (above the kernel's largest `pid_max`, 2^22).
const DEAD_PID: u32 = 4_294_967;

fn ticks(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .collect()
}

/// `stasis --json history NAME`, as an array.
fn history(env: &Env, name: &str) -> Vec<Value> {
    let out = env.ok(&["--json", "history", name]);
    match serde_json::from_str(out.trim()) {
        Ok(Value::Array(rows)) => rows,
        other => panic!("history --json is not an array: {other:?}\n{out}"),
    }
}

fn gens(env: &Env, name: &str) -> Vec<u64> {
    history(env, name)
        .iter()
        .map(|r| r["generation"].as_u64().expect("generation number"))
        .collect()
}

/// The generation numbers, or none while the job has no image directory yet (its
/// supervisor may still be starting).
fn gens_so_far(env: &Env, name: &str) -> Vec<u64> {
    if env.job_dir(name).is_dir() {
        gens(env, name)
    } else {
        Vec::new()
    }
}

fn reasons(env: &Env, name: &str) -> Vec<String> {
    history(env, name)
        .iter()
        .map(|r| r["reason"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// Entries of the job directory whose names start with `prefix`.
fn hidden(dir: &Path, prefix: &str) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Waits (up to a minute) until `cond` holds.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends signal `sig` (a name like `USR1`) to `pid`.
fn send(sig: &str, pid: u32) {
    let s = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("kill runs");
    assert!(s.success(), "kill -{sig} {pid} failed");
}

/// Starts `[WRAPPER…] stasis run FLAGS… --name NAME -- PROGRAM ARGS…`, the program's output
/// going to `work/NAME.out` and the supervisor's stderr collected through a pipe (a file
/// would be subject to a file-size limit the wrapper sets).
fn start(
    env: &Env,
    name: &str,
    wrapper: &[&str],
    flags: &[&str],
    prog: &Path,
    args: &[&str],
) -> (Job, Arc<Mutex<String>>) {
    let out = env.work.join(format!("{name}.out"));
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(stasis_bin());
            c
        }
        None => Command::new(stasis_bin()),
    };
    cmd.env("STASIS_IMAGES", &env.images)
        .env("XDG_RUNTIME_DIR", &env.runtime)
        .env_remove("STASIS_LOG")
        .current_dir(&env.work)
        .arg("run")
        .args(flags)
        .args(["--name", name, "--"])
        .arg(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).expect("out file"))
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn stasis run");
    let log = Arc::new(Mutex::new(String::new()));
    let mut pipe = child.stderr.take().expect("stderr pipe");
    let sink = Arc::clone(&log);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    (
        Job {
            name: name.to_owned(),
            child,
            out,
        },
        log,
    )
}

#[test]
fn history_lists_generations_reasons_and_damage() {
    let env = Env::new();
    let name = env.name("hist");
    let prog = program("counter", false);
    let mut job = env.start(&name, &prog, &[env.work.to_str().unwrap(), "3000"]);
    env.wait_output(&job, "tick 5\n");
    env.checkpoint(&name, false);
    env.checkpoint(&name, false);
    env.checkpoint(&name, true);
    assert_eq!(job.wait(), EXIT_CHECKPOINTED);

    let rows = history(&env, &name);
    assert_eq!(gens(&env, &name), vec![1, 2, 3]);
    assert_eq!(
        reasons(&env, &name),
        vec!["checkpoint", "checkpoint", "checkpoint --kill"]
    );
    let mut last = 0;
    for r in &rows {
        assert_eq!(r["processes"], 1, "{r}");
        assert!(r["size_bytes"].as_u64().unwrap() > 0, "{r}");
        assert!(r["error"].is_null(), "{r}");
        let t = r["created_unix_ms"].as_u64().unwrap();
        assert!(t >= last && t > 0, "creation times in order: {rows:?}");
        last = t;
        assert!(r["created"].as_str().unwrap().ends_with('Z'), "{r}");
    }
    let text = env.ok(&["history", &name]);
    assert!(
        text.contains("REASON") && text.contains("checkpoint --kill"),
        "{text}"
    );

    // Damage generation 2's manifest body: it is listed with its error, the others as before.
    let manifest = env.job_dir(&name).join("gen-0002/manifest");
    let mut bytes = fs::read(&manifest).unwrap();
    let at = bytes.len() - 2;
    bytes[at] ^= 0xff;
    fs::write(&manifest, bytes).unwrap();
    let rows = history(&env, &name);
    assert_eq!(rows.len(), 3, "{rows:?}");
    let err = rows[1]["error"]
        .as_str()
        .expect("generation 2 has an error");
    assert!(
        err.contains("gen-0002") && err.contains("checksum"),
        "the error names the file and the damage: {err}"
    );
    assert!(rows[1]["reason"].is_null() && rows[1]["processes"].is_null());
    assert!(rows[0]["error"].is_null() && rows[2]["error"].is_null());
    let text = env.ok(&["history", &name]);
    assert!(
        text.contains("DAMAGED") && text.contains("gen-0002"),
        "{text}"
    );
}

#[test]
fn rm_refuses_what_a_running_job_needs_and_removes_safely() {
    let env = Env::new();
    let name = env.name("rm");
    let prog = program("counter", false);
    let mut job = env.start(&name, &prog, &[env.work.to_str().unwrap(), "3000"]);
    env.wait_output(&job, "tick 5\n");
    for _ in 0..3 {
        env.checkpoint(&name, false);
    }
    let dir = env.job_dir(&name);

    let e = env.fails(&["rm", &name]);
    assert!(
        e.contains("is running") && e.contains("stasis kill"),
        "removing everything of a running job is refused: {e}"
    );
    let e = env.fails(&["rm", &name, "--generation", "3"]);
    assert!(
        e.contains("newest") && e.contains("is running"),
        "the running job's newest generation is kept: {e}"
    );
    assert_eq!(gens(&env, &name), vec![1, 2, 3]);

    // An older generation may go while the job runs; nothing hidden stays behind.
    env.ok(&["rm", &name, "--generation", "1"]);
    assert_eq!(gens(&env, &name), vec![2, 3]);
    assert!(!dir.join("gen-0001").exists());
    assert_eq!(hidden(&dir, ".rm-"), Vec::<String>::new());
    let e = env.fails(&["rm", &name, "--generation", "7"]);
    assert!(
        e.contains("gen-0007") && e.contains("stasis history"),
        "a missing generation is named, with what to do: {e}"
    );

    // Numbers are never reused while newer generations exist.
    assert_eq!(env.checkpoint(&name, true)["generation"], 4);
    assert_eq!(job.wait(), EXIT_CHECKPOINTED);

    // An interrupted removal (renamed, not yet deleted) is not a generation, and the next
    // removal deletes it.
    let leftover = dir.join(format!(".rm-gen-0009-{DEAD_PID}-1"));
    fs::create_dir_all(&leftover).unwrap();
    fs::write(leftover.join("manifest"), b"partial").unwrap();
    assert_eq!(gens(&env, &name), vec![2, 3, 4]);
    // Stopped: now the newest may go too.
    let out = env.ok(&["--json", "rm", &name, "--generation", "4"]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["generation"], 4, "{out}");
    assert_eq!(gens(&env, &name), vec![2, 3]);
    assert!(!leftover.exists(), "the leftover was cleaned up");
    assert_eq!(hidden(&dir, ".rm-"), Vec::<String>::new());

    // Everything: the job directory goes, and `list` no longer shows the job.
    env.ok(&["rm", &name]);
    assert!(!dir.exists());
    assert_eq!(hidden(&env.images, ".rm-"), Vec::<String>::new());
    assert!(!env.ok(&["list"]).contains(&name));
    let e = env.fails(&["history", &name]);
    assert!(e.contains(dir.to_str().unwrap()), "names the path: {e}");
    let e = env.fails(&["rm", &name]);
    assert!(e.contains(dir.to_str().unwrap()), "names the path: {e}");
}

#[test]
fn checkpoint_keep_removes_the_oldest_generations() {
    let env = Env::new();
    let name = env.name("keep");
    let prog = program("counter", false);
    let mut job = env.start(&name, &prog, &[env.work.to_str().unwrap(), "3000"]);
    env.wait_output(&job, "tick 5\n");
    for _ in 0..3 {
        env.checkpoint(&name, false);
    }
    let out = env.ok(&["--json", "checkpoint", &name, "--keep", "2"]);
    let r: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r["generation"], 4);
    assert_eq!(r["removed"], serde_json::json!([1, 2]));
    assert_eq!(gens(&env, &name), vec![3, 4]);

    let text = env.ok(&["checkpoint", &name, "--keep", "1"]);
    assert!(text.contains("removed older generation(s) 3, 4"), "{text}");
    assert_eq!(gens(&env, &name), vec![5]);

    let e = env.fails(&["checkpoint", &name, "--keep", "0"]);
    assert!(e.contains("--keep"), "{e}");
    // --keep applied once only: the supervisor keeps everything after it.
    env.checkpoint(&name, true);
    assert_eq!(job.wait(), EXIT_CHECKPOINTED);
    assert_eq!(gens(&env, &name), vec![5, 6]);
    assert_eq!(hidden(&env.job_dir(&name), ".rm-"), Vec::<String>::new());
}

#[test]
fn interval_checkpoints_with_retention_then_restart() {
    let env = Env::new();
    let name = env.name("every");
    let prog = program("counter", false);
    let (mut job, log) = start(
        &env,
        &name,
        &[],
        &["--interval", "200ms", "--keep", "2"],
        &prog,
        &[env.work.to_str().unwrap(), "600"],
    );
    wait_until("three periodic checkpoints", || {
        gens_so_far(&env, &name).last().is_some_and(|&n| n >= 3)
    });
    assert!(reasons(&env, &name).iter().all(|r| r == "interval"));
    let n = env.checkpoint(&name, true)["generation"].as_u64().unwrap();
    assert_eq!(
        job.wait(),
        EXIT_CHECKPOINTED,
        "{}",
        log.lock().unwrap().as_str()
    );
    // The supervisor's --keep 2 applies after every checkpoint, the last one included.
    assert_eq!(gens(&env, &name), vec![n - 1, n]);
    assert_eq!(reasons(&env, &name), vec!["interval", "checkpoint --kill"]);

    // A restart with its own policy: periodic checkpoints, keeping one.
    let mut restarted = env.restart(&job, &["--interval", "300ms", "--keep", "1"]);
    wait_until("a periodic checkpoint of the restarted job", || {
        gens(&env, &name).last().is_some_and(|&g| g > n)
    });
    assert_eq!(restarted.wait(), 0, "{}", env.stderr(&job));
    let out = env.output(&job);
    assert_eq!(ticks(&out), (1..=600).collect::<Vec<_>>());
    assert_all_pass(&out);
    let rows = history(&env, &name);
    assert_eq!(rows.len(), 1, "--keep 1 leaves one generation: {rows:?}");
    assert_eq!(rows[0]["reason"], "interval");
    assert!(rows[0]["generation"].as_u64().unwrap() > n);
}

#[test]
fn checkpoint_signal_stops_the_job_and_restart_resumes() {
    let env = Env::new();
    let name = env.name("sig");
    let prog = program("counter", false);
    let (mut job, log) = start(
        &env,
        &name,
        &[],
        &["--checkpoint-signal", "USR1"],
        &prog,
        &[env.work.to_str().unwrap(), "300"],
    );
    env.wait_output(&job, "tick 10\n");
    send("USR1", job.child.id());
    // 75, not the program killed by SIGUSR1: the signal was the supervisor's, not forwarded.
    assert_eq!(
        job.wait(),
        EXIT_CHECKPOINTED,
        "{}",
        log.lock().unwrap().as_str()
    );
    assert_eq!(reasons(&env, &name), vec!["signal SIGUSR1"]);
    assert!(
        log.lock().unwrap().contains("SIGUSR1 received"),
        "{}",
        log.lock().unwrap().as_str()
    );
    let at_stop = ticks(&env.output(&job)).len();

    // Restarted with the signal given by number (SIGUSR2 is 12 on Linux).
    let mut restarted = env.restart(&job, &["--checkpoint-signal", "12"]);
    env.wait_output(&job, &format!("tick {}\n", at_stop + 20));
    send("USR2", restarted.child.id());
    assert_eq!(restarted.wait(), EXIT_CHECKPOINTED, "{}", env.stderr(&job));
    assert_eq!(
        reasons(&env, &name),
        vec!["signal SIGUSR1", "signal SIGUSR2"]
    );

    let mut last = env.restart(&job, &[]);
    assert_eq!(last.wait(), 0, "{}", env.stderr(&job));
    let out = env.output(&job);
    assert_eq!(ticks(&out), (1..=300).collect::<Vec<_>>());
    assert_all_pass(&out);
}

/// Periodic and signalled checkpoints that cannot be written (a 4 KiB file-size limit makes
/// every image write fail with EFBIG, as a full disk would) are logged, leave nothing behind,
/// and the job runs on to its end.
#[test]
fn failed_periodic_and_signalled_checkpoints_leave_the_job_running() {
    let env = Env::new();
    let name = env.name("pfail");
    let prog = program("counter", false);
    let (mut job, log) = start(
        &env,
        &name,
        &["prlimit", "--fsize=4096"],
        &["--interval", "300ms", "--checkpoint-signal", "USR1"],
        &prog,
        &[env.work.to_str().unwrap(), "400"],
    );
    wait_until("a failed periodic checkpoint", || {
        log.lock()
            .unwrap()
            .contains("periodic checkpoint failed, the job runs on")
    });
    send("USR1", job.child.id());
    wait_until("a failed checkpoint on SIGUSR1", || {
        log.lock()
            .unwrap()
            .contains("checkpoint on SIGUSR1 failed, the job runs on")
    });
    assert_eq!(job.wait(), 0, "{}", log.lock().unwrap().as_str());
    let out = env.output(&job);
    assert_eq!(ticks(&out), (1..=400).collect::<Vec<_>>());
    assert_all_pass(&out);
    assert_eq!(gens(&env, &name), Vec::<u64>::new());
    assert_eq!(
        hidden(&env.job_dir(&name), ".tmp-gen"),
        Vec::<String>::new()
    );
}

/// Checkpoints share the pages that did not change with the generation before: after 1% of
/// a program's pages changed, the next generation adds a small fraction of the first one's
/// bytes. Removing the older generation (whose pack the newer one shares) keeps the newer
/// one whole: it verifies and restarts into a program whose memory checks out.
#[test]
fn incremental_generations_share_unchanged_pages_and_survive_removing_older_ones() {
    let env = Env::new();
    let name = env.name("incr");
    let prog = program("memhog", false);
    let mut job = env.start(&name, &prog, &[env.work.to_str().unwrap(), "32"]);
    env.wait_output(&job, "READY\n");
    env.checkpoint(&name, false);
    fs::write(env.work.join("touch"), b"").unwrap();
    env.wait_output(&job, "TOUCHED 1\n");
    env.checkpoint(&name, false);
    let h = history(&env, &name);
    let size = |i: usize| h[i]["size_bytes"].as_u64().expect("size_bytes");
    assert!(
        size(1) * 8 < size(0),
        "the second generation adds {} bytes, the first {}",
        size(1),
        size(0)
    );
    let dir = env.job_dir(&name);
    let gen2 = dir.join("gen-0002");
    let v: Value =
        serde_json::from_str(env.ok(&["--json", "verify", gen2.to_str().unwrap()]).trim()).unwrap();
    assert!(
        v["shared_bytes"].as_u64().unwrap() > 30 << 20,
        "most of the memory is shared with generation 1: {v}"
    );

    env.ok(&["rm", &name, "--generation", "1"]);
    env.ok(&["verify", gen2.to_str().unwrap()]);
    // Once more after a change, then kill and restart from the newest.
    fs::write(env.work.join("touch"), b"").unwrap();
    env.wait_output(&job, "TOUCHED 2\n");
    env.checkpoint(&name, true);
    assert_eq!(job.wait(), EXIT_CHECKPOINTED);
    env.ok(&["rm", &name, "--generation", "2"]);
    assert_eq!(gens(&env, &name), vec![3]);
    let mut restarted = env.restart(&job, &[]);
    env.go();
    assert_eq!(restarted.wait(), 0, "{}", env.stderr(&restarted));
    assert_all_pass(&env.output(&restarted));
}

/// docs/slurm.md shows `examples/slurm/stasis-job.sbatch`, the script `tests/slurm/run.sh`
/// runs against a real slurmctld, exactly as it is: the two cannot drift apart.
#[test]
fn slurm_doc_shows_the_tested_batch_script() {
    let repo = common::repo();
    let script = fs::read_to_string(repo.join("examples/slurm/stasis-job.sbatch")).unwrap();
    let doc = fs::read_to_string(repo.join("docs/slurm.md")).unwrap();
    let link = "](../examples/slurm/stasis-job.sbatch)";
    let after = &doc[doc.find(link).expect("docs/slurm.md links the script")..];
    let open = "```bash\n";
    let start = after.find(open).expect("a bash block after the link") + open.len();
    let block = &after[start..];
    let block = &block[..=block.find("\n```\n").expect("the block ends")];
    assert!(
        block == script,
        "docs/slurm.md's batch script differs from examples/slurm/stasis-job.sbatch: copy the \
         file into the doc"
    );
}
