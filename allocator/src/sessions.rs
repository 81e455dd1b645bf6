//! Sticky sessions: the address a session (a user's session id) was given,
//! kept for the session's lifetime, the same for every worker and across
//! worker restarts (the allocator holds the table).
//!
//! A session lasts `ttl` from its first lease (not renewed by use). The
//! table is bounded: past `max` sessions the oldest goes first; expired
//! ones are dropped every second. An allocator that stops cleanly keeps
//! them in its state directory for the next one (`snapshot`, `restore`).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rotor_protocol::Family;

/// One session: its address per family (a session may reach destinations
/// of both), and its lifetime.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Session {
    ips: [Option<IpAddr>; 2],
    created: Instant,
    expires: Instant,
    strict: bool,
    /// Taken back from a kept file at the start (see
    /// [`Sessions::restored`]).
    restored: bool,
}

#[derive(Debug)]
pub struct Sessions {
    /// Keys are shared with `order` (one copy of each key), and with a
    /// checkpoint's copy of the table (no key copied under the lock).
    map: HashMap<Arc<str>, Session>,
    /// Keys by creation, oldest first, for eviction past `max` (entries
    /// whose session is gone or newer are skipped when met): the
    /// sessions that may move, and the strict ones (so a strict one that
    /// cannot be remembered is passed over for the oldest that may move).
    order: [VecDeque<(Instant, Arc<str>)>; 2],
    max: usize,
    /// Each user's sessions: a user past `max_per_user` pushes out its
    /// own oldest, so one user making new sessions without end cannot
    /// push out every other user's. A user goes with its last session.
    users: HashMap<UserKey, UserList>,
    /// Entries in the users' lists, live or not (they count toward the
    /// compaction as the eviction lists' do: a table full of active users
    /// evicts through `order`, leaving stale entries in their lists).
    user_listed: usize,
    max_per_user: usize,
    /// Strict sessions evicted before their end, until then: they fail
    /// (as their address gone) rather than quietly take another address.
    /// Bounded like the table.
    evicted_strict: HashMap<Arc<str>, Instant>,
    /// The soonest end in `evicted_strict` (or earlier), so a full list is
    /// passed over only when one of them has ended: not at each new
    /// session, which went over all of them twice.
    strict_first_end: Option<Instant>,
    /// Times a full list was passed over for an eviction (tests).
    #[cfg(test)]
    strict_passes: usize,
    /// When a full table was last cleared of ended sessions before an
    /// eviction (once a second at most: a pass over the table).
    expired_at: Option<Instant>,
    /// When a table full of strict sessions last refused a new one was
    /// logged.
    unrecorded_logged: Option<Instant>,
}

/// One user's sessions: how many are in the table, and by creation,
/// oldest first (entries of sessions gone are skipped when met at the
/// front, and dropped when the lists are compacted).
#[derive(Debug, Default)]
struct UserList {
    live: usize,
    order: VecDeque<(Instant, Arc<str>)>,
}

/// The sessions as they were at a moment, copied quickly (under the
/// allocator's lock): made into what is kept with [`Copied::saved`],
/// outside it.
pub struct Copied {
    now: Instant,
    sessions: Vec<(Arc<str>, Session)>,
    evicted_strict: Vec<(Arc<str>, Instant)>,
}

impl Copied {
    /// Every session live at the copy, with its times as wall-clock
    /// milliseconds (`wall_ms` is the copy's moment on that clock), oldest
    /// first: what a restart reads back with [`Sessions::restore`].
    pub fn saved(self, wall_ms: u64) -> Vec<SavedSession> {
        let now = self.now;
        let at = |t: Instant| match t.checked_duration_since(now) {
            Some(ahead) => wall_ms.saturating_add(ahead.as_millis() as u64),
            None => wall_ms.saturating_sub(now.duration_since(t).as_millis() as u64),
        };
        let mut out: Vec<SavedSession> = self
            .sessions
            .into_iter()
            .filter(|(_, s)| s.expires > now)
            .map(|(key, s)| SavedSession {
                key: key.to_string(),
                ips: s.ips,
                created_ms: at(s.created),
                expires_ms: at(s.expires),
                strict: s.strict,
                evicted: false,
            })
            .collect();
        out.sort_by_key(|s| s.created_ms);
        // Strict sessions pushed out of the full table still fail until
        // their end, after a restart too (their start is not known: the
        // copy's moment stands for it).
        out.extend(
            self.evicted_strict
                .into_iter()
                .filter(|(_, until)| *until > now)
                .map(|(key, until)| SavedSession {
                    key: key.to_string(),
                    ips: [None, None],
                    created_ms: wall_ms,
                    expires_ms: at(until),
                    strict: true,
                    evicted: true,
                }),
        );
        out
    }
}

/// The longest session key kept (a peer that sends megabytes of key is
/// answered an error).
pub const MAX_KEY: usize = rotor_protocol::MAX_SESSION_KEY;

/// Session `key` left the table: one fewer for its user (who goes with
/// its last).
/// Whether the user's entry is known by that very key, and the user has
/// sessions still: it is then to be known by another of them
/// ([`Sessions::rekey`]), not hold the key of a session gone.
#[must_use]
fn gone(users: &mut HashMap<UserKey, UserList>, listed: &mut usize, key: &str) -> bool {
    let user = user_of(key);
    let Some((by, list)) = users.get_key_value(user) else {
        return false;
    };
    if list.live > 1 {
        let by_this = *by.0 == *key;
        if let Some(list) = users.get_mut(user) {
            list.live -= 1;
        }
        return by_this;
    }
    if let Some(list) = users.remove(user) {
        *listed -= list.order.len();
    }
    false
}

/// What new session's user has to give up for it (`Sessions::own_victim`).
enum Own {
    /// Nothing: it holds fewer than its share.
    Under,
    /// Its oldest, at the front of its list.
    Victim(Arc<str>),
    /// Its oldest is a live strict one, and the list of those pushed out
    /// is full: no new session for the user until then.
    Blocked(Instant),
}

/// Whether list entry `(created, key)` is still its session's: the
/// session is in `map` and began then (and, for an eviction list, is
/// of its `strict`ness: a session made strict left the loose one).
fn current(
    map: &HashMap<Arc<str>, Session>,
    (created, key): &(Instant, Arc<str>),
    strict: Option<bool>,
) -> bool {
    map.get(key)
        .is_some_and(|s| s.created == *created && strict.is_none_or(|t| s.strict == t))
}

/// A user's entry in `Sessions::users`, known by the key of one of its
/// sessions (the first it made, kept while the user is): hashed and
/// compared by the key's user part, and found by it as a `&str`. The user
/// name is not copied out of the key: a client making sessions each of a
/// new user with a long name held the name twice.
#[derive(Debug)]
struct UserKey(Arc<str>);

impl std::borrow::Borrow<str> for UserKey {
    fn borrow(&self) -> &str {
        user_of(&self.0)
    }
}

