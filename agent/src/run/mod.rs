//! Wires the agent together, by plane: the data plane's proxies and workers
//! ([`data_plane`]), the control plane's tasks ([`control_plane`]), the hand-off of an upgrade
//! ([`upgrade`]); then it serves until a signal, a failure or a successor ends it, and shuts
//! down.

mod control_plane;
mod data_plane;
mod upgrade;

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::info;

use self::{
    control_plane::{Endpoints, StatusWriter},
    data_plane::DataPlane,
};
use crate::{
    admin::Admin,
    config::Config,
    ebpf::{
        maps::{Listeners, Stats},
        Datapath,
    },
    handoff::{HandoffListener, ListenerKind, Predecessor, Sockets, Successor},
    identity::Certificates,
    policy::service_routes::RouteOptions,
    proxy::{drain::DrainSignal, metrics::Metrics, workers::Workers},
    state::Publisher,
    supervise::Supervisor,
    table::RouteTable,
};

/// How often the node's interfaces are scanned for new pods' veths.
const POD_INTERFACE_SCAN_INTERVAL: Duration = Duration::from_secs(1);

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    data_plane::raise_open_files_limit(cfg.max_connections);
    let pod_root = crate::cgroup::pod_root(cfg.cgroup_root.as_deref())?;
    let mut datapath = Datapath::load(&cfg.datapath(pod_root.clone()))?;
    let result = serve(&cfg, &mut datapath, pod_root).await;
    if let Ok(stats) = Stats::open(datapath.pin_dir()) {
        control_plane::log_counters(&stats, &mut Vec::new());
    }
    // The datapath stays attached and pinned: capture fails open until the next agent takes it
    // over (`aviary-agent uninstall` removes it).
    drop(datapath);
    result
}

async fn serve(cfg: &Config, datapath: &mut Datapath, pod_root: PathBuf) -> anyhow::Result<()> {
    let pins = datapath.pin_dir();
    let mut signals = Signals::new()?;
    // An agent serving on this node already (an upgrade): this one takes over from it.
    let predecessor = Predecessor::find(&cfg.handoff_socket, &listener_kinds(cfg))?;
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
    let (publisher, snapshots) = Publisher::new(RouteOptions {
        node: cfg.node_name.clone(),
        inbound_capture: datapath.captures_inbound(),
        trust_domain: cfg.identity.as_ref().map(|i| i.trust_domain.clone()),
    });
    let plane = DataPlane::new(
        cfg,
        pins,
        &routes,
        &metrics,
        certificates.as_ref(),
        drain,
        snapshots.clone(),
    )?;

    let mut supervisor = Supervisor::default();
    control_plane::spawn_routing_table(&mut supervisor, snapshots.clone(), routes.clone());
    control_plane::spawn_identity(
        &mut supervisor,
        cfg,
        snapshots.clone(),
        certificates.as_ref(),
    );
    let status_writer = control_plane::spawn_policy_source(&mut supervisor, cfg, publisher).await?;
    if predecessor.is_some() {
        upgrade::wait_for_first_policy(&snapshots, &routes).await;
    }

    let received = match &predecessor {
        Some(predecessor) => tokio::task::block_in_place(|| predecessor.take_listeners())?,
        None => Vec::new(),
    };
    let mut sockets = Sockets::new(received);
    let mut listeners = Listeners::open(pins)?;
    let captures_inbound = datapath.captures_inbound();
    let mut tasks = plane.worker_tasks(cfg, &mut sockets, &mut listeners, captures_inbound)?;
    let endpoints = Endpoints::take(cfg, &mut sockets)?;
    plane.serve_the_rest(&mut sockets, &mut tasks)?;
    let workers = Workers::start(tasks).context("starting the data-plane workers")?;
    info!(workers = cfg.workers, "data plane started");
    if let Some(predecessor) = predecessor {
        upgrade::receive_connections(predecessor, &workers, &plane.http, &metrics)?;
    }
    let mut handoff = upgrade::bind_handoff(cfg);

    let ready = Arc::new(AtomicBool::new(false));
    let admin = Arc::new(Admin {
        ready: ready.clone(),
        snapshots: snapshots.clone(),
        stats: Stats::open(pins)?,
        pod_name: cfg.pod_name.clone(),
        certificates,
    });
    endpoints.spawn(&mut supervisor, admin, &metrics, &routes);
    control_plane::spawn_capture(&mut supervisor, snapshots, pins, pod_root, ready.clone())?;
    control_plane::spawn_housekeeping(&mut supervisor, pins, &metrics, cfg.metrics_idle_expiry)?;
    info!(port = cfg.outbound_port, proxy_ip = %cfg.proxy_v4, admin = %cfg.admin_addr, metrics = %cfg.metrics_addr, ofrep = ?cfg.ofrep_addr, "agent ready");

    let mut serving = Serving {
        signals: &mut signals,
        supervisor: &mut supervisor,
        handoff: &mut handoff,
        sockets: &sockets,
        datapath,
    };
    let ended = serving.until_the_end().await;
    if let Ended::Failed(failure) = &ended {
        // Not ready from here on, and out with a non-zero exit: the kubelet restarts the
        // agent, and capture fails open meanwhile.
        tracing::error!("{failure:#}: shutting down");
    }
    ready.store(false, Ordering::Release);
    // No successor can take over from here on, and the listeners close with the workers'
    // accept loops (a successor holds its own): new connections fail open meanwhile, or go to
    // the successor.
    drop(handoff);
    drop(sockets);
    let shutdown = Shutdown {
        drain_signal: &drain_signal,
        status_writer,
        drain_timeout: cfg.drain_timeout,
    };
    let mut supervisor = Some(supervisor);
    let result = shutdown.run(ended, &mut supervisor, &mut signals).await;
    workers.stop();
    // The control plane's tasks end last, the endpoints among them.
    drop(supervisor);
    result
}

