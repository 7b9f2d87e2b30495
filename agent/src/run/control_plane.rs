//! The control plane's long-lived tasks: the policy source and the routing table it feeds,
//! workload certificates, capture, the admin, health, metrics and OFREP endpoints, and
//! housekeeping.
//! Each runs under the [`Supervisor`]: one that ends is a failure of the agent.

use std::{
    path::{Path, PathBuf},
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
};
use tracing::info;

use crate::{
    admin::{metrics_response, serve_paths, Admin},
    capture,
    cgroup::PodCgroups,
    config::{Config, PolicySource},
    ebpf::maps::{CaptureTable, Stats},
    handoff::{ListenerKind, Sockets},
    identity::{self, Certificates},
    kubernetes::{
        self,
        lease::{release, LeaseConfig},
    },
    metrics::SWEEP_INTERVAL,
    ofrep::{self, Ofrep},
    policy::{self, Store},
    proxy::metrics::Metrics,
    state::{Publisher, SnapshotRx},
    supervise::Supervisor,
    table::RouteTable,
};

/// How long shutdown waits to hand the status lease back.
const LEASE_RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// Watcher updates waiting for the store; a full queue holds the watchers back.
const UPDATE_QUEUE: usize = 4096;

/// How often the eBPF counters and map occupancy are read for the metrics.
const EBPF_METRICS_INTERVAL: Duration = Duration::from_secs(1);

/// How often the eBPF counters are logged, when they changed.
const COUNTER_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Puts each snapshot's routes in force for the proxy: one atomic swap.
pub fn spawn_routing_table(
    supervisor: &mut Supervisor,
    mut snapshots: SnapshotRx,
    routes: Arc<ArcSwap<RouteTable>>,
) {
    supervisor.spawn("routing table", async move {
        while snapshots.changed().await.is_ok() {
            let snapshot = snapshots.borrow_and_update().clone();
            routes.store(snapshot.routes.clone());
        }
    });
}

/// Keeps the certificates of the identities the snapshots' pods need, when the agent has a
/// signer.
pub fn spawn_identity(
    supervisor: &mut Supervisor,
    cfg: &Config,
    snapshots: SnapshotRx,
    certificates: Option<&Arc<Certificates>>,
) {
    let Some((config, certificates)) = cfg.identity.clone().zip(certificates.cloned()) else {
        return;
    };
    let (wanted_tx, wanted) = watch::channel(Default::default());
    supervisor.spawn(
        "workload identities",
        identity::follow(snapshots, config.trust_domain.clone(), wanted_tx),
    );
    supervisor.spawn(
        "workload certificates",
        identity::maintain(config, wanted, certificates),
    );
}

/// The route status writer of an agent that runs one, and its lease.
pub struct StatusWriter {
    writer: tokio::task::JoinHandle<()>,
    client: kube::Client,
    lease: LeaseConfig,
}

impl StatusWriter {
    /// Stops the writer and hands its lease back, so that another agent takes over status
    /// writing at once instead of after the lease expires.
    pub async fn release(self) {
        self.writer.abort();
        let released = release(self.client, &self.lease);
        match tokio::time::timeout(LEASE_RELEASE_TIMEOUT, released).await {
            Ok(Ok(true)) => info!(lease = %self.lease.name, "released the status lease"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not release the status lease; it expires by itself")
            }
            Err(_) => tracing::warn!("releasing the status lease timed out; it expires by itself"),
        }
    }
}

/// Policy from its source (files, or the API server's watchers) into `publisher`; with the
/// API server, this node's pods for the other agents, and the status writer if this agent
/// runs one.
pub async fn spawn_policy_source(
    supervisor: &mut Supervisor,
    cfg: &Config,
    publisher: Publisher,
) -> anyhow::Result<Option<StatusWriter>> {
    let (kubeconfig, node, namespace, write_status) = match &cfg.policy {
        PolicySource::Local(path) => {
            supervisor.spawn("local policy", watch_local(path.clone(), publisher));
            return Ok(None);
        }
        PolicySource::Kubernetes {
            kubeconfig,
            node,
            namespace,
            write_status,
        } => (kubeconfig, node, namespace, *write_status),
    };
    let client = kubernetes::client(kubeconfig.as_deref()).await?;
    let (updates_tx, updates) = mpsc::channel(UPDATE_QUEUE);
    kubernetes::spawn_watchers(&client, node, updates_tx);
    let (reports_tx, reports) = watch::channel(Default::default());
    let (node_pods_tx, node_pods) = watch::channel(None);
    supervisor.spawn(
        "policy",
        kubernetes::apply_updates(updates, publisher, reports_tx, node.clone(), node_pods_tx),
    );
    supervisor.spawn(
        "this node's pods, for the other nodes",
        kubernetes::node_pods::publish(client.clone(), node.clone(), node_pods),
    );
    if !write_status {
        return Ok(None);
    }
    let lease = LeaseConfig::new(namespace.clone(), node.clone());
    let writer = tokio::spawn(kubernetes::status::write_reports(
        client.clone(),
        lease.clone(),
        reports,
    ));
    Ok(Some(StatusWriter {
        writer,
        client,
        lease,
    }))
}

