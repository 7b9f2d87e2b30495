//! GAMMA: Gateway API HTTPRoutes whose parentRefs name a Service, as Flagger's `gatewayapi`
//! provider writes them, compiled into rules of the routing table.

use std::time::Duration;

use gateway_api::apis::standard::httproutes::{
    HttpRoute, HttpRouteRules, HttpRouteRulesFiltersType, HttpRouteRulesMatches,
    HttpRouteRulesMatchesHeadersType, HttpRouteRulesMatchesPathType,
    HttpRouteRulesMatchesQueryParamsType,
};
use http::{HeaderName, HeaderValue, Method};
use regex::Regex;

use crate::table::{HeaderMatch, HeaderModifier, PathMatch, QueryMatch, RequestMatch, StringMatch};

/// A Service a route attaches to: namespace, name, and the port (None: every port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceParent {
    pub namespace: String,
    pub name: String,
    pub port: Option<i32>,
}

/// The Services an HTTPRoute's parentRefs name (kind Service, group "" or "core").
pub fn service_parents(route: &HttpRoute) -> Vec<ServiceParent> {
    let namespace = route.metadata.namespace.as_deref().unwrap_or("default");
    route
        .spec
        .parent_refs
        .iter()
        .flatten()
        .filter(|p| {
            p.kind.as_deref() == Some("Service")
                && matches!(p.group.as_deref(), Some("") | Some("core") | None)
        })
        .map(|p| ServiceParent {
            namespace: p.namespace.clone().unwrap_or_else(|| namespace.to_owned()),
            name: p.name.clone(),
            port: p.port,
        })
        .collect()
}

/// Why a route cannot be used, if it cannot: everything that can be checked without the other
/// objects (regexes, durations, weights, filters Aviary does not implement).
pub fn validate(route: &HttpRoute) -> Result<(), String> {
    super::mirroring::declared_safe(route.metadata.annotations.as_ref())?;
    for (index, rule) in route.spec.rules.iter().flatten().enumerate() {
        let at = |what: String| format!("rule {}: {what}", index + 1);
        for m in rule.matches.iter().flatten() {
            convert_match(m).map_err(at)?;
        }
        let weights: Vec<i32> = rule
            .backend_refs
            .iter()
            .flatten()
            .map(|b| b.weight.unwrap_or(1))
            .collect();
        if weights.iter().any(|w| *w < 0) {
            return Err(at("a backendRef has a negative weight".into()));
        }
        if !weights.is_empty() && weights.iter().all(|w| *w == 0) {
            return Err(at(
                "every backendRef has weight 0, so no request could be served".into(),
            ));
        }
        filters(rule).map_err(at)?;
        for b in rule.backend_refs.iter().flatten() {
            backend_filters(b).map_err(at)?;
        }
        if let Some(t) = &rule.timeouts {
            for d in [&t.request, &t.backend_request].into_iter().flatten() {
                parse_duration(d).map_err(at)?;
            }
        }
    }
    Ok(())
}

/// One match of a route, in the proxy's terms, with the sort key of Gateway API precedence.
#[derive(Debug, Clone)]
pub struct RankedMatch {
    pub request: RequestMatch,
    pub rank: Rank,
}

/// Gateway API match precedence, greatest first: an exact path, then the longest path, then a
/// method, then the most headers, then the most query parameters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank {
    exact_path: bool,
    path_len: usize,
    method: bool,
    headers: usize,
    query: usize,
}

/// A rule's matches; a rule without matches matches every request (prefix "/").
pub fn matches(rule: &HttpRouteRules) -> Vec<RankedMatch> {
    let list: Vec<&HttpRouteRulesMatches> = rule.matches.iter().flatten().collect();
    if list.is_empty() {
        let rank = Rank {
            exact_path: false,
            path_len: 1,
            method: false,
            headers: 0,
            query: 0,
        };
        return vec![RankedMatch {
            request: RequestMatch::default(),
            rank,
        }];
    }
    list.into_iter()
        .filter_map(|m| convert_match(m).ok())
        .collect()
}

