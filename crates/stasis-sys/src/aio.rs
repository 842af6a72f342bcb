//! Direct I/O of image files in aligned blocks that the disk reads or writes while the
//! caller goes on (Linux AIO: `io_submit`, `io_getevents`): [`BlockWriter`] writes a file
//! opened with `O_DIRECT` while the caller fills the next blocks, [`BlockReader`] reads
//! ahead of the caller.
//!
//! The supervisor cannot start threads once its children go to other pid and time
//! namespaces, so I/O that waits for the disk would stop everything else; with AIO the
//! kernel moves a block to or from our buffer while we go on. A buffer is handed out again
//! only once the disk is done with it, and dropping a writer or reader waits for every
//! transfer still under way before its buffers are freed. Where AIO is not available the
//! blocks are written synchronously, one after the other (and nothing is read ahead).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

/// Alignment of direct I/O: buffer address, file offset and length.
pub const ALIGN: usize = 4096;

const IOCB_CMD_PREAD: u16 = 0;
const IOCB_CMD_PWRITE: u16 = 1;
/// How far ahead of the writes the file is allocated at most (the step doubles from one
/// block up to this).
const PREALLOCATE: u64 = 64 << 20;
/// Buffers kept for the next writer at most.
const MAX_SPARE: usize = 8;

/// Buffers of writers that ended, for the next ones: filling fresh memory costs a page
/// fault per page (on our virtual machines as much as the write itself), every checkpoint.
static SPARE: Mutex<Vec<AlignedBuf>> = Mutex::new(Vec::new());
/// AIO contexts with nothing under way (and their depth), for the next writer or reader:
/// destroying one waits for the kernel (`io_destroy` measured 30 ms and more here), making
/// one costs too.
static SPARE_CONTEXTS: Mutex<Vec<(Context, usize)>> = Mutex::new(Vec::new());
/// Contexts kept for reuse at most.
const MAX_SPARE_CONTEXTS: usize = 2;

/// A context for `depth` transfers at once: a spare one, else a new one (`None` without AIO).
fn take_context(depth: usize) -> Option<Context> {
    let mut spare = SPARE_CONTEXTS.lock().unwrap_or_else(|p| p.into_inner());
    match spare.iter().position(|&(_, d)| d >= depth) {
        Some(i) => Some(spare.swap_remove(i).0),
        None => {
            drop(spare);
            Context::new(depth).ok()
        }
    }
}

/// Keeps `ctx` (nothing under way in it) for the next [`take_context`].
fn give_back_context(ctx: Context, depth: usize) {
    let mut spare = SPARE_CONTEXTS.lock().unwrap_or_else(|p| p.into_inner());
    if spare.len() < MAX_SPARE_CONTEXTS {
        spare.push((ctx, depth));
    }
}

/// Size of a transparent huge page (x86_64).
const HUGE_PAGE: usize = 2 << 20;
/// Buffers at least this long are laid on huge pages (each huge page taken whole once
/// touched: shorter buffers would cost more memory than they hold).
const HUGE_FROM: usize = 512 << 10;

/// A buffer for direct I/O: `len` zeroed bytes at an [`ALIGN`]ed address, on transparent
/// huge pages where it is long enough and the kernel has them.
///
/// The disk gets a direct transfer as the list of physically contiguous pieces of the
/// buffer, and a request holds at most so many of them (254 on our virtual disks): from
/// ordinary 4 KiB pages that cuts a 4 MiB transfer into five requests, and the disk served
/// 1 GiB of 1 MiB reads in 430–830 ms; from huge pages, in 315–360 ms, like the page cache
/// (whose large folios are contiguous too).
#[derive(Debug)]
pub struct AlignedBuf {
    /// The mapping (start, length), unmapped on drop.
    map: (std::ptr::NonNull<u8>, usize),
    /// Offset of the buffer in the mapping.
    at: usize,
    len: usize,
}

