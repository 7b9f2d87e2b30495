//! Kubernetes objects for the agent's local mode, as YAML.

use std::net::IpAddr;

use crate::{Pod, TEST_NODE};

fn annotations(capture: Option<&str>) -> String {
    match capture {
        Some(value) => format!(", annotations: {{aviary.dev/capture: {value}}}"),
        None => String::new(),
    }
}

pub fn namespace(name: &str, capture: Option<&str>) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}{}}}\n",
        annotations(capture)
    )
}

pub fn pod(pod: &Pod, namespace: &str, capture: Option<&str>) -> String {
    let ip = pod.ip;
    let status =
        format!("status: {{phase: Running, podIP: \"{ip}\", podIPs: [{{ip: \"{ip}\"}}]}}\n");
    pod_with_uid(&pod.name, &pod.uid, namespace, capture) + &status
}

/// A Pod with its IPv4 and IPv6 addresses.
pub fn dual_stack_pod(pod: &Pod, namespace: &str, capture: Option<&str>) -> String {
    let (ip, ip6) = (pod.ip, pod.ip6);
    let status = format!(
        "status: {{phase: Running, podIP: \"{ip}\", podIPs: [{{ip: \"{ip}\"}}, {{ip: \"{ip6}\"}}]}}\n"
    );
    pod_with_uid(&pod.name, &pod.uid, namespace, capture) + &status
}

pub fn pod_with_uid(name: &str, uid: &str, namespace: &str, capture: Option<&str>) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, uid: {uid}{}}}\n\
         spec: {{nodeName: {TEST_NODE}, containers: [{{name: {name}, image: test}}]}}\n",
        annotations(capture)
    )
}

/// A ClusterIP Service with one port per (port, protocol).
pub fn service(name: &str, namespace: &str, vip: IpAddr, ports: &[(u16, &str)]) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|(port, proto)| format!("{{port: {port}, protocol: {proto}}}"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         spec: {{clusterIP: \"{vip}\", ports: [{}]}}\n",
        ports.join(", ")
    )
}

/// Joins objects into one multi-document file.
pub fn documents(objects: &[String]) -> String {
    objects.join("---\n")
}

/// A ClusterIP Service with one named HTTP port forwarding to `target_port`, and annotations.
pub fn http_service(
    name: &str,
    namespace: &str,
    vip: IpAddr,
    target_port: u16,
    annotations: &[(&str, &str)],
) -> String {
    http_port_service(name, namespace, vip, target_port, None, annotations)
}

/// An [`http_service`] whose port declares `appProtocol: kubernetes.io/h2c` (HTTP/2 without
/// TLS, as gRPC is served in a cluster).
pub fn h2c_service(name: &str, namespace: &str, vip: IpAddr, target_port: u16) -> String {
    http_port_service(
        name,
        namespace,
        vip,
        target_port,
        Some("kubernetes.io/h2c"),
        &[],
    )
}

fn http_port_service(
    name: &str,
    namespace: &str,
    vip: IpAddr,
    target_port: u16,
    app_protocol: Option<&str>,
    annotations: &[(&str, &str)],
) -> String {
    let annotations = annotation_list(annotations);
    let app_protocol = app_protocol
        .map(|p| format!(", appProtocol: {p}"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}, annotations: {{{}}}}}\n\
         spec: {{clusterIP: \"{vip}\", ports: [{{name: http, port: 80, targetPort: {target_port}, protocol: TCP{app_protocol}}}]}}\n",
        annotations
    )
}

/// The EndpointSlice of `service`: its pods, ready, on `port`.
pub fn endpoint_slice(service: &str, namespace: &str, pods: &[&Pod], port: u16) -> String {
    let endpoints = ready_endpoints(pods, namespace);
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-1, namespace: {namespace}, \
         labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\n\
         ports: [{{name: http, port: {port}, protocol: TCP}}]\nendpoints: [{endpoints}]\n"
    )
}

/// A GAMMA HTTPRoute on port 80 of `service`, as Flagger writes one: every request (path prefix
/// `/`) split over the backend Services by these weights.
pub fn split_route(service: &str, namespace: &str, backends: &[(&str, u32)]) -> String {
    let backends: String = backends
        .iter()
        .map(|(name, weight)| {
            format!(
                "    - {{group: \"\", kind: Service, name: {name}, port: 80, weight: {weight}}}\n"
            )
        })
        .collect();
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: {service}, namespace: {namespace}}}\n\
         spec:\n  parentRefs: [{{group: core, kind: Service, name: {service}, port: 80}}]\n  rules:\n\
         \x20 - matches: [{{path: {{type: PathPrefix, value: /}}}}]\n\
         \x20   backendRefs:\n{backends}"
    )
}

