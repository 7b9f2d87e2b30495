//! Local mode's policy files: any text is parsed as Kubernetes YAML, stored (with the log lines
//! and route statuses that come of it), and compiled into the enrolment policy and the routing
//! table, which then routes a few requests (rules, weights, endpoints, mirrors); none of it may
//! panic. A key that appears twice is an update, so the store's change log runs too.
#![no_main]

use aviary_agent::{
    policy::{self, compiler, local, service_routes::RouteOptions, Store},
    proxy::{
        balance,
        split::{pick_weighted, sampled, Rng},
    },
    table::{BackendRef, RequestView},
};
use http::{HeaderMap, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(objects) = local::parse_documents(text) else {
        return;
    };
    let mut store = Store::default();
    // One at a time, as a watch delivers them; then the whole listing, as a relist does.
    for object in objects.iter().cloned() {
        let _ = store.upsert(object);
    }
    let _ = store.replace_all(objects);
    // What the agent logs and reports of them: each change and refusal, each route's status.
    for change in store.take_changes() {
        let _ = change.to_string();
    }
    for (rejected, _) in store.rejections() {
        let _ = rejected.to_string();
    }
    let _ = compiler::route_statuses(&store);

    let local_policy = policy::compiler::policy(&store, None);
    let node_policy = policy::compiler::policy(&store, Some("node-a"));
    let _ = node_policy.describe_change(&local_policy);
    let _ = compiler::routing_notes(&store);

    let mut headers = HeaderMap::new();
    headers.insert("x-canary", HeaderValue::from_static("always"));
    headers.append("cookie", HeaderValue::from_static("canary=always"));
    headers.append("cookie", HeaderValue::from_static("session=1"));
    for options in [
        RouteOptions::default(),
        RouteOptions {
            node: Some("node-a".into()),
            inbound_capture: true,
            trust_domain: Some("cluster.local".into()),
        },
    ] {
        let table = compiler::routing_table(&store, &options);
        for service in table.services.values().chain(table.consumers.values()) {
            for (method, path, query) in [
                (Method::GET, "/", None),
                (Method::POST, "/api/v1/items", Some("v=2&debug")),
            ] {
                let request = RequestView {
                    method: &method,
                    path,
                    query,
                    headers: &headers,
                };
                let Some(rule) = service.route(&request) else {
                    continue;
                };
                // The draws each request makes: a backend by weight, an endpoint, a mirror.
                let mut rng = Rng::seeded(data.len() as u64);
                if let Some(index) = pick_weighted(rule.weights(), &mut rng) {
                    if let BackendRef::Service(backend) = &rule.backends[index].backend {
                        let _ = balance::pick(&backend.endpoints, None, &mut rng);
                    }
                }
                if let Some(mirror) = &rule.mirror {
                    let _ = sampled(mirror.numerator, mirror.denominator, &mut rng);
                }
            }
        }
    }
});
