//! A pool entry: one address, or a whole prefix that is never enumerated.
//!
//! A prefix of `k` host bits is walked in a full-period permutation of its
//! index: lease `i` of the prefix gets offset `perm(i)`, a bijection of
//! `[0, 2^k)` built from steps that are each bijective on `k` bits
//! (multiply by an odd constant, add a constant, `x ^= x >> s`). So no
//! address repeats until the whole prefix has been used, consecutive leases
//! land far apart (not on neighbouring addresses), and the position is one
//! counter that can be saved and resumed; `index_of` inverts it, so the
//! address due next can be found again after a restart or a refresh.
//!
//! The permutation's constants are mixed with the host's order key
//! ([`set_order`]: random, kept in the allocator's state directory,
//! handed to workers in the lease table). With fixed constants alone every
//! rotor host leased the same host parts in the same order in every
//! prefix: a destination could invert the public permutation, see that an
//! address's lease index is small, and so tell a rotor address and count
//! its leases. The key makes the order the host's own. (The steps are not
//! a cipher: the key defeats inverting a public function, not a determined
//! cryptanalysis of many leases.) A zero key is the fixed order: tests,
//! and the tables of allocators from before the key.
//!
//! The key is mixed with each prefix's address ([`Order::by_prefix`]), so
//! each prefix has an order of its own. With the host's key alone, every
//! prefix of a size leased the same host parts in the same order: two /96s
//! (or IPv4 /15s) of one pool leased the same host parts side by side, and
//! a renumbered /64 the old one's interface IDs, which tied them together
//! for any destination that saw both. Tables of allocators from before it are
//! leased in the key's order alone.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicPtr, Ordering};

use serde::{Deserialize, Serialize};

/// An address family, as an index (`V4` = 0, `V6` = 1) where one is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn bits(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// One address (`host_bits` 0), or the `2^host_bits` addresses of a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Segment {
    /// The address, or the prefix's first address.
    base: IpAddr,
    host_bits: u8,
}

const M1: u128 = 0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835;
const C1: u128 = 0x2545_f491_4f6c_dd1d_6a09_e667_f3bc_c909;
const M2: u128 = 0xbf58_476d_1ce4_e5b9_94d0_49bb_1331_11eb;

/// The host's order key (see the module's doc): four words, zero for the
/// fixed order.
pub type OrderKey = [u64; 4];

/// The order prefixes are leased in (see the module's doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Order {
    pub key: OrderKey,
    /// Each prefix in an order of its own: the key mixed with the
    /// prefix's address (an allocator of `MINOR_PREFIX_ORDER` or later).
    pub by_prefix: bool,
}

impl Order {
    /// The order of an allocator of this version with `key`.
    pub fn of(key: OrderKey) -> Order {
        Order {
            key,
            by_prefix: true,
        }
    }

    /// The first protocol minor whose worker leases from a table in this
    /// order (an older one is not handed the table: it leases over the
    /// socket).
    pub fn minor_needed(self) -> u16 {
        match self {
            Order {
                by_prefix: true, ..
            } => crate::MINOR_PREFIX_ORDER,
            Order { key, .. } if key != [0; 4] => crate::MINOR_ORDER_KEY,
            _ => 0,
        }
    }

