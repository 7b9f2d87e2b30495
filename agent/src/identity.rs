//! The certificates of this node's workloads: one for each service account that an enrolled
//! pod on the node runs as. Each is fetched from the signer (`aviary-identity`) when the first
//! such pod is enrolled, renewed half way through its life, and dropped with the last such pod
//! or when it expires. A signer outage leaves the certificates in force until they expire;
//! `/ready` and the logs say so.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use arc_swap::{ArcSwap, ArcSwapOption};
use aviary_identity::{
    client::SignerClient, credentials::Credentials, spiffe::Identity, tls::TrustBundle,
};
use tokio::{sync::watch, time::Instant};

use crate::{policy::Policy, state::SnapshotRx};

/// Retries after a failure wait this long, doubling up to [`MAX_BACKOFF`] (ztunnel's figures).
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(150);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityConfig {
    /// The signer, host:port; the host is the name its certificate carries.
    pub signer: String,
    pub trust_domain: String,
    /// The signer's CA certificate, as the ConfigMap `aviary-trust-bundle` is mounted.
    pub trust_bundle: PathBuf,
    /// The agent's service-account token projected for the signer's audience.
    pub token: PathBuf,
}

/// The identities this node's agent needs: those of its enrolled pods' service accounts.
pub fn wanted(policy: &Policy, trust_domain: &str) -> BTreeSet<Identity> {
    policy
        .enrolled
        .values()
        .filter_map(|pod| Identity::new(trust_domain, &pod.namespace, &pod.service_account).ok())
        .collect()
}

/// Sends the identities each new snapshot's enrolled pods need, when they change.
pub async fn follow(
    mut snapshots: SnapshotRx,
    trust_domain: String,
    wanted_tx: watch::Sender<BTreeSet<Identity>>,
) {
    loop {
        let want = wanted(&snapshots.borrow_and_update().policy, &trust_domain);
        wanted_tx.send_if_modified(|current| {
            let changed = *current != want;
            *current = want;
            changed
        });
        if snapshots.changed().await.is_err() {
            return;
        }
    }
}

/// The certificates in force, by identity: the proxy reads them for each new connection.
#[derive(Default)]
pub struct Certificates {
    current: ArcSwap<BTreeMap<Identity, Arc<Credentials>>>,
    /// The roots the certificates were checked against, which peers' must chain to.
    bundle: ArcSwapOption<TrustBundle>,
    /// The latest failure, until a fetch succeeds.
    trouble: Mutex<Option<Trouble>>,
}

#[derive(Clone, Debug)]
struct Trouble {
    since: SystemTime,
    error: String,
}

impl Certificates {
    pub fn get(&self, identity: &Identity) -> Option<Arc<Credentials>> {
        self.current.load().get(identity).cloned()
    }

    pub fn bundle(&self) -> Option<Arc<TrustBundle>> {
        self.bundle.load_full()
    }

    /// One line for `/ready`: how many certificates are in force, and what is wrong.
    pub fn status(&self) -> String {
        let current = self.current.load();
        let in_force = format!(
            "{} certificate{} in force",
            current.len(),
            if current.len() == 1 { "" } else { "s" }
        );
        match self.trouble.lock().expect("not poisoned").as_ref() {
            None => format!("identity: {in_force}"),
            Some(trouble) => {
                let until = current
                    .values()
                    .map(|c| c.not_after)
                    .min()
                    .map(|t| format!(", the first until {}", rfc3339(t)))
                    .unwrap_or_default();
                format!(
                    "identity: failing since {}: {}; {in_force}{until}",
                    rfc3339(trouble.since),
                    trouble.error
                )
            }
        }
    }

    /// A certificate for `identity` from `ca`, valid for an hour (for the proxy's tests).
    #[cfg(test)]
    pub fn issue(ca: &aviary_identity::ca::Authority, identity: &Identity) -> Credentials {
        use aviary_identity::credentials::KeyRequest;
        let request = KeyRequest::new(identity).unwrap();
        let now = time::OffsetDateTime::now_utc();
        let hour = std::time::Duration::from_secs(3600);
        let leaf = ca
            .sign_workload(request.csr_pem(), identity, now, hour)
            .unwrap();
        request
            .complete(&format!("{leaf}{}", ca.certificate_pem()))
            .unwrap()
    }

