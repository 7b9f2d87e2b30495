//! Feature flags on requests, and sticky splits: the 90/10 split with three flags evaluated per
//! request, and sticky by `x-user-id`, beside the same split random and without flags and
//! beside direct, interleaved over rounds; then one evaluation's cost in process.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use aviary_tests::{policy, Agent, Node, Pod};

use crate::{
    columns::Load,
    cpu::Cpu,
    flag_eval,
    flag_rounds::{self, Round, Sample},
    goals::Measured,
    profile::Profile,
    report::Report,
    topology::{self, rss_kib},
    wrk, Args,
};

pub const TITLE: &str = "Feature flags and sticky splits";

/// What the section measures, for the page.
pub const METHOD: &str = "\
The HTTP section's 90/10 split (an `aviary.dev/split` Service; keep-alive, wrk -t2 with
`--conns` connections) in three configurations on one agent: as it is (a random pick per
request); with three feature flags evaluated per request (`aviary.dev/flags`, from a
FeatureFlag in the Service's namespace: a `fractional` rollout to 20% of users by the targeting
key `x-user-id`, a rule on the `x-country` header, and a static flag); and sticky
(`aviary.dev/split-key: header:x-user-id`: the backend chosen by hashing the user). A wrk
script sends every request as another user and takes five countries in turn, to direct and to
each configuration alike. Each round measures direct (no agent), then starts an agent and
measures the three configurations, in an order that turns by one each round (`--rounds`
rounds). The table shows min / median / max over the rounds; a ratio is each round's own,
taken to its min / median / max. CPU per request is the agent's, as in the HTTP section
(direct has no proxy). Below the table: the flags and the sticky split against the random
split round by round, and what the agents counted (flag evaluations per request, the users
each flag turned on, the canary's share of each split). Then one evaluation in process, without
the network. With `--perf`, one more keep-alive run with the flags, not counted, is recorded
and the top of its profile follows.";

const PORT: u16 = 8080;

/// A configuration measured on each round's agent.
pub struct Config {
    pub name: &'static str,
    pub service: &'static str,
    vip: u8,
}

/// The configurations, in the table's order; the indexes below name them.
pub const CONFIGS: [Config; 3] = [
    Config {
        name: "Aviary 90/10",
        service: "split",
        vip: 21,
    },
    Config {
        name: "Aviary 90/10 + 3 flags",
        service: "flagged",
        vip: 22,
    },
    Config {
        name: "Aviary 90/10 sticky",
        service: "sticky",
        vip: 23,
    },
];
pub const RANDOM: usize = 0;
pub const FLAGGED: usize = 1;
pub const STICKY: usize = 2;

/// Service `n`'s VIP: 21-23 the configurations', 24-25 the backends'.
fn vip(n: u8) -> IpAddr {
    IpAddr::from([10, 96, 3, n])
}

/// Measures the section, shows its tables (and a profile when `--perf` asks for one), and
/// records the goals' figures.
pub fn run(
    node: &Node,
    a: &Args,
    dir: &Path,
    report: &mut Report,
    measured: &mut Measured,
) -> anyhow::Result<()> {
    wrk::require()?;
    eprintln!("Flags: one evaluation in process...");
    let evaluations = flag_eval::measure()?;
    let (client, primary) = add_pods(node);
    let users = wrk::users_script(dir, &flag_eval::COUNTRIES)?;
    // Only the keep-alive shape is measured here: no pacing script.
    let load = Load {
        node,
        client: &client,
        script: "",
        a,
    };
    let direct = SocketAddr::new(primary.ip.into(), PORT);
    let mut rounds = Vec::new();
    for turn in 0..a.rounds {
        eprintln!("Flags: round {} of {}...", turn + 1, a.rounds);
        rounds.push(round(&load, direct, &users, turn, measured)?);
    }
    let profile = a.perf.map(|secs| profile_flags(&load, &users, secs, dir));
    flag_rounds::record(&rounds, measured);
    measured.flags_eval_ns = evaluations.last().map(|row| row.ns.median);

    report.section(TITLE, METHOD);
    flag_rounds::report(&rounds, a, report);
    report.text(&flag_eval::intro());
    report.table(&flag_eval::table(&evaluations));
    if let Some((profile, recorded)) = &profile {
        profile.report(recorded.as_ref(), report);
    }
    Ok(())
}

/// The enrolled client and the backends (the primary, which direct reaches, is returned), and
/// the Services of each configuration with the FeatureFlag.
fn add_pods(node: &Node) -> (Pod, Pod) {
    let client = node.add_pod("fclient");
    let [primary, canary] = node.add_http_pods(["fprimary", "fcanary"], PORT);
    let split = ("aviary.dev/split", "primary=90,canary=10");
    let keys = flag_eval::KEYS.join(",");
    let flags = [
        split,
        ("aviary.dev/flags", keys.as_str()),
        ("aviary.dev/flag-key", "header:x-user-id"),
        ("aviary.dev/flag-headers", "x-country"),
    ];
    let sticky = [split, ("aviary.dev/split-key", "header:x-user-id")];
    let annotations: [&[(&str, &str)]; 3] = [&[split], &flags, &sticky];
    let mut objects = vec![
        policy::namespace("bench", None),
        policy::pod(&client, "bench", Some("enabled")),
        feature_flag("bench"),
    ];
    for (config, annotations) in CONFIGS.iter().zip(annotations) {
        let address = vip(config.vip);
        objects.push(policy::http_service(
            config.service,
            "bench",
            address,
            PORT,
            annotations,
        ));
    }
    for (name, pod, n) in [("primary", &primary, 24), ("canary", &canary, 25)] {
        objects.push(policy::http_service(name, "bench", vip(n), PORT, &[]));
        objects.push(policy::endpoint_slice(name, "bench", &[pod], PORT));
    }
    node.write_policy(&policy::documents(&objects));
    (client, primary)
}

/// The section's FeatureFlag in `namespace` (its flagSpec in JSON, which YAML reads).
fn feature_flag(namespace: &str) -> String {
    format!(
        "apiVersion: core.openfeature.dev/v1beta1\nkind: FeatureFlag\n\
         metadata: {{name: bench-flags, namespace: {namespace}}}\n\
         spec: {{flagSpec: {}}}\n",
        flag_eval::flag_spec()
    )
}

/// An agent with the section's policy in force.
fn start(load: &Load) -> Agent {
    let agent = load.a.start_agent(load.node, &[]);
    // The configurations' and the backends' Services.
    agent.wait_for_capture(&[load.client], CONFIGS.len() + 2);
    agent.wait_for_log("routed=", Duration::from_secs(10));
    agent
}

fn url(to: SocketAddr) -> String {
    format!("http://{to}/")
}

fn service_url(config: &Config) -> String {
    url(SocketAddr::new(vip(config.vip), 80))
}

/// One round: direct with no agent, then each configuration on one agent, starting with
/// configuration `turn` (modulo their number); what the agent counted, and its peak RSS.
fn round(
    load: &Load,
    direct: SocketAddr,
    users: &str,
    turn: usize,
    measured: &mut Measured,
) -> anyhow::Result<Round> {
    let extra = ["-s", users];
    topology::uninstall(load.node);
    let (wrk, _, _) = load.keep_alive(&url(direct), &extra, Cpu::Nobody, None);
    let direct = Sample {
        wrk,
        cpu_us: None,
        switches: None,
    };
    let agent = start(load);
    let cpu = Cpu::Process(agent.pid());
    let mut aviary: Vec<(usize, Sample)> = (0..CONFIGS.len())
        .map(|i| {
            let c = (turn + i) % CONFIGS.len();
            let (wrk, cost, _) = load.keep_alive(&service_url(&CONFIGS[c]), &extra, cpu, None);
            let sample = Sample {
                wrk,
                cpu_us: cost.cpu_us,
                switches: cost.switches,
            };
            (c, sample)
        })
        .collect();
    aviary.sort_by_key(|(c, _)| *c);
    let counted = flag_rounds::counted(&load.node.metrics(load.client));
    measured.rss_kib(rss_kib(agent.pid())?);
    Ok(Round {
        direct,
        aviary: aviary.into_iter().map(|(_, sample)| sample).collect(),
        counted,
    })
}

/// `perf record` of a new agent during one more keep-alive run with the flags, not counted.
fn profile_flags(
    load: &Load,
    users: &str,
    secs: u32,
    dir: &Path,
) -> (Profile, Option<anyhow::Result<()>>) {
    eprintln!("Flags: one more run with the flags, recorded by perf...");
    let agent = start(load);
    let profile = Profile {
        run: "one more keep-alive run through the 90/10 split with three flags (not counted)",
        pid: agent.pid(),
        secs,
        data: dir.join("perf-flags.data"),
    };
    let url = service_url(&CONFIGS[FLAGGED]);
    let cpu = Cpu::Process(agent.pid());
    let (_, _, recorded) = load.keep_alive(&url, &["-s", users], cpu, Some(&profile));
    (profile, recorded)
}
