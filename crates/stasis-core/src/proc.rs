//! Parsers for the `/proc` files capture reads.

use std::path::Path;

use crate::error::{CoreResult, io_err};

fn read(path: &str) -> CoreResult<String> {
    std::fs::read_to_string(path).map_err(io_err(path))
}

/// One line of `/proc/PID/smaps` (its header plus `VmFlags`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// Start address.
    pub start: u64,
    /// End address.
    pub end: u64,
    /// `PROT_*`.
    pub prot: i32,
    /// Shared mapping.
    pub shared: bool,
    /// File offset.
    pub offset: u64,
    /// Device major:minor as printed.
    pub dev: String,
    /// Inode (0 for anonymous).
    pub inode: u64,
    /// Path or `[name]`, empty for anonymous.
    pub path: String,
    /// VmFlags two-letter codes.
    pub flags: Vec<String>,
    /// Pages of anonymous memory in it, present (`Anonymous:`) or swapped out (`Swap:`), as
    /// smaps last told (0 when read from `/proc/PID/maps` alone).
    pub anon_pages: u64,
}

/// The `VmFlags` codes capture relies on: don't-copy and wipe-on-fork (what a snapshot can
/// read), grows-down, may-write.
pub const CAPTURE_FLAGS: [&str; 4] = ["dc", "wf", "gd", "mw"];

impl MapEntry {
    /// Has the `VmFlags` code (e.g. `"gd"` for grows-down).
    pub fn has_flag(&self, f: &str) -> bool {
        self.flags.iter().any(|x| x == f)
    }

    /// The same mapping as far as `/proc/PID/maps` tells: range, protection, sharing, file
    /// and offset.
    pub fn same_mapping(&self, o: &MapEntry) -> bool {
        (
            self.start,
            self.end,
            self.prot,
            self.shared,
            self.offset,
            self.inode,
        ) == (o.start, o.end, o.prot, o.shared, o.offset, o.inode)
            && self.dev == o.dev
            && self.path == o.path
    }

    /// The same mapping with the same [`CAPTURE_FLAGS`].
    pub fn same_for_capture(&self, o: &MapEntry) -> bool {
        self.same_mapping(o)
            && CAPTURE_FLAGS
                .iter()
                .all(|f| self.has_flag(f) == o.has_flag(f))
    }
}

fn parse_map_header(line: &str) -> Option<MapEntry> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?;
    let offset = it.next()?;
    let dev = it.next()?;
    let inode = it.next()?;
    let path = it.next().unwrap_or("").trim_start().to_owned();
    let (s, e) = range.split_once('-')?;
    let b = perms.as_bytes();
    if b.len() < 4 {
        return None;
    }
    let mut prot = 0;
    if b[0] == b'r' {
        prot |= libc::PROT_READ;
    }
    if b[1] == b'w' {
        prot |= libc::PROT_WRITE;
    }
    if b[2] == b'x' {
        prot |= libc::PROT_EXEC;
    }
    Some(MapEntry {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        prot,
        shared: b[3] == b's',
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: dev.to_owned(),
        inode: inode.parse().ok()?,
        path,
        flags: Vec::new(),
        anon_pages: 0,
    })
}

/// Reads `/proc/PID/smaps`.
pub fn maps(pid: i32) -> CoreResult<Vec<MapEntry>> {
    let text = read(&format!("/proc/{pid}/smaps"))?;
    let mut out: Vec<MapEntry> = Vec::new();
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(last) = out.last_mut() {
                last.flags = flags.split_whitespace().map(str::to_owned).collect();
            }
        } else if let Some(kb) = line
            .strip_prefix("Anonymous:")
            .or_else(|| line.strip_prefix("Swap:"))
        {
            if let Some(last) = out.last_mut() {
                let kb: u64 = kb.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                last.anon_pages += kb / 4;
            }
        } else if let Some(e) = parse_map_header(line) {
            out.push(e);
        }
    }
    Ok(out)
}

