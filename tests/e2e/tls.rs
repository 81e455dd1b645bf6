//! TLS to the proxy (`--tls-listen`): curl and Python requests through an
//! `https://` proxy, rotating, with proxy authentication, plain requests
//! and CONNECT; an unknown CA fails on the client; a stalled handshake is
//! cut off; garbage instead of a ClientHello closes only that connection;
//! a certificate swapped on disk is served after SIGHUP while an open
//! connection keeps working; the server picks AES-128-GCM over a client's
//! AES-256-GCM and still serves a ChaCha20-only client. Certificates are
//! made with the openssl command, as the README tells operators to.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::*;

/// A CA and a certificate for 127.0.0.1 signed by it, in `dir` under
/// `name`: (ca.pem, cert.pem, key.pem).
fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let p = |f: &str| dir.join(format!("{name}-{f}"));
    let run = |args: &[&str]| {
        run_ok("openssl", args, "openssl (Debian's openssl package)");
    };
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    let (ca_key, ca, key, csr, cert, ext) = (
        p("ca.key"),
        p("ca.pem"),
        p("key.pem"),
        p("req.csr"),
        p("cert.pem"),
        p("ext.cnf"),
    );
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &s(&ca_key),
        "-out",
        &s(&ca),
        "-days",
        "2",
        "-subj",
        &format!("/CN=rotor test CA {name}"),
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &s(&key),
        "-out",
        &s(&csr),
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        &s(&csr),
        "-CA",
        &s(&ca),
        "-CAkey",
        &s(&ca_key),
        "-CAcreateserial",
        "-out",
        &s(&cert),
        "-days",
        "2",
        "-extfile",
        &s(&ext),
    ]);
    (ca, cert, key)
}

struct TlsProxy {
    alloc: Allocator,
    worker: Worker,
    tls: SocketAddr,
    ca: PathBuf,
    dir: tempfile::TempDir,
}

async fn tls_proxy(extra: &[&str]) -> TlsProxy {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificate(dir.path(), "one");
    // The files the worker reads; swapped in place by the reload test.
    std::fs::copy(&cert, dir.path().join("cert.pem")).unwrap();
    std::fs::copy(&key, dir.path().join("key.pem")).unwrap();
    let tls: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let alloc = Allocator::start(&["--pool", "127.0.0.2-127.0.0.5"]).await;
    let worker = tls_worker(&alloc.socket, (tls, dir.path()), extra).await;
    eventually("the TLS listener", || async {
        TcpStream::connect(tls).await.is_ok()
    })
    .await;
    TlsProxy {
        alloc,
        worker,
        tls,
        ca,
        dir,
    }
}

