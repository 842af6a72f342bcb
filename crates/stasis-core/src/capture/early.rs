//! Where a capture takes its mappings' flags from.
//!
//! Capture needs each mapping's `VmFlags` (don't-copy and wipe-on-fork decide what a
//! snapshot can read; the advice is restored; grows-down, may-write), which only
//! `/proc/PID/smaps` tells without privileges, and smaps walks the page tables: about 12 ms
//! for 1 GiB, as much CPU time as the rest of an incremental checkpoint. A supervisor that
//! may load a BPF iterator reads them exactly while the job is frozen, in microseconds,
//! from the kernel's own list ([`crate::kernel_maps`]); none of what follows applies then.
//! Otherwise, while the job is frozen the
//! mappings are read from `/proc/PID/maps` (no page walk) and take their flags from one
//! of two places, chosen per process by [`EarlyMaps::plan`]:
//!
//! - **carried**: the flags the previous checkpoint read ([`KnownFlags`]). smaps is read
//!   once, on a thread of its own, while the job stands still (both cores are free then,
//!   and nothing needs checking afterwards); the capture does not wait for it except where
//!   a flag decides what it does (before a snapshot is taken), and mends what the carried
//!   flags got wrong (see `capture_process`). Chosen while the processes' last smaps
//!   readings took [`IN_FREEZE_BUDGET`] at most together, which bounds what the job may
//!   stand still longer for.
//! - **early**: read from smaps just before the freeze, and checked once the job runs again
//!   ([`FlagCheck`]), so that a flag changed in between fails the checkpoint. Used for
//!   processes never read before, or too large to read while frozen.

use std::collections::HashMap;
use std::time::Duration;

use crate::error::{CoreError, CoreResult};
use crate::helper::{self, Beside};
use crate::proc::{self, MapEntry};

/// The most CPU time the smaps readings of a job's carried processes may take together
/// (as measured last time): they run while the job is frozen, beside the capture. Reading
/// 1 GiB of resident memory takes 11-15 ms here; the job's stall is to stay under 30 ms.
pub const IN_FREEZE_BUDGET: Duration = Duration::from_millis(20);

/// One process's mappings with their flags, as smaps gave them, and the CPU time reading
/// it took.
#[derive(Debug, Clone)]
pub struct Reading {
    /// The process (host pid).
    pub pid: i32,
    /// Its mappings.
    pub maps: Vec<MapEntry>,
    /// The CPU time reading smaps took (its page walk), however busy the machine was.
    pub took: Duration,
}

impl Reading {
    /// Reads smaps of `pid`, timed.
    pub fn take(pid: i32) -> CoreResult<Reading> {
        let cpu = || stasis_sys::process::clock_ns(libc::CLOCK_THREAD_CPUTIME_ID);
        let t0 = cpu();
        let maps = proc::maps(pid)?;
        Ok(Reading {
            pid,
            maps,
            took: Duration::from_nanos(cpu().saturating_sub(t0)),
        })
    }
}

/// The latest smaps reading of each process of a job, kept by its supervisor from one
/// checkpoint to the next.
#[derive(Debug, Default)]
pub struct KnownFlags(HashMap<i32, Reading>);

impl KnownFlags {
    /// Keeps `readings` (of the checkpoint just taken), forgetting the processes they do
    /// not name.
    pub fn replace(&mut self, readings: Vec<Reading>) {
        for r in &readings {
            tracing::debug!(
                pid = r.pid,
                took_ms = r.took.as_secs_f64() * 1e3,
                "smaps read"
            );
        }
        self.0 = readings.into_iter().map(|r| (r.pid, r)).collect();
    }
}

/// The flags of each process's mappings at one cut: carried from the previous
/// checkpoint, or read early (see the module documentation).
#[derive(Debug, Default)]
pub struct EarlyMaps {
    early: HashMap<i32, Vec<MapEntry>>,
    carried: HashMap<i32, Vec<MapEntry>>,
}

/// Where a process's mapping flags came from at the cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlagsFrom {
    /// Read while frozen, from smaps or the kernel's list ([`crate::kernel_maps`]): exact.
    Exact,
    /// Read before the freeze: checked after the thaw.
    Early,
    /// Carried from the previous checkpoint: mended from smaps read while frozen.
    Carried,
}

impl EarlyMaps {
    /// Carries the flags `known` has for as many of `pids` as [`IN_FREEZE_BUDGET`] allows;
    /// reads the others' early.
    pub fn plan(pids: &[i32], known: &KnownFlags) -> Self {
        if crate::kernel_maps::get().is_some() {
            // Every process's flags are read exactly while frozen, in microseconds.
            return EarlyMaps::default();
        }
        let mut budget = IN_FREEZE_BUDGET;
        let mut out = EarlyMaps::default();
        for &pid in pids {
            match known.0.get(&pid) {
                Some(r) if r.took <= budget => {
                    budget -= r.took;
                    out.carried.insert(pid, r.maps.clone());
                }
                _ => {
                    if let Ok(maps) = proc::maps(pid) {
                        out.early.insert(pid, maps);
                    }
                }
            }
        }
        out
    }

