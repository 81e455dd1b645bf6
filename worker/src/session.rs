//! Sticky sessions named in the proxy user name, as backconnect services
//! do: `USER-session-ID[-sessionttl-DURATION][-sessionstrict-1]`. The
//! parameters come after the user name, separated by `-`; the user name
//! itself is what the users file is checked against. A name the users
//! file holds whole (a user called `a-b`) is a user name, not parameters.
//! An unknown parameter is refused (407, naming it), never ignored.

use std::time::Duration;

use crate::text::shown;

/// What a session asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    /// `[A-Za-z0-9_]{1,64}`.
    pub id: String,
    /// `-sessionttl-`; the worker's default otherwise.
    pub ttl: Option<Duration>,
    /// `-sessionstrict-1`: fail (502) rather than move when the address
    /// leaves the pool.
    pub strict: bool,
}

/// A proxy user name: the user, and the session it names, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyUser {
    pub user: String,
    pub session: Option<SessionParams>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("unknown parameter `{0}` in the proxy user name (known: session, sessionttl, sessionstrict)")]
    Unknown(String),
    #[error("parameter `{0}` in the proxy user name has no value")]
    NoValue(String),
    #[error("`{value}` is not a valid {param} (session: 1-64 of A-Z a-z 0-9 _; sessionttl: 30s, 10m, 1h; sessionstrict: 0 or 1)")]
    BadValue { param: String, value: String },
    #[error("sessionttl and sessionstrict need a session")]
    NoSession,
    #[error("parameter `{0}` is given twice in the proxy user name")]
    Twice(String),
}

/// The user of `name`, and the parameters after it, if any: the whole
/// name if the users file holds it, else the longest prefix before a `-`
/// that it holds (a user may have a dash in its name), else what is
/// before the first parameter (`my-app-session-x` is `my-app`'s, also
/// without a users file), else before the first `-`.
pub fn split_user(name: &str, is_user: impl Fn(&str) -> bool) -> (&str, Option<&str>) {
    if is_user(name) {
        return (name, None);
    }
    let cut = name
        .match_indices('-')
        .map(|(i, _)| i)
        .rev()
        .find(|&i| is_user(&name[..i]))
        .or_else(|| PARAMS.iter().filter_map(|p| name.find(p)).min())
        .or_else(|| name.find('-'));
    match cut {
        Some(cut) => (&name[..cut], Some(&name[cut + 1..])),
        None => (name, None),
    }
}

/// Whether `name` gives one of [`parse`]'s parameters (`-session-…`,
/// `-sessionttl-…`, `-sessionstrict-…`): without a users file only such a
/// name is read for a session (`my-sessionless-app` is a name).
pub fn names_params(name: &str) -> bool {
    PARAMS.iter().any(|p| name.contains(p))
}

/// How each parameter begins in a user name.
const PARAMS: [&str; 3] = ["-session-", "-sessionttl-", "-sessionstrict-"];

