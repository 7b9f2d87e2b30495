//! The HTTP tables' columns: a target (direct, a peer proxy, Aviary) measured with wrk in every
//! shape, the proxy's CPU and context switches per keep-alive request counted around it, and
//! the table of all of them beside direct. The HTTP and inbound sections share them.

use std::{collections::BTreeMap, iter, net::SocketAddr};

use aviary_tests::{Node, Pod};

use crate::{
    cpu::{self, Cpu},
    profile::{Profile, Recording},
    report::{Report, Table},
    wrk::{self, Wrk},
    Args,
};

/// What every column of a table is measured with: the client the load comes from, the
/// fixed-rate pacing script, and the run's flags.
pub struct Load<'a> {
    pub node: &'a Node,
    pub client: &'a Pod,
    pub script: &'a str,
    pub a: &'a Args,
}

/// One column of the table: a target measured in every shape.
pub struct Column {
    pub name: &'static str,
    pub keep_alive: anyhow::Result<Wrk>,
    pub sequential: anyhow::Result<Wrk>,
    pub new_connection: anyhow::Result<Wrk>,
    pub fixed_rate: anyhow::Result<Wrk>,
    pub cost: Cost,
    /// How `perf record` went, when it ran beside the keep-alive shape.
    pub profiled: Option<anyhow::Result<()>>,
    /// Why the target could not be set up (every shape then failed).
    pub setup_error: Option<String>,
}

/// What the proxy paid per keep-alive request (None: no proxy, or nothing measured).
#[derive(Debug, Default, Clone, Copy)]
pub struct Cost {
    /// CPU time, in µs.
    pub cpu_us: Option<f64>,
    /// Context switches (a diagnostic: each is a wakeup the proxy paid for).
    pub switches: Option<f64>,
}

impl Column {
    /// A column whose target could not be set up.
    pub fn failed(name: &'static str, e: &anyhow::Error) -> Column {
        eprintln!("  {name}: failed: {e:#}");
        let err = || Err(anyhow::anyhow!("not set up"));
        Column {
            name,
            keep_alive: err(),
            sequential: err(),
            new_connection: err(),
            fixed_rate: err(),
            cost: Cost::default(),
            profiled: None,
            setup_error: Some(format!("{e:#}")),
        }
    }
}

impl Load<'_> {
    fn wrk(&self, url: &str, args: &[&str]) -> anyhow::Result<Wrk> {
        wrk::run(self.node, self.client, url, args, self.a.secs)
    }

    /// Measures `to` in every shape; `cpu` is whose CPU the keep-alive shape counts, and
    /// `profile` a `perf record` to run beside it.
    pub fn column(
        &self,
        name: &'static str,
        to: SocketAddr,
        cpu: Cpu,
        profile: Option<&Profile>,
    ) -> Column {
        let url = format!("http://{to}/");
        let (keep_alive, cost, profiled) = self.keep_alive(&url, &[], cpu, profile);
        let sequential = self.wrk(&url, &["-t", "1", "-c", "1"]);
        let new_connection = self.wrk(&url, &["-t", "2", "-c", "4", "-H", "Connection: close"]);
        let fixed_rate = self.wrk(&url, &["-t", "1", "-c", "8", "-s", self.script]);
        let show = |r: &anyhow::Result<Wrk>, pick: fn(&Wrk) -> f64| {
            r.as_ref()
                .map_or_else(|e| format!("failed ({e:#})"), |w| format!("{:.0}", pick(w)))
        };
        eprintln!(
            "  {name}: keep-alive {} req/s, sequential p50 {} µs, fixed-rate p99 {} µs",
            show(&keep_alive, |w| w.rate),
            show(&sequential, |w| w.p50_us),
            show(&fixed_rate, |w| w.p99_us),
        );
        Column {
            name,
            keep_alive,
            sequential,
            new_connection,
            fixed_rate,
            cost,
            profiled,
            setup_error: None,
        }
    }

    /// The keep-alive shape (with wrk's `extra` arguments, e.g. a script), with what `cpu`
    /// paid per request counted around it and `perf` recording beside it when asked.
    pub fn keep_alive(
        &self,
        url: &str,
        extra: &[&str],
        cpu: Cpu,
        profile: Option<&Profile>,
    ) -> (anyhow::Result<Wrk>, Cost, Option<anyhow::Result<()>>) {
        let conns = self.a.conns.to_string();
        let before = cpu.sample();
        let switched_before = cpu.switches();
        let recording = profile.map(Profile::start);
        let keep_alive = self.wrk(url, &[&["-t", "2", "-c", &conns], extra].concat());
        let after = cpu.sample();
        let switched_after = cpu.switches();
        let profiled = recording.map(|r| r.and_then(Recording::finish));
        let per_request =
            |before: Samples, after: Samples, scale: f64| match (before, after, &keep_alive) {
                (Some(b), Some(e), Ok(w)) if w.requests > 0.0 && !e.is_empty() => {
                    Some(cpu::used(&b, &e) * scale / w.requests)
                }
                _ => None,
            };
        let cost = Cost {
            switches: per_request(switched_before, switched_after, 1.0),
            cpu_us: per_request(before, after, 1e6 / cpu::ticks_per_second()),
        };
        (keep_alive, cost, profiled)
    }
}

