//! Route queries over rtnetlink (`NETLINK_ROUTE`), as `ip route` makes
//! them: one route looked up (`ip route get`), or a family's routes dumped
//! (`ip route show table all`); and the kernel's word of changes to the
//! host's addresses and routes (`ip monitor`). The messages are written and read here,
//! byte by byte (`struct nlmsghdr`, `struct rtmsg`, then attributes, each
//! 4-byte aligned); the socket is nix's.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};

use crate::Family;

pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_DELADDR: u16 = 21;
pub const RTM_NEWROUTE: u16 = 24;
pub const RTM_DELROUTE: u16 = 25;
pub const RTM_GETROUTE: u16 = 26;
pub const NLM_F_REQUEST: u16 = 1;
/// Set on a dump's messages when the routes changed while it was read.
pub const NLM_F_DUMP_INTR: u16 = 0x10;
pub const NLM_F_DUMP: u16 = 0x300;
pub const RTN_LOCAL: u8 = 2;
pub const RTA_DST: u16 = 1;
pub const RTA_SRC: u16 = 2;
pub const RTA_OIF: u16 = 4;
pub const RTA_TABLE: u16 = 15;
pub const RT_TABLE_MAIN: u32 = 254;
pub const RT_TABLE_LOCAL: u32 = 255;
/// `struct nlmsghdr`'s size.
pub const HEADER: usize = 16;
/// `struct rtmsg`'s size.
pub const RTMSG: usize = 12;
/// The one request a socket here makes at a time is numbered so.
const SEQ: u32 = 1;

fn aligned(len: usize) -> usize {
    (len + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

/// The u32 at `at` (which must be within `b`).
pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// An address family's number, as `rtm_family` has it.
pub fn af(family: Family) -> u8 {
    match family {
        Family::V4 => libc::AF_INET as u8,
        Family::V6 => libc::AF_INET6 as u8,
    }
}

/// An address's bytes, as an attribute holds it.
pub fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// An address of `family` from an attribute's bytes.
pub fn address(family: u8, data: &[u8]) -> Option<IpAddr> {
    match (i32::from(family), data.len()) {
        (libc::AF_INET, 4) => Some(IpAddr::from(<[u8; 4]>::try_from(data).ok()?)),
        (libc::AF_INET6, 16) => Some(IpAddr::from(<[u8; 16]>::try_from(data).ok()?)),
        _ => None,
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("a route message rotor cannot read: {what}"),
    )
}

/// A message: its header, its fixed part (`rtmsg` for a route message, an
/// error code for an error), then `attributes`.
pub fn message(kind: u16, flags: u16, fixed: &[u8], attributes: &[(u16, &[u8])]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend(0u32.to_ne_bytes());
    out.extend(kind.to_ne_bytes());
    out.extend(flags.to_ne_bytes());
    out.extend(SEQ.to_ne_bytes());
    out.extend(0u32.to_ne_bytes());
    out.extend(fixed);
    out.resize(aligned(out.len()), 0);
    for (kind, data) in attributes {
        out.extend(((4 + data.len()) as u16).to_ne_bytes());
        out.extend(kind.to_ne_bytes());
        out.extend(*data);
        out.resize(aligned(out.len()), 0);
    }
    let len = out.len() as u32;
    out[..4].copy_from_slice(&len.to_ne_bytes());
    out
}

/// One message of a datagram.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub kind: u16,
    pub flags: u16,
    pub body: &'a [u8],
}

impl<'a> Message<'a> {
    /// An `NLMSG_ERROR`'s error (`None` for an acknowledgement), or an
    /// `NLMSG_DONE`'s (`None`: the dump is whole).
    pub fn error(&self) -> io::Result<Option<io::Error>> {
        if self.body.len() < 4 {
            return Err(invalid("an error message cut short"));
        }
        let code = u32_at(self.body, 0) as i32;
        Ok((code != 0).then(|| io::Error::from_raw_os_error(code.unsigned_abs() as i32)))
    }

    /// A route message's `rtmsg`, if whole.
    pub fn rtmsg(&self) -> Option<&'a [u8]> {
        self.body.get(..RTMSG)
    }

    /// A route message's attributes, by kind (up to the first cut short).
    pub fn attributes(&self) -> impl Iterator<Item = (u16, &'a [u8])> {
        let body = self.body;
        let mut at = RTMSG;
        std::iter::from_fn(move || {
            if body.len() < at + 4 {
                return None;
            }
            let len = usize::from(u16_at(body, at));
            if len < 4 || len > body.len() - at {
                return None;
            }
            let kind = u16_at(body, at + 2) & 0x3fff;
            let data = &body[at + 4..at + len];
            at += aligned(len);
            Some((kind, data))
        })
    }
}

/// A datagram's messages that answer this socket's request; an error for
/// one cut short.
pub fn messages(buf: &[u8]) -> io::Result<Vec<Message<'_>>> {
    messages_of(buf, Some(SEQ))
}

/// A datagram's messages of sequence number `seq` (`None`: all of them,
/// the kernel's own word of a change too, numbered 0).
fn messages_of(buf: &[u8], seq: Option<u32>) -> io::Result<Vec<Message<'_>>> {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() - at >= HEADER {
        let len = u32_at(buf, at) as usize;
        if len < HEADER || len > buf.len() - at {
            return Err(invalid("a message of a wrong length"));
        }
        if seq.is_none_or(|seq| u32_at(buf, at + 8) == seq) {
            out.push(Message {
                kind: u16_at(buf, at + 4),
                flags: u16_at(buf, at + 6),
                body: &buf[at + HEADER..at + len],
            });
        }
        at += aligned(len).min(buf.len() - at);
    }
    if at != buf.len() {
        return Err(invalid("a datagram ending inside a header"));
    }
    Ok(out)
}

