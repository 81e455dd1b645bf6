//! `rotor up`'s own settings (the `[up]` section).

use super::settings::settings;

settings! {
    /// `rotor up`'s own settings.
    pub struct UpFlags, file UpFile, resolved Up {
        /// Worker processes sharing the listening sockets (1 to 1024); each
        /// runs on one thread unless --threads says otherwise [default: one
        /// per CPU].
        workers: Option<u16>,
    }
}

impl Up {
    /// Worker processes: as given, or one per CPU.
    pub fn workers(&self) -> u16 {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, |n| n.get().min(1024) as u16)
        })
    }

    pub fn check(&self) -> Result<(), super::ConfigError> {
        match self.workers() {
            1..=1024 => Ok(()),
            n => Err(super::ConfigError::Invalid(format!(
                "workers must be from 1 to 1024, not {n}"
            ))),
        }
    }
}
