//! Just enough of the BPF Type Format (BTF) to find, in the running kernel's own type
//! information (`/sys/kernel/btf/vmlinux`), a type's id and the byte offset of a member
//! of a structure: what [`crate::bpf`] needs to build a program that reads kernel
//! structures whose layout differs between kernel builds.

const MAGIC: u16 = 0xeb9f;

/// A structure (`BTF_KIND_STRUCT`).
pub const STRUCT: u32 = 4;
const UNION: u32 = 5;
const TYPEDEF: u32 = 8;
const VOLATILE: u32 = 9;
const CONST: u32 = 10;
const RESTRICT: u32 = 11;
/// A function (what a tracing program attaches to).
pub const FUNC: u32 = 12;
const TYPE_TAG: u32 = 18;

/// Parsed type information: where each type starts, to look types up by id.
pub struct Btf {
    data: Vec<u8>,
    strings: usize,
    strings_len: usize,
    /// Byte offset of each type's record, by type id - 1.
    starts: Vec<usize>,
}

/// What went wrong reading type information.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// Not BTF, or a record this module cannot size.
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    /// A named type or member the running kernel does not have.
    #[error("the kernel's BTF has no {0}")]
    Missing(String),
}

fn u32_at(d: &[u8], at: usize) -> Option<u32> {
    d.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl Btf {
    /// Reads the BTF blob `data` (little-endian, as on x86_64).
    pub fn parse(data: Vec<u8>) -> Result<Btf, BtfError> {
        let bad = BtfError::Malformed;
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err(bad("no BTF magic"));
        }
        let field = |n: usize| u32_at(&data, 4 + 4 * n).map(|v| v as usize);
        let (hdr, type_off, type_len, str_off, str_len) = (
            field(0).ok_or(bad("short header"))?,
            field(1).ok_or(bad("short header"))?,
            field(2).ok_or(bad("short header"))?,
            field(3).ok_or(bad("short header"))?,
            field(4).ok_or(bad("short header"))?,
        );
        let types = hdr + type_off;
        let strings = hdr + str_off;
        if types + type_len > data.len() || strings + str_len > data.len() {
            return Err(bad("sections past the end"));
        }
        let mut starts = Vec::new();
        let mut at = types;
        while at < types + type_len {
            let info = u32_at(&data, at + 4).ok_or(bad("short type record"))?;
            let vlen = (info & 0xffff) as usize;
            let extra = match (info >> 24) & 0x1f {
                2 | 7..=12 | 16 | 18 => 0,
                1 | 14 | 17 => 4,
                3 => 12,
                4 | 5 | 15 | 19 => 12 * vlen,
                6 | 13 => 8 * vlen,
                _ => return Err(bad("a type kind this reader does not know")),
            };
            starts.push(at);
            at += 12 + extra;
        }
        Ok(Btf {
            data,
            strings,
            strings_len: str_len,
            starts,
        })
    }

    /// Reads the running kernel's BTF.
    pub fn kernel() -> Result<Btf, BtfError> {
        let data = std::fs::read("/sys/kernel/btf/vmlinux")
            .map_err(|e| BtfError::Missing(format!("/sys/kernel/btf/vmlinux ({e})")))?;
        Btf::parse(data)
    }

    fn name(&self, off: u32) -> &[u8] {
        let off = off as usize;
        if off >= self.strings_len {
            return b"";
        }
        let s = &self.data[self.strings + off..self.strings + self.strings_len];
        &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]
    }

    /// (name offset, info, size-or-type) of type `id`.
    fn record(&self, id: u32) -> Option<(u32, u32, u32)> {
        let at = *self.starts.get((id as usize).checked_sub(1)?)?;
        Some((
            u32_at(&self.data, at)?,
            u32_at(&self.data, at + 4)?,
            u32_at(&self.data, at + 8)?,
        ))
    }

    /// The id of the type of kind `kind` (e.g. [`FUNC`]) named `name`.
    pub fn find(&self, kind: u32, name: &str) -> Result<u32, BtfError> {
        (1..=self.starts.len() as u32)
            .find(|&id| {
                self.record(id).is_some_and(|(n, info, _)| {
                    (info >> 24) & 0x1f == kind && self.name(n) == name.as_bytes()
                })
            })
            .ok_or_else(|| BtfError::Missing(format!("type {name}")))
    }

    /// The type id `id` names once typedefs and qualifiers are looked through.
    fn resolve(&self, mut id: u32) -> Option<u32> {
        for _ in 0..32 {
            let (_, info, next) = self.record(id)?;
            match (info >> 24) & 0x1f {
                TYPEDEF | VOLATILE | CONST | RESTRICT | TYPE_TAG => id = next,
                _ => return Some(id),
            }
        }
        None
    }

    /// The byte offset of member `member` in structure or union `id`, looking into
    /// anonymous structures and unions (`None` when it has none, or is a bit field).
    fn offset_in(&self, id: u32, member: &str, depth: u32) -> Option<u32> {
        let id = self.resolve(id)?;
        let (_, info, _) = self.record(id)?;
        let kind = (info >> 24) & 0x1f;
        if depth > 8 || !(kind == STRUCT || kind == UNION) {
            return None;
        }
        let at = self.starts[id as usize - 1] + 12;
        let bitfields = info >> 31 == 1;
        for i in 0..(info & 0xffff) as usize {
            let m = at + 12 * i;
            let (name, ty, off) = (
                u32_at(&self.data, m)?,
                u32_at(&self.data, m + 4)?,
                u32_at(&self.data, m + 8)?,
            );
            let bits = if bitfields { off & 0xff_ffff } else { off };
            if bitfields && off >> 24 != 0 || bits % 8 != 0 {
                continue;
            }
            if name == 0 {
                if let Some(inner) = self.offset_in(ty, member, depth + 1) {
                    return Some(bits / 8 + inner);
                }
            } else if self.name(name) == member.as_bytes() {
                return Some(bits / 8);
            }
        }
        None
    }

    /// The byte offset of `member` in the structure named `structure`.
    pub fn member_offset(&self, structure: &str, member: &str) -> Result<u32, BtfError> {
        let id = self.find(STRUCT, structure)?;
        self.offset_in(id, member, 0)
            .ok_or_else(|| BtfError::Missing(format!("member {member} in struct {structure}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernels_mapping_structure_is_found() {
        let btf = Btf::kernel().expect("this machine's kernel has BTF");
        assert!(btf.starts.len() > 1000);
        let start = btf.member_offset("vm_area_struct", "vm_start").unwrap();
        let end = btf.member_offset("vm_area_struct", "vm_end").unwrap();
        let flags = btf.member_offset("vm_area_struct", "vm_flags").unwrap();
        assert_eq!(end, start + 8);
        assert!(
            flags > end && flags.is_multiple_of(8),
            "vm_flags at {flags}"
        );
        assert!(btf.find(FUNC, "bpf_iter_task_vma").is_ok());
        assert!(matches!(
            btf.member_offset("vm_area_struct", "no_such_member"),
            Err(BtfError::Missing(_))
        ));
    }

    #[test]
    fn a_blob_that_is_not_btf_is_refused() {
        assert!(matches!(
            Btf::parse(vec![0; 64]),
            Err(BtfError::Malformed(_))
        ));
        let mut data = std::fs::read("/sys/kernel/btf/vmlinux").unwrap();
        data.truncate(100);
        assert!(matches!(Btf::parse(data), Err(BtfError::Malformed(_))));
    }
}
