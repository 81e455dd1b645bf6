//! SOCKS5: CONNECT through the same leases, rules and users as the HTTP
//! listener, with reply codes that say what happened; curl as a real
//! client.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::*;

/// A worker with a SOCKS5 listener (and the loopback destinations allowed
/// unless `strict`): its HTTP address and its SOCKS5 address.
async fn socks_worker(
    socket: &std::path::Path,
    extra: &[&str],
    strict: bool,
) -> (Worker, SocketAddr) {
    let socks: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let s = socks.to_string();
    let mut args = vec!["--socks-listen", s.as_str()];
    args.extend_from_slice(extra);
    let w = match strict {
        true => Worker::start_exactly(socket, free_port(), &args).await,
        false => Worker::start(socket, &args).await,
    };
    eventually("the SOCKS5 port", || async move {
        TcpStream::connect(socks).await.is_ok()
    })
    .await;
    (w, socks)
}

/// A SOCKS5 CONNECT to `host:port` (a name, or an address) as `user`, if
/// given: the reply code and the stream.
pub(crate) async fn connect(
    proxy: SocketAddr,
    user: Option<(&str, &str)>,
    host: &str,
    port: u16,
) -> (u8, TcpStream) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    match user {
        None => s.write_all(&[5, 1, 0]).await.unwrap(),
        Some(_) => s.write_all(&[5, 2, 0, 2]).await.unwrap(),
    }
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    if m[1] == 0xff {
        return (0xff, s);
    }
    if let Some((u, p)) = user {
        assert_eq!(m[1], 2);
        let mut a = vec![1, u.len() as u8];
        a.extend_from_slice(u.as_bytes());
        a.push(p.len() as u8);
        a.extend_from_slice(p.as_bytes());
        s.write_all(&a).await.unwrap();
        let mut r = [0u8; 2];
        s.read_exact(&mut r).await.unwrap();
        if r[1] != 0 {
            // The subnegotiation's failure status (RFC 1929: not 0).
            return (r[1], s);
        }
    }
    let mut req = vec![5, 1, 0];
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(a)) => {
            req.push(1);
            req.extend_from_slice(&a.octets());
        }
        Ok(std::net::IpAddr::V6(a)) => {
            req.push(4);
            req.extend_from_slice(&a.octets());
        }
        Err(_) => {
            req.extend_from_slice(&[3, host.len() as u8]);
            req.extend_from_slice(host.as_bytes());
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await.unwrap();
    let rest = if head[3] == 4 { 18 } else { 6 };
    let mut b = vec![0u8; rest];
    s.read_exact(&mut b).await.unwrap();
    (head[1], s)
}

async fn echo_once(s: &mut TcpStream) {
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"ping");
}

#[tokio::test]
async fn socks5_tunnels_rotate_pin_sessions_and_say_why_they_fail() {
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.4"]).await;
    let (_w, socks) = socks_worker(&alloc.socket, &[], false).await;
    // By address and by name (resolved by rotor: socks5h), rotating.
    for i in 0..6 {
        let host = if i % 2 == 0 { "127.0.0.1" } else { "localhost" };
        let (code, mut s) = connect(socks, None, host, echo.addr.port()).await;
        assert_eq!(code, 0, "tunnel {i}");
        echo_once(&mut s).await;
    }
    let seen = echo.peers.lock().unwrap().clone();
    assert_eq!(seen, [ips(2..=4), ips(2..=4)].concat());
    // A session in the user name (no users file: the password is ignored).
    for _ in 0..3 {
        let (code, mut s) = connect(
            socks,
            Some(("u-session-s1", "x")),
            "127.0.0.1",
            echo.addr.port(),
        )
        .await;
        assert_eq!(code, 0);
        echo_once(&mut s).await;
    }
    let seen = echo.peers.lock().unwrap().clone();
    assert!(seen[6..].iter().all(|ip| *ip == seen[6]), "{seen:?}");
    // Connection refused: 5.
    let closed = free_port();
    assert_eq!(connect(socks, None, "127.0.0.1", closed).await.0, 5);
    // A name that does not resolve: host unreachable, 4.
    assert_eq!(connect(socks, None, "no-such-host.invalid", 80).await.0, 4);
    // BIND: command not supported, 7.
    let mut s = TcpStream::connect(socks).await.unwrap();
    s.write_all(&[5, 1, 0, 5, 2, 0, 1, 127, 0, 0, 1, 0, 80])
        .await
        .unwrap();
    let mut r = [0u8; 6];
    s.read_exact(&mut r).await.unwrap();
    assert_eq!(r[3], 7);
    // Garbage and a silent client are closed (the latter within the
    // header-read timeout); the listener goes on.
    let mut g = TcpStream::connect(socks).await.unwrap();
    g.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), g.read_to_end(&mut sink))
        .await
        .expect("closed");
    assert_eq!(
        connect(socks, None, "127.0.0.1", echo.addr.port()).await.0,
        0
    );

    // The destination rules hold: loopback is not allowed by default (2).
    let (_strict, strict_socks) = socks_worker(&alloc.socket, &[], true).await;
    assert_eq!(
        connect(strict_socks, None, "127.0.0.1", echo.addr.port())
            .await
            .0,
        2
    );
}

