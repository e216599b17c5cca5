//! Processes the kernel side holds stopped: a forked child before its first
//! instruction, a process at its exec, a started command in `_exit`. Each
//! stop is recorded in the `HELD` map (tgid -> monotonic ns of the stop)
//! before its SIGSTOP is sent (profiler-ebpf/src/processes.rs), so whoever
//! continues a process can see every one: memscope once its work is done,
//! and the watchdog (see `watchdog`) when memscope is too slow or gone.

use std::time::Duration;

use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapError};

/// With `attach`, a process left stopped longer than this is continued,
/// probes or not: a live service's own work must not wait on memscope.
pub const ATTACH_HOLD_BUDGET: Duration = Duration::from_millis(50);
/// With `run` and `check`: the command is the user's own, and a fork held
/// longer only while memscope is starved of CPU (a loaded CI machine) costs
/// its wall time, where a child let go unprobed would cost the results (a
/// gate that passes or fails by the machine's load).
pub const RUN_HOLD_BUDGET: Duration = Duration::from_secs(1);
/// What `--hold-budget` accepts.
pub const HOLD_BUDGET_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(10);

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
    /// the watchdog ended it already (it ran before memscope was done);
    /// true, without continuing it, when a newer hold has it.
    /// NB: continued before its record goes, so if memscope dies in between
    /// the watchdog still sees it (a second SIGCONT is harmless); and only
    /// this hold's record goes: once continued, the process can be held
    /// again (at its exec, its `_exit`), and that hold is its own event's.
    pub fn release(&mut self, pid: u32, since: u64) -> bool {
        if let Some(held) = self.other_hold(pid, since) {
            return held;
        }
        wait_until_stopped(pid);
        // Looked at again once it has stopped: while it stopped, another of
        // its threads may have begun a hold of its own (`_exit` while a
        // thread's code mapping held it: seen on a loaded machine), whose
        // record came before its stop. A SIGCONT now would undo that stop,
        // and the process would run on, its event's work undone; its own
        // release continues it instead.
        if let Some(held) = self.other_hold(pid, since) {
            return held;
        }
        cont(pid);
        self.forget(pid, Some(since));
        true
    }

    /// `None` while `pid`'s record is the hold of `since`; else whether
    /// another (a newer) hold has it: false when there is no record left.
    /// One read of the map, so both answers come from the same record.
    fn other_hold(&self, pid: u32, since: u64) -> Option<bool> {
        match self.held_since(pid) {
            Some(held) if held == since => None,
            record => Some(record.is_some()),
        }
    }

    /// Removes `pid`'s record if it is still the hold of `since`.
    /// NB: the process was continued just before, and may already have
    /// forked or executed again, its new hold's record written over this
    /// one. A check then a removal would take that record too, leaving a
    /// stopped process nobody continues (a shell loop froze so once in 300
    /// iterations): the record is taken out atomically, and a newer one put
    /// back (the process is stopped for it, so no third can come between).
    fn forget(&mut self, pid: u32, since: Option<u64>) {
        let Some(since) = since else {
            return;
        };
        match take(&self.map, pid) {
            Ok(Some(newer)) if newer != since => {
                let _ = self.map.insert(pid, newer, 0);
            }
            Ok(_) => {}
            // Kernels before 5.14 cannot take from a hash map.
            Err(_) => {
                if self.held_since(pid) == Some(since) {
                    let _ = self.map.remove(&pid);
                }
            }
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

/// BPF_MAP_LOOKUP_AND_DELETE_ELEM: the record of `pid`, removed, in one
/// step; `Ok(None)` when there was none.
fn take(map: &BpfHashMap<MapData, u32, u64>, pid: u32) -> std::io::Result<Option<u64>> {
    use aya::maps::IterableMap as _;
    use std::os::fd::{AsFd as _, AsRawFd as _};
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    /// `union bpf_attr` for map element commands.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut value = 0u64;
    let attr = ElemAttr {
        map_fd: map.map().fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: (&raw const pid) as u64,
        value: (&raw mut value) as u64,
        flags: 0,
    };
    // SAFETY: `attr` is laid out as the kernel's bpf_attr for this command;
    // key and value point to a u32 and a u64, the map's sizes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &raw const attr,
            size_of::<ElemAttr>(),
        )
    };
    if ret == 0 {
        return Ok(Some(value));
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::ENOENT) => Ok(None),
        _ => Err(error),
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
