//! Command-line flags and the configuration file, resolved into one
//! validated set of settings per binary. A flag (or its environment
//! variable) wins over the file, the file over the built-in default.
//! `rotor up` reuses these flags and passes them on to its children.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use rotor_allocator::source::Source;
use rotor_allocator::spec::SpecError;
use serde::Deserialize;

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("invalid configuration file {0}")]
    Parse(PathBuf, #[source] toml::de::Error),
    #[error("`{key}` in {file}: `{value}` is not a duration (e.g. 500ms, 20s, 1m)")]
    Duration {
        file: PathBuf,
        key: &'static str,
        value: String,
    },
    #[error("invalid pool specification")]
    Spec(#[from] SpecError),
    #[error("{0}")]
    Invalid(String),
}

/// `rotor.toml`: the same keys as the flags, by program.
///
/// ```toml
/// socket = "/run/rotor/allocator.sock"
/// [allocator]
/// pool = ["203.0.113.0/28"]
/// refresh = "20s"
/// [worker]
/// listen = ["127.0.0.1:8080"]
/// lease-timeout = "2s"
/// [up]
/// workers = 4
/// ```
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub socket: Option<PathBuf>,
    #[serde(default)]
    pub allocator: AllocatorFile,
    #[serde(default)]
    pub worker: WorkerFile,
    #[serde(default)]
    pub up: UpFile,
    #[serde(skip)]
    path: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AllocatorFile {
    #[serde(default)]
    pub pool: Vec<String>,
    #[serde(default)]
    pub pool_file: Vec<PathBuf>,
    #[serde(default)]
    pub interface: Vec<String>,
    pub refresh: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub socket_mode: Option<String>,
    pub socket_group: Option<String>,
    #[serde(default)]
    pub allow_uid: Vec<String>,
    #[serde(default)]
    pub allow_gid: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct WorkerFile {
    #[serde(default)]
    pub listen: Vec<SocketAddr>,
    pub lease_timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub response_timeout: Option<String>,
    pub header_read_timeout: Option<String>,
    pub max_head_bytes: Option<usize>,
    pub drain_timeout: Option<String>,
    pub upstream_idle_timeout: Option<String>,
    pub upstream_max_idle: Option<usize>,
    pub idle_timeout: Option<String>,
    pub tunnel_idle_timeout: Option<String>,
    pub max_connections: Option<usize>,
    pub auth_file: Option<PathBuf>,
    #[serde(default)]
    pub no_auth: bool,
    pub dns_cache_ttl: Option<String>,
    pub resolver: Option<ResolverKind>,
    #[serde(default)]
    pub dns_server: Vec<String>,
    pub threads: Option<usize>,
    #[serde(default)]
    pub allow_destination: Vec<String>,
    #[serde(default)]
    pub deny_destination: Vec<String>,
    pub deny_port: Option<Vec<u16>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct UpFile {
    pub workers: Option<u16>,
}

impl FileConfig {
    pub fn load(path: Option<&Path>) -> Result<FileConfig, ConfigError> {
        let Some(path) = path else {
            return Ok(FileConfig::default());
        };
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
        let mut file: FileConfig =
            toml::from_str(&text).map_err(|e| ConfigError::Parse(path.into(), e))?;
        file.path = path.to_path_buf();
        Ok(file)
    }

    fn duration(
        &self,
        key: &'static str,
        value: &Option<String>,
    ) -> Result<Option<Duration>, ConfigError> {
        value
            .as_deref()
            .map(|v| {
                humantime::parse_duration(v).map_err(|_| ConfigError::Duration {
                    file: self.path.clone(),
                    key,
                    value: v.to_string(),
                })
            })
            .transpose()
    }
}

/// Flags every binary has.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// The allocator's Unix socket [default: /run/rotor/allocator.sock for
    /// root, else $XDG_RUNTIME_DIR/rotor/allocator.sock].
    #[arg(
        long = "socket",
        alias = "allocator",
        env = "ROTOR_SOCKET",
        value_name = "PATH"
    )]
    pub socket: Option<PathBuf>,
    /// A TOML configuration file (keys as the flags, in [allocator],
    /// [worker] and [up] sections; `socket` at the top). Flags win.
    #[arg(long, env = "ROTOR_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Validate the flags and the configuration file, say what is wrong or
    /// what would be used, and exit (0: valid).
    #[arg(long)]
    pub check: bool,
}

