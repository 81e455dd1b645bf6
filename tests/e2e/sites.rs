//! Site-aware rotation: per-site budgets (`--site-limit`) held by the
//! allocator for every worker, and cooldowns when a site pushes back (429,
//! 503 with Retry-After, statuses the operator counts), at a real origin.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::util::*;

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// The sources the origin saw from index `from` on.
fn sources_since(origin: &Origin, from: usize) -> Vec<IpAddr> {
    origin.sources()[from..].to_vec()
}

/// Whether `got` follows the cyclic order of `pool` from wherever it
/// starts.
fn in_rotation(got: &[IpAddr], pool: &[IpAddr]) -> bool {
    let Some(first) = got.first().and_then(|g| pool.iter().position(|p| p == g)) else {
        return got.is_empty();
    };
    got.iter()
        .enumerate()
        .all(|(k, g)| *g == pool[(first + k) % pool.len()])
}

/// The site's entry in `rotor status --json`, once it shows.
fn site_status(socket: &std::path::Path, site: &str) -> Option<serde_json::Value> {
    let st = status_json(socket);
    st["sites"]["shown"]
        .as_array()?
        .iter()
        .find(|s| s["site"] == site)
        .cloned()
}

/// The number `field` of `addr`'s entry for `site` in `rotor status`.
fn pair_field(socket: &std::path::Path, site: &str, addr: IpAddr, field: &str) -> Option<u64> {
    site_status(socket, site)?["addresses"]
        .as_array()?
        .iter()
        .find(|a| a["ip"] == addr.to_string())?[field]
        .as_u64()
}

/// Cooling milliseconds of `addr` for `site`, if it cools.
pub(crate) fn cooling_ms(socket: &std::path::Path, site: &str, addr: IpAddr) -> Option<u64> {
    pair_field(socket, site, addr, "cooling_ms")
}

/// Repeats (push-backs, or connects that failed) of `addr` for `site`
/// since they were last cleared; `None` if the site holds none for it.
pub(crate) fn strikes(socket: &std::path::Path, site: &str, addr: IpAddr) -> Option<u64> {
    pair_field(socket, site, addr, "pushbacks").filter(|n| *n > 0)
}

async fn wait_cooling(socket: &std::path::Path, site: &str, addr: IpAddr) -> u64 {
    let s = socket.to_path_buf();
    let site2 = site.to_string();
    eventually("the address cooling at the allocator", || {
        let (s, site2) = (s.clone(), site2.clone());
        async move { cooling_ms(&s, &site2, addr).is_some() }
    })
    .await;
    cooling_ms(socket, site, addr).unwrap()
}

#[tokio::test]
async fn budgets_hold_across_workers_and_rotation_stays_exact() {
    let origin = Origin::start().await;
    // Another site (another address of the origin host), without a budget.
    let other = Origin::start_on("127.0.0.11:0".parse().unwrap()).await;
    let pool = ips(2..=5);
    let alloc = Allocator::start(&[
        "--pool",
        "127.0.0.2-127.0.0.5",
        "--site-limit",
        // (8 s: the 20 requests and two status calls below, through
        // debug builds, fit in it on a loaded machine)
        "127.0.0.1=2/8s",
    ])
    .await;
    let w = [
        Worker::start(&alloc.socket, &[]).await,
        Worker::start(&alloc.socket, &[]).await,
    ];
    let url = origin.url("/");
    // Eight requests on several connections through both workers: every
    // address serves the site twice, in rotation order.
    let mut conns = [
        ProxyConn::open(w[0].addr).await,
        ProxyConn::open(w[1].addr).await,
    ];
    for i in 0..8 {
        let r = match i % 3 {
            2 => get(w[i % 2].addr, &url).await,
            _ => conns[i % 2].get(&url).await,
        };
        assert_eq!(r.status, 200, "request {i}");
    }
    let got = origin.sources();
    assert!(in_rotation(&got, &pool), "{got:?}");
    for a in &pool {
        assert_eq!(got.iter().filter(|g| *g == a).count(), 2, "{got:?}");
    }
    // The ninth, from either worker, is refused by rotor: nothing reaches
    // the site.
    let started = Instant::now();
    for worker in &w {
        let r = get(worker.addr, &url).await;
        assert_eq!(r.status, 429);
        let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=9).contains(&retry), "{retry}");
        let ps = r.proxy_status();
        assert!(
            ps.contains("error=http_request_denied") && ps.contains("site budget exhausted"),
            "{ps}"
        );
    }
    assert_eq!(origin.count(), 8);
    // A site without a budget keeps the shared rotation, exact.
    for _ in 0..8 {
        assert_eq!(get(w[0].addr, &other.url("/")).await.status, 200);
    }
    let shared = other.sources();
    assert!(in_rotation(&shared, &pool), "{shared:?}");
    // Status shows the budget used per address.
    let site = site_status(&alloc.socket, "127.0.0.1").expect("the site in status");
    assert_eq!(site["limit"]["count"], 2);
    for a in site["addresses"].as_array().unwrap() {
        assert_eq!((a["used"].as_u64(), a["left"].as_u64()), (Some(2), Some(0)));
    }
    let text = rotor_control("status", &alloc.socket, &[]);
    assert!(
        text.contains("127.0.0.1: budget 2/8s per address") && text.contains("used 2 left 0"),
        "{text}"
    );
    // The table's fill against its cap counts the site and its four
    // addresses together, as the cap does.
    assert!(
        text.contains("(4 address entries: 5 of 400000 entries, sites and addresses together)"),
        "{text}"
    );
    assert_eq!(status_json(&alloc.socket)["sites"]["entries"], 5);
    assert!(site_status(&alloc.socket, "127.0.0.11").is_none());
    // Once the window slid, the site is served again, in its rotation.
    tokio::time::sleep(Duration::from_secs(8).saturating_sub(started.elapsed())).await;
    eventually("budget back", || async {
        get(w[1].addr, &url).await.status == 200
    })
    .await;
    let after = sources_since(&origin, 8);
    assert_eq!(after.len(), 1);
}

