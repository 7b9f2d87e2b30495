//! `cargo xtask bench` (policy part): how long policy takes to compile and to propagate at
//! cluster scale, with the real kube-rs client against the list/watch fixture on loopback.
//! `--markdown PATH` writes its section of the benchmark's page (docs/benchmarks.md): what it
//! measures, this run's table and the goals.
#![forbid(unsafe_code)]

/// The report the data-path bench writes its sections into, shared so that this section reads
/// the same.
#[path = "aviary-bench/report.rs"]
mod report;

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use aviary_agent::{
    kubernetes::{self, node_pods, status},
    policy::{
        compiler::Compiler, local::parse_documents, service_routes::RouteOptions, Meta, Object,
        PodMeta, Store,
    },
    state::{Publisher, Snapshot, SnapshotRx},
};
use aviary_tests::apiserver::ApiServer;
use clap::Parser;
use report::{Report, Table};
use tokio::sync::{mpsc, watch};

#[derive(Parser)]
#[command(about = "Aviary's policy benchmark: compile time, memory and propagation at scale")]
struct Args {
    /// Cluster sizes, in Services; each runs in a process of its own, so that one size's
    /// memory never counts in another's.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000, 10_000, 50_000])]
    services: Vec<usize>,
    /// Endpoints per Service (one EndpointSlice each).
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Services per HTTPRoute: 5 makes 2,000 routes of 10,000 Services.
    #[arg(long, default_value_t = 5)]
    services_per_route: usize,
    /// Changes of each kind timed from the API server event to the new snapshot.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Endpoints name their pods, which run on other nodes ([`PODS_PER_NODE`] each) and are
    /// known as those nodes' agents publish them (`kubernetes::node_pods`). Without it, the
    /// sizes run as the goals are set (endpoints naming no pod), then the goal's size once more
    /// with pods, to show what they cost.
    #[arg(long)]
    pods: bool,
    /// Holds the store, the compiler and the snapshot for a heap profiler, and stops there.
    #[arg(long)]
    memory_only: bool,
    /// Also writes this benchmark's section of the benchmark's page to PATH (markdown): what it
    /// measures, this run's table and the goals. `cargo xtask bench` puts it on
    /// docs/benchmarks.md.
    #[arg(long, value_name = "PATH")]
    markdown: Option<PathBuf>,
}

const TITLE: &str = "Policy at scale";

/// What the section measures, for the page.
const METHOD: &str = "\
`aviary-policy-bench` (no privileges; `cargo xtask bench` runs it first) builds, at each size
(`--services`, each in a process of its own), a cluster in 100 namespaces: one EndpointSlice of
`--endpoints` endpoints per Service, and one Flagger-shaped HTTPRoute per `--services-per-route`
Services. It measures the memory an agent holds (the store, the compiler's state and the
snapshot, as RSS) and times a full compile, then serves the same objects from the API server
fixture on loopback to the real kube-rs watchers and times `--changes` changes of each kind from
the API server's event to the snapshot in force: a route's weights, a Service's endpoints (one
moves), and a pod of the node enrolled and unenrolled by its annotation. The goals are set for
endpoints that name no pod; the goal's size then runs once more with every endpoint naming a pod
on another node (100 per node), published in its node's NodePods as that node's agent would, to
show what other nodes' pods cost (`--pods` runs every size so). `--memory-only` stops after the
memory, for a heap profiler. A p99 of a few dozen changes is the largest of them, and the first
weight change after the initial sync is the slowest (it warms the watcher and the first copies
of the shared maps). The goals follow the table, each PASS or FAIL.";

/// Pods per node, when endpoints name pods: 100,000 endpoints are 1,000 other nodes.
const PODS_PER_NODE: usize = 100;

/// The size the goals are set at, and what they are.
const GOAL_SERVICES: usize = 10_000;
const GOAL_P99: Duration = Duration::from_millis(50);
const GOAL_MIB: f64 = 60.0;
const GOAL_SYNC: Duration = Duration::from_secs(1);

const NAMESPACES: usize = 100;