impl CommonArgs {
    pub fn socket(&self, file: &FileConfig) -> PathBuf {
        self.socket
            .clone()
            .or_else(|| file.socket.clone())
            .unwrap_or_else(crate::paths::default_socket)
    }

    /// What children of `rotor up` get: the same file and socket.
    pub fn to_args(&self, socket: &Path) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["--socket".into(), socket.into()];
        if let Some(c) = &self.config {
            a.extend(["--config".into(), c.into()]);
        }
        a
    }
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
    /// How often the pool sources are re-read (SIGHUP re-reads at once)
    /// [default: 20s].
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub refresh: Option<Duration>,
    /// Where the rotation state is kept across restarts [default:
    /// /var/lib/rotor for root, else $XDG_STATE_HOME/rotor].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Keep no rotation state: a restarted allocator starts from the first
    /// address.
    #[arg(long, conflicts_with = "state_dir")]
    pub no_state: bool,
}

impl PoolArgs {
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
        if let Some(r) = self.refresh {
            a.extend(["--refresh".into(), fmt_duration(r)]);
        }
        if let Some(d) = &self.state_dir {
            a.extend(["--state-dir".into(), d.into()]);
        }
        if self.no_state {
            a.push("--no-state".into());
        }
        a
    }

    pub fn resolve(&self, file: &FileConfig) -> Result<PoolSettings, ConfigError> {
        let f = &file.allocator;
        // The flags replace the file's sources as a whole, so a one-off
        // `--pool` does not mix with the file's pool.
        let flags_given =
            !(self.pool.is_empty() && self.pool_file.is_empty() && self.interface.is_empty());
        let (pool, pool_file, interface) = if flags_given {
            (&self.pool, &self.pool_file, &self.interface)
        } else {
            (&f.pool, &f.pool_file, &f.interface)
        };
        let mut sources = Vec::new();
        for spec in pool {
            sources.push(Source::list(spec)?);
        }
        sources.extend(pool_file.iter().cloned().map(Source::File));
        sources.extend(interface.iter().map(|i| Source::interface(i)));
        if sources.is_empty() {
            sources.push(Source::HostAddresses);
        }
        let refresh = match self.refresh {
            Some(r) => r,
            None => file
                .duration("allocator.refresh", &f.refresh)?
                .unwrap_or(Duration::from_secs(20)),
        };
        if refresh.is_zero() {
            return Err(ConfigError::Invalid(
                "refresh must be longer than 0s".into(),
            ));
        }
        let state_dir = if self.no_state {
            None
        } else {
            Some(
                self.state_dir
                    .clone()
                    .or_else(|| f.state_dir.clone())
                    .unwrap_or_else(crate::paths::default_state_dir),
            )
        };
        Ok(PoolSettings {
            sources,
            refresh,
            state_dir,
        })
    }
}

#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub sources: Vec<Source>,
    pub refresh: Duration,
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct AllocatorArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub pool: PoolArgs,
    #[command(flatten)]
    pub access: AccessArgs,
}

/// Who may use the allocator's socket.
#[derive(Debug, Clone, Args)]
pub struct AccessArgs {
    /// Mode of the socket file, octal [default: 660].
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,
    /// Group of the socket file; its members are served [default: the
    /// allocator's group].
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Also serve this user (name or uid); root and the allocator's own user
    /// always are. Repeatable.
    #[arg(long, value_name = "USER")]
    pub allow_uid: Vec<String>,
    /// Also serve peers whose primary group is this (name or gid).
    /// Repeatable.
    #[arg(long, value_name = "GROUP")]
    pub allow_gid: Vec<String>,
}

