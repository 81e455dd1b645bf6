//! Pool addresses from the cloud's instance metadata service: the private
//! addresses the provider assigned to each network interface (by MAC
//! address), whether or not something has configured them on the host
//! yet (those not configured are found and kept out of the rotation by the
//! usability check until they are).
//!
//! - AWS: IMDSv2 only. A session token from `PUT /latest/api/token`
//!   (`X-aws-ec2-metadata-token-ttl-seconds`), sent as
//!   `X-aws-ec2-metadata-token` with every read, renewed a minute before it
//!   expires and at once on a 401. `…/network/interfaces/macs/` lists the
//!   MACs; `…/macs/MAC/local-ipv4s` and `…/ipv6s` their addresses,
//!   `…/ipv4-prefix` and `…/ipv6-prefix` the prefixes delegated to the
//!   interface (prefix delegation: /28s, /80s).
//! - GCP: `Metadata-Flavor: Google`; one JSON document,
//!   `…/instance/network-interfaces/?recursive=true&alt=json`: each
//!   interface's `mac`, `ip`, `ipAliases` (CIDRs) and `ipv6s`. (Not the
//!   lists one by one: a list's directory, `ip-aliases/`, answers its
//!   indices, `0`, `1`…, not its values.)
//! - Azure: `Metadata: true`; `/metadata/instance/network?api-version=…`,
//!   one JSON document, MACs written without separators.
//!
//! Every exchange has a timeout; a failed or slow read is a source error,
//! which keeps the last good addresses (as for a pool file).

use std::io::Read;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rotor_protocol::Segment;

use crate::source::{format_mac, parse_mac};
use crate::spec::{parse_spec_into, SpecError, MAX_READ_ENTRIES};

/// Which provider's metadata service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Aws,
    Gcp,
    Azure,
}

