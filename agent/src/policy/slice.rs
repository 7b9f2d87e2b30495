//! EndpointSlices as the store keeps them: what routing reads of them and nothing else. Of a
//! cluster's policy, endpoints are most of the objects; as Kubernetes types (hints, topology,
//! hostnames, every field of the target reference) they were most of an agent's memory.

use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Serialize;
use smallvec::SmallVec;

use super::meta::Meta;

/// The label an EndpointSlice names its Service by.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Slice {
    /// Name and namespace (an EndpointSlice is never refused, so no Event names its UID).
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
        // Collected into a new vector: collecting in place would keep the Kubernetes
        // endpoints' allocation, eight times the size of what it now holds.
        let endpoints = slice
            .endpoints
            .iter()
            .map(|endpoint| {
                let pod = endpoint
                    .target_ref
                    .as_ref()
                    .filter(|target| target.kind.as_deref() == Some("Pod"))
                    .and_then(|target| {
                        Some(Box::new(PodRef {
                            namespace: target.namespace.clone(),
                            name: target.name.clone()?,
                        }))
                    });
                Endpoint {
                    addresses: endpoint
                        .addresses
                        .iter()
                        .filter_map(|a| a.parse().ok())
                        .collect(),
                    ready: endpoint.conditions.as_ref().and_then(|c| c.ready),
                    pod,
                }
            })
            .collect();
        Self {
            metadata: Meta {
                name: meta.name,
                namespace: meta.namespace,
                uid: None,
                annotations: None,
            },
            service,
            ports: slice
                .ports
                .iter()
                .flatten()
                .map(|port| Port {
                    name: port.name.clone(),
                    port: port.port,
                })
                .collect(),
            endpoints,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::policy::{local::parse_documents, Object};

    #[test]
    fn only_what_routing_reads_is_kept() {
        let objects = parse_documents(
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-1, namespace: shop, labels: {kubernetes.io/service-name: reviews, app: x}}
addressType: IPv4
ports: [{name: http, port: 9080, protocol: TCP}]
endpoints:
- addresses: ["10.244.1.5"]
  conditions: {ready: true, serving: true}
  nodeName: node-a
  zone: a
  targetRef: {kind: Pod, name: reviews-7d9f8b-abcde, namespace: shop, uid: u1}
- addresses: ["not an address"]
  conditions: {ready: false}
"#,
        )
        .unwrap();
        let Object::EndpointSlice(slice) = &objects[0] else {
            panic!("an EndpointSlice")
        };
        assert_eq!(slice.service(), Some("reviews"));
        assert_eq!(slice.endpoints.capacity(), 2, "no room kept for more");
        assert_eq!(
            serde_json::to_value(slice).unwrap(),
            serde_json::json!({
                "metadata": {"name": "reviews-1", "namespace": "shop"},
                "service": "reviews",
                "ports": [{"name": "http", "port": 9080}],
                "endpoints": [
                    {"addresses": ["10.244.1.5"], "ready": true,
                     "pod": {"namespace": "shop", "name": "reviews-7d9f8b-abcde"}},
                    {"addresses": [], "ready": false},
                ],
            })
        );
    }
}