    /// Holding `credentials` and trusting `bundle`, as if fetched (for the proxy's tests).
    #[cfg(test)]
    pub fn holding(credentials: Vec<Credentials>, bundle: TrustBundle) -> Self {
        let certificates = Self::default();
        certificates.set(
            credentials
                .into_iter()
                .map(|c| (c.identity.clone(), Arc::new(c)))
                .collect(),
        );
        certificates.bundle.store(Some(Arc::new(bundle)));
        certificates
    }

    fn set(&self, certificates: BTreeMap<Identity, Arc<Credentials>>) {
        self.current.store(Arc::new(certificates));
    }

    fn failed(&self, error: String) {
        let mut trouble = self.trouble.lock().expect("not poisoned");
        match trouble.as_mut() {
            Some(trouble) => trouble.error = error,
            None => {
                *trouble = Some(Trouble {
                    since: SystemTime::now(),
                    error,
                })
            }
        }
    }

    fn recovered(&self) {
        *self.trouble.lock().expect("not poisoned") = None;
    }
}

fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    rfc3339_of_secs(secs)
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, Howard Hinnant's
/// algorithm), to keep a date crate out for one log format.
fn rfc3339_of_secs(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// When each identity is next due for a fetch, after failures.
#[derive(Default)]
struct Backoff {
    retries: BTreeMap<Identity, (Instant, Duration)>,
}

impl Backoff {
    fn failed(&mut self, identity: &Identity, now: Instant) {
        let wait = match self.retries.get(identity) {
            Some((_, wait)) => (*wait * 2).min(MAX_BACKOFF),
            None => FIRST_BACKOFF,
        };
        self.retries.insert(identity.clone(), (now + wait, wait));
    }

    fn due(&self, identity: &Identity) -> Option<Instant> {
        self.retries.get(identity).map(|(at, _)| *at)
    }
}

/// Keeps `certificates` to what `wanted` asks for, until `wanted`'s sender is dropped.
pub async fn maintain(
    config: IdentityConfig,
    mut wanted: watch::Receiver<BTreeSet<Identity>>,
    certificates: Arc<Certificates>,
) {
    let mut backoff = Backoff::default();
    let mut client: Option<(String, SignerClient)> = None;
    loop {
        let want = wanted.borrow_and_update().clone();
        let now = Instant::now();
        let wall = SystemTime::now();
        // What is no longer wanted or has expired goes.
        let mut held: BTreeMap<_, _> = (**certificates.current.load())
            .iter()
            .filter(|(id, c)| want.contains(id) && !c.is_expired(wall))
            .map(|(id, c)| (id.clone(), c.clone()))
            .collect();
        backoff.retries.retain(|id, _| want.contains(id));

        for identity in &want {
            if due(identity, &held, &backoff, now, wall) > now {
                continue;
            }
            match fetch(&config, &mut client, &certificates, identity).await {
                Ok(credentials) => {
                    tracing::info!(%identity, until = rfc3339(credentials.not_after), "certificate");
                    backoff.retries.remove(identity);
                    held.insert(identity.clone(), Arc::new(credentials));
                }
                Err(error) => {
                    let in_force = held.get(identity).map(|c| rfc3339(c.not_after));
                    tracing::warn!(
                        %identity,
                        %error,
                        in_force_until = in_force.as_deref().unwrap_or("none in force"),
                        "no certificate from the signer"
                    );
                    backoff.failed(identity, Instant::now());
                    certificates.failed(format!("{identity}: {error}"));
                }
            }
        }
        // The trouble is over once no identity waits for a retry.
        if backoff.retries.is_empty() {
            certificates.recovered();
        }
        let next = want
            .iter()
            .map(|id| due(id, &held, &backoff, now, wall))
            .chain(held.values().map(|c| instant_of(c.not_after, now, wall)))
            .min();
        certificates.set(held);
        tokio::select! {
            changed = wanted.changed() => if changed.is_err() { return },
            () = sleep_until(next) => {}
        }
    }
}

/// When `identity` is next to be fetched: at once if none is held, at its renewal time if one
/// is, and after a failure when its backoff says.
fn due(
    identity: &Identity,
    held: &BTreeMap<Identity, Arc<Credentials>>,
    backoff: &Backoff,
    now: Instant,
    wall: SystemTime,
) -> Instant {
    backoff.due(identity).unwrap_or_else(|| {
        held.get(identity)
            .map_or(now, |c| instant_of(c.renew_at(), now, wall))
    })
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The monotonic instant of a wall-clock time, from a pair of readings taken together.
fn instant_of(time: SystemTime, now: Instant, wall: SystemTime) -> Instant {
    match time.duration_since(wall) {
        Ok(ahead) => now + ahead,
        Err(_) => now,
    }
}

/// One certificate, through a client for the trust bundle as it is now: the mounted ConfigMap
/// changes when the CA rotates.
async fn fetch(
    config: &IdentityConfig,
    client: &mut Option<(String, SignerClient)>,
    certificates: &Certificates,
    identity: &Identity,
) -> Result<Credentials, String> {
    let bundle = std::fs::read_to_string(&config.trust_bundle).map_err(|e| {
        format!(
            "no trust bundle at {} ({e}): is the signer installed?",
            config.trust_bundle.display()
        )
    })?;
    if client.as_ref().is_none_or(|(pem, _)| *pem != bundle) {
        let trust = TrustBundle::from_pem(&bundle, &config.trust_domain)
            .map_err(|e| format!("{}: {e}", config.trust_bundle.display()))?;
        let signer = SignerClient::new(&config.signer, &trust, config.token.clone())
            .map_err(|e| e.to_string())?;
        *client = Some((bundle, signer));
        certificates.bundle.store(Some(Arc::new(trust)));
    }
    let (_, signer) = client.as_ref().expect("just made");
    signer.certify(identity).await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identities_wanted_are_the_enrolled_pods_service_accounts_once_each() {
        let pod = |name: &str, namespace: &str, account: &str| crate::policy::EnrolledPod {
            namespace: namespace.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            service_account: account.into(),
            ips: Default::default(),
            inbound_ports_excluded: Default::default(),
            inbound: Default::default(),
        };
        let policy = Policy {
            enrolled: [
                pod("web-1", "shop", "web"),
                pod("web-2", "shop", "web"),
                pod("job", "batch", "default"),
                // Not a name a service account can have: no identity, and no panic.
                pod("odd", "shop", "Not/A/Name"),
            ]
            .into_iter()
            .map(|p| (p.uid.clone(), p))
            .collect(),
            captured: Default::default(),
        };
        let wanted: Vec<String> = wanted(&policy, "cluster.local")
            .iter()
            .map(Identity::to_string)
            .collect();
        assert_eq!(
            wanted,
            [
                "spiffe://cluster.local/ns/batch/sa/default",
                "spiffe://cluster.local/ns/shop/sa/web"
            ]
        );
    }

    #[test]
    fn dates_print_as_rfc3339() {
        assert_eq!(rfc3339_of_secs(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_of_secs(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_of_secs(1_796_083_199), "2026-11-30T23:59:59Z");
    }

    #[test]
    fn retries_back_off_from_half_a_second_to_150_seconds() {
        let mut backoff = Backoff::default();
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let now = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..12 {
            backoff.failed(&id, now);
            waits.push(backoff.due(&id).unwrap() - now);
        }
        assert_eq!(waits[0], Duration::from_millis(500));
        assert_eq!(waits[1], Duration::from_secs(1));
        assert_eq!(waits[9], MAX_BACKOFF);
        assert_eq!(waits[11], MAX_BACKOFF);
    }
}
