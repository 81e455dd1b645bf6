//! Sticky sessions named in the proxy user name: one address for a session
//! across workers, connections, plain requests and tunnels, held by the
//! allocator (so worker restarts keep it), for its lifetime.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::*;

/// A GET through `proxy` as `user` (password `pw`), on `conn` if given.
pub(crate) async fn get_as(
    proxy: SocketAddr,
    user: &str,
    url: &str,
    conn: Option<&mut ProxyConn>,
) -> Reply {
    let req = Request::get(url)
        .header("proxy-authorization", basic(user, "pw"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    match conn {
        Some(c) => c.send(req).await,
        None => ProxyConn::open(proxy).await.send(req).await,
    }
}

/// A CONNECT through `proxy` as `user`; the echo server records the peer.
async fn tunnel_as(proxy: SocketAddr, user: &str, target: SocketAddr) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {}\r\n\r\n",
        basic(user, "pw")
    );
    s.write_all(req.as_bytes()).await.unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 200"));
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.unwrap();
}

#[tokio::test]
async fn a_session_keeps_one_address_across_workers_connections_and_tunnels() {
    let origin = Origin::start().await;
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.6"]).await;
    let w = [
        Worker::start(&alloc.socket, &[]).await,
        Worker::start(&alloc.socket, &[]).await,
    ];
    let url = origin.url("/");
    let mut kept = ProxyConn::open(w[0].addr).await;
    for i in 0..20 {
        match i % 3 {
            0 => assert_eq!(
                get_as(w[i % 2].addr, "u-session-cart1", &url, None)
                    .await
                    .status,
                200
            ),
            1 => assert_eq!(
                get_as(w[0].addr, "u-session-cart1", &url, Some(&mut kept))
                    .await
                    .status,
                200
            ),
            _ => tunnel_as(w[i % 2].addr, "u-session-cart1", echo.addr).await,
        }
    }
    let mut seen: Vec<IpAddr> = origin.sources();
    seen.extend(echo.peers.lock().unwrap().iter().copied());
    assert_eq!(seen.len(), 20);
    assert!(seen.iter().all(|ip| *ip == seen[0]), "{seen:?}");
    // Other sessions take the next addresses; sessions of other users with
    // the same id are other sessions.
    for user in ["u-session-cart2", "u-session-cart3", "v-session-cart1"] {
        get_as(w[1].addr, user, &url, None).await;
    }
    let mut last: Vec<IpAddr> = origin.sources()[origin.count() - 3..].to_vec();
    last.push(seen[0]);
    last.sort();
    last.dedup();
    assert_eq!(last.len(), 4, "{last:?}");
    assert_eq!(status_json(&alloc.socket)["sessions"], 4);

    // A worker restart keeps it: the allocator holds the sessions.
    let [a, b] = w;
    drop(a);
    drop(b);
    let w2 = Worker::start(&alloc.socket, &[]).await;
    get_as(w2.addr, "u-session-cart1", &url, None).await;
    assert_eq!(*origin.sources().last().unwrap(), seen[0]);
}

