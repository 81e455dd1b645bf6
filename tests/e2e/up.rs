//! `rotor up`, started as a user would.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::util::*;

fn worker_pids(socket: &std::path::Path) -> Vec<i32> {
    status_json(socket)["peers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["role"] == "Worker")
        .map(|p| p["pid"].as_i64().unwrap() as i32)
        .collect()
}

/// `rotor up` with two workers rotating over 127.0.0.2–4 on `listen`, its
/// allocator at `socket`, and `extra` flags: once both workers are up.
async fn up_with_two_workers(socket: &std::path::Path, listen: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "up",
        "--workers",
        "2",
        "--pool",
        "127.0.0.2-127.0.0.4",
        "--listen",
        listen,
        "--socket",
        socket.to_str().unwrap(),
        "--allow-destination",
        "127.0.0.0/8",
    ];
    args.extend_from_slice(extra);
    let up = Proc::spawn(ROTOR, &args);
    eventually("both workers", || async {
        socket.exists() && worker_pids(socket).len() == 2
    })
    .await;
    up
}

/// What `rotor up` said to a NOTIFY_SOCKET (`sock`) up to its READY=1.
async fn said_until_ready(sock: &tokio::net::UnixDatagram) -> String {
    let mut said = String::new();
    let mut buf = vec![0u8; 4096];
    while !said.contains("READY=1") {
        let n = tokio::time::timeout(PATIENCE, sock.recv(&mut buf))
            .await
            .expect("no READY=1")
            .unwrap();
        said.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    said
}

/// `rotor up` (as `up_with_two_workers`, no state) with a configuration
/// file holding `text`: its directory (kept while it runs), socket, file
/// and listen address.
async fn up_with_config(
    text: &str,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
    String,
    Proc,
) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let config = dir.path().join("rotor.toml");
    std::fs::write(&config, text).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let up = up_with_two_workers(
        &socket,
        &listen,
        &["--no-state", "--config", config.to_str().unwrap()],
    )
    .await;
    (dir, socket, config, listen, up)
}

/// `rotor up`'s arguments for two workers rotating over 127.0.0.2 on
/// `listen`, its allocator at `socket`, no state kept, and `extra`.
fn two_workers_of_one_address<'a>(
    listen: &'a str,
    socket: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "up",
        "--workers",
        "2",
        "--pool",
        "127.0.0.2",
        "--listen",
        listen,
        "--socket",
        socket,
        "--no-state",
    ];
    args.extend_from_slice(extra);
    args
}

/// `rotor up` with `args`, logging at info to `log` (stopped, should the
/// test fail, as the `Proc` drops).
fn up_logged(args: &[&str], log: &std::path::Path) -> Proc {
    Proc::spawn_cmd(logging_at_info(ROTOR, log), ROTOR, args)
}

/// Stops `up` with SIGTERM and asserts a clean exit, waited for off the
/// test's runtime (an origin there may hold a worker's drain).
async fn stopped(mut up: Proc) {
    up.signal(Signal::SIGTERM);
    let status = tokio::task::spawn_blocking(move || up.wait(Duration::from_secs(20)))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// Kills worker `pid`; the worker `rotor up` starts in its place.
async fn replaced(socket: &std::path::Path, pid: i32) -> i32 {
    let others: Vec<i32> = worker_pids(socket)
        .into_iter()
        .filter(|p| *p != pid)
        .collect();
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    eventually("a replacement worker", || async {
        let now = worker_pids(socket);
        now.len() == 2 && !now.contains(&pid)
    })
    .await;
    worker_pids(socket)
        .into_iter()
        .find(|p| !others.contains(p))
        .unwrap()
}

#[tokio::test]
async fn rotor_up_serves_restarts_workers_and_stops_everything() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let state = dir.path().join("state");
    let mut up = up_with_two_workers(
        &socket,
        &listen,
        &[
            "--drain-timeout",
            "5s",
            "--state-dir",
            state.to_str().unwrap(),
        ],
    )
    .await;
    let proxy = listen.parse().unwrap();
    for _ in 0..6 {
        assert_eq!(get(proxy, &origin.url("/")).await.status, 200);
    }
    assert_eq!(origin.sources(), [ips(2..=4), ips(2..=4)].concat());

    // A crashed worker is replaced.
    replaced(&socket, worker_pids(&socket)[0]).await;
    assert_eq!(get(proxy, &origin.url("/")).await.status, 200);

    // SIGTERM stops everything, cleanly.
    let children = worker_pids(&socket);
    up.signal(Signal::SIGTERM);
    let status = up.wait(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    for pid in children {
        assert!(
            kill(Pid::from_raw(pid), None).is_err(),
            "worker {pid} outlived rotor up"
        );
    }
    assert!(tokio::net::TcpStream::connect(proxy).await.is_err());
    assert!(!socket.exists(), "the allocator left its socket behind");
}

#[tokio::test]
async fn ctrl_c_to_the_whole_process_group_is_a_stop_not_a_crash() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let log_path = dir.path().join("up.log");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut cmd = std::process::Command::new(ROTOR);
    // Its own process group, as a shell gives a foreground job.
    cmd.process_group(0)
        .stderr(std::fs::File::create(&log_path).unwrap());
    let mut up = Proc::spawn_cmd(
        cmd,
        ROTOR,
        &two_workers_of_one_address(&listen, socket.to_str().unwrap(), &[]),
    );
    eventually("both workers", || async {
        socket.exists() && worker_pids(&socket).len() == 2
    })
    .await;
    // What a terminal does on Ctrl-C: SIGINT to every process of the group.
    nix::sys::signal::killpg(up.pid(), Signal::SIGINT).unwrap();
    let status = up.wait(Duration::from_secs(20));
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(!log.contains("unexpectedly"), "{log}");
    assert!(status.code().is_some(), "{status:?}");
    assert!(
        tokio::net::TcpStream::connect(&listen).await.is_err(),
        "still listening"
    );
}

