//! Workload identity for Aviary: SPIFFE IDs, the signer (`aviary-identity`) that certifies
//! them for the agents of the nodes their pods run on, the agents' side of it, and the mutual
//! TLS the agents speak between nodes.
#![forbid(unsafe_code)]

pub mod authorize;
pub mod ca;
pub mod client;
pub mod config;
pub mod credentials;
pub mod signer;
pub mod spiffe;
pub mod tls;
