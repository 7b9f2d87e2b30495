//! Flags and environment, turned into a [`Config`].

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use aviary_abi::{AgentConfig, SockAddr, CONFIG_IPV6, CONFIG_SK_MSG};
use clap::{Parser, ValueEnum};
use http::HeaderValue;

use crate::{
    ebpf::{DatapathConfig, TcAttach, AUTO_UPLINKS},
    identity::IdentityConfig,
    policy::gamma::parse_duration,
    proxy::{balance::OutlierConfig, http::HttpConfig},
};

/// The socket mark on the proxy's own upstream sockets. Istio and ztunnel use 1337 (0x539) for
/// the same purpose; Aviary uses its own value so the two never take each other's traffic.
pub const DEFAULT_PROXY_MARK: u32 = 0xa71a;
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
pub const DEFAULT_INBOUND_PORT: u16 = 15006;

pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15020";
pub const DEFAULT_HEALTH_ADDR: &str = "0.0.0.0:15021";
/// flagd's OFREP port, so that an application moved off a flagd sidecar keeps its port.
pub const DEFAULT_OFREP_ADDR: &str = "0.0.0.0:8016";

/// How long a metric series may go without a recording before it is removed; linkerd2-proxy
/// keeps idle series for the same 10 minutes.
pub const DEFAULT_METRICS_IDLE_EXPIRY: &str = "10m";

/// The shortest idle expiry: Prometheus's default scrape interval, so that a series is scraped
/// after its last recording before it can expire.
const MIN_METRICS_IDLE_EXPIRY: Duration = Duration::from_secs(60);

