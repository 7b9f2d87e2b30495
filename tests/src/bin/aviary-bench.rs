//! `cargo xtask bench`: the cost of Aviary's data path, as ratios to a direct connection
//! measured in the same run, on a node built from network namespaces (all traffic stays there).
#![forbid(unsafe_code)]

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Context as _};
use aviary_tests::{policy, Node, Pod};
use clap::Parser;

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

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmHWM value")?
        .parse()?)
}

fn main() {
    if let Err(e) = run(&Args::parse()) {
        eprintln!("bench: {e:#}");
        std::process::exit(1);
    }
}

fn run(a: &Args) -> anyhow::Result<()> {
    let Some(node) = Node::new() else {
        bail!("the benchmark needs root")
    };
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
    let direct = measure(&node, &client, service, a);
    let connect_bare = connect_ns(&node, &client, a)?;

    eprintln!("measuring through Aviary (defaults)...");
    let agent = node.start_agent_quietly(&[]);
    agent.wait_for_capture(&[&client], 1);
    let proxied = measure(&node, &client, service, a);
    let connect_attached = connect_ns(&node, &client, a)?;
    let rss = rss_kib(agent.pid())?;
    drop(agent);

    eprintln!("measuring through Aviary with the sk_msg fast path...");
    let agent = node.start_agent_quietly(&["--sk-msg", "true"]);
    agent.wait_for_capture(&[&client], 1);
    let sk_msg = measure(&node, &client, service, a);
    drop(agent);

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
        "\n{} | {} cores, {cpu} | Linux {} | {} s per measurement, {} keep-alive connections\n",
        aviary_tests::sh(&["date", "-u", "+%Y-%m-%d"])?.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        aviary_tests::sh(&["uname", "-r"])?.trim(),
        a.secs,
        a.conns
    );
    println!("| shape | direct | Aviary | ratio | Aviary + sk_msg | ratio |");
    println!("|---|---|---|---|---|---|");
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
        let (d, p, s) = (pick(&direct), pick(&proxied), pick(&sk_msg));
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            cell(d, unit),
            cell(p, unit),
            ratio(p, d),
            cell(s, unit),
            ratio(s, d)
        );
    };
    row("keep-alive req/resp, throughput", "req/s", &|s| s.rr.rate);
    row("keep-alive req/resp, p50", "µs", &|s| s.rr.p50_us);
    row("keep-alive req/resp, p99", "µs", &|s| s.rr.p99_us);
    row("new connection per request, throughput", "req/s", &|s| {
        s.crr.rate
    });
    row("new connection per request, p99", "µs", &|s| s.crr.p99_us);
    row("bulk stream, echoed", "MB/s", &|s| s.stream_mb_s);
    println!(
        "\nconnect() that is not captured (loopback, in an enrolled pod), median: {:.2} µs \
         without the programs, {:.2} µs with them ({:+.2} µs)",
        connect_bare / 1e3,
        connect_attached / 1e3,
        (connect_attached - connect_bare) / 1e3
    );
    println!("agent peak RSS under load: {:.1} MiB", rss as f64 / 1024.0);
    for (config, shapes) in [
        ("direct", &direct),
        ("Aviary", &proxied),
        ("Aviary + sk_msg", &sk_msg),
    ] {
        for failure in &shapes.failures {
            println!("failed under {config}: {failure}");
        }
    }
    Ok(())
}
