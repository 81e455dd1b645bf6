//! Destination names resolve through the worker's in-process resolver, and
//! an answer is kept for its record's TTL: no longer (a moved destination is
//! followed) and no shorter (no query per request). The DNS server is the
//! test's own, on loopback.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::util::*;

/// A DNS server; two origins on one port, at 127.0.0.1 and at `moved_to`;
/// an allocator and a worker that asks that server. Upstream connections
/// are kept per name, so the worker keeps none: each request connects to
/// what its name resolves to now.
struct Moving {
    dns: Dns,
    first: Origin,
    second: Origin,
    port: u16,
    _alloc: Allocator,
    worker: Worker,
}

impl Moving {
    async fn start(moved_to: [u8; 4]) -> Moving {
        let dns = Dns::start().await;
        let first = Origin::start().await;
        let port = first.addr.port();
        let second = Origin::start_on(SocketAddr::from((moved_to, port))).await;
        let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.3"]).await;
        let server = dns.addr.to_string();
        let worker = Worker::start(
            &alloc.socket,
            &["--dns-server", &server, "--upstream-idle-timeout", "0s"],
        )
        .await;
        Moving {
            dns,
            first,
            second,
            port,
            _alloc: alloc,
            worker,
        }
    }
}

impl Moving {
    /// `NAME.rotor.test` at the first origin for each (NAME, TTL), and a
    /// client connection to the worker.
    async fn serving(&self, names: &[(&str, u32)]) -> ProxyConn {
        for (name, ttl) in names {
            self.dns.set(
                &format!("{name}.rotor.test"),
                Ipv4Addr::new(127, 0, 0, 1),
                *ttl,
            );
        }
        ProxyConn::open(self.worker.addr).await
    }

    fn url(&self, name: &str) -> String {
        format!("http://{name}.rotor.test:{}/", self.port)
    }
}

#[tokio::test]
async fn answers_are_kept_for_their_ttl_and_then_asked_again() {
    let m = Moving::start([127, 0, 0, 20]).await;
    // (3 s: the three requests fit in it on a loaded machine)
    let mut conn = m.serving(&[("short", 3), ("long", 3600)]).await;
    for name in ["short", "long"] {
        for _ in 0..3 {
            let r = conn.get(&m.url(name)).await;
            assert_eq!(r.status, 200, "{name}");
        }
    }
    assert_eq!(m.first.count(), 6);
    assert_eq!(
        m.dns.queries_for("short.rotor.test"),
        1,
        "asked per request"
    );
    assert_eq!(m.dns.queries_for("long.rotor.test"), 1, "asked per request");

    // Both names move; only the one whose TTL ran out is followed.
    m.dns
        .set("short.rotor.test", Ipv4Addr::new(127, 0, 0, 20), 3);
    m.dns
        .set("long.rotor.test", Ipv4Addr::new(127, 0, 0, 20), 3600);
    tokio::time::sleep(Duration::from_millis(4200)).await;
    for name in ["short", "long"] {
        let r = conn.get(&m.url(name)).await;
        assert_eq!(r.status, 200, "{name}");
    }
    assert_eq!(
        m.second.count(),
        1,
        "the moved short-TTL name was not followed"
    );
    assert_eq!(
        m.first.count(),
        7,
        "the long-TTL name was asked again early"
    );
    assert_eq!(m.dns.queries_for("short.rotor.test"), 2);
    assert_eq!(m.dns.queries_for("long.rotor.test"), 1);
}

/// A server that never answers AAAA queries costs a name a moment, not
/// the resolver's timeout (5 s a try) or a 504; the answer is asked for
/// again soon (its AAAA may have been lost once), unlike a name that has
/// no AAAA records, which keeps its answer for the records' time.
#[tokio::test]
async fn a_server_that_drops_aaaa_queries_costs_a_moment() {
    let m = Moving::start([127, 0, 0, 20]).await;
    let mut conn = m.serving(&[("v4only", 3600), ("dropped", 3600)]).await;
    let url = |name: &str| m.url(name);
    assert_eq!(conn.get(&url("v4only")).await.status, 200);
    m.dns
        .silent_aaaa
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let started = std::time::Instant::now();
    let r = conn.get(&url("dropped")).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for name in ["v4only", "dropped"] {
        assert_eq!(conn.get(&url(name)).await.status, 200);
    }
    assert_eq!(
        m.dns.queries_for("v4only.rotor.test"),
        1,
        "no AAAA records: kept"
    );
    assert_eq!(m.first.count(), 4);
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

/// A DNS server that answers SERVFAIL (its upstream failed), or one that
/// cannot be reached (nothing on its port): a 504 `dns_timeout`, as
/// `--resolver system` answers the C library's temporary failure, which
/// covers both; not a 502 saying the name cannot be resolved.
#[tokio::test]
async fn a_failing_dns_server_is_a_dns_timeout() {
    let dns = Dns::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let server = dns.addr.to_string();
    // Its log at the default level, where the failing server is said.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let cmd = logging_to(WORKER, &log);
    let mut args = ALLOW_LOOPBACK.to_vec();
    args.extend_from_slice(&["--dns-server", &server]);
    let worker = Worker::start_cmd(cmd, &alloc.socket, free_port(), &args).await;
    for _ in 0..3 {
        let r = get(worker.addr, "http://servfail.rotor.test/").await;
        assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
        assert!(
            r.proxy_status().contains("dns_timeout"),
            "{}",
            r.proxy_status()
        );
    }
    // Said once in 10 s, not at each request.
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches("as name resolution failed").count(),
        1,
        "{text}"
    );
    let closed = format!("127.0.0.1:{}", free_port());
    let worker = Worker::start(&alloc.socket, &["--dns-server", &closed]).await;
    let r = get(worker.addr, "http://nowhere.rotor.test/").await;
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        r.proxy_status().contains("dns_timeout"),
        "{}",
        r.proxy_status()
    );
}

