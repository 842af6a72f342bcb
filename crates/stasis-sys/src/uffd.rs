//! userfaultfd for another process's memory: write tracking through asynchronous write
//! protection and `PAGEMAP_SCAN` (Linux 6.7 and later: which pages were written since a
//! moment), and lazy restore ([`LazyMemoryFd`]: missing pages filled on first touch).
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
/// `_IOWR(0xAA, 6, struct uffdio_writeprotect)`.
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xc018_aa06;
/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;
const PAGE_IS_WRITTEN: u64 = 1 << 1;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
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
        register(&self.uffd, self.pid, (start, end), UFFDIO_REGISTER_MODE_WP)
    }

    /// Takes the write protection off every page of `[start, end)` (registered), markers
    /// of pages never touched included: what protecting it again then leaves is only what
    /// that protection did.
    pub fn unprotect(&self, start: u64, end: u64) -> SysResult<()> {
        let mut wp = UffdioWriteprotect {
            start,
            len: end - start,
            mode: 0,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads one uffdio_writeprotect at a valid pointer.
        let ret = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_WRITEPROTECT, &raw mut wp) };
        if ret == -1 {
            return Err(SysError::last("UFFDIO_WRITEPROTECT", self.pid));
        }
        Ok(())
    }
}

#[repr(C)]
struct UffdioWriteprotect {
    start: u64,
    len: u64,
    mode: u64,
}

/// Registers `[start, end)` on userfaultfd `uffd` (of process `pid`) in `mode`.
fn register(uffd: &OwnedFd, pid: i32, (start, end): (u64, u64), mode: u64) -> SysResult<()> {
    let mut reg = UffdioRegister {
        start,
        len: end - start,
        mode,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes one uffdio_register at a valid pointer.
    let ret = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER, &raw mut reg) };
    if ret == -1 {
        return Err(SysError::last("UFFDIO_REGISTER", pid));
    }
    Ok(())
}

/// The ranges of `[start, end)` written since they were last protected, or never protected
/// (sorted, disjoint), read from `pagemap` (the process's `/proc/PID/pagemap`). Pages never
/// touched count as written (the kernel reports them so). With `protect`, every such page is
/// write-protected again in the same pass (in ranges registered with a tracker; others stay
/// unprotected and keep being reported): a page never touched then holds a marker, which
/// pagemap shows as a page swapped out, and a range never touched gets page tables to
/// hold them. Protect so only ranges where every page exists, or nearly.
pub fn written_ranges(
    pagemap: &File,
    pid: i32,
    start: u64,
    end: u64,
    protect: bool,
) -> SysResult<Vec<(u64, u64)>> {
    ranges_in(pagemap, pid, (start, end), (PAGE_IS_WRITTEN, 0), protect)
}

/// A range of pages [`written_states`] found written, all in one state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrittenRange {
    /// First page.
    pub start: u64,
    /// End of the last page.
    pub end: u64,
    /// In memory.
    pub present: bool,
    /// Swapped out (or another entry that is not a page, as pagemap's `PM_SWAP` says);
    /// neither this nor `present`: no page (never touched, or dropped since).
    pub swapped: bool,
}

/// Like [`written_ranges`] without protecting, telling apart the pages that are in memory,
/// swapped out, or not there at all (in the same pass: the scan looks at every page
/// table entry of a range it lists anyway).
pub fn written_states(
    pagemap: &File,
    pid: i32,
    start: u64,
    end: u64,
) -> SysResult<Vec<WrittenRange>> {
    let want = Categories {
        all_of: PAGE_IS_WRITTEN,
        any_of: 0,
        shown: PAGE_IS_WRITTEN | PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
    };
    Ok(scan(pagemap, pid, (start, end), want, false)?
        .into_iter()
        .map(|r| WrittenRange {
            start: r.start,
            end: r.end,
            present: r.categories & PAGE_IS_PRESENT != 0,
            swapped: r.categories & PAGE_IS_SWAPPED != 0,
        })
        .collect())
}

/// Write-protects the pages of `[start, end)` written since they were last protected that
/// exist (present or swapped out), through `pagemap`, in a range registered with a tracker;
/// returns their ranges. Pages never touched are left unprotected, with no marker, and
/// keep being reported written. Looking at what each page is costs more than
/// [`written_ranges`]' pass, which only looks at its protection (about 3 ms for 1 GiB).
pub fn protect_written(
    pagemap: &File,
    pid: i32,
    start: u64,
    end: u64,
) -> SysResult<Vec<(u64, u64)>> {
    let existing = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
    ranges_in(
        pagemap,
        pid,
        (start, end),
        (PAGE_IS_WRITTEN, existing),
        true,
    )
}

