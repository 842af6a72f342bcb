//! Mappings read before the freeze, for their flags.

use std::collections::HashMap;

use crate::error::CoreResult;
use crate::proc;

/// The mappings of a job's processes read from `/proc/PID/smaps` while the job still runs:
/// smaps walks the page tables (about 10 ms for 1 GiB), `/proc/PID/maps` does not but lacks
/// the flags capture needs. While the job is frozen, mappings are read from maps and take
/// their flags from here; [`CapturedJob::check_flags`] checks them afterwards.
#[derive(Debug, Default)]
pub struct EarlyMaps(HashMap<i32, Vec<proc::MapEntry>>);

impl EarlyMaps {
    /// Reads the mappings of `pids` (processes that vanish are skipped).
    pub fn read(pids: &[i32]) -> Self {
        EarlyMaps(
            pids.iter()
                .filter_map(|&p| Some((p, proc::maps(p).ok()?)))
                .collect(),
        )
    }

    /// The mappings of frozen process `pid`: from `/proc/PID/maps` with the flags read
    /// early when every mapping is still there (and whether they were), else from smaps.
    pub(crate) fn maps(&self, pid: i32) -> CoreResult<(Vec<proc::MapEntry>, bool)> {
        if let Some(known) = self.0.get(&pid)
            && let Some(maps) = proc::maps_with_known_flags(pid, known)?
        {
            return Ok((maps, true));
        }
        Ok((proc::maps(pid)?, false))
    }
}
