//! Bodies pass unchanged: large, chunked, streaming, both directions.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::*;

#[tokio::test]
async fn large_chunked_download_arrives_intact() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let n = 16 << 20;
    let r = get(worker.addr, &origin.url(&format!("/bytes/{n}"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), n);
    assert!(r.body[..] == pattern(n)[..], "download corrupted");
}

#[tokio::test]
async fn large_uploads_arrive_intact_with_length_and_chunked() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.3"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let data = pattern(8 << 20);

    let req = Request::post(origin.url("/echo"))
        .body(Full::new(Bytes::from(data.clone())))
        .unwrap();
    let r = ProxyConn::open(worker.addr).await.send(req).await;
    assert_eq!(r.status, 200);
    assert!(
        r.body[..] == data[..],
        "upload with Content-Length corrupted"
    );

    // Chunked upload, written by hand.
    let mut s = TcpStream::connect(worker.addr).await.unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        origin.url("/echo")
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let small = &data[..1 << 20];
    for chunk in small.chunks(60_000) {
        s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        s.write_all(chunk).await.unwrap();
        s.write_all(b"\r\n").await.unwrap();
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(&rest)
    } else {
        rest
    };
    assert!(
        body[..] == small[..],
        "chunked upload corrupted ({} bytes)",
        body.len()
    );
    let seen = origin.seen.lock().unwrap();
    assert_eq!(seen[0].body_len, data.len());
    assert_eq!(seen[1].body_len, small.len());
    assert_eq!(seen[1].method, "POST");
}

/// A destination that answers each connection's request (read once, as
/// it comes) with `resp`, then closes.
async fn answering(resp: String) -> std::net::SocketAddr {
    let resp = std::sync::Arc::new(resp);
    let (addr, _) = recording_server(move |mut s: TcpStream| {
        let resp = resp.clone();
        async move {
            let mut b = [0u8; 4096];
            let _ = s.read(&mut b).await;
            let _ = s.write_all(resp.as_bytes()).await;
        }
    })
    .await;
    addr
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..line_end]).unwrap().trim(), 16).unwrap();
        b = &b[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// A chunked body on a GET (or any method) reaches the origin whole: it
/// was dropped, as hyper's client sends no body of unknown length on a GET
/// unless told.
#[tokio::test]
async fn a_chunked_body_on_a_get_arrives() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let head = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        origin.url("/echo")
    );
    let all = raw_exchange(worker.addr, &head).await;
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let seen = origin.seen.lock().unwrap()[0].clone();
    assert_eq!((seen.method.as_str(), seen.body_len), ("GET", 11));
    assert!(text.contains("hello world"), "{text}");
}

/// An origin that sends both `Transfer-Encoding: chunked` and a
/// `Content-Length`: the chunked framing is the length (RFC 9112 §6.3), so
/// the client gets the whole body, not `Content-Length` bytes of it.
#[tokio::test]
async fn chunked_wins_over_a_content_length_from_the_origin() {
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    for lengths in [
        "Content-Length: 5\r\n",
        "Content-Length: 5\r\nContent-Length: 5\r\n",
        "Content-Length: 5, 5\r\n",
    ] {
        let body = "a".repeat(100);
        let addr = answering(format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n{lengths}\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        ))
        .await;
        let r = get(worker.addr, &format!("http://{addr}/")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), 100, "{lengths:?}: {:?}", r.body);
        assert!(!r.headers.contains_key("content-length"), "{lengths:?}");
        // An HTTP/1.0 client (served by hyper, not the fast path): the
        // whole body, to the close, with no length.
        let mut s = TcpStream::connect(worker.addr).await.unwrap();
        s.write_all(format!("GET http://{addr}/ HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
        assert!(!text.contains("content-length"), "{lengths:?}: {text}");
        assert!(text.ends_with(&"a".repeat(100)), "{lengths:?}: {text}");
    }
}

