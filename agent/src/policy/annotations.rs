//! The `aviary.dev/` annotations of Namespaces, Pods and Services, each parsed and validated
//! here: whether a pod is enrolled, which of its ports inbound capture leaves alone, and a
//! Service's split and mirror. Who may connect (`aviary.dev/mtls`, `aviary.dev/allow-from`) is
//! `security.rs`; which methods are safe to mirror is `mirroring.rs`, as HTTPRoutes carry it
//! too.

use std::collections::{BTreeMap, BTreeSet};

use super::mirroring::{declared_safe, MIRROR_IDEMPOTENCY_KEY, MIRROR_METHODS};
use super::service::Service;
use crate::table::{KeySource, SafeMethods};

/// On a Namespace, enrols its pods; on a Pod, overrides its namespace.
pub const CAPTURE_ANNOTATION: &str = "aviary.dev/capture";
/// On a Pod: ports inbound capture leaves alone, comma-separated (as Istio's
/// `traffic.sidecar.istio.io/excludeInboundPorts`).
pub const INBOUND_PORTS_EXCLUDE: &str = "aviary.dev/inbound-ports-exclude";
/// The annotations of a Pod that decide its enrolment and inbound capture: all that is kept of
/// the annotations of other nodes' pods.
const POD_ANNOTATIONS: [&str; 2] = [CAPTURE_ANNOTATION, INBOUND_PORTS_EXCLUDE];

/// Of a pod's annotations, those that decide its enrolment.
pub fn enrolment_annotations<'a>(
    annotations: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> BTreeMap<String, String> {
    annotations
        .into_iter()
        .filter(|(key, _)| POD_ANNOTATIONS.contains(&key.as_str()))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Capture {
    Enabled,
    Disabled,
}

impl Capture {
    pub(super) fn parse(value: &str) -> Result<Self, String> {
        match value {
            "enabled" => Ok(Self::Enabled),
            "disabled" => Ok(Self::Disabled),
            other => Err(format!(
                "annotation {CAPTURE_ANNOTATION} must be \"enabled\" or \"disabled\", not {other:?}"
            )),
        }
    }

    pub(super) fn of(annotations: Option<&BTreeMap<String, String>>) -> Option<Self> {
        let value = annotations?.get(CAPTURE_ANNOTATION)?;
        Self::parse(value).ok()
    }
}

/// The ports of `aviary.dev/inbound-ports-exclude`, or why they are not ports.
pub(super) fn inbound_ports_excluded(
    annotations: Option<&BTreeMap<String, String>>,
) -> Result<BTreeSet<u16>, String> {
    let Some(value) = annotations.and_then(|a| a.get(INBOUND_PORTS_EXCLUDE)) else {
        return Ok(BTreeSet::new());
    };
    value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(format!(
                "annotation {INBOUND_PORTS_EXCLUDE} must list ports (1-65535), not {p:?}"
            )),
        })
        .collect()
}

pub const SPLIT: &str = "aviary.dev/split";
/// On a Service or an HTTPRoute: where a request carries its user, `header:<name>` or
/// `cookie:<name>`. Its splits then keep each user on one backend (the route's wins).
pub const SPLIT_KEY: &str = "aviary.dev/split-key";
pub const MIRROR: &str = "aviary.dev/mirror";
pub const MIRROR_PERCENT: &str = "aviary.dev/mirror-percent";

/// A Service's routing annotations, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAnnotations {
    pub split: Vec<(String, u32)>,
    pub mirror: Option<String>,
    pub mirror_percent: u32,
    pub mirror_safe: SafeMethods,
}

