//! `rotor up`'s own settings (the `[up]` section).

use super::settings::settings;

settings! {
    /// `rotor up`'s own settings.
    pub struct UpFlags, file UpFile, resolved Up {
        /// Worker processes sharing the listening sockets (1 to 1024; past
        /// 504, raise --max-peers to N + 8); each runs on one thread unless
        /// --threads says otherwise [default: one per CPU, at most 256].
        workers: Option<u16>,
        /// Bind each worker to CPUs of its own among those rotor up may run
        /// on: worker k to the k-th and every workers-th after it (2
        /// workers on 4 CPUs: 0,2 and 1,3), or, with more workers than
        /// CPUs, to the k-th round robin. Measured on a 2-core host shared with the load: p99 a fifth
        /// to a third lower, requests/s the same or better. Off by default:
        /// where a quota rather than a CPU set limits rotor (a container),
        /// the CPUs it binds to may be busy with others' work.
        pin_workers: Option<bool>,
    }
}

impl Up {
    /// Worker processes: as given, or one per CPU.
    pub fn workers(&self) -> u16 {
        self.workers.unwrap_or_else(|| {
            // (At most 256: well within the allocator's default
            // --max-peers of 512, which needs 8 more than the workers.)
            std::thread::available_parallelism().map_or(1, |n| n.get().min(256) as u16)
        })
    }

    /// The CPUs of each of `workers` workers (the k-th set for worker k),
    /// out of `cpus` (those rotor up may run on, ascending), if
    /// --pin-workers: every workers-th CPU from the k-th, or the k-th round
    /// robin when there are more workers than CPUs.
    pub fn worker_cpus(&self, workers: usize, cpus: &[usize]) -> Option<Vec<Vec<usize>>> {
        if !self.pin_workers.unwrap_or(false) || cpus.is_empty() {
            return None;
        }
        Some(
            (0..workers)
                .map(|k| match workers <= cpus.len() {
                    true => cpus.iter().skip(k).step_by(workers).copied().collect(),
                    false => vec![cpus[k % cpus.len()]],
                })
                .collect(),
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_get_cpus_of_their_own() {
        let pinned = Up {
            workers: None,
            pin_workers: Some(true),
        };
        let cpus = [0, 1, 2, 3];
        assert_eq!(
            pinned.worker_cpus(4, &cpus).unwrap(),
            [vec![0], vec![1], vec![2], vec![3]]
        );
        assert_eq!(
            pinned.worker_cpus(2, &cpus).unwrap(),
            [vec![0, 2], vec![1, 3]]
        );
        assert_eq!(
            pinned.worker_cpus(3, &[2, 5]).unwrap(),
            [vec![2], vec![5], vec![2]]
        );
        let unpinned = Up {
            workers: None,
            pin_workers: None,
        };
        assert_eq!(unpinned.worker_cpus(2, &cpus), None);
    }
}
