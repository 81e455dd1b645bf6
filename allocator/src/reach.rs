//! Pool entries whose connects fail where the others' answer: an address
//! the provider no longer routes to this host (a failover IP moved away,
//! a prefix withdrawn, a null route upstream). It binds, so no usability
//! check finds it, and every request leased it times out or is refused.
//! Told by the workers (every second, off the request's path): answers and
//! tunnels by source (`Request::Metrics`), and failed connects their
//! worker confirmed as the source's fault (`Request::Unreached`: the
//! destination answered another source within seconds before and after
//! each; see the worker's `witness`). A destination that is down, or a
//! port that is closed, confirms none.
//!
//! The rule, per entry: `run` confirmed failures in a row, with no answer
//! and no tunnel from it in between, within [`RUN_AGE`], while an entry of
//! its family answered since that run began. `run` is long enough that the
//! rate of such failures among the other entries' connects (over the last
//! minute or two; the failures of entries in a run left out) makes such a
//! run by chance a one-in-a-billion event: 8 when they are rare, 30 when
//! half of the connects fail so, and none is taken out past 98 %.
//!
//! Taken out for `first` (`--unreachable-quarantine`), then back on trial:
//! another run, a quarter as long (two at least), takes it out for twice
//! as long (to an hour, or `first` if longer); an answer from it, or its
//! release by hand, forgets the run and the doubling. At most a quarter of
//! a family's entries (one at least) are out so at once: whatever goes
//! wrong, the rest stay. Kept per entry with a run or a doubling: bounded
//! by the pool (an entry that leaves the pool is forgotten), and not kept
//! over a restart.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rotor_protocol::Segment;

/// The first time out by default (`--unreachable-quarantine`).
pub const FIRST: Duration = Duration::from_secs(60);
/// The top bit of a destination's name: set for a name by site (a worker
/// older than `MINOR_UNREACHED_BY_NET`), clear for one by network. Names
/// are compared with names of their own kind only.
pub const BY_SITE: u64 = 1 << 63;
/// The shortest run that takes an entry out, however rarely connects fail.
pub const RUN_MIN: u64 = 8;
/// Runs longer than this are never asked for: where the destinations fail
/// so often that a run this long is likely by chance, nothing is taken out.
pub const RUN_MAX: u64 = 1000;
/// The shortest run that takes an entry on trial out again.
pub const TRIAL_MIN: u64 = 2;
/// A run whose first failure is older than this starts over: failures
/// days apart are not "in a row".
pub const RUN_AGE: Duration = Duration::from_secs(600);
/// How much earlier than a run's start an answer from another entry may
/// be reported and still count as "since it began".
const ANSWER_SLACK: Duration = Duration::from_secs(2);
/// How likely the run that takes an entry out may be by chance alone.
const CHANCE: f64 = 1e-9;
/// The window over which the failure rate is counted: this one and the
/// one before.
const WINDOW: Duration = Duration::from_secs(60);
/// The longest time out (unless `first` is longer).
const OUT_MAX: Duration = Duration::from_secs(3600);

/// An entry to take out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Out {
    pub entry: Segment,
    /// Its failed connects in a row.
    pub failed: u64,
    /// For how long.
    pub wait: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Run {
    /// Confirmed failures since its last answer (or its return).
    failed: u64,
    /// The first destination network they were to, of each kind of name
    /// (see [`BY_SITE`]), and whether they were to another of that kind
    /// too: failures to one alone (on whatever ports and names) are that
    /// destination's refusal of this address (its firewall), not the
    /// address's route, and take it out nowhere.
    dest: [Option<u64>; 2],
    several: bool,
    /// When the first of them was reported.
    since: Instant,
    /// Its last time out (zero: none yet).
    out_for: Duration,
}

/// Connects that succeeded, and confirmed failures, within one window.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    ok: u64,
    failed: u64,
}