/// A worker serving TLS on `tls` with the certificate and key in `dir`
/// (as `tls_proxy` puts them).
async fn tls_worker(socket: &Path, (tls, dir): (SocketAddr, &Path), extra: &[&str]) -> Worker {
    let listen = tls.to_string();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    let mut args = vec![
        "--tls-listen",
        &listen,
        "--tls-cert",
        c.to_str().unwrap(),
        "--tls-key",
        k.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Worker::start(socket, &args).await
}

#[tokio::test]
async fn curl_and_python_through_an_https_proxy_rotating_with_auth() {
    if !have(
        "curl_and_python_through_an_https_proxy_rotating_with_auth",
        &["openssl", "curl", "python3"],
    ) {
        return;
    }
    let origin = Origin::start().await;
    let users = tempfile::NamedTempFile::new().unwrap();
    add_user(users.path(), "alice", "s3cret");
    let p = tls_proxy(&["--auth-file", users.path().to_str().unwrap()]).await;
    let proxy = format!("https://{}", p.tls);
    let ca = p.ca.to_str().unwrap();
    let url = origin.url("/");
    // curl as alice through the https:// proxy, `more` flags first.
    let as_alice = |more: &'static [&'static str]| {
        let (proxy, url) = (proxy.clone(), url.clone());
        async move {
            let mut args: Vec<&str> = more.to_vec();
            args.extend(["--proxy", &proxy, "--proxy-cacert", ca]);
            args.extend(["--proxy-user", "alice:s3cret", &url]);
            curl(&args).await
        }
    };
    for _ in 0..4 {
        let (code, out) = as_alice(&[]).await;
        assert_eq!((code, out.as_str()), (0, "200"));
    }
    // A tunnel (CONNECT) inside the TLS connection to the proxy.
    let (code, out) = as_alice(&["-p"]).await;
    assert_eq!((code, out.as_str()), (0, "200"));
    // An HTTPS origin, through a tunnel inside the TLS connection to the
    // proxy (TLS in TLS), both verified.
    let https_port = free_port();
    let server = format!(
        r#"
import http.server, ssl
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain("{cert}", "{key}")
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
s = http.server.HTTPServer(("127.0.0.1", {https_port}), H)
s.socket = ctx.wrap_socket(s.socket, server_side=True)
s.serve_forever()
"#,
        cert = p.dir.path().join("cert.pem").display(),
        key = p.dir.path().join("key.pem").display(),
    );
    let _https = Proc::spawn("python3", &["-c", &server]);
    let https_url = format!("https://127.0.0.1:{https_port}/");
    eventually("the HTTPS origin", || async {
        TcpStream::connect(("127.0.0.1", https_port)).await.is_ok()
    })
    .await;
    let origin_ca = ["--cacert", ca];
    let mut args: Vec<&str> = origin_ca.to_vec();
    args.extend(["--proxy", &proxy, "--proxy-cacert", ca]);
    args.extend(["--proxy-user", "alice:s3cret", &https_url]);
    let (code, out) = curl(&args).await;
    assert_eq!((code, out.as_str()), (0, "200"));
    // Credentials are still checked.
    let (_, out) = curl(&[
        "--proxy",
        &proxy,
        "--proxy-cacert",
        ca,
        "--proxy-user",
        "alice:wrong",
        &url,
    ])
    .await;
    assert_eq!(out, "407");
    let seen = origin.sources();
    assert_eq!(seen.len(), 5);
    assert_eq!(seen[..4], ips(2..=5)[..], "rotating: {seen:?}");
    // An unknown CA: the client refuses, nothing reaches the origin.
    let (code, _) = curl(&["--proxy", &proxy, "--proxy-user", "alice:s3cret", &url]).await;
    assert_ne!(code, 0);
    assert_eq!(origin.count(), 5);
    // Python requests and httpx with an https:// proxy URL, as the README
    // shows them: requests to an https:// target (for an http:// one it
    // checks no certificate of the proxy's), `verify` given with each
    // request; httpx to both, the proxy's certificate checked against its
    // `Proxy`'s context (0.26 on), else against `verify`.
    if !python_has("the TLS test's Python part", "requests, httpx") {
        return;
    }
    let script = format!(
        r#"
import inspect, requests, httpx, ssl
proxy_url = "https://alice:s3cret@{tls}"
for _ in range(3):
    r = requests.get("{https_url}", proxies={{"https": proxy_url}}, verify="{ca}", timeout=10)
    assert r.status_code == 200, r.status_code
ctx = ssl.create_default_context()
ctx.load_verify_locations("{ca}")
takes_context = "ssl_context" in inspect.signature(httpx.Proxy.__init__).parameters
proxy = httpx.Proxy(proxy_url, ssl_context=ctx) if takes_context else proxy_url
for target in ["{url}", "{https_url}"]:
    r = httpx.get(target, proxy=proxy, verify=ctx, timeout=10)
    assert r.status_code == 200, r.status_code
# The proxy's certificate is checked: one from an unknown CA is refused.
try:
    untrusted = httpx.Proxy(proxy_url, ssl_context=ssl.create_default_context()) if takes_context else proxy_url
    httpx.get("{url}", proxy=untrusted, verify=ssl.create_default_context(), timeout=10)
    raise SystemExit("an unknown CA's certificate was taken")
except httpx.ConnectError as e:
    assert "CERTIFICATE_VERIFY_FAILED" in str(e), e
print("ok")
"#,
        tls = p.tls
    );
    run_python(&script).await;
    // (Three of requests' and one of httpx's to the HTTPS origin, which
    // records nothing; one of httpx's here.)
    assert_eq!(origin.count(), 6);
}

#[tokio::test]
async fn a_stalled_handshake_is_cut_off_and_garbage_closes_only_its_connection() {
    if !have(
        "a_stalled_handshake_is_cut_off_and_garbage_closes_only_its_connection",
        &["openssl", "curl", "python3"],
    ) {
        return;
    }
    let origin = Origin::start().await;
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("access.log");
    let p = tls_proxy(&[
        "--header-read-timeout",
        "1s",
        "--access-log",
        log.to_str().unwrap(),
        "--access-log-format",
        "json",
    ])
    .await;
    // Says nothing: cut off after the head's deadline.
    let mut stalled = TcpStream::connect(p.tls).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf))
        .await
        .expect("a stalled handshake is cut off")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    // Garbage instead of a ClientHello: that connection ends (with an
    // alert at most), and the listener serves the next one.
    let mut garbage = TcpStream::connect(p.tls).await.unwrap();
    garbage
        .write_all(b"\x00\x01\x02garbage\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), garbage.read_to_end(&mut rest))
        .await
        .expect("garbage closes its connection");
    assert!(!String::from_utf8_lossy(&rest).contains("HTTP/1.1"));
    // Plain HTTP (a proxy URL saying http:// where https:// is meant): a
    // 400 that says so, in plain text, not a TLS alert.
    let mut plain = TcpStream::connect(p.tls).await.unwrap();
    plain
        .write_all(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer))
        .await
        .expect("a plain request is answered and closed");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(
        answer.contains("proxy-status: rotor; error=http_request_error"),
        "{answer}"
    );
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert!(body.contains("https://"), "{answer}");
    let length = answer
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|n| n.trim().parse::<usize>().ok());
    assert_eq!(length, Some(body.len()), "{answer}");
    // A HEAD is told with no body (RFC 9110 §9.3.2), its method cut too.
    let mut plain = TcpStream::connect(p.tls).await.unwrap();
    plain.write_all(b"HEA").await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    plain
        .write_all(b"D http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer))
        .await
        .expect("a plain HEAD is answered and closed");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.ends_with("\r\n\r\n"), "{answer}");
    // Counted and logged, as hyper's own 400s are.
    eventually("the plain request's access line", || {
        let log = log.clone();
        async move {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .any(|l| {
                    let l: serde_json::Value = serde_json::from_str(l).unwrap();
                    l["status"] == 400 && l["error"] == "http_request_error"
                })
        }
    })
    .await;
    let proxy = format!("https://{}", p.tls);
    let (code, out) = curl(&[
        "--proxy",
        &proxy,
        "--proxy-cacert",
        p.ca.to_str().unwrap(),
        &origin.url("/"),
    ])
    .await;
    assert_eq!((code, out.as_str()), (0, "200"));
}