/// A second `rotor up` on a port or socket a first one holds refuses to
/// start, saying why, instead of joining it; a public listener without
/// authentication is refused before anything starts (and by --check).
#[tokio::test]
async fn a_second_rotor_up_and_a_public_open_listener_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let listen = format!("127.0.0.1:{}", free_port());
    let args = |socket: &std::path::Path, listen: &str| {
        vec![
            "up".to_string(),
            "--workers=1".into(),
            "--pool=127.0.0.2".into(),
            format!("--listen={listen}"),
            format!("--socket={}", socket.display()),
            "--no-state".into(),
        ]
    };
    let first_args = args(&socket, &listen);
    let _first = Proc::spawn(
        ROTOR,
        &first_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    eventually("the first rotor up", || async {
        socket.exists() && !worker_pids(&socket).is_empty()
    })
    .await;
    let run = |args: Vec<String>| {
        std::process::Command::new(ROTOR)
            .args(&args)
            .output()
            .unwrap()
    };
    let other_socket = dir.path().join("b.sock");
    let same_port = run(args(&other_socket, &listen));
    assert_eq!(same_port.status.code(), Some(2));
    let err = String::from_utf8_lossy(&same_port.stderr);
    assert!(err.contains("another process (another rotor up?)"), "{err}");
    let other_port = format!("127.0.0.1:{}", free_port());
    let same_socket = run(args(&socket, &other_port));
    assert_eq!(same_socket.status.code(), Some(2));
    let err = String::from_utf8_lossy(&same_socket.stderr);
    assert!(
        err.contains("an allocator already serves this socket"),
        "{err}"
    );
    assert!(!other_socket.exists());

    let public = format!("0.0.0.0:{}", free_port());
    for extra in [None, Some("--check"), Some("--check-config")] {
        let mut a = args(&dir.path().join("c.sock"), &public);
        a.extend(extra.map(String::from));
        let out = run(a);
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("without authentication"), "{err}");
    }
}

