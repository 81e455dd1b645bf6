//! Limits against hostile or careless clients, with real sockets.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::*;

/// Reads until the peer closes; returns how long that took.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Duration {
    let t0 = Instant::now();
    let mut sink = Vec::new();
    tokio::time::timeout(limit, s.read_to_end(&mut sink))
        .await
        .expect("the connection was not closed in time")
        .ok();
    t0.elapsed()
}

#[tokio::test]
async fn idle_keep_alive_connections_and_idle_tunnels_are_closed() {
    let origin = Origin::start().await;
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(
        &alloc.socket,
        &[
            "--idle-timeout",
            "1500ms",
            "--tunnel-idle-timeout",
            "1500ms",
        ],
    )
    .await;

    let mut s = TcpStream::connect(worker.addr).await.unwrap();
    let req = format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", origin.url("/"));
    s.write_all(req.as_bytes()).await.unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 200"));
    let took = closed_within(&mut s, Duration::from_secs(8)).await;
    // (the idle clock started when the answer was written, a moment
    // before this one)
    assert!(
        took >= Duration::from_millis(1000),
        "closed too early: {took:?}"
    );

    let (code, mut tunnel) = connect_tunnel(worker.addr, &echo.addr.to_string()).await;
    assert_eq!(code, 200);
    // Activity keeps it open…
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        tunnel.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        tunnel.read_exact(&mut b).await.unwrap();
    }
    // …silence closes it.
    closed_within(&mut tunnel, Duration::from_secs(8)).await;
}

#[tokio::test]
async fn the_connection_cap_refuses_quickly_and_recovers() {
    let origin = Origin::start().await;
    let metrics: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let m = metrics.to_string();
    let alloc = Allocator::start(&["--pool", "127.0.0.2", "--metrics-listen", &m]).await;
    let worker = Worker::start(&alloc.socket, &["--max-connections", "3"]).await;
    // Worker::start's readiness probe connections are gone by now; hold 3.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = ProxyConn::open(worker.addr).await;
        assert_eq!(c.get(&origin.url("/")).await.status, 200);
        held.push(c);
    }
    let t0 = Instant::now();
    let mut s = TcpStream::connect(worker.addr).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(head.contains("connection limit"), "{head}");
    assert!(t0.elapsed() < Duration::from_secs(2));
    // Clients that send their request before reading get the 503 too,
    // never a reset (closing with their request unread sent one).
    for i in 0..40 {
        let mut s = TcpStream::connect(worker.addr).await.unwrap();
        let req = format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", origin.url("/"));
        s.write_all(req.as_bytes()).await.unwrap();
        let mut all = Vec::new();
        let r = s.read_to_end(&mut all).await;
        let text = String::from_utf8_lossy(&all);
        assert!(
            r.is_ok() && text.starts_with("HTTP/1.1 503"),
            "refusal {i}: {r:?} {text}"
        );
    }
    // Each refusal is counted (as its Proxy-Status names it).
    eventually("the refusals counted", || async move {
        let text = tokio::task::spawn_blocking(move || crate::metrics::scrape(metrics))
            .await
            .unwrap();
        text.lines().any(|l| {
            l.strip_prefix("rotor_errors_total{error=\"proxy_internal_error\"} ")
                .and_then(|n| n.trim().parse::<f64>().ok())
                .is_some_and(|n| n >= 41.0)
        })
    })
    .await;
    // The held clients are still served.
    assert_eq!(held[0].get(&origin.url("/")).await.status, 200);
    drop(held);
    eventually("a free place", || async {
        ProxyConn::open(worker.addr)
            .await
            .try_get(&origin.url("/"))
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
}

/// A client connection from `source` (a loopback address of the test's).
async fn connect_from(source: &str, to: std::net::SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    sock.connect(to).await.unwrap()
}

/// An origin, and a worker with an HTTP and a SOCKS5 listener (the last
/// returned) that lets an address hold two connections, its access log
/// (JSON) at `log`.
async fn two_places_an_address(
    log: &std::path::Path,
) -> (Origin, Allocator, Worker, std::net::SocketAddr) {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let extra = ["--max-client-connections", "2"];
    let (worker, socks) = socks_worker_logging_json(&alloc.socket, log, &extra).await;
    (origin, alloc, worker, socks)
}

/// `--max-client-connections`: one address holding its share of places
/// (idle, before any request) is refused at once past it, on the HTTP and
/// the SOCKS5 listener, each refusal with its access line; other
/// addresses are served, and a place comes back when a connection closes.
#[tokio::test]
async fn one_client_address_cannot_take_every_place() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let (origin, _alloc, worker, socks) = two_places_an_address(&log).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(connect_from("127.0.0.77", worker.addr).await);
    }
    // Counted once accepted: give the worker a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = connect_from("127.0.0.77", worker.addr).await;
    let head = read_head(&mut third).await;
    assert!(
        head.starts_with("HTTP/1.1 503 Client Connection Limit Reached")
            && head.contains("error=connection_limit_reached"),
        "{head}"
    );
    let mut greeting = connect_from("127.0.0.77", socks).await;
    greeting.write_all(&[5, 1, 0]).await.unwrap();
    let mut reply = [0u8; 2];
    greeting.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply, [5, 0xff], "SOCKS5: no acceptable method");
    // Both refusals have their access line: 503, the limit named, the
    // method `-` (nothing read) or `SOCKS5`.
    for method in ["-", "SOCKS5"] {
        eventually("the refusal's access line", || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            async move {
                text.lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .any(|l| {
                        l["status"] == 503
                            && l["error"] == "connection_limit_reached"
                            && l["method"] == method
                            && l["target"] == "-"
                            && l["client"]
                                .as_str()
                                .is_some_and(|c| c.starts_with("127.0.0.77"))
                    })
            }
        })
        .await;
    }
    // Another address is served meanwhile.
    let mut other = connect_from("127.0.0.78", worker.addr).await;
    let req = format!(
        "GET {} HTTP/1.1
Host: x

",
        origin.url("/")
    );
    other.write_all(req.as_bytes()).await.unwrap();
    assert!(read_head(&mut other).await.starts_with("HTTP/1.1 200"));
    // One closed: that address has a place again.
    drop(held.pop());
    let worker_addr = worker.addr;
    let req2 = req.clone();
    eventually("a place for the address again", || {
        let req = req2.clone();
        async move {
            let mut s = connect_from("127.0.0.77", worker_addr).await;
            s.write_all(req.as_bytes()).await.unwrap();
            read_head(&mut s).await.starts_with("HTTP/1.1 200")
        }
    })
    .await;
}

