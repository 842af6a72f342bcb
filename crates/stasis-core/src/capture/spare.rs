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

/// A buffer of `len` bytes: the smallest kept one that holds them (its contents are
/// whatever it held; the caller overwrites them), else a new one of zeros.
pub(super) fn buffer(len: usize) -> Vec<u8> {
    let mut kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
    let best = kept
        .iter()
        .enumerate()
        .filter(|(_, b)| b.capacity() >= len)
        .min_by_key(|(_, b)| b.capacity())
        .map(|(i, _)| i);
    match best {
        Some(i) => {
            let mut b = kept.swap_remove(i);
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
    kept.sort_unstable_by_key(|b| std::cmp::Reverse(b.capacity()));
    let mut total = 0;
    kept.retain(|b| {
        let fits = total + b.capacity() <= KEPT_BYTES;
        if fits {
            total += b.capacity();
        }
        fits
    });
    kept.truncate(KEPT_BUFFERS);
}

/// Makes sure a buffer of each of `sizes` is kept, backed, for the next cut (those the
/// limits allow, largest first): called while the job runs, after a checkpoint, with what
/// the next cut may copy out of each process at most; a buffer not kept yet is made and
/// written once.
pub fn keep_ready(sizes: &[usize]) {
    let mut sizes: Vec<usize> = sizes.iter().copied().filter(|&s| s > 0).collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    let mut total = 0;
    sizes.retain(|&s| {
        let fits = total + s <= KEPT_BYTES;
        if fits {
            total += s;
        }
        fits
    });
    sizes.truncate(KEPT_BUFFERS);
    let missing: Vec<usize> = {
        let kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
        let mut taken = vec![false; kept.len()];
        sizes
            .into_iter()
            .filter(|&s| {
                let fit = (0..kept.len())
                    .filter(|&i| !taken[i] && kept[i].capacity() >= s)
                    .min_by_key(|&i| kept[i].capacity());
                if let Some(i) = fit {
                    taken[i] = true;
                }
                fit.is_none()
            })
            .collect()
    };
    // Made outside the lock: writing fresh memory takes a while.
    for s in missing {
        give_back(vec![1u8; s]);
    }
    // Kept, not held: memory running short takes them back (the next cut then faults in
    // what it copies, as without them).
    let mut kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
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
        let kept = KEPT.lock().unwrap();
        assert!(kept.iter().map(Vec::capacity).sum::<usize>() <= KEPT_BYTES);
        assert!(kept.len() <= KEPT_BUFFERS);
    }
}
