//! Several rotor hosts behind one HAProxy (deploy/multi-host/haproxy.cfg,
//! as shipped but for its addresses): requests spread over both hosts'
//! pools, a sticky session stays on one host, and a host whose metrics
//! endpoint stops answering leaves the rotation. HAProxy comes from
//! Debian's haproxy package, which `.ci/run` installs.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;

use crate::util::*;

struct Host {
    alloc: Allocator,
    worker: Worker,
    metrics: SocketAddr,
    /// Its access log (JSON).
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// A rotor host behind HAProxy (on 127.0.0.1), which sends it the
/// client's address in a PROXY protocol header.
async fn host(pool: &str) -> Host {
    host_with(pool, &[]).await
}

/// As [`host`], its worker given `extra` arguments too.
async fn host_with(pool: &str, extra: &[&str]) -> Host {
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let m = metrics.to_string();
    let alloc = Allocator::start(&["--pool", pool, "--metrics-listen", &m]).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let mut args = vec![
        "--proxy-protocol-from",
        "127.0.0.1",
        "--access-log",
        log.to_str().unwrap(),
        "--access-log-format",
        "json",
    ];
    args.extend_from_slice(extra);
    let worker = Worker::start(&alloc.socket, &args).await;
    Host {
        alloc,
        worker,
        metrics,
        log,
        _dir: dir,
    }
}

/// The shipped configuration with these hosts and this front address
/// (and quicker checks, and a stats socket at `stats`).
fn config(front: SocketAddr, hosts: &[&Host], stats: &std::path::Path) -> String {
    let shipped = include_str!("../../deploy/multi-host/haproxy.cfg");
    let mut out = String::new();
    let mut n = 0;
    for line in shipped.lines() {
        let t = line.trim_start();
        if t.starts_with("bind ") {
            out.push_str(&format!("  bind {front}\n"));
        } else if t.starts_with("server rotor") {
            // rotor1 is the first of `hosts`, rotor2 the second.
            let i = n % hosts.len();
            n += 1;
            assert!(t.contains(" send-proxy-v2 "), "{t}");
            out.push_str(&format!(
                "  server rotor{} {} send-proxy-v2 check port {} inter 300ms fall 1 rise 1\n",
                i + 1,
                hosts[i].worker.addr,
                hosts[i].metrics.port()
            ));
        } else {
            out.push_str(line);
            out.push('\n');
            if t == "global" {
                out.push_str(&format!("  stats socket {}\n", stats.display()));
            }
        }
    }
    assert_eq!(n, 4, "two servers in each backend of the shipped file");
    out
}

/// HAProxy running the shipped configuration in front of `hosts`, once
/// it listens: its address, the process, and the directory of its file
/// and its stats socket (`stats.sock`).
async fn front(hosts: &[&Host]) -> (SocketAddr, Proc, tempfile::TempDir) {
    let front: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("haproxy.cfg");
    let stats = dir.path().join("stats.sock");
    std::fs::write(&cfg, config(front, hosts, &stats)).unwrap();
    let haproxy = Proc::spawn("haproxy", &["-db", "-f", cfg.to_str().unwrap()]);
    eventually("HAProxy listening", || async {
        tokio::net::TcpStream::connect(front).await.is_ok()
    })
    .await;
    (front, haproxy, dir)
}

/// Whether HAProxy (its stats socket at `stats`) has every `server` line
/// of that name down.
async fn all_down(stats: &std::path::Path, server: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::UnixStream::connect(stats).await else {
        return false;
    };
    let mut text = String::new();
    if s.write_all(b"show servers state\n").await.is_err()
        || s.read_to_string(&mut text).await.is_err()
    {
        return false;
    }
    // `be_id be_name srv_id srv_name srv_addr srv_op_state ...`; 0 is down.
    let states: Vec<&str> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 5 && f[3] == server)
        .map(|f| f[5])
        .collect();
    !states.is_empty() && states.iter().all(|st| *st == "0")
}

async fn get_as(front: SocketAddr, user: Option<&str>, url: &str) -> u16 {
    let mut b = hyper::Request::get(url);
    if let Some(u) = user {
        b = b.header("proxy-authorization", basic(u, "pw"));
    }
    let req = b.body(Full::new(Bytes::new())).unwrap();
    ProxyConn::open(front).await.send(req).await.status
}

