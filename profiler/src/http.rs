//! A plain-HTTP POST with timeouts, for `--alert-webhook` and
//! `--pprof-push`: one request per connection, the status line read back.
//! https goes through a local relay (a sidecar, an agent such as Grafana
//! Alloy), which keeps TLS and its certificates out of a root process.

use std::{
    io::{Read as _, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    time::Duration,
};

use bytes::{BufMut as _, BytesMut};

/// Connecting, writing and reading the answer each get this long.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Where requests go: `http://HOST[:PORT][/PATH]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    host: String,
    port: u16,
    path: String,
}

impl Endpoint {
    /// None unless `url` is `http://HOST[:PORT][/PATH]`.
    pub fn parse(url: &str) -> Option<Self> {
        let rest = url.strip_prefix("http://")?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().ok()?),
            None => (authority, 80),
        };
        if host.is_empty() || path.contains(char::is_whitespace) {
            return None;
        }
        Some(Self {
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }

    /// The URL's path (and query), `/` when it had none.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// POSTs `body` to `target` (a path and query) on the endpoint's host;
    /// Ok on a 2xx answer, else what went wrong, in words.
    pub fn post(&self, target: &str, content_type: &str, body: &[u8]) -> Result<(), String> {
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
            .write_all(&self.request(target, content_type, body))
            .map_err(|e| e.to_string())?;
        // The status line may come in pieces.
        let mut answer = [0u8; 64];
        let mut n = 0;
        while n < answer.len() && !answer[..n].contains(&b'\n') {
            match stream.read(&mut answer[n..]).map_err(|e| e.to_string())? {
                0 => break,
                read => n += read,
            }
        }
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

    fn request(&self, target: &str, content_type: &str, body: &[u8]) -> BytesMut {
        let head = format!(
            "POST {target} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nUser-Agent: memscope/{}\r\nConnection: close\r\n\r\n",
            self.host,
            self.port,
            body.len(),
            env!("CARGO_PKG_VERSION")
        );
        let mut request = BytesMut::with_capacity(head.len() + body.len());
        request.put_slice(head.as_bytes());
        request.put_slice(body);
        request
    }
}

/// `text` as a URL query value: unreserved characters kept, every other
/// byte as `%XX`.
pub fn query_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_http_host_port_and_path() {
        let e = Endpoint::parse("http://127.0.0.1:9000/hooks/memscope").expect("parses");
        assert_eq!(
            (e.host.as_str(), e.port, e.path()),
            ("127.0.0.1", 9000, "/hooks/memscope")
        );
        let e = Endpoint::parse("http://alerts.local").expect("parses");
        assert_eq!((e.port, e.path()), (80, "/"));
        assert!(Endpoint::parse("https://x/").is_none());
        assert!(Endpoint::parse("http://:80/").is_none());
        assert!(Endpoint::parse("http://x:port/").is_none());
    }

    #[test]
    fn the_request_carries_the_body_with_its_length() {
        let e = Endpoint::parse("http://h:1/p").expect("parses");
        let request = e.request("/p?q=1", "application/json", b"{\"a\":1}");
        let text = String::from_utf8_lossy(&request);
        assert!(
            text.starts_with(
                "POST /p?q=1 HTTP/1.1\r\nHost: h:1\r\nContent-Type: application/json\r\n"
            ),
            "{text}"
        );
        assert!(text.contains("Content-Length: 7\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"a\":1}"));
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(
            query_value("memscope.server{pid=42}"),
            "memscope.server%7Bpid%3D42%7D"
        );
        assert_eq!(query_value("a b/é"), "a%20b%2F%C3%A9");
    }
}
