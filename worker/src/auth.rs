//! Proxy authentication: `Proxy-Authorization: Basic` checked against a
//! users file of argon2 password hashes (PHC strings, one `user:hash` a
//! line, `#` comments), as written by `rotor user add`.
//!
//! An argon2 check costs milliseconds of CPU by design, so it runs on the
//! blocking pool, and a credential that passed is remembered for a few
//! minutes: a client sends the same header with every request. An unknown
//! user costs the same check as a wrong password, so timing does not tell
//! which users exist. Credentials are never logged.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine;

/// How long a verified credential is trusted without a new argon2 check
/// after its last use (a user in use is never checked again until the
/// users file changes: under a flood of wrong passwords, which keeps every
/// argon2 slot busy, a check every 5 min made each active user wait 2 s
/// for a slot and get 503).
const REMEMBER: Duration = Duration::from_secs(300);
/// Most remembered credentials; past it the memory is cleared.
const REMEMBER_MAX: usize = 10_000;
/// Longest `Proxy-Authorization` value looked at.
const MAX_HEADER: usize = 1024;
/// How long a request waits for a free argon2 slot before it is refused.
pub const VERIFY_WAIT: Duration = Duration::from_secs(2);
/// How long credentials that failed are answered from memory, with no new
/// argon2 check (a client retrying a wrong password costs nothing).
const FAILED_REMEMBER: Duration = Duration::from_secs(60);
/// argon2 checks one client address may have in flight; its next ones
/// wait (up to VERIFY_WAIT), so a flood from one address holds one slot
/// and leaves the others to everyone else.
const PER_CLIENT: usize = 1;
/// The network a client's address is in, for a second, looser bound: a
/// flood spread over the /64s of one /48 (a host's customary IPv6 share)
/// or the addresses of one IPv4 /24 has at most half the argon2 slots.
const NETWORK_V4: u8 = 24;
const NETWORK_V6: u8 = 48;
/// Wrong passwords a client network may try before its next checks are
/// spaced out: then one every 100 ms, doubling with each failure up to
/// [`MOST_SPACING`] (a network guessing as fast as argon2 answers made
/// some 40 guesses a second a worker, without end). Credentials that
/// passed before are answered from memory, whatever the spacing.
const FREE_FAILURES: u32 = 10;
const MOST_SPACING: Duration = Duration::from_secs(30);
/// A network that has failed none for this long starts over.
const FAILURES_FORGOTTEN: Duration = Duration::from_secs(600);
/// Networks whose failures are counted, at most (past it the forgotten
/// go, then the oldest half).
const FAILING_MAX: usize = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("cannot read the users file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0}:{1}: expected `user:$argon2id$…` (write it with `rotor user add`)")]
    Line(PathBuf, usize),
    #[error("{0}:{1}: the password hash is not an argon2id PHC string (`$argon2id$…`; write it with `rotor user add`)")]
    Hash(PathBuf, usize),
    #[error("{0}:{2}: user `{1}` is listed again (first on line {3}): which password was meant is not guessed; keep one")]
    Twice(PathBuf, String, usize, usize),
}

/// Why a request is not authenticated; the client gets 407 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("proxy authentication required")]
    Missing,
    #[error("malformed Proxy-Authorization (expected Basic)")]
    Malformed,
    #[error("Proxy-Authorization longer than the {MAX_HEADER} bytes accepted")]
    TooLong,
    #[error("wrong user name or password")]
    Wrong,
    #[error("too many credentials being checked at once")]
    Busy,
    /// The client's network failed too many checks lately: its next one
    /// is in this many seconds.
    #[error("too many wrong passwords from this network lately; the next check in {0} s")]
    Spaced(u64),
}

pub(crate) struct Users {
    hashes: HashMap<String, String>,
    /// What an unknown user's password is checked against: a hash with
    /// the parameters most of the file's hashes have, so it costs what a
    /// known user's check costs (a decoy of the default parameters beside
    /// users hashed with m=64 MiB, t=3 told who exists by the time taken).
    decoy: String,
}

/// A remembered credential: who, when, and for which users file.
struct Remembered {
    user: String,
    at: Instant,
    generation: u64,
}

pub struct Auth {
    path: PathBuf,
    users: RwLock<Arc<Users>>,
    /// Bumped by every reload, so a check that raced one is not remembered
    /// past it.
    generation: std::sync::atomic::AtomicU64,
    /// Digests of (user, password) pairs that passed. Keyed by the decoded
    /// credentials, not the header bytes, so spelling variants of one header
    /// cannot fill it; digests, so no password is kept.
    remembered: Mutex<HashMap<[u8; 32], Remembered>>,
    /// argon2 checks cost ~20 MiB and milliseconds each: at most this many
    /// at once.
    verifying: Arc<tokio::sync::Semaphore>,
    /// Digests of credentials that failed, and when (at most REMEMBER_MAX;
    /// cleared with the users on reload).
    failed: Mutex<HashMap<[u8; 32], (Instant, u64)>>,
    /// The checks each client address, and each network (by its prefix
    /// length), may run (an entry leaves the map with its last check or
    /// waiter: bounded by the checks asked for).
    in_flight: Mutex<HashMap<(IpAddr, u8), Arc<tokio::sync::Semaphore>>>,
    /// Each client network's recent failures: how many, and when its next
    /// check may be made (see [`FREE_FAILURES`]).
    failing: Mutex<HashMap<IpAddr, Failing>>,
    /// Checks one network may have in flight: half the slots, at least one.
    per_network: usize,
    /// Bumped by a reload that removed a user or changed a password: the
    /// tunnels open then look whether theirs still stands (see
    /// [`Auth::standing`]).
    revoked: tokio::sync::watch::Sender<u64>,
}

/// A tunnel's user, as it logged in: a reload that removes the user or
/// changes the password ends the tunnel (requests are checked each time;
/// a tunnel is open for hours).
#[derive(Clone)]
pub struct Standing {
    auth: Arc<Auth>,
    user: String,
    /// The users as the password was checked against (shared: taken for
    /// every request of a user, a tunnel or not).
    users: Arc<Users>,
    revoked: tokio::sync::watch::Receiver<u64>,
}

