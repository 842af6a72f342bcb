//! Capturing the SysV IPC objects of the job's IPC namespace (ours, while capturing):
//! shared memory segments, semaphore sets and message queues, with their ids.

use stasis_image::manifest::{PageRun, SysvMessage, SysvMsgQueue, SysvSem, SysvShm};
use stasis_image::pack::PackWriter;

use crate::error::{CoreError, CoreResult, io_err};

/// The rows of `/proc/sysvipc/<kind>` (header skipped), split into fields.
fn table(kind: &str) -> CoreResult<Vec<Vec<String>>> {
    let path = format!("/proc/sysvipc/{kind}");
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    Ok(text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect())
}

fn field<T: std::str::FromStr>(row: &[String], i: usize) -> Option<T> {
    row.get(i)?.parse().ok()
}

fn perms(row: &[String]) -> Option<u32> {
    u32::from_str_radix(row.get(2)?, 8).ok()
}

fn sys_err(what: String) -> impl FnOnce(stasis_sys::SysError) -> CoreError {
    move |source| CoreError::Sys {
        context: what,
        source,
    }
}

/// Saves every SysV shared memory segment of our IPC namespace (the job's): each is
/// attached read-only here, its non-zero pages stored.
pub(super) fn capture_shm(pack: &mut PackWriter) -> CoreResult<Vec<SysvShm>> {
    const SHM_DEST: u32 = 0o1000;
    let mut out = Vec::new();
    for row in table("shm")? {
        let (Some(key), Some(id), Some(perms), Some(size)) = (
            field::<i32>(&row, 0),
            field::<i32>(&row, 1),
            perms(&row),
            field::<u64>(&row, 3),
        ) else {
            continue;
        };
        let data = stasis_sys::sysv::shm_read(id, usize::try_from(size).unwrap_or(0))
            .map_err(sys_err(format!("reading SysV shared memory segment {id}")))?;
        let mut pages = Vec::new();
        for (i, page) in data.chunks(4096).enumerate() {
            if page.iter().any(|&b| b != 0) {
                pages.push(PageRun {
                    addr: i as u64 * 4096,
                    chunk: pack.add(page)?,
                });
            }
        }
        out.push(SysvShm {
            key,
            id,
            mode: perms & 0o777,
            size,
            removed: perms & SHM_DEST != 0,
            pages,
        });
    }
    Ok(out)
}

/// Saves every semaphore set: ids, modes and values (not the per-process undo lists).
pub(super) fn capture_sem() -> CoreResult<Vec<SysvSem>> {
    let mut out = Vec::new();
    for row in table("sem")? {
        let (Some(key), Some(id), Some(mode), Some(count)) = (
            field::<i32>(&row, 0),
            field::<i32>(&row, 1),
            perms(&row),
            field::<usize>(&row, 3),
        ) else {
            continue;
        };
        let values = stasis_sys::sysv::sem_values(id, count)
            .map_err(sys_err(format!("reading SysV semaphore set {id}")))?;
        out.push(SysvSem {
            key,
            id,
            mode: mode & 0o777,
            values,
        });
    }
    Ok(out)
}

/// Saves every message queue with its queued messages, copied without removing them.
pub(super) fn capture_msg(pack: &mut PackWriter) -> CoreResult<Vec<SysvMsgQueue>> {
    let mut out = Vec::new();
    for row in table("msg")? {
        let (Some(key), Some(id), Some(mode), Some(count)) = (
            field::<i32>(&row, 0),
            field::<i32>(&row, 1),
            perms(&row),
            field::<usize>(&row, 4),
        ) else {
            continue;
        };
        let mut messages = Vec::with_capacity(count);
        for index in 0..count {
            let Some((mtype, data)) = stasis_sys::sysv::msg_peek(id, index).map_err(sys_err(
                format!("copying message {index} of SysV queue {id}"),
            ))?
            else {
                break;
            };
            let data = if data.is_empty() {
                Vec::new()
            } else {
                vec![pack.add(&data)?]
            };
            messages.push(SysvMessage { mtype, data });
        }
        let qbytes = stasis_sys::sysv::msg_qbytes(id)
            .map_err(sys_err(format!("reading the capacity of SysV queue {id}")))?;
        out.push(SysvMsgQueue {
            key,
            id,
            mode: mode & 0o777,
            qbytes,
            messages,
        });
    }
    Ok(out)
}
