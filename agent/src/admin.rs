//! The admin endpoint, on its own local port so that a slow query never competes with traffic:
//! `/healthz`, `/ready`, `/config_dump` (the snapshot in force) and `/stats/ebpf`.
//! `aviary-agent status` reads it and prints a summary; `aviary-agent probe ready` asks the
//! health port's `/ready` for the kubelet.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tracing::warn;

use crate::{
    ebpf::maps::Stats,
    identity::Certificates,
    proxy::metrics::Metrics,
    state::{Snapshot, SnapshotRx},
    table::{BackendRef, RouteTable, ServiceRoutes},
};

pub struct Admin {
    /// Set once the programs are attached and the first snapshot is in force.
    pub ready: Arc<AtomicBool>,
    pub snapshots: SnapshotRx,
    pub stats: Stats,
    /// The agent's pod, named in `/ready`'s answers ([`POD_HEADER`]).
    pub pod_name: Option<HeaderValue>,
    /// The workloads' certificates, whose state `/ready` reports (it does not make the agent
    /// unready: traffic flows without them).
    pub certificates: Option<Arc<Certificates>>,
}

/// The header in which `/ready` names the agent's pod: while a rolling update overlaps the old
/// and the new pod, both agents share the node's network and so the health port, and a probe
/// must tell which of them answered.
pub const POD_HEADER: &str = "aviary-pod";

/// How long `probe ready` waits for an answer: under the kubelet's probe timeout, so the
/// kubelet records the probe's own reason.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

impl Admin {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        serve_paths(listener, move |path| self.handle(path)).await
    }

    /// The health port, for the kubelet's probes from the node address: `/healthz` and
    /// `/ready` only.
    pub async fn serve_health(self: Arc<Self>, listener: TcpListener) {
        serve_paths(listener, move |path| match path {
            "/healthz" | "/ready" => self.handle(path),
            _ => text(
                StatusCode::NOT_FOUND,
                "unknown path; try /healthz, /ready\n",
            ),
        })
        .await
    }

    fn handle(&self, path: &str) -> Response<Full<Bytes>> {
        match path {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/ready" => ready_response(
                self.ready.load(Ordering::Acquire),
                self.pod_name.as_ref(),
                self.certificates.as_ref().map(|c| c.status()),
            ),
            "/config_dump" => self.json(config_dump(&self.snapshots.borrow())),
            "/stats/ebpf" => match (self.stats.counters(), self.stats.occupancy()) {
                (Ok(counters), Ok(occupancy)) => {
                    let counters: serde_json::Map<String, Value> = counters
                        .into_iter()
                        .map(|(name, value)| (name.to_owned(), value.into()))
                        .collect();
                    self.json(json!({ "counters": counters, "occupancy": occupancy }))
                }
                (Err(e), _) | (_, Err(e)) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("reading the maps: {e:#}\n"),
                ),
            },
            _ => text(
                StatusCode::NOT_FOUND,
                "unknown path; try /healthz, /ready, /config_dump, /stats/ebpf\n",
            ),
        }
    }

    fn json(&self, value: Value) -> Response<Full<Bytes>> {
        let mut response = text(StatusCode::OK, &format!("{value:#}\n"));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            "application/json".parse().expect("a valid header value"),
        );
        response
    }
}

fn ready_response(
    ready: bool,
    pod_name: Option<&HeaderValue>,
    detail: Option<String>,
) -> Response<Full<Bytes>> {
    let (status, mut body) = if ready {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the first policy snapshot\n".to_owned(),
        )
    };
    if let Some(detail) = detail {
        body.push_str(&detail);
        body.push('\n');
    }
    let mut response = text(status, &body);
    if let Some(pod) = pod_name {
        response.headers_mut().insert(POD_HEADER, pod.clone());
    }
    response
}

/// Answers each request on `listener` by its path alone: the admin and metrics ports serve
/// GETs of fixed documents.
pub async fn serve_paths<F>(listener: TcpListener, handle: F)
where
    F: Fn(&str) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let handle = Arc::new(handle);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let handler = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = handle(req.uri().path());
                async move { Ok::<_, Infallible>(response) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), handler)
                .await
            {
                warn!(error = %e, "admin or metrics connection failed");
            }
        });
    }
}