/// A count per process, as [`Cpu`] samples it (None: nobody to count).
type Samples = Option<BTreeMap<u32, f64>>;

/// A row of the table: one figure of one shape in each column.
struct Row {
    name: &'static str,
    shape: fn(&Column) -> &anyhow::Result<Wrk>,
    pick: fn(&Wrk) -> f64,
    unit: &'static str,
    /// A throughput, shown with its ratio to direct; else a latency, shown with its
    /// difference from direct.
    ratio: bool,
}

const fn row(
    name: &'static str,
    shape: fn(&Column) -> &anyhow::Result<Wrk>,
    pick: fn(&Wrk) -> f64,
    unit: &'static str,
    ratio: bool,
) -> Row {
    Row {
        name,
        shape,
        pick,
        unit,
        ratio,
    }
}

const KEEP_ALIVE: [Row; 3] = [
    row(
        "keep-alive, throughput",
        |c| &c.keep_alive,
        |w| w.rate,
        "req/s",
        true,
    ),
    row(
        "keep-alive, p50",
        |c| &c.keep_alive,
        |w| w.p50_us,
        "µs",
        false,
    ),
    row(
        "keep-alive, p99",
        |c| &c.keep_alive,
        |w| w.p99_us,
        "µs",
        false,
    ),
];

const OTHERS: [Row; 7] = [
    row(
        "one connection sequential, throughput",
        |c| &c.sequential,
        |w| w.rate,
        "req/s",
        true,
    ),
    row(
        "one connection sequential, p50",
        |c| &c.sequential,
        |w| w.p50_us,
        "µs",
        false,
    ),
    row(
        "one connection sequential, p99",
        |c| &c.sequential,
        |w| w.p99_us,
        "µs",
        false,
    ),
    row(
        "new connection per request, throughput",
        |c| &c.new_connection,
        |w| w.rate,
        "req/s",
        true,
    ),
    row(
        "fixed rate, achieved",
        |c| &c.fixed_rate,
        |w| w.rate,
        "req/s",
        true,
    ),
    row(
        "fixed rate, p50",
        |c| &c.fixed_rate,
        |w| w.p50_us,
        "µs",
        false,
    ),
    row(
        "fixed rate, p99",
        |c| &c.fixed_rate,
        |w| w.p99_us,
        "µs",
        false,
    ),
];

impl Row {
    /// The row's cells: its name, then each column's figure beside the first column's.
    fn cells(&self, columns: &[Column]) -> Vec<String> {
        let base = (self.shape)(&columns[0]);
        let cell = |(i, column): (usize, &Column)| match ((self.shape)(column), base) {
            (Ok(v), Ok(b)) if i > 0 && self.ratio => {
                let (v, b) = ((self.pick)(v), (self.pick)(b));
                format!("{v:.0} {} ({:.2}x)", self.unit, v / b)
            }
            (Ok(v), Ok(b)) if i > 0 => {
                let (v, b) = ((self.pick)(v), (self.pick)(b));
                format!("{v:.0} {} ({:+.0})", self.unit, v - b)
            }
            (Ok(v), _) => format!("{:.0} {}", (self.pick)(v), self.unit),
            (Err(_), _) => "failed".into(),
        };
        iter::once(self.name.to_owned())
            .chain(columns.iter().enumerate().map(cell))
            .collect()
    }
}

