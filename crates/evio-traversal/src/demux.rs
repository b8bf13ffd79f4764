//! Demultiplexing the one UDP socket shared by WireGuard, STUN and TURN.
//!
//! The rule, in this order:
//! 1. STUN: first two bits `00`, the magic cookie `0x2112A442` at bytes 4..8, and a length field that is
//!    a multiple of 4 and exactly the rest of the datagram ([`crate::stun::is_stun`], RFC 8489 §6).
//! 2. WireGuard: a message type 1..=4 followed by three zero bytes.
//! 3. TURN ChannelData: first byte 0x40..=0x7F (channel numbers 0x4000..=0x7FFF, RFC 8656 §12).
//!
//! Why the cookie can go first without ever taking a WireGuard datagram: the two overlap only where
//! bytes 0..4 are `01..04 00 00 00`. For STUN that is a type 0x0100..=0x0400 (methods 0x000, 0x080 and
//! 0x100, none of which evio uses) with a length field of 0, so with the exact-length check only a
//! 20-byte datagram can be such a STUN message, while no WireGuard message is shorter than 32 bytes (a
//! keepalive; handshakes are 148 and 92, a cookie reply 64). The cookie alone would not be enough: a
//! WireGuard message carries a random 32-bit session index at bytes 4..8, which is the cookie for one
//! index in 2^32. ChannelData starts with bits `01`, never STUN's `00` nor a WireGuard type.

use crate::stun::StunError;

/// What a datagram is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Stun,
    ChannelData,
    WireGuard,
    Unknown,
}

/// The ChannelData header: channel number and payload length, 16 bits each.
pub const CHANNEL_HEADER: usize = 4;

/// Classifies a datagram received on the shared socket (the rule is in the module docs).
pub fn classify(buf: &[u8]) -> Kind {
    if crate::stun::is_stun(buf) {
        return Kind::Stun;
    }
    match buf.first() {
        Some(1..=4) if buf.len() >= 4 && buf[1..4] == [0, 0, 0] => Kind::WireGuard,
        Some(0x40..=0x7F) if buf.len() >= CHANNEL_HEADER => Kind::ChannelData,
        _ => Kind::Unknown,
    }
}

/// Splits a ChannelData message into (channel number, payload); `None` if malformed.
pub fn channel_data(buf: &[u8]) -> Option<(u16, &[u8])> {
    if buf.len() < CHANNEL_HEADER || !(0x40..=0x7F).contains(&buf[0]) {
        return None;
    }
    let ch = u16::from_be_bytes([buf[0], buf[1]]);
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    buf.get(CHANNEL_HEADER..CHANNEL_HEADER + len)
        .map(|p| (ch, p))
}

/// Writes the ChannelData header for a payload of `len` bytes into `buf[..4]`, for callers that put the
/// payload behind it themselves (zero copy). Fails if `len` does not fit the 16-bit length field.
pub fn channel_header(buf: &mut [u8], channel: u16, len: usize) -> Result<(), StunError> {
    let len16 = u16::try_from(len).map_err(|_| StunError::TooLong(CHANNEL_HEADER + len))?;
    buf[..2].copy_from_slice(&channel.to_be_bytes());
    buf[2..CHANNEL_HEADER].copy_from_slice(&len16.to_be_bytes());
    Ok(())
}

/// Writes a ChannelData message (header + payload; no padding, as allowed over UDP) into `out`. Fails,
/// leaving `out` empty, if the payload is longer than 65535 bytes.
pub fn encode_channel_data(
    channel: u16,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), StunError> {
    out.clear();
    let mut head = [0u8; CHANNEL_HEADER];
    channel_header(&mut head, channel, payload.len())?;
    out.extend_from_slice(&head);
    out.extend_from_slice(payload);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::{Builder, Class, MAGIC_COOKIE, TransactionId, method};

    #[test]
    fn classifies_each_protocol() {
        let stun = Builder::new(Class::Request, method::BINDING, TransactionId([7; 12]))
            .fingerprint()
            .unwrap();
        assert_eq!(classify(&stun), Kind::Stun);
        for t in 1..=4u8 {
            let mut wg = vec![t, 0, 0, 0];
            wg.extend_from_slice(&[0xAA; 44]);
            assert_eq!(classify(&wg), Kind::WireGuard);
        }
        let mut cd = Vec::new();
        encode_channel_data(0x4001, b"payload", &mut cd).unwrap();
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

    /// The overlap of the two first-byte rules, both ways round (see the module docs).
    #[test]
    fn stun_and_wireguard_never_collide() {
        // STUN messages with no attributes whose type bytes look like WireGuard's (0x0100: a method-0
        // success; 0x0200..=0x0400: methods 0x080 and 0x100): STUN, not WireGuard. Before, WireGuard.
        for ty in [0x0100u16, 0x0200, 0x0300, 0x0400] {
            let mut m = ty.to_be_bytes().to_vec();
            m.extend_from_slice(&[0, 0]);
            m.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
            m.extend_from_slice(&[9; 12]);
            assert_eq!(classify(&m), Kind::Stun, "{ty:#06x}");
        }
        // WireGuard messages whose session index happens to be the cookie: still WireGuard, from the
        // 32-byte keepalive to a handshake initiation.
        for len in [32, 64, 92, 148, 1452] {
            for t in 1..=4u8 {
                let mut wg = vec![t, 0, 0, 0];
                wg.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
                wg.resize(len, 0);
                assert_eq!(classify(&wg), Kind::WireGuard, "type {t}, {len} bytes");
            }
        }
    }

    /// The length field is 16 bits: a longer payload is an error, not a header with a wrapped length.
    #[test]
    fn channel_data_length_is_checked() {
        let mut out = Vec::new();
        let max = vec![7u8; 65_535];
        encode_channel_data(0x4000, &max, &mut out).unwrap();
        assert_eq!(channel_data(&out), Some((0x4000, &max[..])));
        for n in [65_536, 65_540, 70_000] {
            let r = encode_channel_data(0x4000, &vec![7u8; n], &mut out);
            assert_eq!(r, Err(StunError::TooLong(CHANNEL_HEADER + n)));
            assert!(out.is_empty());
        }
        let mut head = [0u8; CHANNEL_HEADER];
        assert!(channel_header(&mut head, 0x4001, 65_536).is_err());
        channel_header(&mut head, 0x4001, 300).unwrap();
        assert_eq!(head, [0x40, 0x01, 0x01, 0x2C]);
    }
}
