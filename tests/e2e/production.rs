//! Running in production on one host: socket activation, readiness,
//! graceful drain, rolling worker restarts and allocator restarts under a
//! steady load, with nothing lost. Each load test prints its figures.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixDatagram};

use crate::util::*;

/// A worker that accepts on the shared listening socket `fd` (as systemd's
/// `Sockets=` or `rotor up` would pass it).
fn worker_on_shared_socket(fd: RawFd, socket: &Path, extra: &[&str]) -> Proc {
    worker_on_shared(("--listen-fd", fd), socket, extra)
}

/// A worker that accepts on the shared listening socket `fd`, passed as
/// `flag` says (`--listen-fd`, `--socks-listen-fd`).
fn worker_on_shared((flag, fd): (&str, RawFd), socket: &Path, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(WORKER);
    pass_as_fd_3(&mut cmd, fd);
    let mut args = vec![flag, "3", "--socket", socket.to_str().unwrap()];
    args.extend_from_slice(&ALLOW_LOOPBACK);
    args.extend_from_slice(extra);
    Proc::spawn_cmd(cmd, WORKER, &args)
}

/// `cmd`'s child gets `fd` as its descriptor 3, open across exec.
fn pass_as_fd_3(cmd: &mut Command, fd: RawFd) {
    // SAFETY: dup2 and fcntl are async-signal-safe; they run in the child
    // before exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 clears close-on-exec on its copy, but onto itself it
            // copies nothing: a listener that is already 3 keeps the flag,
            // and would be closed by exec.
            let r = match fd == 3 {
                true => libc::fcntl(3, libc::F_SETFD, 0),
                false => libc::dup2(fd, 3),
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Waits until process `pid` is stopped (a signal takes effect a moment
/// after kill returns: an accept in that moment would be answered only
/// after SIGCONT).
async fn stopped_for_sure(pid: u32) {
    let stat = format!("/proc/{pid}/stat");
    eventually("the process stopped", || {
        let stat = stat.clone();
        async move {
            let s = std::fs::read_to_string(&stat).unwrap_or_default();
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                == Some("T")
        }
    })
    .await;
}

/// `n` workers accepting on one listening socket, once they serve.
async fn shared_workers(
    n: usize,
    socket: &Path,
    extra: &[&str],
    origin: &Origin,
) -> (std::net::TcpListener, SocketAddr, Vec<Proc>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = listener.local_addr().unwrap();
    let workers = (0..n)
        .map(|_| worker_on_shared_socket(listener.as_raw_fd(), socket, extra))
        .collect();
    eventually("the workers", || async {
        get(proxy, &origin.url("/")).await.status == 200
    })
    .await;
    (listener, proxy, workers)
}

/// Starts the bounded load; set the flag to stop it.
fn start_load(
    proxy: SocketAddr,
    origin: &Origin,
    echo: &Echo,
) -> (Arc<AtomicBool>, tokio::task::JoinHandle<Arc<Tally>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let handle = tokio::spawn(load(
        proxy,
        origin.clone(),
        echo.addr,
        stop.clone(),
        Duration::from_secs(60),
    ));
    (stop, handle)
}

/// Counts of a load run.
#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    new_connections: AtomicU64,
    tunnels: AtomicU64,
    tunnel_bytes: AtomicU64,
    /// Requests re-sent because the server closed an idle keep-alive
    /// connection as they were sent (RFC 9110 §9.2.2 allows any client to
    /// retry an idempotent request then, and HTTP clients do).
    retried: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
    }

    fn report(&self, name: &str) -> usize {
        let failures = self.failures.lock().unwrap();
        println!(
            "{name}: {} requests ({} on new connections), {} tunnels ({} bytes echoed), {} keep-alive retries, {} failed",
            self.requests.load(Ordering::Relaxed),
            self.new_connections.load(Ordering::Relaxed),
            self.tunnels.load(Ordering::Relaxed),
            self.tunnel_bytes.load(Ordering::Relaxed),
            self.retried.load(Ordering::Relaxed),
            failures.len()
        );
        for f in failures.iter().take(10) {
            println!("  failure: {f}");
        }
        failures.len()
    }
}

/// A steady, bounded load on `proxy`: keep-alive clients, a client that
/// opens a connection per request, and CONNECT tunnels moving data. Runs
/// until `stop`, and at most `limit`.
async fn load(
    proxy: SocketAddr,
    origin: Origin,
    echo: SocketAddr,
    stop: Arc<AtomicBool>,
    limit: Duration,
) -> Arc<Tally> {
    let tally = Arc::new(Tally::default());
    let deadline = Instant::now() + limit;
    let running =
        move |stop: &AtomicBool| !stop.load(Ordering::Relaxed) && Instant::now() < deadline;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (t, o, stop) = (tally.clone(), origin.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let url = o.url("/");
            let mut conn: Option<(ProxyConn, bool)> = None;
            while running(&stop) {
                let (c, reused) = match conn.take() {
                    Some((c, _)) if c.is_closed() => (ProxyConn::open(proxy).await, false),
                    Some((c, _)) => (c, true),
                    None => (ProxyConn::open(proxy).await, false),
                };
                let mut c = c;
                match c.try_get(&url).await {
                    Ok(r) if r.status == 200 => {
                        t.requests.fetch_add(1, Ordering::Relaxed);
                        conn = Some((c, true));
                    }
                    Ok(r) => t.fail(format!("keep-alive: status {}", r.status)),
                    Err(e) if reused && e.before_response => {
                        t.retried.fetch_add(1, Ordering::Relaxed);
                        match ProxyConn::open(proxy).await.try_get(&url).await {
                            Ok(r) if r.status == 200 => t.requests.fetch_add(1, Ordering::Relaxed),
                            other => {
                                t.fail(format!(
                                    "keep-alive retry: {:?}",
                                    other.map(|r| r.status).map_err(|e| e.message)
                                ));
                                continue;
                            }
                        };
                    }
                    Err(e) => t.fail(format!("keep-alive: {}", e.message)),
                }
            }
        }));
    }
    for _ in 0..3 {
        let (t, o, stop) = (tally.clone(), origin.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let url = o.url("/");
            while running(&stop) {
                match ProxyConn::open(proxy).await.try_get(&url).await {
                    Ok(r) if r.status == 200 => {
                        t.requests.fetch_add(1, Ordering::Relaxed);
                        t.new_connections.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => t.fail(format!("new connection: status {}", r.status)),
                    Err(e) => t.fail(format!("new connection: {}", e.message)),
                }
            }
        }));
    }
    for _ in 0..2 {
        let (t, stop) = (tally.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let data = pattern(256 * 1024);
            while running(&stop) {
                match tunnel_round(proxy, echo, &data).await {
                    Ok(()) => {
                        t.tunnels.fetch_add(1, Ordering::Relaxed);
                        t.tunnel_bytes
                            .fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                    Err(e) => t.fail(format!("tunnel: {e}")),
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    tally
}

/// One CONNECT tunnel: `data` out in 16 KiB writes, echoed back, compared.
async fn tunnel_round(proxy: SocketAddr, echo: SocketAddr, data: &[u8]) -> Result<(), String> {
    let (code, mut s) = connect_tunnel(proxy, &echo.to_string()).await;
    if code != 200 {
        return Err(format!("CONNECT status {code}"));
    }
    let (mut r, mut w) = s.split();
    let send = async {
        for chunk in data.chunks(16 * 1024) {
            w.write_all(chunk).await?;
        }
        w.shutdown().await
    };
    let mut back = Vec::with_capacity(data.len());
    let (sent, got) = tokio::join!(send, r.read_to_end(&mut back));
    sent.map_err(|e| format!("send: {e}"))?;
    got.map_err(|e| format!("receive: {e}"))?;
    if back != data {
        return Err(format!(
            "{} bytes back of {}, or corrupted",
            back.len(),
            data.len()
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_three_workers_loses_nothing() {
    let origin = Origin::start().await;
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.9"]).await;
    let extra = ["--drain-timeout", "10s"];
    let (listener, proxy, mut workers) = shared_workers(3, &alloc.socket, &extra, &origin).await;
    let fd = listener.as_raw_fd();
    let (stop, load) = start_load(proxy, &origin, &echo);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut exits = Vec::new();
    for slot in workers.iter_mut() {
        let mut old = std::mem::replace(slot, worker_on_shared_socket(fd, &alloc.socket, &extra));
        tokio::time::sleep(Duration::from_millis(200)).await;
        old.signal(Signal::SIGTERM);
        let status = tokio::task::spawn_blocking(move || old.wait(Duration::from_secs(15)))
            .await
            .unwrap();
        exits.push(status.code());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let tally = load.await.unwrap();
    let failed = tally.report("rolling restart");
    assert_eq!(
        exits,
        vec![Some(0); 3],
        "every replaced worker drained and exited 0"
    );
    assert_eq!(failed, 0);
    // Not one request on a kept-alive connection met a close: a client
    // that does not re-send would have lost none (a draining worker
    // answers the next request on each connection with `Connection:
    // close` rather than closing it between requests).
    assert_eq!(
        tally.retried.load(Ordering::Relaxed),
        0,
        "requests raced a close"
    );
    assert!(
        tally.requests.load(Ordering::Relaxed) > 100,
        "the load did not run"
    );
    assert!(tally.tunnels.load(Ordering::Relaxed) > 0);
    // The rotation stayed global: every address served its share.
    let mut counts: HashMap<IpAddr, usize> = HashMap::new();
    for ip in origin.sources() {
        *counts.entry(ip).or_default() += 1;
    }
    let (min, max) = (
        counts.values().min().unwrap(),
        counts.values().max().unwrap(),
    );
    assert_eq!(counts.len(), 8);
    assert!(
        max - min <= 2 + tally.tunnels.load(Ordering::Relaxed) as usize,
        "{counts:?}"
    );
    drop(listener);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocator_killed_and_restarted_under_load_loses_nothing() {
    let origin = Origin::start().await;
    let echo = Echo::start().await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let pool = ["--pool", "127.0.0.2-127.0.0.9"];
    let alloc = Allocator::start_in(dir.clone(), &pool).await;
    // (Requests wait for the allocator's restart: 5 s was little for a
    // debug build's start on a loaded machine.)
    let extra = ["--lease-timeout", "15s"];
    let (listener, proxy, _workers) = shared_workers(2, &alloc.socket, &extra, &origin).await;
    let (stop, load) = start_load(proxy, &origin, &echo);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = origin.count();
    drop(alloc); // SIGKILL
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let alloc = Allocator::start_in(dir, &pool).await;
    println!("allocator down for {:?}", killed_at.elapsed());
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    let tally = load.await.unwrap();
    let failed = tally.report("allocator restart");
    assert_eq!(failed, 0);
    assert!(
        origin.count() > before,
        "no request was served after the restart"
    );
    // The restarted allocator continued the saved sequence.
    let status = status_json(&alloc.socket);
    assert!(status["leases_total"].as_u64().unwrap() as usize >= origin.count());
    drop(listener);
}

#[tokio::test]
async fn restarted_allocator_continues_the_rotation_where_it_stopped() {
    let origin = Origin::start().await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let pool = ["--pool", "127.0.0.2-127.0.0.9"];
    let alloc = Allocator::start_in(dir.clone(), &pool).await;
    let worker = Worker::start(&alloc.socket, &["--lease-timeout", "10s"]).await;
    for _ in 0..5 {
        assert_eq!(get(worker.addr, &origin.url("/")).await.status, 200);
    }
    drop(alloc); // SIGKILL: no chance to save anything at exit
    let _alloc = Allocator::start_in(dir, &pool).await;
    for _ in 0..7 {
        assert_eq!(get(worker.addr, &origin.url("/")).await.status, 200);
    }
    let want: Vec<IpAddr> = ips(2..=9).into_iter().cycle().take(12).collect();
    assert_eq!(origin.sources(), want);
}

#[tokio::test]
async fn addresses_taken_out_by_hand_stay_out_over_an_allocator_restart() {
    let origin = Origin::start().await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let pool = ["--pool", "127.0.0.2-127.0.0.4"];
    let alloc = Allocator::start_in(dir.clone(), &pool).await;
    let worker = Worker::start(&alloc.socket, &["--lease-timeout", "10s"]).await;
    rotor_control("quarantine", &alloc.socket, &["127.0.0.3"]);
    rotor_control("quarantine", &alloc.socket, &["127.0.0.4", "--for", "1h"]);
    drop(alloc); // SIGKILL: nothing written at exit
    let alloc = Allocator::start_in(dir.clone(), &pool).await;
    for _ in 0..4 {
        assert_eq!(get(worker.addr, &origin.url("/")).await.status, 200);
    }
    assert_eq!(origin.sources(), ips(2..=2).repeat(4));
    let status = rotor_control("status", &alloc.socket, &[]);
    assert!(status.contains("kept over a restart"), "{status}");
    assert!(status.contains("until released"), "{status}");
    // Released: back at once, and not out after the next restart.
    rotor_control("release", &alloc.socket, &["127.0.0.3"]);
    rotor_control("release", &alloc.socket, &["127.0.0.4"]);
    drop(alloc);
    let _alloc = Allocator::start_in(dir, &pool).await;
    let before = origin.count();
    for _ in 0..6 {
        assert_eq!(get(worker.addr, &origin.url("/")).await.status, 200);
    }
    let mut seen = origin.sources()[before..].to_vec();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, ips(2..=4));
}

/// A worker that bound its own `--listen` socket (SO_REUSEPORT: no other
/// worker accepts from its queue) serves, at its stop, the connections
/// queued to it: closing the socket reset them (unless
/// `net.ipv4.tcp_migrate_req` was 1), and a rolling restart of such
/// workers lost a few requests.
#[tokio::test]
async fn a_stopping_worker_serves_what_waits_in_its_own_listeners_queue() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    worker.proc.signal(Signal::SIGSTOP);
    let mut queued = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(worker.addr).await.unwrap();
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
            origin.url("/"),
            origin.addr
        );
        s.write_all(req.as_bytes()).await.unwrap();
        queued.push(s);
    }
    worker.proc.signal(Signal::SIGTERM);
    worker.proc.signal(Signal::SIGCONT);
    for mut s in queued {
        let head = tokio::time::timeout(PATIENCE, read_head(&mut s))
            .await
            .expect("no answer");
        assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
    }
    assert_eq!(origin.count(), 8);
}

#[tokio::test]
async fn drain_lets_a_long_download_and_a_tunnel_finish() {
    let origin = Origin::start().await;
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let mut worker = Worker::start(&alloc.socket, &["--drain-timeout", "20s"]).await;
    let n = 4 << 20;
    // 64 chunks, 30 ms apart: about two seconds.
    let url = origin.url(&format!("/trickle/{n}/30"));
    let proxy = worker.addr;
    let download = tokio::spawn(async move { get(proxy, &url).await });
    let (code, mut tunnel) = connect_tunnel(worker.addr, &echo.addr.to_string()).await;
    assert_eq!(code, 200);
    // The download under way (not still in the listener's queue, which
    // the stop closes, however loaded the machine).
    eventually("the download under way", || async { origin.count() == 1 }).await;
    let t0 = Instant::now();
    worker.proc.signal(Signal::SIGTERM);
    // Stops accepting: a new connection is refused (once the worker has
    // seen the signal, however loaded the machine).
    let addr = worker.addr;
    eventually("new connections refused", || async move {
        TcpStream::connect(addr).await.is_err()
    })
    .await;
    // The tunnel still carries data both ways.
    tunnel.write_all(b"still there?").await.unwrap();
    let mut buf = [0u8; 12];
    tunnel.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still there?");
    let r = download.await.unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.body[..] == pattern(n)[..],
        "download cut or corrupted: {} bytes",
        r.body.len()
    );
    assert!(worker.proc.is_running(), "exited with a tunnel open");
    drop(tunnel);
    let status = tokio::task::spawn_blocking(move || {
        let s = worker.proc.wait(Duration::from_secs(10));
        (s, worker)
    })
    .await
    .unwrap()
    .0;
    assert_eq!(status.code(), Some(0));
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "drain slept out its timeout"
    );
}

#[tokio::test]
async fn idle_worker_stops_at_once_and_sigint_is_a_fast_stop() {
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let mut idle = Worker::start(&alloc.socket, &["--drain-timeout", "30s"]).await;
    // An idle keep-alive client does not hold the drain.
    let origin = Origin::start().await;
    let mut conn = ProxyConn::open(idle.addr).await;
    assert_eq!(conn.get(&origin.url("/")).await.status, 200);
    let t0 = Instant::now();
    idle.proc.signal(Signal::SIGTERM);
    let status = idle.proc.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    // (Well under the 30 s drain; a debug build's stop on a loaded
    // machine takes a second or more.)
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t0.elapsed()
    );

    let mut busy = Worker::start(&alloc.socket, &["--drain-timeout", "30s"]).await;
    let url = origin.url("/slow/20000");
    let proxy = busy.addr;
    let before = origin.count();
    let _slow =
        tokio::spawn(async move { ProxyConn::open(proxy).await.try_get(&url).await.is_ok() });
    // In flight (so the worker runs, its handlers in place) when stopped.
    let o = origin.clone();
    eventually("the slow request at the origin", || {
        let o = o.clone();
        async move { o.count() > before }
    })
    .await;
    busy.proc.signal(Signal::SIGINT);
    let status = busy.proc.wait(Duration::from_secs(5));
    assert_eq!(status.code(), Some(130));
}

/// An idle worker stops at once though its allocator does not answer
/// (stopped; a socket systemd holds for a dead one queues the connect
/// the same way): the last report waits a moment, not the 2 s it held the
/// exit. Timed by the worker's own log, from its drain to its stop.
#[tokio::test]
async fn an_idle_worker_stops_at_once_though_its_allocator_does_not_answer() {
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let cmd = logging_at_info(WORKER, &log);
    let mut w = Worker::start_cmd(cmd, &alloc.socket, free_port(), &ALLOW_LOOPBACK).await;
    eventually("connected", || async {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("connected to the allocator")
    })
    .await;
    alloc.proc.signal(Signal::SIGSTOP);
    w.proc.signal(Signal::SIGTERM);
    let status = tokio::task::spawn_blocking(move || w.proc.wait(Duration::from_secs(20)))
        .await
        .unwrap();
    alloc.proc.signal(Signal::SIGCONT);
    assert_eq!(status.code(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    // Seconds into the day of the first line with `what` (its
    // `2026-12-06T15:39:49.194335Z` stamp).
    let at = |what: &str| -> f64 {
        let line = text.lines().find(|l| l.contains(what)).expect(what);
        let hms: Vec<f64> = line[11..26]
            .split(':')
            .map(|v| v.parse().unwrap())
            .collect();
        hms[0] * 3600.0 + hms[1] * 60.0 + hms[2]
    };
    let took = at("stopped stopped=") - at("draining connections=");
    assert!(took < 1.5, "{took} s: {text}");
}

/// A CONNECT on a kept-alive connection in the drain's grace is refused
/// (503, `Proxy Stopping`), not opened to be cut at the drain's end: the
/// client asks another worker, and the stop does not wait for it.
#[tokio::test]
async fn a_connect_during_the_drain_is_refused() {
    refused_in_the_drain(false).await;
}

/// So is a WebSocket's handshake (it would become a tunnel too).
#[tokio::test]
async fn a_websocket_during_the_drain_is_refused() {
    refused_in_the_drain(true).await;
}

async fn refused_in_the_drain(websocket: bool) {
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let mut w = Worker::start(&alloc.socket, &["--drain-timeout", "30s"]).await;
    let echo = Echo::start().await;
    let origin = Origin::start().await;
    let mut s = raw_get(w.addr, &origin.url("/")).await;
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let length = content_length(&head).expect("a length");
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).await.unwrap();
    let t0 = Instant::now();
    // Then the CONNECT (or handshake), within the drain's 1 s grace for a
    // kept-alive connection's next request.
    let target = echo.addr;
    let request = match websocket {
        false => format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"),
        true => format!("GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
    };
    let head = sent_in_the_drain(&w, &mut s, &request).await;
    assert!(head.starts_with("HTTP/1.1 503 Proxy Stopping"), "{head}");
    let status = w.proc.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    assert_eq!(echo.peers.lock().unwrap().len(), 0, "a tunnel opened");
}

/// A connection's first request that arrives in the drain's grace is
/// served, a CONNECT too: the connection was accepted before the drain and
/// only this worker can answer it (a client refused with a 503 rarely asks
/// again). The drain waits for the tunnel. Under a rolling restart's load
/// the refusal lost a tunnel now and then.
#[tokio::test]
async fn a_first_connect_in_the_drain_is_served() {
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let mut w = Worker::start(&alloc.socket, &["--drain-timeout", "30s"]).await;
    let echo = Echo::start().await;
    let mut s = TcpStream::connect(w.addr).await.unwrap();
    accepted(w.addr).await;
    let t0 = Instant::now();
    let head = connect_in_the_drain(&w, &mut s, echo.addr).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The drain waits for the tunnel.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(w.proc.is_running(), "the worker stopped with a tunnel open");
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"ping");
    drop(s);
    // (Waited for off the runtime: the echo server runs on it.)
    let status = exit_of(w, Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0));
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    assert_eq!(echo.peers.lock().unwrap().len(), 1);
}

/// Stops `w` (SIGTERM), then, its drain begun, sends a CONNECT to `target`
/// on `s` (a connection it accepted before): the answer's head.
async fn connect_in_the_drain(w: &Worker, s: &mut TcpStream, target: SocketAddr) -> String {
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    sent_in_the_drain(w, s, &request).await
}

/// Stops `w` (SIGTERM), then, its drain begun, sends `request` on `s`: the
/// answer's head.
async fn sent_in_the_drain(w: &Worker, s: &mut TcpStream, request: &str) -> String {
    w.proc.signal(Signal::SIGTERM);
    drain_begun(w.addr).await;
    s.write_all(request.as_bytes()).await.unwrap();
    read_head(s).await
}

/// A connection to `proxy` that hyper's server took over: it carried an
/// upload past the fast path's 64 KiB.
async fn on_hypers_path(proxy: SocketAddr, origin: &Origin) -> ProxyConn {
    let mut c = ProxyConn::open(proxy).await;
    let upload = http::Request::post(origin.url("/echo"))
        .header("host", "x")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            vec![b'x'; 100 * 1024],
        )))
        .unwrap();
    assert_eq!(c.send(upload).await.status, 200);
    c
}

