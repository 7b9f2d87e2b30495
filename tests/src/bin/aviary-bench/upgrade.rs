//! An upgrade under load, as a DaemonSet's rolling update does it on one node: wrk's keep-alive
//! load through the 90/10 split while a successor agent starts with the same hand-off socket,
//! takes over from the running agent, and the old agent gets SIGTERM; against the same load
//! with no upgrade. HTTP/1.1 only: the bench has no HTTP/2 load generator.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _};
use aviary_tests::{policy, wait_until, Agent, Node, Pod};

use crate::{
    goals::{Measured, Upgrade},
    report::{Report, Table},
    topology::rss_kib,
    wrk::{self, Wrk},
    Args,
};

pub const TITLE: &str = "Upgrade under load";

/// What the section measures, for the page.
pub const METHOD: &str = "\
wrk (`-t2`, `--conns` keep-alive connections, HTTP/1.1: the bench has no HTTP/2 load generator)
runs through the 90/10 split for 4 × `--secs` (at least 15 s), twice: once with nothing
happening, and once while, a quarter of the way in, a successor agent starts with the same
`--handoff-socket`, logs that it took over from the running agent, and the old agent gets
SIGTERM, as the kubelet does in a rolling update. The table shows both runs' requests, failed
requests (non-2xx answers, timeouts), broken connections (socket errors on connect, read or
write) and p50/p99; the paragraph above it, when each step of the upgrade happened. The goal: 0
failed requests and 0 broken connections across the upgrade.";

const PORT: u16 = 8080;
/// What the successor logs once it holds the running agent's listeners and connections.
const TOOK_OVER: &str = "took over from the running agent";

/// The enrolled client and the split's Services; the split's URL.
fn setup(node: &Node) -> (Pod, String) {
    let client = node.add_pod("uclient");
    let [primary, canary] = node.add_http_pods(["uprimary", "ucanary"], PORT);
    let vip = |n: u8| IpAddr::from([10, 96, 2, n]);
    node.write_policy(&policy::documents(&[
        policy::namespace("bench", None),
        policy::pod(&client, "bench", Some("enabled")),
        policy::http_service(
            "split",
            "bench",
            vip(21),
            PORT,
            &[("aviary.dev/split", "primary=90,canary=10")],
        ),
        policy::http_service("primary", "bench", vip(23), PORT, &[]),
        policy::http_service("canary", "bench", vip(24), PORT, &[]),
        policy::endpoint_slice("primary", "bench", &[&primary], PORT),
        policy::endpoint_slice("canary", "bench", &[&canary], PORT),
    ]));
    (client, format!("http://{}/", SocketAddr::new(vip(21), 80)))
}

pub fn run(
    node: &Node,
    a: &Args,
    report: &mut Report,
    measured: &mut Measured,
) -> anyhow::Result<()> {
    wrk::require()?;
    let (client, url) = setup(node);
    let conns = a.conns.to_string();
    // Long enough for a successor to start, take over and the old agent to exit in the
    // middle of it.
    let window = (4.0 * a.secs).max(15.0);
    let load = || wrk::run(node, &client, &url, &["-t", "2", "-c", &conns], window);

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
            report.section(TITLE, METHOD);
            report.note(&format!("no upgrade: {e:#}"));
            measured.upgrade = Some(Err(format!("{e:#}")));
            return Ok(());
        }
    };
    measured.rss_kib(rss_kib(successor.pid())?);
    drop(successor);

    report.section(TITLE, METHOD);
    report.text(&format!(
        "Upgrade under load: wrk -t2 -c{} keep-alive through the 90/10 split, {window} s \
         each; {timeline}. Failed: non-2xx answers and timeouts; broken: socket errors on \
         connect, read or write. HTTP/1.1 only.",
        a.conns
    ));
    report.table(&table(&steady, &upgraded));
    measured.upgrade = Some(match (&steady, &upgraded) {
        (Ok(steady), Ok(upgraded)) => Ok(figures(steady, upgraded)),
        (Err(e), _) | (_, Err(e)) => Err(format!("the load failed: {e:#}")),
    });
    Ok(())
}

/// Both loads, side by side.
fn table(steady: &anyhow::Result<Wrk>, upgraded: &anyhow::Result<Wrk>) -> Table {
    let mut table = Table::new(["load", "requests", "failed", "broken", "p50", "p99"]);
    for (name, run) in [("no upgrade", steady), ("across the upgrade", upgraded)] {
        match run {
            Ok(w) => table.row([
                name.to_owned(),
                format!("{:.0}", w.requests),
                format!("{:.0}", w.non_2xx + w.timeouts),
                format!("{:.0}", w.connection_errors),
                format!("{:.0} µs", w.p50_us),
                format!("{:.0} µs", w.p99_us),
            ]),
            Err(e) => table.row(
                [name.to_owned(), format!("failed: {e:#}")]
                    .into_iter()
                    .chain(std::iter::repeat_n(String::new(), 4)),
            ),
        }
    }
    table
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
