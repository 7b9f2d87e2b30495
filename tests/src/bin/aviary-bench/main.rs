//! `cargo xtask bench`: the cost of Aviary's data path, as ratios to a direct connection
//! measured in the same run, on a node built from network namespaces (all traffic stays there).
//! HTTP is also measured through haproxy and nginx, run as explicit proxies in the node's
//! network namespace over the same veths, and the run ends with the project's goals, each
//! PASS or FAIL. Every section writes its tables into one report, which is printed as the run
//! goes and, with `--markdown PATH`, written as a page with each section's method
//! (docs/benchmarks.md is that page, written by `cargo xtask bench`).
#![forbid(unsafe_code)]

mod columns;
mod cpu;
mod cross_node;
mod flag_eval;
mod flag_rounds;
mod flags;
mod goals;
mod http;
mod inbound;
mod l4;
mod measure;
mod page;
mod peers;
mod profile;
mod report;
mod spread;
mod topology;
mod upgrade;
mod wrk;

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use aviary_tests::Node;
use clap::{Parser, ValueEnum};

use crate::{goals::Measured, report::Report, topology::Scratch};

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
    /// upgrade under load, feature flags and sticky splits, the L4 shapes between two nodes, or
    /// all. The goals that a section measures show as "n/a" when it is left out.
    #[arg(long, value_enum, default_value_t = Only::All)]
    only: Only,
    /// Rounds of the flags section: each measures direct and every configuration once.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Extra flags for every agent this run starts, split on whitespace (e.g. "--sk-msg true").
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    agent_args: String,
    /// Profile the agent with `perf record -F 2000 -g` for this many seconds during the Aviary
    /// 90/10 keep-alive run (keep it at most --secs; perf's own cost lands in that column), and
    /// print the top of `perf report` after the tables. The perf data is kept.
    #[arg(long, value_name = "SECONDS")]
    perf: Option<u32>,
    /// Also write the whole report as a markdown page to PATH: how the run was made (command,
    /// commit, machine, date), then each section's method, this run's tables, the profile and
    /// the goals. `cargo xtask bench` writes docs/benchmarks.md so.
    #[arg(long, value_name = "PATH")]
    markdown: Option<PathBuf>,
    /// A section written by `aviary-policy-bench --markdown`, put on the page after the goals
    /// (`cargo xtask bench` runs the policy benchmark first and passes its section).
    #[arg(long, value_name = "PATH", requires = "markdown")]
    policy_markdown: Option<PathBuf>,
    /// How the run was started, for the page (`cargo xtask bench` passes its own command
    /// line); this binary's command line otherwise.
    #[arg(long, hide = true)]
    invoked_as: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Only {
    Http,
    L4,
    Upgrade,
    Flags,
    CrossNode,
    All,
}

impl Only {
    fn runs(self, section: Only) -> bool {
        self == Only::All || self == section
    }
}

fn main() {
    if let Err(e) = run(&Args::parse()) {
        eprintln!("bench: {e:#}");
        std::process::exit(1);
    }
}

fn run(a: &Args) -> anyhow::Result<()> {
    let machine = page::Run::of_this_machine(a)?;
    println!("{}", machine.machine());
    let mut report = Report::default();
    let mut measured = Measured::default();
    one_node(a, &mut report, &mut measured)?;
    // Two nodes of their own, once the single node is gone (nodes are built one test at a
    // time).
    if a.only.runs(Only::CrossNode) {
        cross_node::run(a, &mut report)?;
    }
    goals::report(&goals::evaluate(&measured), &mut report);
    if let Some(path) = &a.markdown {
        let mut body = report.markdown().to_owned();
        if let Some(policy) = &a.policy_markdown {
            let section = std::fs::read_to_string(policy)
                .with_context(|| format!("reading {}", policy.display()))?;
            body = format!("{body}\n{section}");
        }
        std::fs::write(path, page::page(&machine, &body))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

/// The sections on one node: L4, HTTP and inbound, the upgrade, flags.
fn one_node(a: &Args, report: &mut Report, measured: &mut Measured) -> anyhow::Result<()> {
    let sections = [Only::L4, Only::Http, Only::Upgrade, Only::Flags];
    if !sections.into_iter().any(|section| a.only.runs(section)) {
        return Ok(());
    }
    let Some(node) = Node::new() else {
        bail!("the benchmark needs root")
    };
    let profiled = a.only.runs(Only::Http) || a.only.runs(Only::Flags);
    let scratch = Scratch::new(a.perf.is_some() && profiled)?;
    topology::reserve_ports(&node)?;
    if a.only.runs(Only::L4) {
        l4::run(&node, a, report, measured)?;
    }
    if a.only.runs(Only::Http) {
        let (pods, script) = http::run(&node, a, &scratch.path, report, measured)?;
        inbound::run(&node, a, (&pods.primary, &script), report, measured)?;
    }
    if a.only.runs(Only::Upgrade) {
        upgrade::run(&node, a, report, measured)?;
    }
    if a.only.runs(Only::Flags) {
        flags::run(&node, a, &scratch.path, report, measured)?;
    }
    Ok(())
}
