//! Reading and writing another process's memory in bulk.

use crate::error::{SysError, SysResult};

/// Reads `buf.len()` bytes at `addr` of process `pid`; returns how many were read.
pub fn read(pid: i32, addr: u64, buf: &mut [u8]) -> SysResult<usize> {
    let mut done = 0;
    while done < buf.len() {
        let local = libc::iovec {
            iov_base: buf[done..].as_mut_ptr().cast(),
            iov_len: buf.len() - done,
        };
        let remote = libc::iovec {
            iov_base: (addr + done as u64) as *mut libc::c_void,
            iov_len: buf.len() - done,
        };
        // SAFETY: `local` points into `buf`, which is writable for `iov_len` bytes; the kernel
        // checks the remote range itself.
        let n =
            unsafe { libc::process_vm_readv(pid, &raw const local, 1, &raw const remote, 1, 0) };
        if n < 0 {
            if done > 0 {
                return Ok(done);
            }
            return Err(SysError::last("process_vm_readv", pid));
        }
        if n == 0 {
            break;
        }
        done += n.unsigned_abs();
    }
    Ok(done)
}

/// Reads the remote `ranges` (address, length) of process `pid`, one after another, into
/// `buf` (as long as their lengths together), up to 1024 ranges a call; returns how many
/// bytes were read (fewer when a range could not be read: the rest is left as it was).
pub fn read_gather(pid: i32, ranges: &[(u64, usize)], buf: &mut [u8]) -> SysResult<usize> {
    const IOV_MAX: usize = 1024;
    let mut done = 0;
    for batch in ranges.chunks(IOV_MAX) {
        let want: usize = batch.iter().map(|r| r.1).sum();
        let Some(dest) = buf.get_mut(done..done + want) else {
            return Err(SysError::new("process_vm_readv", pid, crate::Errno::EINVAL));
        };
        let local = libc::iovec {
            iov_base: dest.as_mut_ptr().cast(),
            iov_len: want,
        };
        let remote: Vec<libc::iovec> = batch
            .iter()
            .map(|&(addr, len)| libc::iovec {
                iov_base: addr as *mut libc::c_void,
                iov_len: len,
            })
            .collect();
        // SAFETY: `local` points into `buf`, writable for `want` bytes; `remote` holds
        // `batch.len()` (at most IOV_MAX) entries; the kernel checks the remote ranges itself.
        let n = unsafe {
            libc::process_vm_readv(
                pid,
                &raw const local,
                1,
                remote.as_ptr(),
                remote.len() as libc::c_ulong,
                0,
            )
        };
        if n < 0 {
            if done > 0 {
                return Ok(done);
            }
            return Err(SysError::last("process_vm_readv", pid));
        }
        done += n.unsigned_abs();
        if n.unsigned_abs() < want {
            break;
        }
    }
    Ok(done)
}

/// Reads exactly `len` bytes at `addr`, failing on a short read.
pub fn read_vec(pid: i32, addr: u64, len: usize) -> SysResult<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let n = read(pid, addr, &mut buf)?;
    if n != len {
        return Err(SysError::new(
            "process_vm_readv (short)",
            pid,
            nix::errno::Errno::EFAULT,
        ));
    }
    Ok(buf)
}

/// Writes all of `data` at `addr` of process `pid`.
pub fn write(pid: i32, addr: u64, data: &[u8]) -> SysResult<()> {
    let mut done = 0;
    while done < data.len() {
        let local = libc::iovec {
            iov_base: data[done..].as_ptr() as *mut libc::c_void,
            iov_len: data.len() - done,
        };
        let remote = libc::iovec {
            iov_base: (addr + done as u64) as *mut libc::c_void,
            iov_len: data.len() - done,
        };
        // SAFETY: `local` points into `data`, readable for `iov_len` bytes; the kernel only
        // reads from it. The remote range is checked by the kernel.
        let n =
            unsafe { libc::process_vm_writev(pid, &raw const local, 1, &raw const remote, 1, 0) };
        if n <= 0 {
            return Err(SysError::last("process_vm_writev", pid));
        }
        done += n.unsigned_abs();
    }
    Ok(())
}

/// The address and length of this process's own `[vdso]`, read from the auxiliary vector.
pub fn own_vdso_base() -> u64 {
    // SAFETY: getauxval has no preconditions.
    unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) }
}