impl std::hash::Hash for UserKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        // As `str` hashes: `Borrow` needs the two to agree.
        user_of(&self.0).hash(h)
    }
}

impl PartialEq for UserKey {
    fn eq(&self, other: &UserKey) -> bool {
        user_of(&self.0) == user_of(&other.0)
    }
}

impl Eq for UserKey {}

/// The user part of session key `key` (a worker's keys are `USER\0ID`;
/// a key without one is its own user).
fn user_of(key: &str) -> &str {
    key.split('\0').next().unwrap_or(key)
}

/// Whether `key` is one a session may have.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY
}

/// A session as kept over an allocator restart.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedSession {
    pub key: String,
    pub ips: [Option<IpAddr>; 2],
    /// Wall-clock milliseconds since the Unix epoch.
    pub created_ms: u64,
    pub expires_ms: u64,
    pub strict: bool,
    /// A strict session the full table pushed out before its end: it
    /// fails until then rather than take another address.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub evicted: bool,
}

/// What a session says of a lease of `family`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pinned {
    /// Its address, still good.
    Address(IpAddr),
    /// None yet (new session, or none of this family).
    Nothing,
    /// It had one, which `good` refused (left the pool, or quarantined);
    /// `strict`: the session was made strict (by any request for it), so
    /// it fails rather than move, whatever the request at hand says.
    Gone { ip: IpAddr, strict: bool },
    /// A strict session evicted (the table was full) before its end: it
    /// fails, whatever the request at hand says.
    Evicted,
}

impl Sessions {
    pub fn new(max: usize) -> Sessions {
        Sessions::per_user(max, max)
    }