impl std::fmt::Debug for Standing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Standing")
            .field("user", &self.user)
            .finish()
    }
}

impl Standing {
    /// Judged by the users the password passed against (see
    /// [`Auth::checked_against`]).
    pub(crate) fn checked(&mut self, users: Arc<Users>) {
        self.users = users;
    }

    /// Whether the user no longer stands now: removed, or given another
    /// password, since its login.
    pub fn is_revoked(&self) -> bool {
        self.auth.users().hashes.get(&self.user) != self.users.hashes.get(&self.user)
    }

    /// Ready once the user no longer stands (never, if nothing revokes it).
    pub async fn revoked(&mut self) {
        loop {
            if self.revoked.changed().await.is_err() {
                return std::future::pending().await;
            }
            if self.is_revoked() {
                return;
            }
        }
    }
}

/// A client network's recent failed checks.
struct Failing {
    count: u32,
    last: Instant,
    /// Its next check not before then.
    next: Instant,
}

impl Failing {
    /// Refused (with the wait left) while its next check waits.
    fn spaced(&self, now: Instant) -> Result<(), AuthError> {
        match self.next > now {
            true => {
                let left = self.next.saturating_duration_since(now);
                Err(AuthError::Spaced(left.as_secs().max(1)))
            }
            false => Ok(()),
        }
    }
}

/// The wait after a network's `failures`th failure: none for the first
/// [`FREE_FAILURES`], then 100 ms doubling to [`MOST_SPACING`].
fn spacing_after(failures: u32) -> Option<Duration> {
    let past = failures.checked_sub(FREE_FAILURES).filter(|p| *p > 0)?;
    Some(
        Duration::from_millis(100)
            .saturating_mul(1 << (past - 1).min(16))
            .min(MOST_SPACING),
    )
}

/// The network a client is counted by for failures: its /24, an IPv6
/// one's /48 (as `client_slot` bounds its checks in flight).
fn network_of(client: IpAddr) -> IpAddr {
    let client = rotor_protocol::addr::client_key(client);
    let bits = match client {
        IpAddr::V4(_) => NETWORK_V4,
        IpAddr::V6(_) => NETWORK_V6,
    };
    ipnet::IpNet::new(client, bits)
        .expect("a prefix length within the family")
        .network()
}

/// A client's places among the checks in flight: its address's, then its
/// network's. Given back when dropped (with the check they were for: a
/// client that leaves does not free them while its argon2 check runs on).
struct ClientSlot {
    _places: [Place; 2],
}

/// One address's or network's place.
struct Place {
    auth: Arc<Auth>,
    key: (IpAddr, u8),
    /// Shared with the map, and with every other place of `key` held or
    /// waited for (no other clone: a wait borrows it).
    sem: Arc<tokio::sync::Semaphore>,
    /// Whether a permit of `sem` is held (given back when dropped).
    held: bool,
}

impl Drop for Place {
    fn drop(&mut self) {
        if self.held {
            self.sem.add_permits(1);
        }
        let mut m = self
            .auth
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Clones are made only under this lock: the map's and this one
        // mean nobody else waits for the address.
        if Arc::strong_count(&self.sem) == 2 {
            m.remove(&self.key);
        }
    }
}

/// `previous`: the users in use, whose decoy is kept if its parameters
/// are still the ones to take (an argon2 hash, tens of milliseconds on
/// the worker's thread, is not made again at each reload).
fn load(path: &Path, previous: Option<&Users>) -> Result<Users, UsersError> {
    let text =
        rotor_protocol::read_text_file(path).map_err(|e| UsersError::Read(path.into(), e))?;
    // A byte-order mark (an editor's) is no part of the first user's name.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut hashes = HashMap::new();
    let mut lines: HashMap<String, usize> = HashMap::new();
    // How many hashes have each set of parameters.
    let mut counts: HashMap<ParamKey, (usize, argon2::Params)> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, hash) = line
            .split_once(':')
            .filter(|(u, _)| !u.is_empty())
            .ok_or_else(|| UsersError::Line(path.into(), n + 1))?;
        // argon2id alone: another scheme's hash (`$scrypt$`, `$argon2i$`)
        // could never pass, and would fail faster than the decoy check,
        // telling who the user is.
        // With a salt and a digest: without them it could never pass, and
        // would fail at once.
        let params = match PasswordHash::new(hash) {
            Ok(h)
                if h.algorithm == argon2::Algorithm::Argon2id.ident()
                    && h.salt.is_some()
                    && h.hash.is_some() =>
            {
                argon2::Params::try_from(&h).map_err(|_| UsersError::Hash(path.into(), n + 1))?
            }
            _ => return Err(UsersError::Hash(path.into(), n + 1)),
        };
        if let Some(first) = lines.insert(user.to_string(), n + 1) {
            return Err(UsersError::Twice(path.into(), user.into(), n + 1, first));
        }
        counts.entry(param_key(&params)).or_insert((0, params)).0 += 1;
        hashes.insert(user.to_string(), hash.to_string());
    }
    let params = counts
        .into_values()
        .max_by_key(|(count, p)| (*count, param_key(p)))
        .map(|(_, p)| p)
        .unwrap_or_default();
    let decoy = match previous {
        Some(u) if params_of(&u.decoy).as_ref().map(param_key) == Some(param_key(&params)) => {
            u.decoy.clone()
        }
        _ => hash_with("rotor decoy password", params),
    };
    Ok(Users { hashes, decoy })
}

/// The parameters `hash` was made with.
fn params_of(hash: &str) -> Option<argon2::Params> {
    argon2::Params::try_from(&PasswordHash::new(hash).ok()?).ok()
}

/// The parameters of an argon2 hash that set its cost (memory, passes,
/// lanes, digest length), as a key.
type ParamKey = (u32, u32, u32, usize);

fn param_key(p: &argon2::Params) -> ParamKey {
    let len = p.output_len().unwrap_or(argon2::Params::DEFAULT_OUTPUT_LEN);
    (p.m_cost(), p.t_cost(), p.p_cost(), len)
}

/// A PHC argon2id hash of `password` with a fresh random salt.
pub fn hash_password(password: &str) -> String {
    hash_with(password, argon2::Params::default())
}