#[tokio::test]
async fn haproxy_spreads_clients_over_hosts_and_keeps_sessions_on_one() {
    if !have(
        "haproxy_spreads_clients_over_hosts_and_keeps_sessions_on_one",
        &["haproxy"],
    ) {
        return;
    }
    let origin = Origin::start().await;
    let one = host("127.0.0.2-127.0.0.5").await;
    let two = host("127.0.0.6-127.0.0.9").await;
    let (front, _haproxy, dir) = front(&[&one, &two]).await;
    let stats = dir.path().join("stats.sock");
    let url = origin.url("/");
    let pools: [HashSet<IpAddr>; 2] = [
        ips(2..=5).into_iter().collect(),
        ips(6..=9).into_iter().collect(),
    ];
    // Both hosts up (their checks passed): both pools serve.
    eventually("both hosts serving through HAProxy", || async {
        get_as(front, None, &url).await == 200
            && origin.sources().iter().any(|s| pools[0].contains(s))
            && origin.sources().iter().any(|s| pools[1].contains(s))
    })
    .await;
    let before = origin.count();
    for _ in 0..16 {
        assert_eq!(get_as(front, None, &url).await, 200);
    }
    let seen = &origin.sources()[before..];
    let on = |p: &HashSet<IpAddr>| seen.iter().filter(|s| p.contains(s)).count();
    assert!(on(&pools[0]) >= 4 && on(&pools[1]) >= 4, "{seen:?}");
    // A sticky session: every connection to the same host, one address.
    let before = origin.count();
    for _ in 0..6 {
        assert_eq!(get_as(front, Some("bob-session-cart1"), &url).await, 200);
    }
    let seen: HashSet<IpAddr> = origin.sources()[before..].iter().copied().collect();
    assert_eq!(seen.len(), 1, "{seen:?}");
    // A session named with its other parameters or without is the same
    // session (rotor keys it by user and id): the same host, one
    // address. (Eight sessions: with the whole name hashed, about half
    // reached two hosts.)
    for n in 0..8 {
        let before = origin.count();
        for suffix in ["", "-sessionttl-30m", "-sessionstrict-0-sessionttl-1h", ""] {
            let user = format!("bob-session-s{n}{suffix}");
            assert_eq!(get_as(front, Some(&user), &url).await, 200, "{user}");
        }
        let seen: HashSet<IpAddr> = origin.sources()[before..].iter().copied().collect();
        assert_eq!(seen.len(), 1, "session s{n}: {seen:?}");
    }
    // The hosts see each client's own address (HAProxy's PROXY protocol
    // header), not HAProxy's: a client on 127.0.0.77 is logged as it.
    for _ in 0..2 {
        let text = format!("GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let answer = exchange(connect_from([127, 0, 0, 77], front).await, text.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    eventually("a host's access log names the client", || {
        let clients = [&one, &two].map(|h| logged_clients(&h.log)).concat();
        async move { clients.iter().any(|c| c.starts_with("127.0.0.77:")) }
    })
    .await;
    // A host whose metrics endpoint stops answering leaves the rotation;
    // the other serves everything.
    let Host {
        alloc: mut gone, ..
    } = two;
    gone.proc.signal(nix::sys::signal::Signal::SIGKILL);
    gone.proc.wait(Duration::from_secs(5));
    eventually("HAProxy to take host two down", || {
        all_down(&stats, "rotor2")
    })
    .await;
    let before = origin.count();
    for _ in 0..8 {
        assert_eq!(get_as(front, None, &url).await, 200);
    }
    let seen = &origin.sources()[before..];
    assert!(seen.iter().all(|s| pools[0].contains(s)), "{seen:?}");
    drop(one);
}

/// A client that sends its credentials only when asked (curl's
/// `--proxy-anyauth`, Java's HttpURLConnection, browsers) keeps its
/// session on one host: behind a front, rotor's 407 closes the
/// connection, so the retry is a new one the front routes by the user
/// name. (Kept open, the retry went to the host the nameless first
/// request had reached: the session's requests spread over both.)
#[tokio::test]
async fn a_session_that_logs_in_when_asked_stays_on_one_host() {
    if !have(
        "a_session_that_logs_in_when_asked_stays_on_one_host",
        &["haproxy", "curl"],
    ) {
        return;
    }
    let origin = Origin::start().await;
    let (_users_dir, users) = users_file(&[("bob", "pw")]);
    let auth = ["--auth-file", users.to_str().unwrap()];
    let one = host_with("127.0.0.2-127.0.0.5", &auth).await;
    let two = host_with("127.0.0.6-127.0.0.9", &auth).await;
    let (front, _haproxy, _dir) = front(&[&one, &two]).await;
    let url = origin.url("/");
    eventually("both hosts serving through HAProxy", || async {
        get_as(front, Some("bob"), &url).await == 200
            && origin.sources().iter().any(|s| ips(2..=5).contains(s))
            && origin.sources().iter().any(|s| ips(6..=9).contains(s))
    })
    .await;
    let before = origin.count();
    let proxy = format!("http://{front}");
    for _ in 0..6 {
        let (code, out) = curl(&[
            "--proxy",
            &proxy,
            "--proxy-anyauth",
            "--proxy-user",
            "bob-session-asked:pw",
            &url,
        ])
        .await;
        assert_eq!(code, 0, "{out}");
    }
    let seen: HashSet<IpAddr> = origin.sources()[before..].iter().copied().collect();
    assert_eq!(origin.count() - before, 6);
    assert_eq!(seen.len(), 1, "{seen:?}");
    // A client of the host's own (not through the front) keeps its
    // connection after a 407, and logs in on it.
    use tokio::io::AsyncWriteExt;
    let mut s = connect_from([127, 0, 0, 78], one.worker.addr).await;
    let ask = format!("GET {url} HTTP/1.1\r\nHost: x\r\n\r\n");
    s.write_all(ask.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    let body_len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_string)
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    read_exactly(&mut s, body_len).await;
    let creds = basic("bob", "pw");
    let again = format!("GET {url} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: {creds}\r\n\r\n");
    s.write_all(again.as_bytes()).await.unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 200"));
}