impl Provider {
    pub fn parse(s: &str) -> Result<Provider, String> {
        match s.to_ascii_lowercase().as_str() {
            "aws" | "ec2" => Ok(Provider::Aws),
            "gcp" | "gce" | "google" => Ok(Provider::Gcp),
            "azure" => Ok(Provider::Azure),
            _ => Err(format!(
                "`{s}` is not a metadata provider: aws, gcp or azure"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Provider::Aws => "aws",
            Provider::Gcp => "gcp",
            Provider::Azure => "azure",
        }
    }

    /// The provider's own address for its metadata service.
    pub fn default_endpoint(self) -> &'static str {
        match self {
            Provider::Aws | Provider::Azure => "http://169.254.169.254",
            Provider::Gcp => "http://metadata.google.internal",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("{url}")]
    Http {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: unreadable answer")]
    Body {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: {what}")]
    Invalid { url: String, what: String },
    #[error("{url}: bad address")]
    Spec {
        url: String,
        #[source]
        source: SpecError,
    },
    #[error("the metadata service lists no interface with MAC address {0}")]
    NoMac(String),
    /// The IMDSv2 token's PUT went unanswered: as a container's is on an
    /// instance whose answers to it go one network hop only.
    #[error("{url}: no token in time; from a container (or past another network hop) the instance must let the answer go further: aws ec2 modify-instance-metadata-options --http-put-response-hop-limit 2")]
    TokenUnanswered {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
}

/// How long one exchange with the metadata service may take.
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// The IMDSv2 token's lifetime asked for, and how long before its end a
/// new one is fetched.
const TOKEN_TTL: Duration = Duration::from_secs(6 * 3600);
/// The longest answer read: past it, an error (a list cut at the limit
/// could end in another address: `10.0.0.12` of `10.0.0.123`).
const BODY_MAX: u64 = 1 << 20;
/// Interfaces read at most: each is a few requests, one after another,
/// 2 s each at most (an instance has 15 at most on AWS today).
const INTERFACES_MAX: usize = 64;
/// A whole read's time at most (its requests go one after another): a
/// service answering each just within its 2 s held the refresh, and
/// `rotor reload`, for minutes.
const READ_MAX: Duration = match cfg!(test) {
    true => Duration::from_secs(3),
    false => Duration::from_secs(20),
};
const TOKEN_MARGIN: Duration = Duration::from_secs(60);

/// One metadata source: a provider, where its service is, and which
/// interfaces (all, if none).
#[derive(Debug)]
pub struct Metadata {
    pub provider: Provider,
    pub endpoint: String,
    pub macs: Vec<[u8; 6]>,
    agent: ureq::Agent,
    /// The IMDSv2 token and when it expires.
    token: Mutex<Option<(String, Instant)>>,
    /// When the read under way must be done (`READ_MAX` from its start).
    due: Mutex<Option<Instant>>,
}

impl PartialEq for Metadata {
    fn eq(&self, other: &Metadata) -> bool {
        (self.provider, &self.endpoint, &self.macs)
            == (other.provider, &other.endpoint, &other.macs)
    }
}

impl Eq for Metadata {}

/// Each interface the service lists: its MAC address and its addresses.
type Interfaces = Vec<([u8; 6], Vec<Segment>)>;

/// An answer: its status and its body (read whole, at most 1 MiB).
struct Answer {
    status: u16,
    body: String,
}

impl Metadata {
    pub fn new(provider: Provider, endpoint: Option<&str>, macs: Vec<[u8; 6]>) -> Metadata {
        let endpoint = endpoint
            .unwrap_or(provider.default_endpoint())
            .trim_end_matches('/')
            .to_string();
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(TIMEOUT))
            // Shorter, so that a connect that times out says so (a service
            // not there), apart from an answer that never comes (the
            // token's past the instance's hop limit).
            .timeout_connect(Some(TIMEOUT * 3 / 4))
            .http_status_as_error(false)
            // The metadata service is on this host's link: never through a
            // proxy from the environment.
            .proxy(None)
            .max_redirects(0)
            .build()
            .into();
        Metadata {
            provider,
            endpoint,
            macs,
            agent,
            token: Mutex::new(None),
            due: Mutex::new(None),
        }
    }

    /// How the operator named it.
    pub fn name(&self) -> String {
        let mut n = format!("--metadata {} ({})", self.provider.name(), self.endpoint);
        for m in &self.macs {
            n.push_str(&format!(" --metadata-mac {}", format_mac(m)));
        }
        n
    }

    /// The addresses the service lists now, for the chosen interfaces.
    /// Blocking: call from a blocking context.
    pub fn read(&self) -> Result<Vec<Segment>, MetadataError> {
        *self.due.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + READ_MAX);
        let read = match self.provider {
            Provider::Aws => self.aws(),
            Provider::Gcp => self.gcp(),
            Provider::Azure => self.azure(),
        };
        *self.due.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let by_mac = read?;
        let mut out = Vec::new();
        if self.macs.is_empty() {
            for (_, addrs) in by_mac {
                out.extend(addrs);
            }
        } else {
            for want in &self.macs {
                match by_mac.iter().find(|(m, _)| m == want) {
                    Some((_, addrs)) => out.extend(addrs.iter().copied()),
                    None => return Err(MetadataError::NoMac(format_mac(want))),
                }
            }
        }
        // An instance's interfaces always hold an address: none listed is
        // a glitch of the service (a 404 or an empty list for a moment, as
        // an interface is attached), which keeps the last good addresses
        // rather than empty the pool until the next refresh.
        if out.is_empty() {
            return Err(MetadataError::Invalid {
                url: self.endpoint.clone(),
                what: "no address listed for the interfaces read".into(),
            });
        }
        Ok(out)
    }

    fn exchange(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Answer, MetadataError> {
        let url = format!("{}{}", self.endpoint, path);
        let due = *self.due.lock().unwrap_or_else(|e| e.into_inner());
        if due.is_some_and(|due| Instant::now() >= due) {
            return Err(MetadataError::Invalid {
                url,
                what: format!("the read took longer than {READ_MAX:?}; stopped"),
            });
        }
        let http = |source| MetadataError::Http {
            url: url.clone(),
            source: Box::new(source),
        };
        let mut resp = match method {
            "PUT" => {
                let mut req = self.agent.put(&url);
                for (k, v) in headers {
                    req = req.header(*k, *v);
                }
                req.send_empty().map_err(http)?
            }
            _ => {
                let mut req = self.agent.get(&url);
                for (k, v) in headers {
                    req = req.header(*k, *v);
                }
                req.call().map_err(http)?
            }
        };
        let status = resp.status().as_u16();
        let mut body = String::new();
        resp.body_mut()
            .as_reader()
            .take(BODY_MAX + 1)
            .read_to_string(&mut body)
            .map_err(|source| MetadataError::Body {
                url: url.clone(),
                source,
            })?;
        if body.len() as u64 > BODY_MAX {
            return Err(MetadataError::Invalid {
                url,
                what: format!("an answer of more than {BODY_MAX} bytes"),
            });
        }
        Ok(Answer { status, body })
    }

    /// A GET that must answer 200 (404: `None`, for lists an interface may
    /// lack).
    fn get(&self, path: &str, headers: &[(&str, &str)]) -> Result<Option<String>, MetadataError> {
        let a = self.exchange("GET", path, headers)?;
        self.listing(path, a)
    }

    /// The body of a 200, `None` for a 404 (a list an interface lacks),
    /// else an error naming the status.
    fn listing(&self, path: &str, a: Answer) -> Result<Option<String>, MetadataError> {
        match a.status {
            200 => Ok(Some(a.body)),
            404 => Ok(None),
            status => Err(MetadataError::Status {
                url: format!("{}{}", self.endpoint, path),
                status,
            }),
        }
    }

    fn aws_token(&self, fresh: bool) -> Result<String, MetadataError> {
        let mut token = self.token.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((t, until)) = token.as_ref() {
            if !fresh && Instant::now() + TOKEN_MARGIN < *until {
                return Ok(t.clone());
            }
        }
        let ttl = TOKEN_TTL.as_secs().to_string();
        let path = "/latest/api/token";
        let a = self
            .exchange(
                "PUT",
                path,
                &[("X-aws-ec2-metadata-token-ttl-seconds", &ttl)],
            )
            .map_err(|e| match e {
                MetadataError::Http { url, source }
                    if matches!(
                        *source,
                        ureq::Error::Timeout(t)
                            if !matches!(t, ureq::Timeout::Connect | ureq::Timeout::Resolve)
                    ) =>
                {
                    MetadataError::TokenUnanswered { url, source }
                }
                e => e,
            })?;
        if a.status != 200 || a.body.trim().is_empty() {
            return Err(MetadataError::Status {
                url: format!("{}{path}", self.endpoint),
                status: a.status,
            });
        }
        let t = a.body.trim().to_string();
        *token = Some((t.clone(), Instant::now() + TOKEN_TTL));
        Ok(t)
    }

    /// An IMDSv2 read: with the session token, and once more with a new
    /// token if the service says the one held is no longer good (401).
    fn aws_get(&self, path: &str) -> Result<Option<String>, MetadataError> {
        let token = self.aws_token(false)?;
        let a = self.exchange("GET", path, &[("X-aws-ec2-metadata-token", &token)])?;
        let a = match a.status {
            401 => {
                let token = self.aws_token(true)?;
                self.exchange("GET", path, &[("X-aws-ec2-metadata-token", &token)])?
            }
            _ => a,
        };
        self.listing(path, a)
    }

    fn aws(&self) -> Result<Interfaces, MetadataError> {
        // One bound for every list of every interface, as for a pool file.
        let mut room = MAX_READ_ENTRIES;
        let base = "/latest/meta-data/network/interfaces/macs/";
        let list = self.aws_get(base)?.ok_or_else(|| self.missing(base))?;
        let mut out = Vec::new();
        for item in self.interfaces(lines(&list).collect(), base)? {
            let mac_text = item.trim_end_matches('/');
            let mac = self.mac(mac_text, base)?;
            // Only the interfaces asked for are read: another's fault
            // (a 500 on its lists, a bad address in them) is none of this
            // source's. (A listing with a line that is no MAC is garbled
            // as a whole, and an error.)
            if !self.wanted(&mac) {
                continue;
            }
            let mut addrs = Vec::new();
            for (list, shape) in [
                ("local-ipv4s", Shape::Address),
                ("ipv6s", Shape::Address),
                ("ipv4-prefix", Shape::Prefix),
                ("ipv6-prefix", Shape::Prefix),
            ] {
                let path = format!("{base}{mac_text}/{list}");
                if let Some(body) = self.aws_get(&path)? {
                    addrs.extend(self.specs(&body, (&path, shape), &mut room)?);
                }
            }
            out.push((mac, addrs));
        }
        Ok(out)
    }

    fn gcp(&self) -> Result<Interfaces, MetadataError> {
        // One bound for every list of every interface, as for a pool file.
        let mut room = MAX_READ_ENTRIES;
        let path = "/computeMetadata/v1/instance/network-interfaces/?recursive=true&alt=json";
        let doc = self.json(path, &[("Metadata-Flavor", "Google")])?;
        let listed = self.listed(doc.as_array(), path)?;
        let mut out = Vec::new();
        for iface in self.interfaces(listed.iter().collect(), path)? {
            let mac = self.mac(iface["mac"].as_str().unwrap_or(""), path)?;
            if !self.wanted(&mac) {
                continue;
            }
            let mut addrs = Vec::new();
            // Each field as the service writes it, or the answer is
            // garbled (a string where a list goes dropped its addresses,
            // and the pool shrank with no error).
            if let Some(ip) = self.optional(&iface["ip"], "ip", path)? {
                addrs.extend(self.specs(ip, (path, Shape::Address), &mut room)?);
            }
            for (key, shape) in [("ipAliases", Shape::Prefix), ("ipv6s", Shape::Address)] {
                for v in self.list(&iface[key], key, path)? {
                    let spec = self.text(v, key, path)?;
                    addrs.extend(self.specs(spec, (path, shape), &mut room)?);
                }
            }
            out.push((mac, addrs));
        }
        Ok(out)
    }

    fn azure(&self) -> Result<Interfaces, MetadataError> {
        // One bound for every list of every interface, as for a pool file.
        let mut room = MAX_READ_ENTRIES;
        let path = "/metadata/instance/network?api-version=2021-02-01";
        let doc = self.json(path, &[("Metadata", "true")])?;
        let listed = self.listed(doc["interface"].as_array(), path)?;
        let mut out = Vec::new();
        for iface in self.interfaces(listed.iter().collect(), path)? {
            let mac = self.mac(iface["macAddress"].as_str().unwrap_or(""), path)?;
            // As on the others: another interface's fault is none of this
            // source's, nor do its addresses use up the entries' room.
            if !self.wanted(&mac) {
                continue;
            }
            let mut addrs = Vec::new();
            for family in ["ipv4", "ipv6"] {
                for a in self.list(&iface[family]["ipAddress"], "ipAddress", path)? {
                    if let Some(ip) =
                        self.optional(&a["privateIpAddress"], "privateIpAddress", path)?
                    {
                        addrs.extend(self.specs(ip, (path, Shape::Address), &mut room)?);
                    }
                }
            }
            out.push((mac, addrs));
        }
        Ok(out)
    }

    /// The JSON document at `path`, which must be there.
    fn json(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<serde_json::Value, MetadataError> {
        let body = self.get(path, headers)?.ok_or_else(|| self.missing(path))?;
        serde_json::from_str(&body).map_err(|e| MetadataError::Invalid {
            url: format!("{}{path}", self.endpoint),
            what: format!("not the JSON expected: {e}"),
        })
    }

    /// A document's list of interfaces. None is not an instance without
    /// interfaces: a garbled answer, which keeps the last good addresses.
    fn listed<'a>(
        &self,
        list: Option<&'a Vec<serde_json::Value>>,
        path: &str,
    ) -> Result<&'a Vec<serde_json::Value>, MetadataError> {
        list.ok_or_else(|| MetadataError::Invalid {
            url: format!("{}{path}", self.endpoint),
            what: "no list of interfaces".into(),
        })
    }

    /// Whether the interface with `mac` is read (`--metadata-mac`, or every
    /// one).
    fn wanted(&self, mac: &[u8; 6]) -> bool {
        self.macs.is_empty() || self.macs.contains(mac)
    }

    /// The interfaces a service listed, if they are 1 to [`INTERFACES_MAX`]:
    /// none is a garbled answer (every instance has one), and more would
    /// be that many requests one after another on each refresh.
    fn interfaces<T>(&self, listed: Vec<T>, path: &str) -> Result<Vec<T>, MetadataError> {
        match listed.len() {
            1..=INTERFACES_MAX => Ok(listed),
            n => Err(MetadataError::Invalid {
                url: format!("{}{path}", self.endpoint),
                what: format!("{n} interfaces listed (1 to {INTERFACES_MAX} expected)"),
            }),
        }
    }

    /// A listing that must exist answered 404: an error (the last good
    /// addresses are kept), not an empty pool.
    fn missing(&self, path: &str) -> MetadataError {
        MetadataError::Status {
            url: format!("{}{path}", self.endpoint),
            status: 404,
        }
    }

    fn mac(&self, text: &str, path: &str) -> Result<[u8; 6], MetadataError> {
        parse_mac(text).ok_or_else(|| MetadataError::Invalid {
            url: format!("{}{path}", self.endpoint),
            what: format!("`{text}` is not a MAC address"),
        })
    }

    /// A field that must be a list (absent: none), or the answer is
    /// garbled.
    fn list<'a>(
        &self,
        v: &'a serde_json::Value,
        key: &str,
        path: &str,
    ) -> Result<&'a [serde_json::Value], MetadataError> {
        match v {
            serde_json::Value::Null => Ok(&[]),
            serde_json::Value::Array(items) => Ok(items),
            other => Err(self.garbled(path, format!("`{key}` is not a list: {other}"))),
        }
    }

    /// A field that must be a string, or the answer is garbled.
    fn text<'a>(
        &self,
        v: &'a serde_json::Value,
        key: &str,
        path: &str,
    ) -> Result<&'a str, MetadataError> {
        v.as_str()
            .ok_or_else(|| self.garbled(path, format!("`{key}` holds {v}, not an address")))
    }

    /// A field that may be absent or empty (none), else a string.
    fn optional<'a>(
        &self,
        v: &'a serde_json::Value,
        key: &str,
        path: &str,
    ) -> Result<Option<&'a str>, MetadataError> {
        match v {
            serde_json::Value::Null => Ok(None),
            v => Ok(Some(self.text(v, key, path)?).filter(|s| !s.is_empty())),
        }
    }

    fn garbled(&self, path: &str, what: String) -> MetadataError {
        MetadataError::Invalid {
            url: format!("{}{path}", self.endpoint),
            what,
        }
    }

    /// One entry a line, of `shape` (an address; a prefix: GCP's aliases,
    /// AWS's delegated prefixes), at most `room` entries (taken from it).
    /// A pool's other notations (a range, a comma list) are no answer of
    /// a metadata service: a garbled one (an address written as a CIDR
    /// listed its whole block).
    fn specs(
        &self,
        body: &str,
        (path, shape): (&str, Shape),
        room: &mut usize,
    ) -> Result<Vec<Segment>, MetadataError> {
        let mut out = Vec::new();
        for line in lines(body) {
            let fits = match shape {
                Shape::Address => line.parse::<std::net::IpAddr>().is_ok(),
                Shape::Prefix => !line.contains(['-', ',']),
            };
            if !fits {
                return Err(self.garbled(
                    path,
                    format!(
                        "`{line}` is not {}",
                        match shape {
                            Shape::Address => "one address",
                            Shape::Prefix => "one prefix",
                        }
                    ),
                ));
            }
            parse_spec_into(line, &mut out, *room).map_err(|source| MetadataError::Spec {
                url: format!("{}{path}", self.endpoint),
                source,
            })?;
        }
        *room -= out.len();
        Ok(out)
    }
}

