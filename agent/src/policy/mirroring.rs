//! Which requests a mirror may copy: the idempotent methods always, and beyond them what a
//! Service's or an HTTPRoute's annotations declare safe.

use std::collections::BTreeMap;

use http::Method;

use crate::table::SafeMethods;

pub const MIRROR_METHODS: &str = "aviary.dev/mirror-methods";
pub const MIRROR_IDEMPOTENCY_KEY: &str = "aviary.dev/mirror-idempotency-key";

/// What an object's annotations declare safe to mirror, beyond the idempotent methods.
pub fn declared_safe(
    annotations: Option<&BTreeMap<String, String>>,
) -> Result<SafeMethods, String> {
    let get = |key: &str| annotations.and_then(|a| a.get(key)).map(|v| v.trim());
    let extra =
        match get(MIRROR_METHODS) {
            None => Vec::new(),
            Some(value) => value
                .split(',')
                .map(|m| {
                    let m = m.trim();
                    let valid = !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase());
                    valid.then(|| Method::from_bytes(m.as_bytes()).ok()).flatten().ok_or_else(|| {
                    format!("annotation {MIRROR_METHODS} lists {m:?}, which is not an HTTP method")
                })
                })
                .collect::<Result<_, _>>()?,
        };
    let idempotency_key = match get(MIRROR_IDEMPOTENCY_KEY) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(format!(
                "annotation {MIRROR_IDEMPOTENCY_KEY} must be \"true\" or \"false\", not {other:?}"
            ))
        }
    };
    Ok(SafeMethods {
        extra,
        idempotency_key,
    })
}
