//! `rotor up`'s own settings (the `[up]` section).

use super::settings::settings;

settings! {
    /// `rotor up`'s own settings.
    pub struct UpFlags, file UpFile, resolved Up {
        /// Worker processes sharing the listening sockets (1 to 1024).
        workers: Option<u16> = "2",
    }
}

impl Up {
    pub fn check(&self) -> Result<(), super::ConfigError> {
        match self.workers {
            1..=1024 => Ok(()),
            n => Err(super::ConfigError::Invalid(format!(
                "workers must be from 1 to 1024, not {n}"
            ))),
        }
    }
}
