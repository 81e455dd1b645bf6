//! The worker's settings: where it listens, its limits and timeouts, how it
//! resolves names, who may use it and where they may go.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use rotor_worker::acl::Cidr;

use super::settings::{settings, Shape, Value};
use super::{CommonArgs, ConfigError, FileConfig};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// The most runtime threads and password-check threads a worker takes.
const MOST_THREADS: usize = 1024;

/// The most connections a worker (or one client address) is let hold:
/// past any descriptor limit, far under the runtime's (about 2^61, where
/// it panicked).
const MOST_CONNECTIONS: usize = {
    // (On a 32-bit target the runtime's limit, usize::MAX >> 3, is lower.)
    let runtime = usize::MAX >> 3;
    match (u32::MAX as usize) < runtime {
        true => u32::MAX as usize,
        false => runtime,
    }
};

/// The largest request head a worker is let take: each client connection
/// may buffer this much (squid's default is 64 KiB, HAProxy's whole buffer
/// 16 KiB).
const MOST_HEAD_BYTES: usize = 1 << 20;

/// A worker given no listener at all, and passed no socket.
pub const NOTHING_TO_LISTEN_ON: &str =
    "nothing to listen on: listen = [] in the file, and no socks-listen, tls-listen or passed socket";

settings! {
    /// The worker's settings; `rotor up` passes them on unchanged.
    pub struct WorkerFlags, file WorkerFile, resolved Worker {
        /// Address to accept proxy clients on; repeatable. Bound with
        /// SO_REUSEPORT so several workers share it [default: 127.0.0.1:8080,
        /// unless sockets are passed by systemd or --listen-fd; the file's
        /// `listen = []`: none, for a SOCKS5 or TLS listener alone].
        listen: Vec<SocketAddr>,
        /// Address to accept SOCKS5 clients on (CONNECT, the same leases,
        /// rules, users and limits as the HTTP listener); repeatable.
        socks_listen: Vec<SocketAddr>,
        /// Address to accept proxy clients on over TLS (an `https://`
        /// proxy: the same proxy behind a handshake); repeatable. Needs
        /// --tls-cert and --tls-key.
        tls_listen: Vec<SocketAddr>,
        /// The TLS listeners' certificate chain (PEM); re-read on SIGHUP.
        #[arg(value_name = "PATH")]
        tls_cert: Option<PathBuf>,
        /// The TLS listeners' private key (PEM); re-read on SIGHUP.
        #[arg(value_name = "PATH")]
        tls_key: Option<PathBuf>,
        /// How long a request waits for a lease (e.g. while the allocator
        /// restarts) before it gets 503.
        lease_timeout: Option<Duration> = "2s",
        /// Limit on resolving the destination and on connecting to it.
        connect_timeout: Option<Duration> = "10s",
        /// Limit on the destination's response head once the request is
        /// sent, and on an upload that stops moving: a destination taking
        /// none of it, or a client sending none (an upload that moves may
        /// take longer).
        response_timeout: Option<Duration> = "60s",
        /// A client must send a whole request head within this of its first byte (a connection that sends nothing is closed at --idle-timeout).
        header_read_timeout: Option<Duration> = "30s",
        /// Largest request head accepted; larger gets 431 (8192 to 1048576).
        #[arg(value_name = "BYTES")]
        max_head_bytes: Option<usize> = "65536",
        /// On SIGTERM, how long in-flight requests and tunnels may take.
        drain_timeout: Option<Duration> = "30s",
        /// How long an idle upstream connection is kept for the next request
        /// leased the same source address to the same destination; 0
        /// disables reuse.
        upstream_idle_timeout: Option<Duration> = "4s",
        /// Most idle upstream connections kept per (source address,
        /// destination), at most 4096 (the cap over all of them).
        upstream_max_idle: Option<usize> = "16",
        /// A client connection with no bytes moving either way for this
        /// long is closed, and its upstream with it, whichever side is
        /// stuck; only a request still waiting for its response head
        /// (bounded by --response-timeout) is let finish.
        idle_timeout: Option<Duration> = "60s",
        /// A CONNECT tunnel with no bytes moving either way for this long is
        /// closed; so is one whose side takes none of what waits for it for
        /// this long, whatever moves the other way.
        tunnel_idle_timeout: Option<Duration> = "5m",
        /// Most client connections and tunnels at once; past it new clients
        /// get an immediate 503.
        max_connections: Option<usize> = "10000",
        /// Most connections from one client address at once, in each worker
        /// (an IPv6 client's /64 counts as one); past it that address's new ones get
        /// an immediate 503 (SOCKS5: "no acceptable method"); 0: no limit.
        /// A tunnel (CONNECT, SOCKS5) holds its address's place for its life.
        max_client_connections: Option<usize> = "0",
        /// Connections from this range (a front proxy: HAProxy's
        /// `send-proxy-v2`, nginx's `proxy_protocol`, a cloud load
        /// balancer) start with a PROXY protocol header (version 1 or 2)
        /// naming the client, whose address the client limits, the access
        /// log and the logs then see; a connection from it without one is
        /// closed. Repeatable; on every listener (HTTP, TLS, SOCKS5).
        proxy_protocol_from: Vec<Cidr>,
        /// Threads of this worker's runtime; 1 runs it on one thread (scale
        /// out with more workers instead) [default: the number of CPUs; 1
        /// under `rotor up`].
        threads: Option<usize>,
        /// The longest a resolved destination name is reused: the DNS
        /// resolver keeps an answer for its records' TTL, up to this; the
        /// system resolver (which reports no TTLs) this long; 0 resolves
        /// every time.
        dns_cache_ttl: Option<Duration> = "30s",
        /// How destination names are resolved: `dns`, in-process, from
        /// /etc/hosts and the servers of /etc/resolv.conf (or --dns-server),
        /// answers kept for their TTL; `system`, the C library's getaddrinfo
        /// (nsswitch).
        resolver: Option<ResolverKind> = "dns",
        /// A DNS server to ask instead of those of /etc/resolv.conf, as `IP`
        /// or `IP:PORT`; repeatable.
        dns_server: Vec<DnsServer>,
        /// Users who may use the proxy: `user:argon2-hash` lines, written by
        /// `rotor user add`. Re-read on SIGHUP.
        auth_file: Option<PathBuf>,
        /// Most password checks at once in this worker (argon2: about
        /// 19 MiB and some 20 ms of a CPU each); a login past them waits up
        /// to 2 s, then gets 503 [default: the number of CPUs; under `rotor
        /// up`, the CPUs shared among its workers].
        auth_checks: Option<usize>,
        /// Serve without authentication on a non-loopback address (an open
        /// proxy: anyone who can reach it can use it).
        #[arg(conflicts_with = "auth_file")]
        no_auth: Option<bool>,
        /// Allow destinations in this range, even one denied by default
        /// (loopback, private, link-local…); repeatable.
        allow_destination: Vec<Cidr>,
        /// Deny destinations in this range too; repeatable.
        deny_destination: Vec<Cidr>,
        /// How long a sticky session (`USER-session-ID` as the proxy user
        /// name) keeps its address when the name does not say
        /// (`-sessionttl-DURATION`); counted from its first lease.
        session_ttl: Option<Duration> = "10m",
        /// The longest a session may ask for.
        session_max_ttl: Option<Duration> = "24h",
        /// Add the leased source address to each response, as a
        /// `Rotor-Source` header (plain responses and the CONNECT `200`),
        /// so a client can log which address served it.
        expose_source: Option<bool>,
        /// Destination ports refused; repeatable; replaces the default
        /// (SMTP: relay and submission, so the pool's addresses are not
        /// listed for spam). `--deny-port 0` denies none.
        #[arg(value_name = "PORT")]
        deny_port: Vec<u16> = "25,465,587",
        /// How long a request waits for an address with budget left for
        /// its site (see --site-limit) before it gets 429.
        budget_wait: Option<Duration> = "0s",
        /// More destination statuses that cool the address that got them,
        /// for that site, as a comma list (429, and a 503 with a
        /// Retry-After, always do).
        #[arg(value_name = "STATUS,...")]
        cooldown_status: Option<Statuses> = "429",
        /// Cool an address for a site whose connects from it fail while
        /// the site answers the pool's other addresses (a site that drops
        /// or refuses that address): from a second such failure, 10 s or
        /// more after the first with no connect made there between, for 60 s,
        /// doubling with each repeat up to 10 min.
        cooldown_connect_failures: Option<bool> = "true",
        /// Write a line per request and tunnel (time, client, user,
        /// session, method, target host and port, source address, status,
        /// Proxy-Status error, bytes each way, milliseconds) to this file,
        /// or `-` for standard output; reopened on SIGHUP and `rotor
        /// reload`.
        #[arg(value_name = "PATH|-")]
        access_log: Option<PathBuf>,
        /// The access log's lines: `text` (space-separated) or `json` (an
        /// object a line).
        #[arg(value_name = "text|json")]
        access_log_format: Option<AccessFormat> = "text",
    }
}

