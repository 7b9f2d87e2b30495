//! The demo: Aviary in local mode on a node built from network namespaces.
//!
//! It reads the cluster and the GAMMA HTTPRoute in examples/demo, builds the pods they describe
//! (network namespaces on a bridge, at the Pods' addresses, with kubepods-style cgroups named by
//! the Pods' UIDs), starts the real agent over those files, and shows a canary at work: a 90/10
//! split per request, GETs mirrored and POSTs not, a promotion by editing the route's weights,
//! a feature released to 20%, then 50% of users by a flag, an opted-out pod going direct, and
//! capture failing open when the agent dies. Ctrl-C cleans up.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Output,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{bail, Context as _};
use aviary_agent::policy::{local::parse_documents, Object};
use aviary_tests::{Agent, Node, Pod, NODE_IP};
use clap::Parser;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Where the demo's backends listen (the Services' targetPort).
const BACKEND_PORT: u16 = 8080;
const STEPS: u32 = 8;

#[derive(Parser)]
#[command(about = "Aviary's demo, in local mode (run as root)")]
struct Args {
    /// Fewer requests per step (CI).
    #[arg(long)]
    short: bool,
    /// The demo's manifests: the cluster and the HTTPRoute.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/demo"))]
    manifests: PathBuf,
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

fn step(n: u32, text: &str) -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    println!("\n[{n}/{STEPS}] {text}");
    Ok(())
}

/// "word key n" lines of a client's output, as key -> n.
fn tally(out: &Output, word: &str) -> anyhow::Result<BTreeMap<String, u32>> {
    if !out.status.success() {
        bail!(
            "client failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut words = l.strip_prefix(word)?.trim().split(' ');
            Some((words.next()?.to_owned(), words.next()?.parse().ok()?))
        })
        .collect())
}

/// Sends `count` requests on one keep-alive connection and prints where they went.
fn report(
    node: &Node,
    client: &Pod,
    service: SocketAddr,
    method: &str,
    count: u32,
) -> anyhow::Result<()> {
    let args = [
        "http-load",
        &service.to_string(),
        "--count",
        &count.to_string(),
        "--method",
        method,
    ];
    let out = node.run(client, &args, CLIENT_TIMEOUT);
    let statuses = tally(&out, "status")?;
    let backends = tally(&out, "backend")?;
    let peers = tally(&out, "peer")?;
    let share = |name: &str| {
        let n = backends.get(name).copied().unwrap_or(0);
        format!(
            "{n:>4} {name} ({:.1}%)",
            f64::from(n) * 100.0 / f64::from(count)
        )
    };
    let statuses: Vec<String> = statuses.iter().map(|(s, n)| format!("{n} x {s}")).collect();
    let path = if peers.keys().all(|p| *p == NODE_IP.to_string()) {
        "through the node proxy".to_owned()
    } else if peers.keys().all(|p| *p == client.ip.to_string()) {
        "direct, not proxied".to_owned()
    } else {
        format!("from {:?}", peers.keys().collect::<Vec<_>>())
    };
    let latency = tally(&out, "latency")?;
    let ms = |key: &str| f64::from(latency.get(key).copied().unwrap_or(0)) / 1e3;
    println!(
        "      {count} {method}s: {}, {} | {} | {path} | p50 {:.2} ms, p99 {:.2} ms",
        share("podinfo-primary"),
        share("podinfo-canary"),
        statuses.join(", "),
        ms("p50_us"),
        ms("p99_us")
    );
    Ok(())
}

/// The route with new weights for primary and canary.
fn with_weights(route: &str, primary: u32, canary: u32) -> anyhow::Result<String> {
    let edited = route
        .replace(
            "name: podinfo-primary, port: 80, weight: 90",
            &format!("name: podinfo-primary, port: 80, weight: {primary}"),
        )
        .replace(
            "name: podinfo-canary, port: 80, weight: 10",
            &format!("name: podinfo-canary, port: 80, weight: {canary}"),
        );
    if edited == route && (primary, canary) != (90, 10) {
        bail!("the demo's HTTPRoute no longer has the 90/10 weights it edits");
    }
    Ok(edited)
}

/// The demo's manifests: the cluster, the HTTPRoute, the flag and the route that follows it,
/// and each Pod's UID and address.
struct Manifests {
    cluster: String,
    route: String,
    flag_route: String,
    feature_flag: String,
    pods: BTreeMap<String, (String, Ipv4Addr)>,
}