/// The kinds of listener this agent serves, which it takes over from a predecessor: one it
/// does not serve closes with the predecessor.
fn listener_kinds(cfg: &Config) -> Vec<ListenerKind> {
    let mut kinds = vec![
        ListenerKind::Outbound,
        ListenerKind::Inbound,
        ListenerKind::Admin,
        ListenerKind::Health,
        ListenerKind::Metrics,
    ];
    kinds.extend(cfg.ofrep_addr.map(|_| ListenerKind::Ofrep));
    kinds
}

/// SIGTERM and SIGINT.
struct Signals {
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// The next one, by name.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}

/// Why serving ended.
enum Ended {
    Signal,
    Failed(anyhow::Error),
    /// A successor took the listeners: the connections drain into it.
    Successor(Successor),
}

/// What the agent watches while it serves.
struct Serving<'a> {
    signals: &'a mut Signals,
    supervisor: &'a mut Supervisor,
    handoff: &'a mut Option<HandoffListener>,
    sockets: &'a Sockets,
    datapath: &'a mut Datapath,
}

impl Serving<'_> {
    /// Serves until a signal, a failed task, or a successor that takes the listeners; new pods'
    /// veths meanwhile get inbound capture.
    async fn until_the_end(&mut self) -> Ended {
        let mut scan = tokio::time::interval(POD_INTERFACE_SCAN_INTERVAL);
        let captures_inbound = self.datapath.captures_inbound();
        loop {
            tokio::select! {
                name = self.signals.next() => {
                    info!("{name}: draining");
                    return Ended::Signal;
                }
                failure = self.supervisor.failure() => return Ended::Failed(failure),
                next = upgrade::next_successor(self.handoff) => {
                    match tokio::task::block_in_place(|| next.give_listeners(self.sockets.held())) {
                        Ok(()) => {
                            info!("a successor took over the listeners: draining into it");
                            return Ended::Successor(next);
                        }
                        // It keeps its copies of the listeners only while it lives; this agent
                        // serves on.
                        Err(e) => tracing::warn!(error = %e, "a successor failed to take over"),
                    }
                }
                _ = scan.tick(), if captures_inbound => {
                    // Netlink is synchronous here: let other tasks move off this worker
                    // meanwhile.
                    if let Err(e) = tokio::task::block_in_place(|| self.datapath.attach_inbound_pod_interfaces()) {
                        tracing::warn!(error = %format!("{e:#}"), "scanning the pods' interfaces");
                    }
                }
            }
        }
    }
}

/// How the agent ends once serving has.
struct Shutdown<'a> {
    drain_signal: &'a DrainSignal,
    status_writer: Option<StatusWriter>,
    drain_timeout: Duration,
}

impl Shutdown<'_> {
    /// Drains into the successor, or closes what is open within the drain timeout; hands the
    /// status lease back; the failure that ended it, if one did.
    async fn run(
        self,
        ended: Ended,
        supervisor: &mut Option<Supervisor>,
        signals: &mut Signals,
    ) -> anyhow::Result<()> {
        if let Ended::Successor(successor) = ended {
            // The successor writes the maps, serves the endpoints and reports status now.
            drop(supervisor.take());
            upgrade::drain_into(successor, self.drain_signal, self.drain_timeout).await;
            self.release_status().await;
            // The kubelet would restart an agent that exits by itself: it waits for its SIGTERM.
            let name = signals.next().await;
            info!("{name}: exiting");
            return Ok(());
        }
        self.drain_signal.close();
        let drain_signal = self.drain_signal;
        let drain_timeout = self.drain_timeout;
        self.release_status().await;
        let left = drain_signal.finished(drain_timeout).await;
        if left > 0 {
            tracing::warn!(left, timeout = ?drain_timeout, "the drain timed out: closing what is left");
        } else {
            info!("drained");
        }
        match ended {
            Ended::Failed(failure) => Err(failure),
            Ended::Signal | Ended::Successor(_) => Ok(()),
        }
    }

    async fn release_status(self) {
        if let Some(writer) = self.status_writer {
            writer.release().await;
        }
    }
}