/// A body whose end is the close (to an HTTP/1.0 client) that rotor cuts
/// itself — the destination silent mid-body for `--idle-timeout` — ends
/// in a reset, as one the destination breaks off does: it ended in a FIN,
/// and the client stored the cut body as whole. Its access line says the
/// destination stalled (`http_response_timeout`), not `client_closed`; so
/// does an HTTP/1.1 client's (a chunked body without its last chunk).
#[tokio::test]
async fn a_body_rotor_cuts_reaches_an_http_1_0_client_as_a_reset() {
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let worker = worker_logging_json_to(&alloc.socket, &log, &["--idle-timeout", "1s"]).await;
    // A chunk, then silence (the connection held open).
    let (addr, _) = recording_server(|mut s: TcpStream| async move {
        let mut b = [0u8; 4096];
        let _ = s.read(&mut b).await;
        let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\npart1-\r\n";
        let _ = s.write_all(head.as_bytes()).await;
        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
    })
    .await;
    for (version, req) in [
        ("1.0", "GET http://{addr}/ HTTP/1.0\r\n\r\n"),
        (
            "1.1",
            "GET http://{addr}/ HTTP/1.1\r\nConnection: close\r\n\r\n",
        ),
    ] {
        let mut s = TcpStream::connect(worker.addr).await.unwrap();
        let req = req.replace("{addr}", &addr.to_string());
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let end = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("part1-"), "{text}");
        match version {
            "1.0" => {
                let e = end.expect_err(&format!("a cut body ended cleanly: {text}"));
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
            }
            // (Its chunked body, without its last chunk, says so.)
            _ => assert!(!text.ends_with("0\r\n\r\n"), "{text}"),
        }
    }
    eventually("both lines", || async { json_lines(&log).len() == 2 }).await;
    for line in json_lines(&log) {
        assert_eq!(line["error"], "http_response_timeout", "{line}");
    }
    // In the worker's stop: cut by its drain running out (`worker_stopped`,
    // as the stop's warning says), and by the idle timeout within the
    // drain, whose connection closes lingering (its shutdown sent a FIN
    // before the reset). A reset both.
    for (drain, idle, error) in [
        ("1s", "60s", "worker_stopped"),
        ("10s", "1s", "http_response_timeout"),
    ] {
        let log = dir.path().join(format!("stopping-{drain}.log"));
        let args = ["--drain-timeout", drain, "--idle-timeout", idle];
        let stopping = worker_logging_json_to(&alloc.socket, &log, &args).await;
        let mut s = TcpStream::connect(stopping.addr).await.unwrap();
        let req = format!("GET http://{addr}/ HTTP/1.0\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        while !String::from_utf8_lossy(&out).contains("part1-") {
            let mut b = [0u8; 1024];
            let n = tokio::time::timeout(PATIENCE, s.read(&mut b))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "{}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&b[..n]);
        }
        stopping.proc.signal(nix::sys::signal::Signal::SIGTERM);
        let end = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
            .await
            .unwrap();
        let e = end.expect_err(&format!("a body cut in the stop ended cleanly ({drain})"));
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{drain}");
        eventually("its line", || async { json_lines(&log).len() == 1 }).await;
        assert_eq!(json_lines(&log)[0]["error"], error, "{drain}");
    }
}

/// A body the destination cuts short reaches an HTTP/1.0 client (whose
/// answer's end is the close: no length) as a reset, not a FIN: a client
/// reading to the close took the cut body for the whole one. Cut mid-chunk,
/// before the last chunk, and before a Content-Length's end; a whole body
/// still ends cleanly.
#[tokio::test]
async fn a_body_cut_short_reaches_an_http_1_0_client_as_a_reset() {
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let body = "a".repeat(3000);
    for (resp, whole) in [
        (
            format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n",
                3000
            ),
            false,
        ),
        (
            format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{}",
                6000, body
            ),
            false,
        ),
        (
            format!("HTTP/1.1 200 OK\r\nContent-Length: 6000\r\n\r\n{body}"),
            false,
        ),
        (
            format!("HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n\r\n{body}"),
            true,
        ),
    ] {
        let addr = answering(resp).await;
        let mut s = TcpStream::connect(worker.addr).await.unwrap();
        s.write_all(format!("GET http://{addr}/ HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .unwrap();
        // What came before the end, kept (`read_to_end` drops it at an
        // error).
        let mut out = Vec::new();
        let end = tokio::time::timeout(PATIENCE, async {
            let mut b = [0u8; 8192];
            loop {
                match s.read(&mut b).await {
                    Ok(0) => return Ok(()),
                    Ok(n) => out.extend_from_slice(&b[..n]),
                    Err(e) => return Err(e),
                }
            }
        })
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&out);
        // The head and the body as far as it came, whole or cut (review
        // at: a body cut at once reached the client as nothing, head and
        // all, before the reset).
        assert!(text.starts_with("HTTP/1.0 200 "), "{text:?}");
        assert!(text.ends_with(&body), "{text:?}");
        match whole {
            true => end.unwrap(),
            false => {
                let e = end.expect_err(&format!("a cut body ended cleanly: {text}"));
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
            }
        }
    }
    // An upload the destination answers before it has it all, its answer
    // cut: the connection would close lingering (the upload's rest read
    // and dropped), and its FIN came first. A reset still.
    let addr = answering(format!(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\nabc",
        6000
    ))
    .await;
    let mut s = TcpStream::connect(worker.addr).await.unwrap();
    let head = format!("POST http://{addr}/ HTTP/1.0\r\nContent-Length: 100000\r\n\r\n0123456789");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let end = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
        .await
        .unwrap();
    let e = end.expect_err(&format!(
        "a cut answer to an upload ended cleanly: {}",
        String::from_utf8_lossy(&out)
    ));
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
}

