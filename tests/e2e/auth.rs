//! Proxy authentication, and the refusal to run an open proxy by accident.

use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::util::*;

#[tokio::test]
async fn requests_and_tunnels_need_valid_credentials() {
    let (_dir, users) = users_file(&[("alice", "s3cret"), ("bob", "hunter2")]);
    let text = std::fs::read_to_string(&users).unwrap();
    assert!(
        text.contains("alice:$argon2id$") && !text.contains("s3cret"),
        "{text}"
    );

    let origin = Origin::start().await;
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &["--auth-file", users.to_str().unwrap()]).await;

    let r = get(worker.addr, &origin.url("/")).await;
    assert_eq!(r.status, 407);
    assert_eq!(
        r.headers["proxy-authenticate"],
        "Basic realm=\"rotor\", charset=\"UTF-8\""
    );
    for creds in [
        basic("alice", "wrong"),
        basic("mallory", "s3cret"),
        "Bearer x".into(),
    ] {
        let req = Request::get(origin.url("/"))
            .header("proxy-authorization", creds)
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(
            ProxyConn::open(worker.addr).await.send(req).await.status,
            407
        );
    }
    assert_eq!(origin.count(), 0);

    let mut conn = ProxyConn::open(worker.addr).await;
    for _ in 0..3 {
        let req = Request::get(origin.url("/"))
            .header("proxy-authorization", basic("alice", "s3cret"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(conn.send(req).await.status, 200);
    }
    let seen = origin.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    assert!(seen
        .iter()
        .all(|s| s.headers.get("proxy-authorization").is_none()));
    // Two credentials fields, in either order, a GET (fast path and
    // hyper's) or a CONNECT: 400, not a log-in as the first (a front
    // routing by the last would disagree). Nothing sent.
    let (good, other) = (basic("alice", "s3cret"), basic("bob", "hunter2"));
    for (target, version) in [
        (origin.url("/"), "GET {} HTTP/1.1"),
        (origin.url("/"), "GET {} HTTP/1.0"),
        (echo.addr.to_string(), "CONNECT {} HTTP/1.1"),
    ] {
        for (a, b) in [(&good, &other), (&other, &good)] {
            let line = version.replace("{}", &target);
            let head = format!(
                "{line}\r\nHost: {target}\r\nProxy-Authorization: {a}\r\nProxy-Authorization: {b}\r\n\r\n"
            );
            let mut s = TcpStream::connect(worker.addr).await.unwrap();
            s.write_all(head.as_bytes()).await.unwrap();
            let answer = read_head(&mut s).await;
            assert!(
                answer.starts_with("HTTP/1.") && answer[8..].starts_with(" 400"),
                "{line}: {answer}"
            );
            assert!(
                answer.contains("more than one Proxy-Authorization"),
                "{answer}"
            );
        }
    }
    assert_eq!(origin.count(), 3);

    let (code, _) = connect_tunnel(worker.addr, &echo.addr.to_string()).await;
    assert_eq!(code, 407);
    let mut s = TcpStream::connect(worker.addr).await.unwrap();
    let head = format!(
        "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\nProxy-Authorization: {1}\r\n\r\n",
        echo.addr,
        basic("bob", "hunter2")
    );
    s.write_all(head.as_bytes()).await.unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 200"));
    // The echo server records its peer when its accept() returns, which may
    // be just after the proxy's connect completed.
    eventually("the tunnel at the echo server", || async {
        echo.peers.lock().unwrap().len() == 1
    })
    .await;
}

#[test]
fn a_worker_on_a_public_address_needs_auth_or_no_auth() {
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--listen",
            "0.0.0.0:0",
            "--socket",
            "/nonexistent/a.sock",
            "--check",
        ];
        args.extend_from_slice(extra);
        Command::new(WORKER).args(&args).output().unwrap()
    };
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without authentication") && err.contains("--no-auth"),
        "{err}"
    );
    assert!(run(&["--no-auth"]).status.success());
}

/// `rotor reload`, to the allocator alone, reaches the workers: a removed
/// user is refused once it returns and the workers have seen it.
#[tokio::test]
async fn rotor_reload_rereads_every_workers_users_file() {
    reload_rereads_users(false, false).await;
}

/// The same when the reload's refresh grows the pool past its lease table,
/// so the workers find the reload in a new table.
#[tokio::test]
async fn a_reload_that_grows_the_pool_still_reaches_the_workers() {
    reload_rereads_users(true, false).await;
}

