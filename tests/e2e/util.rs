//! Helpers for the end-to-end tests: real rotor processes (killed on drop),
//! a loopback origin that records each request's source address, a CONNECT
//! echo server, and a client that speaks to the proxy.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const ALLOCATOR: &str = env!("CARGO_BIN_EXE_rotor-allocator");
pub const WORKER: &str = env!("CARGO_BIN_EXE_rotor-worker");
pub const ROTOR: &str = env!("CARGO_BIN_EXE_rotor");

/// Test origins are on loopback, which the proxy refuses by default.
pub const ALLOW_LOOPBACK: [&str; 4] = [
    "--allow-destination",
    "127.0.0.0/8",
    "--allow-destination",
    "::1",
];

/// How long any wait in these tests may take before it fails the test.
pub const PATIENCE: Duration = Duration::from_secs(15);

pub fn ips(range: std::ops::RangeInclusive<u8>) -> Vec<IpAddr> {
    range.map(|n| IpAddr::from([127, 0, 0, n])).collect()
}

/// A child process, killed (SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn spawn(program: &str, args: &[&str]) -> Proc {
        Proc::spawn_cmd(Command::new(program), program, args)
    }

    /// Spawns `cmd` (prepared by the caller: environment, inherited
    /// descriptors) with `args`; its `RUST_LOG` the caller's, else the
    /// test's, else `warn`.
    pub fn spawn_cmd(mut cmd: Command, program: &str, args: &[&str]) -> Proc {
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            let level = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
            cmd.env("RUST_LOG", level);
        }
        let child = cmd
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        Proc {
            child,
            name: format!("{program} {}", args.join(" ")),
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).unwrap_or_else(|e| panic!("cannot signal {}: {e}", self.name));
    }

    /// Waits for the process to exit; panics after `within`.
    pub fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {within:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `program` logging to `log` (made anew) at its default level, for
/// `Proc::spawn_cmd` or a `start_cmd`.
pub fn logging_to(program: &str, log: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.stderr(std::fs::File::create(log).unwrap());
    cmd
}

/// `cmd` with the descriptor limit `soft` (hard limit `hard`), set in the
/// child before it runs.
pub fn with_nofile(mut cmd: Command, soft: u64, hard: u64) -> Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe; it runs in the child before
    // exec.
    unsafe {
        cmd.pre_exec(move || {
            let l = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            match libc::setrlimit(libc::RLIMIT_NOFILE, &l) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    cmd
}

/// `logging_to`, at info.
pub fn logging_at_info(program: &str, log: &Path) -> Command {
    let mut cmd = logging_to(program, log);
    cmd.env("RUST_LOG", "info");
    cmd
}

/// How many times `what` is in the file `log` so far (0 before it exists).
pub fn said(log: &Path, what: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(what)
        .count()
}

/// The first line `child` writes to its (piped) standard output, waited
/// for off the test's runtime, within `within`.
pub async fn first_line(child: &mut Child, within: Duration) -> String {
    let mut out = std::io::BufReader::new(child.stdout.take().expect("a piped stdout"));
    let read = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).map(|_| line)
    });
    tokio::time::timeout(within, read)
        .await
        .expect("a line in time")
        .unwrap()
        .unwrap()
}

/// Stops `worker` with SIGTERM and asserts that its drain finished (exit
/// 0) within `within`, waited for off the test's runtime (its origin may
/// run there).
pub async fn drains_within(mut worker: Worker, within: Duration) {
    let t0 = Instant::now();
    worker.proc.signal(Signal::SIGTERM);
    let status = tokio::task::spawn_blocking(move || {
        let s = worker.proc.wait(within + Duration::from_secs(10));
        (s, worker)
    })
    .await
    .unwrap()
    .0;
    assert_eq!(status.code(), Some(0), "the drain was cut");
    assert!(t0.elapsed() < within, "took {:?}", t0.elapsed());
}

/// Polls `ready` every 20 ms until it holds; panics after `PATIENCE`.
pub async fn eventually<F, Fut>(what: &str, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !ready().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port no socket has, for a worker or a test's own listener: from
/// below the kernel's ephemeral range, each handed out once a run, and
/// checked free. A port the kernel picked (a bind to `:0`) was released
/// before the worker bound it, and the kernel could give it to another
/// socket meanwhile: a test's outgoing connection (the worker could not
/// bind), or another test's worker (which then shared the port, as
/// workers bind with SO_REUSEPORT).
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let (low, high) = range
        .as_deref()
        .and_then(|r| {
            let mut n = r.split_whitespace().map(|p| p.parse::<u32>().ok());
            Some((n.next()??, n.next()??))
        })
        .unwrap_or((32768, 60999));
    // Below the range, or else above it.
    let (start, span) = match low > 11024 {
        true => (low - 10000, 10000),
        false => (high + 1, 65535 - high),
    };
    // Another run (a test binary run again) starts elsewhere: a port whose
    // server side closed first stays in TIME_WAIT for a minute.
    let offset = std::process::id() % span;
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(n < span, "no free port left below the ephemeral range");
        let port = (start + (offset + n) % span) as u16;
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
}

