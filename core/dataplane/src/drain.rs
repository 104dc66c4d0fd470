//! Graceful shutdown: tells open connections to finish, and counts them until they have.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

pub struct Drain {
    signal: watch::Sender<bool>,
    open: AtomicUsize,
    all_closed: Notify,
}

/// Held by every connection and tunnel task; dropping it marks the task done.
pub struct DrainGuard(Arc<Drain>);

impl Drop for DrainGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, SeqCst) == 1 {
            self.0.all_closed.notify_waiters();
        }
    }
}

impl Drain {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            signal: watch::channel(false).0,
            open: AtomicUsize::new(0),
            all_closed: Notify::new(),
        })
    }

    pub fn guard(self: &Arc<Self>) -> DrainGuard {
        self.open.fetch_add(1, SeqCst);
        DrainGuard(self.clone())
    }

    /// Resolves once draining has started.
    pub fn watcher(&self) -> watch::Receiver<bool> {
        self.signal.subscribe()
    }

    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }

    /// Signals every connection to finish, then waits for them up to `deadline`.
    /// Returns how many were still open when it gave up.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.signal.send_replace(true);
        let wait_all = async {
            loop {
                let closed = self.all_closed.notified();
                if self.open.load(SeqCst) == 0 {
                    return;
                }
                closed.await;
            }
        };
        let _ = tokio::time::timeout(deadline, wait_all).await;
        self.open.load(SeqCst)
    }
}
