//! The memory mappings of a process with the kernel's flags of each, listed by a BPF
//! iterator program (`bpf_iter_task_vma`, kernel 6.1 and later for one process).
//!
//! `/proc/PID/smaps` is the only other place that shows a mapping's flags (`VmFlags`:
//! don't-copy, wipe-on-fork, no-reserve, ...), and it walks the page tables of every
//! mapping to count pages on the way: about 10 ms per GiB of resident memory. The
//! iterator reads the same flags from the kernel's mapping structures in microseconds. It
//! needs privileges (`CAP_BPF` with `CAP_PERFMON`, or `CAP_SYS_ADMIN`) and a kernel with
//! BTF; the program is built at run time from the offsets the kernel's BTF gives.

use std::io::Read as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::btf::{Btf, BtfError, FUNC};
use crate::error::{SysError, SysResult, check};

/// Why the program could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The kernel's type information lacks what the program reads.
    #[error(transparent)]
    Btf(#[from] BtfError),
    /// The kernel refused the program (no privileges, or its verifier said no: its log).
    #[error("{err}{log}")]
    Refused {
        /// The failed call.
        err: SysError,
        /// The verifier's last lines after `": "`, if it said anything.
        log: String,
    },
}

const PROG_LOAD: libc::c_long = 5;
const LINK_CREATE: libc::c_long = 28;
const ITER_CREATE: libc::c_long = 33;
const PROG_TYPE_TRACING: u32 = 26;
const TRACE_ITER: u32 = 28;
const FUNC_SEQ_WRITE: i32 = 127;
/// Bytes of one record the program writes: start, end, flags.
const RECORD: usize = 24;

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to `attach_btf_id`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
}

/// `union bpf_attr` for `BPF_LINK_CREATE` of an iterator.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    iter_info: u64,
    iter_info_len: u32,
    pad: u32,
}

/// `union bpf_attr` for `BPF_ITER_CREATE`.
#[repr(C)]
#[derive(Default)]
struct IterCreateAttr {
    link_fd: u32,
    flags: u32,
}

/// Makes the `bpf` call `cmd` with `attr`, whose success is a new descriptor.
fn bpf_fd<T>(cmd: libc::c_long, attr: &mut T, op: &'static str, pid: i32) -> SysResult<OwnedFd> {
    // SAFETY: `attr` is a live, fully initialized `repr(C)` struct laid out as the kernel's
    // `union bpf_attr` for `cmd` (no implicit padding), passed with its size; every pointer
    // in it (as u64) is to memory the caller keeps alive across this call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    let fd = check(ret, op, pid)?;
    // SAFETY: on success the call returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// One BPF instruction: opcode, registers, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let o = off.to_le_bytes();
    let i = imm.to_le_bytes();
    [code, dst | (src << 4), o[0], o[1], i[0], i[1], i[2], i[3]]
}

/// The offsets the program reads at, from the kernel's BTF.
struct Layout {
    /// `struct bpf_iter__task_vma`: `meta` and `vma`.
    ctx_meta: i16,
    ctx_vma: i16,
    /// `struct bpf_iter_meta`: `seq`.
    meta_seq: i16,
    /// `struct vm_area_struct`: `vm_start`, `vm_end`, `vm_flags`.
    start: i16,
    end: i16,
    flags: i16,
    /// The BTF id of the iterator's function, which the program attaches to.
    attach: u32,
}

impl Layout {
    fn of(btf: &Btf) -> Result<Layout, BtfError> {
        let off = |s: &str, m: &str| -> Result<i16, BtfError> {
            let o = btf.member_offset(s, m)?;
            i16::try_from(o).map_err(|_| BtfError::Missing(format!("{s}.{m} within reach")))
        };
        Ok(Layout {
            ctx_meta: off("bpf_iter__task_vma", "meta")?,
            ctx_vma: off("bpf_iter__task_vma", "vma")?,
            meta_seq: off("bpf_iter_meta", "seq")?,
            start: off("vm_area_struct", "vm_start")?,
            end: off("vm_area_struct", "vm_end")?,
            flags: off("vm_area_struct", "vm_flags")?,
            attach: btf.find(FUNC, "bpf_iter_task_vma")?,
        })
    }