    /// The permutation's constants for the prefix at `base` (host bits
    /// clear) with `host_bits`, of `family`.
    fn keyed(self, family: Family, base: u128, host_bits: u8) -> Keyed {
        if !self.by_prefix {
            return Keyed::new(self.key);
        }
        // splitmix64's finaliser, chained through the prefix's words.
        let mix = |mut z: u64| {
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let at = (u64::from(host_bits) << 1) | family.index() as u64;
        let h0 = mix((base >> 64) as u64 ^ 0x9e37_79b9_7f4a_7c15);
        let h1 = mix(base as u64 ^ h0);
        let h2 = mix(at ^ h1);
        let h3 = mix(h2 ^ 0x6a09_e667_f3bc_c909);
        let [a, b, c, d] = self.key;
        Keyed::new([a ^ h0, b ^ h1, c ^ h2, d ^ h3])
    }
}

/// The order in use, swapped whole: one read sees one order (four words
/// stored one by one could be read half old, half new by a lease on
/// another thread while a worker maps a restarted allocator's table).
/// Null: the zero key, by the key alone.
static ORDER: AtomicPtr<Order> = AtomicPtr::new(std::ptr::null_mut());

/// Sets the order every prefix of this process is leased in: the
/// allocator's, before it computes an address; a worker's, from the lease
/// table it maps. An order that changes is kept for the process's life (a
/// few dozen bytes at each allocator restart with another key): a lease
/// may still be reading the old one.
pub fn set_order(order: Order) {
    if self::order() != order {
        ORDER.store(Box::leak(Box::new(order)), Ordering::Release);
    }
}

/// The order in use.
pub fn order() -> Order {
    let p = ORDER.load(Ordering::Acquire);
    // SAFETY: null, or an order leaked by `set_order`, never freed.
    #[allow(unsafe_code)]
    unsafe {
        p.as_ref().copied().unwrap_or_default()
    }
}

/// A new order key from the kernel's random source (see `random_bytes`).
pub fn random_order_key() -> std::io::Result<OrderKey> {
    let mut b = [0u8; 32];
    random_bytes(&mut b)?;
    Ok(std::array::from_fn(|k| {
        u64::from_le_bytes(b[k * 8..k * 8 + 8].try_into().expect("8 bytes"))
    }))
}

/// `b` filled from the kernel's random source: getrandom(2), which needs
/// no /dev in a chroot, without waiting (early at boot, before the
/// kernel's pool is ready, it would block the allocator's start), else
/// /dev/urandom, which never waits.
pub fn random_bytes(b: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < b.len() {
        let rest = &mut b[filled..];
        // SAFETY: writes at most `rest.len()` bytes into `rest`.
        #[allow(unsafe_code)]
        let n =
            unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), libc::GRND_NONBLOCK) };
        match n {
            n if n > 0 => filled += n as usize,
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                // Not ready yet (EAGAIN), or no getrandom (ENOSYS).
                std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, b)?;
                break;
            }
        }
    }
    Ok(())
}

/// The permutation's constants for `key`, on 128 bits: both multipliers
/// odd; `w` whitens the index going in and (turned) the offset going out.
#[derive(Clone, Copy)]
struct Keyed {
    m1: u128,
    c1: u128,
    m2: u128,
    w: u128,
}

impl Keyed {
    fn new([a, b, c, d]: OrderKey) -> Keyed {
        let wide = |hi: u64, lo: u64| (u128::from(hi) << 64) | u128::from(lo);
        Keyed {
            m1: (M1 ^ wide(a, c)) | 1,
            c1: C1 ^ wide(b, d),
            m2: (M2 ^ wide(c, a)) | 1,
            w: wide(d, b),
        }
    }

    /// The same on 64 bits: the low halves (a zero key gives the fixed
    /// constants' low halves, the order before the key).
    fn narrow(self) -> (u64, u64, u64, u64) {
        (
            self.m1 as u64,
            self.c1 as u64,
            self.m2 as u64,
            self.w as u64,
        )
    }
}

impl Segment {
    pub fn single(ip: IpAddr) -> Segment {
        Segment {
            base: ip,
            host_bits: 0,
        }
    }

    /// The prefix of `ip` with `len` bits (host bits cleared); `None` if
    /// `len` is longer than the family's addresses.
    pub fn prefix(ip: IpAddr, len: u8) -> Option<Segment> {
        let bits = Family::of(&ip).bits();
        let host_bits = bits.checked_sub(len)?;
        let base = from_u128(Family::of(&ip), to_u128(ip) & !mask(host_bits));
        Some(Segment { base, host_bits })
    }

    pub fn family(&self) -> Family {
        Family::of(&self.base)
    }

    pub fn base(&self) -> IpAddr {
        self.base
    }

    pub fn host_bits(&self) -> u8 {
        self.host_bits
    }

    /// The prefix length (the family's bits for one address).
    pub fn prefix_len(&self) -> u8 {
        self.family().bits() - self.host_bits
    }

    pub fn is_single(&self) -> bool {
        self.host_bits == 0
    }

