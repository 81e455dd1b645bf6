//! The build a process names itself by in its Hello (`rotor-worker/
//! 0.1.0+0c0d455a1`), as each binary's main sets it (the binaries' build
//! script reads the commit; see src/build.rs).

use std::sync::OnceLock;

static BUILD: OnceLock<&'static str> = OnceLock::new();

/// Names this process's build (once; a main does, first).
pub fn name_build(version: &'static str) {
    let _ = BUILD.set(version);
}

/// `program/version` for a Hello: the build named, else the package's
/// version.
pub fn software(program: &str) -> String {
    let version = BUILD.get().copied().unwrap_or(env!("CARGO_PKG_VERSION"));
    format!("{program}/{version}")
}