/// An allocator on a socket in its own temporary directory.
pub struct Allocator {
    pub proc: Proc,
    pub socket: PathBuf,
    /// Keeps the socket's directory alive as long as the allocator.
    _dir: Arc<tempfile::TempDir>,
}

impl Allocator {
    /// `start` for a test that has no runtime of its own.
    pub fn start_blocking(args: &[&str]) -> Allocator {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(Allocator::start(args))
    }

    pub async fn start(args: &[&str]) -> Allocator {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        Allocator::start_in(dir, args).await
    }

    pub async fn start_in(dir: Arc<tempfile::TempDir>, args: &[&str]) -> Allocator {
        Allocator::start_cmd(Command::new(ALLOCATOR), dir, args).await
    }

    /// `start_in`, its log written to `log` instead of the test's stderr.
    pub async fn start_logging(
        dir: Arc<tempfile::TempDir>,
        args: &[&str],
        log: &Path,
    ) -> Allocator {
        Allocator::start_cmd(logging_to(ALLOCATOR, log), dir, args).await
    }

    pub async fn start_cmd(cmd: Command, dir: Arc<tempfile::TempDir>, args: &[&str]) -> Allocator {
        let socket = dir.path().join("allocator.sock");
        let state = dir.path().join("state");
        let mut all = vec![
            "--socket",
            socket.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        let mut proc = Proc::spawn_cmd(cmd, ALLOCATOR, &all);
        // Ready once it answers a Hello: the socket is bound before the
        // first pool load, and a connection made during that load waits in
        // the backlog. A refusal (a peer not allowed) is an answer too.
        let s = socket.clone();
        eventually("the allocator to answer on its socket", || {
            let s = s.clone();
            async move { allocator_answers(&s).await }
        })
        .await;
        assert!(proc.is_running());
        Allocator {
            proc,
            socket,
            _dir: dir,
        }
    }
}

/// Whether the allocator at `socket` answers a Hello (with its own or by
/// closing the connection) within half a second.
async fn allocator_answers(socket: &Path) -> bool {
    use rotor_protocol::{client_handshake, Channel, ClientChannel, Hello, Role};
    let Ok(stream) = tokio::net::UnixStream::connect(socket).await else {
        return false;
    };
    let mut chan: ClientChannel<tokio::net::UnixStream> = Channel::new(stream);
    let hello = client_handshake(&mut chan, Hello::new(Role::Control, "e2e readiness"));
    tokio::time::timeout(Duration::from_millis(500), hello)
        .await
        .is_ok()
}

/// Whether `worker` maps an allocator's lease table now.
pub fn maps_the_table(worker: &Worker) -> bool {
    std::fs::read_to_string(format!("/proc/{}/maps", worker.proc.pid()))
        .is_ok_and(|m| m.contains("allocator.sock.leases"))
}

/// Waits until every worker of `workers` maps the allocator's lease table
/// (each has a copy of the pool by then: it asks for one first).
pub async fn mapped(workers: &[&Worker]) {
    for w in workers {
        eventually("the worker maps the lease table", || async {
            maps_the_table(w)
        })
        .await;
    }
}

/// Waits until every worker of `workers` maps the lease table at `table`
/// as it is now (a table replaced keeps its path: its inode tells), not
/// only one it replaced.
pub async fn mapped_current(workers: &[&Worker], table: &Path) {
    use std::os::unix::fs::MetadataExt;
    for w in workers {
        eventually("the worker maps the current lease table", || async {
            let Ok(inode) = std::fs::metadata(table).map(|m| m.ino().to_string()) else {
                return false;
            };
            let maps = std::fs::read_to_string(format!("/proc/{}/maps", w.proc.pid()));
            maps.unwrap_or_default().lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() == 6 && f[4] == inode && Path::new(f[5]) == table
            })
        })
        .await;
    }
}

/// Waits until `worker` has let go of the table of an allocator that was
/// killed (it leases from it until it sees the connection closed).
pub async fn unmapped(worker: &Worker) {
    eventually("the worker lets the dead allocator's table go", || async {
        !maps_the_table(worker)
    })
    .await;
}

/// A worker listening on its own loopback port.
pub struct Worker {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Worker {
    pub async fn start(socket: &Path, extra: &[&str]) -> Worker {
        Worker::start_on(socket, free_port(), extra).await
    }

    pub async fn start_on(socket: &Path, port: u16, extra: &[&str]) -> Worker {
        let mut args = ALLOW_LOOPBACK.to_vec();
        args.extend_from_slice(extra);
        Worker::start_exactly(socket, port, &args).await
    }

    /// A worker with only `extra` flags: the default destination rules.
    pub async fn start_exactly(socket: &Path, port: u16, extra: &[&str]) -> Worker {
        Worker::start_cmd(Command::new(WORKER), socket, port, extra).await
    }

