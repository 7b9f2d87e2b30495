//! One writer of route status per cluster: the agent that holds a coordination.k8s.io Lease.
//!
//! Expiry is judged by this agent's own clock, from when it last saw the lease change (as
//! client-go's leader election does), so clock skew between nodes cannot hand the lease over
//! early.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{api::PostParams, Api, Client};
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This agent's identity in the lease: its node name.
    pub identity: String,
    /// How long a holder that stops renewing keeps the lease.
    pub duration: Duration,
    /// How often the holder renews, and others check.
    pub renew_every: Duration,
}

impl LeaseConfig {
    pub fn new(namespace: String, identity: String) -> Self {
        Self {
            namespace,
            name: "aviary-status-writer".into(),
            identity,
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }
}

pub struct LeaseHolder {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The lease's resourceVersion when this agent last saw it change, and when that was.
    observed: Option<(String, Instant)>,
    /// Until when this agent may act as the holder.
    held_until: Option<Instant>,
}

impl LeaseHolder {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
            held_until: None,
        }
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    /// Whether this agent holds the lease now, by its last successful renewal.
    pub fn is_held(&self) -> bool {
        self.held_until.is_some_and(|until| Instant::now() < until)
    }

    /// Takes the lease if it is free or expired, or renews it if this agent holds it. Returns
    /// whether this agent holds it afterwards. A lost race (409 Conflict) is not an error.
    pub async fn acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let started = Instant::now();
        let held = match self.api.get_opt(&self.config.name).await? {
            None => self.write(None).await?,
            Some(lease) => {
                let version = lease.metadata.resource_version.clone().unwrap_or_default();
                if self.observed.as_ref().map(|(v, _)| v) != Some(&version) {
                    self.observed = Some((version, started));
                }
                let spec = lease.spec.clone().unwrap_or_default();
                let mine = spec.holder_identity.as_deref() == Some(&self.config.identity);
                let vacant = spec
                    .holder_identity
                    .as_deref()
                    .unwrap_or_default()
                    .is_empty();
                let expired = self.observed.as_ref().is_some_and(|(_, seen)| {
                    started.duration_since(*seen) > lease_duration(&spec, self.config.duration)
                });
                if mine || vacant || expired {
                    self.write(Some(lease)).await?
                } else {
                    false
                }
            }
        };
        // Counted from before the request, so a slow answer never stretches the holding.
        self.held_until = held.then(|| started + self.config.duration);
        Ok(held)
    }

    /// Creates the lease, or replaces `current` under its resourceVersion, naming this agent.
    async fn write(&mut self, current: Option<Lease>) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let previous = current
            .as_ref()
            .and_then(|l| l.spec.clone())
            .unwrap_or_default();
        let mine = previous.holder_identity.as_deref() == Some(&self.config.identity);
        let spec = LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(self.config.duration.as_secs().max(1) as i32),
            acquire_time: if mine {
                previous.acquire_time
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(
                previous.lease_transitions.unwrap_or(0) + i32::from(current.is_some() && !mine),
            ),
            ..LeaseSpec::default()
        };
        let result = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.name.clone()),
                        namespace: Some(self.config.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            Some(mut lease) => {
                lease.spec = Some(spec);
                self.api
                    .replace(&self.config.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(lease) => {
                let version = lease.metadata.resource_version.unwrap_or_default();
                self.observed = Some((version, Instant::now()));
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Hands the lease back if this agent holds it, so that another agent takes it at its next
/// check instead of after expiry. Returns whether it did.
pub async fn release(client: Client, config: &LeaseConfig) -> Result<bool, kube::Error> {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        return Ok(false);
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(&config.identity) {
        return Ok(false);
    }
    spec.holder_identity = None;
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    spec.lease_duration_seconds = Some(1);
    match api
        .replace(&config.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        // Someone wrote in between: the lease is no longer this agent's to release.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

fn lease_duration(spec: &LeaseSpec, default: Duration) -> Duration {
    spec.lease_duration_seconds
        .filter(|s| *s > 0)
        .map_or(default, |s| Duration::from_secs(s as u64))
}
