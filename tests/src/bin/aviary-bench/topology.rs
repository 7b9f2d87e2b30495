//! The node under test: agents started on a datapath of their own, the ports a node reserves,
//! the bench's scratch files, and what the bench reads of an agent (its peak RSS).

use std::path::PathBuf;

use anyhow::Context as _;
use aviary_tests::{Agent, Node};

use crate::Args;

impl Args {
    /// Starts the agent with `extra` and then the developer's `--agent-args`, on a datapath of
    /// its own: what the agents before it left (pinned maps, attached programs) is uninstalled
    /// first, so that no configuration is measured with another's state.
    pub fn start_agent(&self, node: &Node, extra: &[&str]) -> Agent {
        uninstall(node);
        self.start_successor(node, extra)
    }

    /// The same beside a running agent, which it takes over from.
    pub fn start_successor(&self, node: &Node, extra: &[&str]) -> Agent {
        let mut args = extra.to_vec();
        args.extend(self.agent_args.split_whitespace());
        node.start_agent_quietly(&args)
    }
}

/// Takes away the datapath the agents before left attached (it fails open, but its programs
/// still run on every connect): a measurement without an agent is one without Aviary at all.
pub fn uninstall(node: &Node) {
    let uninstalled = node.uninstall().expect("running aviary-agent uninstall");
    assert!(
        uninstalled.status.success(),
        "aviary-agent uninstall: {}",
        String::from_utf8_lossy(&uninstalled.stderr)
    );
}

/// The node's namespace gives its ephemeral ports (1024-65000 in the harness) to the peer
/// proxies' and the agent's upstream connections. A connection left on the agent's ports
/// (15000-15099, and OFREP's 8016) or the peers' (18081-18083) stops the next agent or peer
/// from binding them, so those are reserved, as a node reserves its agents' ports.
pub fn reserve_ports(node: &Node) -> anyhow::Result<()> {
    aviary_tests::sh(&[
        "ip",
        "netns",
        "exec",
        &node.netns,
        "sysctl",
        "-qw",
        "net.ipv4.ip_local_reserved_ports=8016,15000-15099,18081-18083",
    ])?;
    Ok(())
}

/// The bench's own scratch directory: peer configs and logs, the pacing script, perf data.
/// Removed on drop, unless it holds a profile.
pub struct Scratch {
    pub path: PathBuf,
    keep: bool,
}

impl Scratch {
    pub fn new(keep: bool) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("aviary-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path, keep })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A process's peak RSS (VmHWM), in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = procfs::process::Process::new(pid as i32)?.status()?;
    status.vmhwm.context("no VmHWM")
}
