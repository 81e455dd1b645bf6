//! CONNECT tunnels relay bytes whole, both ways at once, with half-closes,
//! bytes sent behind the CONNECT head, and through the worker's splice path.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::*;

/// Pipes the process has open (its splice relay keeps emptied ones).
fn pipes_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("pipe:"))
        .count()
}

#[tokio::test]
async fn bulk_both_ways_arrives_whole_through_spliced_pipes() {
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.3"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let pipes_before = pipes_of(worker.proc.child.id());

    let (code, mut s) = connect_tunnel(worker.addr, &echo.addr.to_string()).await;
    assert_eq!(code, 200);
    let data = pattern(24 << 20);
    let (mut r, mut w) = s.split();
    let send = async {
        for chunk in data.chunks(200_000) {
            w.write_all(chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::with_capacity(data.len());
    let recv = r.read_to_end(&mut back);
    let ((), got) = tokio::time::timeout(PATIENCE, async { tokio::join!(send, recv) })
        .await
        .expect("tunnel stalled");
    got.unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "tunnel corrupted the bytes");
    // The worker moved them with splice: its pool now holds pipes.
    assert!(
        pipes_of(worker.proc.child.id()) > pipes_before,
        "the worker relayed without pipes (hyper no longer hands back its TCP socket?)"
    );
}

#[tokio::test]
async fn bytes_sent_behind_the_connect_head_go_first() {
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let mut s = TcpStream::connect(worker.addr).await.unwrap();
    // A TLS client may send its hello without waiting for the 200.
    let target = echo.addr;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\nhello").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b", world").await.unwrap();
    assert_eq!(read_exactly(&mut s, 12).await, b"hello, world");
}

/// A CONNECT that says content follows its head (RFC 9110: it has none)
/// is refused with 400 and its connection closed, reaching nobody: hyper
/// read what followed as a body and dropped it, so a ClientHello sent at
/// once was lost and the tunnel hung. `Content-Length: 0` is no content.
#[tokio::test]
async fn a_connect_with_content_is_refused() {
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let target = echo.addr;
    for (field, ok) in [
        ("Content-Length: 5", false),
        ("Transfer-Encoding: chunked", false),
        ("Content-Length: 0", true),
    ] {
        let mut s = TcpStream::connect(worker.addr).await.unwrap();
        let head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{field}\r\n\r\nhello");
        s.write_all(head.as_bytes()).await.unwrap();
        let head = read_head(&mut s).await;
        match ok {
            true => {
                assert!(head.starts_with("HTTP/1.1 200"), "{field}: {head}");
                assert_eq!(read_exactly(&mut s, 5).await, b"hello");
            }
            false => {
                assert!(head.starts_with("HTTP/1.1 400"), "{field}: {head}");
                assert!(
                    head.to_ascii_lowercase().contains("connection: close"),
                    "{head}"
                );
            }
        }
    }
    assert_eq!(
        echo.peers.lock().unwrap().len(),
        1,
        "only the one without content"
    );
    // Its head alone, the content not sent (yet), and a WebSocket
    // handshake's: the 400 all the same. hyper's server, handed these,
    // mostly closed the connection with the 400 unsent (its upgrade
    // started as the unread body was dropped): 7 of 10, 10 of 20.
    let ws = "GET http://{t}/ HTTP/1.1\r\nHost: {t}\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";
    for field in ["Content-Length: 5", "Transfer-Encoding: chunked"] {
        for head in [
            format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"),
            format!("CONNECT {target} HTTP/1.0\r\nHost: {target}\r\n"),
            ws.replace("{t}", &target.to_string()),
        ] {
            for _ in 0..10 {
                let mut s = TcpStream::connect(worker.addr).await.unwrap();
                s.write_all(format!("{head}{field}\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                let answer = read_head(&mut s).await;
                assert!(
                    answer.starts_with("HTTP/1.1 400"),
                    "{head}{field}: {answer:?}"
                );
            }
        }
    }
    assert_eq!(echo.peers.lock().unwrap().len(), 1);
}

/// The same heads on a connection hyper's server already serves (the
/// fast path hands a chunked upload's connection to it for good): the
/// answer comes, the content's 400, a 407 without credentials, a 400 for
/// two Host fields (hyper, the body dropped unread, closed 3 in 20 with
/// the 400 unsent, and 2 in 140 with the 407).
#[tokio::test]
async fn a_connect_with_content_is_refused_on_a_connection_hyper_serves() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let open = Worker::start(&alloc.socket, &[]).await;
    let (_dir, users) = users_file(&[("alice", "pw")]);
    let authed = Worker::start(&alloc.socket, &["--auth-file", users.to_str().unwrap()]).await;
    let url = origin.url("/echo");
    let host = url.trim_start_matches("http://").trim_end_matches("/echo");
    let ws = format!("GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n");
    let connect = format!("CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n");
    let login = format!("Proxy-Authorization: {}\r\n", basic("alice", "pw"));
    let cases = [
        (open.addr, connect.clone(), "400", 40),
        (open.addr, ws.clone(), "400", 40),
        (open.addr, format!("{connect}Host: {host}\r\n"), "400", 40),
        // No credentials on the CONNECT (the upload had them).
        (authed.addr, connect.clone(), "407", 100),
        (authed.addr, ws, "407", 40),
        (authed.addr, format!("{connect}{login}"), "400", 40),
    ];
    for (worker, head, status, tries) in cases {
        for i in 0..tries {
            let mut s = TcpStream::connect(worker).await.unwrap();
            let upload = format!(
                "POST {url} HTTP/1.1\r\nHost: {host}\r\n{login}Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            );
            s.write_all(upload.as_bytes()).await.unwrap();
            let answer = read_head(&mut s).await;
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            assert!(!answer.to_ascii_lowercase().contains("connection: close"));
            assert_eq!(read_exactly(&mut s, 3).await, b"abc");
            s.write_all(format!("{head}Content-Length: 5\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let answer = read_head(&mut s).await;
            let want = format!("HTTP/1.1 {status}");
            assert!(answer.starts_with(&want), "{head}: {answer:?}");
            if i + 1 == tries {
                // Closed after the answer within the second its content
                // is read for (5 s, before).
                let mut rest = Vec::new();
                let closed = tokio::time::timeout(
                    std::time::Duration::from_secs(3),
                    s.read_to_end(&mut rest),
                );
                assert!(closed.await.is_ok(), "still open");
            }
        }
    }
}

/// A CONNECT target with userinfo (`user:pw@host:port`) is refused with
/// 400, reaching nobody: authority-form is host and port only (RFC 9112
/// §3.2.3), and the userinfo was taken off quietly, tunnelling to the
/// host behind it.
#[tokio::test]
async fn a_connect_target_with_userinfo_is_refused() {
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    for target in [format!("user:pw@{}", echo.addr), format!("u@{}", echo.addr)] {
        let (code, _s) = connect_tunnel(worker.addr, &target).await;
        assert_eq!(code, 400, "{target}");
    }
    let (code, mut s) = connect_tunnel(worker.addr, &echo.addr.to_string()).await;
    assert_eq!(code, 200);
    s.write_all(b"hi").await.unwrap();
    assert_eq!(read_exactly(&mut s, 2).await, b"hi");
    assert_eq!(echo.peers.lock().unwrap().len(), 1, "only the plain target");
}

/// A CONNECT whose client shuts its side right after the head (`printf …
/// | nc -N`: a client that only reads, from a server that speaks first)
/// is answered 200 and relayed, its end passed on to the destination and
/// the destination's words brought back. hyper's server took the end for
/// the client's going and dropped the request unanswered.
#[tokio::test]
async fn a_connect_whose_client_shuts_its_side_at_once_is_answered() {
    let far = banner_server().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    for _ in 0..5 {
        let head = format!("CONNECT {far} HTTP/1.1\r\nHost: {far}\r\n\r\n");
        let got = ask_then_shut(worker.addr, head.as_bytes()).await;
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 200"), "{got:?}");
        assert!(got.ends_with("\r\n\r\nbanner\nbye\n"), "{got:?}");
    }
}

/// A tunnel takes over its connection's place under `--max-connections`:
/// at the limit a CONNECT still opens (it needed a second place, so with
/// `--max-connections 1` no tunnel ever opened), and holds the place while
/// it lasts.
#[tokio::test]
async fn a_connect_at_the_connection_limit_opens_and_holds_its_place() {
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &["--max-connections", "1"]).await;
    let target = echo.addr;
    let connect = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    // (The start's probe of the port may hold the one place a moment.)
    let mut tries = 0;
    let mut s = loop {
        let mut s = TcpStream::connect(worker.addr).await.unwrap();
        s.write_all(connect.as_bytes()).await.unwrap();
        let head = read_head(&mut s).await;
        if head.starts_with("HTTP/1.1 200") {
            break s;
        }
        tries += 1;
        assert!(tries < 50 && head.starts_with("HTTP/1.1 503"), "{head}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    s.write_all(b"ping").await.unwrap();
    assert_eq!(read_exactly(&mut s, 4).await, b"ping");
    // The place is the tunnel's: another client is refused.
    let mut other = TcpStream::connect(worker.addr).await.unwrap();
    let url = format!("http://{target}/");
    other
        .write_all(format!("GET {url} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut other).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    // Once the tunnel ends, the place is free again.
    drop(s);
    eventually("the place freed", || async {
        let Ok(mut c) = TcpStream::connect(worker.addr).await else {
            return false;
        };
        c.write_all(connect.as_bytes()).await.is_ok()
            && read_head(&mut c).await.starts_with("HTTP/1.1 200")
    })
    .await;
}

/// A refused tunnel ends its connection: what the client sent behind the
/// CONNECT (its first tunnel bytes) is not read as a request of its own.
#[tokio::test]
async fn bytes_behind_a_refused_connect_are_not_a_request() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let mut s = TcpStream::connect(worker.addr).await.unwrap();
    // Port 25 is refused by default.
    let url = origin.url("/smuggled");
    let host = origin.addr;
    s.write_all(
        format!(
            "CONNECT 127.0.0.1:25 HTTP/1.1\r\nHost: 127.0.0.1:25\r\n\r\n\
             GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut rest))
        .await
        .expect("the connection stays open")
        .unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(!rest.contains("HTTP/1.1 200"), "{rest}");
    assert_eq!(origin.count(), 0);
}

/// A destination that resets the tunnel's connection resets the client's:
/// a client reading to the end does not take a cut stream for a whole one.
#[tokio::test]
async fn a_reset_passes_through_as_a_reset() {
    let (server, _) = recording_server(|mut s: TcpStream| async move {
        s.write_all(b"partial-data").await.unwrap();
        // Seen by the worker before the reset.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        socket2::SockRef::from(&s)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(s);
    })
    .await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let mut s = TcpStream::connect(worker.addr).await.unwrap();
    s.write_all(format!("CONNECT {server} HTTP/1.1\r\nHost: {server}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut got = Vec::new();
    let end = tokio::time::timeout(PATIENCE, s.read_to_end(&mut got))
        .await
        .expect("the tunnel stays open");
    assert!(b"partial-data".starts_with(&got), "{got:?}");
    let kind = end.map_err(|e| e.kind());
    assert_eq!(kind, Err(std::io::ErrorKind::ConnectionReset), "{got:?}");
}

/// What rotor took before the destination's reset reaches a client that
/// reads slower than it came, then the reset (a reset at once discarded
/// what the client's socket still held).
#[tokio::test]
async fn a_reset_comes_after_what_was_taken_before_it() {
    const SENT: usize = 1 << 20;
    let (server, _) = recording_server(|mut s: TcpStream| async move {
        s.write_all(&vec![b'x'; SENT]).await.unwrap();
        reset_once_taken(s).await;
    })
    .await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(worker.addr).await.unwrap();
    s.write_all(format!("CONNECT {server} HTTP/1.1\r\nHost: {server}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Not read until the destination has reset.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let mut got = Vec::new();
    let end = tokio::time::timeout(PATIENCE, s.read_to_end(&mut got))
        .await
        .expect("the tunnel stays open");
    assert_eq!(got.len(), SENT);
    assert_eq!(
        end.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
}

#[tokio::test]
async fn a_half_close_passes_through_and_the_answer_comes_back() {
    // Reads to the client's end, then answers with what it counted.
    let (server, _) = recording_server(|mut s: TcpStream| async move {
        let mut all = Vec::new();
        if s.read_to_end(&mut all).await.is_ok() {
            let _ = s.write_all(format!("got {}", all.len()).as_bytes()).await;
        }
    })
    .await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let (code, mut s) = connect_tunnel(worker.addr, &server.to_string()).await;
    assert_eq!(code, 200);
    s.write_all(&pattern(3 << 20)).await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(PATIENCE, s.read_to_string(&mut answer))
        .await
        .expect("no answer after the half-close")
        .unwrap();
    assert_eq!(answer, format!("got {}", 3 << 20));
}

/// A worker with a JSON access log and a drain of 1 s, to be stopped with
/// work in flight.
struct CutWorker {
    _dir: tempfile::TempDir,
    _alloc: Allocator,
    worker: Worker,
    log: std::path::PathBuf,
    /// The allocator's metrics listener.
    metrics: std::net::SocketAddr,
}

impl CutWorker {
    async fn start() -> CutWorker {
        CutWorker::start_with(&[]).await
    }

    /// With `extra` worker flags.
    async fn start_with(extra: &[&str]) -> CutWorker {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("access.log");
        let metrics: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let listen = metrics.to_string();
        let alloc = Allocator::start(&["--pool", "127.0.0.2", "--metrics-listen", &listen]).await;
        let args = [
            "--access-log",
            log.to_str().unwrap(),
            "--access-log-format",
            "json",
        ];
        let worker = Worker::start(
            &alloc.socket,
            &[&args[..], &["--drain-timeout", "1s"], extra].concat(),
        )
        .await;
        CutWorker {
            _dir: dir,
            _alloc: alloc,
            worker,
            log,
            metrics,
        }
    }

    /// Stops it (the drain cut), and asserts that the one request given
    /// up was counted (`worker_stopped`) and logged (503) on the line
    /// holding `needle`.
    async fn stopped_one(self, needle: &str) {
        let (text, metrics) = self.stop_and_scrape().await;
        assert!(
            metrics.contains("rotor_errors_total{error=\"worker_stopped\"} 1"),
            "{}",
            metrics
                .lines()
                .filter(|l| l.starts_with("rotor_errors_total"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let line: serde_json::Value = serde_json::from_str(
            text.lines()
                .find(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("no line with {needle}: {text:?}")),
        )
        .unwrap();
        assert_eq!(
            (line["status"].as_u64(), line["error"].as_str()),
            (Some(503), Some("worker_stopped"))
        );
    }

    /// SIGTERM; the drain must be cut (exit 3). The access log's text.
    async fn stop(self) -> String {
        self.stop_and_scrape().await.0
    }

    /// As `stop`, and the allocator's metrics once the worker is gone.
    async fn stop_and_scrape(self) -> (String, String) {
        let CutWorker {
            _dir,
            _alloc,
            mut worker,
            log,
            metrics,
        } = self;
        worker.proc.signal(nix::sys::signal::Signal::SIGTERM);
        let status = tokio::task::spawn_blocking(move || {
            worker.proc.wait(std::time::Duration::from_secs(10))
        })
        .await
        .unwrap();
        assert_eq!(status.code(), Some(3), "the drain was cut");
        let scraped = tokio::task::spawn_blocking(move || crate::metrics::scrape(metrics))
            .await
            .unwrap();
        (std::fs::read_to_string(&log).unwrap(), scraped)
    }
}

/// A tunnel still open when the drain's time is up ends with its bytes
/// counted and its access-log line written (its task was dropped with the
/// runtime, unlogged), which says the stop cut it (`worker_stopped`: it
/// read as a tunnel that ended).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_cut_by_the_stop_is_still_logged() {
    let echo = Echo::start().await;
    let cut = CutWorker::start().await;
    let w = &cut.worker;
    let (code, mut s) = connect_tunnel(w.addr, &echo.addr.to_string()).await;
    assert_eq!(code, 200);
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.unwrap();
    let text = cut.stop().await;
    let line: serde_json::Value = serde_json::from_str(
        text.lines()
            .find(|l| l.contains("CONNECT"))
            .unwrap_or_else(|| panic!("no CONNECT line: {text:?}")),
    )
    .unwrap();
    assert_eq!(
        (line["sent"].as_u64(), line["received"].as_u64()),
        (Some(4), Some(4))
    );
    assert_eq!(line["error"], "worker_stopped", "{line}");
}

/// A request still waiting for its answer when the drain's time is up is
/// dropped with the worker, and still logged (503, `worker_stopped`): its
/// line was lost with the runtime. And counted in the host's metrics (it
/// was counted after the worker's last report, and lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cut_by_the_stop_is_still_logged() {
    let (heads, mut seen) = tokio::sync::mpsc::unbounded_channel::<()>();
    // Takes the request and never answers.
    let (origin, _) = recording_server(move |mut s: TcpStream| {
        let heads = heads.clone();
        async move {
            if !read_head(&mut s).await.is_empty() {
                let _ = heads.send(());
            }
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
        }
    })
    .await;
    let cut = CutWorker::start().await;
    let w = &cut.worker;
    let mut s = TcpStream::connect(w.addr).await.unwrap();
    s.write_all(format!("GET http://{origin}/ HTTP/1.1\r\nHost: {origin}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), seen.recv())
        .await
        .expect("the request did not reach the origin");
    cut.stopped_one("GET").await;
    drop(s);
}

/// A SOCKS5 tunnel still being opened (its name's lookup slow) when the
/// drain's time is up is dropped with the worker, and still logged and
/// counted (503, `worker_stopped`), as its HTTP twin is: it had no line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socks5_tunnel_cut_while_it_opens_is_still_logged() {
    let dns = Dns::start().await;
    dns.set("slow.rotor.test", std::net::Ipv4Addr::new(127, 0, 0, 1), 60);
    dns.slow_a_ms
        .store(20_000, std::sync::atomic::Ordering::Relaxed);
    let server = dns.addr.to_string();
    let socks: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let listen = socks.to_string();
    let cut = CutWorker::start_with(&["--socks-listen", &listen, "--dns-server", &server]).await;
    let mut s = TcpStream::connect(socks).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    let name = b"slow.rotor.test";
    let mut req = vec![5, 1, 0, 3, name.len() as u8];
    req.extend_from_slice(name);
    req.extend_from_slice(&80u16.to_be_bytes());
    s.write_all(&req).await.unwrap();
    eventually("the lookup asked", || async {
        dns.queries_for("slow.rotor.test") > 0
    })
    .await;
    cut.stopped_one("SOCKS5").await;
    drop(s);
}

/// A WebSocket origin: it answers an opening handshake whose head says
/// `Upgrade: websocket` and `Connection: upgrade` (and no other
/// hop-by-hop field) with a 101 and `hello` behind it, then echoes; any
/// other head gets a 426.
async fn websocket_origin() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<std::net::IpAddr>>>,
) {
    recording_server(|mut s: TcpStream| async move {
        let head = read_head(&mut s).await.to_ascii_lowercase();
        if head.starts_with("get /h2c ") {
            // A switch to another protocol than the one asked for.
            let _ = s
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n")
                .await;
            return;
        }
        let asked = head.starts_with("get /chat?x=1 http/1.1\r\n")
            && head.contains("\r\nupgrade: websocket\r\n")
            && head.contains("\r\nconnection: upgrade\r\n")
            && head.contains("\r\nsec-websocket-key: dghlihnhbxbszsbub25jzq==\r\n")
            && !head.contains("proxy-authorization")
            && !head.contains("keep-alive");
        if !asked {
            let _ = s
                .write_all(b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\nContent-Length: 3\r\n\r\nno\n")
                .await;
            return;
        }
        let _ = s
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nhello")
            .await;
        let mut buf = [0u8; 1024];
        while let Ok(n @ 1..) = s.read(&mut buf).await {
            if s.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    })
    .await
}

/// The opening handshake of a WebSocket to `target` (absolute form),
/// through `proxy`, asking for `upgrade`: the stream and the answer's
/// head, lower-cased.
async fn open_websocket(
    proxy: std::net::SocketAddr,
    target: &str,
    upgrade: &str,
) -> (TcpStream, String) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let head = format!(
        "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: {upgrade}\r\nConnection: keep-alive, Upgrade\r\nKeep-Alive: timeout=5\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let answer = read_head(&mut s).await.to_ascii_lowercase();
    (s, answer)
}

/// A WebSocket to an `http://` target (sent as an absolute-form GET with
/// `Upgrade: websocket`, as aiohttp and Node's proxy agents send it):
/// the handshake goes from the next address with its `Upgrade`, the 101
/// reaches the client with the destination's fields, and the two relay
/// both ways, what the destination sent behind its 101 first; the access
/// log has its line when it closes (status 101, its bytes). Each WebSocket
/// rotates; a destination that refuses the upgrade has its answer reach
/// the client; an `h2c` upgrade is not passed on (the request goes as a
/// plain one).
#[tokio::test]
async fn websockets_to_http_targets_are_relayed_from_the_next_address() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.3"]).await;
    let l = log.to_str().unwrap();
    let w = Worker::start(
        &alloc.socket,
        &["--access-log", l, "--access-log-format", "json"],
    )
    .await;
    let (origin, peers) = websocket_origin().await;
    for i in 0..2 {
        // (The client's list may name more: only the WebSocket goes.)
        let upgrade = ["websocket", "h2c, WebSocket"][i];
        let (mut s, answer) =
            open_websocket(w.addr, &format!("http://{origin}/chat?x=1"), upgrade).await;
        assert!(answer.starts_with("http/1.1 101"), "{i}: {answer}");
        assert!(answer.contains("\r\nupgrade: websocket\r\n"), "{answer}");
        assert!(answer.contains("\r\nconnection: upgrade\r\n"), "{answer}");
        assert!(
            answer.contains("\r\nsec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"),
            "{answer}"
        );
        assert_eq!(read_exactly(&mut s, 5).await, b"hello");
        for _ in 0..3 {
            s.write_all(b"ping").await.unwrap();
            assert_eq!(read_exactly(&mut s, 4).await, b"ping");
        }
        drop(s);
    }
    assert_eq!(*peers.lock().unwrap(), ips(2..=3));
    eventually("the WebSockets' access lines", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move {
            let lines: Vec<serde_json::Value> = text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .filter(|l: &serde_json::Value| l["status"] == 101)
                .collect();
            lines.len() == 2
                && lines.iter().all(|l| {
                    l["method"] == "GET"
                        && l["sent"] == 12
                        && l["received"] == 17
                        && l["source"].is_string()
                })
        }
    })
    .await;
    // Refused by the destination (here for a missing key): its answer.
    let mut s = TcpStream::connect(w.addr).await.unwrap();
    let head = format!("GET http://{origin}/chat?x=1 HTTP/1.1\r\nHost: {origin}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let answer = read_head(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 426"), "{answer}");
    assert_eq!(read_exactly(&mut s, 3).await, b"no\n");
    // A 101 to another protocol than the WebSocket asked for: a 502.
    let (_, answer) = open_websocket(w.addr, &format!("http://{origin}/h2c"), "websocket").await;
    assert!(answer.starts_with("http/1.1 502"), "{answer}");
    // A handshake with content: refused, nothing sent.
    let before = peers.lock().unwrap().len();
    let mut b = TcpStream::connect(w.addr).await.unwrap();
    let head = format!("GET http://{origin}/chat?x=1 HTTP/1.1\r\nHost: {origin}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 4\r\n\r\nabcd");
    b.write_all(head.as_bytes()).await.unwrap();
    let answer = read_head(&mut b).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(peers.lock().unwrap().len(), before);
    // The connection serves its next request as any (rotating on).
    let o = Origin::start().await;
    s.write_all(format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", o.url("/")).as_bytes())
        .await
        .unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 200"));
    // An h2c upgrade is not passed on: a plain request, a plain answer.
    let mut s = TcpStream::connect(w.addr).await.unwrap();
    let head = format!("GET {} HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n", o.url("/"));
    s.write_all(head.as_bytes()).await.unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 200"));
}

/// aiohttp's WebSocket client through rotor to `ws://` and `http://`
/// targets (it sends the handshake in absolute form, no CONNECT, with its
/// URL's scheme in the request line), against aiohttp's own server: each
/// WebSocket opens from the next address, and messages go both ways.
#[tokio::test]
async fn aiohttp_websockets_through_rotor() {
    if !python_has("aiohttp_websockets_through_rotor", "aiohttp") {
        return;
    }
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.4"]).await;
    let w = Worker::start(&alloc.socket, &[]).await;
    let script = format!(
        r#"
import asyncio
import aiohttp
from aiohttp import web

async def handler(request):
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_str("from " + request.remote)
    async for msg in ws:
        await ws.send_str("echo " + msg.data)
    return ws

async def main():
    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    seen = []
    async with aiohttp.ClientSession() as s:
        for i in range(4):
            scheme = ("ws", "http")[i % 2]
            url = f"{{scheme}}://127.0.0.1:{{port}}/ws"
            async with s.ws_connect(url, proxy="http://{proxy}", timeout=10) as ws:
                seen.append(await ws.receive_str(timeout=10))
                await ws.send_str(f"m{{i}}")
                assert await ws.receive_str(timeout=10) == f"echo m{{i}}"
    await runner.cleanup()
    want = ["from 127.0.0.%d" % n for n in (2, 3, 4, 2)]
    assert seen == want, seen

asyncio.run(main())
"#,
        proxy = w.addr
    );
    run_python(&script).await;
}