/// The same for a worker that may not map the lease table (another user,
/// let in by `--allow-uid`): it asks the allocator over the socket.
#[tokio::test]
async fn a_reload_reaches_a_worker_that_leases_over_the_socket() {
    reload_rereads_users(false, true).await;
}

async fn reload_rereads_users(grow: bool, over_socket: bool) {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if over_socket && !root("a_reload_reaches_a_worker_that_leases_over_the_socket") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    add_user(&users, "alice", "s3cret");
    add_user(&users, "bob", "pw");
    let pool = dir.path().join("pool");
    std::fs::write(&pool, "127.0.0.2\n").unwrap();
    let origin = Origin::start().await;
    let mut args = vec!["--pool-file", pool.to_str().unwrap()];
    if over_socket {
        // Per-user rules: the table is the allocator user's alone, and the
        // users file is readable by the other user.
        args.extend(["--socket-mode", "666", "--allow-uid", "nobody"]);
        let open = std::fs::Permissions::from_mode(0o755);
        std::fs::set_permissions(dir.path(), open).unwrap();
        std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let alloc_dir = Arc::new(tempfile::tempdir().unwrap());
    std::fs::set_permissions(alloc_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let alloc = Allocator::start_in(alloc_dir, &args).await;
    let auth = ["--auth-file", users.to_str().unwrap()];
    let second = match over_socket {
        true => {
            let mut cmd = std::process::Command::new(WORKER);
            cmd.uid(65534).gid(65534);
            let mut args = ALLOW_LOOPBACK.to_vec();
            args.extend(auth);
            Worker::start_cmd(cmd, &alloc.socket, free_port(), &args).await
        }
        false => Worker::start(&alloc.socket, &auth).await,
    };
    let workers = [Worker::start(&alloc.socket, &auth).await, second];
    if over_socket {
        let table = rotor_allocator::server::table_path_for(&alloc.socket).unwrap();
        let mode = std::fs::metadata(&table).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "a table the other user could map");
    }
    let status_as = |w: std::net::SocketAddr, who: &'static str| {
        let url = origin.url("/");
        async move {
            let req = Request::get(url)
                .header(
                    "proxy-authorization",
                    basic(who, if who == "alice" { "s3cret" } else { "pw" }),
                )
                .body(Full::new(Bytes::new()))
                .unwrap();
            ProxyConn::open(w).await.send(req).await.status
        }
    };
    for w in &workers {
        assert_eq!(status_as(w.addr, "alice").await, 200);
    }
    let out = remove_user(&users, "alice");
    assert!(String::from_utf8_lossy(&out.stderr).contains("rotor reload"));
    if grow {
        std::fs::write(&pool, "127.0.1.0/24\n").unwrap();
    }
    rotor_control("reload", &alloc.socket, &[]);
    if grow {
        // Past the first table's room (64 entries): a new table.
        assert_eq!(status_json(&alloc.socket)["families"][0]["total"], 256);
    }
    for w in &workers {
        let addr = w.addr;
        eventually("alice refused after rotor reload", || async move {
            status_as(addr, "alice").await == 407
        })
        .await;
        assert_eq!(status_as(w.addr, "bob").await, 200);
    }
}

