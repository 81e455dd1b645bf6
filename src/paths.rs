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

/// The rotation state directory: systemd's `$STATE_DIRECTORY` (from
/// `StateDirectory=`), else `/var/lib/rotor` for root, else
/// `$XDG_STATE_HOME/rotor` (or `~/.local/state/rotor`).
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd separates several directories with ':'; rotor asks for one.
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_string();
        return PathBuf::from(first);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/rotor");
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("rotor");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/state/rotor"),
        None => PathBuf::from(format!("/tmp/rotor-{}/state", nix::unistd::geteuid())),
    }
}