fn hash_with(password: &str, params: argon2::Params) -> String {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 hashes any password with parameters a hash had")
        .to_string()
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Auth({}, {} users)", self.path.display(), self.len())
    }
}

impl Auth {
    /// The users of `path`, checked at most `checks` at once (`None`: one
    /// per CPU).
    pub fn load(path: &Path, checks: Option<usize>) -> Result<Arc<Auth>, UsersError> {
        let users = load(path, None)?;
        let cpus = checks
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1);
        Ok(Arc::new(Auth {
            path: path.to_path_buf(),
            users: RwLock::new(Arc::new(users)),
            generation: Default::default(),
            remembered: Mutex::new(HashMap::new()),
            verifying: Arc::new(tokio::sync::Semaphore::new(cpus)),
            failed: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            failing: Mutex::new(HashMap::new()),
            per_network: (cpus / 2).max(1),
            revoked: tokio::sync::watch::Sender::new(0),
        }))
    }

    /// Re-reads the users file (SIGHUP); a broken file keeps the old users.
    /// Once this returns, no check passes on the old file's credentials: a
    /// check that started before reads the generation this bumps, and is
    /// done again against the new users.
    ///
    /// Credentials that passed are still remembered if their user's hash
    /// did not change (a reload for logrotate or the pool leaves every
    /// user's next request without an argon2 check); failures are not (a
    /// password that failed may be right now).
    pub fn reload(&self) -> Result<usize, UsersError> {
        let current = self.users();
        let users = Arc::new(load(&self.path, Some(&current))?);
        let n = users.hashes.len();
        // The users swapped, both caches changed and the generation bumped
        // under the caches' locks: a check that remembers its outcome sees
        // the bump (`remember`), and one that read the new users finds no
        // entry of the old generation (its look waits for this). With the
        // swap before the locks, a check could read the new users and then
        // an old entry, and its tunnel's standing be judged by users it
        // was not checked against: a removed user's tunnel was never cut.
        let mut mem = self.remembered.lock().unwrap_or_else(|e| e.into_inner());
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        let old = std::mem::replace(
            &mut *self.users.write().unwrap_or_else(|e| e.into_inner()),
            users.clone(),
        );
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let unchanged = |user: &str| {
            let was = old.hashes.get(user);
            was.is_some() && was == users.hashes.get(user)
        };
        mem.retain(|_, r| r.generation == generation && unchanged(&r.user));
        for r in mem.values_mut() {
            r.generation = generation + 1;
        }
        failed.clear();
        if old.hashes.keys().any(|u| !unchanged(u)) {
            self.revoked.send_modify(|n| *n += 1);
        }
        Ok(n)
    }

    /// What a tunnel of `user` (who logged in) stands on: the user's hash
    /// now, and the reloads that may have revoked it.
    pub fn standing(self: &Arc<Self>, user: &str) -> Standing {
        Standing {
            auth: self.clone(),
            users: self.users(),
            user: user.to_string(),
            revoked: self.revoked.subscribe(),
        }
    }

    /// The users in use.
    fn users(&self) -> Arc<Users> {
        self.users.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn len(&self) -> usize {
        self.users
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .hashes
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the users file holds `name`.
    pub fn has_user(&self, name: &str) -> bool {
        self.users
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .hashes
            .contains_key(name)
    }

    /// The user a `Proxy-Authorization` header value from `client`
    /// authenticates. Credentials that passed or failed recently are
    /// answered from memory; a new check waits for an argon2 slot, one at
    /// a time per client address.
    pub async fn check(
        self: &Arc<Self>,
        header: Option<&[u8]>,
        client: IpAddr,
    ) -> Result<String, AuthError> {
        let (user, password) = credentials(header)?;
        self.check_credentials(&user, &password, client).await
    }

    /// Whether `user` (a name of the users file, without session
    /// parameters) with `password` is let in.
    pub async fn check_credentials(
        self: &Arc<Self>,
        user: &str,
        password: &str,
        client: IpAddr,
    ) -> Result<String, AuthError> {
        self.checked_against(user, password, client)
            .await
            .map(|(user, _)| user)
    }

    /// As [`Auth::check_credentials`], with the users they passed against
    /// (a tunnel's [`Standing`] is judged by them: a reload that raced the
    /// check, the new password given, must not cut it at once).
    pub(crate) async fn checked_against(
        self: &Arc<Self>,
        user: &str,
        password: &str,
        client: IpAddr,
    ) -> Result<(String, Arc<Users>), AuthError> {
        let (user, password) = (user.to_string(), password.to_string());
        let key = digest(&user, &password);
        // Whether this check took its network's turn already: a check done
        // again after a reload raced it is not refused for its own turn.
        let mut turn_taken = false;
        loop {
            use std::sync::atomic::Ordering::SeqCst;
            // The users and their generation, read together: a reload
            // swaps the users first, then bumps the generation.
            let generation = self.generation.load(SeqCst);
            let users = self.users();
            if let Some(user) = self.remembered(&key, generation) {
                return Ok((user, users));
            }
            if self.failed_recently(&key, generation) {
                return Err(AuthError::Wrong);
            }
            let network = network_of(client);
            if !turn_taken {
                self.spacing(network)?;
            }
            let slot = self.client_slot(client).await?;
            // What waited for the slot may have been answered meanwhile
            // (the same credentials on another connection).
            if let Some(user) = self.remembered(&key, generation) {
                return Ok((user, users));
            }
            if self.failed_recently(&key, generation) {
                return Err(AuthError::Wrong);
            }
            // The network's turn, taken now: guesses sent at once all
            // passed the look above and waited here for the slot, each
            // then checked (a hundred in the slot's wait, not one).
            if !turn_taken {
                self.take_turn(network)?;
                turn_taken = true;
            }
            let verified = self
                .verify_blocking(users.clone(), user.clone(), password.clone(), slot)
                .await?;
            // A reload while this was checked: check again, against the
            // new users, so a removed user is not let in after it (nor is
            // its network's failure counted for a password now right).
            match self.remember(key, verified, generation) {
                Some(answer) => {
                    if answer.is_err() {
                        self.failed_from(network);
                    }
                    return answer.map(|user| (user, users));
                }
                None => continue,
            }
        }
    }

    /// An argon2 check of `user`'s `password` in `users`, on the blocking
    /// pool, when one of the slots is free.
    async fn verify_blocking(
        self: &Arc<Self>,
        users: Arc<Users>,
        user: String,
        password: String,
        slot: ClientSlot,
    ) -> Result<Option<String>, AuthError> {
        // (`within`: a wait past 500 ms has the fast path watch its client.)
        let permit = crate::h1::within(VERIFY_WAIT, self.verifying.clone().acquire_owned())
            .await
            .ok_or(AuthError::Busy)?
            .map_err(|_| AuthError::Busy)?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let _held = (permit, slot);
            me.verify(&users, &user, &password).then_some(user)
        })
        .await
        .map_err(|_| AuthError::Wrong)
    }

    /// Remembers the outcome of a check begun at `generation` and returns
    /// it; `None` if a reload came since (checked under the lock a reload
    /// clears and bumps under, so nothing of the old users is remembered,
    /// or passed, after it returns).
    fn remember(
        &self,
        key: [u8; 32],
        verified: Option<String>,
        generation: u64,
    ) -> Option<Result<String, AuthError>> {
        let current = || self.generation.load(std::sync::atomic::Ordering::SeqCst) == generation;
        match verified {
            Some(user) => {
                let mut mem = self.remembered.lock().unwrap_or_else(|e| e.into_inner());
                if !current() {
                    return None;
                }
                // As the README says: the expired go, then all.
                if mem.len() >= REMEMBER_MAX {
                    mem.retain(|_, r| r.at.elapsed() < REMEMBER);
                    if mem.len() >= REMEMBER_MAX {
                        mem.clear();
                    }
                }
                mem.insert(
                    key,
                    Remembered {
                        user: user.clone(),
                        at: Instant::now(),
                        generation,
                    },
                );
                Some(Ok(user))
            }
            None => {
                let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
                if !current() {
                    return None;
                }
                if failed.len() >= REMEMBER_MAX {
                    failed.retain(|_, (at, _)| at.elapsed() < FAILED_REMEMBER);
                    if failed.len() >= REMEMBER_MAX {
                        failed.clear();
                    }
                }
                // With its generation: a failure that raced a reload says
                // nothing of the new users.
                failed.insert(key, (Instant::now(), generation));
                Some(Err(AuthError::Wrong))
            }
        }
    }

    /// `Spaced` while `network`'s next check is not due.
    fn spacing(&self, network: IpAddr) -> Result<(), AuthError> {
        let failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        failing
            .get(&network)
            .map_or(Ok(()), |f| f.spaced(Instant::now()))
    }

    /// A check from `network` about to run: refused while the network's
    /// next check waits; past [`FREE_FAILURES`], the check takes the
    /// network's turn (the next waits as after a failure, whatever this
    /// one's outcome: one check a wait, however many are sent at once).
    fn take_turn(&self, network: IpAddr) -> Result<(), AuthError> {
        let now = Instant::now();
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        let Some(f) = failing.get_mut(&network) else {
            return Ok(());
        };
        f.spaced(now)?;
        if now.duration_since(f.last) < FAILURES_FORGOTTEN {
            if let Some(wait) = spacing_after(f.count) {
                f.next = now + wait;
            }
        }
        Ok(())
    }

    /// A check from `network` failed: past [`FREE_FAILURES`] its next one
    /// waits.
    fn failed_from(&self, network: IpAddr) {
        let now = Instant::now();
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        if failing.len() >= FAILING_MAX && !failing.contains_key(&network) {
            failing.retain(|_, f| now.duration_since(f.last) < FAILURES_FORGOTTEN);
            if failing.len() >= FAILING_MAX {
                let mut lasts: Vec<Instant> = failing.values().map(|f| f.last).collect();
                let half = lasts.len() / 2;
                let (_, cut, _) = lasts.select_nth_unstable(half);
                let cut = *cut;
                failing.retain(|_, f| f.last > cut);
            }
        }
        let f = failing.entry(network).or_insert(Failing {
            count: 0,
            last: now,
            next: now,
        });
        if now.duration_since(f.last) >= FAILURES_FORGOTTEN {
            f.count = 0;
        }
        f.count = f.count.saturating_add(1);
        f.last = now;
        if let Some(wait) = spacing_after(f.count) {
            f.next = now + wait;
            // Password guessing, most likely: said once in 10 s (its
            // refusals, 407 and 429, are in the access log each).
            static SAID: rotor_protocol::Moment = rotor_protocol::Moment::new();
            if let Some(failed) = SAID.count_in(Duration::from_secs(10)) {
                tracing::warn!(%network, failures = f.count, failed, "logins from this network keep failing: its password checks are spaced out, its clients told 429 meanwhile (said once in 10 s)");
            }
        }
    }

    fn failed_recently(&self, key: &[u8; 32], generation: u64) -> bool {
        let failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed
            .get(key)
            .is_some_and(|(at, g)| at.elapsed() < FAILED_REMEMBER && *g == generation)
    }

    /// Places for `client` among the checks in flight, once its address
    /// has fewer than [`PER_CLIENT`] and its network fewer than half the
    /// slots; `Busy` after [`VERIFY_WAIT`] in all.
    async fn client_slot(self: &Arc<Self>, client: IpAddr) -> Result<ClientSlot, AuthError> {
        // An IPv6 client by its /64, as the connection limits count it: a
        // host holds a /64, and would take a place per address.
        let network = network_of(client);
        let client = rotor_protocol::addr::client_key(client);
        let (host_bits, bits) = match client {
            IpAddr::V4(_) => (32, NETWORK_V4),
            IpAddr::V6(_) => (64, NETWORK_V6),
        };
        crate::h1::within(VERIFY_WAIT, async {
            let host = self.place((client, host_bits), PER_CLIENT).await?;
            let network = self.place((network, bits), self.per_network).await?;
            Some(ClientSlot {
                _places: [host, network],
            })
        })
        .await
        .flatten()
        .ok_or(AuthError::Busy)
    }

    /// A place under `key`, of which `most` may be held at once.
    async fn place(self: &Arc<Self>, key: (IpAddr, u8), most: usize) -> Option<Place> {
        let sem = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(most)))
            .clone();
        // Made before the wait: given up (the wait over), it takes the
        // entry with it if nobody else holds or waits for it.
        let mut place = Place {
            auth: self.clone(),
            key,
            sem,
            held: false,
        };
        place.sem.acquire().await.ok()?.forget();
        place.held = true;
        Some(place)
    }

    /// The user of remembered credentials (used now: their time starts
    /// over).
    fn remembered(&self, key: &[u8; 32], generation: u64) -> Option<String> {
        let mut mem = self.remembered.lock().unwrap_or_else(|e| e.into_inner());
        let r = mem.get_mut(key)?;
        let now = Instant::now();
        if now.duration_since(r.at) >= REMEMBER || r.generation != generation {
            return None;
        }
        r.at = now;
        Some(r.user.clone())
    }

    fn verify(&self, users: &Users, user: &str, password: &str) -> bool {
        let (hash, known) = match users.hashes.get(user) {
            Some(h) => (h.as_str(), true),
            None => (users.decoy.as_str(), false),
        };
        let Ok(parsed) = PasswordHash::new(hash) else {
            return false;
        };
        // argon2 compares the digests in constant time.
        let ok = Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        ok && known
    }
}

