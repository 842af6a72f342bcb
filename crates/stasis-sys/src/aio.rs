//! Writing a file opened with `O_DIRECT` in aligned blocks that the disk writes while the
//! caller fills the next ones (Linux AIO: `io_submit`, `io_getevents`).
//!
//! The supervisor cannot start threads once its children go to other pid and time
//! namespaces, so a write that waits for the disk would stop everything else; with AIO the
//! kernel writes a block from our buffer while we go on. Each buffer of the ring is handed
//! out again only once the disk is done with it, and dropping the writer waits for every
//! write still under way before the buffers are freed. Where AIO is not available the
//! blocks are written synchronously, one after the other.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

/// Alignment of direct I/O: buffer address, file offset and length.
pub const ALIGN: usize = 4096;

const IOCB_CMD_PWRITE: u16 = 1;
/// How far ahead of the writes the file is allocated at most (the step doubles from one
/// block up to this).
const PREALLOCATE: u64 = 64 << 20;
/// Buffers kept for the next writer at most.
const MAX_SPARE: usize = 8;

/// Buffers of writers that ended, for the next ones: filling fresh memory costs a page
/// fault per page (on our virtual machines as much as the write itself), every checkpoint.
static SPARE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
/// An AIO context whose writes have all ended, for the next writer: destroying one waits
/// for the kernel (`io_destroy` measured 30 ms and more here), making one costs too.
static SPARE_CONTEXT: Mutex<Option<(Context, usize)>> = Mutex::new(None);

/// A zeroed buffer holding `len` bytes at an [`ALIGN`]ed offset (returned with it).
fn aligned(len: usize) -> (Vec<u8>, usize) {
    let buf = vec![0u8; len + ALIGN];
    let at = buf.as_ptr().align_offset(ALIGN);
    (buf, at)
}

/// Whether `file` (new, empty, opened with `O_DIRECT`) takes direct writes: an aligned
/// block is written at its start and cut off again. `false` where the filesystem refuses
/// them (`EINVAL`).
pub fn takes_direct_writes(file: &File) -> io::Result<bool> {
    let (buf, at) = aligned(ALIGN);
    let written = file.write_all_at(&buf[at..at + ALIGN], 0);
    file.set_len(0)?;
    match written {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => Ok(false),
        Err(e) => Err(e),
    }
}

/// `struct iocb` (linux/aio_abi.h), little-endian layout.
#[repr(C)]
#[derive(Default)]
struct Iocb {
    data: u64,
    key: u32,
    rw_flags: u32,
    opcode: u16,
    reqprio: i16,
    fildes: u32,
    buf: u64,
    nbytes: u64,
    offset: i64,
    reserved2: u64,
    flags: u32,
    resfd: u32,
}

/// `struct io_event`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

/// One buffer of the ring.
#[derive(Debug)]
struct Slot {
    /// Holds an aligned block at `at`.
    buf: Vec<u8>,
    at: usize,
    /// Bytes of the write under way from it (0: none).
    in_flight: usize,
    /// Where that write goes in the file.
    offset: u64,
}

/// An AIO context (`io_setup`), destroyed on drop.
#[derive(Debug)]
struct Context(libc::c_ulong);

impl Context {
    fn new(depth: usize) -> io::Result<Context> {
        let mut ctx: libc::c_ulong = 0;
        // SAFETY: io_setup writes the new context's id into `ctx`, a local we own.
        let ret = unsafe { libc::syscall(libc::SYS_io_setup, depth as libc::c_long, &raw mut ctx) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Context(ctx))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: io_destroy takes the context id; it waits for (or cancels) what is under
        // way. Our buffers outlive it: `BlockWriter` destroys its context before it lets
        // them go.
        unsafe { libc::syscall(libc::SYS_io_destroy, self.0) };
    }
}

/// Writes aligned blocks to a file opened with `O_DIRECT`, in the background where AIO is
/// available.
#[derive(Debug)]
pub struct BlockWriter {
    /// Destroyed (which waits for its writes) before the slots' buffers are let go.
    ctx: Option<Context>,
    file: File,
    slots: Vec<Slot>,
    /// The slot being filled.
    current: usize,
    block: usize,
    /// The first error a finished write reported, not yet returned.
    failed: Option<io::Error>,
    /// Bytes of the file allocated ahead of the writes (see [`BlockWriter::write`]).
    allocated: u64,
    /// End of the furthest write.
    end: u64,
}