/// A tunnel keeps its address's place under `--max-client-connections`
/// (an HTTP CONNECT's and a SOCKS5 one's): one address could open tunnels
/// until every place under `--max-connections` was its.
#[tokio::test]
async fn tunnels_keep_their_address_place() {
    let dir = tempfile::tempdir().unwrap();
    let (origin, _alloc, worker, socks) =
        two_places_an_address(&dir.path().join("access.log")).await;
    let dest = origin.addr;
    let mut http = connect_from("127.0.0.77", worker.addr).await;
    http.write_all(format!("CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert!(read_head(&mut http).await.starts_with("HTTP/1.1 200"));
    let mut tunnel = connect_from("127.0.0.77", socks).await;
    tunnel.write_all(&[5, 1, 0]).await.unwrap();
    let mut reply = [0u8; 2];
    tunnel.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply, [5, 0]);
    let std::net::IpAddr::V4(ip) = dest.ip() else {
        unreachable!()
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&ip.octets());
    req.extend_from_slice(&dest.port().to_be_bytes());
    tunnel.write_all(&req).await.unwrap();
    let mut reply = [0u8; 10];
    tunnel.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply[1], 0, "SOCKS5 CONNECT refused: {reply:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = connect_from("127.0.0.77", worker.addr).await;
    let head = read_head(&mut third).await;
    assert!(
        head.starts_with("HTTP/1.1 503 Client Connection Limit Reached"),
        "two tunnels open, a third connection: {head}"
    );
    // A tunnel's end gives its place back.
    drop(tunnel);
    let worker_addr = worker.addr;
    eventually("a place for the address again", || async move {
        let mut s = connect_from("127.0.0.77", worker_addr).await;
        s.write_all(format!("CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        read_head(&mut s).await.starts_with("HTTP/1.1 200")
    })
    .await;
}

/// The soft descriptor limit of `pid`, from /proc.
fn soft_nofile(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

#[tokio::test]
async fn the_worker_raises_its_descriptor_limit_to_the_hard_one() {
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap()
        .1
        .min(65_536);
    let cmd = with_nofile(std::process::Command::new(WORKER), 256, hard);
    let worker = Worker::start_cmd(cmd, &alloc.socket, free_port(), &ALLOW_LOOPBACK).await;
    assert_eq!(soft_nofile(worker.proc.child.id()), hard);
}

/// `--check` says the cap the worker would run with under its
/// descriptor limit, not the one asked (it said 10000 under a limit of
/// 600, where the worker serves 150).
#[test]
fn check_says_the_connection_cap_the_descriptor_limit_holds() {
    let run_with = |soft, hard, cap: &[&str]| {
        let mut cmd = with_nofile(std::process::Command::new(WORKER), soft, hard);
        cmd.args(["--listen", "127.0.0.1:0", "--socket", "/nonexistent/a.sock"]);
        cmd.args(cap).arg("--check");
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let run = |soft, hard| run_with(soft, hard, &["--max-connections", "1000"]);
    let err = run(600, 600);
    assert!(err.contains("ok: at most 150 connections"), "{err}");
    assert!(
        err.contains("holds 150 clients, not max-connections 1000"),
        "{err}"
    );
    // Raised to the hard limit, as the worker does.
    let err = run(600, 4096);
    assert!(err.contains("ok: at most 1000 connections"), "{err}");
    assert!(!err.contains("warning: the descriptor limit"), "{err}");
    // The default cap is fitted without a warning (a host whose hard
    // limit held fewer than 10 000 warned at every start).
    let err = run_with(600, 600, &[]);
    assert!(err.contains("ok: at most 150 connections"), "{err}");
    assert!(
        err.contains("holds 150 clients: the default max-connections (10000) is fitted"),
        "{err}"
    );
    assert!(!err.contains("warning"), "{err}");
}

/// A cap given (flag or file) that the descriptor limit cannot hold is
/// lowered with a warning; the default is fitted at info (below).
#[tokio::test]
async fn a_given_connection_cap_past_the_descriptor_limit_is_warned_of() {
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let cmd = with_nofile(logging_to(WORKER, &log), 600, 600);
    let mut args = ALLOW_LOOPBACK.to_vec();
    args.extend(["--max-connections", "1000"]);
    let _worker = Worker::start_cmd(cmd, &alloc.socket, free_port(), &args).await;
    assert_eq!(said(&log, "max_connections lowered to fit"), 1);
    assert_eq!(said(&log, "asked=1000"), 1);
}

/// Under a descriptor limit too low for `--max-connections`, the worker
/// lowers its cap to what the limit holds (two descriptors a client busy
/// upstream, beside the idle pool and the relays' pipes): a client it
/// accepts is served, one past the cap is told 503 at once. Before, 400
/// clients at once under a limit of 600 were all accepted, and those past
/// the descriptors got 503 `Proxy Out Of Sockets` after their lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_descriptor_limit_lowers_the_connection_cap_to_fit() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.9"]).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let mut cmd = with_nofile(logging_to(WORKER, &log), 600, 600);
    cmd.env("RUST_LOG", "info");
    let worker = Worker::start_cmd(cmd, &alloc.socket, free_port(), &ALLOW_LOOPBACK).await;
    // The default cap: fitted, said at info, no warning.
    assert_eq!(
        said(&log, "max_connections fitted to the descriptor limit"),
        1
    );
    assert_eq!(said(&log, "WARN"), 0);
    // 400 clients at once, each keeping its connection after its answer.
    let url = origin.url("/slow/300");
    let tasks: Vec<_> = (0..400)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut s = TcpStream::connect(worker.addr).await.unwrap();
                let req = format!("GET {url} HTTP/1.1\r\nHost: x\r\n\r\n");
                let head = match s.write_all(req.as_bytes()).await {
                    Ok(()) => read_head(&mut s).await,
                    Err(e) => e.to_string(),
                };
                let line = head.lines().next().unwrap_or_default().to_string();
                (line, s)
            })
        })
        .collect();
    let mut lines = Vec::new();
    let mut held = Vec::new();
    for t in tasks {
        let (line, s) = t.await.unwrap();
        lines.push(line);
        held.push(s);
    }
    let served = lines
        .iter()
        .filter(|l| l.starts_with("HTTP/1.1 200"))
        .count();
    let refused = (lines.iter())
        .filter(|l| l.starts_with("HTTP/1.1 503 Connection Limit Reached"))
        .count();
    assert!(
        served + refused == lines.len() && served >= 50,
        "{served} served, {refused} refused: {:?}",
        lines
            .iter()
            .filter(|l| !l.starts_with("HTTP/1.1 200"))
            .collect::<std::collections::BTreeSet<_>>()
    );
}

