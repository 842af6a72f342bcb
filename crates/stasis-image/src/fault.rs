//! Fault injection for tests: `STASIS_FAULT=POINT[@N]` makes the process that reaches the
//! named point for the N-th time (the first by default) die on the spot, as if killed with
//! `kill -9` there: no destructor runs, nothing is cleaned up. Unset, every point costs
//! one environment lookup, done once.
//!
//! Points: `pack-chunk` (after a frame of new blobs is stored), `pack-finished` (pack
//! synced), `manifest-written` (manifest synced, generation not yet renamed into place),
//! `renamed` (generation in place, directory not yet synced), `rm-renamed` (generation
//! hidden for removal, not yet deleted), `rm-removed` (deleted, packs it alone referenced not
//! yet swept), and in the supervisor `frozen`, `captured`, `thawed`,
//! `snapshots-read`, `finished`; `kill-job-process` at `frozen` kills a process of the job
//! instead of the supervisor. `no-prefetch` is not a death: a lazily restarted job's memory
//! is then loaded only where the job touches it, until a checkpoint needs it all. Nor is
//! `slow-reprotect`: the supervisor waits a second after thawing the job, before write
//! tracking protects its pages again (the window a write or `MADV_DONTNEED` must not slip
//! through unseen); nor `slow-precopy`: it waits a second after a pre-copy, before the
//! cut (the job's writes in between must be read at the cut); nor `no-direct-io`: every
//! pack is written as on a filesystem that refuses direct I/O; nor `small-hand-over`: a
//! lazily restarted job's memory, once loaded, is handed over to write tracking one
//! mapping at a time, 300 ms apart (its changes meanwhile land on both sides).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

fn armed() -> Option<&'static (String, u32)> {
    static ARMED: OnceLock<Option<(String, u32)>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("STASIS_FAULT").ok()?;
            let (name, nth) = match spec.split_once('@') {
                Some((n, k)) => (n.to_owned(), k.parse().unwrap_or(1)),
                None => (spec, 1),
            };
            Some((name, nth))
        })
        .as_ref()
}

/// Whether the armed fault is `name` and this is its N-th arrival.
pub fn reached(name: &str) -> bool {
    static SEEN: Mutex<Option<HashMap<String, u32>>> = Mutex::new(None);
    let Some((armed, nth)) = armed() else {
        return false;
    };
    if armed != name {
        return false;
    }
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    let count = seen
        .get_or_insert_with(HashMap::new)
        .entry(name.to_owned())
        .or_insert(0);
    *count += 1;
    *count == *nth
}

/// Whether the armed fault is `name`, at every arrival (for conditions that last, not
/// deaths).
pub fn armed_as(name: &str) -> bool {
    armed().is_some_and(|(armed, _)| armed == name)
}

/// Dies here if the armed fault is `name` (see the module documentation).
pub fn point(name: &str) {
    if reached(name) {
        eprintln!("stasis: fault injection: dying at {name}");
        std::process::abort();
    }
}
