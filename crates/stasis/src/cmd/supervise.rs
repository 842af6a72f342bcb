//! Shared by `run` and `restart`: launch a supervisor in the foreground or detached.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use stasis_image::pack::Compression;
use stasis_job::control::JobStatus;
use stasis_job::paths;
use stasis_job::policy::{CheckpointPolicy, parse_signal};
use stasis_job::supervisor::{EXIT_CHECKPOINTED, JobSpec, Start, Supervisor, detach, report_ready};

use crate::output::emit;

/// Image-location and compression flags shared by `run` and `restart`.
#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    /// Root directory of job images (default: $STASIS_IMAGES, else ~/.local/state/stasis/images).
    #[arg(long, env = "STASIS_IMAGES")]
    pub images: Option<PathBuf>,
    /// How page data is compressed: `fast` (zstd on a thread beside the writer, never
    /// holding up a checkpoint much; data it cannot keep up with, or that compresses slowly
    /// for what it saves, is stored raw), `small` (every frame tried, however long it takes:
    /// for slow or remote disks) or `none`.
    #[arg(long, value_enum, default_value_t = CompressMode::Fast)]
    pub compress: CompressMode,
    /// Store page data uncompressed (the same as `--compress none`).
    #[arg(long, conflicts_with = "compress")]
    pub no_compress: bool,
}

/// The choices of `--compress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompressMode {
    /// zstd level 1 on a thread beside the writer; frames it cannot keep up with are
    /// stored raw.
    Fast,
    /// zstd level 3, every frame tried.
    Small,
    /// No compression.
    None,
}

impl ImageArgs {
    /// The job spec for `name`.
    pub fn spec(&self, name: &str) -> JobSpec {
        JobSpec {
            name: name.to_owned(),
            images_root: self
                .images
                .clone()
                .unwrap_or_else(paths::default_images_root),
            compression: match (self.no_compress, self.compress) {
                (true, _) | (false, CompressMode::None) => Compression::None,
                (false, CompressMode::Fast) => Compression::FAST,
                (false, CompressMode::Small) => Compression::SMALL,
            },
            policy: CheckpointPolicy::default(),
        }
    }
}

/// Checkpoint-policy flags shared by `run` and `restart`.
#[derive(Debug, clap::Args)]
pub struct PolicyArgs {
    /// Take a checkpoint this often while the job runs on (e.g. 500ms, 30s, 10m, 1h).
    #[arg(long, value_name = "DURATION", value_parser = parse_interval)]
    pub interval: Option<Duration>,
    /// After each checkpoint, keep only the newest N generations (older ones are removed).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep: Option<u32>,
    /// On this signal (USR1, SIGUSR1 or a number), checkpoint the job, stop it and exit 75,
    /// as before a batch scheduler's time limit.
    #[arg(long, value_name = "SIG", value_parser = parse_checkpoint_signal)]
    pub checkpoint_signal: Option<i32>,
    /// How long a checkpoint waits for the job's libstasis pre-checkpoint callbacks and
    /// critical sections (e.g. 500ms, 10s); an overrun is reported and the checkpoint
    /// proceeds, or fails with `--callback-overrun fail`.
    #[arg(long, value_name = "DURATION", value_parser = parse_callback_timeout)]
    pub callback_timeout: Option<Duration>,
    /// What a checkpoint does when callbacks overrun `--callback-timeout`: `proceed` (take it
    /// without them) or `fail` (do not take it; the job runs on).
    #[arg(long, value_name = "WHAT", default_value = "proceed", value_parser = ["proceed", "fail"])]
    pub callback_overrun: String,
    /// Keep the content of the job's open files (and files it maps shared) in every
    /// checkpoint, so that it can restart where they are missing. A job restarted from such
    /// a checkpoint keeps saving them.
    #[arg(long)]
    pub save_files: bool,
    /// Do not track which pages the job writes between checkpoints. By default the job's
    /// private memory is write-protected at each checkpoint (userfaultfd, asynchronous:
    /// the program never waits for Stasis; its first write to a page after a checkpoint
    /// costs a minor fault), so that the next checkpoint reads only the pages written
    /// since. Use this for programs that register userfaultfd on their own memory.
    #[arg(long)]
    pub no_write_tracking: bool,
}

impl PolicyArgs {
    /// The policy these flags ask for.
    pub fn policy(&self) -> CheckpointPolicy {
        CheckpointPolicy {
            interval: self.interval,
            keep: self.keep,
            signal: self.checkpoint_signal,
            callback_timeout: self.callback_timeout,
            fail_on_late_callbacks: self.callback_overrun == "fail",
            save_files: self.save_files,
            no_write_tracking: self.no_write_tracking,
        }
    }
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d =
        humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 30s, 10m, 1h)"))?;
    if d < Duration::from_millis(10) {
        return Err("the interval must be at least 10ms".into());
    }
    Ok(d)
}

fn parse_callback_timeout(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 10s, 1m)"))
}

fn parse_checkpoint_signal(s: &str) -> Result<i32, String> {
    parse_signal(s).map_err(|e| e.to_string())
}

fn describe(s: &JobStatus, verb: &str) -> String {
    let mut t = format!(
        "stasis: job {:?} {verb}: pid {} (pid {} inside the job)",
        s.name, s.pid, s.job_pid
    );
    for n in &s.namespaces.notes {
        t.push_str(&format!("\nstasis: note: {n}"));
    }
    if let Some(why) = s.memory.as_ref().and_then(|m| m.eager_because.as_ref()) {
        t.push_str(&format!("\nstasis: note: memory restored eagerly: {why}"));
    }
    t
}

/// Launches the supervisor; returns the exit status to use.
pub fn launch(spec: JobSpec, start: Start, detached: bool, json: bool) -> Result<i32> {
    let verb = if matches!(start, Start::Run { .. }) {
        "started"
    } else {
        "restarted"
    };
    let name = spec.name.clone();
    if detached {
        paths::check_name(&name)?;
        let job_dir = if verb == "started" {
            let dir = paths::job_dir(&spec.images_root, &name);
            paths::private_dir(&spec.images_root)?;
            paths::private_dir(&dir)?;
            dir
        } else {
            paths::existing_job_dir(&spec.images_root, &name)?
        };
        let log = job_dir.join("output.log");
        if let Some(reader) = detach(&log)? {
            let mut line = String::new();
            std::io::BufReader::new(reader).read_line(&mut line)?;
            let v: serde_json::Value = serde_json::from_str(line.trim())
                .context("the detached supervisor exited before reporting")?;
            if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
                bail!("{err}");
            }
            let status: JobStatus = serde_json::from_value(v)?;
            emit(json, &status, || {
                format!(
                    "{}\nstasis: output goes to {}",
                    describe(&status, verb),
                    log.display()
                )
            });
            return Ok(0);
        }
        return match Supervisor::launch(spec, start) {
            Ok(sup) => {
                report_ready(&serde_json::to_string(&sup.status())?);
                Ok(sup.serve()?)
            }
            Err(e) => {
                report_ready(&serde_json::json!({ "error": format!("{e}") }).to_string());
                Err(e.into())
            }
        };
    }
    let sup = Supervisor::launch(spec, start)?;
    if !json {
        eprintln!("{}", describe(&sup.status(), verb));
    }
    let code = sup.serve()?;
    if code == EXIT_CHECKPOINTED && !json {
        eprintln!(
            "stasis: job {name:?} was checkpointed and stopped; resume it with: stasis restart {name}"
        );
    }
    Ok(code)
}
