//! TLS to the proxy (`--tls-listen`): the same proxy behind a TLS handshake
//! (rustls with the ring provider; TLS 1.2 and 1.3, ALPN `http/1.1`), so
//! credentials and targets never cross the network in clear. The
//! certificate and key are re-read on SIGHUP and `rotor reload`; a pair
//! that does not load keeps the one in use, and the log says why.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

/// The certificate chain and key files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The pair in use, swapped whole on a reload.
pub struct Tls {
    files: TlsFiles,
    config: RwLock<Arc<ServerConfig>>,
    /// The certificate's validity, if it reads (see `watch_validity`).
    dates: std::sync::Mutex<Option<(i64, i64)>>,
    swapped: tokio::sync::Notify,
    /// What seals session tickets, the same across reloads.
    tickets: Arc<Tickets>,
}

/// The time in Unix seconds.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

/// What to do with an encrypted key.
const DECRYPT_HINT: &str = "`openssl pkey -in KEY -out PLAIN` decrypts it";

type Loaded = (Arc<ServerConfig>, Option<(i64, i64)>);

/// Reads the pair and makes a server configuration of it (with the
/// certificate's validity, if it reads); a certificate past (or near) its
/// dates is warned of, unless `quiet`.
fn load(files: &TlsFiles, quiet: bool, tickets: &Arc<Tickets>) -> Result<Loaded, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| format!("tls-cert {}: {e}", files.cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls-cert {}: {e}", files.cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls-cert {}: no PEM certificate in it",
            files.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        // (Said as what to do: "no items found" named no cause, and an
        // encrypted key of OpenSSL's older format, with its `Proc-Type`
        // header, "base64 decode error".)
        let encrypted = std::fs::read(&files.key)
            .is_ok_and(|b| b.windows(9).any(|w| w == b"ENCRYPTED"));
        match e {
            _ if encrypted => format!(
                "tls-key {}: the key is encrypted, and is not read (rotor asks for no passphrase): {DECRYPT_HINT}",
                files.key.display()
            ),
            tokio_rustls::rustls::pki_types::pem::Error::NoItemsFound => format!(
                "tls-key {}: no private key in it (a PEM `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY`; an encrypted one is not read: {DECRYPT_HINT})",
                files.key.display()
            ),
            e => format!("tls-key {}: {e}", files.key.display()),
        }
    })?;
    // A pair past its dates still loads (a client that does not check may
    // use it), but the operator is told: clients that check refuse every
    // connection, and say only that the handshake failed.
    let dates = validity(&certs[0]);
    if let Some(why) = dates.and_then(|v| validity_warning(v, unix_now())) {
        if !quiet {
            warn!(cert = %files.cert.display(), "TLS certificate {why}");
        }
    }
    let provider = Arc::new(provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[
            &tokio_rustls::rustls::version::TLS13,
            &tokio_rustls::rustls::version::TLS12,
        ])
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            use tokio_rustls::rustls::{Error, InconsistentKeys};
            let (cert, key) = (files.cert.display(), files.key.display());
            match e {
                // (ring signs with these only: a P-521, Ed448 or short RSA
                // key is read as no key at all.)
                Error::General(m) if m.contains("private key") => format!(
                    "tls-key {key}: a key of a kind that cannot sign here ({m}): RSA of 2048 to 4096 bits, ECDSA on P-256 or P-384, or Ed25519 are taken"
                ),
                Error::InconsistentKeys(InconsistentKeys::KeyMismatch) => format!(
                    "tls-cert {cert} and tls-key {key} do not make a pair: the key is not the first certificate's (the server's certificate comes first in the file, then its chain)"
                ),
                e => format!("tls-cert {cert} and tls-key {key} do not make a pair: {e}"),
            }
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // The server's order: AES-128-GCM first (see `provider`).
    config.ignore_client_order = true;
    // Stateless tickets, sealed with the host's keys: any worker resumes
    // a session another began (rustls's session cache is the process's).
    config.ticketer = tickets.clone();
    Ok((Arc::new(config), dates))
}

