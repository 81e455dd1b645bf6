//! Destination name resolution, cached.
//!
//! By default names go to an in-process DNS resolver (hickory): it reads
//! `/etc/resolv.conf` (or the servers `--dns-server` names) and answers from
//! `/etc/hosts` first, runs on the worker's own runtime (no blocking thread
//! per lookup, as getaddrinfo needs), and keeps each answer for its records'
//! TTL, and at most `--dns-cache-ttl`; a name that does not exist is
//! remembered as its zone's SOA says, within the same bound. So a
//! destination that moves is followed as soon as its TTL allows, and a busy
//! one is not asked for on every request.
//!
//! `--resolver system` keeps the C library's getaddrinfo, for hosts that
//! resolve through nsswitch (LDAP, mDNS, …). getaddrinfo reports no TTLs, so
//! its answers are kept for a fixed `--dns-cache-ttl`; failures are not
//! cached.
//!
//! Either way a name's addresses are kept by the worker in [`Answers`] until
//! they expire, so a request to a known name costs one map lookup: asking
//! hickory's own cache again took ≈ 20 000 instructions a request (its
//! lookup futures, a cache read per family, the name parsed), more than the
//! rest of the request.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use foldhash::HashMap;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use tracing::warn;

use crate::error::ProxyError;
use rotor_protocol::addr::unbracketed;

/// Which resolver a worker uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolverChoice {
    /// In-process DNS: these servers, or those of `/etc/resolv.conf` when
    /// empty.
    Dns { servers: Vec<SocketAddr> },
    /// getaddrinfo.
    System,
}

impl Default for ResolverChoice {
    fn default() -> ResolverChoice {
        ResolverChoice::Dns {
            servers: Vec::new(),
        }
    }
}

/// Most names [`Answers`] keeps; past it the expired ones go, and if that
/// is not enough, an eighth of the others (a client cycling through names
/// does not empty it for everyone).
const MAX_NAMES: usize = 10_000;

/// Most addresses of each family taken of a name's answer: one answer can
/// list thousands (64 KiB over TCP), each kept with the name and checked
/// against the rules at each request; more than this many are never all
/// tried within a connect's time anyway.
const MAX_ADDRS_PER_FAMILY: usize = 16;

/// Responses the DNS resolver's own cache keeps. hickory keeps each whole
/// (a 64 KiB answer over TCP holds thousands of records, each parsed into
/// its own allocations), and [`Answers`] holds what requests use (16
/// addresses a family): this one serves the names that do not exist
/// (their SOA's time). At 10 000, names whose zones answer that way, which
/// any client may ask for, could hold 640 MiB of answers and more.
const DNS_CACHE_RECORDS: u64 = 512;

/// The longest an answer of one address family is kept when the other
/// family's lookup failed (a timeout, SERVFAIL) or did not come within
/// [`ONE_FAMILY_WAIT`], rather than found no records: it may have records
/// the next lookup finds.
const ONE_FAMILY_TTL: Duration = Duration::from_secs(2);

/// A name's addresses, until when they are good, and whether a family may
/// be missing from them (see [`Resolved`]).
type Answer = (Vec<SocketAddr>, Instant, bool);

/// A worker's resolved names: lower-cased name → [`Answer`]. Bounded by
/// [`MAX_NAMES`]; an entry is ≈ 100 bytes and its name.
#[derive(Default)]
struct Answers(Mutex<HashMap<String, Answer>>);

/// A name's addresses, and whether one family may be missing from them:
/// it did not answer within the moment it is given once the other has
/// (or failed), where it might have had addresses.
pub type Resolved = (Vec<SocketAddr>, bool);

impl Answers {
    /// `host`'s addresses with `port`, if known and not expired. (Kept as
    /// socket addresses: an IPv6 scope from getaddrinfo stays with them.)
    fn get(&self, host: &str, port: u16) -> Option<Resolved> {
        let name = lower(host);
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (addrs, until, partial) = map.get(&*name)?;
        (Instant::now() < *until).then(|| {
            let addrs = addrs
                .iter()
                .map(|a| {
                    let mut a = *a;
                    a.set_port(port);
                    a
                })
                .collect();
            (addrs, *partial)
        })
    }

