//! Wires the agent together: datapath, proxy, policy source, and shutdown on SIGTERM/SIGINT.

use std::{
    path::PathBuf,
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
        Datapath,
    },
    handoff::{HandoffListener, ListenerKind, Predecessor, Sockets, Successor},
    identity::{self, Certificates},
    kubernetes::{
        self,
        lease::{release, LeaseConfig},
    },
    metrics::{Direction, Metrics, SWEEP_INTERVAL},
    policy::{self, routes::RouteOptions, Store},
    proxy::{
        detect::DETECT_TIMEOUT,
        drain::DrainSignal,
        http::HttpProxy,
        inbound::{self, Inbound},
        mesh::{Mesh, MeshTimeouts},
        outbound::{self, Outbound},
        workers::{WorkerTask, Workers},
        ConnectionLimit,
    },
    state::Publisher,
    supervise::Supervisor,
    table::RouteTable,
};

/// How often each worker closes the upstream connections that idled too long, and forgets
/// endpoints it no longer uses.
const POOL_REAP_INTERVAL: Duration = Duration::from_secs(5);

/// How often the node's interfaces are scanned for new pods' veths.
const POD_INTERFACE_SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// How long shutdown waits to hand the status lease back.
const LEASE_RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a successor waits for its first policy before it takes over without it.
const FIRST_POLICY_TIMEOUT: Duration = Duration::from_secs(30);

/// Watcher updates waiting for the store; a full queue holds the watchers back.
const UPDATE_QUEUE: usize = 4096;

/// How often the eBPF counters and map occupancy are read for the metrics.
const EBPF_METRICS_INTERVAL: Duration = Duration::from_secs(1);

/// How often the eBPF counters are logged, when they changed.
const COUNTER_LOG_INTERVAL: Duration = Duration::from_secs(60);

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    raise_open_files_limit(cfg.max_connections);
    let pod_root = crate::cgroup::pod_root(cfg.cgroup_root.as_deref())?;
    let mut datapath = Datapath::load(&cfg.datapath(pod_root.clone()))?;
    let result = serve(&cfg, &mut datapath, pod_root).await;
    if let Ok(stats) = Stats::open(datapath.pin_dir()) {
        log_counters(&stats, &mut Vec::new());
    }
    // The datapath stays attached and pinned: capture fails open until the next agent takes it
    // over (`aviary-agent uninstall` removes it).
    drop(datapath);
    result
}

