//! Recreating an inotify instance with its watches under their saved watch descriptors.

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use stasis_image::manifest::InotifyWatch;
use stasis_sys::fd as sysfd;

use super::child::sys;
use crate::error::{CoreError, CoreResult};

/// Discards the events queued on `fd` (made non-blocking for the moment).
fn drain(fd: &OwnedFd) {
    let flags = sysfd::status_flags(fd.as_fd()).unwrap_or(0);
    let _ = sysfd::set_status_flags(fd.as_fd(), flags | libc::O_NONBLOCK);
    let mut buf = [0u8; 4096];
    while nix::unistd::read(fd, &mut buf).is_ok_and(|n| n > 0) {}
    let _ = sysfd::set_status_flags(fd.as_fd(), flags);
}

/// A new inotify instance watching what `watches` name, each under its saved descriptor.
///
/// The kernel hands out watch descriptors in increasing order, so a gap (a watch removed
/// before the checkpoint) is recreated by adding and removing a placeholder watch.
pub(super) fn recreate(flags: i32, watches: &[InotifyWatch]) -> CoreResult<OwnedFd> {
    let fd = sysfd::inotify_init(flags).map_err(sys("creating an inotify instance"))?;
    let mut sorted: Vec<&InotifyWatch> = watches.iter().collect();
    sorted.sort_by_key(|w| w.wd);
    let placeholder = c"/";
    let mut next = 1;
    for w in sorted {
        let meta = std::fs::metadata(&w.path).map_err(|e| CoreError::FileChanged {
            path: w.path.clone(),
            detail: format!("is watched by inotify but cannot be found ({e})"),
        })?;
        if meta.ino() != w.ino {
            return Err(CoreError::FileChanged {
                path: w.path.clone(),
                detail: "is watched by inotify but was replaced since the checkpoint".into(),
            });
        }
        while next < w.wd {
            let gap = sysfd::inotify_add(fd.as_fd(), placeholder, libc::IN_ATTRIB)
                .map_err(sys("skipping a removed inotify watch"))?;
            sysfd::inotify_remove(fd.as_fd(), gap)
                .map_err(sys("skipping a removed inotify watch"))?;
            // The removal queued an IN_IGNORED event the program must never see.
            drain(&fd);
            next = gap + 1;
        }
        let path = CString::new(w.path.as_bytes()).map_err(|_| CoreError::FileChanged {
            path: w.path.clone(),
            detail: "contains a NUL byte".into(),
        })?;
        let wd =
            sysfd::inotify_add(fd.as_fd(), &path, w.mask).map_err(|source| CoreError::Sys {
                context: format!("watching {} with inotify", w.path),
                source,
            })?;
        if wd != w.wd {
            return Err(CoreError::Incompatible(format!(
                "inotify gave watch descriptor {wd} instead of {} for {}",
                w.wd, w.path
            )));
        }
        next = wd + 1;
    }
    Ok(fd)
}
