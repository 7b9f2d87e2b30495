//! The cluster manifests in `deploy/`: valid objects, RBAC exactly as the agent uses it, a
//! DaemonSet that mounts what the agent opens and exposes its default ports, a Helm chart that
//! renders the same objects, and dashboards and Flagger templates over metrics that exist.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use aviary_agent::{
    config::{
        Args, Command, Config, PolicySource, Probe, DEFAULT_HEALTH_ADDR, DEFAULT_METRICS_ADDR,
        DEFAULT_OFREP_ADDR,
    },
    kubernetes::{api_access, node_pods},
    policy::{Meta, PodMeta},
    proxy::metrics::{
        DenialReason, Direction, Edge, FlagEvaluator, MethodClass, Metrics, MirrorOutcome,
        RequestLabels, Security,
    },
    table::Workload,
};
use clap::{CommandFactory as _, Parser as _};
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{Container, Namespace, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::Resource as _;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of a YAML file, as JSON values.
fn documents(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The objects `kubectl apply -k deploy/base` creates, in file order.
fn base_objects() -> Vec<Value> {
    let kustomization = &documents(&deploy().join("base/kustomization.yaml"))[0];
    kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|file| documents(&deploy().join("base").join(file.as_str().unwrap())))
        .collect()
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

/// Drops nulls and empty maps, which serializing a typed object leaves out or adds.
fn normalized(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), normalized(v)))
                .filter(|(_, v)| v.as_object().is_none_or(|m| !m.is_empty()))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(normalized).collect()),
        other => other.clone(),
    }
}

/// Parses `object` as `T` and back: a field `T` does not know (a typo) is lost on the way, and
/// the comparison fails.
fn round_trips_as<T: DeserializeOwned + Serialize>(object: &Value) -> T {
    let typed: T = serde_json::from_value(object.clone())
        .unwrap_or_else(|e| panic!("{e}: {}", object["metadata"]["name"]));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        normalized(&back),
        normalized(object),
        "{} {} has fields its type does not know",
        object["kind"],
        object["metadata"]["name"]
    );
    typed
}

#[test]
fn the_base_manifests_are_valid_kubernetes_objects() {
    let objects = base_objects();
    let kinds: Vec<&str> = objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "CustomResourceDefinition",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "DaemonSet",
            "Service",
            // The identity signer.
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Service",
            "Deployment",
        ]
    );
    for object in &objects {
        match object["kind"].as_str().unwrap() {
            "Namespace" => drop(round_trips_as::<Namespace>(object)),
            "CustomResourceDefinition" => drop(round_trips_as::<CustomResourceDefinition>(object)),
            "ServiceAccount" => drop(round_trips_as::<ServiceAccount>(object)),
            "ClusterRole" => drop(round_trips_as::<ClusterRole>(object)),
            "ClusterRoleBinding" => drop(round_trips_as::<ClusterRoleBinding>(object)),
            "Role" => drop(round_trips_as::<Role>(object)),
            "RoleBinding" => drop(round_trips_as::<RoleBinding>(object)),
            "DaemonSet" => drop(round_trips_as::<DaemonSet>(object)),
            "Deployment" => drop(round_trips_as::<Deployment>(object)),
            "Service" => drop(round_trips_as::<Service>(object)),
            other => panic!("unexpected kind {other}"),
        }
        let cluster_scoped = ["Namespace", "ClusterRole", "CustomResourceDefinition"];
        if !cluster_scoped.contains(&object["kind"].as_str().unwrap()) {
            let namespaced = !object["kind"].as_str().unwrap().starts_with("Cluster");
            if namespaced {
                assert_eq!(object["metadata"]["namespace"], "aviary-system", "{object}");
            }
        }
    }
}