/// BLAKE2s of the credentials, the key they are remembered by.
fn digest(user: &str, password: &str) -> [u8; 32] {
    use blake2::Digest;
    let mut h = blake2::Blake2s256::new();
    // The user's length first: `user\0password` was the same bytes for
    // "a\0b":"c" and "a":"b\0c".
    h.update((user.len() as u64).to_le_bytes());
    h.update(user.as_bytes());
    h.update(password.as_bytes());
    h.finalize().into()
}

/// The user name and password of a `Proxy-Authorization: Basic` value.
pub fn credentials(header: Option<&[u8]>) -> Result<(String, String), AuthError> {
    let header = header.ok_or(AuthError::Missing)?;
    if header.len() > MAX_HEADER {
        return Err(AuthError::TooLong);
    }
    parse_basic(header)
}

/// Whether `header` is of the Basic scheme, readable or not.
pub fn is_basic(header: Option<&[u8]>) -> bool {
    let Some(h) = header else { return false };
    let h = h.trim_ascii_start();
    h.len() > 6 && h[..6].eq_ignore_ascii_case(b"basic ")
}

fn parse_basic(header: &[u8]) -> Result<(String, String), AuthError> {
    let text = std::str::from_utf8(header)
        .map_err(|_| AuthError::Malformed)?
        .trim();
    let (scheme, token) = text.split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(AuthError::Malformed);
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .map_err(|_| AuthError::Malformed)?;
    let decoded = credential_text(decoded);
    let (user, password) = decoded.split_once(':').ok_or(AuthError::Malformed)?;
    Ok((user.to_string(), password.to_string()))
}

