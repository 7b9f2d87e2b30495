//! What inbound capture asks of the kernel over rtnetlink (not sysfs, which shows the network
//! namespace it was mounted in, not the agent's):
//! - the policy routing: packets the TC program marked are delivered to the host (a `local`
//!   route in a table of their own), where the socket assigned to them takes them;
//! - the uplinks (the default routes' interfaces), the bridge's MAC, and the pods' host-side
//!   veths, where capture runs for clients on this node.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
};

use anyhow::{anyhow, Context as _};
use aviary_abi::INBOUND_MARK;
use futures::TryStreamExt as _;
use rtnetlink::{
    packet_route::{
        link::{InfoKind, LinkAttribute, LinkInfo},
        route::{RouteAttribute, RouteScope, RouteType},
        rule::{RuleAction, RuleAttribute},
    },
    Handle, IpVersion, RouteMessageBuilder, RuleAddRequest,
};

/// The routing table of marked packets, named after the mark.
const TABLE: u32 = INBOUND_MARK;
/// The main routing table, whose default routes lead to the uplinks.
const MAIN_TABLE: u32 = 254;
/// Before the main table (32766), after the local one (0).
const PRIORITY: u32 = 100;

/// Runs `f` on a netlink connection, on a thread of its own: the datapath is set up and torn
/// down from synchronous code, inside or outside the agent's runtime.
fn with_netlink<T, F, Fut>(what: &str, f: F) -> anyhow::Result<T>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async {
                    let (connection, handle, _) = rtnetlink::new_connection()?;
                    tokio::spawn(connection);
                    f(handle).await
                })
            })
            .join()
            .map_err(|_| anyhow!("the netlink thread panicked"))?
    })
    .with_context(|| what.to_owned())
}

/// An interface's index and MAC address.
pub fn interface(name: &str) -> anyhow::Result<(u32, [u8; 6])> {
    with_netlink(
        &format!("looking up interface {name}"),
        |handle| async move {
            let link = handle
                .link()
                .get()
                .match_name(name.to_owned())
                .execute()
                .try_next()
                .await?
                .ok_or_else(|| anyhow!("no interface {name}"))?;
            let mac = link
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::Address(mac) => <[u8; 6]>::try_from(mac.as_slice()).ok(),
                    _ => None,
                })
                .ok_or_else(|| anyhow!("{name} has no MAC address"))?;
            Ok((link.header.index, mac))
        },
    )
}

/// A pod's host-side interface: the host end of a veth whose other end is in another network
/// namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInterface {
    pub name: String,
    /// A port of the pods' bridge (a bridge CNI); else routed to by the host (a routed CNI).
    pub bridged: bool,
}

/// The pods' host-side veths, by index (an index is never reused for a new interface while the
/// old one's name might be): the ports of the bridge with index `bridge`, and the veths on no
/// bridge at all. `uplinks` are left out (a test's uplink may be a veth too), and so are veths
/// on another bridge or bond, which are not pods'.
pub fn pod_interfaces(
    bridge: Option<u32>,
    uplinks: &BTreeSet<u32>,
) -> anyhow::Result<BTreeMap<u32, PodInterface>> {
    with_netlink("listing the pods' interfaces", |handle| async move {
        let links: Vec<_> = handle.link().get().execute().try_collect().await?;
        Ok(links
            .into_iter()
            .filter(|link| !uplinks.contains(&link.header.index))
            .filter_map(|link| {
                let (mut name, mut veth, mut peer_elsewhere, mut controller) =
                    (None, false, false, None);
                for attribute in link.attributes {
                    match attribute {
                        LinkAttribute::IfName(n) => name = Some(n),
                        LinkAttribute::LinkInfo(infos) => {
                            veth = infos.contains(&LinkInfo::Kind(InfoKind::Veth))
                        }
                        LinkAttribute::LinkNetNsId(_) => peer_elsewhere = true,
                        LinkAttribute::Controller(index) => controller = Some(index),
                        _ => {}
                    }
                }
                let bridged = match controller {
                    None => false,
                    Some(index) if Some(index) == bridge => true,
                    Some(_) => return None,
                };
                if !(veth && peer_elsewhere) {
                    return None;
                }
                let name = name?;
                Some((link.header.index, PodInterface { name, bridged }))
            })
            .collect())
    })
}

