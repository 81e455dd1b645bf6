//! Destination names resolve through the worker's in-process resolver, and
//! an answer is kept for its record's TTL: no longer (a moved destination is
//! followed) and no shorter (no query per request). The DNS server is the
//! test's own, on loopback.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::util::*;

#[tokio::test]
async fn answers_are_kept_for_their_ttl_and_then_asked_again() {
    let dns = Dns::start().await;
    // Two origins on one port, on two loopback addresses.
    let first = Origin::start().await;
    let port = first.addr.port();
    let second = Origin::start_on(SocketAddr::from(([127, 0, 0, 20], port))).await;
    dns.set("short.rotor.test", Ipv4Addr::new(127, 0, 0, 1), 1);
    dns.set("long.rotor.test", Ipv4Addr::new(127, 0, 0, 1), 3600);
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.3"]).await;
    let server = dns.addr.to_string();
    // Upstream connections are kept per name: none kept, so each request
    // connects to what the name resolves to now.
    let worker = Worker::start(
        &alloc.socket,
        &["--dns-server", &server, "--upstream-idle-timeout", "0s"],
    )
    .await;
    let mut conn = ProxyConn::open(worker.addr).await;
    for name in ["short", "long"] {
        for _ in 0..3 {
            let r = conn.get(&format!("http://{name}.rotor.test:{port}/")).await;
            assert_eq!(r.status, 200, "{name}");
        }
    }
    assert_eq!(first.count(), 6);
    assert_eq!(dns.queries_for("short.rotor.test"), 1, "asked per request");
    assert_eq!(dns.queries_for("long.rotor.test"), 1, "asked per request");

    // Both names move; only the one whose TTL ran out is followed.
    dns.set("short.rotor.test", Ipv4Addr::new(127, 0, 0, 20), 1);
    dns.set("long.rotor.test", Ipv4Addr::new(127, 0, 0, 20), 3600);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    for name in ["short", "long"] {
        let r = conn.get(&format!("http://{name}.rotor.test:{port}/")).await;
        assert_eq!(r.status, 200, "{name}");
    }
    assert_eq!(
        second.count(),
        1,
        "the moved short-TTL name was not followed"
    );
    assert_eq!(first.count(), 7, "the long-TTL name was asked again early");
    assert_eq!(dns.queries_for("short.rotor.test"), 2);
    assert_eq!(dns.queries_for("long.rotor.test"), 1);
}

#[tokio::test]
async fn a_name_that_does_not_exist_is_a_clear_502() {
    let dns = Dns::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let server = dns.addr.to_string();
    let worker = Worker::start(&alloc.socket, &["--dns-server", &server]).await;
    let r = get(worker.addr, "http://nowhere.rotor.test/").await;
    assert_eq!(r.status, 502);
    assert!(
        r.proxy_status().contains("dns_error"),
        "{}",
        r.proxy_status()
    );
}

#[tokio::test]
async fn hosts_file_names_need_no_server() {
    // No server answers on this port: `localhost` must come from /etc/hosts.
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &["--dns-server", "127.0.0.1:9"]).await;
    let r = get(
        worker.addr,
        &format!("http://localhost:{}/", origin.addr.port()),
    )
    .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn sighup_drops_cached_answers() {
    let dns = Dns::start().await;
    let first = Origin::start().await;
    let port = first.addr.port();
    let second = Origin::start_on(SocketAddr::from(([127, 0, 0, 21], port))).await;
    dns.set("moved.rotor.test", Ipv4Addr::new(127, 0, 0, 1), 3600);
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let server = dns.addr.to_string();
    let worker = Worker::start(
        &alloc.socket,
        &["--dns-server", &server, "--upstream-idle-timeout", "0s"],
    )
    .await;
    let url = format!("http://moved.rotor.test:{port}/");
    assert_eq!(get(worker.addr, &url).await.status, 200);
    assert_eq!(first.count(), 1);
    dns.set("moved.rotor.test", Ipv4Addr::new(127, 0, 0, 21), 3600);
    assert_eq!(get(worker.addr, &url).await.status, 200);
    assert_eq!(second.count(), 0, "followed before its TTL ran out");
    worker.proc.signal(nix::sys::signal::Signal::SIGHUP);
    eventually("the moved name followed after SIGHUP", || async {
        get(worker.addr, &url).await.status == 200 && second.count() > 0
    })
    .await;
    assert_eq!(dns.queries_for("moved.rotor.test"), 2);
}
