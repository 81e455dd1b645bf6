//! Times one process tells another on this host (a request's deadline,
//! `Request::Until`; when a site's request started, `Request::SiteStarted`):
//! microseconds of `CLOCK_MONOTONIC`, which every process of the host
//! reads alike (it does not jump with the wall clock).
//!
//! A process in another time namespace reads that clock with an offset of
//! its own: a worker tells the allocator its clock first on each
//! connection (`Request::Clock`), and its times are read by the
//! difference. A time further than [`SPAN`] from the reader's clock, in
//! the past or the future, is taken as of another clock still and not
//! applied: a request is served as if it had no deadline.

use std::time::Duration;

use nix::time::{clock_gettime, ClockId};

/// The furthest a deadline is taken to be from the reader's clock, past
/// or ahead: far beyond any lease timeout or budget wait, far below the
/// offsets of a time namespace (days of uptime apart).
pub const SPAN: Duration = Duration::from_secs(3600);

/// Now, in microseconds of `CLOCK_MONOTONIC`.
pub fn now_us() -> u64 {
    // (The clock exists on every Linux; 0 is never read.)
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    (t.tv_sec() as u64) * 1_000_000 + (t.tv_nsec() as u64) / 1_000
}

/// The deadline `within` from now.
pub fn after(within: Duration) -> u64 {
    now_us().saturating_add(u64::try_from(within.as_micros()).unwrap_or(u64::MAX))
}

/// `us` as an instant of this process's clock; `None` if further than
/// [`SPAN`] from now (another clock's).
pub fn instant(us: u64) -> Option<std::time::Instant> {
    let (now, now_us) = (std::time::Instant::now(), now_us());
    match standing_at(us, now_us) {
        Standing::Ahead(d) => now.checked_add(d),
        Standing::Passed(d) => now.checked_sub(d),
        Standing::Foreign => None,
    }
}

/// How a deadline stands, read now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// This long left.
    Ahead(Duration),
    /// Passed this long ago: the request is not served.
    Passed(Duration),
    /// Further than [`SPAN`] from this clock: another clock's, not applied.
    Foreign,
}

pub fn standing(deadline_us: u64) -> Standing {
    standing_at(deadline_us, now_us())
}

fn standing_at(deadline_us: u64, now: u64) -> Standing {
    let span = SPAN.as_micros() as u64;
    if deadline_us >= now {
        match deadline_us - now {
            ahead if ahead <= span => Standing::Ahead(Duration::from_micros(ahead)),
            _ => Standing::Foreign,
        }
    } else {
        match now - deadline_us {
            late if late <= span => Standing::Passed(Duration::from_micros(late)),
            _ => Standing::Foreign,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_stands_ahead_or_passed_within_the_span_and_foreign_beyond() {
        let now = 10 * 3_600_000_000;
        let ms = |n: u64| n * 1000;
        assert_eq!(
            standing_at(now + ms(300), now),
            Standing::Ahead(Duration::from_millis(300))
        );
        assert_eq!(standing_at(now, now), Standing::Ahead(Duration::ZERO));
        assert_eq!(
            standing_at(now - ms(5), now),
            Standing::Passed(Duration::from_millis(5))
        );
        let span = SPAN.as_micros() as u64;
        assert_eq!(standing_at(now + span, now), Standing::Ahead(SPAN));
        assert_eq!(standing_at(now + span + 1, now), Standing::Foreign);
        assert_eq!(standing_at(now - span, now), Standing::Passed(SPAN));
        assert_eq!(standing_at(now - span - 1, now), Standing::Foreign);
        assert_eq!(standing_at(0, now), Standing::Foreign);
        assert_eq!(standing_at(u64::MAX, now), Standing::Foreign);
    }

    #[test]
    fn a_time_of_this_clock_is_an_instant_and_one_of_another_is_not() {
        let (before, us) = (std::time::Instant::now(), now_us());
        let at = instant(us - 250_000).unwrap();
        let back = before.saturating_duration_since(at);
        assert!(
            back >= Duration::from_millis(249) && back < Duration::from_millis(300),
            "{back:?}"
        );
        assert!(instant(us + 250_000).unwrap() > before);
        assert_eq!(instant(us + 2 * SPAN.as_micros() as u64), None);
    }

    #[test]
    fn the_clock_moves_on_and_a_deadline_after_it_is_ahead() {
        let a = now_us();
        let d = after(Duration::from_secs(2));
        assert!(now_us() >= a);
        match standing(d) {
            Standing::Ahead(left) => {
                assert!(left <= Duration::from_secs(2) && left > Duration::from_secs(1))
            }
            other => panic!("{other:?}"),
        }
    }
}
