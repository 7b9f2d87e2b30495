//! haproxy and nginx as explicit HTTP proxies in the node's network namespace, forwarding to
//! the backend pods over the same veths that Aviary uses.

use std::{
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use aviary_tests::Node;
use nix::{
    sys::signal::{killpg, Signal},
    unistd::Pid,
};

use crate::cpu;

pub const HAPROXY: &str = "/usr/sbin/haproxy";
pub const NGINX: &str = "/usr/sbin/nginx";

/// Where a peer forwards: a 90/10 split between primary and canary, and the mirror.
#[derive(Debug, Clone, Copy)]
pub struct Backends {
    pub primary: SocketAddr,
    pub canary: SocketAddr,
    pub mirror: SocketAddr,
}

/// haproxy 2.6: weights 90/10, two threads, keep-alive on both sides, idle server
/// connections shared safely between clients, no logging (no `log` line anywhere).
pub fn haproxy_config(listen: SocketAddr, to: &Backends) -> String {
    format!(
        "global
nbthread 2
maxconn 4096

defaults
mode http
option http-keep-alive
http-reuse safe
timeout connect 5s
timeout client 60s
timeout server 60s
timeout http-keep-alive 60s

frontend bench
bind {listen}
default_backend split

backend split
balance roundrobin
server primary {} weight 90
server canary {} weight 10
",
        to.primary, to.canary
    )
}

/// nginx 1.22: `split_clients` 90/10 on `$request_id`, two workers, keep-alive pools to
/// the upstreams, no access log. With `mirror`, every request is also sent to the mirror.
pub fn nginx_config(
    dir: &Path,
    name: &str,
    listen: SocketAddr,
    to: &Backends,
    mirror: bool,
) -> String {
    let d = dir.display();
    let upstream = |name: &str, addr: SocketAddr| {
        format!(
            "    upstream {name} {{
    server {addr};
    keepalive 64;
    keepalive_requests 1000000;
}}
"
        )
    };
    let (mirror_directive, mirror_location) = if mirror {
        (
            // nginx's `mirror` copies every request, whatever its method (a POST's body
            // too); Aviary mirrors only GETs. The bench sends only GETs, so both mirror
            // the same requests.
            "            mirror /_mirror;\n",
            "        location = /_mirror {
        internal;
        proxy_pass http://mirror$request_uri;
        proxy_http_version 1.1;
        proxy_set_header Connection \"\";
    }
",
        )
    } else {
        ("", "")
    };
    format!(
        "daemon off;
master_process on;
worker_processes 2;
worker_rlimit_nofile 16384;
pid {d}/{name}.pid;
error_log {d}/{name}.error.log warn;

events {{
worker_connections 4096;
}}

http {{
access_log off;
keepalive_timeout 60s;
keepalive_requests 1000000;
client_body_temp_path {d}/{name}-body;
proxy_temp_path {d}/{name}-proxy;

split_clients \"${{request_id}}\" $split_backend {{
    90% primary;
    *   canary;
}}

{}{}{}
server {{
    listen {listen} backlog=4096;
    location / {{
{mirror_directive}            proxy_pass http://$split_backend;
        proxy_http_version 1.1;
        proxy_set_header Connection \"\";
    }}
{mirror_location}    }}
}}
",
        upstream("primary", to.primary),
        upstream("canary", to.canary),
        upstream("mirror", to.mirror),
    )
}

/// A peer proxy, started in the foreground in the node's network namespace, in a process
/// group of its own. Dropping it stops the whole group.
pub struct Peer {
    child: Child,
    log: PathBuf,
}

impl Peer {
    /// Writes `config` to the scratch directory, starts `program` with `args` (where
    /// `{config}` stands for the config file), and waits until an HTTP GET through it
    /// answers 200.
    pub fn start(
        node: &Node,
        dir: &Path,
        name: &str,
        program: &str,
        args: &[&str],
        config: &str,
        listen: SocketAddr,
    ) -> anyhow::Result<Peer> {
        let config_path = dir.join(format!("{name}.conf"));
        std::fs::write(&config_path, config)?;
        let config_arg = config_path.to_string_lossy();
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let child = Command::new("/usr/bin/nsenter")
            .arg(format!(
                "--net={}",
                aviary_tests::ns_path(&node.netns).display()
            ))
            .arg("--")
            .arg(program)
            .args(args.iter().map(|a| a.replace("{config}", &config_arg)))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        let mut peer = Peer { child, log };
        peer.wait_until_serving(node, listen)
            .with_context(|| format!("{name} did not start"))?;
        Ok(peer)
    }

    /// The process group (the first process's pid).
    pub fn pgid(&self) -> u32 {
        self.child.id()
    }

    fn wait_until_serving(&mut self, node: &Node, listen: SocketAddr) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "it exited ({status}): {}",
                    std::fs::read_to_string(&self.log)
                        .unwrap_or_default()
                        .trim()
                );
            }
            let last = get_in_node(node, listen);
            if last.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return last.with_context(|| {
                    format!(
                        "no answer at {listen} in 15 s; its output: {}",
                        std::fs::read_to_string(&self.log)
                            .unwrap_or_default()
                            .trim()
                    )
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // The group's id stays ours until the first process is reaped (below), so no other
        // process can be signalled by it.
        let group = Pid::from_raw(self.pgid() as i32);
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && cpu::group_lives(self.pgid()) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// `GET /` at `addr` from the node's network namespace: Ok when the answer is a 200.
fn get_in_node(node: &Node, addr: SocketAddr) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    let netns = aviary_tests::ns_path(&node.netns);
    std::thread::spawn(move || -> anyhow::Result<()> {
        // setns moves only this thread.
        let ns = std::fs::File::open(&netns)?;
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer)?;
        let answer = String::from_utf8_lossy(&answer);
        let status = answer.lines().next().unwrap_or_default();
        anyhow::ensure!(status.contains(" 200 "), "answered {status:?}");
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the probe thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends() -> Backends {
        Backends {
            primary: "10.244.1.12:8080".parse().unwrap(),
            canary: "10.244.1.13:8080".parse().unwrap(),
            mirror: "10.244.1.14:8080".parse().unwrap(),
        }
    }

    #[test]
    fn haproxy_splits_90_10() {
        let config = haproxy_config("10.244.1.1:18081".parse().unwrap(), &backends());
        assert!(config.contains("bind 10.244.1.1:18081"));
        assert!(config.contains("server primary 10.244.1.12:8080 weight 90"));
        assert!(config.contains("server canary 10.244.1.13:8080 weight 10"));
        assert!(config.contains("nbthread 2") && config.contains("http-reuse safe"));
        assert!(!config.contains("log"));
    }

    #[test]
    fn nginx_mirrors_only_when_asked() {
        let listen = "10.244.1.1:18082".parse().unwrap();
        let plain = nginx_config(Path::new("/tmp/x"), "nginx", listen, &backends(), false);
        let mirrored = nginx_config(Path::new("/tmp/x"), "nginx", listen, &backends(), true);
        assert!(plain.contains("split_clients \"${request_id}\" $split_backend"));
        assert!(plain.contains("listen 10.244.1.1:18082"));
        assert!(!plain.contains("mirror /_mirror;"));
        assert!(mirrored.contains("mirror /_mirror;"));
        assert!(mirrored.contains("server 10.244.1.14:8080;"));
        let opens = mirrored.matches('{').count();
        assert_eq!(opens, mirrored.matches('}').count());
    }
}
