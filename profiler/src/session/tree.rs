//! `attach PID` on a process tree: the processes already descended from
//! the target (a pre-fork server's workers) are probed too, not only what
//! it forks from now on.

use std::time::Instant;

use super::{FollowMode, Session};
use crate::{attach, follow, process_maps::ProcessMaps, processes::Following, target};

/// Passes over /proc: a process forked by one not yet traced during a pass
/// is found by the next.
const PASSES: usize = 3;

impl Session {
    /// Probes every process descended from the target. Each is traced
    /// before its probes go on, so what it forks meanwhile is held for its
    /// own probes by the kernel side; one traced already (the kernel side
    /// caught its fork) is left to its fork event.
    pub(super) fn attach_descendants(&mut self) {
        for _ in 0..PASSES {
            let mut found = false;
            for node in crate::proc_tree::descendants(self.pid) {
                // A zombie has exited: nothing to probe, nothing to report.
                if matches!(node.state, 'Z' | 'X')
                    || self.links.contains_key(&node.pid)
                    || self.processes.iter().any(|p| p.pid == node.pid)
                {
                    continue;
                }
                match follow::trace_new(&mut self.kernel.ebpf, node.pid) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(error) => {
                        self.unfollow(node.pid, node.ppid, format!("not followed: {error}"));
                        continue;
                    }
                }
                found = true;
                self.attach_running(node.pid, node.ppid);
            }
            if !found {
                break;
            }
        }
    }

    /// Puts the probes on a process that is already running.
    fn attach_running(&mut self, pid: u32, ppid: u32) {
        let started = Instant::now();
        let image_mode = self.kernel.follow_mode == FollowMode::Image;
        let attached = ProcessMaps::read(pid)
            .map_err(|_| target::TargetError::NoSuchProcess(pid).into())
            .and_then(|maps| {
                self.kernel.describe_unwind(&maps);
                // With --follow image, being traced is all it takes.
                let attached = if image_mode {
                    None
                } else {
                    Some(attach::attach_allocator(
                        &mut self.kernel.programs(),
                        pid,
                        &maps,
                    )?)
                };
                Ok::<_, super::SessionError>((attached, maps))
            });
        match attached {
            Ok((attached, maps)) => {
                self.attach_costs.push(started.elapsed());
                if let Some((image, attached)) = attached {
                    self.probed_images.insert((pid, image.path));
                    self.keep(pid, attached, false);
                }
                self.track(pid, ppid, Some(maps), Following::Attached);
            }
            Err(error) => self.unfollow(pid, ppid, format!("not followed: {error}")),
        }
    }
}