impl AccessArgs {
    pub fn resolve(
        &self,
        file: &FileConfig,
    ) -> Result<rotor_allocator::access::Access, ConfigError> {
        use rotor_allocator::access::{parse_group, parse_mode, parse_user, Access};
        let f = &file.allocator;
        let err = |e: rotor_allocator::access::AccessError| ConfigError::Invalid(e.to_string());
        let mode = self.socket_mode.as_ref().or(f.socket_mode.as_ref());
        let group = self.socket_group.as_ref().or(f.socket_group.as_ref());
        let uids = if self.allow_uid.is_empty() {
            &f.allow_uid
        } else {
            &self.allow_uid
        };
        let gids = if self.allow_gid.is_empty() {
            &f.allow_gid
        } else {
            &self.allow_gid
        };
        Ok(Access {
            mode: mode
                .map(|m| parse_mode(m))
                .transpose()
                .map_err(err)?
                .unwrap_or(0o660),
            group: group.map(|g| parse_group(g)).transpose().map_err(err)?,
            uids: uids
                .iter()
                .map(|u| parse_user(u))
                .collect::<Result<_, _>>()
                .map_err(err)?,
            gids: gids
                .iter()
                .map(|g| parse_group(g))
                .collect::<Result<_, _>>()
                .map_err(err)?,
        })
    }
}

/// The worker's tunables; `rotor up` passes them on unchanged.
#[derive(Debug, Clone, Args)]
pub struct WorkerTuning {
    /// How long a request waits for a lease (e.g. while the allocator
    /// restarts) before it gets 503 [default: 2s].
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub lease_timeout: Option<Duration>,
    /// Limit on resolving the destination and on connecting to it
    /// [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub connect_timeout: Option<Duration>,
    /// Limit on the destination's response head once the request is sent
    /// [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub response_timeout: Option<Duration>,
    /// A client must send a whole request head within this [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub header_read_timeout: Option<Duration>,
    /// Largest request head accepted; larger gets 431 [default: 65536].
    #[arg(long, value_name = "BYTES")]
    pub max_head_bytes: Option<usize>,
    /// On SIGTERM, how long in-flight requests and tunnels may take
    /// [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub drain_timeout: Option<Duration>,
    /// How long an idle upstream connection is kept for the next request
    /// leased the same source address to the same destination; 0 disables
    /// reuse [default: 4s].
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub upstream_idle_timeout: Option<Duration>,
    /// Most idle upstream connections kept per (source address,
    /// destination) [default: 16].
    #[arg(long, value_name = "N")]
    pub upstream_max_idle: Option<usize>,
    /// A client connection with no bytes moving for this long is closed
    /// (after its request in flight) [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub idle_timeout: Option<Duration>,
    /// A CONNECT tunnel with no bytes moving either way for this long is
    /// closed [default: 5m].
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub tunnel_idle_timeout: Option<Duration>,
    /// Most client connections and tunnels at once; past it new clients get
    /// an immediate 503 [default: 10000].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Threads of this worker's runtime; 1 runs it on one thread (scale
    /// out with more workers instead) [default: the number of CPUs].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// The longest a resolved destination name is reused: the DNS resolver
    /// keeps an answer for its records' TTL, up to this; the system resolver
    /// (which reports no TTLs) this long; 0 resolves every time
    /// [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub dns_cache_ttl: Option<Duration>,
    /// How destination names are resolved: `dns`, in-process, from
    /// /etc/hosts and the servers of /etc/resolv.conf (or --dns-server),
    /// answers kept for their TTL; `system`, the C library's getaddrinfo
    /// (nsswitch) [default: dns].
    #[arg(long, value_enum, value_name = "dns|system")]
    pub resolver: Option<ResolverKind>,
    /// A DNS server to ask instead of those of /etc/resolv.conf, as
    /// `IP` or `IP:PORT`; repeatable.
    #[arg(long, value_name = "IP[:PORT]", value_parser = dns_server)]
    pub dns_server: Vec<SocketAddr>,
    /// Users who may use the proxy: `user:argon2-hash` lines, written by
    /// `rotor user add`. Re-read on SIGHUP.
    #[arg(long, value_name = "PATH")]
    pub auth_file: Option<PathBuf>,
    /// Serve without authentication on a non-loopback address (an open
    /// proxy: anyone who can reach it can use it).
    #[arg(long, conflicts_with = "auth_file")]
    pub no_auth: bool,
    /// Allow destinations in this range, even one denied by default
    /// (loopback, private, link-local…); repeatable.
    #[arg(long, value_name = "CIDR")]
    pub allow_destination: Vec<String>,
    /// Deny destinations in this range too; repeatable.
    #[arg(long, value_name = "CIDR")]
    pub deny_destination: Vec<String>,
    /// Destination ports refused; repeatable; replaces the default
    /// [default: 25]. `--deny-port 0` denies none.
    #[arg(long, value_name = "PORT")]
    pub deny_port: Vec<u16>,
}