    /// Addresses it holds, saturated at `u128::MAX` (for `::/0`).
    pub fn len(&self) -> u128 {
        mask(self.host_bits).saturating_add(1)
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The address lease `i` of this segment gets (`i` is taken modulo the
    /// size).
    pub fn at(&self, i: u128) -> IpAddr {
        self.at_with(i, order())
    }

    /// The address lease `i` gets in `order`.
    pub fn at_with(&self, i: u128, order: Order) -> IpAddr {
        if self.host_bits == 0 {
            return self.base;
        }
        lease_address_with(self.family(), to_u128(self.base), self.host_bits, i, order)
    }

    /// Which lease of this segment gets `ip`, if `ip` is in it.
    pub fn index_of(&self, ip: IpAddr) -> Option<u128> {
        self.index_with(ip, order())
    }

    /// Which lease of this segment gets `ip` in `order`.
    fn index_with(&self, ip: IpAddr, order: Order) -> Option<u128> {
        if !self.contains(ip) {
            return None;
        }
        let host = to_u128(ip) & mask(self.host_bits);
        let keyed = order.keyed(self.family(), to_u128(self.base), self.host_bits);
        Some(unpermute(host, self.host_bits, keyed))
    }

    /// Whether `ip` is in the segment: its network bits compared, the
    /// permutation not inverted (a worker asks this of every lease it
    /// takes from the table, and the inverse loops up to 64 times).
    pub fn contains(&self, ip: IpAddr) -> bool {
        Family::of(&ip) == self.family()
            && to_u128(ip) & !mask(self.host_bits) == to_u128(self.base)
    }
}

/// Prefixes grouped by length: whether one of them holds a segment is a
/// probe per distinct length (a host with thousands of /32 addresses has
/// one or two), not a walk of every prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixSet {
    by_len: Vec<(u8, std::collections::HashSet<Segment>)>,
}

impl PrefixSet {
    pub fn insert(&mut self, p: Segment) {
        let len = p.prefix_len();
        match self.by_len.iter_mut().find(|(l, _)| *l == len) {
            Some((_, set)) => {
                set.insert(p);
            }
            None => self
                .by_len
                .push((len, std::collections::HashSet::from([p]))),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_len.is_empty()
    }

    /// The narrowest member holding `ip`: a probe per distinct length,
    /// however many members (a metrics report asks it for thousands of
    /// addresses under the allocator's lock).
    pub fn holder(&self, ip: IpAddr) -> Option<Segment> {
        self.by_len
            .iter()
            .filter_map(|(len, set)| set.get(&Segment::prefix(ip, *len)?).copied())
            .max_by_key(Segment::prefix_len)
    }

    /// Whether a member no longer than `max_len` holds all of `e`.
    pub fn holds(&self, e: &Segment, max_len: u8) -> bool {
        self.holds_between(e, 0, max_len)
    }

    /// Whether a member of a length from `min_len` to `max_len` holds all
    /// of `e`.
    fn holds_between(&self, e: &Segment, min_len: u8, max_len: u8) -> bool {
        self.by_len.iter().any(|(len, set)| {
            (min_len..=max_len.min(e.prefix_len())).contains(len)
                && Segment::prefix(e.base(), *len).is_some_and(|p| set.contains(&p))
        })
    }

    /// Whether the members hold every address of `e` between them: one
    /// holds it whole, or each half is held so. (A /28 whose 16 addresses
    /// are each an interface's is; a /48 of which one /64 is routed is
    /// not.) Depth first, and a half no longer member could fill ends it:
    /// a prefix not held costs at most one descent, one that is, a look
    /// per member inside it.
    pub fn covers_all(&self, e: &Segment) -> bool {
        self.covers_all_from(e, 0)
    }

    /// [`PrefixSet::covers_all`] by the members of `min_len` or longer.
    pub fn covers_all_from(&self, e: &Segment, min_len: u8) -> bool {
        let longest = self.by_len.iter().map(|(len, _)| *len).max().unwrap_or(0);
        self.covers_within(e, min_len, longest)
    }

    /// [`PrefixSet::covers_all_from`], its members' longest length given.
    fn covers_within(&self, e: &Segment, min_len: u8, longest: u8) -> bool {
        if self.holds_between(e, min_len, 128) {
            return true;
        }
        if e.is_single() || e.prefix_len() >= longest {
            return false;
        }
        let len = e.prefix_len() + 1;
        let base = to_u128(e.base());
        let half = 1u128 << (e.host_bits() - 1);
        [base, base + half].into_iter().all(|b| {
            Segment::prefix(from_u128(e.family(), b), len)
                .is_some_and(|h| self.covers_within(&h, min_len, longest))
        })
    }
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_bits {
            0 => write!(f, "{}", self.base),
            _ => write!(f, "{}/{}", self.base, self.prefix_len()),
        }
    }
}

/// What `Display` writes back: an address, or a prefix as `BASE/LEN`.
impl std::str::FromStr for Segment {
    type Err = String;
    fn from_str(s: &str) -> Result<Segment, String> {
        let bad = || format!("{s:?} is not an address or prefix");
        match s.split_once('/') {
            None => Ok(Segment::single(s.parse().map_err(|_| bad())?)),
            Some((ip, len)) => Segment::prefix(
                ip.parse().map_err(|_| bad())?,
                len.parse().map_err(|_| bad())?,
            )
            .ok_or_else(bad),
        }
    }
}

/// Lease `i` of the prefix at `base` (host bits clear) with `host_bits`.
#[inline]
pub(crate) fn lease_address(family: Family, base: u128, host_bits: u8, i: u128) -> IpAddr {
    lease_address_with(family, base, host_bits, i, order())
}

/// `lease_address` in `order`.
#[inline]
fn lease_address_with(family: Family, base: u128, host_bits: u8, i: u128, order: Order) -> IpAddr {
    let keyed = order.keyed(family, base, host_bits);
    let offset = permute(i & mask(host_bits), host_bits, keyed);
    from_u128(family, base | offset)
}

/// The fewest prefixes that hold exactly the addresses of `entries`
/// (prefixes kept as they are, single addresses merged into runs and the
/// runs cut into aligned blocks): the same membership, described in far
/// fewer entries when the addresses came from ranges and CIDRs.
pub fn cover(entries: &[Segment]) -> Vec<Segment> {
    let mut out: Vec<Segment> = entries.iter().filter(|e| !e.is_single()).copied().collect();
    for family in Family::ALL {
        let mut v: Vec<u128> = entries
            .iter()
            .filter(|e| e.is_single() && e.family() == family)
            .map(|e| to_u128(e.base()))
            .collect();
        v.sort_unstable();
        v.dedup();
        let mut i = 0;
        while i < v.len() {
            let lo = v[i];
            let mut hi = lo;
            while i + 1 < v.len() && v[i + 1] == hi + 1 {
                i += 1;
                hi = v[i];
            }
            i += 1;
            // [lo, hi] in aligned blocks, largest first.
            let mut at = lo;
            loop {
                let align = if at == 0 {
                    128
                } else {
                    at.trailing_zeros().min(128)
                };
                let span = hi - at;
                let fit = if span == u128::MAX {
                    128
                } else {
                    127 - (span + 1).leading_zeros()
                };
                let k = align.min(fit).min(u32::from(family.bits())) as u8;
                out.push(
                    Segment::prefix(from_u128(family, at), family.bits() - k)
                        .expect("a fitting prefix"),
                );
                match at.checked_add(mask(k)).and_then(|end| end.checked_add(1)) {
                    Some(next) if next <= hi => at = next,
                    _ => break,
                }
            }
        }
    }
    out
}

fn mask(bits: u8) -> u128 {
    match bits {
        0 => 0,
        128.. => u128::MAX,
        b => (1u128 << b) - 1,
    }
}

/// An address as a number (an IPv4 one in the low 32 bits).
pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The address of `family` that is the number `v` (see [`to_u128`]).
pub fn from_u128(family: Family, v: u128) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(v as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

fn shift(k: u8) -> u32 {
    u32::from(k).div_ceil(2).max(1)
}

/// A bijection of `[0, 2^k)`: in 64-bit arithmetic up to k = 64 (a /64
/// and anything smaller), where it costs a few nanoseconds.
fn permute(i: u128, k: u8, key: Keyed) -> u128 {
    if k <= 64 {
        return u128::from(permute64(i as u64, k, key));
    }
    let m = mask(k);
    let s = shift(k);
    let mut x = ((i ^ key.w) & m).wrapping_mul(key.m1).wrapping_add(key.c1) & m;
    x ^= x >> s;
    x = x.wrapping_mul(key.m2) & m;
    x ^= x >> s;
    x ^ (key.w.rotate_left(64) & m)
}

fn permute64(i: u64, k: u8, key: Keyed) -> u64 {
    let (m1, c1, m2, w) = key.narrow();
    let m = mask(k) as u64;
    let s = shift(k);
    let mut x = ((i ^ w) & m).wrapping_mul(m1).wrapping_add(c1) & m;
    x ^= x >> s;
    x = x.wrapping_mul(m2) & m;
    x ^= x >> s;
    x ^ (w.rotate_left(32) & m)
}

fn unpermute64(y: u64, k: u8, key: Keyed) -> u64 {
    let (m1, c1, m2, w) = key.narrow();
    let m = mask(k) as u64;
    let s = shift(k);
    let unxor = |y: u64| {
        let mut x = y;
        for _ in 0..64u32.div_ceil(s) {
            x = y ^ (x >> s);
        }
        x
    };
    let mut x = unxor((y ^ w.rotate_left(32)) & m);
    x = x.wrapping_mul(inverse(u128::from(m2)) as u64) & m;
    x = unxor(x);
    (x.wrapping_sub(c1)
        .wrapping_mul(inverse(u128::from(m1)) as u64)
        ^ w)
        & m
}

/// The inverse of [`permute`].
fn unpermute(y: u128, k: u8, key: Keyed) -> u128 {
    if k <= 64 {
        return u128::from(unpermute64(y as u64, k, key));
    }
    let m = mask(k);
    let s = shift(k);
    let mut x = unxorshift((y ^ key.w.rotate_left(64)) & m, s);
    x = x.wrapping_mul(inverse(key.m2)) & m;
    x = unxorshift(x, s);
    (x.wrapping_sub(key.c1).wrapping_mul(inverse(key.m1)) ^ key.w) & m
}

fn unxorshift(y: u128, s: u32) -> u128 {
    // x = y ^ (x >> s), solved from the top bits down.
    let mut x = y;
    for _ in 0..128u32.div_ceil(s) {
        x = y ^ (x >> s);
    }
    x
}

/// The inverse of an odd number modulo 2^128 (Newton's iteration doubles
/// the correct low bits each step).
const fn inverse(a: u128) -> u128 {
    let mut x = a;
    let mut i = 0;
    while i < 7 {
        x = x.wrapping_mul(2u128.wrapping_sub(a.wrapping_mul(x)));
        i += 1;
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Keys to walk with: none (the fixed order) and two of all bits.
    const KEYS: [OrderKey; 3] = [
        [0; 4],
        [
            0x0123_4567_89ab_cdef,
            0xfedc_ba98_7654_3210,
            0xdead_beef_f00d_cafe,
            0x8000_0000_0000_0001,
        ],
        [u64::MAX; 4],
    ];

    #[test]
    fn a_prefix_sets_holder_is_its_narrowest_member_of_the_family() {
        let seg = |s: &str| s.parse::<Segment>().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut set = PrefixSet::default();
        for p in [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "2001:db8::/32",
            "2001:db8:1::/48",
            "0a00::/8",
        ] {
            set.insert(seg(p));
        }
        for i in 0..2000u32 {
            set.insert(Segment::prefix(IpAddr::V4((0xc000_0000 + (i << 8)).into()), 24).unwrap());
        }
        assert_eq!(set.holder(ip("10.1.2.3")), Some(seg("10.1.0.0/16")));
        assert_eq!(set.holder(ip("10.2.2.3")), Some(seg("10.0.0.0/8")));
        assert_eq!(
            set.holder(ip("2001:db8:1::5")),
            Some(seg("2001:db8:1::/48"))
        );
        assert_eq!(set.holder(ip("2001:db8:2::5")), Some(seg("2001:db8::/32")));
        assert_eq!(set.holder(ip("192.0.7.9")), Some(seg("192.0.7.0/24")));
        // 0a00::/8 is IPv6: no IPv4 address is in it.
        assert_eq!(set.holder(ip("11.0.0.1")), None);
        assert_eq!(set.holder(ip("a00::1")), Some(seg("a00::/8")));
    }

    #[test]
    fn small_prefixes_are_walked_whole_without_repeats() {
        for key in KEYS.map(Keyed::new) {
            for k in 1..=12u8 {
                let seen: HashSet<u128> = (0..1u128 << k).map(|i| permute(i, k, key)).collect();
                assert_eq!(seen.len(), 1 << k, "k = {k}");
                assert!(seen.iter().all(|&x| x < 1 << k));
                for i in 0..1u128 << k {
                    assert_eq!(unpermute(permute(i, k, key), k, key), i, "k = {k}, i = {i}");
                }
            }
        }
    }

    /// The key alone (a table of an older allocator).
    fn by_key(key: OrderKey) -> Order {
        Order {
            key,
            by_prefix: false,
        }
    }

    /// The zero key is the order before the key (a table of an older
    /// allocator, which carries none, is leased as it was); another key
    /// is another order, in every prefix size.
    #[test]
    fn the_order_key_makes_the_order_the_hosts_own() {
        let s = Segment::prefix("2001:db8:2::".parse().unwrap(), 64).unwrap();
        let first = |key: OrderKey| s.at_with(0, by_key(key));
        assert_eq!(
            first([0; 4]),
            "2001:db8:2:0:dce0:43dc:8366:9426"
                .parse::<IpAddr>()
                .unwrap()
        );
        assert_ne!(first(KEYS[1]), first([0; 4]));
        assert_ne!(first(KEYS[1]), first(KEYS[2]));
        for len in [64u8, 48, 112, 120] {
            let p = Segment::prefix("2001:db8::".parse().unwrap(), len).unwrap();
            let walk = |key: OrderKey| {
                (0..8u128)
                    .map(|i| p.at_with(i, by_key(key)))
                    .collect::<Vec<_>>()
            };
            assert_ne!(walk(KEYS[0]), walk(KEYS[1]), "/{len}");
        }
    }

    /// Each prefix in an order of its own: prefixes of one size (two
    /// /96s of a pool, a /64 and its renumbered successor) share no
    /// host part in their first leases, where by the key alone they
    /// leased the same ones in the same order. Each is walked whole
    /// without a repeat and inverted, as by the key alone.
    #[test]
    fn each_prefix_is_leased_in_an_order_of_its_own() {
        let host = |ip: IpAddr, len: u8| to_u128(ip) & mask(128 - len);
        for key in KEYS {
            for len in [64u8, 48, 96] {
                let a = Segment::prefix("2001:db8:a::".parse().unwrap(), len).unwrap();
                let b = Segment::prefix("2001:db8:b::".parse().unwrap(), len).unwrap();
                let parts = |s: Segment, order: Order| -> HashSet<u128> {
                    (0..64u128)
                        .map(|i| host(s.at_with(i, order), len))
                        .collect()
                };
                assert_eq!(parts(a, by_key(key)), parts(b, by_key(key)), "/{len}");
                let shared = parts(a, Order::of(key))
                    .intersection(&parts(b, Order::of(key)))
                    .count();
                assert_eq!(shared, 0, "/{len}");
            }
            // (IPv4 prefixes past 65 536 addresses: smaller ones are
            // listed address by address.)
            let p = Segment::prefix("10.2.0.0".parse().unwrap(), 15).unwrap();
            let q = Segment::prefix("10.4.0.0".parse().unwrap(), 15).unwrap();
            let walk = |s: Segment| -> Vec<u128> {
                (0..256u128)
                    .map(|i| host(s.at_with(i, Order::of(key)), 111))
                    .collect()
            };
            assert_ne!(walk(p), walk(q));
            assert_eq!(walk(p).into_iter().collect::<HashSet<_>>().len(), 256);
        }
        let s = Segment::prefix("2001:db8:c::".parse().unwrap(), 64).unwrap();
        let order = Order::of(KEYS[1]);
        for i in [0u128, 1, 77, 1 << 40] {
            assert_eq!(s.index_with(s.at_with(i, order), order), Some(i));
        }
    }

    #[test]
    fn a_64_walks_far_apart_and_inverts() {
        let s = Segment::prefix("2001:db8:1::".parse().unwrap(), 64).unwrap();
        assert_eq!(s.to_string(), "2001:db8:1::/64");
        assert_eq!(s.len(), 1 << 64);
        let mut seen = HashSet::new();
        let mut prev: Option<u128> = None;
        for i in 0..10_000u128 {
            let ip = s.at(i);
            assert!(s.contains(ip));
            assert_eq!(s.index_of(ip), Some(i));
            assert!(seen.insert(ip), "repeat at {i}");
            let v = to_u128(ip);
            if let Some(p) = prev {
                assert!(v.abs_diff(p) > 1 << 16, "{i}: neighbours");
            }
            prev = Some(v);
        }
        for key in KEYS.map(Keyed::new) {
            for k in [1u8, 63, 64, 65, 80, 127, 128] {
                for i in [0u128, 1, 2, 12345, mask(k)] {
                    let i = i & mask(k);
                    assert_eq!(unpermute(permute(i, k, key), k, key), i, "k {k}");
                }
            }
        }
    }

    #[test]
    fn a_cover_holds_exactly_the_same_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let range = |a: u32, b: u32| -> Vec<Segment> {
            (a..=b)
                .map(|n| Segment::single(IpAddr::V4(Ipv4Addr::from(n))))
                .collect()
        };
        // 10.0.0.1-10.0.0.9 and a lone 10.0.1.0: 1/32, 2/31, 4/30, 8/32, 9/32, …
        let mut entries = range(0x0a00_0001, 0x0a00_0009);
        entries.push(Segment::single(ip("10.0.1.0")));
        entries.push(Segment::prefix(ip("2001:db8::"), 64).unwrap());
        entries.push(Segment::single(ip("10.0.0.5")));
        let c = cover(&entries);
        let names: Vec<String> = c.iter().map(ToString::to_string).collect();
        assert_eq!(
            names,
            [
                "2001:db8::/64",
                "10.0.0.1",
                "10.0.0.2/31",
                "10.0.0.4/30",
                "10.0.0.8/31",
                "10.0.1.0"
            ]
        );
        let held = |ip: IpAddr| c.iter().any(|s| s.contains(ip));
        for n in 0x0a00_0000u32..0x0a00_0110 {
            let a = IpAddr::V4(Ipv4Addr::from(n));
            assert_eq!(held(a), entries.iter().any(|s| s.contains(a)), "{a}");
        }
        // A whole /16 listed address by address is one entry.
        assert_eq!(cover(&range(0x0a01_0000, 0x0a01_ffff)).len(), 1);
        assert!(cover(&[]).is_empty());
    }

    #[test]
    fn singles_and_prefixes_know_their_own() {
        let one = Segment::single("10.0.0.1".parse().unwrap());
        assert_eq!(one.at(7).to_string(), "10.0.0.1");
        assert_eq!(one.index_of("10.0.0.1".parse().unwrap()), Some(0));
        assert_eq!(one.index_of("10.0.0.2".parse().unwrap()), None);
        let p = Segment::prefix("10.1.2.3".parse().unwrap(), 8).unwrap();
        assert_eq!(p.to_string(), "10.0.0.0/8");
        assert!(p.contains("10.200.0.1".parse().unwrap()));
        assert!(!p.contains("11.0.0.1".parse().unwrap()));
        assert!(!p.contains("::1".parse().unwrap()));
        assert!(Segment::prefix("10.0.0.0".parse().unwrap(), 33).is_none());
        // The network bits alone decide, at the edges too.
        let q = Segment::prefix("10.0.0.4".parse().unwrap(), 30).unwrap();
        for n in 0u8..12 {
            let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, n));
            assert_eq!(q.contains(ip), (4..8).contains(&n), "{ip}");
            assert_eq!(q.index_of(ip).is_some(), q.contains(ip), "{ip}");
        }
    }

    #[test]
    fn segments_read_back_what_they_write() {
        for text in ["10.0.0.1", "10.0.0.0/8", "2001:db8::7", "2001:db8:1::/64"] {
            let seg: Segment = text.parse().unwrap();
            assert_eq!(seg.to_string(), text);
        }
        for bad in ["", "nope", "10.0.0.0/33", "10.0.0.0/x", "10.0.0.1-10.0.0.2"] {
            let e = bad.parse::<Segment>().unwrap_err();
            assert!(e.contains("not an address or prefix"), "{e}");
        }
    }
}