#[tokio::test]
async fn sessions_expire_move_or_fail_when_their_address_goes_and_bad_names_are_refused() {
    let origin = Origin::start().await;
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let file = dir.path().join("pool.txt");
    std::fs::write(&file, "127.0.0.2-127.0.0.4\n").unwrap();
    let alloc = Allocator::start_in(dir, &["--pool-file", file.to_str().unwrap()]).await;
    let w = Worker::start(&alloc.socket, &[]).await;
    let url = origin.url("/");
    let last = || *origin.sources().last().unwrap();
    // A three-second session: after it, the next address in rotation.
    get_as(w.addr, "u-session-short-sessionttl-3s", &url, None).await;
    let first = last();
    get_as(w.addr, "plain", &url, None).await; // moves the rotation on
    get_as(w.addr, "u-session-short-sessionttl-3s", &url, None).await;
    assert_eq!(last(), first, "within its lifetime");
    tokio::time::sleep(Duration::from_millis(3300)).await;
    get_as(w.addr, "u-session-short-sessionttl-3s", &url, None).await;
    assert_ne!(last(), first, "expired: the next address");

    // Two sessions on one address; the address leaves the pool.
    get_as(w.addr, "u-session-strict1-sessionstrict-1", &url, None).await;
    let strict_ip = last();
    let mut moving = None;
    for i in 0..3 {
        let name = format!("u-session-loose{i}");
        get_as(w.addr, &name, &url, None).await;
        if last() == strict_ip {
            moving = Some(name);
        }
    }
    let moving = moving.expect("a loose session on the strict one's address");
    let keep: Vec<String> = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        .into_iter()
        .filter(|a| *a != strict_ip.to_string())
        .map(String::from)
        .collect();
    std::fs::write(&file, keep.join("\n") + "\n").unwrap();
    rotor_control("reload", &alloc.socket, &[]);
    let r = get_as(w.addr, "u-session-strict1-sessionstrict-1", &url, None).await;
    assert_eq!(r.status, 502, "{:?}", r.body);
    let body = String::from_utf8_lossy(&r.body);
    assert!(body.contains("left the pool"), "{body}");
    // (The pool's addresses are told only with --expose-source.)
    assert!(!body.contains(&strict_ip.to_string()), "{body}");
    // Made strict once, it stays so: a request that leaves the parameter
    // out fails too, and moves it nowhere for the next strict one.
    for name in ["u-session-strict1", "u-session-strict1-sessionstrict-1"] {
        let r = get_as(w.addr, name, &url, None).await;
        assert_eq!(r.status, 502, "{name}: {:?}", r.body);
    }
    let r = get_as(w.addr, &moving, &url, None).await;
    assert_eq!(r.status, 200);
    assert_ne!(last(), strict_ip, "a loose session moves");

    // A mistake in a session name is refused, naming the parameter; a
    // name with a dash and no session is just a name.
    let r = get_as(w.addr, "u-session-a-country-de", &url, None).await;
    assert_eq!(r.status, 407);
    assert!(String::from_utf8_lossy(&r.body).contains("`country`"));
    assert_eq!(get_as(w.addr, "my-app", &url, None).await.status, 200);
    assert_eq!(
        get_as(w.addr, "my-sessionless-app", &url, None)
            .await
            .status,
        200
    );
}

/// A table full of strict sessions (and of strict ones already pushed out,
/// which fail until their end) refuses a new session with a 503 saying
/// when to come back, rather than move a strict one to another address.
#[tokio::test]
async fn a_table_full_of_strict_sessions_refuses_new_ones_rather_than_move_one() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.4", "--max-sessions", "1"]).await;
    let w = Worker::start(&alloc.socket, &[]).await;
    let url = origin.url("/");
    let last = || *origin.sources().last().unwrap();
    let one = "u-session-one-sessionttl-1h-sessionstrict-1";
    let two = "u-session-two-sessionttl-30m-sessionstrict-1";
    assert_eq!(get_as(w.addr, one, &url, None).await.status, 200);
    // "two" pushes "one" out; "one" is remembered, and fails until its end.
    assert_eq!(get_as(w.addr, two, &url, None).await.status, 200);
    let two_ip = last();
    // (So does a request for it without the parameter: strict once,
    // strict until its end.)
    for name in [one, "u-session-one"] {
        let r = get_as(w.addr, name, &url, None).await;
        assert_eq!(r.status, 502, "{name}: {:?}", r.body);
    }
    // Nothing can make room now: a new session is refused, and "two"
    // keeps its address.
    for name in ["u-session-three-sessionstrict-1", "u-session-four"] {
        let r = get_as(w.addr, name, &url, None).await;
        assert_eq!(r.status, 503, "{name}: {:?}", r.body);
        assert!(
            r.proxy_status().contains("proxy_internal_error"),
            "{}",
            r.proxy_status()
        );
        let after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1700..=1800).contains(&after), "{after}");
        assert!(String::from_utf8_lossy(&r.body).contains("full of strict sessions"));
    }
    for _ in 0..3 {
        assert_eq!(get_as(w.addr, two, &url, None).await.status, 200);
        assert_eq!(last(), two_ip);
    }
    // Requests without a session are not affected.
    assert_eq!(get_as(w.addr, "plain", &url, None).await.status, 200);
}