    /// A table of `max` sessions, of which one user holds at most
    /// `max_per_user`.
    pub fn per_user(max: usize, max_per_user: usize) -> Sessions {
        let max = max.max(1);
        Sessions {
            map: HashMap::new(),
            order: [VecDeque::new(), VecDeque::new()],
            max,
            users: HashMap::new(),
            user_listed: 0,
            max_per_user: max_per_user.clamp(1, max),
            evicted_strict: HashMap::new(),
            strict_first_end: None,
            #[cfg(test)]
            strict_passes: 0,
            expired_at: None,
            unrecorded_logged: None,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The address session `key` holds for `family`, checked by `good`.
    pub fn pinned(
        &mut self,
        key: &str,
        family: Family,
        now: Instant,
        good: impl Fn(IpAddr) -> bool,
    ) -> Pinned {
        match self.map.get(key) {
            Some(s) if s.expires <= now => {
                self.map.remove(key);
                if gone(&mut self.users, &mut self.user_listed, key) {
                    self.rekey(user_of(key));
                }
                Pinned::Nothing
            }
            Some(s) => match s.ips[family.index()] {
                Some(ip) if good(ip) => Pinned::Address(ip),
                Some(ip) => Pinned::Gone {
                    ip,
                    strict: s.strict,
                },
                None => Pinned::Nothing,
            },
            None if self
                .evicted_strict
                .get(key)
                .is_some_and(|until| *until > now) =>
            {
                Pinned::Evicted
            }
            None => Pinned::Nothing,
        }
    }

    /// Whether a new session `key` can be kept (none needed for one that
    /// is there): the table has room, or a session to push out. Ended
    /// sessions go first, then the oldest; a strict one pushed out early is
    /// remembered (it fails until its end rather than move), and when that
    /// list is full of live ones too, the oldest session that may move goes
    /// instead. Only a table of strict sessions that must not move refuses,
    /// with about how long until room frees. Nothing live is pushed out
    /// here: [`Sessions::pin`] does that, once a lease was had.
    pub fn room(&mut self, key: &str, now: Instant) -> Result<(), Duration> {
        if self.map.contains_key(key) {
            return Ok(());
        }
        // One of the user's own makes room; a user whose own cannot go
        // (strict ones that cannot be remembered) waits, rather than push
        // out another user's.
        match self.own_victim(key, now) {
            Own::Victim(_) => return Ok(()),
            Own::Blocked(until) => return Err(until.saturating_duration_since(now)),
            Own::Under => {}
        }
        if self.map.len() < self.max {
            return Ok(());
        }
        // Ended sessions go before a live one is evicted (the 1-s tick
        // may not have come yet).
        if crate::due(&mut self.expired_at, now, Duration::from_secs(1)) {
            self.expire(now);
        }
        if self.map.len() < self.max {
            return Ok(());
        }
        self.victim(now).map(|_| ())
    }

    /// The queue whose first session goes next, if the table is to make
    /// room: the older of the two firsts, unless that is a live strict
    /// session that cannot be remembered (then the first that may move).
    /// `Err`: only such strict sessions, and about when room frees.
    fn victim(&mut self, now: Instant) -> Result<usize, Duration> {
        // Entries of sessions gone or replaced (or made strict), off the
        // fronts.
        for (strict, q) in [false, true].into_iter().zip(&mut self.order) {
            while let Some(entry) = q.front() {
                if current(&self.map, entry, Some(strict)) {
                    break;
                }
                q.pop_front();
            }
        }
        let first = |q: &VecDeque<(Instant, Arc<str>)>| q.front().map(|(c, _)| *c);
        let oldest = match (first(&self.order[0]), first(&self.order[1])) {
            (Some(a), Some(b)) => usize::from(b < a),
            (Some(_), None) => 0,
            (None, Some(_)) => 1,
            (None, None) => return Ok(0),
        };
        if oldest == 0 {
            return Ok(0);
        }
        let (_, key) = &self.order[1][0];
        let expires = self.map[key].expires;
        if expires <= now {
            return Ok(1);
        }
        if self.can_remember_strict(now) {
            return Ok(1);
        }
        if !self.order[0].is_empty() {
            return Ok(0);
        }
        // Room frees when a remembered one or the oldest ends.
        let wait = self
            .strict_first_end
            .map_or(expires, |end| end.min(expires))
            .saturating_duration_since(now);
        if crate::due(&mut self.unrecorded_logged, now, Duration::from_secs(60)) {
            tracing::warn!(
                max = self.max,
                "the session table is full of strict sessions that may not move: new sessions are refused (503) until one ends; raise --max-sessions"
            );
        }
        Err(wait)
    }

    /// Pins `ip` for session `key` (created now, lasting `ttl`, if new).
    /// A new session in a full table pushes out the one
    /// [`Sessions::room`] names; one without room is not kept.
    pub fn pin(&mut self, key: &str, ip: IpAddr, ttl: Duration, strict: bool, now: Instant) {
        let family = Family::of(&ip);
        if let Some(s) = self.map.get_mut(key) {
            s.ips[family.index()] = Some(ip);
            return;
        }
        if self.room(key, now).is_err() {
            return;
        }
        // Down to its share less one (a user over it, after a restart
        // with a lower cap, comes down as its new sessions come).
        while let Own::Victim(old) = self.own_victim(key, now) {
            if let Some(list) = self.users.get_mut(user_of(key)) {
                list.order.pop_front();
                self.user_listed -= 1;
            }
            self.push_out(old, now);
        }
        while self.map.len() >= self.max {
            let Ok(q) = self.victim(now) else {
                return;
            };
            let Some((_, old)) = self.order[q].pop_front() else {
                break;
            };
            self.push_out(old, now);
        }
        let mut ips = [None, None];
        ips[family.index()] = Some(ip);
        let key: Arc<str> = Arc::from(key);
        self.note_user(&key, now);
        self.map.insert(
            key.clone(),
            Session {
                ips,
                created: now,
                expires: now + ttl,
                strict,
                restored: false,
            },
        );
        self.order[usize::from(strict)].push_back((now, key));
    }

    /// Whether session `key` was taken back from a kept file at the start
    /// (its address may be a source's that has not been read yet).
    pub fn restored(&self, key: &str) -> bool {
        self.map.get(key).is_some_and(|s| s.restored)
    }

    /// Drops session `key` from the table before its end (a strict one
    /// live is remembered: it fails until then).
    fn push_out(&mut self, key: Arc<str>, now: Instant) {
        if let Some(s) = self.map.remove(&key) {
            if gone(&mut self.users, &mut self.user_listed, &key) {
                self.rekey(user_of(&key));
            }
            if s.strict && s.expires > now {
                self.remember_strict(key, s.expires);
            }
        }
    }

    /// Whether a live strict session pushed out now can be remembered
    /// (the list of those has room, once those ended are forgotten).
    fn can_remember_strict(&mut self, now: Instant) -> bool {
        if self.evicted_strict.len() >= self.max
            && self.strict_first_end.is_some_and(|end| end <= now)
        {
            #[cfg(test)]
            {
                self.strict_passes += 1;
            }
            self.forget_ended_strict(now);
        }
        self.evicted_strict.len() < self.max
    }

    /// The session of new session `key`'s user that goes to make room
    /// for it, if the user holds its `max_per_user` already: its oldest,
    /// at the front of its list; if that is a live strict one that cannot
    /// be remembered (the list of those pushed out full of live ones), the
    /// user waits: `Blocked`, until about when room frees. Entries of
    /// sessions gone, met on the way, are dropped.
    fn own_victim(&mut self, key: &str, now: Instant) -> Own {
        let at_share = self
            .users
            .get(user_of(key))
            .is_some_and(|list| list.live >= self.max_per_user);
        if !at_share {
            return Own::Under;
        }
        // (Before the list is borrowed: it may forget those ended.)
        let remembers = self.can_remember_strict(now);
        let Some(list) = self.users.get_mut(user_of(key)) else {
            return Own::Under;
        };
        let q = &mut list.order;
        while let Some((created, k)) = q.front() {
            // (`current`, with the session it finds.)
            match self.map.get(k) {
                Some(s) if s.created == *created => {
                    let pinned = s.strict && s.expires > now;
                    if pinned && !remembers {
                        let freed = self
                            .strict_first_end
                            .map_or(s.expires, |e| e.min(s.expires));
                        return Own::Blocked(freed);
                    }
                    return Own::Victim(k.clone());
                }
                _ => {
                    q.pop_front();
                    self.user_listed -= 1;
                }
            }
        }
        Own::Under
    }

    /// Counts new session `key` (created `now`) to its user.
    fn note_user(&mut self, key: &Arc<str>, now: Instant) {
        let user = user_of(key);
        let list = match self.users.get_mut(user) {
            Some(list) => list,
            None => self.users.entry(UserKey(key.clone())).or_default(),
        };
        list.live += 1;
        list.order.push_back((now, key.clone()));
        self.user_listed += 1;
    }

    /// A strict session pushed out before its `end`: it fails until then.
    fn remember_strict(&mut self, key: Arc<str>, end: Instant) {
        self.evicted_strict.insert(key, end);
        self.strict_first_end = Some(self.strict_first_end.map_or(end, |t| t.min(end)));
    }

    /// Forgets the pushed-out strict sessions that have ended.
    fn forget_ended_strict(&mut self, now: Instant) {
        let mut first: Option<Instant> = None;
        self.evicted_strict.retain(|_, until| {
            let keep = *until > now;
            if keep {
                first = Some(first.map_or(*until, |t| t.min(*until)));
            }
            keep
        });
        self.strict_first_end = first;
    }

    /// Drops the expired sessions (and what the order no longer needs).
    pub fn expire(&mut self, now: Instant) {
        let (users, listed) = (&mut self.users, &mut self.user_listed);
        let mut rekey = Vec::new();
        self.map.retain(|key, s| {
            let live = s.expires > now;
            if !live && gone(users, listed, key) {
                rekey.push(key.clone());
            }
            live
        });
        for key in rekey {
            self.rekey(user_of(&key));
        }
        self.forget_ended_strict(now);
        // The lists keep entries of sessions gone until met at their
        // fronts; they are gone over only once they hold about as many of
        // those as live ones: a pass that ends few sessions is a walk of
        // the table, not a lookup per session and list (≈ 90 ms every
        // second for 200 000 sessions, under the allocator's lock).
        if self.map.is_empty() {
            self.order.iter_mut().for_each(VecDeque::clear);
            self.users.clear();
            self.user_listed = 0;
            return;
        }
        // Each live session has an entry in `order` and one in its user's.
        let listed = self.order[0].len() + self.order[1].len() + self.user_listed;
        if listed <= 4 * self.map.len() + 2048 {
            return;
        }
        self.compact();
    }

    /// `user`'s entry, known by the key of a session gone, is known by
    /// one of its live sessions' from now on (its newest): the key gone is
    /// let go.
    fn rekey(&mut self, user: &str) {
        let Some((by, list)) = self.users.remove_entry(user) else {
            return;
        };
        let map = &self.map;
        let by = match list.order.iter().rev().find(|e| current(map, e, None)) {
            Some((_, key)) => UserKey(key.clone()),
            None => by,
        };
        self.users.insert(by, list);
    }

    /// Drops the lists' entries of sessions gone (or replaced, or made
    /// strict).
    fn compact(&mut self) {
        let map = &self.map;
        for (strict, q) in [false, true].into_iter().zip(&mut self.order) {
            q.retain(|entry| current(map, entry, Some(strict)));
        }
        for list in self.users.values_mut() {
            list.order.retain(|entry| current(map, entry, None));
        }
        self.user_listed = self.users.values().map(|l| l.order.len()).sum();
    }

    /// Session `key`, asked for as strict, is strict from then on: one
    /// begun loose and later used strict is remembered when pushed out of
    /// a full table (it fails until its end), not quietly moved.
    /// Whether it changed.
    pub fn make_strict(&mut self, key: &str) -> bool {
        let Some((key, s)) = self.map.get_key_value(key) else {
            return false;
        };
        if s.strict {
            return false;
        }
        let (key, created) = (key.clone(), s.created);
        if let Some(s) = self.map.get_mut(&key) {
            s.strict = true;
        }
        // In its place by age (the loose queue's entry is skipped now).
        let q = &mut self.order[1];
        let at = q.partition_point(|(c, _)| *c <= created);
        q.insert(at, (created, key));
        true
    }

    /// Sessions pinned to each address (one pass over the table).
    pub fn by_address(&self) -> std::collections::HashMap<IpAddr, u64> {
        let mut out = std::collections::HashMap::new();
        for s in self.map.values() {
            for ip in s.ips.iter().flatten() {
                *out.entry(*ip).or_default() += 1;
            }
        }
        out
    }

    /// Every live session, with its times as wall-clock milliseconds
    /// (`wall_ms` is `now` on that clock), oldest first: what a restart
    /// reads back with [`Sessions::restore`].
    pub fn snapshot(&self, now: Instant, wall_ms: u64) -> Vec<SavedSession> {
        self.copy(now).saved(wall_ms)
    }

    /// The table as it is `now`, for [`Copied::saved`]: a key shared and
    /// a few words copied per session (≈ 20 ns; turning them into what is
    /// kept, ≈ 200).
    pub fn copy(&self, now: Instant) -> Copied {
        Copied {
            now,
            sessions: self.map.iter().map(|(k, s)| (k.clone(), *s)).collect(),
            evicted_strict: self
                .evicted_strict
                .iter()
                .map(|(k, until)| (k.clone(), *until))
                .collect(),
        }
    }

    /// Takes back sessions a [`Sessions::snapshot`] kept (`wall_ms` is
    /// `now` on the wall clock): those not yet ended, up to the bound (the
    /// newest kept), their addresses as they were (a lease checks them as
    /// always: one gone from the pool moves the session, or fails a strict
    /// one). How many came back.
    pub fn restore(&mut self, saved: Vec<SavedSession>, now: Instant, wall_ms: u64) -> usize {
        // A wall clock behind the one that wrote the file (a start before
        // NTP has set it, a VM snapshot) would bring ended sessions back
        // and lengthen the rest: it is now at least the newest session's
        // start, and no session outlives its own lifetime. (A start past
        // the clock and the file's writing by more than a minute is no
        // session this allocator made: dropped, not taken for the clock.)
        let believed = wall_ms.saturating_add(crate::persist::FUTURE_SLACK_MS);
        let mut saved = saved;
        saved.retain(|s| s.created_ms <= believed);
        let wall_ms = saved.iter().map(|s| s.created_ms).fold(wall_ms, u64::max);
        // What is left of a session's time, no more than its lifetime.
        let left = |s: &SavedSession| {
            let left = (s.expires_ms - wall_ms).min(s.expires_ms.saturating_sub(s.created_ms));
            now + Duration::from_millis(left)
        };
        let (mut live, evicted): (Vec<SavedSession>, Vec<SavedSession>) = saved
            .into_iter()
            .filter(|s| {
                s.expires_ms > wall_ms
                    && valid_key(&s.key)
                    && !self.map.contains_key(s.key.as_str())
            })
            .partition(|s| !s.evicted);
        live.sort_by_key(|s| s.created_ms);
        let room = self.max.saturating_sub(self.map.len());
        let skip = live.len().saturating_sub(room);
        // Strict sessions that were pushed out, or are now (over the cap):
        // they fail until their end, as before the restart. All of them,
        // even past the list's bound (a cap lowered over the restart): a
        // strict one dropped would start over on a new address, which is
        // what it is for never to do. They are no more than the last run
        // held, each ends by its end, and a list that full makes room by
        // pushing out sessions that may move, or refusing new ones.
        let over = live.iter().take(skip).filter(|s| s.strict);
        for s in evicted.iter().chain(over) {
            self.remember_strict(Arc::from(s.key.as_str()), left(s));
        }
        let mut n = 0;
        for s in live.into_iter().skip(skip) {
            let created = now
                .checked_sub(Duration::from_millis(wall_ms.saturating_sub(s.created_ms)))
                .unwrap_or(now);
            let expires = left(&s);
            // A key twice in the file (edited or damaged): its first.
            if self.map.contains_key(s.key.as_str()) {
                continue;
            }
            let key: Arc<str> = Arc::from(s.key);
            self.order[usize::from(s.strict)].push_back((created, key.clone()));
            self.note_user(&key, created);
            // An address in the other family's place (a file edited or
            // damaged) would be given for the wrong family for the whole
            // session: that family starts over instead.
            let [v4, v6] = s.ips;
            self.map.insert(
                key,
                Session {
                    ips: [v4.filter(IpAddr::is_ipv4), v6.filter(IpAddr::is_ipv6)],
                    created,
                    expires,
                    strict: s.strict,
                    restored: true,
                },
            );
            n += 1;
        }
        let users = self.users.values_mut().map(|l| &mut l.order);
        for q in self.order.iter_mut().chain(users) {
            q.make_contiguous().sort_by_key(|(created, _)| *created);
        }
        n
    }

    /// Sessions pinned to `ip`.
    pub fn on(&self, ip: IpAddr) -> usize {
        self.map
            .values()
            .filter(|s| s.ips.contains(&Some(ip)))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A user's entry is known by a live session's key: once the session
    /// whose key it held is gone (expired, found ended, pushed out), by
    /// another of the user's; that key is let go, not kept as long as the
    /// user has sessions.
    #[test]
    fn a_users_entry_lets_go_of_a_session_key_gone() {
        let t0 = Instant::now();
        let mut s = Sessions::per_user(10, 2);
        let held_by = |s: &Sessions| -> String {
            let (by, _) = s.users.get_key_value("u").unwrap();
            by.0.to_string()
        };
        let live = |s: &Sessions, key: &str| {
            let (by, _) = s.users.get_key_value("u").unwrap();
            let (k, _) = s.map.get_key_value(key).unwrap();
            Arc::ptr_eq(&by.0, k)
        };
        s.pin("u\0a", ip("10.0.0.1"), Duration::from_secs(1), false, t0);
        s.pin("u\0b", ip("10.0.0.2"), Duration::from_secs(60), false, t0);
        assert_eq!(held_by(&s), "u\0a");
        // Expired in a pass.
        s.expire(t0 + Duration::from_secs(2));
        assert!(live(&s, "u\0b"));
        // Found ended when asked for.
        s.pin(
            "u\0c",
            ip("10.0.0.3"),
            Duration::from_secs(1),
            false,
            t0 + Duration::from_secs(3),
        );
        s.rekey("u");
        assert!(live(&s, "u\0c"));
        let later = t0 + Duration::from_secs(5);
        assert!(matches!(
            s.pinned("u\0c", Family::V4, later, |_| true),
            Pinned::Nothing
        ));
        assert!(live(&s, "u\0b"));
        // Pushed out by the user's own newer one (two at most).
        s.pin(
            "u\0d",
            ip("10.0.0.4"),
            Duration::from_secs(60),
            false,
            later,
        );
        s.pin(
            "u\0e",
            ip("10.0.0.5"),
            Duration::from_secs(60),
            false,
            later,
        );
        assert!(!s.map.contains_key("u\0b"));
        assert!(live(&s, "u\0e") || live(&s, "u\0d"));
        assert_eq!(s.users.get("u").unwrap().live, 2);
    }

    #[test]
    fn sessions_outlive_a_clean_restart_with_their_times_and_bound() {
        let t0 = Instant::now();
        let wall = 1_900_000_000_000u64;
        let mut s = Sessions::new(10);
        s.pin("old", ip("10.0.0.1"), Duration::from_secs(60), true, t0);
        s.pin(
            "new",
            ip("10.0.0.2"),
            Duration::from_secs(600),
            false,
            t0 + Duration::from_secs(5),
        );
        s.pin(
            "new",
            ip("2001:db8::7"),
            Duration::from_secs(1),
            false,
            t0 + Duration::from_secs(5),
        );
        s.pin("short", ip("10.0.0.3"), Duration::from_secs(2), false, t0);
        let now = t0 + Duration::from_secs(10);
        let saved = s.snapshot(now, wall);
        // The ended one is not kept; oldest first; times on the wall clock.
        let keys: Vec<&str> = saved.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, ["old", "new"]);
        assert_eq!(saved[0].expires_ms, wall + 50_000);
        assert_eq!(saved[1].created_ms, wall - 5_000);
        assert!(saved[0].strict);

        // One item far in the future (an edit, a bit flipped) is dropped,
        // not taken for the clock (which ended every other).
        let mut bogus = saved.clone();
        bogus.push(SavedSession {
            key: "future".into(),
            ips: [Some(ip("10.0.0.9")), None],
            created_ms: wall + 10 * 365 * 86_400_000,
            expires_ms: wall + 11 * 365 * 86_400_000,
            strict: false,
            evicted: false,
        });
        let mut r = Sessions::new(10);
        let t1 = Instant::now() + Duration::from_secs(3600);
        assert_eq!(r.restore(bogus, t1, wall + 20_000), 2);
        assert!(r.map.contains_key("old") && !r.map.contains_key("future"));

        // The next allocator, 20 s of wall clock later.
        let mut r = Sessions::new(10);
        assert_eq!(r.restore(saved.clone(), t1, wall + 20_000), 2);
        let good = |_| true;
        assert_eq!(
            r.pinned("old", Family::V4, t1, good),
            Pinned::Address(ip("10.0.0.1"))
        );
        assert_eq!(
            r.pinned("new", Family::V6, t1, good),
            Pinned::Address(ip("2001:db8::7"))
        );
        // Ends when it would have: 30 s left of "old".
        let later = t1 + Duration::from_secs(31);
        assert_eq!(r.pinned("old", Family::V4, later, good), Pinned::Nothing);
        assert_eq!(
            r.pinned("new", Family::V4, later, good),
            Pinned::Address(ip("10.0.0.2"))
        );
        // Past its end by the restart: not back. Over the cap: the newest
        // kept, and the oldest still goes first after; the strict one
        // pushed out fails until its end, as it would have without the
        // restart.
        let mut r = Sessions::new(10);
        assert_eq!(r.restore(saved.clone(), t1, wall + 51_000), 1);
        let mut one = Sessions::new(1);
        assert_eq!(one.restore(saved.clone(), t1, wall + 20_000), 1);
        assert_eq!(one.pinned("old", Family::V4, t1, good), Pinned::Evicted);
        let ended = t1 + Duration::from_secs(31);
        assert_eq!(one.pinned("old", Family::V4, ended, good), Pinned::Nothing);
        // And one evicted before a checkpoint is kept as evicted.
        let kept = one.snapshot(t1, wall + 20_000);
        assert!(kept.iter().any(|s| s.key == "old" && s.evicted), "{kept:?}");
        let mut next = Sessions::new(1);
        next.restore(kept, t1, wall + 20_000);
        assert_eq!(next.pinned("old", Family::V4, t1, good), Pinned::Evicted);
        one.pin("third", ip("10.0.0.9"), Duration::from_secs(9), false, t1);
        assert_eq!(one.pinned("new", Family::V4, t1, good), Pinned::Nothing);
        assert_eq!(one.len(), 1);

        // A wall clock an hour behind at the restart (before NTP set it):
        // the file's time of writing is the floor (`state::take_kept`
        // passes the later of the two), so "old" has at most the 55 s it
        // had from then, not an hour more. (Without that floor, sessions
        // begun more than a minute past the clock are not believed.)
        let mut behind = Sessions::new(10);
        let written = wall;
        assert_eq!(
            behind.restore(saved.clone(), t1, (wall - 3_600_000).max(written)),
            2
        );
        assert_eq!(Sessions::new(10).restore(saved, t1, wall - 3_600_000), 0);
        let after = t1 + Duration::from_secs(56);
        assert_eq!(
            behind.pinned("old", Family::V4, after, good),
            Pinned::Nothing
        );
    }

    /// A cap lowered over a restart: every strict session it pushes out,
    /// and every one pushed out before, fails until its end, even past
    /// the list's bound; none starts over on a new address.
    #[test]
    fn strict_sessions_over_a_lowered_cap_are_all_remembered() {
        let t0 = Instant::now();
        let wall = 1_800_000_000_000;
        let all_good = |_| true;
        let ttl = Duration::from_secs(600);
        // Under a cap of 3: five strict sessions (two pushed out) and a
        // loose one.
        let mut three = Sessions::new(3);
        for (i, k) in ["a", "b", "c", "d", "e", "f"].into_iter().enumerate() {
            let at = t0 + Duration::from_secs(i as u64);
            let ip = IpAddr::from([10, 0, 0, i as u8 + 1]);
            three.pin(k, ip, ttl, k != "f", at);
        }
        let t = t0 + Duration::from_secs(10);
        let saved = three.snapshot(t, wall);
        let evicted = saved.iter().filter(|s| s.evicted).count();
        assert_eq!(evicted, 3, "{saved:?}");
        // Restarted under a cap of 2.
        let mut two = Sessions::new(2);
        let t1 = Instant::now() + Duration::from_secs(3600);
        assert_eq!(two.restore(saved, t1, wall), 2);
        for k in ["a", "b", "c", "d"] {
            assert_eq!(
                two.pinned(k, Family::V4, t1, all_good),
                Pinned::Evicted,
                "{k}"
            );
        }
        assert_eq!(
            two.pinned("e", Family::V4, t1, all_good),
            Pinned::Address(ip("10.0.0.5"))
        );
        // The list past its bound: the next new session pushes out the
        // loose one, not a strict one.
        assert!(two.room("g", t1).is_ok());
        two.pin("g", ip("10.0.0.7"), ttl, false, t1);
        assert_eq!(two.pinned("f", Family::V4, t1, all_good), Pinned::Nothing);
        assert_eq!(
            two.pinned("e", Family::V4, t1, all_good),
            Pinned::Address(ip("10.0.0.5"))
        );
    }

    /// A session begun loose and later asked for as strict is remembered
    /// when a full table pushes it out (it fails, rather than moving).
    #[test]
    fn a_session_made_strict_is_remembered_when_pushed_out() {
        let t0 = Instant::now();
        let all_good = |_| true;
        let mut s = Sessions::new(2);
        s.pin("a", ip("10.0.0.1"), Duration::from_secs(60), false, t0);
        s.pin(
            "b",
            ip("10.0.0.2"),
            Duration::from_secs(60),
            false,
            t0 + Duration::from_secs(1),
        );
        s.make_strict("a");
        s.make_strict("a");
        s.make_strict("nobody");
        let t = t0 + Duration::from_secs(2);
        s.pin("c", ip("10.0.0.3"), Duration::from_secs(60), false, t);
        // The oldest, "a", went, and is remembered as strict.
        assert_eq!(s.pinned("a", Family::V4, t, all_good), Pinned::Evicted);
        assert_eq!(
            s.pinned("b", Family::V4, t, all_good),
            Pinned::Address(ip("10.0.0.2"))
        );
        assert_eq!(s.len(), 2);
        // Its stale loose entry is passed over: "b" goes next, not nothing.
        s.pin("d", ip("10.0.0.4"), Duration::from_secs(60), false, t);
        assert_eq!(s.pinned("b", Family::V4, t, all_good), Pinned::Nothing);
        assert_eq!(s.len(), 2);
    }

    /// A kept file edited or damaged: a key past the bound is not taken
    /// back, and an address in the other family's place is dropped.
    #[test]
    fn a_kept_session_out_of_shape_is_not_taken_back_as_it_is() {
        let wall = 1_900_000_000_000u64;
        let t = Instant::now();
        let kept = |key: String, ips| SavedSession {
            key,
            ips,
            created_ms: wall,
            expires_ms: wall + 60_000,
            strict: false,
            evicted: false,
        };
        let mut s = Sessions::new(10);
        let saved = vec![
            kept("x".repeat(MAX_KEY + 1), [Some(ip("10.0.0.1")), None]),
            kept(String::new(), [Some(ip("10.0.0.1")), None]),
            kept(
                "swapped".into(),
                [Some(ip("2001:db8::1")), Some(ip("10.0.0.2"))],
            ),
            kept(
                "right".into(),
                [Some(ip("10.0.0.3")), Some(ip("2001:db8::3"))],
            ),
        ];
        assert_eq!(s.restore(saved, t, wall), 2);
        let good = |_| true;
        assert_eq!(s.pinned("swapped", Family::V4, t, good), Pinned::Nothing);
        assert_eq!(s.pinned("swapped", Family::V6, t, good), Pinned::Nothing);
        assert_eq!(
            s.pinned("right", Family::V6, t, good),
            Pinned::Address(ip("2001:db8::3"))
        );
    }

    /// One user making new sessions without end pushes out its own oldest
    /// past its share, not everyone else's.
    #[test]
    fn a_user_past_its_share_pushes_out_its_own_sessions() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let good = |_| true;
        let hour = Duration::from_secs(3600);
        let mut s = Sessions::per_user(6, 2);
        s.pin("a\0one", ip("10.0.0.1"), hour, false, at(0));
        s.pin("a\0two", ip("10.0.0.2"), hour, true, at(1));
        s.pin("b\0one", ip("10.0.0.3"), hour, false, at(2));
        // a at its share: its oldest goes, though the table has room.
        s.pin("a\0three", ip("10.0.0.4"), hour, false, at(3));
        assert_eq!(s.len(), 3);
        assert_eq!(s.pinned("a\0one", Family::V4, at(3), good), Pinned::Nothing);
        // A strict one of its own is remembered (it fails until its end).
        s.pin("a\0four", ip("10.0.0.5"), hour, false, at(4));
        assert_eq!(s.pinned("a\0two", Family::V4, at(4), good), Pinned::Evicted);
        // c floods: it holds its two newest, and the others keep theirs
        // (the table keeps room for them: one user holds at most its
        // share of it).
        for i in 0..50 {
            let now = at(10 + i);
            let key = format!("c\0{i}");
            assert_eq!(s.room(&key, now), Ok(()));
            s.pin(&key, ip("10.0.0.6"), hour, false, now);
        }
        assert_eq!(s.len(), 5);
        let held =
            |s: &mut Sessions, k: &str| s.pinned(k, Family::V4, at(60), good) != Pinned::Nothing;
        assert!(held(&mut s, "c\x0049") && held(&mut s, "c\x0048"));
        assert!(!held(&mut s, "c\x0047"));
        assert!(held(&mut s, "b\0one"));
        assert!(held(&mut s, "a\0four"));
        // After an expiry pass the lists hold only live sessions.
        s.expire(at(70));
        assert_eq!(s.users.values().map(|l| l.live).sum::<usize>(), 5);
        s.compact();
        assert_eq!(s.users.values().map(|l| l.order.len()).sum::<usize>(), 5);
        // A user goes with its last session.
        s.expire(at(10_000));
        assert!(s.users.is_empty() && s.is_empty());
    }

    /// Users making sessions in a full table (evicted through the table's
    /// order, each under its share): their lists stay bounded.
    #[test]
    fn the_users_lists_stay_bounded_in_a_full_table() {
        let t0 = Instant::now();
        let hour = Duration::from_secs(3600);
        let mut s = Sessions::per_user(4, 4);
        for i in 0..20_000u64 {
            let now = t0 + Duration::from_millis(i);
            let user = ["a", "b"][(i % 2) as usize];
            s.pin(&format!("{user}\0{i}"), ip("10.0.0.1"), hour, false, now);
            if i % 1000 == 0 {
                s.expire(now);
            }
        }
        assert_eq!(s.len(), 4);
        assert!(s.user_listed <= 4 * 4 + 2048 + 1000, "{}", s.user_listed);
        let total: usize = s.users.values().map(|l| l.order.len()).sum();
        assert_eq!(total, s.user_listed);
    }

    /// A user whose own oldest cannot go (strict, and the list of those
    /// pushed out is full) waits for one to end, rather than push out
    /// another user's; and a user over its share (a lower cap after a
    /// restart) comes down to it.
    #[test]
    fn a_user_at_its_share_of_strict_sessions_waits_and_one_over_comes_down() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let hour = Duration::from_secs(3600);
        let good = |_| true;
        let mut s = Sessions::per_user(4, 2);
        s.pin("b\0loose", ip("10.0.0.1"), hour, false, at(0));
        let mut kept = 0;
        for i in 0..30 {
            let key = format!("e\0{i}");
            if s.room(&key, at(1 + i)).is_ok() {
                s.pin(&key, ip("10.0.0.2"), hour, true, at(1 + i));
                kept += 1;
            }
        }
        // Two held, four remembered as pushed out (the list's bound): then
        // refused, with about when its oldest ends.
        assert_eq!(kept, 6);
        assert_eq!(
            s.pinned("b\0loose", Family::V4, at(40), good),
            Pinned::Address(ip("10.0.0.1"))
        );
        let wait = s.room("e\0next", at(40)).unwrap_err();
        assert!(wait > Duration::from_secs(3500), "{wait:?}");
        assert_eq!(s.room("c\0new", at(40)), Ok(()));

        // Five of one user's sessions kept, the share now 2: its next new
        // one leaves it at 2.
        let wall = 1_900_000_000_000u64;
        let saved: Vec<SavedSession> = (0..5)
            .map(|i| SavedSession {
                key: format!("a\0{i}"),
                ips: [Some(ip("10.0.0.3")), None],
                created_ms: wall + i,
                expires_ms: wall + 3_600_000,
                strict: false,
                evicted: false,
            })
            .chain([SavedSession {
                key: "a\x000".into(),
                ips: [Some(ip("10.0.0.4")), None],
                created_ms: wall,
                expires_ms: wall + 3_600_000,
                strict: false,
                evicted: false,
            }])
            .collect();
        let mut r = Sessions::per_user(10, 2);
        assert_eq!(
            r.restore(saved, t0, wall + 10),
            5,
            "a key twice is taken once"
        );
        assert_eq!(r.users["a"].live, 5);
        r.pin("a\0new", ip("10.0.0.5"), hour, false, t0);
        assert_eq!(r.users["a"].live, 2);
        assert_eq!(r.len(), 2);
    }

