//! Shared harness of the integration tests: drives the real `stasis` binary on real programs
//! (C sources in `tests/programs`, compiled with gcc at test time).
//!
//! Every test gets its own image root and runtime directory, and unique job names, so tests
//! run in parallel and as any user (root or `nobody`).
#![allow(dead_code, missing_docs)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Whether the tests run as root (effective uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        .unwrap_or(false)
}

/// The `stasis` binary under test (`$STASIS_TEST_BIN` overrides, for the unprivileged run).
pub fn stasis_bin() -> PathBuf {
    std::env::var_os("STASIS_TEST_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_stasis")),
        PathBuf::from,
    )
}

/// Root of the repository (`$STASIS_TEST_REPO` overrides, for the unprivileged run).
pub fn repo() -> PathBuf {
    std::env::var_os("STASIS_TEST_REPO").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
        PathBuf::from,
    )
}

static COMPILE: Mutex<()> = Mutex::new(());

/// Compiles `tests/programs/NAME.c` (once per user, variant and content) and returns the
/// binary.
pub fn program(name: &str, static_link: bool) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let _guard = COMPILE.lock().unwrap_or_else(|e| e.into_inner());
    let uid = nix_uid();
    let dir = std::env::temp_dir().join(format!("stasis-test-programs-{uid}"));
    std::fs::create_dir_all(&dir).expect("create program cache");
    let programs = repo().join("tests/programs");
    let src = programs.join(format!("{name}.c"));
    // Named by what it is built from (the source and every shared header): another
    // checkout's build of the same name is not taken for this one's.
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&programs)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "h"))
        .collect();
    inputs.sort();
    inputs.push(src.clone());
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for input in &inputs {
        std::fs::read(input).unwrap_or_default().hash(&mut hasher);
    }
    let dir = dir.join(format!("{:016x}", hasher.finish()));
    std::fs::create_dir_all(&dir).expect("create program cache");
    let out = dir.join(if static_link {
        format!("{name}-static")
    } else {
        name.to_owned()
    });
    if !out.exists() {
        // Built aside and renamed into place: a build cut short is never taken for one.
        let building = dir.join(format!(".{name}-{}", std::process::id()));
        let mut cmd = Command::new("gcc");
        cmd.args(["-O1", "-g", "-pthread", "-Wall", "-o"])
            .arg(&building)
            .arg(&src)
            .arg("-lm");
        if static_link {
            cmd.arg("-static");
        }
        let o = cmd.output().expect("gcc runs");
        assert!(
            o.status.success(),
            "gcc failed for {name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::fs::rename(&building, &out).expect("put the program in place");
    }
    out
}

fn nix_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Uid:").map(|v| {
                    v.split_whitespace()
                        .next()
                        .unwrap_or("0")
                        .parse()
                        .unwrap_or(0)
                })
            })
        })
        .unwrap_or(0)
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A test's private world: image root, runtime dir, work dir.
pub struct Env {
    pub root: tempfile::TempDir,
    pub images: PathBuf,
    pub runtime: PathBuf,
    pub work: PathBuf,
}