/// The ranges of `[start, end)` that have pages (sorted, disjoint), read from `pagemap`.
pub fn present_ranges(
    pagemap: &File,
    pid: i32,
    start: u64,
    end: u64,
) -> SysResult<Vec<(u64, u64)>> {
    ranges_in(pagemap, pid, (start, end), (PAGE_IS_PRESENT, 0), false)
}

/// A range of pages [`existing_ranges`] found, all present or all swapped out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Existing {
    /// First page.
    pub start: u64,
    /// End of the last page.
    pub end: u64,
    /// In memory; else swapped out, or another entry that is not a page (as pagemap's
    /// `PM_SWAP` says).
    pub present: bool,
}

/// The pages of `[start, end)` that exist (present or swapped out), read from `pagemap` by
/// one walk of the page tables, which skips what has none: where reading pagemap gives an
/// entry for every page. Whether a page is a file's is not told.
pub fn existing_ranges(pagemap: &File, pid: i32, start: u64, end: u64) -> SysResult<Vec<Existing>> {
    let want = Categories {
        all_of: 0,
        any_of: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        shown: PAGE_IS_PRESENT,
    };
    let regions = scan(pagemap, pid, (start, end), want, false)?;
    Ok(regions
        .into_iter()
        .map(|r| Existing {
            start: r.start,
            end: r.end,
            present: r.categories & PAGE_IS_PRESENT != 0,
        })
        .collect())
}

/// Which pages a [`scan`] reports: those in every category of `all_of` and, unless it is
/// 0, in one of `any_of`; told apart by the categories of `shown`.
#[derive(Clone, Copy)]
struct Categories {
    all_of: u64,
    any_of: u64,
    shown: u64,
}

/// The ranges of `[start, end)` whose pages are in every category of `all_of` and, unless
/// it is 0, in one of `any_of` (sorted, disjoint); with `protect`, those pages are
/// write-protected in the same pass.
fn ranges_in(
    pagemap: &File,
    pid: i32,
    range: (u64, u64),
    (all_of, any_of): (u64, u64),
    protect: bool,
) -> SysResult<Vec<(u64, u64)>> {
    let want = Categories {
        all_of,
        any_of,
        shown: all_of,
    };
    Ok(merged(scan(pagemap, pid, range, want, protect)?))
}

/// The ranges of `regions`, merged where one ends as the next starts.
fn merged(regions: Vec<PageRegion>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(regions.len());
    for r in regions {
        match out.last_mut() {
            Some(last) if last.1 == r.start => last.1 = r.end,
            _ => out.push((r.start, r.end)),
        }
    }
    out
}

/// `PAGEMAP_SCAN` for the pages of `[start, end)` that `want` names (consecutive regions of
/// the same categories merged); with `protect`, those pages are write-protected in the same
/// pass.
fn scan(
    pagemap: &File,
    pid: i32,
    (start, end): (u64, u64),
    want: Categories,
    protect: bool,
) -> SysResult<Vec<PageRegion>> {
    let mut out: Vec<PageRegion> = Vec::new();
    let mut regions = vec![PageRegion::default(); 512];
    let mut at = start;
    while at < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: if protect { PM_SCAN_WP_MATCHING } else { 0 },
            start: at,
            end,
            walk_end: 0,
            // Always given: without it, protecting takes a short cut that protects every
            // page of the range, whatever `want` says.
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: want.all_of,
            category_anyof_mask: want.any_of,
            return_mask: want.shown,
        };
        // SAFETY: PAGEMAP_SCAN reads the pm_scan_arg and writes at most vec_len page_region
        // records into `regions`, which holds that many.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &raw mut arg) };
        if n < 0 {
            return Err(SysError::last("PAGEMAP_SCAN", pid));
        }
        for r in &regions[..n.unsigned_abs() as usize] {
            match out.last_mut() {
                Some(last) if last.end == r.start && last.categories == r.categories => {
                    last.end = r.end;
                }
                _ => out.push(*r),
            }
        }
        if arg.walk_end <= at {
            break;
        }
        at = arg.walk_end;
    }
    Ok(out)
}

// Lazy restore: a userfaultfd that reports first touches of missing pages, and the events
// that change the address space behind it (fork, mremap, madvise, munmap).

const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
const LAZY_FEATURES: u64 = UFFD_FEATURE_EVENT_FORK
    | UFFD_FEATURE_EVENT_REMAP
    | UFFD_FEATURE_EVENT_REMOVE
    | UFFD_FEATURE_EVENT_UNMAP;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