#[tokio::test]
async fn socks5_with_a_users_file_and_a_slow_client() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    add_user(&users, "alice", "pw");
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let log = dir.path().join("access.log");
    let auth = [
        "--auth-file",
        users.to_str().unwrap(),
        "--header-read-timeout",
        "1s",
        "--access-log",
        log.to_str().unwrap(),
    ];
    let (_w, socks) = socks_worker(&alloc.socket, &auth, false).await;
    // No-auth only: no acceptable method.
    assert_eq!(
        connect(socks, None, "127.0.0.1", echo.addr.port()).await.0,
        0xff
    );
    assert_eq!(
        connect(
            socks,
            Some(("alice", "wrong")),
            "127.0.0.1",
            echo.addr.port()
        )
        .await
        .0,
        1
    );
    let (code, mut s) = connect(
        socks,
        Some(("alice-session-a", "pw")),
        "127.0.0.1",
        echo.addr.port(),
    )
    .await;
    assert_eq!(code, 0);
    echo_once(&mut s).await;
    // The wrong password is in the access log (the client's address, 407),
    // as an HTTP 407 is; the password never is.
    eventually("the refused login in the access log", || {
        let log = log.clone();
        async move {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.lines().any(|l| l.contains(" SOCKS5 - - 407 "))
        }
    })
    .await;
    assert!(!std::fs::read_to_string(&log).unwrap().contains("wrong"));
    // Credentials not in UTF-8 (read as ISO-8859-1): wrong ones refused
    // (status 1), logged as well.
    let mut s = TcpStream::connect(socks).await.unwrap();
    s.write_all(&[5, 1, 2, 1, 1, b'a', 1, 0xff]).await.unwrap();
    let mut r = [0u8; 4];
    s.read_exact(&mut r).await.unwrap();
    assert_eq!(r, [5, 2, 1, 1]);
    // So is the first client's, which offered no acceptable method (as an
    // HTTP request without credentials is): three 407s in all.
    eventually("the other refusals in the access log", || {
        let log = log.clone();
        async move {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.lines()
                .filter(|l| l.contains(" SOCKS5 - - 407 "))
                .count()
                == 3
        }
    })
    .await;
    // A request refused after a login (BIND) is logged as the user's.
    let mut s = TcpStream::connect(socks).await.unwrap();
    let mut hello = vec![5, 1, 2, 1, 5];
    hello.extend_from_slice(b"alice");
    hello.extend_from_slice(&[2, b'p', b'w', 5, 2, 0, 1, 127, 0, 0, 1, 0, 80]);
    s.write_all(&hello).await.unwrap();
    let mut r = [0u8; 6];
    s.read_exact(&mut r).await.unwrap();
    assert_eq!(r, [5, 2, 1, 0, 5, 7], "method, login, then BIND refused");
    eventually("the refused BIND in the access log, as alice's", || {
        let log = log.clone();
        async move {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.lines().any(|l| l.contains(" alice - SOCKS5 - - 501 "))
        }
    })
    .await;
    // A client that says nothing is cut off after the header-read timeout.
    let mut slow = TcpStream::connect(socks).await.unwrap();
    let t0 = Instant::now();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut sink))
        .await
        .expect("the slow client was not cut off");
    assert!(t0.elapsed() >= Duration::from_millis(900));
}