/// The access log's format (`--access-log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessFormat(pub rotor_worker::access::Format);

impl Value for AccessFormat {
    const NAME: &'static str = "text|json";
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(AccessFormat(rotor_worker::access::Format::Text)),
            "json" => Ok(AccessFormat(rotor_worker::access::Format::Json)),
            _ => Err(format!("`{s}` is not an access log format: text or json")),
        }
    }
    fn show(&self) -> String {
        match self.0 {
            rotor_worker::access::Format::Text => "text",
            rotor_worker::access::Format::Json => "json",
        }
        .into()
    }
}

/// HTTP statuses, as a comma list (`403,429`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statuses(pub Vec<u16>);

impl Value for Statuses {
    const NAME: &'static str = "STATUS,...";
    fn parse(s: &str) -> Result<Self, String> {
        s.split(',')
            .map(|p| match p.trim().parse::<u16>() {
                Ok(n) if (400..=599).contains(&n) => Ok(n),
                // (A site's answers that cool an address are refusals: a
                // 200 listed cooled the address at each success.)
                Ok(n) if (100..=399).contains(&n) => Err(format!(
                    "`{p}` is no refusal: a status that cools is 400 to 599"
                )),
                _ => Err(format!("`{p}` is not an HTTP status (400 to 599)")),
            })
            .collect::<Result<Vec<u16>, String>>()
            .map(Statuses)
    }
    fn show(&self) -> String {
        self.0
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// How destination names are resolved (`--resolver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolverKind {
    Dns,
    System,
}

impl Value for ResolverKind {
    const NAME: &'static str = "dns|system";
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "dns" => Ok(ResolverKind::Dns),
            "system" => Ok(ResolverKind::System),
            _ => Err(format!("`{s}` is not a resolver: dns or system")),
        }
    }
    fn show(&self) -> String {
        match self {
            ResolverKind::Dns => "dns",
            ResolverKind::System => "system",
        }
        .into()
    }
}

