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

    let open = Worker::start_exactly(
        &alloc.socket,
        free_port(),
        &["--allow-destination", "127.0.0.1/32"],
    )
    .await;
    assert_eq!(get(open.addr, &origin.url("/")).await.status, 200);
    assert_eq!(origin.count(), 1);
}
