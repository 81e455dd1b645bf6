//! Requests waiting for a site's budget (`--budget-wait`, sent as
//! `LeaseSiteWait`): the allocator holds them per site in arrival order,
//! across every worker, and answers each as soon as an address may serve
//! it — the longest waiting first — or at the end of its wait with the
//! refusal. Before, each worker slept until the refusal's end and asked
//! again: every waiter woke at once and raced the others and newcomers,
//! so one waiting longest could lose each round and get 429 at its end
//! while later ones were served.
//!
//! Bounded: at most [`MAX_WAITERS`] in all (past it a request is answered
//! at once, as `LeaseSite`), each for at most an hour (`--budget-wait`'s
//! cap); a waiter whose peer left, or that its worker gave up
//! (`CancelWait`), goes without a lease taken for it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rotor_protocol::{Envelope, Families, Response, ServerFrame};
use tokio::sync::mpsc;

/// Most requests held waiting, over all sites (under 100 bytes each, and
/// the site's name once per site), and of one peer (a worker, or any
/// user let in to lease): no peer holds them all.
pub const MAX_WAITERS: usize = 16_384;
pub const MAX_PER_PEER: usize = MAX_WAITERS / 2;
/// The longest wait held (`--budget-wait`'s cap).
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// Where a held request's answer goes: its connection's late replies,
/// under the request's envelope id.
#[derive(Debug, Clone)]
pub struct Reply {
    pub peer: u64,
    pub id: u64,
    pub tx: mpsc::UnboundedSender<ServerFrame>,
    /// When its peer gives the request up (`Request::Until`), if it said.
    pub given_up: Option<Instant>,
}

impl Reply {
    fn send(self, body: Response) {
        let _ = self
            .tx
            .send(ServerFrame::Response(Envelope { id: self.id, body }));
    }

    /// Whether nobody will read the answer: the connection ended, or its
    /// peer gave the request up (the allocator stalled past it: served,
    /// it spent a site's budget for nobody).
    fn is_gone(&self, now: Instant) -> bool {
        self.tx.is_closed() || self.given_up.is_some_and(|g| g <= now)
    }
}

#[derive(Debug)]
struct Waiter {
    families: Families,
    deadline: Instant,
    /// Its last refusal: when it ends, and whether it was a cooldown.
    until: Instant,
    cooling: bool,
    reply: Reply,
}

#[derive(Debug)]
struct Queue {
    waiting: VecDeque<Waiter>,
    /// When an address may next serve one of them (the earliest refusal's
    /// end); a pool change brings it forward.
    next_try: Instant,
    /// The earliest end of a wait held.
    first_deadline: Instant,
    /// Waiters held by the families they accept (see `slot`).
    by_families: [u32; 4],
}

/// `families`' place in `Queue::by_families`.
fn slot(families: Families) -> usize {
    usize::from(families.v4) | usize::from(families.v6) << 1
}

#[derive(Debug, Default)]
pub struct Waiters {
    sites: HashMap<Arc<str>, Queue>,
    count: usize,
    per_peer: HashMap<u64, usize>,
    /// Each request held, by (peer, envelope id): its site and families,
    /// so a cancel finds its queue and counts without a scan.
    held: HashMap<(u64, u64), (Arc<str>, Families)>,
    /// Requests cancelled while still in their queue: counted out at
    /// once, dropped when a pass meets them, or all at once when there
    /// are more of them than requests held (so a cancel costs O(1), where
    /// a scan of 16 384 held ones under the allocator's lock cost
    /// ≈ 100 µs), or with their queue when it holds nothing else.
    cancelled: HashSet<(u64, u64)>,
    /// When the serving task is to look next (`None`: not at all).
    armed: Option<Instant>,
}

/// A refusal until `until` (`cooling`: by a site's push-back), as
/// answered at `now`.
pub fn throttled(until: Instant, cooling: bool, now: Instant) -> Response {
    Response::Throttled {
        retry_after_ms: until.saturating_duration_since(now).as_millis().max(1) as u64,
        cooling,
    }
}

