//! The allocator's settings: where the pool comes from, how often it is
//! re-read, where rotation state is kept, who may use the socket.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use rotor_allocator::access::{parse_group, parse_mode, parse_user, Access};
use rotor_allocator::metadata::{Metadata, Provider};
use rotor_allocator::source::{parse_mac, Source};

use super::settings::{settings, Value};
use super::{CommonArgs, ConfigError, FileConfig};

settings! {
    /// The allocator's settings; `rotor up` passes them on.
    pub struct AllocatorFlags, file AllocatorFile, resolved Allocator {
        /// Pool addresses: one address, a range (127.0.0.2-127.0.0.9), a CIDR
        /// (192.0.2.0/29) or a comma list of these. Repeatable. With none of
        /// --pool, --pool-file, --interface, --metadata and --pool-command,
        /// the pool is the host's own global addresses; any of them as
        /// flags replaces all of the file's sources.
        #[arg(value_name = "SPEC")]
        pool: Vec<String>,
        /// A file of SPECs, one a line, `#` comments; re-read on every
        /// refresh. Repeatable.
        pool_file: Vec<PathBuf>,
        /// The addresses currently on an interface, by name (eth0) or MAC
        /// address (02:fc:00:00:00:01); re-read on every refresh. Repeatable.
        #[arg(value_name = "NAME|MAC")]
        interface: Vec<String>,
        /// Addresses the cloud's instance metadata service lists for this
        /// host's interfaces: `aws` (IMDSv2), `gcp` or `azure`; re-read on
        /// every refresh. Repeatable.
        metadata: Vec<Provider>,
        /// Where the metadata service is (a test server, a proxy)
        /// [default: each provider's own address].
        #[arg(value_name = "URL")]
        metadata_endpoint: Option<String>,
        /// Only the interfaces with this MAC address (any notation)
        /// [default: every interface the service lists]. Repeatable.
        #[arg(value_name = "MAC")]
        metadata_mac: Vec<String>,
        /// A command (run with `sh -c`) that prints SPECs, one a line, on
        /// every refresh: a source for any other provider. Repeatable.
        #[arg(value_name = "CMD")]
        pool_command: Vec<String>,
        /// How long a --pool-command may run before it is killed and its
        /// last good addresses kept.
        pool_command_timeout: Option<Duration> = "10s",
        /// Most sticky sessions held (`USER-session-ID` usernames); past it
        /// the oldest goes first.
        max_sessions: Option<usize> = "100000",
        /// Most sticky sessions one user holds [default: --max-sessions];
        /// past it the user's own oldest goes first, so one user cannot
        /// push out everyone else's.
        #[arg(value_name = "N")]
        max_sessions_per_user: Option<usize>,
        /// A budget per source address for a site: at most COUNT requests
        /// started per PERIOD by each address, an IPv6 one by its
        /// --site-v6-prefix (`example.com=60/1m`,
        /// `127.0.0.1=5/1s`; `*=N/PERIOD` for every site not named). SITE
        /// is a registrable domain (it covers its subdomains) or an
        /// address. Repeatable.
        #[arg(value_name = "SITE=N/PERIOD")]
        site_limit: Vec<SiteLimitSpec>,
        /// Most entries of per-site state (sites, and (address, site)
        /// pairs with a budget used or a cooldown) held; past it the least
        /// recently used sites are forgotten, those asked once first.
        max_site_entries: Option<usize> = "400000",
        /// IPv6 sources count as one per prefix of this length for site
        /// budgets and cooldowns: sites count an IPv6 client by its /64,
        /// so a /64 pool is one source to them (128: each address).
        #[arg(value_name = "LEN")]
        site_v6_prefix: Option<u8> = "64",
        /// How long a pool entry is taken out of the rotation when its
        /// connects keep failing, to two destination networks or more, where other
        /// entries' are answered (an address the provider no longer routes
        /// here): then it is tried again, and out for twice as long (to 1h,
        /// or this if longer) if they fail again; 0s: never taken out for
        /// it.
        unreachable_quarantine: Option<Duration> = "1m",
        /// Most connections to the allocator's socket at once (workers,
        /// `rotor` commands); past it a new one is refused with a reason.
        /// Each may hold a frame's room (4 MiB) while it sends one.
        max_peers: Option<usize> = "512",
        /// How often the sticky sessions and the site state are written to
        /// the state directory while they change, so that an allocator
        /// that dies (SIGKILL, a crash) is followed by one that has them,
        /// as old as this at most; 0s: only at a clean stop.
        checkpoint: Option<Duration> = "30s",
        /// Serve the host's metrics (every worker's, added up) for
        /// Prometheus at `GET /metrics` on this address, e.g.
        /// 127.0.0.1:9464.
        #[arg(value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
        /// Pool entries with series of their own in the metrics (the
        /// `source` label: 14 series each); past it, in pool order, they
        /// are summed as `other`. A pool of single addresses (a /16 is 65
        /// 536) made a scrape of a million series.
        #[arg(value_name = "N")]
        metrics_max_sources: Option<usize> = "10000",
        /// A file holding the token (16 or more characters) of the admin
        /// API on the metrics listener (`POST /admin/quarantine`, `POST
        /// /admin/release` with `Authorization: Bearer TOKEN`); without
        /// it the API is off.
        #[arg(value_name = "PATH")]
        admin_token_file: Option<PathBuf>,
        /// How often the pool sources are re-read (SIGHUP re-reads at once).
        refresh: Option<Duration> = "20s",
        /// Where the rotation state is kept across restarts [default:
        /// $STATE_DIRECTORY (systemd's), else /var/lib/rotor for root,
        /// else $XDG_STATE_HOME/rotor, ~/.local/state/rotor without it,
        /// /tmp/rotor-UID/state without $HOME].
        #[arg(value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Keep no rotation state: a restarted allocator starts from the
        /// first address.
        #[arg(conflicts_with = "state_dir")]
        no_state: Option<bool>,
        /// Mode of the socket file, octal.
        #[arg(value_name = "MODE")]
        socket_mode: Option<FileMode> = "660",
        /// Group of the socket file; its members are served [default: the
        /// allocator's group].
        #[arg(value_name = "GROUP")]
        socket_group: Option<String>,
        /// Also serve this user (name or uid); root and the allocator's own
        /// user always are. Repeatable.
        #[arg(value_name = "USER")]
        allow_uid: Vec<String>,
        /// Also serve peers in this group (name or gid; their primary group
        /// or a supplementary one). Repeatable.
        #[arg(value_name = "GROUP")]
        allow_gid: Vec<String>,
    }
}

