//! Feature flags: any JSON a FeatureFlag's `spec.flagSpec` may hold parses into a flag set or
//! is refused, and every flag of it, refused or not, evaluates against any context without
//! panicking: the input is split at its first newline into the flag set and the context.
#![no_main]

use aviary_flags::{FlagSet, Reason};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (flags, context) = text.split_once('\n').unwrap_or((text, "{}"));
    let Ok(document) = serde_json::from_str::<Value>(flags) else {
        return;
    };
    let Ok(set) = FlagSet::parse(&document) else {
        return;
    };
    let context: Map<String, Value> = serde_json::from_str(context).unwrap_or_default();
    for key in set.keys() {
        let resolution = set.evaluate(key, &context, 1_700_000_000);
        // A variant comes with its value; an error with the reason ERROR.
        assert_eq!(resolution.variant.is_some(), resolution.value.is_some());
        assert_eq!(
            resolution.error.is_some(),
            resolution.reason == Reason::Error
        );
    }
});
