//! Processes the kernel side holds stopped: a forked child before its first
//! instruction, a process at its exec, a started command in `_exit`. Each
//! stop is recorded in the `HELD` map (tgid -> monotonic ns of the stop)
//! before its SIGSTOP is sent (profiler-ebpf/src/processes.rs), so whoever
//! continues a process can see every one: memscope once its work is done,
//! and the watchdog (see `watchdog`) when memscope is too slow or gone.

use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapError};

/// A process left stopped longer than this is continued, probes or not:
/// the target's own work must not wait on memscope.
pub const HOLD_BUDGET_NS: u64 = 50_000_000;

/// The `HELD` map.
pub struct Holds {
    map: BpfHashMap<MapData, u32, u64>,
}

impl Holds {
    pub fn new(map: MapData) -> Result<Self, MapError> {
        Ok(Self {
            map: BpfHashMap::try_from(Map::HashMap(map))?,
        })
    }

    /// When `pid` was stopped, if it still is held.
    pub fn held_since(&self, pid: u32) -> Option<u64> {
        self.map.get(&pid, 0).ok()
    }

    /// Continues `pid`. Returns whether it was still held: false when the
    /// watchdog continued it already (it ran before memscope was done).
    /// NB: continued before it leaves the map, so if memscope dies in
    /// between the watchdog still sees it (a second SIGCONT is harmless).
    pub fn release(&mut self, pid: u32) -> bool {
        let held = self.held_since(pid).is_some();
        cont(pid);
        let _ = self.map.remove(&pid);
        held
    }

    /// Continues every held process; returns how many there were.
    pub fn release_all(&mut self) -> usize {
        self.release_where(|_| true)
    }

    /// Continues the processes held since before `before_ns`.
    pub fn release_held_before(&mut self, before_ns: u64) -> usize {
        self.release_where(|since| since < before_ns)
    }

    fn release_where(&mut self, pick: impl Fn(u64) -> bool) -> usize {
        // Keys first: the map changes while it is walked.
        let pids: Vec<u32> = self
            .map
            .iter()
            .filter_map(Result::ok)
            .filter(|&(_, since)| pick(since))
            .map(|(pid, _)| pid)
            .collect();
        for &pid in &pids {
            cont(pid);
            let _ = self.map.remove(&pid);
        }
        pids.len()
    }
}

/// However a session ends, even by an error while attaching: nothing it
/// held stays stopped.
impl Drop for Holds {
    fn drop(&mut self) {
        self.release_all();
    }
}

fn cont(pid: u32) {
    // SAFETY: plain syscall; a pid that is gone makes it fail harmlessly.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec as u64)
}
