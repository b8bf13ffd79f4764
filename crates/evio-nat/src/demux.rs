//! Demultiplexing the one UDP socket shared by WireGuard, STUN and TURN.
//!
//! - STUN: first two bits `00` and the magic cookie `0x2112A442` at bytes 4..8 (RFC 8489 §6).
//! - TURN ChannelData: first byte 0x40..=0x7F (channel numbers 0x4000..=0x7FFF, RFC 8656 §12).
//! - WireGuard: a message type 1..=4 followed by three zero bytes (a type byte 1..4 can never be a STUN
//!   message, whose bytes 4..8 are the cookie, nor ChannelData).

/// What a datagram is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Stun,
    ChannelData,
    WireGuard,
    Unknown,
}

/// Classifies a datagram received on the shared socket.
pub fn classify(buf: &[u8]) -> Kind {
    match buf.first() {
        Some(1..=4) if buf.len() >= 4 && buf[1..4] == [0, 0, 0] => Kind::WireGuard,
        Some(0x40..=0x7F) if buf.len() >= 4 => Kind::ChannelData,
        Some(_) if crate::stun::is_stun(buf) => Kind::Stun,
        _ => Kind::Unknown,
    }
}

/// Splits a ChannelData message into (channel number, payload); `None` if malformed.
pub fn channel_data(buf: &[u8]) -> Option<(u16, &[u8])> {
    if buf.len() < 4 || !(0x40..=0x7F).contains(&buf[0]) {
        return None;
    }
    let ch = u16::from_be_bytes([buf[0], buf[1]]);
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    buf.get(4..4 + len).map(|p| (ch, p))
}

/// Writes a ChannelData message (header + payload; no padding, as allowed over UDP) into `out`.
pub fn encode_channel_data(channel: u16, payload: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::{Builder, Class, TransactionId, method};

    #[test]
    fn classifies_each_protocol() {
        let stun =
            Builder::new(Class::Request, method::BINDING, TransactionId([7; 12])).fingerprint();
        assert_eq!(classify(&stun), Kind::Stun);
        for t in 1..=4u8 {
            let mut wg = vec![t, 0, 0, 0];
            wg.extend_from_slice(&[0xAA; 44]);
            assert_eq!(classify(&wg), Kind::WireGuard);
        }
        let mut cd = Vec::new();
        encode_channel_data(0x4001, b"payload", &mut cd);
        assert_eq!(classify(&cd), Kind::ChannelData);
        assert_eq!(channel_data(&cd), Some((0x4001, &b"payload"[..])));
        assert_eq!(classify(&[1, 0, 0]), Kind::Unknown);
        assert_eq!(classify(&[5, 0, 0, 0, 1]), Kind::Unknown);
        assert_eq!(classify(&[0x80; 32]), Kind::Unknown);
        // A STUN-looking header without the cookie is not STUN.
        let mut fake = stun.clone();
        fake[4] = 0;
        assert_eq!(classify(&fake), Kind::Unknown);
    }
}
