//! The process's `[vdso]`: its identity (a restore needs the same one) and the `syscall`
//! instruction in it that injected calls use, so nothing is ever written into the program.

use stasis_sys::inject::find_syscall_insn;
use stasis_sys::mem;

use crate::error::{CoreError, CoreResult, SysContext};
use crate::proc::MapEntry;

/// Where the `syscall` instruction used for injection lives, and the vdso's identity.
#[derive(Debug, Clone)]
pub struct VdsoInfo {
    /// Address of a `syscall` instruction inside the process's `[vdso]`.
    pub syscall_insn: u64,
    /// blake3 of the vdso contents.
    pub blake3: String,
}

/// Finds the process's vdso and a `syscall` instruction in it.
pub fn vdso_info(pid: i32, maps: &[MapEntry]) -> CoreResult<VdsoInfo> {
    let no = |why: &str| CoreError::Unsupported {
        pid,
        what: "the address space".into(),
        why: why.into(),
    };
    let vdso = maps
        .iter()
        .find(|m| m.path == "[vdso]")
        .ok_or_else(|| no("it has no [vdso] mapping"))?;
    let len = usize::try_from(vdso.end - vdso.start).unwrap_or(0);
    let bytes =
        mem::read_vec(pid, vdso.start, len).ctx(|| format!("reading the vdso of process {pid}"))?;
    let off =
        find_syscall_insn(&bytes).ok_or_else(|| no("no syscall instruction found in its vdso"))?;
    Ok(VdsoInfo {
        syscall_insn: vdso.start + off as u64,
        blake3: blake3::hash(&bytes).to_hex().to_string(),
    })
}

/// The address of a `syscall` instruction in the process's vdso.
pub fn syscall_insn(pid: i32, maps: &[MapEntry]) -> CoreResult<u64> {
    Ok(vdso_info(pid, maps)?.syscall_insn)
}
