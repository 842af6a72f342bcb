//! Files at restart: the files the job had open or mapped must still be the ones of the
//! checkpoint, and files kept in the image (`--save-files`) are recreated where missing.
//!
//! A file without a saved copy is checked by content when the image has its hash (small
//! files: the mtime then does not matter), else by size and mtime; a file open only for
//! writing need only exist. A saved file is the same when its size and content are; a
//! missing one is recreated with its content, mode and mtime (missing parent directories
//! too); a different one is never overwritten: if the job had it open for writing it is its
//! own output since the checkpoint, moved aside to `PATH.after-gen-G` before the saved one is
//! recreated, else the restart is refused.

use std::collections::HashSet;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
use stasis_image::OpenGeneration;
use stasis_image::manifest::{FileId, Manifest, OpenFile, SavedFile};

use crate::error::{CoreError, CoreResult};

/// What a restart did to the job's files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileReport {
    /// Saved files that were missing, recreated from the image.
    pub recreated: Vec<String>,
    /// Saved files the job had written since the checkpoint: (path, where the newer file
    /// was moved), each recreated from the image.
    pub moved: Vec<(String, String)>,
    /// Saved files that differ from the image but were used as they are (`--force`):
    /// (path, what differs).
    pub kept: Vec<(String, String)>,
}

fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime() * 1_000_000_000 + meta.mtime_nsec()
}

/// blake3 of the file at `path`, hex.
fn hash(path: &str) -> CoreResult<String> {
    crate::capture::content::file_blake3(path).map_err(|e| CoreError::FileChanged {
        path: path.to_owned(),
        detail: format!("cannot be read to compare its content ({e})"),
    })
}

/// Checks that a file is still the one saved: by content when the image has its hash (then
/// a changed mtime alone does not matter), else by size and mtime; devices need only exist.
pub fn check_file(id: &FileId) -> CoreResult<()> {
    let meta = std::fs::metadata(&id.path).map_err(|e| CoreError::FileChanged {
        path: id.path.clone(),
        detail: format!("cannot be opened ({e})"),
    })?;
    if !id.regular {
        return Ok(());
    }
    let mtime_changed = mtime_ns(&meta) != id.mtime_ns;
    let mut changes = Vec::new();
    if meta.len() != id.size {
        changes.push(format!("size {} -> {}", id.size, meta.len()));
    }
    // With a content hash the content decides; a size change says enough without it.
    let by_content = id.blake3.as_ref().filter(|_| changes.is_empty());
    if let Some(saved) = by_content {
        if hash(&id.path)? != *saved {
            changes.push(if mtime_changed {
                "content differs (same size)".to_owned()
            } else {
                "content differs (same size and mtime)".to_owned()
            });
        }
    } else if mtime_changed {
        changes.push("mtime changed".into());
    }
    if changes.is_empty() {
        return Ok(());
    }
    Err(CoreError::FileChanged {
        path: id.path.clone(),
        detail: format!("changed since the checkpoint: {}", changes.join(", ")),
    })
}

/// How a saved file's path stands at restart.
enum Saved {
    /// The same size and content.
    Same,
    /// Nothing there.
    Missing,
    /// A regular file with other content: what differs.
    Differs(String),
    /// Something that is not a regular file (a directory, …): never moved aside.
    NotAFile,
}

fn saved_state(f: &SavedFile) -> CoreResult<Saved> {
    let meta = match std::fs::metadata(&f.path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Saved::Missing),
        Err(e) => {
            return Err(CoreError::FileChanged {
                path: f.path.clone(),
                detail: format!("cannot be examined ({e})"),
            });
        }
    };
    Ok(if !meta.file_type().is_file() {
        Saved::NotAFile
    } else if meta.len() != f.size {
        Saved::Differs(format!("size {} -> {}", f.size, meta.len()))
    } else if hash(&f.path)? != f.blake3 {
        Saved::Differs("content differs (same size)".into())
    } else {
        Saved::Same
    })
}

/// Checks every file the job had open for reading, or mapped, against the image (see
/// [`check_file`]); files open only for writing need only exist; files the image keeps must
/// be there and the same (see [`prepare_files`], which recreates them).
pub fn check_files(m: &Manifest) -> CoreResult<()> {
    check_unsaved(m)?;
    for f in &m.saved_files {
        match saved_state(f)? {
            Saved::Same => {}
            Saved::Missing => {
                return Err(CoreError::FileChanged {
                    path: f.path.clone(),
                    detail: "is missing (the image keeps it, but it was not recreated)".into(),
                });
            }
            Saved::Differs(detail) => {
                return Err(CoreError::SavedFileDiffers {
                    path: f.path.clone(),
                    detail,
                });
            }
            Saved::NotAFile => return Err(not_a_file(f)),
        }
    }
    Ok(())
}

fn not_a_file(f: &SavedFile) -> CoreError {
    CoreError::SavedFileDiffers {
        path: f.path.clone(),
        detail: "is no longer a regular file".into(),
    }
}

/// [`check_files`] for the files the image does not keep, each path once.
fn check_unsaved(m: &Manifest) -> CoreResult<()> {
    let saved: HashSet<&str> = m.saved_files.iter().map(|f| f.path.as_str()).collect();
    let mut checked = HashSet::new();
    for f in &m.files {
        if let OpenFile::Path { file, flags, .. } = f {
            if saved.contains(file.path.as_str()) {
                continue;
            }
            if flags & libc::O_ACCMODE == libc::O_WRONLY {
                std::fs::metadata(&file.path).map_err(|e| CoreError::FileChanged {
                    path: file.path.clone(),
                    detail: format!("cannot be opened ({e})"),
                })?;
            } else if checked.insert(file.path.as_str()) {
                check_file(file)?;
            }
        }
    }
    for id in m
        .processes
        .iter()
        .flat_map(|p| &p.vmas)
        .filter(|v| v.shmem.is_none())
        .filter_map(|v| v.file.as_ref())
    {
        if !saved.contains(id.path.as_str()) && checked.insert(id.path.as_str()) {
            check_file(id)?;
        }
    }
    Ok(())
}

