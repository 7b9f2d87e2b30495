//! The demo: Aviary in local mode on a node built from network namespaces.
//!
//! It reads the cluster in examples/demo, builds its pods (network namespaces on a bridge,
//! kubepods-style cgroups named by the pods' UIDs), starts the real agent over those files, and
//! shows outbound capture at work: enrolled and opted-out pods, enrollment changed at runtime,
//! and capture failing open when the agent dies. Ctrl-C cleans up.
#![forbid(unsafe_code)]

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Output,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{bail, Context as _};
use aviary_agent::policy::{local::parse_documents, Object};
use aviary_tests::{Greeting, Node, Pod, NODE_IP};
use clap::Parser;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Parser)]
#[command(about = "Aviary's demo, in local mode (run as root)")]
struct Args {
    /// Fewer connections per step (CI).
    #[arg(long)]
    short: bool,
    /// The cluster's manifests.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/demo/cluster.yaml"))]
    cluster: PathBuf,
}

fn main() {
    let args = Args::parse();
    // Ctrl-C and SIGTERM end the demo at the next step, so that the node is always torn down.
    // (A flag, not a blocked signal mask: children such as the agent must still get signals.)
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, &INTERRUPTED).expect("installing a signal handler");
    }
    let result = run(&args);
    if INTERRUPTED.load(Ordering::SeqCst) {
        eprintln!("\ndemo: interrupted; the node, its pods and every eBPF object were removed");
        std::process::exit(130);
    }
    match result {
        Ok(()) => println!("\nDone: the node, its pods and every eBPF object are gone."),
        Err(e) => {
            eprintln!("demo: {e:#}");
            std::process::exit(1);
        }
    }
}

fn step(n: u32, total: u32, text: &str) -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    println!("\n[{n}/{total}] {text}");
    Ok(())
}

/// How many connections' backends saw each peer address.
fn peers(out: &Output) -> anyhow::Result<Vec<(String, u64)>> {
    if !out.status.success() {
        bail!(
            "client failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut words = l.strip_prefix("peer ")?.split(' ');
            Some((words.next()?.to_owned(), words.next()?.parse().ok()?))
        })
        .collect())
}

fn report(node: &Node, client: &Pod, service: SocketAddr, count: u64) -> anyhow::Result<()> {
    let out = node.run(
        client,
        &[
            "connect",
            &service.to_string(),
            "--count",
            &count.to_string(),
        ],
        CLIENT_TIMEOUT,
    );
    for (peer, n) in peers(&out)? {
        let how = if peer == NODE_IP.to_string() {
            "through the node proxy (the backend saw the node's address)"
        } else if peer == client.ip.to_string() {
            "direct (the backend saw the pod's own address)"
        } else {
            "from an unexpected address"
        };
        println!("      {n:>4}/{count} connections {how}: peer {peer}");
    }
    Ok(())
}

fn run(args: &Args) -> anyhow::Result<()> {
    let manifest = std::fs::read_to_string(&args.cluster)
        .with_context(|| format!("reading {}", args.cluster.display()))?;
    let objects = parse_documents(&manifest)?;
    let pods: Vec<(String, String)> = objects
        .iter()
        .filter_map(|o| match o {
            Object::Pod(p) => Some((p.metadata.name.clone()?, p.metadata.uid.clone()?)),
            _ => None,
        })
        .collect();
    let service_ip = objects
        .iter()
        .find_map(|o| match o {
            Object::Service(s) => s.spec.as_ref()?.cluster_ip.clone(),
            _ => None,
        })
        .context("the demo cluster has no Service")?;
    let service: SocketAddr = format!("{service_ip}:80").parse()?;
    let count = if args.short { 20 } else { 200 };
    let total = 6;

    println!(
        "Aviary demo: outbound capture in local mode, on a node built from network namespaces."
    );
    step(
        1,
        total,
        "Building the node: a bridge, and one network namespace and kubepods cgroup per pod",
    )?;
    let Some(node) = Node::new() else {
        bail!("the demo needs root (network namespaces, cgroups, eBPF)")
    };
    let pod = |name: &str| -> anyhow::Result<Pod> {
        let (_, uid) = pods
            .iter()
            .find(|(n, _)| n == name)
            .with_context(|| format!("no pod {name}"))?;
        Ok(node.add_pod_with_uid(name, uid))
    };
    let (frontend, legacy, backend) = (pod("frontend")?, pod("legacy")?, pod("podinfo-primary")?);
    node.serve(&backend, 80, None);
    node.add_vip(service_ip.parse()?, &backend);
    for p in [&frontend, &legacy, &backend] {
        println!(
            "      pod {:<16} {:<14} cgroup {}",
            p.name,
            p.ip,
            p.cgroup.parent().unwrap().display()
        );
    }
    println!("      Service podinfo {service} -> podinfo-primary");

    step(
        2,
        total,
        &format!("Starting aviary-agent --local {}", args.cluster.display()),
    )?;
    node.write_policy(&manifest);
    let mut agent = node.start_agent_quietly(&[]);
    agent.wait_for_capture(&[&frontend, &backend], 1);
    println!(
        "      programs attached at {}; pins in {}",
        node.cgroup_root.display(),
        agent.pin_dir.display()
    );
    println!("      enrolled: demo/frontend, demo/podinfo-primary (namespace annotation); demo/legacy opted out");

    step(
        3,
        total,
        &format!("frontend (enrolled) -> podinfo {service}, {count} connections"),
    )?;
    report(&node, &frontend, service, count)?;

    step(
        4,
        total,
        &format!("legacy (opted out) -> podinfo {service}, {count} connections"),
    )?;
    report(&node, &legacy, service, count)?;

    step(
        5,
        total,
        "Unenrolling frontend at runtime (aviary.dev/capture: disabled on the Pod)",
    )?;
    let mut before = node.session(&frontend, service);
    let unenrolled = manifest.replacen(
        "  name: frontend\n  namespace: demo\n",
        "  name: frontend\n  namespace: demo\n  annotations: {aviary.dev/capture: disabled}\n",
        1,
    );
    if unenrolled == manifest {
        bail!(
            "could not find the frontend Pod in {}",
            args.cluster.display()
        );
    }
    node.write_policy(&unenrolled);
    agent.wait_for_capture(&[&backend], 1);
    report(&node, &frontend, service, count)?;
    let echo = before.echo("opened before the change");
    println!(
        "      a connection opened before the change still works through the proxy (peer {}): {echo:?}",
        before.greeting.peer.ip()
    );
    drop(before);
    node.write_policy(&manifest);
    agent.wait_for_capture(&[&frontend, &backend], 1);

    step(
        6,
        total,
        "Killing the agent with SIGKILL: capture fails open",
    )?;
    agent.kill();
    report(&node, &frontend, service, count)?;
    let greeting = Greeting::of(&node.run(
        &frontend,
        &["connect", &service.to_string()],
        CLIENT_TIMEOUT,
    ));
    assert_eq!(
        greeting.peer.ip(),
        frontend.ip,
        "fail-open connects go direct"
    );

    println!("\neBPF counters (from the maps the killed agent left pinned):");
    for (name, value) in agent.stats().counters()? {
        println!("      {name:<22} {value}");
    }
    println!("\nCleaning up the node, its pods, cgroups and pins...");
    Ok(())
}
