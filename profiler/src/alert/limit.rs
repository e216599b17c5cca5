//! The memory limit RSS levels are shares of: the target's cgroup
//! `memory.max` when it has one, else the host's memory.

use std::path::Path;

use procfs::Current as _;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLimit {
    pub bytes: u64,
    /// Where it came from, for people: `cgroup /system.slice/x.service
    /// memory.max`, `MemTotal`, `--memory-limit`.
    pub source: String,
}

/// The limit of `pid`: its cgroup v2 `memory.max` (or an ancestor's
/// lower one), else MemTotal.
pub fn of_process(pid: u32) -> Option<MemoryLimit> {
    cgroup_limit(pid).or_else(|| {
        let meminfo = procfs::Meminfo::current().ok()?;
        Some(MemoryLimit {
            bytes: meminfo.mem_total,
            source: "MemTotal".into(),
        })
    })
}

fn cgroup_limit(pid: u32) -> Option<MemoryLimit> {
    let cgroups = procfs::process::Process::new(pid as i32)
        .ok()?
        .cgroups()
        .ok()?;
    // cgroup v2: the one entry with hierarchy 0.
    let path = cgroups.into_iter().find(|c| c.hierarchy == 0)?.pathname;
    let mut best: Option<MemoryLimit> = None;
    let mut dir = Path::new(&path);
    loop {
        let file = Path::new("/sys/fs/cgroup")
            .join(dir.strip_prefix("/").unwrap_or(dir))
            .join("memory.max");
        if let Some(bytes) = std::fs::read_to_string(&file)
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            && best.as_ref().is_none_or(|b| bytes < b.bytes)
        {
            best = Some(MemoryLimit {
                bytes,
                source: format!("cgroup {} memory.max", dir.display()),
            });
        }
        match dir.parent() {
            Some(parent) => dir = parent,
            None => break,
        }
    }
    best
}
