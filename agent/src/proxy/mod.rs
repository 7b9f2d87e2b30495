//! The node proxy.

pub mod outbound;
