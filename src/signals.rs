//! Signals, handled in one place: SIGTERM drains, SIGINT stops fast (a
//! second SIGTERM too), SIGHUP reloads; SIGUSR2 is the allocator's
//! parent-death signal under `rotor up` (its supervisor is gone).

use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Clone)]
pub struct Signals {
    /// SIGTERM or SIGINT: stop accepting work and drain.
    pub shutdown: CancellationToken,
    /// SIGINT, or a second SIGTERM: stop now.
    pub fast: CancellationToken,
    /// SIGHUP, counted: every subscriber sees every reload.
    pub reload: Arc<watch::Sender<u64>>,
    /// SIGUSR2: the `rotor up` that started this process is gone (killed
    /// outright); its workers drain meanwhile.
    pub orphaned: CancellationToken,
}

impl Signals {
    /// A receiver whose `changed()` fires on each SIGHUP.
    pub fn reloads(&self) -> watch::Receiver<u64> {
        self.reload.subscribe()
    }

    /// A reload as if by SIGHUP (a worker told by its allocator).
    pub fn reload_now(&self) {
        self.reload.send_modify(|n| *n += 1);
    }
}

impl Signals {
    /// Installs the handlers; must run inside the runtime.
    pub fn install() -> std::io::Result<Signals> {
        /// A SIGTERM this soon after the first is the same stop.
        const SAME_STOP: std::time::Duration = std::time::Duration::from_secs(1);
        let s = Signals {
            shutdown: CancellationToken::new(),
            fast: CancellationToken::new(),
            reload: Arc::new(watch::channel(0).0),
            orphaned: CancellationToken::new(),
        };
        // The parent-death signal comes once the parent is gone, when this
        // process has been given to another (init or a subreaper): a
        // SIGUSR2 while the parent is still the one that started it is a
        // stray one (a `kill -USR2` meant for another program). Read before
        // the handler is in place: a parent gone before is seen as gone.
        let parent = nix::unistd::getppid();
        let mut term = signal(SignalKind::terminate())?;
        let mut usr2 = signal(SignalKind::user_defined2())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let me = s.clone();
        tokio::spawn(async move {
            let mut first_term: Option<std::time::Instant> = None;
            loop {
                tokio::select! {
                    _ = term.recv() => {
                        match first_term {
                            // systemd's SIGTERM to the whole control group
                            // and `rotor up`'s own reach a worker a moment
                            // apart: the same stop, not a second one.
                            Some(t) if t.elapsed() < SAME_STOP => {
                                info!("SIGTERM again within a second: the same stop (a signal to the whole group); still draining");
                            }
                            Some(_) => {
                                info!("second SIGTERM: stopping now");
                                me.fast.cancel();
                            }
                            None => {
                                info!("SIGTERM: draining");
                                first_term = Some(std::time::Instant::now());
                                me.shutdown.cancel();
                            }
                        }
                    }
                    _ = int.recv() => {
                        info!("SIGINT: stopping now");
                        me.fast.cancel();
                        me.shutdown.cancel();
                    }
                    _ = hup.recv() => {
                        info!("SIGHUP: reloading");
                        me.reload.send_modify(|n| *n += 1);
                    }
                    // (Acted on by the allocator alone, which says so.)
                    _ = usr2.recv() => {
                        if nix::unistd::getppid() != parent {
                            me.orphaned.cancel();
                        } else {
                            tracing::warn!(parent = parent.as_raw(), "SIGUSR2 while the process that started this one is still there: ignored (it is rotor up's sign that it is gone)");
                        }
                    }
                }
            }
        });
        Ok(s)
    }
}
