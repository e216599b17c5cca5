//! Which followed processes still run: a pidfd per process, all in one
//! epoll set that the wait loop polls.
//!
//! The kernel side's EXIT event is the first word of an exit; the pidfd is
//! the guarantee. An event can be lost (the ring full), and a pid is soon
//! another process's in a fork storm (pid_max is 32768 here): a pidfd
//! names one process, not a pid, and turns readable when that process has
//! exited, whatever became of its pid. Before, a /proc check every 500 ms
//! by start time stood in for it; it remains for a process whose pidfd
//! could not be opened (out of descriptors: each followed process costs
//! one more, see `resources`).

use std::{
    collections::{BTreeSet, HashMap},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use tokio::io::unix::AsyncFd;

use super::Session;
use crate::target;

/// The processes of a session that have not exited, by pid.
pub(super) struct LiveProcesses {
    pids: BTreeSet<u32>,
    pidfds: HashMap<u32, OwnedFd>,
    /// Holds every pidfd, each with its pid as data.
    epoll: AsyncFd<OwnedFd>,
    /// Gone before a pidfd could be opened: exited, for the next poll.
    gone: Vec<u32>,
}

impl LiveProcesses {
    /// Needs the tokio runtime (the epoll set is registered with it).
    pub(super) fn new() -> std::io::Result<Self> {
        // SAFETY: epoll_create1 returns a new descriptor or fails.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the descriptor is new and ours.
        let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
        Ok(Self {
            pids: BTreeSet::new(),
            pidfds: HashMap::new(),
            // SAFETY: the epoll descriptor is owned by the AsyncFd and
            // closed only when it drops.
            epoll: unsafe { AsyncFd::register(epoll) }
                .map_err(|error| std::io::Error::other(error.to_string()))?,
            gone: Vec::new(),
        })
    }

    /// Starts watching `pid`; false if it was watched already.
    /// NB: call it while `pid` is known to be the process meant (just
    /// checked, or held stopped): the pidfd is of whoever has the pid now.
    pub(super) fn insert(&mut self, pid: u32) -> bool {
        if !self.pids.insert(pid) {
            return false;
        }
        match target::exit_notifier(pid) {
            Ok(pidfd) => {
                let mut event = libc::epoll_event {
                    events: libc::EPOLLIN as u32,
                    u64: u64::from(pid),
                };
                // SAFETY: both descriptors are open; the event is read only.
                let added = unsafe {
                    libc::epoll_ctl(
                        self.epoll.get_ref().as_raw_fd(),
                        libc::EPOLL_CTL_ADD,
                        pidfd.as_raw_fd(),
                        &raw mut event,
                    )
                };
                if added == 0 {
                    self.pidfds.insert(pid, pidfd);
                } else {
                    tracing::debug!(
                        pid,
                        "cannot watch the pidfd: {}",
                        std::io::Error::last_os_error()
                    );
                }
            }
            Err(error) if error.raw_os_error() == Some(libc::ESRCH) => self.gone.push(pid),
            // Out of descriptors: the maps refresh checks it by start time.
            Err(error) => tracing::debug!(pid, "no pidfd: {error}"),
        }
        true
    }

    /// Stops watching `pid`; false if it was not watched.
    pub(super) fn remove(&mut self, pid: &u32) -> bool {
        if let Some(pidfd) = self.pidfds.remove(pid) {
            // SAFETY: both descriptors are open.
            unsafe {
                libc::epoll_ctl(
                    self.epoll.get_ref().as_raw_fd(),
                    libc::EPOLL_CTL_DEL,
                    pidfd.as_raw_fd(),
                    std::ptr::null_mut(),
                )
            };
        }
        self.pids.remove(pid)
    }

    pub(super) fn contains(&self, pid: &u32) -> bool {
        self.pids.contains(pid)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.pids.is_empty()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.pids.iter().copied()
    }

    /// Whether the process watched as `pid` still runs (a zombie has
    /// exited); None when it has no pidfd, so only /proc can tell.
    pub(super) fn running(&self, pid: u32) -> Option<bool> {
        let pidfd = self.pidfds.get(&pid)?;
        let mut poll = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, polled without waiting.
        let ready = unsafe { libc::poll(&raw mut poll, 1, 0) };
        Some(ready == 0)
    }

    /// Waits until a watched process has exited; returns those that have.
    /// Each must then be removed, or it is returned again.
    pub(super) async fn exited(&mut self) -> Vec<u32> {
        if !self.gone.is_empty() {
            return std::mem::take(&mut self.gone);
        }
        loop {
            let Ok(mut guard) = self.epoll.readable().await else {
                return std::future::pending().await;
            };
            let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
            // SAFETY: the array has room for the 64 events asked for; a
            // timeout of 0 does not wait.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.get_ref().as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    0,
                )
            };
            if n > 0 {
                return events[..n as usize]
                    .iter()
                    .map(|event| event.u64 as u32)
                    .collect();
            }
            guard.clear_ready();
        }
    }
}

