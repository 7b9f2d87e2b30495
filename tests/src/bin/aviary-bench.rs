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
    /// The fixed request rate at which HTTP latency is compared, below saturation.
    #[arg(long, default_value_t = 2000)]
    rate: u32,
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
    http::run(&node, a)
}

/// HTTP/1.1 through the proxy, measured with wrk: no route, a 90/10 split and 100% GET
/// mirroring, each against the same backend reached directly.
mod http {
    use std::{net::SocketAddr, path::Path, time::Duration};

    use anyhow::{bail, Context as _};
    use aviary_tests::{policy, Node, Pod, UPLINK};

    use super::Args;

    const PORT: u16 = 8080;

    /// One wrk run: requests per second, latency percentiles, and errors.
    #[derive(Debug, Clone, Copy)]
    pub struct Wrk {
        pub rate: f64,
        pub p50_us: f64,
        pub p99_us: f64,
        pub requests: f64,
        pub errors: f64,
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
        let socket: f64 = words("Socket errors:").map_or(0.0, |w| {
            w.iter()
                .filter_map(|x| x.trim_end_matches(',').parse::<f64>().ok())
                .sum()
        });
        Ok(Wrk {
            rate: requests,
            p50_us: percentile("50%")?,
            p99_us: percentile("99%")?,
            requests: total,
            errors: non_2xx + socket,
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

    /// How many CPU seconds a process has used.
    fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("malformed stat")?
            .1
            .split_whitespace()
            .collect();
        let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
        let per_second = aviary_tests::sh(&["getconf", "CLK_TCK"])?
            .trim()
            .parse::<f64>()?;
        Ok(ticks / per_second)
    }

    struct Target<'a> {
        name: &'static str,
        url: String,
        agent_pid: Option<u32>,
        node: &'a Node,
        client: &'a Pod,
    }

    /// One column of the table: a target measured in every shape.
    struct Column {
        name: &'static str,
        keep_alive: anyhow::Result<Wrk>,
        new_connection: anyhow::Result<Wrk>,
        fixed_rate: anyhow::Result<Wrk>,
        /// Agent CPU per keep-alive request, in µs.
        cpu_us: Option<f64>,
    }

    impl Target<'_> {
        fn wrk(&self, args: &[&str], secs: f64) -> anyhow::Result<Wrk> {
            let secs_arg = format!("{}s", secs.ceil());
            let args = [
                &["--latency", "-d", &secs_arg, "--timeout", "5s"],
                args,
                &[self.url.as_str()],
            ]
            .concat();
            let out = self.node.run_program(
                self.client,
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

        fn measure(&self, a: &Args, script: &str) -> Column {
            let conns = a.conns.to_string();
            let before = self.agent_pid.map(cpu_seconds);
            let keep_alive = self.wrk(&["-t", "2", "-c", &conns], a.secs);
            let after = self.agent_pid.map(cpu_seconds);
            let cpu_us = match (before, after, &keep_alive) {
                (Some(Ok(b)), Some(Ok(e)), Ok(w)) if w.requests > 0.0 => {
                    Some((e - b) / w.requests * 1e6)
                }
                _ => None,
            };
            let new_connection =
                self.wrk(&["-t", "2", "-c", "4", "-H", "Connection: close"], a.secs);
            let fixed_rate = self.wrk(&["-t", "1", "-c", "8", "-s", script], a.secs);
            Column {
                name: self.name,
                keep_alive,
                new_connection,
                fixed_rate,
                cpu_us,
            }
        }
    }

    pub fn run(node: &Node, a: &Args) -> anyhow::Result<()> {
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
        let script = pacing_script(&node.policy_dir, a.rate, 8)?;
        let url = |addr: SocketAddr| format!("http://{addr}/");
        let target = |name, addr, agent_pid| Target {
            name,
            url: url(addr),
            agent_pid,
            node,
            client: &client,
        };

        eprintln!("HTTP: measuring direct (no agent)...");
        let mut columns = vec![
            target("direct", SocketAddr::new(primary.ip.into(), PORT), None).measure(a, &script),
        ];
        eprintln!("HTTP: measuring through Aviary: no route, 90/10 split, 100% GET mirroring...");
        let agent = node.start_agent_quietly(&[]);
        agent.wait_for_capture(&[&client, &primary], 6);
        agent.wait_for_log("routed=", Duration::from_secs(10));
        let pid = Some(agent.pid());
        for (name, n) in [
            ("no route", 20),
            ("90/10 split", 21),
            ("100% GET mirror", 22),
        ] {
            columns.push(target(name, SocketAddr::new(vip(n), 80), pid).measure(a, &script));
        }
        let rss = super::rss_kib(agent.pid())?;
        drop(agent);
        eprintln!("HTTP: measuring the 90/10 split with sk_msg...");
        let agent = node.start_agent_quietly(&["--sk-msg", "true"]);
        agent.wait_for_capture(&[&client, &primary], 6);
        agent.wait_for_log("routed=", Duration::from_secs(10));
        let sk_msg = target(
            "90/10 split + sk_msg",
            SocketAddr::new(vip(21), 80),
            Some(agent.pid()),
        )
        .measure(a, &script);
        drop(agent);
        columns.push(sk_msg);
        report("HTTP/1.1 with wrk", &columns, a, rss);

        eprintln!("HTTP: measuring inbound, from another host, direct and through Aviary...");
        let remote = node.add_remote_host("remote");
        let from_remote = |name, agent_pid| Target {
            name,
            url: url(SocketAddr::new(primary.ip.into(), PORT)),
            agent_pid,
            node,
            client: &remote,
        };
        let mut inbound = vec![from_remote("direct", None).measure(a, &script)];
        let agent = node.start_agent_quietly(&["--inbound-interfaces", UPLINK]);
        // The client and the primary are enrolled.
        agent.wait_for_log("inbound_added=2", Duration::from_secs(10));
        inbound.push(from_remote("inbound proxy", Some(agent.pid())).measure(a, &script));
        let rss = super::rss_kib(agent.pid())?;
        drop(agent);
        report(
            "Inbound HTTP/1.1 from another host over the uplink, with wrk",
            &inbound,
            a,
            rss,
        );
        Ok(())
    }

    fn report(title: &str, columns: &[Column], a: &Args, rss_kib: u64) {
        println!(
            "\n{title}: keep-alive over {} connections, a new connection per request \
             (4 connections), and a fixed {} req/s (8 paced connections); {} s each\n",
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
        let rows: [Row; 6] = [
            (
                "keep-alive, throughput",
                |c| &c.keep_alive,
                |w| w.rate,
                "req/s",
                true,
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
            (
                "keep-alive, errors",
                |c| &c.keep_alive,
                |w| w.errors,
                "",
                false,
            ),
        ];
        for (name, shape, pick, unit, ratio) in rows {
            let cells: Vec<String> = columns
                .iter()
                .map(|c| cell(shape(c), shape(direct), pick, unit, ratio))
                .collect();
            println!("| {name} | {} |", cells.join(" | "));
        }
        let cpu: Vec<String> = columns
            .iter()
            .map(|c| c.cpu_us.map_or("-".into(), |us| format!("{us:.1} µs")))
            .collect();
        println!("| agent CPU per keep-alive request | {} |", cpu.join(" | "));
        println!(
            "\nagent peak RSS after the HTTP shapes: {:.1} MiB",
            rss_kib as f64 / 1024.0
        );
        for column in columns {
            for (shape, result) in [
                ("keep-alive", &column.keep_alive),
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
            assert_eq!(wrk.errors, 3.0);
        }
    }
}
