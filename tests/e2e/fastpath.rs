//! One client connection served by the worker's fast path (the common
//! requests) and, from the first request that is not the fast path's, by
//! hyper's server: in order, whole, and with the bytes read so far handed
//! over.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::*;

/// A response read off `s`: status, head, body (by its length, chunked or
/// none).
async fn response(s: &mut TcpStream, head_request: bool) -> (u16, String, Vec<u8>) {
    let head = read_head(s).await;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let lower = head.to_ascii_lowercase();
    let length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map(|n| n.trim().parse::<usize>().unwrap());
    let mut body = Vec::new();
    if head_request || status == 204 || status == 304 {
        return (status, head, body);
    }
    if lower.contains("transfer-encoding: chunked") {
        loop {
            let line = read_line(s).await;
            let size = usize::from_str_radix(line.trim(), 16).unwrap();
            let mut chunk = vec![0; size + 2];
            s.read_exact(&mut chunk).await.unwrap();
            body.extend_from_slice(&chunk[..size]);
            if size == 0 {
                break;
            }
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        tokio::time::timeout(PATIENCE, s.read_exact(&mut body))
            .await
            .unwrap()
            .unwrap();
    }
    (status, head, body)
}

async fn read_line(s: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        tokio::time::timeout(PATIENCE, s.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap()
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_across_the_handover() {
    let origin = Origin::start().await;
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.3"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let o = origin.addr;
    let mut s = TcpStream::connect(worker.addr).await.unwrap();
    // In one write: a GET (the fast path's), a chunked POST (hyper's: the
    // connection is handed over with it and what follows), a GET.
    let all = format!(
        "GET http://{o}/ HTTP/1.1\r\nHost: {o}\r\n\r\n\
         POST http://{o}/echo HTTP/1.1\r\nHost: {o}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n\
         GET http://{o}/bytes/70000 HTTP/1.1\r\nHost: {o}\r\n\r\n"
    );
    s.write_all(all.as_bytes()).await.unwrap();
    let (status, _, body) = response(&mut s, false).await;
    assert_eq!((status, body.as_slice()), (200, &b"hello"[..]));
    let (status, _, body) = response(&mut s, false).await;
    assert_eq!((status, body.as_slice()), (200, &b"abcde"[..]));
    let (status, _, body) = response(&mut s, false).await;
    assert_eq!(status, 200);
    assert!(
        body == pattern(70_000),
        "the chunked download through hyper"
    );
    // Then a CONNECT on the same (now hyper's) connection.
    let e = echo.addr;
    s.write_all(format!("CONNECT {e} HTTP/1.1\r\nHost: {e}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 200"));
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
    let seen = origin.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[1].body_len, 5);
    // Each request from the next address.
    assert_ne!(seen[0].source, seen[1].source);
    assert_ne!(seen[1].source, seen[2].source);
}

#[tokio::test]
async fn a_connect_first_after_fast_requests_and_bytes_behind_it() {
    let origin = Origin::start().await;
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let o = origin.addr;
    let e = echo.addr;
    let mut s = TcpStream::connect(worker.addr).await.unwrap();
    s.write_all(format!("GET http://{o}/ HTTP/1.1\r\nHost: {o}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert_eq!(response(&mut s, false).await.0, 200);
    // The CONNECT and the first tunnel bytes in one write: the fast path
    // read them all; hyper gets the head, the tunnel the rest.
    s.write_all(format!("CONNECT {e} HTTP/1.1\r\nHost: {e}\r\n\r\nearly").as_bytes())
        .await
        .unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 200"));
    let mut back = [0u8; 5];
    tokio::time::timeout(PATIENCE, s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"early");
}

#[tokio::test]
async fn heads_in_pieces_small_uploads_head_and_close() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let o = origin.addr;
    let mut s = TcpStream::connect(worker.addr).await.unwrap();
    // A head a few bytes at a time.
    let req = format!("GET http://{o}/ HTTP/1.1\r\nHost: {o}\r\n\r\n");
    for piece in req.as_bytes().chunks(7) {
        s.write_all(piece).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(response(&mut s, false).await.2, b"hello");
    // A small body of known length, in two writes.
    s.write_all(
        format!("POST http://{o}/echo HTTP/1.1\r\nHost: {o}\r\nContent-Length: 5\r\n\r\n12")
            .as_bytes(),
    )
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    s.write_all(b"345").await.unwrap();
    assert_eq!(response(&mut s, false).await.2, b"12345");
    // HEAD: the length is told, no body follows (the next response is
    // read right after its head).
    s.write_all(format!("HEAD http://{o}/ HTTP/1.1\r\nHost: {o}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (status, head, _) = response(&mut s, true).await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase().contains("content-length: 5"),
        "{head}"
    );
    // An error answered by rotor itself: status, reason, Proxy-Status.
    s.write_all(b"GET http://127.0.0.1:0/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (status, head, body) = response(&mut s, false).await;
    assert_eq!(status, 400, "{head}");
    assert!(head.to_ascii_lowercase().contains("date: "), "{head}");
    assert!(!body.is_empty());
    // Connection: close is answered in kind, then the connection ends.
    s.write_all(
        format!("GET http://{o}/ HTTP/1.1\r\nHost: {o}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let (status, head, body) = response(&mut s, false).await;
    assert_eq!((status, body.as_slice()), (200, &b"hello"[..]));
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    let mut rest = Vec::new();
    let n = tokio::time::timeout(PATIENCE, s.read_to_end(&mut rest))
        .await
        .expect("the connection closes after Connection: close")
        .unwrap();
    assert_eq!(n, 0);
    let seen = origin.seen.lock().unwrap().clone();
    assert_eq!(
        seen.iter().map(|s| s.method.as_str()).collect::<Vec<_>>(),
        ["GET", "POST", "HEAD", "GET"]
    );
    assert_eq!(seen[1].body_len, 5);
}
