//! The feature flags in force in each namespace: its OpenFeature `FeatureFlag` objects, in
//! name order. A flag key that two of them define is answered by the first, as a flagd
//! serving several sources answers it. And the flags a service's requests carry.

use std::sync::Arc;

use aviary_flags::{Context, FlagSet, Resolution};
use http::HeaderName;
use serde_json::{Map, Value};

use super::KeySource;

/// The feature flags evaluated for each request to a service, before its routes match
/// (`aviary.dev/flags`): each sets a request header to its variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFlags {
    /// The namespace whose FeatureFlag objects define them.
    pub namespace: Arc<str>,
    pub flags: Vec<RequestFlag>,
    /// Where a request carries its targeting key (`aviary.dev/flag-key`).
    pub targeting_key: Option<KeySource>,
    /// The request headers the evaluation context carries (`aviary.dev/flag-headers`).
    pub context_headers: Vec<HeaderName>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFlag {
    pub key: Arc<str>,
    /// `x-aviary-flag-<key>`: the variant the flag chose, and nothing a client sent.
    pub header: HeaderName,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct NamespaceFlags {
    /// Each FeatureFlag object's name and flags, in name order.
    pub sets: Vec<(String, Arc<FlagSet>)>,
}

impl NamespaceFlags {
    /// The flag set that answers `key`.
    fn answering(&self, key: &str) -> Option<&FlagSet> {
        self.sets
            .iter()
            .map(|(_, set)| &**set)
            .find(|set| set.contains(key))
    }

    /// Evaluates the flag `key`; FLAG_NOT_FOUND when no object of the namespace defines it.
    pub fn evaluate(&self, key: &str, context: &dyn Context, timestamp: i64) -> Resolution<'_> {
        static NONE: std::sync::LazyLock<FlagSet> = std::sync::LazyLock::new(FlagSet::default);
        self.answering(key)
            .unwrap_or(&NONE)
            .evaluate(key, context, timestamp)
    }

    /// The default variant of the flag `key`: what a request carries when its rule fails.
    pub fn default_variant(&self, key: &str) -> Option<&str> {
        self.answering(key)?.default_variant(key)
    }

    /// The metadata an evaluation of `key` answers with.
    pub fn metadata(&self, key: &str) -> Map<String, Value> {
        self.answering(key)
            .map(|set| set.metadata(key))
            .unwrap_or_default()
    }

    /// Every flag key, each once, in order.
    pub fn keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = self.sets.iter().flat_map(|(_, set)| set.keys()).collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn set(flags: Value) -> Arc<FlagSet> {
        Arc::new(FlagSet::parse(&json!({ "flags": flags })).unwrap())
    }

    #[test]
    fn the_first_object_by_name_answers_a_key_two_define() {
        let on = |variant: &str| json!({"state": "ENABLED", "variants": {"a": 1, "b": 2}, "defaultVariant": variant});
        let flags = NamespaceFlags {
            sets: vec![
                ("checkout".into(), set(json!({"new-checkout": on("a")}))),
                (
                    "zz-overrides".into(),
                    set(json!({"new-checkout": on("b"), "dark": on("b")})),
                ),
            ],
        };
        let context = Map::new();
        assert_eq!(
            flags.evaluate("new-checkout", &context, 0).variant,
            Some("a")
        );
        assert_eq!(flags.evaluate("dark", &context, 0).variant, Some("b"));
        let missing = flags.evaluate("nope", &context, 0);
        assert_eq!(
            missing.error.map(|(code, _)| code),
            Some(aviary_flags::ErrorCode::FlagNotFound)
        );
        assert_eq!(flags.keys(), ["dark", "new-checkout"]);
    }
}