/// The table of every column, the first (direct) the base of the others' ratios and
/// differences.
pub fn table(columns: &[Column]) -> Table {
    let mut table = Table::new(iter::once("shape").chain(columns.iter().map(|c| c.name)));
    for row in &KEEP_ALIVE {
        table.row(row.cells(columns));
    }
    let costs = |name: &str, show: &dyn Fn(&Cost) -> Option<String>| {
        iter::once(name.to_owned())
            .chain(columns.iter().map(|c| show(&c.cost).unwrap_or("-".into())))
            .collect::<Vec<_>>()
    };
    table.row(costs("proxy CPU per keep-alive request", &|c| {
        c.cpu_us.map(|us| format!("{us:.1} µs"))
    }));
    table.row(costs(
        "proxy context switches per keep-alive request",
        &|c| c.switches.map(|n| format!("{n:.2}")),
    ));
    for row in &OTHERS {
        table.row(row.cells(columns));
    }
    let errors = columns.iter().map(|c| {
        let ok: Vec<f64> = c
            .shapes()
            .filter_map(|(_, r)| r.as_ref().ok().map(Wrk::errors))
            .collect();
        if ok.is_empty() {
            "-".into()
        } else {
            format!("{:.0}", ok.iter().sum::<f64>())
        }
    });
    table.row(iter::once("errors, all shapes".to_owned()).chain(errors));
    table
}

impl Column {
    /// Each shape's run, by name.
    fn shapes(&self) -> impl Iterator<Item = (&'static str, &anyhow::Result<Wrk>)> {
        [
            ("keep-alive", &self.keep_alive),
            ("sequential", &self.sequential),
            ("new connection", &self.new_connection),
            ("fixed rate", &self.fixed_rate),
        ]
        .into_iter()
    }
}

/// What failed under each column, as notes.
pub fn failures(report: &mut Report, columns: &[Column]) {
    for column in columns {
        if let Some(e) = &column.setup_error {
            report.note(&format!("failed under {}: {e}", column.name));
            continue;
        }
        for (shape, result) in column.shapes() {
            if let Err(e) = result {
                report.note(&format!("failed under {} ({shape}): {e:#}", column.name));
            }
        }
    }
}

/// The paragraph above a table: the shapes, and how to read the cells.
pub fn intro(title: &str, a: &Args) -> String {
    format!(
        "{title}: keep-alive (wrk -t2 -c{}), one connection sequential (-t1 -c1), a new \
         connection per request (-t2 -c4, Connection: close), and a fixed {} req/s (8 paced \
         connections); {} s each. Ratios are to direct; (+n) is the difference from direct.",
        a.conns, a.rate, a.secs
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(name: &'static str, rate: f64, cpu_us: Option<f64>) -> Column {
        let run = || {
            Ok(Wrk {
                rate,
                p50_us: 100.0 * 1000.0 / rate,
                p99_us: 300.0,
                requests: rate * 5.0,
                non_2xx: 0.0,
                timeouts: 0.0,
                connection_errors: 1.0,
            })
        };
        Column {
            name,
            keep_alive: run(),
            sequential: run(),
            new_connection: Err(anyhow::anyhow!("refused")),
            fixed_rate: run(),
            cost: Cost {
                cpu_us,
                switches: None,
            },
            profiled: None,
            setup_error: None,
        }
    }

    #[test]
    fn sets_each_column_beside_direct() {
        let columns = [
            column("direct", 1000.0, None),
            column("Aviary", 500.0, Some(30.0)),
        ];
        let table = table(&columns).render();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "| shape | direct | Aviary |");
        assert_eq!(
            lines[2],
            "| keep-alive, throughput | 1000 req/s | 500 req/s (0.50x) |"
        );
        assert_eq!(lines[3], "| keep-alive, p50 | 100 µs | 200 µs (+100) |");
        assert_eq!(
            lines[5],
            "| proxy CPU per keep-alive request | - | 30.0 µs |"
        );
        assert_eq!(
            lines[10],
            "| new connection per request, throughput | failed | failed |"
        );
        assert_eq!(lines[14], "| errors, all shapes | 3 | 3 |");
    }
}
