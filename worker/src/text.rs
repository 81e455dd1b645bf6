//! Numbers and addresses as text, appended to bytes without `core::fmt`: the
//! request path writes them for every request (a `Content-Length`, an
//! access log line), and `write!` costs hundreds of instructions a number
//! (its padding and sign machinery, a dynamic call per piece).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Line and paragraph separators, bidirectional controls and the
/// zero-width characters: what changes how a line shows, not what it says.
pub(crate) fn reorders(c: char) -> bool {
    matches!(
        c,
        '\u{061c}'
            | '\u{200b}'..='\u{200f}'
            | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{2069}'
            | '\u{feff}'
    )
}

/// A client's text, for an operator's log or an error message: control
/// characters and those that [`reorders`] written `\u000a`, so no client
/// can end a log line, forge the next, or turn one around.
pub(crate) fn shown(s: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c.is_control() || reorders(c) {
            true => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            false => out.push(c),
        }
    }
    out
}

/// `n` in decimal, in `buf`.
pub(crate) fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// Appends `n` in decimal.
pub(crate) fn push_decimal(out: &mut Vec<u8>, n: u64) {
    push_ascii(out, itoa(n, &mut [0; 20]));
}

/// Appends `n` as three digits (`007`): milliseconds after a point.
pub(crate) fn push_three_digits(out: &mut Vec<u8>, n: u32) {
    let n = n % 1000;
    push_ascii(
        out,
        &[
            b'0' + (n / 100) as u8,
            b'0' + (n / 10 % 10) as u8,
            b'0' + (n % 10) as u8,
        ],
    );
}

/// Appends `ip` as `Display` writes it (RFC 5952 for IPv6: lower-case
/// hex, the longest run of two or more zero groups as `::`, the first of
/// equal runs; an IPv4-mapped address as `::ffff:a.b.c.d`).
pub(crate) fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => push_ipv4(out, v4),
        IpAddr::V6(v6) => push_ipv6(out, v6),
    }
}

/// Appends `addr` as `Display` writes it (`a.b.c.d:port`, `[v6]:port`).
pub(crate) fn push_socket_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(a) => push_ipv4(out, *a.ip()),
        SocketAddr::V6(a) => {
            out.push(b'[');
            push_ipv6(out, *a.ip());
            if a.scope_id() != 0 {
                out.push(b'%');
                push_decimal(out, a.scope_id().into());
            }
            out.push(b']');
        }
    }
    out.push(b':');
    push_decimal(out, addr.port().into());
}

fn push_ipv4(out: &mut Vec<u8>, ip: Ipv4Addr) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        // A digit at a time: no copy call for one to three bytes.
        if octet >= 100 {
            out.push(b'0' + octet / 100);
        }
        if octet >= 10 {
            out.push(b'0' + octet / 10 % 10);
        }
        out.push(b'0' + octet % 10);
    }
}

fn push_ipv6(out: &mut Vec<u8>, ip: Ipv6Addr) {
    if let Some(v4) = ip.to_ipv4_mapped() {
        out.extend_from_slice(b"::ffff:");
        return push_ipv4(out, v4);
    }
    let groups = ip.segments();
    // The longest run of zero groups (the first, of equal ones).
    let (mut best, mut best_len, mut run, mut run_len) = (0, 0, 0, 0);
    for (i, &g) in groups.iter().enumerate() {
        if g == 0 {
            if run_len == 0 {
                run = i;
            }
            run_len += 1;
            if run_len > best_len {
                (best, best_len) = (run, run_len);
            }
        } else {
            run_len = 0;
        }
    }
    let hex = |out: &mut Vec<u8>, part: &[u16]| {
        for (i, &g) in part.iter().enumerate() {
            if i > 0 {
                out.push(b':');
            }
            push_hex(out, g);
        }
    };
    if best_len > 1 {
        hex(out, &groups[..best]);
        out.extend_from_slice(b"::");
        hex(out, &groups[best + best_len..]);
    } else {
        hex(out, &groups);
    }
}

/// `g` in lower-case hex without leading zeros.
fn push_hex(out: &mut Vec<u8>, g: u16) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 4];
    let mut i = buf.len();
    let mut n = g;
    loop {
        i -= 1;
        buf[i] = DIGITS[usize::from(n & 0xf)];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    push_ascii(out, &buf[i..]);
}

fn push_ascii(out: &mut Vec<u8>, digits: &[u8]) {
    out.extend_from_slice(digits);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn numbers() {
        assert_eq!(itoa(0, &mut [0; 20]), b"0");
        assert_eq!(itoa(1234567890, &mut [0; 20]), b"1234567890");
        assert_eq!(
            itoa(u64::MAX, &mut [0; 20]),
            u64::MAX.to_string().as_bytes()
        );
        for (n, text) in [(0, "000"), (7, "007"), (42, "042"), (999, "999")] {
            let mut s = Vec::new();
            push_three_digits(&mut s, n);
            assert_eq!(s, text.as_bytes());
        }
    }

    #[test]
    fn addresses_as_display_writes_them() {
        for text in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.0.1",
            "::",
            "::1",
            "1::",
            "2001:db8::1",
            "2001:db8:0:1:1:1:1:1",
            "2001:0:0:1::1",
            "1:0:0:2:0:0:0:3",
            "::ffff:192.0.2.1",
            "::192.0.2.1",
            "fe80::1:2:3:4",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            let mut s = Vec::new();
            push_ip(&mut s, ip);
            assert_eq!(s, ip.to_string().as_bytes(), "{text}");
        }
        for text in ["127.0.0.1:80", "[::1]:65535", "[fe80::1%3]:8080"] {
            let addr: SocketAddr = text.parse().unwrap();
            let mut s = Vec::new();
            push_socket_addr(&mut s, addr);
            assert_eq!(s, addr.to_string().as_bytes(), "{text}");
        }
    }

    proptest! {
        // Groups drawn mostly from 0 and a few values, so runs of zeros of
        // every length and position come up.
        #[test]
        fn any_ipv6_as_display_writes_it(
            groups in proptest::array::uniform8(prop_oneof![Just(0u16), Just(0xffff), any::<u16>()]),
            port in any::<u16>(),
        ) {
            let ip = Ipv6Addr::from(groups);
            let mut s = Vec::new();
            push_ip(&mut s, IpAddr::V6(ip));
            prop_assert_eq!(&s, &ip.to_string().into_bytes());
            let addr = SocketAddr::from((ip, port));
            let mut s = Vec::new();
            push_socket_addr(&mut s, addr);
            prop_assert_eq!(s, addr.to_string().into_bytes());
        }

        #[test]
        fn any_ipv4_as_display_writes_it(octets in any::<[u8; 4]>(), n in any::<u64>()) {
            let ip = Ipv4Addr::from(octets);
            let mut s = Vec::new();
            push_ip(&mut s, IpAddr::V4(ip));
            prop_assert_eq!(s, ip.to_string().into_bytes());
            let mut s = Vec::new();
            push_decimal(&mut s, n);
            prop_assert_eq!(s, n.to_string().into_bytes());
        }
    }
}
