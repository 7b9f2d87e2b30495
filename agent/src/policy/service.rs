//! Services as the store keeps them: what policy reads of them and nothing else (their
//! selectors, labels, other annotations and status are the API server's business).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use serde::Serialize;

use super::meta::Meta;

/// The annotations Aviary reads on a Service all start with this.
const ANNOTATION_PREFIX: &str = "aviary.dev/";

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    /// Name, namespace, UID, and the `aviary.dev/` annotations.
    pub metadata: Meta,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spec: Option<Spec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    #[serde(rename = "type")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    #[serde(rename = "clusterIP", skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs", skip_serializing_if = "Option::is_none")]
    pub cluster_ips: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<Port>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

impl From<k8s_openapi::api::core::v1::Service> for Service {
    fn from(svc: k8s_openapi::api::core::v1::Service) -> Self {
        let meta = svc.metadata;
        let annotations = meta.annotations.and_then(|annotations| {
            let kept: BTreeMap<String, String> = annotations
                .into_iter()
                .filter(|(key, _)| key.starts_with(ANNOTATION_PREFIX))
                .collect();
            (!kept.is_empty()).then_some(kept)
        });
        Self {
            metadata: Meta {
                name: meta.name,
                namespace: meta.namespace,
                uid: meta.uid,
                annotations,
            },
            spec: svc.spec.map(|spec| Spec {
                type_: spec.type_,
                cluster_ip: spec.cluster_ip,
                cluster_ips: spec.cluster_ips,
                // A new vector: collecting in place would keep the larger Kubernetes ports'.
                ports: spec.ports.map(|ports| {
                    ports
                        .iter()
                        .map(|port| Port {
                            name: port.name.clone(),
                            port: port.port,
                            protocol: port.protocol.clone(),
                            app_protocol: port.app_protocol.clone(),
                        })
                        .collect()
                }),
            }),
        }
    }
}

/// The TCP addresses a Service's ClusterIPs answer on. Headless and ExternalName services have
/// none; a malformed address or port makes the whole Service invalid.
pub(super) fn service_addresses(svc: &Service) -> Result<Vec<SocketAddr>, String> {
    let Some(spec) = &svc.spec else {
        return Ok(Vec::new());
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(Vec::new());
    }
    let mut ips: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.as_deref());
    }
    let mut addresses = Vec::new();
    for ip in ips {
        if ip.is_empty() || ip == "None" {
            continue;
        }
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("spec.clusterIPs holds {ip:?}, which is not an IP address"))?;
        for port in spec.ports.iter().flatten() {
            if !(1..=65535).contains(&port.port) {
                return Err(format!(
                    "spec.ports has port {}, outside 1-65535",
                    port.port
                ));
            }
            if port.protocol.as_deref().unwrap_or("TCP") == "TCP" {
                addresses.push(SocketAddr::new(ip, port.port as u16));
            }
        }
    }
    Ok(addresses)
}

#[cfg(test)]
mod tests {
    use crate::policy::compiler::policy;
    use crate::policy::fixtures::*;
    use crate::policy::{local::parse_documents, Object};

    #[test]
    fn only_what_policy_reads_is_kept_under_the_api_names() {
        let objects = parse_documents(
            r#"
apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: shop
  labels: {app: reviews}
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: '{"a": "long document"}'
    aviary.dev/mirror: reviews-v2
spec:
  selector: {app: reviews}
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ipFamilies: [IPv4]
  sessionAffinity: None
  ports: [{name: http, port: 80, targetPort: 9080, appProtocol: http}]
"#,
        )
        .unwrap();
        let Object::Service(svc) = &objects[0] else {
            panic!("a Service")
        };
        assert_eq!(
            serde_json::to_value(svc).unwrap(),
            serde_json::json!({
                "metadata": {"name": "reviews", "namespace": "shop",
                             "annotations": {"aviary.dev/mirror": "reviews-v2"}},
                "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                         "ports": [{"name": "http", "port": 80, "appProtocol": "http"}]},
            })
        );
    }

    #[test]
    fn services_are_captured_on_every_cluster_ip_and_tcp_port() {
        let policy = policy(
            &store(
                r#"
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00::a"]
  ports: [{port: 80}, {port: 53, protocol: UDP}, {port: 443, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: shop}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: external, namespace: shop}
spec: {type: ExternalName, externalName: example.invalid, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: shop}
spec: {clusterIP: 10.96.0.11, ports: [{port: 8080}]}
"#,
            ),
            None,
        );
        let captured: Vec<String> = policy.captured.iter().map(|a| a.to_string()).collect();
        assert_eq!(
            captured,
            [
                "10.96.0.10:80",
                "10.96.0.10:443",
                "10.96.0.11:8080",
                "[fd00::a]:80",
                "[fd00::a]:443"
            ]
        );
    }
}