impl Session {
    /// A followed process has exited (its EXIT event, or its pidfd): its
    /// record ends, its live-map entries go at the next tick, and its
    /// probes are detached.
    pub(super) fn exit_seen(&mut self, pid: u32) {
        self.process_exited(pid);
        if pid != self.pid {
            self.exited_in_live_map.insert(pid);
        }
        if let Some(links) = self.links.remove(&pid) {
            self.detacher.detach(links);
        }
    }

    /// Whether the process followed as `pid` still has that pid: by its
    /// pidfd, or without one by its start time in /proc.
    pub(super) fn still_the_same(&self, pid: u32) -> bool {
        self.alive.running(pid).unwrap_or_else(|| {
            self.start_times.get(&pid).is_none_or(|&start| {
                crate::proc_tree::identity(pid).is_some_and(|(now, _)| now == start)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// Check that an exit is seen through the pidfd while the process is
    /// a zombie (not reaped: /proc still has its pid), and only its own.
    #[test]
    fn an_exit_is_seen_by_its_pidfd_before_the_process_is_reaped() {
        runtime().block_on(async {
            let mut live = LiveProcesses::new().expect("epoll");
            let mut sleeper = std::process::Command::new("sleep")
                .arg("60")
                .spawn()
                .expect("sleep");
            let mut quick = std::process::Command::new("true").spawn().expect("true");
            let (sleeper_pid, quick_pid) = (sleeper.id(), quick.id());
            assert!(live.insert(sleeper_pid) && live.insert(quick_pid));
            assert!(!live.insert(quick_pid), "watched once");
            assert_eq!(live.running(sleeper_pid), Some(true));

            let exited = tokio::time::timeout(Duration::from_secs(10), live.exited())
                .await
                .expect("an exit within 10 s");
            assert_eq!(exited, vec![quick_pid]);
            assert_eq!(live.running(quick_pid), Some(false));
            assert!(std::path::Path::new(&format!("/proc/{quick_pid}")).exists());
            assert!(live.remove(&quick_pid) && !live.contains(&quick_pid));
            // Removed: not returned again, and the sleeper has not exited.
            let again = tokio::time::timeout(Duration::from_millis(200), live.exited()).await;
            assert!(again.is_err(), "{again:?}");

            sleeper.kill().expect("kill");
            let exited = tokio::time::timeout(Duration::from_secs(10), live.exited())
                .await
                .expect("the kill seen");
            assert_eq!(exited, vec![sleeper_pid]);
            let _ = sleeper.wait();
            let _ = quick.wait();
        });
    }

    /// Check that a pid with no process behind it counts as exited at once.
    #[test]
    fn a_pid_already_gone_is_returned_as_exited() {
        runtime().block_on(async {
            let mut live = LiveProcesses::new().expect("epoll");
            let mut child = std::process::Command::new("true").spawn().expect("true");
            let pid = child.id();
            child.wait().expect("reaped");
            assert!(live.insert(pid));
            assert_eq!(live.running(pid), None);
            assert_eq!(live.exited().await, vec![pid]);
        });
    }
}
