//! `--alert-webhook URL`: POSTs each alert's JSON to a plain-HTTP endpoint
//! (a local relay, Alertmanager-style receivers), with timeouts and
//! retries, off the collection thread.

use super::{Alert, Sink};
use crate::background::Background;
use crate::http::Endpoint;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(
        "--alert-webhook {0}: only http://HOST[:PORT]/PATH is supported (for https, POST through a local relay)"
    )]
    Unsupported(String),
}

/// Checks `url` before anything is attached: a typo is said at once.
pub fn check(url: &str) -> Result<(), WebhookError> {
    parse(url).map(|_| ())
}

fn parse(url: &str) -> Result<Endpoint, WebhookError> {
    Endpoint::parse(url).ok_or_else(|| WebhookError::Unsupported(url.to_owned()))
}

pub struct WebhookSink {
    background: Background<Vec<u8>>,
}

impl WebhookSink {
    pub fn new(url: &str) -> Result<Self, WebhookError> {
        let endpoint = parse(url)?;
        let what = format!("--alert-webhook {url}");
        Ok(Self {
            background: Background::start(what, "alert", move |json: &Vec<u8>| {
                endpoint.post(endpoint.path(), "application/json", json)
            }),
        })
    }
}

impl Sink for WebhookSink {
    fn send(&mut self, alert: &Alert) {
        if let Ok(json) = serde_json::to_vec(alert) {
            self.background.send(json);
        }
    }
}
