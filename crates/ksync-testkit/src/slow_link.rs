//! A slow but working network link on loopback: [`SlowLink`].

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

/// The segment size the link's sockets announce (an Ethernet path's).
const MSS: u32 = 1400;
/// The receive buffer of the link's sockets (Linux doubles it).
const RECEIVE_BUFFER: u32 = 4096;

/// `len` letters a compressor cannot shrink (deflate, gzip: a relay, client or service may
/// compress what crosses the link), the same for the same `seed`.
pub fn noise(len: usize, seed: u64) -> String {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

/// A TCP proxy on 127.0.0.1:0 in front of `upstream` that carries each direction of every
/// connection at `bytes_per_second`, as a slow link does: bytes keep flowing, slowly, and
/// everything (WebSocket pings and pongs too) waits its turn behind what was sent before.
///
/// On loopback a peer's kernel would take megabytes into its send buffer at once (a 64 KiB
/// segment size grows it to 4 MiB), so a large write never waited. The link's sockets announce
/// an Ethernet segment size and a small receive window, which keeps the peers' send buffers
/// to some 100-200 KiB, as on a real slow path: a write larger than that waits for the link.
///
/// Each connection is carried until either side closes or fails, or the link is [`cut`];
/// dropping the `SlowLink` stops accepting and ends every connection. Panics on a failure to
/// set up (a test helper).
///
/// [`cut`]: SlowLink::cut
pub struct SlowLink {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    cut: watch::Sender<bool>,
    /// Bytes carried from upstream to the clients, all connections together.
    down: watch::Receiver<u64>,
}

impl SlowLink {
    /// Starts the link in front of `upstream`.
    pub async fn start(upstream: SocketAddr, bytes_per_second: usize) -> SlowLink {
        let socket = slow_socket();
        socket
            .bind("127.0.0.1:0".parse().expect("an address"))
            .expect("bind the slow link");
        let listener: TcpListener = socket.listen(64).expect("listen");
        let addr = listener.local_addr().expect("the link's address");
        let (cut, cut_seen) = watch::channel(false);
        let (down_sender, down) = watch::channel(0);
        let task = tokio::spawn(async move {
            // The connections' tasks end with this one (see `Drop`).
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((near, _)) = listener.accept().await {
                connections.spawn(carry(
                    near,
                    upstream,
                    bytes_per_second,
                    cut_seen.clone(),
                    down_sender.clone(),
                ));
                // Reaps the finished ones, so a long test does not keep them all.
                while connections.try_join_next().is_some() {}
            }
        });
        SlowLink {
            addr,
            task,
            cut,
            down,
        }
    }

    /// Waits until the link has carried at least `bytes` from upstream to the clients (all
    /// connections together), e.g. to [`cut`](SlowLink::cut) it midway through an answer.
    pub async fn carried_down(&self, bytes: u64) {
        let mut down = self.down.clone();
        // The sender lives as long as the link's task; past it nothing more comes either.
        let _ = down.wait_for(|carried| *carried >= bytes).await;
    }

    /// The link dies without a word: from now on no byte goes either way on any connection,
    /// and none is closed (what a peer sees of a pulled cable or a vanished host: its
    /// writes fill the buffers and stop, nothing comes).
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP socket announcing the link's segment size and receive window (set before the
/// connection starts: both are negotiated at the handshake).
fn slow_socket() -> TcpSocket {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .expect("a socket");
    socket.set_tcp_mss(MSS).expect("set the segment size");
    socket
        .set_recv_buffer_size(RECEIVE_BUFFER as usize)
        .expect("set the receive buffer");
    socket.set_nonblocking(true).expect("non-blocking");
    TcpSocket::from_std_stream(socket.into())
}

async fn carry(
    near: TcpStream,
    upstream: SocketAddr,
    bytes_per_second: usize,
    cut: watch::Receiver<bool>,
    down: watch::Sender<u64>,
) {
    let Ok(far) = slow_socket().connect(upstream).await else {
        return;
    };
    let _ = near.set_nodelay(true);
    let _ = far.set_nodelay(true);
    let (near_read, near_write) = near.into_split();
    let (far_read, far_write) = far.into_split();
    // Either direction ending (a close, a reset) ends both, as a dropped connection does.
    tokio::select! {
        () = forward(near_read, far_write, bytes_per_second, cut.clone(), None) => {}
        () = forward(far_read, near_write, bytes_per_second, cut, Some(down)) => {}
    }
}

/// Copies `from` to `to`, at most `bytes_per_second`: a slice of 10 ms worth at a time, the
/// next read only once the link would have carried what was read. Once `cut`, it holds both
/// sockets and moves nothing, for good. Counts what it carried in `carried`, if given.
async fn forward(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    bytes_per_second: usize,
    mut cut: watch::Receiver<bool>,
    carried: Option<watch::Sender<u64>>,
) {
    let rate = bytes_per_second.max(100);
    let mut buffer = vec![0; (rate / 100).max(1)];
    let mut next = Instant::now();
    loop {
        let read = tokio::select! {
            // Checked first: a cut link carries nothing more, even what is waiting.
            biased;
            _ = cut.wait_for(|cut| *cut) => None,
            read = from.read(&mut buffer) => Some(read),
        };
        let Some(read) = read else {
            return std::future::pending().await;
        };
        let n = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to
            .write_all(buffer.get(..n).unwrap_or_default())
            .await
            .is_err()
        {
            break;
        }
        if let Some(carried) = &carried {
            carried.send_modify(|sum| *sum += n as u64);
        }
        let took = Duration::from_secs_f64(n as f64 / rate as f64);
        // The link is busy with these bytes from when it was free (never from the past).
        next = next.max(Instant::now()) + took;
        tokio::time::sleep_until(next).await;
    }
    let _ = to.shutdown().await;
}