/// curl, a real client, through the SOCKS5 listener (socks5h: rotor
/// resolves the name), rotating.
#[tokio::test]
async fn curl_through_socks5() {
    if !have("curl_through_socks5", &["curl"]) {
        return;
    }
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.3"]).await;
    let (_w, socks) = socks_worker(&alloc.socket, &[], false).await;
    let url = format!("http://localhost:{}/", origin.addr.port());
    for _ in 0..4 {
        let out = tokio::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "10",
            ])
            .args(["-x", &format!("socks5h://{socks}"), &url])
            .output()
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    }
    assert_eq!(origin.sources(), [ips(2..=3), ips(2..=3)].concat());
}

/// `rotor up --socks-listen`: bound once, passed to every worker; the
/// file's `listen = []` binds no HTTP listener beside it (it had bound the
/// default 127.0.0.1:8080).
#[tokio::test]
async fn rotor_up_serves_socks5() {
    if !have("rotor_up_serves_socks5", &["ss"]) {
        return;
    }
    let echo = Echo::start().await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let config = dir.path().join("rotor.toml");
    std::fs::write(&config, "[worker]\nlisten = []\n").unwrap();
    let socks: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let up = Proc::spawn(
        ROTOR,
        &[
            "up",
            "--workers=2",
            "--pool=127.0.0.2-127.0.0.3",
            &format!("--config={}", config.display()),
            &format!("--socks-listen={socks}"),
            &format!("--socket={}", socket.display()),
            "--no-state",
            "--allow-destination=127.0.0.0/8",
        ],
    );
    eventually("rotor up's SOCKS5 port", || async move {
        TcpStream::connect(socks).await.is_ok()
    })
    .await;
    eventually("rotor up serving SOCKS5", || async move {
        matches!(
            tokio::time::timeout(
                Duration::from_secs(2),
                connect(socks, None, "127.0.0.1", echo.addr.port())
            )
            .await,
            Ok((0, _))
        )
    })
    .await;
    for _ in 0..4 {
        let (code, mut s) = connect(socks, None, "127.0.0.1", echo.addr.port()).await;
        assert_eq!(code, 0);
        echo_once(&mut s).await;
    }
    // What rotor up listens on (and passes on): the SOCKS5 port alone.
    let ss = std::process::Command::new("ss")
        .args(["-ltnpH"])
        .output()
        .expect("ss (iproute2)");
    let owner = format!("pid={},", up.pid());
    let ports: Vec<String> = String::from_utf8_lossy(&ss.stdout)
        .lines()
        .filter(|l| l.contains(&owner))
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
        .collect();
    assert_eq!(ports, [socks.to_string()]);
}

