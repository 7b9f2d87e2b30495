//! `cargo xtask bench` (policy part): how long policy takes to compile and to propagate at
//! cluster scale, with the real kube-rs client against the list/watch fixture on loopback.
#![forbid(unsafe_code)]

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use aviary_agent::{
    kubernetes::{self, status::Report},
    policy::{
        compile,
        local::parse_documents,
        routes::{compile_routes, RouteOptions},
        Store,
    },
    proxy::route::RouteTable,
    state::Publisher,
};
use aviary_tests::apiserver::ApiServer;
use clap::Parser;
use tokio::sync::{mpsc, watch};

#[derive(Parser)]
#[command(about = "Aviary's policy benchmark: compile time, memory and propagation at scale")]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Endpoints per Service (one EndpointSlice each).
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    #[arg(long, default_value_t = 2_000)]
    routes: usize,
    /// Weight changes timed from the API server event to the new snapshot.
    #[arg(long, default_value_t = 20)]
    changes: usize,
}

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

fn slice(i: usize, endpoints: usize) -> String {
    let ns = i % NAMESPACES;
    let addresses: Vec<String> = (0..endpoints)
        .map(|e| {
            let n = i * endpoints + e;
            format!(
                "{{addresses: [\"10.{}.{}.{}\"], conditions: {{ready: true}}}}",
                128 + n / 65536,
                (n / 256) % 256,
                n % 256
            )
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: svc-{i}-1, namespace: ns-{ns}, labels: {{kubernetes.io/service-name: svc-{i}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: [{}]\n",
        addresses.join(", ")
    )
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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let needed = 3 * args.routes.div_ceil(NAMESPACES) * NAMESPACES;
    anyhow::ensure!(
        needed <= args.services,
        "--routes {} needs at least {needed} services",
        args.routes
    );
    let mut yaml = String::new();
    for i in 0..args.services {
        writeln!(yaml, "{}---\n{}---", service(i), slice(i, args.endpoints))?;
    }
    for r in 0..args.routes {
        writeln!(yaml, "{}---", route(r, 90))?;
    }
    let objects = parse_documents(&yaml)?;
    drop(yaml);
    println!(
        "policy: {} Services, {} endpoints, {} HTTPRoutes",
        args.services,
        args.services * args.endpoints,
        args.routes
    );

    // Compile: the store from a full listing, then the snapshot (policy and routing table).
    let rss_before = rss_mib();
    let started = Instant::now();
    let mut store = Store::default();
    let refused = store.replace_all(objects.clone());
    anyhow::ensure!(refused.is_empty(), "refused: {:?}", refused.first());
    let stored = started.elapsed();
    let mut compile_times = Vec::new();
    let mut table = RouteTable::default();
    let options = options();
    for _ in 0..3 {
        let started = Instant::now();
        let policy = compile(&store, Some(NODE));
        table = compile_routes(&store, &options);
        compile_times.push(started.elapsed());
        anyhow::ensure!(
            policy.captured.len() == args.services,
            "every Service captured"
        );
    }
    compile_times.sort();
    let rss_after = rss_mib();
    println!(
        "compile: store {:.0} ms, snapshot {:.0} ms (median of 3); store + snapshot {:.0} MiB RSS",
        stored.as_secs_f64() * 1e3,
        compile_times[1].as_secs_f64() * 1e3,
        rss_after - rss_before
    );
    drop((store, table));

    // Propagation: the same cluster behind the API server fixture.
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(propagation(&args, objects.len()))
}

async fn propagation(args: &Args, objects: usize) -> anyhow::Result<()> {
    let server = ApiServer::start().await?;
    for i in 0..args.services {
        server.apply_yaml(&service(i));
        server.apply_yaml(&slice(i, args.endpoints));
    }
    for r in 0..args.routes {
        server.apply_yaml(&route(r, 90));
    }
    let client = kube::Client::try_from(kube::Config::new(server.url().parse()?))?;
    let (publisher, mut snapshots) = Publisher::new(options());
    let (updates_tx, updates) = mpsc::channel(4096);
    let started = Instant::now();
    kubernetes::spawn_watchers(&client, NODE, updates_tx);
    let (reports, _reports) = watch::channel(Report::default());
    tokio::spawn(kubernetes::apply_updates(updates, publisher, reports));
    while snapshots.borrow_and_update().generation == 0 {
        snapshots.changed().await?;
    }
    println!(
        "initial sync: {objects} objects listed and compiled in {:.2} s",
        started.elapsed().as_secs_f64()
    );

    let apex: std::net::SocketAddr = "10.96.0.0:80".parse()?;
    let mut took = Vec::new();
    for change in 0..args.changes {
        let primary = if change % 2 == 0 { 50 } else { 90 };
        let started = Instant::now();
        server.apply_yaml(&route(0, primary));
        loop {
            let in_force = snapshots
                .borrow_and_update()
                .routes
                .services
                .get(&apex)
                .is_some_and(|s| s.rules[0].backends[0].weight == primary);
            if in_force {
                break;
            }
            tokio::time::timeout(Duration::from_secs(30), snapshots.changed()).await??;
        }
        took.push(started.elapsed());
    }
    took.sort();
    println!(
        "propagation (API server event -> snapshot in force), {} changes: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        args.changes,
        percentile(&took, 0.5).as_secs_f64() * 1e3,
        percentile(&took, 0.99).as_secs_f64() * 1e3,
        took.last().unwrap().as_secs_f64() * 1e3
    );
    Ok(())
}

/// The node the benchmark's agent runs on.
const NODE: &str = "bench-node";

/// An agent's routing options, inbound capture on, as a DaemonSet would run it.
fn options() -> RouteOptions {
    RouteOptions {
        node: Some(NODE.into()),
        inbound_capture: true,
        trust_domain: Some("cluster.local".into()),
    }
}
