//! What a client sees when something is wrong: the status and the RFC 9209
//! `Proxy-Status` of DESIGN.md's table, and no traffic where none is due.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::*;

#[tokio::test]
async fn empty_pool_answers_503_and_contacts_nobody() {
    let origin = Origin::start().await;
    let echo = Echo::start().await;
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let file = dir.path().join("pool.txt");
    std::fs::write(&file, "# nothing yet\n").unwrap();
    let alloc = Allocator::start_in(dir, &["--pool-file", file.to_str().unwrap()]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;

    let r = get(worker.addr, &origin.url("/")).await;
    assert_eq!(r.status, 503);
    assert!(
        r.proxy_status()
            .starts_with("rotor; error=proxy_configuration_error"),
        "{}",
        r.proxy_status()
    );
    assert!(String::from_utf8_lossy(&r.body)
        .contains("pool has no address in the rotation (it is empty"));
    let (code, _) = connect_tunnel(worker.addr, &echo.addr.to_string()).await;
    assert_eq!(code, 503);
    assert_eq!(origin.count(), 0);
    assert_eq!(origin.connections.lock().unwrap().len(), 0);
    assert!(echo.peers.lock().unwrap().is_empty());
}

#[tokio::test]
async fn no_address_of_the_destination_family_is_503_not_a_fallback() {
    let origin = Origin::start_on("[::1]:0".parse().unwrap()).await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.3"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let r = get(worker.addr, &origin.url("/")).await;
    assert_eq!(r.status, 503);
    assert!(r.proxy_status().contains("error=proxy_configuration_error"));
    assert!(
        String::from_utf8_lossy(&r.body).contains("no IPv6 address"),
        "{:?}",
        r.body
    );
    assert_eq!(origin.connections.lock().unwrap().len(), 0);
    // The failed lease did not consume an address.
    let v4 = Origin::start().await;
    assert_eq!(get(worker.addr, &v4.url("/")).await.status, 200);
    assert_eq!(v4.sources(), ips(2..=2));
}

#[tokio::test]
async fn ipv6_pool_serves_an_ipv6_destination() {
    let origin = Origin::start_on("[::1]:0".parse().unwrap()).await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2,::1"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    assert_eq!(get(worker.addr, &origin.url("/")).await.status, 200);
    assert_eq!(
        origin.sources(),
        vec!["::1".parse::<std::net::IpAddr>().unwrap()]
    );
}

#[tokio::test]
async fn upstream_failures_map_to_502_and_504() {
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(
        &alloc.socket,
        &["--connect-timeout", "500ms", "--response-timeout", "500ms"],
    )
    .await;

    // A name glibc rejects without sending a query (a label over 63 bytes):
    // a real DNS failure with no traffic off this machine.
    let bad_name = format!("http://{}.invalid/", "a".repeat(70));
    let r = get(worker.addr, &bad_name).await;
    assert_eq!(r.status, 502);
    assert!(
        r.proxy_status().contains("error=dns_error"),
        "{}",
        r.proxy_status()
    );

    let closed = free_port();
    let r = get(worker.addr, &format!("http://127.0.0.1:{closed}/")).await;
    assert_eq!(r.status, 502);
    assert!(
        r.proxy_status().contains("error=connection_refused"),
        "{}",
        r.proxy_status()
    );
    let (code, _) = connect_tunnel(worker.addr, &format!("127.0.0.1:{closed}")).await;
    assert_eq!(code, 502);

    // A listener whose accept queue is full drops SYNs: connect times out.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    sock.listen(0).unwrap();
    let full = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(full)).await
        {
            fillers.push(s);
        }
    }
    let r = get(worker.addr, &format!("http://{full}/")).await;
    assert_eq!(r.status, 504);
    assert!(
        r.proxy_status().contains("error=connection_timeout"),
        "{}",
        r.proxy_status()
    );

    let origin = Origin::start().await;
    let r = get(worker.addr, &origin.url("/slow/3000")).await;
    assert_eq!(r.status, 504);
    assert!(
        r.proxy_status().contains("error=http_response_timeout"),
        "{}",
        r.proxy_status()
    );

    // An upload longer than the response timeout is not cut: the timeout
    // is the answer's, once the request went. (A worker of its own with
    // 2 s: a loaded machine's pause of the test's writes for 500 ms
    // looked like a stall.)
    let uploads = Worker::start(&alloc.socket, &["--response-timeout", "2s"]).await;
    let mut s = TcpStream::connect(uploads.addr).await.unwrap();
    let url = origin.url("/echo");
    s.write_all(
        format!("POST {url} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    // (5 s in all, 100 ms apart.)
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(b"a\r\n0123456789\r\n").await.unwrap();
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // One that stops is the client's fault, within about the timeout.
    let mut s = TcpStream::connect(uploads.addr).await.unwrap();
    s.write_all(
        format!("POST {url} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let t0 = std::time::Instant::now();
    let head = read_head(&mut s).await;
    assert!(
        head.starts_with("HTTP/1.1 408 Request Body Timeout"),
        "{head}"
    );
    // Its stall looked at four times a timeout: cut 2 to 2.5 s after its
    // last byte (looked at once a timeout, 4 s after: twice the timeout;
    // the bound leaves a loaded machine a second).
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(3600),
        "{took:?}"
    );
}

#[tokio::test]
async fn malformed_and_non_proxy_requests_get_400() {
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let origin = Origin::start().await;

    let mut s = TcpStream::connect(worker.addr).await.unwrap();
    s.write_all(b"\x16\x03\x01garbage that is not http\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(out.is_empty() || text.starts_with("HTTP/1.1 400"), "{text}");

    // Origin-form: a client that forgot it is talking to a proxy.
    let mut s = TcpStream::connect(worker.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 400"));

    let r = get(worker.addr, "https://127.0.0.1/").await;
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("CONNECT"));

    let (code, _) = connect_tunnel(worker.addr, "127.0.0.1").await;
    assert_eq!(code, 400);

    // Another spelling of an address, as the C library reads it: refused,
    // saying why (a site of its own, its budget dodged, else).
    let port = origin.addr.port();
    for host in ["2130706433", "0x7f.1", "[localhost]"] {
        let r = get(worker.addr, &format!("http://{host}:{port}/")).await;
        assert_eq!(r.status, 400, "{host}");
        let (code, _) = connect_tunnel(worker.addr, &format!("{host}:{port}")).await;
        assert_eq!(code, 400, "{host}");
    }

    // An oversized head is refused (431), and the worker keeps serving.
    let mut s = TcpStream::connect(worker.addr).await.unwrap();
    let big = format!(
        "GET {} HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        origin.url("/"),
        "x".repeat(200 * 1024)
    );
    let _ = s.write_all(big.as_bytes()).await;
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    // Just over the documented 64 KiB (hyper's own buffer held up to
    // about twice that): refused too.
    let mut s = TcpStream::connect(worker.addr).await.unwrap();
    let over = format!(
        "GET {} HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        origin.url("/"),
        "x".repeat(66 * 1024)
    );
    s.write_all(over.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    // A request line longer than a head may be is 414 (RFC 9112 §3), not
    // 431 (hyper's buffer filled before it looked at the target): just
    // over the limit, and far over it, still sending as the answer comes.
    for len in [66 * 1024, 300 * 1024] {
        let mut s = TcpStream::connect(worker.addr).await.unwrap();
        let long = format!(
            "GET {}?{} HTTP/1.1\r\nHost: {}\r\n\r\n",
            origin.url("/"),
            "q".repeat(len),
            origin.addr
        );
        let _ = s.write_all(long.as_bytes()).await;
        let head = read_head(&mut s).await;
        assert!(
            head.starts_with("HTTP/1.1 414 URI Too Long"),
            "{len}: {head}"
        );
        assert!(
            head.to_ascii_lowercase().contains("proxy-status: rotor"),
            "{head}"
        );
    }

    assert_eq!(origin.count(), 0);
    assert_eq!(get(worker.addr, &origin.url("/")).await.status, 200);
}

#[tokio::test]
async fn unreachable_allocator_is_503_after_the_lease_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody.sock");
    let worker = Worker::start(&socket, &["--lease-timeout", "300ms"]).await;
    let origin = Origin::start().await;
    let started = std::time::Instant::now();
    let r = get(worker.addr, &origin.url("/")).await;
    assert_eq!(r.status, 503);
    assert!(
        r.proxy_status().contains("error=proxy_internal_error"),
        "{}",
        r.proxy_status()
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(origin.count(), 0);
    // The answer does not say where the allocator was looked for (the
    // socket's path is the operator's to see, in the log).
    let body = String::from_utf8_lossy(&r.body);
    assert!(!body.contains(socket.to_str().unwrap()), "{body}");
    assert!(body.contains("allocator unavailable"), "{body}");
    // So does `rotor status`, with what to do.
    let out = std::process::Command::new(ROTOR)
        .args(["status", "--socket", socket.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nobody.sock") && err.contains("rotor up"),
        "{err}"
    );
}

/// A tunnelling client shows only the status line of a refused CONNECT:
/// the reason phrase says rotor's reason. A 407 carries a Proxy-Status too.
/// With --expose-source, responses and the CONNECT 200 say which address
/// served them.
#[tokio::test]
async fn reasons_in_the_status_line_and_the_source_on_request() {
    let origin = Origin::start().await;
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.3"]).await;
    let strict = Worker::start_exactly(&alloc.socket, free_port(), &[]).await;
    let mut s = TcpStream::connect(strict.addr).await.unwrap();
    s.write_all(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(
        head.starts_with("HTTP/1.1 403 Destination Prohibited\r\n"),
        "{head}"
    );
    assert!(
        head.contains("proxy-status: rotor; error=destination_ip_prohibited"),
        "{head}"
    );

    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    std::fs::write(&users, "").unwrap();
    let authed = Worker::start(&alloc.socket, &["--auth-file", users.to_str().unwrap()]).await;
    let r = get(authed.addr, &origin.url("/")).await;
    assert_eq!(r.status, 407);
    assert!(
        r.proxy_status().starts_with("rotor; details="),
        "{}",
        r.proxy_status()
    );

    let exposed = Worker::start(&alloc.socket, &["--expose-source"]).await;
    for _ in 0..2 {
        let r = get(exposed.addr, &origin.url("/")).await;
        let seen = origin.sources().last().unwrap().to_string();
        assert_eq!(r.headers["rotor-source"].to_str().unwrap(), seen);
    }
    let mut t = TcpStream::connect(exposed.addr).await.unwrap();
    let req = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", echo.addr);
    t.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(&mut t).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("rotor-source: 127.0.0."), "{head}");
    // A failure on a leased address names it too (absolute-form and
    // CONNECT to a port no one listens on).
    let closed = format!("127.0.0.1:{}", free_port());
    let r = get(exposed.addr, &format!("http://{closed}/")).await;
    assert_eq!(r.status, 502);
    let said = r.headers["rotor-source"].to_str().unwrap();
    assert!(said.starts_with("127.0.0."), "{said}");
    let mut t = TcpStream::connect(exposed.addr).await.unwrap();
    let req = format!("CONNECT {closed} HTTP/1.1\r\nHost: {closed}\r\n\r\n");
    t.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(&mut t).await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert!(head.contains("rotor-source: 127.0.0."), "{head}");
    // Without the flag, nothing is added.
    let r = get(strict.addr, &format!("http://{}/", origin.addr)).await;
    assert!(!r.headers.contains_key("rotor-source"));
}

/// A destination that breaks HTTP is a 502 that says how (RFC 9209), and
/// the worker goes on serving.
#[tokio::test]
async fn a_broken_destination_is_502_with_its_cause() {
    use tokio::io::AsyncWriteExt;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let answers: [(&'static [u8], &str); 4] = [
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "http_protocol_error"),
        (b"", "connection_terminated"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "connection_terminated"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
            "http_protocol_error",
        ),
    ];
    for (answer, kind) in answers {
        let (origin, _) = recording_server(move |mut s: TcpStream| async move {
            if read_head(&mut s).await.is_empty() {
                return;
            }
            let _ = s.write_all(answer).await;
        })
        .await;
        let r = get(worker.addr, &format!("http://{origin}/")).await;
        assert_eq!(r.status, 502, "{answer:?}");
        assert!(
            r.proxy_status().contains(&format!("error={kind}")),
            "{answer:?}: {}",
            r.proxy_status()
        );
    }
    // A response head larger than rotor accepts (64 KiB, as squid): in
    // bytes (20 fields of 4 KB), and in fields (150 small ones); one of
    // 60 KB passes.
    for (fields, size, status) in [(20, 4000, 502), (150, 8, 502), (15, 4000, 200)] {
        let (origin, _) = recording_server(move |mut s: TcpStream| async move {
            if read_head(&mut s).await.is_empty() {
                return;
            }
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n")
                .await;
            let line = format!("x-big: {}\r\n", "a".repeat(size));
            for _ in 0..fields {
                if s.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
            }
            let _ = s.write_all(b"\r\n").await;
        })
        .await;
        let r = get(worker.addr, &format!("http://{origin}/")).await;
        assert_eq!(r.status, status, "{fields} x {size}");
        if status == 502 {
            assert!(
                r.proxy_status()
                    .contains("error=http_response_header_section_size"),
                "{fields} x {size}: {}",
                r.proxy_status()
            );
        }
    }
    let origin = Origin::start().await;
    assert_eq!(get(worker.addr, &origin.url("/")).await.status, 200);
}

/// A response field with whitespace before its colon (old embedded
/// servers send `Content-Type : text/plain`) reaches the client without
/// it (RFC 9112 §5.1: a proxy must take it out), not as a 502.
#[tokio::test]
async fn whitespace_before_a_response_fields_colon_is_taken_out() {
    use tokio::io::AsyncWriteExt;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let (origin, _) = recording_server(move |mut s: TcpStream| async move {
        if read_head(&mut s).await.is_empty() {
            return;
        }
        let _ = s
            .write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type : text/plain\r\nContent-Length\t: 2\r\n\r\nok",
            )
            .await;
    })
    .await;
    let mut s = raw_get(worker.addr, &format!("http://{origin}/")).await;
    let head = read_head(&mut s).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("\r\ncontent-type: text/plain\r\n"), "{head}");
    assert!(head.contains("\r\ncontent-length: 2\r\n"), "{head}");
}

/// A destination closing an idle connection may say so with a 408 as it
/// closes (RFC 9110 §15.5.9): met on a reused connection, that is not the
/// request's answer, and the request goes again on a new one.
#[tokio::test]
async fn a_408_on_a_reused_connection_sends_the_request_again() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let connections = Arc::new(AtomicUsize::new(0));
    let seen = connections.clone();
    let (origin, peers) = recording_server(move |mut s: TcpStream| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            if read_head(&mut s).await.is_empty() {
                return;
            }
            let ok = format!("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n{n}");
            let _ = s.write_all(ok.as_bytes()).await;
            // The first connection's next request meets the 408 its idle
            // close sent.
            if n == 0 && !read_head(&mut s).await.is_empty() {
                let _ = s
                    .write_all(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
                    .await;
                return;
            }
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        }
    })
    .await;
    let url = format!("http://{origin}/");
    let mut c = ProxyConn::open(worker.addr).await;
    let first = c.get(&url).await;
    assert_eq!((first.status, &first.body[..]), (200, &b"0"[..]));
    let second = c.get(&url).await;
    assert_eq!((second.status, &second.body[..]), (200, &b"1"[..]));
    assert_eq!(peers.lock().unwrap().len(), 2);
    // On a new connection, a 408 is the answer, and goes once.
    let (timing_out, peers) = recording_server(|mut s: TcpStream| async move {
        if !read_head(&mut s).await.is_empty() {
            let _ = s
                .write_all(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
    })
    .await;
    let r = c.get(&format!("http://{timing_out}/")).await;
    assert_eq!(r.status, 408);
    assert_eq!(peers.lock().unwrap().len(), 1);
}

/// A request that may not be sent twice (a POST or PATCH without a body)
/// goes on a new connection, as squid sends it: on a reused one, the
/// destination's idle close crossing it was a 502 (it may not be sent
/// again once its head went). One that may be (an `Idempotency-Key`)
/// takes the reused one, and goes again on a new one after such a close.
#[tokio::test]
async fn a_request_that_may_not_go_twice_takes_a_new_connection() {
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    use std::sync::atomic::{AtomicUsize, Ordering};
    // Each connection's first request answered, its second met by the
    // close (the idle close crossing it).
    let heads = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = heads.clone();
    let (keeps_one, peers) = recording_server(move |mut s: TcpStream| {
        let heads = counted.clone();
        async move {
            if read_head(&mut s).await.is_empty() {
                return;
            }
            heads.fetch_add(1, Ordering::SeqCst);
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await;
            if !read_head(&mut s).await.is_empty() {
                heads.fetch_add(1, Ordering::SeqCst);
            }
        }
    })
    .await;
    let url = format!("http://{keeps_one}/");
    let mut c = ProxyConn::open(worker.addr).await;
    let mut connections = 1;
    assert_eq!(c.get(&url).await.status, 200);
    for method in ["POST", "PATCH"] {
        let req = hyper::Request::builder()
            .method(method)
            .uri(&url)
            .body(http_body_util::Full::default())
            .unwrap();
        assert_eq!(c.send(req).await.status, 200, "{method}");
        connections += 1;
        assert_eq!(peers.lock().unwrap().len(), connections, "{method}");
        assert_eq!(heads.load(Ordering::SeqCst), connections, "{method}");
    }
    // (The PATCH's connection, pooled after it, is reused and closes.)
    let keyed = hyper::Request::post(&url)
        .header("idempotency-key", "k1")
        .body(http_body_util::Full::default())
        .unwrap();
    assert_eq!(c.send(keyed).await.status, 200);
    assert_eq!(peers.lock().unwrap().len(), connections + 1);
    assert_eq!(heads.load(Ordering::SeqCst), connections + 2);
}

/// A peer's process is the one the kernel names, not the one its Hello
/// claims: `rotor status` lists the real one.
#[tokio::test]
async fn a_peer_is_listed_by_its_real_pid() {
    use rotor_protocol::{client_handshake, Channel, ClientChannel, Hello, Role};
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let stream = tokio::net::UnixStream::connect(&alloc.socket)
        .await
        .unwrap();
    let mut chan: ClientChannel<tokio::net::UnixStream> = Channel::new(stream);
    let mut hello = Hello::new(Role::Worker, "a liar");
    hello.pid = 1;
    client_handshake(&mut chan, hello).await.unwrap();
    let me = u64::from(std::process::id());
    eventually("the peer listed", || async {
        status_json(&alloc.socket)["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| {
                // (With the protocol the peer says it speaks, apart.)
                let minor = format!("1.{}", rotor_protocol::PROTOCOL_MINOR);
                p["software"] == "a liar" && p["protocol"] == minor.as_str() && p["pid"] == me
            })
    })
    .await;
    drop(chan);
}

/// `ROTOR_SOCKET=` and `ROTOR_CONFIG=` left empty in a shell are no
/// setting: every command failed with "a value is required for
/// '--socket'", though none was given.
#[tokio::test]
async fn empty_rotor_socket_and_config_variables_are_ignored() {
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let out = std::process::Command::new(ROTOR)
        .args(["status", "--socket", alloc.socket.to_str().unwrap()])
        .env("ROTOR_SOCKET", "")
        .env("ROTOR_CONFIG", "")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("127.0.0.2"));
}

/// Every binary names one build, with the commit it was built from in a
/// git checkout: `--version` and the software a worker gives the
/// allocator (`rotor status`) say the same (two builds of one version
/// both said `rotor 0.1.0`, and told apart only by their protocol).
#[tokio::test]
async fn the_binaries_name_their_build_alike() {
    let version = |program: &str| {
        let out = run_ok(program, &["--version"], program);
        let text = String::from_utf8(out).unwrap();
        text.trim().strip_prefix("rotor ").unwrap().to_string()
    };
    let build = version(ROTOR);
    assert_eq!(version(ALLOCATOR), build);
    assert_eq!(version(WORKER), build);
    // Built here from a checkout: with its commit.
    let in_checkout = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".git")
        .exists();
    if in_checkout {
        assert!(build.contains('+'), "{build}");
    }
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let _w = Worker::start(&alloc.socket, &[]).await;
    let want = format!("rotor-worker/{build}");
    eventually("the worker listed with its build", || async {
        status_json(&alloc.socket)["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["software"] == want.as_str())
    })
    .await;
}
