//! OpenFeature's `FeatureFlag` objects (`core.openfeature.dev/v1beta1`, flags in flagd's format
//! under `spec.flagSpec`), as the OpenFeature Operator's users already keep them, and as the
//! store keeps them: the flag set compiled once, when the object comes.

use std::sync::Arc;

use aviary_flags::FlagSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use serde_json::Value;

use super::meta::Meta;

pub const API_VERSION: &str = "core.openfeature.dev/v1beta1";
pub const KIND: &str = "FeatureFlag";

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FeatureFlag {
    /// Name, namespace and UID.
    pub metadata: Meta,
    /// `spec.flagSpec`, as written.
    pub flag_spec: Value,
    /// The flags, or why some cannot be used (the store then refuses the object).
    #[serde(skip)]
    pub flags: Result<Arc<FlagSet>, String>,
}

impl PartialEq for FeatureFlag {
    fn eq(&self, other: &Self) -> bool {
        self.metadata == other.metadata && self.flag_spec == other.flag_spec
    }
}

impl FeatureFlag {
    pub fn new(meta: ObjectMeta, flag_spec: Value) -> Self {
        let flags = compile(&flag_spec);
        FeatureFlag {
            metadata: Meta {
                name: meta.name,
                namespace: meta.namespace,
                uid: meta.uid,
                annotations: None,
            },
            flag_spec,
            flags,
        }
    }

    /// Reads a FeatureFlag from its JSON (as the API server or a file gives it).
    pub fn from_json(object: Value) -> Result<Self, String> {
        let meta: ObjectMeta = serde_json::from_value(object["metadata"].clone())
            .map_err(|e| format!("metadata: {e}"))?;
        let flag_spec = object["spec"]["flagSpec"].clone();
        Ok(Self::new(meta, flag_spec))
    }
}

/// The flag set of `spec.flagSpec`, or why it, or any flag of it, cannot be used.
fn compile(flag_spec: &Value) -> Result<Arc<FlagSet>, String> {
    if flag_spec.is_null() {
        return Err("spec.flagSpec is missing".into());
    }
    let set = FlagSet::parse(flag_spec).map_err(|e| format!("spec.flagSpec: {e}"))?;
    let refused: Vec<String> = set
        .refused()
        .map(|(key, why)| format!("flag {key:?}: {why}"))
        .collect();
    if refused.is_empty() {
        Ok(Arc::new(set))
    } else {
        Err(refused.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Map;

    use crate::policy::{
        compiler::routing_table, fixtures::objects, service_routes::RouteOptions, Store,
    };

    fn feature_flag(name: &str, flags: &str) -> String {
        format!(
            "apiVersion: core.openfeature.dev/v1beta1\nkind: FeatureFlag\n\
             metadata: {{name: {name}, namespace: shop}}\nspec:\n  flagSpec:\n    flags:\n{flags}"
        )
    }

    // Quoted: YAML reads a bare on and off as booleans, as Kubernetes' YAML does.
    const CHECKOUT: &str = "      new-checkout:\n        state: ENABLED\n        \
        variants: {\"on\": true, \"off\": false}\n        defaultVariant: \"off\"\n        \
        targeting: {fractional: [[\"on\", 20], [\"off\", 80]]}\n";

    #[test]
    fn the_shops_flags_are_good_and_its_route_names_them() {
        let store = crate::policy::fixtures::store(crate::policy::fixtures::SHOP);
        let table = routing_table(&store, &RouteOptions::default());
        let web = &table.services[&"127.0.0.2:80".parse().unwrap()];
        let named = web.flags.as_ref().expect("the route names flags");
        let keys: Vec<&str> = named.flags.iter().map(|f| &*f.key).collect();
        assert_eq!(keys, ["new-checkout", "dark-mode", "undefined-flag"]);
        let flags = &table.flags["shop"];
        let context: Map<String, serde_json::Value> = serde_json::from_value(serde_json::json!({
            "path": "/api/v1", "headers": {"user-agent": "2.1.0"}
        }))
        .unwrap();
        assert_eq!(
            flags.evaluate("dark-mode", &context, 0).variant,
            Some("dark")
        );
    }

    #[test]
    fn a_namespaces_flags_are_in_the_table_and_a_bad_flag_keeps_the_last_good_version() {
        let mut store = Store::default();
        let rejected = store.replace_all(objects(&feature_flag("checkout", CHECKOUT)));
        assert!(rejected.is_empty(), "{rejected:?}");
        let evaluate = |store: &Store, user: &str| {
            let table = routing_table(store, &RouteOptions::default());
            let context = Map::from_iter([("targetingKey".to_owned(), user.into())]);
            let flags = &table.flags["shop"];
            let r = flags.evaluate("new-checkout", &context, 0);
            (r.variant.map(str::to_owned), r.reason.as_str())
        };
        let answers: Vec<_> = (0..100)
            .map(|u| evaluate(&store, &format!("user-{u}")))
            .collect();
        let on = answers
            .iter()
            .filter(|(v, _)| v.as_deref() == Some("on"))
            .count();
        assert!((5..=40).contains(&on), "{on} of 100 users on");
        assert!(answers
            .iter()
            .all(|(_, reason)| *reason == "TARGETING_MATCH"));

        // A default variant that is not one, an unknown operator, a bad state: each refused with
        // why, and the last good version answers.
        for (bad, why) in [
            (
                CHECKOUT.replace("defaultVariant: \"off\"", "defaultVariant: maybe"),
                "is not a variant",
            ),
            (
                CHECKOUT.replace("fractional", "fraction"),
                "unknown operator \"fraction\"",
            ),
            (
                CHECKOUT.replace("state: ENABLED", "state: ON"),
                "state must be",
            ),
        ] {
            let object = objects(&feature_flag("checkout", &bad)).remove(0);
            let refused = store.upsert(object).unwrap_err();
            assert!(refused.reason.contains(why), "{}", refused.reason);
            assert!(
                refused.reason.contains("new-checkout"),
                "{}",
                refused.reason
            );
            assert!(refused.kept_previous);
            assert_eq!(evaluate(&store, "user-1"), answers[1]);
        }
        let no_spec = "apiVersion: core.openfeature.dev/v1beta1\nkind: FeatureFlag\n\
                       metadata: {name: empty, namespace: shop}\n";
        let refused = store.upsert(objects(no_spec).remove(0)).unwrap_err();
        assert!(refused.reason.contains("spec.flagSpec is missing"));
    }
}
