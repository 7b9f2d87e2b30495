//! Keeps the capture maps equal to the policy in force: enrolled pods (by pod cgroup id) and
//! captured service addresses. The maps outlive agents, so they start out holding what the
//! previous agent wrote: the first sync converges them (what is wanted stays throughout).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use aviary_abi::SockAddr;
use tracing::{info, warn};

use crate::{cgroup::PodCgroups, ebpf::maps::CaptureTable, state::SnapshotRx};

/// Pods enrolled before their cgroup exists are looked for again this often.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// How often the maps' contents are read again before a sync (one syscall per entry): a
/// previous agent may still be writing them while this one starts (an upgrade), and whatever
/// it wrote last is set right within this time.
const REREAD_INTERVAL: Duration = Duration::from_secs(60);

/// Keeps the maps in sync; sets `ready` once the first snapshot is in them.
pub async fn run(
    mut snapshots: SnapshotRx,
    mut table: CaptureTable,
    mut cgroups: PodCgroups,
    ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let mut waiting_for_cgroup = BTreeSet::new();
    let mut retry = tokio::time::interval(RETRY_INTERVAL);
    let mut reread = tokio::time::interval_at(
        tokio::time::Instant::now() + REREAD_INTERVAL,
        REREAD_INTERVAL,
    );
    // The first sync starts from the maps as they are then, not as they were when opened.
    let mut stale = true;
    loop {
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { return },
            _ = retry.tick(), if !waiting_for_cgroup.is_empty() => {},
            _ = reread.tick() => stale = true,
        }
        let snapshot = snapshots.borrow_and_update().clone();
        if snapshot.generation == 0 {
            continue;
        }
        if stale {
            match table.reread() {
                Ok(()) => stale = false,
                Err(e) => {
                    warn!(error = %e, "reading the capture maps failed; retrying");
                    continue;
                }
            }
        }
        let mut pods = BTreeSet::new();
        let mut missing = BTreeSet::new();
        for pod in snapshot.policy.enrolled.values() {
            match cgroups.id_of(&pod.uid) {
                Some(id) => {
                    pods.insert(id);
                }
                None => {
                    if !waiting_for_cgroup.contains(&pod.uid) {
                        info!(pod = %format!("{}/{}", pod.namespace, pod.name), uid = %pod.uid, "enrolled pod has no cgroup yet; it is captured once it starts");
                    }
                    missing.insert(pod.uid.clone());
                }
            }
        }
        waiting_for_cgroup = missing;
        let services: BTreeSet<SockAddr> = snapshot
            .policy
            .captured
            .iter()
            .map(|&addr| addr.into())
            .collect();
        let inbound: BTreeMap<IpAddr, BTreeSet<u16>> = snapshot
            .policy
            .enrolled
            .values()
            .flat_map(|pod| {
                pod.ips
                    .iter()
                    .map(|&ip| (ip, pod.inbound_ports_excluded.clone()))
            })
            .collect();
        let synced = table.sync(&pods, &services, &inbound);
        if synced.is_ok() {
            ready.store(true, std::sync::atomic::Ordering::Release);
        }
        match synced {
            Ok(changes) if !changes.is_empty() => info!(
                generation = snapshot.generation,
                pods_added = changes.pods_added,
                pods_removed = changes.pods_removed,
                services_added = changes.services_added,
                services_removed = changes.services_removed,
                inbound_added = changes.inbound_added,
                inbound_removed = changes.inbound_removed,
                "capture maps updated"
            ),
            Ok(_) => {}
            Err(e) => {
                warn!(error = %format!("{e:#}"), "updating the capture maps failed; retrying")
            }
        }
    }
}