/// Connections per listener kind. An idle opaque connection costs about 10 KiB: 2.2 KiB of the
/// agent's own memory and two sockets' kernel objects, which the memory cgroup charges to the
/// agent too. Both kinds at this bound come to about 310 MiB, which with the policy of a large
/// cluster (124 MiB for 10,000 Services) fits the DaemonSet's 512 MiB limit: past the bound new
/// connections are refused, where past the memory limit the kernel would kill the agent and
/// every connection with it. Raise the two together.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 16_384;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "aviary-agent",
    version,
    about = "Aviary: sidecarless eBPF service-mesh agent",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Read policy (Namespaces, Pods, Services, EndpointSlices, HTTPRoutes) from Kubernetes YAML
    /// in this file or directory instead of the API server; reloads on change.
    #[arg(long, env = "AVIARY_LOCAL")]
    pub local: Option<PathBuf>,

    /// This node's name: only pods scheduled here are enrolled. Required with the API server;
    /// in local mode, leave it unset to treat every pod in the files as local.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// A kubeconfig for reaching the API server; without it, the in-cluster service account.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// The agent's own namespace, where the Lease that picks the one status writer lives.
    #[arg(long, env = "POD_NAMESPACE", default_value = "aviary-system")]
    pub namespace: String,

    /// The agent's own pod (the downward API's metadata.name): `/ready` names it in an
    /// `aviary-pod` header, for `aviary-agent probe ready`.
    #[arg(long, env = "POD_NAME", value_parser = parse_pod_name)]
    pub pod_name: Option<HeaderValue>,

    /// Write HTTPRoute status and Events (by the Lease holder only).
    #[arg(long, env = "AVIARY_WRITE_STATUS", default_value_t = true, action = clap::ArgAction::Set)]
    pub write_status: bool,

    /// The cgroup v2 directory that holds the node's pod cgroups (the kubelet's kubepods root),
    /// where the capture programs are attached. Unset: found at start, `kubepods.slice`
    /// (systemd driver) or `kubepods` (cgroupfs driver) under the cgroup v2 mount.
    /// An empty value is unset, as a manifest writes it (clap's own path parser refuses it).
    #[arg(long, env = "AVIARY_CGROUP_ROOT", value_parser = parse_path)]
    pub cgroup_root: Option<PathBuf>,

    /// The bpf filesystem; mounted if nothing is mounted there.
    #[arg(long, env = "AVIARY_BPFFS", default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,

    /// Directory name under the bpf filesystem for Aviary's pinned maps and links.
    #[arg(long, env = "AVIARY_PIN_NAME", default_value = "aviary", value_parser = parse_pin_name)]
    pub pin_name: String,

    /// The Unix socket where a successor agent (an upgrade) takes over from this one: the
    /// listening sockets and the open connections move to it. In a directory the old and the
    /// new agent's pods both mount.
    #[arg(
        long,
        env = "AVIARY_HANDOFF_SOCKET",
        default_value = "/run/aviary/handoff.sock"
    )]
    pub handoff_socket: PathBuf,

    /// The identity signer, host:port (the host is the name its certificate carries): with it,
    /// the agent holds a certificate for each service account its node's enrolled pods run as.
    /// Empty: no workload identities.
    #[arg(long, env = "AVIARY_IDENTITY_SIGNER", default_value = "")]
    pub identity_signer: String,

    /// The SPIFFE trust domain of workload identities.
    #[arg(long, env = "AVIARY_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// The signer's CA certificate: the ConfigMap aviary-trust-bundle, mounted.
    #[arg(
        long,
        env = "AVIARY_TRUST_BUNDLE",
        default_value = "/var/run/aviary/trust/ca.crt"
    )]
    pub trust_bundle: PathBuf,

    /// The agent's service-account token projected for the signer (audience aviary-identity).
    #[arg(
        long,
        env = "AVIARY_IDENTITY_TOKEN",
        default_value = "/var/run/secrets/aviary/identity/token"
    )]
    pub identity_token: PathBuf,

    /// How long a stopping agent lets in-flight requests, mirrors and connections finish
    /// before it exits: below the pod's terminationGracePeriodSeconds.
    #[arg(long, env = "AVIARY_DRAIN_TIMEOUT", value_parser = parse_flag_duration, default_value = "20s")]
    pub drain_timeout: Duration,

    /// The IPv4 address at which pods reach this node's proxy (the node's address). Required.
    #[arg(long, env = "AVIARY_PROXY_IP")]
    pub proxy_ip: Option<Ipv4Addr>,

    /// The admin endpoint (/healthz, /ready, /config_dump, /stats/ebpf): local only, and apart
    /// from traffic, so a slow query never adds latency to requests.
    #[arg(long, env = "AVIARY_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,

    /// The health endpoint (`/healthz`, `/ready`) for the kubelet's probes.
    #[arg(long, env = "AVIARY_HEALTH_ADDR", default_value = DEFAULT_HEALTH_ADDR)]
    pub health_addr: SocketAddr,

    /// The metrics endpoint (Prometheus scrapes `/metrics` here); apart from traffic and admin.
    #[arg(long, env = "AVIARY_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,

    /// The OFREP endpoint, where applications evaluate their namespace's feature flags (the
    /// OpenFeature Remote Evaluation Protocol); `off` (or empty) serves none. On every address
    /// by default: pods reach it at their node's address.
    // Spelled out as std::option::Option so that clap hands the whole value, `off` included, to
    // the parser instead of reading the type as an optional flag.
    #[arg(long, env = "AVIARY_OFREP_ADDR", default_value = DEFAULT_OFREP_ADDR, value_parser = parse_optional_addr)]
    pub ofrep_addr: std::option::Option<SocketAddr>,

    /// Also export Flagger's `http_request_duration_seconds` family (by destination pod), so its
    /// built-in checks work without a MetricTemplate.
    #[arg(long, env = "AVIARY_FLAGGER_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub flagger_metrics: bool,

    /// How long a metric series nothing records into is kept before it is removed (at least
    /// 1m). A series that comes back starts again from 0.
    #[arg(long, env = "AVIARY_METRICS_IDLE_EXPIRY", value_parser = parse_idle_expiry, default_value = DEFAULT_METRICS_IDLE_EXPIRY)]
    pub metrics_idle_expiry: Duration,

    /// The IPv6 address at which pods reach the proxy; without it only IPv4 services (and
    /// v4-mapped connects) are captured.
    #[arg(long, env = "AVIARY_PROXY_IP6")]
    pub proxy_ip6: Option<Ipv6Addr>,

    /// The node's uplinks (comma-separated), or `auto` for the interfaces of its default routes:
    /// inbound capture runs on their ingress, and on the pods' host-side veths. None: no inbound
    /// capture.
    #[arg(long, env = "AVIARY_INBOUND_INTERFACES", value_delimiter = ',')]
    pub inbound_interfaces: Vec<String>,

    /// The bridge the pods hang off, when they do (a bridge CNI): its ports get the program that
    /// hands frames for enrolled pods to the host.
    #[arg(long, env = "AVIARY_INBOUND_BRIDGE")]
    pub inbound_bridge: Option<String>,

    /// How inbound capture attaches to interfaces: TCX links (Linux 6.6+), netlink filters on a
    /// clsact qdisc (older kernels), or `auto`: TCX where the kernel has it.
    #[arg(long, env = "AVIARY_TC_ATTACH", value_enum, default_value_t = TcAttachFlag::Auto)]
    pub tc_attach: TcAttachFlag,

    /// Port of the inbound proxy listener.
    #[arg(long, env = "AVIARY_INBOUND_PORT", default_value_t = DEFAULT_INBOUND_PORT)]
    pub inbound_port: u16,

    /// Port of the outbound proxy listener.
    #[arg(long, env = "AVIARY_OUTBOUND_PORT", default_value_t = DEFAULT_OUTBOUND_PORT)]
    pub outbound_port: u16,

    /// Socket mark of the proxy's upstream sockets (decimal or 0x-hex).
    #[arg(long, env = "AVIARY_PROXY_MARK", value_parser = parse_mark, default_value = "0xa71a")]
    pub proxy_mark: u32,

    /// Socket-to-socket fast path (sk_msg) for pod<->proxy traffic. Off by default: a socket
    /// in a SockHash reads through the kernel's tcp_bpf_recvmsg, which can return EAGAIN to a
    /// blocking read (see docs/architecture.md).
    #[arg(long, env = "AVIARY_SK_MSG", default_value_t = false, action = clap::ArgAction::Set)]
    pub sk_msg: bool,

    /// Data-plane worker threads, each with its own runtime and listeners. 0 (the default):
    /// the container's CPU limit (cgroup `cpu.max`), else the CPUs available.
    #[arg(long, env = "AVIARY_WORKERS", default_value_t = 0)]
    pub workers: usize,

    #[command(flatten)]
    pub proxy: ProxyArgs,
    /// Connections each kind of proxy listener (outbound, inbound) holds at once, across the
    /// workers; one more is reset as soon as it is accepted.
    #[arg(long, env = "AVIARY_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Log format.
    #[arg(long, env = "AVIARY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How the proxy bounds time and memory, and when it gives up on an endpoint. Durations are