/// The mappings of `pid` from `/proc/PID/maps`, which unlike smaps does not walk the page
/// tables (for 1 GiB of memory smaps takes about 10 ms), without their `VmFlags`.
pub fn maps_without_flags(pid: i32) -> CoreResult<Vec<MapEntry>> {
    let text = read(&format!("/proc/{pid}/maps"))?;
    Ok(text.lines().filter_map(parse_map_header).collect())
}

/// [`maps_without_flags`], each mapping with the `VmFlags` (and anonymous pages) of the
/// same mapping in `known` (an earlier reading of smaps, sorted by address), and those
/// not in `known` (left without flags).
pub fn maps_with_known_flags(
    pid: i32,
    known: &[MapEntry],
) -> CoreResult<(Vec<MapEntry>, Vec<MapEntry>)> {
    let mut out = maps_without_flags(pid)?;
    let mut unknown = Vec::new();
    for e in &mut out {
        let i = known.partition_point(|k| k.start < e.start);
        match known.get(i) {
            Some(k) if k.same_mapping(e) => {
                e.flags.clone_from(&k.flags);
                e.anon_pages = k.anon_pages;
            }
            _ => unknown.push(e.clone()),
        }
    }
    Ok((out, unknown))
}

/// Fields of `/proc/PID/stat` that capture needs.
#[derive(Debug, Clone, Default)]
pub struct Stat {
    /// Parent pid (as seen in our namespace).
    pub ppid: i32,
    /// Memory layout fields.
    pub start_code: u64,
    #[allow(missing_docs)]
    pub end_code: u64,
    #[allow(missing_docs)]
    pub start_stack: u64,
    #[allow(missing_docs)]
    pub start_data: u64,
    #[allow(missing_docs)]
    pub end_data: u64,
    #[allow(missing_docs)]
    pub start_brk: u64,
    #[allow(missing_docs)]
    pub arg_start: u64,
    #[allow(missing_docs)]
    pub arg_end: u64,
    #[allow(missing_docs)]
    pub env_start: u64,
    #[allow(missing_docs)]
    pub env_end: u64,
}

/// Reads `/proc/PID/stat`.
pub fn stat(pid: i32) -> CoreResult<Stat> {
    let path = format!("/proc/{pid}/stat");
    let text = read(&path)?;
    let rest = text.rsplit_once(") ").map(|x| x.1).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse::<i64>().map_or(0, |v| v as u64))
        .collect();
    let field = |n: usize| f.get(n - 3).copied().unwrap_or(0);
    Ok(Stat {
        ppid: i32::try_from(field(4)).unwrap_or(0),
        start_code: field(26),
        end_code: field(27),
        start_stack: field(28),
        start_data: field(45),
        end_data: field(46),
        start_brk: field(47),
        arg_start: field(48),
        arg_end: field(49),
        env_start: field(50),
        env_end: field(51),
    })
}

/// A value from `/proc/PID/status` (or a task's status) by key.
pub fn status_field(pid_path: &str, key: &str) -> CoreResult<String> {
    let path = format!("{pid_path}/status");
    let text = read(&path)?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(':')))
        .unwrap_or("")
        .trim()
        .to_owned())
}

/// Pages of anonymous memory of process `pid`, resident (`RssAnon`) or swapped out
/// (`VmSwap`), from `/proc/PID/status`: what smaps' `Anonymous` and `Swap` add up to over
/// the private mappings, without its page walk.
pub fn anon_pages(pid: i32) -> CoreResult<u64> {
    let path = format!("/proc/{pid}/status");
    let text = read(&path)?;
    let kb = |key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Ok((kb("RssAnon:") + kb("VmSwap:")) / 4)
}

/// The innermost pid of a task (last `NSpid` entry): its id inside the job's namespace.
pub fn ns_pid(pid_path: &str) -> CoreResult<i32> {
    let v = status_field(pid_path, "NSpid")?;
    Ok(v.split_whitespace()
        .last()
        .and_then(|x| x.parse().ok())
        .unwrap_or(0))
}

