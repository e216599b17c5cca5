//! Process lifecycle in the kernel: which processes are traced, and the
//! tracepoints that follow forks, execs and exits (kernel side:
//! profiler-ebpf/src/processes.rs).

use std::path::Path;

use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData},
    programs::{TracePoint, trace_point::TracePointLink},
};
use profiler_common::{config, map_names};

/// `BPF_NOEXIST`: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

const TRACEFS: &str = "/sys/kernel/tracing";

#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error(
        "tracefs is not mounted and could not be mounted at {TRACEFS}: run `mount -t tracefs tracefs {TRACEFS}` as root"
    )]
    NoTracefs,
    #[error("cannot read tracepoint format {path}: {source}")]
    Format {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tracepoint {tracepoint} has no field {field}")]
    MissingField {
        tracepoint: &'static str,
        field: &'static str,
    },
    #[error("BPF map or program {0} is missing (build bug)")]
    Missing(&'static str),
    #[error("cannot update BPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot attach to tracepoint {tracepoint}: {source}")]
    Attach {
        tracepoint: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
}

/// (program, category, tracepoint) of the lifecycle programs.
const LIFECYCLE: [(&str, &str, &str); 2] = [
    ("process_exec", "sched", "sched_process_exec"),
    ("process_exit", "sched", "sched_process_exit"),
];
const FORK_FOLLOWING: [(&str, &str, &str); 5] = [
    ("process_fork", "sched", "sched_process_fork"),
    // A new child leaves the system call that made it (its registers are
    // its parent's, the call number included) before its first user
    // instruction. On these exits only, not raw_syscalls' every exit: that
    // one also ran on the uretprobe system call each allocator return makes
    // (Linux 6.11+), 47 ns a malloc.
    ("syscall_exit", "syscalls", "sys_exit_clone"),
    ("syscall_exit", "syscalls", "sys_exit_clone3"),
    ("syscall_exit", "syscalls", "sys_exit_fork"),
    ("syscall_exit", "syscalls", "sys_exit_vfork"),
];

/// Anonymous mmaps, munmap, mremap and brk (profiler-ebpf/src/mapped.rs).
const MAPPED_MEMORY: [(&str, &str, &str); 6] = [
    ("mmap_enter", "syscalls", "sys_enter_mmap"),
    ("mmap_exit", "syscalls", "sys_exit_mmap"),
    ("munmap_enter", "syscalls", "sys_enter_munmap"),
    ("mremap_enter", "syscalls", "sys_enter_mremap"),
    ("mremap_exit", "syscalls", "sys_exit_mremap"),
    ("brk_exit", "syscalls", "sys_exit_brk"),
];

/// Writes the tracepoint field offsets and attaches the lifecycle and
/// mapped-memory tracepoints; with `follow_children`, forks of traced
/// processes too. All of them act only for traced processes.
pub fn attach_lifecycle(
    ebpf: &mut Ebpf,
    follow_children: bool,
    follow_image: bool,
) -> Result<Vec<TracePointLink>, FollowError> {
    ensure_tracefs()?;
    let fork_child = field_offset("sched", "sched_process_fork", "child_pid")?;
    // Older kernels lack group_dead: the program then takes the exit of the
    // thread-group leader as the process's.
    let exit_group_dead =
        field_offset("sched", "sched_process_exit", "group_dead").unwrap_or(u32::MAX);
    // Python frame walks read the thread pointer from the task; without
    // it stacks stay native (the report says so per process).
    let fsbase = crate::kernel_btf::task_fsbase_offset().unwrap_or_else(|error| {
        tracing::warn!("Python frames are off: {error}");
        0
    });
    let mut config_map: Array<&mut MapData, u32> = Array::try_from(
        ebpf.map_mut(map_names::CONFIG)
            .ok_or(FollowError::Missing(map_names::CONFIG))?,
    )
    .map_err(|source| FollowError::Map {
        name: map_names::CONFIG,
        source,
    })?;
    for (slot, value) in [
        (config::FORK_CHILD_PID_OFFSET, fork_child),
        (config::EXIT_GROUP_DEAD_OFFSET, exit_group_dead),
        (config::FOLLOW_IMAGE, u32::from(follow_image)),
        (config::TASK_FSBASE_OFFSET, fsbase),
    ] {
        config_map
            .set(slot, value, 0)
            .map_err(|source| FollowError::Map {
                name: map_names::CONFIG,
                source,
            })?;
    }
    let forks: &[_] = if follow_children {
        &FORK_FOLLOWING
    } else {
        &[]
    };
    let mut links = Vec::new();
    let mut loaded = std::collections::BTreeSet::new();
    for (program, category, name) in LIFECYCLE.iter().chain(forks).chain(&MAPPED_MEMORY) {
        let tracepoint: &mut TracePoint = ebpf
            .program_mut(program)
            .and_then(|p| p.try_into().ok())
            .ok_or(FollowError::Missing(program))?;
        let attach_error = |source| FollowError::Attach {
            tracepoint: name,
            source,
        };
        // One program may serve several tracepoints; it is loaded once.
        if loaded.insert(*program) {
            tracepoint.load().map_err(attach_error)?;
        }
        let link = tracepoint.attach(category, name).map_err(attach_error)?;
        // Owned apart from the program, so teardown detaches them all at
        // once (each detach waits ~70 ms for the kernel here).
        links.push(tracepoint.take_link(link).map_err(attach_error)?);
    }
    Ok(links)
}

/// Marks `pid` as traced: its forks, exec and exit are reported.
pub fn trace(ebpf: &mut Ebpf, pid: u32) -> Result<(), FollowError> {
    traced_map(ebpf)?
        .insert(pid, 1, 0)
        .map_err(|source| FollowError::Map {
            name: map_names::TRACED,
            source,
        })
}

/// Marks `pid` as traced unless it is already (the kernel side traced it
/// at its fork): returns whether this call did.
pub fn trace_new(ebpf: &mut Ebpf, pid: u32) -> Result<bool, FollowError> {
    let map_error = |source| FollowError::Map {
        name: map_names::TRACED,
        source,
    };
    let mut traced = traced_map(ebpf)?;
    match traced.insert(pid, 1, BPF_NOEXIST) {
        Ok(()) => Ok(true),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
        {
            Ok(false)
        }
        Err(source) => Err(map_error(source)),
    }
}

/// Stops following `pid`: its forks, exec and exit are not reported.
pub fn untrace(ebpf: &mut Ebpf, pid: u32) {
    if let Ok(mut traced) = traced_map(ebpf) {
        let _ = traced.remove(&pid);
    }
}

fn traced_map(ebpf: &mut Ebpf) -> Result<BpfHashMap<&mut MapData, u32, u32>, FollowError> {
    BpfHashMap::try_from(
        ebpf.map_mut(map_names::TRACED)
            .ok_or(FollowError::Missing(map_names::TRACED))?,
    )
    .map_err(|source| FollowError::Map {
        name: map_names::TRACED,
        source,
    })
}

fn ensure_tracefs() -> Result<(), FollowError> {
    if Path::new(TRACEFS).join("events").exists() {
        return Ok(());
    }
    let (source, target, fstype) = (c"tracefs", c"/sys/kernel/tracing", c"tracefs");
    // SAFETY: valid NUL-terminated strings; a failure is reported below.
    let mounted = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    } == 0;
    if mounted {
        tracing::info!("mounted tracefs at {TRACEFS}");
        Ok(())
    } else {
        Err(FollowError::NoTracefs)
    }
}

/// A field's byte offset, from the tracepoint's format file: layouts differ
/// between kernels (sched_process_fork's child_pid is at 20 on 6.18, 44
/// where comm is an inline array).
fn field_offset(
    category: &str,
    tracepoint: &'static str,
    field: &'static str,
) -> Result<u32, FollowError> {
    let path = format!("{TRACEFS}/events/{category}/{tracepoint}/format");
    let text =
        std::fs::read_to_string(&path).map_err(|source| FollowError::Format { path, source })?;
    parse_field_offset(&text, field).ok_or(FollowError::MissingField { tracepoint, field })
}

fn parse_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';').map(str::trim);
        let declaration = parts.next()?.strip_prefix("field:")?;
        let name = declaration.rsplit([' ', '*']).next()?;
        let name = name.split('[').next()?;
        if name != field {
            return None;
        }
        parts.find_map(|p| p.strip_prefix("offset:")?.parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_offsets_in_format_files() {
        let format = "\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\
                      \tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;\n\
                      \tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n\
                      \tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n";
        assert_eq!(parse_field_offset(format, "child_pid"), Some(20));
        assert_eq!(parse_field_offset(format, "parent_pid"), Some(12));
        assert_eq!(parse_field_offset(format, "comm"), Some(8));
        assert_eq!(parse_field_offset(format, "pid"), None);
    }
}
