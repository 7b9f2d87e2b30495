//! The policy routing inbound capture needs: packets the TC program marked are delivered to the
//! host (a `local` route in a table of their own), where the socket assigned to them takes them.

use std::process::Command;

use anyhow::{bail, Context as _};
use aviary_abi::INBOUND_MARK;

/// The routing table of marked packets, named after the mark.
const TABLE: u32 = INBOUND_MARK;
/// Before the main table (32766), after the local one (0).
const PRIORITY: u32 = 100;

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Installs the rule and the route, replacing any left by a killed agent.
pub fn install_inbound() -> anyhow::Result<()> {
    let _ = remove_inbound();
    let (mark, table, priority) = (
        format!("{INBOUND_MARK:#x}"),
        TABLE.to_string(),
        PRIORITY.to_string(),
    );
    ip(&[
        "rule", "add", "fwmark", &mark, "lookup", &table, "priority", &priority,
    ])?;
    ip(&[
        "route",
        "replace",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        &table,
    ])
}

pub fn remove_inbound() -> anyhow::Result<()> {
    let (mark, table, priority) = (
        format!("{INBOUND_MARK:#x}"),
        TABLE.to_string(),
        PRIORITY.to_string(),
    );
    let rule = ip(&[
        "rule", "del", "fwmark", &mark, "lookup", &table, "priority", &priority,
    ]);
    let route = ip(&["route", "flush", "table", &table]);
    rule.and(route)
}
