//! flagd's reference evaluator as a differential oracle: the same flags and contexts through
//! this crate and through `openfeature-flagd-core` 2.0.0 (the Python core that implements the
//! current `fractional`), and every answer (variant, value, reason, error code) equal. The
//! flags are flagd-testbed's and generated ones that bucket by every kind of value (strings,
//! whole and fractional numbers, objects, the default pair), with random weights, and compare
//! versions and strings; the contexts are random.
//!
//! `cargo xtask test` installs the core in a Python environment of its own and names its
//! interpreter in `AVIARY_OPENFEATURE_PYTHON`; under `CI=true` the test never skips.

use std::{io::Write as _, process::Stdio};

use aviary_flags::FlagSet;
use serde_json::{json, Map, Value};

/// Reads `{"flags": document, "requests": [{"flag", "context"}]}` on stdin and writes one
/// answer per request, untyped (as OFREP answers).
const DRIVER: &str = r#"
import json, sys
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import OpenFeatureError
from openfeature.contrib.tools.flagd.core import FlagdCore
job = json.load(sys.stdin)
core = FlagdCore()
core.set_flags(job["flags"])
answers = []
for request in job["requests"]:
    context = dict(request["context"])
    key = context.pop("targetingKey", None)
    try:
        r = core._resolve(request["flag"], None, EvaluationContext(targeting_key=key, attributes=context), None)
        reason = r.reason.value if hasattr(r.reason, "value") else str(r.reason)
        answers.append({"variant": r.variant, "value": r.value if r.variant is not None else None, "reason": reason, "error": ""})
    except OpenFeatureError as e:
        answers.append({"variant": None, "value": None, "reason": "ERROR", "error": e.error_code.value})
json.dump(answers, sys.stdout)
"#;

/// A small deterministic generator (xorshift), so that a failure repeats.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn word(&mut self) -> String {
        const LETTERS: &[char] = &['a', 'b', 'z', '0', '9', '-', '_', '.', 'é', '漢', '🦜', ' '];
        (0..self.below(12))
            .map(|_| LETTERS[self.below(LETTERS.len() as u64) as usize])
            .collect()
    }

    fn number(&mut self) -> Value {
        match self.below(6) {
            0 => json!(self.below(100) as i64 - 50),
            1 => json!(self.next() >> self.below(64)),
            2 => json!(self.below(1000) as f64),
            3 => json!((self.below(100_000) as f64) / 7.0),
            4 => json!(-(self.below(1 << 40) as f64) * 1.5),
            _ => json!(self.below(70_000)),
        }
    }

    fn value(&mut self, depth: u32) -> Value {
        match self.below(if depth > 1 { 4 } else { 6 }) {
            0 => json!(self.word()),
            1 => self.number(),
            2 => json!(self.below(2) == 1),
            3 => Value::Null,
            4 => Value::Array((0..self.below(3)).map(|_| self.value(depth + 1)).collect()),
            _ => Value::Object(
                (0..self.below(3))
                    .map(|_| (self.word(), self.value(depth + 1)))
                    .collect(),
            ),
        }
    }

    fn version(&mut self) -> Value {
        let (a, b, c) = (self.below(3), self.below(3), self.below(3));
        match self.below(6) {
            0 => json!(format!("{a}.{b}.{c}")),
            1 => json!(format!("v{a}.{b}")),
            2 => json!(format!("{a}.{b}.{c}-alpha.{b}")),
            3 => json!(format!("{a}.{b}.{c}+build{c}")),
            4 => json!(a),
            _ => json!(self.word()),
        }
    }
}

