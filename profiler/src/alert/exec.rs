//! `--alert-exec CMD`: runs `sh -c CMD` per alert with the alert's JSON on
//! its standard input.

use std::{
    io::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::{Alert, Sink};
use crate::background::Background;

/// A command still running after this is killed.
const TIMEOUT: Duration = Duration::from_secs(10);

pub struct ExecSink {
    background: Background<Vec<u8>>,
}

impl ExecSink {
    pub fn new(command: String) -> Self {
        let what = format!("--alert-exec {command}");
        Self {
            background: Background::start(what, "alert", move |json: &Vec<u8>| run(&command, json)),
        }
    }
}

impl Sink for ExecSink {
    fn send(&mut self, alert: &Alert) {
        if let Ok(json) = serde_json::to_vec(alert) {
            self.background.send(json);
        }
    }
}

fn run(command: &str, json: &[u8]) -> Result<(), String> {
    let mut child = Command::new("/bin/sh")
        .args(["-c", command])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(json);
    }
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("exited with {status}")),
            Ok(None) if started.elapsed() > TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("still running after {TIMEOUT:?}: killed"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.to_string()),
        }
    }
}
