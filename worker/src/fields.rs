//! A message's header fields on their way through the proxy.
//!
//! A request the fast path read, and every response from a destination,
//! cross as they came: their fields stay where they lie in the head's
//! bytes ([`Wire`]), the hop-by-hop ones are marked rather than removed,
//! and the lines are written out again from those bytes, each name as it
//! was sent. A header map (`http::HeaderMap`) is made only where hyper's
//! server needs one ([`Fields::into_map`]): building a request's two maps
//! (a name parsed and hashed per field, two allocations each), looking
//! fields up and removing them, and dropping the maps had been a seventh of
//! a keep-alive request's instructions in user space.

use bytes::{BufMut, Bytes};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::h1::MAX_HEADERS;

/// A message's header fields.
#[derive(Debug)]
pub enum Fields {
    /// A map: what hyper's server read, or a response rotor made itself.
    Map(HeaderMap),
    /// As they came on the wire.
    Wire(Wire),
}

/// Fields as they came: the head's bytes and where each field lies in
/// them, the ones that do not cross marked.
#[derive(Debug)]
pub struct Wire {
    head: Bytes,
    spans: Spans,
    /// Bit `i`: the `i`-th field does not cross (hop-by-hop, or replaced).
    gone: u128,
    /// Fields the proxy set (a Host that differs from the target's,
    /// `Rotor-Source`), written before the others (Host first, as RFC 9110
    /// §7.2 asks of a client).
    added: Vec<(HeaderName, HeaderValue)>,
}

// Every field of a head has its bit in `gone`.
const _: () = assert!(MAX_HEADERS <= 128);

impl Fields {
    /// The first value of `name`.
    pub fn get(&self, name: &HeaderName) -> Option<&[u8]> {
        match self {
            Fields::Map(m) => m.get(name).map(HeaderValue::as_bytes),
            Fields::Wire(w) => w.get(name.as_str().as_bytes()),
        }
    }

    /// The value of `name` if it is there once; `Err` if more than one
    /// field has that name (a request with two `Host` fields is refused,
    /// RFC 9112 §3.2).
    pub fn get_only(&self, name: &HeaderName) -> Result<Option<&[u8]>, Duplicate> {
        match self {
            Fields::Map(m) => {
                let mut all = m.get_all(name).iter();
                match (all.next(), all.next()) {
                    (_, Some(_)) => Err(Duplicate),
                    (one, None) => Ok(one.map(HeaderValue::as_bytes)),
                }
            }
            Fields::Wire(w) => w.get_only(name.as_str().as_bytes()),
        }
    }

    /// Removes every field named `name`.
    pub fn remove(&mut self, name: &HeaderName) {
        match self {
            Fields::Map(m) => {
                m.remove(name);
            }
            Fields::Wire(w) => w.remove(name),
        }
    }