    fn put(&self, host: &str, addrs: &[SocketAddr], until: Instant, partial: bool) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_NAMES {
            let now = Instant::now();
            map.retain(|_, (_, until, _)| now < *until);
            if map.len() >= MAX_NAMES {
                let some: Vec<String> = map.keys().take(MAX_NAMES / 8).cloned().collect();
                for k in some {
                    map.remove(&k);
                }
            }
        }
        map.insert(lower(host).into_owned(), (addrs.to_vec(), until, partial));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

pub struct Resolver {
    /// The longest an answer is kept; zero: not at all.
    ttl: Duration,
    resolver: ResolverChoice,
    /// Swapped whole by [`reload`](Self::reload); a lookup in flight keeps
    /// the one it started with.
    backend: std::sync::RwLock<std::sync::Arc<Backend>>,
}

/// How names are looked up, and the answers kept (dropped together by a
/// reload).
struct Backend {
    lookup: Lookup,
    answers: Answers,
}

enum Lookup {
    /// hickory, with the names of `/etc/hosts` answered first, exactly as
    /// the file lists them (hickory adds `::1` to `localhost` on its own,
    /// which the C library does not when the file has no such line).
    Dns(Box<TokioResolver>, Hosts),
    System,
}

impl Backend {
    fn new(resolver: &ResolverChoice, ttl: Duration) -> Backend {
        Backend::made(resolver, ttl).unwrap_or_else(|e| Backend::system_instead(&e))
    }

    /// getaddrinfo, for a resolver whose configuration does not read.
    fn system_instead(e: &str) -> Backend {
        warn!(error = %e, "cannot set up the DNS resolver (no /etc/resolv.conf?); resolving with the system's getaddrinfo");
        Backend::with(Lookup::System)
    }

    /// The backend `resolver` says, if its configuration reads.
    fn made(resolver: &ResolverChoice, ttl: Duration) -> Result<Backend, String> {
        let lookup = match resolver {
            ResolverChoice::System => Lookup::System,
            ResolverChoice::Dns { servers } => {
                let r = dns_resolver(servers, ttl).map_err(|e| e.to_string())?;
                Lookup::Dns(Box::new(r), Hosts::read(Path::new(HOSTS)))
            }
        };
        Ok(Backend::with(lookup))
    }

    fn with(lookup: Lookup) -> Backend {
        Backend {
            lookup,
            answers: Answers::default(),
        }
    }
}

impl Resolver {
    /// Must run on the runtime that will do the lookups.
    pub fn new(resolver: &ResolverChoice, ttl: Duration) -> Resolver {
        Resolver {
            ttl,
            resolver: resolver.clone(),
            backend: std::sync::RwLock::new(std::sync::Arc::new(Backend::new(resolver, ttl))),
        }
    }

    /// Starts over (SIGHUP): every cached answer dropped, and the DNS
    /// resolver's configuration (`/etc/resolv.conf`, `/etc/hosts`) read
    /// anew.
    /// A configuration that does not read (a resolv.conf being rewritten
    /// at that moment, emptied) keeps the resolver in use, cache and all,
    /// rather than fall back to getaddrinfo until the next reload. Whether
    /// it started over, else why not.
    pub fn reload(&self) -> Result<(), String> {
        let fresh = match Backend::made(&self.resolver, self.ttl) {
            Ok(b) => b,
            Err(e) => {
                let current = self.current();
                if let Lookup::Dns(..) = current.lookup {
                    warn!(error = %e, "cannot read the DNS resolver's configuration again (no /etc/resolv.conf, or no server in it?); keeping the one in use");
                    return Err(format!("cannot read the DNS resolver's configuration again ({e}); keeping the one in use"));
                }
                Backend::system_instead(&e)
            }
        };
        *self.backend.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(fresh);
        Ok(())
    }

