//! Error reporting shared by every rotor process.

/// An error and its causes on one line (`a: b: c`), for logs and replies.
/// A cause whose text ends the line already (an error that says its
/// cause itself, as the resolver's do) is not said again: a name with a
/// label too long was "…: label bytes exceed 63: 64" three times over.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        // (Said already only as a whole part: `…: text`.)
        let said = s
            .strip_suffix(text.as_str())
            .is_some_and(|before| before.is_empty() || before.ends_with(": "));
        if !said {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

/// The errors a worker counts (`rotor_errors_total{error}`): the RFC 9209
/// Proxy-Status types its answers say, `none` for its answers that say
/// none (a 400, a 407), and rotor's own `client_closed` (a client gone
/// before its answer) and `worker_stopped` (cut at a drain's end). The allocator exports each from its start, at 0: a
/// series that appears at its first count is not seen by `increase()`,
/// and an alert on its first burst would not fire. A worker checks (in
/// debug builds) that what it counts is here.
pub const ERROR_KINDS: &[&str] = &[
    "client_closed",
    "connection_limit_reached",
    "connection_refused",
    "connection_terminated",
    "connection_timeout",
    "connection_write_timeout",
    "destination_ip_prohibited",
    "destination_ip_unroutable",
    "dns_error",
    "dns_timeout",
    "http_protocol_error",
    "http_request_denied",
    "http_request_error",
    "http_response_header_section_size",
    "http_response_incomplete",
    "http_response_timeout",
    "none",
    "proxy_configuration_error",
    "proxy_internal_error",
    "proxy_loop_detected",
    "worker_stopped",
];

/// When something last happened (a refusal, a warning), shared by a
/// process's connections: for a log line said once a period, with how many
/// times it happened since.
pub struct Moment(std::sync::Mutex<(Option<std::time::Instant>, u64)>);

impl Moment {
    pub const fn new() -> Moment {
        Moment(std::sync::Mutex::new((None, 0)))
    }

    fn last(&self) -> std::sync::MutexGuard<'_, (Option<std::time::Instant>, u64)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether it happened within `d`.
    pub fn within(&self, d: std::time::Duration) -> bool {
        self.last().0.is_some_and(|t| t.elapsed() < d)
    }

    /// It happens now.
    pub fn mark(&self) {
        self.last().0 = Some(std::time::Instant::now());
    }

    /// It happens now: whether it is the first time within `d` (a warning
    /// said once a period).
    pub fn first_in(&self, d: std::time::Duration) -> bool {
        self.count_in(d).is_some()
    }

    /// It happens now: if it is the first time within `d`, how many times
    /// it happened since the last first time, this one included.
    pub fn count_in(&self, d: std::time::Duration) -> Option<u64> {
        let mut last = self.last();
        last.1 += 1;
        if last.0.is_some_and(|t| t.elapsed() < d) {
            return None;
        }
        let n = last.1;
        *last = (Some(std::time::Instant::now()), 0);
        Some(n)
    }
}

impl Moment {
    /// How many times it happened since it was last said (by
    /// [`Moment::count_in`]), once that is `d` ago: said then, as if it
    /// happened now. Called every second, a warning said once a period
    /// says the count of a storm's end, which no later one would.
    pub fn unsaid(&self, d: std::time::Duration) -> Option<u64> {
        let mut last = self.last();
        if last.1 == 0 || last.0.is_some_and(|t| t.elapsed() < d) {
            return None;
        }
        let n = last.1;
        *last = (Some(std::time::Instant::now()), 0);
        Some(n)
    }
}

impl Default for Moment {
    fn default() -> Moment {
        Moment::new()
    }
}

#[cfg(test)]
mod tests {
    use super::{error_chain, Moment};
    use std::time::Duration;

    /// An error, and the cause it may say itself.
    #[derive(Debug)]
    struct Said(String, Option<Box<Said>>);

    impl std::fmt::Display for Said {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for Said {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|s| s as _)
        }
    }

    #[test]
    fn a_cause_an_error_says_itself_is_not_said_again() {
        let chain = |texts: &[&str]| {
            let mut e = None;
            for t in texts.iter().rev() {
                e = Some(Box::new(Said(t.to_string(), e)));
            }
            error_chain(&*e.unwrap())
        };
        assert_eq!(chain(&["a", "b", "c"]), "a: b: c");
        assert_eq!(
            chain(&[
                "proto: decoding: too long",
                "decoding: too long",
                "too long"
            ]),
            "proto: decoding: too long"
        );
        assert_eq!(chain(&["x: y", "z"]), "x: y: z");
        // A cause that ends the text only as part of a word is said.
        assert_eq!(chain(&["bad input", "input"]), "bad input: input");
    }

    #[test]
    fn a_moment_counts_what_happened_between_first_times() {
        let m = Moment::new();
        assert!(!m.within(Duration::from_secs(10)));
        assert_eq!(m.count_in(Duration::from_secs(10)), Some(1));
        assert_eq!(m.count_in(Duration::from_secs(10)), None);
        assert!(!m.first_in(Duration::from_secs(10)));
        assert!(m.within(Duration::from_secs(10)));
        // A period gone by: the first again, with the two in between.
        assert_eq!(m.count_in(Duration::ZERO), Some(3));
        assert_eq!(m.count_in(Duration::ZERO), Some(1));
    }

    /// What happened after a warning said once a period is said once
    /// that warning is a period old (a storm's last count went unsaid).
    #[test]
    fn a_storms_last_count_is_said_once_its_warning_is_old() {
        let m = Moment::new();
        let d = Duration::from_millis(50);
        assert_eq!(m.count_in(d), Some(1));
        for _ in 0..5 {
            assert_eq!(m.count_in(d), None);
        }
        assert_eq!(m.unsaid(d), None, "too soon");
        std::thread::sleep(d);
        assert_eq!(m.unsaid(d), Some(5));
        assert_eq!(m.unsaid(d), None, "said");
        std::thread::sleep(d);
        assert_eq!(m.unsaid(d), None, "nothing since");
        assert_eq!(m.count_in(d), Some(1));
    }
}
