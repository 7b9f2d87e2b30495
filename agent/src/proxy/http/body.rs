//! Request bodies held whole so a mirror can send them again, within a size limit and a
//! budget shared by every worker.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Incoming};

use super::HttpProxy;

/// A request body the proxy holds whole (so it can send it again), or one too large to hold.
pub(super) enum Held {
    Whole(Bytes),
    TooLarge(Incoming),
    OverBudget(Incoming),
}

/// The bytes of request bodies held at once, across every worker: bounds the memory mirrors
/// can take however many requests arrive together.
#[derive(Debug)]
pub(super) struct BodyBudget {
    held: AtomicUsize,
    limit: usize,
}

impl BodyBudget {
    /// A budget of `limit` bytes, none of them held.
    pub(super) fn new(limit: usize) -> Self {
        Self {
            held: AtomicUsize::new(0),
            limit,
        }
    }
    /// Takes `bytes` out of the budget until the reservation drops, or None when they don't fit.
    fn reserve(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                held.checked_add(bytes).filter(|&after| after <= self.limit)
            })
            .ok()?;
        Some(Reservation {
            budget: self.clone(),
            bytes,
        })
    }
}

struct Reservation {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// A held body that gives its bytes back to the budget when the last copy of it is dropped
/// (the primary's body and the mirror's share it).
struct HeldBody {
    bytes: Bytes,
    _reservation: Reservation,
}

impl AsRef<[u8]> for HeldBody {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl HttpProxy {
    /// Holds a body whose length is known, within the limit and within what is left of the
    /// budget; gives any other back.
    pub(super) async fn hold(&self, body: Incoming) -> Result<Held, hyper::Error> {
        if body.is_end_stream() {
            return Ok(Held::Whole(Bytes::new()));
        }
        let Some(length) = body
            .size_hint()
            .exact()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n <= self.cfg.body_buffer_limit)
        else {
            return Ok(Held::TooLarge(body));
        };
        let Some(reservation) = self.body_budget.reserve(length) else {
            return Ok(Held::OverBudget(body));
        };
        let bytes = body.collect().await?.to_bytes();
        Ok(Held::Whole(Bytes::from_owner(HeldBody {
            bytes,
            _reservation: reservation,
        })))
    }
}
