//! rotor's worker: an HTTP/1.1 forward proxy (absolute-form requests and
//! CONNECT tunnels) that sends every request from the next source address
//! the allocator leases it.
#![deny(unsafe_code)]

pub mod accept;
pub mod access;
pub mod acl;
pub mod auth;
pub mod clients;
pub mod connect;
pub mod dns;
pub mod error;
pub mod fast;
pub mod fields;
pub mod h1;
pub mod idle;
pub mod lease;
pub mod listener;
pub mod meter;
mod os;
pub mod proxy;
pub mod pushback;
pub mod relay;
pub mod server;
pub mod session;
pub mod socks;
mod text;
pub mod tls;
pub mod upstream;

pub use lease::LeaseClient;

/// A future on the heap: for a rare path's large future, which inline
/// would be room in the state of every caller (moved at each await).
pub(crate) type Boxed<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
pub use server::{run, Config, Listeners, Stopped};

/// When something last happened (a refusal, a warning), shared by the
/// process's connections.
pub(crate) struct Moment(std::sync::Mutex<Option<std::time::Instant>>);

impl Moment {
    pub(crate) const fn new() -> Moment {
        Moment(std::sync::Mutex::new(None))
    }

    fn last(&self) -> std::sync::MutexGuard<'_, Option<std::time::Instant>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether it happened within `d`.
    pub(crate) fn within(&self, d: std::time::Duration) -> bool {
        self.last().is_some_and(|t| t.elapsed() < d)
    }

    /// It happens now.
    pub(crate) fn mark(&self) {
        *self.last() = Some(std::time::Instant::now());
    }

    /// It happens now: whether it is the first time within `d` (a warning
    /// said once a period).
    pub(crate) fn first_in(&self, d: std::time::Duration) -> bool {
        let mut last = self.last();
        if last.is_some_and(|t| t.elapsed() < d) {
            return false;
        }
        *last = Some(std::time::Instant::now());
        true
    }
}