async fn watch_local(path: PathBuf, mut publisher: Publisher) {
    let mut watch = policy::local::LocalWatch::new(path);
    let mut store = Store::default();
    loop {
        let objects = watch.changed().await;
        for rejected in store.replace_all(objects) {
            tracing::warn!("{rejected}");
        }
        publisher.publish(&mut store);
    }
}

/// The listeners of the admin, health, metrics and OFREP endpoints: taken over from a
/// predecessor, or bound here (a predecessor that serves no OFREP hands none over).
pub struct Endpoints {
    admin: TcpListener,
    health: TcpListener,
    metrics: TcpListener,
    /// None: no OFREP endpoint (`--ofrep-addr off`).
    ofrep: Option<TcpListener>,
}

impl Endpoints {
    pub fn take(cfg: &Config, sockets: &mut Sockets) -> anyhow::Result<Self> {
        let mut bind = |kind, addr: std::net::SocketAddr, what: &str| {
            let listener = sockets
                .get(kind, addr.is_ipv6(), || std::net::TcpListener::bind(addr))
                .with_context(|| format!("binding the {what} endpoint on {addr}"))?;
            anyhow::Ok(TcpListener::from_std(listener)?)
        };
        Ok(Self {
            admin: bind(ListenerKind::Admin, cfg.admin_addr, "admin")?,
            health: bind(ListenerKind::Health, cfg.health_addr, "health")?,
            metrics: bind(ListenerKind::Metrics, cfg.metrics_addr, "metrics")?,
            ofrep: cfg
                .ofrep_addr
                .map(|addr| bind(ListenerKind::Ofrep, addr, "OFREP"))
                .transpose()?,
        })
    }

    pub fn spawn(
        self,
        supervisor: &mut Supervisor,
        admin: Arc<Admin>,
        metrics: &Arc<Metrics>,
        routes: &Arc<ArcSwap<RouteTable>>,
    ) {
        supervisor.spawn("health endpoint", admin.clone().serve_health(self.health));
        supervisor.spawn("admin endpoint", admin.serve(self.admin));
        let scraped = metrics.clone();
        supervisor.spawn(
            "metrics endpoint",
            serve_paths(self.metrics, move |path| metrics_response(&scraped, path)),
        );
        if let Some(listener) = self.ofrep {
            let ofrep = Ofrep::new(routes.clone(), metrics.clone(), ofrep::Limits::default());
            supervisor.spawn("OFREP endpoint", Arc::new(ofrep).serve(listener));
        }
    }
}

/// Keeps the capture maps equal to the snapshots' policy; `ready` once they first are.
pub fn spawn_capture(
    supervisor: &mut Supervisor,
    snapshots: SnapshotRx,
    pins: &Path,
    pod_root: PathBuf,
    ready: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    supervisor.spawn(
        "capture",
        capture::run(
            snapshots,
            CaptureTable::open(pins)?,
            PodCgroups::new(pod_root),
            ready,
        ),
    );
    Ok(())
}

/// The eBPF counters' log, the metrics' expiry, and the eBPF metrics' reading: each on a
/// timer, and each pass over maps or series on the blocking pool, not the control runtime.
pub fn spawn_housekeeping(
    supervisor: &mut Supervisor,
    pins: &Path,
    metrics: &Arc<Metrics>,
    idle_expiry: Duration,
) -> anyhow::Result<()> {
    let stats = Stats::open(pins)?;
    supervisor.spawn("counter log", async move {
        let mut last = Vec::new();
        let mut tick = tokio::time::interval(COUNTER_LOG_INTERVAL);
        loop {
            tick.tick().await;
            log_counters(&stats, &mut last);
        }
    });
    let swept = metrics.clone();
    supervisor.spawn("metrics expiry", async move {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tick.tick().await;
            // A pass over every series (a few ms at the caps).
            let swept = swept.clone();
            let _ = tokio::task::spawn_blocking(move || {
                swept.sweep(idle_expiry, std::time::Instant::now())
            })
            .await;
        }
    });
    // The programs' counters and maps are read here, never by a scrape.
    let refreshed = metrics.clone();
    supervisor.spawn("eBPF metrics", async move {
        let mut tick = tokio::time::interval(EBPF_METRICS_INTERVAL);
        loop {
            tick.tick().await;
            // One bpf() call per map entry.
            let metrics = refreshed.clone();
            let _ = tokio::task::spawn_blocking(move || metrics.refresh_ebpf()).await;
        }
    });
    Ok(())
}

/// Logs the eBPF counters when they changed since `last`.
pub fn log_counters(stats: &Stats, last: &mut Vec<(&'static str, u64)>) {
    let Ok(counters) = stats.counters() else {
        return;
    };
    if counters != *last {
        let line: Vec<String> = counters.iter().map(|(n, v)| format!("{n}={v}")).collect();
        info!("eBPF counters: {}", line.join(" "));
        *last = counters;
    }
}
