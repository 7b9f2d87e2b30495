//! Supervision of the agent's long-lived tasks. None of them ends while the agent runs, so one
//! that ends, by returning or by panicking, is a failure of the agent: it stops being ready and
//! exits non-zero, and the kubelet restarts it (capture fails open meanwhile). Carrying on
//! would risk serving stale policy while reporting ready.

use std::future::Future;

use anyhow::anyhow;
use tokio::task::JoinSet;

#[derive(Default)]
pub struct Supervisor {
    tasks: JoinSet<&'static str>,
}

impl Supervisor {
    /// Runs `task`, known as `name`, under supervision.
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(async move {
            task.await;
            name
        });
    }

    /// Waits for the first task to end, and says which one and how. Never returns while every
    /// task runs (nor while none was spawned).
    pub async fn failure(&mut self) -> anyhow::Error {
        match self.tasks.join_next().await {
            Some(Ok(name)) => anyhow!("the {name} task ended"),
            Some(Err(e)) if e.is_panic() => {
                let panic = e.into_panic();
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".into());
                anyhow!("a task panicked: {message}")
            }
            Some(Err(e)) => anyhow!("a task was cancelled: {e}"),
            None => std::future::pending().await,
        }
    }
}

/// Makes any panic, on any thread, end the process once it is logged: a worker's task that
/// panics would otherwise be dropped by its runtime while the agent reports ready.
pub fn abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        tracing::error!("{info}; aborting");
        std::process::abort();
    }));
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_task_that_returns_is_named() {
        let mut supervisor = Supervisor::default();
        supervisor.spawn("forever", std::future::pending());
        supervisor.spawn("policy", async {});
        let failure = supervisor.failure().await.to_string();
        assert_eq!(failure, "the policy task ended");
    }

    #[tokio::test]
    async fn a_task_that_panics_is_reported_with_its_message() {
        let mut supervisor = Supervisor::default();
        supervisor.spawn("routes", async { panic!("overflow in a duration") });
        let failure = supervisor.failure().await.to_string();
        assert!(failure.contains("overflow in a duration"), "{failure}");
    }

    #[tokio::test]
    async fn nothing_is_reported_while_every_task_runs() {
        let mut supervisor = Supervisor::default();
        supervisor.spawn("forever", std::future::pending());
        let waited = tokio::time::timeout(Duration::from_millis(50), supervisor.failure()).await;
        assert!(waited.is_err());
    }
}
