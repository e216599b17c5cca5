//! The kernel's live-byte peaks (`PEAKS`, `MERGED_PEAK`): what userspace adds
//! to them (a forked child's inherited blocks) and takes out (an exited
//! process's figures).

use std::{
    os::fd::AsRawFd as _,
    ptr::NonNull,
    sync::atomic::{AtomicI64, AtomicU64, Ordering},
};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
};
use profiler_common::{ProcessPeak, map_names};

#[derive(Debug, thiserror::Error)]
pub enum PeakError {
    #[error("BPF map {0} is missing (build bug)")]
    Missing(&'static str),
    #[error("cannot map {name} into memory: {source}")]
    Mmap {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot update BPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// `MERGED_PEAK` mapped into memscope, so userspace can add to it with the
/// same atomic instructions the kernel programs use.
pub struct MergedPeak {
    value: NonNull<ProcessPeak>,
    len: usize,
}

// SAFETY: the mapping is shared memory used only through atomics.
unsafe impl Send for MergedPeak {}

impl MergedPeak {
    pub fn map(ebpf: &Ebpf) -> Result<Self, PeakError> {
        let name = map_names::MERGED_PEAK;
        let fd = ebpf
            .map(name)
            .and_then(crate::multi_uprobe::map_fd)
            .ok_or(PeakError::Missing(name))?;
        // SAFETY: plain syscall.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        // SAFETY: maps the array's values (an mmapable array: BPF_F_MMAPABLE);
        // the pointer is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(PeakError::Mmap {
                name,
                source: std::io::Error::last_os_error(),
            });
        }
        let value = NonNull::new(ptr.cast()).ok_or(PeakError::Missing(name))?;
        Ok(Self { value, len: page })
    }

    /// Adds a child's inherited blocks, `now_ns` being when it got them.
    pub fn add(&self, bytes: u64, now_ns: u64) {
        let value = self.value.as_ptr();
        // SAFETY: the fields are 8-byte aligned u64/i64 in the mapped page;
        // the kernel side changes them only with atomic instructions too.
        let (live, peak, peak_ns) = unsafe {
            (
                AtomicI64::from_ptr(&raw mut (*value).live_bytes),
                AtomicU64::from_ptr(&raw mut (*value).peak_bytes),
                AtomicU64::from_ptr(&raw mut (*value).peak_ns),
            )
        };
        let held = live.fetch_add(bytes as i64, Ordering::Relaxed) + bytes as i64;
        let held = held.max(0) as u64;
        if peak.fetch_max(held, Ordering::Relaxed) < held {
            peak_ns.store(now_ns, Ordering::Relaxed);
        }
    }
}

impl Drop for MergedPeak {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.value.as_ptr().cast(), self.len) };
    }
}

fn peaks_map(ebpf: &mut Ebpf) -> Result<BpfHashMap<&mut MapData, u32, ProcessPeak>, PeakError> {
    let name = map_names::PEAKS;
    let map = ebpf.map_mut(name).ok_or(PeakError::Missing(name))?;
    BpfHashMap::try_from(map).map_err(|source| PeakError::Map { name, source })
}

/// A held child starts with the blocks it inherited: they count towards
/// what it holds and towards the merged sum. It has not run yet, so
/// nothing else writes its entry now.
pub fn inherit(
    ebpf: &mut Ebpf,
    merged: &MergedPeak,
    child: u32,
    bytes: u64,
    fork_ns: u64,
) -> Result<(), PeakError> {
    let peak = ProcessPeak {
        live_bytes: 0,
        inherited_bytes: bytes,
        peak_bytes: bytes,
        peak_ns: fork_ns,
    };
    peaks_map(ebpf)?
        .insert(child, peak, 0)
        .map_err(|source| PeakError::Map {
            name: map_names::PEAKS,
            source,
        })?;
    merged.add(bytes, fork_ns);
    Ok(())
}

/// Takes an exited process's figures out of the kernel map (it has room
/// for `MAX_PROCESSES`, and a fork storm makes more).
pub fn take(ebpf: &mut Ebpf, pid: u32) -> Option<ProcessPeak> {
    let mut map = peaks_map(ebpf).ok()?;
    let peak = map.get(&pid, 0).ok();
    let _ = map.remove(&pid);
    peak
}
