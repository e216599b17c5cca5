//! `--alert-webhook URL`: POSTs each alert's JSON to a plain-HTTP endpoint
//! (a local relay, Alertmanager-style receivers), with timeouts and
//! retries, off the collection thread.

use std::{
    io::{Read as _, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    time::Duration,
};

use bytes::{BufMut as _, BytesMut};

use super::{Alert, Sink, background::Background};

/// Connecting, writing and reading the answer each get this long.
const TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(
        "--alert-webhook {0}: only http://HOST[:PORT]/PATH is supported (for https, POST through a local relay)"
    )]
    Unsupported(String),
}

/// Where the alerts go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    host: String,
    port: u16,
    path: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Self, WebhookError> {
        let unsupported = || WebhookError::Unsupported(url.to_owned());
        let rest = url.strip_prefix("http://").ok_or_else(unsupported)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().map_err(|_| unsupported())?),
            None => (authority, 80),
        };
        if host.is_empty() || path.contains(char::is_whitespace) {
            return Err(unsupported());
        }
        Ok(Self {
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }

    fn post(&self, json: &[u8]) -> Result<(), String> {
        let address = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", self.host))?
            .next()
            .ok_or_else(|| format!("{} has no address", self.host))?;
        let mut stream =
            TcpStream::connect_timeout(&address, TIMEOUT).map_err(|e| e.to_string())?;
        stream
            .set_write_timeout(Some(TIMEOUT))
            .map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(TIMEOUT))
            .map_err(|e| e.to_string())?;
        stream
            .write_all(&self.request(json))
            .map_err(|e| e.to_string())?;
        let mut answer = [0u8; 64];
        let n = stream.read(&mut answer).map_err(|e| e.to_string())?;
        let status = String::from_utf8_lossy(&answer[..n]);
        // "HTTP/1.1 200 OK": any 2xx is taken.
        match status.split_whitespace().nth(1) {
            Some(code) if code.starts_with('2') => Ok(()),
            _ => Err(format!(
                "answered {:?}",
                status.lines().next().unwrap_or_default()
            )),
        }
    }

    fn request(&self, json: &[u8]) -> BytesMut {
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nUser-Agent: memscope/{}\r\nConnection: close\r\n\r\n",
            self.path,
            self.host,
            self.port,
            json.len(),
            env!("CARGO_PKG_VERSION")
        );
        let mut body = BytesMut::with_capacity(head.len() + json.len());
        body.put_slice(head.as_bytes());
        body.put_slice(json);
        body
    }
}

/// Checks `url` before anything is attached: a typo is said at once.
pub fn check(url: &str) -> Result<(), WebhookError> {
    Endpoint::parse(url).map(|_| ())
}

pub struct WebhookSink {
    background: Background,
}

impl WebhookSink {
    pub fn new(url: &str) -> Result<Self, WebhookError> {
        let endpoint = Endpoint::parse(url)?;
        let what = format!("--alert-webhook {url}");
        Ok(Self {
            background: Background::start(what, move |json| endpoint.post(json)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_http_host_port_and_path() {
        let e = Endpoint::parse("http://127.0.0.1:9000/hooks/memscope").expect("parses");
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("127.0.0.1", 9000, "/hooks/memscope")
        );
        let e = Endpoint::parse("http://alerts.local").expect("parses");
        assert_eq!((e.port, e.path.as_str()), (80, "/"));
        assert!(Endpoint::parse("https://x/").is_err());
        assert!(Endpoint::parse("http://:80/").is_err());
        assert!(Endpoint::parse("http://x:port/").is_err());
    }

    #[test]
    fn the_request_carries_the_json_with_its_length() {
        let e = Endpoint::parse("http://h:1/p").expect("parses");
        let request = e.request(b"{\"a\":1}");
        let text = String::from_utf8_lossy(&request);
        assert!(
            text.starts_with("POST /p HTTP/1.1\r\nHost: h:1\r\n"),
            "{text}"
        );
        assert!(text.contains("Content-Length: 7\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"a\":1}"));
    }
}
