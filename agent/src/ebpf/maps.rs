//! Typed handles on the pinned maps, each for one job. They open by pin path, so the agent, its
//! tests and diagnostics all read the maps the same way.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aviary_abi::{counter, map_name, SockAddr, SockKey};
use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray, SockHash, SockMap};

fn open(pin_dir: &Path, name: &str) -> anyhow::Result<Map> {
    let path = pin_dir.join("maps").join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

/// Which pods are enrolled and which services are captured: the only state policy writes.
/// It remembers what the maps hold, so a sync costs one syscall per change, not per entry. The
/// maps outlive agents: what it remembers starts from their contents, a previous agent's
/// entries included, and [`CaptureTable::reread`] catches up with another writer (a previous
/// agent still running).
pub struct CaptureTable {
    enrolled: HashMap<MapData, u64, u32>,
    services: HashMap<MapData, SockAddr, u32>,
    /// Enrolled pods' addresses (port 0).
    inbound: HashMap<MapData, SockAddr, u32>,
    /// Their ports that inbound capture leaves alone.
    inbound_excluded: HashMap<MapData, SockAddr, u32>,
    applied_pods: BTreeSet<u64>,
    applied_services: BTreeSet<SockAddr>,
    applied_inbound: BTreeSet<SockAddr>,
    applied_excluded: BTreeSet<SockAddr>,
}

/// What a [`CaptureTable::sync`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncChanges {
    pub pods_added: usize,
    pub pods_removed: usize,
    pub services_added: usize,
    pub services_removed: usize,
    pub inbound_added: usize,
    pub inbound_removed: usize,
}

impl SyncChanges {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl CaptureTable {
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        let enrolled: HashMap<MapData, u64, u32> = open(pin_dir, map_name::ENROLLED)?.try_into()?;
        let services: HashMap<MapData, SockAddr, u32> =
            open(pin_dir, map_name::SERVICES)?.try_into()?;
        let inbound: HashMap<MapData, SockAddr, u32> =
            open(pin_dir, map_name::INBOUND)?.try_into()?;
        let inbound_excluded: HashMap<MapData, SockAddr, u32> =
            open(pin_dir, map_name::INBOUND_EXCLUDED)?.try_into()?;
        let mut table = Self {
            inbound_excluded,
            enrolled,
            services,
            inbound,
            applied_pods: BTreeSet::new(),
            applied_services: BTreeSet::new(),
            applied_inbound: BTreeSet::new(),
            applied_excluded: BTreeSet::new(),
        };
        table.reread()?;
        Ok(table)
    }

    /// Reads what the maps hold now (one syscall per entry), for the next sync to start from.
    pub fn reread(&mut self) -> Result<(), MapError> {
        self.applied_pods = self.enrolled.keys().collect::<Result<_, _>>()?;
        self.applied_services = self.services.keys().collect::<Result<_, _>>()?;
        self.applied_inbound = self.inbound.keys().collect::<Result<_, _>>()?;
        self.applied_excluded = self.inbound_excluded.keys().collect::<Result<_, _>>()?;
        Ok(())
    }

    /// The enrolled pod cgroup ids, read from the map itself.
    pub fn enrolled(&self) -> Result<BTreeSet<u64>, MapError> {
        self.enrolled.keys().collect()
    }

    /// The captured service addresses, read from the map itself.
    pub fn services(&self) -> Result<BTreeSet<SockAddr>, MapError> {
        self.services.keys().collect()
    }

    /// Makes the maps hold exactly these pods, services and inbound pod addresses. Adds go in
    /// before removals, so that a pod moving between two states never passes through "not
    /// enrolled", and entries a previous agent wrote that are still wanted are never missing.
    pub fn sync(
        &mut self,
        pods: &BTreeSet<u64>,
        services: &BTreeSet<SockAddr>,
        inbound: &BTreeMap<IpAddr, BTreeSet<u16>>,
    ) -> anyhow::Result<SyncChanges> {
        let excluded: BTreeSet<SockAddr> = inbound
            .iter()
            .flat_map(|(&ip, ports)| {
                ports
                    .iter()
                    .map(move |&port| SockAddr::from(SocketAddr::new(ip, port)))
            })
            .collect();
        // Exclusions first, so a port is never captured on its way to being excluded.
        sync_set(
            &mut self.inbound_excluded,
            &mut self.applied_excluded,
            &excluded,
        )
        .with_context(|| format!("updating {}", map_name::INBOUND_EXCLUDED))?;
        let inbound: BTreeSet<SockAddr> = inbound
            .keys()
            .map(|&ip| SockAddr::from(SocketAddr::new(ip, 0)))
            .collect();
        let (inbound_added, inbound_removed) =
            sync_set(&mut self.inbound, &mut self.applied_inbound, &inbound)
                .with_context(|| format!("updating {}", map_name::INBOUND))?;
        let (pods_added, pods_removed) = sync_set(&mut self.enrolled, &mut self.applied_pods, pods)
            .with_context(|| format!("updating {}", map_name::ENROLLED))?;
        let (services_added, services_removed) =
            sync_set(&mut self.services, &mut self.applied_services, services)
                .with_context(|| format!("updating {}", map_name::SERVICES))?;
        Ok(SyncChanges {
            pods_added,
            pods_removed,
            services_added,
            services_removed,
            inbound_added,
            inbound_removed,
        })
    }
}