async fn serve(cfg: &Config, datapath: &mut Datapath, pod_root: PathBuf) -> anyhow::Result<()> {
    let pins = datapath.pin_dir();
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    // An agent serving on this node already (an upgrade): this one takes over from it.
    let predecessor = Predecessor::find(&cfg.handoff_socket)?;
    if predecessor.is_some() {
        info!(socket = %cfg.handoff_socket.display(), "an agent runs on this node: taking over from it once policy is loaded");
    }

    // Empty until the first snapshot: every service passes through meanwhile.
    let routes = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
    let metrics = Arc::new(Metrics::new(cfg.flagger_metrics, Some(Stats::open(pins)?)));
    let (drain_signal, drain) = DrainSignal::new();
    // The workloads' certificates, when the agent has a signer: tunnels between nodes use them.
    let certificates = cfg
        .identity
        .as_ref()
        .map(|_| Arc::new(Certificates::default()));
    let mesh = certificates.as_ref().map(|certificates| {
        let (mark, http) = (cfg.proxy_mark, &cfg.http);
        let timeouts = MeshTimeouts {
            connect: http.connect_timeout,
            handshake: http.tunnel_handshake_timeout,
            idle: http.pool_idle_timeout,
        };
        Arc::new(Mesh::new(certificates.clone(), mark, timeouts))
    });
    // One HTTP proxy, and so one pool of upstream connections, for both directions.
    let http = Arc::new(
        HttpProxy::new(
            cfg.http.clone(),
            routes.clone(),
            cfg.proxy_mark,
            metrics.clone(),
        )
        .draining_on(drain)
        .with_mesh(mesh),
    );
    let (publisher, snapshots) = Publisher::new(RouteOptions {
        node: cfg.node_name.clone(),
        inbound_capture: datapath.captures_inbound(),
        trust_domain: cfg.identity.as_ref().map(|i| i.trust_domain.clone()),
    });
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
        snapshots: snapshots.clone(),
    });

    // Every long-lived control-plane task: one that ends is a failure of the agent.
    let mut supervisor = Supervisor::default();
    supervisor.spawn(
        "routing table",
        apply_routes(snapshots.clone(), routes.clone()),
    );
    if let Some((config, certificates)) = cfg.identity.clone().zip(certificates.clone()) {
        let (wanted_tx, wanted) = watch::channel(Default::default());
        supervisor.spawn(
            "workload identities",
            identity::follow(snapshots.clone(), config.trust_domain.clone(), wanted_tx),
        );
        supervisor.spawn(
            "workload certificates",
            identity::maintain(config, wanted, certificates),
        );
    }
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
            let (node_pods_tx, node_pods) = watch::channel(None);
            supervisor.spawn(
                "policy",
                kubernetes::apply_updates(
                    updates,
                    publisher,
                    reports_tx,
                    node.clone(),
                    node_pods_tx,
                ),
            );
            supervisor.spawn(
                "this node's pods, for the other nodes",
                kubernetes::node_pods::publish(client.clone(), node.clone(), node_pods),
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
    // A successor serves its first connection with the policy in force, as the agent it
    // takes over from did.
    if predecessor.is_some() {
        let mut first = snapshots.clone();
        match tokio::time::timeout(FIRST_POLICY_TIMEOUT, first.changed()).await {
            Ok(_) => routes.store(first.borrow_and_update().routes.clone()),
            Err(_) => tracing::warn!(
                timeout = ?FIRST_POLICY_TIMEOUT,
                "no policy yet: taking over without it (connections pass through until it comes)"
            ),
        }
    }

    let received = match &predecessor {
        Some(predecessor) => tokio::task::block_in_place(|| predecessor.take_listeners())?,
        None => Vec::new(),
    };
    let mut sockets = Sockets::new(received);
    // Each worker gets a listener of its own per kind; the first of each kind stands in the
    // LISTENERS map, where the programs check that the proxy is up.
    let mut listeners = Listeners::open(pins)?;
    let mut tasks: Vec<Vec<WorkerTask>> = (0..cfg.workers).map(|_| Vec::new()).collect();
    for (worker, tasks) in tasks.iter_mut().enumerate() {
        let v4 = sockets
            .get(ListenerKind::Outbound, false, || {
                outbound::bind_v4(cfg.outbound_port)
            })
            .with_context(|| {
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
            let v6 = sockets
                .get(ListenerKind::Outbound, true, || {
                    outbound::bind_v6(cfg.outbound_port)
                })
                .with_context(|| {
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
                let bound = sockets.get(ListenerKind::Inbound, v6, || {
                    inbound::bind(cfg.inbound_port, v6)
                });
                let listener = match bound {
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
                    if let Some(mesh) = http.mesh() {
                        mesh.reap();
                    }
                    crate::proxy::balance::forget_idle();
                }
            })
        }));
    }
    let admin_listener = sockets
        .get(ListenerKind::Admin, cfg.admin_addr.is_ipv6(), || {
            std::net::TcpListener::bind(cfg.admin_addr)
        })
        .with_context(|| format!("binding the admin endpoint on {}", cfg.admin_addr))?;
    let health_listener = sockets
        .get(ListenerKind::Health, cfg.health_addr.is_ipv6(), || {
            std::net::TcpListener::bind(cfg.health_addr)
        })
        .with_context(|| format!("binding the health endpoint on {}", cfg.health_addr))?;
    let metrics_listener = sockets
        .get(ListenerKind::Metrics, cfg.metrics_addr.is_ipv6(), || {
            std::net::TcpListener::bind(cfg.metrics_addr)
        })
        .with_context(|| format!("binding the metrics endpoint on {}", cfg.metrics_addr))?;
    // The predecessor ran more workers: their listeners are served too.
    for (index, (kind, listener)) in sockets.rest()?.into_iter().enumerate() {
        let task = match kind {
            ListenerKind::Outbound => serving(&outbound, listener, Outbound::serve),
            ListenerKind::Inbound => serving(&inbound, listener, Inbound::serve),
            // One of each: taken above.
            ListenerKind::Admin | ListenerKind::Health | ListenerKind::Metrics => continue,
        };
        tasks[index % cfg.workers].push(task);
    }
    let workers = Workers::start(tasks).context("starting the data-plane workers")?;
    info!(workers = cfg.workers, "data plane started");
    if let Some(predecessor) = predecessor {
        tokio::task::block_in_place(|| predecessor.accepting())
            .context("telling the running agent this one accepts")?;
        info!("took over from the running agent: its connections move here as it drains");
        let (spawner, http, metrics) = (workers.spawner(), http.clone(), metrics.clone());
        let moving = tokio::task::spawn_blocking(move || {
            predecessor.receive(|moved| {
                spawner.spawn(crate::proxy::carry_on(moved, http.clone(), metrics.clone()))
            })
        });
        tokio::spawn(async move {
            match moving.await {
                Ok(Ok(moved)) => info!(moved, "the previous agent handed over its connections"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %format!("{e:#}"), "receiving connections from the previous agent")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "receiving connections from the previous agent")
                }
            }
        });
    }
    // Where the next agent takes over from this one.
    let mut handoff = match HandoffListener::bind(&cfg.handoff_socket) {
        Ok(listener) => Some(listener),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "no hand-off socket: an upgrade will break this agent's connections");
            None
        }
    };

    let ready = Arc::new(AtomicBool::new(false));
    let admin = Arc::new(Admin {
        ready: ready.clone(),
        snapshots: snapshots.clone(),
        stats: Stats::open(pins)?,
        pod_name: cfg.pod_name.clone(),
        certificates,
    });
    supervisor.spawn(
        "health endpoint",
        admin
            .clone()
            .serve_health(TcpListener::from_std(health_listener)?),
    );
    supervisor.spawn(
        "admin endpoint",
        admin.serve(TcpListener::from_std(admin_listener)?),
    );
    let scraped = metrics.clone();
    supervisor.spawn(
        "metrics endpoint",
        serve_paths(TcpListener::from_std(metrics_listener)?, move |path| {
            metrics_response(&scraped, path)
        }),
    );
    supervisor.spawn(
        "capture",
        capture::run(
            snapshots,
            CaptureTable::open(pins)?,
            PodCgroups::new(pod_root),
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
    let refreshed = metrics.clone();
    supervisor.spawn("eBPF metrics", async move {
        let mut tick = tokio::time::interval(EBPF_METRICS_INTERVAL);
        loop {
            tick.tick().await;
            // One bpf() call per map entry: on the blocking pool, not the control runtime.
            let metrics = refreshed.clone();
            let _ = tokio::task::spawn_blocking(move || metrics.refresh_ebpf()).await;
        }
    });

    info!(port = cfg.outbound_port, proxy_ip = %cfg.proxy_v4, admin = %cfg.admin_addr, metrics = %cfg.metrics_addr, "agent ready");
    // New pods bring new veths, which inbound capture attaches to.
    let mut scan = tokio::time::interval(POD_INTERFACE_SCAN_INTERVAL);
    let captures_inbound = datapath.captures_inbound();
    let mut failed = None;
    let mut successor = None;
    loop {
        tokio::select! {
            _ = terminate.recv() => { info!("SIGTERM: draining"); break }
            _ = interrupt.recv() => { info!("SIGINT: draining"); break }
            failure = supervisor.failure() => {
                // Not ready from here on, and out with a non-zero exit: the kubelet restarts
                // the agent, and capture fails open meanwhile.
                ready.store(false, std::sync::atomic::Ordering::Release);
                tracing::error!("{failure:#}: shutting down");
                failed = Some(failure);
                break;
            }
            next = next_successor(&mut handoff) => {
                match tokio::task::block_in_place(|| next.give_listeners(sockets.held())) {
                    Ok(()) => {
                        info!("a successor took over the listeners: draining into it");
                        successor = Some(next);
                        break;
                    }
                    // It keeps its copies of the listeners only while it lives; this agent
                    // serves on.
                    Err(e) => tracing::warn!(error = %e, "a successor failed to take over"),
                }
            }
            _ = scan.tick(), if captures_inbound => {
                // Netlink is synchronous here: let other tasks move off this worker meanwhile.
                if let Err(e) = tokio::task::block_in_place(|| datapath.attach_inbound_pod_interfaces()) {
                    tracing::warn!(error = %format!("{e:#}"), "scanning the pods' interfaces");
                }
            }
        }
    }
    ready.store(false, std::sync::atomic::Ordering::Release);
    // No successor can take over from here on, and the listeners close with the workers'
    // accept loops (a successor holds its own): new connections fail open meanwhile, or go to
    // the successor.
    drop(handoff);
    drop(sockets);
    if let Some(successor) = successor {
        // The successor writes the maps, serves the endpoints and reports status now.
        drop(supervisor);
        let moved = drain_signal.hand_over();
        let forwarding = tokio::task::spawn_blocking(move || forward(successor, moved));
        let left = drain_signal.finished(cfg.drain_timeout).await;
        // Ends the forwarding once the last connection is sent.
        drain_signal.close();
        match forwarding.await {
            Ok(Ok(moved)) => info!(
                moved,
                left, "drained into the successor; exiting at SIGTERM"
            ),
            Ok(Err(e)) => tracing::warn!(error = %e, left, "handing connections over failed"),
            Err(e) => tracing::warn!(error = %e, "handing connections over"),
        }
        release_status(status_writer).await;
        // The kubelet would restart an agent that exits by itself: it waits for its SIGTERM.
        tokio::select! {
            _ = terminate.recv() => info!("SIGTERM: exiting"),
            _ = interrupt.recv() => info!("SIGINT: exiting"),
        }
    } else {
        drain_signal.close();
        release_status(status_writer).await;
        let left = drain_signal.finished(cfg.drain_timeout).await;
        if left > 0 {
            tracing::warn!(left, timeout = ?cfg.drain_timeout, "the drain timed out: closing what is left");
        } else {
            info!("drained");
        }
    }
    workers.stop();
    failed.map_or(Ok(()), Err)
}

/// The next successor knocking on the hand-off socket, if this agent has one.
async fn next_successor(handoff: &mut Option<HandoffListener>) -> Successor {
    match handoff {
        Some(handoff) => handoff.successor().await,
        None => std::future::pending().await,
    }
}

/// Sends the successor each connection that moves, until the drain ends; returns how many.
fn forward(
    successor: Successor,
    mut moved: mpsc::UnboundedReceiver<crate::proxy::drain::Moved>,
) -> std::io::Result<usize> {
    let mut sent = 0;
    while let Some(connection) = moved.blocking_recv() {
        successor.send(connection)?;
        sent += 1;
    }
    successor.done()?;
    Ok(sent)
}

/// Stops the status writer and hands its lease back, so that another agent takes over status
/// writing at once instead of after the lease expires.
async fn release_status(
    status_writer: Option<(
        tokio::task::JoinHandle<()>,
        kube::Client,
        kubernetes::lease::LeaseConfig,
    )>,
) {
    let Some((writer, client, lease)) = status_writer else {
        return;
    };
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