/// Clients that ask for a large body and never read it: once nothing has
/// moved for --idle-timeout, their connections (and upstreams) are ended,
/// so their slots come back and a new client is served.
#[tokio::test]
async fn clients_that_stop_reading_lose_their_slots() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(
        &alloc.socket,
        &["--max-connections", "2", "--idle-timeout", "5s"],
    )
    .await;
    let mut stuck = Vec::new();
    let mut started = None;
    for _ in 0..2 {
        // Tried again while the start's check of the port holds a place
        // (a 503); the idle clock runs from the first one served.
        let deadline = Instant::now() + PATIENCE;
        let s = loop {
            let mut s = TcpStream::connect(worker.addr).await.unwrap();
            let req = format!(
                "GET {} HTTP/1.1\r\nHost: x\r\n\r\n",
                origin.url("/bytes/33554432")
            );
            s.write_all(req.as_bytes()).await.unwrap();
            // Read the head only, then stop reading.
            if read_head(&mut s).await.starts_with("HTTP/1.1 200") {
                break s;
            }
            assert!(Instant::now() < deadline, "never served");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        started.get_or_insert_with(Instant::now);
        stuck.push(s);
    }
    // They hold both slots now.
    let mut c = ProxyConn::open(worker.addr).await;
    assert!(!matches!(c.try_get(&origin.url("/")).await, Ok(r) if r.status == 200));
    eventually(
        "a new client served while the stuck ones hold nothing",
        || async {
            let mut c = ProxyConn::open(worker.addr).await;
            matches!(c.try_get(&origin.url("/")).await, Ok(r) if r.status == 200)
        },
    )
    .await;
    let took = started.unwrap().elapsed();
    assert!(
        took >= Duration::from_secs(4),
        "cut before the idle timeout: {took:?}"
    );
    drop(stuck);
}