#[derive(Debug)]
pub struct Reach {
    /// The first time out; zero: nothing is taken out.
    first: Duration,
    runs: HashMap<Segment, Run>,
    /// The two entries of each family last reported answering, and when
    /// (the later first): whether another entry than one answered.
    answered: [[Option<(Segment, Instant)>; 2]; 2],
    /// This window's connects and the last one's, and when this began.
    window: [Counts; 2],
    window_start: Option<Instant>,
}

impl Reach {
    pub fn new(first: Duration) -> Reach {
        Reach {
            first,
            runs: HashMap::new(),
            answered: [[None; 2]; 2],
            window: [Counts::default(); 2],
            window_start: None,
        }
    }

    pub fn set_first(&mut self, first: Duration) {
        self.first = first;
    }

    /// The run that takes an entry out when this share of the other
    /// connects failed so: the shortest whose chance is under one in a
    /// billion, `None` past [`RUN_MAX`].
    pub fn run_needed(failing: f64) -> Option<u64> {
        if failing <= 0.0 {
            return Some(RUN_MIN);
        }
        if failing >= 1.0 {
            return None;
        }
        let run = (CHANCE.ln() / failing.ln()).ceil() as u64;
        (run <= RUN_MAX).then_some(run.max(RUN_MIN))
    }

    /// A worker's report: `connects_ok` connects that succeeded (from any
    /// source), and the answers and tunnels from each entry (`ok`). An
    /// entry that answers is not at fault: its run and doubling are
    /// forgotten.
    pub fn answers(&mut self, now: Instant, connects_ok: u64, ok: &HashMap<Segment, u64>) {
        self.count(now, connects_ok, 0);
        for (e, n) in ok {
            if *n > 0 {
                let last = &mut self.answered[e.family().index()];
                if last[0].is_some_and(|(x, _)| x != *e) {
                    last[1] = last[0];
                }
                last[0] = Some((*e, now));
                self.runs.remove(e);
            }
        }
    }

    /// A worker's confirmed failures by entry, and the destination
    /// networks they were to.
    /// Entries out of the rotation (`out`) are not counted (requests in
    /// flight as one went out tell nothing new); `room` says whether one
    /// more of an entry's family may go out (and counts it). The entries
    /// to take out now.
    pub fn failures(
        &mut self,
        now: Instant,
        failed: &HashMap<Segment, (u64, Vec<u64>)>,
        out: impl Fn(&Segment) -> bool,
        mut room: impl FnMut(&Segment) -> bool,
    ) -> Vec<Out> {
        let total: u64 = failed
            .iter()
            .filter(|(e, _)| !out(e))
            .map(|(_, (n, _))| *n)
            .sum();
        self.count(now, 0, total);
        if self.first.is_zero() {
            return Vec::new();
        }
        let mut taken = Vec::new();
        // The failures of entries in a run begun within the window, left
        // out of the rate (most of them are in it), so failing entries do
        // not raise the bar for each other: summed once, when asked.
        let mut runs_sum: Option<u64> = None;
        for (e, (n, dests)) in failed {
            if *n == 0 || out(e) {
                continue;
            }
            let run = self.runs.entry(*e).or_insert(Run {
                failed: 0,
                dest: [None; 2],
                several: false,
                since: now,
                out_for: Duration::ZERO,
            });
            if run.failed == 0 || now.saturating_duration_since(run.since) > RUN_AGE {
                run.start_over(now);
            }
            run.failed = run.failed.saturating_add(*n);
            for d in dests {
                let dest = &mut run.dest[usize::from(*d & BY_SITE != 0)];
                match *dest {
                    None => *dest = Some(*d),
                    Some(first) => run.several |= first != *d,
                }
            }
            let (failed, since, on_trial) = (run.failed, run.since, !run.out_for.is_zero());
            if failed < TRIAL_MIN || !run.several {
                continue;
            }
            let window = self.window[0].add(self.window[1]);
            let runs = &self.runs;
            let in_runs = *runs_sum.get_or_insert_with(|| {
                runs.values()
                    .filter(|r| now.saturating_duration_since(r.since) <= 2 * WINDOW)
                    .map(|r| r.failed)
                    .sum()
            });
            let others_failed = window.failed.saturating_sub(in_runs);
            let failing = match window.ok.saturating_add(others_failed) {
                0 => 0.0,
                n => others_failed as f64 / n as f64,
            };
            let Some(mut needed) = Self::run_needed(failing) else {
                continue;
            };
            if on_trial {
                // Found failing already: a quarter of the run (two at
                // least) takes it out again, so a blackholed address costs
                // fewer requests each time.
                needed = needed.div_ceil(4).max(TRIAL_MIN);
            }
            // Another entry than this one answered since the run began
            // (within a report's time: answers and failures of one second
            // arrive as two messages, from each worker).
            let others_answered = self.answered[e.family().index()]
                .iter()
                .flatten()
                .any(|(x, t)| x != e && *t + ANSWER_SLACK >= since);
            if failed < needed || !others_answered || !room(e) {
                continue;
            }
            let Some(run) = self.runs.get_mut(e) else {
                continue;
            };
            let wait = match run.out_for.is_zero() {
                true => self.first,
                false => (run.out_for * 2).min(OUT_MAX.max(self.first)),
            };
            run.out_for = wait;
            run.start_over(now);
            // Its failures were its own: the rate counts them no longer
            // (nor does the sum of runs, which held them).
            if let Some(sum) = &mut runs_sum {
                *sum = sum.saturating_sub(failed);
            }
            let mut left = failed;
            for w in &mut self.window {
                let n = left.min(w.failed);
                w.failed -= n;
                left -= n;
            }
            taken.push(Out {
                entry: *e,
                failed,
                wait,
            });
        }
        taken
    }

