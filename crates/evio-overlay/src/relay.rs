//! Typed destinations, and the tunnel core's stand-in endpoints for relayed peers (private to the crate).

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};

pub use evio_traversal::demux::CHANNEL_HEADER;

/// Where a datagram goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dst {
    /// Send the payload as it is to this address.
    Direct(SocketAddr),
    /// Send the payload through our TURN allocation: a ChannelData header for `channel` in front of it
    /// ([`CHANNEL_HEADER`] bytes), to `server`.
    Relay { server: SocketAddr, channel: u16 },
}

impl Dst {
    /// The UDP destination.
    pub fn addr(&self) -> SocketAddr {
        match self {
            Dst::Direct(a) => *a,
            Dst::Relay { server, .. } => *server,
        }
    }

    /// Bytes of framing in front of the payload.
    pub fn header_len(&self) -> usize {
        match self {
            Dst::Direct(_) => 0,
            Dst::Relay { .. } => CHANNEL_HEADER,
        }
    }
}

/// A datagram to send that the hot-path results did not carry: checks, STUN and TURN traffic, handshakes,
/// cookies, keepalives, queued packets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub dst: Dst,
    pub payload: Vec<u8>,
}

impl Transmit {
    /// The datagram's length on the wire (framing included).
    pub fn len(&self) -> usize {
        self.dst.header_len() + self.payload.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the datagram (framing and payload) into `buf` (at least [`Transmit::len`] bytes); returns its
    /// length, or `None` if it cannot be framed (a payload over 65,535 bytes for a channel).
    pub fn encode(&self, buf: &mut [u8]) -> Option<usize> {
        let n = self.len();
        let buf = buf.get_mut(..n)?;
        if let Dst::Relay { channel, .. } = self.dst {
            evio_traversal::demux::channel_header(buf, channel, self.payload.len()).ok()?;
        }
        buf[self.dst.header_len()..].copy_from_slice(&self.payload);
        Some(n)
    }
}

/// The address of relay endpoints.
const RELAY_IP: Ipv6Addr = Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 1);
/// The address of provisional endpoints: relayed datagrams from an address with no relay slot yet.
const PENDING_IP: Ipv6Addr = Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 2);

/// True if `a` is a relay endpoint (a peer reached through our TURN allocation).
#[inline]
pub(crate) fn is_relay(a: &SocketAddr) -> bool {
    matches!(a, SocketAddr::V6(v) if *v.ip() == RELAY_IP)
}

/// True if `a` is a provisional endpoint (never a destination: sends to it are dropped).
#[inline]
pub(crate) fn is_provisional(a: &SocketAddr) -> bool {
    matches!(a, SocketAddr::V6(v) if *v.ip() == PENDING_IP)
}

pub(crate) fn relay_endpoint(slot: u16) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(RELAY_IP, slot, 0, 0))
}

pub(crate) fn provisional_endpoint(i: u16) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(PENDING_IP, i, 0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stand_in_endpoints_are_recognised_and_never_real() {
        let ep = relay_endpoint(7);
        assert!(is_relay(&ep) && !is_provisional(&ep));
        assert_eq!(ep.port(), 7);
        assert!(is_provisional(&provisional_endpoint(3)));
        assert!(!is_relay(&"198.18.0.1:3478".parse().unwrap()));
        assert!(!is_relay(&"[2001:db8::1]:7".parse().unwrap()));
    }

    #[test]
    fn a_relayed_transmit_is_framed_as_channel_data() {
        let t = Transmit {
            dst: Dst::Relay {
                server: "198.18.0.1:3478".parse().unwrap(),
                channel: 0x4001,
            },
            payload: b"\x04\0\0\0ab".to_vec(),
        };
        let mut buf = [0u8; 16];
        let n = t.encode(&mut buf).unwrap();
        assert_eq!(n, 10);
        assert_eq!(
            evio_traversal::demux::channel_data(&buf[..n]),
            Some((0x4001, &b"\x04\0\0\0ab"[..]))
        );
        let d = Transmit {
            dst: Dst::Direct("192.0.2.1:1".parse().unwrap()),
            payload: b"xyz".to_vec(),
        };
        assert_eq!(d.encode(&mut buf), Some(3));
        assert_eq!(&buf[..3], b"xyz");
        assert_eq!(d.encode(&mut buf[..2]), None, "too small a buffer");
    }
}
