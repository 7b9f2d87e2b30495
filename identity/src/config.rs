//! The signer's flags (each also an environment variable, as its Deployment sets them).

use std::{net::SocketAddr, time::Duration};

use clap::Parser;

/// The Secret that holds the CA, and the ConfigMap that publishes its certificate.
pub const DEFAULT_CA_SECRET: &str = "aviary-identity-ca";
pub const DEFAULT_TRUST_BUNDLE: &str = "aviary-trust-bundle";
/// The signer's port, as Istio's CA listens on 15012.
pub const DEFAULT_PORT: u16 = 15012;

#[derive(Parser, Debug)]
#[command(version, about = "Aviary's workload identity signer")]
pub struct Flags {
    /// Where agents reach the signer (HTTPS).
    #[arg(long, env = "AVIARY_IDENTITY_LISTEN", default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// The SPIFFE trust domain of the identities it signs.
    #[arg(long, env = "AVIARY_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The signer's namespace, which holds its Secret, its ConfigMap and the agents.
    #[arg(long, env = "POD_NAMESPACE", default_value = "aviary-system")]
    pub namespace: String,
    /// The Secret that holds the CA's certificate and key (made on first start).
    #[arg(long, env = "AVIARY_CA_SECRET", default_value = DEFAULT_CA_SECRET)]
    pub ca_secret: String,
    /// The ConfigMap the trust bundle is published in.
    #[arg(
        long,
        env = "AVIARY_TRUST_BUNDLE",
        default_value = DEFAULT_TRUST_BUNDLE
    )]
    pub trust_bundle: String,
    /// The agents' service account, in --namespace.
    #[arg(long, env = "AVIARY_AGENT_SERVICE_ACCOUNT", default_value = "aviary")]
    pub agent_service_account: String,
    /// The audience the agents' projected tokens are issued for.
    #[arg(long, env = "AVIARY_TOKEN_AUDIENCE", default_value = "aviary-identity")]
    pub token_audience: String,
    /// How long a workload certificate lives (e.g. 24h, 90m); agents renew at half-life.
    #[arg(long, env = "AVIARY_CERTIFICATE_LIFETIME", default_value = "24h",
          value_parser = parse_lifetime)]
    pub certificate_lifetime: Duration,
    /// The DNS names of the signer's own certificate (default: its Service's,
    /// aviary-identity.<namespace>.svc).
    #[arg(
        long = "dns-name",
        env = "AVIARY_IDENTITY_DNS_NAMES",
        value_delimiter = ','
    )]
    pub dns_names: Vec<String>,
}

/// `<n>h`, `<n>m` or `<n>s`, from 10 seconds (for tests of renewal) to 30 days.
fn parse_lifetime(text: &str) -> Result<Duration, String> {
    let split = text.len().saturating_sub(1);
    let (number, unit) = text.split_at(split);
    let seconds = match unit {
        "h" => 3600,
        "m" => 60,
        "s" => 1,
        _ => {
            return Err(format!(
                "{text:?}: a number of hours (h), minutes (m) or seconds (s)"
            ))
        }
    };
    let lifetime = number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(seconds))
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?}: a number of hours (h), minutes (m) or seconds (s)"))?;
    if !(Duration::from_secs(10)..=Duration::from_secs(30 * 24 * 3600)).contains(&lifetime) {
        return Err(format!("{text:?}: from 10s to 720h"));
    }
    Ok(lifetime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_read_in_hours_minutes_or_seconds_within_bounds() {
        assert_eq!(parse_lifetime("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_lifetime("90m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse_lifetime("10s"), Ok(Duration::from_secs(10)));
        for bad in [
            "",
            "h",
            "24",
            "1d",
            "-1h",
            "9s",
            "721h",
            "99999999999999999999h",
        ] {
            assert!(parse_lifetime(bad).is_err(), "{bad:?}");
        }
    }
}