#[tokio::test]
async fn a_request_waits_for_budget_up_to_budget_wait() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&[
        "--pool",
        "127.0.0.2-127.0.0.3",
        "--site-limit",
        // (a window of 3 s: the first three requests fit in it on a
        // loaded machine)
        "127.0.0.1=1/3s",
    ])
    .await;
    let waits = Worker::start(&alloc.socket, &["--budget-wait", "8s"]).await;
    let short = Worker::start(&alloc.socket, &["--budget-wait", "10ms"]).await;
    let url = origin.url("/");
    let t0 = Instant::now();
    for _ in 0..2 {
        assert_eq!(get(waits.addr, &url).await.status, 200);
    }
    // A wait longer than --budget-wait is not waited.
    let r = get(short.addr, &url).await;
    assert_eq!(r.status, 429);
    // One within it is: the third waits for the first address's window.
    assert_eq!(get(waits.addr, &url).await.status, 200);
    assert!(
        t0.elapsed() >= Duration::from_millis(2900),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(origin.sources(), vec![ip(2), ip(3), ip(2)]);
}

#[tokio::test]
async fn pushback_cools_only_that_address_for_that_site_for_as_long_as_said() {
    let origin = Origin::start().await;
    let other = Origin::start_on("127.0.0.12:0".parse().unwrap()).await;
    let pool = ips(2..=4);
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.4"]).await;
    let w = Worker::start(&alloc.socket, &[]).await;
    let site = "127.0.0.1";
    // A 429 with Retry-After: 8 (delay-seconds), passed to the client as is.
    // (8 s: the status poll and the nine requests below fit in it, through
    // debug builds, on a loaded machine.)
    let asked = Instant::now();
    let r = get(w.addr, &origin.url("/status/429/8")).await;
    assert_eq!((r.status, &r.body[..]), (429, &b"status"[..]));
    assert_eq!(r.headers["retry-after"], "8");
    assert!(
        r.headers.get("proxy-status").is_none(),
        "the site's own 429"
    );
    let cooled = origin.sources()[0];
    let ms = wait_cooling(&alloc.socket, site, cooled).await;
    // (What is left of the 8 s, and the time the request and the status
    // took: a loaded machine's slowness is not the allocator's.)
    let took = asked.elapsed().as_millis() as u64;
    assert!(
        ms <= 8000 && ms + took >= 7500,
        "{ms} ms left after {took} ms"
    );
    // Skipped for this site only.
    for _ in 0..6 {
        assert_eq!(get(w.addr, &origin.url("/")).await.status, 200);
    }
    let served = sources_since(&origin, 1);
    assert!(!served.contains(&cooled), "{served:?}");
    for _ in 0..3 {
        assert_eq!(get(w.addr, &other.url("/")).await.status, 200);
    }
    let shared = other.sources();
    assert!(
        shared.contains(&cooled) && in_rotation(&shared, &pool),
        "{shared:?}"
    );
    // And only for as long as it said.
    tokio::time::sleep(Duration::from_millis(8200)).await;
    let before = origin.count();
    for _ in 0..3 {
        assert_eq!(get(w.addr, &origin.url("/")).await.status, 200);
    }
    assert!(sources_since(&origin, before).contains(&cooled));

    // The HTTP-date form.
    let at = origin.count();
    let asked = Instant::now();
    assert_eq!(
        get(w.addr, &origin.url("/status/429/date/20")).await.status,
        429
    );
    let dated = origin.sources()[at];
    let ms = wait_cooling(&alloc.socket, site, dated).await;
    // (The date is whole seconds: 19 to 20 s from when it was made.)
    let took = asked.elapsed().as_millis() as u64;
    assert!(
        ms <= 20_000 && ms + took >= 18_500,
        "{ms} ms left after {took} ms"
    );
    // No Retry-After: 30 s, jittered by at most 20 %.
    let at = origin.count();
    assert_eq!(get(w.addr, &origin.url("/status/429")).await.status, 429);
    let bare = origin.sources()[at];
    assert_ne!(bare, dated);
    let ms = wait_cooling(&alloc.socket, site, bare).await;
    assert!((20_000..=36_000).contains(&ms), "{ms}");
    // Every address cooling: rotor answers 429 itself, with the earliest
    // Retry-After, and sends nothing.
    let at = origin.count();
    let r = get(w.addr, &origin.url("/status/503/12")).await;
    assert_eq!(r.status, 503);
    let last = origin.sources()[at];
    wait_cooling(&alloc.socket, site, last).await;
    let r = get(w.addr, &origin.url("/")).await;
    assert_eq!(r.status, 429);
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=12).contains(&retry), "{retry}");
    assert!(
        r.proxy_status().contains("cooling down for 127.0.0.1"),
        "{}",
        r.proxy_status()
    );
    assert_eq!(origin.count(), at + 1);
    // The other site is served all along.
    assert_eq!(get(w.addr, &other.url("/")).await.status, 200);
}

