//! The API-server source: one kube-rs watcher per kind feeds the policy [`Store`], which is the
//! reflector cache (with validation in front, so a bad object never replaces a good one).
//!
//! Watchers relist on their own after `410 Gone`, reconnect with backoff after dropped streams
//! and outages, and resume from bookmarks. Meanwhile the store and the snapshot stay as they
//! were, so traffic carries on under the last good policy.

pub mod lease;
pub mod status;

use std::{collections::BTreeSet, fmt::Debug, time::Duration};

use futures::{Stream, StreamExt as _};
use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    core::PartialObjectMeta,
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
    /// The kind's API is not served (the HTTPRoute CRD is not installed): none exist for now.
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

impl Watched for PartialObjectMeta<Pod> {
    const KIND: Kind = Kind::PodMetadata;
    fn into_object(self) -> Object {
        Object::pod_metadata(self.metadata)
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
        access::<Service>("", WATCH, false),
        access::<EndpointSlice>("", WATCH, false),
        access::<HttpRoute>("", WATCH, false),
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

/// Starts one watcher per kind; they send to `updates` until it is closed. Full Pods are only
/// those scheduled on `node`; of the others, only metadata is watched.
pub fn spawn_watchers(client: &Client, node: &str, updates: mpsc::Sender<Update>) {
    let all = watcher::Config::default();
    let on_node = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    tokio::spawn(forward::<Namespace>(
        watcher(Api::all(client.clone()), all.clone()),
        updates.clone(),
    ));
    tokio::spawn(forward::<Pod>(
        watcher(Api::all(client.clone()), on_node),
        updates.clone(),
    ));
    tokio::spawn(forward::<PartialObjectMeta<Pod>>(
        watcher(
            Api::<PartialObjectMeta<Pod>>::all(client.clone()),
            all.clone(),
        ),
        updates.clone(),
    ));
    tokio::spawn(forward::<Service>(
        watcher(Api::all(client.clone()), all.clone()),
        updates.clone(),
    ));
    tokio::spawn(forward::<EndpointSlice>(
        watcher(Api::all(client.clone()), all.clone()),
        updates.clone(),
    ));
    tokio::spawn(forward::<HttpRoute>(
        watcher(Api::all(client.clone()), all),
        updates,
    ));
}

async fn forward<K: Watched>(
    events: impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
    updates: mpsc::Sender<Update>,
) {
    let mut events = events
        .modify(|object: &mut K| trim(object.meta_mut()))
        .default_backoff()
        .boxed();
    let mut listing = Vec::new();
    let mut not_served = false;
    while let Some(event) = events.next().await {
        let update = match event {
            Ok(watcher::Event::Init) => {
                listing.clear();
                continue;
            }
            Ok(watcher::Event::InitApply(object)) => {
                listing.push(object.into_object());
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                not_served = false;
                Update::Listed(K::KIND, std::mem::take(&mut listing))
            }
            Ok(watcher::Event::Apply(object)) => Update::Applied(object.into_object()),
            Ok(watcher::Event::Delete(object)) => Update::Deleted(object.into_object().key()),
            Err(e) if is_not_served(&e) => {
                if not_served {
                    continue;
                }
                not_served = true;
                info!(
                    kind = ?K::KIND,
                    "the API server does not serve this kind (CRD not installed?); carrying on \
                     without it and checking again with backoff (at most every 30s)"
                );
                Update::NotServed(K::KIND)
            }
            Err(e) => {
                warn!(kind = ?K::KIND, error = %e, "watch failed; retrying with backoff, the last good policy stays in force");
                continue;
            }
        };
        if updates.send(update).await.is_err() {
            return;
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
/// refusals go to `reports` for the status writer.
pub async fn apply_updates(
    mut updates: mpsc::Receiver<Update>,
    mut publisher: Publisher,
    reports: watch::Sender<status::Report>,
) {
    let mut store = Store::default();
    let mut listed = BTreeSet::new();
    while let Some(update) = updates.recv().await {
        apply(&mut store, &mut listed, update);
        while let Ok(update) = updates.try_recv() {
            apply(&mut store, &mut listed, update);
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
    }
}

fn apply(store: &mut Store, listed: &mut BTreeSet<Kind>, update: Update) {
    let rejected = match update {
        Update::Applied(object) => store.upsert(object).err().into_iter().collect(),
        Update::Deleted(key) => {
            store.remove(&key);
            Vec::new()
        }
        Update::Listed(kind, objects) => {
            listed.insert(kind);
            store.replace_kind(kind, objects)
        }
        Update::NotServed(kind) => {
            listed.insert(kind);
            store.replace_kind(kind, Vec::new())
        }
    };
    for rejected in rejected {
        warn!("{rejected}");
    }
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
