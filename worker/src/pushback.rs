//! Reading a destination's response for push-back: `429`, `503` with a
//! `Retry-After`, a status the operator counts, or rate-limit headers that
//! say no request is left. The response itself passes unchanged; the
//! allocator is told, and cools the (address, site) pair for every worker.
//!
//! Read: `Retry-After` (delay-seconds or an HTTP-date); `RateLimit`
//! (draft-ietf-httpapi-ratelimit-headers, both the `limit=, remaining=,
//! reset=` form and the structured `"policy";r=0;t=30` form);
//! `RateLimit-Remaining` / `RateLimit-Reset`; `X-RateLimit-Remaining` /
//! `X-RateLimit-Reset` (seconds, or a Unix time when it is one, in any of
//! them). A
//! remaining count of 0 with a reset cools the pair until the reset; a
//! count above 0 changes nothing (the budget rotor keeps is the operator's).

use std::time::{Duration, SystemTime};

use http::header::HeaderName;
use http::StatusCode;

use crate::fields::{text, Fields};

static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// The names of the fields read below but for the resets (which come with
/// a remaining count), as text: compared with each field's (lengths first).
const LIMIT_NAMES: [&[u8]; 4] = [
    b"retry-after",
    b"ratelimit",
    b"ratelimit-remaining",
    b"x-ratelimit-remaining",
];

/// (remaining, reset, whether a reset may be a Unix time) pairs.
static SPLIT: [(HeaderName, HeaderName, bool); 2] = [
    (
        HeaderName::from_static("ratelimit-remaining"),
        HeaderName::from_static("ratelimit-reset"),
        // The draft says seconds from now; APIs that send a Unix time
        // there exist, and a delta past 10^9 s (31 years) is none.
        true,
    ),
    (
        HeaderName::from_static("x-ratelimit-remaining"),
        HeaderName::from_static("x-ratelimit-reset"),
        true,
    ),
];

/// What a response says of the address that got it, for its site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Pushed back: cool it, for this many seconds if the site said.
    Pushback { retry_after: Option<u32> },
    /// Answered normally.
    Normal,
    /// Neither (an error that says nothing of rate limits).
    Other,
}

/// Longest wait read from a header (a day).
const MAX_WAIT: u64 = 86_400;

pub fn judge(status: StatusCode, fields: &Fields, counted: &[u16]) -> Verdict {
    let code = status.as_u16();
    // Most responses carry none of the fields read below: one pass over
    // the names says so and spares a lookup (a hash of the name) each.
    let limits = fields.iter().any(|(k, _)| {
        LIMIT_NAMES
            .iter()
            .any(|name| k.len() == name.len() && k.eq_ignore_ascii_case(name))
    });
    // The site's clock, for its times of day (read only with those).
    let now = limits.then(|| site_now(fields));
    let retry_after = now.and_then(|now| retry_after(fields, now));
    // A 503 that says to come back, even in words rotor cannot read.
    let come_back = code == 503 && limits && fields.get(&http::header::RETRY_AFTER).is_some();
    if code == 429 || counted.contains(&code) || come_back {
        // Without a `Retry-After` the rate-limit fields' reset says when
        // (an API's `X-RateLimit-Reset`); with both, the later.
        let reset = now.and_then(|now| exhausted_until(fields, now));
        return Verdict::Pushback {
            retry_after: retry_after.max(reset),
        };
    }
    if let Some(reset) = now.and_then(|now| exhausted_until(fields, now)) {
        return Verdict::Pushback {
            retry_after: Some(reset),
        };
    }
    match status.is_success() || status.is_redirection() || status.is_informational() {
        true => Verdict::Normal,
        false => Verdict::Other,
    }
}

