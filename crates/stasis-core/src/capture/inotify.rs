//! Capturing inotify watches: the kernel names each watched file only by device and inode,
//! so its path is found by looking where the process is likely to have found it — its
//! working directory, the directories of the files it holds open, their parents, `/tmp` —
//! within a bounded search.

use std::collections::VecDeque;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use stasis_image::manifest::InotifyWatch;

/// Directory levels searched below each starting directory.
const SEARCH_DEPTH: usize = 3;
/// Entries examined at most, for all watches of one instance.
const SEARCH_LIMIT: usize = 50_000;

/// One `inotify wd:… ino:… sdev:… mask:…` line of fdinfo: (wd, inode, device, mask).
fn parse_line(line: &str) -> Option<(i32, u64, u64, u32)> {
    let rest = line.strip_prefix("inotify")?;
    let get = |k: &str| {
        rest.split_whitespace()
            .find_map(|f| f.strip_prefix(k)?.strip_prefix(':'))
    };
    Some((
        get("wd")?.parse().ok()?,
        u64::from_str_radix(get("ino")?, 16).ok()?,
        u64::from_str_radix(get("sdev")?, 16).ok()?,
        u32::from_str_radix(get("mask")?, 16).ok()?,
    ))
}

/// Whether `meta` is inode `ino` on the kernel-encoded device `sdev`.
fn same(meta: &std::fs::Metadata, ino: u64, sdev: u64) -> bool {
    let (major, minor) = (sdev >> 20, sdev & 0xf_ffff);
    meta.ino() == ino
        && u64::from(libc::major(meta.dev())) == major
        && u64::from(libc::minor(meta.dev())) == minor
}

/// Where to look for the watched files of process `pid`.
fn starting_points(pid: i32) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd")) {
        dirs.push(cwd);
    }
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(t) = std::fs::read_link(e.path())
            && t.is_absolute()
            && let Some(parent) = t.parent()
        {
            dirs.push(parent.to_path_buf());
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home));
    }
    dirs.push(PathBuf::from("/tmp"));
    dirs.sort();
    dirs.dedup();
    dirs
}

/// Finds inode `ino` of device `sdev` among `starts`, their ancestors and (breadth-first,
/// bounded) their descendants.
fn find(starts: &[PathBuf], ino: u64, sdev: u64, budget: &mut usize) -> Option<PathBuf> {
    for s in starts {
        for a in s.ancestors() {
            if std::fs::metadata(a).is_ok_and(|m| same(&m, ino, sdev)) {
                return Some(a.to_path_buf());
            }
        }
    }
    for s in starts {
        let mut queue: VecDeque<(PathBuf, usize)> = VecDeque::from([(s.clone(), 0)]);
        while let Some((dir, depth)) = queue.pop_front() {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if *budget == 0 {
                    return None;
                }
                *budget -= 1;
                let path = e.path();
                let Ok(meta) = std::fs::symlink_metadata(&path) else {
                    continue;
                };
                if same(&meta, ino, sdev) {
                    return Some(path);
                }
                if meta.is_dir() && depth + 1 < SEARCH_DEPTH && !path.starts_with("/proc") {
                    queue.push_back((path, depth + 1));
                }
            }
        }
    }
    None
}

/// The watches of an inotify instance of process `pid`, from its fdinfo text; `Err` says
/// which watched file could not be found.
pub(super) fn watches(pid: i32, info: &str) -> Result<Vec<InotifyWatch>, String> {
    let starts = starting_points(pid);
    let mut budget = SEARCH_LIMIT;
    let mut out = Vec::new();
    for (wd, ino, sdev, mask) in info.lines().filter_map(parse_line) {
        let path = find(&starts, ino, sdev, &mut budget).ok_or_else(|| {
            format!(
                "its watch {wd} is on inode {ino} of device {}:{}, which was not found near the process's working directory or open files",
                sdev >> 20,
                sdev & 0xf_ffff
            )
        })?;
        out.push(InotifyWatch {
            wd,
            mask,
            path: path_string(&path)?,
            ino,
        });
    }
    Ok(out)
}

fn path_string(p: &Path) -> Result<String, String> {
    p.to_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("watched path {} is not UTF-8", p.display()))
}