/// `_IOR(0xAA, 2, struct uffdio_range)`.
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
/// `_IOR(0xAA, 1, struct uffdio_range)`.
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
/// `_IOWR(0xAA, 3, struct uffdio_copy)`.
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
/// `_IOWR(0xAA, 4, struct uffdio_zeropage)`.
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_FORK: u8 = 0x13;
const UFFD_EVENT_REMAP: u8 = 0x14;
const UFFD_EVENT_REMOVE: u8 = 0x15;
const UFFD_EVENT_UNMAP: u8 = 0x16;
const MSG_LEN: usize = 32;
const PAGE: u64 = 4096;
/// Flags for the `userfaultfd` call a process being restored lazily makes: close-on-exec and
/// non-blocking, kernel faults included (so that system calls touching missing pages wait
/// for them instead of failing with `EFAULT`). Needs `CAP_SYS_PTRACE` (or the
/// `vm.unprivileged_userfaultfd` sysctl).
pub const LAZY_USERFAULTFD_FLAGS: u64 = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// Something that happened in an address space served lazily.
#[derive(Debug)]
pub enum LazyEvent {
    /// A thread touched the missing page at `addr` and waits for it.
    Fault {
        /// The page's address.
        addr: u64,
    },
    /// The process forked: the child's memory is served through `uffd`, and it misses the
    /// same pages as its parent.
    Fork {
        /// The child's userfaultfd, now ours.
        uffd: OwnedFd,
    },
    /// `mremap` moved `[from, from + len)` to `to`.
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length moved.
        len: u64,
    },
    /// `[start, end)` was dropped (`MADV_DONTNEED`, `MADV_REMOVE`): it holds zeros from
    /// now on.
    Removed {
        /// First byte.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
    /// `[start, end)` was unmapped.
    Unmapped {
        /// First byte.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
}

/// Checks that this process may serve restored memory lazily: a userfaultfd that sees
/// kernel faults and follows forks. `EPERM` without `CAP_SYS_PTRACE`.
pub fn check_lazy_allowed() -> SysResult<()> {
    // SAFETY: userfaultfd takes only flags and returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            LAZY_USERFAULTFD_FLAGS as libc::c_long,
        )
    };
    if fd < 0 {
        return Err(SysError::last("userfaultfd", 0));
    }
    // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    LazyMemoryFd::new(fd, 0, false).map(drop)
}

/// A userfaultfd bound to a process's memory, set up to report missing pages and changes
/// of the address space; the supervisor fills pages through it.
#[derive(Debug)]
pub struct LazyMemoryFd {
    uffd: OwnedFd,
    pid: i32,
    /// Pages are filled write-protected (asynchronously), so that those the program writes
    /// while memory loads can be told apart ([`written_ranges`]).
    wp: bool,
}

