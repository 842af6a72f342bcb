//! Rebuilding an address space: tear down what the child inherited, move the vdso and vvar
//! to their saved addresses, map and fill every saved mapping, restore the mm fields.

use stasis_image::OpenGeneration;
use stasis_image::manifest::{Advice, ProcessImage, Vma, VmaKind};
use stasis_sys::mem;

use super::child::Child;
use super::lazy::LazyPlan;
use super::stage::Staged;
use crate::error::{CoreError, CoreResult};
use crate::proc;

const TASK_SIZE: u64 = 0x7fff_ffff_f000;
const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;

/// Finds `len` bytes of address space free in the image and outside `avoid`.
pub(super) fn free_area(vmas: &[Vma], avoid: &[(u64, u64)], len: u64) -> CoreResult<u64> {
    let busy = |a: u64| {
        vmas.iter()
            .map(|v| (v.start, v.end))
            .chain(avoid.iter().copied())
            .any(|(s, e)| a < e && s < a + len)
    };
    let mut addr = 0x1_0000_0000u64;
    while addr + len < TASK_SIZE {
        if !busy(addr) {
            return Ok(addr);
        }
        addr += 0x4000_0000;
    }
    Err(CoreError::Incompatible(
        "no free address range for the restorer's scratch memory".into(),
    ))
}

fn is_special(kind: VmaKind) -> bool {
    matches!(
        kind,
        VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock | VmaKind::Vsyscall
    )
}

/// Unmaps everything the child inherited except `[vvar]`, `[vvar_vclock]` and `[vdso]`, and
/// moves those to the saved addresses (through a free area, as the old and new places may
/// overlap). The `syscall` instruction used for injection moves with the vdso.
pub(super) fn teardown_and_move_specials(
    c: &mut Child,
    p: &ProcessImage,
    vdso_off: u64,
) -> CoreResult<()> {
    let cur = proc::maps(c.pid)?;
    let specials: Vec<_> = cur
        .iter()
        .filter(|m| matches!(m.path.as_str(), "[vvar]" | "[vvar_vclock]" | "[vdso]"))
        .cloned()
        .collect();
    let lo = specials.iter().map(|m| m.start).min().unwrap_or(0);
    let hi = specials.iter().map(|m| m.end).max().unwrap_or(0);
    c.call(
        "unmapping the restorer's memory",
        libc::SYS_munmap,
        &[0, lo],
    )?;
    c.call(
        "unmapping the restorer's memory",
        libc::SYS_munmap,
        &[hi, TASK_SIZE - hi],
    )?;
    let saved = |name: &str| {
        p.vmas.iter().find(|v| {
            matches!(
                (v.kind, name),
                (VmaKind::Vvar, "[vvar]")
                    | (VmaKind::VvarVclock, "[vvar_vclock]")
                    | (VmaKind::Vdso, "[vdso]")
            )
        })
    };
    for m in &specials {
        let s = saved(&m.path).ok_or_else(|| {
            CoreError::Incompatible(format!(
                "this kernel has a {} mapping the image lacks",
                m.path
            ))
        })?;
        if s.end - s.start != m.end - m.start {
            return Err(CoreError::Incompatible(format!(
                "{} differs in size from the image's",
                m.path
            )));
        }
    }
    let temp = free_area(&p.vmas, &[(lo, hi)], hi - lo)?;
    let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
    for step in 0..2 {
        for m in &specials {
            let len = m.end - m.start;
            let (from, to) = if step == 0 {
                (m.start, temp + (m.start - lo))
            } else {
                (temp + (m.start - lo), saved(&m.path).map_or(0, |s| s.start))
            };
            c.call(
                "moving the vdso and vvar",
                libc::SYS_mremap,
                &[from, len, len, flags, to],
            )?;
            if m.path == "[vdso]" {
                c.inj.set_insn(to + vdso_off);
            }
        }
    }
    Ok(())
}

