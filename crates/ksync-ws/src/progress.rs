//! When a socket last moved bytes, for timeouts that mean "nothing moved for this long"
//! rather than "all of it within this long". A large message over a slow link takes as long
//! as the link needs while its bytes keep moving; bounded as a whole (1 MiB at 50 KB/s is
//! 20 s), it was cut off at the timeout and sent again on the next connection, for good. A
//! peer that stops taking bytes is still given up once the timeout passes without one.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When something last happened on a socket, as one atomic (so it can be stamped from the
/// socket and read by whoever waits on it, across an `Arc`).
#[derive(Debug)]
pub(crate) struct Stamp {
    /// What the stamp counts from.
    origin: Instant,
    /// Nanoseconds after `origin`.
    nanos: AtomicU64,
}

impl Default for Stamp {
    /// Stamped now.
    fn default() -> Self {
        Stamp {
            origin: Instant::now(),
            nanos: AtomicU64::new(0),
        }
    }
}

impl Stamp {
    pub(crate) fn stamp(&self) {
        let now = self.origin.elapsed().as_nanos();
        self.nanos
            .fetch_max(u64::try_from(now).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Passes on what a write of the stamped socket returned, stamped when it took bytes: the
    /// one rule of [`Watched`] and the relay's `socket::Counted`.
    pub(crate) fn after_write(
        &self,
        written: Poll<std::io::Result<usize>>,
    ) -> Poll<std::io::Result<usize>> {
        if let Poll::Ready(Ok(1..)) = written {
            self.stamp();
        }
        written
    }

    /// When last stamped (its creation before any).
    pub(crate) fn at(&self) -> Instant {
        self.origin + Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }
}

/// When the socket last took bytes to write and last gave bytes read (shared by the socket
/// and whoever waits on it).
#[derive(Clone, Debug, Default)]
pub(crate) struct Activity(Arc<Stamps>);

#[derive(Debug, Default)]
struct Stamps {
    written: Stamp,
    read: Stamp,
}

impl Activity {
    /// When the socket last took bytes to write (its creation before any).
    pub(crate) fn last_write(&self) -> Instant {
        self.0.written.at()
    }

    /// When bytes were last read from the socket (its creation before any).
    pub(crate) fn last_read(&self) -> Instant {
        self.0.read.at()
    }
}

/// Runs `write` to its end, unless the socket takes no byte for `limit` (counted from the
/// later of the call and `last_write`, when the socket last took a byte): `None` then, and
/// `write` is dropped.
///
/// A future of its own, not an `async fn`: one kept its arguments beside the copies it moved
/// them into (88 B), and with a `select!` made the relay connection's task 256 B larger
/// than `tokio::time::timeout` did, on every idle connection.
pub(crate) fn unless_stalled<F: Future, L: Fn() -> Instant>(
    limit: Duration,
    last_write: L,
    write: F,
) -> UnlessStalled<F, L> {
    UnlessStalled {
        write,
        // At first the call's time counts as the last byte taken.
        sleep: tokio::time::sleep(limit),
        limit,
        last_write,
    }
}

pin_project_lite::pin_project! {
    /// See [`unless_stalled`].
    pub(crate) struct UnlessStalled<F, L> {
        #[pin]
        write: F,
        // Its deadline is `limit` after the later of the call and the last byte taken seen
        // so far: it only moves forward.
        #[pin]
        sleep: tokio::time::Sleep,
        limit: Duration,
        last_write: L,
    }
}

impl<F: Future, L: Fn() -> Instant> Future for UnlessStalled<F, L> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // First: a write that ends as the timer fires has not stalled.
        if let Poll::Ready(done) = this.write.poll(cx) {
            return Poll::Ready(Some(done));
        }
        loop {
            ready!(this.sleep.as_mut().poll(cx));
            let due = (this.last_write)() + *this.limit;
            if due <= this.sleep.deadline() {
                return Poll::Ready(None);
            }
            // Bytes were taken since: wait from the last one.
            this.sleep.as_mut().reset(due);
        }
    }
}

/// A socket that stamps its [`Activity`] whenever bytes move. It must be the stream bytes
/// really move on (TCP), not one above a layer that buffers them: TLS takes plaintext in
/// `poll_write` and writes the records in `poll_flush`, where a flush that wrote part and
/// waits for the rest looks the same as one that wrote nothing; watched above TLS, the tail of
/// every write (up to rustls' 64 KiB buffer) was bounded as a whole.
#[derive(Debug)]
pub(crate) struct Watched<T> {
    io: T,
    activity: Activity,
}

