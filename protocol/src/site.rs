//! Sites: what per-site budgets and cooldowns are kept by. A request's site
//! is the registrable domain of its target host (the Public Suffix List's
//! "eTLD+1": `www.example.co.uk` and `api.example.co.uk` are both
//! `example.co.uk`), or the address itself for an IP-literal target.
//!
//! Workers name the site of each request that needs one; the allocator
//! names the sites of its configuration the same way, so both agree.

use std::net::IpAddr;
use std::time::Duration;

/// Bits of the lease table's site filter (see `table`): a worker takes the
/// allocator's site path for a site whose bit is set.
pub const SITE_FILTER_BITS: usize = 1 << 16;

/// After a cooldown, until a normal answer (or a connect, after failed
/// connects) clears its repeats, a pair takes one request for the site at
/// a time, its probe: no other for this long after it, unless its answer
/// comes first (it may never: a request that failed, a tunnel's). The
/// requests held waiting for the site (`--budget-wait`) had all gone to
/// the first address to stop cooling at once, into a site still limiting
/// it (30 within 40 ms, each pushed back, doubling the next cooldown).
/// Short: the refusal meanwhile says the hold's end, and a request with a
/// shorter `--budget-wait` is refused at once; a site slower to answer
/// sees one probe this often.
pub const PROBE_HOLD: Duration = Duration::from_secs(2);

/// Why no address may serve a site's request now: what the first to free
/// is held by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Block {
    /// It has spent its budget for the site.
    Budget,
    /// It is cooling down for the site after the site pushed back.
    Cooling,
    /// A sticky session's address has served the sessions' share of its
    /// budget (half) while the site's other requests want the rest
    /// (`Response::SessionShared`, minor [`crate::MINOR_SESSION_SHARE`]
    /// on; an older peer is told `Budget`).
    Shared,
}

impl Block {
    /// A refusal's block as `Response::Throttled` says it (`cooling`, else
    /// the budget spent).
    pub fn of_throttled(cooling: bool) -> Block {
        match cooling {
            true => Block::Cooling,
            false => Block::Budget,
        }
    }
}

/// Whether `host` ends in a number (`127.1`, `2130706433`, `0x7f000001`)
/// without being an IPv4 address in dotted decimal: resolvers read such
/// spellings as addresses, or not, as they please, so a worker refuses a
/// request to one (400), and a site budget for one would match nothing.
/// (`10.0.0.1.` too: no resolver reads it as the address, and the site
/// key would.)
#[inline]
pub fn numeric_not_dotted(host: &str) -> bool {
    let name = host.strip_suffix('.').unwrap_or(host);
    let last = name.rsplit('.').next().unwrap_or(name).as_bytes();
    let numeric = match last {
        [b'0', b'x' | b'X', hex @ ..] => hex.iter().all(u8::is_ascii_hexdigit),
        _ => !last.is_empty() && last.iter().all(u8::is_ascii_digit),
    };
    numeric && !dotted_decimal(host.as_bytes())
}

/// Whether `s` is an IPv4 address in dotted decimal as `Ipv4Addr` parses
/// one (four numbers of 0 to 255, no leading zeros): by hand, for the
/// request path (the parser cost a request to an IP-literal target some
/// 30 instructions more, callgrind; the whole check costs it about 150).
#[inline]
pub fn dotted_decimal(s: &[u8]) -> bool {
    let mut parts = 0;
    for part in s.split(|&b| b == b'.') {
        parts += 1;
        let ok = match part {
            [b'0'] => true,
            [b'1'..=b'9'] => true,
            [b'1'..=b'9', b'0'..=b'9'] => true,
            [a @ b'1'..=b'9', b, c] if b.is_ascii_digit() && c.is_ascii_digit() => {
                (u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')) <= 255
            }
            _ => false,
        };
        if !ok || parts > 4 {
            return false;
        }
    }
    parts == 4
}

/// The site of `host` (a name or an address, brackets allowed), lower-case
/// and without a trailing dot. A name with no registrable part (`localhost`,
/// a bare public suffix) is its own site.
pub fn site_of(host: &str) -> String {
    let h = host.trim_end_matches('.');
    let bare = h
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(h);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        // One address, one site, however it is written (`::ffff:a.b.c.d`
        // is a.b.c.d, as the destination rules and the connect see it).
        return ip.to_canonical().to_string();
    }
    let lower;
    let h = match h.bytes().any(|b| b.is_ascii_uppercase()) {
        true => {
            lower = h.to_ascii_lowercase();
            lower.as_str()
        }
        false => h,
    };
    match psl::domain_str(h) {
        Some(d) => d.to_string(),
        None => h.to_string(),
    }
}

