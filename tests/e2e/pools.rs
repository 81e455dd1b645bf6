//! The pools real hosts have: dual-stack pools rotating evenly per family,
//! an IPv6 /64 routed to the host (AnyIP), addresses the host cannot use
//! kept out of the rotation, and a pool from the cloud's metadata service.
//! The IPv6 tests run in a network namespace of their own, with their own
//! addresses on its loopback.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rotor_protocol::Segment;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::*;

fn v6(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Runs `ip CMD` (in the test's network namespace), which must succeed.
fn ip(cmd: &str) {
    let ok = std::process::Command::new("ip")
        .args(cmd.split_whitespace())
        .status()
        .unwrap()
        .success();
    assert!(ok, "ip {cmd}");
}

fn cycle(pool: &[IpAddr], n: usize) -> Vec<IpAddr> {
    pool.iter().copied().cycle().take(n).collect()
}

/// Requests alternating between an IPv6 and an IPv4 destination: each
/// family's addresses in exact order (a shared cursor gave the first
/// address of each family every time).
#[test]
fn a_dual_stack_pool_rotates_each_family_evenly() {
    in_netns(
        "a_dual_stack_pool_rotates_each_family_evenly",
        &[
            "-6 addr add fd00:1::2/128 dev lo nodad",
            "-6 addr add fd00:1::3/128 dev lo nodad",
            "-6 addr add fd00:1::4/128 dev lo nodad",
            "-6 addr add fd00:1::5/128 dev lo nodad",
            "-6 addr add fd00:9::1/128 dev lo nodad",
        ],
        || async {
            let origin4 = Origin::start().await;
            let origin6 = Origin::start_on("[fd00:9::1]:0".parse().unwrap()).await;
            let alloc = Allocator::start(&[
                "--pool",
                "127.0.0.2-127.0.0.5",
                "--pool",
                "fd00:1::2-fd00:1::5",
            ])
            .await;
            let w = Worker::start(&alloc.socket, &["--allow-destination", "fd00:9::1"]).await;
            for i in 0..8 {
                let r = get(w.addr, &origin6.url("/")).await;
                assert_eq!(r.status, 200, "v6 {i}: {:?}", r.body);
                let r = get(w.addr, &origin4.url("/")).await;
                assert_eq!(r.status, 200, "v4 {i}: {:?}", r.body);
            }
            assert_eq!(origin4.sources(), cycle(&ips(2..=5), 8));
            let pool6: Vec<IpAddr> = (2..=5).map(|i| v6(&format!("fd00:1::{i}"))).collect();
            assert_eq!(origin6.sources(), cycle(&pool6, 8));
            let status = status_json(&alloc.socket);
            assert_eq!(status["families"][0]["total"], 4);
            assert_eq!(status["families"][1]["next"], "fd00:1::2");
        },
    );
}

/// A name of both families whose IPv4 address refuses is tried over
/// IPv6, from an IPv6 address of the pool, as a client doing Happy
/// Eyeballs would (it was a 502).
#[test]
fn a_dual_stack_name_refused_over_ipv4_is_served_over_ipv6() {
    in_netns(
        "a_dual_stack_name_refused_over_ipv4_is_served_over_ipv6",
        &[
            "-6 addr add fd00:1::2/128 dev lo nodad",
            "-6 addr add fd00:9::1/128 dev lo nodad",
        ],
        || async {
            let port = free_port();
            // Nothing listens on 127.0.0.1:port.
            let origin6 = Origin::start_on(format!("[fd00:9::1]:{port}").parse().unwrap()).await;
            let dns = Dns::start().await;
            dns.set("dual.test", "127.0.0.1".parse().unwrap(), 60);
            dns.set_v6("dual.test", "fd00:9::1".parse().unwrap(), 60);
            let alloc = Allocator::start(&["--pool", "127.0.0.2", "--pool", "fd00:1::2"]).await;
            let d = dns.addr.to_string();
            let w = Worker::start(
                &alloc.socket,
                &["--allow-destination", "fd00:9::1", "--dns-server", &d],
            )
            .await;
            let r = get(w.addr, &format!("http://dual.test:{port}/")).await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            assert_eq!(origin6.sources(), ["fd00:1::2".parse::<IpAddr>().unwrap()]);
            // A name of one family that refuses is still a 502.
            dns.set("one.test", "127.0.0.1".parse().unwrap(), 60);
            let r = get(w.addr, &format!("http://one.test:{port}/")).await;
            assert_eq!(r.status, 502);
        },
    );
}

/// A session on a dual-stack pool keeps the address it holds of either
/// family: pinned to an IPv6 address by an IPv6 destination, its requests
/// to a name with both A and AAAA records (rotor's resolver lists IPv4
/// first) stay on that address, not on a second, IPv4 one.
#[test]
fn a_session_keeps_its_ipv6_address_for_a_dual_stack_name() {
    in_netns(
        "a_session_keeps_its_ipv6_address_for_a_dual_stack_name",
        &[
            "-6 addr add fd00:1::2/128 dev lo nodad",
            "-6 addr add fd00:1::3/128 dev lo nodad",
            "-6 addr add fd00:9::1/128 dev lo nodad",
        ],
        || async {
            let port = free_port();
            let origin4 = Origin::start_on(([127, 0, 0, 1], port).into()).await;
            let origin6 = Origin::start_on(format!("[fd00:9::1]:{port}").parse().unwrap()).await;
            let dns = Dns::start().await;
            dns.set("dual.test", "127.0.0.1".parse().unwrap(), 60);
            dns.set_v6("dual.test", "fd00:9::1".parse().unwrap(), 60);
            let alloc = Allocator::start(&[
                "--pool",
                "127.0.0.2-127.0.0.3",
                "--pool",
                "fd00:1::2-fd00:1::3",
            ])
            .await;
            let d = dns.addr.to_string();
            let w = Worker::start(
                &alloc.socket,
                &["--allow-destination", "fd00:9::1", "--dns-server", &d],
            )
            .await;
            let as_session = |url: String| async move {
                let req = hyper::Request::get(url)
                    .header("proxy-authorization", basic("u-session-s1", "x"))
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                ProxyConn::open(w.addr).await.send(req).await.status
            };
            assert_eq!(as_session(format!("http://[fd00:9::1]:{port}/")).await, 200);
            let pinned = origin6.sources()[0];
            for _ in 0..3 {
                assert_eq!(as_session(format!("http://dual.test:{port}/")).await, 200);
            }
            assert_eq!(origin6.sources(), vec![pinned; 4], "one address");
            assert_eq!(origin4.count(), 0, "{:?}", origin4.sources());
            // Without a session the name's first family serves.
            assert_eq!(
                get(w.addr, &format!("http://dual.test:{port}/"))
                    .await
                    .status,
                200
            );
            assert_eq!(origin4.count(), 1);
        },
    );
}

/// `ip -6 route add local PREFIX dev lo` and the /64 is the pool: no sysctl,
/// never enumerated, no repeats, in the prefix's permutation order, global.
/// The order is the host's own, by the key kept in the state directory (a
/// fixed order let a destination invert it and tell a rotor address): a
/// restart keeps it, and another host's (another state directory's) is
/// another order.
#[test]
fn an_ipv6_64_routed_to_the_host_is_a_pool() {
    in_netns(
        "an_ipv6_64_routed_to_the_host_is_a_pool",
        &[
            "-6 route add local 2001:db8:7::/64 dev lo",
            "-6 addr add fd00:9::1/128 dev lo nodad",
        ],
        || async {
            let origin = Origin::start_on("[fd00:9::1]:0".parse().unwrap()).await;
            let dir = Arc::new(tempfile::tempdir().unwrap());
            let pool = ["--pool", "2001:db8:7::/64"];
            let alloc = Allocator::start_in(dir.clone(), &pool).await;
            let args = ["--allow-destination", "fd00:9::1", "--lease-timeout", "10s"];
            let workers = [
                Worker::start(&alloc.socket, &args).await,
                Worker::start(&alloc.socket, &args).await,
            ];
            for i in 0..40 {
                let r = get(workers[i % 2].addr, &origin.url("/")).await;
                assert_eq!(r.status, 200, "request {i}: {:?}", r.body);
            }
            let prefix = Segment::prefix(v6("2001:db8:7::"), 64).unwrap();
            let key_of = |dir: &std::path::Path| -> rotor_protocol::OrderKey {
                let text = std::fs::read_to_string(dir.join("state/order.key")).unwrap();
                let words: Vec<u64> = text
                    .split_whitespace()
                    .map(|w| u64::from_str_radix(w, 16).unwrap())
                    .collect();
                words.try_into().unwrap()
            };
            let key = key_of(dir.path());
            assert_ne!(key, [0; 4]);
            let at = |i: u128| prefix.at_with(i, rotor_protocol::Order::of(key));
            let want: Vec<IpAddr> = (0..40).map(at).collect();
            assert_eq!(origin.sources(), want);
            let status = status_json(&alloc.socket);
            assert_eq!(status["pool"][0]["ip"], "2001:db8:7::/64");
            assert_eq!(status["families"][1]["next"], at(40).to_string());
            assert_eq!(status["families"][1]["total"], 1u64 << 44);
            // Killed and restarted, the allocator continues the walk exactly
            // where it was (its position found again by inverting the
            // permutation).
            drop(alloc);
            let _alloc = Allocator::start_in(dir.clone(), &pool).await;
            for i in 0..5 {
                let r = get(workers[i % 2].addr, &origin.url("/")).await;
                assert_eq!(r.status, 200, "after the restart {i}: {:?}", r.body);
            }
            assert_eq!(key_of(dir.path()), key);
            let want: Vec<IpAddr> = (40..45).map(at).collect();
            assert_eq!(origin.sources()[40..], want[..]);
            // Another host: its own key, its own order.
            let other_dir = Arc::new(tempfile::tempdir().unwrap());
            let other = Allocator::start_in(other_dir.clone(), &pool).await;
            let other_key = key_of(other_dir.path());
            assert_ne!(other_key, key);
            let status = status_json(&other.socket);
            assert_eq!(
                status["families"][1]["next"],
                prefix
                    .at_with(0, rotor_protocol::Order::of(other_key))
                    .to_string()
            );
            assert_ne!(
                prefix.at_with(0, rotor_protocol::Order::of(other_key)),
                at(0)
            );
        },
    );
}

/// The worker confined to its unit's address families (deploy's
/// `RestrictAddressFamilies=`, as systemd applies it: a seccomp filter)
/// serves a /64 routed to the host. It reads its local routes over
/// netlink, which the unit must allow (it did not: every IPv6 request got
/// a 503); confined without netlink, as a unit copied before is, it reads
/// them from `/proc/net/ipv6_route` and serves still.
#[test]
fn a_worker_confined_to_its_units_families_serves_a_routed_64() {
    let unit = include_str!("../../deploy/rotor-worker@.service");
    let families = unit_families(unit);
    assert!(
        families.contains(&libc::AF_NETLINK),
        "the worker's unit must allow netlink sockets (its local routes)"
    );
    in_netns(
        "a_worker_confined_to_its_units_families_serves_a_routed_64",
        &[
            "-6 route add local 2001:db8:7::/64 dev lo",
            "-6 addr add fd00:9::1/128 dev lo nodad",
        ],
        move || async move {
            let origin = Origin::start_on("[fd00:9::1]:0".parse().unwrap()).await;
            let alloc = Allocator::start(&["--pool", "2001:db8:7::/64"]).await;
            let without: Vec<i32> = (families.iter().copied())
                .filter(|&f| f != libc::AF_NETLINK)
                .collect();
            for confined in [&families, &without] {
                let mut cmd = std::process::Command::new(WORKER);
                if !confine_families(&mut cmd, confined) {
                    return skip("no seccomp filter for this architecture in the test");
                }
                let args = ["--allow-destination", "fd00:9::1"];
                let w = Worker::start_cmd(cmd, &alloc.socket, free_port(), &args).await;
                for i in 0..3 {
                    let r = get(w.addr, &origin.url("/")).await;
                    assert_eq!(r.status, 200, "{confined:?}, request {i}: {:?}", r.body);
                }
            }
            let prefix = Segment::prefix(v6("2001:db8:7::"), 64).unwrap();
            assert!(origin.sources().iter().all(|s| prefix.contains(*s)));
        },
    );
}

/// Entries behind a /64 in their family are never leased (the cursor
/// counts 2^44 addresses at most): `--check` and the allocator's log say
/// which, and how to list them instead. The entries ahead of it, and
/// another family's, are not named.
#[tokio::test]
async fn entries_a_64_leaves_unreached_are_warned_of() {
    let pool = "10.0.0.1,2001:db8:2::/64,2001:db8:4::/64,10.0.0.2,2001:db8:2:1::7";
    let out = std::process::Command::new(ALLOCATOR)
        .args([
            "--socket",
            "/nonexistent/s",
            "--no-state",
            "--check",
            "--pool",
            pool,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: 2 pool entries are never leased while the prefixes listed before them are in the rotation: 2001:db8:4::/64, 2001:db8:2:1::7 come after 2^44 addresses"),
        "{err}"
    );
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let log = dir.path().join("allocator.log");
    let _alloc = Allocator::start_logging(dir.clone(), &["--pool", pool], &log).await;
    eventually("the warning in the log", || {
        let log = log.clone();
        async move {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("2 pool entries are never leased while the prefixes listed before them are in the rotation: 2001:db8:4::/64, 2001:db8:2:1::7")
        }
    })
    .await;
    // A /64 a /48 after it holds is left out of the pool, as the
    // allocator leaves it: nothing is behind it (`--check` warned).
    let out = std::process::Command::new(ALLOCATOR)
        .args(["--socket", "/nonexistent/s", "--no-state", "--check"])
        .args(["--pool", "2001:db8:2:5::/64,2001:db8:2::/48"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ok: --pool"), "{err}");
    assert!(!err.contains("never leased"), "{err}");
}

/// A listed block this host does not have, each of its 32 768 entries out
/// of the rotation with its reason: the status still answers (it had
/// outgrown a frame and was refused, just when the operator looked), a
/// reason the same as the entry's before said "(as above)".
/// `rotor status` says every reason again, in text and JSON (two entries
/// taken out by hand are each shown so).
#[tokio::test]
async fn a_status_of_a_large_block_taken_out_still_answers() {
    let alloc = Allocator::start(&["--pool", "127.0.0.5,127.0.0.6,10.201.0.0/17"]).await;
    for ip in ["127.0.0.5", "127.0.0.6"] {
        rotor_control("quarantine", &alloc.socket, &[ip]);
    }
    let status = status_json(&alloc.socket);
    let pool = status["pool"].as_array().unwrap();
    assert_eq!(pool.len(), 32770);
    let reason = |k: usize| {
        pool[k]["quarantined"]["reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(reason(0).starts_with("taken out by hand"), "{}", reason(0));
    assert_eq!(reason(1), reason(0));
    assert!(
        reason(2).contains("not an address of this host"),
        "{}",
        reason(2)
    );
    assert_eq!(reason(3), reason(2));
    assert_eq!(reason(32769), reason(2));
    let text = rotor_control("status", &alloc.socket, &[]);
    assert!(!text.contains("(as above)"), "{}", &text[..2000]);
    assert_eq!(
        text.matches("taken out by hand until released").count(),
        2,
        "{}",
        &text[..2000]
    );
}

/// A listed pool too large for one status (262 144 entries in rotation):
/// the status still answers, without its entries in rotation but with
/// those out and why, and says how many it left out (it was refused
/// whole: no sources, no workers, no quarantine).
#[tokio::test]
async fn a_status_of_a_pool_too_large_to_list_leaves_out_the_entries_in_rotation() {
    let pool = "127.1.0.0/16,127.2.0.0/16,127.3.0.0/16,127.4.0.0/16";
    let alloc = Allocator::start(&["--pool", pool]).await;
    rotor_control("quarantine", &alloc.socket, &["127.2.0.9"]);
    let text = rotor_control("status", &alloc.socket, &[]);
    assert!(
        text.contains("(262144 entries, 1 out of the rotation)"),
        "{}",
        &text[..text.len().min(2000)]
    );
    assert!(
        text.contains("262143 entries in rotation not listed"),
        "{text}"
    );
    assert!(
        text.contains("127.2.0.9") && text.contains("taken out by hand"),
        "{text}"
    );
    let status = status_json(&alloc.socket);
    assert_eq!(status["unlisted_entries"], 262_143);
    assert_eq!(status["pool"].as_array().unwrap().len(), 1);
    assert_eq!(status["pool"][0]["ip"], "127.2.0.9");
}

/// `rotor status | head`: a reader that stops early is no failure (the
/// closed pipe panicked `rotor status`).
#[tokio::test]
async fn a_status_read_in_part_is_no_failure() {
    let alloc = Allocator::start(&["--pool", "127.1.0.0/24"]).await;
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    let out = std::process::Command::new(ROTOR)
        .args(["status", "--socket", alloc.socket.to_str().unwrap()])
        .stdout(std::process::Stdio::from(write))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A listed broadcast address of this host's (lo's 127.255.255.255, the
/// last of its local 127.0.0.0/8) binds, but its connections left from
/// 127.0.0.1, the host's own address, with `Rotor-Source` and the access
/// log naming the pool address (review ao): out of the rotation from the
/// start, saying why, and no request leaves from the host's address.
#[tokio::test]
async fn a_broadcast_address_is_quarantined_not_leased() {
    let routes = std::process::Command::new("ip")
        .args(["-4", "route", "show", "table", "local", "type", "broadcast"])
        .output()
        .unwrap();
    if !String::from_utf8_lossy(&routes.stdout).contains("127.255.255.255") {
        eprintln!("skipped: 127.255.255.255 is no broadcast address here");
        return;
    }
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.255.255.254-127.255.255.255"]).await;
    let w = Worker::start(&alloc.socket, &[]).await;
    for i in 0..6 {
        let r = get(w.addr, &origin.url("/")).await;
        assert_eq!(r.status, 200, "request {i}: {:?}", r.body);
    }
    let only: std::net::IpAddr = "127.255.255.254".parse().unwrap();
    assert_eq!(origin.sources(), vec![only; 6]);
    let status = status_json(&alloc.socket);
    let entry = &status["pool"][1];
    assert_eq!(entry["ip"], "127.255.255.255");
    let reason = entry["quarantined"]["reason"].as_str().unwrap();
    assert!(reason.contains("broadcast address"), "{reason}");
}

/// A listed address this host does not have: out of the rotation from the
/// start, shown as such, and no request fails. (Nothing is sent from it:
/// the allocator's check only binds, and no worker ever gets it.)
#[tokio::test]
async fn an_address_this_host_lacks_is_quarantined_not_leased() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2,203.0.113.77,127.0.0.3"]).await;
    let w = Worker::start(&alloc.socket, &[]).await;
    for i in 0..6 {
        let r = get(w.addr, &origin.url("/")).await;
        assert_eq!(r.status, 200, "request {i}: {:?}", r.body);
    }
    assert_eq!(origin.sources(), cycle(&[ips(2..=2)[0], ips(3..=3)[0]], 6));
    let status = status_json(&alloc.socket);
    let entry = &status["pool"][1];
    assert_eq!(entry["ip"], "203.0.113.77");
    let reason = entry["quarantined"]["reason"].as_str().unwrap();
    assert!(reason.contains("EADDRNOTAVAIL"), "{reason}");
    let text = rotor_control("status", &alloc.socket, &[]);
    assert!(text.contains("QUARANTINED"), "{text}");
    // Released by hand, it is checked first: still not this host's, it
    // stays out (put back untested, its next lease failed), and the
    // command fails saying why.
    let socket = alloc.socket.to_str().unwrap();
    let release = std::process::Command::new(ROTOR)
        .args(["release", "--socket", socket, "203.0.113.77"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&release.stdout) + String::from_utf8_lossy(&release.stderr);
    assert!(!release.status.success(), "{said}");
    assert!(
        said.contains("203.0.113.77 stays out of the rotation: ") && said.contains("EADDRNOTAVAIL"),
        "{said}"
    );
    assert!(!status_json(&alloc.socket)["pool"][1]["quarantined"].is_null());
    for i in 0..2 {
        let r = get(w.addr, &origin.url("/")).await;
        assert_eq!(r.status, 200, "after the release {i}: {:?}", r.body);
    }
    assert_eq!(origin.sources(), cycle(&[ips(2..=2)[0], ips(3..=3)[0]], 8));
    // --check names it; with nothing usable at all it fails.
    let check = |pool: &str| {
        std::process::Command::new(ALLOCATOR)
            .args([
                "--pool",
                pool,
                "--no-state",
                "--socket",
                "/nonexistent/s",
                "--check",
            ])
            .output()
            .unwrap()
    };
    let some = check("127.0.0.2,203.0.113.77");
    assert!(some.status.success());
    assert!(String::from_utf8_lossy(&some.stderr).contains("203.0.113.77 cannot be used"));
    assert!(!check("203.0.113.77").status.success());
}

/// `--check-config` (the unit's `ExecStartPre`) validates without reading
/// the sources: a pool command failing at that moment does not refuse the
/// start (the running allocator retries it), a broken flag still does.
#[test]
fn check_config_reads_no_source() {
    let check = |what: &str, pool: &[&str]| {
        std::process::Command::new(ALLOCATOR)
            .args(pool)
            .args(["--no-state", "--socket", "/nonexistent/s", what])
            .output()
            .unwrap()
    };
    let down = ["--pool-command", "echo metadata API down >&2; exit 1"];
    let strict = check("--check", &down);
    assert!(!strict.status.success());
    assert!(String::from_utf8_lossy(&strict.stderr).contains("API down"));
    let config = check("--check-config", &down);
    assert!(config.status.success(), "{config:?}");
    assert!(String::from_utf8_lossy(&config.stderr).contains("not read"));
    assert!(!check("--check-config", &["--pool", "0.0.0.0"])
        .status
        .success());
    assert!(!check("--check-config", &["--refresh", "soon"])
        .status
        .success());
}

/// With `net.ipv4.ip_nonlocal_bind=1` (keepalived hosts set it) any
/// address binds, so a bind alone would vouch for a mistyped one: the
/// routing table has the last word, and the address is kept out of the
/// rotation as without the sysctl.
#[test]
fn nonlocal_bind_does_not_make_a_foreign_address_usable() {
    in_netns(
        "nonlocal_bind_does_not_make_a_foreign_address_usable",
        &[],
        || async {
            std::fs::write("/proc/sys/net/ipv4/ip_nonlocal_bind", "1").unwrap();
            let alloc = Allocator::start(&["--pool", "127.0.0.2,93.184.216.34"]).await;
            let status = status_json(&alloc.socket);
            assert_eq!(status["pool"][1]["ip"], "93.184.216.34");
            let reason = status["pool"][1]["quarantined"]["reason"]
                .as_str()
                .unwrap_or_default();
            assert!(reason.contains("not an address of this host"), "{status}");
            assert!(status["pool"][0]["quarantined"].is_null(), "{status}");
        },
    );
}

/// An IPv6 local route in a policy table no rule points at (a VRF's, a
/// transparent proxy's) makes none of its addresses this host's: the
/// prefix is out of the rotation with its reason, not leased to hang each
/// request until its 504 (`/proc/net/ipv6_route`, read before, lists
/// every table without saying which).
#[test]
fn an_ipv6_local_route_of_a_policy_table_is_not_the_hosts() {
    in_netns(
        "an_ipv6_local_route_of_a_policy_table_is_not_the_hosts",
        &[
            "-6 route add local 2001:db8:99::/64 dev lo table 100",
            "-6 route add local 2001:db8:98::/64 dev lo",
        ],
        || async {
            let alloc = Allocator::start(&["--pool", "2001:db8:99::/64,2001:db8:98::/64"]).await;
            let status = status_json(&alloc.socket);
            assert_eq!(status["pool"][0]["ip"], "2001:db8:99::/64");
            let reason = status["pool"][0]["quarantined"]["reason"]
                .as_str()
                .unwrap_or_default();
            assert!(
                reason.contains("not all of 2001:db8:99::/64 is this host's"),
                "{status}"
            );
            assert!(status["pool"][1]["quarantined"].is_null(), "{status}");
            // The /64 behind it is leased meanwhile.
            let next = status["families"][1]["next"].as_str().unwrap_or_default();
            assert!(next.starts_with("2001:db8:98:"), "{status}");
        },
    );
}

/// A pool address the network no longer routes from (it binds, so no
/// usability check finds it; every connect from it fails, here on a rule
/// that makes its connects unreachable) is taken out once the workers'
/// reports show its connects failing while the others' answer, for every
/// worker. Its time out over, it is tried again: out for twice as long
/// while it still fails, and serving again once mended.
#[test]
fn an_address_whose_connects_fail_is_taken_out_and_tried_again() {
    const RULE: &str = "rule add pref 10 from 127.0.0.4 to 127.0.0.0/8 unreachable";
    in_netns(
        "an_address_whose_connects_fail_is_taken_out_and_tried_again",
        &["rule del pref 0", "rule add pref 100 lookup local", RULE],
        || async {
            // Two sites (addresses of two /16s): failures to one alone
            // would be that site's refusal of the address, and take it out
            // nowhere.
            let origins = [
                Origin::start().await,
                Origin::start_on(SocketAddr::from(([127, 1, 0, 10], 0))).await,
            ];
            // The sources both sites saw from the `before`th request on.
            let seen = |before: [usize; 2]| -> Vec<IpAddr> {
                let mut v = origins[0].sources().split_off(before[0]);
                v.extend(origins[1].sources().split_off(before[1]));
                v
            };
            let counts = || origins.each_ref().map(|o| o.sources().len());
            let alloc = Allocator::start(&[
                "--pool",
                "127.0.0.2-127.0.0.5",
                "--unreachable-quarantine",
                "3s",
            ])
            .await;
            // (Each site would cool the address for itself after two
            // failures: this is the quarantine alone.)
            let w = Worker::start(&alloc.socket, &["--cooldown-connect-failures", "false"]).await;
            let socket = alloc.socket.clone();
            let reason = move || status_json(&socket)["pool"][2]["quarantined"]["reason"].clone();
            // Every fourth request leaves from 127.0.0.4 and fails, to
            // each site in turn (the sites take turns by rounds of four).
            // A failure counts once its site answered another address just
            // before and after it (the first to each, before the worker
            // watched it, does not): the eighth that counts takes it out,
            // at the worker's next report, within a second.
            let fails = |n: usize| {
                let origins = &origins;
                async move {
                    let mut failed = 0;
                    for i in 0..n {
                        let site = &origins[(i / 4) % 2];
                        let r = get(w.addr, &site.url("/")).await;
                        match r.status {
                            200 => {}
                            502 => failed += 1,
                            s => panic!("request {i}: {s} {:?}", r.body),
                        }
                    }
                    failed
                }
            };
            let failed = fails(48).await;
            assert!((10..=12).contains(&failed), "{failed}");
            let out = |what: &'static str| {
                let reason = reason.clone();
                async move {
                    eventually(what, || {
                        let r = reason();
                        async move { r.as_str().is_some() }
                    })
                    .await;
                    reason().as_str().unwrap().to_string()
                }
            };
            let why = out("127.0.0.4 out of the rotation").await;
            assert!(
                why.contains("connects failed where other addresses' were answered")
                    && why.contains("after 3s"),
                "{why}"
            );
            let before = counts();
            assert_eq!(fails(12).await, 0, "out for every request");
            assert!(!seen(before).contains(&"127.0.0.4".parse().unwrap()));
            // Its time over, it is back on trial; still failing, it goes
            // out for twice as long (after two failures, at the worker's
            // next report).
            let back = || {
                let reason = reason.clone();
                async move {
                    eventually("127.0.0.4 back on trial", || {
                        let r = reason();
                        async move { r.is_null() }
                    })
                    .await
                }
            };
            back().await;
            let failed = fails(32).await;
            assert!((2..=8).contains(&failed), "{failed}");
            let why = out("127.0.0.4 out again").await;
            assert!(why.contains("after 6s"), "{why}");
            // Mended: back after its time, and serving.
            ip(&RULE.replace("add", "del"));
            back().await;
            let before = counts();
            assert_eq!(fails(8).await, 0);
            let from = seen(before);
            assert!(from.contains(&"127.0.0.4".parse().unwrap()), "{from:?}");
        },
    );
}

/// A crawler meeting thousands of dead destinations (here: closed ports,
/// more than the 4 096 a worker watches) does not blind the watch: a pool
/// address that can connect nowhere is still taken out. Before, a full
/// watch list took no new destination, and the live sites' failures went
/// unseen.
#[test]
fn dead_destinations_past_the_watch_cap_do_not_hide_a_failing_address() {
    const RULE: &str = "rule add pref 10 from 127.0.0.4 to 127.0.0.0/8 unreachable";
    in_netns(
        "dead_destinations_past_the_watch_cap_do_not_hide_a_failing_address",
        &["rule del pref 0", "rule add pref 100 lookup local", RULE],
        || async {
            let origins = [
                Origin::start().await,
                Origin::start_on(SocketAddr::from(([127, 1, 0, 10], 0))).await,
            ];
            let alloc = Allocator::start(&[
                "--pool",
                "127.0.0.2-127.0.0.5",
                "--unreachable-quarantine",
                "60s",
            ])
            .await;
            let w = Worker::start(&alloc.socket, &["--cooldown-connect-failures", "false"]).await;
            // 4 500 dead destinations: ports nothing listens on, 16 at a
            // time.
            let mut ports = (20_000u16..24_500).collect::<Vec<_>>().into_iter();
            let mut tasks = Vec::new();
            for _ in 0..16 {
                let chunk: Vec<u16> = ports.by_ref().take(4500 / 16 + 1).collect();
                tasks.push(tokio::spawn(async move {
                    for p in chunk {
                        let r = get(w.addr, &format!("http://127.3.0.1:{p}/")).await;
                        assert_eq!(r.status, 502, "port {p}");
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            // Then the live sites, every fourth request from 127.0.0.4.
            for i in 0..48 {
                let r = get(w.addr, &origins[(i / 4) % 2].url("/")).await;
                assert!(matches!(r.status, 200 | 502), "{i}: {}", r.status);
            }
            let socket = alloc.socket.clone();
            eventually("127.0.0.4 out of the rotation", move || {
                let st = status_json(&socket);
                async move { st["pool"][2]["quarantined"]["reason"].is_string() }
            })
            .await;
        },
    );
}

/// An address whose packets go nowhere (its SYNs are dropped on the way:
/// here routed out of a veth pair to a next hop whose link-layer address
/// is no one's, so the far end drops every frame) has every connect time
/// out: taken out once other addresses were answered around its timed-out
/// connects, with clients asking two sites at once.
#[test]
fn an_address_whose_connects_time_out_is_taken_out() {
    in_netns(
        "an_address_whose_connects_time_out_is_taken_out",
        &[
            "link add v0 type veth peer name v1",
            "link set v0 up",
            "link set v1 up",
            "addr add 192.168.77.1/30 dev v0",
            "addr add 192.168.77.2/30 dev v1",
            "addr add 10.9.9.1/32 dev lo",
            "addr add 10.10.9.1/32 dev lo",
            "addr add 10.9.9.2/31 dev lo",
            "addr add 10.9.9.4/31 dev lo",
            "neigh add 192.168.77.2 lladdr 02:00:00:00:07:07 dev v0 nud permanent",
            "rule add pref 10 from 10.9.9.4 to 10.0.0.0/8 lookup 100",
            "route add 10.0.0.0/8 via 192.168.77.2 dev v0 table 100",
            "rule del pref 0",
            "rule add pref 100 lookup local",
        ],
        || async {
            let site = |b| Origin::start_on(SocketAddr::from(([10, b, 9, 1], 0)));
            let origins = [site(9).await, site(10).await];
            let alloc = Allocator::start(&["--pool", "10.9.9.2-10.9.9.5"]).await;
            let args = [
                "--allow-destination",
                "10.9.9.1",
                "--allow-destination",
                "10.10.9.1",
                "--connect-timeout",
                "1s",
                "--cooldown-connect-failures",
                "false",
            ];
            let w = Worker::start(&alloc.socket, &args).await;
            let urls = [origins[0].url("/"), origins[1].url("/")];
            let client = |c: usize| {
                let urls = urls.clone();
                async move {
                    let mut timed_out = 0;
                    for i in 0..24 {
                        let r = get(w.addr, &urls[(i + c) % 2]).await;
                        match r.status {
                            200 => {}
                            504 => timed_out += 1,
                            s => panic!("{s} {:?}", r.body),
                        }
                    }
                    timed_out
                }
            };
            let timed_out: usize = futures_util::future::join_all((0..4).map(client))
                .await
                .into_iter()
                .sum();
            assert!(timed_out >= 8, "{timed_out}");
            let socket = alloc.socket.clone();
            eventually("10.9.9.4 out of the rotation", || {
                let r = status_json(&socket)["pool"][2]["quarantined"]["reason"].clone();
                async move { r.as_str().is_some_and(|r| r.contains("connects failed")) }
            })
            .await;
        },
    );
}

/// A site that refuses one pool address (its firewall drops or rejects
/// it, here a rule that makes its connects unreachable) while it answers
/// the others takes that address out nowhere, even for a client that asks
/// no other site: that is the site's refusal, not the address's route.
/// It cools the address for that site: a first confirmed failure is a
/// suspicion, one 10 s or more later cools it; the site's requests then
/// leave from the other addresses, while other sites' still use it.
#[test]
fn a_site_that_refuses_one_address_cools_it_for_that_site_alone() {
    in_netns(
        "a_site_that_refuses_one_address_cools_it_for_that_site_alone",
        &[
            "rule del pref 0",
            "rule add pref 100 lookup local",
            "rule add pref 10 from 127.0.0.4 to 127.0.0.1 unreachable",
        ],
        || async {
            let refusing = Origin::start().await;
            let other = Origin::start_on(SocketAddr::from(([127, 1, 0, 10], 0))).await;
            let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let listen = metrics.to_string();
            let alloc =
                Allocator::start(&["--pool", "127.0.0.2-127.0.0.5", "--metrics-listen", &listen])
                    .await;
            let w = Worker::start(&alloc.socket, &[]).await;
            let four: IpAddr = "127.0.0.4".parse().unwrap();
            let round = |n: usize| {
                let url = refusing.url("/");
                async move {
                    let mut failed = 0;
                    for _ in 0..n {
                        match get(w.addr, &url).await.status {
                            200 => {}
                            502 => failed += 1,
                            s => panic!("{s}"),
                        }
                    }
                    failed
                }
            };
            let socket = alloc.socket.clone();
            let strikes = move || crate::sites::strikes(&socket, "127.0.0.1", four);
            // Every fourth from 127.0.0.4; the first failure is not
            // confirmed (the site was not watched yet), the second is (an
            // answer follows it, in 9): a suspicion, at the worker's next
            // report.
            assert!((2..=3).contains(&round(9).await));
            let s = strikes.clone();
            eventually("a suspicion of 127.0.0.4 for the site", || {
                let n = s();
                async move { n == Some(1) }
            })
            .await;
            assert_eq!(
                crate::sites::cooling_ms(&alloc.socket, "127.0.0.1", four),
                None
            );
            // Failing again, 10 s on, with no answer between: cooling (from
            // the worker's next report, which may come within the round).
            tokio::time::sleep(Duration::from_millis(10_500)).await;
            assert!((1..=3).contains(&round(9).await));
            let socket = alloc.socket.clone();
            eventually("127.0.0.4 cooling for the site", || {
                let c = crate::sites::cooling_ms(&socket, "127.0.0.1", four);
                async move { c.is_some() }
            })
            .await;
            let cooling = crate::sites::cooling_ms(&alloc.socket, "127.0.0.1", four);
            assert!(
                cooling.is_some_and(|ms| (40_000..=75_000).contains(&ms)),
                "{cooling:?}"
            );
            let before = refusing.sources().len();
            assert_eq!(round(8).await, 0);
            assert!(!refusing.sources()[before..].contains(&four));
            // Other sites are still served from it, in the shared rotation.
            for _ in 0..8 {
                assert_eq!(get(w.addr, &other.url("/")).await.status, 200);
            }
            assert_eq!(other.sources().iter().filter(|s| **s == four).count(), 2);
            let status = status_json(&alloc.socket);
            assert!(status["pool"][2]["quarantined"].is_null(), "{status}");
            let text = crate::metrics::scrape(metrics);
            let begun = |reason: &str| {
                let line = format!("rotor_site_cooldowns_total{{reason=\"{reason}\"}}");
                crate::metrics::series(&text, &line)
            };
            assert_eq!((begun("connect"), begun("pushback")), (1.0, 0.0));
        },
    );
}

/// A destination that refuses one pool address, reached by two names
/// (two sites) of one server, takes that address out nowhere: failures
/// count by the network of the address connected to, not by the name. A
/// client naming its own server twice took an address out of the
/// rotation for every user (review).
#[test]
fn two_names_of_one_server_refusing_an_address_take_it_out_nowhere() {
    in_netns(
        "two_names_of_one_server_refusing_an_address_take_it_out_nowhere",
        &[
            "rule del pref 0",
            "rule add pref 100 lookup local",
            "rule add pref 10 from 127.0.0.4 to 127.0.0.1 unreachable",
        ],
        || async {
            let dns = Dns::start().await;
            for name in ["a1.test", "b1.test"] {
                dns.set(name, std::net::Ipv4Addr::LOCALHOST, 60);
            }
            let origin = Origin::start().await;
            let port = origin.addr.port();
            let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.5"]).await;
            let server = dns.addr.to_string();
            let args = [
                "--dns-server",
                &server,
                "--cooldown-connect-failures",
                "false",
            ];
            let w = Worker::start(&alloc.socket, &args).await;
            let client = |c: usize| async move {
                let mut failed = 0;
                for i in 0..24 {
                    let host = ["a1.test", "b1.test"][(i + c) % 2];
                    match get(w.addr, &format!("http://{host}:{port}/")).await.status {
                        200 => {}
                        502 => failed += 1,
                        s => panic!("{s}"),
                    }
                }
                failed
            };
            let failed: usize = futures_util::future::join_all((0..4).map(client))
                .await
                .into_iter()
                .sum();
            // Every fourth request left from 127.0.0.4, and failed.
            assert!(failed >= 16, "{failed}");
            // The worker's reports (every second) have told the allocator.
            tokio::time::sleep(Duration::from_millis(2500)).await;
            let status = status_json(&alloc.socket);
            assert!(status["pool"][2]["quarantined"].is_null(), "{status}");
        },
    );
}

/// Through CONNECT tunnels too, and a site that takes the address again
/// clears it: a failure confirmed once is a suspicion, not a cooldown
/// (a site restarting refuses every address for a moment), and the
/// tunnel's connect from that address to the site that follows clears
/// it.
#[test]
fn a_site_that_takes_the_address_again_clears_the_suspicion() {
    const RULE: &str = "rule add pref 10 from 127.0.0.4 to 127.0.0.1 unreachable";
    in_netns(
        "a_site_that_takes_the_address_again_clears_the_suspicion",
        &["rule del pref 0", "rule add pref 100 lookup local", RULE],
        || async {
            let origin = Origin::start().await;
            let target = origin.addr.to_string();
            let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.5"]).await;
            let w = Worker::start(&alloc.socket, &[]).await;
            let four: IpAddr = "127.0.0.4".parse().unwrap();
            let tunnels = |n: usize| {
                let target = target.clone();
                async move {
                    let mut failed = 0;
                    for _ in 0..n {
                        match connect_tunnel(w.addr, &target).await.0 {
                            200 => {}
                            502 => failed += 1,
                            s => panic!("{s}"),
                        }
                    }
                    failed
                }
            };
            // Failures from 127.0.0.4: the first is not confirmed (the site
            // not watched yet), the second is (an answer follows it, in 9).
            assert!((2..=3).contains(&tunnels(9).await));
            let socket = alloc.socket.clone();
            eventually("a suspicion of 127.0.0.4 for the site", || {
                let s = crate::sites::strikes(&socket, "127.0.0.1", four);
                async move { s == Some(1) }
            })
            .await;
            assert_eq!(
                crate::sites::cooling_ms(&alloc.socket, "127.0.0.1", four),
                None
            );
            ip(&RULE.replace("add", "del"));
            assert_eq!(tunnels(8).await, 0);
            eventually("the suspicion cleared", || {
                let s = crate::sites::strikes(&socket, "127.0.0.1", four);
                async move { s.is_none() }
            })
            .await;
        },
    );
}

/// A destination that is down for every address takes none out, however
/// much of the traffic it draws and however often the addresses that fail
/// to reach it answer nothing else: here three of four requests go to a
/// closed port, each time from the same three addresses, while the fourth
/// answers from a live origin. (Counted by source alone, those three had
/// failed where another answered, and went out.)
#[tokio::test]
async fn a_destination_down_for_every_address_takes_none_out() {
    let origin = Origin::start().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.5"]).await;
    let w = Worker::start(&alloc.socket, &[]).await;
    let down = format!("http://127.0.0.1:{closed}/");
    for round in 0..12 {
        let r = get(w.addr, &origin.url("/")).await;
        assert_eq!(r.status, 200, "round {round}");
        for _ in 0..3 {
            let r = get(w.addr, &down).await;
            assert_eq!(r.status, 502, "round {round}: {:?}", r.body);
        }
        // Over several of the worker's reports.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let status = status_json(&alloc.socket);
    for e in status["pool"].as_array().unwrap() {
        assert!(e["quarantined"].is_null(), "{status}");
    }
    assert_eq!(origin.sources(), vec![ips(2..=2)[0]; 12]);
}

/// An address that goes away after the allocator checked it: the worker
/// that cannot bind it reports it, every worker stops getting it, and the
/// request is served from the next address. Once back, it rotates again.
#[test]
fn an_address_that_goes_away_is_reported_and_the_request_retried() {
    in_netns(
        "an_address_that_goes_away_is_reported_and_the_request_retried",
        &[
            "-6 addr add fd00:1::2/128 dev lo nodad",
            "-6 addr add fd00:1::3/128 dev lo nodad",
            "-6 addr add fd00:9::1/128 dev lo nodad",
        ],
        || async {
            let origin = Origin::start_on("[fd00:9::1]:0".parse().unwrap()).await;
            let alloc = Allocator::start(&["--pool", "fd00:1::2,fd00:1::3"]).await;
            let args = ["--allow-destination", "fd00:9::1"];
            let w = Worker::start(&alloc.socket, &args).await;
            ip("-6 addr del fd00:1::3/128 dev lo");
            for i in 0..4 {
                let r = get(w.addr, &origin.url("/")).await;
                assert_eq!(r.status, 200, "request {i}: {:?}", r.body);
            }
            assert_eq!(origin.sources(), vec![v6("fd00:1::2"); 4]);
            let status = status_json(&alloc.socket);
            let reason = status["pool"][1]["quarantined"]["reason"]
                .as_str()
                .unwrap()
                .to_string();
            assert!(
                reason.contains("a worker could not use fd00:1::3"),
                "{reason}"
            );
            // Back on the host: back in the rotation after its recheck.
            ip("-6 addr add fd00:1::3/128 dev lo nodad");
            let socket = alloc.socket.clone();
            eventually("fd00:1::3 back in the rotation", || {
                let socket = socket.clone();
                async move { status_json(&socket)["pool"][1]["quarantined"].is_null() }
            })
            .await;
            let mut seen = Vec::new();
            for _ in 0..2 {
                let r = get(w.addr, &origin.url("/")).await;
                assert_eq!(r.status, 200);
                seen.push(*origin.sources().last().unwrap());
            }
            seen.sort();
            assert_eq!(seen, [v6("fd00:1::2"), v6("fd00:1::3")]);
        },
    );
}

/// A route withdrawn under a listed pool takes its addresses out at the
/// first worker's report, all at once: the allocator checks the rest of
/// the rotation before it answers, and the retry leases from what is
/// left. Each report took out only the address it named, and every
/// request that leased two withdrawn addresses (its own and its retry's)
/// was a 503: four of the eight here.
#[test]
fn a_withdrawn_route_takes_its_addresses_out_at_the_first_report() {
    in_netns(
        "a_withdrawn_route_takes_its_addresses_out_at_the_first_report",
        &[
            "route add local 203.0.113.0/28 dev lo",
            "addr add 198.51.100.1/32 dev lo",
            "addr add 192.0.2.1/32 dev lo",
        ],
        || async {
            let origin = Origin::start_on("192.0.2.1:0".parse().unwrap()).await;
            let pool = "198.51.100.1,203.0.113.1-203.0.113.8";
            let alloc = Allocator::start(&["--pool", pool]).await;
            let w = Worker::start(&alloc.socket, &["--allow-destination", "192.0.2.1"]).await;
            for _ in 0..9 {
                assert_eq!(get(w.addr, &origin.url("/")).await.status, 200);
            }
            ip("route del local 203.0.113.0/28 dev lo");
            for i in 0..8 {
                let r = get(w.addr, &origin.url("/")).await;
                assert_eq!(r.status, 200, "request {i}: {}", r.proxy_status());
            }
            let sources = origin.sources();
            let one: IpAddr = "198.51.100.1".parse().unwrap();
            assert_eq!(sources[9..], [one; 8]);
            let status = status_json(&alloc.socket);
            let out = status["pool"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| !e["quarantined"].is_null())
                .count();
            assert_eq!(out, 8, "{status}");
        },
    );
}

/// A prefix's local route deleted while the worker's reading of the
/// routes (kept up to a second) still has it: the bind takes its next
/// address with freebind, and the SYN's answers go nowhere. At the
/// connect's timeout the worker reads the routes afresh, reports the
/// address, and serves the request from the next one: a 200 after the
/// timeout, not a 504.
#[test]
fn a_prefix_whose_route_goes_away_under_a_connect_is_retried() {
    in_netns(
        "a_prefix_whose_route_goes_away_under_a_connect_is_retried",
        &[
            "-6 route add local 2001:db8:7::/127 dev lo",
            "-6 addr add fd00:1::2/128 dev lo nodad",
            "-6 addr add fd00:9::1/128 dev lo nodad",
        ],
        || async {
            let origin = Origin::start_on("[fd00:9::1]:0".parse().unwrap()).await;
            let alloc = Allocator::start(&["--pool", "2001:db8:7::/127,fd00:1::2"]).await;
            let args = [
                "--allow-destination",
                "fd00:9::1",
                "--connect-timeout",
                "1s",
            ];
            let w = Worker::start(&alloc.socket, &args).await;
            // The first from the prefix, the routes read by the worker.
            assert_eq!(get(w.addr, &origin.url("/")).await.status, 200);
            ip("-6 route del local 2001:db8:7::/127 dev lo");
            let r = get(w.addr, &origin.url("/")).await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            let sources = origin.sources();
            assert_eq!(sources.len(), 2);
            assert!(sources[0].to_string().starts_with("2001:db8:7::"));
            assert_eq!(sources[1], v6("fd00:1::2"));
        },
    );
}

/// The same with `ip_nonlocal_bind` set (keepalived hosts: a VIP that
/// moved to the other node): the gone address still binds, so the bind
/// cannot tell. IPv4's connect then finds no route, and IPv6's SYN would
/// leave from an address whose answers go elsewhere (a 10 s timeout; here
/// out a default route to nowhere). The worker asks the routing table,
/// reports the address, and serves the request from the next one, in both
/// families.
#[test]
fn an_address_gone_under_nonlocal_bind_is_reported_and_the_request_retried() {
    in_netns(
        "an_address_gone_under_nonlocal_bind_is_reported_and_the_request_retried",
        &[
            "link add d9 type veth peer name p9",
            "link set p9 up",
            "link set d9 up",
            "addr add 10.8.0.2/24 dev d9",
            "route add default via 10.8.0.1",
            "-6 addr add fd00:8::2/64 dev d9 nodad",
            "-6 route add default via fd00:8::1",
            "addr add 10.9.9.2/32 dev lo",
            "addr add 10.9.9.3/32 dev lo",
            "-6 addr add fd00:1::2/128 dev lo nodad",
            "-6 addr add fd00:1::3/128 dev lo nodad",
            "-6 addr add fd00:9::1/128 dev lo nodad",
        ],
        || async {
            for family in ["ipv4", "ipv6"] {
                std::fs::write(format!("/proc/sys/net/{family}/ip_nonlocal_bind"), "1").unwrap();
            }
            // (Not on loopback: a SYN to it from an address not this
            // host's finds no route.)
            let origin4 = Origin::start_on("10.8.0.2:0".parse().unwrap()).await;
            let origin6 = Origin::start_on("[fd00:9::1]:0".parse().unwrap()).await;
            let alloc =
                Allocator::start(&["--pool", "10.9.9.2,10.9.9.3,fd00:1::2,fd00:1::3"]).await;
            let args = [
                "--allow-destination",
                "fd00:9::1",
                "--allow-destination",
                "10.8.0.2/32",
            ];
            let w = Worker::start(&alloc.socket, &args).await;
            run_ok("ip", &["addr", "del", "10.9.9.3/32", "dev", "lo"], "ip");
            run_ok(
                "ip",
                &["-6", "addr", "del", "fd00:1::3/128", "dev", "lo"],
                "ip",
            );
            // The worker's reading of the routes is at most a second old.
            tokio::time::sleep(Duration::from_millis(1100)).await;
            for i in 0..4 {
                let r =
                    tokio::time::timeout(Duration::from_secs(5), get(w.addr, &origin4.url("/")))
                        .await
                        .expect("hung");
                assert_eq!(r.status, 200, "v4 request {i}: {:?}", r.body);
                let r =
                    tokio::time::timeout(Duration::from_secs(5), get(w.addr, &origin6.url("/")))
                        .await
                        .expect("hung: a SYN from an address the host no longer holds");
                assert_eq!(r.status, 200, "v6 request {i}: {:?}", r.body);
            }
            let kept: IpAddr = "10.9.9.2".parse().unwrap();
            assert_eq!(origin4.sources(), vec![kept; 4]);
            assert_eq!(origin6.sources(), vec![v6("fd00:1::2"); 4]);
            // Out, each: the first reported by the worker, the other
            // reported too, or found by the check of the rotation that
            // report asks for (then never leased).
            let status = status_json(&alloc.socket);
            let reason = |i: usize| status["pool"][i]["quarantined"]["reason"].as_str();
            let reported = |gone: &str| format!("a worker could not use {gone}");
            let found = "not an address of this host";
            let (first, second) = match reason(1).is_some_and(|r| r.contains(&reported("10.9.9.3")))
            {
                true => ((1, "10.9.9.3"), 3),
                false => ((3, "fd00:1::3"), 1),
            };
            assert!(
                reason(first.0)
                    .unwrap_or_default()
                    .contains(&reported(first.1)),
                "{status}"
            );
            let other = reason(second).unwrap_or_default();
            match other.contains(found) {
                true => assert_eq!(status["pool"][second]["leases"], 0, "{status}"),
                false => assert!(other.contains("a worker could not use"), "{status}"),
            }
        },
    );
}

/// A fake AWS metadata service (IMDSv2 token flow) listing `ipv4s` for one
/// interface; the list can change under it.
async fn fake_imds(ipv4s: Arc<Mutex<String>>) -> SocketAddr {
    let (addr, _) = recording_server(move |mut s: TcpStream| {
        let ipv4s = ipv4s.clone();
        async move {
            let mut head = Vec::new();
            let mut b = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&b[..n]),
                }
            }
            let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
            let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
            let base = "/latest/meta-data/network/interfaces/macs/";
            let (status, body) = if head.starts_with("put /latest/api/token") {
                (200, "tok".to_string())
            } else if !head.contains("x-aws-ec2-metadata-token: tok") {
                (401, String::new())
            } else if path == base {
                (200, "02:fc:00:00:00:01/".to_string())
            } else if path == format!("{base}02:fc:00:00:00:01/local-ipv4s") {
                (200, ipv4s.lock().unwrap().clone())
            } else {
                (404, String::new())
            };
            let resp = format!(
                "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        }
    })
    .await;
    addr
}

/// `--metadata aws`: the pool is what the (fake) instance metadata service
/// lists, refreshed with the others; a failed read keeps the last good list.
// Multi-threaded: the fake service must answer while the test thread
// waits for `rotor reload`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_can_come_from_the_cloud_metadata_service() {
    let ipv4s = Arc::new(Mutex::new("127.0.0.2\n127.0.0.3\n".to_string()));
    let imds = fake_imds(ipv4s.clone()).await;
    let origin = Origin::start().await;
    let endpoint = format!("http://{imds}");
    let alloc = Allocator::start(&[
        "--metadata",
        "aws",
        "--metadata-endpoint",
        &endpoint,
        "--metadata-mac",
        "02FC00000001",
    ])
    .await;
    let w = Worker::start(&alloc.socket, &[]).await;
    for _ in 0..4 {
        assert_eq!(get(w.addr, &origin.url("/")).await.status, 200);
    }
    assert_eq!(origin.sources(), cycle(&ips(2..=3), 4));
    // The provider attaches one more address: in at the next refresh.
    *ipv4s.lock().unwrap() = "127.0.0.2\n127.0.0.3\n127.0.0.4\n".to_string();
    rotor_control("reload", &alloc.socket, &[]);
    for _ in 0..3 {
        assert_eq!(get(w.addr, &origin.url("/")).await.status, 200);
    }
    assert_eq!(origin.sources()[4..], ips(2..=4)[..]);
    // The service answers garbage: the last good list stays, and says why.
    *ipv4s.lock().unwrap() = "garbage".to_string();
    let out = std::process::Command::new(ROTOR)
        .args(["reload", "--socket", alloc.socket.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "a failed source is said");
    let status = status_json(&alloc.socket);
    assert_eq!(status["pool"].as_array().unwrap().len(), 3);
    let err = status["sources"][0]["error"].as_str().unwrap();
    assert!(err.contains("`garbage` is not one address"), "{err}");
}

/// With no pool flags the pool is the host's addresses that reach the
/// internet: an uplink's (with its default routes), a second one on the
/// same interface, and a routed block's addresses put on lo (one under a
/// label, `lo:0`, as LVS and ifconfig add them); not a docker
/// style bridge's, whose requests would leave through the uplink and be
/// masqueraded to its address. Without a default route, all of them.
/// Never an IPv6 address deprecated as its lifetime runs out (the kernel's
/// own source selection avoids it), by default or by interface; one
/// deprecated for good (`preferred_lft 0` on a permanent address, as
/// keepalived adds its virtual ones) is kept.
#[test]
fn the_default_pool_leaves_out_a_bridge_without_a_route_out() {
    in_netns(
        "the_default_pool_leaves_out_a_bridge_without_a_route_out",
        &[
            "link add up9 type veth peer name peer9",
            "link set peer9 up",
            "link set up9 up",
            "addr add 10.1.0.2/24 dev up9",
            "addr add 10.1.0.3/24 dev up9",
            "addr add 10.1.0.4/24 dev up9 label up9:1",
            "route add default via 10.1.0.1 dev up9",
            "-6 addr add fd00:5::2/64 dev up9 nodad",
            "-6 addr add fd00:5::3/64 dev up9 nodad valid_lft 3600 preferred_lft 0",
            "-6 addr add fd00:5::4/64 dev up9 nodad preferred_lft 0",
            "-6 route add default via fd00:5::1 dev up9",
            "link add br9 type bridge",
            "link set br9 up",
            "addr add 172.17.0.1/16 dev br9",
            "-6 addr add fd00:6::1/64 dev br9 nodad",
            "addr add 198.51.100.7/32 dev lo",
            "addr add 198.51.100.8/32 dev lo label lo:0",
        ],
        || async {
            let alloc = Allocator::start(&[]).await;
            let status = status_json(&alloc.socket);
            assert_eq!(
                sorted_pool(&status),
                [
                    "10.1.0.2",
                    "10.1.0.3",
                    "10.1.0.4",
                    "198.51.100.7",
                    "198.51.100.8",
                    "fd00:5::2",
                    "fd00:5::4"
                ],
                "{status}"
            );
            // An interface named, or its MAC: its addresses under a label
            // (`up9:1`, as ifupdown's aliases) too; a label named: its own.
            // (Not /sys/class/net: sysfs shows the namespace it was
            // mounted in.)
            let link = std::process::Command::new("ip")
                .args(["-o", "link", "show", "up9"])
                .output()
                .unwrap();
            let link = String::from_utf8_lossy(&link.stdout).into_owned();
            let mac = link
                .split_whitespace()
                .skip_while(|w| *w != "link/ether")
                .nth(1)
                .unwrap_or_else(|| panic!("{link}"))
                .to_string();
            for (sel, want) in [
                (
                    "up9",
                    &["10.1.0.2", "10.1.0.3", "10.1.0.4", "fd00:5::2", "fd00:5::4"][..],
                ),
                (
                    mac.trim(),
                    &["10.1.0.2", "10.1.0.3", "10.1.0.4", "fd00:5::2", "fd00:5::4"],
                ),
                ("up9:1", &["10.1.0.4"]),
                ("lo", &["198.51.100.7", "198.51.100.8"]),
            ] {
                let one = Allocator::start(&["--interface", sel]).await;
                let pool = sorted_pool(&status_json(&one.socket));
                assert_eq!(pool, want, "--interface {sel}");
            }
            // With no default route at all, no address reaches the
            // internet, and every one is kept (for local destinations).
            run_ok("ip", &["route", "del", "default"], "ip");
            run_ok("ip", &["-6", "route", "del", "default"], "ip");
            let out = rotor_control("reload", &alloc.socket, &[]);
            assert!(out.contains("9 addresses"), "{out}");
        },
    );
}

/// A network that hands out a unique local IPv6 address (fc00::/7) beside
/// a global one: the default pool leaves the ULA out (leased toward the
/// internet, its requests would time out). Alone, a ULA stays (NAT66; see
/// the test above).
#[test]
fn the_default_pool_leaves_out_a_ula_beside_a_global_address() {
    in_netns(
        "the_default_pool_leaves_out_a_ula_beside_a_global_address",
        &[
            "link add up9 type veth peer name peer9",
            "link set peer9 up",
            "link set up9 up",
            "addr add 10.1.0.2/24 dev up9",
            "route add default via 10.1.0.1 dev up9",
            "-6 addr add fd00:5::2/64 dev up9 nodad",
            "-6 addr add 2001:db8:5::2/64 dev up9 nodad",
            "-6 route add default via 2001:db8:5::1 dev up9",
        ],
        || async {
            let alloc = Allocator::start(&[]).await;
            let mut pool = pool_of(&status_json(&alloc.socket));
            pool.sort();
            assert_eq!(pool, [v6("10.1.0.2"), v6("2001:db8:5::2")]);
        },
    );
}

/// A second interface's address whose traffic the host routes out of the
/// first (a cloud VM's secondary network interface without source
/// routing, whose requests would time out there) is warned of by `--check`
/// and the allocator's log, with the commands that mend it, and stays in
/// the rotation (on one L2 segment it may work). Once mended, the log says
/// nothing more and `--check` is quiet; broken again, it is said again.
#[test]
fn an_interface_address_routed_out_of_another_is_warned_of() {
    in_netns(
        "an_interface_address_routed_out_of_another_is_warned_of",
        &[
            "link add up9 type veth peer name peer9",
            "link set peer9 up",
            "link set up9 up",
            "addr add 10.1.0.2/24 dev up9",
            "route add default via 10.1.0.1 dev up9",
            "link add up8 type veth peer name peer8",
            "link set peer8 up",
            "link set up8 up",
            "addr add 10.2.0.5/24 dev up8",
        ],
        || async {
            let check = || {
                let out = std::process::Command::new(ALLOCATOR)
                    .args(["--interface", "up8", "--no-state"])
                    .args(["--socket", "/nonexistent/s", "--check"])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "a warning does not fail --check");
                String::from_utf8_lossy(&out.stderr).into_owned()
            };
            let said = check();
            assert!(
                said.contains("warning: 10.2.0.5 is up8's, but this host sends to the internet from it through up9"),
                "{said}"
            );
            assert!(
                said.contains("`ip rule add from 10.2.0.5 table 100`"),
                "{said}"
            );

            let dir = Arc::new(tempfile::tempdir().unwrap());
            let log = dir.path().join("allocator.log");
            let alloc = Allocator::start_logging(dir.clone(), &["--interface", "up8"], &log).await;
            let logged = |what: &'static str| {
                let log = log.clone();
                move || {
                    let log = log.clone();
                    async move {
                        std::fs::read_to_string(&log)
                            .unwrap_or_default()
                            .contains(what)
                    }
                }
            };
            eventually(
                "the warning in the log",
                logged("pool address may not reach the internet"),
            )
            .await;
            let status = status_json(&alloc.socket);
            assert_eq!(status["pool"][0]["ip"], "10.2.0.5");
            assert!(status["pool"][0]["quarantined"].is_null(), "{status}");

            run_ok(
                "ip",
                &["rule", "add", "from", "10.2.0.5", "table", "100"],
                "ip",
            );
            let table = [
                "route", "add", "default", "via", "10.2.0.1", "dev", "up8", "table", "100",
            ];
            run_ok("ip", &table, "ip");
            // Mended: quiet, and a reload says nothing more.
            rotor_control("reload", &alloc.socket, &[]);
            rotor_control("reload", &alloc.socket, &[]);
            let warnings = || {
                std::fs::read_to_string(&log)
                    .unwrap()
                    .matches("may not reach the internet")
                    .count()
            };
            assert_eq!(warnings(), 1, "said once");
            assert!(!check().contains("warning"));
            // Broken again: said again.
            run_ok(
                "ip",
                &["rule", "del", "from", "10.2.0.5", "table", "100"],
                "ip",
            );
            rotor_control("reload", &alloc.socket, &[]);
            assert_eq!(warnings(), 2, "said again once broken again");
        },
    );
}

/// An interface that goes away: `--interface` fails from then on and keeps
/// its last good addresses, and those are checked at each refresh like
/// any other — out of the rotation, with why, not left to fail each
/// worker's bind. (A failed source's entries were never checked again.)
#[test]
fn a_failed_sources_kept_addresses_are_still_checked() {
    in_netns(
        "a_failed_sources_kept_addresses_are_still_checked",
        &[
            "link add up7 type veth peer name peer7",
            "link set peer7 up",
            "link set up7 up",
            "addr add 10.3.0.5/32 dev up7",
            "addr add 10.3.0.6/32 dev lo",
        ],
        || async {
            let alloc = Allocator::start(&[
                "--interface",
                "up7",
                "--pool",
                "10.3.0.6",
                "--refresh",
                "1h",
            ])
            .await;
            let quarantined = |status: &serde_json::Value, ip: &str| {
                status["pool"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|e| e["ip"] == ip)
                    .unwrap_or_else(|| panic!("{ip} listed: {status}"))["quarantined"]
                    .clone()
            };
            let status = status_json(&alloc.socket);
            assert!(quarantined(&status, "10.3.0.5").is_null(), "{status}");
            run_ok("ip", &["link", "del", "up7"], "ip");
            // The reload names the failed source (exit 3); its status says
            // the kept address is out, and why.
            let out = std::process::Command::new(ROTOR)
                .args(["reload", "--socket", alloc.socket.to_str().unwrap()])
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(3), "{out:?}");
            let status = status_json(&alloc.socket);
            let q = quarantined(&status, "10.3.0.5");
            assert!(!q.is_null(), "{status}");
            assert!(quarantined(&status, "10.3.0.6").is_null(), "{status}");
        },
    );
}

/// An address that leaves the host (a failover address moved away) is not
/// reused through the idle upstream connections kept from it: their
/// answers go nowhere now, and a request on one waited out
/// `--response-timeout` for its 504. The worker hears of the change from
/// the kernel, and connects anew (the address refused at the bind, the
/// next one serves).
#[test]
fn idle_connections_from_an_address_that_left_are_not_reused() {
    in_netns(
        "idle_connections_from_an_address_that_left_are_not_reused",
        &["addr add 10.9.0.2/32 dev lo", "addr add 10.9.0.3/32 dev lo"],
        || async {
            let origin = Origin::start().await;
            let alloc = Allocator::start(&["--pool", "10.9.0.2-10.9.0.3"]).await;
            let w = Worker::start(&alloc.socket, &["--response-timeout", "5s"]).await;
            // Idle connections kept from both.
            for _ in 0..4 {
                assert_eq!(get(w.addr, &origin.url("/")).await.status, 200);
            }
            assert_eq!(origin.connections_used(), 2);
            // An address added takes none of them away.
            let ip = |args: &[&str]| run_ok("ip", args, "the ip command (iproute2)");
            ip(&["addr", "add", "10.9.0.9/32", "dev", "lo"]);
            tokio::time::sleep(Duration::from_millis(300)).await;
            for _ in 0..2 {
                assert_eq!(get(w.addr, &origin.url("/")).await.status, 200);
            }
            assert_eq!(origin.connections_used(), 2, "idle connections dropped");
            ip(&["addr", "del", "10.9.0.3/32", "dev", "lo"]);
            tokio::time::sleep(Duration::from_millis(300)).await;
            for i in 0..4 {
                let r = get(w.addr, &origin.url("/")).await;
                assert_eq!(r.status, 200, "{i}: {}", r.proxy_status());
            }
            let after: Vec<IpAddr> = origin.sources()[6..].to_vec();
            let kept: IpAddr = "10.9.0.2".parse().unwrap();
            assert!(after.iter().all(|ip| *ip == kept), "{after:?}");
        },
    );
}

/// A request from a /64 leaves no idle upstream connection behind: its
/// address comes round again once in 2^44 leases, so none would be
/// reused, and the destination saw thousands held open from one /64. A
/// sticky session's address does come again: its connection is kept.
#[test]
fn a_vast_prefix_leaves_no_idle_connections_but_a_session_keeps_one() {
    in_netns(
        "a_vast_prefix_leaves_no_idle_connections_but_a_session_keeps_one",
        &[
            "-6 route add local fd00:1:2::/64 dev lo",
            "-6 addr add fd00:9::1/128 dev lo nodad",
        ],
        || async {
            let origin = Origin::start_on("[fd00:9::1]:0".parse().unwrap()).await;
            let port = origin.addr.port();
            let alloc = Allocator::start(&["--pool", "fd00:1:2::/64"]).await;
            let w = Worker::start(&alloc.socket, &["--allow-destination", "fd00:9::1"]).await;
            let established = || {
                let filter = format!("( sport = :{port} )");
                let out = run_ok(
                    "ss",
                    &["-Htn", "state", "established", &filter],
                    "ss (iproute2)",
                );
                String::from_utf8_lossy(&out).lines().count()
            };
            for _ in 0..10 {
                assert_eq!(get(w.addr, &origin.url("/")).await.status, 200);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(established(), 0, "idle connections kept from the /64");
            assert_eq!(origin.connections_used(), 10);
            for _ in 0..3 {
                let r =
                    crate::sessions::get_as(w.addr, "u-session-s1", &origin.url("/"), None).await;
                assert_eq!(r.status, 200);
            }
            assert_eq!(
                origin.connections_used(),
                11,
                "the session's connection not kept"
            );
        },
    );
}

/// A state directory whose position was saved in the key's order alone
/// (an allocator of minor 17 or before: no `order.by-prefix` there) is
/// said once, at the first start of this release: each prefix continues
/// at its saved address's place in its own order, and one partly leased
/// may lease some addresses again. Nothing told of it. A pool of listed
/// addresses alone has nothing leased in an order: nothing is said.
#[tokio::test]
async fn an_order_saved_by_the_key_alone_is_said_once() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let log = dir.path().join("allocator.log");
    let pool = ["--pool", "127.0.0.2-127.0.0.3"];
    let marker = dir.path().join("state/order.by-prefix");
    let said_new = || said(&log, "prefixes are leased each in an order of its own");
    {
        let alloc = Allocator::start_logging(dir.clone(), &pool, &log).await;
        // A fresh state directory is no upgrade.
        assert!(marker.exists());
        let worker = Worker::start(&alloc.socket, &[]).await;
        let origin = Origin::start().await;
        assert_eq!(get(worker.addr, &origin.url("/")).await.status, 200);
    }
    assert_eq!(said_new(), 0);
    // As an older release left it, with listed addresses alone: nothing
    // of theirs is leased in an order, so nothing to say.
    std::fs::remove_file(&marker).unwrap();
    drop(Allocator::start_logging(dir.clone(), &pool, &log).await);
    assert_eq!(said_new(), 0, "said for a pool without a prefix");
    assert!(marker.exists());
    // With a prefix (a /15 is leased in an order, not listed).
    let with_prefix = ["--pool", "127.0.0.2-127.0.0.3", "--pool", "127.64.0.0/15"];
    std::fs::remove_file(&marker).unwrap();
    drop(Allocator::start_logging(dir.clone(), &with_prefix, &log).await);
    assert_eq!(said_new(), 1);
    assert!(marker.exists());
    drop(Allocator::start_logging(dir.clone(), &with_prefix, &log).await);
    assert_eq!(said_new(), 0, "said again");
}

/// An address listed on its own inside a /64 the pool leases: taken out by
/// hand, it is said to lie inside the /64, which stays in the rotation
/// (`rotor status` shows no entry of its own for it: it was said out, and
/// the status showed nothing out).
#[test]
fn an_address_taken_out_inside_a_prefix_is_said_to_lie_inside_it() {
    in_netns(
        "an_address_taken_out_inside_a_prefix_is_said_to_lie_inside_it",
        &["-6 route add local 2001:db8:8::/64 dev lo"],
        || async {
            let dir = Arc::new(tempfile::tempdir().unwrap());
            let (token_file, token) = admin_token_in(dir.path());
            let port = free_port();
            let listen = format!("127.0.0.1:{port}");
            let args = [
                "--pool",
                "2001:db8:8::/64",
                "--pool",
                "2001:db8:8::5",
                "--metrics-listen",
                &listen,
                "--admin-token-file",
                token_file.to_str().unwrap(),
            ];
            let alloc = Allocator::start_in(dir.clone(), &args).await;
            let out = std::process::Command::new(ROTOR)
                .args(["quarantine", "--socket", alloc.socket.to_str().unwrap()])
                .arg("2001:db8:8::5")
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{err}");
            assert!(
                err.contains("it lies inside 2001:db8:8::/64, which stays in the rotation"),
                "{err}"
            );
            let body = r#"{"address":"2001:db8:8::5"}"#;
            let req = format!(
                "POST /admin/quarantine HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let mut s = std::net::TcpStream::connect(&listen).unwrap();
            use std::io::{Read, Write};
            s.write_all(req.as_bytes()).unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).unwrap();
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            assert!(answer.contains(r#""inside":"2001:db8:8::/64""#), "{answer}");
        },
    );
}