/// On hyper's path (the connection took an upload past the fast path's
/// 64 KiB), a response still going out when the drain begins has the
/// grace for the next request start at its end, as the fast path does:
/// the next request is answered, with `Connection: close`. (The grace
/// ran from the stop, and the connection closed under the next request
/// once the body ended.)
#[tokio::test]
async fn a_drain_waits_for_a_streaming_answer_before_its_grace_on_hypers_path() {
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let w = Worker::start(&alloc.socket, &["--drain-timeout", "20s"]).await;
    let origin = Origin::start().await;
    let mut c = on_hypers_path(w.addr, &origin).await;
    // About 2 s of body, the drain begun once its head is in.
    let n = 40 * 64 * 1024;
    let url = origin.url(&format!("/trickle/{n}/50"));
    let r = c
        .send_head(http::Request::get(url).body(Default::default()).unwrap())
        .await;
    assert_eq!(r.status(), 200);
    w.proc.signal(Signal::SIGTERM);
    let body = http_body_util::BodyExt::collect(r.into_body())
        .await
        .unwrap();
    assert_eq!(body.to_bytes().len(), n);
    let next = c.try_get(&origin.url("/")).await;
    let next = next.unwrap_or_else(|e| panic!("the next request was lost: {}", e.message));
    assert_eq!(next.status, 200);
    assert_eq!(next.headers.get("connection").unwrap(), "close");
    let status = exit_of(w, Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0));
}