/// Python clients over SOCKS5 and over the HTTP proxy with a session in
/// the user name: requests (PySocks) and httpx (socksio), as users run
/// them. `.ci/run` installs them; elsewhere the test says it was skipped.
#[tokio::test]
async fn python_clients_through_socks5_and_sessions() {
    let test = "python_clients_through_socks5_and_sessions";
    if !python_has(test, "requests, socks, httpx, socksio") {
        return;
    }
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.5"]).await;
    let (w, socks) = socks_worker(&alloc.socket, &[], false).await;
    let url = format!("http://localhost:{}/", origin.addr.port());
    let script = format!(
        r#"
import requests, httpx
url = "{url}"
for proxy in ["socks5h://{socks}", "socks5h://u-session-py1:x@{socks}", "http://u-session-py2:x@{http}"]:
    for _ in range(3):
        r = requests.get(url, proxies={{"http": proxy, "https": proxy}}, timeout=10)
        assert r.status_code == 200, (proxy, r.status_code)
def client(proxy):
    # httpx took `proxies` until 0.26 (Debian 12 has 0.23), `proxy` since.
    try:
        return httpx.Client(proxy=proxy, timeout=10)
    except TypeError:
        return httpx.Client(proxies=proxy, timeout=10)
for proxy in ["socks5://{socks}", "http://u-session-py3:x@{http}"]:
    with client(proxy) as c:
        for _ in range(3):
            assert c.get(url).status_code == 200, proxy
print("ok")
"#,
        http = w.addr,
    );
    run_python(&script).await;
    let seen = origin.sources();
    assert_eq!(seen.len(), 15);
    // Rotating for plain SOCKS5; each session pinned to one address.
    assert_eq!(seen[..3], ips(2..=4)[..]);
    for pinned in [&seen[3..6], &seen[6..9], &seen[12..15]] {
        assert!(pinned.iter().all(|ip| *ip == pinned[0]), "{seen:?}");
    }
}