impl LazyMemoryFd {
    /// Sets up `uffd` (a userfaultfd created by process `pid` with
    /// [`LAZY_USERFAULTFD_FLAGS`]) for lazy restore; with `wp`, pages are filled
    /// write-protected and the program's writes to them recorded (asynchronous write
    /// protection). `EPERM` without `CAP_SYS_PTRACE`.
    pub fn new(uffd: OwnedFd, pid: i32, wp: bool) -> SysResult<Self> {
        let wp_features = if wp { UFFD_FEATURE_WP_ASYNC } else { 0 };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: LAZY_FEATURES | wp_features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one uffdio_api struct at a valid pointer.
        let ret = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API, &raw mut api) };
        if ret == -1 {
            return Err(SysError::last("UFFDIO_API", pid));
        }
        if api.features & wp_features != wp_features {
            return Err(SysError::new("UFFDIO_API", pid, Errno::EINVAL));
        }
        Ok(LazyMemoryFd { uffd, pid, wp })
    }

    /// The descriptor, for `poll`.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.uffd)
    }

    /// Registers `[start, end)` (whole private anonymous mappings) for missing-page faults.
    pub fn register(&self, start: u64, end: u64) -> SysResult<()> {
        register(
            &self.uffd,
            self.pid,
            (start, end),
            UFFDIO_REGISTER_MODE_MISSING | if self.wp { UFFDIO_REGISTER_MODE_WP } else { 0 },
        )
    }

    /// Unregisters `[start, end)` (ranges registered on this descriptor, or not at all):
    /// its missing pages read as zeros from now on, and the write protection of its pages
    /// is taken off (which walks every page: about 21 ms per GiB here).
    pub fn unregister(&self, start: u64, end: u64) -> SysResult<()> {
        let mut r = UffdioRange {
            start,
            len: end - start,
        };
        // SAFETY: UFFDIO_UNREGISTER reads one uffdio_range at a valid pointer.
        let ret = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_UNREGISTER, &raw mut r) };
        if ret == -1 {
            return Err(SysError::last("UFFDIO_UNREGISTER", self.pid));
        }
        Ok(())
    }

    /// The events waiting (none when there are none: never blocks).
    pub fn events(&self) -> SysResult<Vec<LazyEvent>> {
        let mut out = Vec::new();
        let mut buf = [0u8; MSG_LEN * 64];
        loop {
            // SAFETY: read writes at most buf.len() bytes into buf.
            let n =
                unsafe { libc::read(self.uffd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = Errno::last();
                if e == Errno::EAGAIN {
                    return Ok(out);
                }
                if e == Errno::EINTR {
                    continue;
                }
                return Err(SysError::new("read userfaultfd", self.pid, e));
            }
            let n = n.unsigned_abs();
            if n == 0 {
                return Ok(out);
            }
            for msg in buf[..n].chunks_exact(MSG_LEN) {
                let word = |i: usize| {
                    u64::from_le_bytes(msg[8 + 8 * i..16 + 8 * i].try_into().unwrap_or([0; 8]))
                };
                out.push(match msg[0] {
                    UFFD_EVENT_PAGEFAULT => LazyEvent::Fault {
                        addr: word(1) & !(PAGE - 1),
                    },
                    UFFD_EVENT_FORK => {
                        let fd = (word(0) & 0xffff_ffff) as i32;
                        // SAFETY: the kernel installed this descriptor in our table for
                        // us with the fork event; nothing else owns it.
                        let uffd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                        LazyEvent::Fork { uffd }
                    }
                    UFFD_EVENT_REMAP => LazyEvent::Remap {
                        from: word(0),
                        to: word(1),
                        len: word(2),
                    },
                    UFFD_EVENT_REMOVE => LazyEvent::Removed {
                        start: word(0),
                        end: word(1),
                    },
                    UFFD_EVENT_UNMAP => LazyEvent::Unmapped {
                        start: word(0),
                        end: word(1),
                    },
                    _ => continue,
                });
            }
            if n < buf.len() {
                return Ok(out);
            }
        }
    }

    /// Wraps a fork event's descriptor (set up like this one by the kernel).
    pub fn child(&self, uffd: OwnedFd) -> Self {
        LazyMemoryFd {
            uffd,
            pid: self.pid,
            wp: self.wp,
        }
    }

    /// Fills the missing pages of `[dst, dst + data.len())` with `data` and wakes threads
    /// waiting for them; pages already there are left as they are. `EAGAIN`: the address
    /// space is changing (read the events, then try again); `ENOENT`/`EFAULT`: the range is
    /// no longer mapped or registered; `ESRCH`: the address space is gone.
    pub fn copy(&self, dst: u64, data: &[u8]) -> SysResult<()> {
        self.fill("UFFDIO_COPY", dst, data.len() as u64, |done| {
            let mut c = UffdioCopy {
                dst: dst + done,
                src: data.as_ptr() as u64 + done,
                len: data.len() as u64 - done,
                mode: if self.wp { UFFDIO_COPY_MODE_WP } else { 0 },
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads uffdio_copy and len bytes at src (inside `data`),
            // and writes the copy field.
            let ret = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_COPY, &raw mut c) };
            (ret, c.copy)
        })
    }

    /// Maps the zero page at the missing pages of `[start, end)` and wakes threads waiting
    /// for them. Errors as [`LazyMemoryFd::copy`].
    pub fn zero(&self, start: u64, end: u64) -> SysResult<()> {
        self.fill("UFFDIO_ZEROPAGE", start, end - start, |done| {
            let mut z = UffdioZeropage {
                range: UffdioRange {
                    start: start + done,
                    len: end - start - done,
                },
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: UFFDIO_ZEROPAGE reads uffdio_zeropage and writes its zeropage field.
            let ret = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_ZEROPAGE, &raw mut z) };
            (ret, z.zeropage)
        })
    }

    /// Runs a filling ioctl (`attempt(bytes done)` returns its result and the bytes it
    /// filled, or the negative errno) until `len` bytes from `start` are dealt with,
    /// carrying on after a partial fill and past a page that exists already (waking the
    /// threads waiting for it).
    fn fill(
        &self,
        op: &'static str,
        start: u64,
        len: u64,
        mut attempt: impl FnMut(u64) -> (libc::c_int, i64),
    ) -> SysResult<()> {
        let mut done = 0u64;
        while done < len {
            let (ret, filled) = attempt(done);
            if ret == 0 {
                return Ok(());
            }
            let e = Errno::last();
            if filled > 0 {
                done += filled.unsigned_abs();
            }
            match e {
                Errno::EEXIST => {
                    self.wake(start + done, PAGE);
                    done += PAGE;
                }
                Errno::EINTR => {}
                _ if filled > 0 => {}
                _ => return Err(SysError::new(op, self.pid, e)),
            }
        }
        Ok(())
    }

    /// Whether pages are filled write-protected (see [`LazyMemoryFd::new`]).
    pub fn records_writes(&self) -> bool {
        self.wp
    }

    /// Wakes threads waiting for pages of `[start, start + len)`.
    pub fn wake(&self, start: u64, len: u64) {
        let mut r = UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE reads one uffdio_range at a valid pointer.
        unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_WAKE, &raw mut r) };
    }
}
