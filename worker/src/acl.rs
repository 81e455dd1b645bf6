//! Which destinations the proxy may connect to, decided on the resolved
//! address (after DNS, so names that resolve to private addresses and DNS
//! rebinding are caught) and the port, before any connection is made.
//!
//! Denied by default: every address that is not a public unicast address —
//! loopback, RFC 1918, link-local (169.254.169.254, the cloud metadata
//! service), Azure's WireServer (168.63.129.16, public but the VM agent's),
//! CGNAT, unique-local (fd00:ec2::254), multicast, unspecified,
//! broadcast, documentation and benchmarking ranges — and the IPv4-mapped,
//! NAT64 and 6to4 forms of all IPv4 ones. The operator's rules come first:
//! of the `--allow-destination` and `--deny-destination` ranges holding an
//! address, the narrowest decides (a deny on a tie), so `--allow 10.0.0.0/8
//! --deny 10.0.5.0/24` keeps 10.0.5.x out and `--deny 0.0.0.0/0 --allow
//! 203.0.113.0/24` lets that range alone through; an address no operator
//! rule holds gets the defaults. The SMTP ports (25, 465, 587) are denied
//! unless the port list says otherwise.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;

/// A destination range: `203.0.113.0/24`, or one address (`2001:db8::1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(IpNet);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an address or CIDR (e.g. 203.0.113.0/24, 2001:db8::/32)")]
pub struct CidrError(String);

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let t = s.trim();
        let net = match t.contains('/') {
            true => t.parse::<IpNet>().ok(),
            false => t.parse::<IpAddr>().ok().map(IpNet::from),
        };
        net.map(|n| Cidr(unmapped(n)))
            .ok_or_else(|| CidrError(s.to_string()))
    }
}

/// An IPv4-mapped range (`::ffff:198.51.100.0/120`) as the IPv4 range it
/// maps: destinations are checked in their IPv4 form, so a rule written in
/// the mapped one would hold none of them.
///
/// Not the whole mapped space (`::ffff:0:0/96`): written to keep out mapped
/// literals, as the IPv4 range it maps it would be every IPv4 address.
fn unmapped(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() > 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(|n| IpNet::V4(n.trunc()))
                .unwrap_or(net),
            None => net,
        },
        _ => net,
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip)
    }

    fn prefix_len(&self) -> u8 {
        self.0.prefix_len()
    }
}

/// Ranges denied unless allowed explicitly.
pub const DEFAULT_DENY: &[&str] = &[
    "0.0.0.0/8",        // "this network", unspecified
    "10.0.0.0/8",       // RFC 1918
    "100.64.0.0/10",    // CGNAT (RFC 6598)
    "127.0.0.0/8",      // loopback
    "169.254.0.0/16",   // link-local, incl. 169.254.169.254 (cloud metadata)
    "168.63.129.16/32", // Azure's WireServer: the VM agent's goal state, extension settings
    "172.16.0.0/12",    // RFC 1918
    "192.0.0.0/24",     // IETF protocol assignments
    "192.0.2.0/24",     // TEST-NET-1
    "192.88.99.0/24",   // 6to4 relay anycast
    "192.168.0.0/16",   // RFC 1918
    "198.18.0.0/15",    // benchmarking
    "198.51.100.0/24",  // TEST-NET-2
    "203.0.113.0/24",   // TEST-NET-3
    "224.0.0.0/4",      // multicast
    "240.0.0.0/4",      // reserved, incl. 255.255.255.255 (broadcast)
    "::/128",           // unspecified
    "::1/128",          // loopback
    "100::/64",         // discard-only
    "2001::/32",        // Teredo (a relay's tunnel to an IPv4 host)
    "2001:2::/48",      // benchmarking
    "2001:10::/28",     // ORCHID (deprecated)
    "2001:20::/28",     // ORCHIDv2: identifiers, not locators
    "2001:db8::/32",    // documentation
    "3fff::/20",        // documentation (RFC 9637)
    "5f00::/16",        // SRv6 segment identifiers (RFC 9602)
    "64:ff9b:1::/48",   // local-use NAT64
    "fc00::/7",         // unique-local, incl. fd00:ec2::254 (cloud metadata)
    "fe80::/10",        // link-local
    "fec0::/10",        // site-local (deprecated)
    "ff00::/8",         // multicast
];