/// Makes the job's files ready for a restart from `image`. Unless `force`, first checks
/// every file the image does not keep ([`check_files`]) and every file it keeps, and refuses
/// before changing anything; then recreates each kept file that is missing, and each one the
/// job had open for writing that changed since the checkpoint (its own later output), whose
/// current version is first moved aside to `PATH.after-gen-G` (never overwritten). With
/// `force`, files that exist are used as they are and only missing ones are recreated.
pub fn prepare_files(image: &mut OpenGeneration, force: bool) -> CoreResult<FileReport> {
    let saved = image.manifest.saved_files.clone();
    let generation = image.manifest.job.generation;
    if !force {
        check_unsaved(&image.manifest)?;
    }
    let mut report = FileReport::default();
    let mut todo = Vec::new();
    for f in &saved {
        match saved_state(f)? {
            Saved::Same => {}
            Saved::Missing => todo.push((f, false)),
            Saved::NotAFile if force => {
                report
                    .kept
                    .push((f.path.clone(), "not a regular file".into()));
            }
            Saved::NotAFile => return Err(not_a_file(f)),
            Saved::Differs(detail) if force => report.kept.push((f.path.clone(), detail)),
            Saved::Differs(_) if f.written => todo.push((f, true)),
            Saved::Differs(detail) => {
                return Err(CoreError::SavedFileDiffers {
                    path: f.path.clone(),
                    detail,
                });
            }
        }
    }
    // Nothing has been changed so far: a refused restart leaves every file as it was.
    for (f, differs) in todo {
        if differs {
            let aside = move_aside(&f.path, generation)?;
            report.moved.push((f.path.clone(), aside));
        } else {
            report.recreated.push(f.path.clone());
        }
        recreate(image, f)?;
    }
    Ok(report)
}

/// Renames the file at `path` to a free `PATH.after-gen-G` (or `.after-gen-G.N`) name;
/// returns that name.
fn move_aside(path: &str, generation: u32) -> CoreResult<String> {
    for n in 1..1000 {
        let aside = if n == 1 {
            format!("{path}.after-gen-{generation}")
        } else {
            format!("{path}.after-gen-{generation}.{n}")
        };
        match rename_noreplace(Path::new(path), Path::new(&aside)) {
            Ok(()) => return Ok(aside),
            Err(Errno::EEXIST) => {}
            Err(e) => {
                return Err(CoreError::Io {
                    path: format!("{path} (moving it aside to {aside})"),
                    source: std::io::Error::from(e),
                });
            }
        }
    }
    Err(CoreError::FileChanged {
        path: path.to_owned(),
        detail: format!(
            "differs from the image, and no free name {path}.after-gen-{generation}.N was found to move it aside"
        ),
    })
}

/// Renames `from` to `to` unless `to` exists (`EEXIST`), atomically where the filesystem
/// supports it.
fn rename_noreplace(from: &Path, to: &Path) -> Result<(), Errno> {
    match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
        Err(Errno::EINVAL | Errno::ENOSYS) => {
            // No RENAME_NOREPLACE here: a hard link fails on an existing name too.
            std::fs::hard_link(from, to)
                .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
            std::fs::remove_file(from)
                .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
        }
        other => other,
    }
}

/// Removes a temporary file unless disarmed.
struct Temp(Option<PathBuf>);

impl Drop for Temp {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Writes saved file `f` at its path (which must be free), with its content, mode and
/// mtime, creating missing parent directories; written under a temporary name first, so
/// that a failed restart never leaves a half-written file at the path.
fn recreate(image: &mut OpenGeneration, f: &SavedFile) -> CoreResult<()> {
    let path = Path::new(&f.path);
    let io = |what: &str| {
        let what = format!("{} ({what})", f.path);
        move |source: std::io::Error| CoreError::Io { path: what, source }
    };
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(CoreError::Incompatible(format!(
            "the image keeps a file at {:?}, which is not a file path",
            f.path
        )));
    };
    std::fs::create_dir_all(dir).map_err(io("creating its directory"))?;
    let tmp = dir.join(format!(
        ".{}.stasis-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("recreating it from the image"))?;
    let mut guard = Temp(Some(tmp.clone()));
    file.set_len(f.size).map_err(io("recreating it"))?;
    for run in &f.data {
        let bytes = image.chunk(run.chunk)?;
        file.write_all_at(&bytes, run.offset)
            .map_err(io("recreating it"))?;
    }
    file.set_permissions(std::fs::Permissions::from_mode(f.mode))
        .map_err(io("setting its mode"))?;
    let mtime = std::time::UNIX_EPOCH
        + std::time::Duration::from_nanos(u64::try_from(f.mtime_ns).unwrap_or(0));
    file.set_modified(mtime).map_err(io("setting its mtime"))?;
    file.sync_all().map_err(io("recreating it"))?;
    drop(file);
    rename_noreplace(&tmp, path).map_err(|e| {
        if e == Errno::EEXIST {
            CoreError::FileChanged {
                path: f.path.clone(),
                detail: "appeared while it was being recreated from the image; it was left alone"
                    .into(),
            }
        } else {
            io("recreating it")(std::io::Error::from(e))
        }
    })?;
    guard.0 = None;
    Ok(())
}
