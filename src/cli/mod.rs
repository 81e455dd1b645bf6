//! Command-line flags and the configuration file, resolved into one
//! validated set of settings per binary. A flag (or its environment
//! variable) wins over the file, the file over the built-in default.
//! `rotor up` takes the allocator's and the worker's flags and passes them
//! on to its children.
//!
//! Each setting is declared once, in a `settings!` block (see `settings`):
//! the allocator's in `allocator`, the worker's in `worker`, `rotor up`'s
//! in `up`; `control` is where `rotor status` and `rotor reload` find the
//! allocator.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::Args;
use rotor_allocator::spec::SpecError;
use serde::Deserialize;

pub mod allocator;
pub mod control;
pub mod settings;
pub mod up;
pub mod worker;

pub use allocator::{AllocatorArgs, AllocatorFlags, PoolSettings};
pub use control::ControlArgs;
pub use up::UpFlags;
pub use worker::{ResolverKind, WorkerArgs, WorkerFlags, WorkerSettingsTuning, DEFAULT_LISTEN};

/// The command line, with a negative value given apart from its flag
/// (`--refresh -1s`) joined to it (`--refresh=-1s`): clap reads a word
/// beginning with `-` as flags (and said "unexpected argument '-1'",
/// naming no flag), so the value's own error is said instead. (Taking
/// such words as values everywhere would take a flag left without its
/// value, `--refresh --pool …`, for the value.) Words after `--` are as
/// given.
pub fn args() -> Vec<OsString> {
    joined_negatives(std::env::args_os())
}

fn joined_negatives(argv: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out: Vec<OsString> = Vec::new();
    let mut rest = false;
    for word in argv {
        let text = word.to_str().unwrap_or("");
        let negative = text.starts_with('-') && text[1..].starts_with(|c: char| c.is_ascii_digit());
        match out.last_mut() {
            Some(flag) if !rest && negative => {
                let f = flag.to_str().unwrap_or("");
                if f.starts_with("--") && f.len() > 2 && !f.contains('=') {
                    flag.push("=");
                    flag.push(&word);
                    continue;
                }
            }
            _ => {}
        }
        rest |= text == "--";
        out.push(word);
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("invalid configuration file {0}")]
    Parse(PathBuf, #[source] toml::de::Error),
    #[error("invalid pool specification")]
    Spec(#[from] SpecError),
    #[error("{0}")]
    Invalid(String),
}

/// `rotor.toml`: the same keys as the flags, by program.
///
/// ```toml
/// socket = "/run/rotor/allocator.sock"
/// [allocator]
/// pool = ["203.0.113.0/28"]
/// refresh = "20s"
/// [worker]
/// listen = ["127.0.0.1:8080"]
/// lease-timeout = "2s"
/// [up]
/// workers = 4
/// ```
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub socket: Option<PathBuf>,
    #[serde(default)]
    pub allocator: allocator::AllocatorFile,
    #[serde(default)]
    pub worker: worker::WorkerFile,
    #[serde(default)]
    pub up: up::UpFile,
}

impl FileConfig {
    pub fn load(path: Option<&Path>) -> Result<FileConfig, ConfigError> {
        let Some(path) = path else {
            return Ok(FileConfig::default());
        };
        let text =
            rotor_protocol::read_text_file(path).map_err(|e| ConfigError::Read(path.into(), e))?;
        FileConfig::parse(path, &text)
    }

    /// The file `path` as read (`text`).
    pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(path.into(), e))
    }
}

/// Where the allocator is: its socket, or the configuration file that
/// names it.
#[derive(Debug, Clone, Args)]
pub struct SocketArgs {
    /// The allocator's Unix socket [default: /run/rotor/allocator.sock for
    /// root, else $XDG_RUNTIME_DIR/rotor/allocator.sock, without it
    /// /tmp/rotor-UID/allocator.sock].
    #[arg(
        long = "socket",
        alias = "allocator",
        env = "ROTOR_SOCKET",
        value_name = "PATH"
    )]
    pub socket: Option<PathBuf>,
    /// A TOML configuration file (keys as the flags, in [allocator],
    /// [worker] and [up] sections; `socket` at the top). Flags win.
    #[arg(long, env = "ROTOR_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
}

