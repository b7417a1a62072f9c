//! Live numbers for people and for Prometheus, shared by nbd-proxy and the replicator:
//!
//! * [`Sampler`]: counters sampled every [`SAMPLE_PERIOD`], turned into per-second rates over
//!   the last 1 s and the last 10 s ([`Windows`]) for `status`.
//! * [`Exposition`]: the Prometheus text exposition format 0.0.4 (`# HELP`, `# TYPE`, label
//!   values escaped), rendered from a snapshot.
//! * [`serve_http`]: a tiny HTTP/1.1 responder on its own threads that answers `GET /metrics`
//!   and 404 to any other path. Each connection has [`HTTP_DEADLINE`] to send a request head of
//!   at most [`MAX_REQUEST`] bytes, at most [`MAX_CLIENTS`] are served at once (more are
//!   closed), and every reply closes the connection: a hostile client holds nothing for long.
//!   The renderer reads a snapshot or atomics, so a scrape never waits on the data path.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How often counters are sampled for rates.
pub const SAMPLE_PERIOD: Duration = Duration::from_millis(250);
/// The longest rate window kept.
const LONGEST_WINDOW: Duration = Duration::from_secs(10);

/// Counters sampled at [`SAMPLE_PERIOD`], the last 10 s (and a little more) of them.
#[derive(Debug, Clone)]
pub struct Sampler<const N: usize> {
    samples: VecDeque<(Instant, [u64; N])>,
}

impl<const N: usize> Default for Sampler<N> {
    fn default() -> Self {
        Sampler {
            samples: VecDeque::new(),
        }
    }
}

/// Per-second rates of each counter over `seconds` (0 when there is nothing to compare yet).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate<const N: usize> {
    pub seconds: f64,
    pub per_s: [f64; N],
}

/// The two windows `status` reports: the last second, and the last ten.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Windows<T> {
    #[serde(rename = "1s")]
    pub last_1s: T,
    #[serde(rename = "10s")]
    pub last_10s: T,
}

impl<const N: usize> Sampler<N> {
    /// Adds a sample of the counters, dropping those older than the longest window needs.
    pub fn push(&mut self, at: Instant, values: [u64; N]) {
        self.samples.push_back((at, values));
        while self.samples.len() > 2
            && self.samples.get(1).is_some_and(|(t, _)| {
                at.saturating_duration_since(*t) >= LONGEST_WINDOW + SAMPLE_PERIOD
            })
        {
            self.samples.pop_front();
        }
    }

    /// Rates from the newest sample back to the newest one at least `window` older (or the
    /// oldest kept, just after start). A counter that went back (a reopened group) counts 0.
    /// Values are rounded to 0.001, so that they read back from JSON as the same numbers
    /// (the store's checksummed status files compare them).
    pub fn rate(&self, window: Duration) -> Rate<N> {
        let zero = Rate {
            seconds: 0.0,
            per_s: [0.0; N],
        };
        let Some(&(t1, v1)) = self.samples.back() else {
            return zero;
        };
        let Some(&(t0, v0)) = self
            .samples
            .iter()
            .rev()
            .find(|(t, _)| t1.saturating_duration_since(*t) >= window)
            .or_else(|| self.samples.front())
        else {
            return zero;
        };
        let seconds = t1.saturating_duration_since(t0).as_secs_f64();
        if seconds <= 0.0 {
            return zero;
        }
        let mut per_s = [0.0; N];
        for (r, (a, b)) in per_s.iter_mut().zip(v0.iter().zip(&v1)) {
            *r = round3(b.saturating_sub(*a) as f64 / seconds);
        }
        Rate {
            seconds: round3(seconds),
            per_s,
        }
    }

