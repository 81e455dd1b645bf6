//! Workers lease from the allocator's shared lease table: no round trip per
//! request, one rotation for all of them, and a stopped allocator does not
//! stop requests. A pool that outgrows the table moves everyone to a bigger
//! one without a skip.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::util::*;

/// The allocator is stopped (SIGSTOP) until this is dropped.
struct Stopped<'a>(&'a Allocator);

impl<'a> Stopped<'a> {
    fn new(alloc: &'a Allocator) -> Stopped<'a> {
        alloc.proc.signal(Signal::SIGSTOP);
        Stopped(alloc)
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.0.proc.signal(Signal::SIGCONT);
    }
}

/// `n` requests, each served: a lease that needed the stopped allocator
/// would wait for it (the lease timeout) and be answered 503.
async fn serve_all(workers: &[&Worker], origin: &Origin, n: usize) {
    for i in 0..n {
        let proxy = workers[i % workers.len()].addr;
        let r = tokio::time::timeout(PATIENCE, get(proxy, &origin.url("/")))
            .await
            .expect("a request waited for the stopped allocator");
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
}

/// An allocator of 127.0.0.2–9 whose lease table is there: the socket is
/// bound (and connectable) a moment before the table is made.
async fn allocator_with_table() -> Allocator {
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.9"]).await;
    let table = rotor_allocator::server::table_path_for(&alloc.socket).unwrap();
    eventually("the lease table file", || {
        let table = table.clone();
        async move { table.exists() }
    })
    .await;
    alloc
}

/// A worker that has served nothing yet when the allocator stops leases
/// from the table all the same: it asked for a copy of the pool when it
/// mapped the table. (It fetched one only with its first table lease, so
/// without the allocator it leased over the socket, and waited.)
#[tokio::test]
async fn a_worker_that_served_nothing_leases_from_the_table_without_the_allocator() {
    let origin = Origin::start().await;
    let alloc = allocator_with_table().await;
    let w = Worker::start(&alloc.socket, &["--lease-timeout", "10s"]).await;
    mapped(&[&w]).await;
    let _stopped = Stopped::new(&alloc);
    serve_all(&[&w], &origin, 8).await;
    assert_eq!(origin.sources(), ips(2..=9));
}

#[tokio::test]
async fn workers_keep_rotating_from_the_table_while_the_allocator_is_stopped() {
    let origin = Origin::start().await;
    let alloc = allocator_with_table().await;
    let w1 = Worker::start(&alloc.socket, &["--lease-timeout", "10s"]).await;
    let w2 = Worker::start(&alloc.socket, &["--lease-timeout", "10s"]).await;
    serve_all(&[&w1, &w2], &origin, 2).await;
    // The table is asked for right after the handshake (a sleep of 300 ms
    // was once not enough in a full test run on the two loaded cores).
    mapped(&[&w1, &w2]).await;
    {
        let _stopped = Stopped::new(&alloc);
        serve_all(&[&w1, &w2], &origin, 18).await;
    }
    let want: Vec<IpAddr> = ips(2..=9).into_iter().cycle().take(20).collect();
    assert_eq!(origin.sources(), want);
    // The allocator counts what the workers took from the table.
    let status = status_json(&alloc.socket);
    assert_eq!(status["leases_total"].as_u64(), Some(20));
    let per: Vec<u64> = status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["role"] == "Worker")
        .map(|p| p["leases"].as_u64().unwrap())
        .collect();
    assert_eq!(per, [10, 10]);
}

/// The same when the pool changed just before the allocator stopped: the
/// workers have no copy of the new pool to check table leases against,
/// and cannot ask for one. They wait for it a moment, once, and lease from
/// the table unchecked (before, every request waited for the copy, then
/// for a lease over the socket, and got 503 after twice the lease
/// timeout, the next ones queued behind it); they ask again without a
/// request waiting.
#[tokio::test]
async fn a_pool_changed_just_before_the_allocator_stopped_delays_nothing() {
    let origin = Origin::start().await;
    let alloc = allocator_with_table().await;
    let w1 = Worker::start(&alloc.socket, &[]).await;
    let w2 = Worker::start(&alloc.socket, &[]).await;
    serve_all(&[&w1, &w2], &origin, 2).await;
    mapped(&[&w1, &w2]).await;
    // A new generation, then the allocator stops before anyone asks.
    rotor_control("quarantine", &alloc.socket, &["127.0.0.9"]);
    let _stopped = Stopped::new(&alloc);
    let started = std::time::Instant::now();
    let mut sources = Vec::new();
    let mut waited = Vec::new();
    // Over four seconds: past several of the workers' one-second pauses
    // between asks.
    for i in 0..24 {
        let proxy = [&w1, &w2][i % 2].addr;
        let one = std::time::Instant::now();
        let r = tokio::time::timeout(PATIENCE, get(proxy, &origin.url("/")))
            .await
            .expect("a request waited for the stopped allocator");
        assert_eq!(r.status, 200, "request {i}: {:?}", r.body);
        if one.elapsed() >= Duration::from_millis(400) {
            waited.push((i, one.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Half a second a worker, once, not two lease timeouts a request
    // (which made 12 requests take 24 s and more, and fail), nor half a
    // second each time a worker asked again (every second and a half).
    assert!(waited.len() <= 2, "{waited:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    sources.extend(origin.sources()[2..].iter().copied());
    assert!(
        !sources.contains(&"127.0.0.9".parse::<IpAddr>().unwrap()),
        "{sources:?}"
    );
}

#[tokio::test]
async fn a_pool_that_outgrows_the_table_moves_workers_to_a_bigger_one() {
    let origin = Origin::start().await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let file = dir.path().join("pool.txt");
    std::fs::write(&file, "127.0.0.2-127.0.0.9\n").unwrap();
    let alloc = Allocator::start_in(dir, &["--pool-file", file.to_str().unwrap()]).await;
    let worker = Worker::start(&alloc.socket, &["--lease-timeout", "10s"]).await;
    serve_all(&[&worker], &origin, 3).await;

    // 200 addresses: more than a first table holds.
    std::fs::write(&file, "127.0.1.1-127.0.1.200\n").unwrap();
    rotor_control("reload", &alloc.socket, &[]);
    serve_all(&[&worker], &origin, 4).await;
    let table = rotor_allocator::server::table_path_for(&alloc.socket).unwrap();
    mapped_current(&[&worker], &table).await;
    {
        let _stopped = Stopped::new(&alloc);
        serve_all(&[&worker], &origin, 4).await;
    }
    // The address due next (127.0.0.5) is gone, so the rotation goes on
    // from the same place (index 3) in the new pool.
    let new = |i: u8| IpAddr::V4(Ipv4Addr::new(127, 0, 1, i));
    let want: Vec<IpAddr> = ips(2..=4).into_iter().chain((4..=11).map(new)).collect();
    assert_eq!(origin.sources(), want);
    assert_eq!(
        status_json(&alloc.socket)["leases_total"].as_u64(),
        Some(11)
    );
}

#[tokio::test]
async fn a_graceful_stop_removes_the_table_and_workers_wait_for_the_next_allocator() {
    let origin = Origin::start().await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut alloc = Allocator::start_in(dir.clone(), &["--pool", "127.0.0.2-127.0.0.3"]).await;
    let table = rotor_allocator::server::table_path_for(&alloc.socket).unwrap();
    let worker = Worker::start(&alloc.socket, &["--lease-timeout", "10s"]).await;
    serve_all(&[&worker], &origin, 1).await;
    alloc.proc.signal(Signal::SIGTERM);
    assert!(alloc.proc.wait(PATIENCE).success());
    assert!(!table.exists(), "the table outlived its allocator");
    let url = origin.url("/");
    let waiting = tokio::spawn(async move { get(worker.addr, &url).await.status });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a lease came from a closed table");
    let _alloc = Allocator::start_in(dir, &["--pool", "127.0.0.2-127.0.0.3"]).await;
    assert_eq!(waiting.await.unwrap(), 200);
    // The rotation went on where the stopped allocator left it.
    assert_eq!(origin.sources(), ips(2..=3));
}

#[tokio::test]
async fn a_worker_that_may_not_map_the_table_leases_over_the_socket_in_the_same_rotation() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !root("a_worker_that_may_not_map_the_table_leases_over_the_socket") {
        return;
    }
    let origin = Origin::start().await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // Per-user rules: the table is the allocator user's alone.
    let alloc = Allocator::start_in(
        dir,
        &[
            "--pool",
            "127.0.0.2-127.0.0.9",
            "--socket-mode",
            "666",
            "--allow-uid",
            "nobody",
        ],
    )
    .await;
    let table = rotor_allocator::server::table_path_for(&alloc.socket).unwrap();
    let mode = std::fs::metadata(&table).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let root = Worker::start(&alloc.socket, &[]).await;
    // A worker running as `nobody`: allowed on the socket, not to the table.
    let mut cmd = std::process::Command::new(WORKER);
    cmd.uid(65534).gid(65534);
    let nobody = Worker::start_cmd(cmd, &alloc.socket, free_port(), &ALLOW_LOOPBACK).await;
    for i in 0..16 {
        let proxy = if i % 2 == 0 { root.addr } else { nobody.addr };
        assert_eq!(get(proxy, &origin.url("/")).await.status, 200);
    }
    let want: Vec<IpAddr> = ips(2..=9).into_iter().cycle().take(16).collect();
    assert_eq!(origin.sources(), want);
}

/// The words of the table file at `path`.
fn table_words(path: &std::path::Path) -> Vec<u64> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(8)
        .map(|w| u64::from_ne_bytes(w.try_into().unwrap()))
        .collect()
}

fn write_word(path: &std::path::Path, i: usize, value: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&value.to_ne_bytes(), (i * 8) as u64)
        .unwrap();
}

/// Whoever can write the table's file can rewrite it: an address changed
/// to the host's own is never bound (workers check leases against the pool
/// the allocator describes), a table closed by someone else does not stop
/// requests, and the allocator replaces a tampered table within seconds.
#[tokio::test]
async fn a_tampered_lease_table_is_not_trusted_and_is_replaced() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.4"]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    serve_all(&[&worker], &origin, 3).await;
    let path = alloc.socket.with_file_name("allocator.sock.leases");
    let id = |p: &std::path::Path| table_words(p)[4];
    // Waits for the allocator to put a new table (another id) in place of
    // the one whose id was `before`.
    let replaced = |what: &'static str, before: u64| {
        let path = path.clone();
        async move {
            eventually(what, || {
                let p = path.clone();
                async move { id(&p) != before }
            })
            .await
        }
    };
    let first = id(&path);
    // Every entry of 127.0.0.2 (family word 4, then 0, then the address)
    // now says 127.0.0.1.
    let words = table_words(&path);
    let mut rewritten = 0;
    for i in 0..words.len() - 2 {
        if words[i] == 4 && words[i + 1] == 0 && words[i + 2] == 0x7f00_0002 {
            write_word(&path, i + 2, 0x7f00_0001);
            rewritten += 1;
        }
    }
    assert!(rewritten > 0, "no entry found to rewrite");
    // Its lease sequence too (word 9): the new table's is the old one's at
    // its last sound check, not what was written (which went on into
    // `rotor_leases_total` and the saved state).
    const SEQ: usize = 9;
    write_word(&path, SEQ, 5 * 10u64.pow(17));
    serve_all(&[&worker], &origin, 30).await;
    let own: IpAddr = Ipv4Addr::new(127, 0, 0, 1).into();
    assert!(
        !origin.sources().contains(&own),
        "a request left from 127.0.0.1"
    );
    replaced("the allocator replaces the table", first).await;
    assert!(
        table_words(&path)[SEQ] < 1000,
        "{}",
        table_words(&path)[SEQ]
    );
    // The closed bit, set by someone else: requests go on, and a new table
    // comes.
    let second = id(&path);
    let state = table_words(&path)[8];
    write_word(&path, 8, state | 1 << 63);
    serve_all(&[&worker], &origin, 10).await;
    replaced("the allocator replaces the closed table", second).await;
    serve_all(&[&worker], &origin, 10).await;
    // The IPv6 state made to name the other half (its tag's low bit, bit
    // 44): noticed too, and replaced.
    let third = id(&path);
    let v6_state = table_words(&path)[10];
    write_word(&path, 10, v6_state ^ 1 << 44);
    replaced(
        "the allocator replaces a table whose states disagree",
        third,
    )
    .await;
    serve_all(&[&worker], &origin, 10).await;
    // The header's capacity doubled and the file grown to match: a worker
    // mapping it afresh would take that layout and lease from entries no
    // one writes or checks. Noticed, and replaced.
    let fourth = id(&path);
    let capacity = table_words(&path)[2];
    write_word(&path, 2, capacity * 2);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len * 2)
        .unwrap();
    replaced("the allocator replaces a table with another layout", fourth).await;
    serve_all(&[&worker], &origin, 10).await;
    // The sequence alone, sent far on: noticed, and replaced.
    let fifth = id(&path);
    write_word(&path, SEQ, 1 << 60);
    replaced("the allocator replaces a table whose sequence leapt", fifth).await;
    assert!(
        table_words(&path)[SEQ] < 1000,
        "{}",
        table_words(&path)[SEQ]
    );
    serve_all(&[&worker], &origin, 10).await;
    assert!(!origin.sources().contains(&own));
}

