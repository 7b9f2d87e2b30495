//! OFREP end to end, as root: the agent binary, in local mode, serves a FeatureFlag of the
//! namespace `shop` to a pod of `shop`, at its node's address. Through the real OpenFeature
//! Python SDK and its OFREP provider (`openfeature-sdk` 0.10.0, `openfeature-provider-ofrep`
//! 0.3.0), every flag, for many contexts, answers what flagd's reference evaluator
//! (`openfeature-flagd-core` 2.0.0) answers for the same flags: value, variant, reason, error
//! and metadata. The bulk evaluation, which that provider does not make, is asked over plain
//! HTTP: every flag, as alone, with an ETag that turns the same request into a 304. A pod the
//! policy does not name gets 403.
//!
//! `cargo xtask test` installs the Python packages and names their interpreter in
//! `AVIARY_OPENFEATURE_PYTHON`; under `CI=true` the test never skips.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use aviary_tests::{ns_path, policy, wait_until, Node, Pod};
use serde_json::{json, Value};

/// The agent's OFREP port (its default, flagd's).
const OFREP_PORT: u16 = 8016;

/// Evaluates each flag for each context through the SDK's OFREP provider, and through flagd's
/// reference evaluator over the same flags; writes both answers of each.
const DRIVER: &str = r#"
import json, sys
from openfeature import api
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import OpenFeatureError
from openfeature.contrib.provider.ofrep import OFREPProvider
from openfeature.contrib.tools.flagd.core import FlagdCore

job = json.load(open(sys.argv[1]))
api.set_provider(OFREPProvider(job["endpoint"], timeout=10))
client = api.get_client()
core = FlagdCore()
core.set_flags(job["flags"])

def kind(value):
    for name, typ in (("boolean", bool), ("integer", int), ("float", float), ("string", str)):
        if isinstance(value, typ):
            return name
    return "object"

DEFAULTS = {"boolean": False, "integer": -1, "float": -1.0, "string": "?", "object": {}}
kinds = {key: kind(next(iter(flag["variants"].values()))) for key, flag in job["flags"]["flags"].items()}
kinds[job["missing"]] = "boolean"

def text(code):
    return "" if code is None else getattr(code, "value", str(code))

answers = []
for context in job["contexts"]:
    attributes = dict(context)
    targeting_key = attributes.pop("targetingKey", None)
    ctx = EvaluationContext(targeting_key=targeting_key, attributes=attributes)
    for key, k in kinds.items():
        d = getattr(client, f"get_{k}_details")(key, DEFAULTS[k], ctx)
        ofrep = {"variant": d.variant, "value": d.value if d.variant is not None else None,
                 "reason": text(d.reason), "error": text(d.error_code),
                 "metadata": dict(d.flag_metadata), "message": d.error_message}
        try:
            r = getattr(core, f"resolve_{k}_value")(key, DEFAULTS[k], ctx)
            flagd = {"variant": r.variant, "value": r.value if r.variant is not None else None,
                     "reason": text(r.reason), "error": "", "metadata": dict(r.flag_metadata)}
        except OpenFeatureError as e:
            flagd = {"variant": None, "value": None, "reason": "ERROR",
                     "error": text(e.error_code), "metadata": {}}
        answers.append({"flag": key, "context": context, "ofrep": ofrep, "flagd": flagd})
json.dump(answers, sys.stdout)
"#;

