//! Connections per client address (`--max-client-connections`): one
//! address holding every place under the connection limit (idle or
//! trickling connections, before any login) shuts everyone else out. An
//! IPv6 client's /64 counts as one address (a host has a /64 to itself).
//!
//! One entry per address with a connection open, gone with its last one:
//! bounded by `--max-connections`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

pub struct Clients {
    /// 0: no limit (nothing is counted).
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// An address at its limit.
#[derive(Debug)]
pub struct AtLimit;

/// A client connection's place under its address's limit, given back on
/// drop.
pub struct ClientSlot {
    clients: Arc<Clients>,
    key: IpAddr,
}

impl Clients {
    pub fn new(max: usize) -> Arc<Clients> {
        Arc::new(Clients {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A place for a connection from `ip`: `Ok(None)` with no limit,
    /// `Err(AtLimit)` when its address is at the limit.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Option<ClientSlot>, AtLimit> {
        if self.max == 0 {
            return Ok(None);
        }
        let key = rotor_protocol::addr::client_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_default();
        if *n >= self.max {
            return Err(AtLimit);
        }
        *n += 1;
        Ok(Some(ClientSlot {
            clients: self.clone(),
            key,
        }))
    }

    /// The limit (0: none).
    pub fn max(&self) -> usize {
        self.max
    }

    /// Addresses with a connection open.
    pub fn len(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.clients.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_up_to_the_limit_and_back_on_drop() {
        let c = Clients::new(2);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a1 = c.admit(ip("192.0.2.1")).unwrap();
        let a2 = c.admit(ip("192.0.2.1")).unwrap();
        assert!(c.admit(ip("192.0.2.1")).is_err(), "the third");
        assert!(
            c.admit(ip("192.0.2.2")).unwrap().is_some(),
            "another address"
        );
        // One /64: two addresses of it are one client.
        let _b = c.admit(ip("2001:db8::1")).unwrap();
        let _b2 = c.admit(ip("2001:db8::ffff")).unwrap();
        assert!(c.admit(ip("2001:db8::2")).is_err());
        assert!(c.admit(ip("2001:db8:0:1::1")).is_ok());
        drop(a1);
        assert!(c.admit(ip("::ffff:192.0.2.1")).unwrap().is_some());
        drop(a2);
        // No limit: nothing counted.
        let none = Clients::new(0);
        assert!(none.admit(ip("192.0.2.1")).unwrap().is_none());
        assert!(none.is_empty());
    }

    #[test]
    fn an_address_with_nothing_open_is_forgotten() {
        let c = Clients::new(1);
        let slot = c.admit("192.0.2.1".parse().unwrap()).unwrap();
        assert_eq!(c.len(), 1);
        drop(slot);
        assert!(c.is_empty());
    }
}