/// A table file cut short under the processes that map it (to nothing;
/// inside its first page, which then reads as zeros past the cut, an
/// empty pool whose refusals are asked again over the socket; past its
/// states, so a lease reads a sound state and then faults on an entry; or
/// by a few bytes, so no page faults at all) crashes none of them: without the guard every worker and the allocator died of SIGBUS.
/// Requests go on over the socket, the allocator replaces the table (it
/// sees the file's size), and workers lease from the new one.
#[tokio::test]
async fn a_lease_table_cut_short_crashes_no_one_and_is_replaced() {
    let origin = Origin::start().await;
    let mut alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.9"]).await;
    let mut w1 = Worker::start(&alloc.socket, &[]).await;
    let mut w2 = Worker::start(&alloc.socket, &[]).await;
    serve_all(&[&w1, &w2], &origin, 8).await;
    // Both map the table right after their handshake.
    mapped(&[&w1, &w2]).await;
    let path = alloc.socket.with_file_name("allocator.sock.leases");
    let full = std::fs::metadata(&path).unwrap().len();
    for cut in [0, 100, 16_384, full - 8] {
        let before = table_words(&path)[4];
        let (p1, p2) = (w1.addr, w2.addr);
        let url = origin.url("/");
        // Requests in flight while the file is cut.
        let load = tokio::spawn(async move {
            for i in 0..200 {
                let proxy = if i % 2 == 0 { p1 } else { p2 };
                let r = tokio::time::timeout(PATIENCE, get(proxy, &url))
                    .await
                    .expect("a request hung");
                assert_eq!(r.status, 200, "request {i}: {:?}", r.body);
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(cut)
            .unwrap();
        load.await.unwrap();
        serve_all(&[&w1, &w2], &origin, 20).await;
        assert!(alloc.proc.is_running(), "the allocator died (cut to {cut})");
        assert!(w1.proc.is_running(), "a worker died (cut to {cut})");
        assert!(w2.proc.is_running(), "a worker died (cut to {cut})");
        let p = path.clone();
        eventually("a whole new table", || {
            let p = p.clone();
            async move {
                std::fs::metadata(&p).is_ok_and(|m| m.len() == full) && table_words(&p)[4] != before
            }
        })
        .await;
    }
    // Workers lease from the new table again (each finds the old one
    // closed at its next lease, and asks for the new one): a stopped
    // allocator does not stop them.
    serve_all(&[&w1, &w2], &origin, 8).await;
    mapped_current(&[&w1, &w2], &path).await;
    {
        let _stopped = Stopped::new(&alloc);
        serve_all(&[&w1, &w2], &origin, 16).await;
    }
    let pool = ips(2..=9);
    assert!(origin.sources().iter().all(|ip| pool.contains(ip)));
}

/// An IPv6 pool asked for a dual-stack name (its A listed first) is asked
/// for IPv4 first: the table's "no IPv4 address" is answered at once, not
/// asked again over the socket (a round trip a request, and a 503 while
/// the allocator is stopped).
#[tokio::test]
async fn a_family_the_pool_lacks_is_refused_by_the_table_without_the_allocator() {
    let origin = Origin::start_on("[::1]:0".parse().unwrap()).await;
    let port = origin.addr.port();
    let dns = Dns::start().await;
    dns.set("dual.test", "127.0.0.1".parse().unwrap(), 300);
    dns.set_v6("dual.test", "::1".parse().unwrap(), 300);
    let alloc = Allocator::start(&["--pool", "::1"]).await;
    let server = dns.addr.to_string();
    let w = Worker::start(&alloc.socket, &["--dns-server", &server]).await;
    let url = format!("http://dual.test:{port}/");
    assert_eq!(get(w.addr, &url).await.status, 200);
    mapped(&[&w]).await;
    let _stopped = Stopped::new(&alloc);
    for _ in 0..3 {
        let r = tokio::time::timeout(PATIENCE, get(w.addr, &url))
            .await
            .expect("a request waited for the stopped allocator");
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
}

/// A worker older than the order (its Hello says minor 10, before the
/// key; 11, before each prefix's own order) is not handed the lease
/// table: it would lease the table's prefixes in another order on the
/// shared cursor. It leases over the socket; a worker of minor 18 is
/// handed the table, whose header carries the key and the order.
#[tokio::test]
async fn a_worker_older_than_the_order_is_not_handed_the_table() {
    use rotor_protocol::{
        client_handshake, Channel, ClientChannel, ClientFrame, Envelope, Hello, Request, Response,
        Role, ServerFrame,
    };
    let alloc = allocator_with_table().await;
    let attach = |minor: u16| {
        let socket = alloc.socket.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
            let mut chan: ClientChannel<tokio::net::UnixStream> = Channel::new(stream);
            let mut hello = Hello::new(Role::Worker, "e2e");
            hello.minor = minor;
            client_handshake(&mut chan, hello).await.unwrap();
            chan.send(&ClientFrame::Request(Envelope {
                id: 1,
                body: Request::Attach,
            }))
            .await
            .unwrap();
            match chan.recv().await.unwrap() {
                Some(ServerFrame::Response(env)) => env.body,
                other => panic!("{other:?}"),
            }
        }
    };
    for older in [
        10,
        rotor_protocol::MINOR_ORDER_KEY,
        rotor_protocol::MINOR_PREFIX_ORDER - 1,
    ] {
        match attach(older).await {
            Response::Error { message } => assert!(message.contains("older than"), "{message}"),
            other => panic!("a table for an older worker: {other:?}"),
        }
    }
    match attach(rotor_protocol::MINOR_PREFIX_ORDER).await {
        Response::Attached { path, id, .. } => {
            let table =
                rotor_protocol::LeaseTable::open(std::path::Path::new(&path), Some(id)).unwrap();
            assert_ne!(table.order().key, [0; 4]);
            assert!(table.order().by_prefix);
        }
        other => panic!("no table for a current worker: {other:?}"),
    }
}