/// `--resolver system` where no DNS server answers: the C library's
/// temporary failure (`EAI_AGAIN`) is a 504 `dns_timeout`, as the DNS
/// resolver's timeout is, not a 502 saying the name has no address. The
/// worker runs in a mount namespace of its own whose resolv.conf names a
/// loopback port nothing listens on (no query leaves the machine).
#[tokio::test]
async fn the_system_resolvers_temporary_failure_is_a_dns_timeout() {
    let test = "the_system_resolvers_temporary_failure_is_a_dns_timeout";
    if !have(test, &["ss", "unshare"]) || !root(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rc = dir.path().join("resolv.conf");
    // glibc takes no port: the namespace's own resolv.conf names
    // 127.0.0.1 (port 53), refused on loopback here.
    let listening = std::process::Command::new("ss")
        .args(["-lunH", "sport = :53"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("127.0.0.1:53"))
        .unwrap_or(true);
    if listening {
        skip("a DNS server listens on 127.0.0.1:53 here");
        return;
    }
    std::fs::write(&rc, "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n").unwrap();
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let mut cmd = std::process::Command::new("unshare");
    cmd.args([
        "-m",
        "--",
        "sh",
        "-c",
        &format!(
            "mount --bind {} /etc/resolv.conf && exec {WORKER} \"$@\"",
            rc.display()
        ),
        "sh",
    ]);
    let worker = Worker::start_cmd(
        cmd,
        &alloc.socket,
        free_port(),
        &["--resolver", "system", "--allow-destination", "127.0.0.0/8"],
    )
    .await;
    let r = get(worker.addr, "http://nowhere.rotor.test/").await;
    assert_eq!(r.status, 504, "{}", r.proxy_status());
    assert!(
        r.proxy_status().contains("dns_timeout"),
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
    let m = Moving::start([127, 0, 0, 21]).await;
    m.dns
        .set("moved.rotor.test", Ipv4Addr::new(127, 0, 0, 1), 3600);
    let url = format!("http://moved.rotor.test:{}/", m.port);
    assert_eq!(get(m.worker.addr, &url).await.status, 200);
    assert_eq!(m.first.count(), 1);
    m.dns
        .set("moved.rotor.test", Ipv4Addr::new(127, 0, 0, 21), 3600);
    assert_eq!(get(m.worker.addr, &url).await.status, 200);
    assert_eq!(m.second.count(), 0, "followed before its TTL ran out");
    m.worker.proc.signal(nix::sys::signal::Signal::SIGHUP);
    eventually("the moved name followed after SIGHUP", || async {
        get(m.worker.addr, &url).await.status == 200 && m.second.count() > 0
    })
    .await;
    assert_eq!(m.dns.queries_for("moved.rotor.test"), 2);
}

/// `localhost` is what /etc/hosts says it is, as the C library has it: with
/// only `127.0.0.1 localhost` there, `--allow-destination 127.0.0.0/8`
/// suffices (the resolver added `::1`, and the request got 403).
#[tokio::test]
async fn localhost_resolves_as_the_hosts_file_says() {
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let v6_localhost = hosts.lines().any(|l| {
        let mut w = l.split('#').next().unwrap_or("").split_whitespace();
        w.next().is_some_and(|ip| ip.contains(':')) && w.any(|n| n == "localhost")
    });
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start_exactly(
        &alloc.socket,
        free_port(),
        &["--allow-destination", "127.0.0.0/8"],
    )
    .await;
    let url = format!("http://localhost:{}/", origin.addr.port());
    let r = get(worker.addr, &url).await;
    match v6_localhost {
        false => assert_eq!(r.status, 200, "{:?}", r.body),
        // The file says ::1 too: it is refused, as the rules say.
        true => assert_eq!(r.status, 403, "{:?}", r.body),
    }
}

/// An IPv4-mapped literal (`[::ffff:127.0.0.1]`) is the IPv4 address: an
/// IPv4 pool serves it, from its leased address (before, the IPv6 form
/// asked for an IPv6 address and got 503).
#[tokio::test]
async fn an_ipv4_mapped_literal_is_its_ipv4_address() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    let url = format!("http://[::ffff:127.0.0.1]:{}/", origin.addr.port());
    let r = get(worker.addr, &url).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        origin.sources(),
        ["127.0.0.2".parse::<std::net::IpAddr>().unwrap()]
    );
    let (code, _) = connect_tunnel(
        worker.addr,
        &format!("[::ffff:127.0.0.1]:{}", origin.addr.port()),
    )
    .await;
    assert_eq!(code, 200);
}

/// A dual-stack name whose A answer comes well after its AAAA one, asked
/// of an IPv4 pool: the AAAA alone (all that came within the moment the
/// other family is given) leaves the pool nothing to lease, so the name
/// is looked up again with both families waited for, and served. (It was
/// a 503 "no IPv6 address" on every request while the answer was kept.)
#[tokio::test]
async fn a_late_family_the_pool_needs_is_waited_for() {
    let m = Moving::start([127, 0, 0, 20]).await;
    m.dns
        .set("late.rotor.test", Ipv4Addr::new(127, 0, 0, 1), 300);
    m.dns.set_v6("late.rotor.test", "::1".parse().unwrap(), 300);
    m.dns
        .slow_a_ms
        .store(400, std::sync::atomic::Ordering::Relaxed);
    let mut conn = ProxyConn::open(m.worker.addr).await;
    for _ in 0..3 {
        let r = conn.get(&m.url("late")).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    assert_eq!(m.first.count(), 3);
}
