//! rotor's worker: an HTTP/1.1 forward proxy (absolute-form requests and
//! CONNECT tunnels) that sends every request from the next source address
//! the allocator leases it.
#![deny(unsafe_code)]

pub mod accept;
pub mod access;
pub mod acl;
pub mod auth;
pub mod connect;
pub mod dns;
pub mod error;
pub mod fast;
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
pub mod tls;
pub mod upstream;

pub use lease::LeaseClient;
pub use server::{run, Config, Listeners, Stopped};