/// ring's suites with AES-128-GCM before AES-256-GCM. Most clients (curl,
/// Python, OpenSSL's default) ask for AES-256-GCM-SHA384 first, whose
/// handshake hashes with SHA-384: ring has no hardware path for it on
/// x86-64, and with a handshake per connection its software SHA-512 was
/// 7.6 % of a worker's samples (SHA-256, on the CPU's SHA extensions,
/// 2.6 %; −12 to −21 % user CPU per new TLS connection, README). Both are
/// TLS 1.3's standard suites (AES-128-GCM the one every client must have);
/// clients of a forward proxy run on hosts with AES in hardware, so
/// ChaCha20 stays last as in ring's list (a client offering only it gets
/// it).
fn provider() -> tokio_rustls::rustls::crypto::CryptoProvider {
    use tokio_rustls::rustls::crypto::ring::cipher_suite as cs;
    let mut provider = tokio_rustls::rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    provider
}

/// Less than this left of a certificate's validity is warned of.
const EXPIRES_SOON: i64 = 14 * 86_400;

/// What is wrong with a certificate valid from `not_before` to
/// `not_after` (Unix seconds) at `now`, if anything.
fn validity_warning((not_before, not_after): (i64, i64), now: i64) -> Option<String> {
    // (humantime writes years up to 9999, and panics past them.)
    let date = |t: i64| {
        let t = t.clamp(0, 253_402_300_799);
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t as u64);
        humantime::format_rfc3339_seconds(t).to_string()
    };
    if now > not_after {
        return Some(format!(
            "expired at {}: clients that check it refuse every TLS connection; replace it and reload",
            date(not_after)
        ));
    }
    if now < not_before {
        return Some(format!(
            "is not valid before {}: clients that check it refuse every TLS connection until then",
            date(not_before)
        ));
    }
    (not_after - now < EXPIRES_SOON).then(|| {
        // (In hours under two days: "in 1 days" read for 47 h.)
        let left = not_after - now;
        let when = match left / 3600 {
            0 if left < 60 => format!("{left} s"),
            0 => format!("{} min", left / 60),
            h @ 1..48 => format!("{h} h"),
            _ => format!("{} days", left / 86_400),
        };
        format!(
            "expires at {}, in {when}: replace it and reload before then",
            date(not_after)
        )
    })
}

/// Seals and opens TLS session tickets (AES-256-GCM): each ticket is
/// its key's name, a random nonce, then the session sealed with the name
/// as associated data, as rustls's own ticketer writes them. The keys are
/// the host's, from the allocator (see `Tls::share_tickets`), or until
/// then one of this worker's own.
pub struct Tickets {
    /// The key to seal with first, then those that also open.
    keys: RwLock<Vec<([u8; 16], ring::aead::LessSafeKey)>>,
    /// When they were last known good: made here, or the host's, asked.
    fresh: std::sync::Mutex<std::time::Instant>,
}

/// A ticket longer than this is not opened (what rotor seals is a few
/// hundred bytes: a session's secrets, its SNI and ALPN): an opening
/// oracle is harder on short ciphertexts.
const TICKET_MAX: usize = 4096;

impl Tickets {
    /// With a key of this worker's own.
    fn own() -> Result<Tickets, String> {
        let k = rotor_protocol::TicketKey::random().map_err(|e| {
            format!("no key for TLS session tickets (the random source failed: {e})")
        })?;
        let t = Tickets {
            keys: RwLock::new(Vec::new()),
            fresh: std::sync::Mutex::new(std::time::Instant::now()),
        };
        t.share(&[k]);
        Ok(t)
    }

    /// Keys not known good for [`rotor_protocol::TICKET_KEY_SECS`] turn:
    /// a new one of this worker's own seals, the one that sealed still
    /// opens. Whether they turned.
    fn turn_if_stale(&self) -> bool {
        let fresh = *self.fresh.lock().unwrap_or_else(|e| e.into_inner());
        if fresh.elapsed().as_secs() < rotor_protocol::TICKET_KEY_SECS {
            return false;
        }
        let Some(new) = rotor_protocol::TicketKey::random()
            .ok()
            .as_ref()
            .and_then(sealing)
        else {
            return false;
        };
        let mut held = self.keys.write().unwrap_or_else(|e| e.into_inner());
        held.truncate(1);
        held.insert(0, new);
        *self.fresh.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
        true
    }

    /// Seals with `keys` from now on (the first seals; all open); whether
    /// they are new.
    fn share(&self, keys: &[rotor_protocol::TicketKey]) -> bool {
        *self.fresh.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
        let mut held = self.keys.write().unwrap_or_else(|e| e.into_inner());
        let names: Vec<[u8; 16]> = keys.iter().map(|k| k.name).collect();
        if held.iter().map(|(n, _)| *n).eq(names.iter().copied()) {
            return false;
        }
        *held = keys.iter().filter_map(sealing).collect();
        true
    }
}