    fn count(&mut self, now: Instant, ok: u64, failed: u64) {
        match self.window_start {
            Some(t) if now.saturating_duration_since(t) < WINDOW => {}
            Some(t) => {
                // A window gone by, or two: the last one is what the
                // current one held, or nothing.
                let two = now.saturating_duration_since(t) >= 2 * WINDOW;
                self.window[1] = match two {
                    true => Counts::default(),
                    false => self.window[0],
                };
                self.window[0] = Counts::default();
                self.window_start = Some(now);
            }
            None => self.window_start = Some(now),
        }
        let w = &mut self.window[0];
        w.ok = w.ok.saturating_add(ok);
        w.failed = w.failed.saturating_add(failed);
    }

    /// Forgets an entry's run and doubling (released by hand).
    pub fn forget(&mut self, e: &Segment) {
        self.runs.remove(e);
    }

    /// Forgets entries no longer in the pool.
    pub fn retain(&mut self, listed: &HashSet<Segment>) {
        self.runs.retain(|e, _| listed.contains(e));
    }

    /// Entries with a run or a doubling kept.
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}

impl Run {
    /// A new run from `now` (its doubling kept).
    fn start_over(&mut self, now: Instant) {
        self.failed = 0;
        self.dest = [None; 2];
        self.several = false;
        self.since = now;
    }
}