/// `rotor user add/remove`, run as root on a users file the workers' user
/// owns, keeps its owner, group and mode (a new file of root's, 0640, was
/// unreadable to the workers: a removed user kept access, and the next
/// worker start failed); two changes at once both land.
#[test]
fn user_changes_keep_the_files_owner_and_mode_and_both_land() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    // A new file takes its directory's group (/etc/rotor is root:rotor).
    if nix::unistd::geteuid().is_root() {
        nix::unistd::chown(dir.path(), None, Some(nix::unistd::Gid::from_raw(4321))).unwrap();
    }
    add_user(&users, "alice", "s3cret");
    if nix::unistd::geteuid().is_root() {
        let new = std::fs::metadata(&users).unwrap();
        assert_eq!((new.gid(), new.mode() & 0o7777), (4321, 0o640));
    }
    if nix::unistd::geteuid().is_root() {
        nix::unistd::chown(
            &users,
            Some(nix::unistd::Uid::from_raw(65534)),
            Some(nix::unistd::Gid::from_raw(65534)),
        )
        .unwrap();
    }
    std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o604)).unwrap();
    let before = std::fs::metadata(&users).unwrap();
    let adds: Vec<_> = ["bob", "carol"]
        .into_iter()
        .map(|name| {
            let users = users.clone();
            std::thread::spawn(move || add_user(&users, name, "pw"))
        })
        .collect();
    for a in adds {
        a.join().unwrap();
    }
    let after = std::fs::metadata(&users).unwrap();
    assert_eq!(
        (after.uid(), after.gid(), after.mode() & 0o7777),
        (before.uid(), before.gid(), 0o604)
    );
    let text = std::fs::read_to_string(&users).unwrap();
    for name in ["alice:", "bob:", "carol:"] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} in {text}"
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "users")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A users file an editor saved with a byte-order mark and indented lines
/// is read the same by the workers and by `rotor user`: the first user is
/// `alice`, not `\u{feff}alice`, and `rotor user remove` finds an indented
/// one the workers let in.
#[tokio::test]
async fn a_bom_and_indented_lines_are_read_alike_by_workers_and_rotor_user() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    add_user(&users, "alice", "s3cret");
    add_user(&users, "bob", "pw");
    let text = std::fs::read_to_string(&users).unwrap();
    let indented: Vec<String> = text.lines().map(|l| format!("  {l}")).collect();
    std::fs::write(&users, format!("\u{feff}{}\n", indented.join("\n"))).unwrap();
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &["--auth-file", users.to_str().unwrap()]).await;
    let req = Request::get(origin.url("/"))
        .header("proxy-authorization", basic("alice", "s3cret"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(
        ProxyConn::open(worker.addr).await.send(req).await.status,
        200
    );
    remove_user(&users, "bob");
    let left = std::fs::read_to_string(&users).unwrap();
    assert!(!left.contains("bob:") && left.contains("alice:"), "{left}");
}

/// `rotor user add/remove` on a users file that is a symbolic link (one
/// other tooling keeps) writes the file it leads to, and the link stays a
/// link: renamed over, it became a file of its own, and the file the
/// workers may read through another path stayed as it was.
#[test]
fn user_changes_write_through_a_linked_users_file() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let target = real.join("users");
    add_user(&target, "alice", "a");
    let link = dir.path().join("users");
    std::os::unix::fs::symlink("real/users", &link).unwrap();
    add_user(&link, "bob", "b");
    remove_user(&link, "alice");
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the link was replaced"
    );
    let text = std::fs::read_to_string(&target).unwrap();
    assert!(
        text.starts_with("bob:") && !text.contains("alice"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_dir(&real).unwrap().count(),
        1,
        "a file left aside"
    );
}

/// `rotor user add` at a terminal asks twice, and refuses two passwords
/// that differ (a typo unseen would set one nobody knows); from a pipe it
/// reads one line, as scripts give it.
#[test]
fn rotor_user_at_a_terminal_asks_twice() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    let at_a_terminal = |typed: &str| {
        let (mut master, slave) = pty();
        let child = std::process::Command::new(ROTOR)
            .args(["user", "add", "bob", "--auth-file", users.to_str().unwrap()])
            .stdin(slave)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        master.write_all(typed.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = at_a_terminal("s3cret\ns3cert\n");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("again: ") && err.contains("differ"), "{err}");
    assert!(!users.exists());
    let (code, err) = at_a_terminal("s3cret\ns3cret\n");
    assert_eq!(code, Some(0), "{err}");
    assert!(std::fs::read_to_string(&users).unwrap().starts_with("bob:"));

    // Ctrl-C at the prompt (echo off) gives the terminal its echo back.
    let (_master, slave) = pty();
    let echo = |f: &std::fs::File| {
        use std::os::fd::AsRawFd;
        // SAFETY: tcgetattr into a termios of our own.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::tcgetattr(f.as_raw_fd(), &mut t) }, 0);
        t.c_lflag & libc::ECHO != 0
    };
    assert!(echo(&slave));
    let mut carol = std::process::Command::new(ROTOR);
    carol
        .args([
            "user",
            "add",
            "carol",
            "--auth-file",
            users.to_str().unwrap(),
        ])
        .stdin(slave.try_clone().unwrap())
        .stderr(std::process::Stdio::null());
    // SIGINT as at a terminal's shell: a test run started in the
    // background (a CI runner's `cmd &`) hands its children SIGINT
    // ignored, which rotor rightly keeps ignored, and the wait below hung.
    // SAFETY: signal(2) is async-signal-safe, as pre_exec requires.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut carol, || {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = carol.spawn().unwrap();
    let t0 = std::time::Instant::now();
    while echo(&slave) {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(5),
            "echo never went off"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(echo(&slave), "the terminal was left without echo");
}

/// A pseudo-terminal: its master end and its slave end.
fn pty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty fills two descriptors, owned as files below.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty");
    // SAFETY: just opened, owned by nothing else.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    }
}