/// Thread ids of a process, ascending, main thread first.
pub fn tasks(pid: i32) -> CoreResult<Vec<i32>> {
    let path = format!("/proc/{pid}/task");
    let mut tids: Vec<i32> = std::fs::read_dir(&path)
        .map_err(io_err(&path))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable_by_key(|&t| (t != pid, t));
    Ok(tids)
}

/// One open descriptor as `/proc` shows it.
#[derive(Debug, Clone)]
pub struct FdEntry {
    /// Number.
    pub fd: i32,
    /// Link target (`/path`, `pipe:[N]`, `socket:[N]`, `anon_inode:[x]`).
    pub target: String,
    /// `flags:` from fdinfo (octal; includes `O_CLOEXEC` for the descriptor flag).
    pub flags: i32,
    /// `pos:` from fdinfo.
    pub pos: u64,
    /// The whole fdinfo text (kind-specific fields).
    pub info: String,
}

/// The descriptor table of a process.
pub fn fds(pid: i32) -> CoreResult<Vec<FdEntry>> {
    let dir = format!("/proc/{pid}/fd");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))?.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let info_path = format!("/proc/{pid}/fdinfo/{fd}");
        let Ok(info) = std::fs::read_to_string(&info_path) else {
            continue;
        };
        let get = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(str::trim)
                .unwrap_or("0")
                .to_owned()
        };
        out.push(FdEntry {
            fd,
            target: target.to_string_lossy().into_owned(),
            flags: i32::from_str_radix(&get("flags:"), 8).unwrap_or(0),
            pos: get("pos:").parse().unwrap_or(0),
            info,
        });
    }
    out.sort_by_key(|e| e.fd);
    Ok(out)
}

/// `/proc/PID/auxv` as 64-bit words.
pub fn auxv(pid: i32) -> CoreResult<Vec<u64>> {
    let path = format!("/proc/{pid}/auxv");
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    Ok(bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// `/proc/PID/cmdline` split at NULs.
pub fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// A symlink under `/proc/PID` (`cwd`, `exe`).
pub fn link(pid: i32, name: &str) -> CoreResult<String> {
    let path = format!("/proc/{pid}/{name}");
    Ok(std::fs::read_link(&path)
        .map_err(io_err(&path))?
        .to_string_lossy()
        .into_owned())
}

/// One POSIX timer as listed in `/proc/PID/timers`.
#[derive(Debug, Clone, Default)]
pub struct TimerEntry {
    /// Timer id.
    pub id: i32,
    /// Signal number.
    pub signo: i32,
    /// `sigev_value`.
    pub value: u64,
    /// `SIGEV_*`.
    pub notify: i32,
    /// Target thread id (our view) for `SIGEV_THREAD_ID`.
    pub notify_tid: i32,
    /// Clock id.
    pub clock: i32,
}

/// Reads `/proc/PID/timers` (empty when the file is missing).
pub fn timers(pid: i32) -> Vec<TimerEntry> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/timers")) else {
        return Vec::new();
    };
    let mut out: Vec<TimerEntry> = Vec::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        match k.trim() {
            "ID" => out.push(TimerEntry {
                id: v.parse().unwrap_or(0),
                ..TimerEntry::default()
            }),
            "signal" => {
                if let (Some(t), Some((s, val))) = (out.last_mut(), v.split_once('/')) {
                    t.signo = s.parse().unwrap_or(0);
                    t.value = u64::from_str_radix(val, 16).unwrap_or(0);
                }
            }
            "notify" => {
                if let (Some(t), Some((kind, target))) = (out.last_mut(), v.split_once('/')) {
                    t.notify = match kind {
                        "thread" => libc::SIGEV_THREAD_ID,
                        "none" => libc::SIGEV_NONE,
                        _ => libc::SIGEV_SIGNAL,
                    };
                    t.notify_tid = target
                        .rsplit('.')
                        .next()
                        .and_then(|x| x.parse().ok())
                        .unwrap_or(0);
                }
            }
            "ClockID" => {
                if let Some(t) = out.last_mut() {
                    t.clock = v.parse().unwrap_or(0);
                }
            }
            _ => {}
        }
    }
    out
}

