//! Where `rotor status` and `rotor reload` find the allocator.

use std::path::PathBuf;

use clap::Args;

use super::{ConfigError, FileConfig, SocketArgs};

#[derive(Debug, Clone, Args)]
pub struct ControlArgs {
    #[command(flatten)]
    pub at: SocketArgs,
}

impl ControlArgs {
    pub fn socket(&self) -> Result<PathBuf, ConfigError> {
        if let Some(s) = &self.at.socket {
            return Ok(s.clone());
        }
        let file = FileConfig::load(self.at.config.as_deref())?;
        Ok(file.socket.unwrap_or_else(crate::paths::default_socket))
    }
}
