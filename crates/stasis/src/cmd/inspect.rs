//! `stasis inspect`: describe a generation.

use std::path::{Path, PathBuf};

use anyhow::Result;
use stasis_image::generation::{MANIFEST_FILE, read_manifest, resolve};
use stasis_image::manifest::{CONTENT_HASH_LIMIT, FileId, Manifest, OpenFile, VmaKind};

use crate::output::{bytes, emit};

/// Arguments of `stasis inspect`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A generation directory, or a job's image directory (its newest generation is shown).
    image_dir: PathBuf,
}

/// A generation directory from a generation or job directory.
pub fn generation_dir(dir: &Path) -> Result<PathBuf> {
    if dir.join(MANIFEST_FILE).exists() {
        Ok(dir.to_owned())
    } else {
        Ok(resolve(dir, None)?)
    }
}

/// How the file at `id` is treated at restart: `saved`, `content hash`, `size+mtime`, or
/// `must exist` (open only for writing); devices have none.
fn file_check(m: &Manifest, id: &FileId, write_only: bool) -> Option<&'static str> {
    if m.saved_files.iter().any(|f| f.path == id.path) {
        Some("saved")
    } else if !id.regular {
        None
    } else if write_only {
        Some("must exist")
    } else if id.blake3.is_some() {
        Some("content hash")
    } else {
        Some("size+mtime")
    }
}

/// The files section: every regular file the job holds or maps, once, with how it is
/// checked or kept.
fn files_section(m: &Manifest) -> String {
    let mut seen = std::collections::BTreeMap::new();
    let ids = m
        .files
        .iter()
        .filter_map(|f| match f {
            OpenFile::Path { file, flags, .. } => {
                Some((file, flags & libc::O_ACCMODE == libc::O_WRONLY))
            }
            _ => None,
        })
        .chain(
            m.processes
                .iter()
                .flat_map(|p| &p.vmas)
                .filter(|v| v.shmem.is_none())
                .filter_map(|v| v.file.as_ref().map(|f| (f, false))),
        );
    for (id, write_only) in ids {
        if let Some(how) = file_check(m, id, write_only) {
            // A file both read and written is checked as read.
            let entry = seen.entry(id.path.clone()).or_insert((how, id.size));
            if entry.0 == "must exist" {
                *entry = (how, id.size);
            }
        }
    }
    let mut t = String::new();
    if seen.is_empty() {
        return t;
    }
    t.push_str(&format!(
        "\n  files (checked at restart: by content hash up to {}, else size+mtime; saved: kept in the image):",
        bytes(CONTENT_HASH_LIMIT)
    ));
    for (path, (how, size)) in &seen {
        let detail = match m.saved_files.iter().find(|f| &f.path == path) {
            Some(f) => format!(
                "saved, {} stored, mode {:04o}{}",
                bytes(f.data.iter().map(|r| m.chunks.chunk_len(r.chunk)).sum()),
                f.mode,
                if f.written {
                    ", written by the job"
                } else {
                    ""
                }
            ),
            None => (*how).to_owned(),
        };
        t.push_str(&format!("\n    {path} ({}): {detail}", bytes(*size)));
    }
    t
}

