//! The headers of one hop, and the request as it goes upstream.

use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Version};

use crate::proxy::pool::ProxyBody;

/// HTTP/2 upstream for HTTP/2 clients, HTTP/1.1 for the others (HTTP/1.0 included).
pub(super) fn upstream_version(version: Version) -> Version {
    if version == Version::HTTP_2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    }
}

/// The request as it goes upstream: the client's own parts, moved.
pub(super) fn upstream_request(
    mut parts: http::request::Parts,
    body: ProxyBody,
) -> Request<ProxyBody> {
    parts.version = upstream_version(parts.version);
    parts.extensions.clear();
    Request::from_parts(parts, body)
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::TE
        || name == header::TRAILER
        || name == header::UPGRADE
        || name == header::PROXY_AUTHORIZATION
        || name == header::PROXY_AUTHENTICATE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Removes the headers that belong to one hop: the standard ones and those `Connection`
/// names. `te: trailers` stays, since it says something of the request (gRPC servers need it).
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names finds that out.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    let trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Appends the client to `x-forwarded-for` and sets `x-forwarded-proto` when absent.
pub(super) fn add_forwarding_headers(headers: &mut HeaderMap, client: &HeaderValue) {
    match headers.entry("x-forwarded-for") {
        header::Entry::Vacant(entry) => {
            entry.insert(client.clone());
        }
        header::Entry::Occupied(mut entry) => {
            let mut joined = entry.get().as_bytes().to_vec();
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(client.as_bytes());
            if let Ok(value) = HeaderValue::from_bytes(&joined) {
                entry.insert(value);
            }
        }
    }
    headers
        .entry("x-forwarded-proto")
        .or_insert(HeaderValue::from_static("http"));
}
