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

use tracing::warn;

use crate::text;

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

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Stdout => f.write_str("-"),
            Target::File(p) => write!(f, "{}", p.display()),
        }
    }
}

impl Target {
    /// Whether the log could be opened, found without opening it for good
    /// and without making anything: `--check`, and `rotor up`'s check
    /// before its workers start, must leave no file behind.
    pub fn check(&self) -> std::io::Result<()> {
        use std::io::{Error, ErrorKind};
        let Target::File(path) = self else {
            return Ok(());
        };
        // (Checked as `.`, an empty path passed, and failed each open.)
        if path.as_os_str().is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "is empty: name a file, or `-` for standard output",
            ));
        }
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => Err(Error::new(ErrorKind::InvalidInput, "is a directory")),
            // Opened to append, not created: it is there.
            Ok(_) => std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .map(drop),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let dir = match path.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => std::path::Path::new("."),
                };
                nix::unistd::access(
                    dir,
                    nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
                )
                .map_err(|e| {
                    Error::new(
                        Error::from(e).kind(),
                        format!("cannot be made in {}: {}", dir.display(), e.desc()),
                    )
                })
            }
            Err(e) => Err(e),
        }
    }
}

/// One request or tunnel.
#[derive(Debug, Clone)]
pub struct Entry {
    /// When the request began (its time of day is read when it is logged).
    pub started: Instant,
    pub client: SocketAddr,
    pub user: Option<String>,
    pub session: Option<String>,
    pub method: http::Method,
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
    pub fn new(
        started: Instant,
        client: SocketAddr,
        method: http::Method,
        target: String,
    ) -> Entry {
        Entry {
            started,
            client,
            user: None,
            session: None,
            method,
            target,
            source: None,
            status: 0,
            error: None,
            sent: 0,
            received: 0,
        }
    }

    /// Appends the entry's line (with its newline) to `out`; `clock`
    /// keeps the last second's text, so most lines do not format a date.
    /// Numbers and addresses are written by hand (`crate::text`): with
    /// `write!` a line cost ≈ 4 900 instructions, most of a logged
    /// request's extra.
    fn write_line(&self, format: Format, took: Duration, out: &mut Vec<u8>, clock: &mut Clock) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let json = format == Format::Json;
        let sep = |out: &mut Vec<u8>, key: &str| match json {
            true => {
                out.extend_from_slice(b",\"");
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(b"\":");
            }
            false => out.push(b' '),
        };
        // An address, quoted in JSON.
        let quote = |out: &mut Vec<u8>| {
            if json {
                out.push(b'"');
            }
        };
        if json {
            out.extend_from_slice(b"{\"time\":\"");
        }
        let time = SystemTime::now()
            .checked_sub(took)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        clock.write(time, out);
        if json {
            out.push(b'"');
        }
        sep(out, "client");
        quote(out);
        text::push_socket_addr(out, self.client);
        quote(out);
        sep(out, "user");
        field(out, json, self.user.as_deref());
        sep(out, "session");
        field(out, json, self.session.as_deref());
        sep(out, "method");
        field(out, json, Some(self.method.as_str()));
        sep(out, "target");
        field(out, json, Some(&self.target));
        sep(out, "source");
        match self.source {
            Some(ip) => {
                quote(out);
                text::push_ip(out, ip);
                quote(out);
            }
            None => field(out, json, None),
        }
        sep(out, "status");
        text::push_decimal(out, self.status.into());
        sep(out, "error");
        field(out, json, self.error);
        sep(out, "sent");
        text::push_decimal(out, self.sent);
        sep(out, "received");
        text::push_decimal(out, self.received);
        sep(out, "ms");
        text::push_decimal(out, micros / 1000);
        out.push(b'.');
        text::push_three_digits(out, (micros % 1000) as u32);
        if json {
            out.push(b'}');
        }
        out.push(b'\n');
    }

    #[cfg(test)]
    fn line(&self, format: Format, took: Duration) -> String {
        let mut s = Vec::new();
        self.write_line(format, took, &mut s, &mut Clock::default());
        s.pop();
        String::from_utf8(s).expect("a line is UTF-8")
    }
}

