//! A small gRPC service for testing the proxy with real gRPC (tonic on both sides), shared by the
//! in-process tests and the test pods. The messages are derived with prost and the service is
//! written with tonic's own server and client pieces, so nothing needs protoc.
//!
//! `aviary.test.Echo` has two methods, and every reply names the backend that sent it:
//! - `Unary`: echoes the request's text, or ends with the status the request asks for;
//! - `ServerStreaming`: sends `count` replies, then ends with the status the request asks for.
//!
//! A call ends with its status in the response's trailers (`grpc-status`, `grpc-message`), or,
//! when it fails before any reply, in the headers of a response with no body (gRPC's
//! "Trailers-Only"). The tonic client takes an HTTP 200 without a `grpc-status` as an error, so a
//! call that succeeds shows that its trailers arrived.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use http::uri::PathAndQuery;
use tonic::{
    body::Body,
    server::{Grpc, ServerStreamingService, UnaryService},
    transport::{server::TcpIncoming, Channel, Endpoint, Server},
    Code, Status,
};
use tonic_prost::ProstCodec;

const UNARY: &str = "/aviary.test.Echo/Unary";
const SERVER_STREAMING: &str = "/aviary.test.Echo/ServerStreaming";

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    /// What `Unary` echoes; the status message when the request asks for a failure.
    #[prost(string, tag = "1")]
    pub text: String,
    /// The code the call ends with (`tonic::Code` as a number); 0, OK, by default.
    #[prost(int32, tag = "2")]
    pub code: i32,
    /// How many replies `ServerStreaming` sends before its status.
    #[prost(uint32, tag = "3")]
    pub count: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    #[prost(string, tag = "1")]
    pub text: String,
    /// The name of the backend that answered.
    #[prost(string, tag = "2")]
    pub backend: String,
    /// The reply's place in a stream, from 0.
    #[prost(uint32, tag = "3")]
    pub index: u32,
}

/// The status a request asks to end with, if it asks for a failure.
fn asked_failure(request: &EchoRequest) -> Option<Status> {
    let code = Code::from_i32(request.code);
    (code != Code::Ok).then(|| Status::new(code, request.text.clone()))
}

/// The service, as a backend named `backend` serves it.
#[derive(Clone)]
struct Echo {
    backend: Arc<str>,
}

impl Echo {
    fn reply(&self, text: &str, index: u32) -> EchoReply {
        EchoReply {
            text: text.to_owned(),
            backend: self.backend.to_string(),
            index,
        }
    }
}

impl UnaryService<EchoRequest> for Echo {
    type Response = EchoReply;
    type Future = std::future::Ready<Result<tonic::Response<EchoReply>, Status>>;

    fn call(&mut self, request: tonic::Request<EchoRequest>) -> Self::Future {
        let request = request.into_inner();
        std::future::ready(match asked_failure(&request) {
            Some(status) => Err(status),
            None => Ok(tonic::Response::new(self.reply(&request.text, 0))),
        })
    }
}

impl ServerStreamingService<EchoRequest> for Echo {
    type Response = EchoReply;
    type ResponseStream = futures::stream::Iter<std::vec::IntoIter<Result<EchoReply, Status>>>;
    type Future = std::future::Ready<Result<tonic::Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: tonic::Request<EchoRequest>) -> Self::Future {
        let request = request.into_inner();
        let replies = (0..request.count).map(|index| Ok(self.reply(&request.text, index)));
        let items: Vec<_> = replies.chain(asked_failure(&request).map(Err)).collect();
        std::future::ready(Ok(tonic::Response::new(futures::stream::iter(items))))
    }
}

impl tower_service::Service<http::Request<Body>> for Echo {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let echo = self.clone();
        let mut grpc = Grpc::new(ProstCodec::<EchoReply, EchoRequest>::default());
        match request.uri().path() {
            UNARY => Box::pin(async move { Ok(grpc.unary(echo, request).await) }),
            SERVER_STREAMING => {
                Box::pin(async move { Ok(grpc.server_streaming(echo, request).await) })
            }
            path => {
                let status = Status::unimplemented(format!("no method {path}"));
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// Serves the service on `listener` (HTTP/2 without TLS, as gRPC is served in a cluster) as the
/// backend named `backend`, until the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    backend: &str,
) -> Result<(), tonic::transport::Error> {
    let echo = Echo {
        backend: backend.into(),
    };
    Server::builder()
        .serve_with_incoming(echo, TcpIncoming::from(listener))
        .await
}

/// A tonic client of the service: one HTTP/2 connection, which carries every call.
pub struct Client {
    grpc: tonic::client::Grpc<Channel>,
}

/// How a server-streaming call went: the replies that arrived, then its final status.
pub struct Streamed {
    pub replies: Vec<EchoReply>,
    pub status: Status,
}

impl Client {
    /// Connects to `addr`. Each call is bounded by a timeout, so a call the proxy loses fails.
    pub async fn connect(addr: SocketAddr) -> Result<Self, tonic::transport::Error> {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect()
            .await?;
        Ok(Self {
            grpc: tonic::client::Grpc::new(channel),
        })
    }

    pub async fn unary(&mut self, request: EchoRequest) -> Result<EchoReply, Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let path = PathAndQuery::from_static(UNARY);
        let response = self
            .grpc
            .unary(tonic::Request::new(request), path, ProstCodec::default())
            .await?;
        Ok(response.into_inner())
    }

    /// Reads the whole stream: every reply, and the status it ends with (OK included).
    pub async fn server_streaming(&mut self, request: EchoRequest) -> Streamed {
        let mut replies = Vec::new();
        let status = match self.read_stream(request, &mut replies).await {
            Ok(()) => Status::new(Code::Ok, ""),
            Err(status) => status,
        };
        Streamed { replies, status }
    }

    async fn read_stream(
        &mut self,
        request: EchoRequest,
        replies: &mut Vec<EchoReply>,
    ) -> Result<(), Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let path = PathAndQuery::from_static(SERVER_STREAMING);
        let mut stream = self
            .grpc
            .server_streaming(tonic::Request::new(request), path, ProstCodec::default())
            .await?
            .into_inner();
        while let Some(reply) = stream.message().await? {
            replies.push(reply);
        }
        Ok(())
    }
}
