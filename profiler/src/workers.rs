//! Pre-fork workers: what each shares with its master and its siblings
//! (RSS against PSS and USS), what it added after the fork, and what every
//! worker allocated again for itself at the same sites: startup work done
//! once per worker (each imports the whole app) that a fork after it would
//! share instead.

use std::collections::{BTreeMap, BTreeSet};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    process_memory::MemoryFigures,
    report::{Frame, ProcessReport, SiteKind},
};

/// Repeated sites listed per group.
pub const REPEATED_SITES: usize = 10;

/// The children of one followed process, as report.json's `workers[]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkerGroup {
    /// The pre-fork master's pid.
    pub master: u32,
    /// Its followed children's pids.
    pub workers: Vec<u32>,
    /// The workers' figures summed, of those read (`memory.processes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryFigures>,
    /// Live bytes the workers allocated themselves (not inherited), summed.
    pub added_bytes: u64,
    /// What each worker holds, at least, at the sites every worker
    /// allocated at itself.
    pub repeated_bytes_per_worker: u64,
    /// Those sites, most bytes first (`REPEATED_SITES` of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repeated_sites: Vec<RepeatedSite>,
}

/// A site every worker allocated at itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RepeatedSite {
    /// What it allocates with.
    pub kind: SiteKind,
    /// Innermost first, as `sites[].frames`.
    pub frames: Vec<Frame>,
    /// The least any worker holds there.
    pub bytes_per_worker: u64,
}

/// Live bytes per worker pid.
type PerWorker = BTreeMap<u32, u64>;

/// A process's own live bytes at one site: (pid, kind, frames, bytes).
pub type OwnLive<'a> = (u32, SiteKind, &'a [Frame], u64);

/// The groups of two or more children of one followed process. `own`
/// gives each process's live bytes per site that it allocated itself;
/// `counted(kind, frames)` says whether a site's memory can be startup
/// work (a leak in every worker is not).
pub fn groups<'a>(
    processes: &[ProcessReport],
    own: impl Iterator<Item = OwnLive<'a>>,
    counted: impl Fn(SiteKind, &[Frame]) -> bool,
) -> Vec<WorkerGroup> {
    let followed: BTreeSet<u32> = processes.iter().map(|p| p.pid).collect();
    let mut children: BTreeMap<u32, Vec<&ProcessReport>> = BTreeMap::new();
    for p in processes {
        if let Some(ppid) = p.ppid.filter(|ppid| followed.contains(ppid)) {
            children.entry(ppid).or_default().push(p);
        }
    }
    children.retain(|_, workers| workers.len() >= 2);
    if children.is_empty() {
        return Vec::new();
    }
    let master_of: BTreeMap<u32, u32> = children
        .iter()
        .flat_map(|(master, workers)| workers.iter().map(|w| (w.pid, *master)))
        .collect();
    // Per master, per site: each worker's own live bytes there.
    let mut by_site: BTreeMap<u32, BTreeMap<(SiteKind, &[Frame]), PerWorker>> = BTreeMap::new();
    let mut added: BTreeMap<u32, u64> = BTreeMap::new();
    for (pid, kind, frames, bytes) in own {
        let Some(master) = master_of.get(&pid) else {
            continue;
        };
        *added.entry(*master).or_default() += bytes;
        if bytes > 0 && counted(kind, frames) {
            *by_site
                .entry(*master)
                .or_default()
                .entry((kind, frames))
                .or_default()
                .entry(pid)
                .or_default() += bytes;
        }
    }
    children
        .into_iter()
        .map(|(master, workers)| {
            let mut repeated: Vec<RepeatedSite> = by_site
                .remove(&master)
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, each)| each.len() == workers.len())
                .map(|((kind, frames), each)| RepeatedSite {
                    kind,
                    frames: frames.to_vec(),
                    bytes_per_worker: each.values().copied().min().unwrap_or(0),
                })
                .collect();
            repeated.sort_by_key(|s| std::cmp::Reverse(s.bytes_per_worker));
            let repeated_bytes_per_worker = repeated.iter().map(|s| s.bytes_per_worker).sum();
            repeated.truncate(REPEATED_SITES);
            let mut memory = MemoryFigures::default();
            for figures in workers.iter().filter_map(|w| w.memory.as_ref()) {
                memory.add(figures);
            }
            WorkerGroup {
                master,
                workers: workers.iter().map(|w| w.pid).collect(),
                memory: (memory.processes > 0).then_some(memory),
                added_bytes: added.get(&master).copied().unwrap_or(0),
                repeated_bytes_per_worker,
                repeated_sites: repeated,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(pid: u32, ppid: Option<u32>) -> ProcessReport {
        ProcessReport {
            pid,
            ppid,
            ..ProcessReport::default()
        }
    }

    fn frames(function: &str) -> Vec<Frame> {
        vec![Frame {
            function: function.to_owned(),
            ..Frame::default()
        }]
    }

    #[test]
    fn sites_every_worker_allocated_at_are_repeated_at_the_least_any_holds() {
        let processes = [
            process(1, None),
            process(2, Some(1)),
            process(3, Some(1)),
            // A child of a worker: no group of its own.
            process(4, Some(2)),
        ];
        let (import, leak, once) = (frames("import"), frames("leak"), frames("once"));
        let own = [
            (2, SiteKind::Malloc, import.as_slice(), 100),
            (3, SiteKind::Malloc, import.as_slice(), 120),
            (2, SiteKind::Malloc, leak.as_slice(), 50),
            (3, SiteKind::Malloc, leak.as_slice(), 50),
            (3, SiteKind::Malloc, once.as_slice(), 7),
            (1, SiteKind::Malloc, import.as_slice(), 1000),
            (4, SiteKind::Malloc, import.as_slice(), 1000),
        ];
        let groups = groups(&processes, own.into_iter(), |_, f| f[0].function != "leak");
        assert_eq!(groups.len(), 1, "{groups:#?}");
        let group = &groups[0];
        assert_eq!((group.master, group.workers.clone()), (1, vec![2, 3]));
        assert_eq!(group.added_bytes, 100 + 120 + 50 + 50 + 7);
        assert_eq!(group.repeated_bytes_per_worker, 100);
        assert_eq!(group.repeated_sites.len(), 1);
        assert_eq!(group.repeated_sites[0].frames, import);
    }

    #[test]
    fn a_single_child_is_no_group() {
        let processes = [process(1, None), process(2, Some(1))];
        let own = [(2, SiteKind::Malloc, &[][..], 10)];
        assert!(groups(&processes, own.into_iter(), |_, _| true).is_empty());
    }
}