impl BlockWriter {
    /// A writer of blocks of `block` bytes (a multiple of [`ALIGN`]) to `file`, with up to
    /// `depth` of them under way at once.
    pub fn new(file: File, block: usize, depth: usize) -> BlockWriter {
        let depth = depth.max(1);
        let reused = SPARE_CONTEXT
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .filter(|&(_, d)| d >= depth)
            .map(|(c, _)| c);
        let ctx = reused.or_else(|| Context::new(depth).ok());
        let mut spare = SPARE.lock().unwrap_or_else(|p| p.into_inner());
        let slots = (0..if ctx.is_some() { depth } else { 1 })
            .map(|_| {
                let (buf, at) = match spare.iter().position(|b| b.len() == block + ALIGN) {
                    Some(i) => {
                        let buf = spare.swap_remove(i);
                        let at = buf.as_ptr().align_offset(ALIGN);
                        (buf, at)
                    }
                    None => aligned(block),
                };
                Slot {
                    buf,
                    at,
                    in_flight: 0,
                    offset: 0,
                }
            })
            .collect();
        drop(spare);
        BlockWriter {
            ctx,
            file,
            slots,
            current: 0,
            block,
            failed: None,
            allocated: 0,
            end: 0,
        }
    }

    /// The aligned buffer of the block being filled (once the disk is done with what it
    /// held before).
    pub fn block(&mut self) -> io::Result<&mut [u8]> {
        while self.slots[self.current].in_flight > 0 {
            self.reap(1)?;
        }
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let (at, block) = (self.slots[self.current].at, self.block);
        Ok(&mut self.slots[self.current].buf[at..at + block])
    }

    /// Writes the first `len` bytes (a multiple of [`ALIGN`]) of the block being filled at
    /// `offset` (aligned): queued, or written before returning without AIO. The next
    /// [`BlockWriter::block`] is another buffer.
    pub fn write(&mut self, len: usize, offset: u64) -> io::Result<()> {
        // A write that extends the file waits in io_submit for the filesystem to allocate
        // its blocks: the file is allocated ahead, in steps that double up to
        // [`PREALLOCATE`], and cut back by [`BlockWriter::into_file`]. Where that is
        // refused, writes just wait.
        let end = offset + len as u64;
        self.end = self.end.max(end);
        if self.ctx.is_some() && end > self.allocated {
            let step = self.allocated.clamp(self.block as u64, PREALLOCATE);
            let to = end.max(self.allocated + step);
            let grown = nix::fcntl::fallocate(
                &self.file,
                nix::fcntl::FallocateFlags::empty(),
                self.allocated as i64,
                (to - self.allocated) as i64,
            );
            if grown.is_ok() {
                self.allocated = to;
            }
        }
        let slot = &mut self.slots[self.current];
        let data = &slot.buf[slot.at..slot.at + len];
        match &self.ctx {
            None => self.file.write_all_at(data, offset)?,
            Some(ctx) => {
                let mut cb = Iocb {
                    data: self.current as u64,
                    opcode: IOCB_CMD_PWRITE,
                    fildes: self.file.as_raw_fd() as u32,
                    buf: data.as_ptr() as u64,
                    nbytes: len as u64,
                    offset: offset as i64,
                    ..Iocb::default()
                };
                let mut list = [&raw mut cb];
                // SAFETY: io_submit reads one iocb through the pointer array (both locals
                // alive for the call); the kernel then reads `len` bytes of the slot's buffer
                // until the write completes. The buffer is neither handed out
                // (`block` waits), moved nor freed (`Drop` waits) before that.
                let ret = unsafe {
                    libc::syscall(
                        libc::SYS_io_submit,
                        ctx.0,
                        1 as libc::c_long,
                        list.as_mut_ptr(),
                    )
                };
                if ret != 1 {
                    return Err(if ret < 0 {
                        io::Error::last_os_error()
                    } else {
                        io::Error::from(io::ErrorKind::WouldBlock)
                    });
                }
                slot.in_flight = len;
                slot.offset = offset;
            }
        }
        self.current = (self.current + 1) % self.slots.len();
        Ok(())
    }

