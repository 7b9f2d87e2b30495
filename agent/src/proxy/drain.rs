//! Draining: how the data plane's connections end, or move to a successor agent, when this agent
//! stops serving.
//!
//! The agent flips one signal ([`DrainSignal`]); every connection task watches it ([`Drain`]).
//! - With no successor (a plain SIGTERM): the listeners close, so new connections go direct
//!   (capture fails open); HTTP/1.1 connections close at their next response boundary
//!   (`Connection: close`), idle ones at once; HTTP/2 gets GOAWAY; opaque relays go on until the
//!   drain timeout ends the process.
//! - Handing over to a successor: HTTP/1.1 connections idle between requests, and opaque or
//!   upgraded relays once every byte they read is written, leave with their sockets and state
//!   ([`Moved`]) for the successor, which carries them on: the client never notices. Busy HTTP/1.1
//!   connections finish their request with `Connection: close`; HTTP/2 gets GOAWAY.

use std::{
    io,
    net::{SocketAddr, TcpStream},
    pin::Pin,
    sync::{
        atomic::{AtomicU8, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{mpsc, watch},
};

use crate::proxy::metrics::{Direction, Edge};

/// A connection on its way to the successor agent, with what carrying it on needs.
#[derive(Debug)]
pub enum Moved {
    /// An HTTP/1.1 client connection idle between requests, and the bytes of its next request
    /// read already (usually none).
    Http1 {
        client: TcpStream,
        buffered: Bytes,
        state: Http1State,
    },
    /// An opaque relay, or an upgraded HTTP connection (WebSocket), paused with every byte it
    /// read written.
    Relay {
        client: TcpStream,
        upstream: TcpStream,
        state: RelayState,
    },
}

/// An HTTP/1.1 connection's state beyond its socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Http1State {
    /// The listener that took it: outbound (to a service) or inbound (to a pod).
    pub listener: Direction,
    pub peer: SocketAddr,
    /// The address the client dialled: the service's, or the pod's.
    pub dst: SocketAddr,
}

/// A relay's state beyond its sockets.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RelayState {
    pub peer: SocketAddr,
    /// The edge it is measured along, with the backend and pod the split chose. Named
    /// "route" in the hand-off, as agents before this name sent it.
    #[serde(rename = "route")]
    pub edge: Option<Edge>,
}

/// What connections are asked to do.
#[derive(Debug, Clone, Default)]
enum State {
    #[default]
    Serving,
    /// Stopping with no successor.
    Closing,
    /// Moving to a successor, through this channel.
    HandingOver(mpsc::UnboundedSender<Moved>),
}

/// The agent's side: starts the drain, and learns when it is over.
#[derive(Debug)]
pub struct DrainSignal {
    state: watch::Sender<State>,
    tasks: Arc<AtomicUsize>,
}

/// How often the end of a drain is checked for.
const DRAIN_CHECK: Duration = Duration::from_millis(20);

impl DrainSignal {
    pub fn new() -> (Self, Drain) {
        let (tx, rx) = watch::channel(State::Serving);
        let tasks = Arc::new(AtomicUsize::new(0));
        let drain = Drain {
            state: rx,
            tasks: tasks.clone(),
        };
        (Self { state: tx, tasks }, drain)
    }

    /// Waits until every tracked task has ended, or `timeout` passed; returns how many were
    /// left.
    pub async fn finished(&self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = self.tasks.load(Ordering::Acquire);
            if left == 0 || tokio::time::Instant::now() >= deadline {
                return left;
            }
            tokio::time::sleep(DRAIN_CHECK).await;
        }
    }

    /// Connections close (or finish), none moves.
    pub fn close(&self) {
        self.state.send_replace(State::Closing);
    }

    /// Connections move to the successor: they arrive on the returned channel.
    pub fn hand_over(&self) -> mpsc::UnboundedReceiver<Moved> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.state.send_replace(State::HandingOver(tx));
        rx
    }
}

/// A connection's side of the drain signal. Cloning it is cheap (reference counts).
#[derive(Debug, Clone)]
pub struct Drain {
    state: watch::Receiver<State>,
    /// Tasks that the drain waits for.
    tasks: Arc<AtomicUsize>,
}

/// A task the drain waits for, while it lives.
#[derive(Debug)]
pub struct Tracked(Arc<AtomicUsize>);

impl Drop for Tracked {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where a connection goes to move to the successor.
#[derive(Debug, Clone)]
pub struct Handover(mpsc::UnboundedSender<Moved>);

impl Handover {
    /// Sends the connection on; false if the successor is gone (the connection closes).
    pub fn send(&self, moved: Moved) -> bool {
        self.0.send(moved).is_ok()
    }

    /// Whether the successor still takes connections.
    pub fn is_open(&self) -> bool {
        !self.0.is_closed()
    }
}

impl Drain {
    /// Makes the drain wait for the task that holds the result.
    pub fn track(&self) -> Tracked {
        self.tasks.fetch_add(1, Ordering::AcqRel);
        Tracked(self.tasks.clone())
    }

