//! HTTP/1.1 measured with wrk from an enrolled client pod: the backend directly; haproxy and
//! nginx as explicit proxies in the node's network namespace; Aviary with no route, a 90/10
//! split, 100% GET mirroring and the split with sk_msg.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use aviary_tests::{policy, Node, Pod, NODE_IP};

use crate::{
    columns::{self, Column, Load},
    cpu::Cpu,
    goals::Measured,
    peers::{self, Backends, Peer},
    profile::Profile,
    report::Report,
    topology::{self, rss_kib},
    wrk, Args,
};

pub const TITLE: &str = "HTTP through the proxy, beside haproxy and nginx";

/// What the section measures, for the page.
pub const METHOD: &str = "\
wrk runs in an enrolled client pod against HTTP backend pods. The columns: the backend reached
directly; haproxy 2.6 (weights 90/10, `nbthread 2`, `http-reuse safe`) and nginx 1.22
(`split_clients` 90/10 on `$request_id`, 2 workers, upstream keep-alive pools), the latter also
with `mirror` to a third pod; then Aviary with no route, a 90/10 split (an `aviary.dev/split`
Service), 100% GET mirroring, and the 90/10 split with sk_msg. haproxy and nginx run with no
agent on the node, as explicit proxies in the node's network namespace, and forward to the same
pods over the same veths. A proxy's CPU per request is its utime + stime from `/proc` (summed
over nginx's and haproxy's processes) over the requests served; context switches are read the
same way. With `--perf`, `perf` records the agent during the Aviary 90/10 keep-alive run, which
slows that column, and the top of its report follows the table.";

/// The port the backends serve on.
pub const PORT: u16 = 8080;
/// The peers' ports on the node's bridge address.
const HAPROXY_PORT: u16 = 18081;
const NGINX_PORT: u16 = 18082;
const NGINX_MIRROR_PORT: u16 = 18083;
/// The columns the goals read.
const DIRECT: &str = "direct";
const HAPROXY: &str = "haproxy 90/10";
const NGINX_MIRROR: &str = "nginx split + mirror";
const AVIARY_SPLIT: &str = "Aviary 90/10";
const AVIARY_MIRROR: &str = "Aviary 100% GET mirror";

/// The section's pods: the enrolled client, and the backends.
pub struct Pods {
    client: Pod,
    /// Enrolled too, for the inbound section.
    pub primary: Pod,
    canary: Pod,
    mirror: Pod,
}

/// Service `n`'s VIP: 20 no route, 21 the split, 22 the mirror, 23-25 the backends'.
fn vip(n: u8) -> IpAddr {
    IpAddr::from([10, 96, 1, n])
}

/// Measures the HTTP shapes, shows the table (and the agent's profile when `--perf` asked for
/// one), and records the goals' figures. Its pods, and the pacing script, serve the inbound
/// section next.
pub fn run(
    node: &Node,
    a: &Args,
    dir: &Path,
    report: &mut Report,
    measured: &mut Measured,
) -> anyhow::Result<(Pods, String)> {
    wrk::require()?;
    let pods = add_pods(node);
    let script = wrk::pacing_script(dir, a.rate, 8)?;
    let load = Load {
        node,
        client: &pods.client,
        script: &script,
        a,
    };
    eprintln!("HTTP: measuring direct (no agent)...");
    topology::uninstall(node);
    let direct = SocketAddr::new(pods.primary.ip.into(), PORT);
    let mut columns = vec![load.column(DIRECT, direct, Cpu::Nobody, None)];
    columns.extend(peer_columns(&load, &pods, dir));
    let profile = aviary_columns(&load, &pods, dir, &mut columns, measured)?;
    record(&columns, measured);

    report.section(TITLE, METHOD);
    report.text(&columns::intro("HTTP/1.1 with wrk", a));
    report.table(&columns::table(&columns));
    columns::failures(report, &columns);
    if let Some(profile) = &profile {
        let recorded = columns.iter().find_map(|c| c.profiled.as_ref());
        profile.report(recorded, report);
    }
    Ok((pods, script))
}

/// The client and the backends, and their Services.
fn add_pods(node: &Node) -> Pods {
    let client = node.add_pod("hclient");
    let [primary, canary, mirror] = node.add_http_pods(["primary", "canary", "mirror"], PORT);
    node.write_policy(&policy::documents(&[
        policy::namespace("bench", None),
        policy::pod(&client, "bench", Some("enabled")),
        // Enrolled for the inbound shapes (inbound capture is off until asked for).
        policy::pod(&primary, "bench", Some("enabled")),
        policy::http_service("plain", "bench", vip(20), PORT, &[]),
        policy::http_service(
            "split",
            "bench",
            vip(21),
            PORT,
            &[("aviary.dev/split", "primary=90,canary=10")],
        ),
        policy::http_service(
            "mirrored",
            "bench",
            vip(22),
            PORT,
            &[
                ("aviary.dev/split", "primary=100"),
                ("aviary.dev/mirror", "mirror"),
            ],
        ),
        policy::http_service("primary", "bench", vip(23), PORT, &[]),
        policy::http_service("canary", "bench", vip(24), PORT, &[]),
        policy::http_service("mirror", "bench", vip(25), PORT, &[]),
        policy::endpoint_slice("plain", "bench", &[&primary], PORT),
        policy::endpoint_slice("primary", "bench", &[&primary], PORT),
        policy::endpoint_slice("canary", "bench", &[&canary], PORT),
        policy::endpoint_slice("mirror", "bench", &[&mirror], PORT),
    ]));
    Pods {
        client,
        primary,
        canary,
        mirror,
    }
}