    fn current(&self) -> std::sync::Arc<Backend> {
        self.backend
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The addresses of `host:port`, within `timeout`. An IP literal needs
    /// no lookup.
    #[cfg(test)]
    pub async fn resolve(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<Vec<SocketAddr>, ProxyError> {
        Ok(self.resolve_marked(host, port, timeout, false).await?.0)
    }

    /// As `resolve`, and whether a family may be missing from the answer.
    /// `both`: both families waited for (up to `timeout`), whatever the
    /// cache holds: for a name whose one family answered before the other
    /// came, when the pool has only that other family. (One function, not
    /// layers of them: it is every request's, and each layer of future
    /// cost some 50 instructions a request.)
    pub async fn resolve_marked(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
        both: bool,
    ) -> Result<Resolved, ProxyError> {
        if let Some(ip) = ip_literal(host) {
            return Ok((vec![SocketAddr::new(ip, port)], false));
        }
        // (A name longer than MAX_NAME was refused before it came here:
        // see `check_spelling`.)
        let backend = self.current();
        let answers = &backend.answers;
        if let Lookup::Dns(_, hosts) = &backend.lookup {
            if let Some(ips) = hosts.get(host) {
                let addrs = ips
                    .iter()
                    .map(|ip| SocketAddr::new(ip.to_canonical(), port))
                    .collect();
                return Ok((addrs, false));
            }
        }
        let cached = !self.ttl.is_zero();
        if cached && !both {
            if let Some(resolved) = answers.get(host, port) {
                return Ok(resolved);
            }
        }
        let (addrs, until, partial) = match &backend.lookup {
            // Boxed, as the lookups are large futures and rare (a name not
            // kept): inline, their room would be in every request's state,
            // moved at each await, a name kept or not.
            Lookup::Dns(r, _) => {
                let (addrs, until, partial) =
                    Box::pin(self.resolve_dns(r, host, port, timeout, both)).await?;
                (addrs, Some(until), partial)
            }
            // getaddrinfo gives the A records alone when the AAAA query
            // times out (glibc): one family may be missing when only one
            // came.
            Lookup::System => {
                let addrs = Box::pin(lookup(host, port, timeout)).await?;
                let v4 = addrs.iter().filter(|a| a.is_ipv4()).count();
                let partial = v4 == 0 || v4 == addrs.len();
                (addrs, None, partial)
            }
        };
        let addrs = capped(addrs);
        if cached {
            // The records' own time (hickory's answer), at most the cap;
            // getaddrinfo tells none: the cap (a year at most, so that
            // `--dns-cache-ttl 1000y` cannot overflow the clock).
            let now = Instant::now();
            let cap = now + self.ttl.min(Duration::from_secs(365 * 86_400));
            let until = until.map_or(cap, |u| u.min(cap));
            if until > now {
                answers.put(host, &addrs, until, partial);
            }
        }
        Ok((addrs, partial))
    }

    async fn resolve_dns(
        &self,
        resolver: &TokioResolver,
        host: &str,
        port: u16,
        timeout: Duration,
        both: bool,
    ) -> Result<(Vec<SocketAddr>, Instant, bool), ProxyError> {
        // A name with a dot is absolute: no search domains tried first.
        let name = match host.contains('.') && !host.ends_with('.') {
            true => format!("{host}."),
            false => host.to_string(),
        };
        // (`within`: a slow lookup has the fast path watch its client.)
        let (v4, v6) = match crate::h1::within(timeout, both_families(resolver, &name, both))
            .await
            .ok_or(())
        {
            Ok(answers) => answers,
            Err(_) => {
                return Err(ProxyError::DnsTimeout {
                    host: host.to_string(),
                    timeout: Some(timeout),
                })
            }
        };
        let now = Instant::now();
        let mut addrs = Vec::new();
        let mut until: Option<Instant> = None;
        // Why a family gave no address: `None` if it had records, or none
        // (so the answer of the other is good for its whole time).
        let mut failed: Option<hickory_resolver::net::NetError> = None;
        let mut one_family_only = false;
        for answer in [v4, v6] {
            match answer {
                Some(Ok(lookup)) => {
                    let lookup = hickory_resolver::lookup_ip::LookupIp::from(lookup);
                    addrs.extend(
                        lookup
                            .iter()
                            .map(|ip| SocketAddr::new(ip.to_canonical(), port)),
                    );
                    until =
                        Some(until.map_or(lookup.valid_until(), |u| u.min(lookup.valid_until())));
                }
                Some(Err(e)) if e.is_no_records_found() => {}
                Some(Err(e)) => {
                    one_family_only = true;
                    failed = failed.or(Some(e));
                }
                // Not answered within ONE_FAMILY_WAIT of the other.
                None => one_family_only = true,
            }
        }
        if addrs.is_empty() {
            return Err(match failed {
                Some(e) => dns_error(host, e),
                None => ProxyError::DnsEmpty {
                    host: host.to_string(),
                },
            });
        }
        // Good for the records' time; with the other family failed or not
        // come (rather than known to have none), for ONE_FAMILY_TTL at most.
        let until = until.unwrap_or(now);
        let until = match one_family_only {
            true => until.min(now + ONE_FAMILY_TTL),
            false => until,
        };
        Ok((addrs, until, one_family_only))
    }
}

/// How long a name's other family is waited for once one family answered
/// with addresses (RFC 8305's resolution delay is 50 ms): a server that
/// never answers AAAA queries (some middleboxes drop them) cost each
/// lookup the resolver's whole timeout, 5 s a try, and a 504 when the
/// tries outlasted the connect timeout.
const ONE_FAMILY_WAIT: Duration = Duration::from_millis(100);

/// The A and the AAAA lookups of `name`, asked at once; `None` for a
/// family not answered within [`ONE_FAMILY_WAIT`] of the other's
/// addresses (`wait_both`: each waited for as long as it takes).
async fn both_families(
    resolver: &TokioResolver,
    name: &str,
    wait_both: bool,
) -> (
    Option<Result<hickory_resolver::lookup::Lookup, hickory_resolver::net::NetError>>,
    Option<Result<hickory_resolver::lookup::Lookup, hickory_resolver::net::NetError>>,
) {
    let v4 = resolver.ipv4_lookup(name);
    let v6 = resolver.ipv6_lookup(name);
    tokio::pin!(v4, v6);
    let (mut a, mut b) = (None, None);
    while a.is_none() || b.is_none() {
        let answered = |r: &Option<Result<_, _>>| matches!(r, Some(Ok(_)));
        if !wait_both && (answered(&a) || answered(&b)) {
            // One family has addresses: the other gets a moment more.
            let rest = async {
                match a.is_none() {
                    true => a = Some(v4.as_mut().await),
                    false => b = Some(v6.as_mut().await),
                }
            };
            let _ = tokio::time::timeout(ONE_FAMILY_WAIT, rest).await;
            break;
        }
        tokio::select! {
            r = v4.as_mut(), if a.is_none() => a = Some(r),
            r = v6.as_mut(), if b.is_none() => b = Some(r),
        }
    }
    (a, b)
}

/// What a failed lookup tells the client: no records (502 `dns_error`,
/// "no address"), the servers' silence (504 `dns_timeout`, as when rotor's
/// own timer ends it: the resolver's timeouts and attempts, from
/// resolv.conf, may end it first), a server that failed (SERVFAIL) or
/// could not be reached (504 `dns_timeout`, as `--resolver system` tells
/// glibc's `EAI_AGAIN`, which covers both: the same failure is one answer
/// whichever resolver asked), or another failure (502).
fn dns_error(host: &str, e: hickory_resolver::net::NetError) -> ProxyError {
    use hickory_resolver::net::{DnsError, NetError};
    use hickory_resolver::proto::op::ResponseCode;
    let host = host.to_string();
    match e {
        e if e.is_no_records_found() => ProxyError::DnsEmpty { host },
        NetError::Timeout => ProxyError::DnsTimeout {
            host,
            timeout: None,
        },
        e @ (NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail))
        | NetError::Io(_)
        | NetError::NoConnections
        | NetError::Busy) => ProxyError::DnsAgain {
            host,
            source: io::Error::other(e),
        },
        e => ProxyError::Dns {
            host,
            source: io::Error::other(e),
        },
    }
}

const HOSTS: &str = "/etc/hosts";

/// The names of a hosts file and their addresses, in the file's order,
/// IPv4 first, as the resolver answers names it asks (a name listed with
/// `::1` first had plain requests lease IPv6 and its sticky sessions
/// IPv4).
#[derive(Debug, Default)]
struct Hosts(HashMap<String, Vec<IpAddr>>);

impl Hosts {
    /// `path`'s names; none if it cannot be read.
    fn read(path: &Path) -> Hosts {
        Hosts::parse(&std::fs::read_to_string(path).unwrap_or_default())
    }