/// A `rotor reload` right after a worker mapped the lease table, before
/// its watcher's first look (it looks twice a second), is not lost: the
/// watcher counts from the table's count when it was mapped. It took that
/// first look for its starting point, and the removed user kept access.
#[tokio::test]
async fn a_reload_just_after_a_worker_starts_reaches_it() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    add_user(&users, "alice", "s3cret");
    let origin = Origin::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let auth = ["--auth-file", users.to_str().unwrap()];
    let worker = Worker::start(&alloc.socket, &auth).await;
    mapped(&[&worker]).await;
    remove_user(&users, "alice");
    rotor_control("reload", &alloc.socket, &[]);
    let addr = worker.addr;
    let url = origin.url("/");
    eventually("alice refused after rotor reload", || {
        let url = url.clone();
        async move {
            let req = Request::get(url)
                .header("proxy-authorization", basic("alice", "s3cret"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            ProxyConn::open(addr).await.send(req).await.status == 407
        }
    })
    .await;
}

/// A tunnel is checked once, when it opens, and may stay open for hours:
/// a reload that removes its user (or changes the password) closes it.
/// Another user's tunnel stays open.
#[tokio::test]
async fn a_reload_that_removes_a_user_closes_the_users_tunnels() {
    use tokio::io::AsyncReadExt;
    let (_dir, users) = users_file(&[("alice", "s3cret"), ("bob", "pw")]);
    let echo = Echo::start().await;
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &["--auth-file", users.to_str().unwrap()]).await;
    let open = |user: &'static str, pass: &'static str| {
        let (proxy, target) = (worker.addr, echo.addr);
        async move {
            let mut s = TcpStream::connect(proxy).await.unwrap();
            let head = format!(
                "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {}\r\n\r\n",
                basic(user, pass)
            );
            s.write_all(head.as_bytes()).await.unwrap();
            let head = read_head(&mut s).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            s
        }
    };
    let echoes = |mut s: TcpStream| async move {
        s.write_all(b"ping").await.ok()?;
        let mut b = [0u8; 4];
        tokio::time::timeout(PATIENCE, s.read_exact(&mut b))
            .await
            .ok()?
            .ok()?;
        Some(s)
    };
    let alice = echoes(open("alice", "s3cret").await).await.unwrap();
    let bob = echoes(open("bob", "pw").await).await.unwrap();
    remove_user(&users, "alice");
    rotor_control("reload", &alloc.socket, &[]);
    // Alice's tunnel ends (its read sees the end), soon after the reload.
    let mut alice = alice;
    let mut b = [0u8; 16];
    let n = tokio::time::timeout(PATIENCE, alice.read(&mut b)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "{n:?}");
    assert!(echoes(bob).await.is_some(), "bob's tunnel stays open");
}

/// Wrong passwords from many networks (so none is slowed down) leave the
/// worker no larger than the checks under way need: each check's 19 MiB
/// (argon2, on a blocking thread) stayed in that thread's arena, and a
/// few dozen wrong passwords left a worker holding 300 MB and more.
#[tokio::test]
async fn password_checks_leave_no_memory_behind() {
    let (_dir, users) = users_file(&[("alice", "s3cret")]);
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &["--auth-file", users.to_str().unwrap()]).await;
    let rss = || rss_kb(worker.proc.pid()) / 1024;
    let before = rss();
    for round in 0..4u8 {
        let tries = (0..8u8).map(|i| {
            let addr = worker.addr;
            async move {
                // A network of its own (a /24) for each.
                let from = std::net::SocketAddr::from(([127, 60 + round, i, 1], 0));
                let sock = tokio::net::TcpSocket::new_v4().unwrap();
                sock.bind(from).unwrap();
                let mut s = sock.connect(addr).await.unwrap();
                let req = format!(
                    "GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\nProxy-Authorization: {}\r\n\r\n",
                    basic("alice", "wrong")
                );
                s.write_all(req.as_bytes()).await.unwrap();
                read_head(&mut s).await
            }
        });
        for head in futures_util::future::join_all(tries).await {
            assert!(head.starts_with("HTTP/1.1 407"), "{head:?}");
        }
    }
    let after = rss();
    assert!(after < before + 80, "{before} MB before, {after} MB after");
}
