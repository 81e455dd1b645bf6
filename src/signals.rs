//! Signals, handled in one place: SIGTERM drains, SIGINT stops fast (a
//! second SIGTERM too), SIGHUP reloads.

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
        let s = Signals {
            shutdown: CancellationToken::new(),
            fast: CancellationToken::new(),
            reload: Arc::new(watch::channel(0).0),
        };
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let me = s.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => {
                        if me.shutdown.is_cancelled() {
                            info!("second SIGTERM: stopping now");
                            me.fast.cancel();
                        } else {
                            info!("SIGTERM: draining");
                            me.shutdown.cancel();
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
                }
            }
        });
        Ok(s)
    }
}
