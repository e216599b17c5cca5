//! Field offsets of kernel structs, from the running kernel's BTF
//! (/sys/kernel/btf/vmlinux). The BPF programs are not CO-RE-relocated
//! (aya-ebpf has no field relocations), so the few kernel fields they read
//! get their offsets from here, passed in `CONFIG`.
//!
//! NB: a minimal reader of the BTF format (Documentation/bpf/btf.rst):
//! aya-obj parses BTF but keeps struct members private.

use std::{collections::HashMap, path::Path};

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read the kernel's BTF ({path}): {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel's BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("the kernel's BTF has no field {0}")]
    NoField(String),
}

struct Member {
    name: u32,
    ty: u32,
    bit_offset: u32,
}

enum Type {
    Aggregate {
        name: u32,
        members: Vec<Member>,
    },
    /// Typedefs and qualifiers, which name another type.
    Alias(u32),
    Other,
}

/// The types of a BTF blob, by id (id 0 is `void`).
pub struct KernelBtf {
    types: Vec<Type>,
    strings: Vec<u8>,
    by_name: HashMap<String, u32>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(BtfError::Malformed("truncated"))
}

impl KernelBtf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if data.get(0..2) != Some(&MAGIC.to_le_bytes()[..]) {
            return Err(BtfError::Malformed("bad magic (or not little-endian)"));
        }
        let header_len = u32_at(data, 4)? as usize;
        let field = |n: usize| -> Result<usize, BtfError> {
            Ok(header_len + u32_at(data, 8 + n * 4)? as usize)
        };
        let (type_off, type_len) = (field(0)?, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (field(2)?, u32_at(data, 20)? as usize);
        let strings = data
            .get(str_off..str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();
        let section = data
            .get(type_off..type_off + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let mut types = vec![Type::Other];
        let mut at = 0;
        while at < section.len() {
            let name = u32_at(section, at)?;
            let info = u32_at(section, at + 4)?;
            let size_or_type = u32_at(section, at + 8)?;
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let bitfields = info >> 31 != 0;
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = u32_at(section, m + 8)?;
                        members.push(Member {
                            name: u32_at(section, m)?,
                            ty: u32_at(section, m + 4)?,
                            bit_offset: if bitfields {
                                offset & 0xff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                    Type::Aggregate { name, members }
                }
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    Type::Alias(size_or_type)
                }
                _ => Type::Other,
            };
            at += match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                _ => 0,
            };
            types.push(ty);
        }
        let mut btf = Self {
            types,
            strings,
            by_name: HashMap::new(),
        };
        for (id, ty) in btf.types.iter().enumerate() {
            if let Type::Aggregate { name, .. } = ty
                && *name != 0
            {
                let name = btf.string(*name).to_owned();
                btf.by_name.entry(name).or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn string(&self, offset: u32) -> &str {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Follows typedefs and qualifiers to the type itself.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            match self.types.get(id as usize)? {
                Type::Alias(next) => id = *next,
                ty => return Some(ty),
            }
        }
        None
    }

    /// Byte offset of `path` (e.g. `["thread", "fsbase"]`) in struct
    /// `name`, through nested structs and anonymous unions.
    pub fn offset_of(&self, name: &str, path: &[&str]) -> Result<u32, BtfError> {
        let missing = || BtfError::NoField(format!("{name}.{}", path.join(".")));
        let mut id = *self.by_name.get(name).ok_or_else(missing)?;
        let mut bits = 0;
        for field in path {
            let (member_bits, member_ty) = self.find_member(id, field).ok_or_else(missing)?;
            bits += member_bits;
            id = member_ty;
        }
        if bits % 8 != 0 {
            return Err(missing());
        }
        Ok(bits / 8)
    }

    /// A member by name, looking into anonymous members as C does.
    fn find_member(&self, id: u32, field: &str) -> Option<(u32, u32)> {
        let Some(Type::Aggregate { members, .. }) = self.resolve(id) else {
            return None;
        };
        for member in members {
            if member.name == 0 {
                if let Some((bits, ty)) = self.find_member(member.ty, field) {
                    return Some((member.bit_offset + bits, ty));
                }
            } else if self.string(member.name) == field {
                return Some((member.bit_offset, member.ty));
            }
        }
        None
    }
}

/// Where the kernel keeps a task's user fs base (x86-64's thread
/// pointer): `task_struct.thread.fsbase`.
pub fn task_fsbase_offset() -> Result<u32, BtfError> {
    KernelBtf::from_sys_fs()?.offset_of("task_struct", &["thread", "fsbase"])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check that the running kernel's BTF gives offsets that fit the
    /// structs (the e2e Python tests prove the value by walking frames).
    #[test]
    fn finds_nested_fields_of_the_running_kernel() {
        let btf = KernelBtf::from_sys_fs().expect("kernel BTF");
        let thread = btf.offset_of("task_struct", &["thread"]).expect("thread");
        let fsbase = task_fsbase_offset().expect("fsbase");
        assert!(fsbase > thread && fsbase < thread + 64, "{thread} {fsbase}");
        // `pid` sits in the first 4 KiB of task_struct on every kernel.
        let pid = btf.offset_of("task_struct", &["pid"]).expect("pid");
        assert!(pid > 0 && pid < 4096, "{pid}");
        assert!(btf.offset_of("task_struct", &["no_such_field"]).is_err());
    }

    #[test]
    fn rejects_what_is_not_btf() {
        assert!(KernelBtf::parse(b"not btf at all").is_err());
        assert!(KernelBtf::parse(&[]).is_err());
    }
}
