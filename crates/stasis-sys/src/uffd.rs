//! Write tracking through userfaultfd's asynchronous write protection and `PAGEMAP_SCAN`
//! (Linux 6.7 and later): which pages of another process were written since a moment.
//!
//! A userfaultfd created inside the tracked process (by an injected call; it belongs to the
//! address space of whoever creates it) and then taken over by the tracer stays bound to the
//! process's memory. Ranges registered on it in write-protect mode with
//! `UFFD_FEATURE_WP_ASYNC` never stop the program: the kernel clears a page's protection
//! itself on the first write. `PAGEMAP_SCAN` on `/proc/PID/pagemap` lists the pages without
//! protection (written, or not protected yet) and can protect them again in the same pass.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::error::{Errno, SysError, SysResult};

const UFFD_API: u64 = 0xaa;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
const PAGE_IS_WRITTEN: u64 = 1 << 1;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Flags for the `userfaultfd` call the tracked process makes: close-on-exec,
/// non-blocking, and user-mode faults only (all that unprivileged users may ask for).
pub const USERFAULTFD_FLAGS: u64 = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64 | 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// A userfaultfd, bound to a tracked process's memory, set up for asynchronous write
/// protection.
#[derive(Debug)]
pub struct WriteTracker {
    uffd: OwnedFd,
    pid: i32,
}

impl WriteTracker {
    /// Sets up `uffd` (a userfaultfd created by process `pid`) for asynchronous write
    /// protection. Fails with `EINVAL` on kernels without it.
    pub fn new(uffd: OwnedFd, pid: i32) -> SysResult<Self> {
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_WP_ASYNC,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one uffdio_api struct at a valid pointer.
        let ret = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &raw mut api) };
        if ret == -1 {
            return Err(SysError::last("UFFDIO_API", pid));
        }
        if api.features & UFFD_FEATURE_WP_ASYNC == 0 {
            return Err(SysError::new("UFFDIO_API", pid, Errno::EINVAL));
        }
        Ok(WriteTracker { uffd, pid })
    }

    /// Registers `[start, end)` (whole private anonymous mappings) for write protection.
    /// `EBUSY`: the range is registered with another userfaultfd (the program's own);
    /// `ESRCH`: the address space this tracker was bound to is gone (the process exec'd).
    pub fn register(&self, start: u64, end: u64) -> SysResult<()> {
        let mut reg = UffdioRegister {
            start,
            len: end - start,
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one uffdio_register at a valid pointer.
        let ret = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_REGISTER, &raw mut reg) };
        if ret == -1 {
            return Err(SysError::last("UFFDIO_REGISTER", self.pid));
        }
        Ok(())
    }
}

/// The ranges of `[start, end)` written since they were last protected, or never protected
/// (sorted, disjoint), read from `pagemap` (the process's `/proc/PID/pagemap`). With
/// `protect`, every such page is write-protected again in the same pass (in ranges
/// registered with a tracker; others stay unprotected and keep being reported).
pub fn written_ranges(
    pagemap: &File,
    pid: i32,
    start: u64,
    end: u64,
    protect: bool,
) -> SysResult<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut regions = vec![PageRegion::default(); 512];
    let mut at = start;
    while at < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: if protect { PM_SCAN_WP_MATCHING } else { 0 },
            start: at,
            end,
            walk_end: 0,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: PAGE_IS_WRITTEN,
            category_anyof_mask: 0,
            return_mask: PAGE_IS_WRITTEN,
        };
        // SAFETY: PAGEMAP_SCAN reads the pm_scan_arg and writes at most vec_len page_region
        // records into `regions`, which holds that many.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &raw mut arg) };
        if n < 0 {
            return Err(SysError::last("PAGEMAP_SCAN", pid));
        }
        for r in &regions[..n.unsigned_abs() as usize] {
            match out.last_mut() {
                Some(last) if last.1 == r.start => last.1 = r.end,
                _ => out.push((r.start, r.end)),
            }
        }
        if arg.walk_end <= at {
            break;
        }
        at = arg.walk_end;
    }
    Ok(out)
}
