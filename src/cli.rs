//! Command-line flags of the allocator and the worker; `rotor up` reuses
//! them and passes them on to its children.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use rotor_allocator::source::Source;
use rotor_allocator::spec::SpecError;

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// Where the pool comes from. With none of these, the pool is the host's
/// own global addresses.
#[derive(Debug, Clone, Args)]
pub struct PoolArgs {
    /// Pool addresses: one address, a range (127.0.0.2-127.0.0.9), a CIDR
    /// (192.0.2.0/29) or a comma list of these. Repeatable.
    #[arg(long = "pool", value_name = "SPEC")]
    pub pool: Vec<String>,
    /// A file of SPECs, one a line, `#` comments; re-read on every refresh.
    /// Repeatable.
    #[arg(long = "pool-file", value_name = "PATH")]
    pub pool_file: Vec<PathBuf>,
    /// The addresses currently on an interface, by name (eth0) or MAC
    /// address (02:fc:00:00:00:01); re-read on every refresh. Repeatable.
    #[arg(long = "interface", value_name = "NAME|MAC")]
    pub interface: Vec<String>,
    /// How often the pool sources are re-read (SIGHUP re-reads at once).
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = duration)]
    pub refresh: Duration,
}

impl PoolArgs {
    /// The sources, in the order given (`--pool`, then files, then
    /// interfaces). A bad `--pool` spec is an error here, before start.
    pub fn sources(&self) -> Result<Vec<Source>, SpecError> {
        let mut out = Vec::new();
        for spec in &self.pool {
            out.push(Source::list(spec)?);
        }
        out.extend(self.pool_file.iter().cloned().map(Source::File));
        out.extend(self.interface.iter().map(|i| Source::interface(i)));
        if out.is_empty() {
            out.push(Source::HostAddresses);
        }
        Ok(out)
    }

    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        for p in &self.pool {
            a.extend(["--pool".into(), p.into()]);
        }
        for p in &self.pool_file {
            a.extend(["--pool-file".into(), p.into()]);
        }
        for i in &self.interface {
            a.extend(["--interface".into(), i.into()]);
        }
        a.extend([
            "--refresh".into(),
            humantime::format_duration(self.refresh).to_string().into(),
        ]);
        a
    }
}

#[derive(Debug, Clone, Args)]
pub struct SocketArg {
    /// The allocator's Unix socket [default: /run/rotor/allocator.sock for
    /// root, else $XDG_RUNTIME_DIR/rotor/allocator.sock].
    #[arg(
        long = "socket",
        alias = "allocator",
        env = "ROTOR_SOCKET",
        value_name = "PATH"
    )]
    pub socket: Option<PathBuf>,
}

impl SocketArg {
    pub fn path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(crate::paths::default_socket)
    }
}

#[derive(Debug, Clone, Args)]
pub struct AllocatorArgs {
    #[command(flatten)]
    pub socket: SocketArg,
    #[command(flatten)]
    pub pool: PoolArgs,
    /// Validate the flags, read the pool sources once, print the pool, exit.
    #[arg(long)]
    pub check: bool,
}

/// The worker's tunables; `rotor up` passes them on unchanged.
#[derive(Debug, Clone, Args)]
pub struct WorkerTuning {
    /// How long a request waits for a lease (e.g. while the allocator
    /// restarts) before it gets 503.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = duration)]
    pub lease_timeout: Duration,
    /// Limit on resolving the destination and on connecting to it.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration)]
    pub connect_timeout: Duration,
    /// Limit on the destination's response head once the request is sent.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration)]
    pub response_timeout: Duration,
    /// A client must send a whole request head within this.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration)]
    pub header_read_timeout: Duration,
    /// Largest request head accepted (larger: 431).
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024)]
    pub max_head_bytes: usize,
    /// On SIGTERM, how long in-flight requests and tunnels may take.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration)]
    pub drain_timeout: Duration,
}

impl WorkerTuning {
    pub fn to_args(&self) -> Vec<OsString> {
        let d = |d: Duration| OsString::from(humantime::format_duration(d).to_string());
        vec![
            "--lease-timeout".into(),
            d(self.lease_timeout),
            "--connect-timeout".into(),
            d(self.connect_timeout),
            "--response-timeout".into(),
            d(self.response_timeout),
            "--header-read-timeout".into(),
            d(self.header_read_timeout),
            "--max-head-bytes".into(),
            self.max_head_bytes.to_string().into(),
            "--drain-timeout".into(),
            d(self.drain_timeout),
        ]
    }

    pub fn config(&self) -> rotor_worker::Config {
        rotor_worker::Config {
            proxy: rotor_worker::proxy::ProxyConfig {
                connect_timeout: self.connect_timeout,
                response_timeout: self.response_timeout,
            },
            header_read_timeout: self.header_read_timeout,
            max_head_bytes: self.max_head_bytes,
            drain_timeout: self.drain_timeout,
        }
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Address to accept proxy clients on; repeatable. Bound with
    /// SO_REUSEPORT so several workers share it.
    #[arg(long = "listen", value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    pub listen: Vec<SocketAddr>,
    #[command(flatten)]
    pub socket: SocketArg,
    #[command(flatten)]
    pub tuning: WorkerTuning,
}
