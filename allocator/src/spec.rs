//! Pool specifications as an operator writes them: one address, a range
//! (`127.0.0.2-127.0.0.9`), a CIDR (`192.0.2.0/29`), or a comma list of these.
//!
//! Addresses, ranges and CIDRs of up to [`ENUMERATE_MAX`] addresses are
//! expanded, and rotate in exactly the order written. A larger CIDR (an IPv6
//! /64, a /48, an IPv4 /15) stays one prefix entry that is never enumerated:
//! rotation walks it in a full-period permutation (see
//! `rotor_protocol::Segment`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use rotor_protocol::Segment;

/// Largest number of addresses a range may expand to, so a typo such as
/// `2001:db8::1-2001:db8:1::1` is an error rather than an attempt to
/// allocate 2^80 addresses. (A prefix that large is written as a CIDR.)
pub const MAX_SPEC_ADDRESSES: u128 = 1 << 20;
/// CIDRs up to this many addresses are expanded (list order); larger ones
/// are prefix entries.
pub const ENUMERATE_MAX: u128 = 1 << 16;
/// Most entries one read of a pool file or a pool command's output may
/// expand to (about 18 bytes each): a command repeating a /16 for its
/// 16 MiB of output would otherwise ask for a hundred billion.
pub const MAX_READ_ENTRIES: usize = 1 << 22;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("empty address specification")]
    Empty,
    #[error("`{0}` is not an IP address")]
    BadAddress(String),
    #[error("`{0}`: a prefix length must be a number no larger than {1}")]
    BadPrefix(String, u8),
    #[error("range `{0}` mixes IPv4 and IPv6")]
    MixedRange(String),
    #[error("range `{0}` ends before it starts")]
    Backwards(String),
    #[error("range `{0}` holds {1} addresses, more than the {max} a range may hold (write a large block as a CIDR)", max = MAX_SPEC_ADDRESSES)]
    TooLarge(String, u128),
    #[error("`{0}` holds {1}, which cannot be a source address")]
    NotASource(String, &'static str),
    #[error("the list expands to more than {max} entries by here (write large blocks as one CIDR: one of more than 65 536 addresses is one entry)", max = MAX_READ_ENTRIES)]
    TooManyEntries,
}

fn check_source(part: &str, v4: bool, lo: u128, hi: u128) -> Result<(), SpecError> {
    match rotor_protocol::addr::not_a_source(v4, lo, hi) {
        Some(why) => Err(SpecError::NotASource(part.to_string(), why)),
        None => Ok(()),
    }
}

/// Expands a spec into its entries, in order. Duplicates are kept here;
/// the pool removes them.
pub fn parse_spec(spec: &str) -> Result<Vec<Segment>, SpecError> {
    let mut out = Vec::new();
    parse_spec_into(spec, &mut out, MAX_READ_ENTRIES)?;
    Ok(out)
}

/// As [`parse_spec`], appended to `out`, which may hold `max` entries at
/// most (checked after each part of a comma list, so one line of many
/// /16s is stopped too).
pub fn parse_spec_into(spec: &str, out: &mut Vec<Segment>, max: usize) -> Result<(), SpecError> {
    let mut any = false;
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        any = true;
        expand_one(part, out)?;
        if out.len() > max {
            return Err(SpecError::TooManyEntries);
        }
    }
    if !any {
        return Err(SpecError::Empty);
    }
    Ok(())
}

fn parse_ip(s: &str) -> Result<IpAddr, SpecError> {
    let s = rotor_protocol::addr::unbracketed(s.trim());
    s.parse().map_err(|_| SpecError::BadAddress(s.to_string()))
}

