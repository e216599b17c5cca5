//! What a process holds as the kernel counts it: resident, proportional
//! and private memory (/proc/PID/smaps_rollup), anonymous, file-backed and
//! shared-memory residency, swap, address space and threads
//! (/proc/PID/status). Pre-fork workers share their master's pages: RSS
//! counts a shared page in each, PSS splits it between them (so PSS adds
//! up over processes), USS is a process's private pages alone (what its
//! exit would give back).

use procfs::process::Process;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a process holds as the kernel counts it (/proc/PID/smaps_rollup
/// and status), or the sum over processes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MemoryFigures {
    /// Resident.
    pub rss_bytes: u64,
    /// Proportional: each shared page split between its sharers.
    pub pss_bytes: u64,
    /// Private (clean and dirty): unique to the process.
    pub uss_bytes: u64,
    /// Resident and shared with another process.
    pub shared_bytes: u64,
    /// Resident anonymous memory.
    pub anon_bytes: u64,
    /// Resident file-backed memory.
    pub file_bytes: u64,
    /// Resident shared memory (shmem, tmpfs).
    pub shmem_bytes: u64,
    /// Swapped out.
    pub swap_bytes: u64,
    /// Address space (VmSize).
    pub vms_bytes: u64,
    /// Threads.
    pub threads: u64,
    /// Processes summed (1 for one process).
    #[serde(default)]
    pub processes: u64,
}

impl MemoryFigures {
    /// Reads `pid`'s figures now.
    pub fn read(pid: u32) -> procfs::ProcResult<Self> {
        let process = Process::new(pid as i32)?;
        let rollup = process.smaps_rollup()?;
        let status = process.status()?;
        let field = |name: &str| {
            rollup
                .memory_map_rollup
                .iter()
                .filter_map(|map| map.extension.map.get(name))
                .sum::<u64>()
        };
        let kib = |value: Option<u64>| value.unwrap_or(0) * 1024;
        Ok(Self {
            rss_bytes: field("Rss"),
            pss_bytes: field("Pss"),
            uss_bytes: field("Private_Clean") + field("Private_Dirty"),
            shared_bytes: field("Shared_Clean") + field("Shared_Dirty"),
            anon_bytes: kib(status.rssanon),
            file_bytes: kib(status.rssfile),
            shmem_bytes: kib(status.rssshmem),
            swap_bytes: field("Swap"),
            vms_bytes: kib(status.vmsize),
            threads: status.threads,
            processes: 1,
        })
    }

    /// Adds another process's figures (RSS then counts shared pages once
    /// per process; PSS does not).
    pub fn add(&mut self, other: &MemoryFigures) {
        self.rss_bytes += other.rss_bytes;
        self.pss_bytes += other.pss_bytes;
        self.uss_bytes += other.uss_bytes;
        self.shared_bytes += other.shared_bytes;
        self.anon_bytes += other.anon_bytes;
        self.file_bytes += other.file_bytes;
        self.shmem_bytes += other.shmem_bytes;
        self.swap_bytes += other.swap_bytes;
        self.vms_bytes += other.vms_bytes;
        self.threads += other.threads;
        self.processes += other.processes;
    }

    /// Address space over resident memory: high for threads' arenas and
    /// stacks reserved but not touched, which is not fragmentation alone.
    pub fn vms_rss_ratio(&self) -> Option<f64> {
        (self.rss_bytes > 0).then(|| self.vms_bytes as f64 / self.rss_bytes as f64)
    }
}

/// The figures of each of `pids` that can be read, and their sum.
pub fn read_all(pids: impl Iterator<Item = u32>) -> (Vec<(u32, MemoryFigures)>, MemoryFigures) {
    let mut each = Vec::new();
    let mut sum = MemoryFigures::default();
    for pid in pids {
        match MemoryFigures::read(pid) {
            Ok(figures) => {
                sum.add(&figures);
                each.push((pid, figures));
            }
            Err(error) => tracing::debug!(pid, "memory figures not read: {error}"),
        }
    }
    (each, sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_adds_up() {
        let own = MemoryFigures::read(std::process::id()).expect("own smaps_rollup");
        assert!(own.rss_bytes > 0 && own.threads >= 1, "{own:?}");
        assert!(
            own.uss_bytes <= own.pss_bytes && own.pss_bytes <= own.rss_bytes,
            "{own:?}"
        );
        // smaps_rollup walks the page tables; status reads the kernel's
        // per-CPU RSS counters, which lag by a batch per CPU, while the
        // other test threads allocate: allow 1 MiB or 5%.
        let parts = own.anon_bytes + own.file_bytes + own.shmem_bytes;
        let slack = (own.rss_bytes / 20).max(1 << 20);
        assert!(parts.abs_diff(own.rss_bytes) <= slack, "{own:?}");
        assert!(own.vms_rss_ratio().is_some_and(|r| r >= 1.0));
        let (each, sum) = read_all([std::process::id()].into_iter());
        assert_eq!((each.len(), sum.processes), (1, 1));
    }
}