fn convert_match(m: &HttpRouteRulesMatches) -> Result<RankedMatch, String> {
    let (path, exact_path, path_len) = match &m.path {
        None => (None, false, 1),
        Some(p) => {
            let value = p.value.clone().unwrap_or_else(|| "/".into());
            let len = value.len();
            match p.r#type {
                Some(HttpRouteRulesMatchesPathType::Exact) => {
                    (Some(PathMatch::Exact(value)), true, len)
                }
                Some(HttpRouteRulesMatchesPathType::RegularExpression) => {
                    (Some(PathMatch::Regex(regex(&value)?)), false, len)
                }
                _ => (Some(PathMatch::Prefix(value)), false, len),
            }
        }
    };
    let method = match &m.method {
        None => None,
        Some(method) => {
            let name = serde_json::to_value(method)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            Some(
                Method::from_bytes(name.as_bytes())
                    .map_err(|_| format!("{name:?} is not an HTTP method"))?,
            )
        }
    };
    let mut headers = Vec::new();
    for h in m.headers.iter().flatten() {
        let name: HeaderName = h
            .name
            .parse()
            .map_err(|_| format!("{:?} is not a header name", h.name))?;
        // Only the first match of a header name counts, as the Gateway API requires.
        if headers
            .iter()
            .any(|existing: &HeaderMatch| existing.name == name)
        {
            continue;
        }
        let value = match h.r#type {
            Some(HttpRouteRulesMatchesHeadersType::RegularExpression) => {
                StringMatch::Regex(regex(&h.value)?)
            }
            _ => StringMatch::Exact(h.value.clone()),
        };
        headers.push(HeaderMatch { name, value });
    }
    let mut query = Vec::new();
    for q in m.query_params.iter().flatten() {
        let value = match q.r#type {
            Some(HttpRouteRulesMatchesQueryParamsType::RegularExpression) => {
                StringMatch::Regex(regex(&q.value)?)
            }
            _ => StringMatch::Exact(q.value.clone()),
        };
        query.push(QueryMatch {
            name: q.name.clone(),
            value,
        });
    }
    let rank = Rank {
        exact_path,
        path_len,
        method: method.is_some(),
        headers: headers.len(),
        query: query.len(),
    };
    Ok(RankedMatch {
        request: RequestMatch {
            path,
            method,
            headers,
            query,
        },
        rank,
    })
}

/// A Gateway API regular expression: it must match the whole value, as Envoy's RE2 matching
/// does for routes (Flagger writes `.*canary.*` meaning "contains").
fn regex(pattern: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| format!("bad regular expression {pattern:?}: {e}"))
}

/// A header modifier filter as the proxy's HeaderModifier. The generated types of rule filters
/// and backendRef filters differ by name only, so this reads either.
macro_rules! header_modifier {
    ($m:expr) => {
        modifier(
            $m.set
                .iter()
                .flatten()
                .map(|h| (h.name.as_str(), h.value.as_str())),
            $m.add
                .iter()
                .flatten()
                .map(|h| (h.name.as_str(), h.value.as_str())),
            $m.remove.iter().flatten(),
        )
    };
}

/// A rule's filters: header modifiers and at most one mirror. Filters Aviary does not implement
/// make the rule invalid rather than being ignored.
pub struct Filters {
    pub request_headers: HeaderModifier,
    pub response_headers: HeaderModifier,
    pub mirror: Option<MirrorRef>,
}

/// The Service a RequestMirror filter names, and the share it mirrors.
pub struct MirrorRef {
    pub namespace: Option<String>,
    pub name: String,
    pub port: Option<i32>,
    pub numerator: u32,
    pub denominator: u32,
}

pub fn filters(rule: &HttpRouteRules) -> Result<Filters, String> {
    let mut out = Filters {
        request_headers: HeaderModifier::default(),
        response_headers: HeaderModifier::default(),
        mirror: None,
    };
    for filter in rule.filters.iter().flatten() {
        match filter.r#type {
            HttpRouteRulesFiltersType::RequestHeaderModifier => {
                if let Some(m) = &filter.request_header_modifier {
                    out.request_headers = header_modifier!(m)?;
                }
            }
            HttpRouteRulesFiltersType::ResponseHeaderModifier => {
                if let Some(m) = &filter.response_header_modifier {
                    out.response_headers = header_modifier!(m)?;
                }
            }
            HttpRouteRulesFiltersType::RequestMirror => {
                let Some(m) = &filter.request_mirror else {
                    continue;
                };
                let (numerator, denominator) = match (&m.fraction, m.percent) {
                    (Some(f), _) => (f.numerator, f.denominator.unwrap_or(100)),
                    (None, Some(p)) => (p, 100),
                    (None, None) => (100, 100),
                };
                if denominator <= 0 || numerator < 0 || numerator > denominator {
                    return Err(format!(
                        "mirror fraction {numerator}/{denominator} is not a share"
                    ));
                }
                let b = &m.backend_ref;
                out.mirror = Some(MirrorRef {
                    namespace: b.namespace.clone(),
                    name: b.name.clone(),
                    port: b.port,
                    numerator: numerator as u32,
                    denominator: denominator as u32,
                });
            }
            ref other => return Err(format!("filter {other:?} is not supported by Aviary")),
        }
    }
    Ok(out)
}