/// An address whose cooldown ended sends the site one request, its
/// probe, and the requests waiting for the site (`--budget-wait`) go only
/// once it is answered normally; pushed back again, the address cools
/// again and the next probe goes after that. Before, every waiting request
/// went to the site the moment the cooldown ended, into its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cooldown_ends_with_one_probe_not_every_waiting_request() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let w = Worker::start(&alloc.socket, &["--budget-wait", "6s"]).await;
    let many = |path: &'static str, n: usize| {
        let url = origin.url(path);
        let t0 = Instant::now();
        (0..n)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move {
                    let r = get(w.addr, &url).await;
                    (r.status, r.proxy_status(), t0.elapsed())
                })
            })
            .collect::<Vec<_>>()
    };
    // A site that keeps pushing back (a second each time): eight requests
    // waiting up to 6 s, and the site sees one a cooldown.
    assert_eq!(get(w.addr, &origin.url("/status/429/1")).await.status, 429);
    wait_cooling(&alloc.socket, "127.0.0.1", ip(2)).await;
    let before = origin.count();
    let mut got = Vec::new();
    for r in many("/status/429/1", 8) {
        got.push(r.await.unwrap());
    }
    let sent = origin.count() - before;
    let by_rotor = got
        .iter()
        .filter(|(s, p, _)| *s == 429 && !p.is_empty())
        .count();
    assert!((1..=6).contains(&sent), "{sent} sent: {got:?}");
    assert_eq!(sent + by_rotor, 8, "{got:?}");
    // It answers normally again (a slow page): the probe goes alone, the
    // rest once it is answered.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(w.addr, &origin.url("/status/429/1")).await.status, 429);
    wait_cooling(&alloc.socket, "127.0.0.1", ip(2)).await;
    let mut got = Vec::new();
    for r in many("/slow/700", 4) {
        got.push(r.await.unwrap());
    }
    assert!(got.iter().all(|(s, ..)| *s == 200), "{got:?}");
    let mut ends: Vec<Duration> = got.iter().map(|(.., at)| *at).collect();
    ends.sort();
    assert!(ends[1] >= ends[0] + Duration::from_millis(600), "{got:?}");
    assert!(
        ends[3] < ends[1] + Duration::from_millis(600),
        "the rest together: {got:?}"
    );
    // Any answer but a push-back ends it (a 404: the site served the
    // address), and a sticky session's request held by the probe goes as
    // soon as it is answered, not at the hold's end.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(w.addr, &origin.url("/status/429/1")).await.status, 429);
    wait_cooling(&alloc.socket, "127.0.0.1", ip(2)).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let session = |path: &str| {
        let req = hyper::Request::get(origin.url(path))
            .header("proxy-authorization", basic("u-session-s1", "pw"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        async move { ProxyConn::open(w.addr).await.send(req).await.status }
    };
    let t0 = Instant::now();
    let probe = tokio::spawn(session("/slow/300"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let held = tokio::spawn(session("/status/404"));
    assert_eq!(probe.await.unwrap(), 200);
    assert_eq!(held.await.unwrap(), 404);
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
    // A probe answered 404 frees the address as a 200 does.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(w.addr, &origin.url("/status/429/1")).await.status, 429);
    wait_cooling(&alloc.socket, "127.0.0.1", ip(2)).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(w.addr, &origin.url("/status/404")).await.status, 404);
    let t0 = Instant::now();
    let r = get(w.addr, &origin.url("/")).await;
    assert_eq!(r.status, 200, "{}", r.proxy_status());
    assert!(
        t0.elapsed() < Duration::from_millis(1000),
        "held: {:?}",
        t0.elapsed()
    );
}

/// A site's "retry now" (`Retry-After: 0`) cools the address for a
/// second, as the allocator makes it (a worker had dropped it, as a wait
/// that had ended); and once that ends, tunnels to the site flow: a
/// tunnel's connect stands for the answer it cannot read (one tunnel in
/// each 2 s hold went, for the 30 min the push-back is kept).
#[tokio::test]
async fn retry_now_cools_a_second_and_tunnels_end_the_probe() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let w = Worker::start(&alloc.socket, &[]).await;
    assert_eq!(get(w.addr, &origin.url("/status/429/0")).await.status, 429);
    wait_cooling(&alloc.socket, "127.0.0.1", ip(2)).await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let dest = origin.addr.to_string();
    for i in 0..6 {
        let (code, _tunnel) = connect_tunnel(w.addr, &dest).await;
        assert_eq!(code, 200, "tunnel {i}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn forbidden_cools_only_when_counted() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.3"]).await;
    let plain = Worker::start(&alloc.socket, &[]).await;
    let counted = Worker::start(&alloc.socket, &["--cooldown-status", "403,429"]).await;
    assert_eq!(
        get(plain.addr, &origin.url("/status/403")).await.status,
        403
    );
    // A 503 without Retry-After says nothing of rate limits either.
    assert_eq!(
        get(plain.addr, &origin.url("/status/503")).await.status,
        503
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(site_status(&alloc.socket, "127.0.0.1").is_none());
    assert_eq!(
        get(counted.addr, &origin.url("/status/403")).await.status,
        403
    );
    let src = origin.sources()[2];
    let ms = wait_cooling(&alloc.socket, "127.0.0.1", src).await;
    assert!(ms > 20_000, "{ms}");
    // Both workers skip it now: the allocator holds the cooldown.
    for w in [&plain, &counted] {
        for _ in 0..2 {
            assert_eq!(get(w.addr, &origin.url("/")).await.status, 200);
        }
    }
    assert!(!sources_since(&origin, 3).contains(&src));
}

#[tokio::test]
async fn a_site_is_its_registrable_domain_for_plain_requests_and_tunnels() {
    let dns = Dns::start().await;
    let origin = Origin::start().await;
    let port = origin.addr.port();
    for name in ["www.example.com", "api.example.com", "example.org"] {
        dns.set(name, std::net::Ipv4Addr::LOCALHOST, 60);
    }
    let alloc =
        Allocator::start(&["--pool", "127.0.0.2", "--site-limit", "example.com=2/30s"]).await;
    let server = dns.addr.to_string();
    let w = Worker::start(&alloc.socket, &["--dns-server", &server]).await;
    let url = |host: &str| format!("http://{host}:{port}/");
    assert_eq!(get(w.addr, &url("www.example.com")).await.status, 200);
    // A tunnel to a subdomain counts against the same site.
    let mut s = TcpStream::connect(w.addr).await.unwrap();
    let target = format!("api.example.com:{port}");
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 200"));
    drop(s);
    let r = get(w.addr, &url("api.example.com")).await;
    assert_eq!(r.status, 429, "example.com's budget is spent");
    assert!(
        r.proxy_status().contains("example.com"),
        "{}",
        r.proxy_status()
    );
    // Another registrable domain is another site.
    assert_eq!(get(w.addr, &url("example.org")).await.status, 200);
    // A subdomain in --site-limit is refused with the site to write.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rotor-allocator"))
        .args([
            "--check",
            "--pool",
            "127.0.0.2",
            "--site-limit",
            "www.example.co.uk=1/1s",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("`example.co.uk`"),
        "{err}"
    );
}

/// A site holding most of a full site table keeps its budgets when
/// another site asks: it loses only an eighth of the table (its two pairs
/// nearest to freeing), not every entry (before, it was forgotten whole
/// and each of its spent addresses served it again).
#[tokio::test]
async fn a_site_filling_the_table_keeps_its_budgets_when_another_asks() {
    let origin = Origin::start().await;
    let other = Origin::start_on("127.0.0.20:0".parse().unwrap()).await;
    let alloc = Allocator::start(&[
        "--pool",
        "127.0.0.2-127.0.0.15",
        "--site-limit",
        "*=1/1h",
        "--max-site-entries",
        "16",
    ])
    .await;
    let w = Worker::start(&alloc.socket, &[]).await;
    let url = origin.url("/");
    // Its 14 addresses spent: 15 entries of 16.
    for i in 0..14 {
        assert_eq!(get(w.addr, &url).await.status, 200, "request {i}");
    }
    assert_eq!(get(w.addr, &url).await.status, 429);
    assert_eq!(status_json(&alloc.socket)["sites"]["entries"], 15);
    assert_eq!(get(w.addr, &other.url("/")).await.status, 200);
    let mut served = 0;
    for _ in 0..14 {
        if get(w.addr, &url).await.status == 200 {
            served += 1;
        }
    }
    assert_eq!(served, 2, "{:?}", sources_since(&origin, 14));
    assert_eq!(origin.count(), 16);
}

#[tokio::test]
async fn budgets_survive_a_worker_restart() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&[
        "--pool",
        "127.0.0.2-127.0.0.3",
        "--site-limit",
        "127.0.0.1=1/30s",
    ])
    .await;
    let port = free_port();
    let mut w = Worker::start_on(&alloc.socket, port, &[]).await;
    let url = origin.url("/");
    for _ in 0..2 {
        assert_eq!(get(w.addr, &url).await.status, 200);
    }
    w.proc.signal(nix::sys::signal::Signal::SIGKILL);
    w.proc.wait(Duration::from_secs(5));
    let w = Worker::start_on(&alloc.socket, port, &[]).await;
    assert_eq!(get(w.addr, &url).await.status, 429);
    assert_eq!(origin.count(), 2);
}

#[tokio::test]
async fn a_request_made_while_the_allocator_restarts_still_counts_against_the_budget() {
    let origin = Origin::start().await;
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let args = ["--pool", "127.0.0.2", "--site-limit", "127.0.0.1=1/30s"];
    let mut alloc = Allocator::start_in(dir.clone(), &args).await;
    let w = Worker::start(&alloc.socket, &["--lease-timeout", "10s"]).await;
    alloc.proc.signal(nix::sys::signal::Signal::SIGKILL);
    alloc.proc.wait(Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Asked while there is no allocator: it waits for one, and then
    // leases through the site's budget, not from the shared rotation.
    let url = origin.url("/");
    let (addr, u) = (w.addr, url.clone());
    let waiting = tokio::spawn(async move { get(addr, &u).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _alloc = Allocator::start_in(dir.clone(), &args).await;
    assert_eq!(waiting.await.unwrap().status, 200);
    let r = get(w.addr, &url).await;
    assert_eq!(r.status, 429, "the request before was counted");
    assert!(r.headers.contains_key("proxy-status"), "rotor's own 429");
    assert_eq!(origin.count(), 1);
}

/// Leases a worker gave up on while the allocator was stopped (their
/// clients answered 503 at `--lease-timeout`) are not served when it
/// resumes and reads them: they spend no site's budget and start no
/// session.
#[tokio::test]
async fn a_lease_given_up_while_the_allocator_stalled_is_not_served_when_it_resumes() {
    use nix::sys::signal::Signal;
    let origin = Origin::start().await;
    let args = [
        "--pool",
        "127.0.0.2-127.0.0.3",
        "--site-limit",
        "127.0.0.1=1/30s",
    ];
    let alloc = Allocator::start(&args).await;
    let w = Worker::start(&alloc.socket, &["--lease-timeout", "300ms"]).await;
    let url = origin.url("/");
    alloc.proc.signal(Signal::SIGSTOP);
    let plain = get(w.addr, &url).await;
    let session = crate::sessions::get_as(w.addr, "u-session-late1", &url, None).await;
    alloc.proc.signal(Signal::SIGCONT);
    for r in [&plain, &session] {
        assert_eq!(r.status, 503, "{:?}", r.body);
        assert!(r.proxy_status().contains("allocator"), "{:?}", r.headers);
    }
    // Both were read, and answered, once it resumed.
    eventually("the allocator answers again", || {
        let socket = alloc.socket.clone();
        async move { status_json(&socket)["pool"].is_array() }
    })
    .await;
    assert_eq!(
        status_json(&alloc.socket)["sessions"],
        0,
        "a session started"
    );
    // Each address's one request in 30 s is left.
    for _ in 0..2 {
        assert_eq!(get(w.addr, &url).await.status, 200, "a budget was spent");
    }
    assert_eq!(origin.sources(), vec![ip(2), ip(3)]);
}

/// A worker whose clock is another's (a time namespace ten minutes
/// behind) has its deadlines read on the allocator's clock: each of its
/// site leases was refused as read ten minutes after its deadline.
#[tokio::test]
async fn a_worker_in_another_time_namespace_is_served() {
    let test = "a_worker_in_another_time_namespace_is_served";
    if !have(test, &["unshare"]) {
        return;
    }
    let tried = std::process::Command::new("unshare")
        .args(["--time", "--monotonic", "-600", "--fork", "true"])
        .status();
    if !tried.is_ok_and(|s| s.success()) {
        skip(&format!(
            "{test}: cannot make a time namespace (needs root, as CI has)"
        ));
        return;
    }
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2", "--site-limit", "127.0.0.1=5/1m"]).await;
    let mut cmd = std::process::Command::new("unshare");
    cmd.args([
        "--time",
        "--monotonic",
        "-600",
        "--fork",
        "--kill-child",
        WORKER,
    ]);
    let w = Worker::start_cmd(cmd, &alloc.socket, free_port(), &ALLOW_LOOPBACK).await;
    for _ in 0..2 {
        let r = get(w.addr, &origin.url("/")).await;
        assert_eq!(r.status, 200, "{}", r.proxy_status());
    }
    assert_eq!(origin.count(), 2);
}

/// A request held waiting for a site's budget, given up by its worker
/// while the allocator stalled, is not served when the allocator resumes
/// and finds the budget free: it spent the budget for nobody.
#[tokio::test]
async fn a_wait_given_up_while_the_allocator_stalled_spends_no_budget() {
    use nix::sys::signal::Signal;
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2", "--site-limit", "127.0.0.1=1/2s"]).await;
    let args = ["--budget-wait", "3s", "--lease-timeout", "300ms"];
    let w = Worker::start(&alloc.socket, &args).await;
    let now = Worker::start(&alloc.socket, &[]).await;
    let url = origin.url("/");
    assert_eq!(get(w.addr, &url).await.status, 200);
    let t0 = Instant::now();
    let (addr, u) = (w.addr, url.clone());
    // Held: the budget frees 2 s on, within its wait.
    let held = tokio::spawn(async move { get(addr, &u).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    alloc.proc.signal(Signal::SIGSTOP);
    // Given up at its wait's end and the lease timeout (3.3 s).
    let r = held.await.unwrap();
    assert_eq!(r.status, 503, "{:?}", r.body);
    // Resumed with the held wait due, the budget free again.
    tokio::time::sleep(Duration::from_millis(3800).saturating_sub(t0.elapsed())).await;
    alloc.proc.signal(Signal::SIGCONT);
    assert_eq!(
        get(now.addr, &url).await.status,
        200,
        "the budget was spent"
    );
    assert_eq!(origin.count(), 2);
}

/// A site whose accept queue is full: its first SYN dropped, a connect
/// to it takes a second (the SYN sent again). Its HTTP requests are
/// answered once the queue is emptied (after `stall`), each 200 and
/// closed; the times they arrived at.
struct StalledSite {
    port: u16,
    arrived: std::sync::Arc<std::sync::Mutex<Vec<Instant>>>,
}

impl StalledSite {
    fn start(stall: Duration) -> StalledSite {
        use std::io::{Read, Write};
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        // (A backlog of 0 holds one connection; two fill it.)
        s.listen(0).unwrap();
        let listener: std::net::TcpListener = s.into();
        let port = listener.local_addr().unwrap().port();
        let fillers: Vec<_> = (0..2)
            .map(|_| {
                let f = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .unwrap();
                f.set_nonblocking(true).unwrap();
                let _ = f.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into());
                f
            })
            .collect();
        let arrived = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let times = arrived.clone();
        std::thread::spawn(move || {
            std::thread::sleep(stall);
            drop(fillers);
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if head.starts_with(b"GET") {
                    times.lock().unwrap().push(Instant::now());
                    let _ = conn.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    );
                }
            }
        });
        StalledSite { port, arrived }
    }
}

/// A tunnel whose client leaves while its connect is slow (the site's
/// SYNs dropped) spent a lease: its access line names the address, over
/// HTTP CONNECT and SOCKS5, as a GET's does. Both said `-`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_given_up_as_it_connects_is_logged_with_its_source() {
    let site = StalledSite::start(Duration::from_secs(5));
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let (w, socks) = socks_worker_logging_json(&alloc.socket, &log, &[]).await;
    let port = site.port;
    let mut connect = TcpStream::connect(w.addr).await.unwrap();
    let head = format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    connect.write_all(head.as_bytes()).await.unwrap();
    let mut tunnel = TcpStream::connect(socks).await.unwrap();
    tunnel.write_all(&[5, 1, 0]).await.unwrap();
    let mut method = [0u8; 2];
    tokio::io::AsyncReadExt::read_exact(&mut tunnel, &mut method)
        .await
        .unwrap();
    let mut req = vec![5, 1, 0, 1, 127, 0, 0, 1];
    req.extend_from_slice(&port.to_be_bytes());
    tunnel.write_all(&req).await.unwrap();
    // Past the 500 ms after which a waiting client is watched.
    tokio::time::sleep(Duration::from_millis(900)).await;
    drop((connect, tunnel));
    eventually("both given up, each with its source", || {
        let lines = json_lines(&log);
        async move {
            let given_up = |method: &str| {
                lines.iter().any(|l| {
                    l["method"] == method && l["status"] == 499 && l["source"] == "127.0.0.2"
                })
            };
            given_up("CONNECT") && given_up("SOCKS5")
        }
    })
    .await;
}

/// A site's budget holds from when a request reached the site, not from
/// its lease: a request whose connect took a second, counted at its
/// lease, let the next one in a second early (the site saw two requests
/// 1.1 s apart under a budget of one in 2 s).
#[tokio::test]
async fn a_budget_holds_from_when_a_slow_connect_reached_the_site() {
    let site = StalledSite::start(Duration::from_millis(300));
    let alloc = Allocator::start(&["--pool", "127.0.0.2", "--site-limit", "127.0.0.1=1/2s"]).await;
    let w = Worker::start(&alloc.socket, &["--budget-wait", "10s"]).await;
    let url = format!("http://127.0.0.1:{}/", site.port);
    let (addr, u) = (w.addr, url.clone());
    let slow = tokio::spawn(async move { get(addr, &u).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let next = get(w.addr, &url).await;
    assert_eq!(next.status, 200, "{:?}", next.body);
    assert_eq!(slow.await.unwrap().status, 200);
    let arrived = site.arrived.lock().unwrap().clone();
    assert_eq!(arrived.len(), 2);
    let apart = arrived[1] - arrived[0];
    assert!(apart >= Duration::from_secs(2), "{apart:?} apart");
}

#[tokio::test]
async fn budgets_used_and_cooldowns_outlive_a_clean_allocator_restart() {
    let origin = Origin::start().await;
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let args = [
        "--pool",
        "127.0.0.2-127.0.0.4",
        "--site-limit",
        "127.0.0.1=1/30s",
    ];
    let mut alloc = Allocator::start_in(dir.clone(), &args).await;
    let w = Worker::start(&alloc.socket, &["--lease-timeout", "10s"]).await;
    // One address spends its budget; the next is told to wait an hour.
    assert_eq!(get(w.addr, &origin.url("/")).await.status, 200);
    assert_eq!(
        get(w.addr, &origin.url("/status/429/3600")).await.status,
        429
    );
    let [spent, told] = origin.sources()[..] else {
        panic!("{:?}", origin.sources())
    };
    wait_cooling(&alloc.socket, "127.0.0.1", told).await;
    // A clean stop (an upgrade, or a changed --site-limit) keeps them.
    alloc.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(alloc.proc.wait(Duration::from_secs(10)).success());
    let kept = dir.path().join("state/sites.json");
    assert!(kept.exists());
    let alloc = Allocator::start_in(dir.clone(), &args).await;
    let ms = wait_cooling(&alloc.socket, "127.0.0.1", told).await;
    assert!(ms > 3_500_000 && ms <= 3_600_000, "{ms}");
    // Left in place: the checkpoints keep it current, and a crash before
    // the first one still finds it.
    assert!(kept.exists());
    // Only the third address may serve the site now: once.
    assert_eq!(get(w.addr, &origin.url("/")).await.status, 200);
    let third = origin.sources()[2];
    assert!(
        third != spent && third != told,
        "{:?} {}",
        origin.sources(),
        site_status(&alloc.socket, "127.0.0.1").unwrap()
    );
    let r = get(w.addr, &origin.url("/")).await;
    assert_eq!(r.status, 429, "every budget spent or cooling");
    assert!(r.headers.contains_key("proxy-status"), "rotor's own 429");
    assert_eq!(origin.count(), 3);
}

/// A request waiting for its site's budget whose client goes away is given
/// up (and logged, 499): it is not sent when the budget comes, spending it
/// for nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_for_budget_is_given_up_when_its_client_goes() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let alloc = Allocator::start(&["--pool", "127.0.0.2", "--site-limit", "127.0.0.1=1/3s"]).await;
    let w = Worker::start(
        &alloc.socket,
        &[
            "--budget-wait",
            "10s",
            "--access-log",
            log.to_str().unwrap(),
            "--access-log-format",
            "json",
        ],
    )
    .await;
    let url = origin.url("/");
    assert_eq!(get(w.addr, &url).await.status, 200);
    // The next waits about 3 s for the budget; its client leaves at once.
    let mut s = TcpStream::connect(w.addr).await.unwrap();
    s.write_all(format!("GET {url} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    eventually("the given-up request logged", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move { text.contains("\"status\":499") }
    })
    .await;
    // Past the budget's return: nothing more reached the site.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(origin.count(), 1, "the request was sent for a client gone");
}

/// A connection to `proxy` that has sent `request` (and reads nothing).
async fn asking(proxy: std::net::SocketAddr, request: &str) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    s
}