/// The metrics port: `/metrics`, in OpenMetrics text.
pub fn metrics_response(metrics: &Metrics, path: &str) -> Response<Full<Bytes>> {
    if path != "/metrics" {
        return text(StatusCode::NOT_FOUND, "unknown path; try /metrics\n");
    }
    let mut response = text(StatusCode::OK, &metrics.render());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    response
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response
}

/// The snapshot in force, as JSON: enrolled pods, captured addresses, and routes with weights.
pub fn config_dump(snapshot: &Snapshot) -> Value {
    json!({
        "generation": snapshot.generation,
        "enrolled": snapshot.policy.enrolled.values().collect::<Vec<_>>(),
        "captured": snapshot.policy.captured.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "routes": describe_routes(&snapshot.routes),
        "flags": describe_flags(&snapshot.routes),
    })
}

/// Each namespace's feature flags: every key, with the FeatureFlag object that answers it.
fn describe_flags(table: &RouteTable) -> Value {
    let namespaces = table.flags.iter().map(|(namespace, flags)| {
        let keys: serde_json::Map<String, Value> = flags
            .keys()
            .into_iter()
            .filter_map(|key| {
                let (object, _) = flags.sets.iter().find(|(_, set)| set.contains(key))?;
                Some((key.to_owned(), Value::from(object.as_str())))
            })
            .collect();
        (namespace.clone(), Value::Object(keys))
    });
    Value::Object(namespaces.collect())
}

/// Every routed service address, sorted, with its rules.
pub fn describe_routes(table: &RouteTable) -> Vec<Value> {
    let mut entries: Vec<(String, Option<&str>, &ServiceRoutes)> = table
        .services
        .iter()
        .map(|(addr, routes)| (addr.to_string(), None, routes.as_ref()))
        .chain(
            table
                .consumers
                .iter()
                .map(|((ns, addr), routes)| (addr.to_string(), Some(ns.as_str()), routes.as_ref())),
        )
        .collect();
    entries.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    entries
        .into_iter()
        .map(|(address, consumer, routes)| {
            let rules: Vec<Value> = routes
                .rules
                .iter()
                .map(|rule| {
                    let backends: Vec<Value> = rule
                        .backends
                        .iter()
                        .map(|b| match &b.backend {
                            BackendRef::Service(backend) => json!({
                                "name": backend.name,
                                "weight": b.weight,
                                "endpoints": backend.endpoints.iter().map(|e| e.addr.to_string()).collect::<Vec<_>>(),
                            }),
                            BackendRef::Invalid { name, reason } => json!({ "name": name, "weight": b.weight, "invalid": reason }),
                        })
                        .collect();
                    json!({
                        "matches": rule.matches.len(),
                        "backends": backends,
                        "mirror": rule.mirror.as_ref().map(|m| json!({
                            "backend": m.backend.name,
                            "share": format!("{}/{}", m.numerator, m.denominator),
                        })),
                        "timeout_ms": rule.timeout.map(|t| t.as_millis() as u64),
                        // A split that keeps each user on one backend: where the user is read.
                        "split_key": rule.split_key.as_ref().map(|k| k.source.to_string()),
                    })
                })
                .collect();
            json!({
                "address": address,
                "service": format!("{}/{}:{}", routes.namespace, routes.name, routes.port),
                "consumer_namespace": consumer,
                "protocol": format!("{:?}", routes.protocol),
                "endpoints": routes.default.endpoints.iter().map(|e| e.addr.to_string()).collect::<Vec<_>>(),
                "flags": routes.flags.as_deref().map(|f| json!({
                    "namespace": f.namespace,
                    "keys": f.flags.iter().map(|flag| &*flag.key).collect::<Vec<_>>(),
                    "targeting_key": f.targeting_key.as_ref().map(ToString::to_string),
                    "context_headers": f.context_headers.iter().map(|h| h.as_str()).collect::<Vec<_>>(),
                })),
                "rules": rules,
            })
        })
        .collect()
}