/// `/proc/PID/pagemap` entries for `[start, end)`, one u64 per page.
pub fn pagemap(pid: i32, start: u64, end: u64) -> CoreResult<Vec<u64>> {
    Pagemap::open(pid)?.entries(start, end)
}

/// `/proc/PID/pagemap`, kept open for reading many ranges (opening a `/proc` file costs
/// more than reading a few entries).
#[derive(Debug)]
pub struct Pagemap {
    file: std::fs::File,
    path: String,
}

impl Pagemap {
    /// Opens the pagemap of `pid`.
    pub fn open(pid: i32) -> CoreResult<Self> {
        let path = format!("/proc/{pid}/pagemap");
        let file = std::fs::File::open(&path).map_err(io_err(&path))?;
        Ok(Pagemap { file, path })
    }

    /// The open file (for `PAGEMAP_SCAN`).
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }

    /// The entries of the pages from `start` to `end`.
    pub fn entries(&self, start: u64, end: u64) -> CoreResult<Vec<u64>> {
        use std::os::unix::fs::FileExt;
        let pages = usize::try_from((end - start) / 4096).unwrap_or(0);
        let mut buf = vec![0u8; pages * 8];
        let mut done = 0;
        while done < buf.len() {
            let n = self
                .file
                .read_at(&mut buf[done..], (start / 4096) * 8 + done as u64)
                .map_err(io_err(&self.path))?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(buf
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }
}

/// Whether `/proc/PID` still exists.
pub fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Children of every thread of `pid` (from `/proc/PID/task/*/children`).
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|c| c.parse::<i32>().ok()),
            );
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Every descendant of `pid`, parents before children.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut queue = std::collections::VecDeque::from(children(pid));
    while let Some(p) = queue.pop_front() {
        if !out.contains(&p) {
            out.push(p);
            queue.extend(children(p));
        }
    }
    out
}

/// Process state letter and raw exit status (`/proc/PID/stat` fields 3 and 52).
pub fn state(pid: i32) -> Option<(char, i32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = text.rsplit_once(") ")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let exit = fields.get(52 - 3).and_then(|v| v.parse().ok()).unwrap_or(0);
    Some((state, exit))
}

/// The last entry of a `/proc/PID/status` id list (`NSpgid`, `NSsid`): the id in the
/// innermost pid namespace, 0 when it lies outside it.
pub fn ns_field(pid: i32, key: &str) -> i32 {
    status_field(&format!("/proc/{pid}"), key)
        .ok()
        .and_then(|v| v.split_whitespace().last().and_then(|x| x.parse().ok()))
        .unwrap_or(0)
}

/// A field of an fdinfo text (`key:` at the start of a line), trimmed.
pub fn info_field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

/// Parses a timerfd time `(secs, nanos)` into nanoseconds.
pub fn timespec_ns(v: &str) -> u64 {
    let inner = v.trim().trim_start_matches('(').trim_end_matches(')');
    let mut parts = inner
        .split(',')
        .map(|x| x.trim().parse::<u64>().unwrap_or(0));
    let secs = parts.next().unwrap_or(0);
    let nanos = parts.next().unwrap_or(0);
    secs * 1_000_000_000 + nanos
}

/// Registrations listed in an epoll fdinfo: (target fd, events, data).
pub fn epoll_watches(info: &str) -> Vec<(i32, u32, u64)> {
    info.lines()
        .filter_map(|l| {
            let l = l.strip_prefix("tfd:")?;
            let mut it = l.split_whitespace();
            let fd = it.next()?.parse().ok()?;
            let mut events = 0;
            let mut data = 0;
            while let Some(k) = it.next() {
                match k {
                    "events:" => events = u32::from_str_radix(it.next()?, 16).ok()?,
                    "data:" => data = u64::from_str_radix(it.next()?, 16).ok()?,
                    _ => {}
                }
            }
            Some((fd, events, data))
        })
        .collect()
}
