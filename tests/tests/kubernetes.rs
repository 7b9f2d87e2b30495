//! The Kubernetes source with the real kube-rs client against the list/watch fixture: initial
//! lists, watch events, bookmarks, 410 Gone, dropped streams, outages, a CRD that is not
//! installed, and status and Events written by the Lease holder only. Each agent publishes its
//! node's pods for the others and reads theirs. Then two agents' views of one cluster, each
//! driving its proxy, count every request once in Flagger's family.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use aviary_agent::{
    kubernetes::{self, lease::LeaseConfig, status::Report},
    metrics::sample,
    policy::service_routes::RouteOptions,
    proxy::{
        http::{HttpConfig, HttpProxy},
        metrics::Metrics,
    },
    state::{Publisher, Snapshot, SnapshotRx},
};
use aviary_tests::apiserver::ApiServer;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle,
};

const NODE: &str = "node-a";
const AGENT_NAMESPACE: &str = "aviary-system";
const NODE_PODS_API: &str = "aviary.dev/v1alpha1";
const ROUTE_API: &str = "gateway.networking.k8s.io/v1";

const CLUSTER: &str = include_str!("../fixtures/podinfo.yaml");

fn http_route(primary: i32, canary: i32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: podinfo, namespace: test}}\n\
         spec:\n  parentRefs: [{{group: \"\", kind: Service, name: podinfo, port: 80}}]\n  \
         rules: [{{backendRefs: [{{name: podinfo-primary, port: 80, weight: {primary}}}, \
         {{name: podinfo-canary, port: 80, weight: {canary}}}]}}]\n"
    )
}

/// The source as `run` wires it: watchers, the store, and (optionally) the status writer.
struct Source {
    snapshots: SnapshotRx,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Source {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn client(server: &ApiServer) -> kube::Client {
    let config = kube::Config::new(server.url().parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

fn start(server: &ApiServer, status_writer: Option<&str>) -> Source {
    start_with(server, status_writer.map(lease))
}

fn start_with(server: &ApiServer, status_writer: Option<LeaseConfig>) -> Source {
    start_on(server, NODE, false, status_writer)
}

/// The source of the agent on `node`.
fn start_on(
    server: &ApiServer,
    node: &str,
    inbound_capture: bool,
    status_writer: Option<LeaseConfig>,
) -> Source {
    let client = client(server);
    let (publisher, snapshots) = Publisher::new(RouteOptions {
        node: Some(node.into()),
        inbound_capture,
        trust_domain: None,
    });
    let (updates_tx, updates) = mpsc::channel(64);
    kubernetes::spawn_watchers(&client, node, updates_tx);
    let (reports_tx, reports) = watch::channel(Report::default());
    let (node_pods_tx, node_pods) = watch::channel(None);
    let mut tasks = vec![
        tokio::spawn(kubernetes::apply_updates(
            updates,
            publisher,
            reports_tx,
            node.into(),
            node_pods_tx,
        )),
        tokio::spawn(kubernetes::node_pods::publish(
            client.clone(),
            node.into(),
            node_pods,
        )),
    ];
    if let Some(lease) = status_writer {
        tasks.push(tokio::spawn(kubernetes::status::write_reports(
            client, lease, reports,
        )));
    }
    Source { snapshots, tasks }
}

fn lease(identity: &str) -> LeaseConfig {
    LeaseConfig {
        duration: Duration::from_secs(2),
        renew_every: Duration::from_millis(300),
        ..LeaseConfig::new(AGENT_NAMESPACE.into(), identity.into())
    }
}

/// Waits (bounded) until `check` holds for the newest snapshot.
async fn snapshot_where(
    snapshots: &mut SnapshotRx,
    what: &str,
    check: impl Fn(&Snapshot) -> bool,
) -> Arc<Snapshot> {
    let wait = async {
        loop {
            let snapshot = snapshots.borrow_and_update().clone();
            if check(&snapshot) {
                return snapshot;
            }
            snapshots.changed().await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for a snapshot where {what}"))
}

/// Polls `probe` (bounded) until it gives a value.
async fn eventually<T, F: Future<Output = Option<T>>>(what: &str, probe: impl Fn() -> F) -> T {
    for _ in 0..200 {
        if let Some(value) = probe().await {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting until {what}");
}

/// Who holds the status writer's Lease, if anyone.
fn lease_holder(server: &ApiServer) -> Option<String> {
    server
        .get(
            "coordination.k8s.io/v1",
            "Lease",
            "aviary-system",
            "aviary-status-writer",
        )
        .and_then(|lease| lease["spec"]["holderIdentity"].as_str().map(str::to_owned))
}

/// Waits until the server has had a request starting with `prefix` (method and path).
async fn requested(server: &ApiServer, what: &str, prefix: &str) {
    eventually(what, || async {
        server
            .requests()
            .iter()
            .any(|r| r.starts_with(prefix))
            .then_some(())
    })
    .await
}

fn captured(snapshot: &Snapshot, addr: &str) -> bool {
    snapshot
        .policy
        .captured
        .contains(&addr.parse::<SocketAddr>().unwrap())
}

/// The weights of the one rule on podinfo, as (backend, weight).
fn weights(snapshot: &Snapshot) -> Vec<(String, u32)> {
    let Some(service) = snapshot
        .routes
        .services
        .get(&"10.96.0.10:80".parse::<SocketAddr>().unwrap())
    else {
        return Vec::new();
    };
    service.rules[0]
        .backends
        .iter()
        .map(|b| (b.backend.name().to_owned(), b.weight))
        .collect()
}

#[tokio::test]
async fn lists_then_follows_watch_events() {
    let server = ApiServer::start().await.unwrap();
    server.apply_yaml(CLUSTER);
    server.apply_yaml(&http_route(90, 10));
    let mut source = start(&server, None);
    // Node-b's agent publishes what node-a needs of node-b's pods.
    let _node_b = start_on(&server, "node-b", false, None);

    let workload = |s: &Snapshot| {
        let primary = &s
            .routes
            .services
            .get(&"10.96.0.11:80".parse().unwrap())?
            .default;
        let pod = primary.endpoints.first()?.pod.as_ref()?;
        Some((
            pod.namespace.to_string(),
            pod.workload.to_string(),
            pod.pod.to_string(),
        ))
    };
    let first = snapshot_where(
        &mut source.snapshots,
        "the cluster is loaded, node-b's pods with it",
        |s| workload(s).is_some_and(|(_, w, _)| w != "unknown"),
    )
    .await;
    let enrolled: Vec<&str> = first
        .policy
        .enrolled
        .values()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(enrolled, ["client"], "only this node's pods are enrolled");
    // Another node's pod, as its agent published it, names the endpoint's workload.
    assert_eq!(
        workload(&first).unwrap(),
        (
            "test".into(),
            "podinfo-primary".into(),
            "podinfo-primary-5b6c8d-x2x9z".into()
        )
    );
    let published = server
        .get(NODE_PODS_API, "NodePods", "", "node-b")
        .expect("node-b's pods are published");
    assert_eq!(
        published["spec"],
        serde_json::json!({"pods": {"test": {"podinfo-primary-5b6c8d-x2x9z":
            {"workload": "podinfo-primary", "serviceAccount": "default"}}}}),
        "the workload and service account, and no other label or annotation"
    );
    let owner = &published["metadata"]["ownerReferences"][0];
    assert_eq!(
        (&owner["kind"], &owner["name"], &owner["uid"]),
        (
            &Value::from("Node"),
            &Value::from("node-b"),
            &server.get("v1", "Node", "", "node-b").unwrap()["metadata"]["uid"]
        ),
        "the object goes with its node"
    );
    assert!(captured(&first, "10.96.0.10:80"));
    assert_eq!(
        weights(&first),
        [
            ("podinfo-primary".into(), 90),
            ("podinfo-canary".into(), 10)
        ]
    );
    let requests = server.requests();
    assert!(
        requests.iter().any(|r| r.starts_with("GET /api/v1/pods?")
            && r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "{requests:#?}"
    );
    // No agent lists or watches pods beyond its own node's.
    let pods_of_the_cluster: Vec<&String> = requests
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("fieldSelector"))
        .collect();
    assert!(pods_of_the_cluster.is_empty(), "{pods_of_the_cluster:#?}");
    eventually("watches with bookmarks are open", || async {
        server
            .requests()
            .iter()
            .any(|r| r.contains("watch=true") && r.contains("allowWatchBookmarks=true"))
            .then_some(())
    })
    .await;

    server.apply_yaml(&http_route(50, 50));
    snapshot_where(&mut source.snapshots, "the new weights apply", |s| {
        weights(s)
            == [
                ("podinfo-primary".into(), 50),
                ("podinfo-canary".into(), 50),
            ]
    })
    .await;
    // Node-b's pod goes: its agent says so, and node-a no longer knows the endpoint's workload.
    server.delete("v1", "Pod", "test", "podinfo-primary-5b6c8d-x2x9z");
    snapshot_where(
        &mut source.snapshots,
        "the endpoint of a pod no node runs has no workload",
        |s| workload(s).is_some_and(|(_, w, _)| w == "unknown"),
    )
    .await;
    server.delete("v1", "Service", "test", "podinfo-canary");
    snapshot_where(
        &mut source.snapshots,
        "the deleted service is no longer captured",
        |s| !captured(s, "10.96.0.12:80"),
    )
    .await;
    server.delete("v1", "Namespace", "", "test");
    snapshot_where(
        &mut source.snapshots,
        "the namespace's pods are unenrolled",
        |s| s.policy.enrolled.is_empty(),
    )
    .await;
}

#[tokio::test]
async fn bookmarks_outages_and_410_gone_keep_the_last_good_state_then_relist() {
    let server = ApiServer::start().await.unwrap();
    server.apply_yaml(CLUSTER);
    let mut source = start(&server, None);
    let loaded = snapshot_where(&mut source.snapshots, "the cluster is loaded", |s| {
        captured(s, "10.96.0.12:80")
    })
    .await;
    eventually("every watch is open", || async {
        (server.open_watches() == 7).then_some(())
    })
    .await;
    server.bookmark();

    // An outage: every request fails and the streams end. Policy stays as it was.
    server.set_down(true);
    server.delete("v1", "Service", "test", "podinfo-canary");
    server.apply_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: added, namespace: test}\n\
         spec: {clusterIP: 10.96.0.13, ports: [{port: 80}]}\n",
    );
    // The history the watchers would resume from is gone: they must get 410 and relist.
    server.compact();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        source.snapshots.borrow().generation,
        loaded.generation,
        "nothing changes while the API server is away"
    );
    assert!(captured(&source.snapshots.borrow(), "10.96.0.12:80"));

    let lists_before = server
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/services?") && !r.contains("watch=true"))
        .count();
    server.set_down(false);
    snapshot_where(&mut source.snapshots, "the relist's changes apply", |s| {
        !captured(s, "10.96.0.12:80") && captured(s, "10.96.0.13:80")
    })
    .await;
    let requests = server.requests();
    let lists_after = requests
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/services?") && !r.contains("watch=true"))
        .count();
    assert!(
        lists_after > lists_before,
        "a relist after 410: {requests:#?}"
    );

    // A dropped stream resumes from where it was, without a relist.
    eventually("every watch is open again", || async {
        (server.open_watches() == 7).then_some(())
    })
    .await;
    server.drop_watches();
    server.apply_yaml(&http_route(90, 10));
    snapshot_where(
        &mut source.snapshots,
        "an event after the reconnect applies",
        |s| weights(s).len() == 2,
    )
    .await;
}

#[tokio::test]
async fn without_the_httproute_crd_policy_applies_and_routes_arrive_once_it_is_installed() {
    let server = ApiServer::start().await.unwrap();
    server.apply_yaml(CLUSTER);
    server.set_served(ROUTE_API, "HTTPRoute", false);
    let mut source = start(&server, None);
    let first = snapshot_where(&mut source.snapshots, "policy without routes", |s| {
        s.generation > 0
    })
    .await;
    assert!(captured(&first, "10.96.0.10:80"));
    assert!(weights(&first).is_empty());

    server.set_served(ROUTE_API, "HTTPRoute", true);
    server.apply_yaml(&http_route(80, 20));
    snapshot_where(&mut source.snapshots, "the route applies", |s| {
        weights(s)
            == [
                ("podinfo-primary".into(), 80),
                ("podinfo-canary".into(), 20),
            ]
    })
    .await;
}

const FLAG_API: &str = "core.openfeature.dev/v1beta1";

/// A FeatureFlag in the enrolled namespace: `new-checkout` on for `share`% of users.
fn feature_flag(share: i32, default_variant: &str) -> String {
    format!(
        "apiVersion: {FLAG_API}\nkind: FeatureFlag\nmetadata: {{name: checkout, namespace: test}}\n\
         spec:\n  flagSpec:\n    flags:\n      new-checkout:\n        state: ENABLED\n        \
         variants: {{\"on\": true, \"off\": false}}\n        defaultVariant: \"{default_variant}\"\n        \
         targeting: {{fractional: [[\"on\", {share}], [\"off\", {}]]}}\n",
        100 - share
    )
}

/// Of 1,000 users, how many the snapshot's `new-checkout` turns on.
fn users_on(snapshot: &Snapshot) -> Option<usize> {
    let flags = snapshot.routes.flags.get("test")?;
    let on = (0..1000)
        .filter(|user| {
            let context = serde_json::Map::from_iter([(
                "targetingKey".to_owned(),
                Value::from(format!("user-{user}")),
            )]);
            flags.evaluate("new-checkout", &context, 0).variant == Some("on")
        })
        .count();
    Some(on)
}

#[tokio::test]
async fn feature_flags_come_from_featureflag_objects_and_a_bad_one_keeps_the_last_good_version() {
    let server = ApiServer::start().await.unwrap();
    server.apply_yaml(CLUSTER);
    // Without OpenFeature's CRD, policy applies; its flags arrive once it is installed.
    server.set_served(FLAG_API, "FeatureFlag", false);
    let mut source = start(&server, Some(NODE));
    let first = snapshot_where(&mut source.snapshots, "policy without flags", |s| {
        s.generation > 0
    })
    .await;
    assert!(first.routes.flags.is_empty());
    server.set_served(FLAG_API, "FeatureFlag", true);
    server.apply_yaml(&feature_flag(20, "off"));
    let at_20 = snapshot_where(&mut source.snapshots, "the flag applies", |s| {
        users_on(s).is_some()
    })
    .await;
    let on_at_20 = users_on(&at_20).unwrap();
    assert!(
        (150..=250).contains(&on_at_20),
        "{on_at_20} of 1000 users on at 20%"
    );

    // A default variant that is not one: refused, with an Event, and 20% stays in force.
    server.apply_yaml(&feature_flag(50, "maybe"));
    an_event_is_posted(&server, "about the FeatureFlag").await;
    assert_eq!(
        users_on(&source.snapshots.borrow_and_update()),
        Some(on_at_20)
    );

    // Fixed, at 50%: every user the flag turned on at 20% is still on.
    server.apply_yaml(&feature_flag(50, "off"));
    let at_50 = snapshot_where(&mut source.snapshots, "the flag at 50% applies", |s| {
        users_on(s).is_some_and(|on| on > on_at_20)
    })
    .await;
    let flags_20 = &at_20.routes.flags["test"];
    let flags_50 = &at_50.routes.flags["test"];
    for user in 0..1000 {
        let context = serde_json::Map::from_iter([(
            "targetingKey".to_owned(),
            Value::from(format!("user-{user}")),
        )]);
        if flags_20.evaluate("new-checkout", &context, 0).variant == Some("on") {
            assert_eq!(
                flags_50.evaluate("new-checkout", &context, 0).variant,
                Some("on")
            );
        }
    }

    server.delete(FLAG_API, "FeatureFlag", "test", "checkout");
    snapshot_where(&mut source.snapshots, "the deleted flags are gone", |s| {
        s.routes.flags.is_empty()
    })
    .await;
}

/// Waits (bounded) until an Event is created in the namespace `test`.
async fn an_event_is_posted(server: &ApiServer, about: &str) {
    eventually(&format!("a Warning event {about}"), || async {
        server
            .requests()
            .iter()
            .any(|r| r.starts_with("POST /apis/events.k8s.io/v1/namespaces/test/events"))
            .then_some(())
    })
    .await;
}

fn our_conditions(route: &Value) -> Vec<String> {
    route["status"]["parents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["controllerName"] == "aviary.dev/agent")
        .flat_map(|p| p["conditions"].as_array().cloned().unwrap_or_default())
        .map(|c| {
            format!(
                "{}={}/{}",
                c["type"].as_str().unwrap(),
                c["status"].as_str().unwrap(),
                c["reason"].as_str().unwrap()
            )
        })
        .collect()
}

async fn route_conditions(server: &ApiServer, expected: &[&str]) -> Value {
    eventually(
        &format!("the route's conditions are {expected:?}"),
        || async {
            let route = server.get(ROUTE_API, "HTTPRoute", "test", "podinfo")?;
            (our_conditions(&route) == expected).then_some(route)
        },
    )
    .await
}

#[tokio::test]
async fn a_bad_route_keeps_its_last_good_version_and_says_why_in_status_and_an_event() {
    let server = ApiServer::start().await.unwrap();
    server.apply_yaml(CLUSTER);
    server.apply_yaml(&http_route(90, 10));
    // Another controller's entry, which Aviary must leave alone.
    let mut other = server
        .get(ROUTE_API, "HTTPRoute", "test", "podinfo")
        .unwrap();
    other["status"] = serde_json::json!({"parents": [{"controllerName": "example.com/other",
        "parentRef": {"name": "podinfo"}, "conditions": []}]});
    server.apply(other);
    let mut source = start(&server, Some(NODE));

    let route = route_conditions(
        &server,
        &["Accepted=True/Accepted", "ResolvedRefs=True/ResolvedRefs"],
    )
    .await;
    assert_eq!(route["status"]["parents"].as_array().unwrap().len(), 2);
    assert_eq!(
        route["status"]["parents"][1]["conditions"][0]["observedGeneration"],
        1
    );

    server.apply_yaml(&http_route(0, 0));
    let route = route_conditions(
        &server,
        &[
            "Accepted=False/UnsupportedValue",
            "ResolvedRefs=True/ResolvedRefs",
        ],
    )
    .await;
    let message = route["status"]["parents"][1]["conditions"][0]["message"]
        .as_str()
        .unwrap();
    assert!(message.contains("weight 0"), "{message}");
    assert_eq!(
        route["status"]["parents"][1]["conditions"][0]["observedGeneration"],
        2
    );
    assert_eq!(
        route["status"]["parents"][0]["controllerName"],
        "example.com/other"
    );
    assert_eq!(
        weights(&source.snapshots.borrow_and_update()),
        [
            ("podinfo-primary".into(), 90),
            ("podinfo-canary".into(), 10)
        ],
        "the last good version stays in force"
    );
    an_event_is_posted(&server, "about the route").await;

    // Fixed: accepted again, and the new weights apply.
    server.apply_yaml(&http_route(0, 100));
    route_conditions(
        &server,
        &["Accepted=True/Accepted", "ResolvedRefs=True/ResolvedRefs"],
    )
    .await;
    snapshot_where(&mut source.snapshots, "the fixed route applies", |s| {
        weights(s)
            == [
                ("podinfo-primary".into(), 0),
                ("podinfo-canary".into(), 100),
            ]
    })
    .await;

    // Deleted and created again under the same name, it is a new route: its status is written.
    server.delete(ROUTE_API, "HTTPRoute", "test", "podinfo");
    snapshot_where(&mut source.snapshots, "the deleted route is gone", |s| {
        weights(s).is_empty()
    })
    .await;
    server.apply_yaml(&http_route(0, 100));
    route_conditions(
        &server,
        &["Accepted=True/Accepted", "ResolvedRefs=True/ResolvedRefs"],
    )
    .await;
}

#[tokio::test]
async fn only_the_lease_holder_writes_status_and_another_agent_takes_over() {
    let server = ApiServer::start().await.unwrap();
    server.apply_yaml(CLUSTER);
    server.apply_yaml(&http_route(90, 10));
    let first = start(&server, Some("node-a"));
    eventually("node-a holds the lease", || async {
        (lease_holder(&server).as_deref() == Some("node-a")).then_some(())
    })
    .await;
    let second = start(&server, Some("node-b"));
    route_conditions(
        &server,
        &["Accepted=True/Accepted", "ResolvedRefs=True/ResolvedRefs"],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        lease_holder(&server).as_deref(),
        Some("node-a"),
        "the holder keeps renewing"
    );
    let writes = |server: &ApiServer| {
        server
            .requests()
            .iter()
            .filter(|r| r.starts_with("PATCH") && r.contains("/status"))
            .count()
    };
    assert_eq!(writes(&server), 1, "one writer, one write for one route");

    // The holder goes away; the other agent takes over after the lease expires and writes.
    drop(first);
    eventually("node-b holds the lease", || async {
        (lease_holder(&server).as_deref() == Some("node-b")).then_some(())
    })
    .await;
    server.apply_yaml(&http_route(0, 0));
    route_conditions(
        &server,
        &[
            "Accepted=False/UnsupportedValue",
            "ResolvedRefs=True/ResolvedRefs",
        ],
    )
    .await;
    drop(second);
}

/// The RBAC verb a request needs, and the resource it is on: "group/resource" (with a
/// subresource after a second slash).
fn rbac_of(request: &str) -> (String, String, &'static str) {
    let (method, target) = request.split_once(' ').unwrap();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", _, rest @ ..] => ("", rest),
        ["apis", group, _, rest @ ..] => (*group, rest),
        _ => panic!("not an API path: {request}"),
    };
    let (resource, named) = match rest {
        [resource] => (resource.to_string(), false),
        ["namespaces", _, resource] => (resource.to_string(), false),
        ["namespaces", _, resource, _] => (resource.to_string(), true),
        ["namespaces", _, resource, _, sub] => (format!("{resource}/{sub}"), true),
        [resource, _] => (resource.to_string(), true),
        _ => panic!("unexpected path {request}"),
    };
    let verb = match (method, named) {
        ("GET", false) if query.contains("watch=true") => "watch",
        ("GET", false) => "list",
        ("GET", true) => "get",
        ("POST", false) => "create",
        ("PUT", true) => "update",
        ("PATCH", true) => "patch",
        _ => panic!("unexpected request {request}"),
    };
    (group.to_owned(), resource, verb)
}

#[tokio::test]
async fn the_agent_uses_exactly_the_api_access_it_declares() {
    let server = ApiServer::start().await.unwrap();
    server.apply_yaml(CLUSTER);
    server.apply_yaml(&http_route(0, 0));
    let _source = start(&server, Some(NODE));
    // Everything the agent does: list, watch, hold the lease, write status, record an Event.
    requested(
        &server,
        "the refused route's Event is recorded",
        "POST /apis/events.k8s.io/",
    )
    .await;
    route_conditions(
        &server,
        &[
            "Accepted=False/UnsupportedValue",
            "ResolvedRefs=True/ResolvedRefs",
        ],
    )
    .await;
    requested(
        &server,
        "the lease is renewed",
        "PUT /apis/coordination.k8s.io/",
    )
    .await;
    // A new pod on the node: its published pods are replaced.
    server.apply_yaml(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: second, namespace: test, uid: u2}\n\
         spec: {nodeName: node-a, containers: [{name: c, image: test}]}\n",
    );
    requested(
        &server,
        "this node's pods are published again",
        "PUT /apis/aviary.dev/v1alpha1/nodepods/node-a",
    )
    .await;
    let used: std::collections::BTreeSet<(String, String, &str)> =
        server.requests().iter().map(|r| rbac_of(r)).collect();
    let declared: std::collections::BTreeSet<(String, String, &str)> = kubernetes::api_access()
        .into_iter()
        .flat_map(|a| {
            a.verbs
                .into_iter()
                .map(move |verb| (a.group.clone(), a.resource.clone(), verb))
        })
        .collect();
    let undeclared: Vec<_> = used.difference(&declared).collect();
    assert!(
        undeclared.is_empty(),
        "used but not declared: {undeclared:?}"
    );
    // Patching an Event happens only when the same Event repeats; everything else is used here.
    let unused: Vec<_> = declared.difference(&used).collect();
    assert_eq!(
        unused,
        [&("events.k8s.io".to_owned(), "events".to_owned(), "patch")],
        "declared but not used"
    );
}

#[tokio::test]
async fn a_released_lease_passes_to_another_agent_at_once() {
    let server = ApiServer::start().await.unwrap();
    server.apply_yaml(CLUSTER);
    // Long enough that only a release explains a quick takeover.
    let long = |identity: &str| LeaseConfig {
        duration: Duration::from_secs(60),
        ..lease(identity)
    };
    let holder = || lease_holder(&server);
    let first = start_with(&server, Some(long("node-a")));
    eventually("node-a holds the lease", || async {
        (holder().as_deref() == Some("node-a")).then_some(())
    })
    .await;
    let _second = start_with(&server, Some(long("node-b")));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(holder().as_deref(), Some("node-a"));

    // What run() does on SIGTERM: stop the writer, then release.
    drop(first);
    let released = kubernetes::lease::release(client(&server), &long("node-a"))
        .await
        .unwrap();
    assert!(released);
    let started = std::time::Instant::now();
    eventually("node-b holds the lease", || async {
        (holder().as_deref() == Some("node-b")).then_some(())
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        !kubernetes::lease::release(client(&server), &long("node-a"))
            .await
            .unwrap(),
        "only the holder releases"
    );
}

// Flagger's family across nodes: node-a runs the caller; node-b runs four pods, two of them
// enrolled by annotations that contradict their namespace's. Every address is on loopback, so
// nothing this test sends can leave the machine (the Services' addresses are never dialled).
const TWO_NODES: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, annotations: {aviary.dev/capture: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
spec: {nodeName: node-a, containers: [{name: c, image: test}]}
status: {phase: Running, podIP: 127.0.10.1}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-out, namespace: shop, annotations: {aviary.dev/capture: disabled}}
spec: {nodeName: node-b, containers: [{name: c, image: test}]}
status: {phase: Running, podIP: 127.0.10.11}
---
apiVersion: v1
kind: Pod
metadata: {name: shadow-enrolled, namespace: shop}
spec: {nodeName: node-b, containers: [{name: c, image: test}]}
status: {phase: Running, podIP: 127.0.10.12}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-in, namespace: plain, annotations: {aviary.dev/capture: enabled}}
spec: {nodeName: node-b, containers: [{name: c, image: test}]}
status: {phase: Running, podIP: 127.0.10.21}
---
apiVersion: v1
kind: Pod
metadata: {name: shadow-plain, namespace: plain}
spec: {nodeName: node-b, containers: [{name: c, image: test}]}
status: {phase: Running, podIP: 127.0.10.22}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop, annotations: {aviary.dev/mirror: reviews-shadow}}
spec: {clusterIP: 127.0.96.11, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-shadow, namespace: shop}
spec: {clusterIP: 127.0.96.12, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: plain, annotations: {aviary.dev/mirror: ratings-shadow}}
spec: {clusterIP: 127.0.96.21, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings-shadow, namespace: plain}
spec: {clusterIP: 127.0.96.22, ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-1, namespace: shop, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{name: http, port: 9898, protocol: TCP}]
endpoints: [{addresses: ["127.0.10.11"], targetRef: {kind: Pod, name: opted-out}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-shadow-1, namespace: shop, labels: {kubernetes.io/service-name: reviews-shadow}}
addressType: IPv4
ports: [{name: http, port: 9898, protocol: TCP}]
endpoints: [{addresses: ["127.0.10.12"], targetRef: {kind: Pod, name: shadow-enrolled}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ratings-1, namespace: plain, labels: {kubernetes.io/service-name: ratings}}
addressType: IPv4
ports: [{name: http, port: 9898, protocol: TCP}]
endpoints: [{addresses: ["127.0.10.21"], targetRef: {kind: Pod, name: opted-in}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ratings-shadow-1, namespace: plain, labels: {kubernetes.io/service-name: ratings-shadow}}
addressType: IPv4
ports: [{name: http, port: 9898, protocol: TCP}]
endpoints: [{addresses: ["127.0.10.22"], targetRef: {kind: Pod, name: shadow-plain}}]
"#;

/// The port the pods serve on, as their EndpointSlices say.
const POD_PORT: u16 = 9898;

/// Tasks a test started, stopped when it ends however it ends.
struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Accepts on `listener` and hands each connection to `serve` with its peer.
fn accept_each<F: Future<Output = ()> + Send + 'static>(
    listener: TcpListener,
    serve: impl Fn(TcpStream, SocketAddr) -> F + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            tokio::spawn(serve(stream, peer));
        }
    })
}

/// A pod's HTTP/1.1 server at `addr`: answers 200 and counts the requests it served.
async fn pod_server(addr: SocketAddr, served: Arc<AtomicUsize>) -> JoinHandle<()> {
    let listener = TcpListener::bind(addr).await.unwrap();
    accept_each(listener, move |stream, _| {
        let served = served.clone();
        async move {
            let service = hyper::service::service_fn(move |_request| {
                served.fetch_add(1, Ordering::Relaxed);
                async { Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from("ok")))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    })
}

/// An HTTP proxy over the agent's routing table of `snapshot`, with metrics of its own.
fn proxy_of(snapshot: &Snapshot) -> (Arc<HttpProxy>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new(true, None));
    let routes = Arc::new(ArcSwap::new(snapshot.routes.clone()));
    // Mark 0: no socket mark (that needs CAP_NET_ADMIN, and nothing captures here).
    let proxy = HttpProxy::new(HttpConfig::default(), routes, 0, metrics.clone());
    (Arc::new(proxy), metrics)
}

/// Each request and mirror copy in Flagger's family by the pod that served it: node-a's outbound
/// proxy and node-b's inbound proxy, each over the routing table its agent compiled from the
/// fixture, count it once between them, whatever the pod's annotations say.
#[tokio::test]
async fn flaggers_family_counts_each_request_once_across_two_agents() {
    let server = ApiServer::start().await.unwrap();
    server.apply_yaml(TWO_NODES);
    let mut node_a = start_on(&server, "node-a", true, None);
    let mut node_b = start_on(&server, "node-b", true, None);
    let vips = [
        "127.0.96.11:80",
        "127.0.96.12:80",
        "127.0.96.21:80",
        "127.0.96.22:80",
    ];
    let a = snapshot_where(
        &mut node_a.snapshots,
        "node-a has every endpoint, and node-b's pods as node-b published them",
        |s| {
            vips.iter().all(|vip| {
                s.routes
                    .services
                    .get(&vip.parse::<SocketAddr>().unwrap())
                    .is_some_and(|r| {
                        r.default
                            .endpoints
                            .iter()
                            .any(|e| e.pod.as_ref().is_some_and(|p| &*p.workload != "unknown"))
                    })
            })
        },
    )
    .await;
    let b = snapshot_where(&mut node_b.snapshots, "node-b enrols its pods", |s| {
        s.policy.enrolled.len() == 2
    })
    .await;

    // Node-b enrols its pods by their own annotations, over their namespaces'; node-a, which
    // knows them as node-b publishes them, leaves exactly those to node-b.
    let mut enrolled: Vec<&str> = b
        .policy
        .enrolled
        .values()
        .map(|p| p.name.as_str())
        .collect();
    enrolled.sort();
    assert_eq!(enrolled, ["opted-in", "shadow-enrolled"]);
    let at_destination: Vec<(String, bool)> = vips
        .iter()
        .map(|vip| {
            &a.routes.services[&vip.parse::<SocketAddr>().unwrap()]
                .default
                .endpoints[0]
        })
        .map(|e| {
            (
                e.pod.as_ref().unwrap().pod.to_string(),
                e.measured_at_destination,
            )
        })
        .collect();
    let expected = [
        ("opted-out", false),
        ("shadow-enrolled", true),
        ("opted-in", true),
        ("shadow-plain", false),
    ];
    assert_eq!(
        at_destination,
        expected.map(|(pod, at)| (pod.to_owned(), at))
    );

    // The pods. Inbound capture needs root, so node-b's is played by its inbound proxy listening
    // at the address of each pod port its policy captures (as capture.rs fills the TC programs'
    // map), in front of the pod, which then serves on another port of its address.
    let (outbound, metrics_a) = proxy_of(&a);
    let (inbound, metrics_b) = proxy_of(&b);
    let mut tasks = Tasks(Vec::new());
    let mut served = Vec::new();
    for (pod, _) in expected {
        let ip = a
            .routes
            .services
            .values()
            .flat_map(|r| &r.default.endpoints)
            .find(|e| e.pod.as_ref().is_some_and(|p| &*p.pod == pod))
            .unwrap()
            .addr
            .ip();
        let captured = b
            .policy
            .enrolled
            .values()
            .any(|p| p.ips.contains(&ip) && !p.inbound_ports_excluded.contains(&POD_PORT));
        let count = Arc::new(AtomicUsize::new(0));
        served.push((pod, count.clone()));
        let port = if captured {
            POD_PORT + 10_000
        } else {
            POD_PORT
        };
        let app = SocketAddr::new(ip, port);
        tasks.0.push(pod_server(app, count).await);
        if captured {
            let listener = TcpListener::bind((ip, POD_PORT)).await.unwrap();
            let inbound = inbound.clone();
            tasks.0.push(accept_each(listener, move |stream, peer| {
                inbound.clone().serve_inbound(stream, app, peer)
            }));
        }
    }

    // The caller, at its pod's address, through node-a's outbound proxy: every GET is served by
    // the Service's pod and mirrored to its shadow.
    let requests = [
        ("127.0.96.11:80", "reviews.shop", 5),
        ("127.0.96.21:80", "ratings.plain", 3),
    ];
    for (vip, host, count) in requests {
        let vip: SocketAddr = vip.parse().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = listener.local_addr().unwrap();
        let outbound = outbound.clone();
        tasks.0.push(accept_each(listener, move |stream, peer| {
            outbound.clone().serve(stream, vip, peer)
        }));
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.10.1:0".parse().unwrap()).unwrap();
        let stream = socket.connect(proxy_addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tasks.0.push(tokio::spawn(async move {
            let _ = conn.await;
        }));
        for _ in 0..count {
            let request = hyper::Request::get("/")
                .header("host", host)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let response =
                tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
                    .await
                    .expect("an answer in time")
                    .unwrap();
            assert_eq!(response.status(), 200);
        }
    }

    // Each pod served what the caller sent its Service; the copies are measured once their
    // responses are read, after the caller had its own, and Aviary's own family tells them
    // apart on both sides: 5 + 3 copies from node-a, of which node-b's pod served 5.
    let mirrored = |metrics: &Metrics, direction: &str| {
        let labels = [("direction", direction), ("mirror", "true")];
        sample(&metrics.render(), "aviary_requests_total", &labels)
    };
    eventually("every copy is served and measured", || async {
        let served: Vec<usize> = served
            .iter()
            .map(|(_, s)| s.load(Ordering::Relaxed))
            .collect();
        let measured = (
            mirrored(&metrics_a, "outbound"),
            mirrored(&metrics_b, "inbound"),
        );
        (served == [5, 5, 3, 3] && measured == (8.0, 5.0)).then_some(())
    })
    .await;

    // Flagger's family, on node-a and on node-b: each request and copy once, by its pod.
    let flagger = |metrics: &Metrics, pod: &str| {
        let labels = [("kubernetes_pod_name", pod)];
        sample(
            &metrics.render(),
            "http_request_duration_seconds_count",
            &labels,
        ) as usize
    };
    let counted: Vec<(&str, (usize, usize))> = served
        .iter()
        .map(|(pod, _)| (*pod, (flagger(&metrics_a, pod), flagger(&metrics_b, pod))))
        .collect();
    assert_eq!(
        counted,
        [
            ("opted-out", (5, 0)),
            ("shadow-enrolled", (0, 5)),
            ("opted-in", (0, 3)),
            ("shadow-plain", (3, 0)),
        ]
    );
}