    /// A worker from `cmd` (prepared by the caller: its user, limits…) with
    /// only `extra` flags, once it listens.
    pub async fn start_cmd(cmd: Command, socket: &Path, port: u16, extra: &[&str]) -> Worker {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let listen = addr.to_string();
        let mut args = vec!["--socket", socket.to_str().unwrap(), "--listen", &listen];
        args.extend_from_slice(extra);
        let proc = Proc::spawn_cmd(cmd, WORKER, &args);
        eventually("the worker port", || async move {
            TcpStream::connect(addr).await.is_ok()
        })
        .await;
        // It listens before its signal handlers are in place: a SIGTERM
        // or SIGHUP a test sends at once would end it, on a busy host.
        // (A wrapper that has not yet become the worker is not waited for.)
        let pid = proc.pid();
        eventually("the worker's signal handlers", || async move {
            handles(pid, &[Signal::SIGTERM, Signal::SIGHUP])
        })
        .await;
        Worker { proc, addr }
    }
}

/// Whether process `pid` has handlers for every signal of `signals`
/// (`SigCgt` in its status); true for a process that is not a rotor
/// binary (a wrapper), has exited, or is gone.
pub fn handles(pid: Pid, signals: &[Signal]) -> bool {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if !comm.trim().starts_with("rotor") {
        return true;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    // A worker that has exited (a zombie) catches nothing: not waited for
    // (the test fails on what it finds instead).
    if status
        .lines()
        .any(|l| l.starts_with("State:") && l.contains('Z'))
    {
        return true;
    }
    let caught = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok());
    match caught {
        Some(m) => signals.iter().all(|s| m & 1 << (*s as i32 - 1) != 0),
        None => true,
    }
}

/// What the origin saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub source: IpAddr,
    /// Index of the TCP connection it came on, into `Origin::connections`.
    pub conn: usize,
    pub method: String,
    pub path: String,
    pub headers: http::HeaderMap,
    pub body_len: usize,
}

/// A loopback HTTP origin on 127.0.0.1 that records every request.
///
/// Paths: `/` answers `hello`; `/bytes/N` streams N bytes of a known
/// pattern in chunks; `/echo` answers with the request body;
/// `/slow/MS` waits MS milliseconds, then answers; `/status/CODE` answers
/// CODE, `/status/CODE/SECS` with `Retry-After: SECS`, and
/// `/status/CODE/date/SECS` with `Retry-After` as the HTTP-date SECS ahead.
#[derive(Clone)]
pub struct Origin {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// TCP connections accepted, to tell reuse from new connections.
    pub connections: Arc<Mutex<Vec<IpAddr>>>,
}

pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

impl Origin {
    pub async fn start() -> Origin {
        Origin::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(bind: SocketAddr) -> Origin {
        let listener = TcpListener::bind(bind).await.unwrap();
        let origin = Origin {
            addr: listener.local_addr().unwrap(),
            seen: Arc::default(),
            connections: Arc::default(),
        };
        let o = origin.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    return;
                };
                let conn = {
                    let mut c = o.connections.lock().unwrap();
                    c.push(peer.ip());
                    c.len() - 1
                };
                let o = o.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        o.clone().serve(req, peer.ip(), conn)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        origin
    }

