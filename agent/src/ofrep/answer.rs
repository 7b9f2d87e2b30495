//! OFREP's requests and answers, as flagd reads and writes them
//! (`flagd/pkg/service/flag-evaluation/ofrep`, `core/pkg/service/ofrep/models.go`):
//! - a flag that is disabled, or whose rule chose no variant and that names no default,
//!   answers 200 with its reason (`DISABLED`, `DEFAULT`) and no value or variant: the caller
//!   uses its own default;
//! - a flag no FeatureFlag defines answers 404 `FLAG_NOT_FOUND`; an unusable flag 400
//!   `PARSE_ERROR`; a rule that chose no variant of the flag 400 `GENERAL`;
//! - a body that is no JSON object, or a context that is no object, answers 400
//!   `INVALID_CONTEXT`; an empty body, or an absent or null context, is an empty context, as
//!   flagd takes them. `TARGETING_KEY_MISSING` is never answered: flagd's rules evaluate
//!   without a targeting key (`fractional` then buckets by an empty one), and so do these.
//!
//! Each flag's answer carries its metadata (its FeatureFlag's, overridden by the flag's own).

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Map, Value};

use aviary_flags::Resolution;

/// Where OFREP evaluates flags: every flag here, one flag below it.
const FLAGS_PATH: &str = "/ofrep/v1/evaluate/flags";

/// What a request's path asks for.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Route {
    /// The flag of this key.
    One(String),
    All,
}

impl Route {
    /// None for a path OFREP does not serve.
    pub(super) fn of(path: &str) -> Option<Route> {
        match path.strip_prefix(FLAGS_PATH)? {
            // flagd takes the trailing slash too.
            "" | "/" => Some(Route::All),
            rest => Some(Route::One(percent_decoded(rest.strip_prefix('/')?))),
        }
    }
}

/// A path segment with its `%XX` escapes decoded, as flagd's router reads a key; a `%` that
/// starts no escape stays as written.
fn percent_decoded(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while let Some(&byte) = bytes.get(at) {
        let escaped = match bytes.get(at + 1..at + 3) {
            Some(hex) if byte == b'%' && hex.iter().all(u8::is_ascii_hexdigit) => {
                std::str::from_utf8(hex)
                    .ok()
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            }
            _ => None,
        };
        match escaped {
            Some(escaped) => {
                decoded.push(escaped);
                at += 3;
            }
            None => {
                decoded.push(byte);
                at += 1;
            }
        }
    }
    // A key that is not UTF-8 is no flag's: it answers FLAG_NOT_FOUND.
    String::from_utf8_lossy(&decoded).into_owned()
}

/// The evaluation context of a request body, `{"context": {...}}`; else why it is invalid.
pub(super) fn context_of(body: &[u8]) -> Result<Map<String, Value>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    let request: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let Value::Object(mut request) = request else {
        return Err(r#"the body is not a JSON object ({"context": {...}})"#.into());
    };
    match request.remove("context") {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(context)) => Ok(context),
        Some(_) => Err("the context is not a JSON object".into()),
    }
}

/// One flag's answer, alone or in the bulk list.
pub(super) fn evaluation(
    key: &str,
    resolution: &Resolution<'_>,
    metadata: Map<String, Value>,
) -> Value {
    let mut answer = Map::new();
    answer.insert("key".into(), key.into());
    match &resolution.error {
        Some((code, details)) => {
            answer.insert("errorCode".into(), code.as_str().into());
            answer.insert("errorDetails".into(), details.as_str().into());
        }
        None => {
            answer.insert("reason".into(), resolution.reason.as_str().into());
            if let (Some(variant), Some(value)) = (resolution.variant, resolution.value) {
                answer.insert("variant".into(), variant.into());
                answer.insert("value".into(), value.clone());
            }
        }
    }
    answer.insert("metadata".into(), Value::Object(metadata));
    Value::Object(answer)
}

/// An answer that is no flag's (a refused request): `{"errorDetails": ...}`, as flagd's.
pub(super) fn error(status: StatusCode, details: &str) -> Response<Full<Bytes>> {
    json_response(status, json!({ "errorDetails": details }).to_string())
}