/// A worker whose only socket is systemd's SOCKS5 one (no HTTP listener)
/// serves and keeps serving: it does not take the missing HTTP acceptor
/// for a stop.
#[tokio::test]
async fn a_socket_activated_socks5_only_worker_serves() {
    if !have(
        "a_socket_activated_socks5_only_worker_serves",
        &["systemd-socket-activate"],
    ) {
        return;
    }
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.3"]).await;
    let socks: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let listen = socks.to_string();
    // A --socks-listen given as a flag is bound beside it, as --listen is
    // beside a passed HTTP socket (it was dropped without a word).
    let also: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let _worker = Proc::spawn(
        "systemd-socket-activate",
        &[
            "-l",
            &listen,
            "--fdname=socks",
            "-E",
            &format!("ROTOR_SOCKET={}", alloc.socket.display()),
            WORKER,
            "--allow-destination",
            "127.0.0.0/8",
            "--socks-listen",
            &also.to_string(),
        ],
    );
    eventually("the SOCKS5 socket", || async move {
        TcpStream::connect(socks).await.is_ok()
    })
    .await;
    for i in 0..4 {
        let (code, mut s) = connect(socks, None, "127.0.0.1", echo.addr.port()).await;
        assert_eq!(code, 0, "tunnel {i}");
        echo_once(&mut s).await;
        if i == 1 {
            // Still there a moment later.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let seen = echo.peers.lock().unwrap().clone();
    assert_eq!(seen[seen.len() - 4..], [ips(2..=3), ips(2..=3)].concat());
    let (code, mut s) = connect(also, None, "127.0.0.1", echo.addr.port()).await;
    assert_eq!(code, 0, "the flag's listener");
    echo_once(&mut s).await;
}

/// A SOCKS5 client past `--max-connections` has its greeting answered "no
/// acceptable method" and the connection closed cleanly (not reset).
#[tokio::test]
async fn socks5_past_the_connection_limit_is_refused() {
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let (_w, socks) = socks_worker(&alloc.socket, &["--max-connections", "1"], false).await;
    // The readiness probe's connection may still hold the one place.
    let _held = {
        let mut held = None;
        for _ in 0..50 {
            let mut s = TcpStream::connect(socks).await.unwrap();
            s.write_all(&[5, 1, 0]).await.unwrap();
            let mut m = [0u8; 2];
            s.read_exact(&mut m).await.unwrap();
            if m == [5, 0] {
                held = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        held.expect("a place under the limit")
    };
    let mut s = TcpStream::connect(socks).await.unwrap();
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("closed")
        .expect("a clean close, not a reset");
    assert_eq!(answer, [5, 0xff]);
}

/// A SOCKS5 client that opened its connection and said nothing (or only
/// its greeting) does not hold the stop: it is closed within the grace an
/// idle HTTP connection gets, and the worker's drain ends clean.
#[tokio::test]
async fn a_silent_socks5_client_does_not_hold_the_stop() {
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let (mut w, socks) = socks_worker(&alloc.socket, &["--drain-timeout", "30s"], false).await;
    let mut silent = TcpStream::connect(socks).await.unwrap();
    let mut greeted = TcpStream::connect(socks).await.unwrap();
    greeted.write_all(&[5, 1, 0]).await.unwrap();
    let mut choice = [0u8; 2];
    greeted.read_exact(&mut choice).await.unwrap();
    assert_eq!(choice, [5, 0]);
    let t0 = Instant::now();
    w.proc.signal(nix::sys::signal::Signal::SIGTERM);
    let status = w.proc.wait(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0));
    // (Well under the 30 s drain.)
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t0.elapsed()
    );
    let mut sink = Vec::new();
    let _ = silent.read_to_end(&mut sink).await;
    let _ = greeted.read_to_end(&mut sink).await;
}

/// Sends a greeting offering no authentication; checks it is taken.
async fn greet(s: &mut TcpStream) {
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).await.unwrap();
    assert_eq!(choice, [5, 0]);
}

/// After the greeting: a CONNECT to the echo server at `echo` (on
/// 127.0.0.1), its success, and one echo through the tunnel.
async fn tunnel_to_echo(s: &mut TcpStream, echo: SocketAddr) {
    let mut req = vec![5, 1, 0, 1, 127, 0, 0, 1];
    req.extend_from_slice(&echo.port().to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut r = [0u8; 10];
    s.read_exact(&mut r).await.unwrap();
    assert_eq!(r[..2], [5, 0], "{r:?}");
    echo_once(s).await;
}

/// A SOCKS5 request that comes while the worker drains (in the
/// handshake's grace) is served, as an HTTP connection's first CONNECT
/// then is: its connection was accepted before the drain, and only this
/// worker can answer it. The drain waits for the tunnel.
#[tokio::test]
async fn a_socks5_request_in_the_drain_is_served() {
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let (w, socks) = socks_worker(&alloc.socket, &["--drain-timeout", "30s"], false).await;
    let mut s = TcpStream::connect(socks).await.unwrap();
    greet(&mut s).await;
    let t0 = Instant::now();
    w.proc.signal(nix::sys::signal::Signal::SIGTERM);
    // Then the request, within the handshake's grace.
    drain_begun(socks).await;
    tunnel_to_echo(&mut s, echo.addr).await;
    drop(s);
    // (Waited for off the runtime: the echo server runs on it.)
    let status = exit_of(w, Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0));
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    assert_eq!(echo.peers.lock().unwrap().len(), 1);
}

/// A SOCKS5 handshake whose bytes go on coming across the end of the
/// drain's grace is let finish: its greeting answered late in the grace,
/// the client's request just past it was cut off (an HTTP head begun late
/// in the grace has the grace from its first byte). A silent one is cut
/// (`a_silent_socks5_client_does_not_hold_the_stop`).
#[tokio::test]
async fn a_socks5_handshake_begun_in_the_grace_is_let_finish() {
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let (w, socks) = socks_worker(&alloc.socket, &["--drain-timeout", "30s"], false).await;
    let mut s = TcpStream::connect(socks).await.unwrap();
    accepted(socks).await;
    w.proc.signal(nix::sys::signal::Signal::SIGTERM);
    drain_begun(socks).await;
    // The greeting in the grace (1 s from the stop), the request 0.6 s
    // later: past the grace's end (by 0.2 s at least), and within the
    // greeting's own (a busy host's delays are 0.4 s from failing either).
    tokio::time::sleep(Duration::from_millis(600)).await;
    greet(&mut s).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    tunnel_to_echo(&mut s, echo.addr).await;
    drop(s);
    let status = exit_of(w, Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0));
}