    async fn serve(
        self,
        req: Request<Incoming>,
        source: IpAddr,
        conn: usize,
    ) -> Result<Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>, Infallible> {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let path = parts.uri.path().to_string();
        self.seen.lock().unwrap().push(Seen {
            source,
            conn,
            method: parts.method.to_string(),
            path: parts.uri.to_string(),
            headers: parts.headers.clone(),
            body_len: body.len(),
        });
        let full = |b: Bytes| Full::new(b).boxed();
        let resp = if let Some(n) = path.strip_prefix("/bytes/") {
            let n: usize = n.parse().unwrap();
            let data = Bytes::from(pattern(n));
            let chunks: Vec<Result<Frame<Bytes>, Infallible>> = (0..n)
                .step_by(16 * 1024)
                .map(|i| Ok(Frame::data(data.slice(i..(i + 16 * 1024).min(n)))))
                .collect();
            // No Content-Length: the response is chunked.
            Response::new(StreamBody::new(futures_util::stream::iter(chunks)).boxed())
        } else if path == "/echo" {
            Response::new(full(body))
        } else if let Some(spec) = path.strip_prefix("/trickle/") {
            // `/trickle/N/MS`: N bytes in 64 KiB chunks, MS apart.
            let (n, ms) = spec.split_once('/').unwrap();
            let (n, ms): (usize, u64) = (n.parse().unwrap(), ms.parse().unwrap());
            let data = Bytes::from(pattern(n));
            let chunks = futures_util::stream::unfold(0usize, move |at| {
                let data = data.clone();
                async move {
                    if at >= n {
                        return None;
                    }
                    if at > 0 {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    let end = (at + 64 * 1024).min(n);
                    Some((Ok::<_, Infallible>(Frame::data(data.slice(at..end))), end))
                }
            });
            Response::new(StreamBody::new(chunks).boxed())
        } else if let Some(spec) = path.strip_prefix("/status/") {
            let parts: Vec<&str> = spec.split('/').collect();
            let mut r = Response::new(full(Bytes::from_static(b"status")));
            *r.status_mut() = http::StatusCode::from_u16(parts[0].parse().unwrap()).unwrap();
            let retry_after = match parts[1..] {
                [secs] => Some(secs.to_string()),
                ["date", secs] => Some(httpdate::fmt_http_date(
                    std::time::SystemTime::now() + Duration::from_secs(secs.parse().unwrap()),
                )),
                _ => None,
            };
            if let Some(v) = retry_after {
                r.headers_mut().insert("retry-after", v.parse().unwrap());
            }
            r
        } else if let Some(ms) = path.strip_prefix("/slow/") {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
            Response::new(full(Bytes::from_static(b"slow")))
        } else {
            let mut r = Response::new(full(Bytes::from_static(b"hello")));
            r.headers_mut().insert("x-origin", "yes".parse().unwrap());
            r.headers_mut()
                .insert("keep-alive", "timeout=5".parse().unwrap());
            r
        };
        Ok(resp)
    }

    pub fn sources(&self) -> Vec<IpAddr> {
        self.seen.lock().unwrap().iter().map(|s| s.source).collect()
    }

    /// Checks, at the origin, that every request on a connection came from
    /// that connection's source address (reuse never crossed addresses), and
    /// returns how many connections carried the requests.
    pub fn connections_used(&self) -> usize {
        let conns = self.connections.lock().unwrap().clone();
        let seen = self.seen.lock().unwrap();
        for s in seen.iter() {
            assert_eq!(
                s.source, conns[s.conn],
                "a request left from another address than its connection"
            );
        }
        let mut used: Vec<usize> = seen.iter().map(|s| s.conn).collect();
        used.sort_unstable();
        used.dedup();
        used.len()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

/// A TCP server that echoes what it reads and records each peer's address.
pub struct Echo {
    pub addr: SocketAddr,
    pub peers: Arc<Mutex<Vec<IpAddr>>>,
}

/// A TCP server on 127.0.0.1 that records each peer's address and runs
/// `handle` on each connection.
pub async fn recording_server<F, Fut>(handle: F) -> (SocketAddr, Arc<Mutex<Vec<IpAddr>>>)
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    recording_server_on("127.0.0.1:0".parse().unwrap(), handle).await
}

/// `recording_server` on `bind`.
pub async fn recording_server_on<F, Fut>(
    bind: SocketAddr,
    handle: F,
) -> (SocketAddr, Arc<Mutex<Vec<IpAddr>>>)
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(bind).await.unwrap();
    let peers: Arc<Mutex<Vec<IpAddr>>> = Arc::default();
    let p = peers.clone();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, peer)) = listener.accept().await else {
                return;
            };
            p.lock().unwrap().push(peer.ip());
            tokio::spawn(handle(s));
        }
    });
    (addr, peers)
}

/// A TCP server on 127.0.0.1 that reads whatever comes and sends 256 MiB,
/// far more than any buffer on the way holds: a download its client can
/// stop reading.
pub async fn flooding_server() -> SocketAddr {
    let (addr, _) = recording_server(|mut s: TcpStream| async move {
        let chunk = vec![7u8; 1 << 20];
        let (mut r, mut w) = s.split();
        let drain = async {
            let mut sink = [0u8; 1024];
            while r.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        };
        let flood = async {
            for _ in 0..256 {
                if w.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        };
        tokio::join!(drain, flood);
    })
    .await;
    addr
}

impl Echo {
    pub async fn start() -> Echo {
        Echo::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(bind: SocketAddr) -> Echo {
        let (addr, peers) = recording_server_on(bind, |mut s: TcpStream| async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        })
        .await;
        Echo { addr, peers }
    }
}

/// An HTTP/1.1 client connection to the proxy (keep-alive).
pub struct ProxyConn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

/// A failed exchange, and whether it failed before any of the response
/// arrived (so an idempotent request may be retried).
#[derive(Debug)]
pub struct SendError {
    pub message: String,
    pub before_response: bool,
}

pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn proxy_status(&self) -> String {
        self.headers
            .get("proxy-status")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }
}

impl ProxyConn {
    pub async fn open(proxy: SocketAddr) -> ProxyConn {
        let stream = TcpStream::connect(proxy).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        ProxyConn { sender }
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Reply {
        self.sender.ready().await.expect("proxy connection closed");
        let resp = tokio::time::timeout(PATIENCE, self.sender.send_request(req))
            .await
            .expect("no response from the proxy")
            .expect("request through the proxy failed");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    }

    /// Sends `req` and returns once the response's head is in (its body
    /// still to read).
    pub async fn send_head(&mut self, req: Request<Full<Bytes>>) -> Response<Incoming> {
        self.sender.ready().await.expect("proxy connection closed");
        tokio::time::timeout(PATIENCE, self.sender.send_request(req))
            .await
            .expect("no response from the proxy")
            .expect("request through the proxy failed")
    }

    pub async fn get(&mut self, url: &str) -> Reply {
        self.send(Request::get(url).body(Full::default()).unwrap())
            .await
    }

    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// A GET that reports failure instead of panicking.
    pub async fn try_get(&mut self, url: &str) -> Result<Reply, SendError> {
        let err = |message: String, before_response| SendError {
            message,
            before_response,
        };
        self.sender
            .ready()
            .await
            .map_err(|e| err(format!("connection not ready: {e}"), true))?;
        let req = Request::get(url).body(Full::default()).unwrap();
        let resp = tokio::time::timeout(PATIENCE, self.sender.send_request(req))
            .await
            .map_err(|_| err("no response".into(), false))?
            .map_err(|e| {
                // hyper: the connection closed before a response began.
                let before = e.is_canceled() || e.is_incomplete_message();
                err(format!("{e:?}"), before)
            })?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| err(format!("body: {e}"), false))?
            .to_bytes();
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }
}

