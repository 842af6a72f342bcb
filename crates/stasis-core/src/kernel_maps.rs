//! A process's mappings with flags taken from the kernel's own list of them (a BPF
//! iterator, [`stasis_sys::bpf`]) instead of `/proc/PID/smaps`, whose page walk costs
//! about 10 ms per GiB of resident memory. Only a privileged supervisor can load the
//! iterator; it is trusted once it agrees with smaps on probe mappings of every flag
//! capture uses ([`CODES`]), made in the supervisor itself. Otherwise, and wherever a
//! listing does not match `/proc/PID/maps`, smaps is read as before.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use stasis_sys::bpf::{VmaLister, VmaProgram};
use stasis_sys::mem::ProbeMapping;

use crate::error::CoreResult;
use crate::proc::{self, MapEntry};

/// The `VmFlags` codes given from `vm_flags`, with their bits (the same on every x86_64
/// kernel since 4.14; checked against smaps before use): may-write, grows-down,
/// don't-copy, no-reserve, wipe-on-fork, don't-dump, huge-page, no-huge-page.
pub const CODES: [(&str, u64); 8] = [
    ("mw", 0x20),
    ("gd", 0x100),
    ("dc", 0x2_0000),
    ("nr", 0x20_0000),
    ("wf", 0x200_0000),
    ("dd", 0x400_0000),
    ("hg", 0x2000_0000),
    ("nh", 0x4000_0000),
];

/// The iterator, once loaded and checked.
#[derive(Debug)]
pub struct KernelMaps {
    lister: VmaLister,
    /// Cleared when a listing fails (not when it merely differs from `/proc/PID/maps`):
    /// checkpoints then read smaps the way that keeps the freeze short, as without it.
    working: AtomicBool,
}

static KERNEL_MAPS: OnceLock<Option<KernelMaps>> = OnceLock::new();
static PROGRAM: OnceLock<Result<VmaProgram, String>> = OnceLock::new();

/// Whether this process may load a tracing program: root of the first user namespace
/// (in a user namespace of its own, root has its capabilities there only, and the kernel
/// refuses), with `CAP_SYS_ADMIN`, or `CAP_BPF` and `CAP_PERFMON`.
fn privileged() -> bool {
    let cap = stasis_sys::ns::has_effective_cap;
    stasis_sys::process::uid() == 0
        && (cap(21) || (cap(39) && cap(38)))
        && std::fs::read_to_string("/proc/self/uid_map")
            .is_ok_and(|m| m.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"])
}

/// Whether `STASIS_SMAPS_ONLY` asks for smaps alone (to compare the two, or should the
/// iterator misbehave on some kernel).
fn smaps_only() -> bool {
    std::env::var_os("STASIS_SMAPS_ONLY").is_some_and(|v| !v.is_empty() && v != "0")
}

/// The program built from the kernel's BTF (once; the slow part, a few milliseconds).
fn program() -> &'static Result<VmaProgram, String> {
    PROGRAM.get_or_init(|| {
        let t0 = std::time::Instant::now();
        let built = VmaProgram::build().map_err(|e| e.to_string());
        tracing::debug!(
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "built the program that lists mappings"
        );
        built
    })
}

/// The iterator, if this process may load it and it agrees with smaps (tried once, by
/// the first call from the process's main thread, which waits for the try), and no
/// listing has failed since. Only on the main thread: the program's descriptor is in its
/// descriptor table (a supervisor's helper thread has a table of its own).
pub fn get() -> Option<&'static KernelMaps> {
    if nix::unistd::gettid() != nix::unistd::getpid() {
        return None;
    }
    KERNEL_MAPS
        .get_or_init(|| match KernelMaps::load() {
            Ok(k) => {
                tracing::debug!("mapping flags come from the kernel's list of mappings");
                Some(k)
            }
            Err(why) => {
                tracing::debug!("mapping flags come from smaps: {why}");
                None
            }
        })
        .as_ref()
        .filter(|k| k.working.load(Ordering::Relaxed))
}

/// Builds the program on the helper thread, so that the first checkpoint finds the slow
/// part done.
pub fn warm_up() {
    if !smaps_only() && privileged() {
        drop(crate::helper::beside(|| {
            program();
        }));
    }
}