/// One user making new sessions without end (`--max-sessions-per-user`)
/// pushes out its own oldest, not another user's strict session.
#[tokio::test]
async fn one_user_cannot_push_out_another_users_sessions() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&[
        "--pool",
        "127.0.0.2-127.0.0.9",
        "--max-sessions",
        "4",
        "--max-sessions-per-user",
        "2",
    ])
    .await;
    let w = Worker::start(&alloc.socket, &[]).await;
    let url = origin.url("/");
    let last = || *origin.sources().last().unwrap();
    let bob = "bob-session-kept-sessionttl-1h-sessionstrict-1";
    assert_eq!(get_as(w.addr, bob, &url, None).await.status, 200);
    let bobs = last();
    for i in 0..12 {
        let eve = format!("eve-session-n{i}");
        assert_eq!(get_as(w.addr, &eve, &url, None).await.status, 200);
    }
    // Bob's strict session kept its address (without the cap, eve's
    // twelve would have pushed it out, and it would fail now).
    for _ in 0..2 {
        assert_eq!(get_as(w.addr, bob, &url, None).await.status, 200);
        assert_eq!(last(), bobs);
    }
    let status = status_json(&alloc.socket);
    assert_eq!(status["sessions"], 3, "{status}");
}

/// With a users file the user name before the parameters is checked; a
/// user whose own name has a dash is still a user, not parameters.
#[tokio::test]
async fn sessions_with_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    for name in ["alice", "team-a"] {
        add_user(&users, name, "pw");
    }
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.5"]).await;
    let w = Worker::start(&alloc.socket, &["--auth-file", users.to_str().unwrap()]).await;
    let url = origin.url("/");
    for _ in 0..3 {
        assert_eq!(
            get_as(w.addr, "alice-session-s1", &url, None).await.status,
            200
        );
    }
    let pinned = origin.sources();
    assert!(pinned.iter().all(|ip| *ip == pinned[0]), "{pinned:?}");
    // A worker without a users file on the same allocator: the same name
    // there, checked by nobody, is another session, never alice's.
    let open = Worker::start(&alloc.socket, &[]).await;
    assert_eq!(
        get_as(open.addr, "alice-session-s1", &url, None)
            .await
            .status,
        200
    );
    assert_ne!(*origin.sources().last().unwrap(), pinned[0]);
    assert_eq!(get_as(w.addr, "team-a", &url, None).await.status, 200);
    assert_eq!(
        get_as(w.addr, "team-a-session-s1", &url, None).await.status,
        200
    );
    assert_eq!(
        get_as(w.addr, "mallory-session-s1", &url, None)
            .await
            .status,
        407
    );
    // A wrong parameter is named to a user whose password checks out, and
    // to nobody else (that would tell which dashed names are users).
    let r = get_as(w.addr, "alice-session-s1-country-de", &url, None).await;
    assert_eq!(r.status, 407);
    assert!(String::from_utf8_lossy(&r.body).contains("`country`"));
    let r = get_as(w.addr, "nobody-session-s1-country-de", &url, None).await;
    assert_eq!(r.status, 407);
    assert!(!String::from_utf8_lossy(&r.body).contains("`country`"));
    // The user checked is the dashed one the name begins with, not what
    // is before its first dash.
    let r = get_as(w.addr, "team-a-sesion-s1", &url, None).await;
    assert_eq!(r.status, 407);
    assert!(
        String::from_utf8_lossy(&r.body).contains("`sesion`"),
        "{:?}",
        r.body
    );
}

#[tokio::test]
async fn sessions_outlive_a_clean_allocator_restart() {
    let origin = Origin::start().await;
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    // Without checkpoints: kept at the stop only.
    let pool = ["--pool", "127.0.0.2-127.0.0.6", "--checkpoint", "0s"];
    let mut alloc = Allocator::start_in(dir.clone(), &pool).await;
    let w = Worker::start(&alloc.socket, &["--lease-timeout", "10s"]).await;
    let url = origin.url("/");
    assert_eq!(
        get_as(w.addr, "u-session-kept", &url, None).await.status,
        200
    );
    let pinned = origin.sources()[0];
    // A clean stop (SIGTERM): the sessions go to the state directory; the
    // rotation resumes after the address the session took.
    alloc.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(alloc.proc.wait(Duration::from_secs(10)).success());
    assert!(dir.path().join("state/sessions.json").exists());
    let _alloc = Allocator::start_in(dir.clone(), &pool).await;
    for _ in 0..3 {
        assert_eq!(
            get_as(w.addr, "u-session-kept", &url, None).await.status,
            200
        );
    }
    assert_eq!(origin.sources()[1..], [pinned; 3]);
    // Read once: a later start (say after a crash) does not bring back
    // what the file held.
    assert!(!dir.path().join("state/sessions.json").exists());
    // Other clients rotate on from where the rotation stopped.
    assert_eq!(get_as(w.addr, "u", &url, None).await.status, 200);
    assert_ne!(origin.sources()[4], pinned);
}

