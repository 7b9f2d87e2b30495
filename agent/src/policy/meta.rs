//! Object metadata: what the store keeps of the kinds it holds by the thousand, and one view of
//! the metadata every object has, however it is kept.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

/// The metadata the store keeps of the kinds it holds by the thousand (Services and
/// EndpointSlices): a Kubernetes `ObjectMeta` is 360 bytes before its first string.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Meta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Meta {
    pub(super) fn as_ref(&self) -> MetaRef<'_> {
        MetaRef {
            name: self.name.as_deref(),
            namespace: self.namespace.as_deref(),
            uid: self.uid.as_deref(),
            annotations: self.annotations.as_ref(),
        }
    }
}

/// The metadata every object has, whichever way it is kept.
pub(super) struct MetaRef<'a> {
    pub name: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub uid: Option<&'a str>,
    pub annotations: Option<&'a BTreeMap<String, String>>,
}

impl<'a> MetaRef<'a> {
    pub(super) fn of(meta: &'a ObjectMeta) -> Self {
        Self {
            name: meta.name.as_deref(),
            namespace: meta.namespace.as_deref(),
            uid: meta.uid.as_deref(),
            annotations: meta.annotations.as_ref(),
        }
    }
}