/// The interfaces of the IPv4 default routes of the main table: the node's uplinks.
pub fn default_route_interfaces() -> anyhow::Result<BTreeMap<u32, String>> {
    with_netlink(
        "finding the default routes' interfaces",
        |handle| async move {
            let routes: Vec<_> = handle
                .route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute()
                .try_collect()
                .await?;
            let mut indexes = BTreeSet::new();
            for route in routes {
                if route.header.destination_prefix_length != 0
                    || route.header.kind != RouteType::Unicast
                    || !route
                        .attributes
                        .contains(&RouteAttribute::Table(MAIN_TABLE))
                {
                    continue;
                }
                for attribute in route.attributes {
                    match attribute {
                        RouteAttribute::Oif(index) => {
                            indexes.insert(index);
                        }
                        RouteAttribute::MultiPath(hops) => {
                            indexes.extend(hops.iter().map(|hop| hop.interface_index));
                        }
                        _ => {}
                    }
                }
            }
            let mut interfaces = BTreeMap::new();
            for index in indexes {
                let link = handle
                    .link()
                    .get()
                    .match_index(index)
                    .execute()
                    .try_next()
                    .await?;
                let name = link
                    .into_iter()
                    .flat_map(|l| l.attributes)
                    .find_map(|a| match a {
                        LinkAttribute::IfName(name) => Some(name),
                        _ => None,
                    });
                if let Some(name) = name {
                    interfaces.insert(index, name);
                }
            }
            Ok(interfaces)
        },
    )
}

/// The address families the node routes: IPv6 too, unless the kernel has it off.
fn families() -> Vec<IpVersion> {
    let mut families = vec![IpVersion::V4];
    if std::path::Path::new("/proc/sys/net/ipv6").exists() {
        families.push(IpVersion::V6);
    }
    families
}

/// The route that makes every marked packet of `family` local.
fn local_route(family: &IpVersion) -> rtnetlink::packet_route::route::RouteMessage {
    const LO: u32 = 1;
    match family {
        IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .table_id(TABLE)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .output_interface(LO)
            .build(),
        IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .table_id(TABLE)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .output_interface(LO)
            .build(),
    }
}

/// `fwmark 0xa71b lookup 42779`, in the request's family.
async fn add_rule<T>(rule: RuleAddRequest<T>) -> Result<(), rtnetlink::Error> {
    rule.fw_mark(INBOUND_MARK)
        .table_id(TABLE)
        .priority(PRIORITY)
        .action(RuleAction::ToTable)
        .execute()
        .await
}

/// All routes of Aviary's table in `family`, as a dump request.
fn table_routes(family: &IpVersion) -> rtnetlink::packet_route::route::RouteMessage {
    match family {
        IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(TABLE)
            .build(),
        IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
            .table_id(TABLE)
            .build(),
    }
}

/// Installs the rules and the routes, for IPv4 and IPv6. Idempotent: what a previous agent
/// installed stays in place (a restart never takes inbound routing away).
pub fn install_inbound() -> anyhow::Result<()> {
    with_netlink(
        "installing the inbound policy routing",
        |handle| async move {
            for family in families() {
                let rule = handle.rule().add();
                let added = match family {
                    IpVersion::V4 => add_rule(rule.v4()).await,
                    IpVersion::V6 => add_rule(rule.v6()).await,
                };
                match added {
                    Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
                    other => other?,
                }
                handle
                    .route()
                    .add(local_route(&family))
                    .replace()
                    .execute()
                    .await?;
            }
            Ok(())
        },
    )
}

/// Removes the rules and the routes; returns how many there were.
pub fn remove_inbound() -> anyhow::Result<usize> {
    with_netlink("removing the inbound policy routing", |handle| async move {
        remove(&handle).await
    })
}

/// Deletes Aviary's rules (by their priority and table) and every route of its table; returns
/// how many it deleted.
async fn remove(handle: &Handle) -> anyhow::Result<usize> {
    let mut removed = 0;
    for family in families() {
        let rules: Vec<_> = handle
            .rule()
            .get(family.clone())
            .execute()
            .try_collect()
            .await?;
        for rule in rules {
            let ours = rule.attributes.contains(&RuleAttribute::Priority(PRIORITY))
                && rule.attributes.contains(&RuleAttribute::Table(TABLE));
            if ours {
                handle
                    .rule()
                    .del(rule)
                    .execute()
                    .await
                    .context("deleting the fwmark rule")?;
                removed += 1;
            }
        }
        let routes: Vec<_> = handle
            .route()
            .get(table_routes(&family))
            .execute()
            .try_collect()
            .await?;
        for route in routes {
            if route.attributes.contains(&RouteAttribute::Table(TABLE)) {
                handle
                    .route()
                    .del(route)
                    .execute()
                    .await
                    .context("deleting a local route")?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}