/// A file mode in octal, as `chmod` takes it (`660`, `0o660`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMode(pub u32);

impl Value for FileMode {
    const NAME: &'static str = "MODE";
    const FROM_NUMBER: bool = false;
    fn parse(s: &str) -> Result<Self, String> {
        parse_mode(s).map(FileMode).map_err(|e| e.to_string())
    }
    fn show(&self) -> String {
        format!("{:o}", self.0)
    }
}

impl Value for Provider {
    const NAME: &'static str = "aws|gcp|azure";
    fn parse(s: &str) -> Result<Self, String> {
        Provider::parse(s)
    }
    fn show(&self) -> String {
        self.name().into()
    }
}

#[derive(Debug, Clone, Args)]
pub struct AllocatorArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub settings: AllocatorFlags,
}

#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub sources: Vec<Source>,
    pub refresh: Duration,
    pub state_dir: Option<PathBuf>,
    /// The state directory was given (a flag, the file), not the default:
    /// one that cannot be used is refused, not run without.
    pub state_given: bool,
    pub max_sessions: usize,
    pub max_sessions_per_user: usize,
    pub site_rules: rotor_allocator::sites::Rules,
    pub max_site_entries: usize,
    pub unreachable_quarantine: Duration,
    pub checkpoint: Duration,
    pub max_peers: usize,
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub metrics_max_sources: usize,
    pub admin_token: Option<Arc<rotor_allocator::metrics::AdminToken>>,
}

/// One `--site-limit`, checked as it is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteLimitSpec(pub String);

impl Value for SiteLimitSpec {
    const NAME: &'static str = "SITE=N/PERIOD";
    fn parse(s: &str) -> Result<Self, String> {
        rotor_allocator::sites::Rules::parse(&[s.to_string()])?;
        Ok(SiteLimitSpec(s.to_string()))
    }
    fn show(&self) -> String {
        self.0.clone()
    }
}

/// The most `--max-peers` takes.
const MAX_PEERS: usize = 65_536;

