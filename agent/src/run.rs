//! Wires the agent together: datapath, proxy, policy source, and shutdown on SIGTERM/SIGINT.

use std::{
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use aviary_abi::{LISTENER_INBOUND_V4, LISTENER_INBOUND_V6, LISTENER_V4, LISTENER_V6};
use tokio::{
    net::TcpListener,
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
};
use tracing::info;

use crate::{
    admin::{metrics_response, serve_paths, Admin},
    capture,
    cgroup::PodCgroups,
    config::{Config, PolicySource},
    ebpf::{
        maps::{CaptureTable, Listeners, OrigDstTable, Stats},
        Datapath, DatapathConfig,
    },
    kubernetes::{
        self,
        lease::{release, LeaseConfig},
    },
    metrics::{Direction, Metrics, SWEEP_INTERVAL},
    policy::{self, routes::RouteOptions, Store},
    proxy::{
        detect::DETECT_TIMEOUT,
        http::HttpProxy,
        inbound::{self, Inbound},
        outbound::{self, Outbound},
        route::RouteTable,
        workers::{WorkerTask, Workers},
        ConnectionLimit,
    },
    state::Publisher,
    supervise::Supervisor,
};

/// How often each worker closes the upstream connections that idled too long, and forgets
/// endpoints it no longer uses.
const POOL_REAP_INTERVAL: Duration = Duration::from_secs(5);

/// How often the node's interfaces are scanned for new pods' veths.
const POD_INTERFACE_SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// How long shutdown waits to hand the status lease back.
const LEASE_RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// Watcher updates waiting for the store; a full queue holds the watchers back.
const UPDATE_QUEUE: usize = 4096;

/// How often the eBPF counters and map occupancy are read for the metrics.
const EBPF_METRICS_INTERVAL: Duration = Duration::from_secs(1);

/// How often the eBPF counters are logged, when they changed.
const COUNTER_LOG_INTERVAL: Duration = Duration::from_secs(60);

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    raise_open_files_limit(cfg.max_connections);
    let mut datapath = Datapath::load(&DatapathConfig::from_config(&cfg))?;
    let result = serve(&cfg, &mut datapath).await;
    if let Ok(stats) = Stats::open(datapath.pin_dir()) {
        log_counters(&stats, &mut Vec::new());
    }
    datapath.shutdown();
    result
}

