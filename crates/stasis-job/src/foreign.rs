//! Checkpointing a process tree that `stasis run` did not start (`stasis checkpoint --pid`).
//!
//! The caller itself freezes and captures the tree rooted at the process, as the supervisor
//! would: this needs the kernel to let the caller trace it (same user, no other tracer, and
//! no hardening such as `kernel.yama.ptrace_scope` ≥ 1 for a process that is not the
//! caller's descendant). The tree has no IPC namespace of its own, so its SysV objects
//! cannot be saved (a tree using SysV shared memory is refused). The image restarts like
//! any other with `stasis restart NAME`, which puts the processes into namespaces of their
//! own with their original pids.

use std::collections::HashMap;
use std::time::Instant;

use stasis_core::capture::{CaptureOptions, Speedups, capture_job};
use stasis_core::error::CoreError;
use stasis_core::freeze::freeze_tree;
use stasis_core::restore::clocks_now;
use stasis_image::GenerationWriter;
use stasis_image::manifest::Namespaces;
use stasis_sys::process;

use crate::control::CheckpointReport;
use crate::error::{JobError, JobResult};
use crate::paths;
use crate::record;
use crate::supervisor::JobSpec;

/// Says why a process cannot be checkpointed from outside, before touching it.
fn check_target(pid: i32) -> JobResult<()> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|_| JobError::Refused(format!("process {pid} does not exist")))?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse::<u32>().ok());
    if uid != Some(process::uid()) && process::uid() != 0 {
        return Err(JobError::Refused(format!(
            "process {pid} belongs to uid {}, not to you (uid {}): only its owner (or root) may checkpoint it",
            uid.map_or_else(|| "?".into(), |u| u.to_string()),
            process::uid()
        )));
    }
    if pid == 1 || i64::from(pid) == i64::from(std::process::id()) {
        return Err(JobError::Refused(format!(
            "process {pid} cannot be checkpointed (it is init or this command)"
        )));
    }
    Ok(())
}

/// Checkpoints the process tree rooted at `pid` into a new generation of job `spec.name`;
/// with `kill`, ends the tree after the snapshot; with `spec.policy.save_files`, the content
/// of its open files is kept in the image.
pub fn checkpoint_pid(spec: &JobSpec, pid: i32, kill: bool) -> JobResult<CheckpointReport> {
    paths::check_name(&spec.name)?;
    check_target(pid)?;
    let job_dir = paths::job_dir(&spec.images_root, &spec.name);
    paths::private_dir(&spec.images_root)?;
    paths::private_dir(&job_dir)?;
    let command: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let t0 = Instant::now();
    // The root's parent stands outside the image, as a supervisor would.
    let parent = stasis_core::proc::stat(pid)?.ppid;
    // Before the tree is frozen: see the supervisor's checkpoint.
    let mut writer = GenerationWriter::begin(&job_dir, spec.compression)?;
    let frozen_at = Instant::now();
    let frozen = freeze_tree(pid).map_err(|e| match e {
        CoreError::Unsupported { pid: p, what, why } if why.contains("ptrace") => {
            JobError::Refused(format!(
                "the kernel does not let you trace process {p} ({what}: {why}); it may have another tracer, or a hardened kernel (kernel.yama.ptrace_scope ≥ 1) allows tracing only your own children: start the program with `stasis run` instead"
            ))
        }
        other => other.into(),
    })?;
    let (mono, boot) = clocks_now();
    let opts = CaptureOptions {
        ipc_namespace: false,
        snapshot: !kill,
        save_files: spec.policy.save_files,
    };
    let mut captured = match capture_job(
        &frozen,
        parent,
        None,
        None,
        opts,
        writer.pack(),
        Speedups::default(),
    ) {
        Ok(c) => c,
        Err(e) => {
            drop(writer);
            let _ = frozen.thaw(&HashMap::new());
            return Err(e.into());
        }
    };
    // A tree Stasis did not start has no terminal of Stasis's relaying it: the bytes go
    // back into its pairs at once.
    captured.put_back_pty_bytes();
    let mut frozen = Some(frozen);
    let mut frozen_ms = 0.0;
    if !kill {
        frozen.take().map(|f| f.thaw(&captured.insns)).transpose()?;
        frozen_ms = frozen_at.elapsed().as_secs_f64() * 1e3;
        captured.read_snapshots(writer.pack(), None)?;
        captured.end_snapshots()?;
    }
    let mut manifest = record::manifest(
        record::JobFacts {
            name: spec.name.clone(),
            reason: format!(
                "checkpoint --pid {pid}{}",
                if kill { " --kill" } else { "" }
            ),
            command,
            namespaces: Namespaces::default(),
            monotonic_ns: mono,
            boottime_ns: boot,
            save_files: spec.policy.save_files,
        },
        &mut captured,
    );
    let (generation, path) = match writer.finish(&mut manifest) {
        Ok(x) => x,
        Err(e) => {
            if let Some(f) = frozen.take() {
                f.thaw(&captured.insns)?;
            }
            return Err(e.into());
        }
    };
    if let Some(f) = frozen.take() {
        f.kill()?;
        frozen_ms = frozen_at.elapsed().as_secs_f64() * 1e3;
    }
    Ok(CheckpointReport {
        generation,
        path: path.display().to_string(),
        frozen_ms,
        total_ms: t0.elapsed().as_secs_f64() * 1e3,
        memory_bytes: manifest.chunks.raw_bytes(),
        stored_bytes: stasis_image::generation::generation_size(&path),
        unchanged_bytes: 0,
        copied_bytes: 0,
        precopied_bytes: 0,
        precopy_frozen_ms: 0.0,
        killed: kill,
        removed: Vec::new(),
        callbacks_late: Vec::new(),
    })
}
