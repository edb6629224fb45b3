//! The transport stack: TCP (every dial from a new local port), then with a network key the
//! pnet layer, then Noise and Yamux.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{
    Boxed, DialOpts, ListenerId, PortUse, TransportError, TransportEvent,
};
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::{Multiaddr, PeerId, Transport, noise, tcp, yamux};

/// A boxed error, as the swarm builder wants it from a transport constructor.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The node's transport: TCP wrapped in [`NewPortDials`], then (with a network key) the pnet
/// layer, then Noise and Yamux, each connection's setup (TCP connect and handshakes, either
/// way) bounded by `setup_timeout`. libp2p bounds neither a dial nor an inbound handshake: a
/// peer that takes the connection and never answers (a frozen process, a NAT that lost its
/// state) held the dial for good, and a redialed peer was never dialed again.
pub(crate) fn build(
    key: &Keypair,
    psk: Option<PreSharedKey>,
    setup_timeout: Duration,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, BoxError> {
    let noise = noise::Config::new(key)?;
    let tcp = NewPortDials::new(tcp::tokio::Transport::new(
        tcp::Config::default().nodelay(true),
    ));
    let yamux = yamux::Config::default();
    Ok(match psk {
        Some(psk) => tcp
            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux)
            .timeout(setup_timeout)
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
        None => tcp
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux)
            .timeout(setup_timeout)
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
    })
}

/// Makes every dial through the wrapped transport take a new local port
/// ([`PortUse::New`]), whatever the dialer asked for.
///
/// libp2p's default ([`PortUse::Reuse`], used by every behaviour that dials on its own:
/// Kademlia, request-response, ...) dials from the listening port. Two peers that find each
/// other at the same moment (mDNS answers arrive together, a lookup on each side) then dial
/// from their listen ports to each other's, TCP's simultaneous open joins the two dials into
/// one connection, and both sides start the Noise handshake as initiator and fail. Port reuse
/// only helps NAT hole punching, which kSync does not do. It sits right above raw TCP, under
/// the upgrades, so no dial of anyone's escapes it (libp2p-tcp has no switch of its own:
/// `Config::port_reuse` is deprecated and does nothing).
#[derive(Debug, Clone)]
pub(crate) struct NewPortDials<T> {
    inner: T,
}

impl<T> NewPortDials<T> {
    pub(crate) fn new(inner: T) -> Self {
        Self { inner }
    }
}

impl<T: Transport + Unpin> Transport for NewPortDials<T> {
    type Output = T::Output;
    type Error = T::Error;
    type ListenerUpgrade = T::ListenerUpgrade;
    type Dial = T::Dial;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        self.inner.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.inner.remove_listener(id)
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        self.inner.dial(
            addr,
            DialOpts {
                port_use: PortUse::New,
                ..opts
            },
        )
    }

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        Pin::new(&mut self.get_mut().inner).poll(cx)
    }
}
