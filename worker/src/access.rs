//! The access log (`--access-log PATH|-`): one line per request and
//! tunnel, written by a task of its own so no request waits on the disk.
//! A request's line is written when it is over (a response's body sent, a
//! tunnel closed), with the bytes each way. Reopened when the worker
//! reloads (SIGHUP, `rotor reload`), for logrotate. Never a password, a
//! path, a query or userinfo: the target is host and port.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tracing::warn;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// Where the lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    File(PathBuf),
}

/// One request or tunnel.
#[derive(Debug, Clone)]
pub struct Entry {
    pub time: SystemTime,
    pub started: Instant,
    pub client: SocketAddr,
    pub user: Option<String>,
    pub session: Option<String>,
    pub method: String,
    /// Host and port.
    pub target: String,
    pub source: Option<IpAddr>,
    pub status: u16,
    /// The `Proxy-Status` error of rotor's own answer.
    pub error: Option<&'static str>,
    pub sent: u64,
    pub received: u64,
}

impl Entry {
    pub fn new(client: SocketAddr, method: &str, target: String) -> Entry {
        Entry {
            time: SystemTime::now(),
            started: Instant::now(),
            client,
            user: None,
            session: None,
            method: method.to_string(),
            target,
            source: None,
            status: 0,
            error: None,
            sent: 0,
            received: 0,
        }
    }

    fn line(&self, format: Format, took: Duration) -> String {
        let time = humantime::format_rfc3339_millis(self.time);
        let ms = took.as_secs_f64() * 1000.0;
        match format {
            Format::Json => {
                let mut v = serde_json::json!({
                    "time": time.to_string(),
                    "client": self.client.to_string(),
                    "user": self.user,
                    "session": self.session,
                    "method": self.method,
                    "target": self.target,
                    "source": self.source.map(|s| s.to_string()),
                    "status": self.status,
                    "error": self.error,
                    "sent": self.sent,
                    "received": self.received,
                });
                v["ms"] = serde_json::json!((ms * 1000.0).round() / 1000.0);
                v.to_string()
            }
            Format::Text => {
                let dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
                format!(
                    "{time} {} {} {} {} {} {} {} {} {} {} {ms:.3}",
                    self.client,
                    quote(&dash(&self.user)),
                    quote(&dash(&self.session)),
                    self.method,
                    quote(&self.target),
                    self.source.map_or("-".into(), |s| s.to_string()),
                    self.status,
                    self.error.unwrap_or("-"),
                    self.sent,
                    self.received,
                )
            }
        }
    }
}

/// A field of a text line: as it is when it has no space, quote or
/// control character, else quoted with those escaped.
fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        return s.to_string();
    }
    let mut q = String::from("\"");
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                q.push('\\');
                q.push(c);
            }
            c if c.is_control() => q.push_str(&format!("\\x{:02x}", c as u32)),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

enum Msg {
    Line(String),
    Reopen,
}

pub struct AccessLog {
    tx: mpsc::Sender<Msg>,
    format: Format,
    /// Lines lost because the writer fell behind.
    pub dropped: AtomicU64,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("format", &self.format)
            .finish()
    }
}

/// Lines waiting for the writer at most; past it they are dropped (and
/// counted) rather than hold requests up.
const QUEUE: usize = 65_536;

impl AccessLog {
    /// Opens the log (a file is appended to, created if need be) and
    /// starts its writer.
    pub fn open(target: Target, format: Format) -> std::io::Result<Arc<AccessLog>> {
        let mut out = Output::open(&target)?;
        let (tx, mut rx) = mpsc::channel::<Msg>(QUEUE);
        let log = Arc::new(AccessLog {
            tx,
            format,
            dropped: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&log);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                while let Some(msg) = rx.blocking_recv() {
                    let mut next = Some(msg);
                    // Everything queued, then one flush.
                    while let Some(m) = next {
                        match m {
                            Msg::Line(l) => out.write_line(&l),
                            Msg::Reopen => {
                                out.flush();
                                match Output::open(&target) {
                                    Ok(o) => out = o,
                                    Err(e) => warn!(error = %e, "cannot reopen the access log; writing to the old file"),
                                }
                            }
                        }
                        next = rx.try_recv().ok();
                    }
                    out.flush();
                    if let Some(log) = weak.upgrade() {
                        let n = log.dropped.swap(0, Ordering::Relaxed);
                        if n > 0 {
                            warn!(lines = n, "the access log fell behind: lines dropped");
                        }
                    }
                }
                out.flush();
            })?;
        Ok(log)
    }

    /// Writes `e`'s line, done now.
    pub fn log(&self, e: &Entry) {
        let line = e.line(self.format, e.started.elapsed());
        if self.tx.try_send(Msg::Line(line)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reopens the file (after logrotate moved it).
    pub fn reopen(&self) {
        let _ = self.tx.try_send(Msg::Reopen);
    }
}

enum Output {
    Stdout(std::io::BufWriter<std::io::Stdout>),
    File(std::io::BufWriter<std::fs::File>),
}

impl Output {
    fn open(target: &Target) -> std::io::Result<Output> {
        Ok(match target {
            Target::Stdout => Output::Stdout(std::io::BufWriter::new(std::io::stdout())),
            Target::File(p) => Output::File(std::io::BufWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            )),
        })
    }

    fn write_line(&mut self, l: &str) {
        let r = match self {
            Output::Stdout(w) => writeln!(w, "{l}"),
            Output::File(w) => writeln!(w, "{l}"),
        };
        if let Err(e) = r {
            warn!(error = %e, "cannot write the access log");
        }
    }

    fn flush(&mut self) {
        let _ = match self {
            Output::Stdout(w) => w.flush(),
            Output::File(w) => w.flush(),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_quote_what_needs_it_and_carry_no_secrets() {
        let mut e = Entry::new(
            "127.0.0.1:5000".parse().unwrap(),
            "GET",
            "example.com:80".into(),
        );
        e.user = Some("al ice".into());
        e.source = Some("10.0.0.1".parse().unwrap());
        e.status = 200;
        e.received = 12;
        let l = e.line(Format::Text, Duration::from_millis(5));
        assert!(
            l.contains(" 127.0.0.1:5000 \"al ice\" - GET example.com:80 10.0.0.1 200 - 0 12 5.000"),
            "{l}"
        );
        let j: serde_json::Value =
            serde_json::from_str(&e.line(Format::Json, Duration::from_millis(5))).unwrap();
        assert_eq!(j["user"], "al ice");
        assert_eq!(j["session"], serde_json::Value::Null);
        assert_eq!(j["status"], 200);
        assert_eq!(quote("a\"b\n"), "\"a\\\"b\\x0a\"");
    }
}