impl<T> Watched<T> {
    pub(crate) fn new(io: T) -> Self {
        Watched {
            io,
            activity: Activity::default(),
        }
    }

    pub(crate) fn activity(&self) -> Activity {
        self.activity.clone()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.io).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            self.activity.0.read.stamp();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        self.activity.0.written.after_write(written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.activity.0.written.after_write(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A write the reader keeps taking bytes of runs past the limit; one the reader stops
    /// taking ends `limit` after the last byte taken.
    #[tokio::test(start_paused = true)]
    async fn a_write_ends_only_when_nothing_moved_for_the_limit() {
        let limit = Duration::from_millis(100);
        let (near, mut far) = tokio::io::duplex(16);
        let mut near = Watched::new(near);
        let activity = near.activity();
        // The reader takes 16 bytes every 60 ms: 1 KiB takes ~4 s, 40 times the limit.
        let reader = tokio::spawn(async move {
            let mut got = vec![0; 1024];
            for chunk in got.chunks_mut(16) {
                tokio::time::sleep(Duration::from_millis(60)).await;
                far.read_exact(chunk).await.expect("read");
            }
            (far, got)
        });
        let written =
            unless_stalled(limit, || activity.last_write(), near.write_all(&[7; 1024])).await;
        assert!(matches!(written, Some(Ok(()))), "{written:?}");
        let (_far, got) = reader.await.expect("reader");
        assert_eq!(got, vec![7; 1024]);
        // Nobody reads now: the pipe fills, then nothing moves.
        let start = Instant::now();
        let written =
            unless_stalled(limit, || activity.last_write(), near.write_all(&[7; 1024])).await;
        assert!(written.is_none(), "a stalled write ended: {written:?}");
        assert_eq!(Instant::now() - start, limit);
    }

    /// A TLS server behind a link carrying 1 KiB per 50 ms toward it (in memory, on the
    /// paused clock), reading `len` bytes, and the client's end of the link (a 4 KiB pipe,
    /// as a small send buffer) with the client's TLS configuration.
    fn slow_tls_server(
        len: usize,
    ) -> (
        tokio::io::DuplexStream,
        tokio_rustls::TlsConnector,
        tokio::task::JoinHandle<Vec<u8>>,
    ) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (near, link) = tokio::io::duplex(4096);
        let (far, server_end) = tokio::io::duplex(64 * 1024);
        let (mut link_read, mut link_write) = tokio::io::split(link);
        let (mut far_read, mut far_write) = tokio::io::split(far);
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut far_read, &mut link_write).await;
        });
        tokio::spawn(async move {
            let mut slice = [0; 1024];
            loop {
                let Ok(n) = link_read.read(&mut slice).await else {
                    return;
                };
                if n == 0 || far_write.write_all(&slice[..n]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let reader = tokio::spawn(async move {
            let mut tls = acceptor.accept(server_end).await.expect("accept");
            let mut got = vec![0; len];
            tls.read_exact(&mut got).await.expect("read");
            got
        });
        (
            near,
            tokio_rustls::TlsConnector::from(Arc::new(client)),
            reader,
        )
    }

    /// rustls takes plaintext in `poll_write` and writes the records in `poll_flush`: below
    /// TLS, `Watched` sees every byte the link takes, and a 64 KiB write over a link taking
    /// 1 KiB per 50 ms (3.2 s, 32 times the limit) gets through. Above TLS it saw nothing
    /// while the flush pushed the last records (up to rustls' 64 KiB): given up.
    #[tokio::test(start_paused = true)]
    async fn watched_below_tls_a_flush_that_moves_bytes_is_progress() {
        let limit = Duration::from_millis(100);
        let name = || rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let data = vec![7; 64 * 1024];

        let (near, connector, reader) = slow_tls_server(data.len());
        let below = Watched::new(near);
        let activity = below.activity();
        let mut tls = connector.connect(name(), below).await.expect("connect");
        let write = async {
            tls.write_all(&data).await?;
            tls.flush().await
        };
        let written = unless_stalled(limit, || activity.last_write(), write).await;
        assert!(matches!(written, Some(Ok(()))), "{written:?}");
        assert_eq!(reader.await.expect("reader"), data);

        let (near, connector, _reader) = slow_tls_server(data.len());
        let tls = connector.connect(name(), near).await.expect("connect");
        let mut above = Watched::new(tls);
        let activity = above.activity();
        let write = async {
            above.write_all(&data).await?;
            above.flush().await
        };
        let written = unless_stalled(limit, || activity.last_write(), write).await;
        assert!(
            written.is_none(),
            "watched above TLS, the tail looked stalled: {written:?}"
        );
    }
}
