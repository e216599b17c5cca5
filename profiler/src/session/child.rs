//! The command memscope started (`run`): its stops and its end.

use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use super::{Session, StopReason};
use crate::target::{self, ChildState};

impl Session {
    /// Looks at our child without blocking. Its stops are memscope's own
    /// (an exec, the `_exit` probe), each with a lifecycle event whose
    /// handler continues it once the work is done: continuing it from
    /// here too could end a later stop (the next exec's) too early. So a
    /// stop only hurries the events along; an exit is recorded.
    pub(super) fn handle_child_event(&mut self, events: &mut Option<AsyncFd<RingBuf<MapData>>>) {
        match target::poll_child(self.pid) {
            ChildState::Running => {}
            ChildState::Stopped => {
                if let Some(events) = events.as_mut() {
                    self.drain_events(events.get_mut());
                }
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

    /// After the session, a started command either has exited (reap it) or
    /// still runs: pass SIGINT/SIGTERM on and give it a second to exit.
    /// After --duration it is left running.
    pub(super) async fn finish_child(&mut self, reason: StopReason) {
        if self.exit_code.is_some() {
            return;
        }
        match reason {
            StopReason::Terminated => self.signal_child(libc::SIGTERM),
            StopReason::HungUp => self.signal_child(libc::SIGHUP),
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
                // A stop's event ends it (see `handle_child_event`).
                ChildState::Stopped => {
                    self.drain_pending_events();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                ChildState::Running => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}