#[tokio::test]
async fn a_swapped_certificate_is_served_after_sighup_and_open_connections_go_on() {
    if !have(
        "a_swapped_certificate_is_served_after_sighup_and_open_connections_go_on",
        &["openssl", "curl", "python3"],
    ) {
        return;
    }
    let origin = Origin::start().await;
    let p = tls_proxy(&[]).await;
    let proxy = format!("https://{}", p.tls);
    let url = origin.url("/");
    // A connection opened with the first certificate, kept alive.
    let script = format!(
        r#"
import socket, ssl, sys
ctx = ssl.create_default_context(cafile="{ca}")
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", {port})), server_hostname="127.0.0.1")
req = b"GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n"
def ask():
    s.sendall(req)
    data = b""
    while b"hello" not in data:
        chunk = s.recv(4096)
        if not chunk:
            sys.exit("closed")
        data += chunk
    return data.split(b" ")[1]
print(ask().decode(), flush=True)
sys.stdin.readline()
print(ask().decode(), flush=True)
"#,
        ca = p.ca.display(),
        port = p.tls.port(),
        host = origin.addr,
    );
    let mut kept = tokio::process::Command::new("python3")
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(kept.stdout.take().unwrap());
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line)
        .await
        .unwrap();
    assert_eq!(line.trim(), "200");
    // A new certificate from another CA, then SIGHUP.
    let (ca2, cert2, key2) = certificate(p.dir.path(), "two");
    std::fs::copy(&cert2, p.dir.path().join("cert.pem")).unwrap();
    std::fs::copy(&key2, p.dir.path().join("key.pem")).unwrap();
    p.worker.proc.signal(nix::sys::signal::Signal::SIGHUP);
    eventually("the new certificate served", || async {
        curl(&[
            "--proxy",
            &proxy,
            "--proxy-cacert",
            ca2.to_str().unwrap(),
            &url,
        ])
        .await
        .1 == "200"
    })
    .await;
    let (code, _) = curl(&[
        "--proxy",
        &proxy,
        "--proxy-cacert",
        p.ca.to_str().unwrap(),
        &url,
    ])
    .await;
    assert_ne!(code, 0, "the old CA no longer verifies");
    // The connection opened before still works.
    kept.stdin.take().unwrap().write_all(b"\n").await.unwrap();
    line.clear();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line)
        .await
        .unwrap();
    assert_eq!(line.trim(), "200");
    let _ = kept.wait().await;
    // A broken pair on disk keeps the one in use.
    std::fs::write(p.dir.path().join("key.pem"), "not a key").unwrap();
    p.worker.proc.signal(nix::sys::signal::Signal::SIGHUP);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, out) = curl(&[
        "--proxy",
        &proxy,
        "--proxy-cacert",
        ca2.to_str().unwrap(),
        &url,
    ])
    .await;
    assert_eq!((code, out.as_str()), (0, "200"));
}

