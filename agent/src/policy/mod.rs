//! Policy: Kubernetes objects in, a compiled [`Policy`] and routing table out.
//!
//! The sources (`local.rs` for files, `kubernetes/` for the API server) feed a [`Store`], which
//! refuses invalid objects and keeps the last good version of each. The compiler
//! (`compiler.rs`) is the one function from the store to what the data path enforces; each file
//! below it compiles or parses one thing: objects and their metadata, pods and their enrolment,
//! the `aviary.dev/` annotations, Services, EndpointSlices, GAMMA HTTPRoutes and their status.

pub mod annotations;
pub mod compiler;
pub mod enrolment;
pub mod feature_flag;
pub mod gamma;
pub mod local;
pub mod meta;
pub mod mirroring;
pub mod object;
pub mod pod;
pub mod request_flags;
pub mod security;
pub mod service;
pub mod service_routes;
pub mod slice;
pub mod status;
pub mod store;
pub mod workload;

pub use self::compiler::Policy;
pub use self::enrolment::EnrolledPod;
pub use self::meta::Meta;
pub use self::object::{Input, Kind, Object, ObjectKey};
pub use self::pod::PodMeta;
pub use self::store::{Change, Rejected, Store};

#[cfg(test)]
pub(crate) mod fixtures;
