//! A stream with bytes already read from it put back in front: the preface read to tell HTTP/2
//! from HTTP/1.1, or the start of a request that a predecessor agent read before it handed the
//! connection over.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf as _, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct Rewind<T> {
    prefix: Bytes,
    io: T,
}

impl<T> Rewind<T> {
    pub fn new(prefix: Bytes, io: T) -> Self {
        Self { prefix, io }
    }

    /// The stream, and what of the prefix was not read yet (it comes before the stream's bytes).
    pub fn into_parts(self) -> (Bytes, T) {
        (self.prefix, self.io)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn the_prefix_comes_first_then_the_stream() {
        let (io, mut peer) = duplex(64);
        let mut rewound = Rewind::new(Bytes::from_static(b"GET "), io);
        peer.write_all(b"/ HTTP/1.1").await.unwrap();
        drop(peer);
        let mut got = [0u8; 2];
        rewound.read_exact(&mut got).await.unwrap();
        let (rest, mut io) = rewound.into_parts();
        assert_eq!((&got, &rest[..]), (b"GE", &b"T "[..]));
        let mut tail = Vec::new();
        io.read_to_end(&mut tail).await.unwrap();
        assert_eq!(tail, b"/ HTTP/1.1");
    }
}