/// Maps every saved mapping at its address and fills its saved pages, except in the
/// mappings `lazy` takes (left empty, for lazy loading).
pub(super) fn map_memory(
    c: &mut Child,
    image: &mut OpenGeneration,
    p: &ProcessImage,
    st: &Staged,
    mut lazy: Option<&mut LazyPlan>,
) -> CoreResult<()> {
    let mut data = Vec::new();
    for v in p.vmas.iter().filter(|v| !is_special(v.kind)) {
        let len = v.end - v.start;
        if let (VmaKind::SysvShm, Some(id)) = (v.kind, v.sysv) {
            attach_sysv(c, v, id)?;
            continue;
        }
        // The runs to fill now: all of them, or those lazy loading cannot leave.
        let now: Vec<_> = match lazy.as_deref_mut() {
            Some(plan) if plan.takes(v) => plan.add(v, |i| image.manifest.chunks.chunk_len(i)),
            _ => v.pages.iter().collect(),
        };
        for run in &now {
            image.read_ahead(run.chunk);
        }
        let fill = !now.is_empty();
        let prot = if fill {
            v.prot | libc::PROT_READ | libc::PROT_WRITE
        } else {
            v.prot
        };
        let mut flags = libc::MAP_FIXED
            | if v.shared {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE
            };
        if v.growsdown {
            flags |= libc::MAP_GROWSDOWN;
        }
        if v.noreserve {
            flags |= libc::MAP_NORESERVE;
        }
        let fd: i64 = match (&v.file, v.shmem) {
            (_, Some(obj)) => i64::from(st.shmem[obj as usize]),
            (Some(id), None) => i64::from(st.maps[&id.path]),
            (None, None) => {
                flags |= libc::MAP_ANONYMOUS;
                -1
            }
        };
        let offset = if fd >= 0 { v.offset } else { 0 };
        let what = format!("mapping {:#x}-{:#x}", v.start, v.end);
        let got = c.call(
            &what,
            libc::SYS_mmap,
            &[v.start, len, prot as u64, flags as u64, fd as u64, offset],
        )?;
        if got != v.start {
            return Err(CoreError::Incompatible(format!(
                "{what} landed at {got:#x}"
            )));
        }
        for run in now {
            image
                .with_chunk(run.chunk, &mut data, |bytes| {
                    mem::write(c.pid, run.addr, bytes)
                })?
                .map_err(|source| CoreError::Sys {
                    context: format!("filling memory at {:#x}", run.addr),
                    source,
                })?;
        }
        if prot != v.prot {
            c.call(&what, libc::SYS_mprotect, &[v.start, len, v.prot as u64])?;
        }
        give_advice(c, v)?;
    }
    Ok(())
}

/// Gives mapping `v` the `madvise` advice it had. Huge-page advice is a hint: a kernel
/// without transparent huge pages refuses it (`EINVAL`), and the mapping goes without.
fn give_advice(c: &mut Child, v: &Vma) -> CoreResult<()> {
    for &a in &v.advice {
        let (advice, name) = match a {
            Advice::DontFork => (libc::MADV_DONTFORK, "MADV_DONTFORK"),
            Advice::WipeOnFork => (libc::MADV_WIPEONFORK, "MADV_WIPEONFORK"),
            Advice::DontDump => (libc::MADV_DONTDUMP, "MADV_DONTDUMP"),
            Advice::HugePage => (libc::MADV_HUGEPAGE, "MADV_HUGEPAGE"),
            Advice::NoHugePage => (libc::MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE"),
        };
        let what = format!("giving mapping {:#x}-{:#x} {name}", v.start, v.end);
        let done = c.call(
            &what,
            libc::SYS_madvise,
            &[v.start, v.end - v.start, advice as u64],
        );
        match done {
            Err(_) if matches!(a, Advice::HugePage | Advice::NoHugePage) => {
                tracing::debug!(start = v.start, advice = name, "huge-page advice refused");
            }
            other => {
                other?;
            }
        }
    }
    Ok(())
}

/// Attaches SysV segment `id` at the mapping's address (the mapping that starts the segment
/// attaches it whole; later pieces of it only get their protection).
fn attach_sysv(c: &mut Child, v: &Vma, id: i32) -> CoreResult<()> {
    let what = format!("attaching SysV segment {id} at {:#x}", v.start);
    if v.offset == 0 {
        let flags = if v.prot & libc::PROT_WRITE == 0 {
            libc::SHM_RDONLY
        } else {
            0
        };
        let got = c.call(&what, libc::SYS_shmat, &[id as u64, v.start, flags as u64])?;
        if got != v.start {
            return Err(CoreError::Incompatible(format!(
                "{what}: it landed at {got:#x}"
            )));
        }
    }
    c.call(
        &what,
        libc::SYS_mprotect,
        &[v.start, v.end - v.start, v.prot as u64],
    )?;
    Ok(())
}

/// Restores exe, cmdline, environ, auxv and brk with `PR_SET_MM_MAP`.
pub(super) fn set_mm(c: &mut Child, p: &ProcessImage, exe_fd: i32) -> CoreResult<()> {
    let auxv_bytes: Vec<u8> = p.auxv.iter().flat_map(|w| w.to_le_bytes()).collect();
    let auxv = c.put(1024, &auxv_bytes)?;
    let m = &p.mm;
    let mut map: Vec<u8> = [
        m.start_code,
        m.end_code,
        m.start_data,
        m.end_data,
        m.start_brk,
        m.brk,
        m.start_stack,
        m.arg_start,
        m.arg_end,
        m.env_start,
        m.env_end,
        auxv,
    ]
    .iter()
    .flat_map(|w| w.to_le_bytes())
    .collect();
    map.extend_from_slice(&u32::try_from(auxv_bytes.len()).unwrap_or(0).to_le_bytes());
    map.extend_from_slice(&exe_fd.to_le_bytes());
    let addr = c.put(0, &map)?;
    c.call(
        "restoring exe, cmdline, environ, auxv and brk (PR_SET_MM_MAP)",
        libc::SYS_prctl,
        &[PR_SET_MM, PR_SET_MM_MAP, addr, map.len() as u64, 0],
    )?;
    Ok(())
}