/// What a metadata list holds each line of.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Address,
    Prefix,
}

fn lines(body: &str) -> impl Iterator<Item = &str> {
    body.lines().map(str::trim).filter(|l| !l.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// Where a GCP metadata service answers the interfaces as one JSON
    /// document.
    const GCP_PATH: &str =
        "/computeMetadata/v1/instance/network-interfaces/?recursive=true&alt=json";

    /// A GCP metadata service whose document of interfaces is `doc` (with
    /// `Metadata-Flavor: Google`; else 403).
    fn fake_gcp(doc: String) -> String {
        fake(
            move |_, path, h| match (path, header(h, "metadata-flavor")) {
                (GCP_PATH, Some("Google")) => (200, doc.clone()),
                (GCP_PATH, _) => (403, String::new()),
                _ => (404, String::new()),
            },
        )
    }

    /// A document of one interface, `MAC1`, with these JSON `fields`.
    fn gcp_one(fields: &str) -> String {
        format!(r#"[{{"mac":"{MAC1}",{fields}}}]"#)
    }

    /// A metadata service on loopback: `answer(method, path, headers)`
    /// gives (status, body); a body of `SLOW` answers after 3 s, one of
    /// `SLOWISH REST` answers REST after 1.2 s.
    fn fake<F>(answer: F) -> String
    where
        F: Fn(&str, &str, &[(String, String)]) -> (u16, String) + Send + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut s) = conn else { return };
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut first = String::new();
                if r.read_line(&mut first).is_err() {
                    continue;
                }
                let mut headers = Vec::new();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = line.trim_end().split_once(':') {
                        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                    }
                }
                let mut parts = first.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let (status, mut body) = answer(method, path, &headers);
                if body == "SLOW" {
                    std::thread::sleep(Duration::from_secs(3));
                }
                // Within the 2 s a request has, then the rest.
                if let Some(rest) = body.strip_prefix("SLOWISH ") {
                    std::thread::sleep(Duration::from_millis(1200));
                    body = rest.to_string();
                }
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        url
    }

    fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
        h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn strings(v: Vec<Segment>) -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    }

    const MAC1: &str = "02:fc:00:00:00:01";
    const MAC2: &str = "02:fc:00:00:00:02";

    /// IMDSv2: no token, 401; a token the service has expired, 401, and a
    /// new one is fetched; tokens are reused while good.
    #[test]
    fn aws_imdsv2_token_flow_and_listing() {
        let issued = Arc::new(AtomicU32::new(0));
        let valid = Arc::new(AtomicU32::new(0));
        let (i, v) = (issued.clone(), valid.clone());
        let url = fake(move |method, path, h| {
            if method == "PUT" && path == "/latest/api/token" {
                if header(h, "x-aws-ec2-metadata-token-ttl-seconds").is_none() {
                    return (400, String::new());
                }
                let n = i.fetch_add(1, Ordering::SeqCst) + 1;
                v.store(n, Ordering::SeqCst);
                return (200, format!("token-{n}"));
            }
            let good = format!("token-{}", v.load(Ordering::SeqCst));
            if header(h, "x-aws-ec2-metadata-token") != Some(good.as_str()) {
                return (401, String::new());
            }
            let base = "/latest/meta-data/network/interfaces/macs/";
            match path.strip_prefix(base) {
                Some("") => (200, format!("{MAC1}/\n{MAC2}/")),
                Some(p) if p == format!("{MAC1}/local-ipv4s") => {
                    (200, "127.0.0.2\n127.0.0.3\n".into())
                }
                Some(p) if p == format!("{MAC1}/ipv6s") => (200, "2001:db8::5".into()),
                Some(p) if p == format!("{MAC2}/local-ipv4s") => (200, "127.0.0.9".into()),
                // Prefix delegation: a /28 (here a /30) and a /80.
                Some(p) if p == format!("{MAC2}/ipv4-prefix") => (200, "127.0.2.0/30".into()),
                Some(p) if p == format!("{MAC2}/ipv6-prefix") => {
                    (200, "2001:db8:1:2:3::/80".into())
                }
                _ => (404, String::new()),
            }
        });
        let m = Metadata::new(Provider::Aws, Some(&url), vec![]);
        assert_eq!(
            strings(m.read().unwrap()),
            [
                "127.0.0.2",
                "127.0.0.3",
                "2001:db8::5",
                "127.0.0.9",
                "127.0.2.0",
                "127.0.2.1",
                "127.0.2.2",
                "127.0.2.3",
                "2001:db8:1:2:3::/80"
            ]
        );
        assert_eq!(issued.load(Ordering::SeqCst), 1, "one token for all reads");
        m.read().unwrap();
        assert_eq!(issued.load(Ordering::SeqCst), 1, "and kept while good");
        // The service forgets it: 401, a new token, the read goes through.
        valid.store(99, Ordering::SeqCst);
        let only = Metadata::new(Provider::Aws, Some(&url), vec![parse_mac(MAC2).unwrap()]);
        *only.token.lock().unwrap() = Some(("token-1".into(), Instant::now() + TOKEN_TTL));
        assert_eq!(strings(only.read().unwrap())[0], "127.0.0.9");
        assert_eq!(issued.load(Ordering::SeqCst), 2);
        let missing = Metadata::new(Provider::Aws, Some(&url), vec![[2, 0, 0, 0, 0, 9]]);
        let err = missing.read().unwrap_err();
        assert!(err.to_string().contains("02:00:00:00:00:09"), "{err}");
    }

    /// GCP's document as the service writes it (`ipAliases` are CIDRs;
    /// `forwardedIps`, a load balancer's, are not this host's to send
    /// from): every interface, or the one asked for.
    #[test]
    fn gcp_interfaces_with_aliases() {
        let doc = format!(
            r#"[{{"accessConfigs":[{{"externalIp":"203.0.113.1","type":"ONE_TO_ONE_NAT"}}],
                "forwardedIps":["203.0.113.9"],"ip":"127.0.0.2","ipAliases":["127.0.1.0/30"],
                "ipv6s":["2001:db8::7"],"mac":"{MAC1}","mtu":1460,"network":"projects/1/networks/default"}},
               {{"ip":"127.0.0.9","ipAliases":[],"mac":"{MAC2}"}}]"#
        );
        let url = fake_gcp(doc);
        let m = Metadata::new(Provider::Gcp, Some(&url), vec![]);
        assert_eq!(
            strings(m.read().unwrap()),
            [
                "127.0.0.2",
                "127.0.1.0",
                "127.0.1.1",
                "127.0.1.2",
                "127.0.1.3",
                "2001:db8::7",
                "127.0.0.9"
            ]
        );
        let only = Metadata::new(Provider::Gcp, Some(&url), vec![parse_mac(MAC2).unwrap()]);
        assert_eq!(strings(only.read().unwrap()), ["127.0.0.9"]);
        // Without the header the service refuses (403): an error.
        let bare = fake(|_, _, _| (403, String::new()));
        let err = Metadata::new(Provider::Gcp, Some(&bare), vec![])
            .read()
            .unwrap_err();
        assert!(err.to_string().contains("403"), "{err}");
    }

    /// Interfaces that list no address (404s, empty lists) are a glitch:
    /// an error, which keeps the last good addresses, not an empty pool.
    /// And one bound holds for every list together.
    #[test]
    fn no_address_listed_is_an_error_and_the_bound_covers_every_list() {
        let url = fake_gcp(gcp_one(r#""ip":"""#));
        let err = Metadata::new(Provider::Gcp, Some(&url), vec![])
            .read()
            .unwrap_err();
        assert!(err.to_string().contains("no address listed"), "{err}");
        let url = fake(|_, _, _| {
            (200, r#"{"interface":[{"macAddress":"02FC00000001","ipv4":{"ipAddress":[]},"ipv6":{"ipAddress":[]}}]}"#.into())
        });
        let err = Metadata::new(Provider::Azure, Some(&url), vec![])
            .read()
            .unwrap_err();
        assert!(err.to_string().contains("no address listed"), "{err}");
        // Two interfaces' lists of 40 /16s each: 2.6 M entries apiece,
        // 5.2 M together.
        let sixteens: Vec<String> = (0..40).map(|i| format!("10.{i}.0.0/16")).collect();
        let sixteens = serde_json::to_string(&sixteens).unwrap();
        let url = fake_gcp(format!(
            r#"[{{"mac":"{MAC1}","ip":"127.0.0.2","ipAliases":{sixteens}}},
               {{"mac":"{MAC2}","ip":"127.0.0.3","ipAliases":{sixteens}}}]"#
        ));
        match Metadata::new(Provider::Gcp, Some(&url), vec![]).read() {
            Err(err) => assert!(matches!(err, MetadataError::Spec { .. }), "{err}"),
            Ok(read) => panic!("{} entries read", read.len()),
        }
    }

    /// A field of another shape than the service writes is a garbled
    /// answer, which keeps the last good addresses: an alias list written
    /// as a string dropped its aliases, and an address written as a CIDR
    /// listed its whole block, each read as good.
    #[test]
    fn fields_of_another_shape_are_a_garbled_answer() {
        for fields in [
            r#""ip":"127.0.0.2","ipAliases":"127.0.1.0/30""#,
            r#""ip":"127.0.0.2","ipAliases":[123]"#,
            r#""ip":"127.0.0.2","ipv6s":["2001:db8::/64"]"#,
            r#""ip":"127.0.0.0/24""#,
            r#""ip":7"#,
            r#""ip":"127.0.0.2","ipAliases":["127.0.1.0-127.0.1.9"]"#,
        ] {
            let url = fake_gcp(gcp_one(fields));
            let err = Metadata::new(Provider::Gcp, Some(&url), vec![])
                .read()
                .unwrap_err();
            assert!(
                matches!(err, MetadataError::Invalid { .. }),
                "{fields}: {err}"
            );
        }
        for address in [r#""127.0.0.0/24""#, "7", r#""127.0.0.2,127.0.0.3""#] {
            let doc = format!(
                r#"{{"interface":[{{"macAddress":"02FC00000001","ipv4":{{"ipAddress":[{{"privateIpAddress":{address}}}]}}}}]}}"#
            );
            let url = fake(move |_, _, _| (200, doc.clone()));
            let err = Metadata::new(Provider::Azure, Some(&url), vec![])
                .read()
                .unwrap_err();
            assert!(
                matches!(err, MetadataError::Invalid { .. }),
                "{address}: {err}"
            );
        }
    }

    #[test]
    fn azure_network_document_with_bare_macs() {
        let url = fake(|_, path, h| {
            if header(h, "metadata") != Some("true")
                || !path.starts_with("/metadata/instance/network?")
            {
                return (400, String::new());
            }
            // A second interface, not asked for, lists what would be an
            // error of the source: it is not looked at.
            (200, r#"{"interface":[{"macAddress":"02FC00000001",
                "ipv4":{"ipAddress":[{"privateIpAddress":"127.0.0.2","publicIpAddress":"203.0.113.1"},
                                     {"privateIpAddress":"127.0.0.3","publicIpAddress":""}]},
                "ipv6":{"ipAddress":[]}},
                {"macAddress":"02FC00000099",
                "ipv4":{"ipAddress":[{"privateIpAddress":"0.0.0.0"}]}}]}"#.into())
        });
        let m = Metadata::new(Provider::Azure, Some(&url), vec![parse_mac(MAC1).unwrap()]);
        assert_eq!(strings(m.read().unwrap()), ["127.0.0.2", "127.0.0.3"]);
    }

    #[test]
    fn slow_broken_and_garbled_answers_are_errors() {
        let url = fake(|_, path, _| match path {
            "/latest/api/token" => (200, "t".into()),
            p if p.ends_with("/macs/") => (200, format!("{MAC1}/")),
            p if p.ends_with("local-ipv4s") => (200, "SLOW".into()),
            _ => (404, String::new()),
        });
        let started = Instant::now();
        let err = Metadata::new(Provider::Aws, Some(&url), vec![])
            .read()
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "bounded by the timeout"
        );
        assert!(matches!(err, MetadataError::Http { .. }), "{err}");
        let url = fake(|_, _, _| (404, String::new()));
        let err = Metadata::new(Provider::Gcp, Some(&url), vec![])
            .read()
            .unwrap_err();
        assert!(err.to_string().contains("404"), "{err}");
        let url = fake(|_, _, _| (500, "oops".into()));
        let err = Metadata::new(Provider::Gcp, Some(&url), vec![])
            .read()
            .unwrap_err();
        assert!(err.to_string().contains("500"), "{err}");
        let url = fake(|_, _, _| (200, "not json".into()));
        let err = Metadata::new(Provider::Azure, Some(&url), vec![])
            .read()
            .unwrap_err();
        assert!(err.to_string().contains("JSON"), "{err}");
        // Nothing listens: an error, not a hang.
        let err = Metadata::new(Provider::Aws, Some("http://127.0.0.1:9"), vec![])
            .read()
            .unwrap_err();
        assert!(matches!(err, MetadataError::Http { .. }), "{err}");
        // A JSON document without its interface list, and one with none:
        // garbled, not an instance without addresses (which would empty
        // the source).
        for doc in [r#"{"other":1}"#, r#"{"interface":[]}"#] {
            let url = fake(move |_, _, _| (200, doc.into()));
            let err = Metadata::new(Provider::Azure, Some(&url), vec![])
                .read()
                .unwrap_err();
            assert!(matches!(err, MetadataError::Invalid { .. }), "{doc}: {err}");
        }
        // An empty listing of interfaces, and one of thousands.
        for listing in ["[]".to_string(), format!("[{}{{}}]", "{},".repeat(4999))] {
            let url = fake_gcp(listing);
            let err = Metadata::new(Provider::Gcp, Some(&url), vec![])
                .read()
                .unwrap_err();
            assert!(err.to_string().contains("interfaces listed"), "{err}");
        }
        // A document that is no list of interfaces, and one whose
        // interface has no MAC.
        for doc in ["{}".to_string(), r#"[{"ip":"127.0.0.2"}]"#.to_string()] {
            let url = fake_gcp(doc.clone());
            let err = Metadata::new(Provider::Gcp, Some(&url), vec![])
                .read()
                .unwrap_err();
            assert!(matches!(err, MetadataError::Invalid { .. }), "{doc}: {err}");
        }
    }

    /// A read whose requests each answer within their time but are many
    /// stops at `READ_MAX` (3 s under test, 20 s else).
    #[test]
    fn a_read_is_bounded_as_a_whole() {
        let url = fake(|_, path, _| {
            let base = "/latest/meta-data/network/interfaces/macs/";
            match path.strip_prefix(base) {
                _ if path == "/latest/api/token" => (200, "t".into()),
                Some("") => (
                    200,
                    (1..=5).map(|i| format!("02:fc:00:00:00:0{i}/\n")).collect(),
                ),
                Some(p) if p.ends_with("/local-ipv4s") => (200, "SLOWISH 127.0.0.2".into()),
                _ => (404, String::new()),
            }
        });
        let started = Instant::now();
        let err = Metadata::new(Provider::Aws, Some(&url), vec![])
            .read()
            .unwrap_err();
        assert!(err.to_string().contains("took longer"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "{:?}",
            started.elapsed()
        );
    }

    /// A token's PUT that goes unanswered (the instance's hop limit keeps
    /// the answer from a container) says what to change.
    #[test]
    fn an_unanswered_token_names_the_hop_limit() {
        let url = fake(|method, _, _| match method {
            "PUT" => (200, "SLOW".into()),
            _ => (404, String::new()),
        });
        let err = Metadata::new(Provider::Aws, Some(&url), vec![])
            .read()
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("http-put-response-hop-limit 2"), "{text}");
    }

    /// With `--metadata-mac`, only that interface is read: another's
    /// fault (a 500 on its list) does not fail the source.
    #[test]
    fn only_the_interfaces_asked_for_are_read() {
        let url = fake(|_, path, _| {
            let base = "/latest/meta-data/network/interfaces/macs/";
            match path.strip_prefix(base) {
                _ if path == "/latest/api/token" => (200, "t".into()),
                Some("") => (200, format!("{MAC1}/\n{MAC2}/")),
                Some(p) if p.starts_with(MAC1) => (500, "broken".into()),
                Some(p) if p == format!("{MAC2}/local-ipv4s") => (200, "127.0.0.9".into()),
                _ => (404, String::new()),
            }
        });
        let only = Metadata::new(Provider::Aws, Some(&url), vec![parse_mac(MAC2).unwrap()]);
        assert_eq!(strings(only.read().unwrap()), ["127.0.0.9"]);
        let every = Metadata::new(Provider::Aws, Some(&url), vec![]);
        assert!(every.read().unwrap_err().to_string().contains("500"));
    }

    /// An answer past the limit is an error, not a list cut short (whose
    /// last line could read as another address).
    #[test]
    fn an_answer_past_the_limit_is_an_error() {
        let aliases = vec!["127.0.0.2"; (BODY_MAX as usize) / 12];
        let aliases = serde_json::to_string(&aliases).unwrap();
        let url = fake_gcp(gcp_one(&format!(r#""ipAliases":{aliases}"#)));
        let err = Metadata::new(Provider::Gcp, Some(&url), vec![])
            .read()
            .unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
    }
}