/// One GET through the proxy on a new connection.
pub async fn get(proxy: SocketAddr, url: &str) -> Reply {
    ProxyConn::open(proxy).await.get(url).await
}

/// Opens a CONNECT tunnel; returns the status line's code and the stream.
pub async fn connect_tunnel(proxy: SocketAddr, target: &str) -> (u16, TcpStream) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad CONNECT response: {head:?}"));
    (code, s)
}

/// Returns once the IPv4 listener at `addr` has no connection waiting in
/// its accept queue: a connection made to it before has been accepted
/// (the listen socket's `rx_queue` in /proc/net/tcp is that queue's length).
pub async fn accepted(addr: SocketAddr) {
    let IpAddr::V4(ip) = addr.ip() else {
        panic!("an IPv4 listener: {addr}")
    };
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(ip.octets()),
        addr.port()
    );
    eventually("the connection accepted", || {
        let local = local.clone();
        async move {
            let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
            table.lines().skip(1).any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                // local address, state 0A (LISTEN), tx_queue:rx_queue
                f.len() > 4 && f[1] == local && f[3] == "0A" && f[4].ends_with(":00000000")
            })
        }
    })
    .await;
}

/// Waits for `worker` to exit, off the runtime (servers the test runs on
/// it, an origin or an echo, go on meanwhile); panics after `within`.
pub async fn exit_of(mut worker: Worker, within: Duration) -> std::process::ExitStatus {
    tokio::task::spawn_blocking(move || worker.proc.wait(within))
        .await
        .unwrap()
}

/// Returns once a worker that was sent SIGTERM has begun its drain: its
/// listener at `addr` is gone (the worker closes its tunnels to kept-alive
/// connections first: they are refused from then on). Panics if it is
/// not gone within `PATIENCE` (a request sent then would not be one in
/// the drain).
pub async fn drain_begun(addr: SocketAddr) {
    eventually("the worker's listener closed for the drain", || async {
        TcpStream::connect(addr).await.is_err()
    })
    .await;
}

/// A connection to `proxy` with a plain `GET url` sent on it.
/// Sends `text` as is on a new connection to `proxy` and reads until it
/// closes (a request that says `Connection: close`).
pub async fn raw_exchange(proxy: SocketAddr, text: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(text.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut all))
        .await
        .expect("the proxy did not close the connection")
        .unwrap();
    all
}

pub async fn raw_get(proxy: SocketAddr, url: &str) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("GET {url} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    s
}

/// The next `n` bytes from `s`, within [`PATIENCE`].
pub async fn read_exactly(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut got = vec![0u8; n];
    tokio::time::timeout(PATIENCE, s.read_exact(&mut got))
        .await
        .expect("nothing came back")
        .unwrap();
    got
}

