//! Where a job's images and control socket live.
//!
//! Images: `$STASIS_IMAGES`, else `$XDG_STATE_HOME/stasis/images`, else
//! `$HOME/.local/state/stasis/images`, else `/tmp/stasis-UID/images`; one directory per job
//! below it. Sockets: `$XDG_RUNTIME_DIR/stasis`, else `/tmp/stasis-UID/run`. Both are created
//! with mode 0700 and must be owned by the caller.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{JobError, JobResult, io_err};

fn uid() -> u32 {
    stasis_sys::process::uid()
}

fn env_dir(key: &str) -> Option<PathBuf> {
    std::env::var_os(key)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The default root of all of this user's job images.
pub fn default_images_root() -> PathBuf {
    if let Some(p) = env_dir("STASIS_IMAGES") {
        return p;
    }
    if let Some(p) = env_dir("XDG_STATE_HOME") {
        return p.join("stasis/images");
    }
    if let Some(home) = env_dir("HOME").filter(|h| h.is_dir() && h != Path::new("/nonexistent")) {
        return home.join(".local/state/stasis/images");
    }
    PathBuf::from(format!("/tmp/stasis-{}/images", uid()))
}

/// The directory of job `name` under `root`.
pub fn job_dir(root: &Path, name: &str) -> PathBuf {
    root.join(name)
}

/// Checks a job name.
pub fn check_name(name: &str) -> JobResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(JobError::BadName(name.to_owned()))
    }
}

/// Creates `dir` with mode 0700 if needed and checks that it belongs to us and is private.
pub fn private_dir(dir: &Path) -> JobResult<()> {
    stasis_image::generation::create_private_dir(dir)?;
    let meta = std::fs::metadata(dir).map_err(io_err(dir.display().to_string()))?;
    if meta.uid() != uid() {
        return Err(JobError::Refused(format!(
            "{} belongs to uid {}, not to you (uid {}); refusing to use it",
            dir.display(),
            meta.uid(),
            uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(dir.display().to_string()))?;
    }
    Ok(())
}

/// Checks, without creating anything, that `dir` (if it exists) belongs to us.
pub fn check_owned(dir: &Path) -> JobResult<()> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.uid() != uid() => Err(JobError::Refused(format!(
            "{} belongs to uid {}, not to you (uid {}); refusing to use it",
            dir.display(),
            meta.uid(),
            uid()
        ))),
        _ => Ok(()),
    }
}

/// The image directory of an existing job `name` under `root`, checked to be ours.
pub fn existing_job_dir(root: &Path, name: &str) -> JobResult<PathBuf> {
    check_name(name)?;
    let dir = job_dir(root, name);
    check_owned(root)?;
    check_owned(&dir)?;
    if !dir.is_dir() {
        return Err(stasis_image::ImageError::NoGeneration {
            path: dir,
            detail: format!("job {name:?} has no images here (see --images)"),
        }
        .into());
    }
    Ok(dir)
}

/// The directory holding this user's control sockets (created, private).
pub fn runtime_dir() -> JobResult<PathBuf> {
    let dir = match env_dir("XDG_RUNTIME_DIR").filter(|d| d.is_dir()) {
        Some(runtime) => runtime.join("stasis"),
        None => {
            // Our own directory under /tmp: it must be ours and private.
            let own = PathBuf::from(format!("/tmp/stasis-{}", uid()));
            private_dir(&own)?;
            own.join("run")
        }
    };
    private_dir(&dir)?;
    Ok(dir)
}

/// The control socket of job `name`.
pub fn socket_path(name: &str) -> JobResult<PathBuf> {
    check_name(name)?;
    Ok(runtime_dir()?.join(format!("{name}.sock")))
}