/// written as in the Gateway API ("500ms", "1m30s"); "0s" turns a timeout off where that is
/// allowed.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// How long a connect to an endpoint may take before the request moves to another.
    #[arg(long, env = "AVIARY_CONNECT_TIMEOUT", value_parser = parse_flag_duration, default_value = "1s")]
    pub connect_timeout: Duration,

    /// How long a mutual-TLS tunnel to another node's agent may take once its connect is
    /// made: the TLS and HTTP/2 handshakes and the CONNECT, several round trips and a
    /// signature at each end, which a busy node takes longer for than a connect.
    #[arg(long, env = "AVIARY_TUNNEL_HANDSHAKE_TIMEOUT", value_parser = parse_flag_duration, default_value = "5s")]
    pub tunnel_handshake_timeout: Duration,

    /// How long an HTTP/1.1 client may take to send a request's headers, counted from when the
    /// proxy starts waiting for them: the connection's start, or the end of the previous
    /// response. It therefore also ends HTTP/1.1 connections idle between requests, as nginx's
    /// client_header_timeout does. "0s": no limit.
    #[arg(long, env = "AVIARY_HEADER_READ_TIMEOUT", value_parser = parse_flag_duration, default_value = "60s")]
    pub header_read_timeout: Duration,

    /// A client connection (HTTP or opaque TCP) that moves no byte either way for this long is
    /// closed; for opaque TCP, the upstream connection with it. "0s": never.
    #[arg(long, env = "AVIARY_IDLE_TIMEOUT", value_parser = parse_flag_duration, default_value = "1h")]
    pub idle_timeout: Duration,

    /// How long an upstream HTTP connection may wait in the pool for its next request.
    #[arg(long, env = "AVIARY_UPSTREAM_IDLE_TIMEOUT", value_parser = parse_flag_duration, default_value = "60s")]
    pub upstream_idle_timeout: Duration,

    /// HTTP/2 connections, client and upstream, are pinged this often; "0s": never.
    #[arg(long, env = "AVIARY_HTTP2_KEEPALIVE_INTERVAL", value_parser = parse_flag_duration, default_value = "20s")]
    pub http2_keepalive_interval: Duration,

    /// An HTTP/2 connection whose ping is not answered within this time is closed.
    #[arg(long, env = "AVIARY_HTTP2_KEEPALIVE_TIMEOUT", value_parser = parse_flag_duration, default_value = "20s")]
    pub http2_keepalive_timeout: Duration,

    /// A request body up to this size is held in memory when a mirror will send it again;
    /// larger bodies stream and are not mirrored.
    #[arg(long, env = "AVIARY_BODY_BUFFER_LIMIT", default_value_t = 1024 * 1024)]
    pub body_buffer_limit: usize,

    /// The bytes of request bodies held at once, across all requests; beyond it, bodies stream
    /// and their mirror copies are skipped (and counted).
    #[arg(long, env = "AVIARY_BODY_BUFFER_BUDGET", default_value_t = 64 * 1024 * 1024)]
    pub body_buffer_budget: usize,

    /// Outlier detection: 5xx answers in a row that eject an endpoint; 0 turns it off. A
    /// failed connect always ejects.
    #[arg(long, env = "AVIARY_OUTLIER_CONSECUTIVE_5XX", default_value_t = 5)]
    pub outlier_consecutive_5xx: u32,

    /// Outlier detection: the first ejection's length; each ejection in a row doubles it.
    #[arg(long, env = "AVIARY_OUTLIER_BASE_EJECTION", value_parser = parse_flag_duration, default_value = "5s")]
    pub outlier_base_ejection: Duration,

    /// Outlier detection: the longest an ejection lasts.
    #[arg(long, env = "AVIARY_OUTLIER_MAX_EJECTION", value_parser = parse_flag_duration, default_value = "2m")]
    pub outlier_max_ejection: Duration,

    /// Outlier detection: the share of a backend's endpoints ejected at once at most, in
    /// percent (one of several always may be; the last never is).
    #[arg(long, env = "AVIARY_OUTLIER_MAX_EJECTED_PERCENT", value_parser = clap::value_parser!(u8).range(0..=100), default_value_t = 50)]
    pub outlier_max_ejected_percent: u8,
}

