//! The data plane: the HTTP proxy and the outbound and inbound listeners, and the tasks each
//! worker thread runs (its listeners' accept loops and its pools' reaper).

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use aviary_abi::{LISTENER_INBOUND_V4, LISTENER_INBOUND_V6, LISTENER_V4, LISTENER_V6};
use tracing::info;

use crate::{
    config::Config,
    ebpf::maps::{Listeners, OrigDstTable},
    handoff::{ListenerKind, Sockets},
    identity::Certificates,
    proxy::{
        detect::DETECT_TIMEOUT,
        drain::Drain,
        http::HttpProxy,
        inbound::{self, Inbound},
        mesh::{Mesh, MeshTimeouts},
        metrics::{Direction, Metrics},
        outbound::{self, Outbound},
        workers::WorkerTask,
        ConnectionLimit,
    },
    state::SnapshotRx,
    table::RouteTable,
};

/// How often each worker closes the upstream connections that idled too long, and forgets
/// endpoints it no longer uses.
const POOL_REAP_INTERVAL: Duration = Duration::from_secs(5);

/// The proxies the workers serve, sharing one routing table and one HTTP proxy (one pool of
/// upstream connections for both directions).
pub struct DataPlane {
    pub http: Arc<HttpProxy>,
    pub outbound: Arc<Outbound>,
    pub inbound: Arc<Inbound>,
}

impl DataPlane {
    /// The proxies for `cfg`: tunnels between nodes when the agent holds `certificates`.
    pub fn new(
        cfg: &Config,
        pins: &std::path::Path,
        routes: &Arc<ArcSwap<RouteTable>>,
        metrics: &Arc<Metrics>,
        certificates: Option<&Arc<Certificates>>,
        drain: Drain,
        snapshots: SnapshotRx,
    ) -> anyhow::Result<Self> {
        let mesh = certificates.map(|certificates| {
            let http = &cfg.http;
            let timeouts = MeshTimeouts {
                connect: http.connect_timeout,
                handshake: http.tunnel_handshake_timeout,
                idle: http.pool_idle_timeout,
            };
            Arc::new(Mesh::new(certificates.clone(), cfg.proxy_mark, timeouts))
        });
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
        let outbound = Arc::new(Outbound {
            orig_dst: OrigDstTable::open(pins)?,
            mark: cfg.proxy_mark,
            http: http.clone(),
            metrics: metrics.clone(),
            routes: routes.clone(),
            detect_timeout: DETECT_TIMEOUT,
            limit: ConnectionLimit::new(Direction::outbound, cfg.max_connections, metrics),
        });
        let inbound = Arc::new(Inbound {
            mark: cfg.proxy_mark,
            routes: routes.clone(),
            http: http.clone(),
            metrics: metrics.clone(),
            detect_timeout: DETECT_TIMEOUT,
            limit: ConnectionLimit::new(Direction::inbound, cfg.max_connections, metrics),
            snapshots,
        });
        Ok(Self {
            http,
            outbound,
            inbound,
        })
    }

    /// Each worker's tasks: a listener of its own per kind (taken over from a predecessor, or
    /// bound), whose first of each kind stands in the LISTENERS map where the programs check
    /// that the proxy is up, and its pools' reaper.
    pub fn worker_tasks(
        &self,
        cfg: &Config,
        sockets: &mut Sockets,
        listeners: &mut Listeners,
        captures_inbound: bool,
    ) -> anyhow::Result<Vec<Vec<WorkerTask>>> {
        let mut tasks: Vec<Vec<WorkerTask>> = (0..cfg.workers).map(|_| Vec::new()).collect();
        for (worker, tasks) in tasks.iter_mut().enumerate() {
            let mut binding = Binding {
                cfg,
                sockets: &mut *sockets,
                listeners: &mut *listeners,
                first: worker == 0,
            };
            self.outbound_tasks(&mut binding, tasks)?;
            if captures_inbound {
                self.inbound_tasks(&mut binding, tasks)?;
            }
            tasks.push(self.reaper());
        }
        Ok(tasks)
    }