/// Now, as the site's clock has it: its answer's `Date` (else this
/// host's clock). A time of day the site gives (an HTTP-date
/// `Retry-After`, a Unix-time reset) is read against it: against this
/// host's clock, a site's clock two minutes slow turned `Retry-After`
/// (its now + 60 s) into none at all, the pair cooled for a second each
/// time.
///
/// A `Date` more than [`DATE_TRUSTED`] from this host's clock is no clock
/// (a front with none says 1970; a 429 cached by a CDN for hours says
/// when it was made, its `Age` how long ago): this host's then. An `Age`
/// is added.
fn site_now(fields: &Fields) -> SystemTime {
    let ours = SystemTime::now();
    let Some(date) = fields
        .get(&http::header::DATE)
        .and_then(text)
        .and_then(|d| httpdate::parse_http_date(d.trim()).ok())
    else {
        return ours;
    };
    let age = fields
        .get(&http::header::AGE)
        .and_then(text)
        .and_then(|a| a.trim().parse::<u64>().ok())
        .map_or(Duration::ZERO, |a| Duration::from_secs(a.min(MAX_WAIT)));
    let theirs = date + age;
    let apart = theirs
        .duration_since(ours)
        .or_else(|_| ours.duration_since(theirs))
        .unwrap_or(Duration::MAX);
    match apart <= DATE_TRUSTED {
        true => theirs,
        false => ours,
    }
}

/// How far a site's `Date` may be from this host's clock and be read as
/// its clock.
const DATE_TRUSTED: Duration = Duration::from_secs(3600);

/// `Retry-After` in seconds from `now` (the site's: see `site_now`).
fn retry_after(fields: &Fields, now: SystemTime) -> Option<u32> {
    let v = text(fields.get(&http::header::RETRY_AFTER)?)?.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // Past u64 is past the cap too, not no `Retry-After`.
        return Some(v.parse::<u64>().unwrap_or(u64::MAX).min(MAX_WAIT) as u32);
    }
    let at = httpdate::parse_http_date(v).ok()?;
    let secs = at
        .duration_since(now)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
        .ceil() as u64;
    Some(secs.min(MAX_WAIT) as u32)
}

/// Seconds until the site's rate limit resets, when its headers say no
/// request is left.
fn exhausted_until(fields: &Fields, now: SystemTime) -> Option<u32> {
    // Every line of a field: a list sent on several lines is one list
    // (RFC 9110 §5.3), and a policy with none left may be on any.
    let lines = |name: &'static HeaderName| {
        let name = name.as_str().as_bytes();
        (fields.iter())
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
            .filter_map(|(_, v)| text(v))
    };
    let num = |s: &str| s.trim().trim_matches('"').parse::<f64>().ok();
    // The draft's one field: `limit=10, remaining=0, reset=30` (early
    // drafts), or a list of policies `"day";r=0;t=3600, "min";r=3;t=20`
    // (later ones): the longest reset of a policy with none left.
    let mut until: Option<u32> = None;
    for v in lines(&RATELIMIT) {
        let members: Vec<&str> = match v.contains(';') {
            true => v.split(',').collect(),
            false => vec![v],
        };
        for member in members {
            let (mut remaining, mut reset) = (None, None);
            for item in member.split([',', ';']) {
                let Some((k, val)) = item.split_once('=') else {
                    continue;
                };
                match k.trim().to_ascii_lowercase().as_str() {
                    "remaining" | "r" => remaining = num(val),
                    "reset" | "t" => reset = num(val),
                    _ => {}
                }
            }
            if let (Some(0.0), Some(r)) = (remaining, reset) {
                until = until.max(Some(seconds(r, true, now)));
            }
        }
    }
    // (Requests left there: the other fields may still say none are.)
    if until.is_some() {
        return until;
    }
    // (Each line a list: `3, 0` is the lines `3` and `0` joined.)
    let values = |name| lines(name).flat_map(|v| v.split(',')).filter_map(num);
    for (remaining, reset, maybe_epoch) in &SPLIT {
        if values(remaining).any(|r| r == 0.0) {
            if let Some(reset) = values(reset).reduce(f64::max) {
                return Some(seconds(reset, *maybe_epoch, now));
            }
        }
    }
    None
}

