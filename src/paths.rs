//! Default locations.

use std::path::PathBuf;

/// The allocator socket: `/run/rotor/allocator.sock` for root, else
/// `$XDG_RUNTIME_DIR/rotor/allocator.sock` (or `/tmp/rotor-UID/…` without
/// one).
pub fn default_socket() -> PathBuf {
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return PathBuf::from("/run/rotor/allocator.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("rotor/allocator.sock"),
        None => PathBuf::from(format!("/tmp/rotor-{uid}/allocator.sock")),
    }
}