/// A body broken at once behind its head (a chunk-size line past any
/// limit, sent with the head) reaches the client as its head and a cut
/// body, as one broken a moment later does: the client had nothing at
/// all, no status, while the access log said 200.
#[tokio::test]
async fn a_body_broken_with_its_head_still_sends_the_head() {
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let zeros = "0".repeat(70_000);
    let addr = answering(format!(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{zeros}"
    ))
    .await;
    let mut s = TcpStream::connect(worker.addr).await.unwrap();
    s.write_all(format!("GET http://{addr}/ HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
        .await
        .expect("the connection ends");
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200 "), "{text:?}");
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "a cut body ended cleanly: {text:?}"
    );
}

/// An HTTP/1.0 destination's answer goes to an HTTP/1.1 client as rotor's
/// own HTTP/1.1 (RFC 9110 §6.2), on the path hyper serves too (a chunked
/// upload), and the client's connection stays open for the next request.
#[tokio::test]
async fn an_http_1_0_answer_reaches_the_client_as_http_1_1() {
    // The answer once the whole request is in (a chunked body's last
    // chunk too): one given before it, the connection would close (the
    // upload read to its end is what lets it go on).
    let (addr, _) = recording_server(|mut s: TcpStream| async move {
        let mut got = Vec::new();
        let mut b = [0u8; 4096];
        while !(got.ends_with(b"\r\n\r\n")
            && (got.starts_with(b"GET") || got.ends_with(b"0\r\n\r\n")))
        {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&b[..n]),
            }
        }
        let _ = s
            .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabc")
            .await;
    })
    .await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let mut s = TcpStream::connect(worker.addr).await.unwrap();
    for upload in [true, false, true] {
        let req = match upload {
            true => format!(
                "POST http://{addr}/ HTTP/1.1\r\nHost: {addr}\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
            ),
            false => format!("GET http://{addr}/ HTTP/1.1\r\nHost: {addr}\r\n\r\n"),
        };
        s.write_all(req.as_bytes()).await.unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            !head.to_ascii_lowercase().contains("connection: close"),
            "{head}"
        );
        let mut body = [0u8; 3];
        tokio::time::timeout(PATIENCE, s.read_exact(&mut body))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&body, b"abc");
    }
}

/// A request with a body goes on a new upstream connection, and the pooled
/// one stays for the next request without a body. (Checked out for the
/// upload, a pooled connection the destination was closing for idleness
/// failed it with a 502 that could not be retried; and a connection that
/// carried a body is not pooled again anyway.) Over one client connection,
/// on the fast path (a small body) and hyper's (chunked).
#[tokio::test]
async fn an_upload_takes_a_new_upstream_connection_and_leaves_the_pooled_one() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let mut c = ProxyConn::open(worker.addr).await;
    let url = origin.url("/");
    assert_eq!(c.get(&url).await.status, 200);
    let post = Request::post(origin.url("/echo"))
        .body(Full::new(Bytes::from_static(b"abc")))
        .unwrap();
    let r = c.send(post).await;
    assert_eq!((r.status, &r.body[..]), (200, &b"abc"[..]));
    assert_eq!(c.get(&url).await.status, 200);
    // Chunked, by hyper's path.
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nxyz\r\n0\r\n\r\n",
        origin.url("/echo")
    );
    let answer = raw_exchange(worker.addr, &head).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(c.get(&url).await.status, 200);
    let seen: Vec<(String, usize)> = origin
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| (s.method.clone(), s.conn))
        .collect();
    let get_conn = seen[0].1;
    let want = vec![
        ("GET".to_string(), get_conn),
        ("POST".to_string(), seen[1].1),
        ("GET".to_string(), get_conn),
        ("POST".to_string(), seen[3].1),
        ("GET".to_string(), get_conn),
    ];
    assert_eq!(seen, want);
    assert!(
        seen[1].1 != get_conn && seen[3].1 != get_conn && seen[1].1 != seen[3].1,
        "{seen:?}"
    );
}