async fn serve(cfg: &Config, datapath: &mut Datapath) -> anyhow::Result<()> {
    let pins = datapath.pin_dir();
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;

    // Empty until the first snapshot: every service passes through meanwhile.
    let routes = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
    let metrics = Arc::new(Metrics::new(cfg.flagger_metrics, Some(Stats::open(pins)?)));
    // One HTTP proxy, and so one pool of upstream connections, for both directions.
    let http = Arc::new(HttpProxy::new(
        cfg.http.clone(),
        routes.clone(),
        cfg.proxy_mark,
        metrics.clone(),
    ));
    let outbound = Arc::new(Outbound {
        orig_dst: OrigDstTable::open(pins)?,
        mark: cfg.proxy_mark,
        http: http.clone(),
        metrics: metrics.clone(),
        routes: routes.clone(),
        detect_timeout: DETECT_TIMEOUT,
        limit: ConnectionLimit::new(Direction::outbound, cfg.max_connections, &metrics),
    });
    let inbound = Arc::new(Inbound {
        mark: cfg.proxy_mark,
        routes: routes.clone(),
        http: http.clone(),
        metrics: metrics.clone(),
        detect_timeout: DETECT_TIMEOUT,
        limit: ConnectionLimit::new(Direction::inbound, cfg.max_connections, &metrics),
    });
    // Each worker gets a listener of its own per kind; the first of each kind stands in the
    // LISTENERS map, where the programs check that the proxy is up.
    let mut listeners = Listeners::open(pins)?;
    let mut tasks: Vec<Vec<WorkerTask>> = (0..cfg.workers).map(|_| Vec::new()).collect();
    for (worker, tasks) in tasks.iter_mut().enumerate() {
        let v4 = outbound::bind_v4(cfg.outbound_port).with_context(|| {
            format!(
                "binding the outbound listener on port {}",
                cfg.outbound_port
            )
        })?;
        if worker == 0 {
            listeners.register(LISTENER_V4, &v4)?;
        }
        tasks.push(serving(&outbound, v4, Outbound::serve));
        if cfg.proxy_v6.is_some() {
            let v6 = outbound::bind_v6(cfg.outbound_port).with_context(|| {
                format!(
                    "binding the IPv6 outbound listener on port {}",
                    cfg.outbound_port
                )
            })?;
            if worker == 0 {
                listeners.register(LISTENER_V6, &v6)?;
            }
            tasks.push(serving(&outbound, v6, Outbound::serve));
        }
        if datapath.captures_inbound() {
            for (slot, v6) in [(LISTENER_INBOUND_V4, false), (LISTENER_INBOUND_V6, true)] {
                let listener = match inbound::bind(cfg.inbound_port, v6) {
                    Ok(listener) => listener,
                    // A node without IPv6: its pods have no IPv6 addresses to capture either.
                    Err(e) if v6 && e.raw_os_error() == Some(nix::libc::EAFNOSUPPORT) => {
                        if worker == 0 {
                            info!("no IPv6 on this node: inbound capture is IPv4 only");
                        }
                        continue;
                    }
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("binding the inbound listener on port {}", cfg.inbound_port)
                        })
                    }
                };
                if worker == 0 {
                    listeners.register(slot, &listener)?;
                }
                tasks.push(serving(&inbound, listener, Inbound::serve));
            }
        }
        let http = http.clone();
        tasks.push(Box::new(move || {
            Box::pin(async move {
                let mut reap = tokio::time::interval(POOL_REAP_INTERVAL);
                loop {
                    reap.tick().await;
                    http.pool().reap();
                    crate::proxy::balance::forget_idle();
                }
            })
        }));
    }
    let workers = Workers::start(tasks).context("starting the data-plane workers")?;
    info!(workers = cfg.workers, "data plane started");

    let (publisher, snapshots) = Publisher::new(RouteOptions {
        node: cfg.node_name.clone(),
        inbound_capture: datapath.captures_inbound(),
    });
    // Every long-lived control-plane task: one that ends is a failure of the agent.
    let mut supervisor = Supervisor::default();
    supervisor.spawn("routing table", apply_routes(snapshots.clone(), routes));
    // The status writer, when this agent runs one: stopped, and its lease released, on shutdown.
    let mut status_writer = None;
    match &cfg.policy {
        PolicySource::Local(path) => {
            supervisor.spawn("local policy", watch_local(path.clone(), publisher));
        }
        PolicySource::Kubernetes {
            kubeconfig,
            node,
            namespace,
            write_status,
        } => {
            let client = kubernetes::client(kubeconfig.as_deref()).await?;
            let (updates_tx, updates) = mpsc::channel(UPDATE_QUEUE);
            kubernetes::spawn_watchers(&client, node, updates_tx);
            let (reports_tx, reports) = watch::channel(Default::default());
            supervisor.spawn(
                "policy",
                kubernetes::apply_updates(updates, publisher, reports_tx),
            );
            if *write_status {
                let lease = LeaseConfig::new(namespace.clone(), node.clone());
                let writer = tokio::spawn(kubernetes::status::write_reports(
                    client.clone(),
                    lease.clone(),
                    reports,
                ));
                status_writer = Some((writer, client, lease));
            }
        }
    }
    let ready = Arc::new(AtomicBool::new(false));
    let admin = Arc::new(Admin {
        ready: ready.clone(),
        snapshots: snapshots.clone(),
        stats: Stats::open(pins)?,
        pod_name: cfg.pod_name.clone(),
    });
    let admin_listener = TcpListener::bind(cfg.admin_addr)
        .await
        .with_context(|| format!("binding the admin endpoint on {}", cfg.admin_addr))?;
    let health_listener = TcpListener::bind(cfg.health_addr)
        .await
        .with_context(|| format!("binding the health endpoint on {}", cfg.health_addr))?;
    supervisor.spawn(
        "health endpoint",
        admin.clone().serve_health(health_listener),
    );
    supervisor.spawn("admin endpoint", admin.serve(admin_listener));
    let metrics_listener = TcpListener::bind(cfg.metrics_addr)
        .await
        .with_context(|| format!("binding the metrics endpoint on {}", cfg.metrics_addr))?;
    let scraped = metrics.clone();
    supervisor.spawn(
        "metrics endpoint",
        serve_paths(metrics_listener, move |path| {
            metrics_response(&scraped, path)
        }),
    );
    supervisor.spawn(
        "capture",
        capture::run(
            snapshots,
            CaptureTable::open(pins)?,
            PodCgroups::new(cfg.cgroup_root.clone()),
            ready.clone(),
        ),
    );
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
    let idle_expiry = cfg.metrics_idle_expiry;
    supervisor.spawn("metrics expiry", async move {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tick.tick().await;
            // A pass over every series (a few ms at the caps): on the blocking pool, as reads of
            // the eBPF maps are, not on the control runtime.
            let swept = swept.clone();
            let _ = tokio::task::spawn_blocking(move || {
                swept.sweep(idle_expiry, std::time::Instant::now())
            })
            .await;
        }
    });
    // The programs' counters and maps are read here, on the control plane, never by a scrape.
    supervisor.spawn("eBPF metrics", async move {
        let mut tick = tokio::time::interval(EBPF_METRICS_INTERVAL);
        loop {
            tick.tick().await;
            // One bpf() call per map entry: on the blocking pool, not the control runtime.
            let metrics = metrics.clone();
            let _ = tokio::task::spawn_blocking(move || metrics.refresh_ebpf()).await;
        }
    });

    info!(port = cfg.outbound_port, proxy_ip = %cfg.proxy_v4, admin = %cfg.admin_addr, metrics = %cfg.metrics_addr, "agent ready");
    // New pods bring new veths, which inbound capture attaches to.
    let mut scan = tokio::time::interval(POD_INTERFACE_SCAN_INTERVAL);
    let captures_inbound = datapath.captures_inbound();
    let mut failed = None;
    loop {
        tokio::select! {
            _ = terminate.recv() => { info!("SIGTERM: shutting down"); break }
            _ = interrupt.recv() => { info!("SIGINT: shutting down"); break }
            failure = supervisor.failure() => {
                // Not ready from here on, and out with a non-zero exit: the kubelet restarts
                // the agent, and capture fails open meanwhile.
                ready.store(false, std::sync::atomic::Ordering::Release);
                tracing::error!("{failure:#}: shutting down");
                failed = Some(failure);
                break;
            }
            _ = scan.tick(), if captures_inbound => {
                // Netlink is synchronous here: let other tasks move off this worker meanwhile.
                if let Err(e) = tokio::task::block_in_place(|| datapath.attach_inbound_pod_interfaces()) {
                    tracing::warn!(error = %format!("{e:#}"), "scanning the pods' interfaces");
                }
            }
        }
    }
    // The listeners close with their workers: new connections fail open from here on.
    workers.stop();
    if let Some((writer, client, lease)) = status_writer {
        // Another agent takes over status writing at once instead of after the lease expires.
        writer.abort();
        match tokio::time::timeout(LEASE_RELEASE_TIMEOUT, release(client, &lease)).await {
            Ok(Ok(true)) => info!(lease = %lease.name, "released the status lease"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not release the status lease; it expires by itself")
            }
            Err(_) => tracing::warn!("releasing the status lease timed out; it expires by itself"),
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Raises the soft limit on open files to the hard limit, as Envoy and ztunnel deployments
/// expect of a proxy: container runtimes often start processes with a soft limit of 1,024,
/// which would refuse connections at accept long before `max_connections` (per listener kind,
/// each proxied connection holding two descriptors: the client's and the upstream's).
fn raise_open_files_limit(max_connections: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the open files limit");
            return;
        }
    };
    let limit = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "could not raise the open files limit");
                soft
            }
        }
    } else {
        soft
    };
    info!(open_files = limit, "open files limit");
    let descriptors = 2 * max_connections as u64;
    if limit < descriptors {
        tracing::warn!(
            open_files = limit,
            max_connections,
            "the open files limit is below two descriptors per connection of --max-connections: \
             accepts will fail before the connection limit is reached; raise the hard limit \
             (LimitNOFILE, or the container runtime's default ulimits)"
        );
    }
}