    /// Resolves once the drain begins: with where connections move, if a successor takes them.
    pub async fn started(&self) -> Option<Handover> {
        let mut rx = self.state.clone();
        let state = rx
            .wait_for(|s| !matches!(s, State::Serving))
            .await
            .map(|state| state.clone());
        match state {
            Ok(State::HandingOver(tx)) => Some(Handover(tx)),
            Ok(_) => None,
            // Nobody will ever start it (a proxy built without a drain).
            Err(_) => std::future::pending().await,
        }
    }

    /// Resolves once connections are to move to a successor; never while closing or serving.
    pub async fn handing_over(&self) -> Handover {
        match self.started().await {
            Some(handover) => handover,
            None => std::future::pending().await,
        }
    }

    /// Where connections move now, if they do.
    pub fn handover(&self) -> Option<Handover> {
        match &*self.state.borrow() {
            State::HandingOver(tx) => Some(Handover(tx.clone())),
            _ => None,
        }
    }
}

/// Client I/O that an HTTP/1.1 server can let go of: once [`Detach::request`]ed, the server's
/// closing shutdown is skipped, unless the server wrote to the client since (then the client was
/// answered, told `Connection: close`, and expects the close).
pub struct Detachable<T> {
    io: T,
    detach: Detach,
}

/// The handle that asks a [`Detachable`] to let go, and tells whether it did.
#[derive(Debug, Clone, Default)]
pub struct Detach(Arc<AtomicU8>);

const ATTACHED: u8 = 0;
const REQUESTED: u8 = 1;
/// Written to after the request: the shutdown goes ahead.
const ANSWERED: u8 = 2;
/// The shutdown was skipped: the connection is whole, and can move.
const DETACHED: u8 = 3;

impl Detach {
    pub fn request(&self) {
        let _ = self
            .0
            .compare_exchange(ATTACHED, REQUESTED, Ordering::AcqRel, Ordering::Acquire);
    }

    fn note_write(&self, written: &Poll<io::Result<usize>>) {
        if matches!(written, Poll::Ready(Ok(n)) if *n > 0) {
            let _ =
                self.0
                    .compare_exchange(REQUESTED, ANSWERED, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// Whether the server let go of the connection without closing it.
    pub fn detached(&self) -> bool {
        self.0.load(Ordering::Acquire) == DETACHED
    }
}

impl<T> Detachable<T> {
    pub fn new(io: T, detach: Detach) -> Self {
        Self { io, detach }
    }

    pub fn into_inner(self) -> T {
        self.io
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Detachable<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Detachable<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        self.detach.note_write(&written);
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.detach.note_write(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let skipped = self.detach.0.compare_exchange(
            REQUESTED,
            DETACHED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        if skipped.is_ok() || skipped == Err(DETACHED) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn a_requested_detach_skips_the_shutdown_unless_the_client_was_answered() {
        // Detached: the peer sees no end of stream.
        let (io, mut peer) = duplex(64);
        let detach = Detach::default();
        let mut io = Detachable::new(io, detach.clone());
        detach.request();
        io.shutdown().await.unwrap();
        assert!(detach.detached());
        let read = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            peer.read(&mut [0u8; 1]),
        )
        .await;
        assert!(read.is_err(), "the shutdown went through: {read:?}");

        // Answered after the request: the shutdown goes through.
        let (io, mut peer) = duplex(64);
        let detach = Detach::default();
        let mut io = Detachable::new(io, detach.clone());
        detach.request();
        io.write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        io.shutdown().await.unwrap();
        assert!(!detach.detached());
        let mut answer = Vec::new();
        peer.read_to_end(&mut answer).await.unwrap();
        assert!(answer.ends_with(b"close\r\n\r\n"));

        // Never requested: an ordinary shutdown.
        let (io, mut peer) = duplex(64);
        let detach = Detach::default();
        let mut io = Detachable::new(io, detach.clone());
        io.shutdown().await.unwrap();
        assert!(!detach.detached());
        assert_eq!(peer.read(&mut [0u8; 1]).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn connections_learn_whether_they_close_or_move() {
        let (signal, drain) = DrainSignal::new();
        let waiting = tokio::spawn({
            let drain = drain.clone();
            async move { drain.started().await.is_some() }
        });
        assert!(drain.handover().is_none());
        let mut moved = signal.hand_over();
        assert!(waiting.await.unwrap(), "a successor takes them");
        let handover = drain.handing_over().await;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let state = Http1State {
            listener: Direction::outbound,
            peer: client.local_addr().unwrap(),
            dst: listener.local_addr().unwrap(),
        };
        handover
            .send(Moved::Http1 {
                client,
                buffered: Bytes::new(),
                state: state.clone(),
            })
            .then_some(())
            .unwrap();
        match moved.recv().await.unwrap() {
            Moved::Http1 { state: got, .. } => assert_eq!(got, state),
            other => panic!("{other:?}"),
        }

        let (signal, drain) = DrainSignal::new();
        signal.close();
        assert!(drain.started().await.is_none(), "closing: nothing moves");
    }
}