/// On hyper's path, a response that stops coming while the drain waits
/// for its end is dropped after `--idle-timeout`, as without the drain:
/// the wait for it to end held the drain to `--drain-timeout` (exit 3).
#[tokio::test]
async fn a_stalled_answer_does_not_hold_the_drain_on_hypers_path() {
    // A head and one byte of a hundred, then nothing.
    let (stall, _) = recording_server(|mut s: TcpStream| async move {
        let mut b = [0u8; 4096];
        let _ = s.read(&mut b).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nx")
            .await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let args = ["--idle-timeout", "3s", "--drain-timeout", "20s"];
    let w = Worker::start(&alloc.socket, &args).await;
    let origin = Origin::start().await;
    let mut c = on_hypers_path(w.addr, &origin).await;
    let r = c
        .send_head(
            http::Request::get(format!("http://{stall}/"))
                .body(Default::default())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status(), 200);
    let t0 = Instant::now();
    w.proc.signal(Signal::SIGTERM);
    let status = exit_of(w, Duration::from_secs(25)).await;
    assert_eq!(status.code(), Some(0));
    assert!(t0.elapsed() < Duration::from_secs(12), "{:?}", t0.elapsed());
    drop(r);
}

/// An answer made at once in the drain on hyper's path (a 407 to a
/// connection's first CONNECT) says `Connection: close`: hyper wrote it
/// before its graceful shutdown could, and then closed the connection
/// under the client's retry with credentials.
#[tokio::test]
async fn an_answer_made_at_once_in_the_drain_says_close() {
    let users = tempfile::NamedTempFile::new().unwrap();
    add_user(users.path(), "alice", "s3cret");
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let args = ["--auth-file", users.path().to_str().unwrap()];
    let w = Worker::start(&alloc.socket, &args).await;
    let echo = Echo::start().await;
    let mut s = TcpStream::connect(w.addr).await.unwrap();
    accepted(w.addr).await;
    let head = connect_in_the_drain(&w, &mut s, echo.addr)
        .await
        .to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 407"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let status = exit_of(w, Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0));
}

/// The lingering close after an upload answered early (a 407 while the
/// client goes on sending) ends with the drain's grace: it held the drain
/// to `--drain-timeout`, which then said work was cut (exit 3).
#[tokio::test]
async fn a_lingering_close_does_not_hold_the_drain() {
    let users = tempfile::NamedTempFile::new().unwrap();
    add_user(users.path(), "alice", "s3cret");
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let args = [
        "--auth-file",
        users.path().to_str().unwrap(),
        "--drain-timeout",
        "8s",
    ];
    let w = Worker::start(&alloc.socket, &args).await;
    let origin = Origin::start().await;
    let mut s = TcpStream::connect(w.addr).await.unwrap();
    let url = origin.url("/echo");
    s.write_all(
        format!(
            "POST {url} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");
    // The client goes on sending its body, 200 ms apart (for 12 s at most).
    let (_r, mut wr) = s.into_split();
    tokio::spawn(async move {
        for _ in 0..60 {
            if wr.write_all(b"4\r\nabcd\r\n").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    w.proc.signal(Signal::SIGTERM);
    let status = exit_of(w, Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0));
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
}

/// A kept-alive connection whose last request's body (an upload hyper's
/// server read, past the fast path's 64 KiB) was read whole does not
/// linger at the stop as one with a body left unread does: the drain ends
/// in its grace, not after the lingering close's 5 s of silence.
#[tokio::test]
async fn a_connection_after_a_whole_upload_does_not_hold_the_drain() {
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let mut w = Worker::start(&alloc.socket, &["--drain-timeout", "30s"]).await;
    let origin = Origin::start().await;
    let mut s = TcpStream::connect(w.addr).await.unwrap();
    let url = origin.url("/echo");
    let body = vec![b'x'; 100 * 1024];
    s.write_all(
        format!(
            "POST {url} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    s.write_all(&body).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut back = vec![0u8; body.len()];
    s.read_exact(&mut back).await.unwrap();
    let t0 = Instant::now();
    w.proc.signal(Signal::SIGTERM);
    let status = w.proc.wait(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0));
    // (The lingering close would take the grace and its 5 s: 6 s.)
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    drop(s);
}

/// A request head half sent when the stop comes is given the drain's
/// grace, not the rest of the header timeout (15 s here), to be whole.
#[tokio::test]
async fn a_half_sent_head_does_not_hold_the_drain() {
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let mut w = Worker::start(
        &alloc.socket,
        &["--drain-timeout", "30s", "--header-read-timeout", "15s"],
    )
    .await;
    let mut s = TcpStream::connect(w.addr).await.unwrap();
    s.write_all(b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    w.proc.signal(Signal::SIGTERM);
    let status = w.proc.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));
    // (The header timeout would take 15 s.)
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    drop(s);
}

/// A Unix datagram socket standing in for systemd's NOTIFY_SOCKET.
async fn notify_socket(dir: &Path) -> (UnixDatagram, String) {
    let path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    (sock, path.to_str().unwrap().to_string())
}

async fn wait_for_notify(sock: &UnixDatagram, want: &str) -> String {
    let mut all = String::new();
    let mut buf = vec![0u8; 4096];
    let deadline = Instant::now() + PATIENCE;
    while !all.contains(want) {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, sock.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {want} notification; got {all:?}"))
            .unwrap();
        all.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    all
}

#[tokio::test]
async fn socket_activation_of_both_binaries_and_readiness() {
    if !have(
        "socket_activation_of_both_binaries_and_readiness",
        &["systemd-socket-activate"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("allocator.sock");
    let (notify_alloc, alloc_path) = notify_socket(&dir.path().join("a").tap_mkdir()).await;
    let (notify_worker, worker_path) = notify_socket(&dir.path().join("w").tap_mkdir()).await;
    let state = dir.path().join("state");

    // The allocator's socket is systemd's: it exists before the allocator
    // runs, and the first connection starts it.
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.env("NOTIFY_SOCKET", &alloc_path);
    let _alloc = Proc::spawn_cmd(
        cmd,
        "systemd-socket-activate",
        &[
            "-l",
            socket.to_str().unwrap(),
            "--fdname=allocator",
            "-E",
            "NOTIFY_SOCKET",
            ALLOCATOR,
            "--pool",
            "127.0.0.2-127.0.0.3",
            "--state-dir",
            state.to_str().unwrap(),
        ],
    );
    eventually("the activation socket", || {
        let s = socket.clone();
        async move { s.exists() }
    })
    .await;

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.env("NOTIFY_SOCKET", &worker_path);
    let worker = Proc::spawn_cmd(
        cmd,
        "systemd-socket-activate",
        &[
            "-l",
            &listen,
            "--fdname=proxy",
            "-E",
            "NOTIFY_SOCKET",
            "-E",
            &format!("ROTOR_SOCKET={}", socket.display()),
            WORKER,
            "--allow-destination",
            "127.0.0.0/8",
            // (the first request waits for the allocator systemd starts:
            // a debug build's start on a loaded machine)
            "--lease-timeout",
            "10s",
            "--drain-timeout",
            "2h",
        ],
    );
    let proxy: SocketAddr = listen.parse().unwrap();
    eventually("the proxy socket", || async move {
        TcpStream::connect(proxy).await.is_ok()
    })
    .await;
    // That connect started the worker; the worker's connect started the
    // allocator. Both report ready.
    let origin = Origin::start().await;
    assert_eq!(get(proxy, &origin.url("/")).await.status, 200);
    assert_eq!(get(proxy, &origin.url("/")).await.status, 200);
    assert_eq!(origin.sources(), ips(2..=3));
    // The lease table takes the passed socket's mode (here what
    // systemd-socket-activate made it, under the test's umask), less
    // what it gives others, not the settings' 660.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let table = std::path::PathBuf::from(format!("{}.leases", socket.display()));
        assert_eq!(mode(&table), mode(&socket) & 0o660, "{:o}", mode(&socket));
    }
    let a = wait_for_notify(&notify_alloc, "READY=1").await;
    assert!(a.contains("STATUS=pool 2 addresses"), "{a}");
    wait_for_notify(&notify_worker, "READY=1").await;
    // Stopping, the worker asks systemd for its drain and a margin (past
    // the unit's TimeoutStopSec of 40 s, it had been killed mid-drain),
    // in full past the 71 minutes a u32 of microseconds holds.
    worker.signal(nix::sys::signal::Signal::SIGTERM);
    let w = wait_for_notify(&notify_worker, "STOPPING=1").await;
    assert!(w.contains("EXTEND_TIMEOUT_USEC=7210000000"), "{w}");
}

/// A socket systemd passes under a name no worker serves is a refused
/// start, saying which: beside a `proxy` one it was left unserved, and
/// alone, named as TLS (`https`), it was served as plain HTTP.
#[tokio::test]
async fn a_socket_passed_under_a_name_no_worker_serves_is_refused() {
    if !have(
        "a_socket_passed_under_a_name_no_worker_serves_is_refused",
        &["systemd-socket-activate"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("allocator.sock");
    for names in ["proxy:https", "https"] {
        let ports: Vec<u16> = names.split(':').map(|_| free_port()).collect();
        let mut cmd = std::process::Command::new("systemd-socket-activate");
        for p in &ports {
            cmd.args(["-l", &format!("127.0.0.1:{p}")]);
        }
        cmd.arg(format!("--fdname={names}"))
            .arg(WORKER)
            .arg("--socket")
            .arg(&socket)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let child = cmd.spawn().unwrap();
        // Its first connection starts the worker.
        let first: SocketAddr = ([127, 0, 0, 1], ports[0]).into();
        eventually("the activation socket", || async move {
            TcpStream::connect(first).await.is_ok()
        })
        .await;
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()),
        )
        .await
        .expect("the worker stopped")
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{names}: {stderr}");
        assert!(stderr.contains("passed as `https`"), "{stderr}");
        assert!(stderr.contains("FileDescriptorName="), "{stderr}");
    }
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for std::path::PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

/// Established client connections to `port` that each of `pids` holds,
/// read from /proc as `ss -p` does.
fn connections_held(port: u16, pids: &[u32]) -> Vec<usize> {
    sockets_in(port, pids, &["01"])
}

/// As `connections_held`, counting the sockets of port `port` in these
/// TCP states (/proc/net/tcp's codes: 01 established, 08 close-wait).
fn sockets_in(port: u16, pids: &[u32], states: &[&str]) -> Vec<usize> {
    let mut inodes = std::collections::HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f[1].rsplit(':').next().unwrap();
            if u16::from_str_radix(local_port, 16) == Ok(port) && states.contains(&f[3]) {
                inodes.insert(format!("socket:[{}]", f[9]));
            }
        }
    }
    pids.iter()
        .map(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|l| inodes.contains(l.to_string_lossy().as_ref()))
                .count()
        })
        .collect()
}

/// Opens `n` keep-alive connections at once, each with one request served.
async fn open_served(proxy: SocketAddr, origin: &Origin, n: usize) -> Vec<ProxyConn> {
    let opens = (0..n).map(|_| async {
        let mut c = ProxyConn::open(proxy).await;
        assert_eq!(c.get(&origin.url("/")).await.status, 200);
        c
    });
    futures_util::future::join_all(opens).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_sharing_a_socket_share_out_long_lived_connections() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.9"]).await;
    let (_listener, proxy, workers) = shared_workers(2, &alloc.socket, &[], &origin).await;
    eventually("both workers attached", || async {
        let status = status_json(&alloc.socket);
        let peers = status["peers"].as_array().unwrap();
        peers.iter().filter(|p| p["role"] == "Worker").count() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pids: Vec<u32> = workers.iter().map(|w| w.child.id()).collect();

    // The second worker stopped: the first takes every connection (a
    // stopped sibling delays none by more than a moment).
    workers[1].signal(Signal::SIGSTOP);
    // Stopped for sure before any connection is opened.
    stopped_for_sure(pids[1]).await;
    let started = Instant::now();
    let mut held = open_served(proxy, &origin, 16).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a stopped sibling held accepts back: {:?}",
        started.elapsed()
    );
    assert_eq!(connections_held(proxy.port(), &pids), [16, 0]);

    // Back: a burst of 16 more goes mostly to the idle one, which a race
    // for each accept would give about half.
    workers[1].signal(Signal::SIGCONT);
    // Its load published again (every 100 ms) before the burst: on two
    // cores shared with the whole suite, 300 ms was once too little.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    held.extend(open_served(proxy, &origin, 16).await);
    let split = connections_held(proxy.port(), &pids);
    assert_eq!(split.iter().sum::<usize>(), 32, "{split:?}");
    // More of the burst to the idle one than to the busy one. (A busier
    // worker defers each accept by 1 ms for its sibling; a loaded machine
    // may not wake the sibling in time for some.)
    assert!(
        split[1] > 16 - split[1],
        "the idle worker got too few: {split:?}"
    );
    drop(held);
}

/// A SOCKS5 listener is shared out as an HTTP one is: its accept loop was
/// tokio's own, which no balance held back, so tunnels (long-lived, as
/// SOCKS5 clients hold them) landed wherever the accept race fell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_sharing_a_socks5_socket_share_out_its_tunnels() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.9"]).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = listener.local_addr().unwrap();
    let shared = ("--socks-listen-fd", listener.as_raw_fd());
    let workers: Vec<Proc> = (0..2)
        .map(|_| worker_on_shared(shared, &alloc.socket, &[]))
        .collect();
    eventually("both workers attached", || async {
        let status = status_json(&alloc.socket);
        let peers = status["peers"].as_array().unwrap();
        peers.iter().filter(|p| p["role"] == "Worker").count() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pids: Vec<u32> = workers.iter().map(|w| w.child.id()).collect();
    let open = |n: usize| {
        let opens = (0..n).map(|_| async {
            let port = origin.addr.port();
            let (code, s) = crate::socks::connect(proxy, None, "127.0.0.1", port).await;
            assert_eq!(code, 0, "the SOCKS5 reply");
            s
        });
        futures_util::future::join_all(opens)
    };
    workers[1].signal(Signal::SIGSTOP);
    stopped_for_sure(pids[1]).await;
    let mut held = open(16).await;
    assert_eq!(connections_held(proxy.port(), &pids), [16, 0]);
    workers[1].signal(Signal::SIGCONT);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    held.extend(open(16).await);
    let split = connections_held(proxy.port(), &pids);
    assert_eq!(split.iter().sum::<usize>(), 32, "{split:?}");
    // More of the burst to the idle one than to the busy one (a race for
    // each accept gave about half).
    assert!(
        split[1] > 16 - split[1],
        "the idle worker got too few: {split:?}"
    );
    drop(held);
}

/// A TLS socket systemd passes (`rotor-worker-tls.socket`, named `tls`)
/// with no certificate configured: the worker refuses to start, saying
/// why, rather than leave the socket open to clients that would hang in
/// its backlog (and `ExecStartPre=--check` cannot see it).
#[test]
fn a_tls_socket_passed_without_a_certificate_is_refused_at_start() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fd = listener.as_raw_fd();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(WORKER);
    pass_as_fd_3(&mut cmd, fd);
    let out = cmd
        .args([
            "--tls-listen-fd",
            "3",
            "--listen",
            "127.0.0.1:0",
            "--socket",
        ])
        .arg(dir.path().join("allocator.sock"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("needs tls-cert and tls-key"), "{stderr}");
}

/// A full worker leaves a new connection to a sibling with room — for
/// 10 ms at most: a sibling stopped (or wedged) with room to spare took
/// none, and connections waited in the shared queue for ever, the full
/// worker awake every millisecond. Now the full worker takes it after the
/// wait and answers 503 at once, as its limit says.
#[tokio::test]
async fn a_full_worker_answers_when_its_sibling_with_room_is_stopped() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.3"]).await;
    let extra = ["--max-connections", "2", "--header-read-timeout", "30s"];
    let (_listener, proxy, workers) = shared_workers(2, &alloc.socket, &extra, &origin).await;
    // The probes' connections closed by the workers too (one still open
    // would hold a place), and the loads published.
    let pids: Vec<u32> = workers.iter().map(|w| w.child.id()).collect();
    eventually("the probes' connections gone", || async {
        sockets_in(proxy.port(), &pids, &["01", "08"]) == [0, 0]
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    workers[1].signal(Signal::SIGSTOP);
    stopped_for_sure(workers[1].child.id()).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        s.write_all(b"GET http://x/ HTTP/1.1\r\n").await.unwrap();
        held.push(s);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut over = TcpStream::connect(proxy).await.unwrap();
    let mut head = [0u8; 12];
    // (Not answered, it would wait for ever.)
    let read = tokio::time::timeout(PATIENCE, over.read_exact(&mut head)).await;
    workers[1].signal(Signal::SIGCONT);
    read.expect("answered while the sibling is stopped")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 503");
}

/// The worker unit's `ExecStartPre=--check` runs while systemd holds the
/// proxy port (passed to `ExecStart` only): the check binds nothing, so a
/// port held by another socket is no failure (it was EADDRINUSE, and the
/// unit never started).
/// `--check-config`, the allocator's, is a check in a worker too (it had
/// been ignored: the worker started and served).
/// Nor does it make the access log: it checks that the log could be made
/// (it had created the file, as root in the unit's ExecStartPre).
#[test]
fn a_worker_check_binds_nothing() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    // The worker's check on the held port with this access log: its exit
    // code and what it said.
    let check = |check: &str, log: &std::path::Path| {
        let out = Command::new(WORKER)
            .args(["--listen", &port, "--socket", "/nonexistent/a.sock", check])
            .arg("--access-log")
            .arg(log)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stderr)
    };
    for c in ["--check", "--check-config"] {
        let (code, stderr) = check(c, &log);
        assert_eq!(code, Some(0), "{c}: {stderr}");
        assert!(
            stderr.contains(&format!("listen {port} (not bound")),
            "{c}: {stderr}"
        );
        assert!(stderr.contains("access log: on"), "{c}: {stderr}");
        assert!(!log.exists(), "{c} made the access log");
    }
    // A log that could not be made fails the check, named.
    let (code, stderr) = check("--check", &dir.path().join("none/access.log"));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("access-log") && stderr.contains("cannot be made"),
        "{stderr}"
    );
    // An empty path (`access-log = ""`) is refused too: it passed, and
    // each worker then failed at its start.
    let (code, stderr) = check("--check", std::path::Path::new(""));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("is empty"), "{stderr}");
}

/// systemd's SIGTERM to the whole control group and `rotor up`'s own reach
/// a worker a moment apart: one stop, still a drain (a second SIGTERM had
/// been a fast stop, cutting what was in flight). One a second or more
/// later is the fast stop it always was.
#[tokio::test]
async fn two_sigterms_a_moment_apart_are_one_drain() {
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let origin = Origin::start().await;
    let mut busy = Worker::start(&alloc.socket, &["--drain-timeout", "30s"]).await;
    let url = origin.url("/slow/1500");
    let proxy = busy.addr;
    let slow = tokio::spawn(async move { ProxyConn::open(proxy).await.try_get(&url).await });
    eventually("the request under way", || async { origin.count() == 1 }).await;
    busy.proc.signal(Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(50)).await;
    busy.proc.signal(Signal::SIGTERM);
    let reply = slow.await.unwrap().expect("the request in flight finished");
    assert_eq!(reply.status, 200);
    let status = busy.proc.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}

/// While a worker drains, a client that stopped reading its response (on
/// hyper's path) is dropped after `--idle-timeout`, as it would be without
/// the drain, not waited for until `--drain-timeout` cuts the drain (3 s
/// idle, 30 s drain: the stop comes before the idle timeout).
#[tokio::test]
async fn a_client_that_stopped_reading_does_not_hold_the_drain() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(
        &alloc.socket,
        &["--idle-timeout", "3s", "--drain-timeout", "30s"],
    )
    .await;
    // HTTP/1.0: hyper's path. 48 MiB, more than the sockets hold.
    let url = origin.url(&format!("/bytes/{}", 48 << 20));
    let mut c = TcpStream::connect(worker.addr).await.unwrap();
    c.write_all(format!("GET {url} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 12];
    c.read_exact(&mut head).await.unwrap();
    assert_eq!(&head[8..], b" 200", "{}", String::from_utf8_lossy(&head));
    // Reads no more; the stop comes before the connection is idle.
    drains_within(worker, Duration::from_secs(10)).await;
    drop(c);
}

/// A request answered in the drain says `Connection: close`; a client
/// that sent its next request before it read that (pipelined, or racing
/// the answer) still gets the whole answer: the fast path's close reads
/// and drops what the client sent, where a close with it unread was a
/// reset that dropped the end of the answer still unsent.
///
/// On hyper's path too: a connection whose first request was a chunked
/// upload stays there.
#[tokio::test]
async fn an_answer_in_the_drain_reaches_a_client_that_sent_more() {
    for hypers in [false, true] {
        answer_in_the_drain_to_a_client_that_sent_more(hypers).await;
    }
}

async fn answer_in_the_drain_to_a_client_that_sent_more(hypers: bool) {
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let w = Worker::start(&alloc.socket, &[]).await;
    let origin = Origin::start().await;
    let mut s = TcpStream::connect(w.addr).await.unwrap();
    accepted(w.addr).await;
    if hypers {
        let url = origin.url("/echo");
        s.write_all(
            format!(
                "POST {url} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let mut body = [0u8; 4];
        s.read_exact(&mut body).await.unwrap();
        assert_eq!(&body, b"abcd");
    }
    w.proc.signal(Signal::SIGTERM);
    drain_begun(w.addr).await;
    // 8 MiB: more than the sockets hold, so its end waits to be sent
    // while the next request sits unread.
    let size = 8 << 20;
    let big = origin.url(&format!("/bytes/{size}"));
    s.write_all(format!("GET {big} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..3 {
        s.write_all(format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", origin.url("/")).as_bytes())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut all = Vec::new();
    let read = tokio::time::timeout(PATIENCE, s.read_to_end(&mut all))
        .await
        .expect("the proxy did not close the connection");
    assert!(
        read.is_ok(),
        "{read:?} after {} bytes (hyper's: {hypers})",
        all.len()
    );
    let text = String::from_utf8_lossy(&all[..all.len().min(400)]).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    // Chunked (the origin sends no length): whole with its last chunk.
    let head = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(all.len() - head > size, "{} of {size}", all.len() - head);
    assert!(
        all.ends_with(b"\r\n0\r\n\r\n"),
        "the whole body (hyper's: {hypers})"
    );
    let status = exit_of(w, Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0));
}
