//! The signer's service: its CA, kept in its own Secret; the trust bundle, published in a
//! ConfigMap; and `POST /v1/certificates` over TLS, where an authenticated agent trades a
//! signing request for a certificate of an identity it is allowed.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{body::Incoming, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use k8s_openapi::{
    api::core::v1::{ConfigMap, Secret},
    ByteString,
};
use kube::{
    api::{ObjectMeta, PostParams},
    Api, Client,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::{
    authorize::{Authorizer, Denied},
    ca::Authority,
    config::{DEFAULT_CA_SECRET, DEFAULT_TRUST_BUNDLE},
    spiffe::Identity,
};

/// The path agents post their requests to.
pub const PATH: &str = "/v1/certificates";
/// The keys of the CA Secret and of the trust bundle ConfigMap.
pub const CA_CERTIFICATE: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
/// A request is a few hundred bytes of JSON.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Every I/O of a client connection is bounded.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What an agent sends.
#[derive(Debug, Serialize, Deserialize)]
pub struct CertificateRequest {
    /// The SPIFFE ID asked for.
    pub identity: String,
    /// A PKCS#10 request in PEM, for the key the agent made.
    pub csr: String,
}

/// What the signer answers with.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateResponse {
    /// The certificate, then the CA's, in PEM.
    pub chain: String,
    pub trust_bundle: String,
}

/// A refusal, with its reason.
#[derive(Debug, Serialize, Deserialize)]
pub struct Refusal {
    pub error: String,
}

pub struct Signer {
    authority: Authority,
    authorizer: Authorizer,
    lifetime: Duration,
}

impl Signer {
    pub fn new(authority: Authority, authorizer: Authorizer, lifetime: Duration) -> Self {
        Signer {
            authority,
            authorizer,
            lifetime,
        }
    }

    pub fn trust_bundle(&self) -> &str {
        self.authority.certificate_pem()
    }

    /// One request: who is asking (the bearer token), whether it may have the identity, and
    /// the certificate.
    async fn certify(
        &self,
        token: Option<&str>,
        body: &[u8],
    ) -> Result<CertificateResponse, (StatusCode, String)> {
        let bad_request = |reason: String| (StatusCode::BAD_REQUEST, reason);
        let denied = |denied: Denied| {
            (
                StatusCode::from_u16(denied.status()).unwrap_or(StatusCode::FORBIDDEN),
                denied.to_string(),
            )
        };
        let token = token.ok_or_else(|| denied(Denied::Unauthenticated(None)))?;
        let request: CertificateRequest = serde_json::from_slice(body)
            .map_err(|e| bad_request(format!("the request is not a certificate request: {e}")))?;
        let identity: Identity = request
            .identity
            .parse()
            .map_err(|e: crate::spiffe::Error| bad_request(e.to_string()))?;
        let agent = match self.authorizer.authenticate(token).await {
            Ok(agent) => agent,
            Err(refused) => {
                tracing::warn!(%identity, reason = %refused, "refused a token");
                return Err(denied(refused));
            }
        };
        if let Err(refused) = self.authorizer.authorize(&agent, &identity).await {
            tracing::warn!(pod = agent.pod, node = agent.node, %identity, reason = %refused, "refused");
            return Err(denied(refused));
        }
        let leaf = self
            .authority
            .sign_workload(
                &request.csr,
                &identity,
                OffsetDateTime::now_utc(),
                self.lifetime,
            )
            .map_err(|e| bad_request(e.to_string()))?;
        tracing::info!(pod = agent.pod, node = agent.node, %identity, "signed");
        Ok(CertificateResponse {
            chain: format!("{leaf}{}", self.authority.certificate_pem()),
            trust_bundle: self.authority.certificate_pem().to_owned(),
        })
    }