/// Requests waiting for a site's budget are served in arrival order across
/// workers (the allocator holds them, each answered as the budget comes),
/// and one whose client left gives its turn to the next: no lease is taken
/// for it. Before, every waiter slept until the refusal's end and raced the
/// others: the order was chance, and one could lose each round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_requests_are_served_in_arrival_order_across_workers() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2", "--site-limit", "127.0.0.1=1/3s"]).await;
    let a = Worker::start(&alloc.socket, &["--budget-wait", "20s"]).await;
    let b = Worker::start(&alloc.socket, &["--budget-wait", "20s"]).await;
    let url = origin.url("/");
    assert_eq!(get(a.addr, &url).await.status, 200);
    let t0 = Instant::now();
    // First in line: a client that leaves while it waits. (Waiters 300 ms
    // apart: one worker late by 150 ms on a loaded machine reordered
    // them at the allocator.)
    let gone = asking(b.addr, &format!("GET {url} HTTP/1.1\r\nHost: x\r\n\r\n")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut waiting = Vec::new();
    for (i, w) in [a.addr, b.addr, a.addr, b.addr].into_iter().enumerate() {
        let url = url.clone();
        waiting.push(tokio::spawn(async move {
            let status = get(w, &url).await.status;
            (i, status, t0.elapsed())
        }));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    drop(gone);
    let mut done = Vec::new();
    for w in waiting {
        done.push(w.await.unwrap());
    }
    assert!(done.iter().all(|(_, status, _)| *status == 200), "{done:?}");
    let mut by_end = done.clone();
    by_end.sort_by_key(|(_, _, at)| *at);
    let order: Vec<usize> = by_end.iter().map(|(i, ..)| *i).collect();
    assert_eq!(order, [0, 1, 2, 3], "{done:?}");
    // The first waiter still here was served as the budget came back (about
    // 3 s after the first request), not a window later (6 s).
    assert!(done[0].2 < Duration::from_millis(4800), "{done:?}");
    assert_eq!(origin.count(), 5, "nothing sent for the client gone");
}

/// A dual-stack site whose addresses of the family its name lists first
/// are spent is served from the other family at once; with both spent,
/// 429. (Before, the lease asked for the first family only: 429, or a
/// wait, with budget left in the other.)
#[tokio::test]
async fn a_dual_stack_site_spent_in_one_family_is_served_from_the_other() {
    let v6 = Origin::start_on("[::1]:0".parse().unwrap()).await;
    let port = v6.addr.port();
    let v4 = Origin::start_on(format!("127.0.0.1:{port}").parse().unwrap()).await;
    let dns = Dns::start().await;
    dns.set("dual.test", "127.0.0.1".parse().unwrap(), 300);
    dns.set_v6("dual.test", "::1".parse().unwrap(), 300);
    let alloc = Allocator::start(&["--pool", "127.0.0.2,::1", "--site-limit", "*=1/1m"]).await;
    let server = dns.addr.to_string();
    let w = Worker::start(&alloc.socket, &["--dns-server", &server]).await;
    let url = format!("http://dual.test:{port}/");
    assert_eq!(get(w.addr, &url).await.status, 200);
    assert_eq!(v4.sources(), ips(2..=2), "A listed first");
    assert_eq!(get(w.addr, &url).await.status, 200);
    assert_eq!(v6.sources(), vec!["::1".parse::<IpAddr>().unwrap()]);
    let r = get(w.addr, &url).await;
    assert_eq!(r.status, 429, "both families spent");
    assert_eq!(v4.count() + v6.count(), 2);
}

/// A CONNECT (served by hyper's server, not the fast path) whose client
/// leaves while it waits for the site's budget is given up too: the next
/// one is served when the budget comes back, and no tunnel is opened for
/// the client gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_whose_client_leaves_while_it_waits_is_given_up() {
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2", "--site-limit", "127.0.0.1=1/2s"]).await;
    let w = Worker::start(&alloc.socket, &["--budget-wait", "20s"]).await;
    let target = echo.addr.to_string();
    let (code, _first) = connect_tunnel(w.addr, &target).await;
    assert_eq!(code, 200);
    let t0 = Instant::now();
    let head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    let gone = asking(w.addr, &head).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(gone);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (code, _next) = connect_tunnel(w.addr, &target).await;
    assert_eq!(code, 200);
    assert!(
        t0.elapsed() < Duration::from_millis(3500),
        "served a window late: {:?}",
        t0.elapsed()
    );
    eventually("the second tunnel's connection", || {
        let n = echo.peers.lock().unwrap().len();
        async move { n >= 2 }
    })
    .await;
    assert_eq!(echo.peers.lock().unwrap().len(), 2, "a tunnel for nobody");
}

