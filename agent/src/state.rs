//! The compiled policy snapshot: immutable, replaced whole, read by the datapath and the proxy.

use std::sync::Arc;

use tokio::sync::watch;
use tracing::info;

use crate::policy::{compile, Policy, Store};

#[derive(Debug, Default)]
pub struct Snapshot {
    /// 0 until the first policy is compiled; then one more per change.
    pub generation: u64,
    pub policy: Policy,
}

pub type SnapshotRx = watch::Receiver<Arc<Snapshot>>;

/// Compiles a store into a new snapshot whenever the result changes.
pub struct Publisher {
    tx: watch::Sender<Arc<Snapshot>>,
    node: Option<String>,
}

impl Publisher {
    pub fn new(node: Option<String>) -> (Self, SnapshotRx) {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        (Self { tx, node }, rx)
    }

    /// Publishes the store's policy if it differs from the one in force; returns whether it did.
    pub fn publish(&self, store: &Store) -> bool {
        let policy = compile(store, self.node.as_deref());
        let current = self.tx.borrow().clone();
        if current.generation > 0 && current.policy == policy {
            return false;
        }
        let generation = current.generation + 1;
        match policy.describe_change(&current.policy) {
            Some(change) => info!(generation, "policy changed: {change}"),
            None => info!(generation, "policy loaded: nothing enrolled or captured"),
        }
        self.tx
            .send_replace(Arc::new(Snapshot { generation, policy }));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_only_changes() {
        let (publisher, rx) = Publisher::new(None);
        let mut store = Store::default();
        assert!(
            publisher.publish(&store),
            "the first policy is always published"
        );
        assert_eq!(rx.borrow().generation, 1);
        assert!(!publisher.publish(&store));

        let objects = crate::policy::local::parse_documents(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n",
        )
        .unwrap();
        store.replace_all(objects);
        assert!(publisher.publish(&store));
        assert_eq!(rx.borrow().generation, 2);
        assert_eq!(rx.borrow().policy.captured.len(), 1);
    }
}