/// Ports denied unless the port list says otherwise: SMTP relay (25) and
/// submission (465, 587). Mail sent from a pool's addresses gets them on
/// blocklists that every other site reads too.
pub const DEFAULT_DENY_PORTS: &[u16] = &[25, 465, 587];

#[derive(Debug, Clone)]
pub struct Acl {
    allow: Vec<Cidr>,
    /// The operator's.
    deny: Vec<Cidr>,
    defaults: Vec<Cidr>,
    deny_ports: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("destination {0} is in a range this proxy does not connect to ({1})")]
    Address(IpAddr, Cidr),
    #[error("destination port {0} is not allowed")]
    Port(u16),
    #[error("destination {0} is an address of this host")]
    Local(IpAddr),
    /// One of this worker's own listeners: a request through the proxy to
    /// itself, whatever allows its address.
    #[error("destination {0} is this proxy's own listener (a loop)")]
    Loop(SocketAddr),
}

/// How one form of a destination passed the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Through {
    /// No such form (an address that embeds no IPv4 one).
    Absent,
    /// The operator's narrowest allow holding it names it: the address
    /// alone (a /32, a /128), or loopback by a range of loopback.
    Named,
    /// The operator's narrowest allow holding it is a range of more.
    Range,
    /// No operator rule holds it, nor a default deny.
    Default,
}

impl Through {
    /// How the allow `a` lets `ip` through.
    fn allowed(a: Cidr, ip: IpAddr) -> Through {
        let (whole, loopback) = if ip.is_ipv4() { (32, 8) } else { (128, 128) };
        match a.prefix_len() == whole || (ip.is_loopback() && a.prefix_len() >= loopback) {
            true => Through::Named,
            false => Through::Range,
        }
    }
}

/// Why a destination passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// An `--allow-destination` range holds it.
    Explicitly,
    /// No rule denies it.
    ByDefault,
}

/// Whether an address is one of this host's own — its interface addresses,
/// the pool's, a prefix routed locally (`ip route add local …`) — asked of
/// the kernel's routing table (`rotor_protocol::routes`, read again every
/// few seconds). A destination like that reaches the host's own services
/// (sshd, the proxy itself) and is refused unless allowed explicitly.
///
/// Not a test bind: an IPv6 address of a local route does not bind as it
/// is (it would pass), and with `ip_nonlocal_bind` every address binds
/// (everything would be refused). Only where a family's table cannot be
/// read (no `/proc`) does a bind answer.
///
/// It also knows this worker's own listeners: a request to one of them is
/// a loop (a CONNECT to the proxy's port, through the proxy, again and
/// again, each hop a lease and two sockets), refused whatever allows its
/// address (`--allow-destination 127.0.0.0/8` for a local test origin
/// opens the loopback addresses, not the proxy on them).
#[derive(Default)]
pub struct LocalAddrs {
    own: Vec<SocketAddr>,
}

/// How old a reading of this host's routes a request's checks take (its
/// destination here, its source's broadcast check in `connect`); the
/// kernel's word of a change, watched, makes it stale at once.
pub(crate) const LOCAL_TTL: std::time::Duration = std::time::Duration::from_secs(5);

impl LocalAddrs {
    /// With `own`, the addresses this worker's listeners are bound to.
    pub fn with_listeners(own: Vec<SocketAddr>) -> LocalAddrs {
        LocalAddrs { own }
    }

    /// Whether `dest` is one of this worker's listeners: its address, or
    /// an address of this host on the port of one bound to a wildcard
    /// (`0.0.0.0`'s of IPv4; `::`'s of either family, as a socket systemd
    /// passes may take both). A port compare a listener unless the port is
    /// one of theirs.
    fn is_own(&self, dest: SocketAddr) -> bool {
        self.own.iter().any(|l| {
            let at = l.ip().to_canonical();
            l.port() == dest.port()
                && forms(dest.ip())
                    .into_iter()
                    .flatten()
                    .any(|ip| match at.is_unspecified() {
                        true if at.is_ipv4() && !ip.is_ipv4() => false,
                        true => ip.is_loopback() || self.is_local(ip),
                        false => ip == at,
                    })
        })
    }

    pub fn is_local(&self, ip: IpAddr) -> bool {
        rotor_protocol::routes::LocalRoutes::current(LOCAL_TTL)
            .holds(ip)
            .unwrap_or_else(|| std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok())
    }
}

