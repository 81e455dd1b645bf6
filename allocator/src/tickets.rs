//! The keys TLS session tickets are sealed with: one set for every worker
//! of the host (`Request::TicketKeys`), so that a client whose next
//! connection another worker takes still resumes its session (with a key
//! of each worker's own, 0 to 2 of 20 reconnections resumed with two
//! workers, and 19 of 20 with one).
//!
//! Three keys at a time: the one new tickets are sealed with, the one it
//! replaced (tickets it sealed are still opened), and the one that
//! replaces it next (a worker that asked after the change seals with it
//! while others have not asked yet: they open its tickets all the same).
//! The keys change every [`ROTATE`], so a ticket opens for that long at
//! least, and at most twice that (a worker says tickets last [`ROTATE`]).
//! Made at random when first asked for, and kept in memory only: a new
//! allocator makes new ones (a client's next connection after that is a
//! full handshake), and no key is ever written to disk.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rotor_protocol::{Response, TicketKey};

/// How long the key new tickets are sealed with is the one.
pub const ROTATE: Duration = Duration::from_secs(rotor_protocol::TICKET_KEY_SECS);

/// The ticket keys, made when first asked for.
#[derive(Default)]
pub struct Tickets(Mutex<Option<Keys>>);

struct Keys {
    previous: Option<TicketKey>,
    current: TicketKey,
    next: TicketKey,
    /// When `current` became the one.
    since: Instant,
}

impl Tickets {
    /// The answer to `Request::TicketKeys` at `now`: the keys (the one to
    /// seal with first), and when to ask again at the latest (the next
    /// change).
    pub fn answer(&self, now: Instant) -> Response {
        let mut keys = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let made = match keys.take() {
            Some(k) => turned(k, now),
            None => TicketKey::random().and_then(|current| {
                Ok(Keys {
                    previous: None,
                    current,
                    next: TicketKey::random()?,
                    since: now,
                })
            }),
        };
        match made {
            Ok(k) => {
                let left = ROTATE.saturating_sub(now.saturating_duration_since(k.since));
                let answer = Response::TicketKeys {
                    keys: [Some(&k.current), Some(&k.next), k.previous.as_ref()]
                        .into_iter()
                        .flatten()
                        .cloned()
                        .collect(),
                    next_secs: left.as_secs().max(1),
                };
                *keys = Some(k);
                answer
            }
            Err(e) => Response::Error {
                message: format!("no TLS ticket keys (the random source failed: {e})"),
            },
        }
    }
}

/// `k` as it stands at `now`: turned once for each [`ROTATE`] since its
/// key became the one (twice or more: every key new but the last next).
fn turned(mut k: Keys, now: Instant) -> std::io::Result<Keys> {
    while now.saturating_duration_since(k.since) >= ROTATE {
        let next = TicketKey::random()?;
        k.previous = Some(std::mem::replace(
            &mut k.current,
            std::mem::replace(&mut k.next, next),
        ));
        k.since += ROTATE;
    }
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(r: Response) -> (Vec<TicketKey>, u64) {
        match r {
            Response::TicketKeys { keys, next_secs } => (keys, next_secs),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn the_keys_turn_and_the_one_replaced_still_opens() {
        let t = Tickets::default();
        let t0 = Instant::now();
        let (first, next) = keys(t.answer(t0));
        assert_eq!(first.len(), 2, "no previous key yet");
        assert_ne!(first[0], first[1]);
        assert_eq!(next, ROTATE.as_secs());
        // The same until the change, which is said.
        let (again, next) = keys(t.answer(t0 + Duration::from_secs(3600)));
        assert_eq!(again, first);
        assert_eq!(next, ROTATE.as_secs() - 3600);
        // At the change: the next one seals, the one replaced still opens.
        let (turned, next) = keys(t.answer(t0 + ROTATE));
        assert_eq!(turned[0], first[1]);
        assert_eq!(turned[2], first[0]);
        assert!(!first.contains(&turned[1]));
        assert_eq!(next, ROTATE.as_secs());
        // Asked again only long after: every key is new but what was next.
        let (late, _) = keys(t.answer(t0 + ROTATE * 4 + Duration::from_secs(5)));
        assert!(late.iter().all(|k| !first.contains(k) && *k != turned[0]));
    }
}
