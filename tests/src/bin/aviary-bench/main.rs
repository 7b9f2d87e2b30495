//! `cargo xtask bench`: the cost of Aviary's data path, as ratios to a direct connection
//! measured in the same run, on a node built from network namespaces (all traffic stays there).
//! HTTP is also measured through haproxy and nginx, run as explicit proxies in the node's
//! network namespace over the same veths, and the run ends with the project's goals, each
//! PASS or FAIL.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{bail, Context as _};
use aviary_tests::{policy, Agent, Node, Pod};
use clap::{Parser, ValueEnum};

#[derive(Parser)]
#[command(about = "Aviary's benchmark (run as root)")]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Keep-alive connections for the request/response shape.
    #[arg(long, default_value_t = 32)]
    conns: usize,
    /// connect() calls timed per configuration.
    #[arg(long, default_value_t = 5000)]
    connects: u32,
    /// The fixed request rate at which HTTP latency is compared, below saturation.
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// Which sections to run: the L4 shapes, the HTTP shapes (peers and inbound included), an
    /// upgrade under load, the L4 shapes between two nodes, or all. The goals that a section
    /// measures show as "n/a" when it is left out.
    #[arg(long, value_enum, default_value_t = Only::All)]
    only: Only,
    /// Extra flags for every agent this run starts, split on whitespace (e.g. "--sk-msg true").
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    agent_args: String,
    /// Profile the agent with `perf record -F 2000 -g` for this many seconds during the Aviary
    /// 90/10 keep-alive run (keep it at most --secs; perf's own cost lands in that column), and
    /// print the top of `perf report` after the tables. The perf data is kept.
    #[arg(long, value_name = "SECONDS")]
    perf: Option<u32>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Only {
    Http,
    L4,
    Upgrade,
    CrossNode,
    All,
}

impl Only {
    fn runs(self, section: Only) -> bool {
        self == Only::All || self == section
    }
}

impl Args {
    /// Starts the agent with `extra` and then the developer's `--agent-args`, on a datapath of
    /// its own: what the agents before it left (pinned maps, attached programs) is uninstalled
    /// first, so that no configuration is measured with another's state.
    fn start_agent(&self, node: &Node, extra: &[&str]) -> Agent {
        uninstall(node);
        self.start_successor(node, extra)
    }

    /// The same beside a running agent, which it takes over from.
    fn start_successor(&self, node: &Node, extra: &[&str]) -> Agent {
        let mut args = extra.to_vec();
        args.extend(self.agent_args.split_whitespace());
        node.start_agent_quietly(&args)
    }
}

/// Takes away the datapath the agents before left attached (it fails open, but its programs
/// still run on every connect): a measurement without an agent is one without Aviary at all.
fn uninstall(node: &Node) {
    let uninstalled = node.uninstall().expect("running aviary-agent uninstall");
    assert!(
        uninstalled.status.success(),
        "aviary-agent uninstall: {}",
        String::from_utf8_lossy(&uninstalled.stderr)
    );
}

/// The bench's own scratch directory: peer configs and logs, the pacing script, perf data.
/// Removed on drop, unless it holds a profile.
struct Scratch {
    path: PathBuf,
    keep: bool,
}