impl Acl {
    /// The default rules plus the operator's.
    /// (`--deny-port 0` denies none: no port 0 is listed, so `--check`
    /// says none, as it says for an empty list.)
    pub fn new(allow: Vec<Cidr>, deny: Vec<Cidr>, mut deny_ports: Vec<u16>) -> Acl {
        deny_ports.retain(|&p| p != 0);
        Acl {
            allow,
            deny,
            defaults: DEFAULT_DENY
                .iter()
                .map(|s| s.parse().expect("default ranges are valid"))
                .collect(),
            deny_ports,
        }
    }

    /// The destination ports refused.
    pub fn deny_ports(&self) -> &[u16] {
        &self.deny_ports
    }

    /// The operator's ranges: allowed, denied.
    pub fn operator_rules(&self) -> (&[Cidr], &[Cidr]) {
        (&self.allow, &self.deny)
    }

    /// The defaults alone.
    pub fn default_rules() -> Acl {
        Acl::new(Vec::new(), Vec::new(), DEFAULT_DENY_PORTS.to_vec())
    }

    /// Whether the port rules let a connection to `port` through (the
    /// address is checked with it again).
    pub fn check_port(&self, port: u16) -> Result<(), Denied> {
        match self.deny_ports.contains(&port) {
            true => Err(Denied::Port(port)),
            false => Ok(()),
        }
    }

    /// Whether the proxy may connect to `dest`, by the rules alone.
    pub fn check(&self, dest: SocketAddr) -> Result<Allowed, Denied> {
        let through = self.decide(dest)?;
        Ok(match through.iter().all(|t| *t != Through::Default) {
            true => Allowed::Explicitly,
            false => Allowed::ByDefault,
        })
    }

    /// The rules' verdict on each form of `dest` (see `forms`): how it
    /// passed.
    fn decide(&self, dest: SocketAddr) -> Result<[Through; 2], Denied> {
        self.check_port(dest.port())?;
        // An address is checked as itself and as every IPv4 address it
        // embeds, so ::ffff:127.0.0.1 or 64:ff9b::a9fe:a9fe are no way around
        // a rule. Each form is decided on its own: the operator's narrowest
        // rule holding it, else the defaults; an allow of the IPv6 form
        // (`--allow-destination 64:ff9b::/96`) lets through only the IPv4
        // addresses inside it that pass too. Explicitly allowed only if
        // every form is.
        let mut through = [Through::Absent; 2];
        for (form, ip) in forms(dest.ip()).iter().enumerate() {
            let Some(ip) = ip else { continue };
            let narrowest = |rules: &[Cidr]| {
                rules
                    .iter()
                    .filter(|c| c.contains(*ip))
                    .max_by_key(|c| c.prefix_len())
                    .copied()
            };
            match (narrowest(&self.allow), narrowest(&self.deny)) {
                (Some(a), Some(d)) if a.prefix_len() > d.prefix_len() => {
                    through[form] = Through::allowed(a, *ip)
                }
                (_, Some(d)) => return Err(Denied::Address(dest.ip(), d)),
                (Some(a), None) => through[form] = Through::allowed(a, *ip),
                (None, None) => {
                    through[form] = Through::Default;
                    if let Some(rule) = self.defaults.iter().find(|c| c.contains(*ip)) {
                        return Err(Denied::Address(dest.ip(), *rule));
                    }
                }
            }
        }
        Ok(through)
    }

    /// The rules, and then: no address of this host unless an allow
    /// names it — the address itself (a /32 or /128), or loopback by a
    /// range inside 127.0.0.0/8. A wider allow is for other hosts: an
    /// allowlist of the VPC's 10.0.0.0/8 does not open this host's sshd, or
    /// a loop into the proxy, at its own 10.0.1.5.
    /// (Each form on its own.) The unspecified address (`0.0.0.0`, `::`,
    /// in any form) is refused whatever allows it: it is in no route
    /// table, but a connection to it reaches this host (Linux takes it for
    /// the local address), and a sinkholing resolver answers names with it.
    /// Nor is this worker's own listener, whatever allows it (a loop).
    /// An address refused anyway is refused as any other, not as a loop:
    /// a client probing the port of a wildcard listener across addresses
    /// would otherwise learn which are this host's.
    pub fn check_with(&self, dest: SocketAddr, local: &LocalAddrs) -> Result<(), Denied> {
        let forms = forms(dest.ip());
        if forms.iter().flatten().any(IpAddr::is_unspecified) {
            return Err(Denied::Local(dest.ip()));
        }
        let through = self.decide(dest)?;
        let own = forms.iter().zip(through).any(|(ip, t)| {
            matches!(t, Through::Range | Through::Default)
                && ip.is_some_and(|ip| local.is_local(ip))
        });
        if own {
            return Err(Denied::Local(dest.ip()));
        }
        match local.is_own(dest) {
            true => Err(Denied::Loop(dest)),
            false => Ok(()),
        }
    }
}

