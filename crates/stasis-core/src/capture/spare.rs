//! Buffers for the pages copied out of a frozen process, kept from one checkpoint to the
//! next.
//!
//! Copying a process's written pages at the cut writes them into the supervisor's memory.
//! Fresh memory costs a page fault per page on first write, paid while the job stands
//! frozen; on a virtual machine whose host takes free memory back it costs several times
//! more (the host must back the page first). Measured at 4 GiB, 1% changed: 10,500 pages
//! copied in 32 ms into fresh memory. A buffer given back once its pages are stored is
//! kept, already backed, for the next cut: what a supervisor keeps is bounded by
//! [`KEPT_BYTES`] and, as copies are made only when they are a small share of the process
//! (`COPY_SHARE`), by that share of the job's memory. Between checkpoints the kernel may
//! take the kept pages back should memory run short (`MADV_FREE`): they count against a
//! memory limit only until it needs them.

use std::sync::Mutex;

/// The most bytes of buffers kept between checkpoints.
pub const KEPT_BYTES: usize = 256 << 20;
/// The most buffers kept (one per process copied at a cut).
const KEPT_BUFFERS: usize = 8;

static KEPT: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// Takes out of `kept` the smallest buffer that holds `len` bytes, if one does.
fn take_fitting(kept: &mut Vec<Vec<u8>>, len: usize) -> Option<Vec<u8>> {
    let best = (0..kept.len())
        .filter(|&i| kept[i].capacity() >= len)
        .min_by_key(|&i| kept[i].capacity())?;
    Some(kept.swap_remove(best))
}

/// Of `items`, largest first, those the limits allow ([`KEPT_BYTES`], [`KEPT_BUFFERS`]).
fn within_limits<T>(mut items: Vec<T>, size: impl Fn(&T) -> usize) -> Vec<T> {
    items.sort_unstable_by_key(|i| std::cmp::Reverse(size(i)));
    let mut total = 0;
    items.retain(|i| {
        let fits = total + size(i) <= KEPT_BYTES;
        if fits {
            total += size(i);
        }
        fits
    });
    items.truncate(KEPT_BUFFERS);
    items
}

/// A buffer of `len` bytes: the smallest kept one that holds them (its contents are
/// whatever it held; the caller overwrites them), else a new one of zeros.
pub(super) fn buffer(len: usize) -> Vec<u8> {
    let mut kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
    match take_fitting(&mut kept, len) {
        Some(mut b) => {
            // Within the capacity: no new memory, at most a fill of what lies past `len`.
            b.resize(len, 0);
            b
        }
        None => vec![0u8; len],
    }
}

/// Keeps `buf` for a later [`buffer`], as long as the limits allow: the largest buffers
/// are kept first.
pub(super) fn give_back(buf: Vec<u8>) {
    if buf.capacity() == 0 {
        return;
    }
    let mut kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
    kept.push(buf);
    let all = std::mem::take(&mut *kept);
    *kept = within_limits(all, Vec::capacity);
}

/// Makes sure a buffer of each of `sizes` is kept, backed, for the next cut (those the
/// limits allow, largest first): called while the job runs, after a checkpoint, with what
/// the next cut may copy out of each process at most; a buffer not kept yet is made and
/// written once. Then all are marked free for the kernel to take back should memory run
/// short (the next cut then faults in what it copies, as without them).
pub fn keep_ready(sizes: &[usize]) {
    let sizes = within_limits(sizes.iter().copied().filter(|&s| s > 0).collect(), |&s| s);
    let found: Vec<Result<Vec<u8>, usize>> = {
        let mut kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
        sizes
            .into_iter()
            .map(|s| take_fitting(&mut kept, s).ok_or(s))
            .collect()
    };
    // Made outside the lock: writing fresh memory takes a while.
    let ready: Vec<Vec<u8>> = found
        .into_iter()
        .map(|f| f.unwrap_or_else(|s| vec![1u8; s]))
        .collect();
    let mut kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
    let mut all = std::mem::take(&mut *kept);
    all.extend(ready);
    *kept = within_limits(all, Vec::capacity);
    for b in kept.iter_mut() {
        let len = b.capacity();
        b.resize(len, 0);
        stasis_sys::mem::free_lazily(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_is_handed_out_again_and_the_limits_hold() {
        let b = buffer(3 * 4096);
        assert_eq!(b.len(), 3 * 4096);
        let at = b.as_ptr();
        give_back(b);
        // Smaller: the same memory, cut to length.
        let again = buffer(2 * 4096);
        assert_eq!((again.as_ptr(), again.len()), (at, 2 * 4096));
        give_back(again);
        // Larger than any kept: a new one.
        let big = buffer(5 * 4096);
        assert_ne!(big.as_ptr(), at);
        give_back(big);
        // More than the limit is not kept.
        give_back(vec![0u8; KEPT_BYTES + 1]);
        {
            let kept = KEPT.lock().unwrap();
            assert!(kept.iter().map(Vec::capacity).sum::<usize>() <= KEPT_BYTES);
            assert!(kept.len() <= KEPT_BUFFERS);
        }
        // Made ready: a kept buffer of each size asked for, handed out without new memory.
        keep_ready(&[7 * 4096, 4096]);
        let ready = buffer(7 * 4096);
        assert!(ready.capacity() >= 7 * 4096);
        let at = ready.as_ptr();
        give_back(ready);
        let smaller = buffer(6 * 4096);
        assert_eq!(smaller.as_ptr(), at, "the smallest that holds it");
    }
}