impl AllocatorFlags {
    /// The pool's sources, refresh and state directory.
    pub fn pool(&self, file: &FileConfig) -> Result<PoolSettings, ConfigError> {
        let mut a = self.merge(&file.allocator);
        // The flags replace the file's sources as a whole, so a one-off
        // `--pool` does not mix with the file's pool.
        let flags_given = !(self.pool.is_empty()
            && self.pool_file.is_empty()
            && self.interface.is_empty()
            && self.metadata.is_empty()
            && self.pool_command.is_empty());
        if flags_given {
            a.pool = self.pool.clone();
            a.pool_file = self.pool_file.clone();
            a.interface = self.interface.clone();
            a.metadata = self.metadata.clone();
            a.pool_command = self.pool_command.clone();
            // What qualifies the file's metadata source goes with it.
            a.metadata_mac = self.metadata_mac.clone();
            if self.metadata_endpoint.is_none() {
                a.metadata_endpoint = None;
            }
        }
        let mut sources = Vec::new();
        for spec in &a.pool {
            // Which of the two it came from: the same text for both left
            // an operator to guess.
            let named = match flags_given {
                true => "--pool",
                false => "the configuration file's allocator.pool",
            };
            let list = Source::list(spec).map_err(|e| {
                ConfigError::Invalid(format!(
                    "invalid pool specification `{spec}` in {named}: {}",
                    rotor_protocol::error_chain(&e)
                ))
            })?;
            sources.push(list);
        }
        sources.extend(a.pool_file.into_iter().map(Source::File));
        // (An empty name was taken, and its source failed at every refresh.)
        if a.interface.iter().any(|i| i.trim().is_empty()) {
            return Err(ConfigError::Invalid(
                "interface: an empty name (give a name, eth0, or a MAC address)".into(),
            ));
        }
        sources.extend(a.interface.iter().map(|i| Source::interface(i)));
        let mut macs = Vec::new();
        for m in &a.metadata_mac {
            macs.push(parse_mac(m).ok_or_else(|| {
                ConfigError::Invalid(format!("metadata-mac: `{m}` is not a MAC address"))
            })?);
        }
        if a.metadata_endpoint.is_some() && a.metadata.is_empty() {
            return Err(ConfigError::Invalid(
                "metadata-endpoint is where --metadata asks; give a provider".into(),
            ));
        }
        if !macs.is_empty() && a.metadata.is_empty() {
            return Err(ConfigError::Invalid(
                "metadata-mac chooses interfaces of --metadata; give a provider".into(),
            ));
        }
        for p in &a.metadata {
            let endpoint = a.metadata_endpoint.as_deref();
            if let Some(e) = endpoint.filter(|e| !e.starts_with("http://")) {
                return Err(ConfigError::Invalid(format!(
                    "metadata-endpoint `{e}`: metadata services speak plain http:// on the host's link"
                )));
            }
            sources.push(Source::Metadata(Arc::new(Metadata::new(
                *p,
                endpoint,
                macs.clone(),
            ))));
        }
        if !a.pool_command.is_empty() && a.pool_command_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "pool-command-timeout must be longer than 0s".into(),
            ));
        }
        sources.extend(a.pool_command.iter().map(|cmd| Source::Command {
            cmd: cmd.clone(),
            timeout: a.pool_command_timeout,
        }));
        if sources.is_empty() {
            sources.push(Source::HostAddresses);
        }
        if a.max_peers == 0 {
            return Err(ConfigError::Invalid(
                "max-peers must be 1 or more: the workers connect to the socket".into(),
            ));
        }
        // (Past tokio's semaphore bound, 2^61, the allocator panicked after
        // it said it was ready.)
        if a.max_peers > MAX_PEERS {
            return Err(ConfigError::Invalid(format!(
                "max-peers is at most {MAX_PEERS}: each is a file descriptor, and may hold a frame's 4 MiB"
            )));
        }
        // Below this, every source (a pool command, the metadata service)
        // would be read again back to back.
        if a.refresh < Duration::from_millis(100) {
            return Err(ConfigError::Invalid("refresh is at least 100ms".into()));
        }
        // A count is not silently made another.
        for (name, n, least) in [
            ("max-sessions", a.max_sessions, 1),
            (
                "max-sessions-per-user",
                a.max_sessions_per_user.unwrap_or(1),
                1,
            ),
            (
                "max-site-entries",
                a.max_site_entries,
                rotor_allocator::sites::MIN_ENTRIES,
            ),
        ] {
            if n < least {
                return Err(ConfigError::Invalid(format!("{name} is at least {least}")));
            }
        }
        // A flag wins over the file: `--state-dir` over the file's
        // `no-state`, `--no-state` over its `state-dir`.
        let no_state = match (&self.state_dir, self.no_state) {
            (_, Some(n)) => n,
            (Some(_), None) => false,
            (None, None) => match (a.no_state, &a.state_dir) {
                (Some(true), Some(dir)) => {
                    return Err(ConfigError::Invalid(format!(
                        "no-state and state-dir ({}) say the opposite: keep one",
                        dir.display()
                    )))
                }
                (no_state, _) => no_state.unwrap_or(false),
            },
        };
        let state_given = !no_state && a.state_dir.is_some();
        let state_dir = match no_state {
            true => None,
            false => Some(a.state_dir.unwrap_or_else(crate::paths::default_state_dir)),
        };
        Ok(PoolSettings {
            sources,
            refresh: a.refresh,
            state_dir,
            state_given,
            max_sessions: a.max_sessions.max(1),
            max_sessions_per_user: a
                .max_sessions_per_user
                .unwrap_or(a.max_sessions)
                .clamp(1, a.max_sessions.max(1)),
            site_rules: rotor_allocator::sites::Rules::parse(
                &a.site_limit.iter().map(|s| s.0.clone()).collect::<Vec<_>>(),
            )
            .and_then(|r| r.with_v6_prefix(a.site_v6_prefix))
            .map_err(ConfigError::Invalid)?,
            max_site_entries: a.max_site_entries,
            unreachable_quarantine: a.unreachable_quarantine,
            checkpoint: a.checkpoint,
            max_peers: a.max_peers,
            metrics_listen: a.metrics_listen,
            metrics_max_sources: a.metrics_max_sources,
            admin_token: match &a.admin_token_file {
                None => None,
                Some(_) if a.metrics_listen.is_none() => {
                    return Err(ConfigError::Invalid(
                        "admin-token-file: the admin API is served on metrics-listen; set it too"
                            .into(),
                    ))
                }
                Some(p) => Some(Arc::new(
                    rotor_allocator::metrics::AdminToken::load(p).map_err(ConfigError::Invalid)?,
                )),
            },
        })
    }

    /// Who may use the allocator's socket.
    pub fn access(&self, file: &FileConfig) -> Result<Access, ConfigError> {
        let a = self.merge(&file.allocator);
        let err = |e: rotor_allocator::access::AccessError| ConfigError::Invalid(e.to_string());
        Ok(Access {
            mode: a.socket_mode.0,
            group: a
                .socket_group
                .as_deref()
                .map(parse_group)
                .transpose()
                .map_err(err)?,
            uids: a
                .allow_uid
                .iter()
                .map(|u| parse_user(u))
                .collect::<Result<_, _>>()
                .map_err(err)?,
            gids: a
                .allow_gid
                .iter()
                .map(|g| parse_group(g))
                .collect::<Result<_, _>>()
                .map_err(err)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::file;
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Alloc {
        #[command(flatten)]
        args: AllocatorArgs,
    }

    fn flags(args: &[&str]) -> AllocatorFlags {
        Alloc::parse_from(std::iter::once("a").chain(args.iter().copied()))
            .args
            .settings
    }

    #[test]
    fn pool_flags_replace_the_files_sources() {
        let f = file("[allocator]\npool = [\"10.0.0.1\"]\nrefresh = \"5s\"\n").unwrap();
        let from_file = flags(&[]).pool(&f).unwrap();
        assert_eq!(from_file.sources.len(), 1);
        assert_eq!(from_file.refresh, Duration::from_secs(5));
        let given = flags(&["--pool", "127.0.0.2-127.0.0.3", "--interface", "lo"])
            .pool(&f)
            .unwrap();
        assert_eq!(given.sources.len(), 2);
        let err = flags(&["--pool", "10.0.0.0/33"]).pool(&f).unwrap_err();
        assert!(err.to_string().contains("`10.0.0.0/33` in --pool"), "{err}");
        // A bad value of the file's says it is the file's.
        let bad = file("[allocator]\npool = [\"10.0.0.1\", \"10.0.0.300\"]\n").unwrap();
        let err = flags(&[]).pool(&bad).unwrap_err().to_string();
        assert!(
            err.contains("`10.0.0.300` in the configuration file's allocator.pool"),
            "{err}"
        );
        assert!(flags(&["--refresh", "0s"]).pool(&f).is_err());
        assert!(flags(&["--interface", ""]).pool(&f).is_err());
        let err = flags(&["--max-peers", "2305843009213693952"])
            .pool(&f)
            .unwrap_err();
        assert!(
            err.to_string().contains("max-peers is at most 65536"),
            "{err}"
        );
        assert!(flags(&["--max-peers", "65536"]).pool(&f).is_ok());
        // Counts and intervals are refused, not silently made others.
        for (args, said) in [
            (&["--refresh", "50ms"][..], "refresh is at least 100ms"),
            (&["--max-sessions", "0"], "max-sessions is at least 1"),
            (
                &["--max-sessions-per-user", "0"],
                "max-sessions-per-user is at least 1",
            ),
            (
                &["--max-site-entries", "15"],
                "max-site-entries is at least 16",
            ),
        ] {
            match flags(args).pool(&f) {
                Err(ConfigError::Invalid(e)) => assert_eq!(e, said),
                other => panic!("{args:?}: {:?}", other.map(|_| ())),
            }
        }
        assert!(flags(&["--refresh", "100ms", "--max-site-entries", "16"])
            .pool(&f)
            .is_ok());
        // The file's metadata interfaces go with its metadata source.
        let meta =
            file("[allocator]\nmetadata = [\"aws\"]\nmetadata-mac = [\"02:fc:00:00:00:01\"]\n")
                .unwrap();
        assert_eq!(
            flags(&["--pool", "10.0.0.5"])
                .pool(&meta)
                .unwrap()
                .sources
                .len(),
            1
        );
        let cloud = flags(&[
            "--metadata",
            "aws",
            "--metadata-mac",
            "02FC00000001",
            "--pool-command",
            "echo 127.0.0.2",
        ])
        .pool(&f)
        .unwrap();
        assert_eq!(cloud.sources.len(), 2, "the file's pool is replaced");
        assert!(flags(&["--metadata-mac", "02:fc:00:00:00:01"])
            .pool(&f)
            .is_err());
        let f2 =
            file("[allocator]\nmetadata = [\"gcp\"]\nmetadata-endpoint = \"http://127.0.0.1:9\"\n")
                .unwrap();
        let p = flags(&[]).pool(&f2).unwrap();
        assert_eq!(p.sources[0].name(), "--metadata gcp (http://127.0.0.1:9)");
        assert!(file("[allocator]\nmetadata = [\"oracle\"]\n").is_err());
    }

    #[test]
    fn state_and_access_come_from_flags_or_the_file() {
        let f = file("[allocator]\nstate-dir = \"/tmp/x\"\nsocket-mode = \"600\"\n").unwrap();
        let p = flags(&[]).pool(&f).unwrap();
        assert_eq!(p.state_dir, Some(PathBuf::from("/tmp/x")));
        assert_eq!(flags(&["--no-state"]).pool(&f).unwrap().state_dir, None);
        let off = file("[allocator]\nno-state = true\n").unwrap();
        assert_eq!(flags(&[]).pool(&off).unwrap().state_dir, None);
        // Both in the file: which one was meant is not guessed.
        let both = file("[allocator]\nno-state = true\nstate-dir = \"/tmp/x\"\n").unwrap();
        let err = flags(&[]).pool(&both).unwrap_err().to_string();
        assert!(err.contains("no-state and state-dir"), "{err}");
        assert_eq!(flags(&["--no-state"]).pool(&both).unwrap().state_dir, None);
        assert_eq!(
            flags(&["--state-dir", "/tmp/y"])
                .pool(&off)
                .unwrap()
                .state_dir,
            Some(PathBuf::from("/tmp/y")),
            "the flag wins"
        );
        assert_eq!(flags(&[]).access(&f).unwrap().mode, 0o600);
        let none = FileConfig::default();
        assert_eq!(flags(&[]).access(&none).unwrap().mode, 0o660);
        assert!(Alloc::try_parse_from(["a", "--socket-mode", "999"]).is_err());
        // A wrong TOML type says what is expected.
        let e = rotor_protocol::error_chain(&file("[allocator]\nrefresh = 1.5\n").unwrap_err());
        assert!(e.contains("a string (as the flag takes it)"), "{e}");
        // A TOML number is decimal: refused, not read as another mode.
        let e =
            rotor_protocol::error_chain(&file("[allocator]\nsocket-mode = 0o660\n").unwrap_err());
        assert!(e.contains("as a string"), "{e}");
        assert_eq!(
            flags(&[])
                .access(&file("[allocator]\nsocket-mode = \"0o640\"\n").unwrap())
                .unwrap()
                .mode,
            0o640
        );
    }

    #[test]
    fn flags_given_are_passed_on_and_read_back_the_same() {
        let given = flags(&["--pool", "127.0.0.2", "--refresh", "90s", "--no-state"]);
        let args: Vec<String> = given
            .to_args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            ["--pool=127.0.0.2", "--refresh=1m 30s", "--no-state=true"]
        );
        let again = flags(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let p = again.pool(&FileConfig::default()).unwrap();
        assert_eq!((p.refresh, p.state_dir), (Duration::from_secs(90), None));
    }
}
