//! The OpenFeature Remote Evaluation Protocol (OFREP) for applications: a pod evaluates its
//! namespace's feature flags at its node's agent, as it would at a flagd, with any OpenFeature
//! SDK's OFREP provider. HTTP/1.1:
//! - `POST /ofrep/v1/evaluate/flags/{key}`, `{"context": {...}}`: one flag;
//! - `POST /ofrep/v1/evaluate/flags`: every flag of the namespace, with an `ETag` (a hash of
//!   the answer) that `If-None-Match` turns into a bodiless 304 while the answer is the same.
//!
//! The answers are flagd's ([`answer`]). The caller is known by its address alone: the pod the
//! routing table holds there, whose namespace's FeatureFlag objects answer. Any other caller (a
//! hostNetwork pod, a host, a pod the agent does not know) gets 403 and no flag; OFREP's 401
//! would ask for credentials, and there are none to give.
//!
//! Every read and write is bounded in time and in size ([`Limits`]). When the endpoint stops
//! (its listener handed to a successor agent, or the agent exiting), each connection finishes
//! the request it is answering and closes, so that its client reconnects to whoever listens.

mod answer;

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, LazyLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use aviary_flags::{ErrorCode, Resolution};
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Map, Value};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{watch, Semaphore},
};
use tracing::debug;

use self::answer::{context_of, error, evaluation, json_response, matches_etag, Route};
use crate::{
    proxy::{
        idle::IdleTimeout,
        metrics::{FlagEvaluator, Metrics},
    },
    table::{flags::NamespaceFlags, unknown, RouteTable},
};

/// How long requests may take and how large they may be.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From when the endpoint waits for a request's headers to their end: so also how long a
    /// keep-alive connection may idle between requests.
    pub header_read_timeout: Duration,
    /// From a request's headers to its body's end.
    pub body_read_timeout: Duration,
    /// A connection that moves no byte either way for this long closes: a client that stops
    /// reading its answer holds nothing for long.
    pub idle_timeout: Duration,
    /// A larger body answers 413.
    pub max_body_bytes: usize,
    /// Connections open at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            // A context is a user's attributes: a few hundred bytes, rarely more.
            max_body_bytes: 64 * 1024,
            max_connections: 1024,
        }
    }
}

/// A request's head (line and headers) at most: hyper's smallest read buffer.
const MAX_HEAD_BYTES: usize = 8 * 1024;

/// A body over the limit is still read, and dropped, up to this size: a client that sends its
/// whole body before it reads would otherwise see the connection reset (a socket closed with
/// bytes unread resets), and lose the 413 with it.
const MAX_DRAINED_BYTES: usize = 1024 * 1024;

/// How long accepting pauses after a failed accept (out of descriptors, say), rather than spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The flags of a namespace that has none.
static NO_FLAGS: LazyLock<NamespaceFlags> = LazyLock::new(NamespaceFlags::default);

pub struct Ofrep {
    routes: Arc<ArcSwap<RouteTable>>,
    metrics: Arc<Metrics>,
    limits: Limits,
}

impl Ofrep {
    pub fn new(routes: Arc<ArcSwap<RouteTable>>, metrics: Arc<Metrics>, limits: Limits) -> Self {
        Self {
            routes,
            metrics,
            limits,
        }
    }

