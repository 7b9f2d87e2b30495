//! Upgrades: a successor takes over from the agent running on the node (its listeners, then
//! its connections as they drain), and the running agent hands over to the next.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tracing::info;

use crate::{
    config::Config,
    handoff::{HandoffListener, Predecessor, Successor},
    proxy::{
        drain::{DrainSignal, Moved},
        http::HttpProxy,
        metrics::Metrics,
        workers::Workers,
    },
    state::SnapshotRx,
    table::RouteTable,
};

/// How long a successor waits for its first policy before it takes over without it.
const FIRST_POLICY_TIMEOUT: Duration = Duration::from_secs(30);

/// A successor serves its first connection with the policy in force, as the agent it takes
/// over from did: it waits for its first snapshot, within [`FIRST_POLICY_TIMEOUT`].
pub async fn wait_for_first_policy(snapshots: &SnapshotRx, routes: &ArcSwap<RouteTable>) {
    let mut first = snapshots.clone();
    match tokio::time::timeout(FIRST_POLICY_TIMEOUT, first.changed()).await {
        Ok(_) => routes.store(first.borrow_and_update().routes.clone()),
        Err(_) => tracing::warn!(
            timeout = ?FIRST_POLICY_TIMEOUT,
            "no policy yet: taking over without it (connections pass through until it comes)"
        ),
    }
}

/// Tells the predecessor that this agent accepts on its listeners, and carries on, on the
/// workers, each connection it hands over as it drains.
pub fn receive_connections(
    predecessor: Predecessor,
    workers: &Workers,
    http: &Arc<HttpProxy>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<()> {
    tokio::task::block_in_place(|| predecessor.accepting())
        .context("telling the running agent this one accepts")?;
    info!("took over from the running agent: its connections move here as it drains");
    let (spawner, http, metrics) = (workers.spawner(), http.clone(), metrics.clone());
    let moving = tokio::task::spawn_blocking(move || {
        predecessor.receive(|moved| {
            spawner.spawn(crate::proxy::carry_on(moved, http.clone(), metrics.clone()))
        })
    });
    tokio::spawn(async move {
        match moving.await {
            Ok(Ok(moved)) => info!(moved, "the previous agent handed over its connections"),
            Ok(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "receiving connections from the previous agent")
            }
            Err(e) => tracing::warn!(error = %e, "receiving connections from the previous agent"),
        }
    });
    Ok(())
}

/// Where the next agent takes over from this one; None (logged) if the socket cannot be made.
pub fn bind_handoff(cfg: &Config) -> Option<HandoffListener> {
    match HandoffListener::bind(&cfg.handoff_socket) {
        Ok(listener) => Some(listener),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "no hand-off socket: an upgrade will break this agent's connections");
            None
        }
    }
}

/// The next successor knocking on the hand-off socket, if this agent has one.
pub async fn next_successor(handoff: &mut Option<HandoffListener>) -> Successor {
    match handoff {
        Some(handoff) => handoff.successor().await,
        None => std::future::pending().await,
    }
}

/// Drains this agent's connections into `successor` (it writes the maps, serves the endpoints
/// and reports status now): each connection that moves is sent on, within `timeout`.
pub async fn drain_into(successor: Successor, drain_signal: &DrainSignal, timeout: Duration) {
    let moved = drain_signal.hand_over();
    let forwarding = tokio::task::spawn_blocking(move || forward(successor, moved));
    let left = drain_signal.finished(timeout).await;
    // Ends the forwarding once the last connection is sent.
    drain_signal.close();
    match forwarding.await {
        Ok(Ok(moved)) => info!(
            moved,
            left, "drained into the successor; exiting at SIGTERM"
        ),
        Ok(Err(e)) => tracing::warn!(error = %e, left, "handing connections over failed"),
        Err(e) => tracing::warn!(error = %e, "handing connections over"),
    }
}

/// Sends the successor each connection that moves, until the drain ends; returns how many.
fn forward(
    successor: Successor,
    mut moved: mpsc::UnboundedReceiver<Moved>,
) -> std::io::Result<usize> {
    let mut sent = 0;
    while let Some(connection) = moved.blocking_recv() {
        successor.send(connection)?;
        sent += 1;
    }
    successor.done()?;
    Ok(sent)
}
