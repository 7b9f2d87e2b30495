//! The API-server source: one kube-rs watcher per kind feeds the policy [`Store`], which is the
//! reflector cache (with validation in front, so a bad object never replaces a good one).
//!
//! Watchers relist on their own after `410 Gone`, reconnect with backoff after dropped streams
//! and outages, and resume from bookmarks. Meanwhile the store and the snapshot stay as they
//! were, so traffic carries on under the last good policy.

pub mod feature_flags;
pub mod lease;
pub mod node_pods;
pub mod status;

use std::{collections::BTreeSet, fmt::Debug, time::Duration};

use futures::{Stream, StreamExt as _};
use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    runtime::{watcher, WatchStreamExt as _},
    Api, Client, Resource,
};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::{
    policy::{Kind, Object, ObjectKey, Store},
    state::Publisher,
};

/// What one watcher saw, in the order it saw it.
#[derive(Debug)]
pub enum Update {
    Applied(Object),
    Deleted(ObjectKey),
    /// A complete listing of one kind, after a (re)list.
    Listed(Kind, Vec<Object>),
    /// The kind's API is not served (the HTTPRoute or FeatureFlag CRD is not installed): none
    /// exist for now.
    NotServed(Kind),
}

/// The Kubernetes kinds the policy watches, and how each becomes an [`Object`].
trait Watched:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
    const KIND: Kind;
    fn into_object(self) -> Object;
}

impl Watched for Namespace {
    const KIND: Kind = Kind::Namespace;
    fn into_object(self) -> Object {
        Object::Namespace(Box::new(self))
    }
}

impl Watched for Pod {
    const KIND: Kind = Kind::Pod;
    fn into_object(self) -> Object {
        Object::Pod(Box::new(self))
    }
}

impl Watched for Service {
    const KIND: Kind = Kind::Service;
    fn into_object(self) -> Object {
        Object::Service(Box::new(self.into()))
    }
}

impl Watched for EndpointSlice {
    const KIND: Kind = Kind::EndpointSlice;
    fn into_object(self) -> Object {
        Object::EndpointSlice(Box::new(self.into()))
    }
}

impl Watched for HttpRoute {
    const KIND: Kind = Kind::HttpRoute;
    fn into_object(mut self) -> Object {
        // Status is written by route controllers (Aviary among them) and never read for policy.
        self.status = None;
        Object::HttpRoute(Box::new(self))
    }
}

/// How one watched type's events become store updates.
trait Translate<K>: Send + 'static {
    const KIND: Kind;
    /// A new listing begins.
    fn relist(&mut self) {}
    /// Adds what the store keeps of one object of a listing to `listing`.
    fn listed(&mut self, object: K, listing: &mut Vec<Object>);
    fn applied(&mut self, object: K) -> Vec<Update>;
    fn deleted(&mut self, object: K) -> Vec<Update>;
}

/// The kinds the store keeps one object of per Kubernetes object.
struct OneToOne;

impl<K: Watched> Translate<K> for OneToOne {
    const KIND: Kind = K::KIND;
    fn listed(&mut self, object: K, listing: &mut Vec<Object>) {
        listing.push(object.into_object());
    }
    fn applied(&mut self, object: K) -> Vec<Update> {
        vec![Update::Applied(object.into_object())]
    }
    fn deleted(&mut self, object: K) -> Vec<Update> {
        vec![Update::Deleted(object.into_object().key())]
    }
}

/// One kind of access to the API server the agent needs: the RBAC rules in `deploy/` are
/// checked against this list, which is derived from the types the agent watches and writes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Access {
    pub group: String,
    pub resource: String,
    pub verbs: Vec<&'static str>,
    /// Only in the agent's own namespace (a Role), not cluster-wide.
    pub namespaced: bool,
}