impl Manifests {
    fn read(dir: &Path) -> anyhow::Result<Self> {
        let read = |file: &str| {
            let path = dir.join(file);
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        let (cluster, route) = (read("cluster.yaml")?, read("httproute.yaml")?);
        let (flag_route, feature_flag) = (read("flag-route.yaml")?, read("featureflag.yaml")?);
        let pods = parse_documents(&cluster)?
            .into_iter()
            .filter_map(|o| match o {
                Object::Pod(p) => {
                    let ip = p.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
                    Some((p.metadata.name.clone()?, (p.metadata.uid.clone()?, ip)))
                }
                _ => None,
            })
            .collect();
        Ok(Self {
            cluster,
            route,
            flag_route,
            feature_flag,
            pods,
        })
    }

    /// The policy the agent reads: the cluster and `route`.
    fn policy(&self, route: &str) -> String {
        format!("{}\n---\n{route}", self.cluster)
    }
}

/// The node and its pods, as the demo's steps use them.
struct Demo {
    node: Node,
    frontend: Pod,
    legacy: Pod,
    primary: Pod,
    canary: Pod,
    mirror: Pod,
    /// The podinfo Service's VIP.
    service: SocketAddr,
    /// Requests per batch.
    count: u32,
}

fn run(args: &Args) -> anyhow::Result<()> {
    let manifests = Manifests::read(&args.manifests)?;
    let count = if args.short { 200 } else { 2000 };
    println!("Aviary demo: a canary in local mode, on a node built from network namespaces.");
    step(
        1,
        "Building the node: a bridge, and one network namespace and kubepods cgroup per Pod",
    )?;
    let demo = Demo::build(&manifests, count)?;
    step(
        2,
        &format!(
            "Starting aviary-agent --local with {}",
            args.manifests.display()
        ),
    )?;
    let mut agent = demo.start_agent(&manifests);
    step(
        3,
        "frontend (enrolled) -> podinfo, one keep-alive connection per batch",
    )?;
    demo.report(&demo.frontend, "GET", count)?;
    demo.report(&demo.frontend, "POST", count / 4)?;
    step(
        4,
        "What the mirror received (its responses are read and discarded)",
    )?;
    demo.show_mirror()?;
    demo.show_metrics();
    step(5, "Promoting the canary by editing the HTTPRoute's weights")?;
    demo.promote(&manifests, &agent)?;
    step(
        6,
        "Releasing new-checkout with a feature flag: on for 20%, then 50% of users",
    )?;
    demo.release_flag(&manifests, &agent)?;
    step(7, "legacy (opted out) -> podinfo")?;
    demo.report(&demo.legacy, "GET", count / 10)?;
    step(8, "Killing the agent with SIGKILL: capture fails open")?;
    agent.kill();
    demo.report(&demo.frontend, "GET", count / 10)?;
    show_counters(&agent)
}

impl Demo {
    /// The node, with a network namespace and cgroup for each Pod of the manifests, the
    /// backends serving, and the VIP reaching the primary.
    fn build(manifests: &Manifests, count: u32) -> anyhow::Result<Demo> {
        let Some(node) = Node::new() else {
            bail!("the demo needs root (network namespaces, cgroups, eBPF)")
        };
        let pod = |name: &str| -> anyhow::Result<Pod> {
            let (uid, ip) = manifests
                .pods
                .get(name)
                .with_context(|| format!("no Pod {name} in cluster.yaml"))?;
            Ok(node.add_pod_as(name, uid, *ip))
        };
        let (frontend, legacy) = (pod("frontend")?, pod("legacy")?);
        let (primary, canary, mirror) = (
            pod("podinfo-primary")?,
            pod("podinfo-canary")?,
            pod("podinfo-mirror")?,
        );
        for backend in [&primary, &canary, &mirror] {
            node.serve_http(backend, BACKEND_PORT);
        }
        let service: SocketAddr = "10.96.0.10:80".parse()?;
        // What kube-proxy does for traffic Aviary does not capture: the VIP reaches the primary.
        node.serve_http(&primary, 80);
        node.add_vip(service.ip().to_string().parse()?, &primary);
        for p in [&frontend, &legacy, &primary, &canary, &mirror] {
            println!(
                "      pod {:<16} {:<14} cgroup {}",
                p.name,
                p.ip,
                p.cgroup.parent().unwrap().display()
            );
        }
        Ok(Demo {
            node,
            frontend,
            legacy,
            primary,
            canary,
            mirror,
            service,
            count,
        })
    }

