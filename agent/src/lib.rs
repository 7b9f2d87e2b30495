//! Aviary's node agent: eBPF capture, the node proxy, and policy from Kubernetes objects.
// The one exception, ebpf::link, says why.
#![deny(unsafe_code)]

pub mod admin;
pub mod capture;
pub mod cgroup;
pub mod config;
pub mod ebpf;
pub mod handoff;
pub mod identity;
pub mod kubernetes;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod run;
pub mod state;
pub mod supervise;