/// How destination names are resolved (`--resolver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResolverKind {
    Dns,
    System,
}

impl ResolverKind {
    fn as_str(self) -> &'static str {
        match self {
            ResolverKind::Dns => "dns",
            ResolverKind::System => "system",
        }
    }
}

/// `IP` or `IP:PORT` (port 53 by default; IPv6 with a port in brackets).
fn dns_server(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("`{s}` is not an IP address or IP:PORT"))
}

fn fmt_duration(d: Duration) -> OsString {
    humantime::format_duration(d).to_string().into()
}

impl WorkerTuning {
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let durations = [
            ("--lease-timeout", self.lease_timeout),
            ("--connect-timeout", self.connect_timeout),
            ("--response-timeout", self.response_timeout),
            ("--header-read-timeout", self.header_read_timeout),
            ("--drain-timeout", self.drain_timeout),
            ("--upstream-idle-timeout", self.upstream_idle_timeout),
            ("--idle-timeout", self.idle_timeout),
            ("--tunnel-idle-timeout", self.tunnel_idle_timeout),
            ("--dns-cache-ttl", self.dns_cache_ttl),
        ];
        for (flag, value) in durations {
            if let Some(d) = value {
                a.extend([flag.into(), fmt_duration(d)]);
            }
        }
        if let Some(n) = self.max_head_bytes {
            a.extend(["--max-head-bytes".into(), n.to_string().into()]);
        }
        if let Some(n) = self.upstream_max_idle {
            a.extend(["--upstream-max-idle".into(), n.to_string().into()]);
        }
        if let Some(n) = self.max_connections {
            a.extend(["--max-connections".into(), n.to_string().into()]);
        }
        if let Some(n) = self.threads {
            a.extend(["--threads".into(), n.to_string().into()]);
        }
        if let Some(f) = &self.auth_file {
            a.extend(["--auth-file".into(), f.into()]);
        }
        if self.no_auth {
            a.push("--no-auth".into());
        }
        for c in &self.allow_destination {
            a.extend(["--allow-destination".into(), c.into()]);
        }
        for c in &self.deny_destination {
            a.extend(["--deny-destination".into(), c.into()]);
        }
        for p in &self.deny_port {
            a.extend(["--deny-port".into(), p.to_string().into()]);
        }
        if let Some(r) = self.resolver {
            a.extend(["--resolver".into(), r.as_str().into()]);
        }
        for d in &self.dns_server {
            a.extend(["--dns-server".into(), d.to_string().into()]);
        }
        a
    }

    /// `--resolver` and `--dns-server` (flags over the file's
    /// `worker.resolver` and `worker.dns-server`).
    fn resolver_choice(&self, f: &WorkerFile) -> Result<rotor_worker::dns::Resolver, ConfigError> {
        let servers = if self.dns_server.is_empty() {
            f.dns_server
                .iter()
                .map(|s| {
                    dns_server(s)
                        .map_err(|e| ConfigError::Invalid(format!("worker.dns-server: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?
        } else {
            self.dns_server.clone()
        };
        match self.resolver.or(f.resolver).unwrap_or(ResolverKind::Dns) {
            ResolverKind::Dns => Ok(rotor_worker::dns::Resolver::Dns { servers }),
            ResolverKind::System if servers.is_empty() => Ok(rotor_worker::dns::Resolver::System),
            ResolverKind::System => Err(ConfigError::Invalid(
                "dns-server is for the dns resolver; the system resolver asks the servers of /etc/resolv.conf".into(),
            )),
        }
    }

    pub fn resolve(&self, file: &FileConfig) -> Result<WorkerSettingsTuning, ConfigError> {
        let f = &file.worker;
        let pick = |flag: Option<Duration>,
                    key,
                    value: &Option<String>,
                    default: u64|
         -> Result<Duration, ConfigError> {
            Ok(match flag {
                Some(d) => d,
                None => file
                    .duration(key, value)?
                    .unwrap_or(Duration::from_secs(default)),
            })
        };
        let t = WorkerSettingsTuning {
            threads: self
                .threads
                .or(f.threads)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            no_auth: self.no_auth || f.no_auth,
            lease_timeout: pick(
                self.lease_timeout,
                "worker.lease-timeout",
                &f.lease_timeout,
                2,
            )?,
            config: rotor_worker::Config {
                proxy: rotor_worker::proxy::ProxyConfig {
                    connect_timeout: pick(
                        self.connect_timeout,
                        "worker.connect-timeout",
                        &f.connect_timeout,
                        10,
                    )?,
                    response_timeout: pick(
                        self.response_timeout,
                        "worker.response-timeout",
                        &f.response_timeout,
                        60,
                    )?,
                    upstream_idle_timeout: pick(
                        self.upstream_idle_timeout,
                        "worker.upstream-idle-timeout",
                        &f.upstream_idle_timeout,
                        4,
                    )?,
                    upstream_max_idle: self.upstream_max_idle.or(f.upstream_max_idle).unwrap_or(16),
                    acl: self.acl(f)?,
                    dns_cache_ttl: pick(
                        self.dns_cache_ttl,
                        "worker.dns-cache-ttl",
                        &f.dns_cache_ttl,
                        30,
                    )?,
                    resolver: self.resolver_choice(f)?,
                    auth: match self.auth_file.as_ref().or(f.auth_file.as_ref()) {
                        Some(path) => {
                            Some(rotor_worker::auth::Auth::load(path).map_err(|e| {
                                ConfigError::Invalid(rotor_protocol::error_chain(&e))
                            })?)
                        }
                        None => None,
                    },
                    tunnel_idle_timeout: pick(
                        self.tunnel_idle_timeout,
                        "worker.tunnel-idle-timeout",
                        &f.tunnel_idle_timeout,
                        300,
                    )?,
                },
                idle_timeout: pick(
                    self.idle_timeout,
                    "worker.idle-timeout",
                    &f.idle_timeout,
                    60,
                )?,
                max_connections: self.max_connections.or(f.max_connections).unwrap_or(10_000),
                header_read_timeout: pick(
                    self.header_read_timeout,
                    "worker.header-read-timeout",
                    &f.header_read_timeout,
                    30,
                )?,
                max_head_bytes: self
                    .max_head_bytes
                    .or(f.max_head_bytes)
                    .unwrap_or(64 * 1024),
                drain_timeout: pick(
                    self.drain_timeout,
                    "worker.drain-timeout",
                    &f.drain_timeout,
                    30,
                )?,
            },
        };
        if t.threads == 0 {
            return Err(ConfigError::Invalid("threads must be at least 1".into()));
        }
        if t.config.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "max-connections must be at least 1".into(),
            ));
        }
        if t.config.max_head_bytes < 8192 {
            return Err(ConfigError::Invalid(
                "max-head-bytes must be at least 8192".into(),
            ));
        }
        Ok(t)
    }
}

impl WorkerTuning {
    /// Flags replace the file's list of the same kind.
    fn acl(&self, f: &WorkerFile) -> Result<rotor_worker::acl::Acl, ConfigError> {
        let pick = |flag: &Vec<String>,
                    file: &Vec<String>|
         -> Result<Vec<rotor_worker::acl::Cidr>, ConfigError> {
            let list = if flag.is_empty() { file } else { flag };
            list.iter()
                .map(|c| {
                    c.parse().map_err(|e: rotor_worker::acl::CidrError| {
                        ConfigError::Invalid(e.to_string())
                    })
                })
                .collect()
        };
        let ports = if !self.deny_port.is_empty() {
            self.deny_port.clone()
        } else {
            f.deny_port
                .clone()
                .unwrap_or_else(|| rotor_worker::acl::DEFAULT_DENY_PORTS.to_vec())
        };
        Ok(rotor_worker::acl::Acl::new(
            pick(&self.allow_destination, &f.allow_destination)?,
            pick(&self.deny_destination, &f.deny_destination)?,
            ports,
        ))
    }
}

#[derive(Debug, Clone)]
pub struct WorkerSettingsTuning {
    /// Runtime threads.
    pub threads: usize,
    pub lease_timeout: Duration,
    pub config: rotor_worker::Config,
    /// `--no-auth` (or the file's `no-auth = true`).
    pub no_auth: bool,
}

impl WorkerSettingsTuning {
    /// A worker reachable from other hosts must authenticate its clients,
    /// unless the operator said `--no-auth` knowingly.
    pub fn check_exposure(&self, listening: &[SocketAddr]) -> Result<(), ConfigError> {
        if self.config.proxy.auth.is_some() || self.no_auth {
            return Ok(());
        }
        match listening.iter().find(|a| !a.ip().is_loopback()) {
            Some(a) => Err(ConfigError::Invalid(format!(
                "refusing to serve {a} without authentication: anyone who can reach it could use this \
                 proxy. Give --auth-file (users from `rotor user add`), or --no-auth to run an open proxy"
            ))),
            None => Ok(()),
        }
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// Where the worker takes client connections from.
#[derive(Debug, Clone, Args)]
pub struct ListenArgs {
    /// Address to accept proxy clients on; repeatable. Bound with
    /// SO_REUSEPORT so several workers share it [default: 127.0.0.1:8080,
    /// unless sockets are passed by systemd or --listen-fd].
    #[arg(long = "listen", value_name = "ADDR")]
    pub listen: Vec<SocketAddr>,
    /// Accept on the listening socket inherited as descriptor N (as
    /// `rotor up` passes it); repeatable.
    #[arg(long = "listen-fd", value_name = "N")]
    pub listen_fd: Vec<i32>,
}

impl ListenArgs {
    /// The addresses to bind, given that `passed` sockets were inherited.
    pub fn resolve(&self, file: &FileConfig, passed: usize) -> Vec<SocketAddr> {
        if !self.listen.is_empty() {
            self.listen.clone()
        } else if passed > 0 {
            Vec::new()
        } else if !file.worker.listen.is_empty() {
            file.worker.listen.clone()
        } else {
            vec![DEFAULT_LISTEN.parse().expect("valid default")]
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub listen: ListenArgs,
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub tuning: WorkerTuning,
}

/// Where `rotor status` and `rotor reload` find the allocator.
#[derive(Debug, Clone, Args)]
pub struct ControlArgs {
    /// The allocator's Unix socket [default: as the allocator's].
    #[arg(
        long = "socket",
        alias = "allocator",
        env = "ROTOR_SOCKET",
        value_name = "PATH"
    )]
    pub socket: Option<PathBuf>,
    /// The configuration file, for its `socket`.
    #[arg(long, env = "ROTOR_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
}

impl ControlArgs {
    pub fn socket(&self) -> Result<PathBuf, ConfigError> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        let file = FileConfig::load(self.config.as_deref())?;
        Ok(file.socket.unwrap_or_else(crate::paths::default_socket))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Worker {
        #[command(flatten)]
        args: WorkerArgs,
    }

    #[derive(Parser)]
    struct Alloc {
        #[command(flatten)]
        args: AllocatorArgs,
    }

    fn file(text: &str) -> Result<FileConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rotor.toml");
        std::fs::write(&path, text).unwrap();
        FileConfig::load(Some(&path))
    }

    #[test]
    fn the_example_configuration_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/rotor.toml");
        let f = FileConfig::load(Some(&path)).unwrap();
        Alloc::parse_from(["a"]).args.pool.resolve(&f).unwrap();
        Alloc::parse_from(["a"]).args.access.resolve(&f).unwrap();
        let t = Worker::parse_from(["w"]).args.tuning.resolve(&f).unwrap();
        assert_eq!(t.config.max_connections, 10_000);
        assert_eq!(f.up.workers, Some(2));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = file("[worker]\nlease-timout = \"1s\"\n").unwrap_err();
        assert!(matches!(err, ConfigError::Parse(..)), "{err}");
        assert!(file("bogus = 1\n").is_err());
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let f = file("[worker]\nlease-timeout = \"7s\"\nconnect-timeout = \"3s\"\n").unwrap();
        let w = Worker::parse_from(["w", "--lease-timeout", "1s"]);
        let t = w.args.tuning.resolve(&f).unwrap();
        assert_eq!(t.lease_timeout, Duration::from_secs(1));
        assert_eq!(t.config.proxy.connect_timeout, Duration::from_secs(3));
        assert_eq!(t.config.drain_timeout, Duration::from_secs(30));
    }

    #[test]
    fn the_resolver_and_its_servers_come_from_flags_or_the_file() {
        use rotor_worker::dns::Resolver;
        let none = FileConfig::default();
        let t = Worker::parse_from(["w"])
            .args
            .tuning
            .resolve(&none)
            .unwrap();
        assert_eq!(t.config.proxy.resolver, Resolver::default());
        let w = Worker::parse_from([
            "w",
            "--dns-server",
            "127.0.0.1",
            "--dns-server",
            "[::1]:5353",
        ]);
        let t = w.args.tuning.resolve(&none).unwrap();
        let servers = vec![
            "127.0.0.1:53".parse().unwrap(),
            "[::1]:5353".parse().unwrap(),
        ];
        assert_eq!(
            t.config.proxy.resolver,
            Resolver::Dns {
                servers: servers.clone()
            }
        );
        // `rotor up` hands them on to its workers.
        let args: Vec<String> = w
            .args
            .tuning
            .to_args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(
            args.windows(2).any(|p| p == ["--dns-server", "[::1]:5353"]),
            "{args:?}"
        );
        let f = file("[worker]\nresolver = \"system\"\n").unwrap();
        let t = Worker::parse_from(["w"]).args.tuning.resolve(&f).unwrap();
        assert_eq!(t.config.proxy.resolver, Resolver::System);
        let f = file("[worker]\ndns-server = [\"10.0.0.53:5300\"]\n").unwrap();
        let t = Worker::parse_from(["w"]).args.tuning.resolve(&f).unwrap();
        assert_eq!(
            t.config.proxy.resolver,
            Resolver::Dns {
                servers: vec!["10.0.0.53:5300".parse().unwrap()]
            }
        );
        // Servers make no sense for getaddrinfo, and junk is named.
        let w = Worker::parse_from(["w", "--resolver", "system", "--dns-server", "10.0.0.53"]);
        assert!(w.args.tuning.resolve(&none).is_err());
        let f = file("[worker]\ndns-server = [\"resolver.example\"]\n").unwrap();
        let err = Worker::parse_from(["w"])
            .args
            .tuning
            .resolve(&f)
            .unwrap_err();
        assert!(err.to_string().contains("worker.dns-server"), "{err}");
    }

    #[test]
    fn a_bad_duration_in_the_file_names_its_key() {
        let f = file("[worker]\ndrain-timeout = \"soon\"\n").unwrap();
        let err = Worker::parse_from(["w"])
            .args
            .tuning
            .resolve(&f)
            .unwrap_err();
        assert!(err.to_string().contains("worker.drain-timeout"), "{err}");
    }

    #[test]
    fn pool_flags_replace_the_files_sources() {
        let f = file("[allocator]\npool = [\"10.0.0.1\"]\nrefresh = \"5s\"\n").unwrap();
        let from_file = Alloc::parse_from(["a"]).args.pool.resolve(&f).unwrap();
        assert_eq!(from_file.sources.len(), 1);
        assert_eq!(from_file.refresh, Duration::from_secs(5));
        let flags = Alloc::parse_from(["a", "--pool", "127.0.0.2-127.0.0.3", "--interface", "lo"])
            .args
            .pool
            .resolve(&f)
            .unwrap();
        assert_eq!(flags.sources.len(), 2);
        assert!(Alloc::parse_from(["a", "--pool", "10.0.0.0/33"])
            .args
            .pool
            .resolve(&f)
            .is_err());
    }

    #[test]
    fn a_public_listener_needs_auth_or_no_auth() {
        let f = FileConfig::default();
        let public: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let t = Worker::parse_from(["w"]).args.tuning.resolve(&f).unwrap();
        assert!(t.check_exposure(&[local]).is_ok());
        assert!(t.check_exposure(&[local, public]).is_err());
        let t = Worker::parse_from(["w", "--no-auth"])
            .args
            .tuning
            .resolve(&f)
            .unwrap();
        assert!(t.check_exposure(&[public]).is_ok());
    }
}