    /// For each mapping: `bpf_seq_write(meta->seq, {vm_start, vm_end, vm_flags}, 24)`.
    fn program(&self) -> Vec<[u8; 8]> {
        const LDX_DW: u8 = 0x79;
        const STX_DW: u8 = 0x7b;
        const JEQ_IMM: u8 = 0x15;
        const MOV_IMM: u8 = 0xb7;
        const MOV_REG: u8 = 0xbf;
        const ADD_IMM: u8 = 0x07;
        const CALL: u8 = 0x85;
        const EXIT: u8 = 0x95;
        let rec = -(RECORD as i16);
        vec![
            insn(LDX_DW, 6, 1, self.ctx_meta, 0),
            insn(LDX_DW, 7, 1, self.ctx_vma, 0),
            // No mapping (the end of the walk): skip to the exit.
            insn(JEQ_IMM, 7, 0, 11, 0),
            insn(LDX_DW, 2, 7, self.start, 0),
            insn(STX_DW, 10, 2, rec, 0),
            insn(LDX_DW, 2, 7, self.end, 0),
            insn(STX_DW, 10, 2, rec + 8, 0),
            insn(LDX_DW, 2, 7, self.flags, 0),
            insn(STX_DW, 10, 2, rec + 16, 0),
            insn(LDX_DW, 1, 6, self.meta_seq, 0),
            insn(MOV_REG, 2, 10, 0, 0),
            insn(ADD_IMM, 2, 0, 0, i32::from(rec)),
            insn(MOV_IMM, 3, 0, 0, RECORD as i32),
            insn(CALL, 0, 0, 0, FUNC_SEQ_WRITE),
            insn(MOV_IMM, 0, 0, 0, 0),
            insn(EXIT, 0, 0, 0, 0),
        ]
    }
}

/// One mapping as the kernel keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelVma {
    /// First address.
    pub start: u64,
    /// Address after the last.
    pub end: u64,
    /// `vm_flags` (`VM_*` bits).
    pub flags: u64,
}

/// The iterator program, built for the running kernel (reading its BTF takes a few
/// milliseconds) and not loaded yet.
#[derive(Debug, Clone)]
pub struct VmaProgram {
    insns: Vec<[u8; 8]>,
    attach: u32,
}

impl VmaProgram {
    /// Builds the program from the running kernel's BTF.
    pub fn build() -> Result<VmaProgram, BpfError> {
        let layout = Layout::of(&Btf::kernel()?)?;
        Ok(VmaProgram {
            insns: layout.program(),
            attach: layout.attach,
        })
    }

    /// Loads the program. Its descriptor belongs to the descriptor table of the calling
    /// thread: list mappings from a thread that shares that table.
    pub fn load(&self) -> Result<VmaLister, BpfError> {
        let program = &self.insns;
        let license = c"Dual BSD/GPL";
        let load = |log: &mut [u8]| {
            let mut attr = ProgLoadAttr {
                prog_type: PROG_TYPE_TRACING,
                insn_cnt: program.len() as u32,
                insns: program.as_ptr() as u64,
                license: license.as_ptr() as u64,
                log_level: u32::from(!log.is_empty()),
                log_size: log.len() as u32,
                log_buf: if log.is_empty() {
                    0
                } else {
                    log.as_mut_ptr() as u64
                },
                expected_attach_type: TRACE_ITER,
                attach_btf_id: self.attach,
                ..ProgLoadAttr::default()
            };
            attr.prog_name[..9].copy_from_slice(b"stasis_vm");
            bpf_fd(PROG_LOAD, &mut attr, "BPF_PROG_LOAD", 0)
        };
        match load(&mut []) {
            Ok(prog) => Ok(VmaLister { prog }),
            Err(err) => {
                // Again with the verifier's log, to say why (or to load it after all, the
                // first try having failed for a passing reason such as a signal).
                let mut log = vec![0u8; 1 << 16];
                if let Ok(prog) = load(&mut log) {
                    return Ok(VmaLister { prog });
                }
                let text =
                    String::from_utf8_lossy(&log[..log.iter().position(|&b| b == 0).unwrap_or(0)])
                        .lines()
                        .rev()
                        .take(3)
                        .collect::<Vec<_>>()
                        .join(" / ");
                let log = if text.is_empty() {
                    text
                } else {
                    format!(": {text}")
                };
                Err(BpfError::Refused { err, log })
            }
        }
    }
}

/// A loaded iterator program listing one process's mappings ([`VmaLister::list`]).
#[derive(Debug)]
pub struct VmaLister {
    prog: OwnedFd,
}