/// `k` as it seals and opens: its name, and its AES-256-GCM key.
fn sealing(k: &rotor_protocol::TicketKey) -> Option<([u8; 16], ring::aead::LessSafeKey)> {
    let key = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &k.key).ok()?;
    Some((k.name, ring::aead::LessSafeKey::new(key)))
}

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // (No key is written out.)
        f.debug_struct("Tickets").finish_non_exhaustive()
    }
}

impl tokio_rustls::rustls::server::ProducesTickets for Tickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        rotor_protocol::TICKET_KEY_SECS as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        use ring::aead::{Aad, Nonce, NONCE_LEN};
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let (name, key) = keys.first()?;
        // A random nonce (a counter would tell how many were sealed).
        let mut nonce = [0u8; NONCE_LEN];
        rotor_protocol::random_bytes(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(16 + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(name);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name),
                &mut out[16 + NONCE_LEN..],
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        use ring::aead::{Aad, Nonce, NONCE_LEN};
        if ticket.len() > TICKET_MAX || ticket.len() < 16 + NONCE_LEN {
            return None;
        }
        let (name, rest) = ticket.split_at(16);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let (name, key) = keys.iter().find(|(n, _)| n[..] == *name)?;
        let mut out = sealed.to_vec();
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let len = key
            .open_in_place(nonce, Aad::from(*name), &mut out)
            .ok()?
            .len();
        out.truncate(len);
        Some(out)
    }
}

/// How long until a certificate valid over `dates` is looked at again
/// (see `Tls::watch_validity`).
fn next_look(dates: Option<(i64, i64)>, now: i64) -> std::time::Duration {
    const DAY: i64 = 86_400;
    let wait = match dates {
        None => DAY,
        Some((_, to)) if to - now < 2 * DAY => 3600,
        Some(_) => DAY,
    };
    // Its end, as it comes (a second past it).
    let wait = match dates.map(|(_, to)| to + 1 - now) {
        Some(end) if end > 0 => wait.min(end),
        _ => wait,
    };
    std::time::Duration::from_secs(wait as u64)
}

/// A certificate's validity (notBefore, notAfter) in Unix seconds, read
/// from its DER (RFC 5280 §4.1: the fifth field of the TBSCertificate,
/// after an optional version); `None` if it does not read so.
fn validity(der: &[u8]) -> Option<(i64, i64)> {
    let (0x30, cert, _) = tlv(der)? else {
        return None;
    };
    let (0x30, mut tbs, _) = tlv(cert)? else {
        return None;
    };
    if let (0xa0, _, rest) = tlv(tbs)? {
        tbs = rest;
    }
    // The serial number, the signature algorithm, the issuer.
    for _ in 0..3 {
        tbs = tlv(tbs)?.2;
    }
    let (0x30, dates, _) = tlv(tbs)? else {
        return None;
    };
    let (tag, from, rest) = tlv(dates)?;
    let not_before = der_time(tag, from)?;
    let (tag, to, _) = tlv(rest)?;
    Some((not_before, der_time(tag, to)?))
}

/// A DER element at the start of `b`: its tag, its contents, what follows.
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = usize::from(*b.get(1)?);
    let (len, at) = match first {
        0..=0x7f => (first, 2),
        0x81..=0x84 => {
            let n = first & 0x7f;
            let len = b
                .get(2..2 + n)?
                .iter()
                .fold(0usize, |l, &x| (l << 8) | usize::from(x));
            (len, 2 + n)
        }
        _ => return None,
    };
    let end = at.checked_add(len)?;
    Some((tag, b.get(at..end)?, b.get(end..)?))
}