/// What `rotor up` could not run is refused at once with exit 2: more
/// workers than the allocator serves connections (a worker turned away
/// would answer its clients 503), and a state directory another allocator
/// holds (its allocator would exit at every restart), and a metrics port
/// taken. The allocator alone exits 2 on those too.
#[tokio::test]
async fn rotor_up_refuses_workers_past_max_peers_a_held_state_directory_and_a_taken_metrics_port() {
    let run = |extra: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("a.sock");
        let out = std::process::Command::new(ROTOR)
            .args(["up", "--pool=127.0.0.2"])
            .arg(format!("--listen=127.0.0.1:{}", free_port()))
            .arg(format!("--socket={}", socket.display()))
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--workers=10", "--max-peers=17", "--no-state", "--check"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("10 workers need --max-peers 18 at least"),
        "{err}"
    );
    let (code, err) = run(&["--workers=10", "--max-peers=18", "--no-state", "--check"]);
    assert_eq!(code, Some(0), "{err}");
    // An address not on this host: refused before anything starts, exit
    // 2 as a worker's own bind (it was 1).
    let (code, err) = run(&["--no-state", "--listen=192.0.2.77:8080"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("192.0.2.77"), "{err}");
    // The metrics on a proxy port: refused, by --check too (the allocator
    // failed at every start, and rotor up gave up with 1).
    let port = format!("127.0.0.1:{}", free_port());
    let wildcard = port.replace("127.0.0.1", "0.0.0.0");
    for (listen, check) in [(&port, true), (&port, false), (&wildcard, true)] {
        let mut args = vec!["--no-state".to_string(), "--no-auth".to_string()];
        args.push(format!("--listen={listen}"));
        args.push(format!("--metrics-listen={port}"));
        if check {
            args.push("--check".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, err) = run(&args);
        assert_eq!(code, Some(2), "{err}");
        assert!(
            err.contains("is --metrics-listen and a listen address"),
            "{err}"
        );
    }

    let held = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let _alloc = Allocator::start_in(held.clone(), &["--pool", "127.0.0.2"]).await;
    let state = held.path().join("state");
    let state = format!("--state-dir={}", state.display());
    let started = std::time::Instant::now();
    let (code, err) = run(&["--workers=1", &state]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("another allocator is using the state file"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let other = held.path().join("b.sock");
    let alone = std::process::Command::new(ALLOCATOR)
        .args(["--pool=127.0.0.2", &state])
        .arg(format!("--socket={}", other.display()))
        .output()
        .unwrap();
    assert_eq!(alone.status.code(), Some(2));
    // `--check` tries the state directory: one held is said, one the
    // allocator could not use fails it.
    let check = |state: &str| {
        let out = std::process::Command::new(ALLOCATOR)
            .args(["--pool=127.0.0.2", state, "--check"])
            .arg(format!("--socket={}", other.display()))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = check(&state);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("(held by a running allocator)"), "{err}");
    let (code, err) = check("--state-dir=/proc/no-such-dir");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot use the state directory"), "{err}");
    // The default directory (here systemd's $STATE_DIRECTORY), not given:
    // the allocator runs without it, warning, and so --check passes with
    // the warning (it failed, exit 1, where a start ran).
    let out = std::process::Command::new(ALLOCATOR)
        .args(["--pool=127.0.0.2", "--check"])
        .arg(format!("--socket={}", other.display()))
        .env("STATE_DIRECTORY", "/proc/no-such-dir")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("warning: cannot use the state directory")
            && err.contains("would run without kept state"),
        "{err}"
    );
    // It makes nothing: a directory not there yet stays so.
    let fresh = held.path().join("not-yet").join("state");
    let (code, err) = check(&format!("--state-dir={}", fresh.display()));
    assert_eq!(code, Some(0), "{err}");
    assert!(!held.path().join("not-yet").exists());
    // rotor up's --check runs its children's own: a state directory or an
    // access log they could not use fails it (it said ok; rotor up then
    // ran without its state, or its workers failed at each start).
    let (code, err) = run(&["--state-dir=/proc/no-such-dir", "--check"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot use the state directory"), "{err}");
    let (code, err) = run(&["--no-state", "--access-log=", "--check"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is empty"), "{err}");
    let (code, err) = run(&["--no-state", "--check"]);
    assert_eq!(code, Some(0), "{err}");

    // A metrics port another process holds: said once, before anything
    // starts (the allocator had failed at every start until rotor up gave
    // up on it); the allocator alone exits 2 too, leaving no socket file.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics = format!("--metrics-listen={}", taken.local_addr().unwrap());
    let started = std::time::Instant::now();
    let (code, err) = run(&["--workers=1", "--no-state", &metrics]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("cannot listen for metrics") && err.contains("another rotor up"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let third = held.path().join("c.sock");
    let alone = std::process::Command::new(ALLOCATOR)
        .args(["--pool=127.0.0.2", "--no-state", &metrics])
        .arg(format!("--socket={}", third.display()))
        .output()
        .unwrap();
    assert_eq!(alone.status.code(), Some(2));
    assert!(!third.exists());
}

/// `rotor up 2>&1 | head -1`: stderr goes away. Logging must not panic
/// (it did, in tracing's own error report), the children keep serving,
/// and SIGTERM still stops everything.
#[tokio::test]
async fn rotor_up_survives_a_broken_stderr_and_still_stops() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut cmd = std::process::Command::new(ROTOR);
    cmd.args([
        "up",
        "--workers=1",
        "--pool=127.0.0.2",
        &format!("--listen={listen}"),
        &format!("--socket={}", socket.display()),
        "--no-state",
        "--allow-destination=127.0.0.0/8",
    ])
    .env("RUST_LOG", "debug")
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    // Read one line, then hang up, as `head -1` does.
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut err, &mut line).unwrap();
    drop(err);
    let proxy = listen.parse().unwrap();
    eventually("rotor up serving", || async {
        matches!(ProxyConn::open(proxy).await.try_get(&origin.url("/")).await, Ok(r) if r.status == 200)
    })
    .await;
    for _ in 0..5 {
        assert_eq!(get(proxy, &origin.url("/")).await.status, 200);
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rotor up ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

/// The CPUs `pid` may run on.
fn cpus_of(pid: i32) -> Vec<usize> {
    let set = nix::sched::sched_getaffinity(Pid::from_raw(pid)).unwrap();
    (0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap())
        .collect()
}

#[tokio::test]
async fn pinned_workers_run_on_cpus_of_their_own_and_so_do_their_replacements() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut up = up_with_two_workers(&socket, &listen, &["--pin-workers", "--no-state"]).await;
    // As rotor up was allowed (the test's own CPUs): every other CPU each,
    // from the first and the second (the same one, on a single CPU).
    let mine = cpus_of(0);
    let expect: Vec<Vec<usize>> = match mine.len() {
        1 => vec![mine.clone(), mine.clone()],
        _ => (0..2)
            .map(|k| mine.iter().skip(k).step_by(2).copied().collect())
            .collect(),
    };
    let mut got: Vec<Vec<usize>> = worker_pids(&socket).into_iter().map(cpus_of).collect();
    got.sort();
    assert_eq!(got, expect);
    let proxy = listen.parse().unwrap();
    for _ in 0..3 {
        assert_eq!(get(proxy, &origin.url("/")).await.status, 200);
    }
    assert_eq!(origin.sources(), ips(2..=4));
    // A crashed worker's replacement takes its CPUs.
    let gone = worker_pids(&socket)[0];
    let lost = cpus_of(gone);
    assert_eq!(cpus_of(replaced(&socket, gone).await), lost);
    up.signal(Signal::SIGTERM);
    assert!(up.wait(Duration::from_secs(20)).success());
}

/// `rotor up` from a shell whose soft descriptor limit is 1024 (a login
/// shell's default): its workers start and serve. (It moved the listeners
/// above descriptor 1024 before placing them at 3.., which such a limit
/// refuses: every worker start failed, retried for ever.)
#[tokio::test]
async fn rotor_up_starts_its_workers_under_a_descriptor_limit_of_1024() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let listen = format!("127.0.0.1:{}", free_port());
    let origin = Origin::start().await;
    let cmd = with_nofile(std::process::Command::new(ROTOR), 1024, 1024);
    let _up = Proc::spawn_cmd(
        cmd,
        ROTOR,
        &two_workers_of_one_address(
            &listen,
            socket.to_str().unwrap(),
            &["--allow-destination", "127.0.0.0/8"],
        ),
    );
    let proxy: std::net::SocketAddr = listen.parse().unwrap();
    eventually("both workers", || async {
        socket.exists() && worker_pids(&socket).len() == 2
    })
    .await;
    eventually("a worker serves", || async {
        tokio::net::TcpStream::connect(proxy).await.is_ok()
            && tokio::time::timeout(Duration::from_secs(1), get(proxy, &origin.url("/")))
                .await
                .is_ok_and(|r| r.status == 200)
    })
    .await;
}

/// Once `rotor up` is told to stop, new clients are refused at once (not
/// queued for workers that no longer accept) while a tunnel still drains;
/// a SIGHUP storm while a worker restarts does not kill its replacement.
/// (Two threads: the echo server runs while the test waits for the exit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_rotor_up_refuses_new_clients_and_sighup_spares_a_starting_worker() {
    let echo = Echo::start().await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut up =
        up_with_two_workers(&socket, &listen, &["--drain-timeout", "20s", "--no-state"]).await;
    let proxy: std::net::SocketAddr = listen.parse().unwrap();

    // SIGHUP every 5 ms while a worker is killed and started again: the
    // new one lives (a SIGHUP before its handler would have killed it).
    let pid = up.pid();
    let storm = std::thread::spawn(move || {
        for _ in 0..400 {
            let _ = kill(pid, Signal::SIGHUP);
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let new = replaced(&socket, worker_pids(&socket)[0]).await;
    storm.join().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        kill(Pid::from_raw(new), None).is_ok(),
        "the new worker died"
    );
    assert!(worker_pids(&socket).contains(&new));

    let (code, mut tunnel) = connect_tunnel(proxy, &echo.addr.to_string()).await;
    assert_eq!(code, 200);
    up.signal(Signal::SIGTERM);
    eventually("new clients refused", || async {
        matches!(
            tokio::net::TcpStream::connect(proxy).await,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    })
    .await;
    // The tunnel still works, and its end ends the stop.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tunnel.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    tunnel.read_exact(&mut b).await.unwrap();
    assert!(kill(up.pid(), None).is_ok(), "rotor up is still draining");
    drop(tunnel);
    let status = up.wait(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
}

/// A `rotor up` killed outright (SIGKILL: it shuts nothing): its workers
/// drain what they hold, and its port closes at once, not at the drain's
/// end (each worker held the descriptor it was passed beside its
/// listener's copy, so clients queued in a backlog nobody read, and a
/// new `rotor up` found the port taken).
#[tokio::test]
async fn a_rotor_up_killed_outright_leaves_no_port_open() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let (socket, listen) = (dir.path().join("a.sock"), proxy.to_string());
    let up = up_with_two_workers(&socket, &listen, &["--drain-timeout", "20s", "--no-state"]).await;
    let slow = tokio::spawn({
        let url = origin.url("/slow/10000");
        async move { get(proxy, &url).await.status }
    });
    eventually("the slow request in flight", || async {
        origin.count() == 1
    })
    .await;
    kill(up.pid(), Signal::SIGKILL).unwrap();
    // Closed well before the request in flight ends (10 s).
    let killed = std::time::Instant::now();
    while tokio::net::TcpStream::connect(proxy).await.is_ok() {
        assert!(
            killed.elapsed() < Duration::from_secs(7),
            "the port still takes connections"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The allocator serves the workers' drain (a request they take in
    // it still needs a lease): it answers now, and stops once they are
    // gone (it stopped with them, and their drain had no leases).
    let status = rotor_control("status", &socket, &[]);
    assert!(status.contains("in rotation"), "{status}");
    // The request in flight was let finish.
    assert_eq!(slow.await.unwrap(), 200);
    eventually("the allocator to stop after the workers", || async {
        !socket.exists()
    })
    .await;
}

/// SIGUSR2 is `rotor up`'s parent-death signal for its allocator (it
/// serves the workers' drain, then stops): one sent to an allocator whose
/// parent is still there (a stray `kill -USR2`, a standalone allocator
/// under systemd) is ignored with a warning, not taken for an orphaning.
#[tokio::test]
async fn a_stray_sigusr2_does_not_stop_an_allocator() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let log = dir.path().join("allocator.log");
    let mut alloc = Allocator::start_logging(dir.clone(), &["--pool", "127.0.0.2"], &log).await;
    alloc.proc.signal(Signal::SIGUSR2);
    eventually("the stray signal to be said", || async {
        std::fs::read_to_string(&log).unwrap().contains("SIGUSR2")
    })
    .await;
    // An orphaned allocator with no worker connected stops within 100 ms.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(alloc.proc.is_running(), "the allocator stopped");
    let status = rotor_control("status", &alloc.socket, &[]);
    assert!(status.contains("in rotation"), "{status}");
}

/// A file that is not a socket at `--socket` (a configuration file's path
/// given by mistake) is refused, exit 2, and kept; `--check` says so. A
/// file at the lease table's path that is no table is kept too (the
/// workers lease over the socket). Both were deleted ("replacing a stale
/// socket file"), `/etc/passwd` too when given.
#[tokio::test]
async fn a_socket_path_holding_another_file_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rotor.toml");
    std::fs::write(&config, "important").unwrap();
    let path = config.to_str().unwrap();
    let said_to = dir.path().join("said");
    // (Bounded: one that took the path would serve on it.)
    let run = |extra: &[&str]| {
        let mut args = vec!["--socket", path, "--no-state", "--pool", "127.0.0.2"];
        args.extend_from_slice(extra);
        let mut p = Proc::spawn_cmd(logging_to(ALLOCATOR, &said_to), ALLOCATOR, &args);
        let code = p.wait(Duration::from_secs(10)).code();
        (code, std::fs::read_to_string(&said_to).unwrap())
    };
    let (code, err) = run(&[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("exists and is not a socket (a regular file)"),
        "{err}"
    );
    let (code, err) = run(&["--check"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("error: ") && err.contains("is not a socket"),
        "{err}"
    );
    assert_eq!(std::fs::read(&config).unwrap(), b"important");
    // The table's path.
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let table = dir.path().join("allocator.sock.leases");
    std::fs::write(&table, "kept").unwrap();
    let log = dir.path().join("allocator.log");
    let alloc = Allocator::start_logging(dir.clone(), &["--pool", "127.0.0.2"], &log).await;
    let status = rotor_control("status", &alloc.socket, &[]);
    assert!(status.contains("in rotation"), "{status}");
    assert_eq!(std::fs::read(&table).unwrap(), b"kept");
    assert_eq!(said(&log, "is not a lease table, and is not replaced"), 1);
}

/// An allocator whose socket and lease table were removed, and taken by
/// another allocator since, leaves the other's at its stop: it removed
/// both, and the other's workers leased over the socket from then on.
#[tokio::test]
async fn a_stopping_allocator_leaves_anothers_socket_and_table() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let log = dir.path().join("first.log");
    let mut first = Allocator::start_logging(dir.clone(), &["--pool", "127.0.0.2"], &log).await;
    let table = dir.path().join("allocator.sock.leases");
    assert!(table.exists());
    let other_state = dir.path().join("other-state");
    let socket = first.socket.to_str().unwrap().to_string();
    let args = [
        "--socket",
        &socket,
        "--state-dir",
        other_state.to_str().unwrap(),
    ];
    let args = [&args[..], &["--pool", "127.0.0.3"]].concat();
    // (The first binds its path again within 2 s: should it do so before
    // the second, the second is refused, and it is tried again.)
    let mut tries = 0;
    let _second = loop {
        tries += 1;
        let _ = std::fs::remove_file(&first.socket);
        let _ = std::fs::remove_file(&table);
        let mut second = Proc::spawn(ALLOCATOR, &args);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let taken = loop {
            let status = std::process::Command::new(ROTOR)
                .args(["status", "--socket", &socket])
                .output()
                .unwrap();
            if table.exists() && String::from_utf8_lossy(&status.stdout).contains("127.0.0.3") {
                break true;
            }
            if !second.is_running() || std::time::Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        match taken {
            true => break second,
            false => assert!(tries < 5, "the second allocator never took the path"),
        }
    };
    first.proc.signal(Signal::SIGTERM);
    assert!(first.proc.wait(Duration::from_secs(10)).success());
    assert!(first.socket.exists(), "the second's socket was removed");
    assert!(table.exists(), "the second's table was removed");
    let status = rotor_control("status", &first.socket, &[]);
    assert!(status.contains("127.0.0.3"), "{status}");
}

/// A socket whose allocator takes no connection (stopped, its queue
/// full) is one an allocator serves: `rotor up` asked by connecting, took
/// it for none, and started an allocator that could not bind there.
#[tokio::test]
async fn rotor_up_refuses_a_socket_a_stopped_allocator_serves() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let _stopped = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    // Its queue filled (128, or somaxconn): connections left there.
    let to = socket2::SockAddr::unix(&socket).unwrap();
    for _ in 0..5000 {
        let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&to);
    }
    let log = dir.path().join("said");
    let (socket, listen) = (
        socket.to_str().unwrap(),
        format!("127.0.0.1:{}", free_port()),
    );
    let args = [
        "up",
        "--pool=127.0.0.2",
        "--no-state",
        "--socket",
        socket,
        "--listen",
        &listen,
    ];
    let mut up = Proc::spawn_cmd(logging_to(ROTOR, &log), ROTOR, &args);
    let code = up.wait(Duration::from_secs(10)).code();
    let said = std::fs::read_to_string(&log).unwrap();
    assert_eq!(code, Some(2), "{said}");
    assert!(
        said.contains("an allocator already serves this socket"),
        "{said}"
    );
}

/// A state directory given that cannot be used (here a file) is refused
/// at start, exit 2, by the allocator and by `rotor up`: they ran
/// without one, with a warning, and every restart started the rotation,
/// the sessions and the quarantines by hand over.
#[tokio::test]
async fn a_state_directory_given_that_cannot_be_used_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    let (state, log) = (file.to_str().unwrap(), dir.path().join("said"));
    let socket = dir.path().join("a.sock");
    let socket = socket.to_str().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let runs: [(&str, Vec<&str>); 2] = [
        (ALLOCATOR, vec!["--socket", socket]),
        (ROTOR, vec!["up", "--socket", socket, "--listen", &listen]),
    ];
    for (program, mut args) in runs {
        args.extend_from_slice(&["--state-dir", state, "--pool", "127.0.0.2"]);
        let mut p = Proc::spawn_cmd(logging_to(program, &log), program, &args);
        let code = p.wait(Duration::from_secs(10)).code();
        let said = std::fs::read_to_string(&log).unwrap();
        assert_eq!(code, Some(2), "{program}: {said}");
        assert!(said.contains("cannot use the state directory"), "{said}");
    }
}

/// A state directory whose files can be written but which takes no new
/// file (here immutable, `chattr +i`; a directory of another user's,
/// mode 555): the sessions and the quarantine are saved by a rename
/// there, and every save failed with a warning after each check passed.
/// Refused at start, exit 2, by the allocator and `rotor up`, and by
/// their `--check`.
#[tokio::test]
async fn a_state_directory_that_takes_no_new_file_is_refused() {
    let test = "a_state_directory_that_takes_no_new_file_is_refused";
    if !root(test) || !have(test, &["chattr"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let socket = dir.path().join("a.sock");
    let (state, socket) = (state.to_str().unwrap(), socket.to_str().unwrap());
    let log = dir.path().join("said");
    // Its files made by an allocator that ran there.
    let run = [
        "--socket",
        socket,
        "--state-dir",
        state,
        "--pool",
        "127.0.0.2",
    ];
    let mut first = Proc::spawn(ALLOCATOR, &run);
    eventually("the allocator to serve", || async {
        std::path::Path::new(socket).exists()
    })
    .await;
    first.signal(Signal::SIGTERM);
    assert!(first.wait(Duration::from_secs(10)).success());
    assert!(std::path::Path::new(state).join("rotation.state").exists());
    struct Mutable<'a>(&'a str);
    impl Drop for Mutable<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("chattr")
                .args(["-i", self.0])
                .status();
        }
    }
    run_ok("chattr", &["+i", state], "chattr");
    let _mutable = Mutable(state);
    let listen = format!("127.0.0.1:{}", free_port());
    // (`--check` exits 1 for what it found, as for any other.)
    let up = [&["up", "--listen", &listen][..], &run].concat();
    let runs: [(&str, Vec<&str>, i32); 4] = [
        (ALLOCATOR, run.to_vec(), 2),
        (ALLOCATOR, [&run[..], &["--check"]].concat(), 1),
        (ROTOR, up.clone(), 2),
        (ROTOR, [&up[..], &["--check"]].concat(), 1),
    ];
    for (program, args, exit) in runs {
        let mut p = Proc::spawn_cmd(logging_to(program, &log), program, &args);
        let code = p.wait(Duration::from_secs(10)).code();
        let said = std::fs::read_to_string(&log).unwrap();
        assert_eq!(code, Some(exit), "{program} {args:?}: {said}");
        assert!(said.contains("cannot use the state directory"), "{said}");
    }
}

/// The allocator's socket file removed (a cleaning of its directory, an
/// `rm`): it is bound again within seconds, and said. Nothing told of it,
/// and a worker restarted after answered 503 to its share of the port.
#[tokio::test]
async fn a_removed_socket_file_is_bound_again() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let log = dir.path().join("allocator.log");
    let alloc = Allocator::start_logging(dir.clone(), &["--pool", "127.0.0.2"], &log).await;
    let table = dir.path().join("allocator.sock.leases");
    std::fs::remove_file(&alloc.socket).unwrap();
    std::fs::remove_file(&table).unwrap();
    assert!(!alloc.socket.exists());
    // Both made again: a worker that starts can map the table.
    eventually("the socket file to be bound again", || async {
        alloc.socket.exists() && table.exists()
    })
    .await;
    assert_eq!(
        said(&log, "the lease table's file was removed; made again"),
        1
    );
    let status = rotor_control("status", &alloc.socket, &[]);
    assert!(status.contains("in rotation"), "{status}");
    assert_eq!(said(&log, "socket file was removed: bound again"), 1);
    // A file of another kind in its place is not removed: said, once.
    // (Renamed over it: a file written in its place, once removed, could
    // meet the socket bound there again.)
    let aside = alloc.socket.with_extension("aside");
    std::fs::write(&aside, "not a socket").unwrap();
    std::fs::rename(&aside, &alloc.socket).unwrap();
    eventually("the file in its place to be said", || async {
        said(&log, "replaced by another kind of file") == 1
    })
    .await;
    assert_eq!(std::fs::read(&alloc.socket).unwrap(), b"not a socket");
}

/// A SIGHUP to `rotor up` reloads each worker once: it goes to the
/// allocator, whose reload reaches the workers (passed on to them as well,
/// each re-read its users file, certificate and resolver twice).
#[tokio::test]
async fn a_sighup_to_rotor_up_reloads_each_worker_once() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    add_user(&users, "alice", "s3cret");
    let socket = dir.path().join("a.sock");
    let log = dir.path().join("up.log");
    let listen = format!("127.0.0.1:{}", free_port());
    // Its own child, logging at info (Proc sets the log level the tests
    // run with), killed however the test ends.
    struct Up(std::process::Child);
    impl Drop for Up {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let up = Up(std::process::Command::new(ROTOR)
        .args(["up", "--workers", "2", "--pool", "127.0.0.2", "--no-state"])
        .args(["--listen", &listen, "--socket", socket.to_str().unwrap()])
        .args(["--auth-file", users.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap());
    let pid = Pid::from_raw(up.0.id() as i32);
    eventually("both workers", || async {
        socket.exists() && worker_pids(&socket).len() == 2
    })
    .await;
    // Each counting reloads (a reload before a worker maps the table is
    // not one it makes).
    eventually("both workers map the lease table", || async {
        worker_pids(&socket).iter().all(|p| {
            std::fs::read_to_string(format!("/proc/{p}/maps"))
                .is_ok_and(|m| m.contains("a.sock.leases"))
        })
    })
    .await;
    let reread = || said(&log, "users file re-read");
    let before = reread();
    kill(pid, Signal::SIGHUP).unwrap();
    eventually("both workers reloaded", || async { reread() >= before + 2 }).await;
    // Time for a second reload each, had it come (the allocator's reaches a
    // worker within half a second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        reread(),
        before + 2,
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    kill(pid, Signal::SIGTERM).unwrap();
    let _ = tokio::task::spawn_blocking(move || {
        let mut up = up;
        up.0.wait()
    })
    .await;
}

/// A worker `rotor up` starts again reads the configuration file as
/// `rotor up` read it, not as edited since: the file half rewritten (here,
/// not TOML at all) took each restarted worker down at its start, and
/// `rotor up` gave up on them. The copy goes when `rotor up` ends.
#[tokio::test]
async fn a_restarted_worker_reads_the_file_rotor_up_read() {
    let origin = Origin::start().await;
    let (_dir, socket, config, listen, mut up) =
        up_with_config("[worker]\nexpose-source = true\n").await;
    let copy = std::env::temp_dir().join(format!("rotor-up-{}.toml", up.pid()));
    assert!(copy.exists(), "{copy:?}");
    std::fs::write(&config, "[worker\nexpose-source = tru").unwrap();
    replaced(&socket, worker_pids(&socket)[0]).await;
    let proxy = listen.parse().unwrap();
    for _ in 0..4 {
        let r = get(proxy, &origin.url("/")).await;
        assert_eq!(r.status, 200);
        // The file's setting, in every worker, the new one too.
        assert!(r.headers.contains_key("rotor-source"), "{:?}", r.headers);
    }
    up.signal(Signal::SIGTERM);
    assert!(up.wait(Duration::from_secs(20)).success());
    assert!(!copy.exists(), "the copy outlived rotor up");
}

/// The copy of a `rotor up` killed outright (SIGKILL runs no clean-up) is
/// removed by the next `rotor up`'s start; a running one's is kept. (They
/// stayed in /tmp for good, each holding a whole configuration.)
#[tokio::test]
async fn a_killed_rotor_ups_copy_is_removed_by_the_next() {
    let dead = {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    };
    let left = std::env::temp_dir().join(format!("rotor-up-{dead}.toml"));
    std::fs::write(&left, "[worker]\n").unwrap();
    // A live process's (this test's): kept.
    let live = std::env::temp_dir().join(format!("rotor-up-{}.toml", std::process::id()));
    std::fs::write(&live, "[worker]\n").unwrap();
    let (_dir, _socket, _config, _listen, mut up) = up_with_config("[worker]\n").await;
    let gone = !left.exists();
    let kept = live.exists();
    let _ = std::fs::remove_file(&left);
    let _ = std::fs::remove_file(&live);
    assert!(gone, "a dead rotor up's copy was kept");
    assert!(kept, "a live process's copy was removed");
    up.signal(Signal::SIGTERM);
    assert!(up.wait(Duration::from_secs(20)).success());
}

/// A child `rotor up` starts again runs the binary `rotor up` runs, not
/// whatever replaced its file since (an upgrade's `install`): a new
/// version beside old ones could be refused by the old allocator, or
/// refuse a flag, at a random time after the upgrade.
#[tokio::test]
async fn a_restarted_worker_runs_the_binary_rotor_up_runs() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let binary = dir.path().join("rotor");
    std::fs::copy(ROTOR, &binary).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let args = two_workers_of_one_address(
        &listen,
        socket.to_str().unwrap(),
        &["--allow-destination", "127.0.0.1/32"],
    );
    let mut up = Proc::spawn(binary.to_str().unwrap(), &args);
    eventually("both workers", || async {
        socket.exists() && worker_pids(&socket).len() == 2
    })
    .await;
    // The file replaced (written aside, renamed over it, as install and
    // package managers do) by one that cannot serve.
    let other = dir.path().join("rotor.new");
    std::fs::write(&other, "#!/bin/sh\nexit 7\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&other, &binary).unwrap();
    let new = replaced(&socket, worker_pids(&socket)[0]).await;
    // (Shown as the path rotor up was started from, as current_exe gives
    // it: resolved.)
    let shown = binary.canonicalize().unwrap();
    let comm = std::fs::read_to_string(format!("/proc/{new}/cmdline")).unwrap();
    assert!(comm.starts_with(shown.to_str().unwrap()), "{comm:?}");
    let proxy = listen.parse().unwrap();
    for _ in 0..4 {
        assert_eq!(get(proxy, &origin.url("/")).await.status, 200);
    }
    up.signal(Signal::SIGTERM);
    assert!(up.wait(Duration::from_secs(20)).success());
}

/// Under systemd (`Type=notify`), `rotor up` says READY=1 once it serves
/// and STOPPING=1 at its stop, and its children say nothing: they are not
/// the service's main process (systemd refuses and logs what they send).
#[tokio::test]
async fn rotor_up_alone_tells_systemd_it_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&notify).unwrap();
    let socket = dir.path().join("a.sock");
    let listen = format!("127.0.0.1:{}", free_port());
    let args = two_workers_of_one_address(&listen, socket.to_str().unwrap(), &[]);
    let mut cmd = std::process::Command::new(ROTOR);
    cmd.env("NOTIFY_SOCKET", &notify);
    let mut up = Proc::spawn_cmd(cmd, ROTOR, &args);
    let said = said_until_ready(&sock).await;
    let mut buf = vec![0u8; 4096];
    assert!(said.contains("STATUS=2 workers"), "{said}");
    eventually("both workers", || async {
        socket.exists() && worker_pids(&socket).len() == 2
    })
    .await;
    // Nothing from the children (each would say READY=1 and a STATUS).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut more = String::new();
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(50), sock.recv(&mut buf)).await
    {
        more.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(more.is_empty(), "a child spoke to systemd: {more:?}");
    up.signal(Signal::SIGTERM);
    let n = tokio::time::timeout(PATIENCE, sock.recv(&mut buf))
        .await
        .expect("no STOPPING=1")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert!(up.wait(Duration::from_secs(20)).success());
}

/// READY=1 waits for the allocator to answer, not only to bind its
/// socket: a first pool load held up by a slow --pool-command (a metadata
/// service) had `rotor up` say READY=1 at once, and systemd start what
/// depends on rotor while every request got 503.
#[tokio::test]
async fn rotor_up_is_ready_once_the_allocator_answers() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&notify).unwrap();
    let socket = dir.path().join("a.sock");
    let listen = format!("127.0.0.1:{}", free_port());
    let extra = [
        "--pool-command",
        "sleep 3; echo 127.0.0.3",
        "--allow-destination",
        "127.0.0.1/32",
    ];
    let args = two_workers_of_one_address(&listen, socket.to_str().unwrap(), &extra);
    let mut cmd = std::process::Command::new(ROTOR);
    cmd.env("NOTIFY_SOCKET", &notify);
    let t0 = std::time::Instant::now();
    let mut up = Proc::spawn_cmd(cmd, ROTOR, &args);
    said_until_ready(&sock).await;
    let ready = t0.elapsed();
    assert!(
        ready >= Duration::from_millis(2900),
        "READY=1 after {ready:?}"
    );
    // It answers now, with the command's address in its pool.
    let status = status_json(&socket);
    assert_eq!(pool_of(&status).len(), 2, "{status}");
    let proxy = listen.parse().unwrap();
    let url = origin.url("/");
    eventually("a request served", || {
        let url = url.clone();
        async move { get(proxy, &url).await.status == 200 }
    })
    .await;
    up.signal(Signal::SIGTERM);
    assert!(up.wait(Duration::from_secs(20)).success());
}

/// Under `rotor up` each child's log lines start with its name and pid
/// (`worker 2[1234]: `): they share `rotor up`'s stderr (and its pid in
/// the journal), and which worker said what could not be told. A worker
/// an operator stops is not logged as crashed.
#[tokio::test]
async fn each_childs_log_lines_name_it() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let log = dir.path().join("up.log");
    let listen = format!("127.0.0.1:{}", free_port());
    let args = two_workers_of_one_address(&listen, socket.to_str().unwrap(), &[]);
    let up = up_logged(&args, &log);
    eventually("both workers", || async {
        socket.exists() && worker_pids(&socket).len() == 2
    })
    .await;
    let pids = worker_pids(&socket);
    // One stopped cleanly from outside (an operator's SIGTERM) is started
    // again, and said so at info, not as a crash.
    kill(Pid::from_raw(pids[0]), Signal::SIGTERM).unwrap();
    eventually("a replacement worker", || async {
        let now = worker_pids(&socket);
        now.len() == 2 && !now.contains(&pids[0])
    })
    .await;
    stopped(up).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("exited unexpectedly"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("INFO") && l.contains("stopped cleanly, not by rotor up")),
        "{text}"
    );
    for pid in pids {
        let named = |l: &&str| l.starts_with("worker ") && l.contains(&format!("[{pid}]: "));
        assert!(text.lines().filter(named).count() >= 2, "{pid}: {text}");
    }
    assert!(text.lines().any(|l| l.starts_with("allocator[")), "{text}");
    // rotor up's own lines are its own.
    assert!(
        text.lines()
            .any(|l| l.contains("rotor is up") && !l.contains("]: ")),
        "{text}"
    );
}

/// Listeners asked for on port 0 (an HTTP and a SOCKS5 one: not "given
/// twice") are logged with the ports bound, and serve there.
#[tokio::test]
async fn rotor_up_on_port_0_logs_the_ports_it_bound() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let log = dir.path().join("up.log");
    let any = "127.0.0.1:0";
    let args = two_workers_of_one_address(
        any,
        socket.to_str().unwrap(),
        &["--socks-listen", any, "--allow-destination", "127.0.0.0/8"],
    );
    let up = up_logged(&args, &log);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually("rotor is up", || async { read().contains("rotor is up") }).await;
    let text = read();
    let line = text.lines().find(|l| l.contains("rotor is up")).unwrap();
    let port_of = |field: &str| -> u16 {
        let at = line.find(&format!("{field}=[127.0.0.1:")).expect(line) + field.len() + 12;
        line[at..].split(']').next().unwrap().parse().expect(line)
    };
    let (http, socks) = (port_of("listen"), port_of("socks_listen"));
    assert!(http != 0 && socks != 0 && http != socks, "{line}");
    let proxy = format!("127.0.0.1:{http}").parse().unwrap();
    assert_eq!(get(proxy, &origin.url("/")).await.status, 200);
    let origin_url = origin.url("/");
    let socks_proxy = format!("socks5h://127.0.0.1:{socks}");
    if have("rotor_up_on_port_0_logs_the_ports_it_bound", &["curl"]) {
        let (code, out) = curl(&["-x", &socks_proxy, &origin_url]).await;
        assert_eq!((code, out.as_str()), (0, "200"));
    }
    stopped(up).await;
}