impl ProxyArgs {
    fn http(&self) -> anyhow::Result<HttpConfig> {
        let required = [
            ("--connect-timeout", self.connect_timeout),
            ("--tunnel-handshake-timeout", self.tunnel_handshake_timeout),
            ("--upstream-idle-timeout", self.upstream_idle_timeout),
            ("--http2-keepalive-timeout", self.http2_keepalive_timeout),
            ("--outlier-base-ejection", self.outlier_base_ejection),
            ("--outlier-max-ejection", self.outlier_max_ejection),
        ];
        if let Some((flag, _)) = required.iter().find(|(_, d)| d.is_zero()) {
            anyhow::bail!("{flag} must be longer than 0s");
        }
        if self.outlier_max_ejection < self.outlier_base_ejection {
            anyhow::bail!("--outlier-max-ejection must be at least --outlier-base-ejection");
        }
        if self.body_buffer_budget < self.body_buffer_limit {
            anyhow::bail!("--body-buffer-budget must be at least --body-buffer-limit");
        }
        let unless_zero = |d: Duration| (!d.is_zero()).then_some(d);
        Ok(HttpConfig {
            body_buffer_limit: self.body_buffer_limit,
            body_buffer_budget: self.body_buffer_budget,
            connect_timeout: self.connect_timeout,
            tunnel_handshake_timeout: self.tunnel_handshake_timeout,
            header_read_timeout: unless_zero(self.header_read_timeout),
            idle_timeout: unless_zero(self.idle_timeout),
            pool_idle_timeout: self.upstream_idle_timeout,
            http2_keepalive_interval: unless_zero(self.http2_keepalive_interval),
            http2_keepalive_timeout: self.http2_keepalive_timeout,
            outlier: OutlierConfig {
                consecutive_server_errors: self.outlier_consecutive_5xx,
                base_ejection: self.outlier_base_ejection,
                max_ejection: self.outlier_max_ejection,
                max_ejected_percent: self.outlier_max_ejected_percent,
            },
            ..HttpConfig::default()
        })
    }
}