    /// The listeners a predecessor that ran more workers handed over beyond those taken, served
    /// too, spread over the workers. Called once the control plane took its endpoints.
    pub fn serve_the_rest(
        &self,
        sockets: &mut Sockets,
        tasks: &mut [Vec<WorkerTask>],
    ) -> anyhow::Result<()> {
        for (index, (kind, listener)) in sockets.rest()?.into_iter().enumerate() {
            let task = match kind {
                ListenerKind::Outbound => serving(&self.outbound, listener, Outbound::serve),
                ListenerKind::Inbound => serving(&self.inbound, listener, Inbound::serve),
                // One of each: the control plane's, taken already. (None of a kind this agent
                // does not know comes: a predecessor sends only the kinds its hello named.)
                ListenerKind::Admin
                | ListenerKind::Health
                | ListenerKind::Metrics
                | ListenerKind::Ofrep
                | ListenerKind::Unknown => continue,
            };
            let worker = index % tasks.len();
            tasks[worker].push(task);
        }
        Ok(())
    }

    fn outbound_tasks(&self, at: &mut Binding, tasks: &mut Vec<WorkerTask>) -> anyhow::Result<()> {
        let port = at.cfg.outbound_port;
        let families = [(LISTENER_V4, false), (LISTENER_V6, true)];
        for (slot, v6) in families
            .into_iter()
            .filter(|&(_, v6)| !v6 || at.cfg.proxy_v6.is_some())
        {
            let bind = || match v6 {
                false => outbound::bind_v4(port),
                true => outbound::bind_v6(port),
            };
            let family = if v6 { "IPv6 " } else { "" };
            let listener = at
                .sockets
                .get(ListenerKind::Outbound, v6, bind)
                .with_context(|| format!("binding the {family}outbound listener on port {port}"))?;
            if at.first {
                at.listeners.register(slot, &listener)?;
            }
            tasks.push(serving(&self.outbound, listener, Outbound::serve));
        }
        Ok(())
    }

    fn inbound_tasks(&self, at: &mut Binding, tasks: &mut Vec<WorkerTask>) -> anyhow::Result<()> {
        let port = at.cfg.inbound_port;
        for (slot, v6) in [(LISTENER_INBOUND_V4, false), (LISTENER_INBOUND_V6, true)] {
            let listener = match at
                .sockets
                .get(ListenerKind::Inbound, v6, || inbound::bind(port, v6))
            {
                Ok(listener) => listener,
                // A node without IPv6: its pods have no IPv6 addresses to capture either.
                Err(e) if v6 && e.raw_os_error() == Some(nix::libc::EAFNOSUPPORT) => {
                    if at.first {
                        info!("no IPv6 on this node: inbound capture is IPv4 only");
                    }
                    continue;
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("binding the inbound listener on port {port}"))
                }
            };
            if at.first {
                at.listeners.register(slot, &listener)?;
            }
            tasks.push(serving(&self.inbound, listener, Inbound::serve));
        }
        Ok(())
    }

    /// A worker's task that closes its pools' idle connections and forgets idle endpoints.
    fn reaper(&self) -> WorkerTask {
        let http = self.http.clone();
        Box::new(move || {
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
        })
    }
}

/// Where one worker's listeners come from: taken over or bound, and, for the first worker,
/// registered in the LISTENERS map.
struct Binding<'a> {
    cfg: &'a Config,
    sockets: &'a mut Sockets,
    listeners: &'a mut Listeners,
    first: bool,
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

/// Raises the soft limit on open files to the hard limit, as Envoy and ztunnel deployments
/// expect of a proxy: container runtimes often start processes with a soft limit of 1,024,
/// which would refuse connections at accept long before `max_connections` (per listener kind,
/// each proxied connection holding two descriptors: the client's and the upstream's).
pub fn raise_open_files_limit(max_connections: usize) {
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