    /// Both windows, each made into what status shows by `make`.
    pub fn windows<T>(&self, make: impl Fn(Rate<N>) -> T) -> Windows<T> {
        Windows {
            last_1s: make(self.rate(Duration::from_secs(1))),
            last_10s: make(self.rate(LONGEST_WINDOW)),
        }
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// `7.5 MiB/s` for people.
pub fn mib_per_s(bytes_per_s: f64) -> String {
    format!("{:.1} MiB/s", bytes_per_s / (1024.0 * 1024.0))
}

impl<T> Windows<T> {
    /// Prints both windows under a `rates` heading in a status column, one line each after
    /// `indent`: the window (`last 1 s:`, or the span measured so far just after the start),
    /// then what `line` says of its rates. `seconds` reads the span a window measured.
    pub fn print(&self, indent: &str, seconds: impl Fn(&T) -> f64, line: impl Fn(&T) -> String) {
        for (nominal, r) in [(1, &self.last_1s), (10, &self.last_10s)] {
            println!(
                "{indent}{:<11} {:<10} {}",
                if nominal == 1 { "rates" } else { "" },
                format!("{}:", window_label(nominal, seconds(r))),
                line(r)
            );
        }
    }
}

/// The label of a rate window in human output (`last 1 s`, or the span measured so far).
fn window_label(nominal: u32, seconds: f64) -> String {
    if seconds + 0.05 >= f64::from(nominal) || seconds == 0.0 {
        format!("last {nominal} s")
    } else {
        format!("last {seconds:.1} s")
    }
}

/// A sample's value: integers stay exact (seqs, byte counts), floats as Prometheus reads them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Value {
        Value::Int(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Int(u64::from(v))
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::Float(v)
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Float(v) if v.is_nan() => f.write_str("NaN"),
            Value::Float(v) if v == f64::INFINITY => f.write_str("+Inf"),
            Value::Float(v) if v == f64::NEG_INFINITY => f.write_str("-Inf"),
            Value::Float(v) => write!(f, "{v}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Type {
    Counter,
    Gauge,
}

#[derive(Debug)]
struct Family {
    name: String,
    kind: Type,
    help: String,
    /// Rendered label sets (`{a="b"}` or empty) with their values.
    samples: Vec<(String, Value)>,
}

/// Metric families in the Prometheus text format, version 0.0.4. Samples of one family may be
/// added in any order (group by group): each family is written once, with its HELP and TYPE.
#[derive(Debug, Default)]
pub struct Exposition {
    families: Vec<Family>,
}

/// The `Content-Type` of [`Exposition::render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Exposition {
    /// A counter: only ever grows (until the process restarts); its name ends in `_total`.
    pub fn counter(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        value: impl Into<Value>,
    ) {
        assert!(
            name.ends_with("_total"),
            "counter {name} must end in _total"
        );
        self.add(name, Type::Counter, help, labels, value.into());
    }

    /// A gauge: a value that goes up and down (seqs, sizes, 0/1 states).
    pub fn gauge(
        &mut self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        value: impl Into<Value>,
    ) {
        self.add(name, Type::Gauge, help, labels, value.into());
    }

    fn add(&mut self, name: &str, kind: Type, help: &str, labels: &[(&str, &str)], value: Value) {
        assert!(valid_name(name), "metric name {name:?}");
        let mut set = String::new();
        for (i, (k, v)) in labels.iter().enumerate() {
            assert!(valid_name(k) && !k.contains(':'), "label name {k:?}");
            set.push(if i == 0 { '{' } else { ',' });
            let _ = write!(set, "{k}=\"{}\"", escape_label(v));
        }
        if !labels.is_empty() {
            set.push('}');
        }
        match self.families.iter_mut().find(|f| f.name == name) {
            Some(f) => f.samples.push((set, value)),
            None => self.families.push(Family {
                name: name.to_owned(),
                kind,
                help: help.to_owned(),
                samples: vec![(set, value)],
            }),
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.families {
            let kind = match f.kind {
                Type::Counter => "counter",
                Type::Gauge => "gauge",
            };
            let _ = writeln!(out, "# HELP {} {}", f.name, escape_help(&f.help));
            let _ = writeln!(out, "# TYPE {} {kind}", f.name);
            for (labels, value) in &f.samples {
                let _ = writeln!(out, "{}{labels} {value}", f.name);
            }
        }
        out
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// A label value as the format wants it: backslash, double quote and line feed escaped.
pub fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// HELP text: backslash and line feed escaped.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Time a client has to send its request head; also every write's deadline.
pub const HTTP_DEADLINE: Duration = Duration::from_secs(2);
/// Largest request head read (request line and headers).
pub const MAX_REQUEST: usize = 8 << 10;
/// Connections served at once; more are closed at once.
pub const MAX_CLIENTS: usize = 8;

/// Serves `GET /metrics` with what `render` returns, on threads of its own, for as long as the
/// process runs.
pub fn serve_http(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<()> {
    let busy = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(stream) = conn else {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                    busy.fetch_sub(1, Ordering::AcqRel);
                    continue; // closed: a scraper retries at its next interval
                }
                let (slot, render) = (Slot(busy.clone()), render.clone());
                let spawned = std::thread::Builder::new()
                    .name("metrics client".into())
                    .spawn(move || {
                        let _slot = slot;
                        answer(stream, &*render);
                    });
                if spawned.is_err() {
                    tracing::warn!("metrics: cannot start a thread for a client");
                }
            }
        })?;
    Ok(())
}

/// A client's place among [`MAX_CLIENTS`], given back however its thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn answer(mut stream: TcpStream, render: &dyn Fn() -> String) {
    let reply = match read_head(&stream) {
        Ok(head) => respond(&head, render),
        Err(status) => Reply::error(status),
    };
    let _ = stream.set_write_timeout(Some(HTTP_DEADLINE));
    let _ = stream.write_all(&reply.bytes());
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Reads up to the blank line that ends the request head, within [`HTTP_DEADLINE`] in all.
fn read_head(mut stream: &TcpStream) -> Result<Vec<u8>, u16> {
    let until = Instant::now() + HTTP_DEADLINE;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        if let Some(end) = head_end(&head) {
            head.truncate(end);
            return Ok(head);
        }
        if head.len() >= MAX_REQUEST {
            return Err(431);
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return Err(408);
        }
        match stream.read(&mut buf) {
            Ok(0) => return Err(400),
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Err(408),
        }
    }
}

fn head_end(head: &[u8]) -> Option<usize> {
    let crlf = head.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = head.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// An HTTP reply: status, content type, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    fn error(status: u16) -> Reply {
        let reason = reason(status);
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{status} {reason}\n"),
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        if self.status == 405 {
            out.push_str("Allow: GET\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(self.body.as_bytes());
        bytes
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    }
}

/// The reply to one request head: `GET /metrics` (a query string is ignored) renders; any
/// other path is 404, any other method 405.
pub fn respond(head: &[u8], render: &dyn Fn() -> String) -> Reply {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let Ok(line) = std::str::from_utf8(line) else {
        return Reply::error(400);
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Reply::error(400);
    };
    if !version.starts_with("HTTP/1.") {
        return Reply::error(400);
    }
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" {
        return Reply::error(404);
    }
    if method != "GET" {
        return Reply::error(405);
    }
    Reply {
        status: 200,
        content_type: CONTENT_TYPE,
        body: render(),
    }
}

#[cfg(test)]
mod tests;
