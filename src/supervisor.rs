//! One supervisor for paysync's long-running work: the engines, the HTTP server,
//! the background loops, and the helper threads they start (`spawn_blocking`).
//! Every task runs in one `JoinSet` under one cancellation token. When a task
//! ends that should have run until shutdown (returned, failed, panicked or was
//! aborted), or a helper thread panics, the supervisor reports it once, naming
//! the task and its error: liveness fails at once (so an orchestrator sees it
//! first), then the app drains what it can and the process exits non-zero.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// A task that ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// Its name (`engine <topic>`, `http server`, ...).
    pub task: String,
    /// Why: its error, its panic, or that it returned.
    pub reason: String,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "task `{}` ended: {}", self.task, self.reason)
    }
}

/// How long a task is expected to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Until shutdown: ending before is a failure.
    UntilShutdown,
    /// It may finish (a start-up check): only an error or a panic is a failure.
    MayFinish,
}

/// The supervisor: cheap to clone, shared by whoever starts tasks.
#[derive(Clone)]
pub struct Supervisor {
    tasks: Arc<Mutex<JoinSet<()>>>,
    cancel: CancellationToken,
    ended: mpsc::UnboundedSender<Ended>,
    /// The first failure, for liveness.
    failed: Arc<Mutex<Option<Ended>>>,
}

/// Where failures arrive (one receiver, held by the app).
pub struct Failures(mpsc::UnboundedReceiver<Ended>);

impl Failures {
    /// Waits for the first failure.
    pub async fn next(&mut self) -> Option<Ended> {
        self.0.recv().await
    }
}

/// Reports a task that is dropped before it completed (aborted).
struct Watch {
    task: String,
    lifetime: Lifetime,
    supervisor: Supervisor,
    done: bool,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !self.done && !self.supervisor.cancel.is_cancelled() {
            self.supervisor.report(Ended {
                task: self.task.clone(),
                reason: "aborted".into(),
            });
        }
        let _ = self.lifetime;
    }
}

impl Supervisor {
    /// A supervisor and the receiver of its failures.
    pub fn new() -> (Supervisor, Failures) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Supervisor {
                tasks: Arc::new(Mutex::new(JoinSet::new())),
                cancel: CancellationToken::new(),
                ended: tx,
                failed: Arc::new(Mutex::new(None)),
            },
            Failures(rx),
        )
    }

    /// The cancellation every task watches.
    pub fn token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// The first failure, if any (liveness fails from then on).
    pub fn failure(&self) -> Option<Ended> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn report(&self, ended: Ended) {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if failed.is_none() {
            tracing::error!(task = %ended.task, reason = %ended.reason, "a supervised task ended; paysync stops");
            *failed = Some(ended.clone());
        }
        drop(failed);
        let _ = self.ended.send(ended);
    }

    /// Runs `work` as a task named `task`.
    pub fn spawn<F>(&self, task: impl Into<String>, lifetime: Lifetime, work: F) -> AbortHandle
    where
        F: Future<Output = Result<(), String>> + Send + 'static,
    {
        let task = task.into();
        let supervisor = self.clone();
        // Made before the task runs, so that a task aborted before its first
        // poll is reported too.
        let watch = Watch {
            task: task.clone(),
            lifetime,
            supervisor: supervisor.clone(),
            done: false,
        };
        let wrapped = async move {
            // The whole guard moves in (a field use alone would only copy it).
            let mut watch = watch;
            let result = AssertUnwindSafe(work).catch_unwind().await;
            watch.done = true;
            let reason = match result {
                Ok(Ok(())) if lifetime == Lifetime::MayFinish => None,
                Ok(Ok(())) if supervisor.cancel.is_cancelled() => None,
                Ok(Ok(())) => Some("returned before shutdown".to_owned()),
                Ok(Err(e)) => Some(e),
                Err(panic) => Some(format!(
                    "panicked: {}",
                    crate::pipeline::process::panic_message(panic.as_ref())
                )),
            };
            if let Some(reason) = reason {
                supervisor.report(Ended { task, reason });
            }
        };
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .spawn(wrapped)
    }

    /// Runs blocking `work` on a helper thread, tracked: a panic is reported as
    /// a failure of `task` (the caller gets `None`).
    pub async fn blocking<T, F>(&self, task: &'static str, work: F) -> Option<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        match tokio::task::spawn_blocking(move || std::panic::catch_unwind(AssertUnwindSafe(work)))
            .await
        {
            Ok(Ok(value)) => Some(value),
            Ok(Err(panic)) => {
                self.report(Ended {
                    task: task.to_owned(),
                    reason: format!(
                        "helper thread panicked: {}",
                        crate::pipeline::process::panic_message(panic.as_ref())
                    ),
                });
                None
            }
            Err(e) => {
                if !self.cancel.is_cancelled() {
                    self.report(Ended {
                        task: task.to_owned(),
                        reason: format!("helper thread lost: {e}"),
                    });
                }
                None
            }
        }
    }

    /// Cancels every task and waits for them (each drains its own work).
    pub async fn stop(&self) {
        self.cancel.cancel();
        let mut tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        while tasks.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_ends_early_is_reported_once_by_name() {
        let (s, mut failures) = Supervisor::new();
        s.spawn("ok check", Lifetime::MayFinish, async { Ok(()) });
        s.spawn("engine in", Lifetime::UntilShutdown, async {
            Err("the consumer died".into())
        });
        let ended = failures.next().await.unwrap();
        assert_eq!(ended.task, "engine in");
        assert_eq!(ended.reason, "the consumer died");
        assert_eq!(s.failure(), Some(ended));
        s.spawn("server", Lifetime::UntilShutdown, async { panic!("boom") });
        let ended = failures.next().await.unwrap();
        assert_eq!(
            (ended.task.as_str(), ended.reason.as_str()),
            ("server", "panicked: boom")
        );
        assert_eq!(
            s.failure().unwrap().task,
            "engine in",
            "the first failure stays"
        );
    }

    #[tokio::test]
    async fn aborted_tasks_and_panicking_helpers_are_failures_but_shutdown_is_not() {
        let (s, mut failures) = Supervisor::new();
        let h = s.spawn("loop", Lifetime::UntilShutdown, std::future::pending());
        h.abort();
        assert_eq!(failures.next().await.unwrap().reason, "aborted");
        let r: Option<()> = s.blocking("commit", || panic!("helper")).await;
        assert!(r.is_none());
        assert_eq!(
            failures.next().await.unwrap().reason,
            "helper thread panicked: helper"
        );
        assert_eq!(s.blocking("fine", || 7).await, Some(7));
        let token = s.token();
        s.spawn("engine", Lifetime::UntilShutdown, async move {
            token.cancelled().await;
            Ok(())
        });
        s.stop().await;
        assert!(
            failures.0.try_recv().is_err(),
            "a shutdown ends nothing unexpectedly"
        );
    }
}
