//! Bounded resources, for real: what idle connections through the proxy cost the agent, and
//! that it raises its own open files limit to hold them.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::ChildStdout,
    sync::mpsc,
    time::Duration,
};

use aviary_tests::{patience, policy, wait_until, Greeting, Node, NODE_IP};
use nix::sys::resource::{getrlimit, setrlimit, Resource};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

const IDLE_CONNECTIONS: usize = 10_000;

/// What an idle connection may add to the agent's RSS: 2.3 KiB measured (the debug build these
/// tests run; 2.2 KiB in release), with half as much again for headroom. Tokio's copy with
/// fixed 64 KiB buffers took 45 KiB per connection in the same test.
const RSS_PER_IDLE_CONNECTION: u64 = 3584;

/// The soft limit on open files of the processes the test starts, as container runtimes start
/// them: the agent and the pods raise their own, up to the hard limit.
const OPEN_FILES_SOFT: u64 = 1024;

/// The agent's descriptors besides its connections' (programs, maps, listeners, runtimes),
/// with room to spare.
const AGENT_OWN_FILES: u64 = 500;

/// This process's soft limit on open files, put back when dropped.
struct SoftOpenFilesLimit(u64);

impl SoftOpenFilesLimit {
    /// Lowers the soft limit to `soft`; returns the guard and the hard limit.
    fn lower_to(soft: u64) -> (Self, u64) {
        let (saved, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        setrlimit(Resource::RLIMIT_NOFILE, soft.min(hard), hard).unwrap();
        (Self(saved), hard)
    }
}

impl Drop for SoftOpenFilesLimit {
    fn drop(&mut self) {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let _ = setrlimit(Resource::RLIMIT_NOFILE, self.0, hard);
    }
}

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().strip_suffix("kB")?.trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

fn open_files(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// A process's output lines, as they come, so that waiting for one can be bounded.
fn lines(output: BufReader<ChildStdout>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in output.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

#[test]
fn ten_thousand_idle_connections_stay_under_a_bounded_rss() {
    // Raising a hard limit takes CAP_SYS_RESOURCE, which test machines may not grant: with a
    // hard limit too low for two descriptors per connection, the test opens as many as fit.
    let (_soft, hard) = SoftOpenFilesLimit::lower_to(OPEN_FILES_SOFT);
    let connections = IDLE_CONNECTIONS.min((hard.saturating_sub(AGENT_OWN_FILES) / 2) as usize);
    if connections < IDLE_CONNECTIONS {
        eprintln!(
            "the hard limit on open files ({hard}) holds {connections} connections in the \
             agent, not {IDLE_CONNECTIONS}"
        );
    }
    let Some(node) = Node::new() else { return };
    let backend = node.add_pod("a");
    node.serve_held(&backend, 80);
    node.add_vip(VIP, &backend);
    let client = node.add_pod("client");
    node.write_policy(&policy::documents(&[
        policy::namespace("shop", Some("enabled")),
        policy::pod(&client, "shop", None),
        policy::service("a", "shop", VIP.into(), &[(80, "TCP")]),
    ]));
    let agent = node.start_agent(&[]);
    agent.wait_for_capture(&[&client], 1);
    let raised = agent.wait_for_log("open files limit", Duration::from_secs(5));
    assert!(raised.contains(&format!("open_files={hard}")), "{raised}");
    let vip = SocketAddr::new(IpAddr::V4(VIP), 80).to_string();

    // A few connections first, so that what the agent sets up once is in the baseline.
    let pid = agent.pid();
    let files_before = open_files(pid);
    let warm_up = node.run(
        &client,
        &["hold", &vip, "--count", "200", "--secs", "0"],
        Duration::from_secs(20),
    );
    assert!(warm_up.status.success(), "{warm_up:?}");
    let agent_lets_go = |what: &str| {
        let closed = wait_until(Duration::from_secs(30), || {
            (open_files(pid) <= files_before).then_some(())
        });
        assert!(
            closed.is_some(),
            "after {what}, the agent still holds {} files, {files_before} before",
            open_files(pid)
        );
    };
    agent_lets_go("the warm-up");
    let rss_before = rss_kib(pid);

    let count = connections.to_string();
    // Held long enough to be counted, on a slow machine too.
    let hold = patience(Duration::from_secs(5)).as_secs().to_string();
    let output = lines(node.spawn(&client, &["hold", &vip, "--count", &count, "--secs", &hold]));
    let greeting = output
        .recv_timeout(patience(Duration::from_secs(40)))
        .expect("the client never opened its connections");
    let greeting = Greeting::parse(&greeting).unwrap();
    assert_eq!(
        greeting.peer.ip(),
        IpAddr::V4(NODE_IP),
        "not proxied: {greeting:?}"
    );
    assert_eq!(
        output
            .recv_timeout(patience(Duration::from_secs(5)))
            .unwrap(),
        format!("open {connections}")
    );
    // Each connection holds two sockets in the agent: the client's and the upstream's. The
    // client has its connections once the kernel accepted them; the agent's accepts and
    // upstream connects may still be catching up.
    let held = wait_until(Duration::from_secs(5), || {
        (open_files(pid) >= files_before + 2 * connections).then_some(())
    });
    assert!(
        held.is_some(),
        "the agent holds {} files, {files_before} before",
        open_files(pid)
    );
    let rss = rss_kib(pid);
    let per_connection = (rss.saturating_sub(rss_before) * 1024) as f64 / connections as f64;
    eprintln!(
        "agent RSS: {rss_before} KiB before, {rss} KiB with {connections} idle connections \
         ({per_connection:.0} bytes each)"
    );

    assert!(
        (rss - rss_before) * 1024 <= connections as u64 * RSS_PER_IDLE_CONNECTION,
        "{per_connection:.0} bytes per idle connection, more than {RSS_PER_IDLE_CONNECTION}"
    );

    // The client closes them after a while, and the agent lets go of every one.
    agent_lets_go("the idle connections");
}