/// Reads a message head byte by byte (so nothing after it is consumed);
/// what it got when the stream ends or fails.
pub async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(PATIENCE, s.read(&mut byte))
            .await
            .expect("no response head");
        if !matches!(n, Ok(1)) {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Runs `rotor COMMAND --socket SOCKET [extra]`; panics if it fails, else
/// returns its standard output.
pub fn rotor_control(command: &str, socket: &Path, extra: &[&str]) -> String {
    let mut args = vec![command, "--socket", socket.to_str().unwrap()];
    args.extend_from_slice(extra);
    String::from_utf8(run_ok(ROTOR, &args, "the rotor binary")).unwrap()
}

/// The resident memory of process `pid` (its `VmRSS`), in KiB.
pub fn rss_kb(pid: Pid) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Runs `program` with `args` and returns its standard output; panics,
/// with its standard error, if it fails, and says what to install
/// (`missing`) if it cannot be started.
pub fn run_ok(program: &str, args: &[&str], missing: &str) -> Vec<u8> {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{missing}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Runs `rotor status --json` against `socket`.
pub fn status_json(socket: &Path) -> serde_json::Value {
    serde_json::from_str(&rotor_control("status", socket, &["--json"])).unwrap()
}

/// The pool entries a `status_json` lists, as addresses (single ones).
pub fn pool_of(status: &serde_json::Value) -> Vec<IpAddr> {
    status["pool"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["ip"].as_str().unwrap().parse().unwrap())
        .collect()
}

/// The `Content-Length` a response (or request) head gives, if any.
pub fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

/// The pool's entries as `rotor status --json` writes them, sorted.
pub fn sorted_pool(status: &serde_json::Value) -> Vec<String> {
    let mut pool: Vec<String> = status["pool"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["ip"].as_str().unwrap().to_string())
        .collect();
    pool.sort();
    pool
}

/// A DNS server on loopback UDP that answers A queries from a table the
/// test sets (name → address and TTL), and counts the A queries per name.
/// AAAA queries for a known name get no records (or, once `silent_aaaa`
/// is set, no answer at all, as some middleboxes do); unknown names
/// NXDOMAIN; names under `servfail.` SERVFAIL.
pub struct Dns {
    pub addr: SocketAddr,
    pub answers: Arc<Mutex<std::collections::HashMap<String, (std::net::Ipv4Addr, u32)>>>,
    pub queries: Arc<Mutex<std::collections::HashMap<String, usize>>>,
    pub silent_aaaa: Arc<std::sync::atomic::AtomicBool>,
    /// AAAA records (none by default: a known name's AAAA query gets no
    /// records).
    pub aaaa: Arc<Mutex<std::collections::HashMap<String, (std::net::Ipv6Addr, u32)>>>,
    /// How long each A answer is held back, in milliseconds (0: none).
    pub slow_a_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl Dns {
    pub async fn start() -> Dns {
        let sock = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = sock.local_addr().unwrap();
        let slow_a_ms: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let slow = slow_a_ms.clone();
        let answers: Arc<Mutex<std::collections::HashMap<_, _>>> = Arc::default();
        let queries: Arc<Mutex<std::collections::HashMap<_, _>>> = Arc::default();
        let silent_aaaa: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let aaaa: Arc<Mutex<std::collections::HashMap<_, _>>> = Arc::default();
        let (a, q, silent) = (answers.clone(), queries.clone(), silent_aaaa.clone());
        let a6 = aaaa.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                let silent = silent.load(std::sync::atomic::Ordering::Relaxed);
                if let Some((reply, qtype)) = dns_answer(&buf[..n], (&a, &a6), &q, silent) {
                    let delay = slow.load(std::sync::atomic::Ordering::Relaxed);
                    if qtype == 1 && delay > 0 {
                        let sock = sock.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                            let _ = sock.send_to(&reply, from).await;
                        });
                    } else {
                        let _ = sock.send_to(&reply, from).await;
                    }
                }
            }
        });
        Dns {
            addr,
            answers,
            queries,
            silent_aaaa,
            aaaa,
            slow_a_ms,
        }
    }

    /// Gives `name` an AAAA record too.
    pub fn set_v6(&self, name: &str, ip: std::net::Ipv6Addr, ttl: u32) {
        self.aaaa
            .lock()
            .unwrap()
            .insert(name.to_string(), (ip, ttl));
    }

    pub fn set(&self, name: &str, ip: std::net::Ipv4Addr, ttl: u32) {
        self.answers
            .lock()
            .unwrap()
            .insert(name.to_string(), (ip, ttl));
    }

    pub fn queries_for(&self, name: &str) -> usize {
        self.queries.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

/// The reply to one DNS query (RFC 1035 §4.1), or `None` for junk.
type Records<T> = Mutex<std::collections::HashMap<String, (T, u32)>>;

fn dns_answer(
    q: &[u8],
    (answers, aaaa): (&Records<std::net::Ipv4Addr>, &Records<std::net::Ipv6Addr>),
    queries: &Mutex<std::collections::HashMap<String, usize>>,
    silent_aaaa: bool,
) -> Option<(Vec<u8>, u16)> {
    if q.len() < 12 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(
            std::str::from_utf8(q.get(i..i + len)?)
                .ok()?
                .to_ascii_lowercase(),
        );
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    if qtype == 28 && silent_aaaa {
        return None;
    }
    let question_end = i + 4;
    if q.len() < question_end {
        return None;
    }
    let name = labels.join(".");
    let name_failing = name.starts_with("servfail.");
    let known = answers.lock().unwrap().get(&name).copied();
    let v6 = aaaa.lock().unwrap().get(&name).copied();
    let found: Option<(Vec<u8>, u32)> = match qtype {
        1 => {
            *queries.lock().unwrap().entry(name).or_default() += 1;
            known.map(|(ip, ttl)| (ip.octets().to_vec(), ttl))
        }
        28 => v6.map(|(ip, ttl)| (ip.octets().to_vec(), ttl)),
        _ => None,
    };
    let known = known.map(|_| ()).or(v6.map(|_| ()));
    let mut r = Vec::with_capacity(64);
    r.extend_from_slice(&q[0..2]); // id
    r.push(0x84 | (q[2] & 0x01)); // response, authoritative, recursion desired as asked
                                  // Recursion available; NXDOMAIN if unknown; SERVFAIL for a name
                                  // under `servfail.` (a resolver whose upstream failed).
    let rcode = match (name_failing, known.is_some()) {
        (true, _) => 2,
        (false, true) => 0,
        (false, false) => 3,
    };
    r.push(0x80 | rcode);
    r.extend_from_slice(&1u16.to_be_bytes());
    r.extend_from_slice(&u16::from(found.is_some()).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(&q[12..question_end]);
    if let Some((ip, ttl)) = found {
        // The question's name, its type (A or AAAA), IN.
        r.extend_from_slice(&[0xc0, 0x0c]);
        r.extend_from_slice(&qtype.to_be_bytes());
        r.extend_from_slice(&[0, 1]);
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&(ip.len() as u16).to_be_bytes());
        r.extend_from_slice(&ip);
    }
    Some((r, qtype))
}

/// Runs `body` in a network namespace of its own, on a thread of its own
/// (a namespace is per thread; the processes and sockets that thread makes
/// are in it), after `ip link set lo up` and the `ip` commands of `setup`.
/// Where namespaces cannot be made (not root), says so and returns: CI
/// runs as root, so there the test runs. The namespace goes with the
/// thread and the processes it started.
pub fn in_netns<F, Fut>(test: &str, setup: &[&str], body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let setup: Vec<String> = setup.iter().map(|s| s.to_string()).collect();
    let test = test.to_string();
    if !have(&test, &["ip"]) {
        return;
    }
    let run = std::thread::spawn(move || {
        if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
            let why =
                format!("{test}: cannot make a network namespace ({e}); it needs root, as CI has");
            skip(&why);
            return;
        }
        for cmd in std::iter::once("link set lo up").chain(setup.iter().map(String::as_str)) {
            let args: Vec<&str> = cmd.split_whitespace().collect();
            run_ok("ip", &args, "the ip command (iproute2)");
        }
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(body());
    });
    if let Err(panic) = run.join() {
        std::panic::resume_unwind(panic);
    }
}

