//! Mirroring: which requests a mirror rule copies, and the copies sent in the background,
//! bounded per backend and worker, measured and never seen by the client.

use std::{cell::RefCell, collections::HashMap, sync::Arc, time::Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Version};
use http_body_util::BodyExt as _;

use super::{headers::upstream_version, HttpProxy, OutboundAnswer, Resolved, MIRROR_HEADER};
use crate::proxy::pool::full;
use crate::{
    proxy::{
        balance,
        metrics::{MethodClass, MirrorOutcome, Principals},
        pool::SendError,
        split::{sampled, with_rng},
    },
    table::{Backend, Mirror, ServiceRoutes},
};

/// A mirror backend, by (namespace, name).
type MirrorBackend = (Arc<str>, Arc<str>);

thread_local! {
    /// Mirrored requests in flight on this worker, by mirror backend.
    static MIRRORS_IN_FLIGHT: RefCell<HashMap<MirrorBackend, usize>> = RefCell::default();
}

/// One mirrored request in flight to a backend; the place is given back when it drops (on the
/// worker that took it: a mirror's task never leaves its worker).
struct MirrorSlot {
    backend: MirrorBackend,
}

impl MirrorSlot {
    /// A place among `bound` for a copy to `backend`, or None when they are all taken.
    fn take(backend: &Backend, bound: usize) -> Option<Self> {
        let key = (backend.namespace.clone(), backend.name.clone());
        MIRRORS_IN_FLIGHT.with_borrow_mut(|in_flight| {
            let taken = in_flight.entry(key.clone()).or_default();
            (*taken < bound).then(|| {
                *taken += 1;
                Self { backend: key }
            })
        })
    }
}

impl Drop for MirrorSlot {
    fn drop(&mut self) {
        MIRRORS_IN_FLIGHT.with_borrow_mut(|in_flight| {
            if let Some(taken) = in_flight.get_mut(&self.backend) {
                *taken -= 1;
                if *taken == 0 {
                    in_flight.remove(&self.backend);
                }
            }
        });
    }
}

impl HttpProxy {
    /// Whether this request is copied to `mirror`: sampled, then allowed by method. A request
    /// left out for its method is counted.
    pub(super) fn mirror_wanted<'m>(
        &self,
        mirror: &'m Mirror,
        parts: &http::request::Parts,
    ) -> Option<&'m Mirror> {
        if !with_rng(|rng| sampled(mirror.numerator, mirror.denominator, rng)) {
            return None;
        }
        if !mirror.safe_methods.allows(&parts.method, &parts.headers) {
            self.metrics.mirror(
                MirrorOutcome::SkippedNotIdempotent,
                &mirror.backend.namespace,
                &mirror.backend.name,
            );
            return None;
        }
        Some(mirror)
    }

    /// Sends a copy of the request to the mirror backend, in the background: the primary never
    /// waits for it, and nothing about the mirror reaches the client.
    pub(super) fn mirror(
        &self,
        mirror: &Mirror,
        parts: &http::request::Parts,
        body: Bytes,
        service: &Arc<ServiceRoutes>,
        facts: &Resolved,
    ) {
        let target = &mirror.backend;
        let record = |outcome| {
            self.metrics
                .mirror(outcome, &target.namespace, &target.name)
        };
        let Some(permit) = MirrorSlot::take(target, self.cfg.mirror_in_flight) else {
            return record(MirrorOutcome::DroppedOverload);
        };
        let Some(endpoint) = with_rng(|rng| balance::pick(&target.endpoints, None, rng)) else {
            return record(MirrorOutcome::Failed);
        };
        let from = facts.tunnel_from.as_ref();
        if self.admitted_locally(&endpoint, from).is_err() {
            return record(MirrorOutcome::Failed);
        }
        let Ok(upstream) = self.upstream(&endpoint, from) else {
            return record(MirrorOutcome::Failed);
        };
        let mut request = Request::new(full(body));
        *request.method_mut() = parts.method.clone();
        *request.version_mut() = upstream_version(parts.version);
        *request.headers_mut() = parts.headers.clone();
        // HTTP/2 names the host in the URI's authority; HTTP/1.1 in Host.
        *request.uri_mut() = match parts.version {
            Version::HTTP_2 => {
                let mut uri = parts.uri.clone().into_parts();
                uri.scheme = Some(http::uri::Scheme::HTTP);
                uri.authority = Some(mirror.authority.clone());
                http::Uri::from_parts(uri).unwrap_or_else(|_| parts.uri.clone())
            }
            _ => parts.uri.clone(),
        };
        request
            .headers_mut()
            .insert(header::HOST, mirror.host.clone());
        request
            .headers_mut()
            .insert(MIRROR_HEADER, HeaderValue::from_static("1"));
        let pool = self.pool.clone();
        let timeout = self.cfg.mirror_timeout;
        let metrics = self.metrics.clone();
        let method = MethodClass::from(&parts.method);
        let (table, source, service) = (facts.table, facts.source.clone(), service.clone());
        let target = target.clone();
        // A drain lets a mirror finish, within its timeout.
        let tracked = self.drain.track();
        tokio::spawn(async move {
            let _permit = (permit, tracked);
            let start = Instant::now();
            let exchange = async {
                let response = match pool.send(&upstream, request, false).await {
                    Ok(response) => response,
                    Err(SendError::NotSent { error, .. }) => return Err(error.into()),
                    Err(SendError::Failed(e)) => return Err(e.into()),
                    Err(SendError::Refused(reason)) => return Err(reason.into()),
                };
                let status = response.status();
                let principals = response.extensions().get::<Arc<Principals>>().cloned();
                // Read the whole response, then drop it: measured, never seen.
                response.into_body().collect().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, principals))
            };
            let outcome = match tokio::time::timeout(timeout, exchange).await {
                Ok(Ok((status, principals))) => {
                    let answer = OutboundAnswer {
                        principals: principals.as_ref(),
                        source: &source,
                        service: &service,
                        backend: Some(&target),
                        pod: endpoint.pod.as_ref(),
                        // As for the request it copies: left to the pod's own agent when that
                        // one measures it.
                        flagger: !endpoint.measured_at_destination,
                        mirror: true,
                    };
                    answer.record(&metrics, table, method, status.as_u16(), start.elapsed());
                    MirrorOutcome::Sent
                }
                Ok(Err(_)) => MirrorOutcome::Failed,
                Err(_) => MirrorOutcome::TimedOut,
            };
            metrics.mirror(outcome, &target.namespace, &target.name);
        });
    }
}
