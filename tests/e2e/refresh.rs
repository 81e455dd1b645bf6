//! The pool is re-read on the interval, on SIGHUP and on `rotor reload`,
//! swapped atomically, and kept when a source fails to read.

use std::net::IpAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::util::*;

/// An allocator reading `pool.txt` (written with `initial`) every
/// `refresh`; returns it and the file's path.
async fn file_allocator(initial: &str, refresh: &str) -> (Allocator, std::path::PathBuf) {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let file = dir.path().join("pool.txt");
    std::fs::write(&file, initial).unwrap();
    let alloc = Allocator::start_in(
        dir,
        &["--pool-file", file.to_str().unwrap(), "--refresh", refresh],
    )
    .await;
    (alloc, file)
}

async fn wait_for_pool(socket: &std::path::Path, want: &[IpAddr]) {
    eventually(&format!("pool {want:?}"), || async {
        pool_of(&status_json(socket)) == want
    })
    .await;
}

#[tokio::test]
async fn pool_file_is_reread_on_the_interval() {
    let origin = Origin::start().await;
    let (alloc, file) = file_allocator("127.0.0.2\n", "1s").await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    assert_eq!(get(worker.addr, &origin.url("/")).await.status, 200);

    std::fs::write(&file, "# swapped\n127.0.0.3-127.0.0.4\n").unwrap();
    wait_for_pool(&alloc.socket, &ips(3..=4)).await;
    for _ in 0..4 {
        assert_eq!(get(worker.addr, &origin.url("/")).await.status, 200);
    }
    let seen = origin.sources();
    assert_eq!(seen[0], ips(2..=2)[0]);
    assert_eq!(&seen[1..], &[ips(3..=4), ips(3..=4)].concat()[..]);
    let status = status_json(&alloc.socket);
    assert!(status["generation"].as_u64().unwrap() >= 2);
    assert!(status["last_refresh_unix"].as_u64().is_some());
}

/// A source that keeps failing is warned of once (again if its failure
/// changes, or every 10 min), not at each refresh, and said to read again
/// once it does.
#[tokio::test]
async fn a_failing_source_is_warned_of_once_and_said_to_read_again() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let file = dir.path().join("pool.txt");
    std::fs::write(&file, "127.0.0.2\n").unwrap();
    let log = dir.path().join("allocator.log");
    let args = ["--pool-file", file.to_str().unwrap(), "--refresh", "200ms"];
    let cmd = logging_at_info(ALLOCATOR, &log);
    let _alloc = Allocator::start_cmd(cmd, dir.clone(), &args).await;
    let aside = dir.path().join("pool.aside");
    std::fs::rename(&file, &aside).unwrap();
    eventually("the failure said", || async {
        said(&log, "pool source failed to read") == 1
    })
    .await;
    // Ten refreshes on, still once.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(said(&log, "pool source failed to read"), 1);
    std::fs::rename(&aside, &file).unwrap();
    eventually("the recovery said", || async {
        said(&log, "pool source reads again") == 1
    })
    .await;
}

