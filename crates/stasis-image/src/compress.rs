//! Compressing a pack's frames on a thread of their own, beside the thread that writes them.
//!
//! The thread storing a checkpoint reads, hashes and writes about 2 GB/s; zstd compresses
//! numeric data (half of its bytes compressible) at 400-550 MB/s on one of our cores. Done
//! inline, compression made such a checkpoint four times slower (1 GiB: 2.6 s instead of
//! 0.6). So frames are handed to a [`Pipeline`]: a worker thread on the other core
//! compresses them while the writer goes on with the next ones, and hands each back with
//! its compressed bytes when they save at least 1/8. The writer places frames in the pack
//! as they are ready (a frame's offset is in the index; frames need not be in order).
//!
//! One worker is kept for the life of the process (making a thread and a zstd context
//! every checkpoint costs fresh memory, which our virtual machines fill slowly): a writer
//! takes it ([`Pipeline::take`]) and gives it back when dropped, after every frame it had
//! under way came back. A supervisor makes it at its start ([`start_thread`]): once it
//! has asked for a pid namespace for its children, the kernel refuses it new threads
//! (`EINVAL`), and its writers then compress on their own thread.

use std::sync::Mutex;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Duration;

use crate::index::BlobHash;

/// Frames at the worker at once at most: one compressing, one waiting, so that it never
/// waits for the writer between frames.
const DEPTH: usize = 2;

/// The worker kept between writers.
static SPARE: Mutex<Option<Worker>> = Mutex::new(None);

/// A frame to compress, and what the writer needs to place it when it comes back.
#[derive(Debug)]
pub(crate) struct Job {
    /// The frame's index in the writer's chunk index.
    pub frame: u32,
    /// The content addresses of its blobs.
    pub hashes: Vec<BlobHash>,
    /// Its raw bytes.
    pub raw: Vec<u8>,
    /// Where the compressed bytes go (empty; its capacity is reused).
    out: Vec<u8>,
    /// zstd level.
    level: i32,
}

/// A frame back from the worker.
#[derive(Debug)]
pub(crate) struct Done {
    /// The job, its `raw` bytes unchanged.
    pub job: Job,
    /// Whether compression saved at least 1/8 (then [`Done::stored`] is the compressed
    /// bytes).
    pub pays: bool,
    /// The CPU time the worker took to compress it.
    pub cpu: Duration,
}

impl Done {
    /// Bytes compression saved (0 where it did not pay).
    pub(crate) fn saved(&self) -> usize {
        if self.pays {
            self.job.raw.len() - self.job.out.len()
        } else {
            0
        }
    }

    /// The bytes to store: compressed where it pays, else raw.
    pub(crate) fn stored(&self) -> &[u8] {
        if self.pays {
            &self.job.out
        } else {
            &self.job.raw
        }
    }
}

/// The worker thread's ends of its channels, and the buffers that travel through them.
#[derive(Debug)]
struct Worker {
    jobs: SyncSender<Job>,
    done: Receiver<Done>,
    /// Buffers back from finished frames, for the next ones.
    buffers: Vec<Vec<u8>>,
}

impl Worker {
    fn spawn() -> std::io::Result<Worker> {
        let (jobs, inbox) = sync_channel::<Job>(DEPTH);
        let (outbox, done) = sync_channel::<Done>(DEPTH);
        std::thread::Builder::new()
            .name("stasis-zstd".into())
            .spawn(move || {
                // A descriptor table of its own (it never holds one): while the table is
                // shared, the kernel makes every growth of it wait for an RCU grace period
                // (15 ms on our virtual machines), as for the helper thread.
                let _ = stasis_sys::fd::own_table_with_stdio_only();
                compress_loop(&inbox, &outbox)
            })?;
        Ok(Worker {
            jobs,
            done,
            buffers: Vec::new(),
        })
    }
}

/// The worker's loop: compresses jobs in the order they come until the writer's end is
/// dropped.
fn compress_loop(inbox: &Receiver<Job>, outbox: &SyncSender<Done>) {
    let mut context: Context = None;
    while let Ok(mut job) = inbox.recv() {
        // Timed without making the context (the first frame's, or a new level's).
        let c = compressor(&mut context, job.level);
        let started = stasis_sys::process::thread_cpu_ns();
        let pays = c.is_some_and(|c| compress(c, &job.raw, &mut job.out));
        let cpu = Duration::from_nanos(stasis_sys::process::thread_cpu_ns() - started);
        if outbox.send(Done { job, pays, cpu }).is_err() {
            return;
        }
    }
}

/// A zstd context, made for a level and kept while that level is asked for.
pub(crate) type Context = Option<(i32, zstd::bulk::Compressor<'static>)>;

/// The compressor of `context` for `level`, made (or remade for another level) if need be.
pub(crate) fn compressor(
    context: &mut Context,
    level: i32,
) -> Option<&mut zstd::bulk::Compressor<'static>> {
    if context.as_ref().is_none_or(|(l, _)| *l != level) {
        *context = zstd::bulk::Compressor::new(level).ok().map(|c| (level, c));
    }
    context.as_mut().map(|(_, c)| c)
}