/// A value: JSON (a string, or `null`), or text (as it is when it has no
/// space, quote or control character, else quoted; `-` for none).
fn field(out: &mut Vec<u8>, json: bool, v: Option<&str>) {
    match (v, json) {
        (None, true) => out.extend_from_slice(b"null"),
        (None, false) => out.push(b'-'),
        (Some(s), true) => push_quoted(out, s, true),
        (Some(s), false)
            if !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\') =>
        {
            out.extend_from_slice(s.as_bytes())
        }
        (Some(s), false) => push_quoted(out, s, false),
    }
}

fn push_quoted(out: &mut Vec<u8>, s: &str, json: bool) {
    // io::Write on a Vec cannot fail.
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push(b'\\');
                out.push(c as u8);
            }
            c if c.is_control() && json => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            // Written as they are, these would make a line read otherwise
            // than it is (a user name that turns the rest of the line
            // around, or seems to end it): `\u202e`, in both formats.
            c if crate::text::reorders(c) => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out.push(b'"');
}

/// The text of the last second a line was written in.
#[derive(Default)]
struct Clock {
    second: u64,
    text: String,
}

impl Clock {
    /// `2026-12-01T22:57:00.631Z`.
    fn write(&mut self, t: SystemTime, out: &mut Vec<u8>) {
        let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let second = since.as_secs();
        if second != self.second || self.text.is_empty() {
            self.second = second;
            // `…:00Z` without the `Z`: the milliseconds go before it.
            let full = humantime::format_rfc3339_seconds(t).to_string();
            self.text = full.trim_end_matches('Z').to_string();
        }
        out.extend_from_slice(self.text.as_bytes());
        out.push(b'.');
        text::push_three_digits(out, since.subsec_millis());
        out.push(b'Z');
    }
}

/// Lines written and not yet taken by the writer; and at a reopen, the
/// lines written before it (for the old file) and the file reopened
/// (for `text`, and what comes after).
#[derive(Default)]
struct Pending {
    text: Vec<u8>,
    clock: Clock,
    reopened: Option<(Vec<u8>, Output)>,
    closed: bool,
}

pub struct AccessLog {
    pending: Arc<std::sync::Mutex<Pending>>,
    target: Target,
    format: Format,
    /// Lines lost because the writer fell behind.
    pub dropped: Arc<AtomicU64>,
    writer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("format", &self.format)
            .finish()
    }
}

/// Lines this worker's access log lost, not yet reported: dropped as its
/// writer fell behind, or in a write that failed (a full disk). Its
/// metrics report takes them (`rotor_access_log_lost_lines_total`).
pub static LOST_LINES: AtomicU64 = AtomicU64::new(0);

/// Text waiting for the writer at most; past it lines are dropped (and
/// counted) rather than hold requests up or grow without bound.
const MAX_PENDING: usize = 16 << 20;
/// How often the writer takes what was written. Requests only append to a
/// buffer; nothing wakes a thread per line.
const EVERY: Duration = Duration::from_millis(100);

impl AccessLog {
    /// Opens the log (a file is appended to, created if need be) and
    /// starts its writer.
    pub fn open(target: Target, format: Format) -> std::io::Result<Arc<AccessLog>> {
        let mut out = Output::open(&target)?;
        let pending: Arc<std::sync::Mutex<Pending>> = Arc::default();
        let dropped: Arc<AtomicU64> = Arc::default();
        let (p, d) = (pending.clone(), dropped.clone());
        let writer = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || loop {
                std::thread::sleep(EVERY);
                let (text, reopened, closed) = {
                    let mut g = p.lock().unwrap_or_else(|e| e.into_inner());
                    (std::mem::take(&mut g.text), g.reopened.take(), g.closed)
                };
                // What was written before the reopen goes to the old file.
                if let Some((before, o)) = reopened {
                    out.write(&before);
                    out.flush();
                    out = o;
                }
                out.write(&text);
                out.flush();
                let n = d.swap(0, Ordering::Relaxed);
                if n > 0 {
                    LOST_LINES.fetch_add(n, Ordering::Relaxed);
                    warn!(lines = n, "the access log fell behind: lines dropped");
                }
                if closed {
                    return;
                }
            })?;
        Ok(Arc::new(AccessLog {
            pending,
            target,
            format,
            dropped,
            writer: std::sync::Mutex::new(Some(writer)),
        }))
    }

    /// Writes `e`'s line, done now.
    pub fn log(&self, e: &Entry) {
        let took = e.started.elapsed();
        let mut g = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if g.text.len() >= MAX_PENDING {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Pending { text, clock, .. } = &mut *g;
        e.write_line(self.format, took, text, clock);
    }

    /// Reopens the file (after logrotate moved it): the lines written
    /// from now on go to it. Opened here, so a reload can say it failed
    /// (logrotate's `create` with an owner this worker cannot write as):
    /// then the old file is written to still, and the error returned.
    pub fn reopen(&self) -> std::io::Result<()> {
        let out = Output::open(&self.target)?;
        let mut g = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match &mut g.reopened {
            // Twice before the writer ran: what came between goes to
            // the newer file.
            Some((_, o)) => *o = out,
            None => {
                let before = std::mem::take(&mut g.text);
                g.reopened = Some((before, out));
            }
        }
        Ok(())
    }

    /// Writes what is pending and stops the writer (at exit).
    pub fn close(&self) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed = true;
        if let Some(w) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // Waited for a while, not for ever: a writer stuck in a write
            // (stdout to a pipe nobody reads, a hung network mount) held
            // the worker's exit until its supervisor killed it.
            let until = std::time::Instant::now() + CLOSE_WAIT;
            while !w.is_finished() && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            match w.is_finished() {
                true => {
                    let _ = w.join();
                }
                false => warn!(
                    waited = ?CLOSE_WAIT,
                    "the access log's writer is stuck in a write; its last lines may be lost"
                ),
            }
        }
    }
}

