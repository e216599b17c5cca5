//! Multi-uprobe links (`BPF_TRACE_UPROBE_MULTI`, Linux 6.6+): one link puts
//! a program on every offset of one file, filtered to one process.
//!
//! Why: a perf-event uprobe costs ~60 ms to attach and ~200 ms to detach
//! here (each registration waits for the kernel's RCU syncs under a global
//! lock), so the 19 probes of one process took over a second, and a
//! fork-heavy target could not be followed without freezing its children.
//! One multi link for a whole allocator family attaches in ~10 ms.
//!
//! aya 0.14 does not wrap these links, and a program for them must be loaded
//! with `expected_attach_type = BPF_TRACE_UPROBE_MULTI`, which aya's
//! `UProbe::load` cannot ask for. So the two allocator programs are loaded
//! here from memscope's object with aya-obj, relocated against the maps aya
//! created, and linked with the bpf syscall.

use std::{
    collections::HashSet,
    ffi::CString,
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use aya::{Ebpf, maps::Map};

/// The programs, by name in memscope's object.
pub const ENTRY_PROGRAM: &str = "alloc_enter";
pub const RETURN_PROGRAM: &str = "alloc_exit";
/// Entry and return in one program, for session links.
pub const SESSION_PROGRAM: &str = "alloc_session";
/// `SESSION_PROGRAM` recording nothing (`--empty-programs`).
pub const EMPTY_SESSION_PROGRAM: &str = "alloc_session_empty";
/// Stops a started command in `_exit`.
pub const EXIT_STOP_PROGRAM: &str = "exit_enter";

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_BTF_LOAD: libc::c_long = 18;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_KPROBE: u32 = 2;
const BPF_TRACE_UPROBE_MULTI: u32 = 48;
/// A multi-uprobe link whose program runs at entry and, unless it returned
/// non-zero there, at return too.
const BPF_TRACE_UPROBE_SESSION: u32 = 57;
const BPF_F_UPROBE_MULTI_RETURN: u32 = 1;
/// The first kernels with multi-uprobe links, and with session links.
const FIRST_KERNEL: (u32, u32) = (6, 6);
const FIRST_SESSION_KERNEL: (u32, u32) = (6, 13);

#[derive(Debug, thiserror::Error)]
pub enum MultiUprobeError {
    #[error("cannot parse memscope's BPF object: {0}")]
    Parse(String),
    #[error("cannot relocate BPF program {program}: {message}")]
    Relocate {
        program: &'static str,
        message: String,
    },
    #[error("BPF map {0} is missing (build bug)")]
    MissingMap(String),
    #[error("the kernel refused BPF program {program}: {source}{log}")]
    Load {
        program: &'static str,
        #[source]
        source: std::io::Error,
        log: String,
    },
    #[error("--empty-programs needs session links (Linux 6.13 or later); this kernel has none")]
    NoSessionLinks,
    #[error("cannot attach uprobes to {path}: {source}")]
    Link {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// `union bpf_attr` for BPF_PROG_LOAD, up to the fields used.
#[repr(C)]
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

/// `union bpf_attr` for BPF_BTF_LOAD.
#[repr(C)]
struct BtfLoadAttr {
    btf: u64,
    btf_log_buf: u64,
    btf_size: u32,
    btf_log_size: u32,
    btf_log_level: u32,
}

/// A program's BTF function and line records, which the kernel needs for
/// programs with callbacks (the Python walk's `bpf_loop`).
struct ProgramBtf<'a> {
    btf: &'a OwnedFd,
    function: &'a aya_obj::Function,
}

/// `union bpf_attr` for BPF_LINK_CREATE with its `uprobe_multi` member.
#[repr(C)]
struct UprobeMultiLinkAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    path: u64,
    offsets: u64,
    ref_ctr_offsets: u64,
    cookies: u64,
    cnt: u32,
    multi_flags: u32,
    pid: u32,
    _pad: u32,
}

/// memscope's uprobe programs, loaded for multi-uprobe links.
#[derive(Debug)]
pub struct MultiPrograms {
    allocator: AllocatorPrograms,
    /// The `_exit` stop of a command memscope started.
    exit_stop: OwnedFd,
}

#[derive(Debug)]
enum AllocatorPrograms {
    /// One session link per process and file (Linux 6.13+).
    Session(OwnedFd),
    /// An entry link and a return link.
    Pair { entry: OwnedFd, exit: OwnedFd },
}

/// One probe point of a link: a file offset and the cookie its program
/// reads (the allocator function, one of `alloc_kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbePoint {
    pub file_offset: u64,
    pub cookie: u64,
}

