//! The hand-off between a running agent and its successor (an upgrade), over a Unix socket in a
//! directory both agents' pods mount.
//!
//! The running agent listens on the socket. A successor connects, says hello with the kinds of
//! listener it takes, and:
//! 1. receives the listening sockets of those kinds (SCM_RIGHTS): the same sockets, so the
//!    LISTENERS map keeps holding live listeners and not one connection waiting in an accept
//!    queue is lost;
//! 2. says it accepts on them; the running agent stops accepting and stops writing the eBPF
//!    maps, and drains ([`crate::proxy::drain`]);
//! 3. receives, one message each, the connections that move with their sockets and state, then
//!    `Done`.
//!
//! SOCK_SEQPACKET keeps each message whole with its descriptors. A message is a little-endian
//! u32 length, that many bytes of JSON, then the raw bytes the JSON says follow (an HTTP/1.1
//! connection's next request, read already).

use std::{
    io::{self, IoSlice, IoSliceMut},
    mem::MaybeUninit,
    net::{TcpListener, TcpStream},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use rustix::net::{
    self as net, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};

use crate::proxy::drain::{Http1State, Moved, RelayState};

/// Bumped when a message changes: a successor with another version starts on its own instead.
const PROTOCOL_VERSION: u32 = 1;

/// The longest message: the JSON and an HTTP/1.1 request head read already (at most
/// `--max-header-bytes`, 64 KiB by default, and hyper's read buffer beyond it).
const MAX_MESSAGE: usize = 512 * 1024;

/// The most descriptors one message carries: the listeners of every worker.
const MAX_FDS: usize = 253;

/// How long either side waits for the other's next message during the exchange.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a handed-over listening socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ListenerKind {
    Outbound,
    Inbound,
    Admin,
    Health,
    Metrics,
    Ofrep,
    /// A kind that a newer successor takes and this agent does not know: it holds none.
    #[serde(other)]
    Unknown,
}

impl ListenerKind {
    /// What a successor whose hello names no kinds takes: an agent built before hellos named
    /// them, which fails on a kind it does not know. It takes these, and binds nothing else.
    const UNNAMED: [ListenerKind; 5] = [
        ListenerKind::Outbound,
        ListenerKind::Inbound,
        ListenerKind::Admin,
        ListenerKind::Health,
        ListenerKind::Metrics,
    ];
}

#[derive(Debug, Serialize, Deserialize)]
enum Message {
    Hello {
        version: u32,
        /// The kinds of listener the successor takes; absent from agents built before hellos
        /// named them ([`ListenerKind::UNNAMED`]).
        #[serde(default)]
        takes: Option<Vec<ListenerKind>>,
    },
    /// One kind per descriptor, in order.
    Listeners {
        kinds: Vec<ListenerKind>,
    },
    Accepting,
    /// Descriptors: the client. Followed by `buffered` bytes.
    Http1 {
        state: Http1State,
        buffered: usize,
    },
    /// Descriptors: the client, then the upstream.
    Relay {
        state: RelayState,
    },
    Done,
}

/// The agent's listening sockets: those a predecessor handed over, taken by kind and address
/// family, else bound anew; and a copy of each, for a successor.
#[derive(Default)]
pub struct Sockets {
    received: Vec<(ListenerKind, TcpListener)>,
    held: Vec<(ListenerKind, OwnedFd)>,
}

impl Sockets {
    pub fn new(received: Vec<(ListenerKind, TcpListener)>) -> Self {
        Self {
            received,
            held: Vec::new(),
        }
    }

    /// A listener of `kind` (IPv6 or not): a received one, else `bind`'s.
    pub fn get(
        &mut self,
        kind: ListenerKind,
        v6: bool,
        bind: impl FnOnce() -> io::Result<TcpListener>,
    ) -> io::Result<TcpListener> {
        let found = self.received.iter().position(|(k, listener)| {
            *k == kind && listener.local_addr().is_ok_and(|a| a.is_ipv6() == v6)
        });
        let listener = match found {
            Some(index) => self.received.swap_remove(index).1,
            None => bind()?,
        };
        listener.set_nonblocking(true)?;
        self.held
            .push((kind, listener.as_fd().try_clone_to_owned()?));
        Ok(listener)
    }

    /// The received listeners no [`Sockets::get`] took (the predecessor ran more workers):
    /// still to be served, or the connections in their queues would wait for ever.
    pub fn rest(&mut self) -> io::Result<Vec<(ListenerKind, TcpListener)>> {
        let rest = std::mem::take(&mut self.received);
        for (kind, listener) in &rest {
            listener.set_nonblocking(true)?;
            self.held
                .push((*kind, listener.as_fd().try_clone_to_owned()?));
        }
        Ok(rest)
    }