impl ServiceAnnotations {
    /// None when the Service has no routing annotation; an error names the bad one.
    pub fn parse(svc: &Service) -> Result<Option<Self>, String> {
        let annotations = svc.metadata.annotations.clone().unwrap_or_default();
        let get = |key: &str| annotations.get(key).map(|v| v.trim());
        if [
            SPLIT,
            MIRROR,
            MIRROR_PERCENT,
            MIRROR_METHODS,
            MIRROR_IDEMPOTENCY_KEY,
        ]
        .iter()
        .all(|k| get(k).is_none())
        {
            return Ok(None);
        }
        let split = get(SPLIT).map(parse_split).transpose()?.unwrap_or_default();
        let mirror = get(MIRROR).map(str::to_owned);
        if let Some(name) = &mirror {
            check_name(name).map_err(|e| format!("annotation {MIRROR}: {e}"))?;
        }
        let mirror_percent = match get(MIRROR_PERCENT) {
            None => 100,
            Some(value) => match value.parse::<u32>() {
                Ok(p) if p <= 100 => p,
                _ => return Err(format!("annotation {MIRROR_PERCENT} must be a whole number from 0 to 100, not {value:?}")),
            },
        };
        let mirror_safe = declared_safe(Some(&annotations))?;
        let mirror_options = [MIRROR_PERCENT, MIRROR_METHODS, MIRROR_IDEMPOTENCY_KEY];
        if mirror.is_none() && mirror_options.iter().any(|k| get(k).is_some()) {
            return Err(format!(
                "annotations {MIRROR_PERCENT}, {MIRROR_METHODS} and {MIRROR_IDEMPOTENCY_KEY} need {MIRROR}"
            ));
        }
        Ok(Some(Self {
            split,
            mirror,
            mirror_percent,
            mirror_safe,
        }))
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    valid
        .then_some(())
        .ok_or_else(|| format!("{name:?} is not a Service name"))
}

fn parse_split(value: &str) -> Result<Vec<(String, u32)>, String> {
    let mut split: Vec<(String, u32)> = Vec::new();
    for entry in value.split(',') {
        let (name, weight) = entry
            .split_once('=')
            .ok_or_else(|| format!("annotation {SPLIT}: {entry:?} is not service=weight"))?;
        let name = name.trim();
        check_name(name).map_err(|e| format!("annotation {SPLIT}: {e}"))?;
        let weight: u32 = weight
            .trim()
            .parse()
            .ok()
            .filter(|w| *w <= 1_000_000)
            .ok_or_else(|| format!("annotation {SPLIT}: weight {weight:?} of {name} is not a whole number up to 1000000"))?;
        if split.iter().any(|(n, _)| n == name) {
            return Err(format!("annotation {SPLIT}: {name} appears twice"));
        }
        split.push((name.to_owned(), weight));
    }
    if split.iter().all(|(_, w)| *w == 0) {
        return Err(format!(
            "annotation {SPLIT}: every weight is 0, so no request could be served"
        ));
    }
    Ok(split)
}

/// The `aviary.dev/split-key` of an object's annotations, or why it is not one.
pub fn split_key(
    annotations: Option<&BTreeMap<String, String>>,
) -> Result<Option<KeySource>, String> {
    annotations
        .and_then(|a| a.get(SPLIT_KEY))
        .map(|value| key_source(SPLIT_KEY, value))
        .transpose()
}

/// `header:<name>` or `cookie:<name>`, the value of the annotation `annotation`.
fn key_source(annotation: &str, value: &str) -> Result<KeySource, String> {
    let bad =
        || format!("annotation {annotation} must be header:<name> or cookie:<name>, not {value:?}");
    let (kind, name) = value.trim().split_once(':').ok_or_else(bad)?;
    let name = name.trim();
    match kind.trim() {
        "header" => http::HeaderName::from_bytes(name.as_bytes())
            .map(KeySource::Header)
            .map_err(|_| bad()),
        "cookie" if is_cookie_name(name) => Ok(KeySource::Cookie(name.to_owned())),
        _ => Err(bad()),
    }
}

/// On a Service or an HTTPRoute: the feature flags evaluated for each request to the service,
/// before its routes match, by key, comma-separated.
pub const FLAGS: &str = "aviary.dev/flags";
/// Where a request carries the flags' targeting key: `header:<name>` or `cookie:<name>`.
pub const FLAG_KEY: &str = "aviary.dev/flag-key";
/// Request headers the flags' evaluation context carries, comma-separated.
pub const FLAG_HEADERS: &str = "aviary.dev/flag-headers";
/// The request header that carries a flag's variant: this, then the flag's key.
pub const FLAG_HEADER_PREFIX: &str = "x-aviary-flag-";

/// An object's flag annotations, validated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FlagAnnotations {
    /// Each flag's key and the header that carries its variant.
    pub flags: Vec<(String, http::HeaderName)>,
    pub targeting_key: Option<KeySource>,
    pub context_headers: Vec<http::HeaderName>,
}

impl FlagAnnotations {
    /// None when the object names no flag; an error names the bad annotation.
    pub fn parse(annotations: Option<&BTreeMap<String, String>>) -> Result<Option<Self>, String> {
        let get = |key: &str| annotations.and_then(|a| a.get(key)).map(|v| v.trim());
        let Some(keys) = get(FLAGS) else {
            return match [FLAG_KEY, FLAG_HEADERS]
                .into_iter()
                .find(|k| get(k).is_some())
            {
                Some(orphan) => Err(format!("annotation {orphan} needs {FLAGS}")),
                None => Ok(None),
            };
        };
        let mut flags: Vec<(String, http::HeaderName)> = Vec::new();
        for key in keys.split(',').map(str::trim).filter(|k| !k.is_empty()) {
            let header = http::HeaderName::from_bytes(format!("{FLAG_HEADER_PREFIX}{key}").as_bytes())
                .map_err(|_| format!("annotation {FLAGS}: flag {key:?} cannot name a header (letters, digits, '-', '_' and '.' can)"))?;
            if let Some((other, _)) = flags.iter().find(|(_, h)| *h == header) {
                return Err(format!("annotation {FLAGS}: flags {other:?} and {key:?} would share the header {header}"));
            }
            flags.push((key.to_owned(), header));
        }
        if flags.is_empty() {
            return Err(format!("annotation {FLAGS} names no flag"));
        }
        let targeting_key = get(FLAG_KEY).map(|v| key_source(FLAG_KEY, v)).transpose()?;
        let context_headers = get(FLAG_HEADERS)
            .into_iter()
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| {
                http::HeaderName::from_bytes(h.as_bytes())
                    .map_err(|_| format!("annotation {FLAG_HEADERS}: {h:?} is not a header name"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Some(Self {
            flags,
            targeting_key,
            context_headers,
        }))
    }
}

/// A cookie's name is an HTTP token (RFC 6265).
fn is_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}
