//! SysV shared memory segments: reading, recreating with a chosen id, filling, removing.
//! The caller must be in the job's IPC namespace.

use crate::error::{Errno, SysError, SysResult, check};

/// Reads the first `size` bytes of segment `id` (attached read-only, then detached).
pub fn shm_read(id: i32, size: usize) -> SysResult<Vec<u8>> {
    // SAFETY: shmat maps the segment at an address the kernel chooses; we only read `size`
    // bytes (the segment's size) from it, then detach it.
    unsafe {
        let at = libc::shmat(id, std::ptr::null(), libc::SHM_RDONLY);
        if at as isize == -1 {
            return Err(SysError::last("shmat", id));
        }
        let data = std::slice::from_raw_parts(at.cast::<u8>(), size).to_vec();
        libc::shmdt(at);
        Ok(data)
    }
}

/// Creates segment `key` of `size` bytes and mode `mode` with id `id` (through
/// `kernel.shm_next_id`, which a checkpoint-restore-capable caller may write).
pub fn shm_create(key: i32, size: usize, mode: u32, id: i32) -> SysResult<i32> {
    std::fs::write("/proc/sys/kernel/shm_next_id", id.to_string()).map_err(|e| {
        SysError::new(
            "writing kernel.shm_next_id",
            id,
            Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        )
    })?;
    let flags = libc::IPC_CREAT | libc::IPC_EXCL | i32::try_from(mode & 0o777).unwrap_or(0o600);
    // SAFETY: shmget takes integers.
    let got = check(
        unsafe { libc::shmget(key, size, flags) }.into(),
        "shmget",
        id,
    )?;
    let got = i32::try_from(got).unwrap_or(-1);
    if got != id {
        return Err(SysError::new(
            "shmget (the kernel chose another id)",
            id,
            Errno::EEXIST,
        ));
    }
    Ok(got)
}

/// Writes `data` at `offset` of segment `id`.
pub fn shm_write(id: i32, offset: usize, data: &[u8]) -> SysResult<()> {
    // SAFETY: the segment is attached read-write at an address the kernel chooses; callers
    // keep `offset + data.len()` within its size; it is detached afterwards.
    unsafe {
        let at = libc::shmat(id, std::ptr::null(), 0);
        if at as isize == -1 {
            return Err(SysError::last("shmat", id));
        }
        std::ptr::copy_nonoverlapping(data.as_ptr(), at.cast::<u8>().add(offset), data.len());
        libc::shmdt(at);
    }
    Ok(())
}

/// Marks segment `id` for removal once nothing is attached (`IPC_RMID`).
pub fn shm_remove(id: i32) -> SysResult<()> {
    // SAFETY: IPC_RMID takes no buffer.
    check(
        unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) }.into(),
        "shmctl(IPC_RMID)",
        id,
    )
    .map(drop)
}