/// An allocator that is killed (no clean stop) is followed by one that has
/// the sessions of its last checkpoint (the site state goes the same way:
/// `checkpoints_write_what_changed_and_a_successor_has_it`).
#[tokio::test]
async fn sessions_outlive_a_killed_allocator() {
    let origin = Origin::start().await;
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let args = ["--pool", "127.0.0.2-127.0.0.6", "--checkpoint", "1s"];
    let mut alloc = Allocator::start_in(dir.clone(), &args).await;
    let w = Worker::start(&alloc.socket, &["--lease-timeout", "10s"]).await;
    let url = origin.url("/");
    assert_eq!(
        get_as(w.addr, "u-session-crash", &url, None).await.status,
        200
    );
    let pinned = origin.sources()[0];
    let sessions = dir.path().join("state/sessions.json");
    eventually("the session checkpointed", || {
        let sessions = sessions.clone();
        async move { std::fs::read_to_string(&sessions).is_ok_and(|t| t.contains("crash")) }
    })
    .await;
    alloc.proc.signal(nix::sys::signal::Signal::SIGKILL);
    alloc.proc.wait(Duration::from_secs(10));
    let _alloc = Allocator::start_in(dir.clone(), &args).await;
    for _ in 0..3 {
        assert_eq!(
            get_as(w.addr, "u-session-crash", &url, None).await.status,
            200
        );
    }
    assert_eq!(origin.sources()[1..], [pinned; 3]);
    // The file stays for the next crash; the checkpoints keep it current.
    assert!(sessions.exists());
}

/// A new session for a site starts on an address the site did not push
/// back on, and a session's requests count against the site's budget of
/// its address (held to it, as any request: the session keeps that
/// address, and waits for its budget), so the site's other requests leave
/// that address alone.
#[tokio::test]
async fn a_new_session_avoids_cooling_addresses_and_counts_against_the_budget() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&[
        "--pool",
        "127.0.0.2-127.0.0.4",
        "--site-limit",
        "127.0.0.1=3/1m",
    ])
    .await;
    let w = Worker::start(&alloc.socket, &[]).await;
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    // The site pushes back on .2 and .3 for ten minutes.
    for _ in 0..2 {
        let r = get(w.addr, &origin.url("/status/429/600")).await;
        assert_eq!(r.status, 429);
    }
    assert_eq!(origin.sources(), [ip("127.0.0.2"), ip("127.0.0.3")]);
    // A new session starts on .4, and keeps it up to the budget of 3...
    for _ in 0..3 {
        let r = get_as(w.addr, "u-session-s1", &origin.url("/"), None).await;
        assert_eq!(r.status, 200);
        assert_eq!(*origin.sources().last().unwrap(), ip("127.0.0.4"));
    }
    // ...and is not sent past it (no --budget-wait: refused).
    let before = origin.count();
    let r = get_as(w.addr, "u-session-s1", &origin.url("/"), None).await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert_eq!(origin.count(), before);
    // The site's other requests: .2 and .3 cooling, .4's budget spent by
    // the session; rotor answers, the site sees nothing.
    let before = origin.count();
    let r = get(w.addr, &origin.url("/")).await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert_eq!(origin.count(), before);
}

/// Without a users file, a session that cannot be read is refused, not
/// dropped unsaid (the request served from the rotation): a parameter
/// given twice, or Basic credentials too long to read. Credentials of
/// another scheme are no rotor credentials, and ignored as always.
#[tokio::test]
async fn an_unreadable_session_on_an_open_proxy_is_refused_not_dropped() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.3"]).await;
    let w = Worker::start(&alloc.socket, &[]).await;
    let url = origin.url("/");
    let r = get_as(
        w.addr,
        "u-session-a-sessionstrict-1-sessionstrict-0",
        &url,
        None,
    )
    .await;
    assert_eq!(r.status, 407);
    let body = String::from_utf8_lossy(&r.body);
    assert!(body.contains("`sessionstrict` is given twice"), "{body}");
    let long = format!("u-session-s1-{}", "x".repeat(1000));
    let r = get_as(w.addr, &long, &url, None).await;
    assert_eq!(r.status, 407, "{:?}", r.body);
    let req = Request::get(&url)
        .header("proxy-authorization", "Bearer abc")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(ProxyConn::open(w.addr).await.send(req).await.status, 200);
    assert_eq!(origin.count(), 1);
}