/// Flags that bucket by each kind of value and compare versions and strings.
fn generated_flags(random: &mut Random) -> Value {
    let mut flags = Map::new();
    let bucketing = [
        None,
        Some(json!({"var": "user"})),
        Some(json!({"var": "n"})),
        Some(json!({"var": "obj"})),
        Some(json!({"cat": [{"var": "$flagd.flagKey"}, {"var": "email"}]})),
    ];
    for i in 0..40 {
        let variants = 1 + random.below(5);
        let names: Vec<String> = (0..variants).map(|v| format!("v{v}")).collect();
        let buckets: Vec<Value> = names
            .iter()
            .map(|name| match random.below(4) {
                0 => json!([name]),
                _ => json!([name, random.below(101) as i64 - 5]),
            })
            .collect();
        let mut args: Vec<Value> = bucketing[i % bucketing.len()].iter().cloned().collect();
        args.extend(buckets);
        let variants: Map<String, Value> = names.iter().map(|n| (n.clone(), json!(n))).collect();
        flags.insert(
            format!("fractional-{i}"),
            json!({"state": "ENABLED", "variants": variants, "defaultVariant": "v0",
                   "targeting": {"fractional": args}}),
        );
    }
    let on_off = json!({"on": true, "off": false});
    for (key, rule) in [
        (
            "version",
            json!({"if": [{"sem_ver": [{"var": "version"}, ">=", "1.1.0"]}, "on", "off"]}),
        ),
        (
            "caret",
            json!({"if": [{"sem_ver": [{"var": "version"}, "^", "1.0.0"]}, "on", null]}),
        ),
        (
            "tilde",
            json!({"if": [{"sem_ver": [{"var": "version"}, "~", "1.1"]}, "on", "off"]}),
        ),
        (
            "domain",
            json!({"if": [{"ends_with": [{"var": "email"}, "z"]}, "on", "off"]}),
        ),
        (
            "prefix",
            json!({"if": [{"starts_with": [{"var": "user"}, "a"]}, "on", "off"]}),
        ),
        (
            "number",
            json!({"if": [{">": [{"var": "n"}, 10]}, "on", {"<": [{"var": "n"}, -10]}, "off", null]}),
        ),
        (
            "listed",
            json!({"if": [{"in": [{"var": "user"}, ["a", "b", "z9"]]}, "on", "off"]}),
        ),
        (
            "sticky",
            json!({"if": [{"==": [{"fractional": [["x", 50], ["y", 50]]}, "x"]}, "on", "off"]}),
        ),
    ] {
        flags.insert(
            key.into(),
            json!({"state": "ENABLED", "variants": on_off, "defaultVariant": "off", "targeting": rule}),
        );
    }
    json!({"flags": flags})
}

fn context(random: &mut Random) -> Map<String, Value> {
    let mut context = Map::new();
    if random.below(8) != 0 {
        context.insert("targetingKey".into(), json!(random.word()));
    }
    let fields = [
        ("user", random.value(0)),
        ("email", json!(random.word())),
        ("n", random.number()),
        ("obj", random.value(0)),
        ("version", random.version()),
    ];
    for (key, value) in fields {
        if random.below(6) != 0 {
            context.insert(key.into(), value);
        }
    }
    context
}

fn reference(python: &str, document: &Value, requests: &[Value]) -> Vec<Value> {
    let mut child = std::process::Command::new(python)
        .args(["-c", DRIVER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {python}: {e}"));
    let job = json!({"flags": document, "requests": requests});
    child
        .stdin
        .take()
        .unwrap()
        .write_all(job.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the reference evaluator failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ours(set: &FlagSet, request: &Value) -> Value {
    let context = request["context"].as_object().unwrap();
    let r = set.evaluate(request["flag"].as_str().unwrap(), context, 1_700_000_000);
    json!({
        "variant": r.variant,
        "value": if r.variant.is_some() { r.value.cloned() } else { None },
        "reason": r.reason.as_str(),
        "error": r.error.as_ref().map_or("", |(code, _)| code.as_str()),
    })
}

#[test]
fn every_answer_equals_the_reference_evaluators() {
    let Ok(python) = std::env::var("AVIARY_OPENFEATURE_PYTHON") else {
        assert!(
            std::env::var("CI").is_err(),
            "AVIARY_OPENFEATURE_PYTHON is not set: run the tests with `cargo xtask test`, which installs flagd's reference evaluator"
        );
        eprintln!("skipped: AVIARY_OPENFEATURE_PYTHON names no interpreter with openfeature-flagd-core (cargo xtask test sets it)");
        return;
    };
    let mut random = Random(0x5eed_aa1a_f1a9_5e75);
    let documents = [
        serde_json::from_str::<Value>(include_str!("testbed/provider-flags.json")).unwrap(),
        generated_flags(&mut random),
    ];
    let mut compared = 0;
    for document in &documents {
        let set = FlagSet::parse(document).unwrap();
        let keys: Vec<&str> = set.keys().filter(|k| *k != "timestamp-flag").collect();
        let requests: Vec<Value> = (0..400)
            .flat_map(|_| {
                let context = context(&mut random);
                keys.iter()
                    .map(move |key| json!({"flag": key, "context": context.clone()}))
                    .collect::<Vec<_>>()
            })
            .collect();
        let expected = reference(&python, document, &requests);
        let mismatches: Vec<String> = requests
            .iter()
            .zip(&expected)
            .filter_map(|(request, expected)| {
                let got = ours(&set, request);
                (got != *expected)
                    .then(|| format!("{request}\n  ours:      {got}\n  reference: {expected}"))
            })
            .collect();
        compared += requests.len();
        assert!(
            mismatches.is_empty(),
            "{} of {} answers differ; the first:\n{}",
            mismatches.len(),
            requests.len(),
            mismatches
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    eprintln!("{compared} answers equal the reference evaluator's");
}
