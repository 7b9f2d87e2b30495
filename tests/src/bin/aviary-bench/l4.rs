//! The L4 shapes: a greeting/echo backend behind a service VIP, direct, through Aviary with its
//! defaults (no route: opaque TCP), and with the sk_msg fast path; and the cost of a connect()
//! that is not captured.

use std::net::{IpAddr, SocketAddr};

use aviary_tests::{policy, Node, Pod};

use crate::{
    goals::Measured,
    measure::{connect_ns, failures, measure, shapes_table, Shapes},
    report::Report,
    topology::rss_kib,
    Args,
};

pub const TITLE: &str = "Transport (L4) and connect()";

/// What the section measures, for the page.
pub const METHOD: &str = "\
A greeting/echo backend behind a service VIP (no route, so opaque TCP), direct, through Aviary,
and through Aviary with the sk_msg fast path, in three shapes: keep-alive (`--conns`
connections, 64-byte request and response), a new connection per request (4 workers), and a
bulk stream (one connection, a writer thread and a reader thread, 64 KiB writes). A shape that
fails shows as `failed`, with its error below the table; the sk_msg bulk stream can fail with a
spurious `EAGAIN` (see [Performance](performance.md#sk_msg-and-bulk-streams)). Below the table:
the median time of a connect() that is not captured (loopback, in an enrolled pod; `--connects`
calls), without the programs and with them, and the agent's peak RSS under this load.";

/// The client, and the backend's Service.
fn setup(node: &Node) -> anyhow::Result<(Pod, SocketAddr)> {
    let server = node.add_pod("server");
    let client = node.add_pod("client");
    node.serve(&server, 80, None);
    let vip: std::net::Ipv4Addr = "10.96.0.10".parse()?;
    node.add_vip(vip, &server);
    node.write_policy(&policy::documents(&[
        policy::namespace("bench", None),
        policy::pod(&client, "bench", Some("enabled")),
        policy::service("server", "bench", vip.into(), &[(80, "TCP")]),
    ]));
    Ok((client, SocketAddr::new(IpAddr::V4(vip), 80)))
}

pub fn run(
    node: &Node,
    a: &Args,
    report: &mut Report,
    measured: &mut Measured,
) -> anyhow::Result<()> {
    let (client, service) = setup(node)?;
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

    let configs: [(&str, &Shapes); 3] = [
        ("direct", &direct),
        ("Aviary", &proxied),
        ("Aviary + sk_msg", &sk_msg),
    ];
    report.section(TITLE, METHOD);
    report.text(&format!(
        "L4: a greeting/echo backend behind a service VIP, direct and through Aviary (no route: \
         opaque TCP); {} s each",
        a.secs
    ));
    report.table(&shapes_table(&direct, &configs[1..]));
    report.note(&format!(
        "connect() that is not captured (loopback, in an enrolled pod), median: {:.2} µs \
         without the programs, {:.2} µs with them ({:+.2} µs)",
        connect_bare / 1e3,
        connect_attached / 1e3,
        (connect_attached - connect_bare) / 1e3
    ));
    report.note(&format!(
        "agent peak RSS under load: {:.1} MiB",
        rss as f64 / 1024.0
    ));
    failures(report, &configs);
    Ok(())
}
