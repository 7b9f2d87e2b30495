//! `aviary-identity`: the signer. One Deployment per cluster; agents ask it for their pods'
//! certificates.
#![forbid(unsafe_code)]

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use aviary_identity::{
    authorize::Authorizer,
    config::Flags,
    signer::{self, Signer},
    tls,
};
use clap::Parser as _;
use rustls::pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;

/// The signer's own certificate lives a year; it is made anew at every start.
const SERVER_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let flags = Flags::parse();
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API server")?;
    let authority = signer::load_or_create_authority(
        &client,
        &flags.namespace,
        &flags.ca_secret,
        &flags.trust_domain,
    )
    .await
    .with_context(|| format!("the CA in Secret {}/{}", flags.namespace, flags.ca_secret))?;
    signer::publish_trust_bundle(
        &client,
        &flags.namespace,
        &flags.trust_bundle,
        authority.certificate_pem(),
    )
    .await
    .with_context(|| {
        format!(
            "publishing ConfigMap {}/{}",
            flags.namespace, flags.trust_bundle
        )
    })?;

    let dns_names = if flags.dns_names.is_empty() {
        vec![format!("aviary-identity.{}.svc", flags.namespace)]
    } else {
        flags.dns_names.clone()
    };
    let key = rcgen::KeyPair::generate()?;
    let certificate = authority.sign_server(
        &key,
        &dns_names,
        OffsetDateTime::now_utc(),
        SERVER_CERTIFICATE_LIFETIME,
    )?;
    let chain = CertificateDer::pem_slice_iter(certificate.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())?;
    let tls = tls::signer_server_config(chain, key)?;

    let authorizer = Authorizer::new(
        client,
        &flags.trust_domain,
        &flags.namespace,
        &flags.agent_service_account,
        &flags.token_audience,
    );
    let signer = Arc::new(Signer::new(
        authority,
        authorizer,
        flags.certificate_lifetime,
    ));
    let listener = tokio::net::TcpListener::bind(flags.listen)
        .await
        .with_context(|| format!("listening on {}", flags.listen))?;
    tracing::info!(listen = %listener.local_addr()?, trust_domain = flags.trust_domain, "signing");
    tokio::select! {
        () = signer.serve(listener, tls) => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}
