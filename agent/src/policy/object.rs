//! The Kubernetes objects policy is compiled from, as the store holds them: their kinds, keys,
//! what compiled policy reads each as, and why one is refused.

use std::fmt;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde::Serialize;

use super::annotations::{
    inbound_ports_excluded, split_key, Capture, FlagAnnotations, ServiceAnnotations,
    CAPTURE_ANNOTATION,
};
use super::feature_flag::FeatureFlag;
use super::meta::MetaRef;
use super::pod::PodMeta;
use super::service::{service_addresses, Service};
use super::{gamma, security, slice};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    HttpRoute,
    /// Another node's pod as its agent publishes it (the workload and the enrolment
    /// annotations, `kubernetes::node_pods`), for the workload names of endpoints and whether
    /// their own agent measures them.
    PodMetadata,
    /// OpenFeature's FeatureFlag: the flags of its namespace.
    FeatureFlag,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::HttpRoute,
        Kind::PodMetadata,
        Kind::FeatureFlag,
    ];
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Kind::Namespace => write!(f, "Namespace/{}", self.name),
            kind => write!(f, "{kind:?}/{}/{}", self.namespace, self.name),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Object {
    Namespace(Box<Namespace>),
    Pod(Box<Pod>),
    /// Only what policy reads of it.
    Service(Box<Service>),
    /// Only what routing reads of it.
    EndpointSlice(Box<slice::Slice>),
    HttpRoute(Box<gateway_api::apis::standard::httproutes::HttpRoute>),
    PodMetadata(Box<PodMeta>),
    FeatureFlag(Box<FeatureFlag>),
}

impl Object {
    fn meta(&self) -> MetaRef<'_> {
        match self {
            Self::Namespace(o) => MetaRef::of(&o.metadata),
            Self::Pod(o) => MetaRef::of(&o.metadata),
            Self::Service(o) => o.metadata.as_ref(),
            Self::EndpointSlice(o) => o.metadata.as_ref(),
            Self::HttpRoute(o) => MetaRef::of(&o.metadata),
            Self::PodMetadata(pod) => pod.metadata.as_ref(),
            Self::FeatureFlag(flag) => flag.metadata.as_ref(),
        }
    }

    pub fn uid(&self) -> Option<&str> {
        self.meta().uid
    }

    pub fn kind(&self) -> Kind {
        match self {
            Self::Namespace(_) => Kind::Namespace,
            Self::Pod(_) => Kind::Pod,
            Self::Service(_) => Kind::Service,
            Self::EndpointSlice(_) => Kind::EndpointSlice,
            Self::HttpRoute(_) => Kind::HttpRoute,
            Self::PodMetadata(_) => Kind::PodMetadata,
            Self::FeatureFlag(_) => Kind::FeatureFlag,
        }
    }

    /// Namespaced objects without a namespace are in "default", as kubectl would put them.
    pub fn key(&self) -> ObjectKey {
        let meta = self.meta();
        let namespace = match self.kind() {
            Kind::Namespace => "",
            _ => meta.namespace.unwrap_or("default"),
        };
        ObjectKey {
            kind: self.kind(),
            namespace: namespace.to_owned(),
            name: meta.name.unwrap_or_default().to_owned(),
        }
    }

    /// What compiled policy reads this object as: a change to the object touches these.
    pub(super) fn inputs(&self) -> Vec<Input> {
        let ObjectKey {
            namespace, name, ..
        } = self.key();
        match self {
            Self::Namespace(_) => vec![Input::Namespace(name)],
            Self::Pod(_) | Self::PodMetadata(_) => vec![Input::Pod(namespace, name)],
            Self::Service(_) => vec![Input::Service(namespace, name)],
            Self::EndpointSlice(slice) => slice
                .service()
                .map(|service| Input::Slices(namespace, service.to_owned()))
                .into_iter()
                .collect(),
            Self::HttpRoute(route) => gamma::service_parents(route)
                .into_iter()
                .map(|parent| Input::Routes(parent.namespace, parent.name))
                .chain([Input::Route(namespace, name)])
                .collect(),
            Self::FeatureFlag(_) => vec![Input::FeatureFlags(namespace)],
        }
    }

    /// Why the object cannot be used, if it cannot.
    pub(super) fn validate(&self) -> Result<(), String> {
        let meta = self.meta();
        if meta.name.unwrap_or_default().is_empty() {
            return Err("metadata.name is missing".into());
        }
        if let Some(value) = meta.annotations.and_then(|a| a.get(CAPTURE_ANNOTATION)) {
            Capture::parse(value)?;
        }
        match self {
            Self::Namespace(ns) => security::validate(&ns.metadata),
            Self::Pod(pod) => {
                inbound_ports_excluded(pod.metadata.annotations.as_ref())?;
                security::validate(&pod.metadata)?;
                match pod.metadata.uid.as_deref() {
                    Some(uid) if !uid.is_empty() => Ok(()),
                    _ => Err("metadata.uid is missing: it names the pod's cgroup".into()),
                }
            }
            Self::Service(svc) => {
                service_addresses(svc)?;
                split_key(svc.metadata.annotations.as_ref())?;
                FlagAnnotations::parse(svc.metadata.annotations.as_ref())?;
                ServiceAnnotations::parse(svc).map(drop)
            }
            Self::EndpointSlice(_) => Ok(()),
            Self::HttpRoute(route) => {
                gamma::validate(route)?;
                split_key(route.metadata.annotations.as_ref())?;
                FlagAnnotations::parse(route.metadata.annotations.as_ref()).map(drop)
            }
            // Refused as its own agent refuses the Pod, so that every agent takes the pod for
            // enrolled or not alike.
            Self::PodMetadata(pod) => {
                inbound_ports_excluded(pod.metadata.annotations.as_ref()).map(drop)
            }
            Self::FeatureFlag(flag) => flag.flags.as_ref().map(drop).map_err(Clone::clone),
        }
    }
}

/// What compiled policy reads from the store, named so that a change finds what read it. Each
/// names (namespace, name), of the object or of the Service it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Input {
    Service(String, String),
    /// Which EndpointSlices label a Service, and what they hold.
    Slices(String, String),
    /// Which HTTPRoutes attach to a Service, and what they hold.
    Routes(String, String),
    /// One HTTPRoute.
    Route(String, String),
    /// A pod, as its Pod or its metadata.
    Pod(String, String),
    Namespace(String),
    /// The FeatureFlag objects of a namespace.
    FeatureFlags(String),
}