/// Credentials' bytes as text: UTF-8, as the challenge asks (RFC 7617
/// §2.1, `charset="UTF-8"`), else ISO-8859-1, a character a byte, which
/// clients that were not asked send (Python's urllib3 and requests, Java's
/// by default): a users file's `pässwort` was refused to them, as
/// malformed, however right. (Never lossy: different bytes stay different
/// text, but for one password written in either charset.)
pub fn credential_text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes)
        .unwrap_or_else(|e| e.into_bytes().into_iter().map(char::from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    /// A users file with `user` and `password`, hashed cheaply (the
    /// tests that make many checks), and its `Auth`.
    fn cheaply(user: &str, password: &str) -> (tempfile::TempDir, Arc<Auth>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        let cheap = argon2::Params::new(8192, 1, 1, None).unwrap();
        std::fs::write(&path, format!("{user}:{}\n", hash_with(password, cheap))).unwrap();
        let auth = Auth::load(&path, None).unwrap();
        (dir, auth)
    }

    /// A users file with alice (password `pw`), and its `Auth`.
    fn alice() -> (tempfile::TempDir, Arc<Auth>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        std::fs::write(&path, format!("alice:{}\n", hash_password("pw"))).unwrap();
        let auth = Auth::load(&path, None).unwrap();
        (dir, auth)
    }

    /// Every argon2 slot, until dropped.
    async fn hold_every_slot(auth: &Auth) -> tokio::sync::OwnedSemaphorePermit {
        let slots = auth.verifying.available_permits() as u32;
        auth.verifying
            .clone()
            .acquire_many_owned(slots)
            .await
            .unwrap()
    }

    fn basic(user: &str, pass: &str) -> Vec<u8> {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
        .into_bytes()
    }

    /// A tunnel's standing is judged by the users its password passed
    /// against: a login that raced a reload giving the user a new
    /// password, the new one given, stands; the old snapshot would have
    /// been revoked at once. A later removal revokes it.
    #[tokio::test]
    async fn a_standing_is_judged_by_the_users_it_passed_against() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        let cheap = argon2::Params::new(8192, 1, 1, None).unwrap();
        std::fs::write(
            &path,
            format!("alice:{}\n", hash_with("old", cheap.clone())),
        )
        .unwrap();
        let auth = Auth::load(&path, None).unwrap();
        // Watched before the check, as a login does.
        let mut standing = auth.standing("alice");
        std::fs::write(
            &path,
            format!("alice:{}\n", hash_with("new", cheap.clone())),
        )
        .unwrap();
        auth.reload().unwrap();
        assert!(standing.is_revoked(), "the snapshot before the reload");
        let (user, users) = auth.checked_against("alice", "new", LOCAL).await.unwrap();
        assert_eq!(user, "alice");
        standing.checked(users);
        assert!(!standing.is_revoked());
        assert!(crate::proxy::still_stands(Some(&standing)).is_ok());
        std::fs::write(&path, format!("bob:{}\n", hash_with("pw", cheap))).unwrap();
        auth.reload().unwrap();
        assert!(standing.is_revoked());
        assert!(crate::proxy::still_stands(Some(&standing)).is_err());
        assert!(crate::proxy::still_stands(None).is_ok());
    }

    /// A network that keeps failing has its checks spaced out past the
    /// first ten failures (429 with the wait), another network and
    /// credentials that passed before are not; the spacing ends in time.
    #[tokio::test]
    async fn a_network_that_keeps_failing_is_spaced_out() {
        let (_dir, auth) = cheaply("alice", "s3cret");
        let guesser: IpAddr = "192.0.2.7".parse().unwrap();
        let neighbour: IpAddr = "192.0.2.99".parse().unwrap();
        let elsewhere: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(
            auth.check(Some(&basic("alice", "s3cret")), neighbour).await,
            Ok("alice".into())
        );
        for i in 0..FREE_FAILURES + 1 {
            let pass = format!("guess{i}");
            assert_eq!(
                auth.check(Some(&basic("alice", &pass)), guesser).await,
                Err(AuthError::Wrong),
                "{i}"
            );
        }
        // The eleventh failure spaced the next check out.
        assert_eq!(
            auth.check(Some(&basic("alice", "another")), guesser).await,
            Err(AuthError::Spaced(1))
        );
        // Its /24 is one network; what passed before is remembered; and
        // another network is checked as ever.
        assert_eq!(
            auth.check(Some(&basic("alice", "s3cret")), neighbour).await,
            Ok("alice".into())
        );
        assert_eq!(
            auth.check(Some(&basic("bob", "x")), elsewhere).await,
            Err(AuthError::Wrong)
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            auth.check(Some(&basic("alice", "again")), guesser).await,
            Err(AuthError::Wrong)
        );
        // The next: 200 ms.
        assert!(matches!(
            auth.check(Some(&basic("alice", "more")), guesser).await,
            Err(AuthError::Spaced(_))
        ));
    }

    /// Credentials not in UTF-8 are read as ISO-8859-1 (what clients not
    /// asked for UTF-8 send): a users file's `pässwort` lets them in, as
    /// it does a client sending UTF-8; and the challenge asks for UTF-8.
    #[tokio::test]
    async fn latin_1_credentials_are_read_as_such() {
        use base64::Engine;
        let (_dir, auth) = cheaply("jürgen", "pässwort");
        let header = |bytes: &[u8]| {
            let token = base64::engine::general_purpose::STANDARD.encode(bytes);
            format!("Basic {token}").into_bytes()
        };
        let latin1 = header(b"j\xfcrgen:p\xe4sswort");
        let utf8 = header("jürgen:pässwort".as_bytes());
        for h in [latin1, utf8] {
            assert_eq!(auth.check(Some(&h), LOCAL).await, Ok("jürgen".into()));
        }
        let wrong = header(b"j\xfcrgen:p\xe4sswort!");
        assert_eq!(auth.check(Some(&wrong), LOCAL).await, Err(AuthError::Wrong));
    }

    /// Guesses sent at once, once a network's checks are spaced out, get
    /// one check between them: each passed the first look at the spacing
    /// and waited for the slot, and each was checked after it.
    #[tokio::test]
    async fn guesses_sent_at_once_get_one_check_a_wait() {
        let (_dir, auth) = cheaply("alice", "s3cret");
        let guesser: IpAddr = "192.0.2.7".parse().unwrap();
        for i in 0..FREE_FAILURES + 1 {
            let pass = format!("guess{i}");
            let r = auth.check(Some(&basic("alice", &pass)), guesser).await;
            assert_eq!(r, Err(AuthError::Wrong), "{i}");
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Twenty at once, from five addresses of the network.
        let tries: Vec<_> = (0..20)
            .map(|i| {
                let auth = auth.clone();
                let from: IpAddr = format!("192.0.2.{}", 7 + i % 5).parse().unwrap();
                tokio::spawn(async move {
                    auth.check(Some(&basic("alice", &format!("at-once{i}"))), from)
                        .await
                })
            })
            .collect();
        let mut checked = 0;
        for t in tries {
            match t.await.unwrap() {
                Err(AuthError::Wrong) => checked += 1,
                Err(AuthError::Spaced(_)) => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(checked, 1);
    }

    #[tokio::test]
    async fn users_file_and_checks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        std::fs::write(
            &path,
            format!("# users\nalice:{}\n\n", hash_password("s3cret")),
        )
        .unwrap();
        let auth = Auth::load(&path, None).unwrap();
        assert_eq!(auth.len(), 1);
        assert_eq!(
            auth.check(Some(&basic("alice", "s3cret")), LOCAL).await,
            Ok("alice".into())
        );
        // Remembered: same answer without a new check.
        assert_eq!(
            auth.check(Some(&basic("alice", "s3cret")), LOCAL).await,
            Ok("alice".into())
        );
        assert_eq!(
            auth.check(Some(&basic("alice", "wrong")), LOCAL).await,
            Err(AuthError::Wrong)
        );
        assert_eq!(
            auth.check(Some(&basic("bob", "s3cret")), LOCAL).await,
            Err(AuthError::Wrong)
        );
        assert_eq!(auth.check(None, LOCAL).await, Err(AuthError::Missing));
        assert_eq!(
            auth.check(Some(b"Bearer abc"), LOCAL).await,
            Err(AuthError::Malformed)
        );
        assert_eq!(
            auth.check(Some(b"Basic !!!"), LOCAL).await,
            Err(AuthError::Malformed)
        );
        // Too long is said as such (it said "malformed").
        let long = basic(&"a".repeat(MAX_HEADER), "pw");
        assert_eq!(
            auth.check(Some(&long), LOCAL).await,
            Err(AuthError::TooLong)
        );

        // Reload drops removed users and what was remembered of them.
        std::fs::write(&path, format!("bob:{}\n", hash_password("pw"))).unwrap();
        assert_eq!(auth.reload().unwrap(), 1);
        assert_eq!(
            auth.check(Some(&basic("alice", "s3cret")), LOCAL).await,
            Err(AuthError::Wrong)
        );
        assert_eq!(
            auth.check(Some(&basic("bob", "pw")), LOCAL).await,
            Ok("bob".into())
        );
    }

    /// An unknown user is checked against a hash of the parameters most
    /// of the file's users have (so it costs what theirs do), and a hash
    /// with no salt or digest, which could never pass, is refused.
    #[test]
    fn the_decoy_costs_what_the_users_hashes_cost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        let cheap = argon2::Params::new(8192, 1, 1, None).unwrap();
        let lines: String = ["a", "b"]
            .iter()
            .map(|u| format!("{u}:{}\n", hash_with("pw", cheap.clone())))
            .chain([format!("c:{}\n", hash_password("pw"))])
            .collect();
        std::fs::write(&path, lines).unwrap();
        let users = load(&path, None).unwrap();
        assert_eq!(
            params_of(&users.decoy).as_ref().map(param_key),
            Some(param_key(&cheap))
        );
        // Read again with the same parameters: the decoy is kept, not
        // hashed anew.
        let again = load(&path, Some(&users)).unwrap();
        assert_eq!(again.decoy, users.decoy);
        let no_digest = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ";
        std::fs::write(&path, format!("a:{no_digest}\n")).unwrap();
        assert!(matches!(load(&path, None), Err(UsersError::Hash(_, 1))));
        // No users: the defaults (made anew: the parameters changed).
        std::fs::write(&path, "# none\n").unwrap();
        let decoy = load(&path, Some(&users)).unwrap().decoy;
        assert_eq!(
            params_of(&decoy).as_ref().map(param_key),
            Some(param_key(&argon2::Params::default()))
        );
    }

    /// Credentials in use stay remembered past `REMEMBER` from their
    /// check (each use starts it over): with every argon2 slot taken by a
    /// flood, a user in use still passes; one idle for `REMEMBER` is
    /// checked again.
    #[tokio::test]
    async fn credentials_in_use_stay_remembered() {
        let (_dir, auth) = alice();
        assert_eq!(
            auth.check(Some(&basic("alice", "pw")), LOCAL).await,
            Ok("alice".into())
        );
        let age = |auth: &Auth, by: Duration| {
            let mut mem = auth.remembered.lock().unwrap();
            let r = mem.values_mut().next().unwrap();
            r.at -= by;
        };
        let _flood = hold_every_slot(&auth).await;
        for _ in 0..3 {
            // Used within REMEMBER each time, REMEMBER long ago in all.
            age(&auth, REMEMBER - Duration::from_secs(1));
            assert_eq!(
                auth.check(Some(&basic("alice", "pw")), LOCAL).await,
                Ok("alice".into())
            );
        }
        age(&auth, REMEMBER);
        let started = Instant::now();
        assert_eq!(
            auth.check(Some(&basic("alice", "pw")), LOCAL).await,
            Err(AuthError::Busy),
            "idle for REMEMBER: checked again, and every slot is taken"
        );
        assert!(started.elapsed() >= VERIFY_WAIT);
    }

    /// A check in flight when the users file drops its user (it waited for
    /// an argon2 slot with the old users in hand) is refused: after a
    /// reload returns, nothing passes on credentials the new file lacks.
    #[tokio::test]
    async fn a_check_in_flight_across_a_reload_uses_the_new_users() {
        let (dir, auth) = alice();
        let path = dir.path().join("users");
        let held = hold_every_slot(&auth).await;
        let a = auth.clone();
        let check = tokio::spawn(async move { a.check(Some(&basic("alice", "pw")), LOCAL).await });
        // The check has its users and waits for a slot.
        tokio::time::sleep(Duration::from_millis(100)).await;
        std::fs::write(&path, format!("bob:{}\n", hash_password("pw"))).unwrap();
        auth.reload().unwrap();
        drop(held);
        assert_eq!(check.await.unwrap(), Err(AuthError::Wrong));
        assert_eq!(
            auth.check(Some(&basic("alice", "pw")), LOCAL).await,
            Err(AuthError::Wrong)
        );
    }

    /// Wrong credentials repeated cost no argon2 check; one client address
    /// gets one check at a time, so a flood from it leaves the other slots
    /// to everyone else.
    #[tokio::test]
    async fn failures_are_remembered_and_each_client_checks_one_at_a_time() {
        let (dir, auth) = alice();
        let path = dir.path().join("users");
        assert_eq!(
            auth.check(Some(&basic("eve", "x")), LOCAL).await,
            Err(AuthError::Wrong)
        );
        // Every slot taken: a repeat is still answered, from memory.
        let held = hold_every_slot(&auth).await;
        let started = Instant::now();
        assert_eq!(
            auth.check(Some(&basic("eve", "x")), LOCAL).await,
            Err(AuthError::Wrong)
        );
        assert!(started.elapsed() < VERIFY_WAIT);
        drop(held);
        // A client with a check in flight waits for it (and, past the
        // wait, is Busy); another client's check goes through meanwhile.
        let flooder: IpAddr = "192.0.2.66".parse().unwrap();
        let first = auth.client_slot(flooder).await.unwrap();
        let a = auth.clone();
        let waiting = tokio::spawn(async move { a.check(Some(&basic("eve", "y")), flooder).await });
        assert_eq!(
            auth.check(Some(&basic("alice", "pw")), LOCAL).await,
            Ok("alice".into())
        );
        // (not by timing alice's check, which an unoptimised argon2 on a
        // loaded machine makes slow: the flooder's is still waiting)
        assert!(
            !waiting.is_finished(),
            "the flooder's second check went first"
        );
        assert_eq!(waiting.await.unwrap(), Err(AuthError::Busy));
        drop(first);
        assert!(
            auth.in_flight.lock().unwrap().is_empty(),
            "nothing left behind"
        );
        // A reload forgets failures (the password may be right now).
        std::fs::write(&path, format!("eve:{}\n", hash_password("x"))).unwrap();
        auth.reload().unwrap();
        assert_eq!(
            auth.check(Some(&basic("eve", "x")), LOCAL).await,
            Ok("eve".into())
        );
    }

    /// An IPv6 host's addresses share its /64's one place: a flood spread
    /// over them holds one argon2 slot, not one an address.
    #[tokio::test]
    async fn an_ipv6_64_checks_one_at_a_time() {
        let (_dir, auth) = alice();
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let other: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let held = auth.client_slot(one).await.unwrap();
        let a = auth.clone();
        let waiting = tokio::spawn(async move { a.check(Some(&basic("eve", "1")), other).await });
        // Another /48's /64 goes through meanwhile.
        let elsewhere: IpAddr = "2001:db8:2:3::1".parse().unwrap();
        assert_eq!(
            auth.check(Some(&basic("alice", "pw")), elsewhere).await,
            Ok("alice".into())
        );
        assert!(!waiting.is_finished(), "a place per address of the /64");
        assert_eq!(waiting.await.unwrap(), Err(AuthError::Busy));
        drop(held);
        assert!(auth.in_flight.lock().unwrap().is_empty());
    }

    /// The /64s of one /48 (and the addresses of one IPv4 /24) have half
    /// the argon2 slots between them: a flood spread over them leaves the
    /// other half to everyone else.
    #[tokio::test]
    async fn a_network_has_half_the_slots() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        std::fs::write(&path, format!("alice:{}\n", hash_password("pw"))).unwrap();
        let auth = Auth::load(&path, Some(4)).unwrap();
        for (a, b, c, other) in [
            (
                "2001:db8:1:1::1",
                "2001:db8:1:2::1",
                "2001:db8:1:ff::1",
                "2001:db8:2::1",
            ),
            ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.3.1"),
        ] {
            let ip = |s: &str| s.parse::<IpAddr>().unwrap();
            let held = [
                auth.client_slot(ip(a)).await.unwrap(),
                auth.client_slot(ip(b)).await.unwrap(),
            ];
            let x = auth.clone();
            let third = tokio::spawn(async move { x.check(Some(&basic("eve", "1")), ip(c)).await });
            // Another network goes through meanwhile.
            assert_eq!(
                auth.check(Some(&basic("alice", "pw")), ip(other)).await,
                Ok("alice".into())
            );
            assert!(!third.is_finished(), "{c}: past its network's half");
            assert_eq!(third.await.unwrap(), Err(AuthError::Busy), "{c}");
            drop(held);
            assert!(auth.in_flight.lock().unwrap().is_empty());
            // With the network's places back, its next check is made.
            assert_eq!(
                auth.check(Some(&basic("alice", "pw2")), ip(c)).await,
                Err(AuthError::Wrong)
            );
        }
    }

    /// A client that goes away while its check runs (its request dropped)
    /// leaves its place held until the argon2 check ends.
    #[tokio::test]
    async fn a_client_that_leaves_keeps_its_place_while_its_check_runs() {
        let (_dir, auth) = alice();
        let slots = auth.verifying.available_permits();
        let a = auth.clone();
        let check = tokio::spawn(async move { a.check(Some(&basic("eve", "2")), LOCAL).await });
        // Until the check holds an argon2 slot (it runs on the blocking pool).
        let started = Instant::now();
        while auth.verifying.available_permits() == slots {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no check began"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        check.abort();
        let _ = check.await;
        // The place is given back after the argon2 slot: read first, it
        // cannot be gone while the slot is still held.
        let place = auth.in_flight.lock().unwrap().contains_key(&(LOCAL, 32));
        if auth.verifying.available_permits() < slots {
            assert!(
                place,
                "the place went with the client, the check still running"
            );
        }
        // The places go just after the slot (the address's, then the
        // network's): both, once the check ended.
        let gone = || auth.in_flight.lock().unwrap().is_empty();
        while auth.verifying.available_permits() < slots || !gone() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the check never ended, or its places stayed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(gone());
    }

    /// A reload keeps in memory the credentials of users whose hash did not
    /// change, and forgets the others'.
    #[tokio::test]
    async fn a_reload_keeps_the_unchanged_users_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        let alice = format!("alice:{}\n", hash_password("pw"));
        std::fs::write(&path, format!("{alice}bob:{}\n", hash_password("pw"))).unwrap();
        let auth = Auth::load(&path, None).unwrap();
        for who in ["alice", "bob"] {
            assert_eq!(
                auth.check(Some(&basic(who, "pw")), LOCAL).await,
                Ok(who.into())
            );
        }
        // bob's password changed, carol added.
        std::fs::write(
            &path,
            format!(
                "{alice}bob:{}\ncarol:{}\n",
                hash_password("new"),
                hash_password("c")
            ),
        )
        .unwrap();
        auth.reload().unwrap();
        // With every slot taken, only what is remembered is answered.
        let held = hold_every_slot(&auth).await;
        assert_eq!(
            auth.check(Some(&basic("alice", "pw")), LOCAL).await,
            Ok("alice".into())
        );
        assert_eq!(
            auth.check(Some(&basic("bob", "pw")), LOCAL).await,
            Err(AuthError::Busy),
            "bob's old password was remembered past the change"
        );
        drop(held);
        assert_eq!(
            auth.check(Some(&basic("bob", "pw")), LOCAL).await,
            Err(AuthError::Wrong)
        );
        assert_eq!(
            auth.check(Some(&basic("bob", "new")), LOCAL).await,
            Ok("bob".into())
        );
        // A user removed is forgotten.
        std::fs::write(&path, format!("bob:{}\n", hash_password("new"))).unwrap();
        auth.reload().unwrap();
        assert_eq!(
            auth.check(Some(&basic("alice", "pw")), LOCAL).await,
            Err(AuthError::Wrong)
        );
    }

    #[test]
    fn bad_files_say_where() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        std::fs::write(&path, "alice\n").unwrap();
        assert!(matches!(
            Auth::load(&path, None),
            Err(UsersError::Line(_, 1))
        ));
        std::fs::write(&path, "alice:plaintext\n").unwrap();
        assert!(matches!(
            Auth::load(&path, None),
            Err(UsersError::Hash(_, 1))
        ));
        // Another scheme's PHC string: never a pass, and a faster fail.
        let argon2i = hash_password("pw").replace("$argon2id$", "$argon2i$");
        for other in ["$scrypt$ln=15,r=8,p=1$c2FsdHNhbHQ$aGFzaA", argon2i.as_str()] {
            std::fs::write(&path, format!("# users\nalice:{other}\n")).unwrap();
            assert!(
                matches!(Auth::load(&path, None), Err(UsersError::Hash(_, 2))),
                "{other}"
            );
        }
        // A user listed twice (a hand edit): neither line is guessed at.
        let (a, b) = (hash_password("one"), hash_password("two"));
        std::fs::write(&path, format!("alice:{a}\nbob:{a}\nalice:{b}\n")).unwrap();
        let err = Auth::load(&path, None).err().unwrap();
        assert!(
            matches!(&err, UsersError::Twice(_, u, 3, 1) if u == "alice"),
            "{err}"
        );
    }
}