impl Scratch {
    fn new(keep: bool) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("aviary-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path, keep })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// One measurement: requests (or bytes) per second and latency percentiles.
#[derive(Debug, Clone, Copy, Default)]
struct Result {
    rate: f64,
    p50_us: f64,
    p99_us: f64,
}

fn field(line: &str, name: &str) -> anyhow::Result<f64> {
    line.split(' ')
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        .with_context(|| format!("no {name} in {line:?}"))?
        .parse()
        .with_context(|| format!("{name} in {line:?}"))
}

fn load(node: &Node, client: &Pod, args: &[&str], secs: f64) -> anyhow::Result<String> {
    let timeout = Duration::from_secs_f64(secs + 60.0);
    let out = node.run(client, &[&["load"], args].concat(), timeout);
    if !out.status.success() {
        bail!(
            "load {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

struct Shapes {
    rr: Result,
    crr: Result,
    stream_mb_s: f64,
    /// Shapes that failed (their figures are NaN), with the error.
    failures: Vec<String>,
}

const FAILED: Result = Result {
    rate: f64::NAN,
    p50_us: f64::NAN,
    p99_us: f64::NAN,
};

/// Measures every shape; one that fails is reported, not fatal.
fn measure(node: &Node, client: &Pod, to: SocketAddr, a: &Args) -> Shapes {
    let (to, secs, conns) = (to.to_string(), a.secs.to_string(), a.conns.to_string());
    let mut failures = Vec::new();
    let mut attempt = |args: &[&str], parse: &dyn Fn(&str) -> anyhow::Result<Result>| match load(
        node, client, args, a.secs,
    )
    .and_then(|line| parse(&line))
    {
        Ok(result) => result,
        Err(e) => {
            failures.push(format!("{}: {e:#}", args[0]));
            FAILED
        }
    };
    let requests = |line: &str| -> anyhow::Result<Result> {
        Ok(Result {
            rate: field(line, "requests")? / a.secs,
            p50_us: field(line, "p50_us")?,
            p99_us: field(line, "p99_us")?,
        })
    };
    let bytes = |line: &str| -> anyhow::Result<Result> {
        Ok(Result {
            rate: field(line, "bytes")? / a.secs / 1e6,
            ..FAILED
        })
    };
    let rr = attempt(&["rr", &to, "--conns", &conns, "--secs", &secs], &requests);
    let crr = attempt(&["crr", &to, "--parallel", "4", "--secs", &secs], &requests);
    let stream = attempt(&["stream", &to, "--secs", &secs], &bytes);
    Shapes {
        rr,
        crr,
        stream_mb_s: stream.rate,
        failures,
    }
}

fn connect_ns(node: &Node, client: &Pod, a: &Args) -> anyhow::Result<f64> {
    let count = a.connects.to_string();
    field(
        &load(node, client, &["connect-local", "--count", &count], 30.0)?,
        "median_ns",
    )
}

/// A process's peak RSS (VmHWM), in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = procfs::process::Process::new(pid as i32)?.status()?;
    status.vmhwm.context("no VmHWM")
}

fn main() {
    if let Err(e) = run(&Args::parse()) {
        eprintln!("bench: {e:#}");
        std::process::exit(1);
    }
}

fn run(a: &Args) -> anyhow::Result<()> {
    let mut measured = goals::Measured::default();
    print_machine(a)?;
    let one_node = [Only::L4, Only::Http, Only::Upgrade];
    if one_node.into_iter().any(|section| a.only.runs(section)) {
        let Some(node) = Node::new() else {
            bail!("the benchmark needs root")
        };
        let scratch = Scratch::new(a.perf.is_some() && a.only.runs(Only::Http))?;
        reserve_ports(&node)?;
        if a.only.runs(Only::L4) {
            l4(&node, a, &mut measured)?;
        }
        if a.only.runs(Only::Http) {
            http::run(&node, a, &scratch.path, &mut measured)?;
        }
        if a.only.runs(Only::Upgrade) {
            upgrade::run(&node, a, &mut measured)?;
        }
    }
    // Two nodes of their own, once the single node is gone (nodes are built one test at a
    // time).
    if a.only.runs(Only::CrossNode) {
        cross_node::run(a)?;
    }
    println!("\nGoals (from this run):\n");
    for goal in goals::evaluate(&measured) {
        let verdict = match goal.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "n/a ",
        };
        println!("{verdict}  {}: {}", goal.name, goal.detail);
    }
    Ok(())
}

/// The node's namespace gives its ephemeral ports (1024-65000 in the harness) to the peer
/// proxies' and the agent's upstream connections. A TIME_WAIT left on the agent's ports
/// (15000-15099) or the peers' (18081-18083) stops the next agent or peer from binding them,
/// so those are reserved, as a node reserves its agents' ports.
fn reserve_ports(node: &Node) -> anyhow::Result<()> {
    aviary_tests::sh(&[
        "ip",
        "netns",
        "exec",
        &node.netns,
        "sysctl",
        "-qw",
        "net.ipv4.ip_local_reserved_ports=15000-15099,18081-18083",
    ])?;
    Ok(())
}

/// The date, the machine and the run's parameters, above the tables.
fn print_machine(a: &Args) -> anyhow::Result<()> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split(':')
                .nth(1)
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_default();
    println!(
        "{} | {} cores, {cpu} | Linux {} | {} s per measurement, {} keep-alive connections\n",
        aviary_tests::sh(&["date", "-u", "+%Y-%m-%d"])?.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        aviary_tests::sh(&["uname", "-r"])?.trim(),
        a.secs,
        a.conns
    );
    if !a.agent_args.trim().is_empty() {
        println!("extra agent flags: {}\n", a.agent_args.trim());
    }
    Ok(())
}

/// The L4 shapes: direct, through Aviary with its defaults (no route: opaque TCP), and with
/// the sk_msg fast path.
fn l4(node: &Node, a: &Args, measured: &mut goals::Measured) -> anyhow::Result<()> {
    let server = node.add_pod("server");
    let client = node.add_pod("client");
    node.serve(&server, 80, None);
    let vip = "10.96.0.10".parse()?;
    node.add_vip(vip, &server);
    node.write_policy(&policy::documents(&[
        policy::namespace("bench", None),
        policy::pod(&client, "bench", Some("enabled")),
        policy::service("server", "bench", vip.into(), &[(80, "TCP")]),
    ]));
    let service = SocketAddr::new(vip.into(), 80);

    eprintln!("measuring direct (no agent)...");
    let direct = measure(node, &client, service, a);
    let connect_bare = connect_ns(node, &client, a)?;

    eprintln!("measuring through Aviary (defaults)...");
    let agent = a.start_agent(node, &[]);
    agent.wait_for_capture(&[&client], 1);
    let proxied = measure(node, &client, service, a);
    let connect_attached = connect_ns(node, &client, a)?;
    let rss = rss_kib(agent.pid())?;
    drop(agent);

    eprintln!("measuring through Aviary with the sk_msg fast path...");
    let agent = a.start_agent(node, &["--sk-msg", "true"]);
    agent.wait_for_capture(&[&client], 1);
    let sk_msg = measure(node, &client, service, a);
    drop(agent);

    let finite = |v: f64| (!v.is_nan()).then_some(v);
    measured.l4_direct_rate = finite(direct.rr.rate);
    measured.l4_opaque_rate = finite(proxied.rr.rate);
    measured.rss_kib(rss);

    println!(
        "\nL4: a greeting/echo backend behind a service VIP, direct and through Aviary (no route: \
         opaque TCP); {} s each\n",
        a.secs
    );
    shapes_table(
        &direct,
        &[("Aviary", &proxied), ("Aviary + sk_msg", &sk_msg)],
    );
    println!(
        "\nconnect() that is not captured (loopback, in an enrolled pod), median: {:.2} µs \
         without the programs, {:.2} µs with them ({:+.2} µs)",
        connect_bare / 1e3,
        connect_attached / 1e3,
        (connect_attached - connect_bare) / 1e3
    );
    println!("agent peak RSS under load: {:.1} MiB", rss as f64 / 1024.0);
    failures(&[
        ("direct", &direct),
        ("Aviary", &proxied),
        ("Aviary + sk_msg", &sk_msg),
    ]);
    Ok(())
}

/// The L4 shapes of each configuration beside `direct`'s, with their ratios to it.
fn shapes_table(direct: &Shapes, configs: &[(&str, &Shapes)]) {
    let header: String = configs
        .iter()
        .map(|(name, _)| format!(" {name} | ratio |"))
        .collect();
    let rule: String = configs.iter().map(|_| "---|---|").collect();
    println!("| shape | direct |{header}");
    println!("|---|---|{rule}");
    let cell = |v: f64, unit: &str| {
        if v.is_nan() {
            "failed".into()
        } else {
            format!("{v:.0} {unit}")
        }
    };
    let ratio = |v: f64, d: f64| {
        if v.is_nan() || d.is_nan() {
            "-".into()
        } else {
            format!("{:.2}x", v / d)
        }
    };
    let row = |name: &str, unit: &str, pick: &dyn Fn(&Shapes) -> f64| {
        let d = pick(direct);
        let cells: String = configs
            .iter()
            .map(|(_, shapes)| {
                let v = pick(shapes);
                format!(" {} | {} |", cell(v, unit), ratio(v, d))
            })
            .collect();
        println!("| {name} | {} |{cells}", cell(d, unit));
    };
    row("keep-alive req/resp, throughput", "req/s", &|s| s.rr.rate);
    row("keep-alive req/resp, p50", "µs", &|s| s.rr.p50_us);
    row("keep-alive req/resp, p99", "µs", &|s| s.rr.p99_us);
    row("new connection per request, throughput", "req/s", &|s| {
        s.crr.rate
    });
    row("new connection per request, p99", "µs", &|s| s.crr.p99_us);
    row("bulk stream, echoed", "MB/s", &|s| s.stream_mb_s);
}

/// The shapes that failed under each configuration.
fn failures(configs: &[(&str, &Shapes)]) {
    for (config, shapes) in configs {
        for failure in &shapes.failures {
            println!("failed under {config}: {failure}");
        }
    }
}

/// CPU time and context switches of processes, from `/proc` (the `procfs` crate).
mod cpu {
    use std::collections::BTreeMap;

    use procfs::process::{all_processes, Process};

    /// utime + stime of a process (for a process, the sum over its threads), in clock ticks.
    fn ticks(process: &Process) -> Option<f64> {
        let stat = process.stat().ok()?;
        Some((stat.utime + stat.stime) as f64)
    }

    /// The processes of process group `pgid`.
    pub fn group(pgid: u32) -> Vec<Process> {
        let Ok(processes) = all_processes() else {
            return Vec::new();
        };
        processes
            .flatten()
            .filter(|p| p.stat().is_ok_and(|s| s.pgrp == pgid as i32))
            .collect()
    }

    /// Whether a process group still has a process that is not a zombie.
    pub fn group_lives(pgid: u32) -> bool {
        group(pgid)
            .iter()
            .any(|p| p.stat().is_ok_and(|s| s.state != 'Z'))
    }

    pub fn ticks_per_second() -> f64 {
        procfs::ticks_per_second() as f64
    }

    /// Whose CPU time a measurement counts.
    #[derive(Debug, Clone, Copy)]
    pub enum Cpu {
        Nobody,
        /// One process (the agent), all its threads.
        Process(u32),
        /// Every process of a process group (a peer proxy: nginx's master and workers).
        Group(u32),
    }

    impl Cpu {
        fn processes(self) -> Option<Vec<Process>> {
            match self {
                Cpu::Nobody => None,
                Cpu::Process(pid) => Some(Process::new(pid as i32).into_iter().collect()),
                Cpu::Group(pgid) => Some(group(pgid)),
            }
        }

        /// Ticks per process now (None: nobody to count).
        pub fn sample(self) -> Option<BTreeMap<u32, f64>> {
            let processes = self.processes()?;
            Some(
                processes
                    .iter()
                    .filter_map(|p| Some((p.pid as u32, ticks(p)?)))
                    .collect(),
            )
        }

        /// Context switches per process now, voluntary and not, summed over its threads
        /// (None: nobody to count).
        pub fn switches(self) -> Option<BTreeMap<u32, f64>> {
            let processes = self.processes()?;
            let switches = |process: &Process| -> Option<f64> {
                let total = process
                    .tasks()
                    .ok()?
                    .flatten()
                    .filter_map(|task| task.status().ok())
                    .map(|status| {
                        let voluntary = status.voluntary_ctxt_switches.unwrap_or(0);
                        voluntary + status.nonvoluntary_ctxt_switches.unwrap_or(0)
                    })
                    .sum::<u64>();
                Some(total as f64)
            };
            Some(
                processes
                    .iter()
                    .filter_map(|p| Some((p.pid as u32, switches(p)?)))
                    .collect(),
            )
        }
    }

    /// Ticks used between two samples; a process that appeared in between counts in full.
    pub fn used(before: &BTreeMap<u32, f64>, after: &BTreeMap<u32, f64>) -> f64 {
        after
            .iter()
            .map(|(pid, t)| t - before.get(pid).copied().unwrap_or(0.0))
            .sum()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn counts_ticks_between_samples() {
            let before = BTreeMap::from([(1, 10.0), (2, 5.0)]);
            // Process 2 is gone (its last ticks are lost), process 3 is new.
            let after = BTreeMap::from([(1, 14.0), (3, 2.0)]);
            assert_eq!(used(&before, &after), 6.0);
        }

        #[test]
        fn reads_this_process() {
            let me = std::process::id();
            let ticks = Cpu::Process(me).sample().unwrap();
            assert!(ticks.contains_key(&me), "{ticks:?}");
            let switches = Cpu::Process(me).switches().unwrap();
            assert!(switches[&me] > 0.0, "{switches:?}");
            assert!(ticks_per_second() > 0.0);
        }
    }
}

/// haproxy and nginx as explicit HTTP proxies in the node's network namespace, forwarding to
/// the backend pods over the same veths that Aviary uses.
mod peers {
    use std::{
        net::SocketAddr,
        os::unix::process::CommandExt as _,
        path::{Path, PathBuf},
        process::{Child, Command, Stdio},
        time::{Duration, Instant},
    };

    use anyhow::{bail, Context as _};
    use aviary_tests::Node;
    use nix::{
        sys::signal::{killpg, Signal},
        unistd::Pid,
    };

    use crate::cpu;

    pub const HAPROXY: &str = "/usr/sbin/haproxy";
    pub const NGINX: &str = "/usr/sbin/nginx";

    /// Where a peer forwards: a 90/10 split between primary and canary, and the mirror.
    #[derive(Debug, Clone, Copy)]
    pub struct Backends {
        pub primary: SocketAddr,
        pub canary: SocketAddr,
        pub mirror: SocketAddr,
    }

    /// haproxy 2.6: weights 90/10, two threads, keep-alive on both sides, idle server
    /// connections shared safely between clients, no logging (no `log` line anywhere).
    pub fn haproxy_config(listen: SocketAddr, to: &Backends) -> String {
        format!(
            "global
    nbthread 2
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse safe
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s

frontend bench
    bind {listen}
    default_backend split

backend split
    balance roundrobin
    server primary {} weight 90
    server canary {} weight 10
",
            to.primary, to.canary
        )
    }

    /// nginx 1.22: `split_clients` 90/10 on `$request_id`, two workers, keep-alive pools to
    /// the upstreams, no access log. With `mirror`, every request is also sent to the mirror.
    pub fn nginx_config(
        dir: &Path,
        name: &str,
        listen: SocketAddr,
        to: &Backends,
        mirror: bool,
    ) -> String {
        let d = dir.display();
        let upstream = |name: &str, addr: SocketAddr| {
            format!(
                "    upstream {name} {{
        server {addr};
        keepalive 64;
        keepalive_requests 1000000;
    }}
"
            )
        };
        let (mirror_directive, mirror_location) = if mirror {
            (
                // nginx's `mirror` copies every request, whatever its method (a POST's body
                // too); Aviary mirrors only GETs. The bench sends only GETs, so both mirror
                // the same requests.
                "            mirror /_mirror;\n",
                "        location = /_mirror {
            internal;
            proxy_pass http://mirror$request_uri;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }
",
            )
        } else {
            ("", "")
        };
        format!(
            "daemon off;
master_process on;
worker_processes 2;
worker_rlimit_nofile 16384;
pid {d}/{name}.pid;
error_log {d}/{name}.error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    keepalive_timeout 60s;
    keepalive_requests 1000000;
    client_body_temp_path {d}/{name}-body;
    proxy_temp_path {d}/{name}-proxy;

    split_clients \"${{request_id}}\" $split_backend {{
        90% primary;
        *   canary;
    }}

{}{}{}
    server {{
        listen {listen} backlog=4096;
        location / {{
{mirror_directive}            proxy_pass http://$split_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
{mirror_location}    }}
}}
",
            upstream("primary", to.primary),
            upstream("canary", to.canary),
            upstream("mirror", to.mirror),
        )
    }

    /// A peer proxy, started in the foreground in the node's network namespace, in a process
    /// group of its own. Dropping it stops the whole group.
    pub struct Peer {
        child: Child,
        log: PathBuf,
    }

    impl Peer {
        /// Writes `config` to the scratch directory, starts `program` with `args` (where
        /// `{config}` stands for the config file), and waits until an HTTP GET through it
        /// answers 200.
        pub fn start(
            node: &Node,
            dir: &Path,
            name: &str,
            program: &str,
            args: &[&str],
            config: &str,
            listen: SocketAddr,
        ) -> anyhow::Result<Peer> {
            let config_path = dir.join(format!("{name}.conf"));
            std::fs::write(&config_path, config)?;
            let config_arg = config_path.to_string_lossy();
            let log = dir.join(format!("{name}.log"));
            let out = std::fs::File::create(&log)?;
            let child = Command::new("/usr/bin/nsenter")
                .arg(format!(
                    "--net={}",
                    aviary_tests::ns_path(&node.netns).display()
                ))
                .arg("--")
                .arg(program)
                .args(args.iter().map(|a| a.replace("{config}", &config_arg)))
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .process_group(0)
                .spawn()
                .with_context(|| format!("starting {program}"))?;
            let mut peer = Peer { child, log };
            peer.wait_until_serving(node, listen)
                .with_context(|| format!("{name} did not start"))?;
            Ok(peer)
        }

        /// The process group (the first process's pid).
        pub fn pgid(&self) -> u32 {
            self.child.id()
        }

        fn wait_until_serving(&mut self, node: &Node, listen: SocketAddr) -> anyhow::Result<()> {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Some(status) = self.child.try_wait()? {
                    bail!(
                        "it exited ({status}): {}",
                        std::fs::read_to_string(&self.log)
                            .unwrap_or_default()
                            .trim()
                    );
                }
                let last = get_in_node(node, listen);
                if last.is_ok() {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    return last.with_context(|| {
                        format!(
                            "no answer at {listen} in 15 s; its output: {}",
                            std::fs::read_to_string(&self.log)
                                .unwrap_or_default()
                                .trim()
                        )
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    impl Drop for Peer {
        fn drop(&mut self) {
            // The group's id stays ours until the first process is reaped (below), so no other
            // process can be signalled by it.
            let group = Pid::from_raw(self.pgid() as i32);
            let _ = killpg(group, Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && cpu::group_lives(self.pgid()) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = killpg(group, Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }

    /// `GET /` at `addr` from the node's network namespace: Ok when the answer is a 200.
    fn get_in_node(node: &Node, addr: SocketAddr) -> anyhow::Result<()> {
        use std::io::{Read as _, Write as _};
        let netns = aviary_tests::ns_path(&node.netns);
        std::thread::spawn(move || -> anyhow::Result<()> {
            // setns moves only this thread.
            let ns = std::fs::File::open(&netns)?;
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            conn.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
            let mut answer = Vec::new();
            conn.read_to_end(&mut answer)?;
            let answer = String::from_utf8_lossy(&answer);
            let status = answer.lines().next().unwrap_or_default();
            anyhow::ensure!(status.contains(" 200 "), "answered {status:?}");
            Ok(())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the probe thread panicked"))?
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn backends() -> Backends {
            Backends {
                primary: "10.244.1.12:8080".parse().unwrap(),
                canary: "10.244.1.13:8080".parse().unwrap(),
                mirror: "10.244.1.14:8080".parse().unwrap(),
            }
        }

        #[test]
        fn haproxy_splits_90_10() {
            let config = haproxy_config("10.244.1.1:18081".parse().unwrap(), &backends());
            assert!(config.contains("bind 10.244.1.1:18081"));
            assert!(config.contains("server primary 10.244.1.12:8080 weight 90"));
            assert!(config.contains("server canary 10.244.1.13:8080 weight 10"));
            assert!(config.contains("nbthread 2") && config.contains("http-reuse safe"));
            assert!(!config.contains("log"));
        }

        #[test]
        fn nginx_mirrors_only_when_asked() {
            let listen = "10.244.1.1:18082".parse().unwrap();
            let plain = nginx_config(Path::new("/tmp/x"), "nginx", listen, &backends(), false);
            let mirrored = nginx_config(Path::new("/tmp/x"), "nginx", listen, &backends(), true);
            assert!(plain.contains("split_clients \"${request_id}\" $split_backend"));
            assert!(plain.contains("listen 10.244.1.1:18082"));
            assert!(!plain.contains("mirror /_mirror;"));
            assert!(mirrored.contains("mirror /_mirror;"));
            assert!(mirrored.contains("server 10.244.1.14:8080;"));
            let opens = mirrored.matches('{').count();
            assert_eq!(opens, mirrored.matches('}').count());
        }
    }
}

/// The project's goals, judged from one run's figures.
mod goals {
    /// The figures the goals need; None when a section was left out or a shape failed.
    #[derive(Debug, Default, Clone)]
    pub struct Measured {
        /// L4 keep-alive req/resp, req/s: direct, and through Aviary with no route.
        pub l4_direct_rate: Option<f64>,
        pub l4_opaque_rate: Option<f64>,
        /// HTTP keep-alive throughput, req/s.
        pub direct_rate: Option<f64>,
        pub split_rate: Option<f64>,
        pub mirror_rate: Option<f64>,
        pub nginx_mirror_rate: Option<f64>,
        /// Proxy CPU per keep-alive request, µs.
        pub split_cpu_us: Option<f64>,
        pub haproxy_cpu_us: Option<f64>,
        /// One connection, sequential: p50 in µs.
        pub direct_seq_p50_us: Option<f64>,
        pub split_seq_p50_us: Option<f64>,
        pub haproxy_seq_p50_us: Option<f64>,
        /// At the fixed rate: p99 in µs.
        pub direct_fixed_p99_us: Option<f64>,
        pub split_fixed_p99_us: Option<f64>,
        /// The agent's peak RSS, the highest seen in the run.
        pub agent_rss_kib: Option<u64>,
        /// Keep-alive load across an upgrade, or why there was no upgrade to measure.
        pub upgrade: Option<Result<Upgrade, String>>,
    }

    #[derive(Debug, Clone)]
    pub struct Upgrade {
        /// Non-2xx answers and requests that timed out.
        pub failed: f64,
        /// Connections broken on connect, read or write.
        pub connection_errors: f64,
        pub p99_us: f64,
        /// The same load with no upgrade.
        pub steady_p99_us: f64,
    }

    impl Measured {
        pub fn rss_kib(&mut self, kib: u64) {
            self.agent_rss_kib = Some(self.agent_rss_kib.map_or(kib, |k| k.max(kib)));
        }
    }

    #[derive(Debug, PartialEq)]
    pub struct Goal {
        pub name: &'static str,
        /// None: not measured in this run.
        pub pass: Option<bool>,
        pub detail: String,
    }

    /// A goal made of checks: FAIL if any measured check fails, else n/a if one was not
    /// measured, else PASS.
    fn all(checks: &[Option<bool>]) -> Option<bool> {
        if checks.contains(&Some(false)) {
            Some(false)
        } else if checks.contains(&None) {
            None
        } else {
            Some(true)
        }
    }

    fn show(v: Option<f64>, unit: &str) -> String {
        v.map_or("not measured".into(), |v| format!("{v:.0}{unit}"))
    }

    fn show_ratio(v: Option<f64>) -> String {
        v.map_or("not measured".into(), |v| format!("{v:.2}x"))
    }

    fn show_us(v: Option<f64>) -> String {
        v.map_or("not measured".into(), |v| format!("{v:.1} µs"))
    }

    fn show_delta_us(v: Option<f64>) -> String {
        v.map_or("not measured".into(), |v| format!("{v:+.1} µs"))
    }

    /// The detail, or a plain "not measured" when none of its figures were.
    fn unless_missing(figures: &[Option<f64>], detail: String) -> String {
        if figures.iter().all(Option::is_none) {
            "not measured in this run".into()
        } else {
            detail
        }
    }

    pub fn evaluate(m: &Measured) -> Vec<Goal> {
        let ratio = |v: Option<f64>, d: Option<f64>| Some(v? / d?);
        let minus = |v: Option<f64>, d: Option<f64>| Some(v? - d?);
        let at_least = |v: Option<f64>, min: f64| v.map(|v| v >= min);

        let split = ratio(m.split_rate, m.direct_rate);
        let cpu = m
            .split_cpu_us
            .zip(m.haproxy_cpu_us)
            .map(|(aviary, haproxy)| aviary <= haproxy);
        let mirror = ratio(m.mirror_rate, m.direct_rate);
        let nginx_mirror = ratio(m.nginx_mirror_rate, m.direct_rate);
        let ahead = m
            .mirror_rate
            .zip(m.nginx_mirror_rate)
            .map(|(aviary, nginx)| aviary > nginx);
        let added = minus(m.split_seq_p50_us, m.direct_seq_p50_us);
        let haproxy_added = minus(m.haproxy_seq_p50_us, m.direct_seq_p50_us);
        let fixed = minus(m.split_fixed_p99_us, m.direct_fixed_p99_us);
        let opaque = ratio(m.l4_opaque_rate, m.l4_direct_rate);
        let rss_mib = m.agent_rss_kib.map(|k| k as f64 / 1024.0);
        vec![
            Goal {
                name: "keep-alive 90/10 split >= 0.8x direct, CPU/request <= haproxy's",
                pass: all(&[at_least(split, 0.8), cpu]),
                detail: unless_missing(
                    &[m.split_rate, m.split_cpu_us, m.haproxy_cpu_us],
                    format!(
                        "{} of direct; CPU {} per request, haproxy {}",
                        show_ratio(split),
                        show_us(m.split_cpu_us),
                        show_us(m.haproxy_cpu_us)
                    ),
                ),
            },
            Goal {
                name: "100% GET mirroring >= 0.6x direct, ahead of nginx's mirror",
                pass: all(&[at_least(mirror, 0.6), ahead]),
                detail: unless_missing(
                    &[m.mirror_rate, m.nginx_mirror_rate],
                    format!(
                        "{} of direct ({}); nginx split + mirror {} ({})",
                        show_ratio(mirror),
                        show(m.mirror_rate, " req/s"),
                        show_ratio(nginx_mirror),
                        show(m.nginx_mirror_rate, " req/s")
                    ),
                ),
            },
            Goal {
                name: "one connection, sequential: 90/10 added p50 <= haproxy's",
                pass: added.zip(haproxy_added).map(|(a, h)| a <= h),
                detail: unless_missing(
                    &[m.split_seq_p50_us, m.haproxy_seq_p50_us],
                    format!(
                        "Aviary {}, haproxy {} over direct's {}",
                        show_delta_us(added),
                        show_delta_us(haproxy_added),
                        show_us(m.direct_seq_p50_us)
                    ),
                ),
            },
            Goal {
                name: "fixed 2,000 req/s: 90/10 p99 within +0.3 ms of direct",
                pass: fixed.map(|f| f <= 300.0),
                detail: unless_missing(
                    &[m.split_fixed_p99_us],
                    format!(
                        "{} ({} against {})",
                        show_delta_us(fixed),
                        show_us(m.split_fixed_p99_us),
                        show_us(m.direct_fixed_p99_us)
                    ),
                ),
            },
            Goal {
                name: "opaque TCP (no route) keep-alive >= 0.8x direct",
                pass: at_least(opaque, 0.8),
                detail: unless_missing(
                    &[m.l4_opaque_rate],
                    format!(
                        "{} ({} against {})",
                        show_ratio(opaque),
                        show(m.l4_opaque_rate, " req/s"),
                        show(m.l4_direct_rate, " req/s")
                    ),
                ),
            },
            Goal {
                name: "agent RSS under load < 40 MiB",
                pass: rss_mib.map(|r| r < 40.0),
                detail: rss_mib.map_or("not measured".into(), |r| format!("{r:.1} MiB peak")),
            },
            Goal {
                name: "0 failed requests and 0 broken connections across an upgrade under load",
                pass: m.upgrade.as_ref().map(|u| {
                    u.as_ref()
                        .is_ok_and(|u| u.failed == 0.0 && u.connection_errors == 0.0)
                }),
                detail: match &m.upgrade {
                    None => "not measured in this run".into(),
                    Some(Err(why)) => format!("no upgrade: {why}"),
                    Some(Ok(u)) => format!(
                        "{:.0} failed, {:.0} broken; p99 {} across the upgrade, {} without",
                        u.failed,
                        u.connection_errors,
                        show_us(Some(u.p99_us)),
                        show_us(Some(u.steady_p99_us))
                    ),
                },
            },
        ]
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn full() -> Measured {
            Measured {
                l4_direct_rate: Some(70000.0),
                l4_opaque_rate: Some(42000.0),
                direct_rate: Some(60000.0),
                split_rate: Some(50000.0),
                mirror_rate: Some(20000.0),
                nginx_mirror_rate: Some(25000.0),
                split_cpu_us: Some(30.0),
                haproxy_cpu_us: Some(40.0),
                direct_seq_p50_us: Some(60.0),
                split_seq_p50_us: Some(100.0),
                haproxy_seq_p50_us: Some(90.0),
                direct_fixed_p99_us: Some(400.0),
                split_fixed_p99_us: Some(650.0),
                agent_rss_kib: Some(26 * 1024),
                upgrade: Some(Ok(Upgrade {
                    failed: 0.0,
                    connection_errors: 0.0,
                    p99_us: 900.0,
                    steady_p99_us: 700.0,
                })),
            }
        }

        fn verdicts(m: &Measured) -> Vec<Option<bool>> {
            evaluate(m).into_iter().map(|g| g.pass).collect()
        }

        #[test]
        fn judges_each_goal() {
            // split 0.83x and cheaper than haproxy; mirror 0.33x and behind nginx; +40 µs
            // against haproxy's +30; +250 µs at the fixed rate; opaque 0.6x; 26 MiB.
            let m = full();
            assert_eq!(
                verdicts(&m),
                [
                    Some(true),
                    Some(false),
                    Some(false),
                    Some(true),
                    Some(false),
                    Some(true),
                    Some(true)
                ]
            );
            let goals = evaluate(&m);
            assert_eq!(
                goals[0].detail,
                "0.83x of direct; CPU 30.0 µs per request, haproxy 40.0 µs"
            );
            assert_eq!(
                goals[2].detail,
                "Aviary +40.0 µs, haproxy +30.0 µs over direct's 60.0 µs"
            );
            assert_eq!(goals[3].detail, "+250.0 µs (650.0 µs against 400.0 µs)");
            assert_eq!(
                goals[6].detail,
                "0 failed, 0 broken; p99 900.0 µs across the upgrade, 700.0 µs without"
            );
            let mut faster = full();
            faster.split_fixed_p99_us = Some(350.0);
            assert_eq!(
                evaluate(&faster)[3].detail,
                "-50.0 µs (350.0 µs against 400.0 µs)"
            );
        }

        #[test]
        fn a_failed_check_fails_its_goal_and_a_missing_one_is_na() {
            let mut m = full();
            m.split_cpu_us = Some(50.0);
            assert_eq!(verdicts(&m)[0], Some(false));
            m.split_cpu_us = None;
            assert_eq!(verdicts(&m)[0], None);
            // Below 0.8x fails even with the CPU figure missing.
            m.split_rate = Some(30000.0);
            assert_eq!(verdicts(&m)[0], Some(false));
        }

        #[test]
        fn sections_left_out_are_not_measured() {
            let mut m = Measured::default();
            m.rss_kib(30 * 1024);
            m.rss_kib(20 * 1024);
            assert_eq!(m.agent_rss_kib, Some(30 * 1024));
            assert_eq!(
                verdicts(&m),
                [None, None, None, None, None, Some(true), None]
            );
            assert_eq!(evaluate(&m)[4].detail, "not measured in this run");
        }

        #[test]
        fn one_broken_connection_or_no_upgrade_fails_the_upgrade_goal() {
            let mut m = full();
            let Some(Ok(upgrade)) = &mut m.upgrade else {
                unreachable!()
            };
            upgrade.connection_errors = 1.0;
            assert_eq!(verdicts(&m)[6], Some(false));
            m.upgrade = Some(Err("the successor never took over".into()));
            assert_eq!(verdicts(&m)[6], Some(false));
            assert_eq!(
                evaluate(&m)[6].detail,
                "no upgrade: the successor never took over"
            );
        }

        #[test]
        fn boundaries_pass() {
            let mut m = full();
            m.split_rate = Some(48000.0);
            m.split_fixed_p99_us = Some(700.0);
            m.split_seq_p50_us = Some(90.0);
            m.agent_rss_kib = Some(40 * 1024);
            let v = verdicts(&m);
            assert_eq!(
                (v[0], v[2], v[3], v[5]),
                (Some(true), Some(true), Some(true), Some(false))
            );
        }
    }
}

/// HTTP/1.1 measured with wrk from an enrolled client pod: the backend directly; haproxy and
/// nginx as explicit proxies in the node's network namespace; Aviary with no route, a 90/10
/// split, 100% GET mirroring and the split with sk_msg. Then inbound, from another host.
mod http {
    use std::{
        net::SocketAddr,
        os::unix::process::CommandExt as _,
        path::{Path, PathBuf},
        process::{Child, Command, Stdio},
        time::{Duration, Instant},
    };

    use anyhow::{bail, Context as _};
    use aviary_tests::{policy, Node, Pod, NODE_IP, UPLINK};

    use crate::{
        cpu::{self, Cpu},
        goals::Measured,
        peers::{self, Backends, Peer},
        Args,
    };

    const PORT: u16 = 8080;
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

    /// One wrk run: requests per second, latency percentiles, and errors.
    #[derive(Debug, Clone, Copy)]
    pub struct Wrk {
        pub rate: f64,
        pub p50_us: f64,
        pub p99_us: f64,
        pub requests: f64,
        /// Answers other than 2xx and 3xx.
        pub non_2xx: f64,
        /// Requests with no answer within wrk's --timeout.
        pub timeouts: f64,
        /// Socket errors on connect, read and write: broken connections.
        pub connection_errors: f64,
    }

    impl Wrk {
        /// Failed requests and connection errors together.
        pub fn errors(&self) -> f64 {
            self.non_2xx + self.timeouts + self.connection_errors
        }
    }

    fn duration_us(text: &str) -> anyhow::Result<f64> {
        let (number, scale) = if let Some(n) = text.strip_suffix("us") {
            (n, 1.0)
        } else if let Some(n) = text.strip_suffix("ms") {
            (n, 1e3)
        } else if let Some(n) = text.strip_suffix('s') {
            (n, 1e6)
        } else {
            bail!("not a duration: {text:?}")
        };
        Ok(number.parse::<f64>()? * scale)
    }

    /// Reads wrk's `--latency` report.
    pub fn parse(report: &str) -> anyhow::Result<Wrk> {
        let words = |prefix: &str| {
            report
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with(prefix))
                .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        };
        let percentile = |p: &str| -> anyhow::Result<f64> {
            duration_us(&words(p).context("no latency distribution")?[1])
        };
        let requests: f64 = words("Requests/sec:").context("no Requests/sec")?[1].parse()?;
        let total: f64 = report
            .lines()
            .find(|l| l.contains("requests in"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .context("no request count")?;
        let non_2xx: f64 = words("Non-2xx").map_or(Ok(0.0), |w| w[4].parse())?;
        // "Socket errors: connect 0, read 16, write 0, timeout 0"
        let socket = words("Socket errors:").unwrap_or_default();
        let socket_errors = |kind: &str| -> anyhow::Result<f64> {
            match socket.iter().position(|w| w == kind) {
                Some(at) => Ok(socket
                    .get(at + 1)
                    .context("a socket error count")?
                    .trim_end_matches(',')
                    .parse()?),
                None => Ok(0.0),
            }
        };
        Ok(Wrk {
            rate: requests,
            p50_us: percentile("50%")?,
            p99_us: percentile("99%")?,
            requests: total,
            non_2xx,
            timeouts: socket_errors("timeout")?,
            connection_errors: socket_errors("connect")?
                + socket_errors("read")?
                + socket_errors("write")?,
        })
    }

    /// A wrk script that paces each connection so that all of them together send `rate`
    /// requests per second (wrk's `delay()` runs before each request).
    fn pacing_script(dir: &Path, rate: u32, conns: u32) -> anyhow::Result<String> {
        let path = dir.join("pace.lua");
        let interval_ms = 1000.0 * f64::from(conns) / f64::from(rate);
        std::fs::write(
            &path,
            format!("function delay()\n  return {interval_ms}\nend\n"),
        )?;
        Ok(path.to_string_lossy().into_owned())
    }

    /// `perf record` of the agent beside one keep-alive run.
    pub struct Profile {
        pub pid: u32,
        pub secs: u32,
        pub data: PathBuf,
    }

    /// A running `perf record`, in a process group of its own, stopped on drop.
    struct Recording {
        child: Child,
        secs: u32,
    }

    impl Profile {
        fn start(&self) -> anyhow::Result<Recording> {
            let log = std::fs::File::create(self.data.with_extension("log"))?;
            let child = Command::new("/usr/bin/perf")
                .args(["record", "-F", "2000", "-g", "-p", &self.pid.to_string()])
                .arg("-o")
                .arg(&self.data)
                .args(["--", "sleep", &self.secs.to_string()])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .process_group(0)
                .spawn()
                .context("starting /usr/bin/perf (linux-perf)")?;
            Ok(Recording {
                child,
                secs: self.secs,
            })
        }

        /// The top of `perf report` by symbol, self time only.
        pub fn report(&self) -> anyhow::Result<String> {
            let data = self.data.to_string_lossy();
            let report = aviary_tests::sh(&[
                "/usr/bin/perf",
                "report",
                "-i",
                &data,
                "--no-children",
                "--sort",
                "sym",
                "--stdio",
                // One line per symbol; the call graphs stay in the data file.
                "-g",
                "none",
            ])?;
            let top: Vec<&str> = report
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .take(25)
                .collect();
            Ok(top.join("\n"))
        }
    }

    impl Recording {
        fn finish(mut self) -> anyhow::Result<()> {
            let deadline = Instant::now() + Duration::from_secs(u64::from(self.secs) + 30);
            loop {
                if let Some(status) = self.child.try_wait()? {
                    anyhow::ensure!(status.success(), "perf record failed ({status})");
                    return Ok(());
                }
                if Instant::now() > deadline {
                    bail!("perf record did not finish in time");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    impl Drop for Recording {
        fn drop(&mut self) {
            if self.child.try_wait().ok().flatten().is_none() {
                let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
                let _ = nix::sys::signal::killpg(group, nix::sys::signal::SIGKILL);
                let _ = self.child.wait();
            }
        }
    }

    struct Target<'a> {
        name: &'static str,
        url: String,
        cpu: Cpu,
        node: &'a Node,
        client: &'a Pod,
    }

    /// One column of the table: a target measured in every shape.
    struct Column {
        name: &'static str,
        keep_alive: anyhow::Result<Wrk>,
        sequential: anyhow::Result<Wrk>,
        new_connection: anyhow::Result<Wrk>,
        fixed_rate: anyhow::Result<Wrk>,
        /// The proxy's CPU per keep-alive request, in µs.
        cpu_us: Option<f64>,
        /// The proxy's context switches per keep-alive request (a diagnostic: each is a
        /// wakeup the proxy paid for).
        switches: Option<f64>,
        /// How `perf record` went, when it ran beside the keep-alive shape.
        profiled: Option<anyhow::Result<()>>,
        /// Why the target could not be set up (every shape then failed).
        setup_error: Option<String>,
    }

    impl Column {
        /// A column whose target could not be set up.
        fn failed(name: &'static str, e: &anyhow::Error) -> Column {
            eprintln!("  {name}: failed: {e:#}");
            let err = || Err(anyhow::anyhow!("not set up"));
            Column {
                name,
                keep_alive: err(),
                sequential: err(),
                new_connection: err(),
                fixed_rate: err(),
                cpu_us: None,
                switches: None,
                profiled: None,
                setup_error: Some(format!("{e:#}")),
            }
        }
    }

    /// wrk from `client` to `url` for `secs`, with `args` (threads, connections, ...).
    pub fn wrk(
        node: &Node,
        client: &Pod,
        url: &str,
        args: &[&str],
        secs: f64,
    ) -> anyhow::Result<Wrk> {
        let secs_arg = format!("{}s", secs.ceil());
        let args = [
            &["--latency", "-d", &secs_arg, "--timeout", "5s"],
            args,
            &[url],
        ]
        .concat();
        let out = node.run_program(
            client,
            Path::new("/usr/bin/wrk"),
            &args,
            Duration::from_secs_f64(secs + 60.0),
        );
        let report = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "wrk failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        parse(&report).with_context(|| format!("wrk said: {report}"))
    }

    impl Target<'_> {
        fn wrk(&self, args: &[&str], secs: f64) -> anyhow::Result<Wrk> {
            wrk(self.node, self.client, &self.url, args, secs)
        }

        fn measure(&self, a: &Args, script: &str, profile: Option<&Profile>) -> Column {
            let conns = a.conns.to_string();
            let ticks = cpu::ticks_per_second();
            let before = self.cpu.sample();
            let switched_before = self.cpu.switches();
            let recording = profile.map(Profile::start);
            let keep_alive = self.wrk(&["-t", "2", "-c", &conns], a.secs);
            let after = self.cpu.sample();
            let switched_after = self.cpu.switches();
            let switches = match (switched_before, switched_after, &keep_alive) {
                (Some(b), Some(e), Ok(w)) if w.requests > 0.0 && !e.is_empty() => {
                    Some(cpu::used(&b, &e) / w.requests)
                }
                _ => None,
            };
            let profiled = recording.map(|r| r.and_then(Recording::finish));
            let cpu_us = match (before, after, &keep_alive) {
                (Some(b), Some(e), Ok(w)) if w.requests > 0.0 && !e.is_empty() => {
                    Some(cpu::used(&b, &e) / ticks / w.requests * 1e6)
                }
                _ => None,
            };
            let sequential = self.wrk(&["-t", "1", "-c", "1"], a.secs);
            let new_connection =
                self.wrk(&["-t", "2", "-c", "4", "-H", "Connection: close"], a.secs);
            let fixed_rate = self.wrk(&["-t", "1", "-c", "8", "-s", script], a.secs);
            let show = |r: &anyhow::Result<Wrk>, pick: fn(&Wrk) -> f64| {
                r.as_ref()
                    .map_or_else(|e| format!("failed ({e:#})"), |w| format!("{:.0}", pick(w)))
            };
            eprintln!(
                "  {}: keep-alive {} req/s, sequential p50 {} µs, fixed-rate p99 {} µs",
                self.name,
                show(&keep_alive, |w| w.rate),
                show(&sequential, |w| w.p50_us),
                show(&fixed_rate, |w| w.p99_us),
            );
            Column {
                name: self.name,
                keep_alive,
                sequential,
                new_connection,
                fixed_rate,
                cpu_us,
                switches,
                profiled,
                setup_error: None,
            }
        }
    }

    /// Measures the HTTP shapes and records the goals' figures; prints the tables, then the
    /// agent's profile when `--perf` asked for one.
    pub fn run(node: &Node, a: &Args, dir: &Path, measured: &mut Measured) -> anyhow::Result<()> {
        if !Path::new("/usr/bin/wrk").exists() {
            bail!("wrk is not installed: run `cargo xtask bench`, which installs it");
        }
        let client = node.add_pod("hclient");
        let [primary, canary, mirror] = node.add_http_pods(["primary", "canary", "mirror"], PORT);
        let vip = |n: u8| std::net::IpAddr::from([10, 96, 1, n]);
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
        let script = pacing_script(dir, a.rate, 8)?;
        let url = |addr: SocketAddr| format!("http://{addr}/");
        let target = |name, addr, cpu| Target {
            name,
            url: url(addr),
            cpu,
            node,
            client: &client,
        };

        eprintln!("HTTP: measuring direct (no agent)...");
        crate::uninstall(node);
        let mut columns = vec![target(
            DIRECT,
            SocketAddr::new(primary.ip.into(), PORT),
            Cpu::Nobody,
        )
        .measure(a, &script, None)];

        // The peers run with no agent on the node: nothing of Aviary's is attached then.
        let backends = Backends {
            primary: SocketAddr::new(primary.ip.into(), PORT),
            canary: SocketAddr::new(canary.ip.into(), PORT),
            mirror: SocketAddr::new(mirror.ip.into(), PORT),
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
            let column = match Peer::start(node, dir, name, program, args, &config, listen) {
                Ok(peer) => {
                    let column =
                        target(column, listen, Cpu::Group(peer.pgid())).measure(a, &script, None);
                    drop(peer);
                    column
                }
                Err(e) => Column::failed(column, &e),
            };
            columns.push(column);
        }

        eprintln!("HTTP: measuring through Aviary: no route, 90/10 split, 100% GET mirroring...");
        let agent = a.start_agent(node, &[]);
        agent.wait_for_capture(&[&client, &primary], 6);
        agent.wait_for_log("routed=", Duration::from_secs(10));
        let cpu = Cpu::Process(agent.pid());
        let profile = a.perf.map(|secs| Profile {
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
            columns
                .push(target(name, SocketAddr::new(vip(n), 80), cpu).measure(a, &script, profile));
        }
        measured.rss_kib(crate::rss_kib(agent.pid())?);
        drop(agent);
        eprintln!("HTTP: measuring the 90/10 split with sk_msg...");
        let agent = a.start_agent(node, &["--sk-msg", "true"]);
        agent.wait_for_capture(&[&client, &primary], 6);
        agent.wait_for_log("routed=", Duration::from_secs(10));
        let sk_msg = target(
            "Aviary 90/10 + sk_msg",
            SocketAddr::new(vip(21), 80),
            Cpu::Process(agent.pid()),
        )
        .measure(a, &script, None);
        measured.rss_kib(crate::rss_kib(agent.pid())?);
        drop(agent);
        columns.push(sk_msg);
        report("HTTP/1.1 with wrk", &columns, a);

        let column = |name: &str| columns.iter().find(|c| c.name == name);
        let wrk = |name: &str, shape: fn(&Column) -> &anyhow::Result<Wrk>| {
            column(name).and_then(|c| shape(c).as_ref().ok().copied())
        };
        let keep_alive = |name| wrk(name, |c| &c.keep_alive).map(|w| w.rate);
        let sequential_p50 = |name| wrk(name, |c| &c.sequential).map(|w| w.p50_us);
        let fixed_p99 = |name| wrk(name, |c| &c.fixed_rate).map(|w| w.p99_us);
        let cpu = |name| column(name).and_then(|c| c.cpu_us);
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

        eprintln!("HTTP: measuring inbound, from another host, direct and through Aviary...");
        let remote = node.add_remote_host("remote");
        let from_remote = |name, cpu| Target {
            name,
            url: url(SocketAddr::new(primary.ip.into(), PORT)),
            cpu,
            node,
            client: &remote,
        };
        crate::uninstall(node);
        let mut inbound = vec![from_remote("direct", Cpu::Nobody).measure(a, &script, None)];
        let agent = a.start_agent(node, &["--inbound-interfaces", UPLINK]);
        // The client and the primary are enrolled.
        agent.wait_for_log("inbound_added=2", Duration::from_secs(10));
        inbound.push(
            from_remote("inbound proxy", Cpu::Process(agent.pid())).measure(a, &script, None),
        );
        measured.rss_kib(crate::rss_kib(agent.pid())?);
        drop(agent);
        report(
            "Inbound HTTP/1.1 from another host over the uplink, with wrk",
            &inbound,
            a,
        );
        if let Some(rss) = measured.agent_rss_kib {
            println!(
                "\nagent peak RSS, the highest of the agents started: {:.1} MiB",
                rss as f64 / 1024.0
            );
        }

        if let Some(profile) = &profile {
            let outcome = columns
                .iter()
                .find_map(|c| c.profiled.as_ref())
                .map(|r| r.as_ref().map_err(|e| anyhow::anyhow!("{e:#}")));
            println!(
                "\nThe agent under the Aviary 90/10 keep-alive run: perf record -F 2000 -g, {} s \
                 (data: {}); perf report --no-children --sort sym, top 25:\n",
                profile.secs,
                profile.data.display()
            );
            match outcome.unwrap_or_else(|| Err(anyhow::anyhow!("perf did not run"))) {
                Ok(_) => match profile.report() {
                    Ok(top) => println!("{top}"),
                    Err(e) => println!("perf report failed: {e:#}"),
                },
                Err(e) => println!("no profile: {e:#}"),
            }
        }
        Ok(())
    }

    fn report(title: &str, columns: &[Column], a: &Args) {
        println!(
            "\n{title}: keep-alive (wrk -t2 -c{}), one connection sequential (-t1 -c1), a new \
             connection per request (-t2 -c4, Connection: close), and a fixed {} req/s (8 paced \
             connections); {} s each. Ratios are to direct; (+n) is the difference from direct.\n",
            a.conns, a.rate, a.secs
        );
        let header: Vec<&str> = columns.iter().map(|c| c.name).collect();
        println!("| shape | {} |", header.join(" | "));
        println!("|---|{}", "---|".repeat(columns.len()));
        let direct = &columns[0];
        let cell = |value: &anyhow::Result<Wrk>,
                    base: &anyhow::Result<Wrk>,
                    pick: fn(&Wrk) -> f64,
                    unit: &str,
                    ratio: bool| {
            match (value, base) {
                (Ok(v), Ok(b)) if ratio && !std::ptr::eq(value, base) => {
                    format!("{:.0} {unit} ({:.2}x)", pick(v), pick(v) / pick(b))
                }
                (Ok(v), Ok(b)) if !std::ptr::eq(value, base) => {
                    format!("{:.0} {unit} ({:+.0})", pick(v), pick(v) - pick(b))
                }
                (Ok(v), _) => format!("{:.0} {unit}", pick(v)),
                (Err(_), _) => "failed".into(),
            }
        };
        type Row = (
            &'static str,
            fn(&Column) -> &anyhow::Result<Wrk>,
            fn(&Wrk) -> f64,
            &'static str,
            bool,
        );
        let keep_alive: [Row; 3] = [
            (
                "keep-alive, throughput",
                |c| &c.keep_alive,
                |w| w.rate,
                "req/s",
                true,
            ),
            (
                "keep-alive, p50",
                |c| &c.keep_alive,
                |w| w.p50_us,
                "µs",
                false,
            ),
            (
                "keep-alive, p99",
                |c| &c.keep_alive,
                |w| w.p99_us,
                "µs",
                false,
            ),
        ];
        let others: [Row; 7] = [
            (
                "one connection sequential, throughput",
                |c| &c.sequential,
                |w| w.rate,
                "req/s",
                true,
            ),
            (
                "one connection sequential, p50",
                |c| &c.sequential,
                |w| w.p50_us,
                "µs",
                false,
            ),
            (
                "one connection sequential, p99",
                |c| &c.sequential,
                |w| w.p99_us,
                "µs",
                false,
            ),
            (
                "new connection per request, throughput",
                |c| &c.new_connection,
                |w| w.rate,
                "req/s",
                true,
            ),
            (
                "fixed rate, achieved",
                |c| &c.fixed_rate,
                |w| w.rate,
                "req/s",
                true,
            ),
            (
                "fixed rate, p50",
                |c| &c.fixed_rate,
                |w| w.p50_us,
                "µs",
                false,
            ),
            (
                "fixed rate, p99",
                |c| &c.fixed_rate,
                |w| w.p99_us,
                "µs",
                false,
            ),
        ];
        let print_rows = |rows: &[Row]| {
            for (name, shape, pick, unit, ratio) in rows {
                let cells: Vec<String> = columns
                    .iter()
                    .map(|c| cell(shape(c), shape(direct), *pick, unit, *ratio))
                    .collect();
                println!("| {name} | {} |", cells.join(" | "));
            }
        };
        print_rows(&keep_alive);
        let cpu: Vec<String> = columns
            .iter()
            .map(|c| c.cpu_us.map_or("-".into(), |us| format!("{us:.1} µs")))
            .collect();
        println!("| proxy CPU per keep-alive request | {} |", cpu.join(" | "));
        let switches: Vec<String> = columns
            .iter()
            .map(|c| c.switches.map_or("-".into(), |n| format!("{n:.2}")))
            .collect();
        println!(
            "| proxy context switches per keep-alive request | {} |",
            switches.join(" | ")
        );
        print_rows(&others);
        let errors: Vec<String> = columns
            .iter()
            .map(|c| {
                let runs = [
                    &c.keep_alive,
                    &c.sequential,
                    &c.new_connection,
                    &c.fixed_rate,
                ];
                let ok: Vec<f64> = runs
                    .iter()
                    .filter_map(|r| r.as_ref().ok().map(Wrk::errors))
                    .collect();
                if ok.is_empty() {
                    "-".into()
                } else {
                    format!("{:.0}", ok.iter().sum::<f64>())
                }
            })
            .collect();
        println!("| errors, all shapes | {} |", errors.join(" | "));
        for column in columns {
            if let Some(e) = &column.setup_error {
                println!("failed under {}: {e}", column.name);
                continue;
            }
            for (shape, result) in [
                ("keep-alive", &column.keep_alive),
                ("sequential", &column.sequential),
                ("new connection", &column.new_connection),
                ("fixed rate", &column.fixed_rate),
            ] {
                if let Err(e) = result {
                    println!("failed under {} ({shape}): {e:#}", column.name);
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn reads_a_wrk_report() {
            let report = "Running 5s test @ http://10.96.1.21/\n  2 threads and 32 connections\n\
                \x20 Latency Distribution\n     50%  250.00us\n     75%  400.00us\n     90%    1.00ms\n     99%    2.50ms\n\
                \x20 123456 requests in 5.00s, 10.00MB read\n  Non-2xx or 3xx responses: 3\n\
                Requests/sec:  24691.20\nTransfer/sec:      2.00MB\n";
            let wrk = super::parse(report).unwrap();
            assert_eq!(wrk.rate, 24691.2);
            assert_eq!(wrk.p50_us, 250.0);
            assert_eq!(wrk.p99_us, 2500.0);
            assert_eq!(wrk.requests, 123456.0);
            assert_eq!(wrk.errors(), 3.0);

            let broken = report.replace(
                "Requests/sec",
                "Socket errors: connect 1, read 16, write 2, timeout 4\nRequests/sec",
            );
            let wrk = super::parse(&broken).unwrap();
            assert_eq!(
                (wrk.non_2xx, wrk.timeouts, wrk.connection_errors),
                (3.0, 4.0, 19.0)
            );
            assert_eq!(wrk.errors(), 26.0);
        }
    }
}

/// An upgrade under load, as a DaemonSet's rolling update does it on one node: wrk's keep-alive
/// load through the 90/10 split while a successor agent starts with the same hand-off socket,
/// takes over from the running agent, and the old agent gets SIGTERM; against the same load
/// with no upgrade. HTTP/1.1 only: the bench has no HTTP/2 load generator.
mod upgrade {
    use std::{
        net::SocketAddr,
        path::Path,
        time::{Duration, Instant},
    };

    use anyhow::{bail, ensure, Context as _};
    use aviary_tests::{policy, wait_until, Agent, Node};

    use crate::{
        goals::{Measured, Upgrade},
        http::{self, Wrk},
        Args,
    };

    const PORT: u16 = 8080;
    /// What the successor logs once it holds the running agent's listeners and connections.
    const TOOK_OVER: &str = "took over from the running agent";

    pub fn run(node: &Node, a: &Args, measured: &mut Measured) -> anyhow::Result<()> {
        if !Path::new("/usr/bin/wrk").exists() {
            bail!("wrk is not installed: run `cargo xtask bench`, which installs it");
        }
        let client = node.add_pod("uclient");
        let [primary, canary] = node.add_http_pods(["uprimary", "ucanary"], PORT);
        let vip = std::net::IpAddr::from([10, 96, 2, 21]);
        node.write_policy(&policy::documents(&[
            policy::namespace("bench", None),
            policy::pod(&client, "bench", Some("enabled")),
            policy::http_service(
                "split",
                "bench",
                vip,
                PORT,
                &[("aviary.dev/split", "primary=90,canary=10")],
            ),
            policy::http_service(
                "primary",
                "bench",
                std::net::IpAddr::from([10, 96, 2, 23]),
                PORT,
                &[],
            ),
            policy::http_service(
                "canary",
                "bench",
                std::net::IpAddr::from([10, 96, 2, 24]),
                PORT,
                &[],
            ),
            policy::endpoint_slice("primary", "bench", &[&primary], PORT),
            policy::endpoint_slice("canary", "bench", &[&canary], PORT),
        ]));
        let url = format!("http://{}/", SocketAddr::new(vip, 80));
        let conns = a.conns.to_string();
        // Long enough for a successor to start, take over and the old agent to exit in the
        // middle of it.
        let window = (4.0 * a.secs).max(15.0);
        let load = || http::wrk(node, &client, &url, &["-t", "2", "-c", &conns], window);

        // The harness gives the node's agents their hand-off socket.
        let mut old = a.start_agent(node, &[]);
        old.wait_for_capture(&[&client], 3);
        old.wait_for_log("routed=", Duration::from_secs(10));
        eprintln!("Upgrade: keep-alive load through the 90/10 split, no upgrade ({window} s)...");
        let steady = load();
        eprintln!("Upgrade: the same load while a successor takes over...");
        let (upgraded, handed_over) = std::thread::scope(|s| {
            let running = s.spawn(load);
            let started = Instant::now();
            std::thread::sleep(Duration::from_secs_f64(window / 4.0));
            let handed_over = hand_over(node, a, &mut old, started, window);
            (running.join().expect("the load thread"), handed_over)
        });
        let (successor, timeline) = match handed_over {
            Ok(done) => done,
            Err(e) => {
                eprintln!("Upgrade: failed: {e:#}");
                measured.upgrade = Some(Err(format!("{e:#}")));
                return Ok(());
            }
        };
        measured.rss_kib(crate::rss_kib(successor.pid())?);
        drop(successor);

        println!(
            "\nUpgrade under load: wrk -t2 -c{} keep-alive through the 90/10 split, {window} s \
             each; {timeline}. Failed: non-2xx answers and timeouts; broken: socket errors on \
             connect, read or write. HTTP/1.1 only.\n",
            a.conns
        );
        println!("| load | requests | failed | broken | p50 | p99 |");
        println!("|---|---|---|---|---|---|");
        for (name, run) in [("no upgrade", &steady), ("across the upgrade", &upgraded)] {
            match run {
                Ok(w) => println!(
                    "| {name} | {:.0} | {:.0} | {:.0} | {:.0} µs | {:.0} µs |",
                    w.requests,
                    w.non_2xx + w.timeouts,
                    w.connection_errors,
                    w.p50_us,
                    w.p99_us
                ),
                Err(e) => println!("| {name} | failed: {e:#} | | | | |"),
            }
        }
        measured.upgrade = Some(match (&steady, &upgraded) {
            (Ok(steady), Ok(upgraded)) => Ok(figures(steady, upgraded)),
            (Err(e), _) | (_, Err(e)) => Err(format!("the load failed: {e:#}")),
        });
        Ok(())
    }

    fn figures(steady: &Wrk, upgraded: &Wrk) -> Upgrade {
        Upgrade {
            failed: upgraded.non_2xx + upgraded.timeouts,
            connection_errors: upgraded.connection_errors,
            p99_us: upgraded.p99_us,
            steady_p99_us: steady.p99_us,
        }
    }

    /// Starts the successor, waits for its takeover, then stops the old agent as the kubelet
    /// does once the successor is ready; the successor, and when each step happened.
    fn hand_over(
        node: &Node,
        a: &Args,
        old: &mut Agent,
        started: Instant,
        window: f64,
    ) -> anyhow::Result<(Agent, String)> {
        let at = |instant: Instant| instant.duration_since(started).as_secs_f64();
        let launched = Instant::now();
        // Returns once the successor logged "agent ready".
        let successor = a.start_successor(node, &[]);
        let took_over = wait_until(Duration::from_secs(10), || {
            successor
                .logs()
                .iter()
                .any(|l| l.contains(TOOK_OVER))
                .then(Instant::now)
        })
        .with_context(|| {
            format!(
                "the successor never logged {TOOK_OVER:?}; its logs:\n{}",
                successor.logs().join("\n")
            )
        })?;
        let status = old.terminate();
        let exited = Instant::now();
        ensure!(status.success(), "the old agent exited with {status}");
        ensure!(
            at(exited) < window,
            "the upgrade outlasted the load: the old agent exited at {:.1} s of {window} s",
            at(exited)
        );
        Ok((
            successor,
            format!(
                "the successor started at {:.1} s, took over at {:.1} s, and the old agent \
                 exited on SIGTERM at {:.1} s",
                at(launched),
                at(took_over),
                at(exited)
            ),
        ))
    }
}

/// The L4 shapes from a pod of one node to a pod of another, over the uplink between them:
/// direct, through both nodes' agents in plain text (the source's outbound proxy, the
/// destination's inbound proxy), and through them in mutual TLS (a tunnel between the agents,
/// with certificates from the signer against the API server fixture).
mod cross_node {
    use std::net::{Ipv4Addr, SocketAddr};

    use anyhow::bail;
    use aviary_tests::{
        apiserver::ApiServer,
        policy,
        signer::{agent_token, pod, Scratch, Signer, NAMESPACE},
        Agent, Node, UPLINK,
    };

    use super::{failures, measure, reserve_ports, shapes_table, uninstall, Args};

    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
    const NODES: [&str; 2] = ["node-a", "node-b"];

    pub fn run(a: &Args) -> anyhow::Result<()> {
        let Some((node_a, node_b)) = Node::pair() else {
            bail!("the benchmark needs root")
        };
        let nodes = [&node_a, &node_b];
        for node in nodes {
            reserve_ports(node)?;
        }
        let client = node_a.add_pod("client");
        let server = node_b.add_pod("server");
        node_b.serve(&server, 80, None);
        // Without agents, node-a routes the VIP to node-b, and node-b to the server.
        node_b.add_vip(VIP, &server);
        aviary_tests::sh(&[
            "ip",
            "-n",
            &node_a.netns,
            "route",
            "add",
            &format!("{VIP}/32"),
            "via",
            "10.0.0.2",
        ])?;
        let yaml = policy::documents(&[
            policy::namespace("bench", Some("enabled")),
            policy::pod_on(&client, "bench", NODES[0], "client", &[]),
            policy::pod_on(&server, "bench", NODES[1], "server", &[]),
            policy::tcp_service("server", "bench", VIP.into(), 80, 80, &[&server]),
        ]);
        for node in nodes {
            node.write_policy(&yaml);
        }
        let service = SocketAddr::new(VIP.into(), 80);

        eprintln!("measuring between two nodes, direct (no agent)...");
        let direct = measure(&node_a, &client, service, a);

        eprintln!("measuring between two nodes through Aviary, in plain text...");
        let agents = start_agents(a, nodes, |_| Vec::new());
        agents[0].wait_for_capture(&[&client], 1);
        let plain = measure(&node_a, &client, service, a);
        drop(agents);

        eprintln!("measuring between two nodes through Aviary, in mutual TLS...");
        let runtime = tokio::runtime::Runtime::new()?;
        let api = runtime.block_on(ApiServer::start())?;
        for node in NODES {
            let agent = format!("aviary-{node}");
            let uid = pod(&api, NAMESPACE, &agent, "aviary", node);
            api.issue_token(node, agent_token(&agent, &uid, node));
        }
        pod(&api, "bench", "client", "client", NODES[0]);
        pod(&api, "bench", "server", "server", NODES[1]);
        let signer = Signer::start(&api);
        let files = Scratch::default();
        let bundle = files.join("ca.crt");
        std::fs::write(&bundle, Signer::bundle_pem(&api))?;
        let agents = start_agents(a, nodes, |i| {
            let token = files.join(NODES[i]);
            std::fs::write(&token, NODES[i]).expect("writing a token");
            let address = signer.forwarded_into(nodes[i], runtime.handle());
            let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
            [
                "--identity-signer".into(),
                address,
                "--trust-bundle".into(),
                path(&bundle),
                "--identity-token".into(),
                path(&token),
            ]
            .into()
        });
        agents[0].wait_for_log(
            "identity=spiffe://cluster.local/ns/bench/sa/client",
            std::time::Duration::from_secs(20),
        );
        agents[1].wait_for_log(
            "identity=spiffe://cluster.local/ns/bench/sa/server",
            std::time::Duration::from_secs(20),
        );
        agents[0].wait_for_capture(&[&client], 1);
        let mtls = measure(&node_a, &client, service, a);
        drop(agents);

        println!(
            "\nBetween two nodes: a greeting/echo backend on node-b behind a service VIP, from a \
             pod of node-a, direct and through both agents (opaque TCP); {} s each\n",
            a.secs
        );
        let configs = [
            ("Aviary, plain text", &plain),
            ("Aviary, mutual TLS", &mtls),
        ];
        shapes_table(&direct, &configs);
        failures(&[("direct", &direct), configs[0], configs[1]]);
        Ok(())
    }

    /// Each node's agent, as its node, capturing inbound on the uplink and the bridge, with
    /// `extra(i)` for the i-th node.
    fn start_agents(
        a: &Args,
        nodes: [&Node; 2],
        extra: impl Fn(usize) -> Vec<String>,
    ) -> Vec<Agent> {
        nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                uninstall(node);
                let extra = extra(i);
                let mut args = vec![
                    "--node-name",
                    NODES[i],
                    "--inbound-interfaces",
                    UPLINK,
                    "--inbound-bridge",
                    "br0",
                ];
                args.extend(extra.iter().map(String::as_str));
                a.start_successor(node, &args)
            })
            .collect()
    }
}