impl Counts {
    fn add(self, o: Counts) -> Counts {
        Counts {
            ok: self.ok.saturating_add(o.ok),
            failed: self.failed.saturating_add(o.failed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(s: &str) -> Segment {
        Segment::single(s.parse().unwrap())
    }

    fn by(items: &[(&str, u64)]) -> HashMap<Segment, u64> {
        items.iter().map(|(e, n)| (seg(e), *n)).collect()
    }

    /// Failures by entry, to two destinations.
    fn fails(items: &[(&str, u64)]) -> HashMap<Segment, (u64, Vec<u64>)> {
        items
            .iter()
            .map(|(e, n)| (seg(e), (*n, vec![1, 2])))
            .collect()
    }

    /// A report: answers from `ok` (one connect each), then the
    /// confirmed failures `failed`; the entries taken out.
    fn report(r: &mut Reach, t: Instant, ok: &[(&str, u64)], failed: &[(&str, u64)]) -> Vec<Out> {
        let ok = by(ok);
        r.answers(t, ok.values().sum(), &ok);
        r.failures(t, &fails(failed), |_| false, |_| true)
    }

    #[test]
    fn the_run_needed_follows_the_failure_rate() {
        assert_eq!(Reach::run_needed(0.0), Some(RUN_MIN));
        assert_eq!(Reach::run_needed(0.01), Some(RUN_MIN));
        assert_eq!(Reach::run_needed(0.5), Some(30));
        assert_eq!(Reach::run_needed(0.9), Some(197));
        assert_eq!(Reach::run_needed(0.99), None);
        assert_eq!(Reach::run_needed(1.0), None);
    }

    #[test]
    fn a_failing_entry_goes_out_when_the_others_answer() {
        let mut r = Reach::new(Duration::from_secs(60));
        let t = Instant::now();
        let s = |n: u64| t + Duration::from_secs(n);
        // Seven failures: not yet.
        assert!(report(&mut r, t, &[("10.0.0.1", 5)], &[("10.0.0.2", 7)]).is_empty());
        let out = report(&mut r, s(1), &[("10.0.0.1", 1)], &[("10.0.0.2", 1)]);
        assert_eq!(
            out,
            vec![Out {
                entry: seg("10.0.0.2"),
                failed: 8,
                wait: Duration::from_secs(60)
            }]
        );
        // Back on trial and failing again: out for twice as long, after
        // a quarter of the run.
        assert!(report(&mut r, s(70), &[("10.0.0.1", 1)], &[("10.0.0.2", 1)]).is_empty());
        let out = report(&mut r, s(71), &[("10.0.0.1", 1)], &[("10.0.0.2", 1)]);
        assert_eq!((out[0].failed, out[0].wait), (2, Duration::from_secs(120)));
        // An answer from it forgets the doubling.
        assert!(report(&mut r, s(200), &[("10.0.0.2", 1)], &[]).is_empty());
        assert!(r.is_empty());
        let out = report(&mut r, s(201), &[("10.0.0.1", 1)], &[("10.0.0.2", 8)]);
        assert_eq!(out[0].wait, Duration::from_secs(60));
        // So does a release by hand.
        r.forget(&seg("10.0.0.2"));
        assert!(r.is_empty());
    }

    #[test]
    fn failures_to_one_destination_alone_take_nothing_out() {
        let mut r = Reach::new(Duration::from_secs(60));
        let t = Instant::now();
        r.answers(t, 5, &by(&[("10.0.0.1", 5)]));
        let one = HashMap::from([(seg("10.0.0.2"), (50, vec![7]))]);
        assert!(r.failures(t, &one, |_| false, |_| true).is_empty());
        // A second destination: out.
        let two = HashMap::from([(seg("10.0.0.2"), (1, vec![8]))]);
        assert_eq!(r.failures(t, &two, |_| false, |_| true).len(), 1);
    }

    /// One destination named by an older worker (by site) and by a newer
    /// one (by network) is not two: names are compared within their kind
    /// (in a rolling upgrade, one site that refused an address took it
    /// out for every user).
    #[test]
    fn names_of_two_kinds_are_not_two_destinations() {
        let mut r = Reach::new(Duration::from_secs(60));
        let t = Instant::now();
        r.answers(t, 5, &by(&[("10.0.0.1", 5)]));
        let mixed = HashMap::from([(seg("10.0.0.2"), (50, vec![7, 9 | BY_SITE]))]);
        assert!(r.failures(t, &mixed, |_| false, |_| true).is_empty());
        let old_two = HashMap::from([(seg("10.0.0.2"), (1, vec![8 | BY_SITE]))]);
        assert_eq!(r.failures(t, &old_two, |_| false, |_| true).len(), 1);
    }

    #[test]
    fn an_entry_whose_own_answers_alone_were_heard_is_not_taken_out() {
        let mut r = Reach::new(Duration::from_secs(60));
        let t = Instant::now();
        // Only 10.0.0.2 itself answered before its run: no other entry.
        r.answers(t, 1, &by(&[("10.0.0.2", 1)]));
        let f = fails(&[("10.0.0.2", 20)]);
        assert!(r.failures(t, &f, |_| false, |_| true).is_empty());
        r.answers(t, 1, &by(&[("10.0.0.3", 1)]));
        let f = fails(&[("10.0.0.2", 1)]);
        assert_eq!(r.failures(t, &f, |_| false, |_| true).len(), 1);
    }

    #[test]
    fn failures_of_a_family_whose_others_never_answer_take_nothing_out() {
        let mut r = Reach::new(Duration::from_secs(60));
        let t = Instant::now();
        for i in 0..20 {
            let at = t + Duration::from_secs(i);
            // (An IPv6 entry's answers say nothing of IPv4's.)
            let f = [("10.0.0.1", 5), ("10.0.0.2", 5)];
            assert!(report(&mut r, at, &[("fd00::1", 3)], &f).is_empty());
        }
    }

    #[test]
    fn an_answer_before_the_run_began_does_not_count_nor_does_an_old_run() {
        let mut r = Reach::new(Duration::from_secs(60));
        let t = Instant::now();
        assert!(report(&mut r, t, &[("10.0.0.1", 5)], &[]).is_empty());
        let at = t + Duration::from_secs(3);
        assert!(report(&mut r, at, &[], &[("10.0.0.2", 50)]).is_empty());
        // Seven failures, then one past RUN_AGE: a run of one.
        let mut r = Reach::new(Duration::from_secs(60));
        assert!(report(&mut r, t, &[("10.0.0.1", 1)], &[("10.0.0.2", 7)]).is_empty());
        let late = t + RUN_AGE + Duration::from_secs(1);
        assert!(report(&mut r, late, &[("10.0.0.1", 1)], &[("10.0.0.2", 1)]).is_empty());
    }

    #[test]
    fn when_many_connects_fail_so_a_longer_run_is_needed() {
        let mut r = Reach::new(Duration::from_secs(60));
        let t = Instant::now();
        // Half of the connects of entries not in a run fail so (the
        // failures of .1's run were forgotten by its answer): 30 in a row.
        r.answers(t, 10, &by(&[("10.0.0.1", 10)]));
        for _ in 0..10 {
            r.failures(t, &fails(&[("10.0.0.3", 1)]), |_| false, |_| true);
            r.answers(t, 0, &by(&[("10.0.0.3", 1)]));
        }
        let f = |n| fails(&[("10.0.0.2", n)]);
        assert!(r.failures(t, &f(29), |_| false, |_| true).is_empty());
        let out = r.failures(t, &f(1), |_| false, |_| true);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].failed, 30);
    }

    #[test]
    fn entries_out_or_gone_are_not_counted_nor_past_the_room_and_off_takes_none_out() {
        let mut r = Reach::new(Duration::from_secs(60));
        let t = Instant::now();
        r.answers(t, 5, &by(&[("10.0.0.1", 5)]));
        let f = fails(&[("10.0.0.2", 50)]);
        assert!(r
            .failures(t, &f, |e| *e == seg("10.0.0.2"), |_| true)
            .is_empty());
        assert!(r.is_empty());
        assert!(
            r.failures(t, &f, |_| false, |_| false).is_empty(),
            "no room"
        );
        assert_eq!(r.len(), 1);
        assert_eq!(
            r.failures(t, &fails(&[("10.0.0.2", 1)]), |_| false, |_| true)
                .len(),
            1
        );
        r.retain(&HashSet::from([seg("10.0.0.1")]));
        assert!(r.is_empty());
        let mut off = Reach::new(Duration::ZERO);
        off.answers(t, 5, &by(&[("10.0.0.1", 5)]));
        assert!(off.failures(t, &f, |_| false, |_| true).is_empty());
    }
}