    /// The agent, over the manifests, once it captures the enrolled pods and routes.
    fn start_agent(&self, manifests: &Manifests) -> Agent {
        self.node.write_policy(&manifests.policy(&manifests.route));
        let agent = self.node.start_agent_quietly(&[]);
        agent.wait_for_capture(
            &[&self.frontend, &self.primary, &self.canary, &self.mirror],
            4,
        );
        agent.wait_for_log("routed=4", Duration::from_secs(10));
        println!("      HTTPRoute demo/podinfo: podinfo-primary 90, podinfo-canary 10, GETs mirrored to podinfo-mirror");
        agent
    }

    fn report(&self, client: &Pod, method: &str, count: u32) -> anyhow::Result<()> {
        report(&self.node, client, self.service, method, count)
    }

    /// What the mirror's own counts say: every GET copied, no POST.
    fn show_mirror(&self) -> anyhow::Result<()> {
        let count = self.count;
        let stats = format!("{}:{BACKEND_PORT}", self.mirror.ip);
        let mirrored = aviary_tests::wait_until(Duration::from_secs(10), || {
            let out = self.node.run(
                &self.legacy,
                &["http-get", &stats, "/stats"],
                CLIENT_TIMEOUT,
            );
            let body = String::from_utf8_lossy(&out.stdout).into_owned();
            body.contains(&format!("mirrored GET {count}"))
                .then_some(body)
        })
        .context("the mirror never received every GET")?;
        println!("      podinfo-mirror got {count} GET copies, marked x-aviary-mirror: 1");
        let posts = mirrored.lines().any(|l| l.starts_with("mirrored POST"));
        println!(
            "      POSTs mirrored: {}",
            if posts {
                "some (unexpected!)"
            } else {
                "none: only idempotent requests are"
            }
        );
        Ok(())
    }

    /// What the agent's metrics say of the mirror and of each version's requests.
    fn show_metrics(&self) {
        let out = self.node.run(
            &self.legacy,
            &["http-get", &metrics_addr(), "/metrics"],
            CLIENT_TIMEOUT,
        );
        let metrics = String::from_utf8_lossy(&out.stdout);
        let sample = |series: &str, labels: &[(&str, &str)]| {
            aviary_agent::metrics::sample(&metrics, series, labels)
        };
        println!(
            "      the agent's metrics (http://{}/metrics) say:",
            metrics_addr()
        );
        for outcome in ["sent", "skipped_not_idempotent"] {
            println!(
                "        aviary_mirror_requests_total{{outcome=\"{outcome}\"}} {}",
                sample("aviary_mirror_requests_total", &[("outcome", outcome)])
            );
        }
        for version in ["podinfo-primary", "podinfo-canary"] {
            println!(
                "        aviary_requests_total{{destination_version=\"{version}\",method=\"GET\"}} {}",
                sample(
                    "aviary_requests_total",
                    &[
                        ("destination_version", version),
                        ("method", "GET"),
                        ("mirror", "false")
                    ]
                )
            );
        }
    }

    /// The flag's route and the flag at 20%, then 50%: each user's version, by the flag.
    fn release_flag(&self, manifests: &Manifests, agent: &Agent) -> anyhow::Result<()> {
        let users = self.count / 2;
        let mut first: Option<Vec<bool>> = None;
        for (generation, percent) in [(4, 20), (5, 50)] {
            let flag = with_share(&manifests.feature_flag, percent)?;
            let policy = [&manifests.cluster, &manifests.flag_route, &flag];
            self.node
                .write_policy(&policy.map(String::as_str).join("\n---\n"));
            agent.wait_for_log(&format!("generation={generation}"), Duration::from_secs(5));
            let args = [
                "http-users",
                &self.service.to_string(),
                "--users",
                &users.to_string(),
            ];
            let out = self.node.run(&self.frontend, &args, CLIENT_TIMEOUT);
            let landed = users_landed(&out)?;
            let on = landed.iter().filter(|&&c| c).count();
            println!(
                "      at {percent}%: {on} of {users} users (x-user-id user-0..) on podinfo-canary, \
                 each request told x-aviary-flag-new-checkout: on; the others off, on podinfo-primary"
            );
            if let Some(before) = &first {
                let kept = before
                    .iter()
                    .zip(&landed)
                    .filter(|(b, l)| **b && **l)
                    .count();
                let had = before.iter().filter(|&&b| b).count();
                println!(
                    "      {kept} of the {had} users on it at 20% are still on podinfo-canary"
                );
                self.ask_ofrep(&landed)?;
            }
            first.get_or_insert(landed);
        }
        Ok(())
    }

