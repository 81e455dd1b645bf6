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
        &[
            "up",
            "--workers",
            "2",
            "--pool",
            "127.0.0.2",
            "--listen",
            &listen,
            "--socket",
            socket.to_str().unwrap(),
            "--no-state",
        ],
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
