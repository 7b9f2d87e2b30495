//! Aviary's node agent: eBPF capture, the node proxy, and policy from Kubernetes objects.
//!
//! The data flows one way: sources (`kubernetes`, `policy::local`) → the store and the compiler
//! (`policy`) → the compiled table (`table`, swapped whole by `state`) → the capture maps
//! (`capture`, `ebpf`) and the proxy (`proxy`). `table` and `metrics` import nothing above them;
//! `run` wires the rest.
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
pub mod ofrep;
pub mod policy;
pub mod proxy;
pub mod run;
pub mod state;
pub mod supervise;
pub mod table;