pub(super) fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let json = HeaderValue::from_static("application/json");
    response.headers_mut().insert(header::CONTENT_TYPE, json);
    response
}

/// The ETag of a bulk answer: a hash of its body (128 bits of its SHA-256), the same on every
/// agent for the same flags and context.
pub(super) fn etag(body: &[u8]) -> HeaderValue {
    let digest = ring::digest::digest(&ring::digest::SHA256, body);
    let hex: String = digest.as_ref()[..16]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    // Hex between quotes: always a valid header value.
    HeaderValue::from_str(&format!("\"{hex}\"")).unwrap_or(HeaderValue::from_static("\"\""))
}

/// Whether an `If-None-Match` header names `etag` (or is `*`); weak tags compare as strong
/// ones, as RFC 9110 has `If-None-Match` compare them.
pub(super) fn matches_etag(if_none_match: &HeaderValue, etag: &HeaderValue) -> bool {
    let (Ok(tags), Ok(etag)) = (if_none_match.to_str(), etag.to_str()) else {
        return false;
    };
    tags.split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_one_flag_or_all() {
        assert_eq!(Route::of("/ofrep/v1/evaluate/flags"), Some(Route::All));
        assert_eq!(Route::of("/ofrep/v1/evaluate/flags/"), Some(Route::All));
        assert_eq!(
            Route::of("/ofrep/v1/evaluate/flags/dark-mode"),
            Some(Route::One("dark-mode".into()))
        );
        assert_eq!(
            Route::of("/ofrep/v1/evaluate/flags/new%20checkout%2Fv2"),
            Some(Route::One("new checkout/v2".into()))
        );
        assert_eq!(
            Route::of("/ofrep/v1/evaluate/flags/100%25%zz%4"),
            Some(Route::One("100%%zz%4".into())),
            "a % that starts no escape stays"
        );
        assert_eq!(
            Route::of("/ofrep/v1/evaluate/flags/%ff%fe"),
            Some(Route::One("\u{fffd}\u{fffd}".into()))
        );
        for elsewhere in ["/", "/ofrep/v1/evaluate", "/ofrep/v1/evaluate/flagsx", ""] {
            assert_eq!(Route::of(elsewhere), None, "{elsewhere}");
        }
    }

    #[test]
    fn a_context_is_an_object_and_nothing_is_an_empty_one() {
        let context = context_of(br#"{"context": {"targetingKey": "u1", "plan": "gold"}}"#);
        assert_eq!(context.unwrap()["plan"], "gold");
        for empty in [&b""[..], b"  \n", b"{}", br#"{"context": null}"#] {
            assert_eq!(context_of(empty), Ok(Map::new()), "{empty:?}");
        }
        for (invalid, why) in [
            (&br#"{"context": "#[..], "not JSON"),
            (b"[1, 2]", "not a JSON object"),
            (br#"{"context": 5}"#, "context is not"),
            (br#"{"context": ["u1"]}"#, "context is not"),
            (b"\xff\xfe", "not JSON"),
        ] {
            let err = context_of(invalid).unwrap_err();
            assert!(err.contains(why), "{invalid:?}: {err}");
        }
        // Nested past serde_json's recursion limit: an error, not a stack overflow.
        let deep = format!(
            r#"{{"context": {{"a": {}1{}}}}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert!(context_of(deep.as_bytes()).is_err());
    }

    #[test]
    fn etags_are_hashes_of_the_answer_and_match_as_if_none_match_lists_them() {
        let tag = etag(br#"{"flags":[]}"#);
        assert_eq!(tag, etag(br#"{"flags":[]}"#));
        assert_ne!(tag, etag(br#"{"flags":[{}]}"#));
        let text = tag.to_str().unwrap().to_owned();
        assert!(
            text.starts_with('"') && text.ends_with('"') && text.len() == 34,
            "{text}"
        );
        let matches = |header: &str| matches_etag(&HeaderValue::from_str(header).unwrap(), &tag);
        assert!(matches(&text));
        assert!(matches(&format!("W/{text}")));
        assert!(matches(&format!("\"other\", {text}")));
        assert!(matches("*"));
        assert!(!matches("\"other\""));
        assert!(!matches(text.trim_matches('"')), "unquoted is another tag");
    }
}