/// Sites count an IPv6 client by its /64: a budget holds each /64 of the
/// pool (however its addresses are listed), and a push-back cools the
/// whole /64 for the site — every pool entry inside it shows it.
#[test]
fn ipv6_sources_are_budgeted_and_cooled_by_their_64() {
    in_netns(
        "ipv6_sources_are_budgeted_and_cooled_by_their_64",
        &[
            "-6 addr add 2001:db8:1::1/128 dev lo nodad",
            "-6 addr add 2001:db8:1::2/128 dev lo nodad",
            "-6 addr add 2001:db8:2::1/128 dev lo nodad",
            "-6 addr add fd00:9::1/128 dev lo nodad",
            "-6 addr add fd00:9::2/128 dev lo nodad",
        ],
        || async {
            let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
            let origin = Origin::start_on("[fd00:9::1]:0".parse().unwrap()).await;
            let other = Origin::start_on("[fd00:9::2]:0".parse().unwrap()).await;
            let metrics: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let listen = metrics.to_string();
            let alloc = Allocator::start(&[
                "--pool",
                "2001:db8:1::1,2001:db8:1::2,2001:db8:2::1",
                "--site-limit",
                "fd00:9::1=1/1m",
                "--metrics-listen",
                &listen,
            ])
            .await;
            let allow = [
                "--allow-destination",
                "fd00:9::1",
                "--allow-destination",
                "fd00:9::2",
            ];
            let w = Worker::start(&alloc.socket, &allow).await;
            // One request a /64: 2001:db8:1::2 is the /64 that 1::1 spent.
            for _ in 0..2 {
                assert_eq!(get(w.addr, &origin.url("/")).await.status, 200);
            }
            assert_eq!(origin.sources(), [v6("2001:db8:1::1"), v6("2001:db8:2::1")]);
            let r = get(w.addr, &origin.url("/")).await;
            assert_eq!(r.status, 429, "{:?}", r.body);
            assert_eq!(origin.count(), 2);
            let site = site_status(&alloc.socket, "fd00:9::1").unwrap();
            let held: Vec<&str> = site["addresses"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["ip"].as_str().unwrap())
                .collect();
            assert_eq!(held, ["2001:db8:1::", "2001:db8:2::"]);
            // `rotor status` says what an entry stands for: the /64.
            let st = status_json(&alloc.socket);
            assert_eq!(st["sites"]["v6_prefix"], 64, "{st}");
            assert!(
                site["addresses"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|a| a["prefix_len"] == 64),
                "{site}"
            );
            let text = rotor_control("status", &alloc.socket, &[]);
            assert!(
                text.contains("2001:db8:1::/64") && text.contains("2001:db8:2::/64"),
                "{text}"
            );

            // A 429 from the other site cools the /64 of the address it
            // came from: the next requests there come from the other /64.
            let r = get(w.addr, &other.url("/status/429/60")).await;
            assert_eq!(r.status, 429);
            let cooled = other.sources()[0];
            let net = |ip: &IpAddr| ip.to_string().starts_with("2001:db8:1:");
            let cooling_key = if net(&cooled) {
                "2001:db8:1::"
            } else {
                "2001:db8:2::"
            };
            let key = v6(cooling_key);
            wait_cooling(&alloc.socket, "fd00:9::2", key).await;
            for _ in 0..3 {
                assert_eq!(get(w.addr, &other.url("/")).await.status, 200);
            }
            let after = sources_since(&other, 1);
            assert!(after.iter().all(|ip| net(ip) != net(&cooled)), "{after:?}");
            // Each entry inside the cooling /64 cools for that site.
            let text = crate::metrics::scrape(metrics);
            let line = "rotor_site_cooldowns_total{reason=\"pushback\"}";
            assert_eq!(crate::metrics::series(&text, line), 1.0);
            for entry in ["2001:db8:1::1", "2001:db8:1::2", "2001:db8:2::1"] {
                let line = format!("rotor_source_cooling_sites{{source=\"{entry}\"}}");
                let n: f64 = text
                    .lines()
                    .find_map(|l| l.strip_prefix(&line))
                    .unwrap_or_else(|| panic!("no {line} in {text}"))
                    .trim()
                    .parse()
                    .unwrap();
                let want = if net(&v6(entry)) == net(&cooled) {
                    1.0
                } else {
                    0.0
                };
                assert_eq!(n, want, "{entry}");
            }
        },
    );
}