/// An admin token file in `dir` (mode 0600, as the allocator wants it),
/// and its token.
pub fn admin_token_in(dir: &Path) -> (PathBuf, &'static str) {
    use std::os::unix::fs::PermissionsExt;
    let file = dir.join("token");
    let token = "k3y-0f-the-admin-api";
    std::fs::write(&file, token).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    (file, token)
}

/// A users file (in a directory of its own, kept while the first half
/// lives) with `users` (name, password) added by `rotor user add`.
pub fn users_file(users: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("users");
    for (name, password) in users {
        add_user(&file, name, password);
    }
    (dir, file)
}

/// Adds `name` with `password` to the users file `file` with `rotor user add`.
pub fn add_user(file: &Path, name: &str, password: &str) {
    let mut child = Command::new(ROTOR)
        .args(["user", "add", name, "--auth-file", file.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), password.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes `name` from the users file `file` with `rotor user remove`.
pub fn remove_user(file: &Path, name: &str) -> std::process::Output {
    let out = Command::new(ROTOR)
        .args([
            "user",
            "remove",
            name,
            "--auth-file",
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A `Proxy-Authorization: Basic` value.
pub fn basic(user: &str, pass: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// Whether python3 can import `modules` (comma-separated), for `test`: if
/// not, says the test was skipped (fails it under CI, whose `.ci/run`
/// installs them), and the caller returns.
pub fn python_has(test: &str, modules: &str) -> bool {
    let probe = std::process::Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output();
    if probe.is_ok_and(|o| o.status.success()) {
        return true;
    }
    skip(&format!(
        "{test} needs the Python modules {modules} (.ci/run installs them)"
    ));
    false
}

/// Runs a Python script (waited for without blocking the test's runtime)
/// and checks that it succeeded.
pub async fn run_python(script: &str) {
    let out = tokio::process::Command::new("python3")
        .args(["-c", script])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether every one of `tools` (programs users have: curl, openssl,
/// HAProxy, Prometheus, systemd's tools) is on the PATH, for `test`. A
/// missing one fails the test under CI (`CI` set: `.ci/run` installs them
/// first, so there nothing is skipped); elsewhere the test says it was
/// skipped, and why, and the caller returns.
pub fn have(test: &str, tools: &[&str]) -> bool {
    let on_path = |tool: &str| {
        std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|dir| {
                std::fs::metadata(dir.join(tool)).is_ok_and(|m| {
                    use std::os::unix::fs::PermissionsExt;
                    m.is_file() && m.permissions().mode() & 0o111 != 0
                })
            })
        })
    };
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !on_path(t)).collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{test} needs {} (.ci/run installs what the tests use)",
        missing.join(", ")
    );
    skip(&why);
    false
}

/// Whether this runs as root, for `test` (one that runs programs as
/// another user, or in a namespace of their own): if not, says the test
/// was skipped (fails it under CI, which runs as root), and the caller
/// returns.
pub fn root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    skip(&format!(
        "{test} needs root (it runs programs as another user or in a namespace; CI runs as root)"
    ));
    false
}

/// A test that cannot run here, for `why`: it fails under CI (`CI` set:
/// `.ci/run` installs what the tests use, so there nothing is skipped);
/// elsewhere it says it was skipped, and the caller returns.
pub fn skip(why: &str) {
    assert!(std::env::var_os("CI").is_none(), "{why}");
    println!("SKIPPED {why}");
}

/// The whole lines of a JSON access log, in order (none if it is not
/// there yet; a line half written is left out).
pub fn json_lines(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The clients a JSON access log names, in order.
pub fn logged_clients(log: &Path) -> Vec<String> {
    json_lines(log)
        .iter()
        .map(|l| l["client"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A far end that speaks first: a banner, then, once the client's side
/// has ended, `bye` (so the end was passed on), then its own end.
pub async fn banner_server() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                s.write_all(b"banner\n").await?;
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).await?;
                s.write_all(b"bye\n").await?;
                s.shutdown().await
            });
        }
    });
    addr
}

