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

#[tokio::test]
async fn rotor_up_serves_restarts_workers_and_stops_everything() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut up = Proc::spawn(
        ROTOR,
        &[
            "up",
            "--workers",
            "2",
            "--pool",
            "127.0.0.2-127.0.0.4",
            "--listen",
            &listen,
            "--socket",
            socket.to_str().unwrap(),
            "--drain-timeout",
            "5s",
            "--state-dir",
            dir.path().join("state").to_str().unwrap(),
            "--allow-destination",
            "127.0.0.0/8",
        ],
    );
    let proxy = listen.parse().unwrap();
    eventually("both workers", || async {
        socket.exists() && worker_pids(&socket).len() == 2
    })
    .await;
    for _ in 0..6 {
        assert_eq!(get(proxy, &origin.url("/")).await.status, 200);
    }
    assert_eq!(origin.sources(), [ips(2..=4), ips(2..=4)].concat());

    // A crashed worker is replaced.
    let pids = worker_pids(&socket);
    kill(Pid::from_raw(pids[0]), Signal::SIGKILL).unwrap();
    eventually("a replacement worker", || async {
        let now = worker_pids(&socket);
        now.len() == 2 && !now.contains(&pids[0])
    })
    .await;
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
