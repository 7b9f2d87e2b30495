//! Kubernetes objects for the agent's local mode, as YAML.

use std::net::IpAddr;

use crate::Pod;

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
    pod_with_uid(&pod.name, &pod.uid, namespace, capture)
}

pub fn pod_with_uid(name: &str, uid: &str, namespace: &str, capture: Option<&str>) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, uid: {uid}{}}}\n\
         spec: {{containers: [{{name: {name}, image: test}}]}}\n",
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