    fn parse(text: &str) -> Hosts {
        let mut names: HashMap<String, Vec<IpAddr>> = HashMap::default();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("");
            let mut words = line.split_whitespace();
            let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) else {
                continue;
            };
            for name in words {
                let ips = names.entry(name.to_ascii_lowercase()).or_default();
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
        for ips in names.values_mut() {
            ips.sort_by_key(IpAddr::is_ipv6);
        }
        Hosts(names)
    }

    fn get(&self, host: &str) -> Option<&Vec<IpAddr>> {
        self.0.get(&*lower(host.trim_end_matches('.')))
    }
}

/// The in-process resolver: `servers` (UDP, then TCP for truncated
/// answers), or the system's configuration; `/etc/hosts` first; answers
/// kept for their TTL, at most `max_ttl`.
fn dns_resolver(
    servers: &[SocketAddr],
    max_ttl: Duration,
) -> Result<TokioResolver, hickory_resolver::net::NetError> {
    let mut builder = if servers.is_empty() {
        TokioResolver::builder_tokio()?
    } else {
        let name_servers = servers
            .iter()
            .map(|s| {
                let mut udp = ConnectionConfig::udp();
                udp.port = s.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = s.port();
                NameServerConfig::new(s.ip(), true, vec![udp, tcp])
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(name_servers),
            TokioRuntimeProvider::default(),
        )
    };
    let opts = builder.options_mut();
    opts.use_hosts_file = ResolveHosts::Always;
    opts.cache_size = if max_ttl.is_zero() {
        0
    } else {
        DNS_CACHE_RECORDS
    };
    opts.positive_max_ttl = Some(max_ttl);
    opts.negative_max_ttl = Some(max_ttl);
    builder.build()
}

/// `host` lower-cased, copied only if it has capitals (the request path
/// lower-cases its host already).
fn lower(host: &str) -> std::borrow::Cow<'_, str> {
    match host.bytes().any(|b| b.is_ascii_uppercase()) {
        true => host.to_ascii_lowercase().into(),
        false => host.into(),
    }
}

/// The address `host` spells, if it is an IP literal (`192.0.2.1`,
/// `[2001:db8::1]`): no lookup needed.
/// An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`) is the IPv4 address
/// it carries: connected to as such, from an IPv4 lease (from an IPv6
/// source the kernel refuses it), and refused with an IPv4-only pool only
/// when that pool is empty.
pub fn ip_literal(host: &str) -> Option<IpAddr> {
    unbracketed(host)
        .parse::<IpAddr>()
        .ok()
        .map(|ip| ip.to_canonical())
}

/// Whether `host` (as a target names it) is one spelling only of what it
/// names: a bracketed host must be an IPv6 address, and a host ending in
/// a number (its last label all digits, or `0x` and hex: WHATWG's rule)
/// an IPv4 address in dotted decimal. The C library reads `2130706433`,
/// `0x7f.1` or `0177.0.0.1` as 127.0.0.1, and `[example.com]` as
/// `example.com`: each spelling would be a site of its own, its budget
/// and cooldowns dodged (the address is checked against the rules
/// whatever it is spelled). Refused, as the in-process resolver finds
/// no such names either. A host longer than any name ([`MAX_NAME`]) is
/// refused too.
pub fn check_spelling(host: &str) -> Result<(), ProxyError> {
    if host.len() > MAX_NAME {
        return Err(name_too_long());
    }
    if let Some(inner) = host.strip_prefix('[') {
        let v6 = inner
            .strip_suffix(']')
            .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
        return match v6 {
            true => Ok(()),
            false => Err(ProxyError::BadRequest(
                "a bracketed host must be an IPv6 address".into(),
            )),
        };
    }
    if rotor_protocol::numeric_not_dotted(host) {
        return Err(ProxyError::BadRequest(
            "a host ending in a number must be an IPv4 address in dotted decimal (a.b.c.d)".into(),
        ));
    }
    Ok(())
}

/// The first [`MAX_ADDRS_PER_FAMILY`] addresses of each family, in order.
fn capped(mut addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    if addrs.len() > MAX_ADDRS_PER_FAMILY {
        let mut seen = [0; 2];
        addrs.retain(|a| {
            let n = &mut seen[usize::from(a.is_ipv6())];
            *n += 1;
            *n <= MAX_ADDRS_PER_FAMILY
        });
    }
    addrs
}

/// The longest destination name taken (RFC 1035: 253 bytes as text, and
/// a final dot): no DNS name is longer, and getaddrinfo reads a 60 000-byte
/// run of zeros and an address as that address, each spelling kept in the
/// cache (10 000 of them). Refused by [`check_spelling`], where a target
/// is parsed (HTTP, SOCKS5).
pub const MAX_NAME: usize = 254;

/// A target whose host is longer than any name.
#[cold]
fn name_too_long() -> ProxyError {
    ProxyError::BadRequest(format!("the target's host is longer than {MAX_NAME} bytes"))
}

/// getaddrinfo calls under way at once, in each worker. Each holds a
/// thread of the runtime's blocking pool for as long as it takes, however
/// soon its request gave up: a name whose servers never answer holds one
/// for glibc's own timeouts (5 s a try and a server). Unbounded, clients
/// asking for such names filled the pool's 512 threads, and every other
/// lookup, and every password check (argon2 runs there too), waited behind
/// them.
const SYSTEM_LOOKUPS: usize = 64;
static LOOKUPS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(SYSTEM_LOOKUPS);

/// Resolves `host:port` with getaddrinfo (uncached; IP literals are
/// answered before it, by [`Resolver::resolve`]).
async fn lookup(host: &str, port: u16, timeout: Duration) -> Result<Vec<SocketAddr>, ProxyError> {
    let bare = unbracketed(host);
    let lookup = async {
        // The place is held by the call itself, to its end.
        let place = LOOKUPS.acquire().await.map_err(io::Error::other)?;
        let name = bare.to_string();
        tokio::task::spawn_blocking(move || {
            let _place = place;
            std::net::ToSocketAddrs::to_socket_addrs(&(name.as_str(), port))
        })
        .await
        .map_err(io::Error::other)?
    };
    let addrs: Vec<SocketAddr> = match crate::h1::within(timeout, lookup).await.ok_or(()) {
        Ok(Ok(a)) => a
            // An IPv4-mapped answer is its IPv4 address; an IPv6 one
            // keeps its scope (a link-local answer, mDNS's, connects only
            // with it).
            .map(|a| match a {
                SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_none() => a,
                a => SocketAddr::new(a.ip().to_canonical(), a.port()),
            })
            .collect(),
        // The C library's temporary failure (`EAI_AGAIN`: no server
        // answered, or one answered SERVFAIL): a 504 `dns_timeout`, as the
        // DNS resolver's timeout is, not an answer that the name has no
        // address.
        Ok(Err(source)) if is_eai_again(&source) => {
            return Err(ProxyError::DnsAgain {
                host: bare.to_string(),
                source,
            })
        }
        Ok(Err(source)) => {
            return Err(ProxyError::Dns {
                host: bare.to_string(),
                source,
            })
        }
        Err(_) => {
            return Err(ProxyError::DnsTimeout {
                host: bare.to_string(),
                timeout: Some(timeout),
            })
        }
    };
    if addrs.is_empty() {
        return Err(ProxyError::DnsEmpty {
            host: bare.to_string(),
        });
    }
    Ok(addrs)
}

/// Whether getaddrinfo's error, as the standard library reports it, is
/// `EAI_AGAIN` (a temporary failure: no server answered, or SERVFAIL). The standard
/// library keeps no code, only `gai_strerror`'s text after its own prefix:
/// compared with that same function's text, in the same locale.
fn is_eai_again(e: &io::Error) -> bool {
    let again = crate::os::gai_strerror(libc::EAI_AGAIN);
    !again.is_empty() && e.to_string().ends_with(&again)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv6 answer of the C library keeps its scope (a link-local one
    /// connects only with it); an IPv4-mapped one is its IPv4 address.
    #[tokio::test]
    async fn the_system_lookup_keeps_an_ipv6_scope() {
        let lo = nix::net::if_::if_nametoindex("lo").unwrap();
        let got = lookup("fe80::1%lo", 80, Duration::from_secs(5))
            .await
            .unwrap();
        match got[..] {
            [SocketAddr::V6(a)] => assert_eq!(a.scope_id(), lo, "{a}"),
            _ => panic!("{got:?}"),
        }
        let got = lookup("::ffff:127.0.0.9", 80, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got, [SocketAddr::from(([127, 0, 0, 9], 80))]);
    }

    /// A name whose servers did not answer (getaddrinfo's `EAI_AGAIN`) is
    /// a DNS timeout; one that has no address is not.
    #[test]
    fn the_c_librarys_temporary_failure_is_a_timeout() {
        // What std makes of getaddrinfo's failure: its prefix and
        // gai_strerror's text.
        let text = |code| {
            io::Error::other(format!(
                "failed to lookup address information: {}",
                crate::os::gai_strerror(code)
            ))
        };
        assert!(is_eai_again(&text(libc::EAI_AGAIN)));
        assert!(!is_eai_again(&text(libc::EAI_NONAME)));
        assert!(!is_eai_again(&text(libc::EAI_FAIL)));
        assert!(!is_eai_again(&io::Error::other("refused")));
    }

    /// getaddrinfo calls are bounded: with every place taken (calls
    /// stuck on servers that never answer), a lookup waits for one within
    /// its timeout, then is a DNS timeout; it is made once one frees.
    #[tokio::test]
    async fn system_lookups_wait_for_a_place() {
        let all = LOOKUPS.acquire_many(SYSTEM_LOOKUPS as u32).await.unwrap();
        let got = lookup("localhost", 80, Duration::from_millis(100)).await;
        assert!(matches!(got, Err(ProxyError::DnsTimeout { .. })), "{got:?}");
        let later = tokio::spawn(lookup("localhost", 80, Duration::from_secs(5)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(all);
        let got = later.await.unwrap().unwrap();
        assert!(got.iter().all(|a| a.ip().is_loopback()), "{got:?}");
    }

    #[tokio::test]
    async fn system_names_are_cached_and_literals_are_not() {
        let cache = Resolver::new(&ResolverChoice::System, Duration::from_secs(30));
        let backend = cache.current();
        assert!(matches!(backend.lookup, Lookup::System));
        let entries = &backend.answers.0;
        // `localhost` comes from /etc/hosts: no query leaves the machine.
        let a = cache
            .resolve("localhost", 80, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(a.iter().all(|s| s.ip().is_loopback()), "{a:?}");
        assert_eq!(entries.lock().unwrap().len(), 1);
        let b = cache
            .resolve("LOCALHOST", 80, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(entries.lock().unwrap().len(), 1);
        cache
            .resolve("127.0.0.1", 80, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(entries.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn the_dns_resolver_answers_hosts_file_names_without_a_server() {
        // Port 9 (discard): nothing answers there; /etc/hosts must.
        let servers = vec!["127.0.0.1:9".parse().unwrap()];
        let cache = Resolver::new(&ResolverChoice::Dns { servers }, Duration::from_secs(30));
        assert!(matches!(cache.current().lookup, Lookup::Dns(..)));
        let a = cache
            .resolve("localhost", 80, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(
            !a.is_empty() && a.iter().all(|s| s.ip().is_loopback()),
            "{a:?}"
        );
        assert!(a.iter().all(|s| s.port() == 80));
        // No caching at all (`--dns-cache-ttl 0s`) still resolves.
        let servers = vec!["127.0.0.1:9".parse().unwrap()];
        let uncached = Resolver::new(&ResolverChoice::Dns { servers }, Duration::ZERO);
        for _ in 0..2 {
            let b = uncached
                .resolve("localhost", 81, Duration::from_secs(5))
                .await
                .unwrap();
            assert!(!b.is_empty() && b.iter().all(|s| s.port() == 81), "{b:?}");
        }
    }

    #[test]
    fn answers_are_kept_until_they_expire_by_name_for_any_port_and_bounded() {
        let answers = Answers::default();
        let now = Instant::now();
        let a: SocketAddr = "192.0.2.1:80".parse().unwrap();
        answers.put("Example.COM", &[a], now + Duration::from_secs(3600), false);
        assert_eq!(
            answers.get("example.com", 443),
            Some((vec!["192.0.2.1:443".parse().unwrap()], false))
        );
        assert_eq!(answers.get("EXAMPLE.com", 80), Some((vec![a], false)));
        // Whether a family may be missing is kept with them.
        answers.put("half.example", &[a], now + Duration::from_secs(2), true);
        assert_eq!(answers.get("half.example", 80), Some((vec![a], true)));
        assert_eq!(answers.get("example.org", 80), None);
        // A link-local address keeps its scope (getaddrinfo gives one).
        let scoped = SocketAddr::V6(std::net::SocketAddrV6::new(
            "fe80::1".parse().unwrap(),
            80,
            0,
            2,
        ));
        answers.put(
            "local.example",
            &[scoped],
            now + Duration::from_secs(60),
            false,
        );
        match answers.get("local.example", 8080).map(|r| r.0).as_deref() {
            Some([SocketAddr::V6(a)]) => assert_eq!((a.port(), a.scope_id()), (8080, 2)),
            other => panic!("{other:?}"),
        }
        // (From the clock now, not the test's start: a loaded machine may
        // have spent the margin already.)
        let soon = Instant::now() + Duration::from_millis(200);
        answers.put("soon.example", &[a], soon, false);
        assert!(answers.get("soon.example", 80).is_some());
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(answers.get("soon.example", 80), None, "expired");
        // Full: the expired go first; full of live ones, an eighth.
        for i in 0..MAX_NAMES - 4 {
            answers.put(&format!("n{i}"), &[a], now, false);
        }
        assert_eq!(answers.len(), MAX_NAMES);
        answers.put("new.example", &[a], now + Duration::from_secs(60), false);
        assert_eq!(
            answers.len(),
            4,
            "example.com, half.example, local.example and new.example"
        );
        for i in 0..MAX_NAMES - 4 {
            answers.put(&format!("n{i}"), &[a], now + Duration::from_secs(60), false);
        }
        answers.put("last.example", &[a], now + Duration::from_secs(60), false);
        assert_eq!(answers.len(), MAX_NAMES - MAX_NAMES / 8 + 1);
        assert!(answers.get("last.example", 80).is_some());
    }

    #[test]
    fn a_huge_answer_is_cut_to_its_first_addresses_of_each_family() {
        let v4 =
            (0..4000u32).map(|i| SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + i), 80)));
        let v6 = (0..100u16).map(|i| {
            SocketAddr::from((std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i), 80))
        });
        let all: Vec<SocketAddr> = v4
            .clone()
            .take(10)
            .chain(v6.clone())
            .chain(v4.clone().skip(10))
            .collect();
        let got = capped(all);
        let want: Vec<SocketAddr> = v4
            .clone()
            .take(10)
            .chain(v6.take(MAX_ADDRS_PER_FAMILY))
            .chain(v4.skip(10).take(MAX_ADDRS_PER_FAMILY - 10))
            .collect();
        assert_eq!(got, want);
        let few: Vec<SocketAddr> = (0..3u32)
            .map(|i| SocketAddr::from((std::net::Ipv4Addr::from(i), 1)))
            .collect();
        assert_eq!(capped(few.clone()), few);
    }

    #[test]
    fn a_resolver_timeout_is_a_dns_timeout() {
        // The resolver's own timeouts, not rotor's: no duration claimed.
        let e = dns_error("example.com", hickory_resolver::net::NetError::Timeout);
        assert!(
            matches!(e, ProxyError::DnsTimeout { timeout: None, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("did not answer"), "{e}");
        let e = dns_error("example.com", hickory_resolver::net::NetError::from("odd"));
        assert!(matches!(e, ProxyError::Dns { .. }), "{e}");
    }

    #[tokio::test]
    async fn ip_literals_skip_dns() {
        // Port 9 (discard): no DNS server answers there; none is asked.
        let servers = vec!["127.0.0.1:9".parse().unwrap()];
        let dns = Resolver::new(&ResolverChoice::Dns { servers }, Duration::from_secs(30));
        let system = Resolver::new(&ResolverChoice::System, Duration::from_secs(30));
        for r in [&dns, &system] {
            let a = r
                .resolve("[::1]", 80, Duration::from_secs(1))
                .await
                .unwrap();
            assert_eq!(a, vec!["[::1]:80".parse().unwrap()]);
            let a = r.resolve("192.0.2.1", 81, Duration::from_secs(1)).await;
            assert_eq!(a.unwrap(), vec!["192.0.2.1:81".parse().unwrap()]);
            // The IPv4-mapped form is the IPv4 address.
            let a = r
                .resolve("[::ffff:192.0.2.1]", 81, Duration::from_secs(1))
                .await;
            assert_eq!(a.unwrap(), vec!["192.0.2.1:81".parse().unwrap()]);
        }
        let (dns, system) = (dns.current(), system.current());
        assert!(matches!(
            (&dns.lookup, &system.lookup),
            (Lookup::Dns(..), Lookup::System)
        ));
        assert_eq!(
            (dns.answers.len(), system.answers.len()),
            (0, 0),
            "literals are not kept"
        );
    }

    /// As the C library does: a name of the hosts file gets exactly the
    /// addresses the file lists (`localhost` with one line for 127.0.0.1
    /// is not also `::1`).
    #[test]
    fn hosts_file_names_get_exactly_their_lines() {
        let h = Hosts::parse(
            "127.0.0.1 localhost\n# c\n10.0.0.1 Db db.example # tail\n10.0.0.2 db\nbad line\n::1 both\n127.0.0.9 both\n",
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(h.get("localhost"), Some(&vec![ip("127.0.0.1")]));
        assert_eq!(h.get("LOCALHOST."), Some(&vec![ip("127.0.0.1")]));
        assert_eq!(h.get("db"), Some(&vec![ip("10.0.0.1"), ip("10.0.0.2")]));
        assert_eq!(h.get("db.example"), Some(&vec![ip("10.0.0.1")]));
        // IPv4 first, as the resolver answers.
        assert_eq!(h.get("both"), Some(&vec![ip("127.0.0.9"), ip("::1")]));
        assert_eq!(h.get("c"), None);
        assert_eq!(h.get("line"), None);
    }
}