/// The allocator `rotor up` runs, by /proc (its child whose command is
/// `… allocator …`).
fn allocator_of(up: u32) -> i32 {
    let children = std::fs::read_to_string(format!("/proc/{up}/task/{up}/children")).unwrap();
    children
        .split_whitespace()
        .map(|p| p.parse::<i32>().unwrap())
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.split(|&b| b == 0).nth(1) == Some(&b"allocator"[..]))
        })
        .expect("an allocator child")
}

/// `rotor reload --config FILE` under `rotor up` tells an edit by the
/// contents of the copy its allocator reads: after the allocator was
/// restarted (it reads `rotor up`'s copy again, not the file), an edit
/// made before passed for applied (exit 0), judged by the new
/// allocator's start.
#[tokio::test]
async fn rotor_reload_tells_an_edit_after_the_allocator_was_restarted() {
    let (_dir, socket, config, _listen, mut up) = up_with_config("[worker]\n").await;
    let reload = || {
        std::process::Command::new(ROTOR)
            .args(["reload", "--socket", socket.to_str().unwrap()])
            .args(["--config", config.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = reload();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    std::fs::write(&config, "[worker]\nexpose-source = true\n").unwrap();
    // Edited, then the allocator restarted (it reads the copy again).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let first = allocator_of(up.pid().as_raw() as u32);
    kill(Pid::from_raw(first), Signal::SIGKILL).unwrap();
    eventually("the allocator restarted and answering", || async {
        let status = std::process::Command::new(ROTOR)
            .args(["status", "--socket", socket.to_str().unwrap()])
            .output()
            .unwrap();
        status.status.success() && allocator_of(up.pid().as_raw() as u32) != first
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let out = reload();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{said}");
    assert!(said.contains("changed since"), "{said}");
    up.signal(Signal::SIGTERM);
    assert!(up.wait(Duration::from_secs(20)).success());
}

/// A user removed, then a SIGHUP to `rotor up` passed on to its allocator
/// as it dies, before acting on it: the restarted allocator is told of
/// the reload too once it answers, and the workers, back on it after the
/// reload was counted, reload all the same; the user is refused. (The
/// SIGHUP was lost with the allocator: on a busy host, CI's, the test's
/// SIGHUP 50 ms after its SIGKILL still reached it dying; and a worker
/// whose reload watcher had not yet looked at the first allocator took
/// its successor for the first, and missed its reload. Before, a
/// SIGHUP while it was down was dropped, then counted before the workers
/// came back: the removed user kept access.)
#[tokio::test]
async fn a_sighup_during_an_allocator_restart_still_reloads_the_workers() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    add_user(&users, "alice", "s3cret");
    add_user(&users, "bob", "pw");
    let socket = dir.path().join("a.sock");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut args = two_workers_of_one_address(
        &listen,
        socket.to_str().unwrap(),
        &["--allow-destination", "127.0.0.1/32"],
    );
    args.extend(["--auth-file", users.to_str().unwrap()]);
    let mut up = Proc::spawn(ROTOR, &args);
    eventually("both workers", || async {
        socket.exists() && worker_pids(&socket).len() == 2
    })
    .await;
    let origin = Origin::start().await;
    let proxy: std::net::SocketAddr = listen.parse().unwrap();
    let as_bob = || async {
        let mut c = ProxyConn::open(proxy).await;
        let req = hyper::Request::get(origin.url("/"))
            .header("proxy-authorization", basic("bob", "pw"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        c.send(req).await.status
    };
    assert_eq!(as_bob().await, 200);
    assert!(remove_user(&users, "bob").status.success());
    let allocator = Pid::from_raw(allocator_of(up.pid().as_raw() as u32));
    // The allocator stopped, the SIGHUP passed on to it (pending), and it
    // killed before it could act on it.
    let status = |field: &str| {
        let s = std::fs::read_to_string(format!("/proc/{allocator}/status")).unwrap_or_default();
        let value = s.lines().find_map(|l| l.strip_prefix(field)).unwrap_or("");
        value.trim().to_string()
    };
    kill(allocator, Signal::SIGSTOP).unwrap();
    eventually("the allocator stopped", || async {
        status("State:").starts_with('T')
    })
    .await;
    up.signal(Signal::SIGHUP);
    eventually("the SIGHUP passed on", || async {
        u64::from_str_radix(&status("ShdPnd:"), 16).is_ok_and(|m| m & 1 << (libc::SIGHUP - 1) != 0)
    })
    .await;
    kill(allocator, Signal::SIGKILL).unwrap();
    // By both workers: 20 connections in a row refused (one connection
    // reaches either worker, and each looks for the reload every 500 ms on
    // its own: one 407 was one worker's).
    eventually("bob refused by both workers", || async {
        for _ in 0..20 {
            if as_bob().await != 407 {
                return false;
            }
        }
        true
    })
    .await;
    up.signal(Signal::SIGTERM);
    assert!(up.wait(Duration::from_secs(20)).success());
}

/// A SIGHUP to `rotor up` (`systemctl reload`) after its configuration
/// file was edited says the edit is not applied: a reload does not read
/// the file again, and the log had said only "reloading".
#[tokio::test]
async fn a_sighup_to_rotor_up_says_an_edited_file_is_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let config = dir.path().join("rotor.toml");
    let log = dir.path().join("up.log");
    std::fs::write(&config, "[allocator]\npool = [\"127.0.0.2\"]\n").unwrap();
    let mut cmd = std::process::Command::new(ROTOR);
    cmd.stderr(std::fs::File::create(&log).unwrap());
    let listen = format!("--listen=127.0.0.1:{}", free_port());
    let socket_arg = format!("--socket={}", socket.display());
    let config_arg = format!("--config={}", config.display());
    let up = Proc::spawn_cmd(
        cmd,
        ROTOR,
        &[
            "up",
            "--workers=1",
            &listen,
            &socket_arg,
            &config_arg,
            "--no-state",
        ],
    );
    eventually("a worker", || async {
        socket.exists() && worker_pids(&socket).len() == 1
    })
    .await;
    let said = || std::fs::read_to_string(&log).unwrap_or_default();
    let warning = "the configuration file changed since rotor up started";
    // Not edited: nothing said.
    up.signal(Signal::SIGHUP);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!said().contains(warning), "{}", said());
    std::fs::write(&config, "[allocator]\npool = [\"127.0.0.3\"]\n").unwrap();
    up.signal(Signal::SIGHUP);
    eventually("the edit told", || async { said().contains(warning) }).await;
}

/// An operator's SIGTERM to `rotor up`'s allocator (a clean stop, not
/// rotor up's) is no failed start: it is restarted after the first pause
/// each time. Each counted as a failure, doubling the pause (1.6 s of
/// 503s by the fifth), and the tenth in a row stopped rotor up.
#[tokio::test]
async fn clean_stops_of_a_child_are_no_failed_starts() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let log = dir.path().join("up.log");
    let listen = format!("127.0.0.1:{}", free_port());
    let args = [
        "up",
        "--workers=1",
        "--pool=127.0.0.2",
        "--no-state",
        "--socket",
        socket.to_str().unwrap(),
        "--listen",
        &listen,
    ];
    let mut up = Proc::spawn_cmd(logging_at_info(ROTOR, &log), ROTOR, &args);
    let answers = || {
        std::process::Command::new(ROTOR)
            .args(["status", "--socket", socket.to_str().unwrap()])
            .output()
            .unwrap()
            .status
            .success()
    };
    for n in 1..=11 {
        eventually("the allocator answering", || async { answers() }).await;
        let allocator = allocator_of(up.pid().as_raw() as u32);
        kill(Pid::from_raw(allocator), Signal::SIGTERM).unwrap();
        eventually("its clean stop said", || async {
            said(&log, "stopped cleanly, not by rotor up; restarting") == n
        })
        .await;
        assert!(up.is_running(), "rotor up stopped after {n} clean stops");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let pauses: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("stopped cleanly, not by rotor up"))
        .filter_map(|l| l.split("retry_in=").nth(1))
        .collect();
    assert_eq!(pauses, ["100ms"; 11], "{text}");
    eventually("the last allocator answering", || async { answers() }).await;
    up.signal(Signal::SIGTERM);
    assert!(up.wait(Duration::from_secs(20)).success());
}