/// A tunnel whose client stopped reading a download while it trickles bytes
/// up is closed after --tunnel-idle-timeout of the download taking nothing:
/// bytes moving up kept it open for ever, with a pipe full of what waited.
#[tokio::test]
async fn a_tunnel_stalled_one_way_is_closed_though_the_other_trickles() {
    let server = flooding_server().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &["--tunnel-idle-timeout", "1s"]).await;
    let (code, mut tunnel) = connect_tunnel(worker.addr, &server.to_string()).await;
    assert_eq!(code, 200);
    // Never read; a byte up every 300 ms, until a write fails.
    let closed = async {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if tunnel.write_all(b"x").await.is_err() {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), closed)
        .await
        .expect("the stalled tunnel was kept open by the bytes going up");
}

/// A client that reads a large response slowly but steadily (about
/// 650 KB/s) is not idle, however large the worker's send buffer: in a
/// namespace whose sockets have 4 MiB send buffers (what a long path
/// autotunes to), a write waiting for room was woken only once a third of
/// it (1.4 MB) had gone, 2 s apart here, and the 1 s idle timeout cut the
/// response after the 4 MiB the kernel held.
#[test]
fn a_client_reading_a_large_response_slowly_is_not_idle() {
    with_large_send_buffers(
        "a_client_reading_a_large_response_slowly_is_not_idle",
        || async {
            let origin = Origin::start().await;
            let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
            let worker = Worker::start(&alloc.socket, &["--idle-timeout", "1s"]).await;
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.set_recv_buffer_size(64 << 10).unwrap();
            let mut s = sock.connect(worker.addr).await.unwrap();
            let size = 6 << 20;
            let req = format!(
                "GET {} HTTP/1.1\r\nHost: x\r\n\r\n",
                origin.url(&format!("/bytes/{size}"))
            );
            s.write_all(req.as_bytes()).await.unwrap();
            assert!(read_head(&mut s).await.starts_with("HTTP/1.1 200"));
            // 64 KiB every 100 ms, to the chunked body's end.
            let mut got: Vec<u8> = Vec::with_capacity(size + (1 << 20));
            let mut b = vec![0u8; 64 << 10];
            let whole = loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let mut taken = 0;
                while taken < b.len() {
                    let room = b.len() - taken;
                    match s.read(&mut b[..room]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            got.extend_from_slice(&b[..n]);
                            taken += n;
                        }
                    }
                    if got.ends_with(b"\r\n0\r\n\r\n") {
                        break;
                    }
                }
                if got.ends_with(b"\r\n0\r\n\r\n") {
                    break true;
                }
                if taken == 0 {
                    break false;
                }
            };
            assert!(
                whole && got.len() > size,
                "the response was cut after {} of its {size} bytes",
                got.len()
            );
        },
    );
}