/// A reset in seconds from now; with `maybe_epoch`, a number that can only
/// be a Unix time (past 2001) is taken as one, in seconds or milliseconds.
fn seconds(v: f64, maybe_epoch: bool, now: SystemTime) -> u32 {
    let v = v.max(0.0);
    let v = if maybe_epoch && v > 1e12 {
        v / 1000.0
    } else {
        v
    };
    let secs = if maybe_epoch && v > 1e9 {
        let now = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        (v - now).max(0.0)
    } else {
        v
    };
    (secs.ceil() as u64).min(MAX_WAIT) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The verdict on a response with these fields, the same whether
    /// they came as a map or on the wire (in any case).
    fn verdict(status: u16, pairs: &[(&str, &str)], counted: &[u16]) -> Verdict {
        let status = StatusCode::from_u16(status).unwrap();
        let map = Fields::Map(crate::fields::map_for_tests(pairs));
        let v = judge(status, &map, counted);
        let upper: Vec<(String, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.to_ascii_uppercase(), *v))
            .collect();
        let upper: Vec<(&str, &str)> = upper.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        for pairs in [pairs, &upper[..]] {
            let wire = Fields::Wire(crate::fields::wire_for_tests(pairs));
            assert_eq!(judge(status, &wire, counted), v, "{pairs:?}");
        }
        v
    }

    #[test]
    fn statuses_and_retry_after() {
        let c = [429];
        assert_eq!(verdict(200, &[], &c), Verdict::Normal);
        assert_eq!(verdict(302, &[], &c), Verdict::Normal);
        assert_eq!(verdict(404, &[], &c), Verdict::Other);
        assert_eq!(
            verdict(429, &[], &[403]),
            Verdict::Pushback { retry_after: None },
            "429 always counts"
        );
        assert_eq!(verdict(403, &[], &c), Verdict::Other);
        assert_eq!(
            verdict(403, &[], &[403, 429]),
            Verdict::Pushback { retry_after: None }
        );
        assert_eq!(
            verdict(429, &[], &c),
            Verdict::Pushback { retry_after: None }
        );
        assert_eq!(
            verdict(429, &[("retry-after", "7")], &c),
            Verdict::Pushback {
                retry_after: Some(7)
            }
        );
        assert_eq!(verdict(503, &[], &c), Verdict::Other);
        assert_eq!(
            verdict(503, &[("retry-after", "120")], &c),
            Verdict::Pushback {
                retry_after: Some(120)
            }
        );
        let soon = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        match verdict(429, &[("retry-after", &soon)], &c) {
            Verdict::Pushback {
                retry_after: Some(s),
            } => assert!((28..=31).contains(&s), "{s}"),
            other => panic!("{other:?}"),
        }
        // A site whose clock is two minutes slow: its times of day are
        // read against its own `Date`, not this host's clock (which made
        // its now + 60 s a time past).
        let slow = SystemTime::now() - Duration::from_secs(120);
        let date = httpdate::fmt_http_date(slow);
        let then = httpdate::fmt_http_date(slow + Duration::from_secs(60));
        let reset = (slow + Duration::from_secs(45))
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            .to_string();
        let cases: [&[(&str, &str)]; 2] = [
            &[("date", &date), ("retry-after", &then)],
            &[
                ("date", &date),
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", &reset),
            ],
        ];
        // A `Date` that is no clock (1970), or a cached 429's (its `Age`
        // added), does not stretch the wait.
        let now_reset = (SystemTime::now() + Duration::from_secs(45))
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            .to_string();
        let epoch = httpdate::fmt_http_date(SystemTime::UNIX_EPOCH);
        let cached = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(600));
        for (date, age) in [(&epoch, "0"), (&cached, "600")] {
            let fields = [
                ("date", date.as_str()),
                ("age", age),
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", &now_reset),
            ];
            match verdict(429, &fields, &c) {
                Verdict::Pushback {
                    retry_after: Some(s),
                } => assert!((44..=46).contains(&s), "{date} {age}: {s}"),
                other => panic!("{other:?}"),
            }
        }
        for (fields, want) in cases.into_iter().zip([60, 45]) {
            assert_eq!(
                verdict(429, fields, &c),
                Verdict::Pushback {
                    retry_after: Some(want)
                },
                "{fields:?}"
            );
        }
        for huge in ["99999999", "99999999999999999999999"] {
            assert_eq!(
                verdict(429, &[("retry-after", huge)], &c),
                Verdict::Pushback {
                    retry_after: Some(86_400)
                },
                "{huge}"
            );
        }
        assert_eq!(
            verdict(429, &[("retry-after", "soon")], &c),
            Verdict::Pushback { retry_after: None }
        );
        // A 503 that says to come back in words rotor cannot read is a
        // push-back all the same (the backoff decides how long).
        assert_eq!(
            verdict(503, &[("retry-after", "-5")], &c),
            Verdict::Pushback { retry_after: None }
        );
        // A 429 without `Retry-After` cools until the reset its rate-limit
        // fields give; with both, the later.
        let reset = [
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "3600"),
        ];
        assert_eq!(
            verdict(429, &reset, &c),
            Verdict::Pushback {
                retry_after: Some(3600)
            }
        );
        assert_eq!(
            verdict(429, &[reset[0], reset[1], ("retry-after", "60")], &c),
            Verdict::Pushback {
                retry_after: Some(3600)
            }
        );
        assert_eq!(
            verdict(403, &[("ratelimit", "\"h\";r=0;t=90")], &[403]),
            Verdict::Pushback {
                retry_after: Some(90)
            }
        );
    }

    #[test]
    fn rate_limit_headers() {
        let names = [
            &http::header::RETRY_AFTER,
            &RATELIMIT,
            &SPLIT[0].0,
            &SPLIT[1].0,
        ];
        assert_eq!(LIMIT_NAMES, names.map(|n| n.as_str().as_bytes()));
        let c = [429];
        let out = |s| Verdict::Pushback {
            retry_after: Some(s),
        };
        assert_eq!(
            verdict(200, &[("ratelimit", "limit=10, remaining=0, reset=30")], &c),
            out(30)
        );
        assert_eq!(
            verdict(200, &[("ratelimit", "\"default\";r=0;t=12")], &c),
            out(12)
        );
        assert_eq!(
            verdict(200, &[("ratelimit", "limit=10, remaining=3, reset=30")], &c),
            Verdict::Normal
        );
        assert_eq!(
            verdict(
                200,
                &[("ratelimit", "\"day\";r=0;t=3600, \"minute\";r=3;t=20")],
                &c
            ),
            out(3600),
            "any policy with none left"
        );
        // A list on several lines is one list (RFC 9110 §5.3), and the
        // same on one line: a policy, or a count, of none left on any.
        type Case<'a> = (u16, &'a [(&'a str, &'a str)], u32);
        let lists: [Case<'_>; 4] = [
            (
                200,
                &[
                    ("ratelimit", "\"a\";r=5;t=15"),
                    ("ratelimit", "\"b\";r=0;t=40"),
                ],
                40,
            ),
            (
                429,
                &[
                    ("ratelimit", "\"a\";r=0;t=15"),
                    ("ratelimit", "\"b\";r=0;t=40"),
                ],
                40,
            ),
            (
                200,
                &[
                    ("x-ratelimit-remaining", "3"),
                    ("x-ratelimit-remaining", "0"),
                    ("x-ratelimit-reset", "9"),
                ],
                9,
            ),
            (
                200,
                &[
                    ("x-ratelimit-remaining", "3, 0"),
                    ("x-ratelimit-reset", "9"),
                ],
                9,
            ),
        ];
        for (status, fields, want) in lists {
            assert_eq!(verdict(status, fields, &c), out(want), "{fields:?}");
        }
        assert_eq!(
            verdict(
                200,
                &[("ratelimit-remaining", "0"), ("ratelimit-reset", "5")],
                &c
            ),
            out(5)
        );
        assert_eq!(
            verdict(
                200,
                &[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "9")],
                &c
            ),
            out(9)
        );
        // One field saying some are left, or none left without a reset,
        // does not hide another that says none are.
        assert_eq!(
            verdict(
                200,
                &[
                    ("ratelimit", "\"m\";r=3;t=20"),
                    ("x-ratelimit-remaining", "0"),
                    ("x-ratelimit-reset", "9")
                ],
                &c
            ),
            out(9)
        );
        assert_eq!(
            verdict(
                200,
                &[
                    ("ratelimit-remaining", "0"),
                    ("x-ratelimit-remaining", "0"),
                    ("x-ratelimit-reset", "9")
                ],
                &c
            ),
            out(9)
        );
        let epoch = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 60;
        // A Unix time, in seconds or milliseconds, in the X- fields and in
        // the draft's (which says seconds from now; not every API does).
        for prefix in ["x-", ""] {
            for reset in [epoch, epoch * 1000] {
                let (remaining, field) = (
                    format!("{prefix}ratelimit-remaining"),
                    format!("{prefix}ratelimit-reset"),
                );
                match verdict(200, &[(&remaining, "0"), (&field, &reset.to_string())], &c) {
                    Verdict::Pushback {
                        retry_after: Some(s),
                    } => assert!((58..=61).contains(&s), "{prefix}: {s}"),
                    other => panic!("{other:?}"),
                }
            }
        }
        assert_eq!(
            verdict(200, &[("x-ratelimit-remaining", "0")], &c),
            Verdict::Normal,
            "no reset: nothing to go by"
        );
    }
}
