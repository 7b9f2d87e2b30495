//! OpenFeature Operator's `FeatureFlag` (`core.openfeature.dev/v1beta1`, namespaced), as the
//! API server serves it; the store keeps it as [`FeatureFlag`], its flags compiled.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{core::NamespaceResourceScope, Resource};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Watched;
use crate::policy::{feature_flag::FeatureFlag, Kind, Object};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FeatureFlagObject {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: FeatureFlagSpec,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FeatureFlagSpec {
    /// The flags, in flagd's format (`flags`, `$evaluators`, `metadata`).
    #[serde(default)]
    pub flag_spec: Value,
}

impl Resource for FeatureFlagObject {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "FeatureFlag".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "core.openfeature.dev".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1beta1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "featureflags".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl Watched for FeatureFlagObject {
    const KIND: Kind = Kind::FeatureFlag;
    fn into_object(self) -> Object {
        Object::FeatureFlag(Box::new(FeatureFlag::new(
            self.metadata,
            self.spec.flag_spec,
        )))
    }
}