/// How long the exit waits for the access log's last lines to be written.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The lines of requests dropped with the runtime (a drain that ran out)
/// are written when the last holder goes, with the runtime's tasks.
impl Drop for AccessLog {
    fn drop(&mut self) {
        self.close();
    }
}

/// Unbuffered: each batch is one write, so the lines of workers sharing
/// one file (O_APPEND) never interleave within a line.
struct Output {
    to: To,
    /// The last write failed part-way through a line (a disk full): the
    /// next starts with a line end, so the cut line does not run into it.
    cut: bool,
}

enum To {
    Stdout(std::io::Stdout),
    File(std::fs::File),
}

impl Output {
    fn open(target: &Target) -> std::io::Result<Output> {
        let to = match target {
            Target::Stdout => To::Stdout(std::io::stdout()),
            // A new file is 0640 whatever the umask (it names clients,
            // users, sessions and destinations: not every local user's to
            // read, as the state directory's files are not); an existing
            // one (logrotate's `create MODE`) keeps its mode.
            // (Made, then set to 0640: the umask takes bits off a mode
            // given at the making, and the units' UMask=0077 made it 0600,
            // unreadable to a log reader's group.)
            Target::File(p) => To::File(
                match std::os::unix::fs::OpenOptionsExt::mode(
                    std::fs::OpenOptions::new().create_new(true).append(true),
                    0o640,
                )
                .open(p)
                {
                    Ok(made) => {
                        use std::os::unix::fs::PermissionsExt;
                        made.set_permissions(std::fs::Permissions::from_mode(0o640))?;
                        made
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        std::fs::OpenOptions::new().append(true).open(p)?
                    }
                    Err(e) => return Err(e),
                },
            ),
        };
        Ok(Output { to, cut: false })
    }

    fn write(&mut self, text: &[u8]) {
        if text.is_empty() {
            return;
        }
        let r = write_lines(self.to.writer(), text, &mut self.cut);
        if let Err((e, lost)) = r {
            LOST_LINES.fetch_add(lost, Ordering::Relaxed);
            // Once in 10 s: a full disk fails every batch, 10 a second.
            static WARNED: crate::Moment = crate::Moment::new();
            if let Some(n) = WARNED.count_in(Duration::from_secs(10)) {
                warn!(error = %e, failures = n, "cannot write the access log; those lines are lost (said once in 10 s)");
            }
        }
    }

    fn flush(&mut self) {
        let _ = self.to.writer().flush();
    }
}

impl To {
    fn writer(&mut self) -> &mut dyn Write {
        match self {
            To::Stdout(w) => w,
            To::File(w) => w,
        }
    }
}