    /// Whether some process's flags are carried: its smaps is read while frozen.
    pub(crate) fn carries_any(&self) -> bool {
        !self.carried.is_empty()
    }

    /// The mappings of frozen process `pid` and where their flags came from: from the
    /// kernel's list where this supervisor may read it; from `/proc/PID/maps` with the
    /// flags read early when every mapping is still there, or
    /// carried (a private mapping made since taking none: mended once smaps is read; not a
    /// shared one, whose may-write flag decides at once whether a file counts as written);
    /// else from smaps now.
    pub(crate) fn maps(&self, pid: i32) -> CoreResult<(Vec<MapEntry>, FlagsFrom)> {
        if let Some(kernel) = crate::kernel_maps::get()
            && let Some(maps) = kernel.maps(pid)?
        {
            return Ok((maps, FlagsFrom::Exact));
        }
        if let Some(known) = self.early.get(&pid) {
            let (maps, unknown) = proc::maps_with_known_flags(pid, known)?;
            if unknown.is_empty() {
                return Ok((maps, FlagsFrom::Early));
            }
        }
        if let Some(known) = self.carried.get(&pid) {
            let (maps, unknown) = proc::maps_with_known_flags(pid, known)?;
            if unknown.iter().all(|m| !m.shared) {
                return Ok((maps, FlagsFrom::Carried));
            }
        }
        Ok((proc::maps(pid)?, FlagsFrom::Exact))
    }
}

/// The smaps readings the helper thread takes while the job is frozen, of the processes
/// whose flags are carried ([`EarlyMaps::plan`]).
#[derive(Debug, Default)]
pub(crate) struct ExactFlags {
    asked: HashMap<i32, Beside<CoreResult<Reading>>>,
    /// The readings handed out, kept for the next checkpoint.
    pub(crate) taken: Vec<Reading>,
}

impl ExactFlags {
    /// Starts reading smaps of frozen process `pid` on the helper thread.
    pub(crate) fn read_beside(&mut self, pid: i32) {
        self.asked
            .insert(pid, helper::beside(move || Reading::take(pid)));
    }

    /// The mappings of frozen process `pid` as smaps gives them (waits for the reading
    /// [`ExactFlags::read_beside`] started, or reads now).
    pub(crate) fn get(&mut self, pid: i32) -> CoreResult<Vec<MapEntry>> {
        let reading = match self.asked.remove(&pid).and_then(Beside::wait) {
            Some(r) => r?,
            None => Reading::take(pid)?,
        };
        let maps = reading.maps.clone();
        self.taken.push(reading);
        Ok(maps)
    }
}

/// The mappings whose flags a capture took from [`EarlyMaps`] read early, by host pid: to
/// check once the job runs again ([`FlagCheck::run`]) that they still have them.
#[derive(Debug, Default)]
pub struct FlagCheck(pub(crate) Vec<(i32, Vec<MapEntry>)>);

impl FlagCheck {
    /// Checks that the mappings whose flags were read before the freeze still have them (as
    /// far as they still exist): a program that set `MADV_DONTFORK` or `MADV_WIPEONFORK` on
    /// a whole mapping in between would otherwise have that mapping read from a snapshot
    /// that lacks it or holds zeros, or restarted without that advice. Reads smaps again,
    /// which walks the page tables ([`FlagCheck::in_background`] does it on a thread of
    /// its own); returns what it read, for the next checkpoint.
    pub fn run(self) -> CoreResult<Vec<Reading>> {
        let mut readings = Vec::with_capacity(self.0.len());
        for (pid, used) in &self.0 {
            let Ok(now) = Reading::take(*pid) else {
                continue;
            };
            for m in used {
                let i = now.maps.partition_point(|n| n.start < m.start);
                if let Some(n) = now.maps.get(i).filter(|n| n.same_mapping(m))
                    && !n.same_for_capture(m)
                {
                    return Err(CoreError::ChangedDuringCheckpoint {
                        pid: *pid,
                        what: format!("{:#x}-{:#x} {}", m.start, m.end, m.path),
                        why: format!("its flags went from {:?} to {:?}", m.flags, n.flags),
                    });
                }
            }
            readings.push(now);
        }
        Ok(readings)
    }

    /// Starts [`FlagCheck::run`] on the helper thread, while the supervisor goes on
    /// writing the checkpoint ([`PendingFlagCheck::wait`] runs it where the helper could
    /// not).
    pub fn in_background(self) -> PendingFlagCheck {
        let theirs = FlagCheck(self.0.clone());
        PendingFlagCheck {
            result: helper::beside(move || theirs.run()),
            left: self,
        }
    }
}

/// A [`FlagCheck`] started by [`FlagCheck::in_background`].
#[derive(Debug)]
pub struct PendingFlagCheck {
    result: Beside<CoreResult<Vec<Reading>>>,
    /// The check, run by `wait` should the helper die before it ends.
    left: FlagCheck,
}

impl PendingFlagCheck {
    /// Waits for the check and returns its result.
    pub fn wait(self) -> CoreResult<Vec<Reading>> {
        self.result.wait().unwrap_or_else(|| self.left.run())
    }
}