/// `IP` or `IP:PORT` (port 53 by default; IPv6 with a port in brackets,
/// and an unbracketed IPv6 address that also reads as address and port
/// refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsServer(pub SocketAddr);

impl Value for DnsServer {
    const NAME: &'static str = "IP[:PORT]";
    fn parse(s: &str) -> Result<Self, String> {
        // Nothing answers at port 0 or the unspecified address: lookups
        // went nowhere, each a DNS timeout.
        let sound = |a: SocketAddr| match (a.port(), a.ip().is_unspecified()) {
            (0, _) => Err(format!("`{s}`: a DNS server's port is not 0")),
            (_, true) => Err(format!("`{s}`: the unspecified address is no DNS server")),
            _ => Ok(DnsServer(a)),
        };
        if let Ok(a) = s.parse::<SocketAddr>() {
            return sound(a);
        }
        // `::1:5353` is an IPv6 address, and also reads as `::1` port
        // 5353: which was meant is asked, not guessed (it was taken as the
        // address, port 53, and lookups went nowhere).
        if let Some((ip, port)) = s.rsplit_once(':') {
            let decimal =
                !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
            if decimal
                && s.parse::<std::net::Ipv6Addr>().is_ok()
                && ip.parse::<std::net::Ipv6Addr>().is_ok()
            {
                return Err(format!(
                    "`{s}` reads both as an IPv6 address and as {ip} port {port}: write [{ip}]:{port} for the port, or [{s}] for the address"
                ));
            }
        }
        rotor_protocol::addr::unbracketed(s)
            .parse::<std::net::IpAddr>()
            .map_err(|_| format!("`{s}` is not an IP address or IP:PORT"))
            .and_then(|ip| sound(SocketAddr::new(ip, 53)))
    }
    fn show(&self) -> String {
        self.0.to_string()
    }
}

