//! Copying opaque TCP both ways with buffers that grow with the stream, as ztunnel's copy does,
//! and are given back while it idles.
//!
//! A fixed buffer per direction costs every connection the same, idle or busy: with 64 KiB each
//! way, an idle connection took 45 KiB of the agent's memory (`tests/tests/resources.rs`; the
//! connection's other state is 2.2 KiB). Here each direction reads into a buffer of 4 KiB at
//! first, which doubles, up to 64 KiB, each time a read fills it: a bulk transfer reaches the
//! large size after a few reads, a request-response exchange never leaves the small one. And a
//! direction holds no buffer at all while there is nothing to read: the buffer is given back
//! when a read would block with everything written, and taken again (at the size reached, and
//! without zeroing it) when the stream is readable. An idle connection costs no copy buffer.

use std::{
    future::{poll_fn, Future},
    io,
    pin::{pin, Pin},
    task::{ready, Context, Poll},
};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite};

/// The first read's buffer, per direction: a page, which holds most requests and responses.
const INITIAL_BUFFER: usize = 4 * 1024;

/// The largest buffer a direction grows to: a bulk transfer moves in few reads and writes
/// (tokio's default of 8 KiB costs a wakeup every 8 KiB), and stays below glibc's mmap
/// threshold, so taking and giving back the buffer never maps and unmaps memory.
const MAX_BUFFER: usize = 64 * 1024;

/// What a copy moved, and how it ended.
#[derive(Debug)]
pub struct Copied {
    /// Bytes written to the upstream, from the client.
    pub sent: u64,
    /// Bytes written to the client, from the upstream.
    pub received: u64,
    /// The first error of either direction, which ended both; Ok when both sides closed, or
    /// when the copy paused.
    pub result: io::Result<()>,
    /// The copy stopped when asked, with every byte it read written: the connection can go on
    /// from here in another copy, another process's even (an upgrade hands it over).
    pub paused: bool,
}

/// Copies bytes from `client` to `upstream` and back until both directions end, or until
/// `pause` resolves and every byte read so far is written (then `paused`). The end of one side's
/// stream is carried to the other as a shutdown of writing (a half-close), and the other
/// direction goes on. An error in either direction ends both. The byte counts are those written,
/// up to the end, error or not.
pub async fn bidirectional<C, U>(
    client: &mut C,
    upstream: &mut U,
    pause: impl Future<Output = ()>,
) -> Copied
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut sent, mut received) = (Direction::default(), Direction::default());
    let result = both_ways(client, upstream, &mut sent, &mut received, pause).await;
    Copied {
        sent: sent.written,
        received: received.written,
        paused: result.is_ok() && sent.pausing && !(sent.shut_down && received.shut_down),
        result,
    }
}

async fn both_ways<C, U>(
    client: &mut C,
    upstream: &mut U,
    sent: &mut Direction,
    received: &mut Direction,
    pause: impl Future<Output = ()>,
) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut pause = pin!(pause);
    poll_fn(|cx| {
        if !sent.pausing && pause.as_mut().poll(cx).is_ready() {
            sent.pausing = true;
            received.pausing = true;
        }
        let to_upstream = sent.poll_copy(cx, client, upstream)?;
        let to_client = received.poll_copy(cx, upstream, client)?;
        match (to_upstream, to_client) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    })
    .await
}

/// One direction of a copy: read, write it all, again, until the reader's end, which is passed
/// on as a shutdown of the writer.
#[derive(Debug)]
struct Direction {
    /// Bytes read and not all written yet; no allocation while the reader has nothing.
    buf: Vec<u8>,
    /// How much of `buf` has been written.
    pos: usize,
    /// The size of the buffer the next read gets.
    size: usize,
    /// Bytes written in all.
    written: u64,
    /// The writer has bytes it may hold until flushed.
    need_flush: bool,
    read_done: bool,
    shut_down: bool,
    /// Asked to stop: no more reads, only the writes of what was read.
    pausing: bool,
}

impl Default for Direction {
    fn default() -> Self {
        Self {
            buf: Vec::new(),
            pos: 0,
            size: INITIAL_BUFFER,
            written: 0,
            need_flush: false,
            read_done: false,
            shut_down: false,
            pausing: false,
        }
    }
}