/// `aviary-agent status`: reads the admin endpoint and prints a summary.
pub async fn status(admin: SocketAddr) -> anyhow::Result<String> {
    let ready = get(admin, "/ready").await?;
    let dump: Value = serde_json::from_str(get(admin, "/config_dump").await?.body())?;
    let stats: Value = serde_json::from_str(get(admin, "/stats/ebpf").await?.body())?;
    let mut out = format!(
        "Aviary agent at {admin}: {}\n",
        if ready.status().is_success() {
            "ready"
        } else {
            ready.body().trim()
        }
    );
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    out += &format!(
        "Policy generation {}: {} pods enrolled, {} service addresses captured, {} routed\n",
        dump["generation"],
        list(&dump["enrolled"]).len(),
        list(&dump["captured"]).len(),
        list(&dump["routes"]).len()
    );
    for pod in list(&dump["enrolled"]) {
        out += &format!(
            "  enrolled {}/{}\n",
            pod["namespace"].as_str().unwrap_or("?"),
            pod["name"].as_str().unwrap_or("?")
        );
    }
    for route in list(&dump["routes"]) {
        let who = route["consumer_namespace"]
            .as_str()
            .map(|ns| format!(" (for {ns})"))
            .unwrap_or_default();
        let rules: Vec<String> = list(&route["rules"])
            .iter()
            .map(|rule| {
                let backends: Vec<String> = list(&rule["backends"])
                    .iter()
                    .map(|b| format!("{} {}", b["name"].as_str().unwrap_or("?"), b["weight"]))
                    .collect();
                let mirror = rule["mirror"]
                    .as_object()
                    .map(|m| {
                        format!(
                            "; mirror {} {}",
                            m["backend"].as_str().unwrap_or("?"),
                            m["share"].as_str().unwrap_or("")
                        )
                    })
                    .unwrap_or_default();
                format!("{}{mirror}", backends.join(", "))
            })
            .collect();
        let rules = if rules.is_empty() {
            "no rules: endpoints balanced".to_owned()
        } else {
            rules.join(" | ")
        };
        out += &format!(
            "  route {} {}{who}: {rules}\n",
            route["address"].as_str().unwrap_or("?"),
            route["service"].as_str().unwrap_or("?")
        );
    }
    let counters: Vec<String> = stats["counters"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    out += &format!("eBPF: {}\n", counters.join(" "));
    Ok(out)
}

/// `aviary-agent probe ready`: Ok if the agent at `health` is ready and, given `pod_name`, is
/// that pod's agent; else the reason.
pub async fn probe_ready(health: SocketAddr, pod_name: Option<&HeaderValue>) -> anyhow::Result<()> {
    let mut health = health;
    if health.ip().is_unspecified() {
        health.set_ip(match health {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let response = tokio::time::timeout(PROBE_TIMEOUT, get(health, "/ready"))
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {health} within {PROBE_TIMEOUT:?}"))??;
    let answered_by = response.headers().get(POD_HEADER);
    if let Some(pod) = pod_name.filter(|&pod| answered_by != Some(pod)) {
        let who = answered_by.map_or_else(
            || "an agent that names no pod".to_owned(),
            |other| {
                format!(
                    "the agent of pod {}",
                    String::from_utf8_lossy(other.as_bytes())
                )
            },
        );
        anyhow::bail!(
            "{who} answered on {health}, not this pod's ({}): this pod's agent does not serve yet",
            String::from_utf8_lossy(pod.as_bytes())
        );
    }
    anyhow::ensure!(response.status().is_success(), "{}", response.body().trim());
    Ok(())
}

async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Response<String>> {
    use anyhow::Context as _;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("no agent endpoint at {addr} (is the agent running?)"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = Request::get(path)
        .header("host", "aviary-admin")
        .body(Full::<Bytes>::default())?;
    let (parts, body) = sender.send_request(request).await?.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Response::from_parts(
        parts,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::table::{AppProtocol, Backend, Endpoint, HeaderModifier, Rule, WeightedBackend};

    /// A health port answering `/ready` as an agent of `pod` in the given state would.
    async fn health_port(ready: bool, pod: Option<&'static str>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pod = pod.map(HeaderValue::from_static);
        tokio::spawn(serve_paths(listener, move |_| {
            ready_response(ready, pod.as_ref(), None)
        }));
        addr
    }

    #[tokio::test]
    async fn the_ready_probe_counts_only_this_pods_agent() {
        let this = HeaderValue::from_static("aviary-new");
        let mine = health_port(true, Some("aviary-new")).await;
        probe_ready(mine, Some(&this)).await.unwrap();
        // The DaemonSet's probe asks the unspecified address: this host's loopback.
        probe_ready(([0, 0, 0, 0], mine.port()).into(), Some(&this))
            .await
            .unwrap();

        let old = health_port(true, Some("aviary-old")).await;
        let err = probe_ready(old, Some(&this)).await.unwrap_err().to_string();
        assert!(
            err.contains("the agent of pod aviary-old") && err.contains("(aviary-new)"),
            "{err}"
        );
        let unnamed = health_port(true, None).await;
        let err = probe_ready(unnamed, Some(&this)).await.unwrap_err();
        assert!(err.to_string().contains("names no pod"), "{err}");

        let starting = health_port(false, Some("aviary-new")).await;
        let err = probe_ready(starting, Some(&this)).await.unwrap_err();
        assert!(err.to_string().contains("not ready"), "{err}");
    }

    #[tokio::test]
    async fn without_a_pod_name_the_probe_asks_readiness_alone() {
        probe_ready(health_port(true, Some("aviary-old")).await, None)
            .await
            .unwrap();
        let err = probe_ready(health_port(false, None).await, None)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not ready"), "{err}");

        let closed = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap()
        };
        let err = probe_ready(closed, None).await.unwrap_err();
        assert!(err.to_string().contains("is the agent running"), "{err:#}");
    }

    #[test]
    fn routes_are_described_with_their_weights() {
        let backend = |name: &str, port: u16| {
            Arc::new(Backend {
                namespace: "demo".into(),
                name: name.into(),
                port: 80,
                endpoints: vec![Endpoint::new(
                    ([10, 244, 1, 3], port).into(),
                    None,
                    false,
                    None,
                )],
            })
        };
        let weighted = |b: &Arc<Backend>, weight| WeightedBackend {
            backend: BackendRef::Service(b.clone()),
            weight,
            request_headers: HeaderModifier::default(),
            response_headers: HeaderModifier::default(),
        };
        let (primary, canary) = (
            backend("podinfo-primary", 8080),
            backend("podinfo-canary", 8081),
        );
        let routes = Arc::new(ServiceRoutes {
            flags: None,
            namespace: "demo".into(),
            name: "podinfo".into(),
            port: 80,
            protocol: AppProtocol::Detect,
            rules: vec![Rule {
                backends: vec![weighted(&primary, 90), weighted(&canary, 10)],
                ..Default::default()
            }],
            default: primary.clone(),
        });
        let table = RouteTable {
            services: [("10.96.0.10:80".parse().unwrap(), routes)]
                .into_iter()
                .collect(),
            ..Default::default()
        };
        let described = describe_routes(&table);
        assert_eq!(described[0]["service"], "demo/podinfo:80");
        assert_eq!(
            described[0]["rules"][0]["backends"][1]["name"],
            "podinfo-canary"
        );
        assert_eq!(described[0]["rules"][0]["backends"][1]["weight"], 10);
        assert_eq!(
            described[0]["rules"][0]["backends"][0]["endpoints"][0],
            "10.244.1.3:8080"
        );
    }

    #[test]
    fn flags_are_described_by_namespace_with_the_object_that_answers_each() {
        let set = |flags: Value| {
            Arc::new(aviary_flags::FlagSet::parse(&json!({ "flags": flags })).unwrap())
        };
        let flag = json!({"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a"});
        let flags = crate::table::flags::NamespaceFlags {
            sets: vec![
                ("checkout".into(), set(json!({"new-checkout": flag}))),
                (
                    "ui".into(),
                    set(json!({"new-checkout": flag, "dark-mode": flag})),
                ),
            ],
        };
        let table = RouteTable {
            flags: [("shop".to_owned(), Arc::new(flags))].into_iter().collect(),
            ..Default::default()
        };
        assert_eq!(
            describe_flags(&table),
            json!({"shop": {"dark-mode": "ui", "new-checkout": "checkout"}})
        );
    }
}