    /// Every field that crosses: name and value, in order (a map's names
    /// are lower case and its fields grouped by name).
    #[inline]
    pub fn iter(&self) -> Iter<'_> {
        match self {
            Fields::Map(m) => Iter::Map(m.iter()),
            Fields::Wire(w) => Iter::Wire(w.iter()),
        }
    }

    /// Sets `name` to `value`, in place of any value it had.
    pub fn insert(&mut self, name: HeaderName, value: HeaderValue) {
        match self {
            Fields::Map(m) => {
                m.insert(name, value);
            }
            Fields::Wire(w) => w.insert(name, value),
        }
    }

    /// Removes the hop-by-hop fields (RFC 9110 §7.6.1). A message that came
    /// with `Transfer-Encoding` loses its `Content-Length` too (RFC 9112
    /// §6.3: the length is the chunked framing's, and the other side frames
    /// it anew).
    pub fn strip_hop_by_hop(&mut self, message: Message) {
        match self {
            Fields::Map(m) => strip_hop_by_hop(m, message),
            Fields::Wire(w) => w.strip_hop_by_hop(message),
        }
    }

    /// The bytes of the header lines as HTTP/1.1 writes them.
    pub fn encoded_len(&self) -> usize {
        match self {
            Fields::Map(m) => m.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum(),
            Fields::Wire(w) => w.encoded_len(),
        }
    }

    /// The fields as a map (names lower case).
    pub fn into_map(self) -> HeaderMap {
        match self {
            Fields::Map(m) => m,
            Fields::Wire(w) => w.into_map(),
        }
    }

    /// Header lines, `name: value`, for every field that crosses, less
    /// `Content-Length` and `Transfer-Encoding` unless `framing`; says
    /// whether `Date` and `Content-Length` were among them (seen on the
    /// way, not looked up after).
    pub fn encode(&self, out: &mut impl BufMut, framing: bool) -> Written {
        let mut written = Written::default();
        for (name, value) in self.iter() {
            let length = name.eq_ignore_ascii_case(b"content-length");
            if !framing && (length || name.eq_ignore_ascii_case(b"transfer-encoding")) {
                written.content_length |= length;
                continue;
            }
            written.date |= name.eq_ignore_ascii_case(b"date");
            written.content_length |= length;
            // (The length first: one comparison for most fields.)
            if name.len() == 13 && name.eq_ignore_ascii_case(b"authorization") {
                written.connection_auth |= authenticates_connection(value);
            }
            out.put_slice(name);
            out.put_slice(b": ");
            out.put_slice(value);
            out.put_slice(b"\r\n");
        }
        written
    }
}

/// The fields that cross, name and value (a plain iterator: one made of
/// adapters, chained and flattened for the two kinds, cost twice the
/// instructions per field).
pub enum Iter<'a> {
    Map(header::Iter<'a, HeaderValue>),
    Wire(WireIter<'a>),
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Map(m) => m.next().map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes())),
            Iter::Wire(w) => w.next(),
        }
    }
}

/// [`Wire::iter`].
pub struct WireIter<'a> {
    head: &'a [u8],
    spans: std::slice::Iter<'a, Span>,
    /// Which of the spans left do not cross, the next at bit 0.
    gone: u128,
    added: std::slice::Iter<'a, (HeaderName, HeaderValue)>,
}

impl<'a> Iterator for WireIter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if let Some((k, v)) = self.added.next() {
            return Some((k.as_str().as_bytes(), v.as_bytes()));
        }
        for &(name, name_len, value, value_len) in self.spans.by_ref() {
            // (Most fields cross: then no 128-bit shift.)
            let gone = self.gone != 0 && {
                let gone = self.gone & 1 != 0;
                self.gone >>= 1;
                gone
            };
            if !gone {
                let (name, value) = (name as usize, value as usize);
                return Some((
                    &self.head[name..name + name_len as usize],
                    &self.head[value..value + value_len as usize],
                ));
            }
        }
        None
    }
}

/// More than one field of a name that may be there once.
#[derive(Debug, PartialEq, Eq)]
pub struct Duplicate;

/// Which fields [`Fields::encode`] came across.
#[derive(Debug, Default)]
pub struct Written {
    pub date: bool,
    /// A `Content-Length` was there (written only with the framing).
    pub content_length: bool,
    /// An `Authorization` of a scheme that authenticates the connection,
    /// not the request (NTLM, Negotiate): a server takes the requests
    /// that follow on it for that user's, so it is no other client's.
    pub connection_auth: bool,
}

/// Whether an `Authorization` value is of a scheme that authenticates
/// its connection (NTLM, Negotiate: Kerberos or NTLM inside SPNEGO).
fn authenticates_connection(value: &[u8]) -> bool {
    let scheme = value
        .trim_ascii_start()
        .split(|&b| b == b' ')
        .next()
        .unwrap_or(b"");
    scheme.eq_ignore_ascii_case(b"ntlm") || scheme.eq_ignore_ascii_case(b"negotiate")
}