/// Whether `name` (lower-case) is a public suffix, as `co.uk`,
/// `github.io` or `com`: no registrable domain of its own, every name
/// under it another owner's. A single label is one only if the list
/// names it (`com`, `io`), not by the list's rule for unknown ones: a
/// host's own name (`localhost`, `intranet`) is a site.
pub fn is_public_suffix(name: &str) -> bool {
    match name.contains('.') {
        true => psl::domain_str(name).is_none(),
        false => psl::suffix(name.as_bytes()).is_some_and(|s| s.is_known()),
    }
}

/// Which bit of the site filter `site` sets.
pub fn site_bit(site: &str) -> usize {
    let h = crate::fnv1a(site.bytes());
    ((h ^ (h >> 29)) as usize) & (SITE_FILTER_BITS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The hand-made check takes what `Ipv4Addr`'s parser takes.
        #[test]
        fn dotted_decimal_is_what_ipv4addr_parses(s in "[0-9.]{0,16}") {
            proptest::prop_assert_eq!(dotted_decimal(s.as_bytes()), s.parse::<std::net::Ipv4Addr>().is_ok());
        }
    }

    #[test]
    fn dotted_decimal_cases() {
        for good in ["0.0.0.0", "255.255.255.255", "10.0.0.1", "192.168.100.99"] {
            assert!(dotted_decimal(good.as_bytes()), "{good}");
        }
        for bad in [
            "256.0.0.1",
            "01.0.0.1",
            "1.2.3",
            "1.2.3.4.5",
            "1..2.3",
            "",
            "1.2.3.4.",
            "999.1.1.1",
        ] {
            assert!(!dotted_decimal(bad.as_bytes()), "{bad}");
        }
    }

    /// A budget's site and a request's host are refused alike.
    #[test]
    fn numbers_that_are_no_dotted_address_are_told() {
        for no in [
            "127.1",
            "2130706433",
            "0x7f000001",
            "1.02",
            "10.0.0.1.",
            "a.0X1f",
        ] {
            assert!(numeric_not_dotted(no), "{no}");
        }
        for fine in ["127.0.0.1", "example.com", "1e100.net", "x.0xg", "[::1]"] {
            assert!(!numeric_not_dotted(fine), "{fine}");
        }
    }

    #[test]
    fn sites_are_registrable_domains_or_addresses() {
        for (host, site) in [
            ("www.example.co.uk", "example.co.uk"),
            ("api.example.co.uk", "example.co.uk"),
            ("Example.COM.", "example.com"),
            ("a.b.github.io", "b.github.io"),
            ("localhost", "localhost"),
            ("co.uk", "co.uk"),
            ("127.0.0.1", "127.0.0.1"),
            ("[::1]", "::1"),
            ("2001:DB8::1", "2001:db8::1"),
            ("[::ffff:10.0.0.1]", "10.0.0.1"),
        ] {
            assert_eq!(site_of(host), site, "{host}");
        }
        assert_ne!(site_bit("example.com"), site_bit("example.org"));
        assert!(site_bit("example.com") < SITE_FILTER_BITS);
    }
}