/// `value` as an API server keeps it under a structural `schema`: fields it does not name are
/// pruned.
fn pruned(value: &Value, schema: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter_map(|(key, field)| {
                    let field_schema = schema["properties"]
                        .get(key)
                        .or_else(|| schema.get("additionalProperties"))?;
                    Some((key.clone(), pruned(field, field_schema)))
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

#[test]
fn the_node_pods_schema_keeps_every_field_an_agent_publishes() {
    let objects = base_objects();
    let crd = of_kind(&objects, "CustomResourceDefinition")[0];
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let pod = PodMeta {
        metadata: Meta {
            name: Some("payments-0".into()),
            namespace: Some("shop".into()),
            annotations: Some(
                [
                    ("aviary.dev/capture".into(), "enabled".into()),
                    ("aviary.dev/inbound-ports-exclude".into(), "9090".into()),
                ]
                .into(),
            ),
            ..Meta::default()
        },
        workload: "payments".into(),
        host_network: true,
        service_account: Some("payments".into()),
    };
    let published = serde_json::json!({"spec": node_pods::spec_of([pod])});
    assert_eq!(pruned(&published, schema), published);
    let kind = &crd["spec"]["names"];
    assert_eq!(
        (&kind["kind"], &kind["plural"], &crd["spec"]["group"]),
        (
            &Value::from(node_pods::NodePods::kind(&()).as_ref()),
            &Value::from(node_pods::NodePods::plural(&()).as_ref()),
            &Value::from(node_pods::NodePods::group(&()).as_ref()),
        )
    );
}

/// What the roles bound to the ServiceAccount `subject` grant: (group, resource, verb, whether
/// in a Role, the object it is limited to).
fn granted_to(
    objects: &[Value],
    subject: &str,
) -> BTreeSet<(String, String, String, bool, Option<String>)> {
    let mut granted = BTreeSet::new();
    for (binding_kind, role_kind) in [
        ("ClusterRoleBinding", "ClusterRole"),
        ("RoleBinding", "Role"),
    ] {
        for binding in of_kind(objects, binding_kind) {
            let subjects = binding["subjects"].as_array().unwrap();
            if !subjects.iter().any(|s| s["name"] == subject) {
                continue;
            }
            assert!(
                subjects.iter().all(|s| s["namespace"] == "aviary-system"),
                "{binding}"
            );
            let role = of_kind(objects, role_kind)
                .into_iter()
                .find(|r| r["metadata"]["name"] == binding["roleRef"]["name"])
                .unwrap_or_else(|| panic!("{binding_kind} names no {role_kind} there is"));
            for rule in role["rules"].as_array().unwrap() {
                let names: Vec<Option<String>> = match rule["resourceNames"].as_array() {
                    Some(names) => names
                        .iter()
                        .map(|n| Some(n.as_str().unwrap().to_owned()))
                        .collect(),
                    None => vec![None],
                };
                for group in rule["apiGroups"].as_array().unwrap() {
                    for resource in rule["resources"].as_array().unwrap() {
                        for verb in rule["verbs"].as_array().unwrap() {
                            for name in &names {
                                granted.insert((
                                    group.as_str().unwrap().to_owned(),
                                    resource.as_str().unwrap().to_owned(),
                                    verb.as_str().unwrap().to_owned(),
                                    role_kind == "Role",
                                    name.clone(),
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    granted
}

#[test]
fn rbac_grants_exactly_what_the_agent_and_the_signer_use() {
    let objects = base_objects();
    let mut agent = BTreeSet::new();
    for access in api_access() {
        for verb in &access.verbs {
            agent.insert((
                access.group.clone(),
                access.resource.clone(),
                verb.to_string(),
                access.namespaced,
                None,
            ));
        }
    }
    assert_eq!(granted_to(&objects, "aviary"), agent);
    let signer: BTreeSet<_> = aviary_identity::signer::api_access()
        .into_iter()
        .map(|a| {
            (
                a.group.to_owned(),
                a.resource.to_owned(),
                a.verb.to_owned(),
                a.namespaced,
                a.name.map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(granted_to(&objects, "aviary-identity"), signer);
}

fn daemonset() -> DaemonSet {
    let objects = base_objects();
    serde_json::from_value(of_kind(&objects, "DaemonSet")[0].clone()).unwrap()
}

/// The agent's flags, from the DaemonSet container's environment (each variable must be one
/// the agent reads, so a typo fails here) and its arguments.
fn agent_args(ds: &DaemonSet) -> Vec<String> {
    let container = &ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    let mut args = env_flags(Args::command(), container);
    args.extend(container.args.iter().flatten().cloned());
    args
}

/// A program's command line (its name, then a flag for each variable) from a container's
/// environment: each variable must be one the program reads, so a typo fails here.
fn env_flags(command: clap::Command, container: &Container) -> Vec<String> {
    let by_env: BTreeMap<String, String> = command
        .get_arguments()
        .filter_map(|a| Some((a.get_env()?.to_str()?.to_owned(), a.get_long()?.to_owned())))
        .collect();
    let mut args = vec![command.get_name().to_owned()];
    for env in container.env.iter().flatten() {
        let flag = by_env
            .get(&env.name)
            .unwrap_or_else(|| panic!("{} reads no variable {}", command.get_name(), env.name));
        // Downward API values are stand-ins of the right shape.
        let value = match (&env.value, env.name.as_str()) {
            (Some(value), _) => value.clone(),
            (None, "AVIARY_PROXY_IP") => "10.0.0.1".into(),
            (None, _) => "from-the-downward-api".into(),
        };
        args.extend([format!("--{flag}"), value]);
    }
    args
}

/// What a rolling update without a failed request needs of the DaemonSet (docs/install.md: Upgrades);
/// returns the agent's drain timeout and the pod's grace period.
fn check_hitless_upgrades(ds: &DaemonSet) -> (Duration, Duration) {
    let spec = ds.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    let container = &pod.containers[0];

    // The successor starts beside the old pod, which goes only once the successor is ready.
    let strategy = spec.update_strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.as_ref().unwrap();
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    // With host networking every declared port is a host port, and the scheduler would keep
    // the successor off a node whose old pod holds it: the rollout would stall.
    assert_eq!(pod.host_network, Some(true));
    for c in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        assert!(c.ports.is_none(), "{} declares ports", c.name);
    }

    let args = agent_args(ds);
    let flag = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .unwrap_or_else(|| panic!("no --{name}= in {args:?}"))
            .to_owned()
    };

    // Readiness: only this pod's agent's answer counts (both share the health port).
    let pod_name = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "POD_NAME")
        .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(pod_name, Some("metadata.name"));
    let readiness = container.readiness_probe.as_ref().unwrap();
    assert!(readiness.http_get.is_none());
    let command = readiness.exec.as_ref().unwrap().command.clone().unwrap();
    let init = &pod.init_containers.as_deref().unwrap()[0];
    assert_eq!(command[0], init.command.as_deref().unwrap()[0], "the agent");
    let parsed = Args::try_parse_from(
        ["aviary-agent"]
            .into_iter()
            .chain(command[1..].iter().map(String::as_str)),
    )
    .unwrap();
    assert!(
        matches!(parsed.command, Some(Command::Probe(Probe::Ready { .. }))),
        "{command:?}"
    );

    let drain = aviary_agent::policy::gamma::parse_duration(&flag("drain-timeout"))
        .unwrap()
        .expect("a drain timeout");
    let grace = Duration::from_secs(pod.termination_grace_period_seconds.unwrap() as u64);
    (drain, grace)
}

#[test]
fn the_daemonset_configures_mounts_and_exposes_what_the_agent_uses() {
    let ds = daemonset();
    let spec = ds.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    let container = &pod.containers[0];

    // The environment is a complete, valid agent configuration for the API-server source.
    let cfg = Config::try_from(Args::try_parse_from(agent_args(&ds)).unwrap()).unwrap();
    assert!(matches!(cfg.policy, PolicySource::Kubernetes { .. }));
    let env = |name: &str| {
        container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
    };
    let field = |name: &str| {
        env(name)
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.clone())
    };
    assert_eq!(field("NODE_NAME").as_deref(), Some("spec.nodeName"));
    assert_eq!(field("AVIARY_PROXY_IP").as_deref(), Some("status.hostIP"));
    // Applications find OFREP where they would find a flagd, at their node's address.
    assert_eq!(cfg.ofrep_addr, DEFAULT_OFREP_ADDR.parse().ok());

    // Every path the agent opens is inside a host mount; the hand-off socket's, which both
    // pods of an upgrade mount, is made if missing, and writable.
    let mounts = container.volume_mounts.as_deref().unwrap();
    // The pod cgroups are found at start, under the host's cgroup v2 mount.
    assert_eq!(cfg.cgroup_root, None);
    let cgroup2 = Path::new("/sys/fs/cgroup");
    for path in [cfg.bpffs.as_path(), cgroup2, cfg.handoff_socket.as_path()] {
        let mount = mounts
            .iter()
            .find(|m| path.starts_with(&m.mount_path))
            .unwrap_or_else(|| panic!("nothing mounted for {}", path.display()));
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .unwrap();
        assert_eq!(
            volume.host_path.as_ref().map(|h| h.path.as_str()),
            Some(mount.mount_path.as_str())
        );
        if path == cfg.handoff_socket {
            let kind = volume.host_path.as_ref().and_then(|h| h.type_.as_deref());
            assert_eq!(kind, Some("DirectoryOrCreate"));
            assert_eq!(mount.read_only, None);
        }
    }
    // Workload identities: the signer's Service, its trust bundle, and a token of its audience.
    let identity = cfg.identity.as_ref().expect("workload identities are on");
    let signer_flags = aviary_identity::config::Flags::try_parse_from(["aviary-identity"]).unwrap();
    assert_eq!(
        identity.signer,
        format!(
            "aviary-identity.{}.svc:{}",
            signer_flags.namespace,
            aviary_identity::config::DEFAULT_PORT
        )
    );
    let volume_at = |path: &Path| {
        let mount = mounts
            .iter()
            .find(|m| path.parent() == Some(Path::new(&m.mount_path)))
            .unwrap_or_else(|| panic!("nothing mounted for {}", path.display()));
        assert_eq!(mount.read_only, Some(true));
        pod.volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .unwrap()
    };
    let bundle = volume_at(&identity.trust_bundle)
        .config_map
        .as_ref()
        .unwrap();
    assert_eq!(bundle.name, signer_flags.trust_bundle);
    assert_eq!(bundle.optional, Some(true));
    let file = identity.trust_bundle.file_name().unwrap();
    assert_eq!(file, aviary_identity::signer::CA_CERTIFICATE);
    let token = volume_at(&identity.token)
        .projected
        .as_ref()
        .unwrap()
        .sources
        .as_ref()
        .unwrap()[0]
        .service_account_token
        .clone()
        .unwrap();
    assert_eq!(token.audience, Some(signer_flags.token_audience));
    assert_eq!(Path::new(&token.path), identity.token.file_name().unwrap());

    let bpffs = mounts
        .iter()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .unwrap();
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("HostToContainer"));
    let init = &pod.init_containers.as_deref().unwrap()[0];
    assert_eq!(init.command.as_deref().unwrap()[1], "mount-bpffs");
    assert_eq!(
        init.volume_mounts.as_deref().unwrap()[0]
            .mount_propagation
            .as_deref(),
        Some("Bidirectional")
    );

    // The metrics Service and the liveness probe use the agent's default ports.
    let default_port = |addr: &str| i32::from(addr.parse::<std::net::SocketAddr>().unwrap().port());
    assert_eq!(
        cfg.metrics_addr.port() as i32,
        default_port(DEFAULT_METRICS_ADDR)
    );
    let objects = base_objects();
    let service: Service = serde_json::from_value(of_kind(&objects, "Service")[0].clone()).unwrap();
    assert_eq!(
        service.spec.unwrap().ports.unwrap()[0].target_port,
        Some(IntOrString::Int(default_port(DEFAULT_METRICS_ADDR)))
    );
    let liveness = container
        .liveness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .unwrap();
    assert_eq!(liveness.path.as_deref(), Some("/healthz"));
    assert_eq!(
        liveness.port,
        IntOrString::Int(default_port(DEFAULT_HEALTH_ADDR))
    );
    let (drain, grace) = check_hitless_upgrades(&ds);
    assert!(
        drain < grace,
        "drain timeout {drain:?}, grace period {grace:?}"
    );

    // Node-wide, least privilege, on every node.
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.host_pid, None);
    let security = container.security_context.as_ref().unwrap();
    assert_eq!(security.privileged, Some(false));
    let caps = security.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(
        caps.add.as_deref(),
        Some(
            &[
                "BPF".to_owned(),
                "PERFMON".to_owned(),
                "NET_ADMIN".to_owned()
            ][..]
        )
    );
    assert_eq!(
        pod.tolerations.as_deref().unwrap()[0].operator.as_deref(),
        Some("Exists")
    );
    let resources = container.resources.as_ref().unwrap();
    assert!(resources.requests.is_some() && resources.limits.is_some());
    assert_eq!(pod.service_account_name.as_deref(), Some("aviary"));
}

// The CRD-based objects, as typed models of the fields these manifests use: unknown fields are
// refused, so a typo or a misplaced field fails (the upstream CRD schemas are not vendored here).

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Crd<S> {
    api_version: String,
    kind: String,
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: S,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceMonitorSpec {
    selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    namespace_selector: BTreeMap<String, Vec<String>>,
    endpoints: Vec<MonitorEndpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MonitorEndpoint {
    port: String,
    path: String,
    interval: String,
    honor_labels: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CanarySpec {
    provider: String,
    target_ref: BTreeMap<String, String>,
    progress_deadline_seconds: Option<u32>,
    service: CanaryService,
    analysis: Analysis,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CanaryService {
    port: u16,
    target_port: u16,
    gateway_refs: Vec<GatewayRef>,
    /// What Flagger sets on the apex Service.
    apex: Option<CustomMetadata>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CustomMetadata {
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GatewayRef {
    name: String,
    namespace: String,
    group: String,
    kind: String,
    port: u16,
}

/// `headers: {name: {exact|regex: value}}`.
type HeaderMatches = BTreeMap<String, BTreeMap<String, BTreeMap<String, String>>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Analysis {
    interval: String,
    threshold: u32,
    max_weight: Option<u32>,
    step_weight: Option<u32>,
    iterations: Option<u32>,
    mirror: Option<bool>,
    mirror_weight: Option<u32>,
    #[serde(rename = "match")]
    matches: Option<Vec<HeaderMatches>>,
    metrics: Vec<CanaryMetric>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CanaryMetric {
    name: String,
    template_ref: Option<BTreeMap<String, String>>,
    threshold_range: BTreeMap<String, f64>,
    interval: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricTemplateSpec {
    provider: BTreeMap<String, String>,
    query: String,
}

fn typed<S: DeserializeOwned>(object: &Value) -> Crd<S> {
    serde_json::from_value(object.clone())
        .unwrap_or_else(|e| panic!("{e}: {}", object["metadata"]["name"]))
}

/// The metric names a PromQL expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (start, _) in expr
        .match_indices("aviary_")
        .chain(expr.match_indices("http_request"))
    {
        let name: String = expr[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        names.insert(name);
    }
    names
}

/// Every series name the agent can export (the eBPF ones come from its counter names).
fn exported() -> BTreeSet<String> {
    // A family shows once it has a series: record one of each.
    let metrics = Metrics::new(true, None);
    let name = |s: &str| -> Arc<str> { s.into() };
    let edge = Edge {
        direction: Direction::outbound,
        source_namespace: name("a"),
        source_workload: name("a"),
        destination_namespace: name("b"),
        destination_service: name("b"),
        destination_workload: name("b"),
        destination_version: name("b"),
        source_principal: name("spiffe://cluster.local/ns/a/sa/a"),
        destination_principal: name("spiffe://cluster.local/ns/b/sa/b"),
        connection_security_policy: Security::mutual_tls,
    };
    let labels = RequestLabels {
        edge: edge.clone(),
        method: MethodClass::GET,
        status_code: 200,
        mirror: false,
    };
    let pod = Workload {
        namespace: name("b"),
        workload: name("b"),
        pod: name("b-1"),
    };
    metrics
        .request_series(&labels, Some(&pod))
        .record(std::time::Duration::from_millis(1));
    metrics.mirror(MirrorOutcome::Sent, &name("b"), &name("b"));
    metrics.denied(DenialReason::not_allowed, None, &pod);
    let flags = aviary_flags::FlagSet::parse(&serde_json::json!({"flags": {"f": {
        "state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on"}}}))
    .unwrap();
    let resolution = flags.evaluate("f", &serde_json::Map::new(), 0);
    metrics.flag_evaluation(FlagEvaluator::proxy, &name("b"), &name("f"), &resolution);
    let tcp = metrics.tcp_series(&edge);
    tcp.opened();
    tcp.closed(1, 1);
    let text = metrics.render();
    let mut names: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .flat_map(|l| {
            let mut words = l.split(' ');
            let (name, kind) = (words.next().unwrap(), words.next().unwrap());
            match kind {
                "counter" => vec![format!("{name}_total")],
                "histogram" => ["_bucket", "_count", "_sum"]
                    .iter()
                    .map(|s| format!("{name}{s}"))
                    .collect(),
                _ => vec![name.to_owned()],
            }
        })
        .collect();
    names.extend(
        aviary_abi::counter::NAMES
            .iter()
            .map(|n| format!("aviary_ebpf_{n}_total")),
    );
    names.insert("aviary_ebpf_map_entries".into());
    names
}

#[test]
fn the_monitoring_and_flagger_objects_are_well_formed_and_query_real_metrics() {
    let exported = exported();
    let monitor = &documents(&deploy().join("monitoring/servicemonitor.yaml"))[0];
    let monitor: Crd<ServiceMonitorSpec> = typed(monitor);
    assert_eq!(
        (monitor.api_version.as_str(), monitor.kind.as_str()),
        ("monitoring.coreos.com/v1", "ServiceMonitor")
    );
    // It selects the metrics Service, by its labels and its port's name.
    let objects = base_objects();
    let service: Service = serde_json::from_value(of_kind(&objects, "Service")[0].clone()).unwrap();
    let labels = service.metadata.labels.clone().unwrap_or_default();
    let selector = monitor
        .spec
        .selector
        .match_labels
        .clone()
        .unwrap_or_default();
    assert!(
        !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        "{selector:?} vs {labels:?}"
    );
    let endpoint = &monitor.spec.endpoints[0];
    let service_port = &service.spec.as_ref().unwrap().ports.as_deref().unwrap()[0];
    assert_eq!(service_port.name.as_deref(), Some(endpoint.port.as_str()));
    assert_eq!(endpoint.path, "/metrics");
    assert!(
        endpoint.honor_labels,
        "Flagger's labels name the destination pod"
    );
    assert!(!endpoint.interval.is_empty() && !monitor.spec.namespace_selector.is_empty());
    assert_eq!(monitor.metadata.namespace.as_deref(), Some("aviary-system"));

    let mut canaries = 0;
    let mut templates = BTreeSet::new();
    let mut referenced = BTreeSet::new();
    let (mut flagged, mut defined) = (BTreeSet::new(), BTreeSet::new());
    for entry in fs::read_dir(deploy().join("flagger")).unwrap() {
        for object in documents(&entry.unwrap().path()) {
            match object["kind"].as_str().unwrap() {
                "Canary" => {
                    canaries += 1;
                    let canary: Crd<CanarySpec> = typed(&object);
                    assert_eq!(canary.api_version, "flagger.app/v1beta1");
                    assert_eq!(canary.spec.provider, "gatewayapi:v1");
                    let parent = &canary.spec.service.gateway_refs[0];
                    assert_eq!(
                        (parent.group.as_str(), parent.kind.as_str()),
                        ("core", "Service")
                    );
                    assert_eq!(parent.port, canary.spec.service.port);
                    assert_eq!(parent.name, canary.spec.target_ref["name"]);
                    let _ = (&parent.namespace, canary.spec.service.target_port);
                    let a = &canary.spec.analysis;
                    assert!(a.step_weight.is_some() || a.iterations.is_some());
                    if a.mirror == Some(true) {
                        assert!(a.iterations.is_some(), "Flagger mirrors only in blue/green");
                        assert!(
                            a.metrics.iter().all(|m| m.template_ref.is_none()),
                            "the built-in checks count the canary's answers to the copies"
                        );
                    }
                    let _ = (&a.interval, a.threshold, a.max_weight, a.mirror_weight);
                    // An analysis of a flag's users matches the header the apex Service's flag
                    // sets, of a flag the file defines.
                    let apex = canary.spec.service.apex.as_ref();
                    if let Some(flags) =
                        apex.and_then(|apex| apex.annotations.get("aviary.dev/flags"))
                    {
                        let matched: Vec<&String> = a
                            .matches
                            .iter()
                            .flatten()
                            .flat_map(|m| m.values())
                            .flat_map(|h| h.keys())
                            .collect();
                        let header = |key: &str| format!("x-aviary-flag-{key}");
                        assert!(
                            flags
                                .split(',')
                                .any(|key| matched.contains(&&header(key.trim()))),
                            "{matched:?} match no header of {flags}"
                        );
                        flagged.extend(flags.split(',').map(|key| key.trim().to_owned()));
                    }
                    let _ = canary.spec.progress_deadline_seconds;
                    for metric in &a.metrics {
                        let _ = (&metric.threshold_range, &metric.interval);
                        match &metric.template_ref {
                            Some(r) => drop(referenced.insert(r["name"].clone())),
                            None => assert!(
                                ["request-success-rate", "request-duration"]
                                    .contains(&metric.name.as_str()),
                                "{} is not built in",
                                metric.name
                            ),
                        }
                    }
                }
                "MetricTemplate" => {
                    let template: Crd<MetricTemplateSpec> = typed(&object);
                    assert_eq!(template.spec.provider["type"], "prometheus");
                    let names = metric_names(&template.spec.query);
                    assert!(!names.is_empty());
                    for name in names {
                        assert!(exported.contains(&name), "{name} is not exported");
                    }
                    templates.insert(template.metadata.name.unwrap());
                }
                "FeatureFlag" => {
                    let flag =
                        aviary_agent::policy::feature_flag::FeatureFlag::from_json(object).unwrap();
                    let flags = flag.flags.expect("the example's flags are good");
                    defined.extend(flags.keys().map(str::to_owned));
                }
                other => panic!("unexpected kind {other}"),
            }
        }
    }
    assert_eq!(
        canaries, 4,
        "canary, A/B, blue/green and feature flag examples"
    );
    assert!(
        !flagged.is_empty() && flagged.is_subset(&defined),
        "{flagged:?} vs {defined:?}"
    );
    assert!(
        referenced.is_subset(&templates),
        "{referenced:?} vs {templates:?}"
    );
}

#[test]
fn the_grafana_dashboard_queries_real_metrics() {
    let exported = exported();
    let text = fs::read_to_string(deploy().join("grafana/aviary-dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let mut names = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            names.extend(metric_names(target["expr"].as_str().unwrap()));
        }
    }
    for name in &names {
        assert!(exported.contains(name), "{name} is not exported");
    }
    for needed in [
        "aviary_requests_total",
        "aviary_request_duration_seconds_bucket",
        "aviary_mirror_requests_total",
        "aviary_ebpf_connect_captured_total",
        "aviary_ebpf_connect_failed_open_total",
    ] {
        assert!(names.contains(needed), "the dashboard lacks {needed}");
    }
}

#[test]
fn the_signer_runs_from_the_image_with_valid_flags_and_no_privileges() {
    let objects = base_objects();
    let deployment: Deployment =
        serde_json::from_value(of_kind(&objects, "Deployment")[0].clone()).unwrap();
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("aviary-identity"));
    let container = &pod.containers[0];
    let command = container.command.clone().unwrap();
    assert_eq!(command, ["/usr/local/bin/aviary-identity"]);
    let dockerfile = fs::read_to_string(deploy().join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains("/src/target/release/aviary-identity /usr/local/bin/aviary-identity"),
        "the image carries no signer"
    );

    // Its environment is a valid configuration (each variable one the signer reads).
    let args = env_flags(aviary_identity::config::Flags::command(), container);
    let flags = aviary_identity::config::Flags::try_parse_from(args).unwrap();
    assert_eq!(flags.certificate_lifetime, Duration::from_secs(24 * 3600));

    // The Service reaches the port it listens on.
    let port = container.ports.as_ref().unwrap()[0].container_port;
    assert_eq!(port, i32::from(aviary_identity::config::DEFAULT_PORT));
    assert_eq!(flags.listen.port(), aviary_identity::config::DEFAULT_PORT);
    let service = of_kind(&objects, "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "aviary-identity")
        .unwrap();
    assert_eq!(service["spec"]["ports"][0]["targetPort"], port);
    assert_eq!(
        service["spec"]["selector"],
        deployment
            .metadata
            .labels
            .map(|l| serde_json::to_value(l).unwrap())
            .unwrap()
    );

    // It needs no privilege at all.
    let security = container.security_context.as_ref().unwrap();
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(
        security.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_owned()][..])
    );
}

// The Helm chart. helm cannot be installed on these machines, so its templates are generated
// from deploy/base by fixed substitutions (`AVIARY_UPDATE_CHART=1 cargo test --test deploy`
// rewrites them), and rendered here by a renderer of exactly the template syntax they use.

/// Base text -> template text.
const SUBSTITUTIONS: [(&str, &str); 15] = [
    (
        "ghcr.io/aviary-mesh/aviary-agent:0.1.0",
        "{{ .Values.image.repository }}:{{ .Values.image.tag }}",
    ),
    (
        "namespace: aviary-system",
        "namespace: {{ .Release.Namespace }}",
    ),
    (
        "aviary-identity.aviary-system.svc",
        "aviary-identity.{{ .Release.Namespace }}.svc",
    ),
    (
        "matchNames: [aviary-system]",
        "matchNames: [{{ .Release.Namespace }}]",
    ),
    (
        "AVIARY_CGROUP_ROOT\n              value: \"\"",
        "AVIARY_CGROUP_ROOT\n              value: {{ .Values.cgroupRoot | quote }}",
    ),
    ("value: json", "value: {{ .Values.logFormat }}"),
    (
        "--drain-timeout=20s",
        "--drain-timeout={{ .Values.drainTimeout }}",
    ),
    (
        "terminationGracePeriodSeconds: 30",
        "terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}",
    ),
    (
        "value: auto",
        "value: {{ .Values.inbound.interfaces | quote }}",
    ),
    (
        "AVIARY_INBOUND_BRIDGE\n              value: \"\"",
        "AVIARY_INBOUND_BRIDGE\n              value: {{ .Values.inbound.bridge | quote }}",
    ),
    (
        "AVIARY_OFREP_ADDR\n              value: \"0.0.0.0:8016\"",
        "AVIARY_OFREP_ADDR\n              value: {{ .Values.ofrep.addr | quote }}",
    ),
    ("cpu: 100m", "cpu: {{ .Values.resources.requests.cpu }}"),
    (
        "memory: 64Mi",
        "memory: {{ .Values.resources.requests.memory }}",
    ),
    (
        "cpu: \"2\"",
        "cpu: {{ .Values.resources.limits.cpu | quote }}",
    ),
    (
        "memory: 512Mi",
        "memory: {{ .Values.resources.limits.memory }}",
    ),
];

const GENERATED: &str =
    "# Generated from deploy/ by tests/tests/deploy.rs; edit the plain manifests.\n";

/// The chart's templates: every base file but the Namespace (`helm install --create-namespace`
/// makes it), and the ServiceMonitor behind a value.
fn chart_templates() -> BTreeMap<String, String> {
    let mut templates = BTreeMap::new();
    let kustomization = &documents(&deploy().join("base/kustomization.yaml"))[0];
    let files = kustomization["resources"].as_array().unwrap().iter();
    for file in files
        .map(|f| f.as_str().unwrap())
        .filter(|f| *f != "namespace.yaml")
    {
        let text = fs::read_to_string(deploy().join("base").join(file)).unwrap();
        templates.insert(file.to_owned(), format!("{GENERATED}{}", substitute(&text)));
    }
    let monitor = fs::read_to_string(deploy().join("monitoring/servicemonitor.yaml")).unwrap();
    templates.insert(
        "servicemonitor.yaml".into(),
        format!(
            "{GENERATED}{{{{- if .Values.serviceMonitor.enabled }}}}\n{}{{{{- end }}}}\n",
            substitute(&monitor)
        ),
    );
    templates
}

fn substitute(text: &str) -> String {
    SUBSTITUTIONS
        .iter()
        .fold(text.to_owned(), |text, (from, to)| text.replace(from, to))
}

/// Renders a template with `values`: `{{ .Values.a.b }}`, `| quote`, `{{ .Release.Namespace }}`,
/// and a whole-file `{{- if .Values.x }}` block.
fn render(template: &str, values: &Value, namespace: &str) -> String {
    let lookup = |path: &str| -> Value {
        path.trim_start_matches(".Values.")
            .split('.')
            .fold(values, |v, key| &v[key])
            .clone()
    };
    let mut text = template.to_owned();
    if let Some(start) = text.find("{{- if ") {
        let end = text[start..].find("}}").unwrap() + start;
        let condition = text[start + 7..end].trim().to_owned();
        let body_start = text[end..].find('\n').unwrap() + end + 1;
        let close = text.rfind("{{- end }}").expect("an end for the if");
        text = if lookup(&condition).as_bool().unwrap_or(false) {
            format!("{}{}", &text[..start], &text[body_start..close])
        } else {
            text[..start].to_owned()
        };
    }
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("}}").unwrap() + start;
        let expr = rest[start + 2..end].trim();
        let (path, quote) = match expr.strip_suffix("| quote") {
            Some(path) => (path.trim(), true),
            None => (expr, false),
        };
        let value = match path {
            ".Release.Namespace" => namespace.to_owned(),
            path => match lookup(path) {
                Value::String(s) => s,
                Value::Null => panic!("no value {path}"),
                other => other.to_string(),
            },
        };
        out.push_str(&if quote { format!("\"{value}\"") } else { value });
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

#[test]
fn the_helm_chart_renders_the_plain_manifests() {
    let chart = deploy().join("helm/aviary");
    let templates = chart_templates();
    let dir = chart.join("templates");
    if std::env::var_os("AVIARY_UPDATE_CHART").is_some() {
        for (name, text) in &templates {
            fs::write(dir.join(name), text).unwrap();
        }
    }
    let on_disk: BTreeMap<String, String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, fs::read_to_string(&path).unwrap())
        })
        .collect();
    assert!(
        on_disk == templates,
        "the chart's templates are stale: run AVIARY_UPDATE_CHART=1 cargo test -p aviary-tests --test deploy"
    );

    let mut values = documents(&chart.join("values.yaml")).remove(0);
    let rendered = |values: &Value| -> Vec<Value> {
        templates
            .values()
            .flat_map(|t| {
                let text = render(t, values, "aviary-system");
                serde_saphyr::from_multiple::<Value>(&text)
                    .unwrap()
                    .into_iter()
                    .filter(|d| !d.is_null())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let key = |o: &Value| format!("{}/{}", o["kind"], o["metadata"]["name"]);
    let sorted = |mut objects: Vec<Value>| {
        objects.sort_by_key(key);
        objects
    };
    let plain: Vec<Value> = base_objects()
        .into_iter()
        .filter(|o| o["kind"] != "Namespace")
        .collect();
    assert_eq!(sorted(rendered(&values)), sorted(plain.clone()));

    values["serviceMonitor"]["enabled"] = Value::Bool(true);
    let mut with_monitor = plain;
    with_monitor.extend(documents(&deploy().join("monitoring/servicemonitor.yaml")));
    assert_eq!(sorted(rendered(&values)), sorted(with_monitor));

    // Values change what they should: another namespace and image; the drain timeout and the
    // grace period, and the rendering still upgrades without a failed request.
    values["image"]["tag"] = Value::String("9.9.9".into());
    values["drainTimeout"] = Value::String("50s".into());
    values["terminationGracePeriodSeconds"] = Value::from(60);
    values["ofrep"]["addr"] = Value::String("off".into());
    let objects = rendered(&values);
    let ds = objects.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
    assert_eq!(
        ds["spec"]["template"]["spec"]["containers"][0]["image"],
        "ghcr.io/aviary-mesh/aviary-agent:9.9.9"
    );

    // In another namespace, the agents find the signer there.
    let elsewhere: String = templates
        .values()
        .map(|t| render(t, &values, "mesh"))
        .collect();
    assert!(elsewhere.contains("value: aviary-identity.mesh.svc:15012"));
    assert!(!elsewhere.contains("aviary-system"));
    let ds = round_trips_as::<DaemonSet>(ds);
    assert_eq!(
        check_hitless_upgrades(&ds),
        (Duration::from_secs(50), Duration::from_secs(60))
    );
    let cfg = Config::try_from(Args::try_parse_from(agent_args(&ds)).unwrap()).unwrap();
    assert_eq!(cfg.ofrep_addr, None, "OFREP turned off");
}

#[test]
fn the_chart_metadata_is_valid() {
    let chart = &documents(&deploy().join("helm/aviary/Chart.yaml"))[0];
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["name"], "aviary");
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"));
}
