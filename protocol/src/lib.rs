//! The wire protocol between rotor's workers (and the `rotor` control command)
//! and the allocator: length-prefixed bincode frames, versioned messages, a
//! typed channel, and the `Hello` handshake; and the lease table the
//! allocator shares with its workers.
#![deny(unsafe_code)]

pub mod addr;
mod build;
mod channel;
pub mod clock;
mod codec;
mod guard;
mod handshake;
mod message;
pub mod netlink;
mod report;
mod rewind;
pub mod routes;
mod segment;
mod site;
mod table;

/// Has every allocation of 1 MiB or more mapped on its own (glibc's
/// `M_MMAP_THRESHOLD`), so that freeing it gives it back to the system.
/// glibc otherwise raises that threshold as large blocks are freed, and
/// keeps what each thread's arena held: a pool command flooding its
/// output to the limit (16 MiB, read by a thread of its own) left the
/// allocator 100 MB larger within a minute of refreshes, and growing;
/// a worker's password checks (argon2's 19 MiB each, on blocking
/// threads) left it holding up to 730 MB. Call once, at the start.
#[allow(unsafe_code)]
pub fn map_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes no pointer; it sets a threshold of glibc's
    // allocator, before the threads that allocate much start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

pub use build::{name_build, software};
pub use channel::{Channel, ChannelError, ChannelRx, ChannelTx};
pub use codec::{decode, decode_prefix, encode, CodecError, MAX_FRAME_LEN};
pub use handshake::{client_handshake, server_handshake, HandshakeError};
pub use message::{
    AddrStatus, ClientFrame, EntryStatus, Envelope, Families, FamilyStatus, Hello, HelloReply,
    Histogram, HostReport, Lease, NoAddress, PairStatus, PeerStatus, QuarantineStatus, Refusal,
    ReloadReport, ReloadReportV2, Request, Response, Role, ServerFrame, SiteLimit, SiteStatus,
    SitesReport, SitesReportV2, SourceMetrics, SourceStatus, SourceUnreached, StatusReport,
    StatusReportV2, TicketKey, WorkerMetrics, WorkerReload, WorkerReloadOutcome, WorkerStatus,
    COUNTER_ACCESS_LOG_LOST, HISTOGRAM_BOUNDS, MAX_REPORTED_ERRORS, MAX_REPORTED_SOURCES,
    MAX_SESSION_KEY, MINOR_COUNTERS, MINOR_DEADLINE, MINOR_FAMILIES, MINOR_FIRST_RELOADS,
    MINOR_LEASE_TABLE, MINOR_METRICS, MINOR_ORDER_KEY, MINOR_PREFIX_ORDER, MINOR_RELOADS,
    MINOR_RELOAD_REPORT, MINOR_SESSIONS_FULL, MINOR_SESSION_SHARE, MINOR_SESSION_SITE, MINOR_SITES,
    MINOR_SITES_V2, MINOR_SITE_UNREACHED, MINOR_SITE_WAIT, MINOR_STATUS_CUT, MINOR_STEER_KEPT,
    MINOR_TICKET_KEYS, MINOR_UNREACHED, MINOR_UNREACHED_BY_NET, MINOR_WORKER_RELOADS,
    POOL_TOO_LARGE, PROTOCOL_MAJOR, PROTOCOL_MINOR, REPORT_TEXT_MAX, TICKET_KEY_SECS,
    UNREACHED_DESTINATIONS, UNREACHED_LISTED, WORKERS_LISTED, WORKER_COUNTERS,
};
pub use report::{error_chain, Moment, ERROR_KINDS};
pub use rewind::Rewind;
pub use segment::{
    cover, from_u128, order, random_bytes, random_order_key, set_order, to_u128, Family, Order,
    OrderKey, PrefixSet, Segment,
};
pub use site::{
    dotted_decimal, is_public_suffix, numeric_not_dotted, site_bit, site_of, Block, PROBE_HOLD,
    SITE_FILTER_BITS,
};
pub use table::{
    address_at, family_total, index_of, not_a_table, unreached, LeaseTable, Position, Rotations,
    SiteMode, TableError, TableSnapshot, Walk, MAX_FAMILY_TOTAL, PEER_SLOTS, TABLE_LAYOUT,
};

/// The text of a file an operator names (the configuration file, a users
/// file, a token file). A pipe is read as far as its writer writes
/// (`--config <(envsubst < rotor.toml.in)`), and one without a writer is
/// empty: its open waited for a writer for ever, and `rotor up --config
/// FIFO --check` could not be stopped by SIGTERM. A device or a directory
/// is refused.
pub fn read_text_file(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    // (Not blocking in the open: a pipe's open returns at once so.)
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let kind = f.metadata()?.file_type();
    if kind.is_fifo() {
        // Read blocking from here: to its writer's end (none: at once).
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            FcntlArg::F_SETFL(OFlag::empty()),
        )?;
    } else if !kind.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file (a device or a directory)",
        ));
    }
    let mut text = String::new();
    f.read_to_string(&mut text)?;
    Ok(text)
}

/// FNV-1a, 64 bits: a checksum for the state file and an identity for a
/// set of listening sockets; not for anything an attacker chooses.
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The channel a client (worker or control command) holds: it can only send
/// requests and read responses.
pub type ClientChannel<S> = Channel<S, ClientFrame, ServerFrame>;

/// The channel the allocator holds for one client.
pub type ServerChannel<S> = Channel<S, ServerFrame, ClientFrame>;

#[cfg(test)]
mod tests {
    /// A pipe without a writer is empty at once (its open waited for a
    /// writer for ever), one with a writer is read to its end; a
    /// directory is refused; a file is read.
    #[test]
    fn files_and_pipes_are_read_as_text_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_eq!(super::read_text_file(&fifo).unwrap(), "");
        // A writer that wrote, and ends a moment later (a reader held
        // open meanwhile, for the writer's open not to wait).
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let holder = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        w.write_all(b"piped").unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            drop(w);
        });
        assert_eq!(super::read_text_file(&fifo).unwrap(), "piped");
        writer.join().unwrap();
        drop(holder);
        let e = super::read_text_file(dir.path()).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let file = dir.path().join("file");
        std::fs::write(&file, "text").unwrap();
        assert_eq!(super::read_text_file(&file).unwrap(), "text");
    }
}
