//! The idle timeout of a client connection: a stream that moves no byte either way for the
//! timeout fails its next pending read or write with `TimedOut`, which ends whatever serves it
//! (hyper's connection, or a splice) as a peer's reset would.
//!
//! The deadline is checked lazily, as Envoy's idle timers are: each read or write that moves
//! bytes only notes the time, and the one timer is re-armed from that note when it fires. A
//! busy connection therefore costs a clock read per I/O, never a timer reset.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{ready, Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

pub struct IdleTimeout<T> {
    io: T,
    /// None: no timeout.
    timer: Option<Timer>,
}

struct Timer {
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    /// When the stream last moved a byte.
    active: Instant,
}

impl<T> IdleTimeout<T> {
    pub fn new(io: T, timeout: Option<Duration>) -> Self {
        let timer = timeout.map(|timeout| Timer {
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            active: Instant::now(),
        });
        Self { io, timer }
    }

    pub fn into_inner(self) -> T {
        self.io
    }

    fn moved(&mut self) {
        if let Some(timer) = &mut self.timer {
            timer.active = Instant::now();
        }
    }

    /// Notes a write that moved bytes, or checks the timeout when the write would wait.
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match written {
            Poll::Ready(result) => {
                if result.as_ref().is_ok_and(|&n| n > 0) {
                    self.moved();
                }
                Poll::Ready(result)
            }
            Poll::Pending => self.poll_idle(cx).map(Err),
        }
    }

    /// Called when an operation would wait: Ready(error) once the stream has idled past the
    /// timeout, else Pending with the timer armed to wake this task at the deadline.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some(timer) = &mut self.timer else {
            return Poll::Pending;
        };
        loop {
            ready!(timer.sleep.as_mut().poll(cx));
            let deadline = timer.active + timer.timeout;
            if deadline <= Instant::now() {
                let idle = format!("no bytes moved for {:?}", timer.timeout);
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, idle));
            }
            timer.sleep.as_mut().reset(deadline);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.moved();
                }
                Poll::Ready(result)
            }
            Poll::Pending => this.poll_idle(cx).map(Err),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.io).poll_write(cx, buf);
        this.after_write(cx, written)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.after_write(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Pending => this.poll_idle(cx).map(Err),
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test(start_paused = true)]
    async fn a_stream_idle_past_the_timeout_fails_and_activity_keeps_it_open() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut stream = IdleTimeout::new(near, Some(Duration::from_secs(10)));
        let mut buf = [0u8; 8];
        // Bytes every 6 s: never 10 s without one.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            far.write_all(b"x").await.unwrap();
            assert_eq!(stream.read(&mut buf).await.unwrap(), 1);
        }
        stream.write_all(b"y").await.unwrap();
        let start = Instant::now();
        let err = stream.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_takes_times_out_too() {
        let (near, _far) = tokio::io::duplex(4);
        let mut stream = IdleTimeout::new(near, Some(Duration::from_secs(3)));
        let err = stream.write_all(b"more than four").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_timeout_it_waits_for_ever() {
        let (near, _far) = tokio::io::duplex(4);
        let mut stream = IdleTimeout::new(near, None);
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(86400), stream.read(&mut buf));
        assert!(read.await.is_err(), "still waiting a day later");
    }
}