/// A certificate near its end is warned of at the start and at every
/// reload, however soon after another (an operator who rolls back to it
/// is told), and once only for the start's own second read. A handshake
/// that fails (a client that does not trust the CA) is logged with its
/// cause: such clients all fail while the worker looks idle.
#[tokio::test]
async fn a_certificate_near_its_end_is_warned_of_at_every_reload() {
    if !have(
        "a_certificate_near_its_end_is_warned_of_at_every_reload",
        &["openssl", "curl"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // (Made for two days: "expires at …" is said.)
    let (_ca, cert, key) = certificate(dir.path(), "soon");
    let log = dir.path().join("worker.log");
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let tls = format!("127.0.0.1:{}", free_port());
    let cmd = logging_at_info(WORKER, &log);
    let mut args = ALLOW_LOOPBACK.to_vec();
    let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());
    args.extend_from_slice(&["--tls-listen", &tls, "--tls-cert", c, "--tls-key", k]);
    let w = Worker::start_cmd(cmd, &alloc.socket, free_port(), &args).await;
    let warned = || said(&log, "TLS certificate expires at");
    eventually("the start's warning", || async { warned() == 1 }).await;
    for n in 2..=3 {
        w.proc.signal(nix::sys::signal::Signal::SIGHUP);
        eventually("the reload's warning", || async { warned() == n }).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(warned(), 3);
    // Connections closed before a byte (a load balancer's TCP check) are
    // no failed handshake, and do not take the line from one.
    for _ in 0..3 {
        drop(TcpStream::connect(&tls).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (code, _) = curl(&["--proxy", &format!("https://{tls}"), "http://127.0.0.1:9/"]).await;
    assert_ne!(code, 0, "an unknown CA taken");
    eventually("the failed handshake in the log", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines()
            .any(|l| l.contains("a TLS handshake failed") && l.contains("alert"))
    })
    .await;
    // An IP address as SNI (Node's undici sends one) is the client's quirk,
    // not a line a connection: rustls's warning of it is not logged.
    let connect = tls.to_string();
    for _ in 0..2 {
        let _ = tokio::process::Command::new("openssl")
            .args(["s_client", "-connect", &connect, "-servername", "127.0.0.1"])
            .stdin(std::process::Stdio::null())
            .output()
            .await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(said(&log, "Illegal SNI"), 0);
}

/// A certificate and key given with no TLS listener (`--tls-listen`
/// forgotten): every listener is plain, the passwords in clear where TLS
/// was meant. Said at start and by `--check`; it started without a word.
#[tokio::test]
async fn a_certificate_with_no_tls_listener_is_warned_of() {
    if !have(
        "a_certificate_with_no_tls_listener_is_warned_of",
        &["openssl"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_ca, cert, key) = certificate(dir.path(), "idle");
    let log = dir.path().join("worker.log");
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let args = ["--tls-cert", c, "--tls-key", k];
    let unused = "there is no TLS listener (tls-listen): every listener is plain";
    let w = Worker::start_cmd(logging_to(WORKER, &log), &alloc.socket, free_port(), &args).await;
    eventually("the start's warning", || async { said(&log, unused) == 1 }).await;
    let check = [
        &args[..],
        &["--check", "--socket", alloc.socket.to_str().unwrap()],
    ]
    .concat();
    let out = std::process::Command::new(WORKER)
        .args(&check)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("warning: tls-cert and tls-key") && said.contains(unused),
        "{said}"
    );
    // With one, nothing is said.
    drop(w);
    let tls = format!("127.0.0.1:{}", free_port());
    let check = [&check[..], &["--tls-listen", &tls]].concat();
    let out = std::process::Command::new(WORKER)
        .args(&check)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !said.contains(unused), "{said}");
}

/// `rotor reload` says how each worker's reload went: a certificate or a
/// users file that does not load (the one in use kept) names the worker
/// and the part, and is exit 3, as a pool source that fails is: a
/// certificate renewal's hook must not pass for done.
#[tokio::test]
async fn rotor_reload_says_which_workers_part_failed() {
    if !have(
        "rotor_reload_says_which_workers_part_failed",
        &["openssl", "curl"],
    ) {
        return;
    }
    let users = tempfile::NamedTempFile::new().unwrap();
    add_user(users.path(), "alice", "s3cret");
    let p = tls_proxy(&["--auth-file", users.path().to_str().unwrap()]).await;
    // (A reload asked before the worker counts them, between its Hello and
    // its table, is one it never makes: `rotor reload` waits 5 s for its
    // word, and says 3.)
    mapped(&[&p.worker]).await;
    let pid = p.worker.proc.pid();
    let reload = || {
        let out = std::process::Command::new(ROTOR)
            .args(["reload", "--socket", p.alloc.socket.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, err) = reload();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("workers reloaded: 1 of 1"), "{out}");
    // A broken key and a users file with a line that is not one.
    let key = p.dir.path().join("key.pem");
    let good_key = std::fs::read(&key).unwrap();
    let good_users = std::fs::read(users.path()).unwrap();
    std::fs::write(&key, "not a key").unwrap();
    std::fs::write(users.path(), "no colon here\n").unwrap();
    let (code, out, err) = reload();
    assert_eq!(code, Some(3), "{out}{err}");
    assert!(out.contains("workers reloaded: 0 of 1"), "{out}");
    assert!(
        err.contains(&format!("worker {pid}: TLS certificate"))
            && err.contains("the one in use kept"),
        "{err}"
    );
    assert!(err.contains(&format!("worker {pid}: users file")), "{err}");
    // What was in use was kept: alice still gets in, over TLS.
    let origin = Origin::start().await;
    let proxy = format!("https://{}", p.tls);
    let (code, text) = curl(&[
        "--proxy",
        &proxy,
        "--proxy-cacert",
        p.ca.to_str().unwrap(),
        "--proxy-user",
        "alice:s3cret",
        &origin.url("/"),
    ])
    .await;
    assert_eq!((code, text.as_str()), (0, "200"));
    // Mended: a clean reload again.
    std::fs::write(&key, good_key).unwrap();
    std::fs::write(users.path(), good_users).unwrap();
    let (code, out, err) = reload();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("workers reloaded: 1 of 1"), "{out}");
}

/// The suite `openssl s_client` with `args` (its offer, in its order)
/// gets from the proxy at `tls`.
async fn negotiated(tls: SocketAddr, args: &[&str]) -> String {
    let connect = tls.to_string();
    let mut cmd = tokio::process::Command::new("openssl");
    cmd.args(["s_client", "-connect", &connect])
        .args(args)
        .stdin(std::process::Stdio::null());
    let out = tokio::time::timeout(Duration::from_secs(10), cmd.output())
        .await
        .expect("openssl s_client finishes")
        .expect("openssl (Debian's openssl package)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines()
        .find_map(|l| {
            l.split_once("Cipher is ")
                .map(|(_, c)| c.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no cipher in: {text}"))
}

#[tokio::test]
async fn the_proxy_prefers_aes_128_gcm_and_still_serves_chacha20_only_clients() {
    if !have(
        "the_proxy_prefers_aes_128_gcm_and_still_serves_chacha20_only_clients",
        &["openssl", "curl", "python3"],
    ) {
        return;
    }
    let p = tls_proxy(&[]).await;
    // OpenSSL's own order puts AES-256-GCM-SHA384 first; the server's
    // order picks AES-128-GCM (a SHA-256 handshake, in hardware).
    let tls13 = ["-tls1_3", "-ciphersuites"];
    let both = "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256";
    assert_eq!(
        negotiated(p.tls, &[&tls13[..], &[both]].concat()).await,
        "TLS_AES_128_GCM_SHA256"
    );
    let chacha = "TLS_CHACHA20_POLY1305_SHA256";
    assert_eq!(
        negotiated(p.tls, &[&tls13[..], &[chacha]].concat()).await,
        chacha
    );
    let aes256 = "TLS_AES_256_GCM_SHA384";
    assert_eq!(
        negotiated(p.tls, &[&tls13[..], &[aes256]].concat()).await,
        aes256
    );
    let tls12 = [
        "-tls1_2",
        "-cipher",
        "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256",
    ];
    assert_eq!(
        negotiated(p.tls, &tls12).await,
        "ECDHE-RSA-AES128-GCM-SHA256"
    );
    drop(p.worker);
}

/// Python: a TLS session over a raw socket (`ssl.MemoryBIO`), so the
/// socket stays the test's own to half-close or feed a byte at a time.
/// `tls_over(ca, port)` returns the socket, the session, `pump()` (what
/// the session wrote, sent) and `fill()` (what came, given to the session;
/// False at the end). `tunnel_over(ca, port, dest)` does that and asks
/// for a tunnel to `dest` (its 200 checked), and returns the same four and
/// what came behind the answer's head.
const PY_TLS_OVER: &str = r#"
import socket, ssl
def tls_over(ca, port):
    ctx = ssl.create_default_context(cafile=ca)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(inc, out, server_hostname="127.0.0.1")
    s = socket.create_connection(("127.0.0.1", port))
    def pump():
        data = out.read()
        if data:
            s.sendall(data)
    def fill():
        chunk = s.recv(65536)
        if not chunk:
            return False
        inc.write(chunk)
        return True
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            pump()
            assert fill(), "closed during the handshake"
    pump()
    return s, tls, pump, fill
def tunnel_over(ca, port, dest):
    s, tls, pump, fill = tls_over(ca, port)
    tls.write(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (dest, dest)).encode())
    pump()
    reply = b""
    while b"\r\n\r\n" not in reply:
        try:
            reply += tls.read(65536)
        except ssl.SSLWantReadError:
            assert fill(), "closed before the CONNECT answer"
    assert reply.startswith(b"HTTP/1.1 200"), reply
    return s, tls, pump, fill, reply.split(b"\r\n\r\n", 1)[1]
def read_to_end(tls, fill, answer, pause=0.0):
    # What comes until the tunnel's end, and how it ended; `pause` s
    # before each read of the socket (a slow reader).
    import time
    end = None
    while end is None:
        try:
            data = tls.read(16384)
            if not data:
                end = "close_notify"
            answer += data
        except ssl.SSLWantReadError:
            time.sleep(pause)
            try:
                if not fill():
                    end = "closed"
            except ConnectionResetError:
                end = "reset"
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError) as e:
            end = repr(e)
    return end, answer
"#;

/// After the handshake, a client trickling one TLS record a byte at a time
/// hands rotor no byte of a request, while each byte woke the idle watch:
/// it held its connection for ever. Its first request is due within
/// `--idle-timeout` (or `--header-read-timeout`, if longer) of the accept,
/// whatever moves below TLS.
#[tokio::test]
async fn a_tls_record_trickled_after_the_handshake_is_cut_off() {
    if !have(
        "a_tls_record_trickled_after_the_handshake_is_cut_off",
        &["openssl", "curl", "python3"],
    ) {
        return;
    }
    let p = tls_proxy(&["--header-read-timeout", "1s", "--idle-timeout", "2s"]).await;
    let script = format!(
        r#"{PY_TLS_OVER}
import time
s, tls, pump, fill = tls_over("{ca}", {port})
# An application-data record announcing 16 KiB, sent a byte at a time.
s.sendall(b"\x17\x03\x03\x40\x00")
s.settimeout(0.2)
start = time.time()
closed = False
while time.time() - start < 8:
    try:
        s.send(b"\x00")
        r = s.recv(65536)
        if r == b"":
            closed = True
            break
    except socket.timeout:
        pass
    except OSError:
        closed = True
        break
took = time.time() - start
assert closed and took < 7, (closed, took)
"#,
        ca = p.ca.display(),
        port = p.tls.port()
    );
    run_python(&script).await;
}

/// A TLS client that reads none of its response (served by hyper's path:
/// HTTP/1.0) while it trickles a record's bytes in, which woke the idle
/// watch below TLS, is dropped once its response's write has waited
/// `--idle-timeout`: it held its connection and upstream for ever.
#[tokio::test]
async fn a_tls_client_that_reads_nothing_is_dropped_whatever_it_trickles() {
    if !have(
        "a_tls_client_that_reads_nothing_is_dropped_whatever_it_trickles",
        &["openssl", "curl", "python3"],
    ) {
        return;
    }
    let origin = Origin::start().await;
    let p = tls_proxy(&[
        "--idle-timeout",
        "2s",
        "--allow-destination",
        "127.0.0.1/32",
    ])
    .await;
    let script = format!(
        r#"{PY_TLS_OVER}
import time
s, tls, pump, fill = tls_over("{ca}", {port})
tls.write(b"GET {url} HTTP/1.0\r\n\r\n")
pump()
# Read nothing; an application-data record announcing 16 KiB, a byte at a time.
s.sendall(b"\x17\x03\x03\x40\x00")
start = time.time()
closed = False
while time.time() - start < 12:
    try:
        s.send(b"\x00")
    except OSError:
        closed = True
        break
    time.sleep(0.25)
took = time.time() - start
assert closed and took < 8, (closed, took)
"#,
        ca = p.ca.display(),
        port = p.tls.port(),
        url = origin.url("/bytes/32000000"),
    );
    run_python(&script).await;
}

/// Two workers sharing a TLS port (SO_REUSEPORT: each new connection to
/// either) resume a client's session whichever takes its next
/// connection, over TLS 1.2 and 1.3: they seal session tickets with the
/// host's keys, from the allocator. Each sealed with its own, and about
/// half the reconnections (0 to 12 of 20 seen) were full handshakes.
#[tokio::test]
async fn a_session_resumes_on_whichever_worker_takes_the_connection() {
    if !have(
        "a_session_resumes_on_whichever_worker_takes_the_connection",
        &["openssl", "python3"],
    ) {
        return;
    }
    let origin = Origin::start().await;
    let allow = ["--allow-destination", "127.0.0.1/32"];
    let p = tls_proxy(&allow).await;
    let _second = tls_worker(&p.alloc.socket, (p.tls, p.dir.path()), &allow).await;
    // Each asks for the keys as it connects to the allocator: a run is
    // tried again (a second later, five times at most) in case one had
    // not asked yet on a loaded machine. With a key each, every run
    // resumes about half.
    let script = format!(
        r#"
import socket, ssl, time
def run(version):
    ctx = ssl.create_default_context(cafile="{ca}")
    ctx.minimum_version = ctx.maximum_version = version
    session, resumed = None, 0
    for i in range(20):
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", {port})), server_hostname="127.0.0.1", session=session)
        s.sendall(b"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        got = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            got += b
        assert got.startswith(b"HTTP/1.1 200"), got[:100]
        resumed += s.session_reused
        session = s.session
        s.close()
    return resumed
for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
    runs = []
    for attempt in range(5):
        runs.append(run(version))
        # All but the first.
        if runs[-1] == 19:
            break
        time.sleep(1)
    assert runs[-1] == 19, (version, runs)
"#,
        ca = p.ca.display(),
        port = p.tls.port(),
        url = origin.url("/"),
    );
    run_python(&script).await;
}

/// Past `--max-connections`, a TLS client is closed: a 503 in plain text
/// is no answer to its hello (curl would report a garbled record).
#[tokio::test]
async fn a_tls_client_past_the_connection_limit_is_closed_not_sent_plain_text() {
    if !have(
        "a_tls_client_past_the_connection_limit_is_closed_not_sent_plain_text",
        &["openssl", "curl", "python3"],
    ) {
        return;
    }
    let p = tls_proxy(&["--max-connections", "1"]).await;
    let origin = Origin::start().await;
    // The one place (shared by the listeners) held by a keep-alive
    // connection that was served: tried again while the start-up probe's
    // connection still holds it (a 503).
    let deadline = std::time::Instant::now() + PATIENCE;
    let _held = loop {
        let mut c = ProxyConn::open(p.worker.addr).await;
        if matches!(c.try_get(&origin.url("/")).await, Ok(r) if r.status == 200) {
            break c;
        }
        assert!(std::time::Instant::now() < deadline, "never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut over = TcpStream::connect(p.tls).await.unwrap();
    let _ = over.write_all(b"\x16\x03\x01\x00\x05hello").await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), over.read_to_end(&mut rest))
        .await
        .expect("closed");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
}

/// A TLS client that half-closes its TCP side without a close_notify
/// (Python's `shutdown(SHUT_WR)`, and many clients) still gets what the
/// destination sends after that: the session's `UnexpectedEof` is the
/// client's end, passed on as a half-close, not an error ending the
/// tunnel both ways.
#[tokio::test]
async fn a_tls_tunnel_passes_on_a_half_close_without_close_notify() {
    if !have(
        "a_tls_tunnel_passes_on_a_half_close_without_close_notify",
        &["openssl", "curl", "python3"],
    ) {
        return;
    }
    let p = tls_proxy(&[]).await;
    // Answers once the client has finished, a moment later.
    let dest_addr = one_connection(|mut s| async move {
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(format!("got {}", got.len()).as_bytes())
            .await
            .unwrap();
    })
    .await;
    let script = format!(
        r#"{PY_TLS_OVER}
s, tls, pump, fill, answer = tunnel_over("{ca}", {port}, "{dest}")
tls.write(b"x" * 1000)
pump()
s.shutdown(socket.SHUT_WR)
while True:
    try:
        data = tls.read(65536)
        if not data:
            break
        answer += data
    except ssl.SSLWantReadError:
        if not fill():
            break
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
        break
assert answer == b"got 1000", answer
"#,
        ca = p.ca.display(),
        port = p.tls.port(),
        dest = dest_addr,
    );
    run_python(&script).await;
}

/// A response streamed in bursts to a TLS client that reads slowly: each
/// burst reaches the client while the destination pauses after it. What
/// the client's socket did not take stayed in the TLS session's buffer
/// (up to 64 KiB) until the destination's next bytes, there being no
/// flush between them.
#[tokio::test]
async fn a_burst_reaches_a_tls_client_while_the_destination_pauses() {
    if !have(
        "a_burst_reaches_a_tls_client_while_the_destination_pauses",
        &["openssl", "python3"],
    ) {
        return;
    }
    const BURST: usize = 3 << 20;
    let dest = one_connection(|mut s| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut head = vec![0u8; 4096];
        let _ = s.read(&mut head).await;
        let len = BURST + 1;
        let _ = s
            .write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n").as_bytes())
            .await;
        let _ = s.write_all(&vec![b'x'; BURST]).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let _ = s.write_all(b"y").await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    })
    .await;
    let p = tls_proxy(&[]).await;
    let script = format!(
        r#"
import socket, ssl, time
ctx = ssl.create_default_context(cafile="{ca}")
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(inc, out, server_hostname="127.0.0.1")
s = socket.socket()
# A small receive buffer (no autotuning): the proxy's writes wait on it.
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
s.connect(("127.0.0.1", {port}))
def pump():
    data = out.read()
    if data:
        s.sendall(data)
while True:
    try:
        tls.do_handshake()
        break
    except ssl.SSLWantReadError:
        pump()
        inc.write(s.recv(65536))
pump()
tls.write(b"GET http://{dest}/ HTTP/1.1\r\nHost: {dest}\r\n\r\n")
pump()
n = 0
s.settimeout(0.05)
start = time.time()
# Slower than the proxy writes (its socket stays full to the burst's
# end), done well within the destination's pause (10 s from its burst).
while time.time() - start < 7 and n < {burst}:
    try:
        chunk = s.recv(65536)
        if not chunk:
            break
        inc.write(chunk)
    except socket.timeout:
        pass
    try:
        while True:
            n += tls.read(65536).count(b"x")
    except ssl.SSLWantReadError:
        pass
    time.sleep(0.01)
assert n == {burst}, (n, {burst}, time.time() - start)
"#,
        ca = p.ca.display(),
        port = p.tls.port(),
        burst = BURST,
    );
    run_python(&script).await;
}

/// A destination on 127.0.0.1 that hands its first connection to `serve`.
async fn one_connection<F, Fut>(serve: F) -> std::net::SocketAddr
where
    F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let dest = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = dest.local_addr().unwrap();
    tokio::spawn(async move {
        let (s, _) = dest.accept().await.unwrap();
        serve(s).await;
    });
    addr
}

/// A destination's reset reaches a TLS client's tunnel as a reset of its
/// connection, not as a TCP close (which, without a close_notify, many
/// clients take for the end of the stream).
#[tokio::test]
async fn a_tls_tunnel_passes_on_a_reset() {
    if !have(
        "a_tls_tunnel_passes_on_a_reset",
        &["openssl", "curl", "python3"],
    ) {
        return;
    }
    let p = tls_proxy(&[]).await;
    let dest_addr = one_connection(|mut s| async move {
        s.write_all(b"partial-data").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    })
    .await;
    let script = format!(
        r#"{PY_TLS_OVER}
s, tls, pump, fill, answer = tunnel_over("{ca}", {port}, "{dest}")
end, answer = read_to_end(tls, fill, answer)
assert end == "reset", (end, answer)
assert b"partial-data".startswith(answer), answer
"#,
        ca = p.ca.display(),
        port = p.tls.port(),
        dest = dest_addr,
    );
    run_python(&script).await;
}

/// What rotor took of a destination's download before its reset reaches a
/// TLS client reading slower than it came, whole, then the reset: the
/// session's buffered records were dropped at the reset (372 736 bytes of
/// 400 000 came through; a plain tunnel passed all of them).
#[tokio::test]
async fn a_tls_tunnel_passes_on_what_came_before_a_reset_to_a_slow_reader() {
    if !have(
        "a_tls_tunnel_passes_on_what_came_before_a_reset_to_a_slow_reader",
        &["openssl", "curl", "python3"],
    ) {
        return;
    }
    const SENT: usize = 400_000;
    let p = tls_proxy(&[]).await;
    let dest_addr = one_connection(|mut s| async move {
        s.write_all(&vec![b'd'; SENT]).await.unwrap();
        reset_once_taken(s).await;
    })
    .await;
    let script = format!(
        r#"{PY_TLS_OVER}
s, tls, pump, fill, answer = tunnel_over("{ca}", {port}, "{dest}")
end, answer = read_to_end(tls, fill, answer, 0.03)
assert (end, len(answer)) == ("reset", {SENT}), (end, len(answer))
"#,
        ca = p.ca.display(),
        port = p.tls.port(),
        dest = dest_addr,
    );
    run_python(&script).await;
}

/// `rotor status` lists a worker's TLS listener beside its others.
#[tokio::test]
async fn status_lists_the_tls_listener() {
    if !have(
        "status_lists_the_tls_listener",
        &["openssl", "curl", "python3"],
    ) {
        return;
    }
    let p = tls_proxy(&[]).await;
    let want = format!("https {}", p.tls);
    let socket = p.alloc.socket.clone();
    eventually("the TLS listener in rotor status", || {
        let (socket, want) = (socket.clone(), want.clone());
        async move { rotor_control("status", &socket, &[]).contains(&want) }
    })
    .await;
}

/// A TLS client's tunnel whose client stopped reading a download while it
/// trickles bytes up is closed after --tunnel-idle-timeout of the download
/// taking nothing, as a plain client's is: the bytes going up kept it open
/// for ever.
#[tokio::test]
async fn a_tls_tunnel_stalled_one_way_is_closed_though_the_other_trickles() {
    if !have(
        "a_tls_tunnel_stalled_one_way_is_closed_though_the_other_trickles",
        &["openssl", "python3"],
    ) {
        return;
    }
    let p = tls_proxy(&["--tunnel-idle-timeout", "1s"]).await;
    let dest = flooding_server().await;
    let script = format!(
        r#"{PY_TLS_OVER}
import time
s, tls, pump, fill, _ = tunnel_over("{ca}", {port}, "{dest}")
# Never read again; a byte up every 300 ms, until the tunnel is gone.
start = time.time()
gone = False
while time.time() - start < 10:
    time.sleep(0.3)
    try:
        tls.write(b"x")
        pump()
    except OSError:
        gone = True
        break
assert gone, "the stalled tunnel was kept open by the bytes going up"
"#,
        ca = p.ca.display(),
        port = p.tls.port(),
    );
    run_python(&script).await;
}

/// A connection to the TLS port that says nothing (a port scan, a health
/// check) does not hold a drain for the head's timeout: its handshake is
/// given the grace a connection between requests gets.
#[tokio::test]
async fn a_silent_tls_connection_does_not_hold_the_drain() {
    if !have(
        "a_silent_tls_connection_does_not_hold_the_drain",
        &["openssl"],
    ) {
        return;
    }
    let p = tls_proxy(&["--header-read-timeout", "30s", "--drain-timeout", "30s"]).await;
    let mut silent = TcpStream::connect(p.tls).await.unwrap();
    // And one whose first request's head came in part, over TLS: it has
    // the grace from its first byte, not until its first head's deadline
    // (counted from the accept, the later of the header and idle
    // timeouts, less the header timeout: it held the drain some 30 s).
    let script = format!(
        r#"{PY_TLS_OVER}
import sys, time
s, tls, pump, fill = tls_over("{ca}", {port})
tls.write(b"GET http://a.test/ HTTP/1.1\r\n")
pump()
print("sent", flush=True)
s.settimeout(40)
try:
    while s.recv(65536):
        pass
except OSError:
    pass
"#,
        ca = p.ca.display(),
        port = p.tls.port()
    );
    let mut half = std::process::Command::new("python3")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let sent = first_line(&mut half, Duration::from_secs(10)).await;
    assert_eq!(sent.trim(), "sent");
    // Accepted (the handshake under way), not still in the listen queue.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // (The 1 s grace; a debug build's stop on a loaded machine takes a
    // second or more. Without the grace: 30 s.)
    drains_within(p.worker, Duration::from_secs(10)).await;
    let _ = half.kill();
    let _ = half.wait();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("the silent connection closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

/// HAProxy in TCP mode in front of the TLS listener, with `send-proxy-v2`:
/// the header is taken off before the TLS hello that follows it, and the
/// client it names (curl on 127.0.0.88) is logged, not HAProxy; HAProxy's
/// address without a header is closed, and any other peer is served as it
/// always was.
#[tokio::test]
async fn a_proxy_protocol_header_before_the_tls_hello() {
    if !have(
        "a_proxy_protocol_header_before_the_tls_hello",
        &["openssl", "curl", "haproxy"],
    ) {
        return;
    }
    let origin = Origin::start().await;
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("access.log");
    let p = tls_proxy(&[
        "--proxy-protocol-from",
        "127.0.0.1",
        "--access-log",
        log.to_str().unwrap(),
        "--access-log-format",
        "json",
    ])
    .await;
    let front: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let cfg = logs.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend f\n  bind {front}\n  default_backend b\n\
             backend b\n  server rotor {} send-proxy-v2\n",
            p.tls
        ),
    )
    .unwrap();
    let _haproxy = Proc::spawn("haproxy", &["-db", "-f", cfg.to_str().unwrap()]);
    eventually("HAProxy listening", || async {
        TcpStream::connect(front).await.is_ok()
    })
    .await;
    let ca = p.ca.to_str().unwrap();
    let url = origin.url("/");
    let through = |proxy: SocketAddr, from: &'static str| {
        let url = url.clone();
        async move {
            let proxy = format!("https://{proxy}");
            curl(&[
                "--interface",
                from,
                "--proxy",
                &proxy,
                "--proxy-cacert",
                ca,
                &url,
            ])
            .await
        }
    };
    let (code, out) = through(front, "127.0.0.88").await;
    assert_eq!((code, out.as_str()), (0, "200"), "through HAProxy");
    let (code, _) = through(p.tls, "127.0.0.1").await;
    assert_ne!(code, 0, "no header from a trusted peer: closed");
    let (code, out) = through(p.tls, "127.0.0.89").await;
    assert_eq!((code, out.as_str()), (0, "200"), "another peer: as always");
    eventually("both requests logged", || {
        let n = logged_clients(&log).len();
        async move { n >= 2 }
    })
    .await;
    let clients = logged_clients(&log);
    assert_eq!(clients.len(), 2, "{clients:?}");
    assert!(clients[0].starts_with("127.0.0.88:"), "{clients:?}");
    assert!(clients[1].starts_with("127.0.0.89:"), "{clients:?}");
    assert_eq!(origin.count(), 2);
}
