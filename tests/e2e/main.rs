//! End-to-end tests: real allocator and worker processes, a loopback pool
//! (127.0.0.2–127.0.0.9) and a loopback origin that records the source
//! address of every request. All traffic stays on 127.0.0.0/8.

// The load tests print their figures (run with --nocapture to see them).
#![allow(clippy::print_stdout)]

mod util;

mod acl;
mod auth;
mod bad_input;
mod bodies;
mod dns;
mod errors;
mod fastpath;
mod limits;
mod metrics;
mod multihost;
mod pools;
mod production;
mod refresh;
mod restart;
mod rotation;
mod sessions;
mod sites;
mod socks;
mod table;
mod tls;
mod tunnel;
mod up;