/// A multi-uprobe link: its probes go away when its last descriptor
/// closes (this one, or a copy: see `watchdog`).
#[derive(Debug)]
pub struct MultiLink(OwnedFd);

impl std::os::fd::AsFd for MultiLink {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// A new descriptor of BPF link `id`: a copy of any link, made by the
/// kernel (for links whose descriptor aya keeps to itself).
pub fn link_fd_by_id(id: u32) -> std::io::Result<OwnedFd> {
    const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
    // `union bpf_attr` for it: link_id, next_id, open_flags.
    let attr: [u32; 3] = [id, 0, 0];
    bpf(
        BPF_LINK_GET_FD_BY_ID,
        attr.as_ptr().cast(),
        size_of_val(&attr),
    )
}

/// Whether the running kernel has multi-uprobe links.
pub fn supported() -> bool {
    kernel_version().is_some_and(|version| version >= FIRST_KERNEL)
}

fn kernel_version() -> Option<(u32, u32)> {
    let mut uts: libc::utsname = unsafe {
        // SAFETY: utsname is plain bytes; all-zero is valid.
        std::mem::zeroed()
    };
    // SAFETY: uname fills the struct it is given.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return None;
    }
    // SAFETY: uname NUL-terminates release.
    let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) };
    parse_release(&release.to_string_lossy())
}

fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

impl MultiPrograms {
    /// Loads the entry and return programs of `object` (memscope's BPF
    /// object, whose maps `ebpf` has created); with `empty`, programs that
    /// record nothing (the bench's floor).
    pub fn load(ebpf: &Ebpf, object: &[u8], empty: bool) -> Result<Self, MultiUprobeError> {
        let sessions = kernel_version().is_some_and(|version| version >= FIRST_SESSION_KERNEL);
        if empty && !sessions {
            return Err(MultiUprobeError::NoSessionLinks);
        }
        let mut obj =
            aya_obj::Object::parse(object).map_err(|e| MultiUprobeError::Parse(e.to_string()))?;
        let btf = load_btf(&mut obj)?;
        let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
        let maps = std::mem::take(&mut obj.maps);
        let mut with_fds = Vec::new();
        for (name, map) in &maps {
            // Global-data sections the loader skipped have no kernel map.
            let Some(fd) = ebpf.map(name).and_then(map_fd).map(|fd| fd.as_raw_fd()) else {
                continue;
            };
            with_fds.push((name.as_str(), fd, map));
        }
        let relocate_error = |program| {
            move |e: aya_obj::relocation::EbpfRelocationError| MultiUprobeError::Relocate {
                program,
                message: e.to_string(),
            }
        };
        obj.relocate_maps(with_fds.into_iter(), &text_sections)
            .map_err(relocate_error(ENTRY_PROGRAM))?;
        obj.relocate_calls(&text_sections)
            .map_err(relocate_error(ENTRY_PROGRAM))?;
        obj.sanitize_functions(aya::features());
        let load = |name: &'static str, attach_type| -> Result<OwnedFd, MultiUprobeError> {
            let program = obj
                .programs
                .get(name)
                .ok_or_else(|| MultiUprobeError::MissingMap(name.into()))?;
            let function =
                obj.functions
                    .get(&program.function_key())
                    .ok_or(MultiUprobeError::Relocate {
                        program: name,
                        message: "no code".into(),
                    })?;
            let btf = btf.as_ref().map(|btf| ProgramBtf { btf, function });
            load_program(name, &function.instructions, attach_type, btf)
        };
        let allocator = if empty {
            AllocatorPrograms::Session(load(EMPTY_SESSION_PROGRAM, BPF_TRACE_UPROBE_SESSION)?)
        } else if sessions {
            AllocatorPrograms::Session(load(SESSION_PROGRAM, BPF_TRACE_UPROBE_SESSION)?)
        } else {
            AllocatorPrograms::Pair {
                entry: load(ENTRY_PROGRAM, BPF_TRACE_UPROBE_MULTI)?,
                exit: load(RETURN_PROGRAM, BPF_TRACE_UPROBE_MULTI)?,
            }
        };
        Ok(Self {
            allocator,
            exit_stop: load(EXIT_STOP_PROGRAM, BPF_TRACE_UPROBE_MULTI)?,
        })
    }

    /// Puts the `_exit` stop on `point` of `path`, for process `pid`.
    pub fn attach_exit_stop(
        &self,
        path: &Path,
        point: ProbePoint,
        pid: u32,
    ) -> Result<MultiLink, MultiUprobeError> {
        link(
            &self.exit_stop,
            BPF_TRACE_UPROBE_MULTI,
            path,
            &[point],
            pid,
            0,
        )
    }

    /// Puts the programs on `entries` (and `returns`, a subset of their
    /// offsets) of `path`, for process `pid` (0: every process).
    /// NB: a pair links its returns first. A call caught between the two
    /// then only misses its return (counted); the other order would leave
    /// an entry that no return consumes, blocking the thread's slot.
    pub fn attach(
        &self,
        path: &Path,
        entries: &[ProbePoint],
        returns: &[ProbePoint],
        pid: u32,
    ) -> Result<Vec<MultiLink>, MultiUprobeError> {
        match &self.allocator {
            // The session program asks for the returns it needs.
            AllocatorPrograms::Session(program) => Ok(vec![link(
                program,
                BPF_TRACE_UPROBE_SESSION,
                path,
                entries,
                pid,
                0,
            )?]),
            AllocatorPrograms::Pair { entry, exit } => Ok(vec![
                link(
                    exit,
                    BPF_TRACE_UPROBE_MULTI,
                    path,
                    returns,
                    pid,
                    BPF_F_UPROBE_MULTI_RETURN,
                )?,
                link(entry, BPF_TRACE_UPROBE_MULTI, path, entries, pid, 0)?,
            ]),
        }
    }
}