/// A SOCKS5 login checked while the worker drains: the check is rotor's
/// wait, not the client's silence, and the drain's grace for the request
/// starts again at its answer (it counted from the credentials, so a
/// check of most of a second left the request sent after its answer cut
/// off).
#[tokio::test]
async fn a_socks5_login_checked_in_the_drain_is_let_finish() {
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    // A hash of 80 passes (about a second a check, where `rotor user
    // add`'s 2 take 25 ms).
    let users = tempfile::NamedTempFile::new().unwrap();
    let hash = {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let params = argon2::Params::new(19 * 1024, 80, 1, None).unwrap();
        let salt = SaltString::from_b64("c29tZXNhbHRzb21lc2FsdA").unwrap();
        argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password(b"pw", &salt)
            .unwrap()
            .to_string()
    };
    std::fs::write(users.path(), format!("alice:{hash}\n")).unwrap();
    let args = [
        "--drain-timeout",
        "30s",
        "--auth-file",
        users.path().to_str().unwrap(),
    ];
    let (w, socks) = socks_worker(&alloc.socket, &args, false).await;
    let mut s = TcpStream::connect(socks).await.unwrap();
    s.write_all(&[5, 1, 2]).await.unwrap();
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).await.unwrap();
    assert_eq!(choice, [5, 2]);
    w.proc.signal(nix::sys::signal::Signal::SIGTERM);
    drain_begun(socks).await;
    let sent = Instant::now();
    s.write_all(&[1, 5, b'a', b'l', b'i', b'c', b'e', 2, b'p', b'w'])
        .await
        .unwrap();
    let mut status = [0u8; 2];
    s.read_exact(&mut status).await.unwrap();
    assert_eq!(status, [1, 0]);
    let checked = sent.elapsed();
    // The request 0.5 s after the answer: in the grace from the answer
    // (0.5 s to spare), past the grace from the credentials (the check
    // took 0.5 s or more).
    assert!(checked > Duration::from_millis(500), "{checked:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    tunnel_to_echo(&mut s, echo.addr).await;
    drop(s);
    let status = exit_of(w, Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0));
}

/// The SOCKS5 reply names the leased address only with `--expose-source`,
/// as HTTP's `Rotor-Source` does.
#[tokio::test]
async fn the_socks5_reply_names_the_source_only_when_asked() {
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    for (extra, want) in [
        (&[][..], [0, 0, 0, 0]),
        (&["--expose-source"][..], [127, 0, 0, 2]),
    ] {
        let (_w, socks) = socks_worker(&alloc.socket, extra, false).await;
        let mut s = TcpStream::connect(socks).await.unwrap();
        s.write_all(&[5, 1, 0]).await.unwrap();
        let mut m = [0u8; 2];
        s.read_exact(&mut m).await.unwrap();
        let mut req = vec![5, 1, 0, 1, 127, 0, 0, 1];
        req.extend_from_slice(&echo.addr.port().to_be_bytes());
        s.write_all(&req).await.unwrap();
        let mut r = [0u8; 10];
        s.read_exact(&mut r).await.unwrap();
        assert_eq!(r[..4], [5, 0, 0, 1], "{r:?}");
        assert_eq!(r[4..8], want, "{extra:?}: {r:?}");
        assert_eq!(u16::from_be_bytes([r[8], r[9]]) == 0, want == [0, 0, 0, 0]);
        echo_once(&mut s).await;
    }
}

/// A SOCKS5 client that leaves while its tunnel waits for a site's budget
/// is given up, as over HTTP: no lease is spent for it and no connection
/// made, and the next client waiting is served when the budget comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socks5_client_that_leaves_while_it_waits_is_given_up() {
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2", "--site-limit", "127.0.0.1=1/2s"]).await;
    let (_w, socks) = socks_worker(&alloc.socket, &["--budget-wait", "20s"], false).await;
    let port = echo.addr.port();
    let (code, mut first) = connect(socks, None, "127.0.0.1", port).await;
    assert_eq!(code, 0);
    echo_once(&mut first).await;
    let t0 = Instant::now();
    // Asks, and leaves before any answer.
    let mut gone = TcpStream::connect(socks).await.unwrap();
    gone.write_all(&[5, 1, 0]).await.unwrap();
    let mut m = [0u8; 2];
    gone.read_exact(&mut m).await.unwrap();
    let mut req = vec![5, 1, 0, 1, 127, 0, 0, 1];
    req.extend_from_slice(&port.to_be_bytes());
    gone.write_all(&req).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(gone);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (code, mut next) = connect(socks, None, "127.0.0.1", port).await;
    assert_eq!(code, 0);
    echo_once(&mut next).await;
    assert!(
        t0.elapsed() < Duration::from_millis(3500),
        "served a window late: {:?}",
        t0.elapsed()
    );
    assert_eq!(
        echo.peers.lock().unwrap().len(),
        2,
        "a connection for nobody"
    );
}

