//! Feature flags on requests: the flags a service names are evaluated for each request to it,
//! before its routes match, and each sets `x-aviary-flag-<key>` to the variant it chose. So
//! an HTTPRoute header match can send the users a flag turns on to a new version, and the
//! application reads its variant without an SDK.
//!
//! A flag header a client sent is removed, never trusted. An evaluation error never fails the
//! request: the flag's default variant goes on (or no header, without one), counted with reason
//! ERROR.
//!
//! The evaluation context, as a flag's rules read it with `{"var": ...}`:
//! - `targetingKey`: where `aviary.dev/flag-key` says (a header or a cookie); absent without;
//! - `method`, `path` (without the query) and `host` (without the port);
//! - `headers.<name>`: each request header `aviary.dev/flag-headers` names, lowercase, when
//!   the request has it;
//! - `source.namespace` and `source.workload`: the pod that sent it (`unknown` when it is no
//!   known pod).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use aviary_flags::{Reason, Resolution};
use http::{header, request::Parts, HeaderValue};
use serde_json::{Map, Value};
use tracing::warn;

use crate::proxy::metrics::{FlagEvaluator, Metrics};
use crate::table::{
    flags::{NamespaceFlags, RequestFlags},
    Workload,
};

/// Evaluates `flags` (defined by `set`) for the request `parts` from `source`, and sets their
/// headers on it.
pub(super) fn set_flag_headers(
    flags: &RequestFlags,
    set: &NamespaceFlags,
    parts: &mut Parts,
    source: &Workload,
    metrics: &Metrics,
) {
    let context = context(flags, parts, source);
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    for flag in &flags.flags {
        parts.headers.remove(&flag.header);
        let mut resolution = set.evaluate(&flag.key, &context, timestamp);
        if let Some((code, message)) = &resolution.error {
            log_error(&flags.namespace, &flag.key, code.as_str(), message);
            resolution.variant = set.default_variant(&flag.key);
        }
        if let Some(variant) = resolution.variant {
            match HeaderValue::from_str(variant) {
                Ok(value) => {
                    parts.headers.insert(flag.header.clone(), value);
                }
                Err(_) => {
                    let message = format!("the variant {variant:?} cannot be a header value");
                    log_error(&flags.namespace, &flag.key, "GENERAL", &message);
                    resolution = Resolution {
                        value: None,
                        variant: None,
                        reason: Reason::Error,
                        error: Some((aviary_flags::ErrorCode::General, message)),
                    };
                }
            }
        }
        metrics.flag_evaluation(
            FlagEvaluator::proxy,
            &flags.namespace,
            &flag.key,
            &resolution,
        );
    }
}

/// The evaluation context of a request (see the module's documentation).
fn context(flags: &RequestFlags, parts: &Parts, source: &Workload) -> Map<String, Value> {
    let mut context = Map::new();
    let targeting_key = flags
        .targeting_key
        .as_ref()
        .and_then(|key| key.find(&parts.headers));
    if let Some(key) = targeting_key {
        context.insert("targetingKey".into(), key.into());
    }
    context.insert("method".into(), parts.method.as_str().into());
    context.insert("path".into(), parts.uri.path().into());
    let host = parts
        .uri
        .host()
        .or_else(|| parts.headers.get(header::HOST)?.to_str().ok())
        .map(without_port);
    if let Some(host) = host {
        context.insert("host".into(), host.into());
    }
    if !flags.context_headers.is_empty() {
        let headers: Map<String, Value> = flags
            .context_headers
            .iter()
            .filter_map(|name| {
                let value = parts.headers.get(name)?.to_str().ok()?;
                Some((name.as_str().to_owned(), value.into()))
            })
            .collect();
        context.insert("headers".into(), headers.into());
    }
    let source = Map::from_iter([
        ("namespace".to_owned(), (*source.namespace).into()),
        ("workload".to_owned(), (*source.workload).into()),
    ]);
    context.insert("source".into(), source.into());
    context
}

