//! What the kernel side could not record, said in words with the option
//! that fixes it.

use crate::{
    bpf::MapCapacity,
    processes::Following,
    report::{Report, Site},
};

/// Says what was lost and which option fixes it.
pub fn loss_warnings(report: &Report, capacity: MapCapacity) -> Vec<String> {
    let c = &report.completeness;
    let mut warnings = Vec::new();
    if c.live_map_full > 0 {
        warnings.push(format!(
            "{} allocations were not tracked: the live map ({} entries) was full; rerun with --max-live {}",
            c.live_map_full,
            capacity.max_live,
            capacity.max_live.saturating_mul(4)
        ));
    }
    let walk_failures = c
        .stack_errors
        .saturating_sub(c.stack_collisions + c.unwound_stacks_full);
    if c.unwound_stacks_full > 0 {
        warnings.push(format!(
            "{} unwound stacks could not be recorded: their map ({} entries) was full; their bytes are under [unknown stack]; rerun with --max-stacks {}",
            c.unwound_stacks_full,
            capacity.max_stacks,
            capacity.max_stacks.saturating_mul(4)
        ));
    }
    if c.stack_collisions > 0 {
        warnings.push(format!(
            "{} stacks could not be recorded: they collided with another in the stack map ({} entries); their bytes are under [unknown stack]; rerun with --max-stacks {}",
            c.stack_collisions,
            capacity.max_stacks,
            capacity.max_stacks.saturating_mul(4)
        ));
    }
    if walk_failures > 0 {
        warnings.push(format!(
            "{walk_failures} stacks could not be walked (code built without frame pointers); their bytes are under [unknown stack]; a larger map would not help (docs/usage.md#short-or-broken-stacks)"
        ));
    }
    if c.truncated_stacks > 0 {
        warnings.push(format!(
            "{} stacks end with [truncated]: the walk left the code at a function built without frame pointers (or reached {} frames); their callers beyond are unknown (docs/usage.md#short-or-broken-stacks)",
            c.truncated_stacks,
            profiler_common::MAX_STACK_DEPTH
        ));
    }
    if c.totals_map_full > 0 {
        warnings.push(format!(
            "{} allocator calls were not counted: the per-(process, stack) totals map ({} entries, {} per --max-stacks) was full; rerun with --max-stacks {}",
            c.totals_map_full,
            capacity
                .max_stacks
                .saturating_mul(profiler_common::STACK_TOTALS_PER_STACK),
            profiler_common::STACK_TOTALS_PER_STACK,
            capacity.max_stacks.saturating_mul(4)
        ));
    }
    if c.in_flight_full > 0 {
        warnings.push(format!(
            "{} allocator calls were missed: more threads were inside the allocator at once than memscope tracks",
            c.in_flight_full
        ));
    }
    if c.lost_children > 0 {
        warnings.push(format!(
            "{} forked children could not be followed (more than {} processes)",
            c.lost_children,
            profiler_common::MAX_PROCESSES
        ));
    }
    if c.unfollowed_processes > 0 {
        let example = report
            .processes
            .iter()
            .find(|p| p.following == Following::Unfollowed)
            .and_then(|p| p.note.as_deref())
            .unwrap_or("");
        warnings.push(format!(
            "{} processes of the tree ran without probes ({example}); for fork-heavy targets, try --follow image",
            c.unfollowed_processes
        ));
    }
    if c.late_processes > 0 {
        warnings.push(format!(
            "{} forked processes were let go before their probes were on: their first allocations may be missed",
            c.late_processes
        ));
    }
    if c.heap_map_full > 0 {
        warnings.push(format!(
            "the heap top of {} processes was not tracked (more than {} processes)",
            c.heap_map_full,
            profiler_common::MAX_PROCESSES
        ));
    }
    if c.python_stacks_full > 0 {
        warnings.push(format!(
            "the Python stack map ({} entries) was full; rerun with --max-stacks {}",
            capacity.max_stacks,
            capacity.max_stacks.saturating_mul(4)
        ));
    }
    if c.python_stack_errors + c.python_stacks_full > 0 {
        warnings.push(format!(
            "{} allocations in Python threads have native frames only: their Python stack could not be read ({}) or stored ({})",
            c.python_stack_errors + c.python_stacks_full,
            c.python_stack_errors,
            c.python_stacks_full
        ));
    }
    if c.python_truncated > 0 {
        warnings.push(format!(
            "{} Python stacks were deeper than {} frames: their outermost frames are not shown",
            c.python_truncated,
            profiler_common::MAX_PYTHON_FRAMES
        ));
    }
    if c.requests_full > 0 {
        warnings.push(format!(
            "{} requests were not tracked: more than {} were open or waiting for their kept figure at once (lower --keep-after)",
            c.requests_full,
            profiler_common::MAX_REQUESTS
        ));
    }
    if c.request_events_lost > 0 {
        warnings.push(format!(
            "{} request records were lost: requests closed faster than memscope read them",
            c.request_events_lost
        ));
    }
    if c.missed_returns > 0 {
        warnings.push(format!(
            "{} allocator returns had no matching entry (calls in progress at attach)",
            c.missed_returns
        ));
    }
    if c.unknown_frees > 0 {
        let attached = report
            .processes
            .iter()
            .any(|p| !matches!(p.following, Following::Started | Following::Forked));
        let why = if attached {
            "memory allocated before memscope attached"
        } else {
            // Followed from the start: glibc's own blocks (a thread's
            // cache, freed at its exit) are made without malloc's entry.
            "blocks memscope never saw allocated (glibc frees some of its own with free, such as each exiting thread's cache; or the program freed a block twice, or an address malloc never returned)"
        };
        warnings.push(format!("{} frees of {why} were ignored", c.unknown_frees));
    }
    if report.totals.alloc_count == 0 {
        warnings.push(
            "no allocations were seen: the target may not have allocated, or it bypasses libc's malloc (static binary, jemalloc/tcmalloc/mimalloc)"
                .to_owned(),
        );
    }
    let unnamed = objects_without_symbols(&report.sites);
    if !unnamed.is_empty() {
        warnings.push(format!(
            "no symbols for some frames of {}: shown as FILE+OFFSET; install their debug symbols (Debian's -dbgsym or -dbg packages, found under /usr/lib/debug/.build-id) or profile an unstripped build",
            unnamed.join(", ")
        ));
    }
    warnings
}