/// Brings `map` from `applied` to `want`, keeping `applied` true to the map after a failure.
fn sync_set<K: aya::Pod + Ord>(
    map: &mut HashMap<MapData, K, u32>,
    applied: &mut BTreeSet<K>,
    want: &BTreeSet<K>,
) -> Result<(usize, usize), MapError> {
    let to_add: Vec<K> = want.difference(applied).copied().collect();
    let to_remove: Vec<K> = applied.difference(want).copied().collect();
    for key in &to_add {
        map.insert(key, 1, 0)?;
        applied.insert(*key);
    }
    for key in &to_remove {
        match map.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => applied.remove(key),
            Err(e) => return Err(e),
        };
    }
    Ok((to_add.len(), to_remove.len()))
}

/// Original destinations of captured connections, as the proxy looks them up.
pub struct OrigDstTable {
    map: HashMap<MapData, SockKey, SockAddr>,
}

impl OrigDstTable {
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            map: open(pin_dir, map_name::ORIG_DST)?.try_into()?,
        })
    }

    /// The destination the pod at `peer` asked for when it connected to the proxy at `local`.
    pub fn lookup(&self, peer: SocketAddr, local: SocketAddr) -> Option<SocketAddr> {
        let key = SockKey::new(peer.into(), local.into());
        self.map.get(&key, 0).ok()?.to_socket_addr()
    }
}

/// The proxy's listening sockets, whose presence tells the programs the proxy is up.
pub struct Listeners {
    map: SockMap<MapData>,
}

impl Listeners {
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            map: open(pin_dir, map_name::LISTENERS)?.try_into()?,
        })
    }

    pub fn register(
        &mut self,
        slot: u32,
        listener: &impl std::os::fd::AsRawFd,
    ) -> anyhow::Result<()> {
        self.map
            .set(slot, listener, 0)
            .with_context(|| format!("registering the proxy listener in {}", map_name::LISTENERS))
    }
}

/// Counters and map occupancy, for logs, metrics and tests.
pub struct Stats {
    pin_dir: PathBuf,
    counters: PerCpuArray<MapData, u64>,
}

/// Entries in each connection-tracking map: all of them return to zero when no captured
/// connection is open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Occupancy {
    pub orig_by_cookie: usize,
    pub orig_dst: usize,
    pub sockets: usize,
    pub msg_bypass: usize,
}

impl Occupancy {
    pub fn total(&self) -> usize {
        self.orig_by_cookie + self.orig_dst + self.sockets + self.msg_bypass
    }
}

impl Stats {
    pub fn open(pin_dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            pin_dir: pin_dir.to_owned(),
            counters: open(pin_dir, map_name::COUNTERS)?.try_into()?,
        })
    }

    /// Every counter, summed over CPUs, by name.
    pub fn counters(&self) -> anyhow::Result<Vec<(&'static str, u64)>> {
        counter::NAMES
            .iter()
            .enumerate()
            .map(|(index, name)| {
                let per_cpu = self.counters.get(&(index as u32), 0)?;
                Ok((*name, per_cpu.iter().sum()))
            })
            .collect()
    }

    pub fn counter(&self, name: &str) -> anyhow::Result<u64> {
        self.counters()?
            .into_iter()
            .find_map(|(n, v)| (n == name).then_some(v))
            .with_context(|| format!("no counter {name}"))
    }

    pub fn occupancy(&self) -> anyhow::Result<Occupancy> {
        let dir = &self.pin_dir;
        let sockets: SockHash<MapData, SockKey> = open(dir, map_name::SOCKETS)?.try_into()?;
        Ok(Occupancy {
            orig_by_cookie: hash_len::<u64, SockAddr>(dir, map_name::ORIG_BY_COOKIE)?,
            orig_dst: hash_len::<SockKey, SockAddr>(dir, map_name::ORIG_DST)?,
            sockets: sockets.keys().count(),
            msg_bypass: hash_len::<SockKey, u32>(dir, map_name::MSG_BYPASS)?,
        })
    }
}

fn hash_len<K: aya::Pod, V: aya::Pod>(pin_dir: &Path, name: &str) -> anyhow::Result<usize> {
    let map: HashMap<MapData, K, V> = open(pin_dir, name)?.try_into()?;
    Ok(map.keys().count())
}
