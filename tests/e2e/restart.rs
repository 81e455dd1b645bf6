//! The allocator can die and come back: workers reconnect by themselves and
//! requests wait for it up to the lease timeout.

use std::sync::Arc;
use std::time::Duration;

use crate::util::*;

#[tokio::test]
async fn requests_wait_for_a_restarted_allocator() {
    let origin = Origin::start().await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let alloc = Allocator::start_in(dir.clone(), &["--pool", "127.0.0.2-127.0.0.3"]).await;
    let worker = Worker::start(&alloc.socket, &["--lease-timeout", "10s"]).await;
    assert_eq!(get(worker.addr, &origin.url("/")).await.status, 200);

    // SIGKILL: the socket file stays behind, stale. (Until the worker sees
    // the connection closed it leases from the dead allocator's table.)
    drop(alloc);
    unmapped(&worker).await;
    let url = origin.url("/");
    let waiting = tokio::spawn(async move { get(worker.addr, &url).await.status });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "the request did not wait for the allocator"
    );
    let alloc = Allocator::start_in(dir, &["--pool", "127.0.0.2-127.0.0.3"]).await;
    assert_eq!(waiting.await.unwrap(), 200);
    let _ = &alloc;
    assert_eq!(origin.count(), 2);
}

#[tokio::test]
async fn allocator_gone_past_the_lease_timeout_is_503_then_recovers() {
    let origin = Origin::start().await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let alloc = Allocator::start_in(dir.clone(), &["--pool", "127.0.0.2"]).await;
    let worker = Worker::start(&alloc.socket, &["--lease-timeout", "300ms"]).await;
    mapped(&[&worker]).await;
    drop(alloc);
    unmapped(&worker).await;
    let r = get(worker.addr, &origin.url("/")).await;
    assert_eq!(r.status, 503);
    assert!(r.proxy_status().contains("proxy_internal_error"));
    let _alloc = Allocator::start_in(dir, &["--pool", "127.0.0.2"]).await;
    eventually("the worker to reconnect", || async {
        get(worker.addr, &origin.url("/")).await.status == 200
    })
    .await;
    assert_eq!(origin.sources(), ips(2..=2));
}

/// An allocator gone within a second of a worker's connecting: the
/// outage is warned of, and its end said at info too (it went to debug).
#[tokio::test]
async fn a_reconnect_after_a_short_connection_is_said() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let alloc = Allocator::start_in(dir.clone(), &["--pool", "127.0.0.2"]).await;
    let log = dir.path().join("worker.log");
    let cmd = logging_at_info(WORKER, &log);
    let _worker = Worker::start_cmd(cmd, &alloc.socket, free_port(), &ALLOW_LOOPBACK).await;
    eventually("connected", || async {
        said(&log, "connected to the allocator") == 1
    })
    .await;
    drop(alloc);
    eventually("the outage warned of", || async {
        said(&log, "allocator closed the connection") + said(&log, "allocator connection failed")
            == 1
    })
    .await;
    let _alloc = Allocator::start_in(dir, &["--pool", "127.0.0.2"]).await;
    eventually("the reconnect said", || async {
        said(&log, "connected to the allocator") == 2
    })
    .await;
}

