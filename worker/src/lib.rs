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
pub mod proxied;
pub mod proxy;
pub mod pushback;
pub mod relay;
pub mod server;
pub mod session;
pub mod socks;
mod text;
pub mod tls;
pub mod upstream;
pub mod witness;

pub use lease::LeaseClient;

/// A future on the heap: for a rare path's large future, which inline
/// would be room in the state of every caller (moved at each await).
pub(crate) type Boxed<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
pub use server::{run, Config, Listeners, Stopped};

pub(crate) use rotor_protocol::Moment;