/// Lets the kernel take back the whole pages of `buf` should memory run short
/// (`MADV_FREE`), while keeping them as they are otherwise: a later write to a page still
/// there costs no fault, one taken back reads as zeros and is faulted in afresh. For a
/// buffer kept for later whose contents no longer matter. Whether the advice was taken.
pub fn free_lazily(buf: &mut [u8]) -> bool {
    const PAGE: usize = 4096;
    let start = buf.as_mut_ptr();
    let skip = start.align_offset(PAGE);
    let len = buf.len().saturating_sub(skip) / PAGE * PAGE;
    if skip >= buf.len() || len == 0 {
        return false;
    }
    let Some(first) = std::ptr::NonNull::new(buf[skip..].as_mut_ptr().cast()) else {
        return false;
    };
    // SAFETY: `[first, + len)` lies within `buf`, which we borrow mutably, so nothing else
    // reads it meanwhile; the advice may turn its bytes into zeros, a valid value for `u8`,
    // and changes nothing else.
    unsafe { nix::sys::mman::madvise(first, len, nix::sys::mman::MmapAdvise::MADV_FREE) }.is_ok()
}

/// Copies `len` bytes of this process's own memory at `addr` (used for the vdso, which is
/// always mapped readable).
pub fn own_bytes(addr: u64, len: usize) -> Vec<u8> {
    // SAFETY: callers pass the range of a mapping that is readable for the process lifetime
    // (the vdso, as listed in /proc/self/maps).
    unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec()
}

/// A mapping this process made for the kernel to describe (a probe of what its listings
/// report), unmapped when dropped. Nothing reads or writes its memory through this type.
#[derive(Debug)]
pub struct ProbeMapping {
    addr: std::ptr::NonNull<libc::c_void>,
    len: usize,
}

impl ProbeMapping {
    fn map(len: usize, prot: i32, flags: i32, fd: i32) -> SysResult<ProbeMapping> {
        // SAFETY: a new mapping at an address of the kernel's choosing (no MAP_FIXED), so no
        // existing memory is replaced; it is only unmapped when this value drops.
        let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
        match std::ptr::NonNull::new(addr).filter(|_| addr != libc::MAP_FAILED) {
            Some(addr) => Ok(ProbeMapping { addr, len }),
            None => Err(SysError::last("mmap", 0)),
        }
    }

    /// `len` bytes of private anonymous memory, readable and writable, mapped with the
    /// extra `MAP_*` flags `extra` and then given `advice` (`MADV_*`), if any.
    pub fn anonymous(len: usize, extra: i32, advice: Option<i32>) -> SysResult<ProbeMapping> {
        let m = Self::map(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra,
            -1,
        )?;
        if let Some(advice) = advice {
            // SAFETY: advice on a mapping this value owns and nothing else uses; none of the
            // advice callers give frees or changes memory anyone reads.
            let ret = unsafe { libc::madvise(m.addr.as_ptr(), len, advice) };
            crate::error::check(ret.into(), "madvise", 0)?;
        }
        Ok(m)
    }

    /// The first `len` bytes of `file` (open read-only), mapped shared and read-only.
    pub fn shared_read_only(file: &impl std::os::fd::AsFd, len: usize) -> SysResult<ProbeMapping> {
        use std::os::fd::AsRawFd;
        Self::map(
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_fd().as_raw_fd(),
        )
    }

    /// Its first address.
    pub fn start(&self) -> u64 {
        self.addr.as_ptr() as u64
    }
}

impl Drop for ProbeMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `map` and belongs to this value alone; no
        // reference into it exists.
        unsafe { libc::munmap(self.addr.as_ptr(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_freed_lazily_stays_usable() {
        let mut buf = vec![7u8; 5 * 4096 + 100];
        assert!(
            free_lazily(&mut buf),
            "a buffer of whole pages takes the advice"
        );
        // Without memory pressure the pages stay; taken back, they would read as zeros.
        assert!(buf.iter().all(|&b| b == 7 || b == 0));
        buf.fill(9);
        assert!(
            buf.iter().all(|&b| b == 9),
            "written again, it holds what was written"
        );
        assert!(
            !free_lazily(&mut [0u8; 100]),
            "no whole page: nothing to advise"
        );
    }
}