    /// Copies of every listener this agent serves, for a successor.
    pub fn held(&self) -> &[(ListenerKind, OwnedFd)] {
        &self.held
    }
}

/// One end of a hand-off connection, blocking.
struct Channel(OwnedFd);

impl Channel {
    fn send(&self, message: &Message, fds: &[BorrowedFd<'_>], trailer: &[u8]) -> io::Result<()> {
        let json = serde_json::to_vec(message).map_err(io::Error::other)?;
        let length = (json.len() as u32).to_le_bytes();
        let iov = [
            IoSlice::new(&length),
            IoSlice::new(&json),
            IoSlice::new(trailer),
        ];
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(io::Error::other("too many descriptors for one message"));
        }
        let sent = net::sendmsg(&self.0, &iov, &mut control, SendFlags::NOSIGNAL)?;
        if sent != length.len() + json.len() + trailer.len() {
            return Err(io::Error::other("a hand-off message was cut short"));
        }
        Ok(())
    }

    /// The next message, its descriptors and the bytes after its JSON.
    fn receive(&self) -> io::Result<(Message, Vec<OwnedFd>, Bytes)> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = net::recvmsg(
            &self.0,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if received.bytes == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let buf = &buf[..received.bytes];
        let invalid = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_owned());
        let (length, rest) = buf
            .split_first_chunk::<4>()
            .ok_or_else(|| invalid("a hand-off message without its length"))?;
        let length = u32::from_le_bytes(*length) as usize;
        if length > rest.len() {
            return Err(invalid("a hand-off message shorter than its length"));
        }
        let message = serde_json::from_slice(&rest[..length]).map_err(io::Error::other)?;
        Ok((message, fds, Bytes::copy_from_slice(&rest[length..])))
    }

    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        rustix::net::sockopt::set_socket_timeout(
            &self.0,
            rustix::net::sockopt::Timeout::Recv,
            timeout,
        )?;
        Ok(())
    }
}