/// A Host header's host: `[::1]:80` is `::1`, `web:8080` is `web`.
fn without_port(host: &str) -> &str {
    if let Some(bracketed) = host.strip_prefix('[') {
        return bracketed.split(']').next().unwrap_or(bracketed);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// Logs a failed evaluation: one line a second at most, for a flag broken for every request
/// would otherwise fill the log; the metric counts each.
fn log_error(namespace: &str, key: &str, code: &str, message: &str) {
    static LAST_SECOND: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if LAST_SECOND.swap(now, Ordering::Relaxed) != now {
        warn!(%namespace, flag = key, error_type = code, "feature flag evaluation failed; the request carries its default variant: {message}");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use aviary_flags::FlagSet;
    use http::{HeaderName, Request};
    use serde_json::json;

    use super::*;
    use crate::metrics::sample;
    use crate::table::{flags::RequestFlag, KeySource};

    fn flags(keys: &[&str]) -> RequestFlags {
        RequestFlags {
            namespace: "shop".into(),
            flags: keys
                .iter()
                .map(|key| RequestFlag {
                    key: (*key).into(),
                    header: HeaderName::from_bytes(format!("x-aviary-flag-{key}").as_bytes())
                        .unwrap(),
                })
                .collect(),
            targeting_key: Some(KeySource::Header(HeaderName::from_static("x-user-id"))),
            context_headers: vec![HeaderName::from_static("x-country")],
        }
    }

    fn namespace_flags(flags: Value) -> NamespaceFlags {
        let set = FlagSet::parse(&json!({ "flags": flags })).unwrap();
        NamespaceFlags {
            sets: vec![("checkout".into(), Arc::new(set))],
        }
    }

    fn source() -> Workload {
        Workload {
            namespace: "shop".into(),
            workload: "frontend".into(),
            pod: "frontend-1".into(),
        }
    }

    fn request(headers: &[(&str, &str)]) -> Parts {
        let mut builder = Request::get("http://web.shop:8080/checkout?step=2");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn the_context_carries_the_user_the_request_and_the_source() {
        let parts = request(&[("x-user-id", "u-7"), ("x-country", "NL"), ("x-other", "1")]);
        assert_eq!(
            Value::Object(context(&flags(&[]), &parts, &source())),
            json!({
                "targetingKey": "u-7",
                "method": "GET",
                "path": "/checkout",
                "host": "web.shop",
                "headers": {"x-country": "NL"},
                "source": {"namespace": "shop", "workload": "frontend"},
            })
        );
        let bare = Request::post("/")
            .header("host", "[::1]:80")
            .body(())
            .unwrap();
        let context = context(&flags(&[]), &bare.into_parts().0, &source());
        assert_eq!(context["host"], "::1");
        assert!(!context.contains_key("targetingKey"));
        assert_eq!(context["headers"], json!({}));
    }

    #[test]
    fn each_flag_sets_its_variant_and_a_clients_own_header_is_replaced() {
        let set = namespace_flags(json!({
            "new-checkout": {
                "state": "ENABLED",
                "variants": {"on": true, "off": false},
                "defaultVariant": "off",
                "targeting": {"if": [{"==": [{"var": "headers.x-country"}, "NL"]}, "on", "off"]},
            },
            "dark-mode": {"state": "DISABLED", "variants": {"on": true}, "defaultVariant": "on"},
        }));
        let metrics = Metrics::new(false, None);
        let mut dutch = request(&[("x-country", "NL"), ("x-aviary-flag-dark-mode", "on")]);
        let flags = flags(&["new-checkout", "dark-mode"]);
        set_flag_headers(&flags, &set, &mut dutch, &source(), &metrics);
        assert_eq!(dutch.headers["x-aviary-flag-new-checkout"], "on");
        assert!(
            !dutch.headers.contains_key("x-aviary-flag-dark-mode"),
            "a disabled flag's header is removed, whoever sent it"
        );
        let mut other = request(&[("x-aviary-flag-new-checkout", "on")]);
        set_flag_headers(&flags, &set, &mut other, &source(), &metrics);
        assert_eq!(other.headers["x-aviary-flag-new-checkout"], "off");

        let text = metrics.render();
        let count = |variant: &str, reason: &str| {
            sample(
                &text,
                "aviary_flag_evaluations_total",
                &[
                    ("evaluator", "proxy"),
                    ("namespace", "shop"),
                    ("feature_flag_key", "new-checkout"),
                    ("feature_flag_result_variant", variant),
                    ("feature_flag_result_reason", reason),
                ],
            )
        };
        assert_eq!(count("on", "TARGETING_MATCH"), 1.0, "{text}");
        assert_eq!(count("off", "TARGETING_MATCH"), 1.0, "{text}");
        let disabled = [
            ("feature_flag_key", "dark-mode"),
            ("feature_flag_result_reason", "DISABLED"),
        ];
        assert_eq!(
            sample(&text, "aviary_flag_evaluations_total", &disabled),
            2.0
        );
    }

    #[test]
    fn an_error_never_fails_the_request_it_carries_the_default_and_is_counted() {
        let set = namespace_flags(json!({
            "broken-rule": {
                "state": "ENABLED",
                "variants": {"on": true, "off": false},
                "defaultVariant": "off",
                "targeting": {"var": "path"},
            },
            "bad-variant": {
                "state": "ENABLED",
                "variants": {"two\nlines": 1},
                "defaultVariant": "two\nlines",
            },
        }));
        let metrics = Metrics::new(false, None);
        let mut parts = request(&[("x-aviary-flag-missing", "on")]);
        let flags = flags(&["broken-rule", "missing", "bad-variant"]);
        set_flag_headers(&flags, &set, &mut parts, &source(), &metrics);
        assert_eq!(parts.headers["x-aviary-flag-broken-rule"], "off");
        assert!(!parts.headers.contains_key("x-aviary-flag-missing"));
        assert!(!parts.headers.contains_key("x-aviary-flag-bad-variant"));
        let text = metrics.render();
        let errors = |key: &str, variant: &str, error: &str| {
            let labels = [
                ("feature_flag_key", key),
                ("feature_flag_result_variant", variant),
                ("feature_flag_result_reason", "ERROR"),
                ("error_type", error),
            ];
            sample(&text, "aviary_flag_evaluations_total", &labels)
        };
        assert_eq!(errors("broken-rule", "off", "GENERAL"), 1.0, "{text}");
        assert_eq!(errors("missing", "", "FLAG_NOT_FOUND"), 1.0, "{text}");
        assert_eq!(errors("bad-variant", "", "GENERAL"), 1.0, "{text}");
    }
}