    /// A user at its share whose oldest is a live strict session, while
    /// the list of those pushed out is full of ended ones: they are
    /// forgotten and the oldest pushed out (remembered), not a 503 until
    /// the next second's expiry.
    #[test]
    fn a_user_at_its_share_is_not_refused_for_ended_remembered_ones() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let hour = Duration::from_secs(3600);
        let mut s = Sessions::per_user(4, 2);
        s.pin("e\0a", ip("10.0.0.1"), hour, true, at(0));
        s.pin("e\0b", ip("10.0.0.1"), hour, true, at(1));
        // Another user's strict sessions, 5 s each, pushed out by its own
        // newer ones until four are remembered.
        for i in 0..6 {
            let key = format!("f\0{i}");
            assert_eq!(s.room(&key, at(2 + i)), Ok(()), "{key}");
            s.pin(
                &key,
                ip("10.0.0.2"),
                Duration::from_secs(5),
                true,
                at(2 + i),
            );
        }
        assert_eq!(s.evicted_strict.len(), 4);
        // Every remembered one has ended by 20 s (no expiry pass yet).
        assert_eq!(s.room("e\0c", at(20)), Ok(()));
        s.pin("e\0c", ip("10.0.0.3"), hour, true, at(20));
        assert_eq!(
            s.pinned("e\0a", Family::V4, at(20), |_| true),
            Pinned::Evicted
        );
        assert_eq!(
            s.pinned("e\0c", Family::V4, at(20), |_| true),
            Pinned::Address(ip("10.0.0.3"))
        );
    }

    /// A full table drops its ended sessions before it evicts a live one
    /// (the oldest, here a strict one with time left).
    #[test]
    fn ended_sessions_go_before_a_live_one_is_evicted() {
        let t0 = Instant::now();
        let mut s = Sessions::new(2);
        let all_good = |_| true;
        s.pin("live", ip("10.0.0.1"), Duration::from_secs(60), true, t0);
        s.pin("short", ip("10.0.0.2"), Duration::from_secs(1), false, t0);
        let t = t0 + Duration::from_secs(2);
        s.pin("new", ip("10.0.0.3"), Duration::from_secs(60), false, t);
        assert_eq!(
            s.pinned("live", Family::V4, t, all_good),
            Pinned::Address(ip("10.0.0.1"))
        );
        assert_eq!(
            s.pinned("new", Family::V4, t, all_good),
            Pinned::Address(ip("10.0.0.3"))
        );
    }

    /// A table (and list of evicted ones) full of live strict sessions
    /// refuses a new session rather than move a strict one; room comes
    /// back as they end.
    #[test]
    fn strict_sessions_that_cannot_be_remembered_are_not_evicted() {
        let t0 = Instant::now();
        let all_good = |_| true;
        let mut s = Sessions::new(1);
        s.pin("a", ip("10.0.0.1"), Duration::from_secs(30), true, t0);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(s.room("b", t1), Ok(()));
        s.pin("b", ip("10.0.0.2"), Duration::from_secs(10), true, t1);
        assert_eq!(s.pinned("a", Family::V4, t1, all_good), Pinned::Evicted);
        // "a" is remembered, the list is full: "c" waits for "b" to end.
        let t2 = t0 + Duration::from_secs(2);
        assert_eq!(s.room("c", t2), Err(Duration::from_secs(9)));
        s.pin("c", ip("10.0.0.3"), Duration::from_secs(10), false, t2);
        assert_eq!(
            s.pinned("b", Family::V4, t2, all_good),
            Pinned::Address(ip("10.0.0.2")),
            "the strict session keeps its address"
        );
        assert_eq!(s.pinned("c", Family::V4, t2, all_good), Pinned::Nothing);
        // A session already in the table needs no room.
        assert_eq!(s.room("b", t2), Ok(()));
        // "b" ended: room.
        let t3 = t0 + Duration::from_secs(12);
        assert_eq!(s.room("c", t3), Ok(()));
        s.pin("c", ip("10.0.0.3"), Duration::from_secs(10), false, t3);
        assert_eq!(
            s.pinned("c", Family::V4, t3, all_good),
            Pinned::Address(ip("10.0.0.3"))
        );
    }

    /// A strict session that cannot be remembered is passed over for the
    /// oldest that may move; and asking for room pushes nothing out (the
    /// lease may still fail).
    #[test]
    fn a_session_that_may_move_goes_before_a_strict_one_that_cannot_be_remembered() {
        let t0 = Instant::now();
        let all_good = |_| true;
        let at = |s: u64| t0 + Duration::from_secs(s);
        let hour = Duration::from_secs(3600);
        let mut s = Sessions::new(3);
        s.pin("strict-1", ip("10.0.0.1"), hour, true, at(0));
        s.pin("loose-1", ip("10.0.0.2"), hour, false, at(1));
        s.pin("loose-2", ip("10.0.0.3"), hour, false, at(2));
        // Pushed out (oldest), remembered: the list (of 3) has room.
        s.pin("strict-2", ip("10.0.0.4"), hour, true, at(3));
        assert_eq!(
            s.pinned("strict-1", Family::V4, at(3), all_good),
            Pinned::Evicted
        );
        // Fill the list of remembered ones.
        s.remember_strict(Arc::from("x"), at(3) + hour);
        s.remember_strict(Arc::from("y"), at(3) + hour);
        // The oldest, loose-1 then loose-2, may move: they go.
        assert_eq!(s.room("new-1", at(4)), Ok(()));
        assert_eq!(s.len(), 3, "asking pushes nothing out");
        s.pin("new-1", ip("10.0.0.5"), hour, false, at(4));
        s.pin("new-2", ip("10.0.0.6"), hour, false, at(5));
        assert_eq!(
            s.pinned("loose-1", Family::V4, at(5), all_good),
            Pinned::Nothing
        );
        assert_eq!(
            s.pinned("loose-2", Family::V4, at(5), all_good),
            Pinned::Nothing
        );
        // Now strict-2 is the oldest and cannot be remembered: new-1, the
        // oldest that may move, goes instead.
        s.pin("new-3", ip("10.0.0.7"), hour, false, at(6));
        assert_eq!(
            s.pinned("strict-2", Family::V4, at(6), all_good),
            Pinned::Address(ip("10.0.0.4"))
        );
        assert_eq!(
            s.pinned("new-1", Family::V4, at(6), all_good),
            Pinned::Nothing
        );
        for (key, want) in [("new-2", "10.0.0.6"), ("new-3", "10.0.0.7")] {
            assert_eq!(
                s.pinned(key, Family::V4, at(6), all_good),
                Pinned::Address(ip(want))
            );
        }
        // The full list of live ones was never passed over for one ended
        // (it was, twice for each new session: all of it, under the lock).
        assert_eq!(s.strict_passes, 0);
        // Once one has ended (strict-1), it is forgotten: room in the list
        // for strict-2, the oldest now, which is pushed out and remembered.
        let later = at(1) + hour;
        assert_eq!(s.room("new-4", later), Ok(()));
        s.pin("new-4", ip("10.0.0.8"), hour, false, later);
        assert_eq!(
            s.pinned("strict-1", Family::V4, later, all_good),
            Pinned::Nothing
        );
        assert_eq!(
            s.pinned("strict-2", Family::V4, later, all_good),
            Pinned::Evicted
        );
    }

    #[test]
    fn pins_expire_move_and_are_bounded() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut s = Sessions::new(2);
        let all_good = |_| true;
        assert_eq!(s.pinned("a", Family::V4, t0, all_good), Pinned::Nothing);
        s.pin("a", ip("10.0.0.1"), ttl, false, t0);
        assert_eq!(
            s.pinned("a", Family::V4, t0, all_good),
            Pinned::Address(ip("10.0.0.1"))
        );
        assert_eq!(s.pinned("a", Family::V6, t0, all_good), Pinned::Nothing);
        // The address left: said so, and a new pin keeps the lifetime.
        let gone = |a| a != ip("10.0.0.1");
        assert_eq!(
            s.pinned("a", Family::V4, t0, gone),
            Pinned::Gone {
                ip: ip("10.0.0.1"),
                strict: false
            }
        );
        s.pin(
            "a",
            ip("10.0.0.2"),
            Duration::from_secs(1000),
            false,
            t0 + ttl / 2,
        );
        assert_eq!(
            s.pinned("a", Family::V4, t0 + ttl / 2, all_good),
            Pinned::Address(ip("10.0.0.2"))
        );
        assert_eq!(
            s.pinned("a", Family::V4, t0 + ttl, all_good),
            Pinned::Nothing,
            "fixed from the first lease"
        );
        // Bounded: the oldest goes first.
        s.pin("b", ip("10.0.0.3"), ttl, false, t0 + Duration::from_secs(1));
        s.pin("c", ip("10.0.0.4"), ttl, false, t0 + Duration::from_secs(2));
        s.pin("d", ip("10.0.0.5"), ttl, false, t0 + Duration::from_secs(3));
        assert_eq!(s.len(), 2);
        assert_eq!(s.pinned("b", Family::V4, t0, all_good), Pinned::Nothing);
        assert_eq!(s.on(ip("10.0.0.5")), 1);
        s.expire(t0 + Duration::from_secs(100));
        assert!(s.is_empty() && s.order.iter().all(VecDeque::is_empty));
        // A strict session pushed out early says so, until its end.
        let mut s = Sessions::new(1);
        s.pin("strict", ip("10.0.0.1"), ttl, true, t0);
        s.pin("other", ip("10.0.0.2"), ttl, false, t0);
        assert_eq!(
            s.pinned("strict", Family::V4, t0, all_good),
            Pinned::Evicted
        );
        assert_eq!(
            s.pinned("strict", Family::V4, t0 + ttl, all_good),
            Pinned::Nothing
        );
    }
}