/// The refusal `answer` is, answered at `now`, if it is one: until when,
/// and whether by a push-back.
pub fn refusal(answer: &Response, now: Instant) -> Option<(Instant, bool)> {
    match *answer {
        Response::Throttled {
            retry_after_ms,
            cooling,
        } => Some((now + Duration::from_millis(retry_after_ms), cooling)),
        _ => None,
    }
}

impl Waiters {
    /// Requests held.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The families of `families` that requests held for `site` claim
    /// (each claims the families it accepts): a new request goes behind
    /// them in those, and may be served at once only from another (a
    /// dual-stack one, from the family no one waits for). With them, when
    /// they are tried next and whether the first of them was refused by a
    /// cooldown.
    pub fn ahead(&self, site: &str, families: Families) -> Option<(Families, Instant, bool)> {
        if self.sites.is_empty() {
            return None;
        }
        let q = self.sites.get(site)?;
        let held = (1..4)
            .filter(|&s| q.by_families[s] > 0)
            .fold(0, |all, s| all | s);
        let claimed = held & slot(families);
        if claimed == 0 {
            return None;
        }
        let first = q.waiting.iter().find(|w| {
            slot(w.families) & claimed != 0 && !self.cancelled.contains(&(w.reply.peer, w.reply.id))
        })?;
        let claimed = Families {
            v4: claimed & 1 != 0,
            v6: claimed & 2 != 0,
        };
        Some((claimed, q.next_try, first.cooling))
    }

    /// Holds a request for `site` until `deadline` (at most [`MAX_WAIT`]
    /// from now), refused until `until` (`cooling`: by a cooldown). Given
    /// back past [`MAX_WAITERS`], or its peer's [`MAX_PER_PEER`]; else
    /// whether the serving task must be woken (it is due before the task
    /// looks).
    pub fn hold(
        &mut self,
        site: &str,
        families: Families,
        deadline: Instant,
        (until, cooling): (Instant, bool),
        reply: Reply,
    ) -> Result<bool, Reply> {
        let mine = self.per_peer.get(&reply.peer).copied().unwrap_or(0);
        let key = (reply.peer, reply.id);
        // (An envelope id held twice on one connection: only a peer that
        // breaks the protocol sends it.)
        let reused = self.held.contains_key(&key) || self.cancelled.contains(&key);
        if self.count >= MAX_WAITERS || mine >= MAX_PER_PEER || reused {
            return Err(reply);
        }
        *self.per_peer.entry(reply.peer).or_default() += 1;
        let site: Arc<str> = match self.sites.get_key_value(site) {
            Some((k, _)) => k.clone(),
            None => site.into(),
        };
        self.held.insert(key, (site.clone(), families));
        let queue = self.sites.entry(site).or_insert_with(|| Queue {
            waiting: VecDeque::new(),
            next_try: until,
            first_deadline: deadline,
            by_families: [0; 4],
        });
        queue.next_try = queue.next_try.min(until);
        queue.first_deadline = queue.first_deadline.min(deadline);
        queue.by_families[slot(families)] += 1;
        queue.waiting.push_back(Waiter {
            families,
            deadline,
            until,
            cooling,
            reply,
        });
        self.count += 1;
        let due = until.min(deadline);
        Ok(self.armed.is_none_or(|armed| due < armed))
    }

    /// When something is due (a site's next try, or a wait's end), noted
    /// as when the serving task looks next.
    pub fn arm(&mut self) -> Option<Instant> {
        self.armed = self
            .sites
            .values()
            .map(|q| q.next_try.min(q.first_deadline))
            .min();
        self.armed
    }

    /// Every site is tried again at its next look (the pool changed: new
    /// addresses may serve them). Whether the serving task must be woken.
    pub fn try_all_now(&mut self, now: Instant) -> bool {
        for q in self.sites.values_mut() {
            q.next_try = q.next_try.min(now);
        }
        !self.sites.is_empty()
    }

