//! A sink that may be slow (a webhook, a command, a profile push) runs on a
//! thread of its own behind a bounded queue, so the collection loop never
//! waits on it: a full queue drops the item and counts it.

use std::{
    sync::{
        Arc, Mutex,
        mpsc::{self, SyncSender, TrySendError},
    },
    thread,
    time::Duration,
};

/// Items waiting for a slow sink before new ones are dropped.
const QUEUE: usize = 64;

/// At memscope's end, how long the items still queued may take to go out;
/// after that they are given up, so a dead endpoint cannot hold the end.
const DRAIN: Duration = Duration::from_secs(5);

/// Tries per item, with these pauses between them.
const RETRY_PAUSES: [Duration; 2] = [Duration::from_millis(500), Duration::from_secs(2)];

/// What became of the items sent, as far as the thread got.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delivery {
    pub delivered: u64,
    /// Given up after every retry.
    pub failed: u64,
    /// Dropped because the queue was full.
    pub dropped: u64,
    /// Not sent before the end's drain ran out.
    pub abandoned: bool,
    /// The last failure, in words.
    pub last_error: Option<String>,
}

pub struct Background<T: Send + 'static> {
    queue: Option<SyncSender<T>>,
    /// Says when the thread has sent everything.
    finished: Option<mpsc::Receiver<()>>,
    /// What the sink is, for messages: `--alert-webhook URL`.
    what: String,
    /// What it sends, for messages: "alert", "profile".
    item: &'static str,
    delivery: Arc<Mutex<Delivery>>,
}

impl<T: Send + 'static> Background<T> {
    /// Starts the thread; `deliver` sends one item, saying why not.
    pub fn start(
        what: String,
        item: &'static str,
        mut deliver: impl FnMut(&T) -> Result<(), String> + Send + 'static,
    ) -> Self {
        let (queue, items) = mpsc::sync_channel::<T>(QUEUE);
        let (done, finished) = mpsc::channel();
        let delivery = Arc::new(Mutex::new(Delivery::default()));
        let (name, record) = (what.clone(), Arc::clone(&delivery));
        let started = thread::Builder::new()
            .name(format!("memscope-{item}s"))
            .spawn(move || {
                for next in items {
                    let outcome = with_retries(|| deliver(&next));
                    let Ok(mut record) = record.lock() else {
                        continue;
                    };
                    match outcome {
                        Ok(()) => record.delivered += 1,
                        Err(error) => {
                            tracing::warn!("{item} not delivered to {name}: {error}");
                            record.failed += 1;
                            record.last_error = Some(error);
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
            item,
            delivery,
        }
    }

    pub fn send(&mut self, next: T) {
        let Some(queue) = &self.queue else {
            return;
        };
        match queue.try_send(next) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                let Ok(mut record) = self.delivery.lock() else {
                    return;
                };
                record.dropped += 1;
                if record.dropped == 1 {
                    tracing::warn!(
                        "{} is not keeping up: {}s are dropped ({QUEUE} wait already)",
                        self.what,
                        self.item
                    );
                }
            }
            Err(TrySendError::Disconnected(_)) => self.queue = None,
        }
    }

    /// Lets the queued items go out, for `DRAIN` at most, and says what
    /// became of everything sent.
    pub fn finish(mut self) -> Delivery {
        self.drain();
        self.delivery.lock().map(|d| d.clone()).unwrap_or_default()
    }

    fn drain(&mut self) {
        self.queue = None;
        if let Some(finished) = self.finished.take()
            && finished.recv_timeout(DRAIN).is_err()
        {
            tracing::warn!(
                "{}: {}s still queued after {DRAIN:?} were given up",
                self.what,
                self.item
            );
            if let Ok(mut record) = self.delivery.lock() {
                record.abandoned = true;
            }
        }
    }
}

/// `attempt`, tried again after each of `RETRY_PAUSES` while it fails.
fn with_retries(mut attempt: impl FnMut() -> Result<(), String>) -> Result<(), String> {
    let mut pauses = RETRY_PAUSES.iter();
    loop {
        match attempt() {
            Ok(()) => return Ok(()),
            Err(error) => match pauses.next() {
                Some(pause) => thread::sleep(*pause),
                None => return Err(error),
            },
        }
    }
}

impl<T: Send + 'static> Drop for Background<T> {
    /// Lets the queued items go out before memscope ends.
    fn drop(&mut self) {
        self.drain();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_sent_is_delivered_before_finish_returns() {
        let mut sink = Background::start("test".into(), "item", |_: &u32| Ok(()));
        sink.send(2);
        sink.send(4);
        let delivery = sink.finish();
        assert_eq!(delivery.delivered, 2);
        assert_eq!(delivery.failed, 0);
        assert!(!delivery.abandoned);
    }
}