/// Runs `body` in a network namespace of its own whose TCP sockets have
/// send buffers of 4 MiB, as a long path autotunes them to.
fn with_large_send_buffers<F, Fut>(test: &str, body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    in_netns(test, &[], move || async move {
        // This namespace's, as the thread is in it.
        std::fs::write("/proc/sys/net/ipv4/tcp_wmem", "4096 4194304 4194304").unwrap();
        body().await
    });
}

/// A destination that takes a large upload slowly but steadily (about
/// 650 KB/s) is taking it, however large the worker's send buffer: with
/// 4 MiB ones, the write waiting for room was woken only once 1.4 MB had
/// gone, 2 s apart here, and the 1 s `--response-timeout` answered 504
/// (the destination taking none of the body).
#[test]
fn a_destination_taking_a_large_upload_slowly_is_not_stalled() {
    with_large_send_buffers(
        "a_destination_taking_a_large_upload_slowly_is_not_stalled",
        || async {
            let size: usize = 6 << 20;
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.set_recv_buffer_size(64 << 10).unwrap();
            sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let listener = sock.listen(8).unwrap();
            let dest = listener.local_addr().unwrap();
            // Reads the head, then 64 KiB every 100 ms to the body's end,
            // then answers.
            let slow = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                read_head(&mut s).await;
                let mut b = vec![0u8; 64 << 10];
                let mut left = size;
                while left > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let n = b.len().min(left);
                    s.read_exact(&mut b[..n]).await.unwrap();
                    left -= n;
                }
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await
                    .unwrap();
                s
            });
            let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
            let worker = Worker::start(&alloc.socket, &["--response-timeout", "1s"]).await;
            let s = TcpStream::connect(worker.addr).await.unwrap();
            let (mut rd, mut wr) = s.into_split();
            let upload = tokio::spawn(async move {
                let head = format!(
                    "POST http://{dest}/ HTTP/1.1\r\nHost: {dest}\r\nContent-Length: {size}\r\n\r\n"
                );
                wr.write_all(head.as_bytes()).await?;
                wr.write_all(&vec![b'u'; size]).await?;
                Ok::<_, std::io::Error>(wr)
            });
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match tokio::time::timeout(Duration::from_secs(30), rd.read(&mut byte)).await {
                    Ok(Ok(1)) => head.push(byte[0]),
                    other => panic!("no answer: {other:?}"),
                }
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            upload.await.unwrap().unwrap();
            drop(slow.await.unwrap());
        },
    );
}

