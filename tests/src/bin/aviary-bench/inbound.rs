//! Inbound HTTP: wrk on a second host, routed to the node over its uplink, to an enrolled pod:
//! direct, then through inbound capture and the inbound proxy.

use std::{net::SocketAddr, time::Duration};

use aviary_tests::{Node, Pod, UPLINK};

use crate::{
    columns::{self, Load},
    cpu::Cpu,
    goals::Measured,
    http::PORT,
    report::Report,
    topology::{self, rss_kib},
    Args,
};

pub const TITLE: &str = "Inbound";

/// What the section measures, for the page.
pub const METHOD: &str = "\
HTTP from a second host, routed to the node over its uplink, to an enrolled pod: direct, then
through inbound capture (TC on the uplink) and the inbound proxy, which parses each request to
measure it at its destination and forwards it over pooled connections to the pod. The shapes,
the rows and the CPU per request are the HTTP section's. Below the table: the highest peak RSS
of the agents the run has started so far.";

/// Measures `pod` (enrolled by the HTTP section's policy) from a remote host, with the HTTP
/// section's pacing `script`.
pub fn run(
    node: &Node,
    a: &Args,
    (pod, script): (&Pod, &str),
    report: &mut Report,
    measured: &mut Measured,
) -> anyhow::Result<()> {
    eprintln!("HTTP: measuring inbound, from another host, direct and through Aviary...");
    let remote = node.add_remote_host("remote");
    let load = Load {
        node,
        client: &remote,
        script,
        a,
    };
    let to = SocketAddr::new(pod.ip.into(), PORT);
    topology::uninstall(node);
    let direct = load.column("direct", to, Cpu::Nobody, None);
    let agent = a.start_agent(node, &["--inbound-interfaces", UPLINK]);
    // The client and the primary are enrolled.
    agent.wait_for_log("inbound_added=2", Duration::from_secs(10));
    let proxied = load.column("inbound proxy", to, Cpu::Process(agent.pid()), None);
    measured.rss_kib(rss_kib(agent.pid())?);
    drop(agent);
    let columns = [direct, proxied];

    report.section(TITLE, METHOD);
    report.text(&columns::intro(
        "Inbound HTTP/1.1 from another host over the uplink, with wrk",
        a,
    ));
    report.table(&columns::table(&columns));
    columns::failures(report, &columns);
    if let Some(rss) = measured.agent_rss_kib {
        report.note(&format!(
            "agent peak RSS, the highest of the agents started: {:.1} MiB",
            rss as f64 / 1024.0
        ));
    }
    Ok(())
}
