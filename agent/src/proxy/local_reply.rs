//! Responses the proxy makes itself (no endpoint, a failed connect or tunnel, a timeout, a
//! refusal), each with the reason it says in `x-aviary-error`, counts in
//! `aviary_proxy_errors_total` and logs, so that a failure the mesh made explains itself.

use std::{
    fmt::Display,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use tracing::{info, warn};

use super::pool::{full, ProxyBody};
use crate::proxy::metrics::{Direction, Metrics, ProxyError};

/// The header that says why the proxy answered a request itself (Linkerd's `l5d-proxy-error`).
pub const ERROR_HEADER: &str = "x-aviary-error";

/// Each reason is logged at most this often; the lines left out are counted in the next.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// A response the proxy made itself: why, and what it told the client. It rides in the
/// response's extensions to where the request is recorded, which [`report`]s it.
#[derive(Debug, Clone)]
struct ProxyReply {
    reason: ProxyError,
    message: Arc<str>,
}

/// The proxy's own answer for `reason`: its status, `x-aviary-error: <reason>`, and the
/// message as a plain-text body.
pub fn error(reason: ProxyError, message: &str) -> Response<ProxyBody> {
    let mut response = Response::new(full(Bytes::from(format!("aviary: {message}\n"))));
    *response.status_mut() = status_of(reason);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(ERROR_HEADER, HeaderValue::from_static(reason.as_str()));
    response.extensions_mut().insert(ProxyReply {
        reason,
        message: message.into(),
    });
    response
}

/// The status the proxy answers with for `reason`.
pub fn status_of(reason: ProxyError) -> StatusCode {
    match reason {
        ProxyError::no_route => StatusCode::NOT_FOUND,
        ProxyError::invalid_backend => StatusCode::INTERNAL_SERVER_ERROR,
        ProxyError::no_endpoints
        | ProxyError::connect_failed
        | ProxyError::connect_timeout
        | ProxyError::tunnel_failed
        | ProxyError::tunnel_timeout
        | ProxyError::no_identity => StatusCode::SERVICE_UNAVAILABLE,
        ProxyError::forbidden => StatusCode::FORBIDDEN,
        ProxyError::request_timeout | ProxyError::backend_timeout => StatusCode::GATEWAY_TIMEOUT,
        ProxyError::upstream_failed => StatusCode::BAD_GATEWAY,
        ProxyError::client_body => StatusCode::BAD_REQUEST,
    }
}

/// If the proxy made `response` itself: counts it by reason, and logs why (at most one line
/// a second for each reason, saying how many it left out). `target` is what the client
/// called: a Service, or a pod's address.
pub fn report<B>(
    metrics: &Metrics,
    direction: Direction,
    response: &Response<B>,
    peer: SocketAddr,
    target: &dyn Display,
) {
    let Some(reply) = response.extensions().get::<ProxyReply>() else {
        return;
    };
    let (reason, status) = (reply.reason, response.status().as_u16());
    metrics.proxy_error(direction, reason, status);
    let Some(left_out) = LOG_LIMIT.admit(reason, Instant::now()) else {
        return;
    };
    let (reason, message) = (reason.as_str(), &*reply.message);
    // What the client asked for or may not do is the client's; the rest is the mesh's.
    if matches!(
        reply.reason,
        ProxyError::no_route | ProxyError::forbidden | ProxyError::client_body
    ) {
        info!(?direction, reason, status, %peer, %target, left_out, message, "the proxy answered a request itself");
    } else {
        warn!(?direction, reason, status, %peer, %target, left_out, message, "the proxy answered a request itself");
    }
}

/// One log line per reason per [`LOG_INTERVAL`], across the process.
struct LogLimit {
    epoch: OnceLock<Instant>,
    /// By reason: when its last line was let through, in milliseconds since `epoch` plus one
    /// (0: never).
    last: [AtomicU64; REASONS],
    /// By reason: the lines left out since.
    left_out: [AtomicU64; REASONS],
}

const REASONS: usize = ProxyError::ALL.len();

static LOG_LIMIT: LogLimit = LogLimit {
    epoch: OnceLock::new(),
    last: [const { AtomicU64::new(0) }; REASONS],
    left_out: [const { AtomicU64::new(0) }; REASONS],
};

impl LogLimit {
    /// Some(lines left out since the last one) if a line for `reason` may go out at `now`.
    fn admit(&self, reason: ProxyError, now: Instant) -> Option<u64> {
        let epoch = *self.epoch.get_or_init(|| now);
        let ms = u64::try_from(now.saturating_duration_since(epoch).as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let i = reason as usize;
        // A reason missing from `ProxyError::ALL` is never held back.
        let (Some(last_line), Some(left_out)) = (self.last.get(i), self.left_out.get(i)) else {
            return Some(0);
        };
        let last = last_line.load(Ordering::Relaxed);
        let interval = LOG_INTERVAL.as_millis() as u64;
        let due = last == 0 || ms >= last.saturating_add(interval);
        // One of the callers that find it due wins the line.
        if due
            && last_line
                .compare_exchange(last, ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(left_out.swap(0, Ordering::Relaxed));
        }
        left_out.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit() -> LogLimit {
        LogLimit {
            epoch: OnceLock::new(),
            last: [const { AtomicU64::new(0) }; REASONS],
            left_out: [const { AtomicU64::new(0) }; REASONS],
        }
    }

    #[test]
    fn one_line_a_second_per_reason_and_the_next_counts_those_left_out() {
        let (limit, start) = (limit(), Instant::now());
        let at = |ms| start + Duration::from_millis(ms);
        assert_eq!(limit.admit(ProxyError::no_endpoints, at(0)), Some(0));
        assert_eq!(limit.admit(ProxyError::no_endpoints, at(10)), None);
        assert_eq!(limit.admit(ProxyError::no_endpoints, at(999)), None);
        // Another reason has its own allowance.
        assert_eq!(limit.admit(ProxyError::tunnel_timeout, at(20)), Some(0));
        assert_eq!(limit.admit(ProxyError::no_endpoints, at(1000)), Some(2));
        assert_eq!(limit.admit(ProxyError::no_endpoints, at(1500)), None);
    }

    #[test]
    fn every_reason_has_a_place_of_its_own_in_the_log_limit() {
        for (i, reason) in ProxyError::ALL.into_iter().enumerate() {
            assert_eq!(reason as usize, i, "{reason:?}");
        }
    }

    #[test]
    fn each_reason_has_its_status_and_header() {
        let response = error(ProxyError::tunnel_timeout, "no tunnel within 1s");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[ERROR_HEADER], "tunnel_timeout");
        let reply = response.extensions().get::<ProxyReply>().unwrap();
        assert_eq!(&*reply.message, "no tunnel within 1s");
        assert_eq!(status_of(ProxyError::no_route), StatusCode::NOT_FOUND);
        assert_eq!(
            status_of(ProxyError::backend_timeout),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            status_of(ProxyError::upstream_failed),
            StatusCode::BAD_GATEWAY
        );
    }

    #[test]
    fn a_reply_is_counted_by_reason_and_an_endpoints_answer_is_not() {
        let metrics = Metrics::new(false, None);
        let peer = SocketAddr::from(([10, 0, 0, 1], 40000));
        let failed = error(ProxyError::no_endpoints, "payments has no endpoints");
        let service = "shop/payments";
        for _ in 0..2 {
            report(&metrics, Direction::outbound, &failed, peer, &service);
        }
        // An endpoint's own answer carries no reply of the proxy's.
        report(
            &metrics,
            Direction::outbound,
            &Response::new(()),
            peer,
            &service,
        );
        let text = metrics.render();
        let labels = [
            ("direction", "outbound"),
            ("reason", "no_endpoints"),
            ("status_code", "503"),
        ];
        assert_eq!(
            crate::metrics::sample(&text, "aviary_proxy_errors_total", &labels),
            2.0
        );
    }
}