impl Direction {
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            if self.shut_down {
                return Poll::Ready(Ok(()));
            }
            while self.pos < self.buf.len() {
                let n = ready!(Pin::new(&mut *writer).poll_write(cx, &self.buf[self.pos..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.written += n as u64;
                self.need_flush = true;
            }
            if self.read_done {
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.shut_down = true;
                self.buf = Vec::new();
                continue;
            }
            if self.pausing {
                self.buf = Vec::new();
                if self.need_flush {
                    ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                    self.need_flush = false;
                }
                return Poll::Ready(Ok(()));
            }
            self.buf.clear();
            self.pos = 0;
            if self.buf.capacity() < self.size {
                self.buf = Vec::with_capacity(self.size);
            }
            // read_buf fills the spare capacity without zeroing it first; it is a future only
            // for its poll, which needs no state kept between polls.
            match pin!(reader.read_buf(&mut self.buf)).poll(cx) {
                Poll::Pending => {
                    // Idle for now: the buffer goes back, and what the writer holds leaves.
                    self.buf = Vec::new();
                    if self.need_flush {
                        ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => self.read_done = true,
                Poll::Ready(Ok(n)) => {
                    if n == self.size {
                        self.size = (self.size * 2).min(MAX_BUFFER);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::{duplex, AsyncWriteExt as _, DuplexStream},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// Bytes that differ from one offset to the next, so a lost or reordered chunk shows.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// A connected pair of loopback sockets.
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = TcpStream::connect(listener.local_addr().unwrap());
        let (connected, accepted) = tokio::join!(connect, listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    /// The copy between the proxy's ends of two connections, to its end.
    fn copying(mut client: TcpStream, mut upstream: TcpStream) -> tokio::task::JoinHandle<Copied> {
        tokio::spawn(async move {
            bidirectional(&mut client, &mut upstream, std::future::pending()).await
        })
    }

    /// Writes `data` then shuts writing down, while reading everything that comes back.
    async fn send_and_read_all(stream: TcpStream, data: Vec<u8>) -> Vec<u8> {
        let (mut read, mut write) = stream.into_split();
        let writer = async move {
            write.write_all(&data).await.unwrap();
            write.shutdown().await.unwrap();
        };
        let reader = async move {
            let mut all = Vec::new();
            read.read_to_end(&mut all).await.unwrap();
            all
        };
        tokio::join!(writer, reader).1
    }

    #[tokio::test]
    async fn bytes_arrive_intact_both_ways_and_are_counted() {
        for (up, down) in [(0, 0), (1, 17), (5_000, 3), (3 << 20, 2 << 20)] {
            let (client, mut proxy_client) = socket_pair().await;
            let (mut proxy_upstream, upstream) = socket_pair().await;
            let (to_upstream, to_client) = (pattern(up, 1), pattern(down, 2));
            let (copied, at_client, at_upstream) = tokio::join!(
                bidirectional(
                    &mut proxy_client,
                    &mut proxy_upstream,
                    std::future::pending()
                ),
                send_and_read_all(client, to_upstream.clone()),
                send_and_read_all(upstream, to_client.clone()),
            );
            copied.result.unwrap();
            assert!(at_upstream == to_upstream, "{up} bytes up arrived altered");
            assert!(at_client == to_client, "{down} bytes down arrived altered");
            assert_eq!((copied.sent, copied.received), (up as u64, down as u64));
        }
    }

    #[tokio::test]
    async fn a_half_close_is_passed_on_and_the_other_direction_goes_on() {
        let (mut client, proxy_client) = socket_pair().await;
        let (proxy_upstream, mut upstream) = socket_pair().await;
        let copy = copying(proxy_client, proxy_upstream);
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        // The upstream sees the request, then the end of it.
        let mut request = Vec::new();
        upstream.read_to_end(&mut request).await.unwrap();
        assert_eq!(request, b"request");
        // It answers after the client's half-close, and the answer still arrives.
        upstream.write_all(b"response").await.unwrap();
        let mut response = [0u8; 8];
        client.read_exact(&mut response).await.unwrap();
        assert_eq!(&response, b"response");
        drop(upstream);
        assert_eq!(
            client.read(&mut [0u8; 1]).await.unwrap(),
            0,
            "end passed on"
        );
        let copied = copy.await.unwrap();
        copied.result.unwrap();
        assert_eq!((copied.sent, copied.received), (7, 8));
    }

    #[tokio::test]
    async fn an_error_ends_both_directions_with_the_counts_so_far() {
        let (mut client, proxy_client) = socket_pair().await;
        let (proxy_upstream, upstream) = socket_pair().await;
        let copy = copying(proxy_client, proxy_upstream);
        client.write_all(b"hello").await.unwrap();
        let mut upstream = upstream;
        let mut hello = [0u8; 5];
        upstream.read_exact(&mut hello).await.unwrap();
        // The upstream resets; the client's direction, idle, ends with it.
        upstream.set_zero_linger().unwrap();
        drop(upstream);
        let copied = tokio::time::timeout(Duration::from_secs(5), copy)
            .await
            .expect("the copy outlived the reset")
            .unwrap();
        assert_eq!(
            copied.result.unwrap_err().kind(),
            io::ErrorKind::ConnectionReset
        );
        assert_eq!((copied.sent, copied.received), (5, 0));
    }

    #[tokio::test]
    async fn a_paused_copy_writes_what_it_read_and_the_rest_waits_for_the_next_copy() {
        let (mut client, mut proxy_client) = duplex(1 << 16);
        let (mut proxy_upstream, mut upstream) = duplex(1 << 16);
        client.write_all(b"before").await.unwrap();
        let (pause, paused) = tokio::sync::oneshot::channel::<()>();
        let copy = tokio::spawn(async move {
            let copied = bidirectional(&mut proxy_client, &mut proxy_upstream, async {
                let _ = paused.await;
            })
            .await;
            (copied, proxy_client, proxy_upstream)
        });
        let mut before = [0u8; 6];
        upstream.read_exact(&mut before).await.unwrap();
        pause.send(()).unwrap();
        let (copied, mut proxy_client, mut proxy_upstream) = copy.await.unwrap();
        assert!(copied.paused && copied.result.is_ok(), "{copied:?}");
        assert_eq!((copied.sent, copied.received), (6, 0));

        // Bytes sent while nothing copies wait; the next copy (a successor's) moves them.
        client.write_all(b"after").await.unwrap();
        let next = tokio::spawn(async move {
            bidirectional(
                &mut proxy_client,
                &mut proxy_upstream,
                std::future::pending(),
            )
            .await
        });
        let mut after = [0u8; 5];
        upstream.read_exact(&mut after).await.unwrap();
        assert_eq!(&after, b"after");
        next.abort();
    }

    /// Runs the copy between two duplex pipes until it has nothing to do for a moment, then
    /// gives the directions back for a look.
    async fn copy_for_a_while(
        proxy_client: &mut DuplexStream,
        proxy_upstream: &mut DuplexStream,
        sent: &mut Direction,
        received: &mut Direction,
    ) {
        let copy = both_ways(
            proxy_client,
            proxy_upstream,
            sent,
            received,
            std::future::pending(),
        );
        let ended = tokio::time::timeout(Duration::from_millis(50), copy).await;
        assert!(ended.is_err(), "the copy ended: {ended:?}");
    }

    #[tokio::test]
    async fn the_buffer_starts_small_is_given_back_when_idle_and_grows_under_a_bulk_transfer() {
        let (mut client, mut proxy_client) = duplex(1 << 20);
        let (mut proxy_upstream, mut upstream) = duplex(1 << 20);
        let (mut sent, mut received) = (Direction::default(), Direction::default());

        // A short exchange: the buffers stay small, and are given back once it is over.
        client.write_all(b"ping").await.unwrap();
        upstream.write_all(b"pong").await.unwrap();
        copy_for_a_while(
            &mut proxy_client,
            &mut proxy_upstream,
            &mut sent,
            &mut received,
        )
        .await;
        let (mut ping, mut pong) = ([0u8; 4], [0u8; 4]);
        upstream.read_exact(&mut ping).await.unwrap();
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!((&ping, &pong), (b"ping", b"pong"));
        for direction in [&sent, &received] {
            assert_eq!(direction.size, INITIAL_BUFFER);
            assert_eq!(
                direction.buf.capacity(),
                0,
                "an idle direction holds a buffer"
            );
        }

        // A bulk transfer up: reads keep filling the buffer, which doubles up to its bound.
        let bulk = pattern(1 << 20, 3);
        client.write_all(&bulk).await.unwrap();
        copy_for_a_while(
            &mut proxy_client,
            &mut proxy_upstream,
            &mut sent,
            &mut received,
        )
        .await;
        let mut arrived = vec![0u8; bulk.len()];
        upstream.read_exact(&mut arrived).await.unwrap();
        assert!(arrived == bulk, "the bulk transfer arrived altered");
        assert_eq!(sent.size, MAX_BUFFER);
        assert_eq!(sent.buf.capacity(), 0, "given back after the transfer");
        assert_eq!(
            received.size, INITIAL_BUFFER,
            "the other direction stays small"
        );
        assert_eq!((sent.written, received.written), (4 + (1 << 20), 4));
    }
}