    /// What an application of the frontend pod hears from its node's OFREP endpoint for each
    /// user, beside where the mesh sent that user.
    fn ask_ofrep(&self, on_canary: &[bool]) -> anyhow::Result<()> {
        let ofrep = format!("{}:8016", aviary_tests::NODE_IP);
        let args = [
            "ofrep-users",
            &ofrep,
            "--flag",
            "new-checkout",
            "--users",
            &on_canary.len().to_string(),
        ];
        let out = self.node.run(&self.frontend, &args, CLIENT_TIMEOUT);
        let text = String::from_utf8_lossy(&out.stdout);
        let variants: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("user ")?.split(' ').nth(1))
            .collect();
        if variants.len() != on_canary.len() {
            bail!(
                "OFREP answered {} users: {}",
                variants.len(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let agree = variants
            .iter()
            .zip(on_canary)
            .filter(|(variant, canary)| (**variant == "on") == **canary)
            .count();
        println!(
            "      OFREP at {ofrep} (what the frontend's OpenFeature SDK would ask): new-checkout \
             agrees with the version the mesh sent the user to for {agree} of {} users",
            on_canary.len()
        );
        Ok(())
    }

    /// The route's weights edited to 50/50, then 0/100, each followed by a batch.
    fn promote(&self, manifests: &Manifests, agent: &Agent) -> anyhow::Result<()> {
        for (p, c) in [(50, 50), (0, 100)] {
            let route = with_weights(&manifests.route, p, c)?;
            self.node.write_policy(&manifests.policy(&route));
            agent.wait_for_log(
                &format!("generation={}", if p == 50 { 2 } else { 3 }),
                Duration::from_secs(5),
            );
            println!("      weights {p}/{c}:");
            self.report(&self.frontend, "GET", self.count)?;
        }
        Ok(())
    }
}

/// The demo's FeatureFlag with new-checkout on for `percent`% of users.
fn with_share(feature_flag: &str, percent: u32) -> anyhow::Result<String> {
    let edited = feature_flag
        .replace("- [\"on\", 20]", &format!("- [\"on\", {percent}]"))
        .replace(
            "- [\"off\", 80]",
            &format!("- [\"off\", {}]", 100 - percent),
        );
    if edited == feature_flag && percent != 20 {
        bail!("the demo's FeatureFlag no longer has the 20/80 shares it edits");
    }
    Ok(edited)
}

/// The backend each user `0..users` of `http-users` landed on, checking that each was told the
/// variant that sent it there.
fn users_landed(out: &Output) -> anyhow::Result<Vec<bool>> {
    let text = String::from_utf8_lossy(&out.stdout);
    let mut on_canary = Vec::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("user ")) {
        let fields: Vec<&str> = line.split(' ').collect();
        let (canary, told) = match fields[..] {
            [_, backend, told] => (backend == "podinfo-canary", told),
            _ => bail!("a user's line is {line:?}"),
        };
        let want = if canary { "on" } else { "off" };
        if told != format!("new-checkout={want}") {
            bail!(
                "user {} landed on {} but was told {told}",
                fields[0],
                fields[1]
            );
        }
        on_canary.push(canary);
    }
    if on_canary.is_empty() {
        bail!(
            "no user got an answer: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(on_canary)
}

/// Where the agent serves its metrics, in the node's network namespace.
fn metrics_addr() -> String {
    format!("{}:15020", aviary_tests::NODE_IP)
}

/// The eBPF counters the killed agent left pinned, and where its endpoints were.
fn show_counters(agent: &Agent) -> anyhow::Result<()> {
    println!("\neBPF counters (from the maps the killed agent left pinned):");
    for (name, value) in agent.stats().counters()? {
        println!("      {name:<22} {value}");
    }
    println!(
        "\nWhile the agent ran, Prometheus metrics (with Flagger's http_request_duration_seconds) \
         were at http://{}/metrics and the admin endpoint at 127.0.0.1:15000 \
         (`aviary-agent status`), inside the node's network namespace. docs/metrics.md lists them.",
        metrics_addr()
    );
    println!("Cleaning up the node, its pods, cgroups and pins...");
    Ok(())
}