/// The kernel's multicast groups of changes to addresses and routes, of
/// both families (`RTMGRP_IPV4_IFADDR`, `_IPV4_ROUTE`, `_IPV6_IFADDR`,
/// `_IPV6_ROUTE`).
const ADDRESS_AND_ROUTE_GROUPS: u32 = 0x10 | 0x40 | 0x100 | 0x400;

/// A non-blocking socket the kernel tells of every change to this host's
/// addresses and routes, for a reactor to wait on; read it with
/// [`local_change`].
pub fn watch() -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        SockProtocol::NetlinkRoute,
    )?;
    nix::sys::socket::bind(
        fd.as_raw_fd(),
        &NetlinkAddr::new(0, ADDRESS_AND_ROUTE_GROUPS),
    )?;
    Ok(fd)
}

/// What a datagram of a [`watch`] socket tells of this host's own
/// addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LocalChange {
    /// An address, or a route of type local (a prefix routed to the host),
    /// was added or removed.
    pub changed: bool,
    /// One was removed.
    pub departed: bool,
}

/// What a datagram of a [`watch`] socket tells of this host's own
/// addresses and local routes. Other routes (a router's full table
/// churning) are nothing. One it cannot read is taken for a removal.
pub fn local_change(datagram: &[u8]) -> LocalChange {
    let Ok(all) = messages_of(datagram, None) else {
        return LocalChange {
            changed: true,
            departed: true,
        };
    };
    let mut out = LocalChange::default();
    for m in &all {
        let local = match m.kind {
            RTM_NEWADDR | RTM_DELADDR => true,
            RTM_NEWROUTE | RTM_DELROUTE => m.rtmsg().is_none_or(|r| r[7] == RTN_LOCAL),
            _ => false,
        };
        out.changed |= local;
        out.departed |= local && matches!(m.kind, RTM_DELADDR | RTM_DELROUTE);
    }
    out
}

/// A route socket, each answer waited for `timeout` at most (the kernel
/// answers at once; the bound is for one that does not).
pub struct RouteSocket {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl RouteSocket {
    pub fn open(timeout: Duration) -> io::Result<RouteSocket> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        let timeout =
            nix::sys::time::TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
        setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)?;
        // The kernel sends a dump in datagrams of 32 KiB at most.
        Ok(RouteSocket {
            fd,
            buf: vec![0; 64 << 10],
        })
    }

    /// Sends one request (a [`message`]).
    pub fn send(&self, request: &[u8]) -> io::Result<()> {
        sendto(
            self.fd.as_raw_fd(),
            request,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )?;
        Ok(())
    }

    /// The next datagram of the answer.
    pub fn receive(&mut self) -> io::Result<&[u8]> {
        let n = loop {
            match recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_TRUNC) {
                Err(Errno::EINTR) => continue,
                r => break r?,
            }
        };
        if n > self.buf.len() {
            return Err(invalid("a datagram larger than 64 KiB"));
        }
        Ok(&self.buf[..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Of the kernel's word: an address added is a change, one removed a
    /// departure too, and so is a local route's; a unicast route (a
    /// router's table churning) is nothing; bytes that do not read are
    /// taken for a departure.
    #[test]
    fn local_changes_are_told_from_others() {
        let rtmsg = |kind: u8| [10u8, 64, 0, 0, 255, 2, 0, kind, 0, 0, 0, 0];
        let ifaddr = [10u8, 128, 0, 0, 1, 0, 0, 0];
        let said = |kind, fixed: &[u8]| local_change(&message(kind, 0, fixed, &[]));
        let change = |changed, departed| LocalChange { changed, departed };
        assert_eq!(said(RTM_NEWADDR, &ifaddr), change(true, false));
        assert_eq!(said(RTM_DELADDR, &ifaddr), change(true, true));
        assert_eq!(said(RTM_NEWROUTE, &rtmsg(RTN_LOCAL)), change(true, false));
        assert_eq!(said(RTM_DELROUTE, &rtmsg(RTN_LOCAL)), change(true, true));
        assert_eq!(said(RTM_NEWROUTE, &rtmsg(1)), change(false, false));
        assert_eq!(said(RTM_DELROUTE, &rtmsg(1)), change(false, false));
        assert_eq!(
            local_change(&[1, 2, 3, 200, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            change(true, true)
        );
    }

    #[test]
    fn a_message_is_read_as_written() {
        let rtmsg = [10u8, 64, 0, 0, 254, 2, 0, 2, 0, 0, 0, 0];
        let dst = [0x20u8, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut buf = message(
            RTM_NEWROUTE,
            NLM_F_DUMP,
            &rtmsg,
            &[(RTA_DST, &dst), (RTA_OIF, &[1, 0, 0])],
        );
        buf.extend(message(NLMSG_DONE, NLM_F_DUMP, &0u32.to_ne_bytes(), &[]));
        let all = messages(&buf).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].kind, RTM_NEWROUTE);
        assert_eq!(all[0].rtmsg().unwrap(), rtmsg);
        let attrs: Vec<_> = all[0].attributes().collect();
        assert_eq!(attrs, [(RTA_DST, &dst[..]), (RTA_OIF, &[1, 0, 0][..])]);
        assert_eq!(all[1].kind, NLMSG_DONE);
        // Cut inside a message, or inside a header: an error.
        assert!(messages(&buf[..20]).is_err());
        assert!(messages(&buf[..buf.len() - 4]).is_err());
        let err = message(NLMSG_ERROR, 0, &(-libc::EPERM).to_ne_bytes(), &[]);
        let err = messages(&err).unwrap()[0].error().unwrap().unwrap();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    }
}