/// A large upload answered before its body was read (a 502 for a
/// destination that refuses, a 407 for missing credentials) is read to its
/// end, so a client that sends its whole body before it reads gets the
/// answer: closed with the body unread, the connection was reset, and the
/// client's sending failed (a broken pipe) after the 4 MiB its buffers held.
/// (curl and Python's `requests` read the answer after a failed send; a
/// client whose system drops what it received on a reset lost it.)
#[tokio::test]
async fn an_upload_answered_early_gets_its_answer_not_a_reset() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    add_user(&users, "alice", "s3cret");
    let refusing = free_port();
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let open = Worker::start(&alloc.socket, &[]).await;
    let authed = Worker::start(&alloc.socket, &["--auth-file", users.to_str().unwrap()]).await;
    for (worker, status) in [(&open, "502"), (&authed, "407")] {
        let size: usize = 16 << 20;
        let s = TcpStream::connect(worker.addr).await.unwrap();
        let (mut rd, mut wr) = s.into_split();
        let head = format!(
            "PUT http://127.0.0.1:{refusing}/ HTTP/1.1\r\nHost: 127.0.0.1:{refusing}\r\nContent-Length: {size}\r\n\r\n"
        );
        wr.write_all(head.as_bytes()).await.unwrap();
        let body = vec![b'u'; size];
        let sent = tokio::time::timeout(PATIENCE, wr.write_all(&body))
            .await
            .expect("the body was not taken");
        assert!(sent.is_ok(), "{status}: sending the body failed: {sent:?}");
        let mut answer = Vec::new();
        tokio::time::timeout(PATIENCE, rd.read_to_end(&mut answer))
            .await
            .expect("the connection was not closed")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
        // The answer says the connection ends (the client must not send
        // its next request on it).
        let head = answer
            .split("\r\n\r\n")
            .next()
            .unwrap()
            .to_ascii_lowercase();
        assert!(head.contains("\r\nconnection: close"), "{status}: {head}");
    }
}

/// The same early answer to an HTTP/1.0 keep-alive client is an HTTP/1.0
/// head that says `close` alone (hyper added `keep-alive` beside it to a
/// 1.1 head).
#[tokio::test]
async fn an_early_answer_to_an_http_1_0_keep_alive_client_says_close_alone() {
    let refusing = free_port();
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let mut s = TcpStream::connect(worker.addr).await.unwrap();
    let head = format!(
        "POST http://127.0.0.1:{refusing}/ HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 100000\r\n\r\n0123456789"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let answer = read_head(&mut s).await.to_ascii_lowercase();
    assert!(answer.starts_with("http/1.0 502"), "{answer}");
    assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
    assert!(!answer.contains("keep-alive"), "{answer}");
}

/// A connection on hyper's path whose last request had no body closes
/// without the upload's lingering: its place under
/// `--max-client-connections` is free when the client sees it close (an
/// upload earlier on the connection had it linger up to 5 s, holding the
/// place, on every close after).
#[tokio::test]
async fn a_close_after_a_bodiless_request_frees_the_place_at_once() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(
        &alloc.socket,
        &["--max-client-connections", "1", "--idle-timeout", "1s"],
    )
    .await;
    // From an address of loopback of its own: the start's check of the
    // port (from 127.0.0.1) may hold that address's place a moment.
    let host = origin.addr.to_string();
    let mut c = connect_from("127.0.0.66", worker.addr).await;
    // A chunked upload: hyper's path from here on.
    let post = format!(
        "POST http://{host}/ HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    let second = format!("GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\n\r\n");
    c.write_all(post.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while count(&seen, b"HTTP/1.1 200") < 1 {
        let n = c.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    c.write_all(second.as_bytes()).await.unwrap();
    // The second answer, then the idle close.
    let r = tokio::time::timeout(PATIENCE, async {
        loop {
            let n = c.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(r.is_ok(), "not closed when idle");
    assert_eq!(
        count(&seen, b"HTTP/1.1 200"),
        2,
        "{}",
        String::from_utf8_lossy(&seen)
    );
    // The client keeps its socket open (its side half-open, silent): a
    // lingering close would wait for it 5 s, holding the place.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = connect_from("127.0.0.66", worker.addr).await;
    again
        .write_all(format!("GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut again).await;
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "the place was still held: {head}"
    );
    drop(c);
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}