/// A duration flag, in the Gateway API's format (the one policy uses); "0s" is zero.
fn parse_flag_duration(s: &str) -> Result<Duration, String> {
    Ok(parse_duration(s)?.unwrap_or(Duration::ZERO))
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Mount a bpf filesystem at PATH unless one is there, then exit: a DaemonSet's init
    /// container runs this with mount propagation to the host, so pins outlive the agent.
    MountBpffs {
        #[arg(default_value = "/sys/fs/bpf")]
        path: PathBuf,
    },
    /// Take Aviary's datapath off this node: detach every program, remove the inbound policy
    /// routing and every pin. An agent's exit leaves them in place for the next agent; this is
    /// the last step of removing Aviary. Idempotent.
    Uninstall {
        /// The bpf filesystem the agent pinned under.
        #[arg(long, env = "AVIARY_BPFFS", default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        /// The agent's directory name under the bpf filesystem.
        #[arg(long, env = "AVIARY_PIN_NAME", default_value = "aviary", value_parser = parse_pin_name)]
        pin_name: String,
    },
    /// Print a summary of a running agent, read from its admin endpoint (like `cilium status`).
    Status {
        #[arg(long, default_value = DEFAULT_ADMIN_ADDR)]
        admin: SocketAddr,
    },
    /// Probe a running agent for the kubelet: exit 0 if it is healthy, else 1 with the reason.
    #[command(subcommand)]
    Probe(Probe),
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Probe {
    /// Ready, and this pod's agent: the agents of the old and the new pod share the node's
    /// network, and so the health port, while they overlap in a rolling update, so an HTTP
    /// probe could be answered by the old pod's agent. With POD_NAME set, only an answer that
    /// names this pod counts.
    Ready {
        /// The agent's health endpoint; an unspecified address means this host's loopback.
        #[arg(long, env = "AVIARY_HEALTH_ADDR", default_value = DEFAULT_HEALTH_ADDR)]
        health: SocketAddr,
        #[arg(long, env = "POD_NAME", value_parser = parse_pod_name)]
        pod_name: Option<HeaderValue>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TcAttachFlag {
    Auto,
    Tcx,
    Netlink,
}

/// A directory name under the bpf filesystem: one path component.
fn parse_pin_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s.contains('/') || s == "." || s == ".." {
        return Err(format!("a single directory name, got {s:?}"));
    }
    Ok(s.to_owned())
}

/// A path, empty or not.
fn parse_path(s: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(s))
}

/// A pod name, as the header value `/ready` answers with.
/// An endpoint's address, or `off` (or empty, as a manifest writes it) for no endpoint.
fn parse_optional_addr(s: &str) -> Result<Option<SocketAddr>, String> {
    match s {
        "" | "off" => Ok(None),
        addr => addr
            .parse()
            .map(Some)
            .map_err(|e| format!("{e}: an address such as 0.0.0.0:8016, or off")),
    }
}

fn parse_pod_name(s: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(s).map_err(|_| format!("not a pod name: {s:?}"))
}

fn parse_mark(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    match parsed {
        Ok(0) => Err("the mark must not be 0: unmarked sockets would count as the proxy's".into()),
        Ok(mark) => Ok(mark),
        Err(e) => Err(format!("not a number: {e}")),
    }
}

/// The metrics idle expiry: a duration flag of at least a minute.
fn parse_idle_expiry(s: &str) -> Result<Duration, String> {
    let expiry = parse_flag_duration(s)?;
    if expiry < MIN_METRICS_IDLE_EXPIRY {
        return Err("at least 1m: a series must outlive a scrape after its last recording".into());
    }
    Ok(expiry)
}

/// Where policy comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    Local(PathBuf),
    /// The API server the agent runs under (in-cluster, or KUBECONFIG).
    Kubernetes {
        kubeconfig: Option<PathBuf>,
        node: String,
        namespace: String,
        write_status: bool,
    },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub policy: PolicySource,
    pub node_name: Option<String>,
    pub pod_name: Option<HeaderValue>,
    /// None: found at start ([`crate::cgroup::pod_root`]).
    pub cgroup_root: Option<PathBuf>,
    pub bpffs: PathBuf,
    pub pin_dir: PathBuf,
    pub handoff_socket: PathBuf,
    /// None: no workload identities.
    pub identity: Option<IdentityConfig>,
    pub drain_timeout: Duration,
    pub proxy_v4: Ipv4Addr,
    pub proxy_v6: Option<Ipv6Addr>,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub health_addr: SocketAddr,
    /// None: no OFREP endpoint.
    pub ofrep_addr: Option<SocketAddr>,
    pub flagger_metrics: bool,
    pub metrics_idle_expiry: Duration,
    pub outbound_port: u16,
    pub inbound_interfaces: Vec<String>,
    pub inbound_bridge: Option<String>,
    /// None: TCX where the kernel has it.
    pub tc_attach: Option<TcAttach>,
    pub inbound_port: u16,
    pub proxy_mark: u32,
    pub sk_msg: bool,
    /// Data-plane workers, resolved (at least 1).
    pub workers: usize,
    pub http: HttpConfig,
    /// Per listener kind.
    pub max_connections: usize,
    pub log_format: LogFormat,
}

impl TryFrom<Args> for Config {
    type Error = anyhow::Error;

    fn try_from(args: Args) -> anyhow::Result<Self> {
        let policy = match (args.local, &args.node_name) {
            (Some(path), _) => PolicySource::Local(path),
            (None, Some(node)) => PolicySource::Kubernetes {
                kubeconfig: args.kubeconfig,
                node: node.clone(),
                namespace: args.namespace,
                write_status: args.write_status,
            },
            (None, None) => anyhow::bail!(
                "no policy source: on a node, set NODE_NAME (--node-name) to read policy from the \
                 API server; without a cluster, pass --local PATH (Kubernetes YAML)"
            ),
        };
        let Some(proxy_v4) = args.proxy_ip else {
            anyhow::bail!("--proxy-ip (or AVIARY_PROXY_IP) is required: the node address pods reach the proxy at");
        };
        // Empty values are unset ones: a manifest's "" turns a setting off.
        let inbound_interfaces: Vec<String> = args
            .inbound_interfaces
            .into_iter()
            .filter(|i| !i.is_empty())
            .collect();
        let inbound_bridge = args.inbound_bridge.filter(|b| !b.is_empty());
        let auto = inbound_interfaces.iter().any(|i| i == AUTO_UPLINKS);
        if auto && inbound_interfaces.len() > 1 {
            anyhow::bail!("--inbound-interfaces takes interface names, or {AUTO_UPLINKS:?} alone");
        }
        if inbound_bridge.is_some() && inbound_interfaces.is_empty() {
            anyhow::bail!(
                "--inbound-bridge needs --inbound-interfaces (the uplinks, or {AUTO_UPLINKS:?}): \
                 inbound capture is on only with them"
            );
        }
        let http = args.proxy.http()?;
        Ok(Self {
            policy,
            node_name: args.node_name,
            pod_name: args.pod_name,
            cgroup_root: args.cgroup_root.filter(|p| !p.as_os_str().is_empty()),
            pin_dir: args.bpffs.join(&args.pin_name),
            bpffs: args.bpffs,
            handoff_socket: args.handoff_socket,
            identity: (!args.identity_signer.is_empty()).then_some(IdentityConfig {
                signer: args.identity_signer,
                trust_domain: args.trust_domain,
                trust_bundle: args.trust_bundle,
                token: args.identity_token,
            }),
            drain_timeout: args.drain_timeout,
            proxy_v4,
            proxy_v6: args.proxy_ip6,
            admin_addr: args.admin_addr,
            metrics_addr: args.metrics_addr,
            health_addr: args.health_addr,
            ofrep_addr: args.ofrep_addr,
            flagger_metrics: args.flagger_metrics,
            metrics_idle_expiry: args.metrics_idle_expiry,
            outbound_port: args.outbound_port,
            inbound_interfaces,
            inbound_bridge,
            tc_attach: match args.tc_attach {
                TcAttachFlag::Auto => None,
                TcAttachFlag::Tcx => Some(TcAttach::Tcx),
                TcAttachFlag::Netlink => Some(TcAttach::Netlink),
            },
            inbound_port: args.inbound_port,
            workers: crate::proxy::workers::worker_count(Some(args.workers)),
            proxy_mark: args.proxy_mark,
            sk_msg: args.sk_msg,
            http,
            max_connections: args.max_connections as usize,
            log_format: args.log_format,
        })
    }
}