fn expand_one(part: &str, out: &mut Vec<Segment>) -> Result<(), SpecError> {
    if let Some((addr, len)) = part.split_once('/') {
        // ipnet parses CIDRs here and in the worker's destination rules;
        // an IPv6 base may come bracketed (`[2001:db8::]/64`).
        let bare = format!("{}/{len}", rotor_protocol::addr::unbracketed(addr.trim()));
        let net: IpNet = bare.parse().map_err(|_| match parse_ip(addr) {
            Err(e) => e,
            Ok(ip) => SpecError::BadPrefix(part.to_string(), if ip.is_ipv4() { 32 } else { 128 }),
        })?;
        let base = net.addr();
        let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
        let span = match host_bits {
            128 => u128::MAX,
            b => (1u128 << b) - 1,
        };
        let lowest = to_u128(base) & !span;
        check_source(part, base.is_ipv4(), lowest, lowest | span)?;
        if host_bits >= 128 || 1u128 << host_bits > ENUMERATE_MAX {
            out.extend(Segment::prefix(base, net.prefix_len()));
            return Ok(());
        }
        let count = 1u128 << host_bits;
        let first = to_u128(base) & !(count - 1);
        push_range(base.is_ipv4(), first, first + count - 1, out);
        return Ok(());
    }
    // A range. IPv6 addresses contain no '-', so splitting on it is safe.
    if let Some((a, b)) = part.split_once('-') {
        let (a, b) = (parse_ip(a)?, parse_ip(b)?);
        if a.is_ipv4() != b.is_ipv4() {
            return Err(SpecError::MixedRange(part.to_string()));
        }
        let (lo, hi) = (to_u128(a), to_u128(b));
        if hi < lo {
            return Err(SpecError::Backwards(part.to_string()));
        }
        let count = (hi - lo).saturating_add(1);
        if count > MAX_SPEC_ADDRESSES {
            return Err(SpecError::TooLarge(part.to_string(), count));
        }
        check_source(part, a.is_ipv4(), lo, hi)?;
        push_range(a.is_ipv4(), lo, hi, out);
        return Ok(());
    }
    let ip = parse_ip(part)?;
    check_source(part, ip.is_ipv4(), to_u128(ip), to_u128(ip))?;
    out.push(Segment::single(ip));
    Ok(())
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn push_range(v4: bool, lo: u128, hi: u128, out: &mut Vec<Segment>) {
    out.reserve((hi - lo + 1) as usize);
    for n in lo..=hi {
        out.push(Segment::single(if v4 {
            // In range by construction: both ends came from IPv4 addresses.
            IpAddr::V4(Ipv4Addr::from(n as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(n))
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<Segment> {
        list.iter()
            .map(|s| Segment::single(s.parse().unwrap()))
            .collect()
    }

    #[test]
    fn single_addresses() {
        assert_eq!(parse_spec("127.0.0.2").unwrap(), ips(&["127.0.0.2"]));
        assert_eq!(parse_spec("::1").unwrap(), ips(&["::1"]));
        assert_eq!(parse_spec("[2001:db8::1]").unwrap(), ips(&["2001:db8::1"]));
    }

    #[test]
    fn ranges() {
        assert_eq!(
            parse_spec("127.0.0.2-127.0.0.4").unwrap(),
            ips(&["127.0.0.2", "127.0.0.3", "127.0.0.4"])
        );
        assert_eq!(
            parse_spec("10.0.0.255-10.0.1.0").unwrap(),
            ips(&["10.0.0.255", "10.0.1.0"])
        );
        assert_eq!(
            parse_spec("2001:db8::fffe-2001:db8::1:0").unwrap(),
            ips(&["2001:db8::fffe", "2001:db8::ffff", "2001:db8::1:0"])
        );
        assert_eq!(
            parse_spec("127.0.0.5-127.0.0.5").unwrap(),
            ips(&["127.0.0.5"])
        );
    }

    #[test]
    fn cidrs_include_every_address_of_the_block() {
        assert_eq!(
            parse_spec("192.0.2.0/30").unwrap(),
            ips(&["192.0.2.0", "192.0.2.1", "192.0.2.2", "192.0.2.3"])
        );
        // Host bits in the base are ignored: the block is meant, as a pool
        // command printing `ip -6 addr`'s `2001:db8::2/64` means the /64
        // (`ip route` would refuse it; refused here, such a line failed
        // its whole source at every refresh).
        assert_eq!(
            parse_spec("192.0.2.3/31").unwrap(),
            ips(&["192.0.2.2", "192.0.2.3"])
        );
        assert_eq!(parse_spec("192.0.2.9/32").unwrap(), ips(&["192.0.2.9"]));
        assert_eq!(parse_spec("2001:db8::/126").unwrap().len(), 4);
    }

    #[test]
    fn large_cidrs_stay_one_prefix_entry() {
        let prefix = |s: &str, len| Segment::prefix(s.parse().unwrap(), len).unwrap();
        assert_eq!(
            parse_spec("2001:db8:1:2::/64").unwrap(),
            [prefix("2001:db8:1:2::", 64)]
        );
        assert_eq!(parse_spec("2000::/3").unwrap(), [prefix("2000::", 3)]);
        assert_eq!(parse_spec("10.0.0.0/8").unwrap(), [prefix("10.0.0.0", 8)]);
        assert_eq!(
            parse_spec("[2001:db8:1:2::]/64").unwrap(),
            [prefix("2001:db8:1:2::", 64)]
        );
        // Up to 2^16 addresses are still listed one by one.
        assert_eq!(parse_spec("10.0.0.0/16").unwrap().len(), 1 << 16);
        assert_eq!(parse_spec("2001:db8::/112").unwrap().len(), 1 << 16);
        assert_eq!(parse_spec("2001:db8::/111").unwrap().len(), 1);
    }

    #[test]
    fn comma_lists_mix_forms() {
        assert_eq!(
            parse_spec("127.0.0.2, 127.0.0.4-127.0.0.5,::1").unwrap(),
            ips(&["127.0.0.2", "127.0.0.4", "127.0.0.5", "::1"])
        );
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        assert_eq!(parse_spec(""), Err(SpecError::Empty));
        assert_eq!(parse_spec(" , "), Err(SpecError::Empty));
        assert_eq!(
            parse_spec("127.0.0.256"),
            Err(SpecError::BadAddress("127.0.0.256".into()))
        );
        assert_eq!(
            parse_spec("host.example"),
            Err(SpecError::BadAddress("host.example".into()))
        );
        assert!(matches!(
            parse_spec("10.0.0.0/33"),
            Err(SpecError::BadPrefix(_, 32))
        ));
        assert!(matches!(
            parse_spec("10.0.0.0/x"),
            Err(SpecError::BadPrefix(..))
        ));
        assert!(matches!(
            parse_spec("10.0.0.1-::1"),
            Err(SpecError::MixedRange(_))
        ));
        assert!(matches!(
            parse_spec("10.0.0.9-10.0.0.1"),
            Err(SpecError::Backwards(_))
        ));
        assert!(matches!(
            parse_spec("10.0.0.0-10.255.255.255"),
            Err(SpecError::TooLarge(..))
        ));
        // Nothing that would leave from the host's own address, or cannot
        // be a TCP source at all, in any form.
        for spec in [
            "0.0.0.0",
            "::",
            "[::]",
            "0.0.0.0/0",
            "::/0",
            "0.0.0.0/30",
            "0.0.0.9",
            "10.0.0.1,0.0.0.0",
            "0.0.0.0-0.0.0.3",
            "224.0.0.1",
            "239.255.255.250-240.0.0.1",
            "255.255.255.255",
            "255.255.255.0/24",
            "ff02::1",
            "fe00::/7",
            "::ffff:0.0.0.0",
            "::ffff:127.0.0.1",
            "::ffff:0:0/96",
            "::fffe:0:0/95",
            "fe80::1",
            "febf::/16",
            "fe80::/9",
        ] {
            assert!(
                matches!(parse_spec(spec), Err(SpecError::NotASource(..))),
                "{spec}: {:?}",
                parse_spec(spec)
            );
        }
        let msg = parse_spec("0.0.0.0").unwrap_err().to_string();
        assert!(msg.contains("host's own address"), "{msg}");
        assert!(parse_spec("1.0.0.0,223.255.255.255,240.0.0.1,fec0::1,::fffe:ffff:ffff").is_ok());
        let msg = parse_spec("2001:db8::1-2001:db8:1::1")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("as a CIDR"), "{msg}");
    }
}