fn unix_socket() -> io::Result<OwnedFd> {
    Ok(net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// The running agent's side: where successors knock. A thread of its own accepts them (and
/// reads their hello), so that the control plane only awaits the next one.
pub struct HandoffListener {
    socket: Arc<OwnedFd>,
    /// Set before the socket is shut down, so that the thread takes its failed accept for the
    /// end it is, not for an error (the receiver below is dropped only after `drop` runs).
    closing: Arc<AtomicBool>,
    successors: tokio::sync::mpsc::Receiver<Successor>,
}

impl Drop for HandoffListener {
    /// Stops taking successors: the thread's accept fails, and it ends (closing the socket, so
    /// that a successor that knocks now starts on its own).
    fn drop(&mut self) {
        self.closing.store(true, Ordering::Release);
        let _ = net::shutdown(&*self.socket, net::Shutdown::Read);
    }
}

impl HandoffListener {
    /// Listens at `path`, replacing whatever socket file is there (a predecessor's, which it
    /// no longer needs, or a dead agent's).
    pub fn bind(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
        let socket = unix_socket()?;
        let addr = SocketAddrUnix::new(path)?;
        net::bind(&socket, &addr)
            .with_context(|| format!("binding the hand-off socket {}", path.display()))?;
        net::listen(&socket, 4)?;
        let socket = Arc::new(socket);
        let closing = Arc::new(AtomicBool::new(false));
        let (tx, successors) = tokio::sync::mpsc::channel(1);
        let (accepting, stop) = (socket.clone(), closing.clone());
        std::thread::Builder::new()
            .name("aviary-handoff".into())
            .spawn(move || accept_successors(&accepting, &stop, &tx))?;
        Ok(Self {
            socket,
            closing,
            successors,
        })
    }

    /// The next successor that said hello in this protocol's version.
    pub async fn successor(&mut self) -> Successor {
        match self.successors.recv().await {
            Some(successor) => successor,
            // The thread never ends while the listener lives.
            None => std::future::pending().await,
        }
    }
}

fn accept_successors(
    socket: &OwnedFd,
    closing: &AtomicBool,
    successors: &tokio::sync::mpsc::Sender<Successor>,
) {
    loop {
        let channel = match net::accept_with(socket, SocketFlags::CLOEXEC) {
            Ok(socket) => Channel(socket),
            Err(_) if closing.load(Ordering::Acquire) || successors.is_closed() => return,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a successor on the hand-off socket");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        match hello(&channel) {
            Ok(takes) => {
                if successors
                    .blocking_send(Successor { channel, takes })
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => tracing::warn!(error = %e, "a successor could not take over"),
        }
    }
}

/// The kinds of listener a successor takes, from its hello.
fn hello(channel: &Channel) -> io::Result<Vec<ListenerKind>> {
    channel.set_timeout(Some(EXCHANGE_TIMEOUT))?;
    match channel.receive()?.0 {
        Message::Hello {
            version: PROTOCOL_VERSION,
            takes,
        } => Ok(takes.unwrap_or_else(|| ListenerKind::UNNAMED.to_vec())),
        Message::Hello { version, .. } => Err(io::Error::other(format!(
            "it speaks hand-off version {version}, this agent {PROTOCOL_VERSION}"
        ))),
        other => Err(io::Error::other(format!("it began with {other:?}"))),
    }
}

/// A successor, seen from the agent it takes over from. Blocking: use it off the runtime.
pub struct Successor {
    channel: Channel,
    /// The kinds of listener it takes.
    takes: Vec<ListenerKind>,
}

impl Successor {
    /// Sends the listening sockets of the kinds it takes, and waits until it accepts on them.
    /// The others close with this agent: the successor binds them itself, or serves none.
    pub fn give_listeners(&self, listeners: &[(ListenerKind, OwnedFd)]) -> io::Result<()> {
        let taken: Vec<&(ListenerKind, OwnedFd)> = listeners
            .iter()
            .filter(|(kind, _)| self.takes.contains(kind))
            .collect();
        let kinds = taken.iter().map(|(kind, _)| *kind).collect();
        let fds: Vec<BorrowedFd<'_>> = taken.iter().map(|(_, fd)| fd.as_fd()).collect();
        self.channel
            .send(&Message::Listeners { kinds }, &fds, &[])?;
        match self.channel.receive()?.0 {
            Message::Accepting => Ok(()),
            other => Err(io::Error::other(format!(
                "the successor answered {other:?} to the listeners"
            ))),
        }
    }

    /// Sends one connection on; it closes here once sent.
    pub fn send(&self, moved: Moved) -> io::Result<()> {
        match moved {
            Moved::Http1 {
                client,
                buffered,
                state,
            } => {
                let message = Message::Http1 {
                    state,
                    buffered: buffered.len(),
                };
                self.channel.send(&message, &[client.as_fd()], &buffered)
            }
            Moved::Relay {
                client,
                upstream,
                state,
            } => self.channel.send(
                &Message::Relay { state },
                &[client.as_fd(), upstream.as_fd()],
                &[],
            ),
        }
    }

    /// Says every connection that moves has moved.
    pub fn done(self) -> io::Result<()> {
        self.channel.send(&Message::Done, &[], &[])
    }
}

/// The agent being taken over, seen from its successor. Blocking: use it off the runtime.
pub struct Predecessor(Channel);

impl Predecessor {
    /// The agent running at `path`, if one is (a socket file nobody listens on is a dead
    /// agent's); told that this one takes its listeners of the kinds `takes`.
    pub fn find(path: &Path, takes: &[ListenerKind]) -> anyhow::Result<Option<Self>> {
        let socket = unix_socket()?;
        let addr = SocketAddrUnix::new(path)?;
        match net::connect(&socket, &addr) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::NOENT || e == rustix::io::Errno::CONNREFUSED => {
                return Ok(None)
            }
            Err(e) => {
                return Err(io::Error::from(e))
                    .with_context(|| format!("connecting to {}", path.display()))
            }
        }
        let channel = Channel(socket);
        channel.set_timeout(Some(EXCHANGE_TIMEOUT))?;
        channel.send(
            &Message::Hello {
                version: PROTOCOL_VERSION,
                takes: Some(takes.to_vec()),
            },
            &[],
            &[],
        )?;
        Ok(Some(Self(channel)))
    }

    /// The running agent's listening sockets, by kind.
    pub fn take_listeners(&self) -> anyhow::Result<Vec<(ListenerKind, TcpListener)>> {
        let (message, fds, _) = self.0.receive().context("receiving the listeners")?;
        let Message::Listeners { kinds } = message else {
            bail!("the running agent sent {message:?} instead of its listeners");
        };
        if kinds.len() != fds.len() {
            bail!(
                "the running agent named {} listeners and sent {}",
                kinds.len(),
                fds.len()
            );
        }
        Ok(kinds
            .into_iter()
            .zip(fds.into_iter().map(TcpListener::from))
            .collect())
    }

    /// Tells the running agent this one accepts on the listeners: it stops accepting, and
    /// drains.
    pub fn accepting(&self) -> io::Result<()> {
        self.0.send(&Message::Accepting, &[], &[])
    }

    /// Receives the connections that move, each to `carry_on`, until the running agent is
    /// done (or gone).
    pub fn receive(self, mut carry_on: impl FnMut(Moved)) -> anyhow::Result<usize> {
        // The drain takes as long as the running agent's drain timeout: no timeout here.
        self.0.set_timeout(None)?;
        let mut moved = 0;
        loop {
            let (message, fds, trailer) = self.0.receive().context("receiving connections")?;
            let mut fds = fds.into_iter().map(TcpStream::from);
            match message {
                Message::Http1 { state, buffered } => {
                    let (Some(client), true) = (fds.next(), trailer.len() == buffered) else {
                        bail!("a moved HTTP/1.1 connection came without its socket or bytes");
                    };
                    carry_on(Moved::Http1 {
                        client,
                        buffered: trailer,
                        state,
                    });
                }
                Message::Relay { state } => {
                    let (Some(client), Some(upstream)) = (fds.next(), fds.next()) else {
                        bail!("a moved connection came without its sockets");
                    };
                    carry_on(Moved::Relay {
                        client,
                        upstream,
                        state,
                    });
                }
                Message::Done => return Ok(moved),
                other => bail!("the running agent sent {other:?} while connections moved"),
            }
            moved += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;
    use crate::proxy::metrics::Direction;

    fn socket_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("aviary-handoff-{}-{name}.sock", std::process::id()))
    }

    /// The listener's drop shuts its socket before its receiver goes: the accepting thread
    /// takes the failed accept for the end, not for an error to warn about and retry.
    #[test]
    fn a_listener_shut_down_ends_its_thread_without_a_retry() {
        let path = socket_path("shut");
        let socket = unix_socket().unwrap();
        net::bind(&socket, &SocketAddrUnix::new(&path).unwrap()).unwrap();
        net::listen(&socket, 4).unwrap();
        let (tx, _still_open) = tokio::sync::mpsc::channel(1);
        let closing = AtomicBool::new(true);
        net::shutdown(&socket, net::Shutdown::Read).unwrap();
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            accept_successors(&socket, &closing, &tx);
            done_tx.send(()).unwrap();
        });
        done.recv_timeout(Duration::from_secs(5))
            .expect("the thread ended");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn nobody_listening_means_no_predecessor() {
        let path = socket_path("none");
        assert!(Predecessor::find(&path, &[]).unwrap().is_none(), "no file");
        // A dead agent's socket file: nobody accepts.
        let socket = unix_socket().unwrap();
        net::bind(&socket, &SocketAddrUnix::new(&path).unwrap()).unwrap();
        drop(socket);
        assert!(
            Predecessor::find(&path, &[]).unwrap().is_none(),
            "a stale file"
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[tokio::test]
    async fn listeners_and_connections_move_whole() {
        let path = socket_path("whole");
        let mut listener = HandoffListener::bind(&path).unwrap();
        let outbound = TcpListener::bind("127.0.0.1:0").unwrap();
        let outbound_addr = outbound.local_addr().unwrap();
        // A relayed connection: client <-> (agent) <-> upstream.
        let upstream_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(outbound_addr).unwrap();
        let (proxied_client, peer) = outbound.accept().unwrap();
        let proxied_upstream = TcpStream::connect(upstream_listener.local_addr().unwrap()).unwrap();
        let (mut upstream, _) = upstream_listener.accept().unwrap();

        let successor = tokio::task::spawn_blocking({
            let path = path.clone();
            move || {
                let predecessor = Predecessor::find(&path, &[ListenerKind::Outbound])
                    .unwrap()
                    .expect("an agent runs");
                let listeners = predecessor.take_listeners().unwrap();
                predecessor.accepting().unwrap();
                let mut moved = Vec::new();
                predecessor.receive(|m| moved.push(m)).unwrap();
                (listeners, moved)
            }
        });
        let running = listener.successor().await;
        let outbound_fd = outbound.as_fd().try_clone_to_owned().unwrap();
        let state = RelayState { peer, edge: None };
        let http1 = Http1State {
            listener: Direction::outbound,
            peer,
            dst: outbound_addr,
        };
        tokio::task::spawn_blocking(move || {
            running
                .give_listeners(&[(ListenerKind::Outbound, outbound_fd)])
                .unwrap();
            running
                .send(Moved::Relay {
                    client: proxied_client,
                    upstream: proxied_upstream,
                    state,
                })
                .unwrap();
            let (idle, _) = {
                let _c = TcpStream::connect(outbound_addr).unwrap();
                outbound.accept().unwrap()
            };
            running
                .send(Moved::Http1 {
                    client: idle,
                    buffered: Bytes::from_static(b"GET / HT"),
                    state: http1,
                })
                .unwrap();
            running.done().unwrap();
        })
        .await
        .unwrap();

        let (listeners, mut moved) = successor.await.unwrap();
        assert_eq!(listeners.len(), 1);
        assert_eq!(listeners[0].0, ListenerKind::Outbound);
        assert_eq!(listeners[0].1.local_addr().unwrap(), outbound_addr);
        assert_eq!(moved.len(), 2);
        let Moved::Http1 { buffered, .. } = moved.pop().unwrap() else {
            panic!("an HTTP/1.1 connection moved second")
        };
        assert_eq!(&buffered[..], b"GET / HT");
        let Moved::Relay {
            client: mut their_client,
            upstream: mut their_upstream,
            state,
        } = moved.pop().unwrap()
        else {
            panic!("a relay moved first")
        };
        assert_eq!(state.peer, peer);
        // The sockets are the very connections: bytes flow through them.
        client.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        their_client.read_exact(&mut got).unwrap();
        their_upstream.write_all(&got).unwrap();
        upstream.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        std::fs::remove_file(&path).unwrap();
    }

    /// The kinds of the listeners a successor that says `hello` receives from an agent that
    /// holds one listener of each of `held`.
    async fn kinds_received(
        name: &str,
        hello: Vec<u8>,
        held: &[ListenerKind],
    ) -> Vec<ListenerKind> {
        let path = socket_path(name);
        let mut listener = HandoffListener::bind(&path).unwrap();
        let successor = tokio::task::spawn_blocking({
            let path = path.clone();
            move || {
                let socket = unix_socket().unwrap();
                net::connect(&socket, &SocketAddrUnix::new(&path).unwrap()).unwrap();
                let length = (hello.len() as u32).to_le_bytes();
                net::send(
                    &socket,
                    &[&length[..], &hello].concat(),
                    SendFlags::NOSIGNAL,
                )
                .unwrap();
                let channel = Channel(socket);
                channel.set_timeout(Some(Duration::from_secs(10))).unwrap();
                let predecessor = Predecessor(channel);
                let listeners = predecessor.take_listeners().unwrap();
                predecessor.accepting().unwrap();
                listeners.into_iter().map(|(kind, _)| kind).collect()
            }
        });
        let running = listener.successor().await;
        let held: Vec<(ListenerKind, OwnedFd)> = held
            .iter()
            .map(|kind| {
                let socket = TcpListener::bind("127.0.0.1:0").unwrap();
                (*kind, OwnedFd::from(socket))
            })
            .collect();
        tokio::task::spawn_blocking(move || running.give_listeners(&held).unwrap())
            .await
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        successor.await.unwrap()
    }

    #[tokio::test]
    async fn a_successor_receives_the_kinds_it_takes_and_an_older_one_those_it_knows() {
        use ListenerKind::*;
        let held = [Outbound, Admin, Health, Metrics, Ofrep];
        let hello = |takes: &[ListenerKind]| {
            serde_json::to_vec(&Message::Hello {
                version: PROTOCOL_VERSION,
                takes: Some(takes.to_vec()),
            })
            .unwrap()
        };
        assert_eq!(
            kinds_received("takes", hello(&[Outbound, Metrics, Ofrep]), &held).await,
            [Outbound, Metrics, Ofrep]
        );
        // An agent built before hellos named kinds fails on one it does not know: it gets
        // the kinds it knows, and the OFREP listener closes with the running agent.
        let older = br#"{"Hello":{"version":1}}"#.to_vec();
        assert_eq!(
            kinds_received("older", older, &held).await,
            [Outbound, Admin, Health, Metrics]
        );
    }

    #[test]
    fn hellos_read_across_versions() {
        // A newer successor's hello, naming a kind this agent does not know.
        let newer: Message =
            serde_json::from_str(r#"{"Hello":{"version":1,"takes":["Outbound","Telepathy"]}}"#)
                .unwrap();
        let Message::Hello { takes, .. } = newer else {
            panic!("{newer:?}")
        };
        assert_eq!(
            takes,
            Some(vec![ListenerKind::Outbound, ListenerKind::Unknown])
        );
        // An older agent reads this one's hello: it ignores the field it does not know.
        #[derive(Deserialize)]
        enum OlderMessage {
            Hello { version: u32 },
        }
        let hello = serde_json::to_string(&Message::Hello {
            version: PROTOCOL_VERSION,
            takes: Some(vec![ListenerKind::Ofrep]),
        })
        .unwrap();
        let OlderMessage::Hello { version } = serde_json::from_str(&hello).unwrap();
        assert_eq!(version, PROTOCOL_VERSION);
    }
}
