//! An agent's side of the signer: it makes a key, sends a signing request with its projected
//! service-account token, and checks what comes back.

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::{
    credentials::{self, Credentials, KeyRequest},
    signer::{CertificateRequest, CertificateResponse, Refusal, PATH},
    spiffe::Identity,
    tls::{self, TrustBundle},
};

/// Connecting, the handshake, and the answer are each bounded by this.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the signer's address {0:?} is not host:port")]
    Address(String),
    #[error("reading the service-account token {path}: {error}")]
    Token {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("the signer at {address}: {error}")]
    Unreachable { address: String, error: String },
    #[error("the signer refused ({status}): {reason}")]
    Refused { status: StatusCode, reason: String },
    #[error("the signer's answer: {0}")]
    Answer(String),
    #[error(transparent)]
    Credentials(#[from] credentials::Error),
    #[error(transparent)]
    Tls(#[from] tls::Error),
}

pub struct SignerClient {
    address: String,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    token_path: PathBuf,
}

impl SignerClient {
    /// The signer at `address` (host:port; the host is also the name its certificate must
    /// carry), trusted through `bundle`; `token_path` is the projected token, read anew for
    /// each request because the kubelet rotates it.
    pub fn new(address: &str, bundle: &TrustBundle, token_path: PathBuf) -> Result<Self, Error> {
        let (host, _port) = address
            .rsplit_once(':')
            .filter(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
            .ok_or_else(|| Error::Address(address.to_owned()))?;
        let server_name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
            .map_err(|_| Error::Address(address.to_owned()))?;
        Ok(SignerClient {
            address: address.to_owned(),
            server_name,
            tls: TlsConnector::from(Arc::new(tls::signer_client_config(bundle)?)),
            token_path,
        })
    }

    /// A new key and a certificate for `identity`.
    pub async fn certify(&self, identity: &Identity) -> Result<Credentials, Error> {
        let key = KeyRequest::new(identity)?;
        let token = std::fs::read_to_string(&self.token_path).map_err(|error| Error::Token {
            path: self.token_path.clone(),
            error,
        })?;
        let body = serde_json::to_vec(&CertificateRequest {
            identity: identity.to_string(),
            csr: key.csr_pem().to_owned(),
        })
        .expect("serializable");
        let request = Request::post(PATH)
            .header(hyper::header::HOST, &self.address)
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", token.trim()),
            )
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("a valid request");
        let (status, answer) = tokio::time::timeout(IO_TIMEOUT, self.exchange(request))
            .await
            .map_err(|_| self.unreachable(format!("no answer within {IO_TIMEOUT:?}")))??;
        if status != StatusCode::OK {
            let reason = serde_json::from_slice::<Refusal>(&answer)
                .map(|r| r.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&answer).into_owned());
            return Err(Error::Refused { status, reason });
        }
        let answer: CertificateResponse =
            serde_json::from_slice(&answer).map_err(|e| Error::Answer(e.to_string()))?;
        Ok(key.complete(&answer.chain)?)
    }

    async fn exchange(&self, request: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), Error> {
        let tcp = TcpStream::connect(&self.address)
            .await
            .map_err(|e| self.unreachable(e.to_string()))?;
        let tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| self.unreachable(e.to_string()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| self.unreachable(e.to_string()))?;
        tokio::spawn(connection);
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| self.unreachable(e.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.unreachable(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }

    fn unreachable(&self, error: String) -> Error {
        Error::Unreachable {
            address: self.address.clone(),
            error,
        }
    }
}