impl VmaLister {
    /// The mappings of process `pid` (in the caller's pid namespace), in address order,
    /// at most `at_most` of them (more fails with `E2BIG`).
    ///
    /// The iterator is asked for the process (`pid`), not its main thread (`tid`): on a
    /// thread id, a listing longer than one read starts over from the middle once it has
    /// ended, without end (Linux 6.18). For a process the kernel goes on with the next
    /// thread that has a descriptor table of its own, listing the same mappings again: the
    /// reading stops where the addresses start over.
    pub fn list(&self, pid: i32, at_most: usize) -> SysResult<Vec<KernelVma>> {
        let fail = |errno| SysError::new("reading a BPF iterator", pid, errno);
        // `union bpf_iter_link_info`, its `task` member: tid, pid, pid_fd.
        let info: [u32; 4] = [0, pid as u32, 0, 0];
        let mut link = LinkCreateAttr {
            prog_fd: self.prog.as_raw_fd() as u32,
            attach_type: TRACE_ITER,
            iter_info: info.as_ptr() as u64,
            iter_info_len: std::mem::size_of_val(&info) as u32,
            ..LinkCreateAttr::default()
        };
        let link = bpf_fd(LINK_CREATE, &mut link, "BPF_LINK_CREATE", pid)?;
        let mut iter = IterCreateAttr {
            link_fd: link.as_raw_fd() as u32,
            flags: 0,
        };
        let mut iter = std::fs::File::from(bpf_fd(ITER_CREATE, &mut iter, "BPF_ITER_CREATE", pid)?);
        let word = |b: &[u8]| u64::from_ne_bytes(b.try_into().unwrap_or([0; 8]));
        let mut out: Vec<KernelVma> = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut held = 0;
        loop {
            let n = iter.read(&mut buf[held..]).map_err(|e| {
                fail(crate::Errno::from_raw(
                    e.raw_os_error().unwrap_or(libc::EIO),
                ))
            })?;
            if n == 0 {
                return if held == 0 {
                    Ok(out)
                } else {
                    Err(fail(crate::Errno::EIO))
                };
            }
            held += n;
            let whole = held / RECORD * RECORD;
            for r in buf[..whole].chunks_exact(RECORD) {
                let vma = KernelVma {
                    start: word(&r[0..8]),
                    end: word(&r[8..16]),
                    flags: word(&r[16..24]),
                };
                if out.last().is_some_and(|last| vma.start < last.end) {
                    return Ok(out);
                }
                if out.len() == at_most {
                    return Err(fail(crate::Errno::E2BIG));
                }
                out.push(vma);
            }
            buf.copy_within(whole..held, 0);
            held -= whole;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::ProbeMapping;

    #[test]
    fn the_program_is_built_from_the_kernels_offsets() {
        let layout = Layout::of(&Btf::kernel().unwrap()).unwrap();
        assert_eq!(layout.ctx_vma, layout.ctx_meta + 16, "meta, task, vma");
        let program = layout.program();
        // The jump over the body lands on `r0 = 0`.
        assert_eq!(program[2 + 1 + 11][0], 0xb7);
        assert_eq!(program.last().unwrap()[0], 0x95);
    }

    #[test]
    fn as_root_the_mappings_of_this_process_are_listed_in_order() {
        let lister = match VmaProgram::build().unwrap().load() {
            Ok(l) => l,
            Err(e) if !nix::unistd::geteuid().is_root() => {
                // Without privileges the kernel must refuse, and say so.
                assert!(matches!(e, BpfError::Refused { .. }), "{e}");
                return;
            }
            Err(e) => panic!("as root the iterator loads here: {e}"),
        };
        let me = std::process::id() as i32;
        let vmas = lister.list(me, 100_000).unwrap();
        assert!(vmas.len() > 5);
        assert!(vmas.windows(2).all(|w| w[0].end <= w[1].start));
        let local = 0u8;
        let stack = std::ptr::addr_of!(local) as u64;
        let holding = vmas
            .iter()
            .find(|v| v.start <= stack && stack < v.end)
            .unwrap();
        // VM_READ | VM_WRITE | VM_MAYWRITE.
        assert_eq!(holding.flags & 0x23, 0x23, "{holding:?}");
    }

    #[test]
    fn as_root_a_listing_of_many_reads_ends_and_names_each_mapping_once() {
        let Ok(lister) = VmaProgram::build().unwrap().load() else {
            assert!(!nix::unistd::geteuid().is_root());
            return;
        };
        // A thread with a descriptor table of its own, for which the kernel lists the
        // process's mappings once more.
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (done, done_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            crate::fd::own_table_with_stdio_only().unwrap();
            ready_tx.send(()).unwrap();
            let _ = done_rx.recv();
        });
        ready.recv().unwrap();
        // Far more mappings than one read gives (a page of flags each, unlike their
        // neighbours so that none merge).
        let probes: Vec<ProbeMapping> = (0..4000)
            .map(|i| {
                let advice = (i % 2 == 0).then_some(libc::MADV_DONTDUMP);
                ProbeMapping::anonymous(4096, 0, advice).unwrap()
            })
            .collect();
        let me = std::process::id() as i32;
        let vmas = lister.list(me, 100_000).unwrap();
        assert!(
            vmas.windows(2).all(|w| w[0].end <= w[1].start),
            "once, in order"
        );
        for (i, p) in probes.iter().enumerate() {
            // (One without advice may have merged with a neighbour of the same flags.)
            let at = vmas.partition_point(|v| v.end <= p.start());
            let v = vmas
                .get(at)
                .filter(|v| v.start <= p.start())
                .expect("listed");
            // VM_DONTDUMP.
            assert_eq!(v.flags & 0x400_0000 != 0, i % 2 == 0, "{v:?}");
        }
        assert_eq!(
            lister.list(me, 100).map_err(|e| e.errno),
            Err(crate::Errno::E2BIG)
        );
        done.send(()).unwrap();
        thread.join().unwrap();
    }
}