/// A backendRef's own filters: request and response header modifiers (Flagger sets a session
/// cookie on the canary this way).
pub fn backend_filters(
    b: &gateway_api::apis::standard::httproutes::HttpRouteRulesBackendRefs,
) -> Result<(HeaderModifier, HeaderModifier), String> {
    use gateway_api::apis::standard::httproutes::HttpRouteRulesBackendRefsFiltersType as Type;
    let (mut request, mut response) = (HeaderModifier::default(), HeaderModifier::default());
    for filter in b.filters.iter().flatten() {
        match filter.r#type {
            Type::RequestHeaderModifier => {
                if let Some(m) = &filter.request_header_modifier {
                    request = header_modifier!(m)?;
                }
            }
            Type::ResponseHeaderModifier => {
                if let Some(m) = &filter.response_header_modifier {
                    response = header_modifier!(m)?;
                }
            }
            ref other => {
                return Err(format!(
                    "backendRef {}: filter {other:?} is not supported by Aviary",
                    b.name
                ))
            }
        }
    }
    Ok((request, response))
}

/// Header modifiers from a filter's set/add/remove lists (backend-level filters have the same
/// shape under other type names, hence plain pairs here).
pub fn modifier<'a>(
    set: impl Iterator<Item = (&'a str, &'a str)>,
    add: impl Iterator<Item = (&'a str, &'a str)>,
    remove: impl Iterator<Item = &'a String>,
) -> Result<HeaderModifier, String> {
    let pair = |(name, value): (&str, &str)| -> Result<(HeaderName, HeaderValue), String> {
        Ok((
            name.parse()
                .map_err(|_| format!("{name:?} is not a header name"))?,
            value
                .parse()
                .map_err(|_| format!("{value:?} is not a header value"))?,
        ))
    };
    Ok(HeaderModifier {
        set: set.map(pair).collect::<Result<_, _>>()?,
        add: add.map(pair).collect::<Result<_, _>>()?,
        remove: remove
            .map(|n| n.parse().map_err(|_| format!("{n:?} is not a header name")))
            .collect::<Result<_, _>>()?,
    })
}

/// A Gateway API duration: one or more `<number><unit>` with units h, m, s, ms ("1h30m",
/// "500ms"); "0s" means none.
pub fn parse_duration(text: &str) -> Result<Option<Duration>, String> {
    // The Gateway API's format: ^([0-9]{1,5}(h|m|s|ms)){1,4}$. Its bounds keep every sum far
    // from overflow; the arithmetic is checked all the same, so no input can panic here.
    const MAX_DIGITS: usize = 5;
    const MAX_PARTS: usize = 4;
    let bad =
        || format!("{text:?} is not a Gateway API duration (e.g. \"10s\", \"1m30s\", \"500ms\")");
    let mut total = Duration::ZERO;
    let mut rest = text;
    let mut parts = 0;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        parts += 1;
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 || digits > MAX_DIGITS || parts > MAX_PARTS {
            return Err(bad());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = [("ms", 2), ("h", 1), ("m", 1), ("s", 1)]
            .into_iter()
            .find(|(u, _)| rest.starts_with(u))
            .ok_or_else(bad)?;
        let part = match unit {
            "ms" => Some(Duration::from_millis(number)),
            "h" => number.checked_mul(3600).map(Duration::from_secs),
            "m" => number.checked_mul(60).map(Duration::from_secs),
            _ => Some(Duration::from_secs(number)),
        };
        total = part
            .and_then(|part| total.checked_add(part))
            .ok_or_else(bad)?;
        rest = &rest[len..];
    }
    Ok((!total.is_zero()).then_some(total))
}

/// The tie-break of equal-precedence rules: the oldest route, then "<namespace>/<name>".
pub fn route_order(route: &HttpRoute) -> (String, String) {
    let created = route
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    let name = format!(
        "{}/{}",
        route.metadata.namespace.as_deref().unwrap_or("default"),
        route.metadata.name.as_deref().unwrap_or_default()
    );
    (created, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_expressions_match_whole_values() {
        let beta = regex("beta").unwrap();
        assert!(beta.is_match("beta"));
        assert!(
            !beta.is_match("x-beta"),
            "a part of the value is not a match"
        );
        // Flagger's "contains" patterns and its anchored cookie pattern both still work.
        let contains = regex(".*canary.*").unwrap();
        assert!(contains.is_match("session=1; canary=always"));
        let cookie = regex("^(.*?;)?(canary=always)(;.*)?$").unwrap();
        assert!(cookie.is_match("a=1;canary=always"));
        // An alternation is anchored as a whole, not only its first branch.
        let either = regex("a|b").unwrap();
        assert!(either.is_match("b"));
        assert!(!either.is_match("ab"));
        assert!(regex("(").is_err());
    }
}
