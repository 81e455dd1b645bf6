//! Where `rotor status` and `rotor reload` find the allocator.

use std::path::PathBuf;

use clap::Args;

use super::{ConfigError, FileConfig};

#[derive(Debug, Clone, Args)]
pub struct ControlArgs {
    /// The allocator's Unix socket [default: as the allocator's].
    #[arg(
        long = "socket",
        alias = "allocator",
        env = "ROTOR_SOCKET",
        value_name = "PATH"
    )]
    pub socket: Option<PathBuf>,
    /// The configuration file, for its `socket`.
    #[arg(long, env = "ROTOR_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
}

impl ControlArgs {
    pub fn socket(&self) -> Result<PathBuf, ConfigError> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        let file = FileConfig::load(self.config.as_deref())?;
        Ok(file.socket.unwrap_or_else(crate::paths::default_socket))
    }
}