impl Value for Cidr {
    const NAME: &'static str = "CIDR";
    fn parse(s: &str) -> Result<Self, String> {
        s.parse()
            .map_err(|e: rotor_worker::acl::CidrError| e.to_string())
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Accept on the listening socket inherited as descriptor N (as
    /// `rotor up` passes it); repeatable.
    #[arg(long = "listen-fd", value_name = "N")]
    pub listen_fd: Vec<i32>,
    /// Accept SOCKS5 clients on the inherited descriptor N; repeatable.
    #[arg(long = "socks-listen-fd", value_name = "N")]
    pub socks_listen_fd: Vec<i32>,
    /// Accept TLS clients on the inherited descriptor N; repeatable.
    #[arg(long = "tls-listen-fd", value_name = "N")]
    pub tls_listen_fd: Vec<i32>,
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub settings: WorkerFlags,
}

#[derive(Debug, Clone)]
pub struct WorkerSettingsTuning {
    /// Runtime threads.
    pub threads: usize,
    pub lease_timeout: Duration,
    pub config: rotor_worker::Config,
    /// `--no-auth` (or the file's `no-auth = true`).
    pub no_auth: bool,
    /// Whether `max-connections` was given (flag or file), not the
    /// default: a default the descriptor limit cannot hold is fitted to it
    /// without a warning, as HAProxy derives an unset `maxconn`.
    pub max_connections_given: bool,
    /// Where the access log goes, checked but not yet opened: `--check`
    /// and `rotor up`'s own check of the settings make no file and start
    /// no writer.
    pub access_log: Option<(rotor_worker::access::Target, rotor_worker::access::Format)>,
}

impl WorkerSettingsTuning {
    /// Opens the access log (a file is created if need be) and starts its
    /// writer: for a worker that runs.
    pub fn open_access_log(&mut self) -> Result<(), ConfigError> {
        if let Some((target, format)) = &self.access_log {
            let log = rotor_worker::access::AccessLog::open(target.clone(), *format)
                .map_err(|e| ConfigError::Invalid(format!("access-log {target}: {e}")))?;
            self.config.proxy.access_log = Some(log);
        }
        Ok(())
    }
}

impl WorkerFlags {
    /// The addresses to bind, given that `passed` sockets were inherited
    /// (those replace the file's and the default listeners, not the
    /// flags').
    ///
    /// The file's `listen = []` is a list given: no HTTP listener (a
    /// worker serving SOCKS5 or TLS only); left out, the default.
    pub fn listen(&self, file: &FileConfig, passed: usize) -> Vec<SocketAddr> {
        if self.listen.is_empty() && passed > 0 {
            return Vec::new();
        }
        match Shape::given(&self.listen, &file.worker.listen) {
            Some(given) => given,
            None => vec![DEFAULT_LISTEN.parse().expect("valid default")],
        }
    }

    /// The listen addresses given (flag or file), without the default:
    /// what `--check` holds against the other listeners, the default
    /// being replaced by systemd's socket at a start it cannot see.
    pub fn given_listen(&self, file: &FileConfig) -> Vec<SocketAddr> {
        Shape::given(&self.listen, &file.worker.listen).unwrap_or_default()
    }

    /// Everything but the listeners, validated.
    pub fn resolve(&self, file: &FileConfig) -> Result<WorkerSettingsTuning, ConfigError> {
        let mut w = self.merge(&file.worker);
        // Flag over file, as for every setting: `--no-auth` on the command
        // line serves without the file's `auth-file`, and `--auth-file`
        // there without the file's `no-auth`. Both in the file is a
        // contradiction, named (as clap names both as flags).
        match (self.no_auth, &self.auth_file) {
            (Some(true), None) => w.auth_file = None,
            (_, Some(_)) if self.no_auth.is_none() => w.no_auth = None,
            _ => {}
        }
        if w.no_auth == Some(true) && w.auth_file.is_some() {
            return Err(ConfigError::Invalid(
                "auth-file and no-auth = true contradict each other: give one".into(),
            ));
        }
        let resolver = match w.resolver {
            ResolverKind::Dns => rotor_worker::dns::ResolverChoice::Dns {
                servers: w.dns_server.iter().map(|s| s.0).collect(),
            },
            ResolverKind::System if w.dns_server.is_empty() => rotor_worker::dns::ResolverChoice::System,
            ResolverKind::System => return Err(ConfigError::Invalid(
                "dns-server is for the dns resolver; the system resolver asks the servers of /etc/resolv.conf".into(),
            )),
        };
        if w.auth_checks == Some(0) {
            return Err(ConfigError::Invalid(
                "auth-checks must be at least 1".into(),
            ));
        }
        // Past these, a count is a typo, and the runtime's limits panic.
        for (name, n, most) in [
            ("auth-checks", w.auth_checks.unwrap_or(1), MOST_THREADS),
            ("threads", w.threads.unwrap_or(1), MOST_THREADS),
            ("max-connections", w.max_connections, MOST_CONNECTIONS),
            (
                "max-client-connections",
                w.max_client_connections,
                MOST_CONNECTIONS,
            ),
            // Each client connection may buffer a head this large.
            ("max-head-bytes", w.max_head_bytes, MOST_HEAD_BYTES),
            // The worker keeps this many in all.
            (
                "upstream-max-idle",
                w.upstream_max_idle,
                rotor_worker::upstream::MAX_IDLE_TOTAL,
            ),
        ] {
            if n > most {
                return Err(ConfigError::Invalid(format!("{name} is at most {most}")));
            }
        }
        let auth = match &w.auth_file {
            Some(path) => Some(
                rotor_worker::auth::Auth::load(path, w.auth_checks)
                    .map_err(|e| ConfigError::Invalid(rotor_protocol::error_chain(&e)))?,
            ),
            None => None,
        };
        let access_log = match &w.access_log {
            None => None,
            Some(p) => {
                let target = match p.as_os_str() == "-" {
                    true => rotor_worker::access::Target::Stdout,
                    false => rotor_worker::access::Target::File(p.clone()),
                };
                target
                    .check()
                    .map_err(|e| ConfigError::Invalid(format!("access-log {target}: {e}")))?;
                Some((target, w.access_log_format.0))
            }
        };
        let tls =
            match (&w.tls_cert, &w.tls_key) {
                (Some(cert), Some(key)) => Some(
                    rotor_worker::tls::Tls::new(rotor_worker::tls::TlsFiles {
                        cert: cert.clone(),
                        key: key.clone(),
                    })
                    .map_err(ConfigError::Invalid)?,
                ),
                (None, None) if w.tls_listen.is_empty() => None,
                (None, None) => return Err(ConfigError::Invalid(
                    "tls-listen needs tls-cert and tls-key (a PEM certificate chain and its key)"
                        .into(),
                )),
                _ => {
                    return Err(ConfigError::Invalid(
                        "tls-cert and tls-key go together".into(),
                    ))
                }
            };
        let t = WorkerSettingsTuning {
            threads: w
                .threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            no_auth: w.no_auth.unwrap_or(false),
            max_connections_given: Shape::given(
                &self.max_connections,
                &file.worker.max_connections,
            )
            .is_some(),
            lease_timeout: w.lease_timeout,
            config: rotor_worker::Config {
                proxy: rotor_worker::proxy::ProxyConfig {
                    connect_timeout: w.connect_timeout,
                    idle_timeout: w.idle_timeout,
                    response_timeout: w.response_timeout,
                    upstream_idle_timeout: w.upstream_idle_timeout,
                    upstream_max_idle: w.upstream_max_idle,
                    // (Fitted to the descriptor limit as the worker starts.)
                    upstream_idle_total: rotor_worker::upstream::MAX_IDLE_TOTAL,
                    acl: rotor_worker::acl::Acl::new(
                        w.allow_destination,
                        w.deny_destination,
                        w.deny_port,
                    ),
                    dns_cache_ttl: w.dns_cache_ttl,
                    resolver,
                    auth,
                    tunnel_idle_timeout: w.tunnel_idle_timeout,
                    max_head_bytes: w.max_head_bytes,
                    expose_source: w.expose_source.unwrap_or(false),
                    session_ttl: w.session_ttl.min(w.session_max_ttl),
                    session_max_ttl: w.session_max_ttl,
                    budget_wait: w.budget_wait,
                    cooldown_status: w.cooldown_status.0,
                    cooldown_connect_failures: w.cooldown_connect_failures,
                    // Opened by `open_access_log`, when the worker runs.
                    access_log: None,
                },
                max_connections: w.max_connections,
                max_client_connections: w.max_client_connections,
                proxy_protocol: rotor_worker::proxied::Trusted::new(w.proxy_protocol_from),
                tls,
                header_read_timeout: w.header_read_timeout,
                drain_timeout: w.drain_timeout,
            },
            access_log,
        };
        if t.threads == 0 {
            return Err(ConfigError::Invalid("threads must be at least 1".into()));
        }
        // A zero here is no "off": every wait would end at once.
        for (name, d) in [
            ("lease-timeout", w.lease_timeout),
            ("connect-timeout", w.connect_timeout),
            ("response-timeout", w.response_timeout),
            ("header-read-timeout", w.header_read_timeout),
            ("idle-timeout", w.idle_timeout),
            ("tunnel-idle-timeout", w.tunnel_idle_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be longer than 0s (with 0s every such wait would fail at once)"
                )));
            }
        }
        for (name, d) in [
            ("session-ttl", w.session_ttl),
            ("session-max-ttl", w.session_max_ttl),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be longer than 0s (a session of 0s would end at once)"
                )));
            }
        }
        if t.config.proxy.budget_wait > Duration::from_secs(3600) {
            return Err(ConfigError::Invalid(
                "budget-wait is at most 1h (a client waits that long for a site's budget)".into(),
            ));
        }
        if t.config.max_connections == 0 {
            return Err(ConfigError::Invalid(
                "max-connections must be at least 1".into(),
            ));
        }
        if t.config.proxy.max_head_bytes < 8192 {
            return Err(ConfigError::Invalid(
                "max-head-bytes must be at least 8192".into(),
            ));
        }
        Ok(t)
    }
}