/// The objects of the sites' frames that had no name for an address
/// (symbolization shows those as `FILE+0xOFFSET`).
pub fn objects_without_symbols(sites: &[Site]) -> Vec<String> {
    let mut objects = std::collections::BTreeSet::new();
    for frame in sites.iter().flat_map(|s| &s.frames) {
        let Some(module) = frame.module.as_deref() else {
            continue;
        };
        let name = module.rsplit('/').next().unwrap_or(module);
        if frame
            .function
            .strip_prefix(name)
            .is_some_and(|rest| rest.starts_with("+0x"))
        {
            objects.insert(module.to_owned());
        }
    }
    objects.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Frame;

    #[test]
    fn objects_with_unnamed_frames_are_listed_once() {
        let frame = |function: &str, module: &str| Frame {
            module: Some(module.to_owned()),
            ..Frame::named(function)
        };
        let sites = [
            Site {
                frames: vec![
                    frame("zmalloc", "/usr/bin/redis-check-rdb"),
                    frame("redis-check-rdb+0x13c1e3", "/usr/bin/redis-check-rdb"),
                    frame("libstdc++.so.6+0xa57b9", "/usr/lib/libstdc++.so.6"),
                ],
                ..Site::default()
            },
            Site {
                frames: vec![
                    frame("redis-check-rdb+0x84967", "/usr/bin/redis-check-rdb"),
                    // A name that merely starts like its file is a name.
                    frame("libc.so.6_helper", "/usr/lib/libc.so.6"),
                    Frame::named("main"),
                ],
                ..Site::default()
            },
        ];
        assert_eq!(
            objects_without_symbols(&sites),
            ["/usr/bin/redis-check-rdb", "/usr/lib/libstdc++.so.6"]
        );
    }
}
