//! The node proxy.

pub mod balance;
pub mod outbound;
pub mod route;
pub mod split;