/// One address, one kind of client: the same address given twice among
/// the addresses a worker binds (with SO_REUSEPORT, so both bind) splits
/// its clients between the handlers at random. Asked of what is bound,
/// not of the file alone: sockets passed replace its `listen`.
pub fn one_kind_each(
    listen: &[SocketAddr],
    socks: &[SocketAddr],
    tls: &[SocketAddr],
) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashMap::new();
    let listeners = (listen.iter().map(|a| ("listen", a)))
        .chain(socks.iter().map(|a| ("socks-listen", a)))
        .chain(tls.iter().map(|a| ("tls-listen", a)))
        // Port 0 is a port of the kernel's choosing, another at each bind.
        .filter(|(_, a)| a.port() != 0);
    for (kind, addr) in listeners {
        if let Some(first) = seen.insert(addr, kind) {
            return Err(ConfigError::Invalid(format!(
                "{addr} is given twice ({first} and {kind}): an address serves one kind of client"
            )));
        }
    }
    Ok(())
}

impl WorkerSettingsTuning {
    /// A worker reachable from other hosts must authenticate its clients,
    /// unless the operator said `--no-auth` knowingly. `plain` are the
    /// HTTP and SOCKS5 listeners, `tls` the TLS ones.
    pub fn check_exposure(
        &self,
        plain: &[SocketAddr],
        tls: &[SocketAddr],
    ) -> Result<(), ConfigError> {
        let listening: Vec<SocketAddr> = plain.iter().chain(tls).copied().collect();
        if self.config.proxy.auth.is_some() {
            // Said of a plain one beside a TLS one too: its clients'
            // passwords cross the network in clear all the same.
            if let Some(a) = plain.iter().find(|a| !a.ip().is_loopback()) {
                tracing::warn!(listen = %a, "passwords and targets cross the network in clear on a plain listener: add --tls-listen with a certificate (see README: TLS to the proxy)");
            }
            return Ok(());
        }
        if self.no_auth {
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

#[cfg(test)]
mod tests {
    #[test]
    fn a_dns_server_that_reads_two_ways_is_refused() {
        use super::DnsServer;
        use crate::cli::settings::Value;
        let ok = |s: &str| DnsServer::parse(s).unwrap().0.to_string();
        assert_eq!(ok("127.0.0.53"), "127.0.0.53:53");
        assert_eq!(ok("127.0.0.1:5353"), "127.0.0.1:5353");
        assert_eq!(ok("[::1]:5353"), "[::1]:5353");
        assert_eq!(ok("[::1:5353]"), "[::1:5353]:53");
        assert_eq!(ok("::1"), "[::1]:53");
        // `fd00:` is no address: `fd00::53` reads one way only.
        assert_eq!(ok("fd00::53"), "[fd00::53]:53");
        assert_eq!(ok("2001:db8::a:b"), "[2001:db8::a:b]:53");
        for none in ["127.0.0.1:0", "0.0.0.0", "[::]:53"] {
            assert!(DnsServer::parse(none).is_err(), "{none}");
        }
        for two in ["::1:5353", "2001:db8::1:53"] {
            let e = DnsServer::parse(two).unwrap_err();
            assert!(e.contains("reads both") && e.contains("]:"), "{e}");
        }
    }

    use super::super::test_support::file;
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct W {
        #[command(flatten)]
        args: WorkerArgs,
    }

    fn flags(args: &[&str]) -> WorkerFlags {
        W::parse_from(std::iter::once("w").chain(args.iter().copied()))
            .args
            .settings
    }

    /// One address for two kinds of listener, and counts past any use,
    /// are refused by name (the first split clients at random, the second
    /// panicked at the start).
    #[test]
    fn a_shared_listen_address_and_absurd_counts_are_refused() {
        let err = |args: &[&str]| match flags(args).resolve(&FileConfig::default()) {
            Err(ConfigError::Invalid(e)) => e,
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("{args:?} accepted"),
        };
        // What is bound: sockets passed (`passed`) replace the listen.
        let kinds = |args: &[&str], passed| {
            let f = flags(args);
            let file = FileConfig::default();
            let w = f.merge(&file.worker);
            match one_kind_each(&f.listen(&file, passed), &w.socks_listen, &w.tls_listen) {
                Err(ConfigError::Invalid(e)) => e,
                other => format!("{other:?}"),
            }
        };
        let same = [
            "--listen",
            "127.0.0.1:18081",
            "--socks-listen",
            "127.0.0.1:18081",
        ];
        let e = kinds(&same, 0);
        assert!(
            e.contains("127.0.0.1:18081 is given twice (listen and socks-listen)"),
            "{e}"
        );
        let e = kinds(&["--socks-listen", "127.0.0.1:8080"], 0);
        assert!(
            e.contains("(listen and socks-listen)"),
            "the default listen: {e}"
        );
        assert_eq!(kinds(&["--socks-listen", "127.0.0.1:8080"], 1), "Ok(())");
        let e = kinds(&["--listen", "127.0.0.1:1", "--listen", "127.0.0.1:1"], 0);
        assert!(e.contains("(listen and listen)"), "{e}");
        let two = ["--listen", "127.0.0.1:1", "--socks-listen", "127.0.0.1:2"];
        assert_eq!(kinds(&two, 0), "Ok(())");
        let any = ["--listen", "127.0.0.1:0", "--socks-listen", "127.0.0.1:0"];
        assert_eq!(
            kinds(&any, 0),
            "Ok(())",
            "two ports of the kernel's choosing"
        );
        assert!(
            err(&["--auth-checks", "18446744073709551615"]).contains("auth-checks is at most 1024")
        );
        assert!(err(&["--threads", "100000"]).contains("threads is at most 1024"));
        let e = <Statuses as Value>::parse("429,200").unwrap_err();
        assert!(e.contains("`200` is no refusal"), "{e}");
        let e = err(&["--max-head-bytes", "1073741824"]);
        assert!(e.contains("max-head-bytes is at most 1048576"), "{e}");
        let e = err(&["--upstream-max-idle", "100000"]);
        assert!(e.contains("upstream-max-idle is at most 4096"), "{e}");
        let e = err(&["--max-connections", "4611686018427387904"]);
        assert!(e.contains("max-connections is at most 4294967295"), "{e}");
        assert!(flags(&["--max-connections", "100000000"])
            .resolve(&FileConfig::default())
            .is_ok());
    }

    #[test]
    fn the_example_configuration_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/rotor.toml");
        let f = FileConfig::load(Some(&path)).unwrap();
        let a = crate::cli::AllocatorFlags::default();
        a.pool(&f).unwrap();
        a.access(&f).unwrap();
        let t = flags(&[]).resolve(&f).unwrap();
        assert_eq!(t.config.max_connections, 10_000);
        assert_eq!(f.up.workers, Some(Some(2)));
        assert!(
            crate::cli::UpFlags::default()
                .merge(&Default::default())
                .workers()
                >= 1
        );
    }

    #[test]
    fn connect_failures_cool_unless_turned_off() {
        let none = FileConfig::default();
        let on = |args: &[&str], f: &FileConfig| {
            flags(args)
                .resolve(f)
                .unwrap()
                .config
                .proxy
                .cooldown_connect_failures
        };
        assert!(on(&[], &none));
        assert!(!on(&["--cooldown-connect-failures", "false"], &none));
        let off = file("[worker]\ncooldown-connect-failures = false\n").unwrap();
        assert!(!on(&[], &off));
        assert!(on(&["--cooldown-connect-failures"], &off));
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let f = file("[worker]\nlease-timeout = \"7s\"\nconnect-timeout = \"3s\"\n").unwrap();
        let t = flags(&["--lease-timeout", "1s"]).resolve(&f).unwrap();
        assert_eq!(t.lease_timeout, Duration::from_secs(1));
        assert_eq!(t.config.proxy.connect_timeout, Duration::from_secs(3));
        assert_eq!(t.config.drain_timeout, Duration::from_secs(30));
        assert_eq!(t.config.proxy.max_head_bytes, 65536);
        // A zero wait is refused where it is no "off"; where it is, taken.
        let none = FileConfig::default();
        for name in ["--connect-timeout", "--response-timeout", "--idle-timeout"] {
            let e = flags(&[name, "0s"]).resolve(&none).unwrap_err().to_string();
            assert!(e.contains("longer than 0s"), "{name}: {e}");
        }
        assert!(flags(&["--upstream-idle-timeout", "0s"])
            .resolve(&none)
            .is_ok());
        let e = flags(&["--auth-checks", "0"]).resolve(&none).unwrap_err();
        assert!(e.to_string().contains("auth-checks"), "{e}");
    }

    #[test]
    fn every_default_parses_and_help_shows_it() {
        let t = flags(&[]).resolve(&FileConfig::default()).unwrap();
        assert_eq!(t.config.proxy.tunnel_idle_timeout, Duration::from_secs(300));
        let help = W::command().render_long_help().to_string();
        assert!(help.contains("[default: 5m]"), "{help}");
        assert!(help.contains("--deny-port <PORT>"), "{help}");
        assert!(help.contains("--allow-destination <CIDR>"), "{help}");
    }

    #[test]
    fn deny_ports_default_and_an_empty_list_in_the_file_denies_none() {
        let none = FileConfig::default();
        let ports = |t: WorkerSettingsTuning| t.config.proxy.acl.deny_ports().to_vec();
        assert_eq!(ports(flags(&[]).resolve(&none).unwrap()), [25, 465, 587]);
        let f = file("[worker]\ndeny-port = []\n").unwrap();
        assert_eq!(ports(flags(&[]).resolve(&f).unwrap()), Vec::<u16>::new());
        // (`0` stands for none: listed as none, as `--check` says it.)
        assert_eq!(
            ports(flags(&["--deny-port", "0"]).resolve(&f).unwrap()),
            Vec::<u16>::new()
        );
    }

    #[test]
    fn the_resolver_and_its_servers_come_from_flags_or_the_file() {
        use rotor_worker::dns::ResolverChoice;
        let none = FileConfig::default();
        let t = flags(&[]).resolve(&none).unwrap();
        assert_eq!(t.config.proxy.resolver, ResolverChoice::default());
        let w = flags(&["--dns-server", "127.0.0.1", "--dns-server", "[::1]:5353"]);
        let t = w.resolve(&none).unwrap();
        let servers = vec![
            "127.0.0.1:53".parse().unwrap(),
            "[::1]:5353".parse().unwrap(),
        ];
        assert_eq!(t.config.proxy.resolver, ResolverChoice::Dns { servers });
        // `rotor up` hands them on to its workers.
        let args: Vec<String> = w
            .to_args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(
            args.iter().any(|a| a == "--dns-server=[::1]:5353"),
            "{args:?}"
        );
        let f = file("[worker]\nresolver = \"system\"\n").unwrap();
        let t = flags(&[]).resolve(&f).unwrap();
        assert_eq!(t.config.proxy.resolver, ResolverChoice::System);
        let f = file("[worker]\ndns-server = [\"10.0.0.53:5300\"]\n").unwrap();
        let t = flags(&[]).resolve(&f).unwrap();
        assert_eq!(
            t.config.proxy.resolver,
            ResolverChoice::Dns {
                servers: vec!["10.0.0.53:5300".parse().unwrap()]
            }
        );
        // Servers make no sense for getaddrinfo, and junk is named.
        let w = flags(&["--resolver", "system", "--dns-server", "10.0.0.53"]);
        assert!(w.resolve(&none).is_err());
        let err = file("[worker]\ndns-server = [\"resolver.example\"]\n").unwrap_err();
        let text = rotor_protocol::error_chain(&err);
        assert!(text.contains("dns-server"), "{text}");
        assert!(text.contains("resolver.example"), "{text}");
    }

    #[test]
    fn a_public_listener_needs_auth_or_no_auth() {
        let f = FileConfig::default();
        let public: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let t = flags(&[]).resolve(&f).unwrap();
        assert!(t.check_exposure(&[local], &[]).is_ok());
        assert!(t.check_exposure(&[local, public], &[]).is_err());
        assert!(t.check_exposure(&[local], &[public]).is_err());
        let t = flags(&["--no-auth"]).resolve(&f).unwrap();
        assert!(t.check_exposure(&[public], &[]).is_ok());
    }

    #[test]
    fn listeners_from_flags_the_file_or_the_default() {
        let f = file("[worker]\nlisten = [\"127.0.0.1:9000\"]\n").unwrap();
        let at = |a: &str| vec![a.parse::<SocketAddr>().unwrap()];
        assert_eq!(flags(&[]).listen(&f, 0), at("127.0.0.1:9000"));
        assert_eq!(flags(&[]).listen(&f, 1), vec![]);
        assert_eq!(
            flags(&["--listen", "127.0.0.1:9001"]).listen(&f, 1),
            at("127.0.0.1:9001")
        );
        assert_eq!(
            flags(&[]).listen(&FileConfig::default(), 0),
            at(DEFAULT_LISTEN)
        );
        // An empty list in the file: no HTTP listener (SOCKS5 only), not
        // the default.
        let none = file("[worker]\nlisten = []\nsocks-listen = [\"127.0.0.1:1080\"]\n").unwrap();
        assert_eq!(flags(&[]).listen(&none, 0), vec![]);
        assert_eq!(
            flags(&["--listen", "127.0.0.1:9001"]).listen(&none, 0),
            at("127.0.0.1:9001")
        );
    }

    #[test]
    fn auth_flags_win_over_the_files_and_both_in_the_file_are_refused() {
        let dir = std::env::temp_dir().join(format!("rotor-auth-flags-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let users = dir.join("users");
        std::fs::write(&users, "").unwrap();
        let with_users = file(&format!(
            "[worker]\nauth-file = {:?}\n",
            users.display().to_string()
        ))
        .unwrap();
        let public: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        // The file's users, unless the command line says --no-auth.
        assert!(flags(&[])
            .resolve(&with_users)
            .unwrap()
            .config
            .proxy
            .auth
            .is_some());
        let t = flags(&["--no-auth"]).resolve(&with_users).unwrap();
        assert!(t.config.proxy.auth.is_none() && t.no_auth);
        assert!(t.check_exposure(&[public], &[]).is_ok());
        let t = flags(&["--no-auth=false"]).resolve(&with_users).unwrap();
        assert!(t.config.proxy.auth.is_some() && !t.no_auth);
        // The file's no-auth, unless the command line gives users.
        let open = file("[worker]\nno-auth = true\n").unwrap();
        assert!(flags(&[]).resolve(&open).unwrap().no_auth);
        let arg = users.display().to_string();
        let t = flags(&["--auth-file", &arg]).resolve(&open).unwrap();
        assert!(t.config.proxy.auth.is_some() && !t.no_auth);
        // Both in the file contradict each other.
        let both = file(&format!(
            "[worker]\nno-auth = true\nauth-file = {:?}\n",
            users.display().to_string()
        ))
        .unwrap();
        let e = flags(&[]).resolve(&both).unwrap_err().to_string();
        assert!(e.contains("contradict"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