impl Config {
    /// What the eBPF loader needs of it, attaching at `cgroup_root` (the kubelet's pod root,
    /// configured or found).
    pub fn datapath(&self, cgroup_root: PathBuf) -> DatapathConfig {
        let mut flags = 0;
        if self.sk_msg {
            flags |= CONFIG_SK_MSG;
        }
        let proxy_v6 = self.proxy_v6.map(|ip| {
            flags |= CONFIG_IPV6;
            SockAddr::from(std::net::SocketAddr::from((ip, 0))).addr
        });
        DatapathConfig {
            cgroup_root,
            inbound_interfaces: self.inbound_interfaces.clone(),
            inbound_bridge: self.inbound_bridge.clone(),
            tc_attach: self.tc_attach.unwrap_or_else(TcAttach::for_this_kernel),
            bpffs: self.bpffs.clone(),
            pin_dir: self.pin_dir.clone(),
            programs: AgentConfig {
                proxy_v4: u32::from_ne_bytes(self.proxy_v4.octets()),
                proxy_v6: proxy_v6.unwrap_or_default(),
                proxy_port: self.outbound_port.into(),
                proxy_mark: self.proxy_mark,
                flags,
                // Read from the bridge when inbound capture attaches to it.
                bridge_mac: [0; 6],
                _pad: [0; 2],
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<Config> {
        Config::try_from(Args::try_parse_from([&["aviary-agent"], args].concat())?)
    }

    #[test]
    fn defaults() {
        let cfg = parse(&["--local", "p.yaml", "--proxy-ip", "10.0.0.1"]).unwrap();
        assert_eq!(cfg.policy, PolicySource::Local("p.yaml".into()));
        assert_eq!(cfg.pin_dir, PathBuf::from("/sys/fs/bpf/aviary"));
        assert_eq!(cfg.outbound_port, 15001);
        assert_eq!(cfg.proxy_mark, DEFAULT_PROXY_MARK);
        assert!(!cfg.sk_msg);
        assert_eq!(cfg.metrics_idle_expiry, Duration::from_secs(600));
        assert_eq!(cfg.max_connections, DEFAULT_MAX_CONNECTIONS as usize);
    }

    #[test]
    fn the_metrics_idle_expiry_takes_a_unit_and_is_a_minute_at_least() {
        assert_eq!(parse_idle_expiry("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_idle_expiry("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_idle_expiry("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_idle_expiry("30s").is_err());
        assert!(parse_idle_expiry("600").is_err());
        assert!(parse_idle_expiry("m").is_err());
        assert!(parse_idle_expiry("").is_err());
    }

    #[test]
    fn proxy_limits_have_defaults_and_take_durations() {
        let base = ["--local", "p.yaml", "--proxy-ip", "10.0.0.1"];
        let http = parse(&base).unwrap().http;
        assert_eq!(http.connect_timeout, Duration::from_secs(1));
        assert_eq!(http.tunnel_handshake_timeout, Duration::from_secs(5));
        assert_eq!(http.header_read_timeout, Some(Duration::from_secs(60)));
        assert_eq!(http.idle_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(http.pool_idle_timeout, Duration::from_secs(60));
        assert_eq!(http.http2_keepalive_interval, Some(Duration::from_secs(20)));
        assert_eq!(http.outlier, OutlierConfig::default());
        assert_eq!(http.body_buffer_budget, 64 << 20);

        let set = [
            "--connect-timeout=250ms",
            "--tunnel-handshake-timeout=20s",
            "--idle-timeout=0s",
            "--header-read-timeout=5s",
            "--outlier-max-ejection=1h",
            "--outlier-max-ejected-percent=20",
        ];
        let http = parse(&[&base[..], &set].concat()).unwrap().http;
        assert_eq!(http.connect_timeout, Duration::from_millis(250));
        assert_eq!(http.tunnel_handshake_timeout, Duration::from_secs(20));
        assert_eq!(http.idle_timeout, None, "0s turns it off");
        assert_eq!(http.header_read_timeout, Some(Duration::from_secs(5)));
        assert_eq!(http.outlier.max_ejection, Duration::from_secs(3600));
        assert_eq!(http.outlier.max_ejected_percent, 20);

        for bad in [
            "--connect-timeout=0s",
            "--connect-timeout=10",
            "--tunnel-handshake-timeout=0s",
            "--idle-timeout=99999999h",
            "--outlier-max-ejected-percent=101",
            "--outlier-max-ejection=1s",
            "--body-buffer-budget=1",
        ] {
            let err = parse(&[&base[..], &[bad]].concat())
                .unwrap_err()
                .to_string();
            let flag = bad.split('=').next().unwrap();
            assert!(err.contains(flag), "{bad}: {err}");
        }
    }

    #[test]
    fn the_connection_limit_is_at_least_one() {
        let max = |value: &str| {
            parse(&[
                "--local",
                "p",
                "--proxy-ip",
                "10.0.0.1",
                "--max-connections",
                value,
            ])
            .map(|cfg| cfg.max_connections)
        };
        assert_eq!(max("500").unwrap(), 500);
        assert!(max("0").is_err());
        assert!(max("-1").is_err());
    }

    #[test]
    fn marks_parse_in_hex_and_decimal_but_not_zero() {
        assert_eq!(parse_mark("0x539"), Ok(1337));
        assert_eq!(parse_mark("1337"), Ok(1337));
        assert!(parse_mark("0").is_err());
        assert!(parse_mark("mark").is_err());
    }

    #[test]
    fn the_ofrep_endpoint_is_on_flagds_port_unless_turned_off() {
        let base = ["--local", "p", "--proxy-ip", "10.0.0.1"];
        let ofrep = |extra: &[&str]| parse(&[&base[..], extra].concat()).map(|c| c.ofrep_addr);
        assert_eq!(
            ofrep(&[]).unwrap(),
            Some(DEFAULT_OFREP_ADDR.parse().unwrap())
        );
        assert_eq!(
            ofrep(&["--ofrep-addr", "127.0.0.1:9016"]).unwrap(),
            Some("127.0.0.1:9016".parse().unwrap())
        );
        assert_eq!(ofrep(&["--ofrep-addr", "off"]).unwrap(), None);
        assert_eq!(ofrep(&["--ofrep-addr", ""]).unwrap(), None, "empty is off");
        let err = ofrep(&["--ofrep-addr", "8016"]).unwrap_err().to_string();
        assert!(
            err.contains("--ofrep-addr") && err.contains("or off"),
            "{err}"
        );
    }

    #[test]
    fn sk_msg_can_be_switched_on() {
        let cfg = parse(&["--local", "p", "--proxy-ip", "10.0.0.1", "--sk-msg", "true"]).unwrap();
        assert!(cfg.sk_msg);
    }

    #[test]
    fn a_policy_source_is_required() {
        let err = parse(&["--proxy-ip", "10.0.0.1"]).unwrap_err();
        assert!(err.to_string().contains("--local"), "{err}");
        assert!(err.to_string().contains("NODE_NAME"), "{err}");
    }

    #[test]
    fn a_node_name_without_local_files_means_the_api_server() {
        let cfg = parse(&["--proxy-ip", "10.0.0.1", "--node-name", "n1"]).unwrap();
        assert_eq!(
            cfg.policy,
            PolicySource::Kubernetes {
                kubeconfig: None,
                node: "n1".into(),
                namespace: "aviary-system".into(),
                write_status: true
            }
        );
    }

    #[test]
    fn status_needs_no_run_flags() {
        let args = Args::try_parse_from(["aviary-agent", "status"]).unwrap();
        assert!(matches!(args.command, Some(Command::Status { admin }) if admin.port() == 15000));
        let err = parse(&["--local", "p"]).unwrap_err();
        assert!(err.to_string().contains("--proxy-ip"), "{err}");
    }

    #[test]
    fn the_ready_probe_needs_no_run_flags() {
        let probe = |args: &[&str]| match Args::try_parse_from(
            [&["aviary-agent", "probe", "ready"], args].concat(),
        )
        .unwrap()
        .command
        {
            Some(Command::Probe(Probe::Ready { health, pod_name })) => (health, pod_name),
            other => panic!("{other:?}"),
        };
        let (health, _) = probe(&[]);
        assert_eq!(health, DEFAULT_HEALTH_ADDR.parse().unwrap());
        let (health, pod) = probe(&["--health", "127.0.0.1:9", "--pod-name", "aviary-x1"]);
        assert_eq!(health.port(), 9);
        assert_eq!(pod.unwrap(), "aviary-x1");
    }

    #[test]
    fn inbound_uplinks_are_named_or_auto_alone() {
        let inbound = |extra: &[&str]| {
            parse(&[&["--local", "p", "--proxy-ip", "10.0.0.1"], extra].concat())
                .map(|cfg| cfg.inbound_interfaces)
        };
        assert_eq!(
            inbound(&["--inbound-interfaces", "auto"]).unwrap(),
            ["auto"]
        );
        assert_eq!(
            inbound(&["--inbound-interfaces", "eth0,eth1"]).unwrap(),
            ["eth0", "eth1"]
        );
        let err = inbound(&["--inbound-interfaces", "auto,eth0"]).unwrap_err();
        assert!(err.to_string().contains("alone"), "{err}");
        let err = inbound(&["--inbound-bridge", "cni0"]).unwrap_err();
        assert!(err.to_string().contains("--inbound-interfaces"), "{err}");
        assert!(
            inbound(&["--inbound-interfaces", "", "--inbound-bridge", ""])
                .unwrap()
                .is_empty(),
            "empty is off"
        );
    }

    #[test]
    fn uninstall_takes_the_pin_flags_and_nothing_else() {
        let args = Args::try_parse_from(["aviary-agent", "uninstall", "--pin-name", "x"]).unwrap();
        assert!(matches!(
            args.command,
            Some(Command::Uninstall { bpffs, pin_name }) if bpffs.as_path() == std::path::Path::new("/sys/fs/bpf") && pin_name == "x"
        ));
        assert!(Args::try_parse_from(["aviary-agent", "uninstall", "--pin-name", ".."]).is_err());
        assert!(
            Args::try_parse_from(["aviary-agent", "uninstall", "--proxy-ip", "10.0.0.1"]).is_err()
        );
    }

    #[test]
    fn workload_identities_are_on_with_a_signer_only() {
        let base = ["--local", "p", "--proxy-ip", "10.0.0.1"];
        assert_eq!(parse(&base).unwrap().identity, None);
        let cfg = parse(
            &[
                &base[..],
                &[
                    "--identity-signer",
                    "aviary-identity.aviary-system.svc:15012",
                ],
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(
            cfg.identity,
            Some(IdentityConfig {
                signer: "aviary-identity.aviary-system.svc:15012".into(),
                trust_domain: "cluster.local".into(),
                trust_bundle: "/var/run/aviary/trust/ca.crt".into(),
                token: "/var/run/secrets/aviary/identity/token".into(),
            })
        );
        assert_eq!(
            parse(&[&base[..], &["--identity-signer", ""]].concat())
                .unwrap()
                .identity,
            None,
            "empty is off"
        );
    }

    #[test]
    fn pin_name_is_one_directory() {
        assert!(parse(&[
            "--local",
            "p",
            "--proxy-ip",
            "10.0.0.1",
            "--pin-name",
            "a/b"
        ])
        .is_err());
    }

    #[test]
    fn the_cgroup_root_is_found_unless_given_and_empty_is_unset() {
        let base = ["--local", "p", "--proxy-ip", "10.0.0.1"];
        let root = |extra: &[&str]| parse(&[&base[..], extra].concat()).unwrap().cgroup_root;
        assert_eq!(root(&[]), None);
        assert_eq!(root(&["--cgroup-root", ""]), None);
        assert_eq!(
            root(&["--cgroup-root", "/sys/fs/cgroup/kubepods"]),
            Some(PathBuf::from("/sys/fs/cgroup/kubepods"))
        );
    }

    #[test]
    fn program_config_carries_the_proxy_address_in_kernel_order() {
        let args = Args::try_parse_from([
            "aviary-agent",
            "--local",
            "p",
            "--proxy-ip",
            "10.244.1.1",
            "--proxy-ip6",
            "fd00::1",
        ])
        .unwrap();
        let cfg = Config::try_from(args)
            .unwrap()
            .datapath("/sys/fs/cgroup/kubepods".into());
        assert_eq!(cfg.programs.proxy_v4.to_ne_bytes(), [10, 244, 1, 1]);
        assert_eq!(cfg.programs.proxy_port, 15001);
        assert_eq!(cfg.programs.flags, CONFIG_IPV6);
        assert_eq!(cfg.programs.proxy_v6[3].to_ne_bytes(), [0, 0, 0, 1]);
    }
}