fn codes(flags: u64) -> Vec<String> {
    CODES
        .iter()
        .filter(|(_, bit)| flags & bit != 0)
        .map(|(code, _)| (*code).to_owned())
        .collect()
}

impl KernelMaps {
    fn load() -> Result<KernelMaps, String> {
        if smaps_only() {
            return Err("STASIS_SMAPS_ONLY is set".into());
        }
        if !privileged() {
            return Err(
                "not root of the first user namespace with CAP_SYS_ADMIN (or CAP_BPF and \
                 CAP_PERFMON)"
                    .into(),
            );
        }
        let lister = program()
            .as_ref()
            .map_err(Clone::clone)?
            .load()
            .map_err(|e| e.to_string())?;
        let k = KernelMaps {
            lister,
            working: AtomicBool::new(true),
        };
        k.agrees_with_smaps()?;
        Ok(k)
    }

    /// Makes a probe mapping of each flag in this process and checks that the iterator
    /// and smaps give every mapping the same [`CODES`], and that each code was seen. A
    /// listing that changed in between (another thread mapping memory) is tried again.
    fn agrees_with_smaps(&self) -> Result<(), String> {
        let page = 4096;
        let mut probes = Vec::new();
        let mut missing: Vec<&str> = Vec::new();
        let anonymous = [
            ("dc", 0, Some(libc::MADV_DONTFORK)),
            ("wf", 0, Some(libc::MADV_WIPEONFORK)),
            ("dd", 0, Some(libc::MADV_DONTDUMP)),
            ("hg", 0, Some(libc::MADV_HUGEPAGE)),
            ("nh", 0, Some(libc::MADV_NOHUGEPAGE)),
            ("nr", libc::MAP_NORESERVE, None),
            ("gd", libc::MAP_GROWSDOWN, None),
        ];
        for (code, extra, advice) in anonymous {
            match ProbeMapping::anonymous(2 * page, extra, advice) {
                Ok(p) => probes.push(p),
                // A kernel without transparent huge pages refuses their advice: no
                // process then has the flag.
                Err(_) => missing.push(code),
            }
        }
        // A mapping without may-write: a file opened read-only, mapped shared (`[vvar]`
        // lacks it too, should this be refused).
        if let Ok(exe) = std::fs::File::open("/proc/self/exe")
            && let Ok(p) = ProbeMapping::shared_read_only(&exe, page)
        {
            probes.push(p);
        }
        let me = std::process::id() as i32;
        let mut last = String::new();
        for _ in 0..5 {
            let smaps = proc::maps(me).map_err(|e| e.to_string())?;
            // Lists that differ: another thread mapped memory in between.
            let merged = match self.merged(me).map_err(|e| e.to_string())? {
                Merged::Alike(m) => m,
                Merged::Differ => {
                    last = "the kernel's list and maps differ".into();
                    continue;
                }
                Merged::Failed(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            match compare(&smaps, &merged, &probes) {
                Ok(seen) => {
                    let unseen: Vec<&str> = CODES
                        .iter()
                        .map(|c| c.0)
                        .filter(|c| !seen.contains(c) && !missing.contains(c))
                        .collect();
                    if unseen.is_empty() {
                        return Ok(());
                    }
                    return Err(format!("no probe mapping showed {unseen:?}"));
                }
                Err(Mismatch::Flags(why)) => return Err(why),
                Err(Mismatch::Listing(why)) => last = why,
            }
        }
        Err(last)
    }

    /// `/proc/PID/maps` of process `pid`, each mapping with the flags of [`CODES`] from
    /// the kernel's list (and `anon_pages` 0: not counted).
    fn merged(&self, pid: i32) -> CoreResult<Merged> {
        let mut maps = proc::maps_without_flags(pid)?;
        let listed = match self.lister.list(pid, maps.len()) {
            Ok(l) => l,
            Err(e) => return Ok(Merged::Failed(e)),
        };
        let mut it = listed.iter().peekable();
        for m in &mut maps {
            match it.peek() {
                Some(k) if k.start == m.start && k.end == m.end => {
                    m.flags = codes(k.flags);
                    it.next();
                }
                // The gate page shows in maps but is no mapping of the process.
                _ if m.path == "[vsyscall]" => {}
                _ => return Ok(Merged::Differ),
            }
        }
        Ok(match it.next() {
            None => Merged::Alike(maps),
            Some(_) => Merged::Differ,
        })
    }

    /// The mappings of frozen process `pid` from `/proc/PID/maps`, with the flags of
    /// [`CODES`] from the kernel's list; `None` when the two lists differ, or the listing
    /// failed (which turns the iterator off). Anonymous pages are not counted (no page
    /// walk: `anon_pages` is 0); the choice between copying at the cut and a snapshot then
    /// counts the pages of mappings write tracking does not cover exactly.
    pub fn maps(&self, pid: i32) -> CoreResult<Option<Vec<MapEntry>>> {
        Ok(match self.merged(pid)? {
            Merged::Alike(maps) => Some(maps),
            Merged::Differ => None,
            Merged::Failed(e) => {
                tracing::warn!(
                    pid,
                    "the kernel's list of mappings failed, smaps from now: {e}"
                );
                self.working.store(false, Ordering::Relaxed);
                None
            }
        })
    }
}

/// What [`KernelMaps::merged`] found.
enum Merged {
    /// Both lists have the same mappings: maps with their flags.
    Alike(Vec<MapEntry>),
    /// The lists have different mappings.
    Differ,
    /// The kernel's listing failed.
    Failed(stasis_sys::SysError),
}

enum Mismatch {
    /// The two listings have different mappings (they changed in between).
    Listing(String),
    /// A mapping has different flags: the iterator is not to be trusted.
    Flags(String),
}

/// Compares smaps with the same mappings as [`KernelMaps::merged`] gave them, mapping by
/// mapping; the codes seen set on some probe.
fn compare(
    smaps: &[MapEntry],
    merged: &[MapEntry],
    probes: &[ProbeMapping],
) -> Result<Vec<&'static str>, Mismatch> {
    let alike =
        smaps.len() == merged.len() && smaps.iter().zip(merged).all(|(s, m)| s.same_mapping(m));
    if !alike {
        return Err(Mismatch::Listing("smaps and maps differ".into()));
    }
    let mut seen = Vec::new();
    for (s, m) in smaps.iter().zip(merged) {
        let want: Vec<String> = CODES
            .iter()
            .filter(|(c, _)| s.has_flag(c))
            .map(|(c, _)| (*c).to_owned())
            .collect();
        if m.flags != want {
            return Err(Mismatch::Flags(format!(
                "mapping {:x}-{:x} {}: smaps shows {want:?}, vm_flags give {:?}",
                s.start, s.end, s.path, m.flags
            )));
        }
        if probes.iter().any(|p| p.start() == s.start) {
            seen.extend(CODES.iter().map(|c| c.0).filter(|c| s.has_flag(c)));
        }
    }
    if probes
        .iter()
        .any(|p| !smaps.iter().any(|s| s.start == p.start()))
    {
        return Err(Mismatch::Listing("a probe mapping is not listed".into()));
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn as_root_the_kernels_list_gives_the_flags_smaps_gives() {
        // Loaded here, on the test's thread, which lists too (`get` is for the main thread).
        let k = match KernelMaps::load() {
            Ok(k) => k,
            Err(why) => {
                assert!(
                    !privileged(),
                    "as root the iterator loads and agrees with smaps: {why}"
                );
                return;
            }
        };
        let dontfork = ProbeMapping::anonymous(3 * 4096, 0, Some(libc::MADV_DONTFORK)).unwrap();
        let me = std::process::id() as i32;
        // Other tests map memory meanwhile: compare two listings with the same mappings.
        let (maps, smaps) = (0..20)
            .find_map(|_| {
                let maps = k.maps(me).unwrap()?;
                let smaps = proc::maps(me).unwrap();
                let same = maps.len() == smaps.len()
                    && maps.iter().zip(&smaps).all(|(m, s)| m.same_mapping(s));
                same.then_some((maps, smaps))
            })
            .expect("two listings alike");
        let m = maps.iter().find(|m| m.start == dontfork.start()).unwrap();
        assert_eq!(m.flags, ["mw", "dc"]);
        assert_eq!(m.anon_pages, 0, "not counted");
        for (s, m) in smaps.iter().zip(&maps) {
            assert!(s.same_for_capture(m), "{s:?} vs {m:?}");
            for (code, _) in CODES {
                assert_eq!(s.has_flag(code), m.has_flag(code), "{code} of {s:?}");
            }
        }
    }
}