/// Everything the agent does with the API server.
pub fn api_access() -> Vec<Access> {
    fn access<K: Resource<DynamicType = ()>>(
        subresource: &str,
        verbs: &[&'static str],
        namespaced: bool,
    ) -> Access {
        Access {
            group: K::group(&()).into_owned(),
            resource: format!("{}{subresource}", K::plural(&())),
            verbs: verbs.to_vec(),
            namespaced,
        }
    }
    // The watchers list and watch; they never get single objects.
    const WATCH: &[&str] = &["list", "watch"];
    let mut access = vec![
        access::<Namespace>("", WATCH, false),
        access::<Pod>("", WATCH, false),
        // node_pods: the other nodes' pods, and this node's, published for them, owned by
        // its Node.
        access::<node_pods::NodePods>("", &["list", "watch", "get", "create", "update"], false),
        access::<Node>("", &["get"], false),
        access::<Service>("", WATCH, false),
        access::<EndpointSlice>("", WATCH, false),
        access::<HttpRoute>("", WATCH, false),
        access::<feature_flags::FeatureFlagObject>("", WATCH, false),
        // status::write_route_status reads the status, then patches it.
        access::<HttpRoute>("/status", &["get", "patch"], false),
        // kube's event Recorder creates an Event, and patches it when it repeats.
        access::<k8s_openapi::api::events::v1::Event>("", &["create", "patch"], false),
        // lease::LeaseHolder reads, creates and replaces its Lease.
        access::<k8s_openapi::api::coordination::v1::Lease>("", &["get", "create", "update"], true),
    ];
    access.sort();
    access
}

/// Drops what changes on every write but never matters for policy, so that only real changes
/// reach the store (and the log).
fn trim(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.resource_version = None;
}

/// Starts one watcher per kind; they send to `updates` until it is closed. Pods are only those
/// scheduled on `node`; of the others, what their nodes' agents publish ([`node_pods`]).
pub fn spawn_watchers(client: &Client, node: &str, updates: mpsc::Sender<Update>) {
    let all = watcher::Config::default();
    let on_node = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    tokio::spawn(forward(
        watcher(Api::<Namespace>::all(client.clone()), all.clone()),
        OneToOne,
        updates.clone(),
    ));
    tokio::spawn(forward(
        watcher(Api::<Pod>::all(client.clone()), on_node),
        OneToOne,
        updates.clone(),
    ));
    tokio::spawn(forward(
        watcher(Api::<node_pods::NodePods>::all(client.clone()), all.clone()),
        node_pods::Reader::new(node),
        updates.clone(),
    ));
    tokio::spawn(forward(
        watcher(Api::<Service>::all(client.clone()), all.clone()),
        OneToOne,
        updates.clone(),
    ));
    tokio::spawn(forward(
        watcher(Api::<EndpointSlice>::all(client.clone()), all.clone()),
        OneToOne,
        updates.clone(),
    ));
    tokio::spawn(forward(
        watcher(Api::<HttpRoute>::all(client.clone()), all.clone()),
        OneToOne,
        updates.clone(),
    ));
    tokio::spawn(forward(
        watcher(
            Api::<feature_flags::FeatureFlagObject>::all(client.clone()),
            all,
        ),
        OneToOne,
        updates,
    ));
}

async fn forward<K, T>(
    events: impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
    mut translate: T,
    updates: mpsc::Sender<Update>,
) where
    K: Resource + Clone + Debug + Send + 'static,
    T: Translate<K>,
{
    let mut events = events
        .modify(|object: &mut K| trim(object.meta_mut()))
        .default_backoff()
        .boxed();
    let mut listing = Vec::new();
    let mut not_served = false;
    while let Some(event) = events.next().await {
        let batch = match event {
            Ok(watcher::Event::Init) => {
                listing.clear();
                translate.relist();
                continue;
            }
            Ok(watcher::Event::InitApply(object)) => {
                translate.listed(object, &mut listing);
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                not_served = false;
                vec![Update::Listed(T::KIND, std::mem::take(&mut listing))]
            }
            Ok(watcher::Event::Apply(object)) => translate.applied(object),
            Ok(watcher::Event::Delete(object)) => translate.deleted(object),
            Err(e) if is_not_served(&e) => {
                if not_served {
                    continue;
                }
                not_served = true;
                info!(
                    kind = ?T::KIND,
                    "the API server does not serve this kind (CRD not installed?); carrying on \
                     without it and checking again with backoff (at most every 30s)"
                );
                vec![Update::NotServed(T::KIND)]
            }
            Err(e) => {
                warn!(kind = ?T::KIND, error = %e, "watch failed; retrying with backoff, the last good policy stays in force");
                continue;
            }
        };
        for update in batch {
            if updates.send(update).await.is_err() {
                return;
            }
        }
    }
}

fn is_not_served(e: &watcher::Error) -> bool {
    matches!(
        e,
        watcher::Error::InitialListFailed(kube::Error::Api(status)) if status.code == 404
    )
}

/// Applies watcher updates to the store. A snapshot is published once every kind has been
/// listed (or found not served), and then after each batch of updates; the route statuses and
/// refusals go to `reports` for the status writer, and what other nodes read of `node`'s pods
/// to `node_pods` for [`node_pods::publish`].
pub async fn apply_updates(
    mut updates: mpsc::Receiver<Update>,
    mut publisher: Publisher,
    reports: watch::Sender<status::Report>,
    node: String,
    node_pods: watch::Sender<Option<node_pods::NodePodsSpec>>,
) {
    let mut store = Store::default();
    let mut listed = BTreeSet::new();
    // This node's pods are published again only after a batch that changed a Pod.
    let mut pods_changed = false;
    while let Some(update) = updates.recv().await {
        pods_changed |= apply(&mut store, &mut listed, update) == Kind::Pod;
        while let Ok(update) = updates.try_recv() {
            pods_changed |= apply(&mut store, &mut listed, update) == Kind::Pod;
        }
        if listed.len() < Kind::ALL.len() {
            continue;
        }
        publisher.publish(&mut store);
        let report = status::Report::of(&store, publisher.route_statuses().clone());
        reports.send_if_modified(|current| {
            let changed = *current != report;
            *current = report;
            changed
        });
        if std::mem::take(&mut pods_changed) {
            let pods = Some(node_pods::of_node(&store, &node));
            node_pods.send_if_modified(|current| {
                let changed = *current != pods;
                *current = pods;
                changed
            });
        }
    }
}

/// Applies one update; returns the kind it was of.
fn apply(store: &mut Store, listed: &mut BTreeSet<Kind>, update: Update) -> Kind {
    let (kind, rejected) = match update {
        Update::Applied(object) => (
            object.kind(),
            store.upsert(object).err().into_iter().collect(),
        ),
        Update::Deleted(key) => {
            store.remove(&key);
            (key.kind, Vec::new())
        }
        Update::Listed(kind, objects) => {
            listed.insert(kind);
            (kind, store.replace_kind(kind, objects))
        }
        Update::NotServed(kind) => {
            listed.insert(kind);
            (kind, store.replace_kind(kind, Vec::new()))
        }
    };
    for rejected in rejected {
        warn!("{rejected}");
    }
    kind
}

/// How long an answer from the API server may take; watches are long polls and not bound by it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A client for the API server `kubeconfig` names, or else the cluster the agent runs in.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Client> {
    let mut config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("reading the kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| anyhow::anyhow!("using the kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::incluster().map_err(|e| {
            anyhow::anyhow!("finding the API server from the pod's service account: {e}")
        })?,
    };
    config.connect_timeout = Some(REQUEST_TIMEOUT);
    Ok(Client::try_from(config)?)
}
