//! Page-cache control for image files: starting and awaiting the writeback of a range while
//! more is written (so that the final `fsync` finds little left to do), reading ahead, and
//! the flag that bypasses the cache.
//!
//! Filesystems without writeback (tmpfs) accept these calls and do nothing.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};

/// The open flag for direct I/O (bypassing the page cache). A filesystem without it
/// refuses it with `EINVAL` (at open or at the first write).
pub const O_DIRECT: i32 = libc::O_DIRECT;

fn sync_range(file: &impl AsFd, offset: u64, len: u64, flags: libc::c_uint) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: sync_file_range takes a descriptor we borrow for the call and integers; it
    // touches no memory of ours.
    let ret = unsafe { libc::sync_file_range(file.as_fd().as_raw_fd(), offset, len, flags) };
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Starts writing back the dirty pages of `len` bytes at `offset` without waiting for them.
pub fn start_writeback(file: &impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    sync_range(file, offset, len, libc::SYNC_FILE_RANGE_WRITE)
}

/// Waits until the pages of `len` bytes at `offset` are written back (starting what was not
/// started). A write error is reported here, and then no longer by `fsync` of this
/// descriptor: callers must not drop it.
pub fn await_writeback(file: &impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    sync_range(
        file,
        offset,
        len,
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
    )
}

fn advise(file: &impl AsFd, offset: u64, len: u64, advice: PosixFadviseAdvice) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    posix_fadvise(file.as_fd(), offset, len, advice).map_err(io::Error::from)
}

/// Asks the kernel to start reading `len` bytes at `offset` into the page cache now.
pub fn read_ahead(file: &impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    advise(file, offset, len, PosixFadviseAdvice::POSIX_FADV_WILLNEED)
}

/// Drops the file's clean cached pages (all of it when `len` is 0), so that the next read
/// comes from the disk. Dirty pages stay: sync first to drop everything.
pub fn drop_cached(file: &impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    advise(file, offset, len, PosixFadviseAdvice::POSIX_FADV_DONTNEED)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn hints_are_accepted_on_a_regular_file() {
        let dir = std::env::temp_dir().join(format!("stasis-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        start_writeback(&f, 0, 1 << 20).unwrap();
        await_writeback(&f, 0, 1 << 20).unwrap();
        f.sync_all().unwrap();
        drop_cached(&f, 0, 0).unwrap();
        read_ahead(&f, 0, 1 << 20).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 1 << 20]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
