//! Spawning the futures that carry a whole proxied exchange.

use std::future::Future;

/// Spawns `future` on the current runtime, boxed. tokio moves a future into its task
/// when spawning it, and the task's stage again when it completes; a connection's or an
/// HTTP/2 stream's future holds a whole proxied exchange (kilobytes), so boxing makes
/// those moves a pointer's.
pub(crate) fn spawn_boxed<F>(future: F)
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(Box::pin(future));
}

/// hyper's executor for HTTP/2 (a task per server stream, the client connections' tasks),
/// spawning them boxed.
#[derive(Clone, Copy, Debug, Default)]
pub struct BoxingExecutor;

impl<F> hyper::rt::Executor<F> for BoxingExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        spawn_boxed(future);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;

    #[tokio::test]
    async fn the_boxing_executor_runs_what_hyper_gives_it() {
        let (done, finished) = tokio::sync::oneshot::channel();
        BoxingExecutor.execute(async move {
            tokio::task::yield_now().await;
            done.send(42).unwrap();
        });
        assert_eq!(finished.await.unwrap(), 42);
    }
}
