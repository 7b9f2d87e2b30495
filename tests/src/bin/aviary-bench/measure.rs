//! The L4 shapes, measured by the test pod's load client (`aviary-testpod load`): keep-alive
//! request/response, a new connection per request, a bulk stream, and the cost of connect().

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Context as _};
use aviary_tests::{Node, Pod};

use crate::{
    report::{Report, Table},
    Args,
};

/// One measurement: requests (or megabytes) per second and latency percentiles.
#[derive(Debug, Clone, Copy, Default)]
pub struct Measurement {
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// A shape that failed: its figures are NaN.
const FAILED: Measurement = Measurement {
    rate: f64::NAN,
    p50_us: f64::NAN,
    p99_us: f64::NAN,
};

/// Every shape of one configuration.
pub struct Shapes {
    pub rr: Measurement,
    pub crr: Measurement,
    pub stream_mb_s: f64,
    /// Shapes that failed (their figures are NaN), with the error.
    pub failures: Vec<String>,
}

/// `name=value` in one of the load client's lines.
fn field(line: &str, name: &str) -> anyhow::Result<f64> {
    line.split(' ')
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        .with_context(|| format!("no {name} in {line:?}"))?
        .parse()
        .with_context(|| format!("{name} in {line:?}"))
}

/// Runs the load client in `client` with `args` for `secs`; its line of figures.
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

/// Measures every shape; one that fails is reported, not fatal.
pub fn measure(node: &Node, client: &Pod, to: SocketAddr, a: &Args) -> Shapes {
    let (to, secs, conns) = (to.to_string(), a.secs.to_string(), a.conns.to_string());
    let mut failures = Vec::new();
    let mut attempt =
        |args: &[&str], parse: &dyn Fn(&str) -> anyhow::Result<Measurement>| match load(
            node, client, args, a.secs,
        )
        .and_then(|line| parse(&line))
        {
            Ok(measurement) => measurement,
            Err(e) => {
                failures.push(format!("{}: {e:#}", args[0]));
                FAILED
            }
        };
    let requests = |line: &str| -> anyhow::Result<Measurement> {
        Ok(Measurement {
            rate: field(line, "requests")? / a.secs,
            p50_us: field(line, "p50_us")?,
            p99_us: field(line, "p99_us")?,
        })
    };
    let bytes = |line: &str| -> anyhow::Result<Measurement> {
        Ok(Measurement {
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

/// The median time of a connect() that is not captured (loopback), in ns.
pub fn connect_ns(node: &Node, client: &Pod, a: &Args) -> anyhow::Result<f64> {
    let count = a.connects.to_string();
    field(
        &load(node, client, &["connect-local", "--count", &count], 30.0)?,
        "median_ns",
    )
}

/// A row of the shapes' table: its name, unit, and the figure it shows.
type Row = (&'static str, &'static str, fn(&Shapes) -> f64);

const ROWS: [Row; 6] = [
    ("keep-alive req/resp, throughput", "req/s", |s| s.rr.rate),
    ("keep-alive req/resp, p50", "µs", |s| s.rr.p50_us),
    ("keep-alive req/resp, p99", "µs", |s| s.rr.p99_us),
    ("new connection per request, throughput", "req/s", |s| {
        s.crr.rate
    }),
    ("new connection per request, p99", "µs", |s| s.crr.p99_us),
    ("bulk stream, echoed", "MB/s", |s| s.stream_mb_s),
];

/// The shapes of each configuration beside `direct`'s, with their ratios to it.
pub fn shapes_table(direct: &Shapes, configs: &[(&str, &Shapes)]) -> Table {
    let mut header = vec!["shape", "direct"];
    for (name, _) in configs {
        header.extend([*name, "ratio"]);
    }
    let mut table = Table::new(header);
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
    for (name, unit, pick) in ROWS {
        let d = pick(direct);
        let mut cells = vec![name.to_owned(), cell(d, unit)];
        for (_, shapes) in configs {
            let v = pick(shapes);
            cells.extend([cell(v, unit), ratio(v, d)]);
        }
        table.row(cells);
    }
    table
}

/// The shapes that failed under each configuration, as notes.
pub fn failures(report: &mut Report, configs: &[(&str, &Shapes)]) {
    for (config, shapes) in configs {
        for failure in &shapes.failures {
            report.note(&format!("failed under {config}: {failure}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_load_clients_fields() {
        let line = "requests=1000 p50_us=250.5 p99_us=900";
        assert_eq!(field(line, "requests").unwrap(), 1000.0);
        assert_eq!(field(line, "p50_us").unwrap(), 250.5);
        assert!(field(line, "bytes").is_err());
    }

    #[test]
    fn shows_ratios_to_direct_and_failed_shapes() {
        let shapes = |rate: f64, stream: f64| Shapes {
            rr: Measurement {
                rate,
                p50_us: 100.0,
                p99_us: 200.0,
            },
            crr: Measurement::default(),
            stream_mb_s: stream,
            failures: Vec::new(),
        };
        let (direct, proxied) = (shapes(1000.0, 800.0), shapes(500.0, f64::NAN));
        let table = shapes_table(&direct, &[("Aviary", &proxied)]).render();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "| shape | direct | Aviary | ratio |");
        assert_eq!(
            lines[2],
            "| keep-alive req/resp, throughput | 1000 req/s | 500 req/s | 0.50x |"
        );
        assert_eq!(lines[7], "| bulk stream, echoed | 800 MB/s | failed | - |");
    }
}
