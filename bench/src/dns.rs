//! `rotor-bench dns`: a loopback DNS server for the benchmark's named
//! destination. Every A query gets one address with a TTL; any other type
//! gets no data with an SOA in the authority section (RFC 2308: a cacheable
//! "no such record", as real servers answer an AAAA query for an IPv4-only
//! name). Junk is dropped. Runs until killed.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};

pub fn run(listen: SocketAddr, answer: Ipv4Addr, ttl: u32) -> anyhow::Result<()> {
    let sock = UdpSocket::bind(listen)?;
    let mut buf = [0u8; 512];
    loop {
        let (n, from) = sock.recv_from(&mut buf)?;
        if let Some(reply) = reply(&buf[..n], answer, ttl) {
            let _ = sock.send_to(&reply, from);
        }
    }
}

/// The answer to one query (RFC 1035 §4.1), or `None` if it is not one
/// standard query with one question.
fn reply(q: &[u8], answer: Ipv4Addr, ttl: u32) -> Option<Vec<u8>> {
    if q.len() < 12 || q[2] & 0xf8 != 0 || q[4..6] != [0, 1] {
        return None;
    }
    let mut i = 12;
    while *q.get(i)? != 0 {
        i += usize::from(q[i]) + 1;
    }
    let qtype = u16::from_be_bytes([*q.get(i + 1)?, *q.get(i + 2)?]);
    let question = q.get(12..i + 5)?;
    let a = qtype == 1;
    let mut out = Vec::with_capacity(64 + question.len());
    out.extend_from_slice(&q[..2]);
    // A response, recursion desired and available, no error; one question
    // and either one answer or one authority record.
    out.extend_from_slice(&[0x81, 0x80, 0, 1, 0, u8::from(a), 0, u8::from(!a), 0, 0]);
    out.extend_from_slice(question);
    // The record's name points at the question's (offset 12).
    out.extend_from_slice(&[0xc0, 12]);
    if a {
        out.extend_from_slice(&[0, 1, 0, 1]);
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&[0, 4]);
        out.extend_from_slice(&answer.octets());
    } else {
        // SOA: root names for MNAME and RNAME, then serial, refresh,
        // retry, expire and the negative TTL.
        out.extend_from_slice(&[0, 6, 0, 1]);
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&[0, 22, 0, 0]);
        for v in [1u32, 3600, 600, 86_400, ttl] {
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in ["origin", "bench", "test"] {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        q
    }

    #[test]
    fn a_gets_the_address_and_others_a_cacheable_nothing() {
        let ip = Ipv4Addr::new(127, 0, 0, 1);
        let q = query(1);
        let r = reply(&q, ip, 300).unwrap();
        assert_eq!(&r[..4], &[0x12, 0x34, 0x81, 0x80]);
        assert_eq!(&r[4..12], &[0, 1, 0, 1, 0, 0, 0, 0]);
        assert_eq!(&r[12..q.len()], &q[12..]);
        assert_eq!(&r[r.len() - 4..], &[127, 0, 0, 1]);
        let q = query(28);
        let r = reply(&q, ip, 300).unwrap();
        assert_eq!(&r[4..12], &[0, 1, 0, 0, 0, 1, 0, 0]);
        assert_eq!(r.len(), q.len() + 2 + 10 + 22);
        assert_eq!(reply(&q[..5], ip, 300), None, "short");
        assert_eq!(reply(&q[..q.len() - 2], ip, 300), None, "cut question");
    }
}
