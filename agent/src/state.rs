//! The compiled policy snapshot: immutable, replaced whole, read by the datapath and the proxy.

use std::sync::Arc;

use tokio::sync::watch;
use tracing::info;

use crate::{
    policy::{
        compiler::{Compiled, Compiler},
        routes::{local_pods, routing_notes, RouteOptions},
        Policy, Store,
    },
    proxy::route::RouteTable,
};

#[derive(Debug, Default)]
pub struct Snapshot {
    /// 0 until the first policy is compiled; then one more per change.
    pub generation: u64,
    pub policy: Policy,
    pub routes: Arc<RouteTable>,
}

pub type SnapshotRx = watch::Receiver<Arc<Snapshot>>;

/// Compiles a store into a new snapshot whenever the store changed.
pub struct Publisher {
    tx: watch::Sender<Arc<Snapshot>>,
    options: RouteOptions,
    compiler: Compiler,
    published_revision: Option<u64>,
    /// Routing notes already logged, so each is said once.
    notes: Vec<String>,
}

impl Publisher {
    pub fn new(options: RouteOptions) -> (Self, SnapshotRx) {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let publisher = Self {
            tx,
            compiler: Compiler::new(options.clone()),
            options,
            published_revision: None,
            notes: Vec::new(),
        };
        (publisher, rx)
    }

    /// Publishes a snapshot of the store unless it is unchanged since the last one; returns
    /// whether it did. Each object change since the last call gets its own log line.
    pub fn publish(&mut self, store: &mut Store) -> bool {
        for change in store.take_changes() {
            info!("{change}");
        }
        if self.published_revision == Some(store.revision()) {
            return false;
        }
        self.published_revision = Some(store.revision());
        let current = self.tx.borrow().clone();
        let Compiled { policy, mut routes } = self.compiler.update(store);
        routes.local = local_pods(&policy, &routes.pods, self.options.trust_domain.as_deref());
        let routes = Arc::new(routes);
        let notes = routing_notes(store);
        for note in notes.iter().filter(|n| !self.notes.contains(n)) {
            info!("{note}");
        }
        self.notes = notes;
        let generation = current.generation + 1;
        let routed = routes.services.len();
        match policy.describe_change(&current.policy) {
            Some(change) => info!(generation, routed, "policy changed: {change}"),
            None if current.generation == 0 => info!(generation, routed, "policy loaded"),
            None => info!(generation, routed, "routes updated"),
        }
        self.tx.send_replace(Arc::new(Snapshot {
            generation,
            policy,
            routes,
        }));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_only_changes() {
        let (mut publisher, rx) = Publisher::new(RouteOptions::default());
        let mut store = Store::default();
        assert!(
            publisher.publish(&mut store),
            "the first policy is always published"
        );
        assert_eq!(rx.borrow().generation, 1);
        assert!(!publisher.publish(&mut store));

        let objects = crate::policy::local::parse_documents(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n",
        )
        .unwrap();
        store.replace_all(objects);
        assert!(publisher.publish(&mut store));
        assert_eq!(rx.borrow().generation, 2);
        assert_eq!(rx.borrow().policy.captured.len(), 1);
    }
}