/// `ip` and the IPv4 address it carries, if it is IPv4-mapped, NAT64
/// (64:ff9b::/96), IPv4-translated (::ffff:0:0/96) or 6to4 (2002::/16).
fn forms(ip: IpAddr) -> [Option<IpAddr>; 2] {
    let embedded = match ip {
        IpAddr::V4(_) => None,
        IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
    };
    [Some(ip), embedded]
}

fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(low);
    }
    // IPv4-translated (SIIT, RFC 6052's ::ffff:0:a.b.c.d).
    if s[..6] == [0, 0, 0, 0, 0xffff, 0] {
        return Some(low);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    // IPv4-compatible (deprecated ::a.b.c.d), but not :: or ::1.
    if s[..6] == [0; 6] && u32::from(low) > 1 {
        return Some(low);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(acl: &Acl, ip: &str, port: u16) -> bool {
        acl.check(SocketAddr::new(ip.parse().unwrap(), port))
            .is_err()
    }

    #[test]
    fn every_non_public_range_is_denied_by_default() {
        let acl = Acl::default_rules();
        for ip in [
            "0.0.0.0",
            "10.1.2.3",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "127.255.255.254",
            "169.254.169.254",
            "168.63.129.16",
            "::ffff:168.63.129.16",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "100::1",
            "2001:2::1",
            "2001:db8::1",
            "3fff::1",
            "5f00::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:10::1",
            "2001:2f::1",
            "64:ff9b:1::1",
            "fc00::1",
            "fd00:ec2::254",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            // IPv4-mapped, NAT64, 6to4 and IPv4-compatible forms
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "::ffff:0:7f00:1",
            "::ffff:0:a9fe:a9fe",
            "2002:c0a8:0101::1",
            "2002:7f00:0001::",
            "::10.0.0.1",
        ] {
            assert!(denied(&acl, ip, 80), "{ip} should be denied");
        }
    }

    #[test]
    fn public_addresses_pass() {
        let acl = Acl::default_rules();
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.167.255.255",
            "198.17.255.255",
            "2606:4700::1111",
            "2a00:1450::1",
            "2001:4860:4860::8888",
            "2001:200::1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:0808:0808::1",
        ] {
            assert!(!denied(&acl, ip, 443), "{ip} should pass");
        }
    }

    #[test]
    fn ports_are_denied_by_list() {
        let acl = Acl::default_rules();
        for port in [25, 465, 587] {
            assert_eq!(
                acl.check(SocketAddr::new("8.8.8.8".parse().unwrap(), port)),
                Err(Denied::Port(port))
            );
        }
        assert!(acl.check("8.8.8.8:443".parse().unwrap()).is_ok());
        let acl = Acl::new(vec![], vec![], vec![]);
        assert!(acl.check("8.8.8.8:25".parse().unwrap()).is_ok());
        // `--deny-port 0`: none, and said so.
        let acl = Acl::new(vec![], vec![], vec![0]);
        assert!(acl.check("8.8.8.8:25".parse().unwrap()).is_ok());
        assert_eq!(acl.deny_ports(), &[] as &[u16]);
    }

    #[test]
    fn allow_wins_and_deny_adds() {
        let acl = Acl::new(
            vec!["127.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()],
            vec!["8.8.8.0/24".parse().unwrap()],
            vec![25],
        );
        assert!(!denied(&acl, "127.0.0.1", 80));
        assert!(!denied(&acl, "::ffff:127.0.0.1", 80));
        assert!(!denied(&acl, "::1", 80));
        assert!(denied(&acl, "10.0.0.1", 80));
        assert!(denied(&acl, "8.8.8.8", 80));
        assert!(denied(&acl, "127.0.0.1", 25), "the port list still applies");
        // The narrowest operator rule decides; a deny on a tie.
        let acl = Acl::new(
            vec![
                "10.0.0.0/8".parse().unwrap(),
                "10.0.5.7".parse().unwrap(),
                "198.51.100.0/24".parse().unwrap(),
            ],
            vec![
                "10.0.5.0/24".parse().unwrap(),
                "198.51.100.0/24".parse().unwrap(),
                "0.0.0.0/0".parse().unwrap(),
            ],
            vec![],
        );
        assert!(!denied(&acl, "10.1.2.3", 80));
        assert!(denied(&acl, "10.0.5.1", 80));
        assert!(denied(&acl, "::ffff:10.0.5.1", 80));
        assert!(!denied(&acl, "10.0.5.7", 80), "narrower again");
        assert!(denied(&acl, "198.51.100.1", 80), "a tie is a deny");
        assert!(denied(&acl, "8.8.8.8", 80), "an allowlist");
        assert!(!denied(&acl, "2606:4700::1", 80), "no IPv4 rule holds it");
    }

    /// An allow of the IPv6 form (NAT64, 6to4) does not let through the
    /// IPv4 addresses inside it that the defaults or the operator deny.
    #[test]
    fn an_allowed_ipv6_form_still_checks_the_ipv4_inside() {
        let acl = Acl::new(
            vec![
                "64:ff9b::/96".parse().unwrap(),
                "2002::/16".parse().unwrap(),
            ],
            vec!["::/0".parse().unwrap(), "203.0.113.0/24".parse().unwrap()],
            vec![],
        );
        assert!(denied(&acl, "64:ff9b::a00:5", 80), "10.0.0.5");
        assert!(denied(&acl, "64:ff9b::a9fe:a9fe", 80), "169.254.169.254");
        assert!(denied(&acl, "2002:7f00:1::1", 80), "127.0.0.1");
        assert!(
            denied(&acl, "64:ff9b::cb00:7101", 80),
            "the operator's deny"
        );
        assert!(!denied(&acl, "64:ff9b::808:808", 80), "8.8.8.8");
        assert!(denied(&acl, "2606:4700::1", 80), "the operator's ::/0");
        assert_eq!(
            acl.check("[64:ff9b::808:808]:80".parse().unwrap()),
            Ok(Allowed::ByDefault),
            "its IPv4 form passed by default: the own-host check applies"
        );
        // Both forms allowed: explicitly.
        let acl = Acl::new(
            vec![
                "64:ff9b::/96".parse().unwrap(),
                "10.0.0.0/8".parse().unwrap(),
            ],
            vec![],
            vec![],
        );
        assert_eq!(
            acl.check("[64:ff9b::a00:5]:80".parse().unwrap()),
            Ok(Allowed::Explicitly)
        );
    }

    /// A rule written in the IPv4-mapped form holds the IPv4 addresses it
    /// maps (destinations are checked in that form).
    #[test]
    fn mapped_rules_hold_their_ipv4_addresses() {
        let c: Cidr = "::ffff:198.51.100.0/120".parse().unwrap();
        assert_eq!(c.to_string(), "198.51.100.0/24");
        assert_eq!(
            "::ffff:8.8.8.8".parse::<Cidr>().unwrap().to_string(),
            "8.8.8.8/32"
        );
        assert_eq!(
            "::ffff:0.0.0.0/96".parse::<Cidr>().unwrap().to_string(),
            "::ffff:0.0.0.0/96",
            "the whole mapped space is not every IPv4 address"
        );
        let acl = Acl::new(vec![], vec![c], vec![]);
        assert!(denied(&acl, "198.51.100.7", 80));
        assert!(!denied(&acl, "8.8.8.8", 80));
    }

    proptest::proptest! {
        /// An IPv4 address and its IPv4-mapped IPv6 form get one verdict.
        #[test]
        fn mapped_forms_get_the_same_verdict(v4 in proptest::prelude::any::<u32>(), port in 1u16..) {
            let acl = Acl::default_rules();
            let v4 = Ipv4Addr::from(v4);
            let a = acl.check(SocketAddr::new(IpAddr::V4(v4), port)).is_ok();
            let b = acl.check(SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), port)).is_ok();
            proptest::prop_assert_eq!(a, b);
        }

        #[test]
        fn arbitrary_cidrs_never_panic(s in "\\PC{0,50}") {
            let _ = s.parse::<Cidr>();
        }
    }

    #[test]
    fn the_hosts_own_addresses_need_an_explicit_allow() {
        let local = LocalAddrs::default();
        assert!(local.is_local("127.0.0.1".parse().unwrap()));
        // TEST-NET-3 is configured nowhere: binding to it fails, no traffic.
        assert!(!local.is_local("203.0.113.77".parse().unwrap()));
        // An empty deny list shows the local check on its own.
        let acl = Acl {
            allow: vec![],
            deny: vec![],
            defaults: vec![],
            deny_ports: vec![],
        };
        assert_eq!(
            acl.check_with("127.0.0.1:22".parse().unwrap(), &local),
            Err(Denied::Local("127.0.0.1".parse().unwrap()))
        );
        assert!(acl
            .check_with("203.0.113.77:80".parse().unwrap(), &local)
            .is_ok());
        let allowing = Acl::new(vec!["127.0.0.1".parse().unwrap()], vec![], vec![]);
        assert!(allowing
            .check_with("127.0.0.1:22".parse().unwrap(), &local)
            .is_ok());
        // Loopback by a range of loopback (as tests and the README's
        // local origin do); not by a range that holds more.
        for (rule, ok) in [
            ("127.0.0.0/8", true),
            ("127.0.0.0/24", true),
            ("0.0.0.0/0", false),
            ("::ffff:127.0.0.0/104", true),
        ] {
            let acl = Acl {
                allow: vec![rule.parse().unwrap()],
                ..acl.clone()
            };
            let got = acl.check_with("127.0.0.1:22".parse().unwrap(), &local);
            assert_eq!(got.is_ok(), ok, "{rule}: {got:?}");
        }
        // The unspecified address reaches this host too, whatever allows
        // it (even by name).
        for (rule, dest) in [
            ("0.0.0.0/0", "0.0.0.0:22"),
            ("0.0.0.0", "0.0.0.0:22"),
            ("::/0", "[::]:22"),
            ("::", "[::]:22"),
            ("::/0", "[::ffff:0.0.0.0]:22"),
        ] {
            let acl = Acl {
                allow: vec![rule.parse().unwrap()],
                ..acl.clone()
            };
            let dest: SocketAddr = dest.parse().unwrap();
            assert_eq!(
                acl.check_with(dest, &local),
                Err(Denied::Local(dest.ip())),
                "{rule}"
            );
        }
    }

    /// A request to the worker's own listener is a loop, refused whatever
    /// allows its address: by that address, or any of this host's on the
    /// port of a wildcard listener, in any form. Another port of the same
    /// address, or the same port elsewhere, is not.
    #[test]
    fn the_workers_own_listeners_are_refused_whatever_allows_them() {
        let acl = Acl {
            allow: vec!["127.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()],
            deny: vec![],
            defaults: vec![],
            deny_ports: vec![],
        };
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let local = LocalAddrs::with_listeners(vec![
            addr("127.0.0.1:8080"),
            addr("0.0.0.0:1080"),
            addr("[::]:3128"),
            addr("[::ffff:0.0.0.0]:8443"),
        ]);
        for dest in [
            "127.0.0.1:8080",
            "[::ffff:127.0.0.1]:8080",
            "127.0.0.1:1080",
            "127.0.0.9:1080",
            "[::1]:3128",
            "127.0.0.1:3128",
            "127.0.0.1:8443",
        ] {
            assert_eq!(
                acl.check_with(addr(dest), &local),
                Err(Denied::Loop(addr(dest))),
                "{dest}"
            );
        }
        // (IPv4's wildcard takes no IPv6 client.)
        for dest in [
            "127.0.0.1:8081",
            "127.0.0.2:8080",
            "203.0.113.77:1080",
            "[::1]:1080",
        ] {
            assert_eq!(acl.check_with(addr(dest), &local), Ok(()), "{dest}");
        }
        // Without listeners (as before), allowed.
        assert_eq!(
            acl.check_with(addr("127.0.0.1:8080"), &LocalAddrs::default()),
            Ok(())
        );
        // An address the rules refuse anyway is refused as any, not named
        // a loop (which would tell a client it is this host's).
        let strict = Acl {
            allow: vec![],
            defaults: vec!["127.0.0.0/8".parse().unwrap()],
            ..acl
        };
        let dest = addr("127.0.0.1:8443");
        assert!(
            matches!(strict.check_with(dest, &local), Err(Denied::Address(..))),
            "{:?}",
            strict.check_with(dest, &local)
        );
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!("::1".parse::<Cidr>().unwrap().to_string(), "::1/128");
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("example.com/8".parse::<Cidr>().is_err());
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        assert!(!all.contains("::1".parse().unwrap()));
    }
}
