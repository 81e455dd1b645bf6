//! Pool entries whose connects fail while the other entries of their family
//! connect: an address the provider no longer routes to this host (a
//! failover IP moved away, a prefix withdrawn, a null route upstream). It
//! binds, so no usability check finds it, and every request leased it
//! times out or is refused. Told by the workers' metrics reports (every
//! second: connects by source, answers by source), never by the request's
//! path, so it costs a request nothing.
//!
//! The rule, per entry: its connects have failed `run` times in a row with
//! no answer, no tunnel and no connect from it in between, and an entry of
//! its family got an answer since that run began. A destination that is
//! down fails every entry alike and takes none out; an entry that answers
//! anything is not the one at fault. `run` is long enough that the
//! destinations' own failure rate (the share of the other connects that
//! failed, over the last minute or two) makes such a run by chance a
//! one-in-a-billion event: 8 when connects rarely fail, 30 when half of
//! them do, and none is taken out when 98 % of them do.
//!
//! Taken out for `first` (`--unreachable-quarantine`), then back on trial:
//! another run, a quarter as long (two at least), takes it out for twice as long (to an hour, or `first`
//! if longer), an answer from it forgets the run and the doubling. Kept per
//! entry with a run or a doubling: bounded by the pool (an entry that
//! leaves the pool is forgotten).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rotor_protocol::Segment;

/// The first time out by default (`--unreachable-quarantine`).
pub const FIRST: Duration = Duration::from_secs(60);
/// The shortest run that takes an entry out, however rarely connects fail.
pub const RUN_MIN: u64 = 8;
/// Runs longer than this are never asked for: where the destinations fail
/// so often that a run this long is likely by chance, nothing is taken out.
pub const RUN_MAX: u64 = 1000;
/// The shortest run that takes an entry on trial out again.
pub const TRIAL_MIN: u64 = 2;
/// How likely the run that takes an entry out may be by chance alone.
const CHANCE: f64 = 1e-9;
/// The window over which the destinations' failure rate is counted: this
/// one and the one before.
const WINDOW: Duration = Duration::from_secs(60);
/// The longest time out (unless `first` is longer).
const OUT_MAX: Duration = Duration::from_secs(3600);

/// What a report said of one entry: answers and tunnels from it, and its
/// failed connects.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Said {
    pub ok: u64,
    pub failed: u64,
}

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
    /// Failed connects since its last answer (or its return).
    failed: u64,
    /// When the first of them was reported.
    since: Instant,
    /// Its last time out (zero: none yet).
    out_for: Duration,
}

/// Connects that succeeded and failed within one window.
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
    /// When an entry of each family last had an answer reported.
    answered: [Option<Instant>; 2],
    /// This window's connects and the last one's, and when this began.
    window: [Counts; 2],
    window_start: Option<Instant>,
}

impl Reach {
    pub fn new(first: Duration) -> Reach {
        Reach {
            first,
            runs: HashMap::new(),
            answered: [None; 2],
            window: [Counts::default(); 2],
            window_start: None,
        }
    }

    pub fn set_first(&mut self, first: Duration) {
        self.first = first;
    }

    /// The run that takes an entry out when, of the other connects, this
    /// share failed: the shortest whose chance is under one in a billion,
    /// `None` past [`RUN_MAX`].
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