/// A Pod of `node` running as `service_account`, with `annotations`.
pub fn pod_on(
    pod: &Pod,
    namespace: &str,
    node: &str,
    service_account: &str,
    annotations: &[(&str, &str)],
) -> String {
    let annotations = annotation_list(annotations);
    let (name, uid, ip) = (&pod.name, &pod.uid, pod.ip);
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, uid: {uid}, \
         annotations: {{{}}}}}\n\
         spec: {{nodeName: {node}, serviceAccountName: {service_account}, containers: [{{name: {name}, image: test}}]}}\n\
         status: {{phase: Running, podIP: \"{ip}\", podIPs: [{{ip: \"{ip}\"}}]}}\n",
        annotations
    )
}

/// A ClusterIP Service with one unnamed opaque TCP port forwarding to `target_port`, and its
/// EndpointSlice of `pods`.
pub fn tcp_service(
    name: &str,
    namespace: &str,
    vip: IpAddr,
    port: u16,
    target_port: u16,
    pods: &[&Pod],
) -> String {
    let endpoints = ready_endpoints(pods, namespace);
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         spec: {{clusterIP: \"{vip}\", ports: [{{port: {port}, targetPort: {target_port}, protocol: TCP, appProtocol: tcp}}]}}\n\
         ---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: {namespace}, \
         labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\n\
         ports: [{{port: {target_port}, protocol: TCP}}]\nendpoints: [{endpoints}]\n"
    )
}

/// EndpointSlice endpoints for `pods`, ready.
fn ready_endpoints(pods: &[&Pod], namespace: &str) -> String {
    let endpoints: Vec<String> = pods
        .iter()
        .map(|p| format!("{{addresses: [\"{}\"], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: {}, namespace: {namespace}}}}}", p.ip, p.name))
        .collect();
    endpoints.join(", ")
}

/// `key: "value"` pairs, as a YAML flow mapping's contents.
fn annotation_list(annotations: &[(&str, &str)]) -> String {
    let pairs: Vec<String> = annotations
        .iter()
        .map(|(k, v)| format!("{k}: \"{v}\""))
        .collect();
    pairs.join(", ")
}

/// An HTTPRoute on `service` (port 80) that sends the requests whose flag `flag` chose
/// `variant` (the `x-aviary-flag-<flag>` header the agent sets) to `chosen`, and the others to
/// `others`.
pub fn flag_route(
    service: &str,
    namespace: &str,
    flag: &str,
    variant: &str,
    chosen: &str,
    others: &str,
) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: {service}, namespace: {namespace}}}\n\
         spec:\n  parentRefs: [{{group: core, kind: Service, name: {service}, port: 80}}]\n  rules:\n\
         \x20 - matches: [{{headers: [{{name: x-aviary-flag-{flag}, value: \"{variant}\"}}]}}]\n\
         \x20   backendRefs: [{{name: {chosen}, port: 80}}]\n\
         \x20 - backendRefs: [{{name: {others}, port: 80}}]\n"
    )
}

/// flagd's flags (a flag file, or a FeatureFlag's `spec.flagSpec`): `flag` is "on" for
/// `percent`% of users by targeting key (`fractional`, "on" listed first, so a user it turned
/// on stays on as `percent` grows), "off" for the others.
pub fn rollout_flags(flag: &str, percent: u32) -> serde_json::Value {
    serde_json::json!({"flags": {flag: {
        "state": "ENABLED",
        "variants": {"on": true, "off": false},
        "defaultVariant": "off",
        "targeting": {"fractional": [["on", percent], ["off", 100 - percent]]},
    }}})
}

/// An OpenFeature Operator FeatureFlag holding `flag_spec`.
pub fn feature_flag(name: &str, namespace: &str, flag_spec: &serde_json::Value) -> String {
    format!(
        "apiVersion: core.openfeature.dev/v1beta1\nkind: FeatureFlag\n\
         metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  flagSpec: {flag_spec}\n"
    )
}
