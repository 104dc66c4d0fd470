//! Filter calls and their verdicts cross between a worker and the runner's thread in
//! batches, so each side wakes the other once per batch rather than once per request.
//!
//! A wake-up is a system call, and the woken thread tends to preempt the one that woke
//! it: with a worker and the runner's thread on one core, waking per call made them take
//! turns request by request (more than one context switch per filtered request). So a
//! worker wakes the runner from its mailbox task, which runs after the tasks that were
//! ready with it and may have queued calls too; and the runner posts verdicts to the
//! worker's mailbox, then wakes it once it has answered its whole batch.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, Notify};

use super::FilterRunner;

type Delivery = Box<dyn FnOnce() + Send>;

/// A worker's inbox of verdicts, handed to their awaiting tasks on the worker itself.
pub struct Mailbox {
    deliveries: Mutex<Vec<Delivery>>,
    notify: Notify,
}

thread_local! {
    static MAILBOX: RefCell<Option<Arc<Mailbox>>> = const { RefCell::new(None) };
    /// The runner this worker queued calls for since its mailbox task last ran.
    static RUNNER_TO_WAKE: RefCell<Option<Arc<dyn FilterRunner>>> = const { RefCell::new(None) };
}

impl Mailbox {
    /// Gives the calling worker thread a mailbox and spawns the task that serves it; to
    /// be called inside the worker's own (current-thread) runtime.
    pub fn install() {
        let mailbox = Arc::new(Mailbox { deliveries: Mutex::new(Vec::new()), notify: Notify::new() });
        MAILBOX.with(|m| *m.borrow_mut() = Some(mailbox.clone()));
        tokio::spawn(mailbox.serve());
    }

    async fn serve(self: Arc<Self>) {
        let mut batch = Vec::new();
        loop {
            self.notify.notified().await;
            if let Some(runner) = RUNNER_TO_WAKE.with(|r| r.borrow_mut().take()) {
                runner.wake();
            }
            std::mem::swap(&mut batch, &mut *self.deliveries.lock().unwrap());
            for deliver in batch.drain(..) {
                deliver();
            }
        }
    }

    /// Has the worker deliver what was posted to it. A runner calls it once it has
    /// answered its batch, for each mailbox a `Reply::send` returned.
    pub fn wake(&self) {
        self.notify.notify_one();
    }
}

/// Wakes the runner for the calls just queued: on a worker, once the tasks ready now
/// have run (they may queue more); elsewhere at once.
pub(super) fn wake_runner(runner: &Arc<dyn FilterRunner>) {
    let deferred = MAILBOX.with(|mailbox| {
        let Some(mailbox) = &*mailbox.borrow() else { return false };
        RUNNER_TO_WAKE.with(|pending| {
            let mut pending = pending.borrow_mut();
            match &*pending {
                None => {
                    *pending = Some(runner.clone());
                    mailbox.notify.notify_one();
                    true
                }
                Some(queued) => Arc::ptr_eq(queued, runner),
            }
        })
    });
    if !deferred {
        runner.wake();
    }
}

/// Where a call's verdict goes: to the task awaiting it, through its worker's mailbox
/// when it has one.
pub struct Reply<T> {
    tx: oneshot::Sender<T>,
    mailbox: Option<Arc<Mailbox>>,
}

impl<T: Send + 'static> Reply<T> {
    pub(super) fn new() -> (Self, oneshot::Receiver<T>) {
        let (tx, rx) = oneshot::channel();
        let mailbox = MAILBOX.with(|m| m.borrow().clone());
        (Self { tx, mailbox }, rx)
    }

    /// Whether the worker stopped waiting: the call's time budget ran out.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Sends the verdict. Through a mailbox it waits there until the mailbox is woken:
    /// the mailbox is returned when this is the first verdict since its worker last
    /// emptied it, and the caller must `wake` it once it has posted the rest of its batch.
    #[must_use = "a returned mailbox must be woken"]
    pub fn send(self, verdict: T) -> Option<Arc<Mailbox>> {
        let tx = self.tx;
        let Some(mailbox) = self.mailbox else {
            let _ = tx.send(verdict);
            return None;
        };
        let first = {
            let mut deliveries = mailbox.deliveries.lock().unwrap();
            deliveries.push(Box::new(move || {
                let _ = tx.send(verdict);
            }));
            deliveries.len() == 1
        };
        first.then_some(mailbox)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::filter::Call;

    #[derive(Default)]
    struct CountingRunner {
        wakes: AtomicUsize,
    }

    impl FilterRunner for CountingRunner {
        fn submit(&self, _call: Call) -> Result<(), Box<Call>> {
            Ok(())
        }

        fn wake(&self) {
            self.wakes.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn worker_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn verdicts_wait_in_the_mailbox_until_it_is_woken() {
        worker_runtime().block_on(async {
            Mailbox::install();
            let (first, first_rx) = Reply::<u32>::new();
            let (second, second_rx) = Reply::<u32>::new();
            let poster = std::thread::spawn(move || {
                let mailbox = first.send(1).expect("the first verdict asks for a wake");
                assert!(second.send(2).is_none(), "one wake per batch");
                mailbox
            });
            let mailbox = poster.join().unwrap();
            tokio::task::yield_now().await;
            let mut first_rx = first_rx;
            assert!(first_rx.try_recv().is_err(), "not delivered before the wake");
            mailbox.wake();
            assert_eq!(first_rx.await.unwrap(), 1);
            assert_eq!(second_rx.await.unwrap(), 2);
            let (third, third_rx) = Reply::<u32>::new();
            third.send(3).expect("an emptied mailbox asks for a wake again").wake();
            assert_eq!(third_rx.await.unwrap(), 3);
        });
    }

    #[test]
    fn off_a_worker_verdicts_and_wakes_go_at_once() {
        let (reply, mut rx) = Reply::<u32>::new();
        assert!(reply.send(7).is_none());
        assert_eq!(rx.try_recv().unwrap(), 7);
        let counting = Arc::new(CountingRunner::default());
        let runner: Arc<dyn FilterRunner> = counting.clone();
        wake_runner(&runner);
        assert_eq!(counting.wakes.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_worker_wakes_the_runner_once_after_its_ready_tasks() {
        worker_runtime().block_on(async {
            Mailbox::install();
            let counting = Arc::new(CountingRunner::default());
            let runner: Arc<dyn FilterRunner> = counting.clone();
            for _ in 0..3 {
                wake_runner(&runner);
            }
            assert_eq!(counting.wakes.load(Ordering::SeqCst), 0, "deferred to the mailbox task");
            tokio::task::yield_now().await;
            assert_eq!(counting.wakes.load(Ordering::SeqCst), 1);
            wake_runner(&runner);
            tokio::task::yield_now().await;
            assert_eq!(counting.wakes.load(Ordering::SeqCst), 2);
        });
    }
}