    /// Serves `listener` until this future is dropped; then every connection finishes the
    /// request it is answering, if any, and closes.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let open = Arc::new(Semaphore::new(self.limits.max_connections));
        // Never sent on: its drop, with this future, tells the connections to close.
        let (_serving, stopped) = watch::channel(());
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    debug!(error = %e, "accepting an OFREP connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(permit) = open.clone().try_acquire_owned() else {
                debug!(%peer, "closed an OFREP connection: too many are open");
                continue;
            };
            let (ofrep, stopped) = (self.clone(), stopped.clone());
            tokio::spawn(async move {
                ofrep.serve_connection(stream, peer, stopped).await;
                drop(permit);
            });
        }
    }

    async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        mut stopped: watch::Receiver<()>,
    ) {
        let io = TokioIo::new(IdleTimeout::new(stream, Some(self.limits.idle_timeout)));
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout)
            .max_buf_size(MAX_HEAD_BYTES);
        let ofrep = self.clone();
        let service = hyper::service::service_fn(move |request| {
            let ofrep = ofrep.clone();
            async move { Ok::<_, Infallible>(ofrep.answer(request, peer.ip()).await) }
        });
        let connection = http1.serve_connection(io, service);
        tokio::pin!(connection);
        let served = tokio::select! {
            served = connection.as_mut() => served,
            _ = stopped.changed() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(e) = served {
            debug!(%peer, error = %e, "an OFREP connection ended with an error");
        }
    }

    /// The answer to one request from `peer`.
    async fn answer(&self, request: Request<Incoming>, peer: IpAddr) -> Response<Full<Bytes>> {
        let Some(route) = Route::of(request.uri().path()) else {
            return error(
                StatusCode::NOT_FOUND,
                "no such path: OFREP evaluates flags at /ofrep/v1/evaluate/flags[/{key}]",
            );
        };
        if request.method() != Method::POST {
            let mut response = error(StatusCode::METHOD_NOT_ALLOWED, "OFREP evaluates on POST");
            let allow = HeaderValue::from_static("POST");
            response.headers_mut().insert(header::ALLOW, allow);
            return response;
        }
        let Some(namespace) = self.namespace_of(peer) else {
            return error(
                StatusCode::FORBIDDEN,
                &format!(
                    "{peer} is no pod this agent knows: a pod asks at its node's address, from \
                     its own (hostNetwork pods cannot)"
                ),
            );
        };
        let (head, body) = request.into_parts();
        let body = match self.read_body(body).await {
            Ok(body) => body,
            Err(refused) => return refused,
        };
        let context = match context_of(&body) {
            Ok(context) => context,
            Err(details) => {
                let mut answer = json!({"errorCode": "INVALID_CONTEXT", "errorDetails": details});
                if let Route::One(key) = &route {
                    answer["key"] = key.as_str().into();
                }
                return json_response(StatusCode::BAD_REQUEST, answer.to_string());
            }
        };
        let flags = self.routes.load().flags.get(&*namespace).cloned();
        let flags = flags.as_deref().unwrap_or(&NO_FLAGS);
        let evaluated = Evaluated {
            ofrep: self,
            namespace: &namespace,
            flags,
            context: &context,
            timestamp: unix_now(),
        };
        match route {
            Route::One(key) => evaluated.one(&key),
            Route::All => evaluated.all(head.headers.get(header::IF_NONE_MATCH)),
        }
    }

    /// The namespace of the pod at `peer`, if the table holds one there.
    fn namespace_of(&self, peer: IpAddr) -> Option<Arc<str>> {
        let table = self.routes.load();
        let pod = table.pods.get(&peer.to_canonical())?;
        Some(pod.namespace.clone())
    }

    /// A request's body, at most [`Limits::max_body_bytes`] read within the body timeout; else
    /// the answer that refuses it.
    async fn read_body(&self, body: Incoming) -> Result<Bytes, Response<Full<Bytes>>> {
        let limit = self.limits.max_body_bytes;
        let too_large = || {
            let details = format!("the body is larger than {limit} bytes");
            closing(error(StatusCode::PAYLOAD_TOO_LARGE, &details))
        };
        if body.size_hint().lower() > MAX_DRAINED_BYTES as u64 {
            return Err(too_large());
        }
        let read = async move {
            let mut body = body;
            let (mut kept, mut seen) = (Vec::new(), 0usize);
            while let Some(frame) = body.frame().await {
                let Ok(data) = frame?.into_data() else {
                    continue;
                };
                seen = seen.saturating_add(data.len());
                if seen <= limit {
                    kept.extend_from_slice(&data);
                } else if seen > MAX_DRAINED_BYTES {
                    break;
                }
            }
            Ok::<_, hyper::Error>((Bytes::from(kept), seen))
        };
        match tokio::time::timeout(self.limits.body_read_timeout, read).await {
            Ok(Ok((body, seen))) if seen <= limit => Ok(body),
            Ok(Ok(_)) => Err(too_large()),
            Ok(Err(e)) => Err(closing(error(
                StatusCode::BAD_REQUEST,
                &format!("reading the body: {e}"),
            ))),
            Err(_) => Err(closing(error(
                StatusCode::REQUEST_TIMEOUT,
                &format!(
                    "the body did not come within {:?}",
                    self.limits.body_read_timeout
                ),
            ))),
        }
    }
}

/// One request's evaluations: the caller's namespace's flags, for its context, now.
struct Evaluated<'a> {
    ofrep: &'a Ofrep,
    namespace: &'a Arc<str>,
    flags: &'a NamespaceFlags,
    context: &'a Map<String, Value>,
    /// Unix seconds, which rules read as `$flagd.timestamp`.
    timestamp: i64,
}

impl Evaluated<'_> {
    /// The flag `key`: 200, or 404 when no FeatureFlag defines it, or 400 when it cannot be
    /// evaluated, as flagd answers.
    fn one(&self, key: &str) -> Response<Full<Bytes>> {
        let resolution = self.evaluate(key);
        let status = match &resolution.error {
            None => StatusCode::OK,
            Some((ErrorCode::FlagNotFound, _)) => StatusCode::NOT_FOUND,
            Some(_) => StatusCode::BAD_REQUEST,
        };
        let answer = evaluation(key, &resolution, self.flags.metadata(key));
        json_response(status, answer.to_string())
    }

    /// Every flag, each answer in the list as it would be alone, with the answer's hash as its
    /// ETag; a bodiless 304 when `if_none_match` names it.
    fn all(&self, if_none_match: Option<&HeaderValue>) -> Response<Full<Bytes>> {
        let answers: Vec<Value> = self
            .flags
            .keys()
            .into_iter()
            .map(|key| evaluation(key, &self.evaluate(key), self.flags.metadata(key)))
            .collect();
        let body = json!({ "flags": answers }).to_string();
        let etag = answer::etag(body.as_bytes());
        let mut response = if if_none_match.is_some_and(|tags| matches_etag(tags, &etag)) {
            let mut response = Response::new(Full::default());
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            response
        } else {
            json_response(StatusCode::OK, body)
        };
        response.headers_mut().insert(header::ETAG, etag);
        response
    }

    /// Evaluates the flag `key`, and counts it. A key no FeatureFlag defines is counted as
    /// `unknown`: a caller names any key it likes, and each would be a series of its own.
    fn evaluate(&self, key: &str) -> Resolution<'_> {
        let resolution = self.flags.evaluate(key, self.context, self.timestamp);
        let counted_key = match &resolution.error {
            Some((ErrorCode::FlagNotFound, _)) => unknown(),
            _ => key.into(),
        };
        self.ofrep.metrics.flag_evaluation(
            FlagEvaluator::ofrep,
            self.namespace,
            &counted_key,
            &resolution,
        );
        resolution
    }
}

/// The response, with the connection closed after it: its request's body was not read to the
/// end, so the next request's first byte cannot be found.
fn closing(mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    let close = HeaderValue::from_static("close");
    response.headers_mut().insert(header::CONNECTION, close);
    response
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs() as i64)
}

#[cfg(test)]
mod tests;