// SAFETY: an AlignedBuf owns its mapping alone (nothing else points into it), like a Vec.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of no bytes (and no mapping).
    pub fn empty() -> AlignedBuf {
        AlignedBuf {
            map: (std::ptr::NonNull::dangling(), 0),
            at: 0,
            len: 0,
        }
    }

    /// A zeroed buffer of `len` bytes (memory is only taken as it is touched); the error
    /// when the kernel refuses the mapping (out of memory or of mappings).
    pub fn new(len: usize) -> io::Result<AlignedBuf> {
        if len == 0 {
            return Ok(AlignedBuf::empty());
        }
        let huge = len >= HUGE_FROM;
        // Room to align the start to a huge page.
        let map_len = match huge {
            true => len.next_multiple_of(HUGE_PAGE) + HUGE_PAGE,
            false => len.next_multiple_of(ALIGN),
        };
        let size = std::num::NonZeroUsize::new(map_len).ok_or(io::ErrorKind::InvalidInput)?;
        // SAFETY: a new private anonymous mapping, placed by the kernel: it overlaps
        // nothing of ours.
        let mapped = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                size,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_PRIVATE,
            )
        };
        let ptr = mapped.map_err(io::Error::from)?.cast::<u8>();
        let at = match huge {
            true => ptr.as_ptr().align_offset(HUGE_PAGE),
            false => 0,
        };
        if huge {
            // SAFETY: the range lies within the mapping just made; the advice changes how
            // it is backed, not its contents.
            let _ = unsafe {
                nix::sys::mman::madvise(
                    ptr.add(at).cast(),
                    len.next_multiple_of(HUGE_PAGE),
                    nix::sys::mman::MmapAdvise::MADV_HUGEPAGE,
                )
            };
        }
        Ok(AlignedBuf {
            map: (ptr, map_len),
            at,
            len,
        })
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes from `at` lie within the mapping, which lives as long as
        // `self` and is only reached through it.
        unsafe { std::slice::from_raw_parts(self.map.0.as_ptr().add(self.at), self.len) }
    }

    /// Its bytes, to fill.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.map.0.as_ptr().add(self.at), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.map.1 == 0 {
            return;
        }
        // SAFETY: the mapping is ours alone and nothing borrows it any more.
        let _ = unsafe { nix::sys::mman::munmap(self.map.0.cast(), self.map.1) };
    }
}