/// A connection to `to` from `from` (an address of 127.0.0.0/8).
async fn connect_from(from: [u8; 4], to: SocketAddr) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind((from, 0).into()).unwrap();
    s.connect(to).await.unwrap()
}

/// Sends `bytes` on `s` and reads what comes back until it closes (or
/// is reset: a connection closed with the request unread).
async fn exchange(mut s: tokio::net::TcpStream, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(bytes).await.unwrap();
    let mut all = Vec::new();
    match tokio::time::timeout(PATIENCE, s.read_to_end(&mut all))
        .await
        .expect("the proxy did not close the connection")
    {
        Ok(_) => {}
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    String::from_utf8_lossy(&all).into_owned()
}

/// `--proxy-protocol-from`: a front proxy's connections start with a
/// PROXY protocol header, and the client it names is the one the
/// per-client limit and the access log see, on the HTTP and the SOCKS5
/// listeners; the front's connection without a header is closed
/// unserved, and another peer's header is not believed.
#[tokio::test]
async fn a_front_proxys_header_names_the_client_for_limits_and_the_log() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let extra = [
        "--proxy-protocol-from",
        "127.0.0.1",
        "--max-client-connections",
        "1",
    ];
    let (w, socks) = socks_worker_logging_json(&alloc.socket, &log, &extra).await;
    let url = origin.url("/");
    let v1 = |client: &str| {
        format!(
            "PROXY TCP4 {client} 127.0.0.1 40000 {}\r\nGET {url} HTTP/1.1\r\nHost: x\r\n\r\n",
            w.addr.port()
        )
    };
    // One request from 198.51.100.7, its connection kept open: it holds
    // that client's one place.
    let mut held = connect_from([127, 0, 0, 1], w.addr).await;
    held.write_all(v1("198.51.100.7").as_bytes()).await.unwrap();
    let head = read_head(&mut held).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Another client through the same front is served; the same client
    // again is past its limit.
    let other = exchange(
        connect_from([127, 0, 0, 1], w.addr).await,
        v1("198.51.100.8")
            .replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert!(other.starts_with("HTTP/1.1 200"), "{other}");
    let again = exchange(
        connect_from([127, 0, 0, 1], w.addr).await,
        v1("198.51.100.7").as_bytes(),
    )
    .await;
    assert!(
        again.starts_with("HTTP/1.1 503 Client Connection Limit Reached"),
        "{again}"
    );
    // The front's connection without a header: closed, unanswered, and
    // nothing sent on.
    let before = origin.count();
    let bare = exchange(
        connect_from([127, 0, 0, 1], w.addr).await,
        format!("GET {url} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(bare, "", "no answer");
    // Another peer's header is no header: a bad request, from that peer.
    let forged = exchange(
        connect_from([127, 0, 0, 66], w.addr).await,
        v1("198.51.100.9").as_bytes(),
    )
    .await;
    assert!(forged.starts_with("HTTP/1.1 400"), "{forged}");
    assert_eq!(origin.count(), before);
    // SOCKS5, after a version 2 header naming 198.51.100.10:40000.
    let mut s = connect_from([127, 0, 0, 1], socks).await;
    let mut header = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    header.extend([198, 51, 100, 10, 127, 0, 0, 1, 0x9c, 0x40, 0x04, 0x38]);
    header.extend([5, 1, 0]);
    s.write_all(&header).await.unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    assert_eq!(m, [5, 0]);
    let port = origin.addr.port().to_be_bytes();
    s.write_all(&[5, 1, 0, 1, 127, 0, 0, 1, port[0], port[1]])
        .await
        .unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply[1], 0, "succeeded: {reply:?}");
    let answer = exchange(s, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(held);
    eventually("the access log names the clients", || {
        let clients = logged_clients(&log);
        async move {
            [
                "198.51.100.7:40000",
                "198.51.100.8:40000",
                "198.51.100.10:40000",
            ]
            .iter()
            .all(|c| clients.iter().any(|l| l == c))
                && clients.iter().any(|l| l.starts_with("127.0.0.66:"))
        }
    })
    .await;
    let clients = logged_clients(&log);
    assert!(
        !clients.iter().any(|c| c.starts_with("198.51.100.9")),
        "a forged header believed: {clients:?}"
    );
}
