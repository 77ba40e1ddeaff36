//! Sites across a WAN: the publisher and the stream at a hub, agents at a site whose server is a
//! leaf node of the hub through a link that delays each direction by 40 ms. Confirmation next to
//! the floors measured across the same link, and next to one round trip, the physical limit.

use std::time::Duration;

use cachecast_bus::BusConfig;
use cachecast_proto::EnvId;
use cachecast_testkit::{LeafHub, LeafSite};

use crate::report::{LatencyRow, Report};
use crate::{Floors, Settings};

/// One way across the link: an 80 ms round trip.
pub(crate) const ONE_WAY: Duration = Duration::from_millis(40);
const HUB_DOMAIN: &str = "hub";

pub(crate) async fn measure_sites(
    report: &mut Report,
    sizes: &[usize],
    settings: &Settings,
) -> anyhow::Result<()> {
    let hub = LeafHub::start(HUB_DOMAIN).await;
    let site = LeafSite::start("site", &hub.address, ONE_WAY).await;
    let mut bus = BusConfig::default();
    bus.nats.url = hub.server.url();
    let mut site_bus = bus.clone();
    site_bus.nats.url = site.server.url();
    site_bus.nats.jetstream_domain = Some(HUB_DOMAIN.into());

    let floors = Floors::start(&bus, "sites").await?;
    let mut rows: Vec<LatencyRow> = Vec::new();
    for (round, &n) in sizes.iter().enumerate() {
        eprintln!("sites: fleet of {n} at the site");
        let fleet = crate::fleet::connect(&site_bus.nats, "site-fleet", n).await?;
        let env = EnvId::new(format!("bench-site-{round}"))?;
        let (measured, agents, _durable) = floors
            .and_library(&fleet, &site_bus, &env, settings)
            .await?;
        rows.extend(measured);
        agents.stop().await;
    }
    report.sites(ONE_WAY * 2, rows);
    Ok(())
}
