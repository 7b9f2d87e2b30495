//! flagd's own conformance cases, as the project's tests: every evaluator case of
//! flagd-testbed 3.9.0 (`evaluator/gherkin/*.feature` with `evaluator/flags/testkit-flags.json`)
//! and every targeting case of its provider suite (`gherkin/targeting.feature` with the
//! `flags/*.json` it loads), with the same flags, contexts and expected answers. Left out: the
//! `@fractional-v1` and `@fractional-v2` rows, which bucket as flagd's older releases did (this
//! crate follows the current specification, the `@fractional-v3` rows), and the one
//! `@deprecated` table. `testbed/cases.json` holds the cases as the feature files state them;
//! `testbed/*-flags.json` are the testbed's flag files (Apache-2.0, as this project).

use aviary_flags::{FlagSet, Reason};
use serde_json::{Map, Value};

/// What an OpenFeature SDK's typed accessor answers: the value when the flag's is of the type
/// asked for, else the caller's default with TYPE_MISMATCH.
fn typed(kind: &str, value: &Value) -> bool {
    match kind {
        "Boolean" => value.is_boolean(),
        "String" => value.is_string(),
        "Integer" => value.is_i64() || value.is_u64(),
        "Float" => value.is_number(),
        "Object" => value.is_object() || value.is_array(),
        other => panic!("unknown type {other}"),
    }
}

fn same(kind: &str, got: &Value, expected: &Value) -> bool {
    match kind {
        "Float" => got.as_f64() == expected.as_f64(),
        _ => got == expected,
    }
}

#[test]
fn every_testbed_case_answers_as_flagd() {
    let sets = [
        ("evaluator", include_str!("testbed/evaluator-flags.json")),
        ("provider", include_str!("testbed/provider-flags.json")),
    ]
    .map(|(name, text)| {
        let document: Value = serde_json::from_str(text).unwrap();
        (name, FlagSet::parse(&document).unwrap())
    });
    let cases: Vec<Value> = serde_json::from_str(include_str!("testbed/cases.json")).unwrap();
    assert!(cases.len() > 300, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let set = &sets
            .iter()
            .find(|(name, _)| case["flags"] == *name)
            .unwrap()
            .1;
        let kind = case["type"].as_str().unwrap();
        let key = case["flag"].as_str().unwrap();
        let context: Map<String, Value> = case["context"].as_object().cloned().unwrap();
        // The timestamp the testbed's `timestamp-flag` compares with: now.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let resolution = set.evaluate(key, &context, now);
        let (mut value, mut reason, mut error) = (
            resolution
                .value
                .cloned()
                .unwrap_or_else(|| case["default"].clone()),
            resolution.reason.as_str().to_owned(),
            resolution
                .error
                .as_ref()
                .map_or("", |(code, _)| code.as_str())
                .to_owned(),
        );
        if resolution.value.is_some_and(|v| !typed(kind, v)) {
            (value, reason, error) = (
                case["default"].clone(),
                Reason::Error.as_str().into(),
                "TYPE_MISMATCH".into(),
            );
        }
        let mut wrong = Vec::new();
        if let Some(expected) = case.get("value") {
            if !same(kind, &value, expected) {
                wrong.push(format!("value {value} (expected {expected})"));
            }
        }
        if let Some(expected) = case.get("reason") {
            if reason != *expected {
                wrong.push(format!("reason {reason} (expected {expected})"));
            }
        }
        if let Some(expected) = case.get("error") {
            if error != *expected {
                wrong.push(format!("error {error:?} (expected {expected})"));
            }
        }
        if let Some(Value::Object(expected)) = case.get("metadata") {
            let got = set.metadata(key);
            let matches = if expected.is_empty() {
                got.is_empty()
            } else {
                expected
                    .iter()
                    .all(|(k, v)| got.get(k).is_some_and(|g| same("Float", g, v) || g == v))
            };
            if !matches {
                wrong.push(format!("metadata {got:?} (expected {expected:?})"));
            }
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "{}: {}",
                case["source"].as_str().unwrap(),
                wrong.join(", ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases fail:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