/// Writes `text` (whole lines) to `w`, after a line end if the last write
/// stopped within a line (`cut`, which this updates). On a failure, the
/// error and the lines of `text` not wholly written (a cut one counts).
fn write_lines(
    w: &mut dyn Write,
    text: &[u8],
    cut: &mut bool,
) -> Result<(), (std::io::Error, u64)> {
    let joined;
    let (buf, before) = match *cut {
        true => {
            joined = [b"\n".as_slice(), text].concat();
            (&joined[..], 1)
        }
        false => (text, 0),
    };
    let mut done = 0;
    while done < buf.len() {
        let e = match w.write(&buf[done..]) {
            Ok(0) => std::io::ErrorKind::WriteZero.into(),
            Ok(n) => {
                done += n;
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => e,
        };
        if done > 0 {
            *cut = buf[done - 1] != b'\n';
        }
        let unwritten = &text[done.saturating_sub(before)..];
        return Err((e, unwritten.iter().filter(|b| **b == b'\n').count() as u64));
    }
    *cut = false;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that fails part-way through a line (a full disk) is
    /// followed by a line end before the next lines: no line runs into
    /// the cut one.
    #[test]
    fn a_line_cut_by_a_failed_write_does_not_run_into_the_next() {
        /// Takes `room` bytes, then fails.
        struct Full {
            out: Vec<u8>,
            room: usize,
        }
        impl std::io::Write for Full {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                let n = b.len().min(self.room).min(7);
                if n == 0 {
                    return Err(std::io::Error::other("no space left"));
                }
                self.room -= n;
                self.out.extend_from_slice(&b[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut w = Full {
            out: Vec::new(),
            room: 26,
        };
        let mut cut = false;
        // One line lost: the cut one.
        let lost = super::write_lines(&mut w, b"first line\nsecond line\nthird\n", &mut cut);
        assert_eq!(lost.unwrap_err().1, 1);
        assert!(cut);
        w.room = 1000;
        super::write_lines(&mut w, b"next\n", &mut cut).unwrap();
        assert!(!cut);
        assert!(
            w.out.ends_with(b"\nnext\n"),
            "{:?}",
            String::from_utf8_lossy(&w.out)
        );
        assert!(w.out.starts_with(b"first line\nsecond line\n"));
        // Cut at a line's end: nothing added.
        let mut w = Full {
            out: Vec::new(),
            room: 11,
        };
        let lost = super::write_lines(&mut w, b"first line\nsecond\n", &mut cut);
        assert_eq!(lost.unwrap_err().1, 1);
        assert!(!cut);
        // After a cut, the line end before the text is not one of its lines.
        let mut w = Full {
            out: Vec::new(),
            room: 0,
        };
        let lost = super::write_lines(&mut w, b"a\nb\n", &mut true);
        assert_eq!(lost.unwrap_err().1, 2);
    }

    #[test]
    fn lines_quote_what_needs_it_and_carry_no_secrets() {
        let mut e = Entry::new(
            Instant::now(),
            "127.0.0.1:5000".parse().unwrap(),
            http::Method::GET,
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
        assert_eq!(j["client"], "127.0.0.1:5000");
        assert_eq!(j["source"], "10.0.0.1");
        assert_eq!(j["ms"], 5.0);
        assert_eq!(j["received"], 12);
        // IPv6 addresses, and the time with its milliseconds.
        e.client = "[2001:db8::7]:443".parse().unwrap();
        e.source = Some("2001:db8:0:1::2".parse().unwrap());
        let l = e.line(Format::Text, Duration::from_micros(1_234_567));
        assert!(
            l.contains(" [2001:db8::7]:443 \"al ice\" - GET example.com:80 2001:db8:0:1::2 200 - 0 12 1234.567"),
            "{l}"
        );
        let time = l.split(' ').next().unwrap();
        assert!(
            time.len() == 24 && time.ends_with('Z') && time.as_bytes()[19] == b'.',
            "{time}"
        );
        let j: serde_json::Value =
            serde_json::from_str(&e.line(Format::Json, Duration::from_micros(7))).unwrap();
        assert_eq!(j["client"], "[2001:db8::7]:443");
        assert_eq!(j["source"], "2001:db8:0:1::2");
        assert_eq!(j["ms"], 0.007);
        let mut q = Vec::new();
        field(&mut q, false, Some("a\"b\n"));
        assert_eq!(q, b"\"a\\\"b\\x0a\"");
        // What would turn a line around or seem to end it, in both formats
        // (and still JSON); other text as it is.
        for json in [false, true] {
            let mut q = Vec::new();
            field(&mut q, json, Some("u\u{202e}x\u{2028}é"));
            assert_eq!(q, "\"u\\u202ex\\u2028é\"".as_bytes());
        }
        let j: String = serde_json::from_str("\"u\\u202e\"").unwrap();
        assert_eq!(j, "u\u{202e}");
    }
}