    /// Applies one worker's report: `connects_ok` connects that succeeded
    /// (from any source), and by entry what `said` of it (entries out of
    /// the rotation, `out`, are not counted: a request in flight as one
    /// went out tells nothing new). The entries to take out now.
    pub fn report(
        &mut self,
        now: Instant,
        connects_ok: u64,
        said: &HashMap<Segment, Said>,
        out: impl Fn(&Segment) -> bool,
    ) -> Vec<Out> {
        let failed: u64 = said.values().map(|s| s.failed).sum();
        self.count(now, connects_ok, failed);
        if self.first.is_zero() {
            return Vec::new();
        }
        for (e, s) in said {
            if s.ok > 0 {
                self.answered[e.family().index()] = Some(now);
            }
        }
        let mut taken = Vec::new();
        for (e, s) in said {
            if s.ok > 0 {
                // It answers: not the one at fault, and what it did before
                // is forgotten.
                self.runs.remove(e);
                continue;
            }
            if s.failed == 0 || out(e) {
                continue;
            }
            let run = self.runs.entry(*e).or_insert(Run {
                failed: 0,
                since: now,
                out_for: Duration::ZERO,
            });
            if run.failed == 0 {
                run.since = now;
            }
            run.failed = run.failed.saturating_add(s.failed);
            let window = self.window[0].add(self.window[1]);
            // The others' failure rate: its own failures left out (most
            // are within the window), so a failing entry does not raise
            // the bar it must pass.
            let others_failed = window.failed.saturating_sub(run.failed);
            let others = window.ok.saturating_add(others_failed);
            let failing = match others {
                0 => 0.0,
                n => others_failed as f64 / n as f64,
            };
            let Some(mut needed) = Self::run_needed(failing) else {
                continue;
            };
            if !run.out_for.is_zero() {
                // On trial: it was found failing already, so a quarter of
                // the run (two at least) takes it out again, and a
                // blackholed address costs fewer requests each time.
                needed = needed.div_ceil(4).max(TRIAL_MIN);
            }
            let others_answered = self.answered[e.family().index()].is_some_and(|t| t >= run.since);
            if run.failed < needed || !others_answered {
                continue;
            }
            let wait = match run.out_for.is_zero() {
                true => self.first,
                false => (run.out_for * 2).min(OUT_MAX.max(self.first)),
            };
            // Its failures were its own: the destinations' failure rate
            // counts them no longer.
            let mut left = run.failed;
            for w in &mut self.window {
                let n = left.min(w.failed);
                w.failed -= n;
                left -= n;
            }
            taken.push(Out {
                entry: *e,
                failed: run.failed,
                wait,
            });
            run.out_for = wait;
            run.failed = 0;
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

    fn said(items: &[(&str, u64, u64)]) -> HashMap<Segment, Said> {
        items
            .iter()
            .map(|(e, ok, failed)| {
                (
                    seg(e),
                    Said {
                        ok: *ok,
                        failed: *failed,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn the_run_needed_follows_the_destinations_failure_rate() {
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
        let none = |_: &Segment| false;
        // Seven failures: not yet.
        let s = said(&[("10.0.0.1", 5, 0), ("10.0.0.2", 0, 7)]);
        assert!(r.report(t, 5, &s, none).is_empty());
        let s = said(&[("10.0.0.1", 1, 0), ("10.0.0.2", 0, 1)]);
        let out = r.report(t + Duration::from_secs(1), 1, &s, none);
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
        let s = said(&[("10.0.0.1", 1, 0), ("10.0.0.2", 0, 1)]);
        assert!(r
            .report(t + Duration::from_secs(70), 1, &s, none)
            .is_empty());
        let s = said(&[("10.0.0.1", 1, 0), ("10.0.0.2", 0, 1)]);
        let out = r.report(t + Duration::from_secs(71), 1, &s, none);
        assert_eq!((out[0].failed, out[0].wait), (2, Duration::from_secs(120)));
        // An answer from it forgets the doubling.
        let s = said(&[("10.0.0.2", 1, 0)]);
        assert!(r
            .report(t + Duration::from_secs(200), 1, &s, none)
            .is_empty());
        assert!(r.is_empty());
        let s = said(&[("10.0.0.1", 1, 0), ("10.0.0.2", 0, 8)]);
        let out = r.report(t + Duration::from_secs(201), 1, &s, none);
        assert_eq!(out[0].wait, Duration::from_secs(60));
    }

    #[test]
    fn a_destination_down_for_everyone_takes_nothing_out() {
        let mut r = Reach::new(Duration::from_secs(60));
        let t = Instant::now();
        for i in 0..20 {
            let s = said(&[("10.0.0.1", 0, 5), ("10.0.0.2", 0, 5), ("fd00::1", 3, 0)]);
            // (An IPv6 entry's answers say nothing of IPv4's.)
            assert!(r
                .report(t + Duration::from_secs(i), 3, &s, |_| false)
                .is_empty());
        }
    }

    #[test]
    fn an_entry_that_answers_anything_is_not_at_fault() {
        let mut r = Reach::new(Duration::from_secs(60));
        let t = Instant::now();
        for i in 0..20 {
            let s = said(&[("10.0.0.1", 5, 0), ("10.0.0.2", 1, 9)]);
            assert!(r
                .report(t + Duration::from_secs(i), 6, &s, |_| false)
                .is_empty());
        }
    }

    #[test]
    fn an_answer_before_the_run_began_does_not_count() {
        let mut r = Reach::new(Duration::from_secs(60));
        let t = Instant::now();
        let s = said(&[("10.0.0.1", 5, 0)]);
        assert!(r.report(t, 5, &s, |_| false).is_empty());
        let s = said(&[("10.0.0.2", 0, 50)]);
        assert!(r
            .report(t + Duration::from_secs(1), 0, &s, |_| false)
            .is_empty());
    }

    #[test]
    fn when_most_connects_fail_a_longer_run_is_needed() {
        let mut r = Reach::new(Duration::from_secs(60));
        let t = Instant::now();
        // Half of the others' connects fail: 30 in a row needed.
        let s = said(&[("10.0.0.1", 10, 10), ("10.0.0.2", 0, 29)]);
        assert!(r.report(t, 10, &s, |_| false).is_empty());
        let s = said(&[("10.0.0.1", 1, 1), ("10.0.0.2", 0, 1)]);
        let out = r.report(t, 1, &s, |_| false);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].failed, 30);
    }

    #[test]
    fn entries_out_or_gone_are_not_counted_and_off_takes_none_out() {
        let mut r = Reach::new(Duration::from_secs(60));
        let t = Instant::now();
        let s = said(&[("10.0.0.1", 5, 0), ("10.0.0.2", 0, 50)]);
        assert!(r.report(t, 5, &s, |e| *e == seg("10.0.0.2")).is_empty());
        assert!(r.is_empty());
        let s = said(&[("10.0.0.1", 5, 0), ("10.0.0.2", 0, 3)]);
        r.report(t, 5, &s, |_| false);
        assert_eq!(r.len(), 1);
        r.retain(&HashSet::from([seg("10.0.0.1")]));
        assert!(r.is_empty());
        let mut off = Reach::new(Duration::ZERO);
        let s = said(&[("10.0.0.1", 5, 0), ("10.0.0.2", 0, 50)]);
        assert!(off.report(t, 5, &s, |_| false).is_empty());
    }
}