/// A worker task serving `listener` with `serve` on `proxy`.
fn serving<P: Send + Sync + 'static, F>(
    proxy: &Arc<P>,
    listener: std::net::TcpListener,
    serve: fn(Arc<P>, std::net::TcpListener) -> F,
) -> WorkerTask
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let proxy = proxy.clone();
    Box::new(move || Box::pin(serve(proxy, listener)))
}

/// Puts each snapshot's routes in force for the proxy: one atomic swap.
async fn apply_routes(mut snapshots: crate::state::SnapshotRx, routes: Arc<ArcSwap<RouteTable>>) {
    while snapshots.changed().await.is_ok() {
        let snapshot = snapshots.borrow_and_update().clone();
        routes.store(snapshot.routes.clone());
    }
}

async fn watch_local(path: std::path::PathBuf, mut publisher: Publisher) {
    let mut source = policy::local::LocalSource::new(path);
    let mut store = Store::default();
    let mut tick = tokio::time::interval(policy::local::POLL_INTERVAL);
    loop {
        tick.tick().await;
        let Some(objects) = source.poll() else {
            continue;
        };
        for rejected in store.replace_all(objects) {
            tracing::warn!("{rejected}");
        }
        publisher.publish(&mut store);
    }
}

fn log_counters(stats: &Stats, last: &mut Vec<(&'static str, u64)>) {
    let Ok(counters) = stats.counters() else {
        return;
    };
    if counters != *last {
        let line: Vec<String> = counters.iter().map(|(n, v)| format!("{n}={v}")).collect();
        info!("eBPF counters: {}", line.join(" "));
        *last = counters;
    }
}