/// Flags every binary has.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    #[command(flatten)]
    pub at: SocketArgs,
    /// Validate the flags and the configuration file, say what is wrong or
    /// what would be used, and exit (0: valid).
    #[arg(long)]
    pub check: bool,
    /// As --check, but read no pool source: what the allocator's unit runs
    /// before a start. A source that cannot be read at that moment (a
    /// metadata service slow at boot, a pool command's API down) is the
    /// running allocator's to retry every --refresh, not a reason to
    /// refuse to start — and a refused start repeated is a unit systemd
    /// gives up on. A worker, which reads no source, takes it as --check;
    /// `rotor up` passes it to its allocator's check (sources not read).
    #[arg(long)]
    pub check_config: bool,
}

impl CommonArgs {
    pub fn socket(&self, file: &FileConfig) -> PathBuf {
        self.at
            .socket
            .clone()
            .or_else(|| file.socket.clone())
            .unwrap_or_else(crate::paths::default_socket)
    }

    /// What children of `rotor up` get: the same file and socket.
    /// The file is `config` (`rotor up`'s copy of it, see `up::Snapshot`).
    pub fn to_args(&self, socket: &Path, config: Option<&Path>) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["--socket".into(), socket.into()];
        if let Some(c) = config {
            a.extend(["--config".into(), c.into()]);
        }
        a
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    pub fn file(text: &str) -> Result<FileConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rotor.toml");
        std::fs::write(&path, text).unwrap();
        FileConfig::load(Some(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::file;
    use super::*;

    #[test]
    fn unknown_keys_are_refused() {
        let err = file("[worker]\nlease-timout = \"1s\"\n").unwrap_err();
        assert!(matches!(err, ConfigError::Parse(..)), "{err}");
        assert!(file("bogus = 1\n").is_err());
        assert!(file("[allocator]\nlisten = [\"127.0.0.1:1\"]\n").is_err());
    }

    #[test]
    fn a_bad_value_in_the_file_names_its_key_and_value() {
        let err = file("[worker]\ndrain-timeout = \"soon\"\n").unwrap_err();
        let text = rotor_protocol::error_chain(&err);
        assert!(text.contains("drain-timeout"), "{text}");
        assert!(text.contains("`soon` is not a duration"), "{text}");
        let err = file("[worker]\nmax-connections = \"many\"\n").unwrap_err();
        assert!(rotor_protocol::error_chain(&err).contains("max-connections"));
    }

    #[test]
    fn a_negative_value_given_apart_is_joined_to_its_flag() {
        let j = |args: &[&str]| -> Vec<String> {
            joined_negatives(args.iter().map(OsString::from))
                .into_iter()
                .map(|w| w.into_string().unwrap())
                .collect()
        };
        assert_eq!(j(&["a", "--refresh", "-1s"]), ["a", "--refresh=-1s"]);
        assert_eq!(
            j(&["a", "--max-peers", "-3", "-v"]),
            ["a", "--max-peers=-3", "-v"]
        );
        // A flag without its value, a value given joined, a short flag,
        // and anything after `--` are as given.
        for same in [
            &["a", "--refresh", "--pool", "x"][..],
            &["a", "--refresh=1s", "-1"],
            &["a", "-r", "-1"],
            &["a", "--", "--x", "-1"],
            &["a", "--pool", "-x"],
        ] {
            assert_eq!(j(same), same);
        }
        // The value's own error, naming the flag (clap said "unexpected
        // argument '-1'").
        #[derive(clap::Parser)]
        struct Alloc {
            #[command(flatten)]
            _args: AllocatorArgs,
        }
        let e = match <Alloc as clap::Parser>::try_parse_from(j(&["a", "--refresh", "-1s"])) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("taken"),
        };
        assert!(e.contains("--refresh") && e.contains("not negative"), "{e}");
    }
}