/// haproxy, nginx, and nginx with `mirror`, each started, measured and stopped in turn. They
/// run with no agent on the node: nothing of Aviary's is attached then.
fn peer_columns(load: &Load, pods: &Pods, dir: &Path) -> Vec<Column> {
    let at = |pod: &Pod| SocketAddr::new(pod.ip.into(), PORT);
    let backends = Backends {
        primary: at(&pods.primary),
        canary: at(&pods.canary),
        mirror: at(&pods.mirror),
    };
    let peer_list: [(&'static str, &str, u16, &str); 3] = [
        (HAPROXY, "haproxy", HAPROXY_PORT, peers::HAPROXY),
        ("nginx 90/10", "nginx", NGINX_PORT, peers::NGINX),
        (
            NGINX_MIRROR,
            "nginx-mirror",
            NGINX_MIRROR_PORT,
            peers::NGINX,
        ),
    ];
    let mut columns = Vec::new();
    for (column, name, port, program) in peer_list {
        eprintln!("HTTP: measuring {column} (explicit proxy in the node's namespace)...");
        let listen = SocketAddr::new(NODE_IP.into(), port);
        let (config, args): (String, &[&str]) = if program == peers::HAPROXY {
            (
                peers::haproxy_config(listen, &backends),
                &["-db", "-f", "{config}"],
            )
        } else {
            let mirror = name == "nginx-mirror";
            (
                peers::nginx_config(dir, name, listen, &backends, mirror),
                &["-c", "{config}", "-e", "stderr"],
            )
        };
        columns.push(
            match Peer::start(load.node, dir, name, program, args, &config, listen) {
                Ok(peer) => load.column(column, listen, Cpu::Group(peer.pgid()), None),
                Err(e) => Column::failed(column, &e),
            },
        );
    }
    columns
}

/// Aviary with no route, the 90/10 split (profiled when `--perf` asks) and 100% GET
/// mirroring, then the split with sk_msg, each agent's peak RSS recorded; the profile, if any.
fn aviary_columns(
    load: &Load,
    pods: &Pods,
    dir: &Path,
    columns: &mut Vec<Column>,
    measured: &mut Measured,
) -> anyhow::Result<Option<Profile>> {
    let (node, a) = (load.node, load.a);
    let start = |extra: &[&str]| {
        let agent = a.start_agent(node, extra);
        agent.wait_for_capture(&[&pods.client, &pods.primary], 6);
        agent.wait_for_log("routed=", Duration::from_secs(10));
        agent
    };
    let service = |n: u8| SocketAddr::new(vip(n), 80);
    eprintln!("HTTP: measuring through Aviary: no route, 90/10 split, 100% GET mirroring...");
    let agent = start(&[]);
    let cpu = Cpu::Process(agent.pid());
    let profile = a.perf.map(|secs| Profile {
        run: "the Aviary 90/10 keep-alive run",
        pid: agent.pid(),
        secs,
        data: dir.join("perf.data"),
    });
    for (name, n) in [
        ("Aviary no route", 20),
        (AVIARY_SPLIT, 21),
        (AVIARY_MIRROR, 22),
    ] {
        let profile = profile.as_ref().filter(|_| n == 21);
        columns.push(load.column(name, service(n), cpu, profile));
    }
    measured.rss_kib(rss_kib(agent.pid())?);
    drop(agent);
    eprintln!("HTTP: measuring the 90/10 split with sk_msg...");
    let agent = start(&["--sk-msg", "true"]);
    let cpu = Cpu::Process(agent.pid());
    columns.push(load.column("Aviary 90/10 + sk_msg", service(21), cpu, None));
    measured.rss_kib(rss_kib(agent.pid())?);
    Ok(profile)
}

/// The figures the goals read, from the columns.
fn record(columns: &[Column], measured: &mut Measured) {
    let column = |name: &str| columns.iter().find(|c| c.name == name);
    let wrk = |name: &str, shape: fn(&Column) -> &anyhow::Result<wrk::Wrk>| {
        column(name).and_then(|c| shape(c).as_ref().ok().copied())
    };
    let keep_alive = |name| wrk(name, |c| &c.keep_alive).map(|w| w.rate);
    let sequential_p50 = |name| wrk(name, |c| &c.sequential).map(|w| w.p50_us);
    let fixed_p99 = |name| wrk(name, |c| &c.fixed_rate).map(|w| w.p99_us);
    let cpu = |name| column(name).and_then(|c| c.cost.cpu_us);
    measured.direct_rate = keep_alive(DIRECT);
    measured.split_rate = keep_alive(AVIARY_SPLIT);
    measured.mirror_rate = keep_alive(AVIARY_MIRROR);
    measured.nginx_mirror_rate = keep_alive(NGINX_MIRROR);
    measured.split_cpu_us = cpu(AVIARY_SPLIT);
    measured.haproxy_cpu_us = cpu(HAPROXY);
    measured.direct_seq_p50_us = sequential_p50(DIRECT);
    measured.split_seq_p50_us = sequential_p50(AVIARY_SPLIT);
    measured.haproxy_seq_p50_us = sequential_p50(HAPROXY);
    measured.direct_fixed_p99_us = fixed_p99(DIRECT);
    measured.split_fixed_p99_us = fixed_p99(AVIARY_SPLIT);
}
