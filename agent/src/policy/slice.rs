//! EndpointSlices as the store keeps them: what routing reads of them and nothing else. Of a
//! cluster's policy, endpoints are most of the objects; as Kubernetes types (hints, topology,
//! hostnames, every field of the target reference) they were most of an agent's memory.

use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Serialize;
use smallvec::SmallVec;

use super::Meta;

/// The label an EndpointSlice names its Service by.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Slice {
    /// Name, namespace and UID.
    pub metadata: Meta,
    /// The Service it belongs to, by its label (a field, not a map of one: a map's smallest
    /// allocation is larger than the rest of a slice of one endpoint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    pub ports: Vec<Port>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Its addresses that are addresses (the API server checks them, so a file is the only
    /// place a bad one comes from, and it could not be dialled).
    pub addresses: SmallVec<[IpAddr; 1]>,
    /// `conditions.ready`: only `false` leaves it out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    /// The pod its target reference names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<Box<PodRef>>,
}

/// A pod an endpoint names: by name, in the slice's namespace unless it says another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

impl Slice {
    /// The Service it belongs to, by its label.
    pub fn service(&self) -> Option<&str> {
        self.service.as_deref()
    }
}

impl From<EndpointSlice> for Slice {
    fn from(slice: EndpointSlice) -> Self {
        let meta = slice.metadata;
        let service = meta
            .labels
            .and_then(|mut labels| labels.remove(SERVICE_NAME_LABEL));
        let endpoints = slice
            .endpoints
            .into_iter()
            .map(|endpoint| {
                let pod = endpoint
                    .target_ref
                    .filter(|target| target.kind.as_deref() == Some("Pod"))
                    .and_then(|target| {
                        Some(Box::new(PodRef {
                            namespace: target.namespace,
                            name: target.name?,
                        }))
                    });
                Endpoint {
                    addresses: endpoint
                        .addresses
                        .iter()
                        .filter_map(|a| a.parse().ok())
                        .collect(),
                    ready: endpoint.conditions.and_then(|c| c.ready),
                    pod,
                }
            })
            .collect();
        Self {
            metadata: Meta {
                name: meta.name,
                namespace: meta.namespace,
                uid: meta.uid,
                annotations: None,
            },
            service,
            ports: slice
                .ports
                .into_iter()
                .flatten()
                .map(|port| Port {
                    name: port.name,
                    port: port.port,
                })
                .collect(),
            endpoints,
        }
    }
}