impl Wire {
    /// The fields `spans` finds in `head` (the bytes they were taken of);
    /// `None` if a name is one `http` would not take (too long).
    pub(crate) fn new(head: Bytes, spans: Spans) -> Option<Wire> {
        // httparse let through only token characters in names, which
        // `HeaderName` takes too (`parsed_names_are_header_names`); only
        // the length is left to check.
        if spans
            .iter()
            .any(|&(_, len, _, _)| len as usize > MAX_NAME_LEN)
        {
            return None;
        }
        Some(Wire {
            head,
            spans,
            gone: 0,
            added: Vec::new(),
        })
    }

    /// Every field of the head, crossing or not: its place, name and value.
    fn all(&self) -> impl Iterator<Item = (usize, &[u8], &[u8])> + '_ {
        self.spans
            .iter()
            .enumerate()
            .map(|(i, &(name, name_len, value, value_len))| {
                let (name, value) = (name as usize, value as usize);
                (
                    i,
                    &self.head[name..name + name_len as usize],
                    &self.head[value..value + value_len as usize],
                )
            })
    }

    /// Every field that crosses: name and value, in order.
    pub(crate) fn iter(&self) -> WireIter<'_> {
        WireIter {
            head: &self.head,
            spans: self.spans.0.iter(),
            gone: self.gone,
            added: self.added.iter(),
        }
    }

    /// The name of a span (its length compared first: most lookups
    /// pass most fields on that alone).
    fn name_is(&self, &(at, len, _, _): &Span, name: &[u8]) -> bool {
        len as usize == name.len()
            && self.head[at as usize..at as usize + name.len()].eq_ignore_ascii_case(name)
    }

    fn value(&self, &(_, _, at, len): &Span) -> &[u8] {
        &self.head[at as usize..at as usize + len as usize]
    }

    fn get(&self, name: &[u8]) -> Option<&[u8]> {
        for (i, span) in self.spans.0.iter().enumerate() {
            if self.gone & (1 << i) == 0 && self.name_is(span, name) {
                return Some(self.value(span));
            }
        }
        self.added
            .iter()
            .find(|(k, _)| k.as_str().as_bytes() == name)
            .map(|(_, v)| v.as_bytes())
    }

    fn get_only(&self, name: &[u8]) -> Result<Option<&[u8]>, Duplicate> {
        let mut found = None;
        let spans = self.spans.0.iter().enumerate();
        let on_wire = spans
            .filter(|(i, span)| self.name_is(span, name) && self.gone & (1 << i) == 0)
            .map(|(_, span)| self.value(span));
        let added = self
            .added
            .iter()
            .filter(|(k, _)| k.as_str().as_bytes() == name);
        for value in on_wire.chain(added.map(|(_, v)| v.as_bytes())) {
            if found.replace(value).is_some() {
                return Err(Duplicate);
            }
        }
        Ok(found)
    }

    fn encoded_len(&self) -> usize {
        let mut len = 0;
        for (i, &(_, name_len, _, value_len)) in self.spans.0.iter().enumerate() {
            if self.gone & (1 << i) == 0 {
                len += name_len as usize + value_len as usize + 4;
            }
        }
        len + self
            .added
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>()
    }

    pub(crate) fn insert(&mut self, name: HeaderName, value: HeaderValue) {
        self.remove(&name);
        self.added.push((name, value));
    }

    pub(crate) fn remove(&mut self, name: &HeaderName) {
        let text = name.as_str().as_bytes();
        let mut gone = self.gone;
        for (i, span) in self.spans.0.iter().enumerate() {
            if self.name_is(span, text) {
                gone |= 1 << i;
            }
        }
        self.gone = gone;
        self.added.retain(|(k, _)| k != name);
    }

    fn strip_hop_by_hop(&mut self, message: Message) {
        let names = match message {
            Message::Request => HOP_BY_HOP.len(),
            Message::Response => EXPECT_AT,
        };
        // One pass marks the hop-by-hop fields and says whether a second
        // is needed: for a `Content-Length` beside `Transfer-Encoding`, or
        // fields that `Connection` names (most messages have neither).
        let mut gone = self.gone;
        let mut chunked = false;
        let mut lists_fields = false;
        for (i, span) in self.spans.0.iter().enumerate() {
            let (at, len, _, _) = *span;
            let name = &self.head[at as usize..(at + len) as usize];
            if let Some(at) = hop_by_hop_at(name).filter(|&at| at < names) {
                gone |= 1 << i;
                chunked |= at == TRANSFER_ENCODING_AT;
                if at == CONNECTION_AT {
                    lists_fields |= listed_fields(self.value(span)).next().is_some();
                }
            }
        }
        if chunked {
            for (i, name, _) in self.all() {
                if name.eq_ignore_ascii_case(b"content-length") {
                    gone |= 1 << i;
                }
            }
        }
        if lists_fields {
            gone |= self.listed_by_connection();
        }
        self.gone = gone;
    }

    /// The fields that `Connection` names (bit `i`: the `i`-th field).
    /// The head's names go into a map by lower-case name, and each listed
    /// name is looked up once: work in proportion to the head, where
    /// comparing every field with every name listed was the product (a
    /// 60 KB `Connection: a,a,a,…` beside 99 fields, 3 million
    /// comparisons). A rare path: most messages name no field there.
    fn listed_by_connection(&self) -> u128 {
        let mut by_name: std::collections::HashMap<Vec<u8>, u128> = Default::default();
        for (i, name, _) in self.all() {
            *by_name.entry(name.to_ascii_lowercase()).or_default() |= 1 << i;
        }
        let mut gone = 0;
        let mut lower = Vec::new();
        for span in self.spans.0.iter() {
            if !self.name_is(span, b"connection") {
                continue;
            }
            for field in listed_fields(self.value(span)) {
                lower.clear();
                lower.extend(field.iter().map(u8::to_ascii_lowercase));
                if let Some(bits) = by_name.get(&lower) {
                    gone |= bits;
                }
            }
        }
        gone
    }

    /// The fields that cross, as a map.
    #[allow(unsafe_code)]
    fn into_map(self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.spans.0.len() + self.added.len());
        for (i, &(name, name_len, value, value_len)) in self.spans.iter().enumerate() {
            if self.gone & (1 << i) != 0 {
                continue;
            }
            let (name, value) = (name as usize, value as usize);
            // Never fails: names were checked in `new`.
            let Ok(name) = HeaderName::from_bytes(&self.head[name..name + name_len as usize])
            else {
                continue;
            };
            let value = self.head.slice(value..value + value_len as usize);
            // SAFETY: spans are only made by `Spans::of`, of the headers
            // httparse parsed out of these bytes, and httparse let a value
            // through only if each of its bytes is HTAB, SP to `~` or
            // 0x80 to 0xFF — exactly the bytes a `HeaderValue` may hold
            // (`parsed_values_are_header_values` checks every byte, in
            // the vectorised paths too). Checking them again cost ≈ 90
            // instructions a header.
            let value = unsafe { HeaderValue::from_maybe_shared_unchecked(value) };
            map.append(name, value);
        }
        for (name, value) in self.added {
            map.append(name, value);
        }
        map
    }
}