/// Sends `bytes` to `addr`, shuts this side (as `nc -N` does), and reads
/// what comes back until the far side ends too (within 10 s).
pub async fn ask_then_shut(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("an answer, then the end of the connection")
        .unwrap();
    got
}

/// curl (waited for without blocking the test's runtime: the origin runs
/// on it).
pub async fn curl(args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new("curl")
        .args([
            "-s",
            "-S",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The address families a unit's `RestrictAddressFamilies=` allows (of
/// those rotor may use), as libc numbers.
pub fn unit_families(unit: &str) -> Vec<i32> {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("RestrictAddressFamilies="))
        .expect("the unit restricts its address families");
    line.split_whitespace()
        .map(|name| match name {
            "AF_UNIX" => libc::AF_UNIX,
            "AF_INET" => libc::AF_INET,
            "AF_INET6" => libc::AF_INET6,
            "AF_NETLINK" => libc::AF_NETLINK,
            other => panic!("a family the test does not know: {other}"),
        })
        .collect()
}

/// Has `cmd` run with sockets of `families` only, as systemd's
/// `RestrictAddressFamilies=` does: a seccomp filter under which a
/// `socket()` of any other family fails with EAFNOSUPPORT. `false` (and
/// `cmd` unchanged) where the test has no filter for the architecture.
pub fn confine_families(cmd: &mut Command, families: &[i32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::os::unix::process::CommandExt;
        const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
        const LD_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
        const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
        const RET: u16 = 0x06; // BPF_RET | BPF_K
        const ALLOW: u32 = 0x7fff_0000;
        let refuse = 0x0005_0000 | libc::EAFNOSUPPORT as u32;
        let op = |code, k| libc::sock_filter {
            code,
            jt: 0,
            jf: 0,
            k,
        };
        // seccomp_data: nr at 0, arch at 4, args[0]'s low word at 16.
        let mut prog = vec![
            op(LD_ABS, 4),
            op(JEQ, AUDIT_ARCH_X86_64),
            op(LD_ABS, 0),
            op(JEQ, libc::SYS_socket as u32),
            op(LD_ABS, 16),
        ];
        let mut allowed = vec![1, 3];
        for f in families {
            allowed.push(prog.len());
            prog.push(op(JEQ, *f as u32));
        }
        prog.push(op(RET, refuse));
        let allow = prog.len();
        prog.push(op(RET, ALLOW));
        // The two first jump to allow when unequal, the families when equal.
        for i in allowed {
            let to = (allow - i - 1) as u8;
            match i {
                1 | 3 => prog[i].jf = to,
                _ => prog[i].jt = to,
            }
        }
        unsafe {
            cmd.pre_exec(move || {
                let fprog = libc::sock_fprog {
                    len: prog.len() as u16,
                    filter: prog.as_ptr() as *mut libc::sock_filter,
                };
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                    || libc::prctl(libc::PR_SET_SECCOMP, 2, &fprog as *const _) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (cmd, families);
        false
    }
}

/// A worker of the allocator at `socket` writing its access log as JSON
/// to a file of its own: the file's directory (kept while it runs), the
/// file, and the worker.
/// A worker with a SOCKS5 listener of its own and a JSON access log at
/// `log`, given `extra` flags too: the worker and its SOCKS5 address.
pub async fn socks_worker_logging_json(
    socket: &Path,
    log: &Path,
    extra: &[&str],
) -> (Worker, std::net::SocketAddr) {
    let socks: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let s = socks.to_string();
    let mut args = extra.to_vec();
    args.extend_from_slice(&["--socks-listen", &s]);
    (worker_logging_json_to(socket, log, &args).await, socks)
}

pub async fn worker_logging_json(socket: &Path) -> (tempfile::TempDir, std::path::PathBuf, Worker) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let w = worker_logging_json_to(socket, &log, &[]).await;
    (dir, log, w)
}

/// A worker with `extra` flags writing a JSON access log to `log`.
pub async fn worker_logging_json_to(socket: &Path, log: &Path, extra: &[&str]) -> Worker {
    let mut args = extra.to_vec();
    args.extend_from_slice(&["--access-log", log.to_str().unwrap()]);
    args.extend_from_slice(&["--access-log-format", "json"]);
    Worker::start(socket, &args).await
}

/// Resets `s` (a destination's side) once its peer took all it sent, 5 s
/// at most: a reset discards what the sender's own socket holds
/// unacknowledged.
pub async fn reset_once_taken(s: tokio::net::TcpStream) {
    for _ in 0..500 {
        let mut unacked: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one int; `s` is open.
        let r = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::TIOCOUTQ,
                &mut unacked,
            )
        };
        if r != 0 || unacked == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
}
