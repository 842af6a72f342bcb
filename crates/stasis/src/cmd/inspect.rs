//! `stasis inspect`: describe a generation.

use std::path::{Path, PathBuf};

use anyhow::Result;
use stasis_image::generation::{MANIFEST_FILE, read_manifest, resolve};
use stasis_image::manifest::{OpenFile, VmaKind};

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
            "generation {} of job {:?} ({})\n  taken:      {} ms since the epoch on host {} (kernel {})\n  command:    {}\n  namespaces: user={} pid={} time={}\n  memory:     {} in {} chunks, {} of it new, stored as {}; {} shared with older generations",
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
            bytes(shared)
        );
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
                    OpenFile::Path { file, pos, .. } => format!("{} @ {pos}", file.path),
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