/// The same in the drain: a connection closed at the drain's word closes
/// lingering, and the lingering close's shutdown sent a FIN right behind
/// the cut body, which an HTTP/1.0 client took for its end.
#[tokio::test]
async fn a_body_cut_short_in_the_drain_is_still_a_reset() {
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let body = "a".repeat(3000);
    let addr = answering(format!(
        "HTTP/1.1 200 OK\r\nContent-Length: 6000\r\n\r\n{body}"
    ))
    .await;
    let mut s = TcpStream::connect(worker.addr).await.unwrap();
    accepted(worker.addr).await;
    worker.proc.signal(nix::sys::signal::Signal::SIGTERM);
    drain_begun(worker.addr).await;
    s.write_all(format!("GET http://{addr}/ HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let end = tokio::time::timeout(PATIENCE, s.read_to_end(&mut out))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    let e = end.expect_err(&format!("a cut body ended cleanly: {text}"));
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
}

/// A client's `Expect: 100-continue` is the destination's to answer (RFC
/// 9110 §10.1.1): a destination that refuses the request from its head
/// has the client told so before the body goes, and the client gets no
/// `100` (rotor sent one at once, and the body went for nothing); one
/// that takes it has its `100` reach the client, then the body reach it.
#[tokio::test]
async fn a_100_continue_is_the_destinations_to_send() {
    // The head, as it came; then, with `take`, a 100, the five bytes of
    // body and their echo; without, a 401, the connection held open.
    async fn origin(take: bool) -> (std::net::SocketAddr, Arc<Mutex<String>>) {
        let heads: Arc<Mutex<String>> = Arc::default();
        let h = heads.clone();
        let (addr, _) = recording_server(move |mut s: TcpStream| {
            let h = h.clone();
            async move {
                let head = read_head(&mut s).await;
                *h.lock().unwrap() = head;
                if !take {
                    let _ = s
                        .write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\nno")
                        .await;
                    tokio::time::sleep(PATIENCE).await;
                    return;
                }
                let _ = s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
                let body = read_exactly(&mut s, 5).await;
                let mut resp = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".to_vec();
                resp.extend_from_slice(&body);
                let _ = s.write_all(&resp).await;
            }
        })
        .await;
        (addr, heads)
    }
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let head = |addr: std::net::SocketAddr| {
        format!(
            "PUT http://{addr}/up HTTP/1.1\r\nHost: {addr}\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
    };

    // Refused from its head: the 401 comes with no body sent, and no 100.
    let (refusing, heads) = origin(false).await;
    let mut c = TcpStream::connect(worker.addr).await.unwrap();
    c.write_all(head(refusing).as_bytes()).await.unwrap();
    let answer = read_head(&mut c).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    let seen = heads.lock().unwrap().to_ascii_lowercase();
    assert!(seen.contains("\r\nexpect: 100-continue\r\n"), "{seen}");
    assert_eq!(read_exactly(&mut c, 2).await, b"no");

    // Taken: the destination's 100, then the body, then the answer.
    let (taking, _) = origin(true).await;
    let mut c = TcpStream::connect(worker.addr).await.unwrap();
    c.write_all(head(taking).as_bytes()).await.unwrap();
    let interim = read_head(&mut c).await;
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    c.write_all(b"hello").await.unwrap();
    let answer = read_head(&mut c).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(read_exactly(&mut c, 5).await, b"hello");
}

/// `100-continue` in a form hyper's server sends the client no `100` for
/// (in a list, beside another `Expect` field, with an empty member) is
/// answered 417 at once, before the destination is asked: rotor sent the
/// destination `Expect: 100-continue`, swallowed its `100`, and the client
/// waiting for one got a 408 after --response-timeout. The plain form,
/// in any case, still has its `100` reach the client.
#[tokio::test]
async fn an_expectation_hyper_cannot_answer_is_refused_at_once() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let url = origin.url("/up");
    let host = origin.addr;
    for expect in [
        "Expect: 100-continue, x-foo\r\n",
        "Expect: 100-continue,\r\n",
        "Expect: 100-continue\r\nExpect: x-foo\r\n",
    ] {
        let mut c = TcpStream::connect(worker.addr).await.unwrap();
        let req =
            format!("PUT {url} HTTP/1.1\r\nHost: {host}\r\n{expect}Content-Length: 5\r\n\r\n");
        c.write_all(req.as_bytes()).await.unwrap();
        // (No body: the client waits for a 100, as curl does.)
        let answer = tokio::time::timeout(std::time::Duration::from_secs(5), read_head(&mut c))
            .await
            .unwrap_or_else(|_| panic!("{expect:?}: no answer in 5 s"));
        let lower = answer.to_ascii_lowercase();
        assert!(answer.starts_with("HTTP/1.1 417"), "{expect:?}: {answer}");
        assert!(
            lower.contains("proxy-status: rotor; error=http_request_error"),
            "{answer}"
        );
        assert!(lower.contains("connection: close"), "{answer}");
    }
    assert_eq!(origin.count(), 0, "the destination was asked");
    // `100-Continue` alone, however spelt, is hyper's to answer.
    let mut c = TcpStream::connect(worker.addr).await.unwrap();
    let req = format!(
        "PUT {url} HTTP/1.1\r\nHost: {host}\r\nExpect: 100-Continue\r\nContent-Length: 5\r\n\r\n"
    );
    c.write_all(req.as_bytes()).await.unwrap();
    let interim = tokio::time::timeout(std::time::Duration::from_secs(5), read_head(&mut c))
        .await
        .expect("no 100 in 5 s");
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    c.write_all(b"hello").await.unwrap();
    let answer = read_head(&mut c).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(origin.count(), 1);
}

/// A request hyper's server reads (a chunked upload) whose client shuts its
/// side once it is sent (`nc -N`) is answered: its end was taken for its
/// going, and the request dropped unanswered. A client that leaves for
/// good while its request waits is still given up (sites.rs,
/// `a_connect_whose_client_leaves_while_it_waits_is_given_up`).
#[tokio::test]
async fn a_chunked_upload_whose_client_shuts_its_side_is_answered() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let url = origin.url("/up");
    for _ in 0..5 {
        let req = format!(
            "POST {url} HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            origin.addr
        );
        let got = ask_then_shut(worker.addr, req.as_bytes()).await;
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 200"), "{got:?}");
    }
    assert_eq!(origin.count(), 5);
}

/// An HTTP/1.0 keep-alive client whose answer has no length (the origin's
/// is chunked, or ends at its close) is told `Connection: close`, not
/// `keep-alive`: its body ends at the close. One with a length stays kept
/// alive.
#[tokio::test]
async fn an_http10_answer_without_a_length_says_close() {
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    for answer in [
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "HTTP/1.0 200 OK\r\n\r\nhello",
    ] {
        let addr = answering(answer.to_string()).await;
        let req = format!("GET http://{addr}/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        // (Read to the close: the body ends there.)
        let out = raw_exchange(worker.addr, &req).await;
        let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
        assert!(text.starts_with("http/1.0 200"), "{answer:?}: {text}");
        assert!(!text.contains("keep-alive"), "{answer:?}: {text}");
        assert!(text.contains("connection: close"), "{answer:?}: {text}");
        assert!(text.ends_with("\r\n\r\nhello"), "{answer:?}: {text}");
    }
    let addr = answering("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_string()).await;
    let mut s = TcpStream::connect(worker.addr).await.unwrap();
    for _ in 0..2 {
        let req = format!("GET http://{addr}/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let head = read_head(&mut s).await.to_ascii_lowercase();
        assert!(head.contains("connection: keep-alive"), "{head}");
        assert_eq!(read_exactly(&mut s, 5).await, b"hello");
    }
}

/// A body of many small chunks reaches the destination in few writes:
/// each chunk went out in a write (and a segment) of its own, so a
/// client's one-byte chunks cost a system call each, and a core for a
/// few MB.
#[tokio::test]
async fn small_chunks_reach_the_destination_joined() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = l.local_addr().unwrap();
    let site = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let (mut got, mut reads) = (Vec::new(), 0);
        let mut buf = vec![0u8; 1 << 16];
        while !got.ends_with(b"0\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed");
            got.extend_from_slice(&buf[..n]);
            reads += 1;
        }
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        (got, reads)
    });
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let w = Worker::start(&alloc.socket, &[]).await;
    let mut s = TcpStream::connect(w.addr).await.unwrap();
    let mut req = format!(
        "POST http://{dest}/ HTTP/1.1\r\nHost: {dest}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..20_000 {
        req.extend_from_slice(b"1\r\na\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    s.write_all(&req).await.unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 200"));
    let (got, reads) = site.await.unwrap();
    let body = &got[got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
    let mut data = Vec::new();
    let mut rest = body;
    while let Some(line) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..line]).unwrap(), 16).unwrap();
        data.extend_from_slice(&rest[line + 2..line + 2 + size]);
        rest = &rest[line + 2 + size + 2..];
        if size == 0 {
            break;
        }
    }
    assert_eq!(data, vec![b'a'; 20_000]);
    assert!(reads < 200, "{reads} reads");
}