/// Splits `name` into the user and the session it names. `is_user` says
/// whether a whole name is a user of the users file (always false without
/// one).
pub fn parse(name: &str, is_user: impl Fn(&str) -> bool) -> Result<ProxyUser, ParamError> {
    let plain = |user: &str| ProxyUser {
        user: user.to_string(),
        session: None,
    };
    let (user, Some(rest)) = split_user(name, is_user) else {
        return Ok(plain(name));
    };
    let mut id = None;
    let mut ttl = None;
    let mut strict = false;
    let mut words = rest.split('-');
    let mut given: [&str; 3] = [""; 3];
    let mut n = 0;
    while let Some(key) = words.next() {
        let value = words
            .next()
            .ok_or_else(|| ParamError::NoValue(shown(key)))?;
        // Which one a repeat meant is not rotor's guess to make
        // (`-sessionstrict-1-sessionstrict-0` was not strict).
        if given[..n].contains(&key) {
            return Err(ParamError::Twice(shown(key)));
        }
        if n < given.len() {
            given[n] = key;
            n += 1;
        }
        // (A client's text, in a log line and an answer: `shown`.)
        let bad = || ParamError::BadValue {
            param: shown(key),
            value: shown(value),
        };
        match key {
            "session" => {
                let ok = (1..=64).contains(&value.len())
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_');
                id = Some(ok.then(|| value.to_string()).ok_or_else(bad)?);
            }
            // At least a second, in whole seconds (the allocator keeps
            // seconds): `1900ms` is 2 s, not 1; `0s` is refused, as the
            // flags refuse it (it was taken as 1 s).
            "sessionttl" => {
                let d = humantime::parse_duration(value).map_err(|_| bad())?;
                if d < Duration::from_secs(1) {
                    return Err(bad());
                }
                let whole = d.as_secs() + u64::from(d.subsec_nanos() > 0);
                ttl = Some(Duration::from_secs(whole));
            }
            "sessionstrict" => {
                strict = match value {
                    "1" => true,
                    "0" => false,
                    _ => return Err(bad()),
                }
            }
            other => return Err(ParamError::Unknown(shown(other))),
        }
    }
    match id {
        Some(id) => Ok(ProxyUser {
            user: user.to_string(),
            session: Some(SessionParams { id, ttl, strict }),
        }),
        None => Err(ParamError::NoSession),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_users(_: &str) -> bool {
        false
    }

    /// A session's lifetime is whole seconds, at least one: `1900ms` was
    /// cut to 1 s, and `0s` (which the flags refuse) taken as 1 s.
    #[test]
    fn session_lifetimes_are_whole_seconds_from_one() {
        let ttl = |name: &str| parse(name, no_users).map(|p| p.session.unwrap().ttl);
        let secs = |n| Ok(Some(Duration::from_secs(n)));
        assert_eq!(ttl("a-session-x-sessionttl-1900ms"), secs(2));
        assert_eq!(ttl("a-session-x-sessionttl-1s"), secs(1));
        assert_eq!(ttl("a-session-x-sessionttl-2m"), secs(120));
        for bad in ["0s", "999ms", "0"] {
            let e = parse(&format!("a-session-x-sessionttl-{bad}"), no_users);
            assert!(
                matches!(e, Err(ParamError::BadValue { .. })),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn names_with_and_without_sessions() {
        let p = parse("alice", no_users).unwrap();
        assert_eq!((p.user.as_str(), p.session), ("alice", None));
        // A dashed name before its parameters, with no users file.
        let p = parse("my-app-session-ab-sessionttl-1m", no_users).unwrap();
        assert_eq!(p.user, "my-app");
        let s = p.session.unwrap();
        assert_eq!(
            (s.id.as_str(), s.ttl),
            ("ab", Some(Duration::from_secs(60)))
        );
        let p = parse(
            "alice-session-abc_1-sessionttl-30s-sessionstrict-1",
            no_users,
        )
        .unwrap();
        assert_eq!(p.user, "alice");
        assert_eq!(
            p.session,
            Some(SessionParams {
                id: "abc_1".into(),
                ttl: Some(Duration::from_secs(30)),
                strict: true
            })
        );
        // A user the file holds whole, dash and all, also with parameters.
        let p = parse("a-b", |n| n == "a-b").unwrap();
        assert_eq!((p.user.as_str(), p.session), ("a-b", None));
        let p = parse("a-b-session-x", |n| n == "a-b").unwrap();
        assert_eq!(p.user, "a-b");
        assert_eq!(p.session.unwrap().id, "x");
    }

    #[test]
    fn mistakes_are_named_not_ignored() {
        assert_eq!(
            parse("alice-sesion-abc", no_users),
            Err(ParamError::Unknown("sesion".into()))
        );
        assert_eq!(
            parse("alice-session", no_users),
            Err(ParamError::NoValue("session".into()))
        );
        assert!(matches!(
            parse("alice-session-a.b", no_users),
            Err(ParamError::BadValue { .. })
        ));
        assert!(matches!(
            parse(&format!("alice-session-{}", "x".repeat(65)), no_users),
            Err(ParamError::BadValue { .. })
        ));
        assert!(matches!(
            parse("alice-session-a-sessionttl-soon", no_users),
            Err(ParamError::BadValue { .. })
        ));
        assert_eq!(
            parse("alice-sessionttl-1m", no_users),
            Err(ParamError::NoSession)
        );
        let err = parse("alice-country-de", no_users).unwrap_err().to_string();
        assert!(err.contains("`country`"), "{err}");
        // A client's text in the message cannot end a log line or turn
        // it around.
        for name in [
            "alice-session-zz\nworker 9: FORGED\u{202e}x",
            "alice-a\r\nb-1",
        ] {
            let err = parse(name, no_users).unwrap_err().to_string();
            assert!(!err.contains(['\n', '\r', '\u{202e}']), "{err:?}");
            assert!(err.contains("\\u000a") || err.contains("\\u000d"), "{err}");
        }
        assert_eq!(
            parse("alice-session-a-session-b", no_users),
            Err(ParamError::Twice("session".into()))
        );
        assert_eq!(
            parse("alice-session-a-sessionstrict-1-sessionstrict-0", no_users),
            Err(ParamError::Twice("sessionstrict".into()))
        );
    }
}
