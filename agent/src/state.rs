//! The compiled policy snapshot: immutable, replaced whole, read by the datapath and the proxy.

use std::sync::Arc;

use tokio::sync::watch;
use tracing::info;

use crate::{
    policy::{
        compiler::{Compiled, Compiler},
        enrolment::local_pods,
        service_routes::RouteOptions,
        status::RouteStatus,
        ObjectKey, Policy, Store,
    },
    table::RouteTable,
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
    /// Every HTTPRoute's status, as of the last publish.
    statuses: imbl::OrdMap<ObjectKey, RouteStatus>,
}

impl Publisher {
    pub fn new(options: RouteOptions) -> (Self, SnapshotRx) {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let publisher = Self {
            tx,
            compiler: Compiler::new(options.clone()),
            options,
            published_revision: None,
            statuses: imbl::OrdMap::new(),
        };
        (publisher, rx)
    }

    /// Publishes a snapshot of the store unless it is unchanged since the last one; returns
    /// whether it did. Each object change since the last call gets its own log line, and each
    /// routing note one when it first appears.
    pub fn publish(&mut self, store: &mut Store) -> bool {
        for change in store.take_changes() {
            info!("{change}");
        }
        // Compiled even when no object changed: a route's newest version may have been refused,
        // which its status says.
        let Compiled {
            policy,
            mut routes,
            statuses,
            notes,
        } = self.compiler.update(store);
        self.statuses = statuses;
        for note in notes {
            info!("{note}");
        }
        if self.published_revision == Some(store.revision()) {
            return false;
        }
        self.published_revision = Some(store.revision());
        let current = self.tx.borrow().clone();
        routes.local = local_pods(
            policy.enrolled.values(),
            &routes.pods,
            self.options.trust_domain.as_deref(),
        );
        let routes = Arc::new(routes);
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

    /// Every HTTPRoute's status, as of the last publish.
    pub fn route_statuses(&self) -> &imbl::OrdMap<ObjectKey, RouteStatus> {
        &self.statuses
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