/// Compresses `raw` into `out` with `c`; whether the result saves at least 1/8 (else `out`
/// holds nothing of use).
pub(crate) fn compress(
    c: &mut zstd::bulk::Compressor<'static>,
    raw: &[u8],
    out: &mut Vec<u8>,
) -> bool {
    if raw.len() <= 8 {
        return false;
    }
    // Room for what pays and no more: zstd gives up once its output would not fit (a
    // buffer recycled from a raw frame has more room than that).
    let room = raw.len() - raw.len() / 8 - 1;
    out.resize(room, 0);
    match c.compress_to_buffer(raw, &mut out[..room]) {
        Ok(n) => {
            out.truncate(n);
            true
        }
        Err(_) => {
            out.clear();
            false
        }
    }
}

/// Makes the compression thread now, if none is kept: a process that is about to lose the
/// ability to make threads (by `unshare(CLONE_NEWPID)`) calls this first. `false` if the
/// kernel refused it.
pub fn start_thread() -> bool {
    let Ok(mut spare) = SPARE.lock() else {
        return false;
    };
    if spare.is_none() {
        *spare = Worker::spawn().ok();
    }
    spare.is_some()
}

/// A writer's use of the worker: frames sent and not yet back.
#[derive(Debug)]
pub(crate) struct Pipeline {
    worker: Option<Worker>,
    in_flight: usize,
}

impl Pipeline {
    /// The kept worker, or a new one; `None` when no thread can be made (the writer
    /// then compresses frames itself).
    pub(crate) fn take() -> Option<Pipeline> {
        let kept = SPARE.lock().ok().and_then(|mut s| s.take());
        let worker = match kept {
            Some(w) => w,
            None => Worker::spawn().ok()?,
        };
        Some(Pipeline {
            worker: Some(worker),
            in_flight: 0,
        })
    }

    /// Whether the worker has as many frames as it takes at once.
    pub(crate) fn busy(&self) -> bool {
        self.in_flight >= DEPTH
    }

    /// Frames sent and not yet back.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Hands frame `frame` (blobs `hashes`, bytes copied from `raw`) to the worker, to be
    /// compressed at `level`. Call only when not [`Pipeline::busy`]. If the worker is
    /// gone, nothing is sent and `hashes` come back.
    pub(crate) fn send(
        &mut self,
        frame: u32,
        hashes: Vec<BlobHash>,
        raw: &[u8],
        level: i32,
    ) -> Result<(), Vec<BlobHash>> {
        let Some(w) = self.worker.as_mut() else {
            return Err(hashes);
        };
        let mut buffer = w.buffers.pop().unwrap_or_default();
        buffer.clear();
        buffer.extend_from_slice(raw);
        let job = Job {
            frame,
            hashes,
            raw: buffer,
            out: w.buffers.pop().unwrap_or_default(),
            level,
        };
        if let Err(e) = w.jobs.send(job) {
            self.worker = None;
            return Err(e.0.hashes);
        }
        self.in_flight += 1;
        Ok(())
    }

    /// A frame back from the worker: the next in the order sent, waiting for it if `wait`;
    /// `None` if none is ready (or none under way). `Err` if the worker ended with frames
    /// under way (they are lost).
    pub(crate) fn next(&mut self, wait: bool) -> Result<Option<Done>, WorkerGone> {
        if self.in_flight == 0 {
            return Ok(None);
        }
        let Some(w) = self.worker.as_mut() else {
            return Err(WorkerGone);
        };
        let got = if wait {
            w.done.recv().map_err(|_| WorkerGone)
        } else {
            match w.done.try_recv() {
                Ok(d) => Ok(d),
                Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(None),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => Err(WorkerGone),
            }
        };
        match got {
            Ok(d) => {
                self.in_flight -= 1;
                Ok(Some(d))
            }
            Err(e) => {
                self.worker = None;
                Err(e)
            }
        }
    }

    /// Takes back the buffers of a frame placed.
    pub(crate) fn recycle(&mut self, done: Done) {
        if let Some(w) = self.worker.as_mut() {
            w.buffers.push(done.job.raw);
            w.buffers.push(done.job.out);
        }
    }
}

impl Drop for Pipeline {
    /// Waits for the frames under way (a writer dropped on an error) and keeps the worker
    /// for the next writer.
    fn drop(&mut self) {
        while self.in_flight > 0 {
            match self.next(true) {
                Ok(Some(d)) => self.recycle(d),
                _ => return,
            }
        }
        if let (Some(w), Ok(mut spare)) = (self.worker.take(), SPARE.lock()) {
            *spare = Some(w);
        }
    }
}

/// The compression thread ended while frames were under way.
#[derive(Debug)]
pub(crate) struct WorkerGone;