/// Runs the verb.
pub fn run(a: Args, json: bool) -> Result<i32> {
    let dir = generation_dir(&a.image_dir)?;
    let m = read_manifest(&dir.join(MANIFEST_FILE))?;
    // The chunk index is binary on disk; JSON shows its totals.
    let mut value = serde_json::to_value(&m)?;
    value["chunks"] = serde_json::json!({
        "count": m.chunks.len(),
        "blobs": m.chunks.blobs.len(),
        "frames": m.chunks.frames.len(),
        "raw_bytes": m.chunks.raw_bytes(),
        "new_bytes": m.chunks.raw_bytes_in(0),
        "stored_bytes": m.chunks.stored_bytes_in(0),
    });
    emit(json, &value, || {
        let j = &m.job;
        let raw = m.chunks.raw_bytes();
        let stored = m.chunks.stored_bytes_in(0);
        let shared = raw - m.chunks.raw_bytes_in(0);
        let mut t = format!(
            "generation {} of job {:?} ({})\n  taken:      {} ms since the epoch on host {} (kernel {})\n  command:    {}\n  namespaces: user={} pid={} time={}\n  memory:     {} in {} chunks, {} of it new, stored as {}; {} shared with older generations\n  files:      {} saved in the image{}",
            j.generation,
            j.name,
            j.reason,
            j.created_unix_ms,
            j.host,
            j.kernel,
            j.command.join(" "),
            j.namespaces.user,
            j.namespaces.pid,
            j.namespaces.time,
            bytes(raw),
            m.chunks.len(),
            bytes(raw - shared),
            bytes(stored),
            bytes(shared),
            m.saved_files.len(),
            if j.save_files { " (--save-files)" } else { "" }
        );
        t.push_str(&files_section(&m));
        for p in &m.processes {
            t.push_str(&format!(
                "\n  process {} ({}): {} thread(s), cwd {}",
                p.pid,
                p.exe,
                p.threads.len(),
                p.cwd
            ));
            for v in &p.vmas {
                let name = match (&v.file, v.kind) {
                    (Some(f), _) => f.path.clone(),
                    (None, VmaKind::Anon) => String::new(),
                    (None, k) => format!("[{k:?}]").to_lowercase(),
                };
                let saved: usize = v
                    .pages
                    .iter()
                    .map(|r| m.chunks.chunk_len(r.chunk) as usize)
                    .sum();
                t.push_str(&format!(
                    "\n    {:#014x}-{:#014x} prot={} {} saved={} {}",
                    v.start,
                    v.end,
                    v.prot,
                    if v.shared { "shared" } else { "private" },
                    bytes(saved as u64),
                    name
                ));
            }
            for fd in &p.fds {
                let what = match &m.files[fd.file as usize] {
                    OpenFile::Path { file, pos, flags } => {
                        match file_check(&m, file, flags & libc::O_ACCMODE == libc::O_WRONLY) {
                            Some(how) => format!("{} @ {pos} [{how}]", file.path),
                            None => format!("{} @ {pos}", file.path),
                        }
                    }
                    OpenFile::Stdio { path, .. } => {
                        format!("stdio of the restart command (was {path})")
                    }
                    OpenFile::Pipe {
                        inode,
                        write_end,
                        data,
                        ..
                    } => format!(
                        "pipe {inode} {} ({} chunks queued)",
                        if *write_end { "write end" } else { "read end" },
                        data.len()
                    ),
                    OpenFile::Pty { index, master, .. } => {
                        let job_terminal =
                            m.ptys.iter().any(|t| t.index == *index && t.job_terminal);
                        format!(
                            "{} of pseudo-terminal {index}{}",
                            if *master { "master" } else { "slave" },
                            if job_terminal {
                                " (the job's terminal)"
                            } else {
                                ""
                            }
                        )
                    }
                    OpenFile::Inotify { watches, .. } => format!(
                        "inotify ({})",
                        watches
                            .iter()
                            .map(|w| format!("{} on {}", w.wd, w.path))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    OpenFile::EventFd { count, .. } => format!("eventfd (counter {count})"),
                    OpenFile::TimerFd {
                        value_ns,
                        interval_ns,
                        ..
                    } => {
                        format!("timerfd (next in {value_ns} ns, every {interval_ns} ns)")
                    }
                    OpenFile::SignalFd { mask, .. } => format!("signalfd (mask {mask:#x})"),
                    OpenFile::Epoll { watches, .. } => {
                        format!("epoll ({} registrations)", watches.len())
                    }
                    OpenFile::UnixSocket {
                        ino,
                        listening,
                        peer,
                        peer_in_job,
                        queued,
                        ..
                    } => {
                        let role = match (listening, peer, peer_in_job) {
                            (true, _, _) => "listening".to_owned(),
                            (false, 0, _) => "unconnected".to_owned(),
                            (false, p, true) => format!("connected to socket {p}"),
                            (false, _, false) => {
                                "connected outside the job (restored closed)".to_owned()
                            }
                        };
                        format!(
                            "unix socket {ino}, {role}, {} queued message(s)",
                            queued.len()
                        )
                    }
                    OpenFile::InetSocket {
                        protocol,
                        listening,
                        local,
                        remote,
                        peer_in_job,
                        ..
                    } => {
                        let proto = if *protocol == 6 { "tcp" } else { "udp" };
                        match (listening, remote) {
                            (true, _) => format!("{proto} listening at {local}"),
                            (false, Some(r)) if *peer_in_job => {
                                format!("{proto} {local} connected to {r} (in the job)")
                            }
                            (false, Some(r)) => format!(
                                "{proto} {local} connected to {r} outside the job (restored closed)"
                            ),
                            (false, None) => format!("{proto} {local}"),
                        }
                    }
                    OpenFile::Fifo { path, data, .. } => {
                        format!("FIFO {path} ({} chunks queued)", data.len())
                    }
                    OpenFile::Memfd { shmem, pos, .. } => {
                        format!("memfd (shared memory object {shmem}) @ {pos}")
                    }
                };
                t.push_str(&format!(
                    "\n    fd {}: {what}{}",
                    fd.fd,
                    if fd.cloexec { " (cloexec)" } else { "" }
                ));
            }
        }
        t
    });
    Ok(0)
}