/// A value as text, if it is visible ASCII (and tabs) only, as
/// `HeaderValue::to_str` reads one.
pub fn text(value: &[u8]) -> Option<&str> {
    value
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
        .then(|| std::str::from_utf8(value).ok())
        .flatten()
}

/// The longest name a `HeaderName` takes.
const MAX_NAME_LEN: usize = (1 << 16) - 1;

/// Where each header's name and value lie in a head's bytes, so the fields
/// can be read from the bytes once they are split off the read buffer
/// (shared, not copied). On the heap, one allocation a head: kept in
/// place (room for two dozen fields) they made every move of a request
/// and of its response, through each layer of futures, a copy of 400
/// bytes — more instructions than the allocation.
#[derive(Debug)]
pub(crate) struct Spans(Vec<Span>);

/// A header's name and value: (offset, length) of each.
type Span = (u32, u32, u32, u32);

impl Spans {
    /// The spans of `headers`, parsed out of `buf`. `headers` must be
    /// httparse's own parse of `buf` (not fields made by hand): [`Wire`]
    /// relies on httparse having checked every name and value byte.
    pub(crate) fn of(buf: &[u8], headers: &[httparse::Header<'_>]) -> Spans {
        let base = buf.as_ptr() as usize;
        Spans(
            headers
                .iter()
                .map(|h| {
                    (
                        (h.name.as_ptr() as usize - base) as u32,
                        h.name.len() as u32,
                        (h.value.as_ptr() as usize - base) as u32,
                        h.value.len() as u32,
                    )
                })
                .collect(),
        )
    }

    fn iter(&self) -> impl Iterator<Item = &Span> {
        self.0.iter()
    }
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus
/// the proxy's own credentials: none of them crosses the proxy. As names:
/// a lookup in a map by name hashes no text. The last, `Expect`, only of a
/// request: a `100-continue` is asked again by rotor's client (`h1`). A
/// static: a `const` array of names is a new copy, made and dropped,
/// wherever it is named (≈ 100 instructions each time, in a loop over the
/// fields).
static HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::EXPECT,
];
/// Where `Connection`, `Transfer-Encoding` and `Expect` are in [`HOP_BY_HOP`].
const CONNECTION_AT: usize = 0;
const TRANSFER_ENCODING_AT: usize = 5;
const EXPECT_AT: usize = 9;

/// Removes the hop-by-hop headers from a map (see
/// [`Fields::strip_hop_by_hop`]).
fn strip_hop_by_hop(headers: &mut HeaderMap, message: Message) {
    let names = match message {
        Message::Request => &HOP_BY_HOP[..],
        Message::Response => &HOP_BY_HOP[..EXPECT_AT],
    };
    // One pass over the fields says which of these names the message
    // carries (most carry none, or only `Connection: keep-alive` or
    // `close`) and whether `Connection` names other fields: only those
    // are looked up again, each map lookup being a hash.
    let mut present = 0u16;
    let mut lists_fields = false;
    for (name, value) in headers.iter() {
        if let Some(i) = hop_by_hop_at(name.as_str().as_bytes()).filter(|&i| i < names.len()) {
            present |= 1 << i;
            if i == CONNECTION_AT {
                lists_fields |= listed_fields(value.as_bytes()).next().is_some();
            }
        }
    }
    if present == 0 {
        return;
    }
    let chunked = present & (1 << TRANSFER_ENCODING_AT) != 0;
    // The fields `Connection` names go too: those the map has, each found
    // by a lookup of its text (no name is built; a list of 30 000 names
    // compared with each field was 3 million comparisons).
    let mut listed: Vec<HeaderName> = Vec::new();
    if lists_fields {
        for value in headers.get_all(header::CONNECTION) {
            for field in listed_fields(value.as_bytes()) {
                let Ok(field) = std::str::from_utf8(field) else {
                    continue;
                };
                if !headers.contains_key(field) {
                    continue;
                }
                let name = headers
                    .keys()
                    .find(|k| k.as_str().eq_ignore_ascii_case(field));
                if let Some(name) = name.filter(|n| !listed.contains(n)) {
                    listed.push(name.clone());
                }
            }
        }
    }
    let goes = |name: &HeaderName| {
        hop_by_hop_at(name.as_str().as_bytes()).is_some_and(|i| present & (1 << i) != 0)
            || (chunked && *name == header::CONTENT_LENGTH)
            || listed.contains(name)
    };
    // The map is built again from what stays: removing from it moves its
    // last field into the hole, and the fields went on in another order
    // than they came (a WebSocket handshake's `host, origin,
    // sec-websocket-version, …`).
    let mut name = None;
    let len = headers.len();
    for (next, value) in std::mem::replace(headers, HeaderMap::with_capacity(len)) {
        // A repeated field's later values come without their name.
        if next.is_some() {
            name = next;
        }
        if let Some(n) = name.as_ref().filter(|n| !goes(n)) {
            headers.append(n.clone(), value);
        }
    }
}

/// Where `name` (in any case) is in [`HOP_BY_HOP`]: a match on the text,
/// which compares lengths first, instead of comparing each field's name
/// with each of ten names.
fn hop_by_hop_at(name: &[u8]) -> Option<usize> {
    // By length first: most names have none of these lengths, and the
    // rest differ from the one or two candidates in the first byte or so.
    let is = |candidate: &[u8]| name.eq_ignore_ascii_case(candidate);
    match name.len() {
        2 if is(b"te") => Some(3),
        6 if is(b"expect") => Some(EXPECT_AT),
        7 if is(b"trailer") => Some(4),
        7 if is(b"upgrade") => Some(6),
        10 if is(b"connection") => Some(CONNECTION_AT),
        10 if is(b"keep-alive") => Some(2),
        16 if is(b"proxy-connection") => Some(1),
        17 if is(b"transfer-encoding") => Some(TRANSFER_ENCODING_AT),
        18 if is(b"proxy-authenticate") => Some(8),
        19 if is(b"proxy-authorization") => Some(7),
        _ => None,
    }
}

/// Which way a message goes through the proxy.
#[derive(Debug, Clone, Copy)]
pub enum Message {
    Request,
    Response,
}

/// The fields a `Connection` value names for removal: its tokens, less
/// the options (`close`, `keep-alive`) and the message's framing and Host,
/// which are not the sender's to strip (`Connection: content-length`
/// would unframe a body).
fn listed_fields(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| {
            !t.is_empty()
                && ![&b"close"[..], b"keep-alive", b"content-length", b"host"]
                    .iter()
                    .any(|name| t.eq_ignore_ascii_case(name))
        })
}