    /// Waits for at least `min` writes under way to finish, noting their outcome.
    fn reap(&mut self, min: usize) -> io::Result<()> {
        let Some(ctx) = &self.ctx else {
            return Ok(());
        };
        let mut events = [IoEvent::default(); 8];
        // SAFETY: io_getevents writes up to `events.len()` events into the local array and
        // waits without a timeout (null).
        let n = unsafe {
            libc::syscall(
                libc::SYS_io_getevents,
                ctx.0,
                min as libc::c_long,
                events.len() as libc::c_long,
                events.as_mut_ptr(),
                std::ptr::null_mut::<libc::timespec>(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::Interrupted => Ok(()),
                _ => Err(e),
            };
        }
        for ev in &events[..n as usize] {
            let Some(slot) = self.slots.get_mut(ev.data as usize) else {
                continue;
            };
            let wanted = slot.in_flight;
            slot.in_flight = 0;
            let outcome = match usize::try_from(ev.res) {
                Ok(done) if done >= wanted => Ok(()),
                // Cut short (a file size limit, a full disk): the rest is written now,
                // which says why it cannot be.
                Ok(done) => {
                    let rest = &slot.buf[slot.at + done..slot.at + wanted];
                    self.file.write_all_at(rest, slot.offset + done as u64)
                }
                Err(_) => Err(io::Error::from_raw_os_error(
                    i32::try_from(-ev.res).unwrap_or(libc::EIO),
                )),
            };
            if let Err(e) = outcome {
                self.failed.get_or_insert(e);
            }
        }
        Ok(())
    }

    /// Waits until every write is done; returns the first error any of them met.
    pub fn flush(&mut self) -> io::Result<()> {
        while self.slots.iter().any(|s| s.in_flight > 0) {
            self.reap(1)?;
        }
        match self.failed.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The file (another descriptor of it), once every write is done, cut back to the end
    /// of the furthest write (what was allocated ahead is let go).
    pub fn into_file(mut self) -> io::Result<File> {
        self.flush()?;
        if self.allocated > self.end {
            self.file.set_len(self.end)?;
        }
        self.file.try_clone()
    }
}

impl Drop for BlockWriter {
    fn drop(&mut self) {
        // The buffers must outlive the writes from them.
        while self.slots.iter().any(|s| s.in_flight > 0) {
            if self.reap(1).is_err() {
                break;
            }
        }
        // With nothing under way the context goes to the next writer; otherwise destroying
        // it waits for what is still under way. Only then do the buffers go.
        let idle = self.slots.iter().all(|s| s.in_flight == 0);
        if let Some(ctx) = self.ctx.take() {
            if idle {
                *SPARE_CONTEXT.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((ctx, self.slots.len()));
            } else {
                drop(ctx);
            }
        }
        let mut spare = SPARE.lock().unwrap_or_else(|p| p.into_inner());
        for slot in self.slots.drain(..) {
            if spare.len() < MAX_SPARE {
                spare.push(slot.buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn blocks_land_where_they_were_sent_in_any_order() {
        let dir = std::env::temp_dir().join(format!("stasis-aio-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let Ok(file) = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_DIRECT)
            .open(&dir)
        else {
            // No direct I/O on this filesystem: nothing to check here.
            return;
        };
        let block = 64 * 1024;
        let mut w = BlockWriter::new(file, block, 4);
        let order = [3u64, 0, 7, 1, 2, 6, 5, 4, 9, 8];
        for &k in &order {
            w.block().unwrap().fill(k as u8 + 1);
            w.write(block, k * block as u64).unwrap();
        }
        w.into_file().unwrap();
        let data = std::fs::read(&dir).unwrap();
        let _ = std::fs::remove_file(&dir);
        assert_eq!(data.len(), 10 * block);
        for (k, b) in data.chunks(block).enumerate() {
            assert!(b.iter().all(|&x| x == k as u8 + 1), "block {k}");
        }
    }
}