/// A sticky session whose address the site pushed back on is not sent
/// there again while the address cools: rotor answers 429 itself (the
/// session's requests met the site's refusal, each lengthening the
/// cooldown), and the session keeps its address for after it.
#[tokio::test]
async fn a_session_waits_out_its_addresss_cooldown_and_keeps_the_address() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.4"]).await;
    let w = Worker::start(&alloc.socket, &[]).await;
    let as_session = |path: &str| {
        hyper::Request::get(origin.url(path))
            .header("proxy-authorization", basic("u-session-s1", "pw"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    let send = |path: &str| {
        let req = as_session(path);
        async move { ProxyConn::open(w.addr).await.send(req).await }
    };
    assert_eq!(send("/").await.status, 200);
    let held = origin.sources()[0];
    assert_eq!(send("/status/429/3").await.status, 429);
    assert_eq!(origin.sources()[1], held);
    wait_cooling(&alloc.socket, "127.0.0.1", held).await;
    let at = origin.count();
    let r = send("/").await;
    assert_eq!(r.status, 429);
    // Said as the session's address, not as every address (the others
    // are free).
    assert!(
        r.proxy_status()
            .contains("the session's address is cooling down for 127.0.0.1 after it pushed back"),
        "{}",
        r.proxy_status()
    );
    assert_eq!(origin.count(), at, "sent to the site while cooling");
    // After it: the session's own address again.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert_eq!(send("/").await.status, 200);
    assert_eq!(*origin.sources().last().unwrap(), held);
}

/// A sticky session's address keeps to the site's budget: the site's
/// other requests leave it a start of the budget while the session uses
/// it, and past the budget the session's request waits (here: is refused,
/// no `--budget-wait`) rather than go past the site's limit from its
/// address (the site pushed back, and the session was locked out).
#[tokio::test]
async fn a_sessions_address_never_goes_past_the_sites_budget() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&[
        "--pool",
        "127.0.0.2-127.0.0.3",
        "--site-limit",
        "127.0.0.1=3/1m",
    ])
    .await;
    let w = Worker::start(&alloc.socket, &[]).await;
    let url = origin.url("/");
    let session = || async {
        let req = hyper::Request::get(&url)
            .header("proxy-authorization", basic("u-session-b1", "pw"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        ProxyConn::open(w.addr).await.send(req).await
    };
    assert_eq!(session().await.status, 200);
    let held = origin.sources()[0];
    // The others: one more from the session's address (a start left to
    // the session), three from the other; then none.
    let mut served = 0;
    for _ in 0..6 {
        if get(w.addr, &url).await.status == 200 {
            served += 1;
        }
    }
    assert_eq!(served, 4, "{:?}", origin.sources());
    // The session's next request has room on its address...
    assert_eq!(session().await.status, 200);
    assert_eq!(*origin.sources().last().unwrap(), held);
    // ...and the one after it waits for the budget: refused here.
    let at = origin.count();
    let r = session().await;
    assert_eq!(r.status, 429, "{}", r.proxy_status());
    assert!(
        r.proxy_status()
            .contains("the session's address has spent its budget for 127.0.0.1"),
        "{}",
        r.proxy_status()
    );
    assert_eq!(origin.count(), at, "sent past the budget");
    // No address went past 3 at the site.
    let sources = origin.sources();
    for ip in [ip(2), ip(3)] {
        let n = sources.iter().filter(|s| **s == ip).count();
        assert!(n <= 3, "{ip}: {n} of {sources:?}");
    }
}

/// Sticky sessions asking as fast as they may beside other clients of the
/// same site, all waiting for its budget (`--budget-wait`): each side is
/// served, the sessions keeping to half of the address's budget (they
/// took all of it: 8 sessions and 20 other clients of a `5/1s` site had
/// 604 and 4 requests served).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_other_clients_share_a_sites_budget() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2", "--site-limit", "127.0.0.1=4/1s"]).await;
    let w = Worker::start(&alloc.socket, &["--budget-wait", "5s"]).await;
    let url = origin.url("/");
    let until = Instant::now() + Duration::from_secs(4);
    let client = |user: Option<String>| {
        let url = url.clone();
        tokio::spawn(async move {
            let mut served = 0;
            while Instant::now() < until {
                let mut req = hyper::Request::get(url.as_str());
                if let Some(user) = &user {
                    req = req.header("proxy-authorization", basic(user, "pw"));
                }
                let req = req
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                let r = ProxyConn::open(w.addr).await.send(req).await;
                if r.status == 200 {
                    served += 1;
                }
            }
            served
        })
    };
    let sessions: Vec<_> = (0..4)
        .map(|i| client(Some(format!("u-session-s{i}"))))
        .collect();
    let others: Vec<_> = (0..4).map(|_| client(None)).collect();
    let (mut by_sessions, mut by_others) = (0, 0);
    for t in sessions {
        by_sessions += t.await.unwrap();
    }
    for t in others {
        by_others += t.await.unwrap();
    }
    // About 16 served in 4 s (the waits of the last ones go past it).
    let total = by_sessions + by_others;
    assert!(total <= 24, "{by_sessions} {by_others}");
    assert!(
        by_others * 4 >= total && by_sessions * 4 >= total,
        "sessions {by_sessions}, others {by_others}"
    );
}

/// A session's request held back at the sessions' share of its address's
/// budget (half, while the site's other requests want the rest) is told
/// so; it was told the address had spent its budget, with half of it left.
#[tokio::test]
async fn a_session_held_at_its_share_of_a_budget_is_told_so() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2", "--site-limit", "127.0.0.1=4/3s"]).await;
    let w = Worker::start(&alloc.socket, &[]).await;
    let url = origin.url("/");
    let session = || async {
        let req = hyper::Request::get(url.as_str())
            .header("proxy-authorization", basic("u-session-s1", "pw"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        ProxyConn::open(w.addr).await.send(req).await
    };
    // The budget spent, half by the session, half by another client.
    for _ in 0..2 {
        assert_eq!(session().await.status, 200);
        assert_eq!(get(w.addr, &url).await.status, 200);
    }
    let spent = Instant::now();
    // The other client refused for it: the sessions keep to their share
    // for the budget's window.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(get(w.addr, &url).await.status, 429);
    // Those starts out of the window (3.06 s), the refusal not.
    tokio::time::sleep_until((spent + Duration::from_millis(3300)).into()).await;
    for _ in 0..2 {
        assert_eq!(session().await.status, 200);
    }
    let r = session().await;
    assert_eq!(r.status, 429);
    let status = r.headers["proxy-status"].to_str().unwrap().to_string();
    assert!(
        status.contains("served the sessions' share of its budget for 127.0.0.1 (half)"),
        "{status}"
    );
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(origin.count(), 6);
}
