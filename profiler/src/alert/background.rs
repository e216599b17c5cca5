//! A sink that may be slow (a webhook, a command) runs on a thread of its
//! own behind a bounded queue, so an alert never waits on it: a full queue
//! drops the alert and counts it.

use std::{
    sync::mpsc::{self, SyncSender, TrySendError},
    thread,
    time::Duration,
};

/// Alerts waiting for a slow sink before new ones are dropped.
const QUEUE: usize = 64;

/// At memscope's end, how long the alerts still queued may take to go out;
/// after that they are given up, so a dead endpoint cannot hold the end.
const DRAIN: Duration = Duration::from_secs(5);

/// Tries per alert, with these pauses between them.
const RETRY_PAUSES: [Duration; 2] = [Duration::from_millis(500), Duration::from_secs(2)];

pub struct Background {
    queue: Option<SyncSender<Vec<u8>>>,
    /// Says when the thread has sent everything.
    finished: Option<mpsc::Receiver<()>>,
    what: String,
    dropped: u64,
}

impl Background {
    /// Starts the thread; `deliver` sends one alert's JSON, saying why not.
    pub fn start(
        what: String,
        mut deliver: impl FnMut(&[u8]) -> Result<(), String> + Send + 'static,
    ) -> Self {
        let (queue, alerts) = mpsc::sync_channel::<Vec<u8>>(QUEUE);
        let (done, finished) = mpsc::channel();
        let name = what.clone();
        let started = thread::Builder::new()
            .name("memscope-alerts".into())
            .spawn(move || {
                for alert in alerts {
                    let mut pauses = RETRY_PAUSES.iter();
                    loop {
                        match deliver(&alert) {
                            Ok(()) => break,
                            Err(error) => match pauses.next() {
                                Some(pause) => thread::sleep(*pause),
                                None => {
                                    tracing::warn!("alert not delivered to {name}: {error}");
                                    break;
                                }
                            },
                        }
                    }
                }
                let _ = done.send(());
            })
            .is_ok();
        Self {
            queue: Some(queue),
            finished: started.then_some(finished),
            what,
            dropped: 0,
        }
    }

    pub fn send(&mut self, json: Vec<u8>) {
        let Some(queue) = &self.queue else {
            return;
        };
        match queue.try_send(json) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped += 1;
                if self.dropped == 1 {
                    tracing::warn!(
                        "{} is not keeping up: alerts are dropped ({QUEUE} wait already)",
                        self.what
                    );
                }
            }
            Err(TrySendError::Disconnected(_)) => self.queue = None,
        }
    }
}

impl Drop for Background {
    /// Lets the queued alerts go out before memscope ends, for `DRAIN` at
    /// most.
    fn drop(&mut self) {
        self.queue = None;
        if let Some(finished) = self.finished.take()
            && finished.recv_timeout(DRAIN).is_err()
        {
            tracing::warn!(
                "{}: alerts still queued after {DRAIN:?} were given up",
                self.what
            );
        }
    }
}