/// A UTCTime (`YYMMDDHHMMSSZ`, years 1950–2049) or GeneralizedTime
/// (`YYYYMMDDHHMMSSZ`) in Unix seconds.
fn der_time(tag: u8, v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?.strip_suffix('Z')?;
    if !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let (year, rest) = match (tag, s.len()) {
        (0x17, 12) => {
            let yy: i64 = s[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &s[2..])
        }
        (0x18, 14) => (s[..4].parse().ok()?, &s[4..]),
        _ => return None,
    };
    let n = |i: usize| rest[i..i + 2].parse::<i64>().ok();
    let (month, day, hour, minute, second) = (n(0)?, n(2)?, n(4)?, n(6)?, n(8)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar
/// (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Tls {
    pub fn new(files: TlsFiles) -> Result<Arc<Tls>, String> {
        let tickets = Arc::new(Tickets::own()?);
        let (config, dates) = load(&files, false, &tickets)?;
        Ok(Arc::new(Tls {
            files,
            config: RwLock::new(config),
            dates: std::sync::Mutex::new(dates),
            swapped: tokio::sync::Notify::new(),
            tickets,
        }))
    }

    /// Keeps the session tickets' keys those the allocator gives every
    /// worker (`LeaseClient::ticket_keys`): asked when connected, then
    /// every minute (a new allocator makes new keys) or at their change if
    /// sooner. Until it gives them (or where it does not: an older
    /// allocator, a worker let in only to lease), tickets are sealed with
    /// a key of this worker's own, which resumes sessions on it alone.
    pub async fn share_tickets(
        self: Arc<Self>,
        leases: Arc<crate::lease::LeaseClient>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        const EVERY: std::time::Duration = std::time::Duration::from_secs(60);
        let mut said = false;
        loop {
            let waited = std::time::Instant::now();
            let up = tokio::select! {
                _ = stop.cancelled() => return,
                up = leases.connected(EVERY) => up,
            };
            let asked = match up {
                true => leases.ticket_keys().await,
                false => Err("no allocator connected".into()),
            };
            let wait = match asked {
                Ok((keys, change)) => {
                    if self.tickets.share(&keys) {
                        tracing::debug!("TLS session tickets sealed with the host's keys");
                    }
                    // (A second past the change: the keys have turned.)
                    EVERY.min(change + std::time::Duration::from_secs(1))
                }
                Err(e) => {
                    if !std::mem::replace(&mut said, true) {
                        info!(reason = %e, "TLS session tickets sealed with this worker's own key: a client resumes its session only on this worker (asked again every minute)");
                    }
                    // Keys no one turns (its own, or the host's while the
                    // allocator is away) turn here, as the allocator's do:
                    // a ticket opens for 6 to 12 hours, not for as long as
                    // the worker runs.
                    if self.tickets.turn_if_stale() {
                        tracing::debug!(
                            "TLS session tickets sealed with a new key of this worker's own"
                        );
                    }
                    // (Not connected: the wait for it was the minute.)
                    match up {
                        true => EVERY,
                        false => EVERY.saturating_sub(waited.elapsed()),
                    }
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Says that the certificate in use expires, as its end nears and
    /// once it came (else a renewal that failed is found when clients
    /// fail, and the worker looks idle): looked at once a day, every hour
    /// in its last two days and after, at its end, and after each reload.
    pub async fn watch_validity(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        loop {
            let dates = *self.dates.lock().unwrap_or_else(|e| e.into_inner());
            let wait = next_look(dates, unix_now());
            tokio::select! {
                _ = stop.cancelled() => return,
                // (A reload says the new one's dates itself.)
                _ = self.swapped.notified() => continue,
                _ = tokio::time::sleep(wait) => {}
            }
            let now = unix_now();
            match dates.map(|d| (d, validity_warning(d, now))) {
                Some(((_, to), Some(why))) if now > to => {
                    tracing::error!(cert = %self.files.cert.display(), "TLS certificate {why}")
                }
                Some((_, Some(why))) => {
                    warn!(cert = %self.files.cert.display(), "TLS certificate {why}")
                }
                _ => {}
            }
        }
    }

    /// An acceptor with the pair in use.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.config
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }

    /// Reads the files again; a pair that does not load keeps the old one
    /// (and says why).
    pub fn reload(&self) -> Result<(), String> {
        self.swap(false)?;
        info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
        Ok(())
    }

    /// The certificate's file.
    pub fn cert_file(&self) -> &std::path::Path {
        &self.files.cert
    }

    /// Reads the files once more when the worker's SIGHUP handler is in
    /// place: a SIGHUP between the first read and then was ignored (it
    /// must not kill the worker), and a pair it was to bring in would wait
    /// for the next one. Said at debug only, its dates not again: nothing
    /// was asked, and the start said them.
    pub fn reload_at_start(&self) {
        if self.swap(true).is_ok() {
            tracing::debug!(cert = %self.files.cert.display(), "TLS certificate read again at start");
        }
    }

    /// Loads the pair and puts it in use; else why it did not load.
    fn swap(&self, quiet: bool) -> Result<(), String> {
        match load(&self.files, quiet, &self.tickets) {
            Ok((c, dates)) => {
                *self.config.write().unwrap_or_else(|e| e.into_inner()) = c;
                *self.dates.lock().unwrap_or_else(|e| e.into_inner()) = dates;
                self.swapped.notify_waiters();
                Ok(())
            }
            Err(e) => {
                warn!(error = %e, "cannot reload the TLS certificate; serving the previous one");
                // (`rotor reload` says the one in use was kept.)
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As the worker loads a pair, with tickets of a key of its own.
    fn load(files: &TlsFiles, quiet: bool) -> Result<Loaded, String> {
        super::load(files, quiet, &Arc::new(Tickets::own().unwrap()))
    }

    #[test]
    fn dates_of_der_times() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(der_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(der_time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(der_time(0x18, b"20261205024500Z"), Some(1_796_438_700));
        assert_eq!(der_time(0x18, b"20261305024500Z"), None);
        assert_eq!(der_time(0x18, b"99991231235960Z"), Some(253_402_300_800));
        assert_eq!(der_time(0x18, b"99991231995959Z"), None);
        assert_eq!(der_time(0x17, b"2612050245Z"), None);
        assert_eq!(der_time(0x04, b"700101000000Z"), None);
    }

    #[test]
    fn warnings_of_validity() {
        let day = 86_400;
        let v = (1_000 * day, 1_100 * day);
        assert!(validity_warning(v, 1_101 * day)
            .unwrap()
            .starts_with("expired at"));
        assert!(validity_warning(v, 999 * day)
            .unwrap()
            .starts_with("is not valid before"));
        let soon = validity_warning(v, 1_090 * day).unwrap();
        assert!(soon.contains("in 10 days"), "{soon}");
        // Under two days, in hours (it said "in 1 days" for 47 h).
        let hours = validity_warning(v, 1_100 * day - 47 * 3600 - 59).unwrap();
        assert!(hours.contains("in 47 h"), "{hours}");
        // Under an hour, in minutes (it said "in 0 h").
        let minutes = validity_warning(v, 1_100 * day - 15 * 60 - 59).unwrap();
        assert!(minutes.contains("in 15 min"), "{minutes}");
        assert_eq!(validity_warning(v, 1_050 * day), None);
        // Dates past what is written are written as the last one.
        let far = validity_warning((253_402_300_800, 253_402_400_000), 0).unwrap();
        assert!(far.contains("9999-12-31T23:59:59Z"), "{far}");
    }

    /// A ticket one worker sealed with the host's keys opens at another
    /// given them, and after the keys turned (the one it was sealed with
    /// still opens); not at a worker with a key of its own, nor altered.
    #[test]
    fn tickets_sealed_with_the_hosts_keys_open_at_every_worker() {
        use tokio_rustls::rustls::server::ProducesTickets;
        let key = |b: u8| rotor_protocol::TicketKey {
            name: [b; 16],
            key: [b; 32],
        };
        let (a, b) = (Tickets::own().unwrap(), Tickets::own().unwrap());
        let own = a.encrypt(b"session").unwrap();
        assert_eq!(a.decrypt(&own).unwrap(), b"session");
        assert_eq!(b.decrypt(&own), None, "another worker's own key");
        assert!(a.share(&[key(1), key(2)]));
        assert!(!a.share(&[key(1), key(2)]), "the same keys again");
        assert!(b.share(&[key(1), key(2)]));
        let sealed = a.encrypt(b"session").unwrap();
        assert_eq!(b.decrypt(&sealed).unwrap(), b"session");
        assert_eq!(a.decrypt(&own), None, "its own key is gone");
        // Turned: 2 seals, 1 still opens.
        b.share(&[key(2), key(3), key(1)]);
        assert_eq!(b.decrypt(&sealed).unwrap(), b"session");
        let newer = b.encrypt(b"later").unwrap();
        assert_eq!(
            a.decrypt(&newer).unwrap(),
            b"later",
            "sealed with the next key"
        );
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert_eq!(b.decrypt(&altered), None);
        assert_eq!(b.decrypt(&sealed[..20]), None);
        assert_eq!(b.decrypt(&vec![1; TICKET_MAX + 1]), None);
        // Keys no one turned for the period turn here: a new key of its
        // own seals, the one that sealed still opens, the others go.
        assert!(!b.turn_if_stale(), "fresh");
        let old = std::time::Instant::now()
            .checked_sub(std::time::Duration::from_secs(
                rotor_protocol::TICKET_KEY_SECS + 1,
            ))
            .unwrap();
        *b.fresh.lock().unwrap() = old;
        assert!(b.turn_if_stale());
        assert_eq!(b.decrypt(&newer).unwrap(), b"later", "the key that sealed");
        assert_eq!(b.decrypt(&sealed), None, "an older key is gone");
        let turned = b.encrypt(b"x").unwrap();
        assert_eq!(a.decrypt(&turned), None, "sealed with its own new key");
        assert_eq!(b.decrypt(&turned).unwrap(), b"x");
    }

    #[test]
    fn validity_is_looked_at_daily_hourly_at_the_end_and_its_end() {
        let day = 86_400;
        let at = |to: i64, now: i64| next_look(Some((0, to)), now).as_secs();
        assert_eq!(next_look(None, 5).as_secs(), 86_400);
        assert_eq!(at(30 * day, 0), 86_400);
        assert_eq!(at(30 * day, 28 * day + 1), 3600);
        // Its end, a second past it.
        assert_eq!(at(30 * day, 30 * day - 600), 601);
        assert_eq!(at(30 * day, 30 * day - 86_400 - 10), 3600);
        // Past it: every hour.
        assert_eq!(at(30 * day, 30 * day + 1), 3600);
    }

    /// The dates of a certificate the openssl command made (as operators
    /// make theirs), read from its DER.
    #[test]
    fn the_validity_of_an_openssl_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let made = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "3"])
            .args(["-subj", "/CN=rotor test", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output();
        if !made.is_ok_and(|m| m.status.success()) {
            eprintln!("SKIPPED: no openssl command");
            return;
        }
        let der = CertificateDer::pem_file_iter(&cert)
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let (from, to) = validity(&der).unwrap();
        assert!((now - from).abs() < 120, "{from} {now}");
        assert!((to - from - 3 * 86_400).abs() < 2, "{from} {to}");
        let soon = validity_warning((from, to), now).unwrap();
        assert!(soon.starts_with("expires at"), "{soon}");
        // A key file with no key in it (the certificate given twice; an
        // encrypted key reads the same) says what it wants: it said "no
        // items found".
        let twice = TlsFiles {
            cert: cert.clone(),
            key: cert.clone(),
        };
        let e = load(&twice, true).err().unwrap();
        assert!(
            e.contains("no private key in it") && e.contains("openssl pkey"),
            "{e}"
        );
        // A key encrypted in OpenSSL's older format (`Proc-Type:
        // 4,ENCRYPTED`), as `openssl ec -aes256` writes it: it said
        // "base64 decode error".
        let encrypted = dir.path().join("enc.pem");
        let made = std::process::Command::new("openssl")
            .args(["ec", "-aes256", "-passout", "pass:secret", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&encrypted)
            .output()
            .unwrap();
        assert!(made.status.success(), "{made:?}");
        let e = load(
            &TlsFiles {
                cert: cert.clone(),
                key: encrypted,
            },
            true,
        )
        .err()
        .unwrap();
        assert!(
            e.contains("is encrypted") && e.contains("openssl pkey"),
            "{e}"
        );
        assert!(load(
            &TlsFiles {
                cert: cert.clone(),
                key: key.clone()
            },
            true
        )
        .is_ok());
        // A key of a kind ring cannot sign with (P-521), and a pair whose
        // key is another certificate's, say which.
        let refused = |curve: &str| {
            let key = dir.path().join(format!("{curve}.pem"));
            let made = std::process::Command::new("openssl")
                .args(["genpkey", "-algorithm", "EC", "-pkeyopt"])
                .arg(format!("ec_paramgen_curve:{curve}"))
                .arg("-out")
                .arg(&key)
                .output()
                .unwrap();
            assert!(made.status.success(), "{made:?}");
            let cert = cert.clone();
            load(&TlsFiles { cert, key }, true).err().unwrap()
        };
        let e = refused("secp521r1");
        assert!(e.contains("cannot sign here") && e.contains("P-256"), "{e}");
        let e = refused("prime256v1");
        assert!(e.contains("do not make a pair: the key is not"), "{e}");
    }
}
