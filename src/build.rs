//! Names the build: `ROTOR_VERSION` is the package's version, with the
//! commit it was built from when built in a git checkout
//! (`0.1.0+0c0d455a1`), so two builds of one version tell apart in
//! `--version` and `rotor status` (during a rolling upgrade, both said
//! `rotor 0.1.0`). Without git, or outside a checkout, the version alone.

use std::process::Command;

/// What `git ARGS` prints, trimmed, if it ran and printed something.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_string())
}

fn main() {
    println!("cargo:rerun-if-changed=src/build.rs");
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    // Built again when HEAD moves: its file, the branch it names, and the
    // packed refs (a branch's commit may be there).
    let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    // (Only those there: one missing, a branch kept in packed-refs, would
    // run this again, and build the binaries again, at every build.)
    for path in watched {
        let at = git(&["rev-parse", "--git-path", &path]);
        if let Some(p) = at.filter(|p| std::path::Path::new(p).exists()) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    let named = match git(&["rev-parse", "--short=9", "HEAD"]) {
        Some(commit) if commit.bytes().all(|b| b.is_ascii_hexdigit()) => {
            format!("{version}+{commit}")
        }
        _ => version,
    };
    println!("cargo:rustc-env=ROTOR_VERSION={named}");
}