/// A background `stasis run` or `stasis restart`.
pub struct Job {
    pub name: String,
    pub child: Child,
    /// Where the program's stdout goes (for a job started by `start`).
    pub out: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let root = tempfile::Builder::new()
            .prefix("stasis-test-")
            .tempdir()
            .expect("tempdir");
        let images = root.path().join("images");
        let runtime = root.path().join("run");
        let work = root.path().join("work");
        std::fs::create_dir_all(&runtime).expect("runtime dir");
        std::fs::create_dir_all(&work).expect("work dir");
        Env {
            root,
            images,
            runtime,
            work,
        }
    }

    /// A job name unique to this test process.
    pub fn name(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        )
    }

    /// `stasis` with this env's image and runtime directories.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(stasis_bin());
        c.env("STASIS_IMAGES", &self.images)
            .env("XDG_RUNTIME_DIR", &self.runtime)
            .env_remove("STASIS_LOG");
        c.current_dir(&self.work);
        c
    }

    /// Runs `stasis ARGS` to completion.
    pub fn stasis(&self, args: &[&str]) -> Output {
        self.cmd()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("stasis runs")
    }

    /// Like [`Env::stasis`], asserting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.stasis(args);
        assert!(
            o.status.success(),
            "stasis {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Like [`Env::stasis`], asserting failure; returns stderr + stdout.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.stasis(args);
        assert!(
            !o.status.success(),
            "stasis {args:?} unexpectedly succeeded: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        )
    }

    /// Starts `stasis run --name NAME -- PROGRAM ARGS` in the background, the program's
    /// stdout going to `work/NAME.out` (a regular file).
    pub fn start(&self, name: &str, program: &Path, args: &[&str]) -> Job {
        self.start_with(name, &[], program, args)
    }

    /// Like [`Env::start`], with `run` flags before the `--`.
    pub fn start_with(
        &self,
        name: &str,
        flags: &[&str],
        program: &Path,
        args: &[impl AsRef<std::ffi::OsStr>],
    ) -> Job {
        self.start_with_env(name, flags, program, args, &[])
    }

    /// Like [`Env::start_with`], with environment variables `vars` set for the supervisor.
    pub fn start_with_env(
        &self,
        name: &str,
        flags: &[&str],
        program: &Path,
        args: &[impl AsRef<std::ffi::OsStr>],
        vars: &[(&str, &str)],
    ) -> Job {
        let out = self.work.join(format!("{name}.out"));
        let err = self.work.join(format!("{name}.err"));
        let child = self
            .cmd()
            .envs(vars.iter().copied())
            .args(["run", "--name", name])
            .args(flags)
            .arg("--")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&out).expect("out file"))
            .stderr(File::create(&err).expect("err file"))
            .spawn()
            .expect("spawn stasis run");
        Job {
            name: name.to_owned(),
            child,
            out,
        }
    }

    /// Starts `stasis restart NAME EXTRA…` in the background; the restart command's own
    /// stdout goes to `work/NAME.restart.out`.
    pub fn restart(&self, job: &Job, extra: &[&str]) -> Job {
        self.restart_with_env(job, extra, &[])
    }

    /// Like [`Env::restart`], with environment variables `vars` set for the supervisor.
    pub fn restart_with_env(&self, job: &Job, extra: &[&str], vars: &[(&str, &str)]) -> Job {
        let out = self.work.join(format!("{}.restart.out", job.name));
        let err = self.work.join(format!("{}.restart.err", job.name));
        let child = self
            .cmd()
            .envs(vars.iter().copied())
            .args(["restart", &job.name])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(File::create(&out).expect("out file"))
            .stderr(File::create(&err).expect("err file"))
            .spawn()
            .expect("spawn stasis restart");
        Job {
            name: job.name.clone(),
            child,
            out: job.out.clone(),
        }
    }

    /// Tells the job's program to go on, restarts the job (environment variables `vars`
    /// set for the supervisor) and asserts that the restarted program exits 0; returns its
    /// whole output.
    pub fn restart_to_success(&self, job: &Job, vars: &[(&str, &str)]) -> String {
        self.go();
        let mut restarted = self.restart_with_env(job, &[], vars);
        assert_eq!(
            restarted.wait(),
            0,
            "output:\n{}\nstderr: {}",
            self.output(job),
            self.stderr(&restarted)
        );
        self.output(job)
    }

    /// The program's output so far.
    pub fn output(&self, job: &Job) -> String {
        std::fs::read_to_string(&job.out).unwrap_or_default()
    }

    /// Waits until the program's output contains `needle`.
    pub fn wait_output(&self, job: &Job, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.output(job).contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "timed out waiting for {needle:?} from {}; output:\n{}\nstasis stderr:\n{}",
            job.name,
            self.output(job),
            self.stderr(job)
        );
    }

    /// stderr of the `stasis run`/`restart` commands of this job.
    pub fn stderr(&self, job: &Job) -> String {
        let a = std::fs::read_to_string(self.work.join(format!("{}.err", job.name)))
            .unwrap_or_default();
        let b = std::fs::read_to_string(self.work.join(format!("{}.restart.err", job.name)))
            .unwrap_or_default();
        format!("{a}{b}")
    }

    /// Tells a waiting test program to go on (creates `work/go`).
    pub fn go(&self) {
        File::create(self.work.join("go")).expect("go file");
    }

    /// Removes the go file (before another round).
    pub fn ungo(&self) {
        let _ = std::fs::remove_file(self.work.join("go"));
    }

    /// `stasis checkpoint NAME [--kill] --json`, asserting success; returns the report.
    pub fn checkpoint(&self, name: &str, kill: bool) -> serde_json::Value {
        let mut args = vec!["--json", "checkpoint", name];
        if kill {
            args.push("--kill");
        }
        let out = self.ok(&args);
        serde_json::from_str(out.trim()).expect("checkpoint prints JSON")
    }

    /// `stasis status NAME --json`, asserting success.
    pub fn status(&self, name: &str) -> serde_json::Value {
        let out = self.ok(&["--json", "status", name]);
        serde_json::from_str(out.trim()).expect("status prints JSON")
    }

    /// The job's image directory.
    pub fn job_dir(&self, name: &str) -> PathBuf {
        self.images.join(name)
    }
}

impl Job {
    /// Waits for the `stasis run`/`restart` command to exit; returns its exit code.
    pub fn wait(&mut self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("job {} did not finish in time", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Exit status of `run`/`restart` after `checkpoint --kill`.
pub const EXIT_CHECKPOINTED: i32 = 75;

/// The lines of a program's report: `PASS x`, `FAIL x: why`, `DONE n`.
pub fn assert_all_pass(output: &str) {
    let fails: Vec<&str> = output.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert!(
        fails.is_empty(),
        "the program reported failures:\n{}\nfull output:\n{output}",
        fails.join("\n")
    );
    assert!(
        output.lines().any(|l| l == "DONE 0"),
        "the program did not finish its checks:\n{output}"
    );
}