/// A pool command that floods its output past the limit at every refresh
/// (16 MiB read each time, by a thread of its own) leaves the allocator no
/// larger: each read's memory goes back to the system. glibc kept it in
/// the reader threads' arenas, and the allocator grew by about 16 MB a
/// refresh (130 MB in a minute).
#[tokio::test]
async fn a_flooding_pool_command_leaves_no_memory_behind() {
    let alloc = Allocator::start(&[
        "--pool",
        "127.0.0.2",
        "--pool-command",
        "yes 10.0.0.1 | head -c 20000000",
        "--refresh",
        "1s",
    ])
    .await;
    let rss = || rss_kb(alloc.proc.pid());
    let mut first = u64::MAX;
    for _ in 0..10 {
        first = first.min(rss());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Ten refreshes more, then the least over two seconds (between reads;
    // one in flight holds 16 MiB at most).
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut last = u64::MAX;
    for _ in 0..20 {
        last = last.min(rss());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = status_json(&alloc.socket);
    assert!(
        status.to_string().contains("printed more than"),
        "the command's output is refused: {status}"
    );
    assert!(
        last < first + 20_000,
        "{first} KiB after the first refresh, {last} KiB after ten more"
    );
}

#[tokio::test]
async fn sighup_and_rotor_reload_reread_at_once() {
    let (alloc, file) = file_allocator("127.0.0.2\n", "1h").await;

    std::fs::write(&file, "127.0.0.5\n").unwrap();
    alloc.proc.signal(Signal::SIGHUP);
    wait_for_pool(&alloc.socket, &ips(5..=5)).await;

    std::fs::write(&file, "127.0.0.6-127.0.0.7\n").unwrap();
    let text = rotor_control("reload", &alloc.socket, &[]);
    assert!(text.contains("2 addresses"), "{text}");
    // `rotor reload` answers after the refresh: no waiting needed.
    assert_eq!(pool_of(&status_json(&alloc.socket)), ips(6..=7));
}

/// A source that cannot be read as the allocator starts (a provider's API
/// down for a moment) is read again a second later, and at doubling
/// waits, not only at the next `--refresh`: else a restart during a blip
/// answered 503 for the whole interval.
#[tokio::test]
async fn a_source_unread_at_the_start_is_read_again_sooner_than_the_interval() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let file = dir.path().join("pool.txt");
    let cmd = format!("cat {}", file.display());
    let alloc =
        Allocator::start_in(dir.clone(), &["--pool-command", &cmd, "--refresh", "1h"]).await;
    assert!(pool_of(&status_json(&alloc.socket)).is_empty());
    std::fs::write(&file, "127.0.0.2\n").unwrap();
    wait_for_pool(&alloc.socket, &ips(2..=2)).await;
}

/// A pool command (or metadata service) down as the allocator restarts
/// keeps its last good list from before the restart, as a failed read
/// keeps it while the allocator runs: a crash during an outage had left
/// the pool empty, every request a 503, until the service came back.
#[tokio::test]
async fn a_command_down_at_a_restart_keeps_its_last_good_list() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let file = dir.path().join("pool.txt");
    std::fs::write(&file, "127.0.0.2\n127.0.0.3\n").unwrap();
    let cmd = format!("cat {}", file.display());
    let args = [
        "--pool-command",
        cmd.as_str(),
        "--checkpoint",
        "1s",
        "--refresh",
        "1h",
    ];
    {
        let alloc = Allocator::start_in(dir.clone(), &args).await;
        assert_eq!(pool_of(&status_json(&alloc.socket)), ips(2..=3));
        // A checkpoint, then killed outright.
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    std::fs::remove_file(&file).unwrap();
    let alloc = Allocator::start_in(dir.clone(), &args).await;
    let status = status_json(&alloc.socket);
    assert_eq!(pool_of(&status), ips(2..=3), "{status}");
    let error = status["sources"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("No such file"), "{status}");
    // Reading again, it is what it reads.
    std::fs::write(&file, "127.0.0.4\n").unwrap();
    let out = std::process::Command::new(ROTOR)
        .args(["reload", "--socket", alloc.socket.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(pool_of(&status_json(&alloc.socket)), ips(4..=4));
}

#[tokio::test]
async fn a_failed_read_keeps_the_last_good_pool_and_an_empty_file_empties_it() {
    let origin = Origin::start().await;
    let (alloc, file) = file_allocator("127.0.0.2-127.0.0.3\n", "1h").await;
    let worker = Worker::start(&alloc.socket, &[]).await;
    // `rotor reload`: its exit code and what it said on stderr.
    let reload = || {
        let out = std::process::Command::new(ROTOR)
            .args(["reload", "--socket", alloc.socket.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };

    std::fs::remove_file(&file).unwrap();
    // A source that failed is said, and is a failed reload.
    let (code, err) = reload();
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("could not be read") && err.contains("cannot read"),
        "{err}"
    );
    let status = status_json(&alloc.socket);
    assert_eq!(pool_of(&status), ips(2..=3));
    let err = status["sources"][0]["error"].as_str().unwrap();
    assert!(err.contains("cannot read"), "{err}");
    assert_eq!(get(worker.addr, &origin.url("/")).await.status, 200);

    std::fs::write(&file, "not an address\n").unwrap();
    assert_eq!(reload().0, Some(3));
    let status = status_json(&alloc.socket);
    assert_eq!(pool_of(&status), ips(2..=3));
    assert!(status["sources"][0]["error"]
        .as_str()
        .unwrap()
        .contains(":1"));

    // Read well, and empty; read well, and none of it usable on this host
    // (a documentation address: it was "0 addresses", exit 0): said, and
    // exit 3 (every request is a 503).
    for (listed, said_then) in [
        ("", "the pool is empty"),
        ("192.0.2.1\n", "no address of the pool is in rotation"),
    ] {
        std::fs::write(&file, listed).unwrap();
        let out = std::process::Command::new(ROTOR)
            .args(["reload", "--socket", alloc.socket.to_str().unwrap()])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{said}");
        assert!(said.contains(said_then), "{said}");
        assert_eq!(get(worker.addr, &origin.url("/")).await.status, 503);
        assert_eq!(origin.count(), 1);
    }
}

/// AnyIP: a block routed to the host and put on lo. `--interface lo` is
/// that block; 127.0.0.1 and ::1 are left out (leased, they failed every
/// connect to a destination elsewhere), and so is an IPv4 link-local
/// address.
#[test]
fn interface_lo_with_a_block_on_it_is_that_block() {
    crate::util::in_netns(
        "interface_lo_with_a_block_on_it_is_that_block",
        &[
            "addr add 203.0.113.7/32 dev lo",
            "addr add 169.254.7.7/32 dev lo",
            "-6 addr add 2001:db8:7::7/128 dev lo nodad",
        ],
        || async {
            let alloc = Allocator::start(&["--interface", "lo"]).await;
            let mut pool = pool_of(&status_json(&alloc.socket));
            pool.sort();
            let want: Vec<IpAddr> = vec![
                "203.0.113.7".parse().unwrap(),
                "2001:db8:7::7".parse().unwrap(),
            ];
            assert_eq!(pool, want);
        },
    );
}

#[tokio::test]
async fn interface_source_reads_the_loopback_addresses() {
    let alloc = Allocator::start(&["--interface", "lo"]).await;
    let pool = pool_of(&status_json(&alloc.socket));
    assert!(pool.contains(&"127.0.0.1".parse().unwrap()), "{pool:?}");
    let alloc = Allocator::start(&["--interface", "00:00:00:00:00:00"]).await;
    let pool = pool_of(&status_json(&alloc.socket));
    assert!(pool.contains(&"127.0.0.1".parse().unwrap()), "{pool:?}");
}

#[tokio::test]
async fn bad_pool_spec_stops_the_start_with_a_clear_error() {
    let out = Command::new(ALLOCATOR)
        .args([
            "--socket",
            "/nonexistent/x.sock",
            "--pool",
            "127.0.0.9-127.0.0.2",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ends before it starts"), "{err}");
}

/// A pool command printing 127.0.0.2 after `first`, and taking `secs`
/// more once the flag file (returned) exists.
fn slow_once_flagged(
    dir: &std::path::Path,
    first: &str,
    secs: f64,
) -> (std::path::PathBuf, String) {
    let flag = dir.join("slow");
    let cmd = format!(
        "{first}if [ -f {f} ]; then sleep {secs}; fi; echo 127.0.0.2",
        f = flag.display()
    );
    (flag, cmd)
}

/// `rotor reload` waits for the reload's refresh, however long its sources
/// take within their own timeouts: a pool command taking 10.5 s is no
/// "did not answer within 10s" (which misled logrotate hooks and scripts
/// while the reload went on). The first load takes half a second, and the
/// flag is set once `Allocator::start` returns: a start that returned before
/// the first load was done (the socket is bound first) made that load the
/// slow one, and the reload's Hello waited behind it.
#[test]
fn rotor_reload_waits_for_a_slow_source() {
    let dir = tempfile::tempdir().unwrap();
    let (flag, cmd) = slow_once_flagged(dir.path(), "sleep 0.5; ", 10.5);
    let alloc =
        Allocator::start_blocking(&["--pool-command", &cmd, "--pool-command-timeout", "30s"]);
    std::fs::write(&flag, "").unwrap();
    let started = std::time::Instant::now();
    let out = rotor_control("reload", &alloc.socket, &[]);
    assert!(
        started.elapsed() > std::time::Duration::from_secs(10),
        "{out}"
    );
    drop(alloc);
}

/// The pool's sources are read at once, so a refresh takes as long as the
/// slowest of them, not the sum of their timeouts. The first command waits
/// for the file the second makes: read one after the other, the first
/// would time out and leave only the second's address.
#[test]
fn pool_sources_are_read_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("second-ran");
    let first = format!(
        "while [ ! -f {m} ]; do sleep 0.05; done; rm {m}; echo 127.0.0.2",
        m = mark.display()
    );
    let second = format!("touch {m}; echo 127.0.0.3", m = mark.display());
    let alloc = Allocator::start_blocking(&[
        "--pool-command",
        &first,
        "--pool-command",
        &second,
        "--pool-command-timeout",
        "5s",
    ]);
    let st = rotor_control("status", &alloc.socket, &[]);
    assert!(st.contains("2 addresses in rotation"), "{st}");
    // And again on a reload, which names no failed source.
    let out = rotor_control("reload", &alloc.socket, &[]);
    assert!(out.contains("2 addresses"), "{out}");
    drop(alloc);
}

/// A pool too large for its status to fit a frame (262 144 entries, none
/// of them this host's): `rotor reload` still names a source that failed
/// and exits 3. (It learnt the failures from a status, and with no status
/// to read it passed for a good reload.) The log sums up the entries out
/// of the rotation instead of a line each.
#[tokio::test]
async fn a_reload_of_a_pool_too_large_to_list_still_names_a_failed_source() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let file = dir.path().join("pool.txt");
    std::fs::write(&file, "127.0.0.2\n").unwrap();
    let log = dir.path().join("allocator.log");
    let prefixes = "2001:db8:1::/112,2001:db8:2::/112,2001:db8:3::/112,2001:db8:4::/112";
    let alloc = Allocator::start_logging(
        dir.clone(),
        &[
            "--pool",
            prefixes,
            "--pool-file",
            file.to_str().unwrap(),
            "--refresh",
            "1h",
        ],
        &log,
    )
    .await;
    let socket = alloc.socket.to_str().unwrap();
    let status = Command::new(ROTOR)
        .args(["status", "--socket", socket])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&status.stderr);
    assert!(err.contains("larger than a frame"), "{err}");

    std::fs::remove_file(&file).unwrap();
    let out = Command::new(ROTOR)
        .args(["reload", "--socket", socket])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(3), "{stdout}{stderr}");
    // 127.0.0.2 alone is in rotation: the prefixes are not this host's.
    assert!(stdout.contains("1 address in 262145 entries"), "{stdout}");
    assert!(
        stderr.contains("pool.txt could not be read") && stderr.contains("No such file"),
        "{stderr}"
    );

    let text = std::fs::read_to_string(&log).unwrap();
    let each = text
        .lines()
        .filter(|l| l.contains("pool address out of the rotation"))
        .count();
    assert_eq!(each, 8, "one line an entry for the first 8 only");
    assert!(
        text.contains("more pool addresses out of the rotation") && text.contains("total=262144"),
        "{}",
        &text[..text.len().min(4000)]
    );
}

/// A stop does not wait for a refresh in progress: with a pool command
/// that takes its time (here 20 s of a 30 s timeout), SIGTERM ends the
/// allocator at once, cleanly (it waited out the command, and `rotor up`,
/// which gives it 5 s, killed it before it wrote what it keeps at a stop).
/// The command ends with it (it ran on, unsupervised, to its own end).
#[test]
fn a_stop_does_not_wait_for_a_slow_refresh() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let first = format!("echo $$ > {}; ", pid_file.display());
    let (flag, cmd) = slow_once_flagged(dir.path(), &first, 20.0);
    let mut alloc = Allocator::start_blocking(&[
        "--pool-command",
        &cmd,
        "--pool-command-timeout",
        "30s",
        "--refresh",
        "1s",
    ]);
    std::fs::write(&flag, "").unwrap();
    // The next refresh (within a second) is under way.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let stopped = std::time::Instant::now();
    nix::sys::signal::kill(alloc.proc.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = alloc.proc.child.wait().unwrap();
    // (Waiting out the command would take 20 s.)
    assert!(
        stopped.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        stopped.elapsed()
    );
    assert!(status.success(), "{status:?}");
    // The slow run's shell (the last to write its process id) is gone, or
    // a zombie nobody reaped yet.
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let stat = format!("/proc/{}/stat", pid.trim());
    let gone = || {
        std::fs::read_to_string(&stat)
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while !gone() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(gone(), "the pool command outlived the allocator");
}

/// A stop while the pool is first read (a pool command that takes its
/// time) does not wait for the read: the allocator exits at once, cleanly,
/// and ends the command. (It waited for the whole read, and a supervisor's
/// SIGKILL after its grace left the command running.)
#[test]
fn a_stop_during_the_first_pool_read_ends_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("command.pid");
    let socket = dir.path().join("allocator.sock");
    let cmd = format!("echo $$ > {}; exec sleep 30", pid_file.display());
    let mut alloc = Proc::spawn(
        ALLOCATOR,
        &[
            "--socket",
            socket.to_str().unwrap(),
            "--no-state",
            "--pool-command",
            &cmd,
            "--pool-command-timeout",
            "60s",
        ],
    );
    let deadline = std::time::Instant::now() + PATIENCE;
    let pid = loop {
        let read = std::fs::read_to_string(&pid_file).unwrap_or_default();
        if let Ok(pid) = read.trim().parse::<i32>() {
            break nix::unistd::Pid::from_raw(pid);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the command never ran"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let asked = std::time::Instant::now();
    alloc.signal(Signal::SIGTERM);
    let status = alloc.wait(PATIENCE);
    assert!(status.success(), "{status:?}");
    // (Well short of the command's 60 s timeout; a debug build's stop on
    // a busy host may take a second or more.)
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(8),
        "{:?}",
        asked.elapsed()
    );
    // The command's group ended with it.
    let gone = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while nix::sys::signal::kill(pid, None).is_ok() {
        assert!(
            std::time::Instant::now() < gone,
            "the pool command lives on"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `rotor reload --config FILE` (the allocator unit's ExecReload) says so
/// when FILE was edited since the allocator started, and exits 3: a
/// reload does not read it again, and `systemctl reload` had passed the
/// edit over in silence.
#[tokio::test]
async fn rotor_reload_says_an_edited_configuration_file_is_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rotor.toml");
    std::fs::write(&config, "[allocator]\npool = [\"127.0.0.2\"]\n").unwrap();
    let alloc = Allocator::start(&["--config", config.to_str().unwrap()]).await;
    let reload = || {
        std::process::Command::new(ROTOR)
            .args(["reload", "--socket", alloc.socket.to_str().unwrap()])
            .args(["--config", config.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = reload();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // An edit a second or more after the start (whole seconds of uptime).
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    std::fs::write(&config, "[allocator]\npool = [\"127.0.0.3\"]\n").unwrap();
    let out = reload();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("changed since the allocator started"),
        "{said}"
    );
    assert_eq!(pool_of(&status_json(&alloc.socket)), ips(2..=2));
}

/// A pool command's text stays out of the checks' output as out of the
/// log and the metrics (the unit's `--check-config` writes to the
/// journal at every start): named by its place.
#[test]
fn the_checks_name_a_pool_command_by_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    for check in ["--check", "--check-config"] {
        let out = Command::new(ALLOCATOR)
            .args(["--no-state", "--pool", "127.0.0.2", check])
            .args(["--pool-command", "echo 127.0.0.3 # TOKEN=s3cret"])
            .arg(format!("--socket={}", socket.display()))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{check}: {stderr}");
        assert!(stderr.contains("--pool-command #2"), "{check}: {stderr}");
        assert!(!stderr.contains("s3cret"), "{check}: {stderr}");
    }
}