/// The FeatureFlag's `spec.flagSpec`: a rollout by targeting key, a rule on attributes, a rule
/// through `$evaluators`, a static flag, a disabled one, one without a default, an object
/// bucketed by another attribute, one that reads the time, and one whose rule names no variant.
fn flag_spec() -> Value {
    let on_off = json!({"on": true, "off": false});
    json!({
        "flags": {
            "new-checkout": {"state": "ENABLED", "variants": on_off, "defaultVariant": "off",
                "targeting": {"fractional": [["on", 25], ["off", 75]]},
                "metadata": {"owner": "checkout"}},
            "theme": {"state": "ENABLED",
                "variants": {"light": "light", "dark": "dark", "blue": "blue"},
                "defaultVariant": "light",
                "targeting": {"if": [
                    {"ends_with": [{"var": "email"}, "@example.com"]}, "dark",
                    {"in": [{"var": "country"}, ["FR", "DE"]]}, "blue",
                    null]}},
            "discount": {"state": "ENABLED", "variants": {"none": 0.0, "vip": 0.25},
                "defaultVariant": "none",
                "targeting": {"if": [{"$ref": "vips"}, "vip", "none"]}},
            "page-size": {"state": "ENABLED", "variants": {"small": 10, "large": 50},
                "defaultVariant": "small"},
            "legacy-api": {"state": "DISABLED", "variants": on_off, "defaultVariant": "on"},
            "beta-search": {"state": "ENABLED", "variants": on_off,
                "targeting": {"if": [{"==": [{"var": "plan"}, "gold"]}, "on", null]}},
            "banner": {"state": "ENABLED",
                "variants": {"red": {"color": "red", "size": 3}, "green": {"color": "green", "size": 5}},
                "defaultVariant": "red",
                "targeting": {"fractional": [{"var": "email"}, ["red", 50], ["green", 50]]}},
            "launched": {"state": "ENABLED", "variants": on_off, "defaultVariant": "off",
                "targeting": {"if": [{">": [{"var": "$flagd.timestamp"}, 1_700_000_000]}, "on", "off"]}},
            "stray": {"state": "ENABLED", "variants": on_off, "defaultVariant": "off",
                "targeting": {"if": [{"==": [{"var": "plan"}, "free"]}, "maybe", "off"]}},
        },
        "$evaluators": {"vips": {"in": [{"var": "plan"}, ["gold", "platinum"]]}},
        "metadata": {"team": "shop"},
    })
}

/// Contexts of many users: with and without a targeting key, of every kind the flags read.
fn contexts() -> Vec<Value> {
    let domains = ["example.com", "example.org", "mail.test"];
    let countries = ["FR", "DE", "US", "JP"];
    let plans = ["free", "gold", "platinum", "trial"];
    (0..300)
        .map(|i: usize| {
            let mut context = json!({
                "email": format!("user{i}@{}", domains[i % domains.len()]),
                "country": countries[(i / 3) % countries.len()],
                "plan": plans[(i / 2) % plans.len()],
            });
            if i % 10 != 9 {
                context["targetingKey"] = format!("user-{i}").into();
            }
            context
        })
        .collect()
}

/// One HTTP/1.1 exchange with `addr`, from `pod`'s network namespace (so from its address):
/// the status line, the headers (names lowercase) and the body.
fn exchange(pod: &Pod, addr: SocketAddr, request: &str) -> (String, Vec<(String, String)>, String) {
    let netns = ns_path(&pod.netns);
    let mut stream = std::thread::spawn(move || {
        let ns = std::fs::File::open(netns).unwrap();
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
    })
    .join()
    .unwrap()
    .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default().to_owned();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

/// A POST of `context` to the OFREP path `path` of `addr`, with `extra` header lines.
fn post(
    pod: &Pod,
    addr: SocketAddr,
    path: &str,
    context: &Value,
    extra: &str,
) -> (String, Vec<(String, String)>, String) {
    let body = json!({ "context": context }).to_string();
    let request = format!(
        "POST /ofrep/v1/evaluate/flags{path} HTTP/1.1\r\nhost: aviary\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n{extra}connection: close\r\n\r\n{body}",
        body.len()
    );
    exchange(pod, addr, &request)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, value)| value.as_str())
}