/// What a session costs, measured (resident memory, hash-table slack
/// included): `cargo test --release -p rotor-allocator session_cost --
/// --ignored --nocapture`. The README quotes it.
#[cfg(test)]
mod memtest {
    use super::*;

    use crate::rss;

    #[test]
    #[ignore]
    fn session_cost() {
        let n = 200_000;
        // Keys as workers send them: the user, then the session id.
        let keys: Vec<String> = (0..n).map(|i| format!("user\0session-{i:08}")).collect();
        let mut s = Sessions::new(n);
        let now = Instant::now();
        let before = rss();
        for k in &keys {
            s.pin(
                k,
                "10.0.0.1".parse().unwrap(),
                Duration::from_secs(600),
                false,
                now,
            );
        }
        let after = rss();
        eprintln!(
            "sessions={} bytes/session (a {}-byte key)={}",
            s.len(),
            keys[0].len(),
            (after - before) / n
        );
        let t = Instant::now();
        s.expire(now);
        eprintln!("an expiry pass that ends none: {:?}", t.elapsed());
        let t = Instant::now();
        s.compact();
        eprintln!("compacting the lists: {:?}", t.elapsed());
        let t = Instant::now();
        let copied = s.copy(now);
        let copy = t.elapsed();
        let t = Instant::now();
        let saved = copied.saved(1_900_000_000_000);
        eprintln!(
            "copy {copy:?}, made into {} kept {:?}",
            saved.len(),
            t.elapsed()
        );
        // The worst a client can make: a user name near the 1 KiB key's
        // limit, another for each session (without a users file, any
        // name is a user).
        let n = 20_000;
        let long: Vec<String> = (0..n)
            .map(|i| format!("{}{i:08}\0s", "u".repeat(950)))
            .collect();
        let mut s = Sessions::new(n);
        let before = rss();
        for k in &long {
            s.pin(
                k,
                "10.0.0.1".parse().unwrap(),
                Duration::from_secs(600),
                false,
                now,
            );
        }
        eprintln!(
            "sessions={} bytes/session (a {}-byte key, a user each)={}",
            s.len(),
            long[0].len(),
            (rss() - before) / n
        );
    }
}
