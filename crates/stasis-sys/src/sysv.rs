//! SysV IPC objects — shared memory segments, semaphore sets, message queues: reading,
//! recreating with a chosen id, filling, removing. The caller must be in the job's IPC
//! namespace.

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

/// Makes the next object of kind `kind` (`shm`, `sem`, `msg`) get id `id`, through
/// `kernel.<kind>_next_id` (writable by a checkpoint-restore-capable caller).
fn set_next_id(kind: &str, id: i32) -> SysResult<()> {
    std::fs::write(format!("/proc/sys/kernel/{kind}_next_id"), id.to_string()).map_err(|e| {
        SysError::new(
            "writing kernel.*_next_id",
            id,
            Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        )
    })
}

fn creation_flags(mode: u32) -> i32 {
    libc::IPC_CREAT | libc::IPC_EXCL | i32::try_from(mode & 0o777).unwrap_or(0o600)
}

fn expect_id(call: &'static str, got: i64, id: i32) -> SysResult<i32> {
    let got = i32::try_from(check(got, call, id)?).unwrap_or(-1);
    if got == id {
        Ok(got)
    } else {
        Err(SysError::new(call, id, Errno::EEXIST))
    }
}

/// Creates segment `key` of `size` bytes and mode `mode` with id `id`.
pub fn shm_create(key: i32, size: usize, mode: u32, id: i32) -> SysResult<i32> {
    set_next_id("shm", id)?;
    // SAFETY: shmget takes integers.
    let got = unsafe { libc::shmget(key, size, creation_flags(mode)) };
    expect_id("shmget (the kernel chose another id)", got.into(), id)
}

/// The value of every semaphore of set `id`, which has `count` of them.
pub fn sem_values(id: i32, count: usize) -> SysResult<Vec<u16>> {
    let mut values = vec![0u16; count];
    // SAFETY: GETALL writes `count` unsigned shorts (the set's size) into the buffer.
    let r = unsafe { libc::semctl(id, 0, libc::GETALL, values.as_mut_ptr()) };
    check(r.into(), "semctl(GETALL)", id)?;
    Ok(values)
}

/// Creates semaphore set `key` with mode `mode`, id `id` and the given values.
pub fn sem_create(key: i32, mode: u32, id: i32, values: &[u16]) -> SysResult<i32> {
    set_next_id("sem", id)?;
    let count = i32::try_from(values.len()).unwrap_or(i32::MAX);
    // SAFETY: semget takes integers.
    let got = unsafe { libc::semget(key, count, creation_flags(mode)) };
    let id = expect_id("semget (the kernel chose another id)", got.into(), id)?;
    if !values.is_empty() {
        // SAFETY: SETALL reads one unsigned short per semaphore of the set from the buffer.
        let r = unsafe { libc::semctl(id, 0, libc::SETALL, values.as_ptr()) };
        check(r.into(), "semctl(SETALL)", id)?;
    }
    Ok(id)
}

/// Removes semaphore set `id`.
pub fn sem_remove(id: i32) -> SysResult<()> {
    // SAFETY: IPC_RMID takes no argument.
    check(
        unsafe { libc::semctl(id, 0, libc::IPC_RMID) }.into(),
        "semctl(IPC_RMID)",
        id,
    )
    .map(drop)
}

const MSG_COPY: i32 = 0o40000;
const MSGMAX_READ: usize = 1 << 20;

/// Copies message number `index` (0 = oldest) of queue `id` without removing it
/// (`MSG_COPY`); `None` past the last one.
pub fn msg_peek(id: i32, index: usize) -> SysResult<Option<(i64, Vec<u8>)>> {
    let mut buf = vec![0u8; 8 + MSGMAX_READ];
    // SAFETY: the buffer holds a `long` mtype followed by MSGMAX_READ bytes, the size we
    // pass; MSG_COPY | IPC_NOWAIT never blocks and leaves the queue unchanged.
    let n = unsafe {
        libc::msgrcv(
            id,
            buf.as_mut_ptr().cast(),
            MSGMAX_READ,
            i64::try_from(index).unwrap_or(i64::MAX),
            MSG_COPY | libc::IPC_NOWAIT | libc::MSG_NOERROR,
        )
    };
    if n < 0 {
        let e = Errno::last();
        return if e == Errno::ENOMSG {
            Ok(None)
        } else {
            Err(SysError::new("msgrcv(MSG_COPY)", id, e))
        };
    }
    let mtype = i64::from_ne_bytes(buf[..8].try_into().unwrap_or_default());
    let len = usize::try_from(n).unwrap_or(0);
    Ok(Some((mtype, buf[8..8 + len].to_vec())))
}

/// Creates message queue `key` with mode `mode` and id `id`; raises its capacity to
/// `qbytes` where allowed.
pub fn msg_create(key: i32, mode: u32, id: i32, qbytes: u64) -> SysResult<i32> {
    set_next_id("msg", id)?;
    // SAFETY: msgget takes integers.
    let got = unsafe { libc::msgget(key, creation_flags(mode)) };
    let id = expect_id("msgget (the kernel chose another id)", got.into(), id)?;
    // SAFETY: msqid_ds is plain data; IPC_STAT fills it, IPC_SET reads it back.
    unsafe {
        let mut ds: libc::msqid_ds = std::mem::zeroed();
        if libc::msgctl(id, libc::IPC_STAT, &mut ds) == 0 && ds.msg_qbytes != qbytes {
            ds.msg_qbytes = qbytes;
            libc::msgctl(id, libc::IPC_SET, &mut ds);
        }
    }
    Ok(id)
}

/// Appends a message to queue `id` (never blocks).
pub fn msg_send(id: i32, mtype: i64, data: &[u8]) -> SysResult<()> {
    let mut buf = Vec::with_capacity(8 + data.len());
    buf.extend_from_slice(&mtype.to_ne_bytes());
    buf.extend_from_slice(data);
    // SAFETY: the buffer holds a `long` mtype followed by `data.len()` bytes.
    check(
        unsafe { libc::msgsnd(id, buf.as_ptr().cast(), data.len(), libc::IPC_NOWAIT) }.into(),
        "msgsnd",
        id,
    )
    .map(drop)
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

/// The capacity in bytes of message queue `id` (`msg_qbytes`).
pub fn msg_qbytes(id: i32) -> SysResult<u64> {
    // SAFETY: msqid_ds is plain data that IPC_STAT fills.
    unsafe {
        let mut ds: libc::msqid_ds = std::mem::zeroed();
        check(
            libc::msgctl(id, libc::IPC_STAT, &mut ds).into(),
            "msgctl(IPC_STAT)",
            id,
        )?;
        Ok(ds.msg_qbytes)
    }
}
