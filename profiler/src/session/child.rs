//! The command memscope started (`run`): its stops and its end.

use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use super::{Session, StopReason};
use crate::target::{self, ChildState};

impl Session {
    /// Looks at our child without blocking. A stop is memscope's own (the
    /// `_exit` probe, an exec): first handle pending lifecycle events (an
    /// exec stop is theirs to end once the new image is probed), read the
    /// mappings, and let it go on. An exit is recorded.
    pub(super) fn handle_child_event(&mut self, events: &mut Option<AsyncFd<RingBuf<MapData>>>) {
        match target::poll_child(self.pid) {
            ChildState::Running => {}
            ChildState::Stopped => {
                if let Some(events) = events.as_mut() {
                    self.drain_events(events.get_mut());
                }
                self.continue_child();
            }
            ChildState::Exited(code) => {
                self.exit_code = code;
                self.process_exited(self.pid);
            }
        }
    }

    fn signal_child(&self, signal: i32) {
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(self.pid as i32, signal) };
    }

    fn continue_child(&mut self) {
        self.refresh_maps();
        self.signal_child(libc::SIGCONT);
    }

    /// After the session, a started command either has exited (reap it) or
    /// still runs: pass SIGINT/SIGTERM on and give it a second to exit.
    /// After --duration it is left running.
    pub(super) async fn finish_child(&mut self, reason: StopReason) {
        if self.exit_code.is_some() {
            return;
        }
        match reason {
            StopReason::Terminated => self.signal_child(libc::SIGTERM),
            StopReason::Interrupted => self.signal_child(libc::SIGINT),
            // The exit event can come before the process is a zombie.
            StopReason::TargetExited => {}
            StopReason::DurationElapsed => {
                if let ChildState::Exited(code) = target::poll_child(self.pid) {
                    self.exit_code = code;
                }
                return;
            }
        }
        for _ in 0..20 {
            match target::poll_child(self.pid) {
                ChildState::Exited(code) => {
                    self.exit_code = code;
                    return;
                }
                ChildState::Stopped => self.continue_child(),
                ChildState::Running => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}
