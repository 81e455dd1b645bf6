//! The host's metrics (`--metrics-listen`): every worker's figures added up
//! at the allocator, checked by `promtool` and scraped by a real Prometheus
//! server; addresses taken out of the rotation by hand.
//!
//! promtool and prometheus come with Debian's `prometheus` package, which
//! `.ci/run` installs.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::util::*;

/// A plain HTTP GET on loopback (no proxy): status and body.
fn http_get(addr: SocketAddr, path: &str, accept: &str) -> (u16, String) {
    http(
        addr,
        &format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
        ),
    )
}

/// Sends `request` (a whole HTTP/1.1 request, `Connection: close`) on a
/// new connection: the status and the body (the samples are lines of it,
/// chunked or not).
fn http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// The value of a sample line `name{labels} value` (labels as written).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The sum of every sample of `name` whose labels contain `with`.
fn sum(text: &str, name: &str, with: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| l.contains(with))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The value of the series `line` (name and labels, as written) in a
/// scrape's `text`.
pub(crate) fn series(text: &str, line: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line).filter(|v| v.starts_with(' ')))
        .unwrap_or_else(|| panic!("no {line} in {text}"))
        .trim()
        .parse()
        .unwrap()
}

pub(crate) fn scrape(metrics: SocketAddr) -> String {
    let (status, body) = http_get(metrics, "/metrics", "text/plain");
    assert_eq!(status, 200);
    body
}

async fn tunnel(proxy: SocketAddr, target: SocketAddr) {
    let (status, mut s) = connect_tunnel(proxy, &target.to_string()).await;
    assert_eq!(status, 200);
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.unwrap();
}

fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; .ci/run installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn one_scrape_covers_every_worker_and_counters_survive_a_worker_restart() {
    if !have(
        "one_scrape_covers_every_worker_and_counters_survive_a_worker_restart",
        &["promtool"],
    ) {
        return;
    }
    let origin = Origin::start().await;
    let echo = Echo::start().await;
    let mport = free_port();
    let metrics: SocketAddr = ([127, 0, 0, 1], mport).into();
    let listen = metrics.to_string();
    let alloc =
        Allocator::start(&["--pool", "127.0.0.2-127.0.0.5", "--metrics-listen", &listen]).await;
    let w0 = Worker::start(&alloc.socket, &[]).await;
    let port1 = free_port();
    let mut w1 = Worker::start_on(&alloc.socket, port1, &[]).await;
    let url = origin.url("/bytes/1000");
    for _ in 0..10 {
        assert_eq!(get(w0.addr, &url).await.status, 200);
    }
    for _ in 0..6 {
        assert_eq!(get(w1.addr, &origin.url("/")).await.status, 200);
    }
    for _ in 0..2 {
        tunnel(w1.addr, echo.addr).await;
    }
    // Refused by the destination: rotor's own answer, and a connect error.
    assert_eq!(get(w0.addr, "http://127.0.0.1:1/").await.status, 502);
    eventually("the workers' reports", || async {
        let m = scrape(metrics);
        sum(&m, "rotor_source_responses_total", "class=\"2xx\"") == 16.0
            && sum(&m, "rotor_source_tunnels_total", "") == 2.0
            && sum(&m, "rotor_errors_total", "connection_refused") == 1.0
    })
    .await;
    let m = scrape(metrics);
    promtool_check(&m);
    assert_eq!(sum(&m, "rotor_worker_up", ""), 2.0, "{m}");
    assert_eq!(sum(&m, "rotor_requests_total", ""), 19.0, "{m}");
    assert_eq!(sum(&m, "rotor_source_connect_errors_total", ""), 1.0);
    // Every address served, each its share; bytes counted.
    for a in ips(2..=5) {
        let served = sum(
            &m,
            "rotor_source_responses_total",
            &format!("source=\"{a}\""),
        );
        assert!(served >= 3.0, "{a}: {served}\n{m}");
    }
    assert!(sum(&m, "rotor_source_received_bytes_total", "") >= 10_000.0 + 6.0 * 5.0);
    assert!(sum(&m, "rotor_source_sent_bytes_total", "") >= 8.0);
    assert_eq!(
        sample(&m, "rotor_pool_addresses{family=\"IPv4\"}"),
        Some(4.0),
        "{m}"
    );
    assert_eq!(sample(&m, "rotor_leases_total"), Some(19.0), "{m}");
    assert!(sample(&m, "rotor_request_duration_seconds_count").unwrap() >= 19.0);
    assert!(sample(&m, "rotor_upstream_connect_seconds_count").unwrap() >= 9.0);
    // A worker killed and started again: the host's counters go on.
    w1.proc.signal(nix::sys::signal::Signal::SIGKILL);
    w1.proc.wait(Duration::from_secs(5));
    let w1 = Worker::start_on(&alloc.socket, port1, &[]).await;
    for _ in 0..4 {
        assert_eq!(get(w1.addr, &origin.url("/")).await.status, 200);
    }
    eventually("the new worker's report", || async {
        sum(
            &scrape(metrics),
            "rotor_source_responses_total",
            "class=\"2xx\"",
        ) == 20.0
    })
    .await;
    let m = scrape(metrics);
    assert_eq!(
        sum(&m, "rotor_worker_up", ""),
        2.0,
        "the killed worker is gone:\n{m}"
    );
    // `rotor status` says the same, with each worker's listener.
    let st = rotor_control("status", &alloc.socket, &[]);
    assert!(
        st.contains("served: 23 requests; 1 answer by rotor itself (connection_refused 1)")
            && st.contains("workers: 2")
            && st.contains(&format!("http 127.0.0.1:{port1}"))
            && st.contains("4 addresses in rotation (4 entries"),
        "{st}"
    );
    // OpenMetrics to a scraper that asks for it.
    let (status, open) = http_get(
        metrics,
        "/metrics",
        "application/openmetrics-text;version=1.0.0",
    );
    assert_eq!(status, 200);
    assert!(open.contains("# EOF"), "{open}");
    assert_eq!(http_get(metrics, "/nothing", "*/*").0, 404);
    assert_eq!(http_get(metrics, "/health", "*/*").0, 200);
    // HEAD is answered without a body; another method is a 405.
    let head = |method: &str, path: &str| {
        http(
            metrics,
            &format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        )
    };
    assert_eq!(head("HEAD", "/health"), (200, String::new()));
    assert_eq!(head("HEAD", "/metrics").0, 200);
    assert_eq!(head("POST", "/metrics").0, 405);
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_host() {
    if !have("a_real_prometheus_scrapes_the_host", &["prometheus"]) {
        return;
    }
    let origin = Origin::start().await;
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let listen = metrics.to_string();
    let alloc =
        Allocator::start(&["--pool", "127.0.0.2-127.0.0.9", "--metrics-listen", &listen]).await;
    let w = Worker::start(&alloc.socket, &[]).await;
    for _ in 0..7 {
        assert_eq!(get(w.addr, &origin.url("/")).await.status, 200);
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: rotor\n    static_configs:\n      - targets: ['{metrics}']\n"
        ),
    )
    .unwrap();
    let web: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let _prom = Proc::spawn(
        "prometheus",
        &[
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", dir.path().join("data").display()),
            &format!("--web.listen-address={web}"),
            "--log.level=warn",
        ],
    );
    let query = "/api/v1/query?query=sum(rotor_source_responses_total%7Bclass%3D%222xx%22%7D)";
    let mut last = String::new();
    for _ in 0..120 {
        if let Ok(mut s) = std::net::TcpStream::connect(web) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = write!(
                s,
                "GET {query} HTTP/1.1\r\nHost: {web}\r\nConnection: close\r\n\r\n"
            );
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            // {"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[T,"7"]}]}}
            if out.contains("\"value\":[") && out.contains(",\"7\"]") {
                println!(
                    "prometheus answered {query}: {}",
                    out.split("\r\n\r\n").last().unwrap_or("")
                );
                return;
            }
            last = out;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("Prometheus never saw 7 requests; its last answer:\n{last}");
}

/// A prefix as `rotor status` lists it names that entry to `rotor
/// quarantine` and `rotor release`; one that is no entry (a wider one
/// whose first address another entry holds) changes nothing, and says so.
#[tokio::test]
async fn a_prefix_names_its_entry_to_quarantine_and_release() {
    // (A prefix of up to 65 536 addresses is listed address by address.)
    let alloc = Allocator::start(&["--pool", "127.0.0.2", "--pool", "127.2.0.0/15"]).await;
    let out = rotor_control("quarantine", &alloc.socket, &["127.2.0.0/15"]);
    assert!(
        out.contains("127.2.0.0/15 is out of the rotation until `rotor release 127.2.0.0/15`"),
        "{out}"
    );
    assert_eq!(alloc_addresses_in_rotation(&alloc.socket), 1);
    let narrower = std::process::Command::new(ROTOR)
        .args([
            "quarantine",
            "--socket",
            alloc.socket.to_str().unwrap(),
            "127.2.0.0/16",
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&narrower.stderr);
    assert!(!narrower.status.success(), "{said}");
    assert!(
        said.contains("127.2.0.0/16 is not a pool entry (127.2.0.0/15 holds its first address"),
        "{said}"
    );
    let out = rotor_control("release", &alloc.socket, &["127.2.0.0/15"]);
    assert!(
        out.contains("127.2.0.0/15 is back in the rotation"),
        "{out}"
    );
    assert_eq!(alloc_addresses_in_rotation(&alloc.socket), 1 + (1 << 17));
}

/// The addresses in rotation, as `rotor status --json` counts them.
fn alloc_addresses_in_rotation(socket: &std::path::Path) -> u64 {
    status_json(socket)["families"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["total"].as_u64().unwrap())
        .sum()
}

/// Taking a family's last address out by hand is done, and said: every
/// request needing one is a 503 then. It said only "out of the rotation".
#[tokio::test]
async fn taking_out_the_last_address_by_hand_is_said() {
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.3", "--pool", "::1"]).await;
    let quarantine = |ip: &str| {
        let out = std::process::Command::new(ROTOR)
            .args(["quarantine", "--socket", alloc.socket.to_str().unwrap(), ip])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let first = quarantine("127.0.0.2");
    assert!(!first.contains("no IPv4 address is left"), "{first}");
    let last = quarantine("127.0.0.3");
    assert!(
        last.contains("warning: no IPv4 address is left in the rotation"),
        "{last}"
    );
    // IPv6's address serves on: /health does too (it said it answered
    // 503). Once that goes as well, it does.
    assert!(!last.contains("/health"), "{last}");
    let six = quarantine("::1");
    assert!(
        six.contains("no IPv6 address is left in the rotation")
            && six.contains("/health answers 503"),
        "{six}"
    );
}

#[tokio::test]
async fn an_address_taken_out_by_hand_stays_out_for_every_worker_until_released() {
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.4"]).await;
    let w = [
        Worker::start(&alloc.socket, &[]).await,
        Worker::start(&alloc.socket, &[]).await,
    ];
    let out = rotor_control("quarantine", &alloc.socket, &["127.0.0.3"]);
    assert!(
        out.contains("127.0.0.3 is out of the rotation until"),
        "{out}"
    );
    for i in 0..6 {
        assert_eq!(get(w[i % 2].addr, &origin.url("/")).await.status, 200);
    }
    let out_ip: IpAddr = "127.0.0.3".parse().unwrap();
    assert!(
        !origin.sources().contains(&out_ip),
        "{:?}",
        origin.sources()
    );
    let status = rotor_control("status", &alloc.socket, &[]);
    assert!(
        status.contains("taken out by hand until released"),
        "{status}"
    );
    // A refresh does not put it back; a check would find it usable.
    rotor_control("reload", &alloc.socket, &[]);
    assert_eq!(get(w[0].addr, &origin.url("/")).await.status, 200);
    assert!(!origin.sources().contains(&out_ip));
    let out = rotor_control("release", &alloc.socket, &["127.0.0.3"]);
    assert!(out.contains("back in the rotation"), "{out}");
    // Released again: nothing was out.
    let out = rotor_control("release", &alloc.socket, &["127.0.0.3"]);
    assert!(
        out.contains("127.0.0.3 was not out of the rotation"),
        "{out}"
    );
    let before = origin.count();
    for i in 0..3 {
        assert_eq!(get(w[i % 2].addr, &origin.url("/")).await.status, 200);
    }
    assert!(origin.sources()[before..].contains(&out_ip));
    // For a while only: out at once, then back by itself.
    rotor_control("quarantine", &alloc.socket, &["127.0.0.3", "--for", "5s"]);
    let before = origin.count();
    for i in 0..4 {
        assert_eq!(get(w[i % 2].addr, &origin.url("/")).await.status, 200);
    }
    assert!(!origin.sources()[before..].contains(&out_ip));
    // Its lease count is kept while it is out, and goes on once back.
    let served = || origin.sources().iter().filter(|ip| **ip == out_ip).count() as u64;
    let leases = |socket: &std::path::Path| status_json(socket)["pool"][1]["leases"].as_u64();
    assert_eq!(leases(&alloc.socket), Some(served()));
    let socket = alloc.socket.clone();
    eventually("127.0.0.3 back by itself", || {
        let socket = socket.clone();
        async move { status_json(&socket)["pool"][1]["quarantined"].is_null() }
    })
    .await;
    let before = origin.count();
    for i in 0..3 {
        assert_eq!(get(w[i % 2].addr, &origin.url("/")).await.status, 200);
    }
    assert!(origin.sources()[before..].contains(&out_ip));
    assert_eq!(leases(&alloc.socket), Some(served()));
    // An address not in the pool changes nothing, and says so: exit 1.
    let out = Command::new(ROTOR)
        .args([
            "quarantine",
            "--socket",
            alloc.socket.to_str().unwrap(),
            "10.9.9.9",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not in the pool"), "{err}");
}

#[tokio::test]
async fn the_access_log_has_a_line_per_request_and_tunnel_and_reopens_on_sighup() {
    let origin = Origin::start().await;
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.4"]).await;
    let (dir, path, w) = worker_logging_json(&alloc.socket).await;
    // A user with a session, a query the log must not keep.
    let mut conn = ProxyConn::open(w.addr).await;
    let req = hyper::Request::get(origin.url("/bytes/500?token=TopSecret"))
        .header("proxy-authorization", basic("alice-session-s1", "pw"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(conn.send(req).await.status, 200);
    tunnel(w.addr, echo.addr).await;
    assert_eq!(get(w.addr, "http://127.0.0.1:1/").await.status, 502);
    // Heads hyper answers itself (unparsable, too many fields): logged too,
    // with method and target `-`.
    let many: String = (0..150).map(|i| format!("X-{i}: v\r\n")).collect();
    for (req, status) in [
        ("GARBAGE\r\n\r\n".to_string(), "400"),
        (
            format!("GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n{many}\r\n"),
            "431",
        ),
    ] {
        let mut s = tokio::net::TcpStream::connect(w.addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{head}");
    }
    let lines = |p: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let p = path.clone();
    eventually("five lines", || {
        let p = p.clone();
        async move { lines(&p).len() == 5 }
    })
    .await;
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        !text.contains("TopSecret") && !text.contains("pw"),
        "{text}"
    );
    // Not every local user's to read, whatever the umask (the worker's is
    // 022 here).
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640, "{mode:o}");
    let l = lines(&path);
    let by_method = |m: &str| l.iter().find(|x| x["method"] == m).unwrap().clone();
    let plain = l
        .iter()
        .find(|x| x["status"] == 200 && x["method"] == "GET")
        .unwrap();
    assert_eq!(plain["user"], "alice");
    assert_eq!(plain["session"], "s1");
    assert_eq!(plain["target"], origin.addr.to_string());
    assert_eq!(plain["received"], 500);
    assert!(plain["source"].as_str().unwrap().starts_with("127.0.0."));
    let t = by_method("CONNECT");
    assert_eq!(
        (
            t["status"].as_u64(),
            t["sent"].as_u64(),
            t["received"].as_u64()
        ),
        (Some(200), Some(4), Some(4))
    );
    let mut unread: Vec<u64> = l
        .iter()
        .filter(|x| x["method"] == "-" && x["target"] == "-")
        .map(|x| x["status"].as_u64().unwrap())
        .collect();
    unread.sort();
    assert_eq!(unread, [400, 431]);
    let refused = l.iter().find(|x| x["status"] == 502).unwrap();
    assert_eq!(refused["error"], "connection_refused");
    assert_eq!(refused["target"], "127.0.0.1:1");
    // The address it was refused from, to find a failing one by.
    let from = refused["source"].as_str().unwrap_or_default();
    assert!(from.starts_with("127.0.0."), "{refused}");
    // logrotate moves the file, then SIGHUP: the next line is in a new one.
    let moved = dir.path().join("access.log.1");
    std::fs::rename(&path, &moved).unwrap();
    w.proc.signal(nix::sys::signal::Signal::SIGHUP);
    let p = path.clone();
    eventually("a line in the reopened file", || {
        let p = p.clone();
        let w = w.addr;
        let url = origin.url("/");
        async move {
            get(w, &url).await;
            p.exists() && !lines(&p).is_empty()
        }
    })
    .await;
    // Lines written before the reopen stay in the old file.
    assert!(lines(&moved).len() >= 3);
}

/// An access log the worker cannot reopen at a reload (logrotate made
/// something it cannot write in its place) is a reload that failed, as
/// `rotor reload` says (exit 3, naming it); the lines go on to the old
/// file. It was reopened later, in the writer, and the reload said 0.
#[tokio::test]
async fn an_access_log_that_cannot_be_reopened_fails_the_reload() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let w = Worker::start(&alloc.socket, &["--access-log", path.to_str().unwrap()]).await;
    // (A reload asked before the worker counts them is not its to make.)
    mapped(&[&w]).await;
    let reload = || {
        let out = std::process::Command::new(ROTOR)
            .args(["reload", "--socket", alloc.socket.to_str().unwrap()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let (code, out) = reload();
    assert_eq!(code, Some(0), "{out}");
    // Moved away, and a directory where the new file would be.
    let moved = dir.path().join("access.log.1");
    std::fs::rename(&path, &moved).unwrap();
    std::fs::create_dir(&path).unwrap();
    let (code, out) = reload();
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains(&format!("worker {}: access log", w.proc.pid())),
        "{out}"
    );
    assert_eq!(get(w.addr, &origin.url("/")).await.status, 200);
    a_line_in(&moved, "the line in the old file").await;
    // Mended: a clean reload, to the new file.
    std::fs::remove_dir(&path).unwrap();
    let (code, out) = reload();
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(get(w.addr, &origin.url("/")).await.status, 200);
    a_line_in(&path, "a line in the reopened file").await;
}

/// Waits for a line in the file at `path`.
async fn a_line_in(path: &std::path::Path, what: &str) {
    let path = path.to_path_buf();
    eventually(what, || {
        let path = path.clone();
        async move { std::fs::read_to_string(&path).is_ok_and(|t| t.lines().count() >= 1) }
    })
    .await;
}

/// A POST of `body` with `token` (if any): status and body.
fn post(addr: SocketAddr, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    http(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

#[tokio::test]
async fn the_admin_api_steers_addresses_with_its_token_only() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    let token = "k3y-0f-the-admin-api";
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let listen = metrics.to_string();
    // Readable by every user: refused, with what to do.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(ALLOCATOR)
        .args(["--check-config", "--pool", "127.0.0.2", "--no-state"])
        .args(["--metrics-listen", &listen, "--admin-token-file"])
        .arg(&token_file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let alloc = Allocator::start(&[
        "--pool",
        "127.0.0.2-127.0.0.3",
        "--pool",
        "203.0.113.77",
        "--metrics-listen",
        &listen,
        "--admin-token-file",
        token_file.to_str().unwrap(),
    ])
    .await;
    let w = Worker::start(&alloc.socket, &[]).await;
    let body = r#"{"address":"127.0.0.2","for":"10m"}"#;
    assert_eq!(post(metrics, "/admin/quarantine", None, body).0, 401);
    assert_eq!(
        post(
            metrics,
            "/admin/quarantine",
            Some("wrong-token-of-length"),
            body
        )
        .0,
        401
    );
    assert_eq!(
        post(metrics, "/admin/quarantine", Some(token), "{not json").0,
        400
    );
    assert_eq!(
        post(
            metrics,
            "/admin/quarantine",
            Some(token),
            r#"{"address":"10.9.9.9"}"#
        )
        .0,
        404
    );
    // A time out as `rotor quarantine --for` takes one: from 1s to 10y.
    for (bad, why) in [
        ("0s", "at least 1s"),
        ("500ms", "at least 1s"),
        ("100y", "at most 10 years"),
        ("18446744073709551615s", "at most 10 years"),
        ("soon", "not a duration"),
    ] {
        let b = format!(r#"{{"address":"127.0.0.2","for":"{bad}"}}"#);
        let (status, out) = post(metrics, "/admin/quarantine", Some(token), &b);
        assert_eq!(status, 400, "{bad}: {out}");
        assert!(out.contains(why), "{bad}: {out}");
    }
    let (status, out) = post(metrics, "/admin/quarantine", Some(token), body);
    assert_eq!(status, 200, "{out}");
    assert!(
        out.contains("\"entry\":\"127.0.0.2\"") && out.contains("\"for_secs\":600"),
        "{out}"
    );
    for _ in 0..4 {
        assert_eq!(get(w.addr, &origin.url("/")).await.status, 200);
    }
    let two: IpAddr = "127.0.0.2".parse().unwrap();
    assert!(!origin.sources().contains(&two), "{:?}", origin.sources());
    assert!(rotor_control("status", &alloc.socket, &[]).contains("taken out by hand for 10m"));
    let (status, _) = post(
        metrics,
        "/admin/release",
        Some(token),
        r#"{"address":"127.0.0.2"}"#,
    );
    assert_eq!(status, 200);
    let before = origin.count();
    for _ in 0..2 {
        assert_eq!(get(w.addr, &origin.url("/")).await.status, 200);
    }
    assert!(origin.sources()[before..].contains(&two));
    // One this host cannot use stays out when released: 409, and why.
    let unusable = r#"{"address":"203.0.113.77"}"#;
    let (status, out) = post(metrics, "/admin/release", Some(token), unusable);
    assert_eq!(status, 409, "{out}");
    assert!(
        out.contains("\"in_rotation\":false")
            && out.contains("203.0.113.77 stays out of the rotation: "),
        "{out}"
    );
    // A new token, put in place by rename, is read at the reload; the old
    // one is refused from then on.
    let new_token = "a-n3w-t0ken-after-the-reload";
    let next = dir.path().join("token.new");
    std::fs::write(&next, new_token).unwrap();
    std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&next, &token_file).unwrap();
    let release = r#"{"address":"127.0.0.3"}"#;
    assert_eq!(
        post(metrics, "/admin/release", Some(new_token), release).0,
        401
    );
    rotor_control("reload", &alloc.socket, &[]);
    assert_eq!(post(metrics, "/admin/release", Some(token), release).0, 401);
    assert_eq!(
        post(metrics, "/admin/release", Some(new_token), release).0,
        200
    );
    // One that does not read keeps the token in use, and fails the reload
    // as a source that does not read (exit 3: it said ok).
    std::fs::write(&token_file, "short").unwrap();
    let out = Command::new(ROTOR)
        .args(["reload", "--socket", alloc.socket.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("--admin-token-file") && err.contains("the token in use kept"),
        "{err}"
    );
    assert_eq!(
        post(metrics, "/admin/release", Some(new_token), release).0,
        200
    );
    // Without a token file the API is off.
    let plain: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let p = plain.to_string();
    let _other = Allocator::start(&["--pool", "127.0.0.2", "--metrics-listen", &p]).await;
    assert_eq!(post(plain, "/admin/release", Some(token), body).0, 404);
}

/// Each pool entry's series are there from the start, at 0: one that
/// appeared with its first count lost that count from `increase()` (a
/// source's first burst of connect errors, which an alert watches).
#[tokio::test]
async fn each_sources_series_start_at_zero() {
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let listen = metrics.to_string();
    let _alloc =
        Allocator::start(&["--pool", "127.0.0.2,127.0.0.3", "--metrics-listen", &listen]).await;
    let m = scrape(metrics);
    for series in [
        "rotor_source_connect_errors_total{source=\"127.0.0.3\"} 0",
        "rotor_source_responses_total{source=\"127.0.0.2\",class=\"2xx\"} 0",
        "rotor_source_tunnels_total{source=\"127.0.0.2\"} 0",
        "rotor_source_received_bytes_total{source=\"127.0.0.3\"} 0",
    ] {
        assert!(m.lines().any(|l| l == series), "{series}\n{m}");
    }
}

/// A request refused its lease (a site's budget spent) counts its wait in
/// `rotor_lease_wait_seconds` as one answered does: the refused waits are
/// the histogram's worst, and it left them out.
#[tokio::test]
async fn a_refused_lease_wait_is_observed_too() {
    let origin = Origin::start().await;
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let listen = metrics.to_string();
    let alloc = Allocator::start(&[
        "--pool",
        "127.0.0.2",
        "--site-limit",
        "127.0.0.1=1/1h",
        "--metrics-listen",
        &listen,
    ])
    .await;
    let w = Worker::start(&alloc.socket, &[]).await;
    assert_eq!(get(w.addr, &origin.url("/")).await.status, 200);
    assert_eq!(get(w.addr, &origin.url("/")).await.status, 429);
    eventually("both waits reported", || async {
        sample(&scrape(metrics), "rotor_lease_wait_seconds_count") == Some(2.0)
    })
    .await;
}

/// A tunnel closed for silence (as most browser tunnels end) still counts
/// the bytes it moved; they were lost unless the relay ended cleanly.
#[tokio::test]
async fn a_tunnel_closed_for_silence_still_counts_its_bytes() {
    let echo = Echo::start().await;
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let listen = metrics.to_string();
    let alloc = Allocator::start(&["--pool", "127.0.0.2", "--metrics-listen", &listen]).await;
    // (1 s: the echo comes back within it on a loaded machine)
    let worker = Worker::start(&alloc.socket, &["--tunnel-idle-timeout", "1s"]).await;
    let (code, mut t) = connect_tunnel(worker.addr, &echo.addr.to_string()).await;
    assert_eq!(code, 200);
    t.write_all(&[b'x'; 1000]).await.unwrap();
    let mut back = [0u8; 1000];
    t.read_exact(&mut back).await.unwrap();
    // Silence: the worker closes the tunnel.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), t.read_to_end(&mut rest))
        .await
        .expect("the idle tunnel was not closed")
        .ok();
    eventually("the tunnel's bytes in the metrics", || async {
        let m = scrape(metrics);
        sum(&m, "rotor_source_sent_bytes_total", "") >= 1000.0
            && sum(&m, "rotor_source_received_bytes_total", "") >= 1000.0
    })
    .await;
}

/// An upload whose destination never answers (rotor's 504) counts the
/// bytes that went, in the access log and the metrics, as a served one's:
/// they went from the source all the same.
#[tokio::test]
async fn an_upload_that_ends_in_rotors_error_still_counts_its_bytes() {
    let origin = Origin::start().await;
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let listen = metrics.to_string();
    let alloc = Allocator::start(&["--pool", "127.0.0.2", "--metrics-listen", &listen]).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let worker = worker_logging_json_to(&alloc.socket, &log, &["--response-timeout", "1s"]).await;
    // Small (read whole by rotor's own path) and large (streamed).
    let mut want = 0;
    for n in [5_000usize, 200_000] {
        let mut s = tokio::net::TcpStream::connect(worker.addr).await.unwrap();
        let url = origin.url("/slow/5000");
        let head = format!("POST {url} HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&vec![b'u'; n]).await.unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 504"), "{head}");
        want += n;
    }
    let logged = || -> Vec<u64> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["sent"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    eventually("both lines", || async { logged().len() == 2 }).await;
    assert_eq!(logged(), [5_000, 200_000]);
    eventually("the bytes in the metrics", || async {
        sum(&scrape(metrics), "rotor_source_sent_bytes_total", "") >= want as f64
    })
    .await;
}

/// Connections held open on the metrics listener (idle, or a request never
/// finished) starve nobody: past 8 from one address a new one is answered
/// at once (a scrape served, four at once, anything else 503), another
/// address is still served, and the allocator stops at once with them
/// open.
#[tokio::test]
async fn held_metrics_connections_starve_no_other_client_nor_the_stop() {
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let listen = metrics.to_string();
    let mut alloc = Allocator::start(&["--pool", "127.0.0.2", "--metrics-listen", &listen]).await;
    // Probed from another address of loopback: the probe takes none of
    // 127.0.0.1's places, whenever its connection goes.
    eventually("the metrics listener", || async move {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::from(([127, 0, 0, 8], 0))).unwrap();
        sock.connect(metrics).await.is_ok()
    })
    .await;
    let held: Vec<std::net::TcpStream> = (0..8)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(metrics).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let started = std::time::Instant::now();
    assert_eq!(http_get(metrics, "/", "text/plain").0, 503);
    // (Held up, it would wait for a place: the held heads' 10 s.)
    assert!(started.elapsed() < Duration::from_secs(5));
    // A scrape is served all the same (it was a 503, for up to the held
    // heads' 10 s), in the format asked for, and the connection closes.
    let (status, body) = http(
        metrics,
        &format!("GET /metrics?x=1 HTTP/1.1\r\nHost: {metrics}\r\nAccept: application/openmetrics-text\r\n\r\n"),
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("rotor_pool_addresses") && body.contains("# EOF"),
        "{body}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // A scrape's head never finished holds nothing past the places: a
    // 503 at its half second.
    let mut partial = std::net::TcpStream::connect(metrics).unwrap();
    partial.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
    partial
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut out = String::new();
    partial.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    // From another address of loopback: served.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from(([127, 0, 0, 9], 0)).into())
        .unwrap();
    sock.connect(&metrics.into()).unwrap();
    let mut other: std::net::TcpStream = sock.into();
    other
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    other
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {metrics}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
    let mut out = String::new();
    other.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let stopping = std::time::Instant::now();
    alloc.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(alloc.proc.wait(Duration::from_secs(10)).success());
    assert!(
        stopping.elapsed() < Duration::from_secs(8),
        "{:?}",
        stopping.elapsed()
    );
    drop(held);
}

/// A connection from loopback's address 127.0.0.`from` to `to`, its
/// receive buffer `receive` bytes if given.
fn connect_from(from: u8, to: SocketAddr, receive: Option<usize>) -> std::net::TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    if let Some(n) = receive {
        sock.set_recv_buffer_size(n).unwrap();
    }
    sock.bind(&SocketAddr::from(([127, 0, 0, from], 0)).into())
        .unwrap();
    sock.connect(&to.into()).unwrap();
    sock.into()
}

/// Scrapes past the listener's places (all 64 held by stalled heads) are
/// served four at once, one an address: a scraper that does not read a
/// large scrape holds one of them, and a fifth, or a second from its
/// address, gets 503 until it goes.
#[tokio::test]
async fn scrapes_past_the_places_are_four_at_once_one_an_address() {
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let listen = metrics.to_string();
    // ≈ 8 MB a scrape: more than the sockets' buffers hold.
    let _alloc = Allocator::start(&["--pool", "127.1.0.0/18", "--metrics-listen", &listen]).await;
    let stalled: Vec<std::net::TcpStream> = (101..109)
        .flat_map(|from| (0..8).map(move |_| from))
        .map(|from| {
            let mut s = connect_from(from, metrics, None);
            s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let scrape_from = |from: u8, receive: Option<usize>| {
        let mut s = connect_from(from, metrics, receive);
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {metrics}\r\n\r\n").as_bytes())
            .unwrap();
        s
    };
    let status = |mut s: std::net::TcpStream| {
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        String::from_utf8_lossy(&head).to_string()
    };
    // Four scrapers that read a little and no more, from four addresses.
    let held: Vec<std::net::TcpStream> = (111..115)
        .map(|from| {
            let mut s = scrape_from(from, Some(4096));
            let mut head = [0u8; 12];
            s.read_exact(&mut head).unwrap();
            assert_eq!(&head, b"HTTP/1.1 200", "from 127.0.0.{from}");
            s
        })
        .collect();
    assert_eq!(status(scrape_from(115, None)), "HTTP/1.1 503");
    // One an address: a second from a scraper's address waits its turn.
    let mut kept = held;
    let freed = kept.pop().unwrap();
    drop(freed);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(status(scrape_from(111, None)), "HTTP/1.1 503");
    // Another address is served, whole.
    let mut whole = scrape_from(116, None);
    let mut body = Vec::new();
    whole.read_to_end(&mut body).unwrap();
    assert!(body.starts_with(b"HTTP/1.1 200"));
    assert!(body.len() > 4 << 20, "{}", body.len());
    drop((kept, stalled));
}

/// A new access log is 0640 whatever the umask: under the units'
/// `UMask=0077` it was made 0600, unreadable to a log reader's group.
/// One that is there keeps its mode (logrotate's `create MODE`).
#[tokio::test]
async fn a_new_access_log_is_0640_under_a_strict_umask() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let made = dir.path().join("made.log");
    let kept = dir.path().join("kept.log");
    std::fs::write(&kept, "").unwrap();
    std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o600)).unwrap();
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let mut workers = Vec::new();
    for path in [&made, &kept] {
        let mut cmd = Command::new(WORKER);
        // SAFETY: umask is async-signal-safe; it runs in the child before
        // exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(0o077);
                Ok(())
            });
        }
        let args = ["--access-log", path.to_str().unwrap()];
        workers.push(Worker::start_cmd(cmd, &alloc.socket, free_port(), &args).await);
    }
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&made), 0o640, "{:o}", mode(&made));
    assert_eq!(mode(&kept), 0o600, "{:o}", mode(&kept));
}

/// `/health` (for a load balancer) says 503, with why, when the host can
/// serve nothing though a worker is connected: the pool has no address
/// in the rotation, or no worker has reported for 5 s (stopped, stuck:
/// the metrics show its last report's time); 200 again once it can. (It
/// answered 200 while a worker was connected.)
#[tokio::test]
async fn health_says_503_when_the_host_serves_nothing() {
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let listen = metrics.to_string();
    let alloc = Allocator::start(&["--pool", "127.0.0.2", "--metrics-listen", &listen]).await;
    let mut w = Worker::start(&alloc.socket, &[]).await;
    eventually("healthy", || async move {
        http_get(metrics, "/health", "*/*").0 == 200
    })
    .await;
    // Every entry out of the rotation.
    rotor_control("quarantine", &alloc.socket, &["127.0.0.2"]);
    let (status, body) = http_get(metrics, "/health", "*/*");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no address in the rotation"), "{body}");
    rotor_control("release", &alloc.socket, &["127.0.0.2"]);
    assert_eq!(http_get(metrics, "/health", "*/*").0, 200);
    // The only worker stopped: connected, silent.
    w.proc.signal(nix::sys::signal::Signal::SIGSTOP);
    let stopped = std::time::Instant::now();
    eventually("unhealthy", || async move {
        http_get(metrics, "/health", "*/*").0 == 503
    })
    .await;
    assert!(
        stopped.elapsed() >= Duration::from_secs(4),
        "{:?}",
        stopped.elapsed()
    );
    let (_, body) = http_get(metrics, "/health", "*/*");
    assert!(body.contains("no worker has reported"), "{body}");
    // The metrics tell it as well: up, but its last report 4 s old or more.
    let m = scrape(metrics);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last = sum(&m, "rotor_worker_last_report_timestamp_seconds", "");
    assert!(now - last >= 4.0, "{now} {last}\n{m}");
    assert_eq!(sum(&m, "rotor_worker_up", ""), 1.0, "{m}");
    w.proc.signal(nix::sys::signal::Signal::SIGCONT);
    eventually("healthy again", || async move {
        http_get(metrics, "/health", "*/*").0 == 200
    })
    .await;
    // The only worker draining (a tunnel holds its drain): its listeners
    // are closed, so a front is told to send clients elsewhere.
    let echo = Echo::start().await;
    let (code, tunnel) = connect_tunnel(w.addr, &echo.addr.to_string()).await;
    assert_eq!(code, 200);
    w.proc.signal(nix::sys::signal::Signal::SIGTERM);
    eventually("unhealthy in the drain", || async move {
        http_get(metrics, "/health", "*/*").0 == 503
    })
    .await;
    let (_, body) = http_get(metrics, "/health", "*/*");
    assert!(body.contains("every worker is draining"), "{body}");
    assert!(w.proc.is_running(), "the drain is still on");
    drop(tunnel);
}

/// A change by hand that cannot be kept over an allocator restart (here
/// `quarantine.json`'s write fails: a directory holds its name) is done,
/// and said: `rotor quarantine` exits 1 saying why (it said the address
/// was out, and a restart put it back). Once the file can be written, the
/// next change keeps both.
#[tokio::test]
async fn a_quarantine_that_cannot_be_kept_is_done_and_fails_saying_so() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let (token_file, token) = admin_token_in(dir.path());
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let listen = metrics.to_string();
    let args = [
        "--pool",
        "127.0.0.2-127.0.0.4",
        "--metrics-listen",
        &listen,
        "--admin-token-file",
        token_file.to_str().unwrap(),
    ];
    let alloc = Allocator::start_in(dir.clone(), &args).await;
    let kept = dir.path().join("state/quarantine.json");
    std::fs::create_dir_all(kept.join("x")).unwrap();
    let quarantine = |ip: &str| {
        Command::new(ROTOR)
            .args(["quarantine", "--socket", alloc.socket.to_str().unwrap(), ip])
            .output()
            .unwrap()
    };
    let out = quarantine("127.0.0.3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not kept over an allocator restart") && stderr.contains("quarantine.json"),
        "{stderr}"
    );
    // Done all the same.
    let out_of_rotation = |ip: &str| {
        let status = status_json(&alloc.socket);
        let pool = status["pool"].as_array().unwrap().clone();
        pool.iter()
            .any(|e| e["ip"] == ip && !e["quarantined"].is_null())
    };
    assert!(out_of_rotation("127.0.0.3"));
    // Undone: the file (none) holds what is out by hand again, and that
    // is said (a failure once said stayed said, for every change after).
    let release = Command::new(ROTOR)
        .args([
            "release",
            "--socket",
            alloc.socket.to_str().unwrap(),
            "127.0.0.3",
        ])
        .output()
        .unwrap();
    assert!(release.status.success(), "{release:?}");
    assert_eq!(quarantine("127.0.0.3").status.code(), Some(1));
    // The admin API: a 500 saying so, the change done.
    let body = r#"{"address":"127.0.0.2","for":"10m"}"#;
    let (code, said) = post(metrics, "/admin/quarantine", Some(token), body);
    assert_eq!(code, 500, "{said}");
    assert!(said.contains(r#""kept":false"#), "{said}");
    assert!(out_of_rotation("127.0.0.2"));
    std::fs::remove_dir_all(&kept).unwrap();
    let out = quarantine("127.0.0.4");
    assert!(out.status.success(), "{out:?}");
    let file = std::fs::read_to_string(&kept).unwrap();
    assert!(
        file.contains("127.0.0.3") && file.contains("127.0.0.4"),
        "{file}"
    );
    let body = r#"{"address":"127.0.0.2"}"#;
    let (code, said) = post(metrics, "/admin/release", Some(token), body);
    assert_eq!(code, 200, "{said}");
}

/// Access-log lines a worker loses (a write that fails: a full disk,
/// here `/dev/full`) are counted in `rotor_access_log_lost_lines_total`,
/// there at 0 from the start; before, only a log line said so.
#[tokio::test]
async fn access_log_lines_lost_are_counted() {
    let origin = Origin::start().await;
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let listen = metrics.to_string();
    let alloc = Allocator::start(&["--pool", "127.0.0.2", "--metrics-listen", &listen]).await;
    assert_eq!(
        sample(&scrape(metrics), "rotor_access_log_lost_lines_total"),
        Some(0.0)
    );
    let w = Worker::start(&alloc.socket, &["--access-log", "/dev/full"]).await;
    for _ in 0..5 {
        assert_eq!(get(w.addr, &origin.url("/")).await.status, 200);
    }
    eventually("the lost lines reported", || async {
        sample(&scrape(metrics), "rotor_access_log_lost_lines_total") == Some(5.0)
    })
    .await;
    promtool_check(&scrape(metrics));
    // Those of the log's last write, at a stop (they were lost after the
    // last report went): drained, with a request answered during the
    // drain, its line written by the close (the writer's next turn, 100 ms
    // apart, would come after the drain's end)...
    let mut w = w;
    for _ in 0..3 {
        assert_eq!(get(w.addr, &origin.url("/")).await.status, 200);
    }
    let (addr, url) = (w.addr, origin.url("/slow/700"));
    let slow = tokio::spawn(async move { get(addr, &url).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(slow.await.unwrap().status, 200);
    assert!(w.proc.wait(Duration::from_secs(10)).success());
    // (A scrape within a second of the last gets its render again.)
    eventually("the drained stop's lost lines", || async {
        sample(&scrape(metrics), "rotor_access_log_lost_lines_total") == Some(9.0)
    })
    .await;
    // ...and cut: a tunnel open past the drain's end, logged as the
    // runtime goes (`Meter::take_left` sent nothing, no request being
    // left to count).
    let echo = Echo::start().await;
    let mut w = Worker::start(
        &alloc.socket,
        &["--access-log", "/dev/full", "--drain-timeout", "1s"],
    )
    .await;
    let (status, _tunnel) = connect_tunnel(w.addr, &echo.addr.to_string()).await;
    assert_eq!(status, 200);
    w.proc.signal(nix::sys::signal::Signal::SIGTERM);
    w.proc.wait(Duration::from_secs(10));
    eventually("the cut stop's lost lines", || async {
        sample(&scrape(metrics), "rotor_access_log_lost_lines_total") == Some(10.0)
    })
    .await;
}