fn service(i: usize) -> String {
    let ns = i % NAMESPACES;
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: ns-{ns}}}\n\
         spec: {{clusterIP: \"10.{}.{}.{}\", ports: [{{name: http, port: 80}}]}}\n",
        96 + i / 65536,
        (i / 256) % 256,
        i % 256
    )
}

/// Service `i`'s EndpointSlice; with `moved` above 0, its last endpoint has moved to
/// [`moved_endpoint`]`(moved)`.
fn slice(i: usize, endpoints: usize, moved: usize, pods: bool) -> String {
    let ns = i % NAMESPACES;
    let addresses: Vec<String> = (0..endpoints)
        .map(|e| {
            let n = i * endpoints + e;
            let ip = if moved > 0 && e + 1 == endpoints {
                moved_endpoint(moved)
            } else {
                IpAddr::from([10, 128 + (n / 65536) as u8, (n / 256) as u8, n as u8])
            };
            let pod = if pods {
                format!(
                    ", nodeName: node-{}, targetRef: {{kind: Pod, name: {}, namespace: ns-{ns}}}",
                    n / PODS_PER_NODE,
                    pod_name(i, e)
                )
            } else {
                String::new()
            };
            format!("{{addresses: [\"{ip}\"], conditions: {{ready: true}}{pod}}}")
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: svc-{i}-1, namespace: ns-{ns}, labels: {{kubernetes.io/service-name: svc-{i}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: [{}]\n",
        addresses.join(", ")
    )
}

/// The pod behind endpoint `e` of Service `i`, of the Deployment `svc-<i>`.
fn pod_name(i: usize, e: usize) -> String {
    format!("svc-{i}-7d9f8b-{e}")
}

/// The pods other nodes' agents publish, by node: each a Deployment's, not enrolled.
fn other_nodes_pods(services: usize, endpoints: usize) -> Vec<Vec<PodMeta>> {
    let mut nodes: Vec<Vec<PodMeta>> = Vec::new();
    for i in 0..services {
        for e in 0..endpoints {
            let n = i * endpoints + e;
            if n.is_multiple_of(PODS_PER_NODE) {
                nodes.push(Vec::new());
            }
            nodes.last_mut().unwrap().push(PodMeta {
                metadata: Meta {
                    name: Some(pod_name(i, e)),
                    namespace: Some(format!("ns-{}", i % NAMESPACES)),
                    ..Meta::default()
                },
                workload: format!("svc-{i}"),
                host_network: false,
                service_account: Some("default".into()),
            });
        }
    }
    nodes
}

/// Where an endpoint moves to in the `moved`th endpoint change.
fn moved_endpoint(moved: usize) -> IpAddr {
    IpAddr::from([10, 250, (moved / 256) as u8, moved as u8])
}

/// The Service of index `j` in namespace `ns` (Services are dealt round-robin over namespaces).
fn service_index(j: usize, ns: usize) -> usize {
    j * NAMESPACES + ns
}

/// A Flagger-shaped route in its own namespace: on one Service, split over the next two.
fn route(r: usize, primary: u32) -> String {
    let (ns, j) = (r % NAMESPACES, 3 * (r / NAMESPACES));
    let [apex, a, b] = [j, j + 1, j + 2].map(|j| service_index(j, ns));
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: route-{r}, namespace: ns-{ns}}}\n\
         spec:\n  parentRefs: [{{group: \"\", kind: Service, name: svc-{apex}, port: 80}}]\n  \
         rules: [{{backendRefs: [{{name: svc-{a}, port: 80, weight: {primary}}}, \
         {{name: svc-{b}, port: 80, weight: {}}}]}}]\n",
        100 - primary
    )
}

/// This process's resident set now, in MiB.
fn rss_mib() -> f64 {
    let resident = procfs::process::Process::myself()
        .and_then(|me| me.statm())
        .map_or(0, |statm| statm.resident);
    (resident * procfs::page_size()) as f64 / (1024.0 * 1024.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A Pod of the benchmark's node, enrolled by its own annotation or not.
fn node_pod(enrolled: bool) -> String {
    let capture = if enrolled { "enabled" } else { "disabled" };
    format!(
        "apiVersion: v1\nkind: Pod\n\
         metadata: {{name: bench-pod, namespace: ns-0, uid: {POD_UID}, annotations: {{aviary.dev/capture: {capture}}}}}\n\
         spec: {{nodeName: {NODE}, containers: []}}\nstatus: {{podIP: 10.254.0.1}}\n"
    )
}

const POD_UID: &str = "00000000-0000-4000-8000-00000000b0b0";

/// What one cluster size measured.
#[derive(serde::Serialize, serde::Deserialize)]
struct Measured {
    services: usize,
    endpoints: usize,
    routes: usize,
    /// Pods of other nodes the endpoints name.
    pods: usize,
    store_ms: f64,
    compile_ms: f64,
    mib: f64,
    sync_s: f64,
    /// Per kind of change: name, p50, p99 and max in ms.
    changes: Vec<(String, f64, f64, f64)>,
}

/// The line a child process reports its size's results on.
const REPORT: &str = "measured: ";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let [services] = args.services[..] {
        let measured = measure(&args, services)?;
        println!("{REPORT}{}", serde_json::to_string(&measured)?);
        return Ok(());
    }
    let mut runs: Vec<(usize, bool)> = args.services.iter().map(|s| (*s, args.pods)).collect();
    if !args.pods {
        runs.push((GOAL_SERVICES, true));
    }
    let all = runs
        .into_iter()
        .map(|(services, pods)| measure_apart(&args, services, pods))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut report = Report::default();
    summarize(&args, &all, &mut report);
    if let Some(path) = &args.markdown {
        std::fs::write(path, report.markdown())
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        eprintln!("policy: wrote {}", path.display());
    }
    Ok(())
}

/// One size, measured in a process of its own so that no other size's memory counts in it.
fn measure_apart(args: &Args, services: usize, pods: bool) -> anyhow::Result<Measured> {
    let output = std::process::Command::new(std::env::current_exe()?)
        .arg(format!("--services={services}"))
        .arg(format!("--endpoints={}", args.endpoints))
        .arg(format!("--services-per-route={}", args.services_per_route))
        .arg(format!("--changes={}", args.changes))
        .args(pods.then_some("--pods"))
        .stderr(std::process::Stdio::inherit())
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(output.status.success(), "{services} Services: {stdout}");
    let report = stdout
        .lines()
        .find_map(|line| line.strip_prefix(REPORT))
        .ok_or_else(|| anyhow::anyhow!("{services} Services: no report in {stdout}"))?;
    Ok(serde_json::from_str::<Measured>(report)?)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The section: what it measures, the table of every size, what other nodes' pods cost, and
/// each goal with PASS or FAIL.
fn summarize(args: &Args, all: &[Measured], report: &mut Report) {
    report.section(TITLE, METHOD);
    report.text(&format!(
        "This run: {} Services; {} endpoints per Service, an HTTPRoute per {} Services, {} \
         changes of each kind.",
        args.services
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        args.endpoints,
        args.services_per_route,
        args.changes
    ));
    report.table(&table(all));
    // The goals are set for endpoints that name no pod; a run with pods shows what they add.
    let (all, with_pods): (Vec<&Measured>, Vec<&Measured>) = all.iter().partition(|m| m.pods == 0);
    for m in with_pods {
        report.note(&format!(
            "(not a goal) with {} pods of other nodes named by the endpoints, at {} Services: store + snapshot {:.0} MiB, initial sync {:.2} s",
            m.pods, m.services, m.mib, m.sync_s
        ));
    }
    let mut lines = goals_at_size(&all);
    lines.extend(goals_across_sizes(&all));
    report.code(&lines.join("\n"));
}

/// Every size's figures.
fn table(all: &[Measured]) -> Table {
    let mut header: Vec<String> = [
        "Services",
        "endpoints",
        "HTTPRoutes",
        "other nodes' pods",
        "store",
        "full compile",
        "store + snapshot",
        "initial sync",
    ]
    .map(String::from)
    .into();
    header.extend(
        all[0]
            .changes
            .iter()
            .map(|(name, ..)| format!("{name} p50 / p99")),
    );
    let mut table = Table::new(header);
    for m in all {
        let mut cells = vec![
            m.services.to_string(),
            m.endpoints.to_string(),
            m.routes.to_string(),
            m.pods.to_string(),
            format!("{:.0} ms", m.store_ms),
            format!("{:.0} ms", m.compile_ms),
            format!("{:.0} MiB", m.mib),
            format!("{:.2} s", m.sync_s),
        ];
        cells.extend(
            m.changes
                .iter()
                .map(|(_, p50, p99, _)| format!("{p50:.1} / {p99:.1} ms")),
        );
        table.row(cells);
    }
    table
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "FAIL"
    }
}

/// The goals at [`GOAL_SERVICES`]: each change's p99, the memory, the initial sync.
fn goals_at_size(all: &[&Measured]) -> Vec<String> {
    let Some(goal) = all.iter().find(|m| m.services == GOAL_SERVICES) else {
        return vec![format!(
            "FAIL: no run at {GOAL_SERVICES} Services, where the goals are set"
        )];
    };
    let mut lines: Vec<String> = goal
        .changes
        .iter()
        .map(|(name, _, p99, _)| {
            format!(
                "{}: {name}, event -> snapshot in force p99 {p99:.1} ms < {} ms at {GOAL_SERVICES} Services",
                verdict(*p99 < ms(GOAL_P99)),
                ms(GOAL_P99)
            )
        })
        .collect();
    lines.push(format!(
        "{}: store + snapshot {:.0} MiB < {GOAL_MIB} MiB at {GOAL_SERVICES} Services",
        verdict(goal.mib < GOAL_MIB),
        goal.mib
    ));
    lines.push(format!(
        "{}: initial sync {:.2} s < {} s at {GOAL_SERVICES} Services",
        verdict(goal.sync_s < GOAL_SYNC.as_secs_f64()),
        goal.sync_s,
        GOAL_SYNC.as_secs_f64()
    ));
    lines
}

/// A change's cost does not grow with the cluster: the median at the largest size is within
/// twice the smallest's, and a millisecond for timer noise.
fn goals_across_sizes(all: &[&Measured]) -> Vec<String> {
    let (Some(small), Some(large)) = (all.first(), all.last()) else {
        return Vec::new();
    };
    if large.services <= small.services {
        return Vec::new();
    }
    large
        .changes
        .iter()
        .enumerate()
        .map(|(i, (name, p50, ..))| {
            let base = small.changes[i].1;
            format!(
                "{}: {name} p50 {p50:.1} ms at {} Services against {base:.1} ms at {} (at most 2x + 1 ms)",
                verdict(*p50 <= 2.0 * base + 1.0),
                large.services,
                small.services
            )
        })
        .collect()
}

/// The cluster of `services` Services as YAML documents, and the objects an agent's store
/// gets for it (other nodes' pods included, when endpoints name them); the pods, by node.
fn cluster(
    args: &Args,
    services: usize,
    routes: usize,
) -> anyhow::Result<(Vec<Object>, Vec<Vec<PodMeta>>)> {
    let mut yaml = String::new();
    for i in 0..services {
        writeln!(
            yaml,
            "{}---\n{}---",
            service(i),
            slice(i, args.endpoints, 0, args.pods)
        )?;
    }
    for r in 0..routes {
        writeln!(yaml, "{}---", route(r, 90))?;
    }
    let mut objects = parse_documents(&yaml)?;
    drop(yaml);
    // Other nodes' pods, as the node_pods reader keeps them.
    let nodes = if args.pods {
        other_nodes_pods(services, args.endpoints)
    } else {
        Vec::new()
    };
    objects.extend(
        nodes
            .iter()
            .flatten()
            .map(|pod| Object::PodMetadata(Box::new(pod.clone()))),
    );
    Ok((objects, nodes))
}

fn measure(args: &Args, services: usize) -> anyhow::Result<Measured> {
    let routes = services / args.services_per_route;
    let needed = 3 * routes.div_ceil(NAMESPACES) * NAMESPACES;
    anyhow::ensure!(
        needed <= services,
        "{routes} routes need at least {needed} services"
    );
    let (objects, nodes) = cluster(args, services, routes)?;
    eprintln!(
        "policy: {services} Services, {} endpoints, {routes} HTTPRoutes, {}",
        services * args.endpoints,
        if args.pods {
            format!(
                "{} pods on {} other nodes",
                services * args.endpoints,
                nodes.len()
            )
        } else {
            "endpoints naming no pod".into()
        }
    );
    let (store_ms, mib) = memory(args, &objects, services)?;
    let compile_ms = compile_ms(&objects);
    eprintln!("compile: snapshot {compile_ms:.0} ms (median of 3)");

    // Propagation: the same cluster behind the API server fixture.
    let runtime = tokio::runtime::Runtime::new()?;
    let (sync_s, changes) =
        runtime.block_on(propagation(args, services, routes, objects.len(), nodes))?;
    Ok(Measured {
        services,
        endpoints: services * args.endpoints,
        routes,
        pods: if args.pods {
            services * args.endpoints
        } else {
            0
        },
        store_ms,
        compile_ms,
        mib,
        sync_s,
        changes,
    })
}

/// The store from a full listing, then the snapshot (policy and routing table): how long the
/// store took, and the memory an agent holds (the store, the compiler's state and the
/// snapshot), in MiB of RSS. With `--memory-only`, the process stops there.
fn memory(args: &Args, objects: &[Object], services: usize) -> anyhow::Result<(f64, f64)> {
    let rss_before = rss_mib();
    let started = Instant::now();
    let mut store = Store::default();
    let refused = store.replace_all(objects.to_vec());
    anyhow::ensure!(refused.is_empty(), "refused: {:?}", refused.first());
    let store_ms = ms(started.elapsed());
    // What the agent logs and lets go.
    store.take_changes();
    let store_mib = rss_mib() - rss_before;
    let mut compiler = Compiler::new(options());
    let compiled = compiler.update(&mut store);
    anyhow::ensure!(
        compiled.policy.captured.len() == services,
        "every Service captured"
    );
    let mib = rss_mib() - rss_before;
    if args.memory_only {
        println!("store {store_mib:.0} MiB, store + compiler + snapshot {mib:.0} MiB RSS");
        std::process::exit(0);
    }
    eprintln!(
        "store: {store_ms:.0} ms; store {store_mib:.0} MiB, store + compiler + snapshot {mib:.0} MiB RSS"
    );
    Ok((store_ms, mib))
}

/// The median of three full compiles of a store, each from nothing, in ms.
fn compile_ms(objects: &[Object]) -> f64 {
    let mut store = Store::default();
    store.replace_all(objects.to_vec());
    let mut compile_times = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let full = Compiler::full(&store, &options());
        compile_times.push(started.elapsed());
        drop(full);
    }
    compile_times.sort();
    ms(compile_times[1])
}

type Changes = Vec<(String, f64, f64, f64)>;

/// The agent's policy path against the API server fixture: the initial sync's time, and each
/// kind of change's p50, p99 and max.
async fn propagation(
    args: &Args,
    services: usize,
    routes: usize,
    objects: usize,
    nodes: Vec<Vec<PodMeta>>,
) -> anyhow::Result<(f64, Changes)> {
    let server = ApiServer::start().await?;
    serve(&server, args, services, routes, nodes);
    let client = kube::Client::try_from(kube::Config::new(server.url().parse()?))?;
    let started = Instant::now();
    let mut snapshots = start_policy(client);
    while snapshots.borrow_and_update().generation == 0 {
        snapshots.changed().await?;
    }
    let sync_s = started.elapsed().as_secs_f64();
    eprintln!(
        "initial sync: {} objects listed and compiled in {sync_s:.2} s",
        objects + 1
    );
    let mut results = Vec::new();
    for kind in ["weight", "endpoint", "enrolment"] {
        let mut took = Vec::new();
        for change in 0..args.changes {
            took.push(time_change(&server, &mut snapshots, args, kind, change).await?);
        }
        took.sort();
        let (p50, p99, max) = (
            ms(percentile(&took, 0.5)),
            ms(percentile(&took, 0.99)),
            ms(*took.last().unwrap()),
        );
        eprintln!(
            "{kind} change (API server event -> snapshot in force), {} changes: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms",
            args.changes,
        );
        results.push((kind.to_owned(), p50, p99, max));
    }
    Ok((sync_s, results))
}

/// The cluster, other nodes' NodePods, this node and its pod, in the API server fixture.
fn serve(
    server: &ApiServer,
    args: &Args,
    services: usize,
    routes: usize,
    nodes: Vec<Vec<PodMeta>>,
) {
    for i in 0..services {
        server.apply_yaml(&service(i));
        server.apply_yaml(&slice(i, args.endpoints, 0, args.pods));
    }
    for r in 0..routes {
        server.apply_yaml(&route(r, 90));
    }
    for (k, pods) in nodes.into_iter().enumerate() {
        server.apply(serde_json::json!({
            "apiVersion": "aviary.dev/v1alpha1", "kind": "NodePods",
            "metadata": {"name": format!("node-{k}")},
            "spec": node_pods::spec_of(pods),
        }));
    }
    server.apply_yaml(&format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE}}}\n"
    ));
    server.apply_yaml(&node_pod(false));
}

