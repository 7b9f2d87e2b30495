//! Protocol detection on a captured connection: HTTP (1.1 or HTTP/2 with prior knowledge), or
//! opaque TCP. Detection peeks; it never consumes bytes. A tunnel cannot be peeked at: what is
//! read of it to tell is handed back, to be put in front of it again.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _},
    net::TcpStream,
    time::Instant,
};

use crate::table::AppProtocol;

/// How long a connection may stay silent before it is taken as opaque: server-first protocols
/// (SMTP, MySQL, ...) wait for the server to speak, and must not be held back longer.
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(100);

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The longest HTTP/1 method token we accept (longer registered methods do not exist).
const MAX_METHOD: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http,
    Opaque,
}

/// What the first bytes of a connection say, or None while they are too few to tell.
pub fn classify(bytes: &[u8]) -> Option<Detected> {
    if bytes.is_empty() {
        return None;
    }
    let n = bytes.len().min(H2_PREFACE.len());
    if bytes[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Detected::Http);
    }
    // HTTP/1: a method token of uppercase letters, then a space.
    for (i, &b) in bytes.iter().enumerate().take(MAX_METHOD + 1) {
        match b {
            b' ' if i > 0 => return Some(Detected::Http),
            b'A'..=b'Z' => {}
            _ => return Some(Detected::Opaque),
        }
    }
    (bytes.len() > MAX_METHOD).then_some(Detected::Opaque)
}

/// How to read a connection whose policy says `declared`: as declared, or as detected.
pub async fn read_as(declared: AppProtocol, stream: &TcpStream, wait: Duration) -> Detected {
    match declared {
        AppProtocol::Http1 | AppProtocol::Http2 => Detected::Http,
        AppProtocol::Opaque => Detected::Opaque,
        AppProtocol::Detect => detect(stream, wait).await,
    }
}

/// Peeks at the connection until its protocol is clear, it closes, or `wait` passes.
pub async fn detect(stream: &TcpStream, wait: Duration) -> Detected {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 24];
    loop {
        match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                if let Some(detected) = classify(&buf[..n]) {
                    return detected;
                }
                // A partial preface or method: the rest is on its way.
                if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(1)))
                    .await
                    .is_err()
                {
                    return Detected::Opaque;
                }
            }
            // Closed, failed, or silent until the deadline.
            _ => return Detected::Opaque,
        }
    }
}

/// [`read_as`] for a stream that cannot be peeked at: the verdict, and the bytes read to
/// reach it.
pub async fn read_to_detect<S: AsyncRead + Unpin>(
    declared: AppProtocol,
    stream: &mut S,
    wait: Duration,
) -> (Detected, Bytes) {
    let mut read = BytesMut::new();
    match declared {
        AppProtocol::Http1 | AppProtocol::Http2 => return (Detected::Http, read.freeze()),
        AppProtocol::Opaque => return (Detected::Opaque, read.freeze()),
        AppProtocol::Detect => {}
    }
    let deadline = Instant::now() + wait;
    loop {
        if let Some(detected) = classify(&read) {
            return (detected, read.freeze());
        }
        // Fewer than a preface's bytes: those always tell.
        let mut limited = (&mut *stream).take((H2_PREFACE.len() - read.len()) as u64);
        match tokio::time::timeout_at(deadline, limited.read_buf(&mut read)).await {
            Ok(Ok(n)) if n > 0 => {}
            // Closed, failed, or silent until the deadline.
            _ => return (Detected::Opaque, read.freeze()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_http_from_opaque() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http));
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Some(Detected::Http));
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http));
        assert_eq!(
            classify(b"\x16\x03\x01\x02\x00"),
            Some(Detected::Opaque),
            "TLS"
        );
        assert_eq!(classify(b"get / HTTP/1.1"), Some(Detected::Opaque));
        assert_eq!(classify(b" GET"), Some(Detected::Opaque));
        assert_eq!(
            classify(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
            Some(Detected::Opaque)
        );
    }

    #[test]
    fn waits_for_more_bytes_when_unsure() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        assert_eq!(
            classify(b"PRI * HTTP/1.1"),
            Some(Detected::Http),
            "PRI is a method too"
        );
    }

    #[tokio::test]
    async fn a_stream_read_to_detect_gives_back_what_was_read() {
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HTTP/1.1\r\n")
            .await
            .unwrap();
        let wait = Duration::from_millis(50);
        let (detected, read) = read_to_detect(AppProtocol::Detect, &mut server, wait).await;
        assert_eq!(detected, Detected::Http);
        assert_eq!(&read[..], b"GET / HTTP/1.1\r\n");
        // Silence is opaque, with nothing read.
        let (_client, mut silent) = tokio::io::duplex(64);
        let (detected, read) = read_to_detect(AppProtocol::Detect, &mut silent, wait).await;
        assert_eq!((detected, read.len()), (Detected::Opaque, 0));
    }

    #[tokio::test]
    async fn silent_and_closed_connections_are_opaque() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move { TcpStream::connect(addr).await.unwrap() });
        let (server, _) = listener.accept().await.unwrap();
        let _client = client.await.unwrap();
        let start = std::time::Instant::now();
        assert_eq!(
            detect(&server, Duration::from_millis(50)).await,
            Detected::Opaque
        );
        assert!(start.elapsed() < Duration::from_secs(1));
    }
}