fn bpf(command: libc::c_long, attr: *const u8, size: usize) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` points to `size` initialised bytes laid out as the
    // kernel's `union bpf_attr` for `command`.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, command, attr, size) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Loads the object's BTF into the kernel, as aya does for the programs it
/// loads itself.
fn load_btf(obj: &mut aya_obj::Object) -> Result<Option<OwnedFd>, MultiUprobeError> {
    let Some(features) = aya::features().btf() else {
        return Ok(None);
    };
    let btf = obj
        .fixup_and_sanitize_btf(features)
        .map_err(|e| MultiUprobeError::Parse(format!("BTF: {e}")))?;
    let Some(btf) = btf else {
        return Ok(None);
    };
    let bytes = btf.to_bytes();
    let attr = BtfLoadAttr {
        btf: bytes.as_ptr() as u64,
        btf_log_buf: 0,
        btf_size: bytes.len() as u32,
        btf_log_size: 0,
        btf_log_level: 0,
    };
    bpf(
        BPF_BTF_LOAD,
        (&raw const attr).cast(),
        size_of::<BtfLoadAttr>(),
    )
    .map(Some)
    .map_err(|source| MultiUprobeError::Load {
        program: "(BTF)",
        source,
        log: String::new(),
    })
}

fn load_program(
    name: &'static str,
    instructions: &[aya_obj::generated::bpf_insn],
    attach_type: u32,
    btf: Option<ProgramBtf<'_>>,
) -> Result<OwnedFd, MultiUprobeError> {
    let func_info = btf
        .as_ref()
        .map(|b| b.function.func_info.func_info_bytes())
        .unwrap_or_default();
    let line_info = btf
        .as_ref()
        .map(|b| b.function.line_info.line_info_bytes())
        .unwrap_or_default();
    const LICENSE: &std::ffi::CStr = c"GPL";
    let mut prog_name = [0u8; 16];
    for (slot, byte) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *slot = byte;
    }
    let attempt = |log: &mut Vec<u8>| {
        let attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_KPROBE,
            insn_cnt: instructions.len() as u32,
            insns: instructions.as_ptr() as u64,
            license: LICENSE.as_ptr() as u64,
            log_level: u32::from(!log.is_empty()),
            log_size: log.len() as u32,
            log_buf: if log.is_empty() {
                0
            } else {
                log.as_mut_ptr() as u64
            },
            kern_version: 0,
            prog_flags: 0,
            prog_name,
            prog_ifindex: 0,
            expected_attach_type: attach_type,
            prog_btf_fd: btf.as_ref().map_or(0, |b| b.btf.as_raw_fd() as u32),
            func_info_rec_size: btf
                .as_ref()
                .map_or(0, |b| b.function.func_info_rec_size as u32),
            func_info: if func_info.is_empty() {
                0
            } else {
                func_info.as_ptr() as u64
            },
            func_info_cnt: btf.as_ref().map_or(0, |b| b.function.func_info.num_info),
            line_info_rec_size: btf
                .as_ref()
                .map_or(0, |b| b.function.line_info_rec_size as u32),
            line_info: if line_info.is_empty() {
                0
            } else {
                line_info.as_ptr() as u64
            },
            line_info_cnt: btf.as_ref().map_or(0, |b| b.function.line_info.num_info),
            attach_btf_id: 0,
        };
        bpf(
            BPF_PROG_LOAD,
            (&raw const attr).cast(),
            size_of::<ProgLoadAttr>(),
        )
    };
    attempt(&mut Vec::new()).or_else(|_| {
        // Again with the verifier's log, for the error.
        let mut log = vec![0u8; 1 << 20];
        attempt(&mut log).map_err(|source| {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            MultiUprobeError::Load {
                program: name,
                source,
                log: if tail.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (verifier: {})",
                        tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
                    )
                },
            }
        })
    })
}

fn link(
    program: &OwnedFd,
    attach_type: u32,
    path: &Path,
    points: &[ProbePoint],
    pid: u32,
    flags: u32,
) -> Result<MultiLink, MultiUprobeError> {
    let link_error = |source| MultiUprobeError::Link {
        path: path.display().to_string(),
        source,
    };
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| link_error(std::io::ErrorKind::InvalidInput.into()))?;
    let offsets: Vec<u64> = points.iter().map(|p| p.file_offset).collect();
    let cookies: Vec<u64> = points.iter().map(|p| p.cookie).collect();
    let attr = UprobeMultiLinkAttr {
        prog_fd: program.as_fd().as_raw_fd() as u32,
        target_fd: 0,
        attach_type,
        flags: 0,
        path: c_path.as_ptr() as u64,
        offsets: offsets.as_ptr() as u64,
        ref_ctr_offsets: 0,
        cookies: cookies.as_ptr() as u64,
        cnt: points.len() as u32,
        multi_flags: flags,
        pid,
        _pad: 0,
    };
    bpf(
        BPF_LINK_CREATE,
        (&raw const attr).cast(),
        size_of::<UprobeMultiLinkAttr>(),
    )
    .map(MultiLink)
    .map_err(link_error)
}

/// The descriptor of a map aya created.
pub(crate) fn map_fd(map: &Map) -> Option<std::os::fd::BorrowedFd<'_>> {
    let data = match map {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::RingBuf(d)
        | Map::StackTraceMap(d)
        | Map::Queue(d)
        | Map::Stack(d)
        | Map::BloomFilter(d)
        | Map::LpmTrie(d)
        | Map::PerfEventArray(d)
        | Map::ProgramArray(d)
        | Map::Unsupported(d) => d,
        _ => return None,
    };
    Some(data.fd().as_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_parse() {
        assert_eq!(parse_release("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(parse_release("6.1.0-27-cloud-amd64"), Some((6, 1)));
        assert_eq!(parse_release("5.15.0"), Some((5, 15)));
        assert_eq!(parse_release("garbage"), None);
        assert!((6, 18) >= FIRST_KERNEL && (6, 1) < FIRST_KERNEL);
    }

    #[test]
    fn attrs_match_the_kernel_layout() {
        // offsetof(union bpf_attr, link_create.uprobe_multi.pid) is 56.
        assert_eq!(std::mem::offset_of!(UprobeMultiLinkAttr, path), 16);
        assert_eq!(std::mem::offset_of!(UprobeMultiLinkAttr, pid), 56);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, prog_name), 48);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, expected_attach_type), 68);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, func_info), 80);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, line_info), 96);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, attach_btf_id), 108);
    }
}
