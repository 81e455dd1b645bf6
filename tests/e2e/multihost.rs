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
}

async fn host(pool: &str) -> Host {
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let m = metrics.to_string();
    let alloc = Allocator::start(&["--pool", pool, "--metrics-listen", &m]).await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    Host {
        alloc,
        worker,
        metrics,
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
            out.push_str(&format!(
                "  server rotor{} {} check port {} inter 300ms fall 1 rise 1\n",
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
    let front: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("haproxy.cfg");
    let stats = dir.path().join("stats.sock");
    std::fs::write(&cfg, config(front, &[&one, &two], &stats)).unwrap();
    let _haproxy = Proc::spawn("haproxy", &["-db", "-f", cfg.to_str().unwrap()]);
    eventually("HAProxy listening", || async {
        tokio::net::TcpStream::connect(front).await.is_ok()
    })
    .await;
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
