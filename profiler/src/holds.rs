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

    /// Ends the hold of `pid` made at `since` (its event's timestamp, which
    /// is the record's value). Returns whether it was still on: false when
    /// the watchdog ended it already (it ran before memscope was done).
    /// NB: continued before its record goes, so if memscope dies in between
    /// the watchdog still sees it (a second SIGCONT is harmless); and only
    /// this hold's record goes: once continued, the process can be held
    /// again (at its exec, its `_exit`), and that hold is its own event's.
    pub fn release(&mut self, pid: u32, since: u64) -> bool {
        if self.held_since(pid) != Some(since) {
            return false;
        }
        wait_until_stopped(pid);
        cont(pid);
        self.forget(pid, Some(since));
        true
    }

    /// Removes `pid`'s record if it is still the hold of `since`.
    /// NB: a check then a removal, not atomic: safe because the kernel side
    /// never writes a record over another (`hold` in profiler-ebpf), so the
    /// record checked is the one removed.
    fn forget(&mut self, pid: u32, since: Option<u64>) {
        if since.is_some() && self.held_since(pid) == since {
            let _ = self.map.remove(&pid);
        }
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
        // Records first: the map changes while it is walked.
        let held: Vec<(u32, u64)> = self
            .map
            .iter()
            .filter_map(Result::ok)
            .filter(|&(_, since)| pick(since))
            .collect();
        for &(pid, since) in &held {
            wait_until_stopped(pid);
            cont(pid);
            self.forget(pid, Some(since));
        }
        held.len()
    }
}

/// However a session ends, even by an error while attaching: nothing it
/// held stays stopped.
impl Drop for Holds {
    fn drop(&mut self) {
        self.release_all();
    }
}

/// Waits, briefly, until a held process has really stopped. NB: a stop
/// sent from a uprobe (the `_exit` stop) can be delivered a moment after
/// its event is read (the kernel defers a signal sent where interrupts are
/// off); a SIGCONT sent before it would be undone by it, and nothing would
/// continue the process again.
fn wait_until_stopped(pid: u32) {
    const BOUND: std::time::Duration = std::time::Duration::from_millis(20);
    let started = std::time::Instant::now();
    while started.elapsed() < BOUND {
        match crate::proc_tree::state(pid) {
            Some('T' | 't') | None => return,
            Some(_) => std::thread::sleep(std::time::Duration::from_micros(200)),
        }
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