/// A SOCKS5 tunnel that cannot have a lease (the allocator unreachable)
/// fails with a general failure after the lease timeout, and the worker's
/// log says why at the default level, as for HTTP requests: an operator
/// whose SOCKS5 clients all fail sees it without debug logs.
#[tokio::test]
async fn socks5_without_an_allocator_says_why_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody.sock");
    let log = dir.path().join("worker.log");
    let socks: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let s = socks.to_string();
    let mut args = ALLOW_LOOPBACK.to_vec();
    args.extend_from_slice(&["--socks-listen", &s, "--lease-timeout", "300ms"]);
    let cmd = logging_to(WORKER, &log);
    let _w = Worker::start_cmd(cmd, &socket, free_port(), &args).await;
    eventually("the SOCKS5 port", || async move {
        TcpStream::connect(socks).await.is_ok()
    })
    .await;
    let echo = Echo::start().await;
    let (code, _s) = connect(socks, None, "127.0.0.1", echo.addr.port()).await;
    assert_eq!(code, 1, "general failure");
    eventually("the worker to log the want of a lease", || {
        let log = log.clone();
        async move {
            std::fs::read_to_string(&log)
                .unwrap()
                .contains("requests failed for want of a lease from the allocator")
        }
    })
    .await;
}

/// An IPv4 pool: a name whose only address is IPv6 is a host that cannot
/// be reached (4), not an address type rotor does not take (8: curl and
/// python-socks show that as `socks5h` unsupported); an IPv6 address is
/// (8). A name spelled with a resolver's escape, which would have leased
/// past the site's budget under another name, is refused (1).
#[tokio::test]
async fn socks5_names_without_an_address_of_the_pools_family_are_unreachable() {
    let dns = Dns::start().await;
    dns.set_v6("six.rotor.test", "::1".parse().unwrap(), 300);
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let server = dns.addr.to_string();
    let (_w, socks) = socks_worker(&alloc.socket, &["--dns-server", &server], false).await;
    assert_eq!(connect(socks, None, "six.rotor.test", 80).await.0, 4);
    assert_eq!(connect(socks, None, "::1", 80).await.0, 8);
    assert_eq!(connect(socks, None, "six.rotor.t\\est", 80).await.0, 1);
    assert_eq!(
        dns.queries_for("six.rotor.test"),
        1,
        "the escaped name was not looked up"
    );
}

/// A SOCKS5 client that sends its whole request and shuts its side before
/// the reply (`printf … | nc -N`: it only reads) has not left: it is
/// answered, the tunnel relays the destination's words, and its end
/// reaches the destination. (It was taken for gone and dropped with no
/// reply.)
#[tokio::test]
async fn a_socks5_client_that_shuts_its_side_after_asking_is_answered() {
    let far = banner_server().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let (_w, socks) = socks_worker(&alloc.socket, &[], false).await;
    for _ in 0..5 {
        let mut ask = vec![5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1];
        ask.extend_from_slice(&far.port().to_be_bytes());
        let got = ask_then_shut(socks, &ask).await;
        assert!(got.len() >= 12, "{got:?}");
        assert_eq!(got[..2], [5, 0], "{got:?}");
        assert_eq!(got[2..4], [5, 0], "the reply: {got:?}");
        assert_eq!(&got[12..], b"banner\nbye\n", "{got:?}");
    }
}
