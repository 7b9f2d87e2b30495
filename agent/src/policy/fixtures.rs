//! What the policy tests share: the clusters of `tests/fixtures/`, which the end-to-end tests
//! and fuzz targets read too, and a store built from YAML.

use super::{local, Object, Policy, Store};

/// Namespaces that are and are not enrolled, and pods that follow their namespace, override
/// it, run on another node, share their node's network or have finished.
pub const ENROLMENT: &str = include_str!("../../../tests/fixtures/enrolment.yaml");

/// The shop of the fuzz targets: a Flagger-shaped HTTPRoute, a canary, a mirror and flags.
pub const SHOP: &str = include_str!("../../../tests/fixtures/shop.yaml");

pub fn objects(yaml: &str) -> Vec<Object> {
    local::parse_documents(yaml).expect("test YAML parses")
}

/// A store of `yaml`, every object of which is valid.
pub fn store(yaml: &str) -> Store {
    let mut store = Store::default();
    let rejected = store.replace_all(objects(yaml));
    assert!(rejected.is_empty(), "{rejected:?}");
    store
}

/// The enrolled pods, as namespace/name, sorted.
pub fn enrolled_names(policy: &Policy) -> Vec<String> {
    let mut names: Vec<String> = policy
        .enrolled
        .values()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    names.sort();
    names
}