    async fn respond(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let json = |status: StatusCode, body: String| {
            Response::builder()
                .status(status)
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))
                .expect("a valid response")
        };
        let refuse = |status: StatusCode, error: String| {
            json(
                status,
                serde_json::to_string(&Refusal { error }).expect("serializable"),
            )
        };
        if request.uri().path() != PATH {
            return refuse(StatusCode::NOT_FOUND, format!("no such path; POST {PATH}"));
        }
        if request.method() != hyper::Method::POST {
            return refuse(StatusCode::METHOD_NOT_ALLOWED, format!("POST {PATH}"));
        }
        let token = request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let body = match Limited::new(request.into_body(), MAX_REQUEST_BYTES)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("reading the request: {e}")),
        };
        match self.certify(token.as_deref(), &body).await {
            Ok(answer) => json(
                StatusCode::OK,
                serde_json::to_string(&answer).expect("serializable"),
            ),
            Err((status, error)) => refuse(status, error),
        }
    }

    /// Serves agents on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: rustls::ServerConfig) {
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let signer = self.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(IO_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake");
                        return;
                    }
                    Err(_) => return,
                };
                let service = service_fn(|request| {
                    let signer = signer.clone();
                    async move { Ok::<_, std::convert::Infallible>(signer.respond(request).await) }
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(IO_TIMEOUT)
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
                if let Err(e) = served {
                    tracing::debug!(%peer, error = %e, "connection");
                }
            });
        }
    }
}

/// One thing the signer does with the API server: the deploy tests hold its RBAC to this list.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Access {
    pub group: &'static str,
    pub resource: &'static str,
    pub verb: &'static str,
    /// In the signer's own namespace only (a Role), not cluster-wide.
    pub namespaced: bool,
    /// The one object the verb applies to, where RBAC can say so.
    pub name: Option<&'static str>,
}

/// Everything the signer does with the API server, with its default object names.
pub fn api_access() -> Vec<Access> {
    let access = |group, resource, verb, namespaced, name| Access {
        group,
        resource,
        verb,
        namespaced,
        name,
    };
    let mut all = vec![
        // Authorizer::authenticate.
        access(
            "authentication.k8s.io",
            "tokenreviews",
            "create",
            false,
            None,
        ),
        access("", "pods", "get", false, None),
        // Authorizer::authorize.
        access("", "pods", "list", false, None),
        // load_or_create_authority: `create` cannot be limited to a name in RBAC.
        access("", "secrets", "get", true, Some(DEFAULT_CA_SECRET)),
        access("", "secrets", "create", true, None),
        // publish_trust_bundle.
        access("", "configmaps", "get", true, Some(DEFAULT_TRUST_BUNDLE)),
        access("", "configmaps", "update", true, Some(DEFAULT_TRUST_BUNDLE)),
        access("", "configmaps", "create", true, None),
    ];
    all.sort();
    all
}

/// The CA kept in the Secret `name`, or, on first start, a new one put there. Of two signers
/// that race to make it, the second takes the first's.
pub async fn load_or_create_authority(
    client: &Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
) -> anyhow::Result<Authority> {
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    for _ in 0..2 {
        if let Some(secret) = secrets.get_opt(name).await? {
            let data = secret.data.unwrap_or_default();
            let field = |key: &str| {
                data.get(key)
                    .and_then(|v| String::from_utf8(v.0.clone()).ok())
                    .ok_or_else(|| anyhow::anyhow!("Secret {namespace}/{name} has no {key}"))
            };
            return Ok(Authority::from_pem(
                &field(CA_CERTIFICATE)?,
                &field(CA_KEY)?,
            )?);
        }
        let authority = Authority::generate(trust_domain, OffsetDateTime::now_utc())?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([
                (
                    CA_CERTIFICATE.to_owned(),
                    ByteString(authority.certificate_pem().as_bytes().to_vec()),
                ),
                (
                    CA_KEY.to_owned(),
                    ByteString(authority.key_pem().into_bytes()),
                ),
            ])),
            ..Default::default()
        };
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(secret = name, "made a new CA for {trust_domain}");
                return Ok(authority);
            }
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("Secret {namespace}/{name} was made and is gone again")
}

/// Publishes the trust bundle in the ConfigMap `name`, where agents read it.
pub async fn publish_trust_bundle(
    client: &Client,
    namespace: &str,
    name: &str,
    bundle: &str,
) -> anyhow::Result<()> {
    let maps = Api::<ConfigMap>::namespaced(client.clone(), namespace);
    let data = BTreeMap::from([(CA_CERTIFICATE.to_owned(), bundle.to_owned())]);
    match maps.get_opt(name).await? {
        Some(map) if map.data.as_ref() == Some(&data) => Ok(()),
        Some(mut map) => {
            map.data = Some(data);
            maps.replace(name, &PostParams::default(), &map).await?;
            Ok(())
        }
        None => {
            let map = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    ..Default::default()
                },
                data: Some(data),
                ..Default::default()
            };
            maps.create(&PostParams::default(), &map).await?;
            Ok(())
        }
    }
}