/// Whether `file` (new, empty, opened with `O_DIRECT`) takes direct writes: an aligned
/// block is written at its start and cut off again. `false` where the filesystem refuses
/// them (`EINVAL`).
pub fn takes_direct_writes(file: &File) -> io::Result<bool> {
    let buf = AlignedBuf::new(ALIGN)?;
    let written = file.write_all_at(buf.bytes(), 0);
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

impl IoEvent {
    /// Bytes transferred, or the error.
    fn outcome(&self) -> io::Result<usize> {
        usize::try_from(self.res).map_err(|_| {
            io::Error::from_raw_os_error(i32::try_from(-self.res).unwrap_or(libc::EIO))
        })
    }
}

/// One buffer of the ring.
#[derive(Debug)]
struct Slot {
    /// Holds a block.
    buf: AlignedBuf,
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

    /// Submits one transfer. The caller keeps the buffer `cb` names alive and untouched
    /// until its completion is reaped ([`Context::reap`]).
    fn submit(&self, cb: &mut Iocb) -> io::Result<()> {
        let mut list = [std::ptr::from_mut(cb)];
        // SAFETY: io_submit reads one iocb through the pointer array (both alive for the
        // call); the memory the iocb names is the caller's to keep valid until completion.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_io_submit,
                self.0,
                1 as libc::c_long,
                list.as_mut_ptr(),
            )
        };
        match ret {
            1 => Ok(()),
            r if r < 0 => Err(io::Error::last_os_error()),
            _ => Err(io::Error::from(io::ErrorKind::WouldBlock)),
        }
    }

    /// Waits for at least `min` transfers to end and returns up to 8 of their events
    /// (none when interrupted by a signal).
    fn reap(&self, min: usize) -> io::Result<Vec<IoEvent>> {
        let mut events = [IoEvent::default(); 8];
        // SAFETY: io_getevents writes up to `events.len()` events into the local array and
        // waits without a timeout (null).
        let n = unsafe {
            libc::syscall(
                libc::SYS_io_getevents,
                self.0,
                min as libc::c_long,
                events.len() as libc::c_long,
                events.as_mut_ptr(),
                std::ptr::null_mut::<libc::timespec>(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::Interrupted => Ok(Vec::new()),
                _ => Err(e),
            };
        }
        Ok(events[..n as usize].to_vec())
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
    /// `depth` of them under way at once; the error when its buffers cannot be mapped.
    pub fn new(file: File, block: usize, depth: usize) -> io::Result<BlockWriter> {
        let depth = depth.max(1);
        let ctx = take_context(depth);
        let mut spare = SPARE.lock().unwrap_or_else(|p| p.into_inner());
        let slots = (0..if ctx.is_some() { depth } else { 1 })
            .map(|_| {
                let buf = match spare.iter().position(|b| b.len() == block) {
                    Some(i) => spare.swap_remove(i),
                    None => AlignedBuf::new(block)?,
                };
                Ok(Slot {
                    buf,
                    in_flight: 0,
                    offset: 0,
                })
            })
            .collect::<io::Result<Vec<Slot>>>()?;
        drop(spare);
        Ok(BlockWriter {
            ctx,
            file,
            slots,
            current: 0,
            block,
            failed: None,
            allocated: 0,
            end: 0,
        })
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
        Ok(self.slots[self.current].buf.bytes_mut())
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
        let data = &slot.buf.bytes()[..len];
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
                // The kernel reads `len` bytes of the slot's buffer until the write
                // completes. The buffer is neither handed out (`block` waits), moved nor
                // freed (`Drop` waits) before that.
                ctx.submit(&mut cb)?;
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
        for ev in &ctx.reap(min)? {
            let Some(slot) = self.slots.get_mut(ev.data as usize) else {
                continue;
            };
            let wanted = slot.in_flight;
            slot.in_flight = 0;
            let outcome = match ev.outcome() {
                Ok(done) if done >= wanted => Ok(()),
                // Cut short (a file size limit, a full disk): the rest is written now,
                // which says why it cannot be.
                Ok(done) => {
                    let rest = &slot.buf.bytes()[done..wanted];
                    self.file.write_all_at(rest, slot.offset + done as u64)
                }
                Err(e) => Err(e),
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
                give_back_context(ctx, self.slots.len());
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

/// A read under way or done, not yet taken.
#[derive(Debug)]
struct PendingRead {
    buf: AlignedBuf,
    /// Bytes read, or the error, once done.
    outcome: Option<io::Result<usize>>,
    /// Nobody waits for it any more: dropped once done.
    abandoned: bool,
}

/// Reads aligned blocks of files opened with `O_DIRECT` in the background, each waited for
/// by the token [`BlockReader::submit`] returned.
#[derive(Debug)]
pub struct BlockReader {
    /// Destroyed (which waits for its reads) before the buffers are let go.
    ctx: Option<Context>,
    depth: usize,
    reads: HashMap<u64, PendingRead>,
    /// Reads not yet done.
    under_way: usize,
    next: u64,
}

impl BlockReader {
    /// A reader with up to `depth` reads under way at once; `None` without AIO.
    pub fn new(depth: usize) -> Option<BlockReader> {
        let depth = depth.max(1);
        Some(BlockReader {
            ctx: Some(take_context(depth)?),
            depth,
            reads: HashMap::new(),
            under_way: 0,
            next: 0,
        })
    }

    /// Whether another read can be submitted now.
    pub fn has_room(&self) -> bool {
        self.under_way < self.depth
    }

    /// Starts reading `len` bytes (a multiple of [`ALIGN`], at most `buf.len()`) of `file`
    /// (opened with `O_DIRECT`) at `offset` (aligned) into the start of `buf`; returns the
    /// read's token, or the error with the buffer.
    pub fn submit(
        &mut self,
        file: &File,
        offset: u64,
        len: usize,
        mut buf: AlignedBuf,
    ) -> Result<u64, (io::Error, AlignedBuf)> {
        let Some(ctx) = &self.ctx else {
            return Err((io::Error::from(io::ErrorKind::Unsupported), buf));
        };
        if len > buf.len {
            return Err((io::Error::from(io::ErrorKind::InvalidInput), buf));
        }
        let token = self.next;
        let data = &mut buf.bytes_mut()[..len];
        let mut cb = Iocb {
            data: token,
            opcode: IOCB_CMD_PREAD,
            fildes: file.as_raw_fd() as u32,
            buf: data.as_mut_ptr() as u64,
            nbytes: data.len() as u64,
            offset: offset as i64,
            ..Iocb::default()
        };
        // The kernel writes into the buffer until the read completes; its memory (a
        // mapping) stays where it is while the buffer is kept in `reads`, and it is handed
        // back only once the read is reaped (`wait`, `Drop`).
        if let Err(e) = ctx.submit(&mut cb) {
            return Err((e, buf));
        }
        self.next += 1;
        self.under_way += 1;
        self.reads.insert(
            token,
            PendingRead {
                buf,
                outcome: None,
                abandoned: false,
            },
        );
        Ok(token)
    }

    /// Waits for the read `token` names and returns its buffer with the number of bytes
    /// read (fewer than asked at the end of the file) or the read's error; `None` for an
    /// unknown token. If waiting itself fails, the read is abandoned (its buffer kept until
    /// it ends) and an empty buffer comes back with an error of kind `Other`.
    pub fn wait(&mut self, token: u64) -> Option<(AlignedBuf, io::Result<usize>)> {
        loop {
            let read = self.reads.get(&token)?;
            if read.outcome.is_some() {
                let read = self.reads.remove(&token)?;
                return read.outcome.map(|o| (read.buf, o));
            }
            if let Err(e) = self.reap() {
                // Without events the read cannot be waited for: it is kept (its buffer
                // must outlive it) and reported failed.
                if let Some(read) = self.reads.get_mut(&token) {
                    read.abandoned = true;
                }
                let e = io::Error::other(format!("waiting for a direct read: {e}"));
                return Some((AlignedBuf::empty(), Err(e)));
            }
        }
    }

    /// Waits for at least one read to end, noting the outcome of each that did.
    fn reap(&mut self) -> io::Result<()> {
        let Some(ctx) = &self.ctx else {
            return Ok(());
        };
        for ev in ctx.reap(1)? {
            if let Some(read) = self.reads.get_mut(&ev.data)
                && read.outcome.is_none()
            {
                self.under_way -= 1;
                if read.abandoned {
                    self.reads.remove(&ev.data);
                    continue;
                }
                read.outcome = Some(ev.outcome());
            }
        }
        Ok(())
    }
}

impl Drop for BlockReader {
    fn drop(&mut self) {
        // The buffers must outlive the reads into them.
        while self.under_way > 0 {
            if self.reap().is_err() {
                break;
            }
        }
        if let Some(ctx) = self.ctx.take() {
            if self.under_way == 0 {
                give_back_context(ctx, self.depth);
            } else {
                // Destroying it waits for what is still under way; only then do the
                // buffers go (fields drop after this body).
                drop(ctx);
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
        let mut w = BlockWriter::new(file, block, 4).unwrap();
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
    #[test]
    fn reads_are_waited_for_in_any_order_and_come_short_at_the_end() {
        let path = std::env::temp_dir().join(format!("stasis-aio-read-{}", std::process::id()));
        let block = 64 * 1024;
        let data: Vec<u8> = (0..5 * block + 1000)
            .map(|i| (i / block) as u8 + 1)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path);
        let (Ok(file), Some(mut r)) = (opened, BlockReader::new(4)) else {
            // No direct I/O or no AIO here: nothing to check.
            let _ = std::fs::remove_file(&path);
            return;
        };
        let tokens: Vec<u64> = (0..4)
            .map(|k| {
                assert!(r.has_room());
                r.submit(
                    &file,
                    (k * block) as u64,
                    block,
                    AlignedBuf::new(block).unwrap(),
                )
                .unwrap()
            })
            .collect();
        assert!(!r.has_room(), "four reads under way fill a depth of four");
        for k in [2usize, 0, 3, 1] {
            let (buf, n) = r.wait(tokens[k]).unwrap();
            assert_eq!(n.unwrap(), block);
            assert!(buf.bytes().iter().all(|&b| b == k as u8 + 1), "block {k}");
        }
        assert!(r.wait(tokens[0]).is_none(), "taken already");
        // The last block: the file ends 1000 bytes into it.
        let t = r
            .submit(
                &file,
                (5 * block) as u64,
                block,
                AlignedBuf::new(block).unwrap(),
            )
            .unwrap();
        let (buf, n) = r.wait(t).unwrap();
        assert_eq!(n.unwrap(), 1000);
        assert!(buf.bytes()[..1000].iter().all(|&b| b == 6));
        // A length beyond the buffer is refused, the buffer handed back.
        let (e, buf) = r
            .submit(&file, 0, 2 * block, AlignedBuf::new(block).unwrap())
            .unwrap_err();
        assert_eq!((e.kind(), buf.len()), (io::ErrorKind::InvalidInput, block));
        let _ = std::fs::remove_file(&path);
    }
}
