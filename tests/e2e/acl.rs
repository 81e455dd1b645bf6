//! The destination rules, end to end. Only loopback is used: a refused
//! request must reach nobody, and no test sends anything to a private,
//! link-local or public address.

use crate::util::*;

#[tokio::test]
async fn loopback_destinations_are_refused_by_default_before_any_lease() {
    let origin = Origin::start().await;
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.3"]).await;
    let worker = Worker::start_exactly(&alloc.socket, free_port(), &[]).await;

    let r = get(worker.addr, &origin.url("/")).await;
    assert_eq!(r.status, 403);
    assert!(
        r.proxy_status().contains("error=destination_ip_prohibited"),
        "{}",
        r.proxy_status()
    );
    // A name that resolves to loopback (from /etc/hosts: no DNS query).
    let r = get(
        worker.addr,
        &format!("http://localhost:{}/", origin.addr.port()),
    )
    .await;
    assert_eq!(r.status, 403);
    // The IPv4-mapped form of the same address.
    let r = get(
        worker.addr,
        &format!("http://[::ffff:127.0.0.1]:{}/", origin.addr.port()),
    )
    .await;
    assert_eq!(r.status, 403);
    let (code, _) = connect_tunnel(worker.addr, &echo.addr.to_string()).await;
    assert_eq!(code, 403);

    assert_eq!(origin.connections.lock().unwrap().len(), 0);
    assert!(echo.peers.lock().unwrap().is_empty());
    // No lease was taken for the refused requests.
    assert_eq!(status_json(&alloc.socket)["leases_total"], 0);
}

#[tokio::test]
async fn allowed_ranges_and_denied_ports() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let port = origin.addr.port().to_string();
    let worker = Worker::start_exactly(
        &alloc.socket,
        free_port(),
        &["--allow-destination", "127.0.0.1/32", "--deny-port", &port],
    )
    .await;
    let r = get(worker.addr, &origin.url("/")).await;
    assert_eq!(
        r.status, 403,
        "the port rule applies inside an allowed range"
    );
    assert!(String::from_utf8_lossy(&r.body).contains("port"));
    // Before any lookup: a name that does not resolve gets the same 403.
    let r = get(worker.addr, &format!("http://no-such-host.invalid:{port}/")).await;
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("port"));

    let open = Worker::start_exactly(
        &alloc.socket,
        free_port(),
        &["--allow-destination", "127.0.0.1/32"],
    )
    .await;
    assert_eq!(get(open.addr, &origin.url("/")).await.status, 200);
    assert_eq!(origin.count(), 1);
}

/// A request through the proxy to the proxy itself is a loop, refused
/// (403, `proxy_loop_detected`) whatever allows its address: the README's
/// `--allow-destination 127.0.0.0/8` for a local origin opens loopback,
/// not the worker's own listeners (HTTP, SOCKS5), which a CONNECT would
/// chain through again and again.
#[tokio::test]
async fn the_workers_own_listeners_are_a_loop_whatever_allows_them() {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let socks = free_port();
    let worker = Worker::start_exactly(
        &alloc.socket,
        free_port(),
        &[
            "--allow-destination",
            "127.0.0.0/8",
            "--socks-listen",
            &format!("127.0.0.1:{socks}"),
        ],
    )
    .await;
    for target in [worker.addr.to_string(), format!("127.0.0.1:{socks}")] {
        let mut s = TcpStream::connect(worker.addr).await.unwrap();
        let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let head = read_head(&mut s).await;
        assert!(
            head.starts_with("HTTP/1.1 403 Forwarding Loop\r\n"),
            "{head}"
        );
        assert!(head.contains("error=proxy_loop_detected"), "{head}");
    }
    let r = get(worker.addr, &format!("http://{}/", worker.addr)).await;
    assert_eq!(r.status, 403);
    assert!(
        r.proxy_status().contains("error=proxy_loop_detected"),
        "{}",
        r.proxy_status()
    );
    // The rest of loopback is open, as allowed.
    assert_eq!(get(worker.addr, &origin.url("/")).await.status, 200);
}

/// An address of a prefix routed to the host (`ip -6 route add local`, the
/// AnyIP set-up the README gives for a /64 pool) is this host's: a
/// connection to it reaches the host's own services (here, one listening
/// on every address, as sshd does). It is refused like an interface
/// address, though it does not bind without `IPV6_FREEBIND`. The prefix is
/// a global one, not documentation space (which the default rules deny on
/// their own), inside a namespace of the test's own with only `lo`.
#[test]
fn an_address_of_a_prefix_routed_to_the_host_is_refused() {
    in_netns(
        "an_address_of_a_prefix_routed_to_the_host_is_refused",
        &[
            "-6 route add local 2a0f:7777:1::/64 dev lo",
            "-6 addr add 2a0f:7777:2::1/128 dev lo nodad",
        ],
        || async {
            let service = Echo::start_on("[::]:0".parse().unwrap()).await;
            let port = service.addr.port();
            let alloc = Allocator::start(&["--pool", "2a0f:7777:1::/64"]).await;
            let worker = Worker::start_exactly(&alloc.socket, free_port(), &[]).await;
            for host in [
                "[2a0f:7777:1::abcd]",
                "[2a0f:7777:2::1]",
                "[::ffff:127.0.0.1]",
            ] {
                let (code, _) = connect_tunnel(worker.addr, &format!("{host}:{port}")).await;
                assert_eq!(code, 403, "CONNECT {host}");
                let r = get(worker.addr, &format!("http://{host}:{port}/")).await;
                assert_eq!(r.status, 403, "GET {host}: {:?}", r.body);
            }
            assert!(service.peers.lock().unwrap().is_empty());
            // An allow of a range holding it is for other hosts: refused
            // still. Allowed by itself, the same address is reached.
            let allowing = Worker::start_exactly(
                &alloc.socket,
                free_port(),
                &[
                    "--allow-destination",
                    "2a0f:7777::/32",
                    "--allow-destination",
                    "2a0f:7777:1::abcd",
                ],
            )
            .await;
            let (code, _) =
                connect_tunnel(allowing.addr, &format!("[2a0f:7777:1::abce]:{port}")).await;
            assert_eq!(code, 403);
            assert!(service.peers.lock().unwrap().is_empty());
            let (code, _) =
                connect_tunnel(allowing.addr, &format!("[2a0f:7777:1::abcd]:{port}")).await;
            assert_eq!(code, 200);
        },
    );
}

/// With `net.ipv4.ip_nonlocal_bind=1` (keepalived hosts set it) any
/// address binds: a destination is still judged by the routing table, so a
/// public address is not "an address of this host". In a namespace with
/// only `lo` it is unreachable (502), and nothing leaves the namespace.
#[test]
fn nonlocal_bind_does_not_make_every_destination_local() {
    in_netns(
        "nonlocal_bind_does_not_make_every_destination_local",
        &[],
        || async {
            std::fs::write("/proc/sys/net/ipv4/ip_nonlocal_bind", "1").unwrap();
            assert!(std::net::UdpSocket::bind("93.184.216.34:0").is_ok());
            let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
            let worker = Worker::start_exactly(&alloc.socket, free_port(), &[]).await;
            let r = get(worker.addr, "http://93.184.216.34:8080/").await;
            assert_eq!(r.status, 502, "{:?}", String::from_utf8_lossy(&r.body));
            assert!(
                r.proxy_status().contains("destination_ip_unroutable"),
                "{}",
                r.proxy_status()
            );
            let r = get(worker.addr, "http://127.0.0.1:8080/").await;
            assert_eq!(r.status, 403);
        },
    );
}