/// The agent's policy path, as it runs: the watchers, the store and compiler they feed, and
/// this node's NodePods publisher; the snapshots it publishes.
fn start_policy(client: kube::Client) -> SnapshotRx {
    let (publisher, snapshots) = Publisher::new(options());
    let (updates_tx, updates) = mpsc::channel(4096);
    kubernetes::spawn_watchers(&client, NODE, updates_tx);
    let (reports, _reports) = watch::channel(status::Report::default());
    let (node_pods_tx, node_pods) = watch::channel(None);
    tokio::spawn(kubernetes::apply_updates(
        updates,
        publisher,
        reports,
        NODE.into(),
        node_pods_tx,
    ));
    tokio::spawn(node_pods::publish(client, NODE.into(), node_pods));
    snapshots
}

/// Makes the `change`th change of `kind` in the API server; how long until the snapshot in
/// force shows it.
async fn time_change(
    server: &ApiServer,
    snapshots: &mut SnapshotRx,
    args: &Args,
    kind: &str,
    change: usize,
) -> anyhow::Result<Duration> {
    let apex: SocketAddr = "10.96.0.0:80".parse()?;
    // Service 1 is in no route: its endpoints are all a change to them touches.
    let endpoint_service: SocketAddr = "10.96.0.1:80".parse()?;
    let started = Instant::now();
    let in_force: Box<dyn Fn(&Snapshot) -> bool> = match kind {
        "weight" => {
            let primary = if change.is_multiple_of(2) { 50 } else { 90 };
            server.apply_yaml(&route(0, primary));
            Box::new(move |s: &Snapshot| {
                s.routes
                    .services
                    .get(&apex)
                    .is_some_and(|s| s.rules[0].backends[0].weight == primary)
            })
        }
        "endpoint" => {
            let moved = change + 1;
            server.apply_yaml(&slice(1, args.endpoints, moved, args.pods));
            let addr = moved_endpoint(moved);
            Box::new(move |s: &Snapshot| {
                s.routes
                    .services
                    .get(&endpoint_service)
                    .is_some_and(|s| s.default.endpoints.iter().any(|e| e.addr.ip() == addr))
            })
        }
        _ => {
            let enrolled = change.is_multiple_of(2);
            server.apply_yaml(&node_pod(enrolled));
            Box::new(move |s: &Snapshot| s.policy.enrolled.contains_key(POD_UID) == enrolled)
        }
    };
    loop {
        if in_force(&snapshots.borrow_and_update()) {
            break;
        }
        tokio::time::timeout(Duration::from_secs(30), snapshots.changed()).await??;
    }
    Ok(started.elapsed())
}

/// The benchmark's node.
const NODE: &str = "bench-node";

/// An agent's routing options, inbound capture on, as a DaemonSet would run it.
fn options() -> RouteOptions {
    RouteOptions {
        node: Some(NODE.into()),
        inbound_capture: true,
        trust_domain: Some("cluster.local".into()),
    }
}
