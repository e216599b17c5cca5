//! The floor under every uprobe tracer, measured: perf-event uprobes with
//! no BPF program at exactly the sites memscope chooses (read from its
//! report.json: the entry probe's offset, and a return probe at the same
//! site where memscope has one). What the target pays under them is the
//! traps alone; memscope / bare traps is what its programs cost above that.

use std::{
    ffi::CString,
    os::fd::{FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};

/// One of memscope's probes, as its report.json lists it.
#[derive(Clone, Debug)]
pub struct Probe {
    pub function: String,
    pub library: PathBuf,
    pub entry_offset: u64,
    pub return_probe: bool,
}

/// memscope's probes from a report.json it wrote.
pub fn probes_of(report_json: &Path) -> Result<Vec<Probe>, String> {
    let text = std::fs::read_to_string(report_json)
        .map_err(|e| format!("cannot read {}: {e}", report_json.display()))?;
    let report: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", report_json.display()))?;
    let probes = report["probes"]
        .as_array()
        .ok_or_else(|| format!("{} lists no probes", report_json.display()))?;
    probes
        .iter()
        .map(|p| {
            Some(Probe {
                function: p["function"].as_str()?.to_owned(),
                library: PathBuf::from(p["library"].as_str()?),
                entry_offset: p["entry_offset"].as_u64()?,
                return_probe: p["return_probe"].as_bool()?,
            })
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| format!("{}: a probe without its fields", report_json.display()))
}

/// The traps on one process; closing the events removes them.
pub struct Traps {
    _events: Vec<OwnedFd>,
}

/// Puts `probes` on `pid` as bare perf-event uprobes, each enabled at
/// once. The breakpoints are in the process's text, so every thread traps
/// on them; the events are not inherited (inherited uretprobe events made
/// the threads loop abort on kernel 6.18), so only the first thread's hits
/// are counted, which costs nothing the others skip.
pub fn attach(pid: u32, probes: &[Probe]) -> Result<Traps, String> {
    let pmu = pmu_type()?;
    let retprobe_bit = retprobe_bit()?;
    let mut events = Vec::new();
    for probe in probes {
        let offset = file_offset(&probe.library, &probe.function)? + probe.entry_offset;
        events.push(open(pmu, 0, pid, &probe.library, offset)?);
        if probe.return_probe {
            events.push(open(pmu, 1 << retprobe_bit, pid, &probe.library, offset)?);
        }
    }
    Ok(Traps { _events: events })
}

fn pmu_type() -> Result<u32, String> {
    let path = "/sys/bus/event_source/devices/uprobe/type";
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| format!("cannot read {path}: no uprobe PMU"))
}

/// `config:N` in the PMU's format file: the bit that makes a uretprobe.
fn retprobe_bit() -> Result<u32, String> {
    let path = "/sys/bus/event_source/devices/uprobe/format/retprobe";
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.trim().strip_prefix("config:")?.parse().ok())
        .ok_or_else(|| format!("cannot read {path}"))
}

/// Where `function`'s first byte is in `library`'s file, as uprobes take it.
fn file_offset(library: &Path, function: &str) -> Result<u64, String> {
    let data = std::fs::read(library).map_err(|e| format!("{}: {e}", library.display()))?;
    let elf = object::File::parse(&*data).map_err(|e| format!("{}: {e}", library.display()))?;
    let address = elf
        .dynamic_symbols()
        .chain(elf.symbols())
        .find(|s| s.is_definition() && s.name() == Ok(function))
        .map(|s| s.address())
        .ok_or_else(|| format!("{} has no symbol {function}", library.display()))?;
    elf.segments()
        .find_map(|segment| {
            let start = segment.address();
            let (offset, size) = segment.file_range();
            (address >= start && address < start + size).then(|| offset + (address - start))
        })
        .ok_or_else(|| format!("{function} is in no segment of {}", library.display()))
}

/// perf_event_attr as far as uprobes need it (PERF_ATTR_SIZE_VER5).
#[repr(C)]
#[derive(Default)]
struct Attr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    /// uprobe_path.
    config1: u64,
    /// probe_offset.
    config2: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    _reserved: u16,
}

/// linux/perf_event.h.
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;

fn open(pmu: u32, config: u64, pid: u32, library: &Path, offset: u64) -> Result<OwnedFd, String> {
    let path = CString::new(library.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{}: a NUL in the path", library.display()))?;
    let attr = Attr {
        kind: pmu,
        size: std::mem::size_of::<Attr>() as u32,
        config,
        config1: path.as_ptr() as u64,
        config2: offset,
        ..Attr::default()
    };
    // SAFETY: attr is a valid perf_event_attr of the size it states, and
    // the path it points to outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const Attr,
            pid as libc::pid_t,
            -1,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(format!(
            "perf_event_open (uprobe {}+{offset:#x} on pid {pid}): {}",
            library.display(),
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: the kernel just returned this descriptor, owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_is_perf_attr_size_ver5() {
        assert_eq!(std::mem::size_of::<Attr>(), 112);
    }
}