/// Runs the driver in `pod` over `contexts`: each answer, through OFREP and from flagd.
fn driver_answers(
    node: &Node,
    pod: &Pod,
    python: &str,
    endpoint: &str,
    contexts: &[Value],
) -> Vec<Value> {
    let job = json!({
        "endpoint": endpoint,
        "flags": flag_spec(),
        "contexts": contexts,
        "missing": "no-such-flag",
    });
    let job_path = std::env::temp_dir().join(format!("aviary-ofrep-{}.json", std::process::id()));
    std::fs::write(&job_path, job.to_string()).unwrap();
    let out = node.run_program(
        pod,
        Path::new(python),
        &["-c", DRIVER, &job_path.to_string_lossy()],
        Duration::from_secs(600),
    );
    let _ = std::fs::remove_file(&job_path);
    assert!(
        out.status.success(),
        "the driver failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn applications_get_flagds_answers_over_ofrep_from_their_nodes_agent() {
    let Ok(python) = std::env::var("AVIARY_OPENFEATURE_PYTHON") else {
        assert!(
            std::env::var("CI").is_err(),
            "AVIARY_OPENFEATURE_PYTHON is not set: run the tests with `cargo xtask test`, which installs the OpenFeature SDK, its OFREP provider and flagd's evaluator"
        );
        eprintln!("skipped: AVIARY_OPENFEATURE_PYTHON names no interpreter with the OpenFeature packages (cargo xtask test sets it)");
        return;
    };
    let Some(node) = Node::new() else { return };
    let app = node.add_pod("app");
    let stranger = node.add_pod("stranger");
    node.write_policy(&policy::documents(&[
        policy::namespace("shop", None),
        policy::pod(&app, "shop", None),
        policy::feature_flag("shop-flags", "shop", &flag_spec()),
    ]));
    let _agent = node.start_agent(&[]);
    let ofrep: SocketAddr = (node.ip(), OFREP_PORT).into();

    // The agent serves once it has the policy.
    let static_flag = wait_until(Duration::from_secs(20), || {
        let (status, _, body) = post(&app, ofrep, "/page-size", &json!({}), "");
        status.contains(" 200 ").then_some(body)
    })
    .expect("OFREP answers the pod");
    let static_flag: Value = serde_json::from_str(&static_flag).unwrap();
    assert_eq!(
        static_flag,
        json!({"key": "page-size", "value": 10, "variant": "small", "reason": "STATIC",
               "metadata": {"team": "shop"}})
    );

    let contexts = contexts();
    let answers = driver_answers(&node, &app, &python, &format!("http://{ofrep}"), &contexts);
    check_answers(&answers, contexts.len());
    check_flags_without_a_variant(&app, ofrep);
    check_bulk(&app, ofrep, &answers);

    // A pod the policy does not name: refused, and told nothing.
    let (status, _, body) = post(&stranger, ofrep, "/page-size", &json!({}), "");
    assert!(status.contains(" 403 "), "{status} {body}");
    assert!(!body.contains("small"), "{body}");
}

/// Every answer through OFREP is flagd's, but for flags that answer no variant: the provider
/// 0.3.0 reads a variant from every answer (`data["variant"]`), so the SDK reports the
/// KeyError as GENERAL with the caller's default, where flagd answers DISABLED or DEFAULT
/// with the caller's default. [`check_flags_without_a_variant`] checks what OFREP sent then.
fn check_answers(answers: &[Value], contexts: usize) {
    let flags = flag_spec()["flags"].as_object().unwrap().len() + 1;
    assert_eq!(answers.len(), contexts * flags);
    let mut without_a_variant = 0;
    let mismatches: Vec<String> = answers
        .iter()
        .filter(|answer| {
            let (ofrep, flagd) = (&answer["ofrep"], &answer["flagd"]);
            if flagd["variant"].is_null() && flagd["error"] == "" {
                without_a_variant += 1;
                let (value, variant) = (&ofrep["value"], &ofrep["variant"]);
                return !(value.is_null()
                    && variant.is_null()
                    && ofrep["error"] == "GENERAL"
                    && ofrep["message"] == "'variant'");
            }
            let fields = ["variant", "value", "reason", "error", "metadata"];
            fields.iter().any(|field| ofrep[field] != flagd[field])
        })
        .map(|answer| answer.to_string())
        .collect();
    assert!(
        mismatches.is_empty(),
        "{} of {} answers differ from flagd's, e.g.:\n{}",
        mismatches.len(),
        answers.len(),
        mismatches[..mismatches.len().min(5)].join("\n")
    );
    eprintln!(
        "{} answers through OFREP equal flagd's ({without_a_variant} without a variant)",
        answers.len()
    );
    // legacy-api for every context, beta-search for most.
    assert!(without_a_variant > contexts, "{without_a_variant}");
    // The rollout and the rules split the users, as flagd splits them.
    let on = answers
        .iter()
        .filter(|a| a["flag"] == "new-checkout" && a["ofrep"]["variant"] == "on")
        .count();
    assert!(
        (30..=120).contains(&on),
        "{on} of {contexts} users on new-checkout"
    );
    for (flag, variant) in [("theme", "blue"), ("discount", "vip"), ("banner", "green")] {
        assert!(
            answers
                .iter()
                .any(|a| a["flag"] == flag && a["ofrep"]["variant"] == variant),
            "no {flag} {variant}"
        );
    }
}

/// Flags that answer no variant: 200 with their reason, and no value, as flagd's OFREP does.
fn check_flags_without_a_variant(app: &Pod, ofrep: SocketAddr) {
    for (flag, context, reason) in [
        ("legacy-api", json!({"targetingKey": "user-1"}), "DISABLED"),
        ("beta-search", json!({"plan": "free"}), "DEFAULT"),
    ] {
        let (status, _, body) = post(app, ofrep, &format!("/{flag}"), &context, "");
        assert!(status.contains(" 200 "), "{status} {body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            answer,
            json!({"key": flag, "reason": reason, "metadata": {"team": "shop"}})
        );
    }
}

/// Bulk: every flag, each as flagd answers it alone for the same context, with an ETag; the
/// same request with it in If-None-Match is a 304 without a body.
fn check_bulk(app: &Pod, ofrep: SocketAddr, answers: &[Value]) {
    let context = &answers[0]["context"];
    let (status, headers, body) = post(app, ofrep, "", context, "");
    assert!(status.contains(" 200 "), "{status} {body}");
    let bulk: Value = serde_json::from_str(&body).unwrap();
    let flags = bulk["flags"].as_array().unwrap();
    assert_eq!(flags.len(), flag_spec()["flags"].as_object().unwrap().len());
    for flag in flags {
        let key = flag["key"].as_str().unwrap();
        let flagd = &answers
            .iter()
            .find(|a| a["flag"] == key && &a["context"] == context)
            .unwrap()["flagd"];
        match flag.get("errorCode") {
            Some(code) => assert_eq!(code, &flagd["error"], "{flag}"),
            None => {
                assert_eq!(flag["reason"], flagd["reason"], "{flag}");
                assert_eq!(
                    flag.get("variant").unwrap_or(&Value::Null),
                    &flagd["variant"],
                    "{flag}"
                );
                assert_eq!(
                    flag.get("value").unwrap_or(&Value::Null),
                    &flagd["value"],
                    "{flag}"
                );
            }
        }
    }
    let etag = header(&headers, "etag").expect("an ETag").to_owned();
    let (status, headers, body) = post(
        app,
        ofrep,
        "",
        context,
        &format!("if-none-match: {etag}\r\n"),
    );
    assert!(status.contains(" 304 "), "{status} {body}");
    assert_eq!(body, "");
    assert_eq!(header(&headers, "etag"), Some(etag.as_str()));
    // Another context answers otherwise: the tag no longer holds.
    let other = &answers.last().unwrap()["context"];
    let (status, headers, _) = post(app, ofrep, "", other, &format!("if-none-match: {etag}\r\n"));
    assert!(status.contains(" 200 "), "{status}");
    assert_ne!(header(&headers, "etag"), Some(etag.as_str()));
}
