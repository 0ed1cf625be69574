//! A TCP transport whose outgoing connections always take a fresh local port.
//!
//! libp2p dials with [`PortUse::Reuse`] by default: an outgoing connection is bound to
//! the local listen port. Agents all listen on the same port, so when two of them find
//! each other through mDNS and dial at the same moment, both connections have the same
//! four-tuple (`A:7400 ↔ B:7400`). TCP then makes *one* connection out of the two
//! simultaneous opens, and both ends act as its dialer: both start the noise handshake
//! as initiator, and it fails with "input error" on both sides. Neither host then has a
//! connection to the other. A fresh port per dial makes the two attempts two
//! connections; one of them survives.

use libp2p::core::transport::{DialOpts, ListenerId, PortUse, TransportError, TransportEvent};
use libp2p::{Multiaddr, Transport};
use std::pin::Pin;
use std::task::{Context, Poll};

/// Wraps a transport and rewrites every dial to [`PortUse::New`].
pub struct FreshPortTcp<T>(pub T);

impl<T: Transport + Unpin> Transport for FreshPortTcp<T> {
    type Output = T::Output;
    type Error = T::Error;
    type ListenerUpgrade = T::ListenerUpgrade;
    type Dial = T::Dial;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        self.0.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.0.remove_listener(id)
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        self.0.dial(
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
        Pin::new(&mut self.get_mut().0).poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::core::Endpoint;
    use std::net::TcpListener;

    /// The dial's local port differs from the listener's: the property that prevents
    /// the simultaneous-open collision described above.
    #[tokio::test]
    async fn dials_do_not_bind_the_listen_port() {
        let target = TcpListener::bind("127.0.0.1:0").expect("bind target");
        let target_port = target.local_addr().expect("addr").port();
        let mut t = FreshPortTcp(libp2p::tcp::tokio::Transport::new(
            libp2p::tcp::Config::default(),
        ));
        let listen: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().expect("addr");
        t.listen_on(ListenerId::next(), listen).expect("listen");
        // Let the transport report its listen address, so that port reuse would apply.
        let own_port = loop {
            let ev = futures::future::poll_fn(|cx| Pin::new(&mut t).poll(cx)).await;
            if let TransportEvent::NewAddress { listen_addr, .. } = ev {
                break listen_addr
                    .iter()
                    .find_map(|p| match p {
                        libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
                        _ => None,
                    })
                    .expect("tcp port");
            }
        };
        let to: Multiaddr = format!("/ip4/127.0.0.1/tcp/{target_port}")
            .parse()
            .expect("addr");
        let dial = t
            .dial(
                to,
                DialOpts {
                    role: Endpoint::Dialer,
                    port_use: PortUse::Reuse,
                },
            )
            .expect("dial");
        let _stream = dial.await.expect("connect");
        let (_conn, from) = target.accept().expect("accept");
        assert_ne!(from.port(), own_port, "the dial reused the listen port");
    }
}
