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
    borrow::Cow,
    cell::RefCell,
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use aviary_flags::{logic::descend, Context, ErrorCode, Reason, Resolution};
use http::{header, request::Parts, HeaderMap, HeaderValue};
use prometheus_client::metrics::counter::Counter;
use serde_json::{Map, Value};
use smallvec::SmallVec;
use tracing::warn;

use crate::proxy::metrics::{FlagEvaluator, Metrics};
use crate::table::{
    flags::{NamespaceFlags, RequestFlag, RequestFlags},
    TableId, Workload,
};

/// Evaluates `flags` (defined by `set`, in the table `table`) for the request `parts` from
/// `source`, and sets their headers on it.
pub(super) fn set_flag_headers(
    flags: &RequestFlags,
    set: &NamespaceFlags,
    parts: &mut Parts,
    source: &Workload,
    table: TableId,
    metrics: &Metrics,
) {
    for flag in &flags.flags {
        parts.headers.remove(&flag.header);
    }
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let context = RequestContext {
        flags,
        parts,
        source,
    };
    let values: SmallVec<[Option<HeaderValue>; 4]> = flags
        .flags
        .iter()
        .map(|flag| {
            let mut resolution = set.evaluate(&flag.key, &context, timestamp);
            if let Some((code, message)) = &resolution.error {
                log_error(&flags.namespace, &flag.key, code.as_str(), message);
                resolution.variant = set.default_variant(&flag.key);
            }
            counted(flags, flag, resolution, table, metrics)
        })
        .collect();
    for (flag, value) in flags.flags.iter().zip(values) {
        if let Some(value) = value {
            parts.headers.insert(flag.header.clone(), value);
        }
    }
}

/// What an evaluation answered, as the request's header: counted, and made, once per worker
/// for each answer of each flag of the table in force.
fn counted(
    flags: &RequestFlags,
    flag: &RequestFlag,
    resolution: Resolution<'_>,
    table: TableId,
    metrics: &Metrics,
) -> Option<HeaderValue> {
    let key = AnswerKey {
        flag: flag as *const RequestFlag as usize,
        variant: resolution.variant.map_or(0, |v| v.as_ptr() as usize),
        reason: resolution.reason,
        error: resolution.error.as_ref().map(|(code, _)| *code),
    };
    let removals = metrics.removals();
    ANSWERS.with_borrow_mut(|cache| {
        if cache.table != Some(table)
            || cache.removals != removals
            || cache.answers.len() >= MAX_ANSWERS
        {
            cache.answers.clear();
            cache.table = Some(table);
            cache.removals = removals;
        }
        let answer = cache
            .answers
            .entry(key)
            .or_insert_with(|| answer(flags, flag, resolution, metrics));
        answer.counter.inc();
        answer.header.clone()
    })
}

/// An answer's header and counter, the first time a worker sees it.
fn answer(
    flags: &RequestFlags,
    flag: &RequestFlag,
    mut resolution: Resolution<'_>,
    metrics: &Metrics,
) -> Answer {
    let mut header = None;
    if let Some(variant) = resolution.variant {
        match HeaderValue::from_str(variant) {
            Ok(value) => header = Some(value),
            Err(_) => {
                let message = format!("the variant {variant:?} cannot be a header value");
                log_error(&flags.namespace, &flag.key, "GENERAL", &message);
                resolution = Resolution {
                    value: None,
                    variant: None,
                    reason: Reason::Error,
                    error: Some((ErrorCode::General, message)),
                };
            }
        }
    }
    let counter = metrics.flag_evaluations(
        FlagEvaluator::proxy,
        &flags.namespace,
        &flag.key,
        &resolution,
    );
    Answer { header, counter }
}

/// Answers a worker keeps before it starts again: far more than a table's flags have.
const MAX_ANSWERS: usize = 4_096;

/// An evaluation's answer, by identity: the flag of the table and the variant of its flag set
/// (both owned by the table in force, as in `series.rs`), and the reason and error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct AnswerKey {
    flag: usize,
    variant: usize,
    reason: Reason,
    error: Option<ErrorCode>,
}

struct Answer {
    header: Option<HeaderValue>,
    counter: Arc<Counter>,
}

#[derive(Default)]
struct Answers {
    table: Option<TableId>,
    /// [`Metrics::removals`] when the answers were made.
    removals: u64,
    answers: HashMap<AnswerKey, Answer>,
}

thread_local! {
    static ANSWERS: RefCell<Answers> = RefCell::default();
}

/// A request's evaluation context (see the module's documentation), read where the request
/// keeps it: a rule's `var` costs a lookup of what it reads, and nothing else is built.
struct RequestContext<'a> {
    flags: &'a RequestFlags,
    parts: &'a Parts,
    source: &'a Workload,
}