    /// The held request of envelope `id` from `peer` is given up.
    pub fn cancel(&mut self, peer: u64, id: u64) {
        let Some((site, families)) = self.held.remove(&(peer, id)) else {
            return;
        };
        let Some(q) = self.sites.get_mut(&site) else {
            return;
        };
        count_out(
            &mut self.per_peer,
            &mut self.count,
            &mut q.by_families,
            peer,
            families,
        );
        if q.by_families.iter().all(|&n| n == 0) {
            // Nothing else held there: the queue goes, its cancelled ones
            // with it.
            if let Some(q) = self.sites.remove(&site) {
                for w in q.waiting {
                    self.cancelled.remove(&(w.reply.peer, w.reply.id));
                }
            }
            return;
        }
        self.cancelled.insert((peer, id));
        if self.cancelled.len() > self.count.max(64) {
            self.remove(|_| false);
        }
    }

    /// Every request of `peer` is given up (its connection ended).
    pub fn forget_peer(&mut self, peer: u64) {
        if self.per_peer.contains_key(&peer) {
            self.remove(|r| r.peer == peer);
        }
    }

    /// Drops the requests `gone` says, and every cancelled one.
    fn remove(&mut self, gone: impl Fn(&Reply) -> bool) {
        let (mut count, per_peer) = (self.count, &mut self.per_peer);
        let (held, cancelled) = (&mut self.held, &mut self.cancelled);
        self.sites.retain(|_, q| {
            q.waiting.retain(|w| {
                if cancelled.remove(&(w.reply.peer, w.reply.id)) {
                    return false;
                }
                let keep = !gone(&w.reply);
                if !keep {
                    left(per_peer, held, &mut count, &mut q.by_families, w);
                }
                keep
            });
            !q.waiting.is_empty()
        });
        self.count = count;
    }

    /// Answers what is due at `now`: at each site whose next try has come,
    /// its waiters in arrival order, each with `try_lease(site, families,
    /// peer)` (its answer sent, unless a [`refusal`]) until a refusal — after which only waiters of other families
    /// are tried (they may have addresses free) — and every wait that
    /// ended, with its refusal. Returns how many were answered.
    pub fn serve(
        &mut self,
        now: Instant,
        mut try_lease: impl FnMut(&str, Families, u64) -> Response,
    ) -> usize {
        let mut answered = 0;
        let (mut count, per_peer) = (self.count, &mut self.per_peer);
        let (held, cancelled) = (&mut self.held, &mut self.cancelled);
        self.sites.retain(|site, q| {
            let due = q.next_try <= now;
            if !due && q.first_deadline > now {
                return true;
            }
            // Families refused in this pass, and until when.
            let mut refused: Vec<(Families, Instant, bool)> = Vec::new();
            let mut kept = VecDeque::with_capacity(q.waiting.len());
            let (mut next_try, mut first_deadline) = (None::<Instant>, None::<Instant>);
            for mut w in q.waiting.drain(..) {
                if !cancelled.is_empty() && cancelled.remove(&(w.reply.peer, w.reply.id)) {
                    continue;
                }
                if w.reply.is_gone(now) {
                    left(per_peer, held, &mut count, &mut q.by_families, &w);
                    continue;
                }
                if due {
                    match refused.iter().find(|(f, ..)| *f == w.families) {
                        Some(&(_, until, cooling)) => (w.until, w.cooling) = (until, cooling),
                        None => {
                            let answer = try_lease(site, w.families, w.reply.peer);
                            let Some((until, cooling)) = refusal(&answer, now) else {
                                left(per_peer, held, &mut count, &mut q.by_families, &w);
                                w.reply.send(answer);
                                answered += 1;
                                continue;
                            };
                            refused.push((w.families, until, cooling));
                            (w.until, w.cooling) = (until, cooling);
                        }
                    }
                }
                if w.deadline <= now || w.until > w.deadline {
                    // Its wait ends before an address may serve it.
                    left(per_peer, held, &mut count, &mut q.by_families, &w);
                    w.reply.send(throttled(w.until, w.cooling, now));
                    answered += 1;
                    continue;
                }
                next_try = Some(next_try.map_or(w.until, |t| t.min(w.until)));
                first_deadline = Some(first_deadline.map_or(w.deadline, |t| t.min(w.deadline)));
                kept.push_back(w);
            }
            q.waiting = kept;
            match (next_try, first_deadline) {
                (Some(t), Some(d)) => {
                    // Not due: its try stays (a pool change brought it
                    // forward).
                    q.next_try = if due { t } else { q.next_try.min(t) };
                    q.first_deadline = d;
                    true
                }
                _ => false,
            }
        });
        self.count = count;
        answered
    }
}

