//! What inbound capture asks of the kernel over rtnetlink (not sysfs, which shows the network
//! namespace it was mounted in, not the agent's):
//! - the policy routing: packets the TC program marked are delivered to the host (a `local`
//!   route in a table of their own), where the socket assigned to them takes them;
//! - the bridge's MAC and its ports, where capture runs for clients on this node.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{anyhow, Context as _};
use aviary_abi::INBOUND_MARK;
use futures::TryStreamExt as _;
use rtnetlink::{
    packet_route::{
        link::LinkAttribute,
        route::{RouteAttribute, RouteScope, RouteType},
        rule::{RuleAction, RuleAttribute},
    },
    Handle, IpVersion, RouteMessageBuilder,
};

/// The routing table of marked packets, named after the mark.
const TABLE: u32 = INBOUND_MARK;
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

/// The interfaces enslaved to the bridge with index `bridge`, by index (an index is never reused
/// for a new interface while the old one's name might be).
pub fn bridge_ports(bridge: u32) -> anyhow::Result<BTreeMap<u32, String>> {
    with_netlink("listing the bridge's ports", |handle| async move {
        let links: Vec<_> = handle.link().get().execute().try_collect().await?;
        Ok(links
            .into_iter()
            .filter(|link| link.attributes.contains(&LinkAttribute::Controller(bridge)))
            .filter_map(|link| {
                let index = link.header.index;
                link.attributes.into_iter().find_map(|a| match a {
                    LinkAttribute::IfName(name) => Some((index, name)),
                    _ => None,
                })
            })
            .collect())
    })
}

/// The route that makes every marked packet local.
fn local_route() -> rtnetlink::packet_route::route::RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .table_id(TABLE)
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .output_interface(1) // lo
        .build()
}

/// Installs the rule and the route, replacing any a killed agent left.
pub fn install_inbound() -> anyhow::Result<()> {
    with_netlink(
        "installing the inbound policy routing",
        |handle| async move {
            remove(&handle).await?;
            handle
                .rule()
                .add()
                .v4()
                .fw_mark(INBOUND_MARK)
                .table_id(TABLE)
                .priority(PRIORITY)
                .action(RuleAction::ToTable)
                .execute()
                .await?;
            handle
                .route()
                .add(local_route())
                .replace()
                .execute()
                .await?;
            Ok(())
        },
    )
}

pub fn remove_inbound() -> anyhow::Result<()> {
    with_netlink("removing the inbound policy routing", |handle| async move {
        remove(&handle).await
    })
}

/// Deletes Aviary's rule (by its priority and table) and every route of its table.
async fn remove(handle: &Handle) -> anyhow::Result<()> {
    let rules: Vec<_> = handle
        .rule()
        .get(IpVersion::V4)
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
        }
    }
    let routes: Vec<_> = handle
        .route()
        .get(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .table_id(TABLE)
                .build(),
        )
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
        }
    }
    Ok(())
}