/// `pairs` as a response head's fields, on the wire.
#[cfg(test)]
pub(crate) fn wire_for_tests(pairs: &[(&str, &str)]) -> Wire {
    let mut text = b"HTTP/1.1 200 OK\r\n".to_vec();
    for (k, v) in pairs {
        text.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    text.extend_from_slice(b"\r\n");
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    assert!(resp.parse(&text).unwrap().is_complete());
    let spans = Spans::of(&text, resp.headers);
    Wire::new(Bytes::from(text), spans).unwrap()
}

/// `pairs` in a map.
#[cfg(test)]
pub(crate) fn map_for_tests(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(pairs: &[(&str, &str)]) -> Wire {
        wire_for_tests(pairs)
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        map_for_tests(pairs)
    }

    /// Strips `given` both ways (as a map and on the wire) and checks both
    /// leave `kept`.
    fn strips(what: &str, message: Message, given: &[(&str, &str)], kept: &[(&str, &str)]) {
        let mut m = Fields::Map(map(given));
        m.strip_hop_by_hop(message);
        // In the order they came (a map's equality does not look).
        let (m, want) = (m.into_map(), map(kept));
        let order = |m: &HeaderMap| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(order(&m), order(&want), "map: {what}");
        let mut w = Fields::Wire(wire(given));
        w.strip_hop_by_hop(message);
        let lines: Vec<(String, String)> = w
            .iter()
            .map(|(k, v)| {
                (
                    String::from_utf8(k.to_vec()).unwrap(),
                    String::from_utf8(v.to_vec()).unwrap(),
                )
            })
            .collect();
        let want: Vec<(String, String)> = kept
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(lines, want, "wire: {what}");
        assert_eq!(w.into_map(), map(kept), "wire as a map: {what}");
    }

    #[test]
    fn a_name_there_twice_is_told_apart_from_once() {
        let two = [("Host", "a.test"), ("x", "1"), ("host", "b.test")];
        let one = [("Host", "a.test"), ("x", "1")];
        for (given, want) in [
            (&two[..], Err(Duplicate)),
            (&one[..], Ok(Some(&b"a.test"[..]))),
            (&[("x", "1")][..], Ok(None)),
        ] {
            let m = Fields::Map(map(given));
            let w = Fields::Wire(wire(given));
            assert_eq!(m.get_only(&header::HOST), want, "map {given:?}");
            assert_eq!(w.get_only(&header::HOST), want, "wire {given:?}");
        }
        // A field the proxy set counts as one of them; one replaced does not.
        let mut w = Fields::Wire(wire(&one));
        w.insert(header::HOST, HeaderValue::from_static("c.test"));
        assert_eq!(w.get_only(&header::HOST), Ok(Some(&b"c.test"[..])));
        w.remove(&header::HOST);
        assert_eq!(w.get_only(&header::HOST), Ok(None));
        assert_eq!(w.get(&HeaderName::from_static("x")), Some(&b"1"[..]));
    }

    /// What stays keeps its order: a map's removal moved its last field
    /// into the hole.
    #[test]
    fn stripping_keeps_the_order_of_what_stays() {
        strips(
            "order",
            Message::Request,
            &[
                ("host", "h"),
                ("connection", "x-b"),
                ("x-b", "1"),
                ("c", "2"),
                ("keep-alive", "5"),
                ("d", "3"),
                ("e", "4"),
                ("e", "5"),
            ],
            &[
                ("host", "h"),
                ("c", "2"),
                ("d", "3"),
                ("e", "4"),
                ("e", "5"),
            ],
        );
    }

    #[test]
    fn a_long_connection_list_takes_only_the_listed_fields() {
        // 99 fields and a Connection field listing 30 000 names (compared
        // pairwise, 3 million comparisons; now a lookup a name).
        let list = vec!["x-1"; 30_000].join(",");
        let names: Vec<String> = (0..99).map(|i| format!("x-{i}")).collect();
        let mut given: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
        given.push(("Connection", &list));
        let mut w = Fields::Wire(wire(&given));
        w.strip_hop_by_hop(Message::Request);
        let kept: Vec<_> = w.iter().map(|(k, _)| k.to_vec()).collect();
        assert_eq!(kept.len(), 98);
        assert!(!kept.contains(&b"x-1".to_vec()));
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_by_connection_go() {
        strips(
            "all of them",
            Message::Request,
            &[
                ("Connection", "close, x-secret"),
                ("X-Secret", "1"),
                ("keep-alive", "timeout=5"),
                ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
                ("proxy-connection", "keep-alive"),
                ("TE", "trailers"),
                ("transfer-encoding", "chunked"),
                ("upgrade", "websocket"),
                ("trailer", "x"),
                ("expect", "100-continue"),
                ("x-keep", "yes"),
            ],
            &[("x-keep", "yes")],
        );
    }

    #[test]
    fn only_the_hop_by_hop_headers_present_go_and_framing_stays_right() {
        assert_eq!(HOP_BY_HOP[CONNECTION_AT], header::CONNECTION);
        assert_eq!(HOP_BY_HOP[TRANSFER_ENCODING_AT], header::TRANSFER_ENCODING);
        assert_eq!(HOP_BY_HOP[EXPECT_AT], header::EXPECT);
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_at(name.as_str().as_bytes()), Some(i), "{name}");
            let upper = name.as_str().to_ascii_uppercase();
            assert_eq!(hop_by_hop_at(upper.as_bytes()), Some(i), "{upper}");
        }
        assert_eq!(hop_by_hop_at(b"connections"), None);
        assert_eq!(hop_by_hop_at(b"x-proxy-authorization"), None);
        assert_eq!(hop_by_hop_at(b""), None);
        type Pairs<'a> = &'a [(&'a str, &'a str)];
        let cases: [(&str, Pairs<'_>, Pairs<'_>); 7] = [
            (
                "Connection naming only options: it alone goes",
                &[
                    ("connection", " Keep-Alive ,, close"),
                    ("x-a", "1"),
                    ("content-length", "5"),
                ],
                &[("x-a", "1"), ("content-length", "5")],
            ),
            (
                "a list in the second Connection field counts too",
                &[
                    ("connection", "keep-alive"),
                    ("connection", "X-F"),
                    ("x-f", "1"),
                    ("x-g", "1"),
                ],
                &[("x-g", "1")],
            ),
            (
                "none of them: untouched, Content-Length and all",
                &[("content-length", "5"), ("x-a", "1")],
                &[("content-length", "5"), ("x-a", "1")],
            ),
            (
                "Connection alone (the usual response): it and what it names go",
                &[
                    ("connection", "keep-alive, X-B"),
                    ("x-b", "2"),
                    ("content-length", "5"),
                ],
                &[("content-length", "5")],
            ),
            (
                "two Connection fields: both lists count",
                &[
                    ("connection", "x-c"),
                    ("connection", "x-d"),
                    ("x-c", "1"),
                    ("x-d", "1"),
                    ("x-e", "1"),
                ],
                &[("x-e", "1")],
            ),
            (
                "Transfer-Encoding takes Content-Length along (re-framed on the way out)",
                &[
                    ("transfer-encoding", "chunked"),
                    ("content-length", "5"),
                    ("host", "h"),
                ],
                &[("host", "h")],
            ),
            (
                "Connection cannot take the framing or the Host along",
                &[
                    ("connection", "content-length, host, upgrade"),
                    ("content-length", "5"),
                    ("host", "h"),
                    ("upgrade", "x"),
                ],
                &[("content-length", "5"), ("host", "h")],
            ),
        ];
        for (what, given, kept) in cases {
            strips(what, Message::Response, given, kept);
        }
        // `Expect` goes from a request only.
        let given = [("expect", "100-continue"), ("x-a", "1")];
        strips("expect, response", Message::Response, &given, &given);
        strips("expect, request", Message::Request, &given, &[("x-a", "1")]);
    }

    #[test]
    fn wire_fields_keep_their_order_and_case_and_take_what_is_set() {
        let mut w = Fields::Wire(wire(&[
            ("Host", "a.test"),
            ("X-One", "1"),
            ("host", "again"),
            ("Content-Length", "3"),
            ("Date", "then"),
        ]));
        assert_eq!(w.get(&header::HOST), Some(&b"a.test"[..]));
        assert_eq!(w.get(&header::CONTENT_LENGTH), Some(&b"3"[..]));
        assert_eq!(w.get(&header::ACCEPT), None);
        w.insert(header::HOST, HeaderValue::from_static("b.test"));
        w.insert(header::HOST, HeaderValue::from_static("c.test"));
        assert_eq!(w.get(&header::HOST), Some(&b"c.test"[..]));
        let mut out = Vec::new();
        let written = w.encode(&mut out, false);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "host: c.test\r\nX-One: 1\r\nDate: then\r\n"
        );
        assert!(written.date && written.content_length);
        let mut out = Vec::new();
        w.encode(&mut out, true);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "host: c.test\r\nX-One: 1\r\nContent-Length: 3\r\nDate: then\r\n"
        );
        assert_eq!(
            w.encoded_len(),
            "X-One: 1\r\nContent-Length: 3\r\nDate: then\r\nhost: c.test\r\n".len()
        );
        let m = w.into_map();
        assert_eq!(m.len(), 4);
        assert_eq!(m["host"], "c.test");
        assert_eq!(m["x-one"], "1");
    }

    /// What [`Wire::new`] relies on: a name httparse accepts is a name
    /// `HeaderName` takes, for every byte, in a short name and a long one
    /// (parsed differently by both).
    #[test]
    fn parsed_names_are_header_names() {
        for b in (0..=255u8).filter(|b| !matches!(b, b'\r' | b'\n' | b':')) {
            for len in [2, 100] {
                let mut name = vec![b'a'; len];
                name[1] = b;
                let mut text = b"HTTP/1.1 200 OK\r\n".to_vec();
                text.extend_from_slice(&name);
                text.extend_from_slice(b": v\r\n\r\n");
                let mut headers = [httparse::EMPTY_HEADER; 4];
                let mut resp = httparse::Response::new(&mut headers);
                if matches!(resp.parse(&text), Ok(httparse::Status::Complete(_))) {
                    assert!(
                        HeaderName::from_bytes(resp.headers[0].name.as_bytes()).is_ok(),
                        "byte {b:#04x} in a name of {len}"
                    );
                }
            }
        }
    }
}