/// Waiter `w` leaves its queue (its counts and its place in `held` with
/// it).
fn left(
    per_peer: &mut HashMap<u64, usize>,
    held: &mut HashMap<(u64, u64), (Arc<str>, Families)>,
    count: &mut usize,
    by_families: &mut [u32; 4],
    w: &Waiter,
) {
    held.remove(&(w.reply.peer, w.reply.id));
    count_out(per_peer, count, by_families, w.reply.peer, w.families);
}

/// A request of `peer` for `families` is no longer held: the counts.
fn count_out(
    per_peer: &mut HashMap<u64, usize>,
    count: &mut usize,
    by_families: &mut [u32; 4],
    peer: u64,
    families: Families,
) {
    *count -= 1;
    by_families[slot(families)] -= 1;
    if let Some(n) = per_peer.get_mut(&peer) {
        *n -= 1;
        if *n == 0 {
            per_peer.remove(&peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(peer: u64, id: u64) -> (Reply, mpsc::UnboundedReceiver<ServerFrame>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Reply {
                peer,
                id,
                tx,
                given_up: None,
            },
            rx,
        )
    }

    fn answer(rx: &mut mpsc::UnboundedReceiver<ServerFrame>) -> Option<Response> {
        match rx.try_recv().ok()? {
            ServerFrame::Response(env) => Some(env.body),
            other => panic!("{other:?}"),
        }
    }

    fn leased(n: u64) -> Response {
        Response::Error {
            message: format!("lease {n}"),
        }
    }

    /// Waiters are served in arrival order as budget comes, one a try; a
    /// refusal stops the pass; a wait that ends before an address may
    /// serve it is answered with the refusal; a waiter whose connection
    /// ended is passed over with no lease taken for it.
    #[test]
    fn waiters_are_served_first_come_first_served() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut w = Waiters::default();
        let mut rxs = Vec::new();
        for (id, deadline) in [(1, 5000), (2, 5000), (3, 150), (4, 5000)] {
            let (r, rx) = reply(7, id);
            w.hold(
                "example.com",
                Families::ANY,
                ms(deadline),
                (ms(100), false),
                r,
            )
            .unwrap();
            rxs.push(rx);
        }
        // Peer 8's waiter, whose connection is gone.
        let (r, rx) = reply(8, 5);
        w.hold("example.com", Families::ANY, ms(5000), (ms(100), false), r)
            .unwrap();
        drop(rx);
        assert_eq!(w.len(), 5);
        assert_eq!(w.arm(), Some(ms(100)));
        // Nothing is due before the next try.
        assert_eq!(w.serve(ms(50), |_, _, _| panic!("tried early")), 0);
        // One address free at 100 ms, then one at each 100 ms after.
        let budget = std::cell::Cell::new(1);
        let lease = |at: u64| {
            let budget = &budget;
            move |_: &str, _: Families, _: u64| match budget.get() {
                0 => throttled(ms(at + 100), false, ms(at)),
                n => {
                    budget.set(n - 1);
                    leased(at)
                }
            }
        };
        assert_eq!(
            w.serve(ms(100), lease(100)),
            2,
            "the first served, the third's wait over"
        );
        assert_eq!(answer(&mut rxs[0]), Some(leased(100)));
        assert_eq!(answer(&mut rxs[1]), None);
        // The third's wait ends (150 ms) before the next try (200 ms).
        assert_eq!(
            answer(&mut rxs[2]),
            Some(Response::Throttled {
                retry_after_ms: 100,
                cooling: false
            })
        );
        assert_eq!(w.arm(), Some(ms(200)));
        budget.set(1);
        assert_eq!(w.serve(ms(200), lease(200)), 1);
        assert_eq!(answer(&mut rxs[1]), Some(leased(200)));
        assert_eq!(answer(&mut rxs[3]), None);
        budget.set(1);
        // The gone waiter is passed over: the fourth gets the lease.
        assert_eq!(w.serve(ms(300), lease(300)), 1);
        assert_eq!(answer(&mut rxs[3]), Some(leased(300)));
        assert_eq!(budget.get(), 0);
        assert!(w.is_empty());
        assert_eq!(w.arm(), None);
    }

    /// The serving task is woken by a hold due before it looks next, and
    /// by any hold once it looks at nothing (`arm` gave `None`), whatever
    /// it was armed for before.
    #[test]
    fn a_hold_wakes_the_task_unless_it_looks_in_time() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut w = Waiters::default();
        let (tx, _rx) = mpsc::unbounded_channel();
        let reply = |id| Reply {
            peer: 1,
            id,
            tx: tx.clone(),
            given_up: None,
        };
        let hold = |w: &mut Waiters, id, at| {
            w.hold("s", Families::ANY, ms(5000), (ms(at), false), reply(id))
                .unwrap()
        };
        assert!(hold(&mut w, 1, 500), "the task looks at nothing");
        assert_eq!(w.arm(), Some(ms(500)));
        assert!(!hold(&mut w, 2, 700), "due after the task looks");
        assert!(hold(&mut w, 3, 100), "due before");
        w.cancel(1, 1);
        w.cancel(1, 2);
        w.cancel(1, 3);
        assert_eq!(w.arm(), None);
        assert!(hold(&mut w, 4, 900), "armed for nothing: woken");
    }

    /// A refusal for one family stops its waiters only: a waiter of the
    /// other family behind them is tried.
    #[test]
    fn a_refused_family_does_not_hold_up_the_other() {
        let t0 = Instant::now();
        let mut w = Waiters::default();
        let (a, mut a_rx) = reply(1, 1);
        let (b, mut b_rx) = reply(1, 2);
        let (c, mut c_rx) = reply(1, 3);
        let late = t0 + Duration::from_secs(60);
        w.hold("s", Families::V6, late, (t0, false), a).unwrap();
        w.hold("s", Families::V6, late, (t0, false), b).unwrap();
        w.hold("s", Families::V4, late, (t0, false), c).unwrap();
        let claimed = |f| w.ahead("s", f).map(|(c, ..)| c);
        assert_eq!(claimed(Families::V4), Some(Families::V4));
        assert_eq!(claimed(Families::ANY), Some(Families::ANY));
        let mut asked = Vec::new();
        w.serve(t0, |_, f, _| {
            asked.push(f);
            match f == Families::V4 {
                true => leased(4),
                false => throttled(t0 + Duration::from_secs(1), true, t0),
            }
        });
        assert_eq!(asked, [Families::V6, Families::V4], "v6 tried once");
        assert_eq!(answer(&mut c_rx), Some(leased(4)));
        assert_eq!(answer(&mut a_rx), None);
        assert_eq!(answer(&mut b_rx), None);
        assert_eq!(w.len(), 2);
        assert_eq!(w.arm(), Some(t0 + Duration::from_secs(1)));
    }

    /// A cancel counts the request out at once, and it is never served:
    /// passed over by the next look, dropped with the others when they
    /// outnumber what is held, or with a queue that holds nothing else.
    #[test]
    fn cancelled_requests_are_counted_out_and_never_served() {
        let t0 = Instant::now();
        let late = t0 + Duration::from_secs(60);
        let mut w = Waiters::default();
        let mut rxs = Vec::new();
        for id in 0..200 {
            let (r, rx) = reply(1, id);
            w.hold("s", Families::V4, late, (t0, id == 0), r).unwrap();
            rxs.push(rx);
        }
        // The first (refused by a cooldown) cancelled: the second is first.
        w.cancel(1, 0);
        w.cancel(1, 0);
        assert_eq!(w.len(), 199);
        assert_eq!(w.ahead("s", Families::V4).map(|a| a.2), Some(false));
        assert!(
            w.hold("s", Families::V4, late, (t0, false), reply(1, 0).0)
                .is_err(),
            "an envelope id held again"
        );
        for id in 1..60 {
            w.cancel(1, id);
        }
        assert_eq!((w.len(), w.cancelled.len()), (140, 60));
        // A look serves the first not cancelled.
        let mut served = 0;
        w.serve(t0, |_, _, _| match served {
            0 => {
                served += 1;
                leased(1)
            }
            _ => throttled(t0 + Duration::from_secs(1), false, t0),
        });
        assert!(rxs[..60].iter_mut().all(|rx| answer(rx).is_none()));
        assert_eq!(answer(&mut rxs[60]), Some(leased(1)));
        assert_eq!((w.len(), w.cancelled.len()), (139, 0));
        // More cancelled than held: all dropped at once.
        for id in 61..131 {
            w.cancel(1, id);
        }
        assert_eq!(w.len(), 69);
        assert_eq!(w.cancelled.len(), 0);
        assert_eq!(w.sites["s"].waiting.len(), 69);
        // The last one cancelled: its queue goes.
        for id in 131..200 {
            w.cancel(1, id);
        }
        assert!(w.is_empty() && w.sites.is_empty() && w.cancelled.is_empty());
        assert!(w.held.is_empty() && w.per_peer.is_empty());
        assert_eq!(w.arm(), None);
    }

    /// Held requests are bounded; cancelled and forgotten ones go.
    #[test]
    fn waiters_are_bounded_and_go_when_given_up() {
        // (The README's cost of one.)
        assert!(std::mem::size_of::<Waiter>() <= 80);
        let t0 = Instant::now();
        let mut w = Waiters::default();
        let (tx, _rx) = mpsc::unbounded_channel();
        let reply = |peer, id| Reply {
            peer,
            id,
            tx: tx.clone(),
            given_up: None,
        };
        let hold = |w: &mut Waiters, site: &str, r| w.hold(site, Families::ANY, t0, (t0, false), r);
        // One peer holds half at most.
        for id in 0..MAX_PER_PEER as u64 {
            hold(&mut w, &format!("site{}", id % 100), reply(0, id)).unwrap();
        }
        assert!(hold(&mut w, "one.more", reply(0, u64::MAX)).is_err());
        for id in 0..(MAX_WAITERS - MAX_PER_PEER) as u64 {
            hold(&mut w, &format!("site{}", id % 100), reply(1 + id % 2, id)).unwrap();
        }
        assert!(hold(&mut w, "one.more", reply(3, 0)).is_err());
        w.cancel(1, 0);
        assert_eq!(w.len(), MAX_WAITERS - 1);
        w.forget_peer(0);
        assert_eq!(w.len(), MAX_WAITERS - 1 - MAX_PER_PEER);
        w.forget_peer(1);
        w.forget_peer(2);
        assert!(w.is_empty());
        assert!(w.sites.is_empty());
        assert!(w.per_peer.is_empty());
        assert!(w.held.is_empty() && w.cancelled.is_empty());
    }
}