impl RequestContext<'_> {
    fn headers(&self) -> &HeaderMap {
        &self.parts.headers
    }

    fn targeting_key(&self) -> Option<&str> {
        self.flags.targeting_key.as_ref()?.find(self.headers())
    }

    fn host(&self) -> Option<&str> {
        let uri = &self.parts.uri;
        let host = uri
            .host()
            .or_else(|| self.headers().get(header::HOST)?.to_str().ok())?;
        Some(without_port(host))
    }

    /// A named context header's value, if the request has it.
    fn header(&self, name: &str) -> Option<&str> {
        let named = self
            .flags
            .context_headers
            .iter()
            .find(|h| h.as_str() == name)?;
        self.headers().get(named)?.to_str().ok()
    }

    fn context_headers(&self) -> Map<String, Value> {
        self.flags
            .context_headers
            .iter()
            .filter_map(|name| Some((name.as_str().to_owned(), self.header(name.as_str())?.into())))
            .collect()
    }

    fn source(&self) -> Map<String, Value> {
        Map::from_iter([
            ("namespace".to_owned(), (*self.source.namespace).into()),
            ("workload".to_owned(), (*self.source.workload).into()),
        ])
    }

    /// The field `name` and the path below it.
    fn field(&self, name: &str, below: Option<&str>) -> Option<Value> {
        let text = |s: &str| Some(Value::from(s));
        match (name, below) {
            ("targetingKey", _) => text(self.targeting_key()?),
            ("method", _) => text(self.parts.method.as_str()),
            ("path", _) => text(self.parts.uri.path()),
            ("host", _) => text(self.host()?),
            ("headers", None) => Some(self.context_headers().into()),
            // A header's value is text: nothing lies below it (lookup reads the header alone).
            ("headers", Some(_)) => None,
            ("source", _) => Some(self.source().into()),
            _ => None,
        }
    }
}

impl Context for RequestContext<'_> {
    fn targeting_key(&self) -> Option<Cow<'_, str>> {
        RequestContext::targeting_key(self).map(Cow::Borrowed)
    }

    fn lookup(&self, path: &str) -> Option<Cow<'_, Value>> {
        let (name, below) = match path.split_once('.') {
            Some((name, below)) => (name, Some(below)),
            None => (path, None),
        };
        // A named header's text, the common read, made alone.
        if let ("headers", Some(header)) = (name, below) {
            if !header.contains('.') {
                return Some(Cow::Owned(self.header(header)?.into()));
            }
        }
        let top = self.field(name, below)?;
        match below {
            None => Some(Cow::Owned(top)),
            Some(below) => descend(&top, below.split('.')).cloned().map(Cow::Owned),
        }
    }

    fn fields(&self) -> Map<String, Value> {
        let mut fields = Map::new();
        for name in [
            "targetingKey",
            "method",
            "path",
            "host",
            "headers",
            "source",
        ] {
            if let Some(value) = self.field(name, None) {
                fields.insert(name.to_owned(), value);
            }
        }
        fields
    }
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
        let (flags, source) = (flags(&[]), source());
        let context = RequestContext {
            flags: &flags,
            parts: &parts,
            source: &source,
        };
        assert_eq!(
            Value::Object(context.fields()),
            json!({
                "targetingKey": "u-7",
                "method": "GET",
                "path": "/checkout",
                "host": "web.shop",
                "headers": {"x-country": "NL"},
                "source": {"namespace": "shop", "workload": "frontend"},
            })
        );
        // A rule's var reads one field, and only what the request names.
        let read = |path: &str| context.lookup(path).map(Cow::into_owned);
        assert_eq!(read("headers.x-country"), Some(json!("NL")));
        assert_eq!(read("headers.x-other"), None, "not a context header");
        assert_eq!(read("source.workload"), Some(json!("frontend")));
        assert_eq!(read("targetingKey"), Some(json!("u-7")));
        assert_eq!(read("path.0"), None);
        assert_eq!(read("nothing"), None);

        let bare = Request::post("/")
            .header("host", "[::1]:80")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let context = RequestContext {
            flags: &flags,
            parts: &bare,
            source: &source,
        }
        .fields();
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
        set_flag_headers(
            &flags,
            &set,
            &mut dutch,
            &source(),
            TableId::default(),
            &metrics,
        );
        assert_eq!(dutch.headers["x-aviary-flag-new-checkout"], "on");
        assert!(
            !dutch.headers.contains_key("x-aviary-flag-dark-mode"),
            "a disabled flag's header is removed, whoever sent it"
        );
        let mut other = request(&[("x-aviary-flag-new-checkout", "on")]);
        set_flag_headers(
            &flags,
            &set,
            &mut other,
            &source(),
            TableId::default(),
            &metrics,
        );
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
        set_flag_headers(
            &flags,
            &set,
            &mut parts,
            &source(),
            TableId::default(),
            &metrics,
        );
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