#[tokio::test]
async fn a_live_allocator_socket_is_not_taken_over() {
    let alloc = Allocator::start(&["--pool", "127.0.0.2"]).await;
    let out = std::process::Command::new(ALLOCATOR)
        .args([
            "--socket",
            alloc.socket.to_str().unwrap(),
            "--pool",
            "127.0.0.3",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already serving"));
    assert_eq!(status_json(&alloc.socket)["pool"][0]["ip"], "127.0.0.2");
}

#[test]
fn a_socket_in_a_world_writable_directory_is_refused() {
    let socket = std::path::Path::new("/tmp/rotor-test-allocator.sock");
    assert!(refused_socket(socket).contains("world-writable"));
    assert!(!socket.exists());
}

/// An allocator started on `socket` that must refuse it: what it said.
fn refused_socket(socket: &std::path::Path) -> String {
    let out = std::process::Command::new(ALLOCATOR)
        .args([
            "--socket",
            socket.to_str().unwrap(),
            "--pool",
            "127.0.0.2",
            "--no-state",
        ])
        .output()
        .unwrap();
    // A configuration refused (it had been 1, as a failure to run).
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// `rotor up` refuses such a directory itself, at once, exit 2 (its
/// allocator failed at every start, and rotor up gave up ten seconds
/// later, exit 1).
#[test]
fn rotor_up_refuses_a_world_writable_socket_directory_at_once() {
    let socket = format!("/tmp/rotor-test-up-{}.sock", std::process::id());
    let socket = std::path::Path::new(&socket);
    let started = std::time::Instant::now();
    let out = std::process::Command::new(ROTOR)
        .args([
            "up",
            "--workers",
            "1",
            "--socket",
            socket.to_str().unwrap(),
            "--pool",
            "127.0.0.2",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--no-state",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("world-writable"), "{err}");
    assert!(!err.contains("started"), "a child was started: {err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert!(!socket.exists());
}

/// `--check` says so too, making nothing, of `rotor up` (exit 2) and of
/// the allocator (exit 1, as for its other checks); a directory not there
/// yet passes (it would be made) and is not made. (Both said ok.)
#[test]
fn check_refuses_a_world_writable_socket_directory_and_makes_none() {
    let socket = format!("/tmp/rotor-test-check-{}.sock", std::process::id());
    let run = |program: &str, first: &[&str], socket: &str| {
        let out = std::process::Command::new(program)
            .args(first)
            .args([
                "--check",
                "--socket",
                socket,
                "--pool",
                "127.0.0.2",
                "--no-state",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        (out.status.code(), text)
    };
    let (code, text) = run(ROTOR, &["up", "--workers", "1"], &socket);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("world-writable"), "{text}");
    let (code, text) = run(ALLOCATOR, &[], &socket);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("error: the socket directory /tmp is world-writable"),
        "{text}"
    );
    let dir = tempfile::tempdir().unwrap();
    let unmade = dir.path().join("run/rotor");
    let socket = unmade.join("a.sock");
    let socket = socket.to_str().unwrap();
    let (code, text) = run(ROTOR, &["up", "--workers", "1"], socket);
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = run(ALLOCATOR, &[], socket);
    assert_eq!(code, Some(0), "{text}");
    assert!(!unmade.exists(), "--check made the socket directory");
}

/// Nor one this user may not write in (root's 0755, the allocator run as
/// its own user), nor one it could not make: `--check` said ok, and the
/// allocator then failed at each start, exit 1 (review as).
#[test]
fn a_socket_directory_this_user_cannot_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !root("a_socket_directory_this_user_cannot_write_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |socket: &std::path::Path, check: bool| {
        let mut cmd = std::process::Command::new(ALLOCATOR);
        cmd.args(["--socket", socket.to_str().unwrap()])
            .args(["--pool", "127.0.0.2", "--no-state"])
            .uid(65534)
            .gid(65534);
        if check {
            cmd.arg("--check");
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        (out.status.code(), text)
    };
    let socket = dir.path().join("a.sock");
    let (code, text) = as_nobody(&socket, true);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("may not create files in"), "{text}");
    let (code, text) = as_nobody(&dir.path().join("run/a.sock"), true);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("cannot create the socket directory"),
        "{text}"
    );
    // The start: refused as a configuration, at once.
    let (code, text) = as_nobody(&socket, false);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("may not create files in"), "{text}");
    assert!(!socket.exists());
}

/// Nor in one another user owns (a `/tmp/rotor-UID` made first by someone
/// else could have its socket replaced by them).
#[test]
fn a_socket_in_a_directory_another_user_owns_is_refused() {
    if !root("a_socket_in_a_directory_another_user_owns_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let theirs = dir.path().join("rotor-0");
    std::fs::create_dir(&theirs).unwrap();
    nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let socket = theirs.join("allocator.sock");
    let err = refused_socket(&socket);
    assert!(err.contains("belongs to uid 65534"), "{err}");
    assert!(!socket.exists());
}

/// Nor through a link another user made (they could point it elsewhere
/// after the check).
#[test]
fn a_socket_directory_linked_by_another_user_is_refused() {
    if !root("a_socket_directory_linked_by_another_user_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = dir.path().join("rotor-0");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    nix::unistd::fchownat(
        None,
        &link,
        Some(nix::unistd::Uid::from_raw(65534)),
        None,
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .unwrap();
    let err = refused_socket(&link.join("allocator.sock"));
    assert!(err.contains("symbolic link of uid 65534"), "{err}");
    assert!(!real.join("allocator.sock").exists());
}
