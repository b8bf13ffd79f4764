//! A small STUN codec (RFC 5389/8489 header and attributes, RFC 8656 TURN attributes).
//!
//! Decoding borrows from the datagram (no copies: a relayed WireGuard packet inside a Data indication is a
//! sub-slice of what was received). Encoding writes into a `Vec<u8>` and can append MESSAGE-INTEGRITY
//! (HMAC-SHA1) and FINGERPRINT (CRC-32 xor 0x5354554e).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use sha1::Sha1;

/// The magic cookie at bytes 4..8 of every RFC 5389 message.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
const HEADER: usize = 20;

/// STUN methods used here.
pub mod method {
    pub const BINDING: u16 = 0x001;
    pub const ALLOCATE: u16 = 0x003;
    pub const REFRESH: u16 = 0x004;
    pub const SEND: u16 = 0x006;
    pub const DATA: u16 = 0x007;
    pub const CREATE_PERMISSION: u16 = 0x008;
    pub const CHANNEL_BIND: u16 = 0x009;
}

/// STUN/TURN attribute types used here.
pub mod attr {
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    pub const USERNAME: u16 = 0x0006;
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub const ERROR_CODE: u16 = 0x0009;
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    pub const LIFETIME: u16 = 0x000D;
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    pub const DATA: u16 = 0x0013;
    pub const REALM: u16 = 0x0014;
    pub const NONCE: u16 = 0x0015;
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    pub const SOFTWARE: u16 = 0x8022;
    pub const FINGERPRINT: u16 = 0x8028;
}

/// The message class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Request,
    Indication,
    Success,
    Error,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Class::Request => 0x000,
            Class::Indication => 0x010,
            Class::Success => 0x100,
            Class::Error => 0x110,
        }
    }
}

/// A 96-bit transaction id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TransactionId(pub [u8; 12]);

/// Decoding errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StunError {
    #[error("not a STUN message")]
    NotStun,
    #[error("truncated STUN message")]
    Truncated,
    #[error("bad fingerprint")]
    Fingerprint,
}

/// True if `buf` looks like a STUN message: first two bits 00, magic cookie at 4..8, length a multiple of 4.
pub fn is_stun(buf: &[u8]) -> bool {
    buf.len() >= HEADER
        && buf[0] & 0xC0 == 0
        && u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) == MAGIC_COOKIE
        && u16::from_be_bytes([buf[2], buf[3]]).is_multiple_of(4)
}

/// A decoded message borrowing from the datagram.
#[derive(Clone, Debug)]
pub struct Message<'a> {
    pub class: Class,
    pub method: u16,
    pub tid: TransactionId,
    raw: &'a [u8],
    attrs: Vec<(u16, &'a [u8])>,
    /// Offset of the MESSAGE-INTEGRITY attribute header, if present.
    integrity_at: Option<usize>,
}

impl<'a> Message<'a> {
    /// Decodes one message (the whole datagram). A FINGERPRINT, if present, must be right.
    pub fn decode(buf: &'a [u8]) -> Result<Message<'a>, StunError> {
        if !is_stun(buf) {
            return Err(StunError::NotStun);
        }
        let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        if buf.len() < HEADER + len {
            return Err(StunError::Truncated);
        }
        let raw = &buf[..HEADER + len];
        let ty = u16::from_be_bytes([buf[0], buf[1]]);
        let class = match ty & 0x110 {
            0x000 => Class::Request,
            0x010 => Class::Indication,
            0x100 => Class::Success,
            _ => Class::Error,
        };
        let method = (ty & 0x000F) | ((ty & 0x00E0) >> 1) | ((ty & 0x3E00) >> 2);
        let mut tid = [0u8; 12];
        tid.copy_from_slice(&buf[8..20]);
        let mut attrs = Vec::new();
        let mut integrity_at = None;
        let mut off = HEADER;
        while off + 4 <= raw.len() {
            let t = u16::from_be_bytes([raw[off], raw[off + 1]]);
            let l = u16::from_be_bytes([raw[off + 2], raw[off + 3]]) as usize;
            let v = raw.get(off + 4..off + 4 + l).ok_or(StunError::Truncated)?;
            match t {
                attr::MESSAGE_INTEGRITY if integrity_at.is_none() => integrity_at = Some(off),
                attr::FINGERPRINT => {
                    // The last attribute (RFC 8489 §14.7), checked before the CRC: one datagram costs at
                    // most one CRC. Accepting it anywhere let a 64 KiB datagram of 8000 valid
                    // FINGERPRINTs cost 8000 CRCs over its growing prefix (found writing the fuzz
                    // targets; docs/fuzz.md).
                    if v.len() != 4 || off + 8 != raw.len() {
                        return Err(StunError::Fingerprint);
                    }
                    let want = crc32fast::hash(&raw[..off]) ^ 0x5354_554e;
                    if u32::from_be_bytes([v[0], v[1], v[2], v[3]]) != want {
                        return Err(StunError::Fingerprint);
                    }
                }
                _ => {}
            }
            // Attributes after MESSAGE-INTEGRITY (other than FINGERPRINT) are not covered: ignore them.
            if integrity_at.is_none() || t == attr::MESSAGE_INTEGRITY {
                attrs.push((t, v));
            }
            off += 4 + l.div_ceil(4) * 4;
        }
        Ok(Message {
            class,
            method,
            tid: TransactionId(tid),
            raw,
            attrs,
            integrity_at,
        })
    }

    /// The first attribute of type `t`.
    pub fn attr(&self, t: u16) -> Option<&'a [u8]> {
        self.attrs.iter().find(|(at, _)| *at == t).map(|(_, v)| *v)
    }

    /// All attributes of type `t`.
    pub fn attrs(&self, t: u16) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.attrs
            .iter()
            .filter(move |(at, _)| *at == t)
            .map(|(_, v)| *v)
    }

    /// An XOR-encoded address attribute (XOR-MAPPED-ADDRESS, XOR-PEER-ADDRESS, XOR-RELAYED-ADDRESS).
    pub fn xor_addr(&self, t: u16) -> Option<SocketAddr> {
        decode_xor_addr(self.attr(t)?, &self.tid)
    }

    /// Every XOR-encoded address attribute of type `t` (several XOR-PEER-ADDRESS in CreatePermission).
    pub fn xor_addrs(&self, t: u16) -> Vec<SocketAddr> {
        self.attrs(t)
            .filter_map(|v| decode_xor_addr(v, &self.tid))
            .collect()
    }

    /// A string attribute (USERNAME, REALM, NONCE).
    pub fn text(&self, t: u16) -> Option<&'a str> {
        std::str::from_utf8(self.attr(t)?).ok()
    }

    /// The ERROR-CODE as a number (e.g. 401).
    pub fn error_code(&self) -> Option<u16> {
        let v = self.attr(attr::ERROR_CODE)?;
        (v.len() >= 4).then(|| (v[2] & 0x7) as u16 * 100 + v[3] as u16)
    }

    /// A 32-bit attribute (LIFETIME).
    pub fn u32_attr(&self, t: u16) -> Option<u32> {
        let v = self.attr(t)?;
        (v.len() >= 4).then(|| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
    }

    pub fn has_integrity(&self) -> bool {
        self.integrity_at.is_some()
    }

    /// Checks MESSAGE-INTEGRITY with `key` (false when absent or wrong).
    pub fn verify(&self, key: &[u8]) -> bool {
        let Some(at) = self.integrity_at else {
            return false;
        };
        let Some(mac) = self.raw.get(at + 4..at + 24) else {
            return false;
        };
        let mut head = [0u8; HEADER];
        head.copy_from_slice(&self.raw[..HEADER]);
        let len = (at + 24 - HEADER) as u16;
        head[2..4].copy_from_slice(&len.to_be_bytes());
        let mut m = <Hmac<Sha1> as Mac>::new_from_slice(key).expect("hmac takes any key length");
        m.update(&head);
        m.update(&self.raw[HEADER..at]);
        m.verify_slice(mac).is_ok()
    }
}

fn decode_xor_addr(v: &[u8], tid: &TransactionId) -> Option<SocketAddr> {
    if v.len() < 8 {
        return None;
    }
    let port = u16::from_be_bytes([v[2], v[3]]) ^ (MAGIC_COOKIE >> 16) as u16;
    match v[1] {
        1 => {
            let x = u32::from_be_bytes([v[4], v[5], v[6], v[7]]) ^ MAGIC_COOKIE;
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(x)), port))
        }
        2 if v.len() >= 20 => {
            let mut key = [0u8; 16];
            key[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            key[4..].copy_from_slice(&tid.0);
            let mut a = [0u8; 16];
            for i in 0..16 {
                a[i] = v[4 + i] ^ key[i];
            }
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port))
        }
        _ => None,
    }
}

fn encode_xor_addr(addr: SocketAddr, tid: &TransactionId) -> Vec<u8> {
    let mut v = vec![0u8, 0];
    let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
    match addr.ip() {
        IpAddr::V4(ip) => {
            v[1] = 1;
            v.extend_from_slice(&port.to_be_bytes());
            v.extend_from_slice(&(u32::from(ip) ^ MAGIC_COOKIE).to_be_bytes());
        }
        IpAddr::V6(ip) => {
            v[1] = 2;
            v.extend_from_slice(&port.to_be_bytes());
            let mut key = [0u8; 16];
            key[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            key[4..].copy_from_slice(&tid.0);
            for (i, b) in ip.octets().iter().enumerate() {
                v.push(b ^ key[i]);
            }
        }
    }
    v
}

/// Builds one message.
#[derive(Clone, Debug)]
pub struct Builder {
    buf: Vec<u8>,
    tid: TransactionId,
}

impl Builder {
    pub fn new(class: Class, method: u16, tid: TransactionId) -> Builder {
        let ty =
            (method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2) | class.bits();
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&ty.to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(&tid.0);
        Builder { buf, tid }
    }

    /// Appends an attribute (padded to 4 bytes).
    pub fn attr(mut self, t: u16, v: &[u8]) -> Self {
        self.buf.extend_from_slice(&t.to_be_bytes());
        self.buf.extend_from_slice(&(v.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(v);
        let pad = v.len().div_ceil(4) * 4 - v.len();
        self.buf.extend(std::iter::repeat_n(0u8, pad));
        self.set_len();
        self
    }

    pub fn xor_addr(self, t: u16, addr: SocketAddr) -> Self {
        let v = encode_xor_addr(addr, &self.tid);
        self.attr(t, &v)
    }

    pub fn u32_attr(self, t: u16, v: u32) -> Self {
        self.attr(t, &v.to_be_bytes())
    }

    pub fn error(self, code: u16, reason: &str) -> Self {
        let mut v = vec![0, 0, (code / 100) as u8, (code % 100) as u8];
        v.extend_from_slice(reason.as_bytes());
        self.attr(attr::ERROR_CODE, &v)
    }

    fn set_len(&mut self) {
        let len = (self.buf.len() - HEADER) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
    }

    /// Appends MESSAGE-INTEGRITY computed with `key`.
    pub fn integrity(mut self, key: &[u8]) -> Self {
        let len = (self.buf.len() + 24 - HEADER) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
        let mut m = <Hmac<Sha1> as Mac>::new_from_slice(key).expect("hmac takes any key length");
        m.update(&self.buf);
        let mac = m.finalize().into_bytes();
        self.attr(attr::MESSAGE_INTEGRITY, &mac)
    }

    /// Appends FINGERPRINT and returns the datagram.
    pub fn fingerprint(mut self) -> Vec<u8> {
        let len = (self.buf.len() + 8 - HEADER) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
        let crc = crc32fast::hash(&self.buf) ^ 0x5354_554e;
        self.attr(attr::FINGERPRINT, &crc.to_be_bytes()).buf
    }

    /// Returns the datagram without a FINGERPRINT.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// The long-term credential key: MD5(username ":" realm ":" password) (RFC 8489 §9.2.2).
pub fn long_term_key(user: &str, realm: &str, password: &str) -> [u8; 16] {
    use md5::{Digest, Md5};
    let mut h = Md5::new();
    h.update(format!("{user}:{realm}:{password}").as_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tid() -> TransactionId {
        TransactionId([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    }

    #[test]
    fn roundtrip_with_integrity_and_fingerprint() {
        let a: SocketAddr = "198.18.1.1:40000".parse().unwrap();
        let b: SocketAddr = "[2001:db8::1]:9".parse().unwrap();
        let m = Builder::new(Class::Success, method::BINDING, tid())
            .xor_addr(attr::XOR_MAPPED_ADDRESS, a)
            .xor_addr(attr::XOR_PEER_ADDRESS, b)
            .attr(attr::USERNAME, b"abcde")
            .integrity(b"key")
            .fingerprint();
        assert!(is_stun(&m));
        let d = Message::decode(&m).unwrap();
        assert_eq!(
            (d.class, d.method, d.tid),
            (Class::Success, method::BINDING, tid())
        );
        assert_eq!(d.xor_addr(attr::XOR_MAPPED_ADDRESS), Some(a));
        assert_eq!(d.xor_addr(attr::XOR_PEER_ADDRESS), Some(b));
        assert_eq!(d.text(attr::USERNAME), Some("abcde"));
        assert!(d.verify(b"key"));
        assert!(!d.verify(b"other"));
        let mut bad = m.clone();
        bad[30] ^= 1;
        assert_eq!(Message::decode(&bad).unwrap_err(), StunError::Fingerprint);
    }

    /// A FINGERPRINT that is not the last attribute is rejected without walking on: before, each of
    /// the ~8000 valid FINGERPRINTs that fit one UDP datagram cost a CRC over the growing prefix.
    #[test]
    fn fingerprint_must_be_last() {
        let one = Builder::new(Class::Request, method::BINDING, tid()).fingerprint();
        assert!(Message::decode(&one).is_ok());
        // A valid FINGERPRINT followed by another attribute.
        let mut two = one.clone();
        two.extend_from_slice(&[0x80, 0x22, 0, 4, b'e', b'v', b'i', b'o']);
        let len = (two.len() - HEADER) as u16;
        two[2..4].copy_from_slice(&len.to_be_bytes());
        // Re-seal the first FINGERPRINT for the new length, so only its position is wrong.
        let crc = crc32fast::hash(&two[..HEADER]) ^ 0x5354_554e;
        two[HEADER + 4..HEADER + 8].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(Message::decode(&two).unwrap_err(), StunError::Fingerprint);
        // The datagram that cost 8185 CRCs: as many valid FINGERPRINTs as fit 64 KiB.
        let n = (65507 - HEADER) / 8;
        let mut m = Builder::new(Class::Request, method::BINDING, tid()).finish();
        m[2..4].copy_from_slice(&((n * 8) as u16).to_be_bytes());
        for _ in 0..n {
            let crc = crc32fast::hash(&m) ^ 0x5354_554e;
            m.extend_from_slice(&attr::FINGERPRINT.to_be_bytes());
            m.extend_from_slice(&4u16.to_be_bytes());
            m.extend_from_slice(&crc.to_be_bytes());
        }
        assert_eq!(Message::decode(&m).unwrap_err(), StunError::Fingerprint);
    }

    #[test]
    fn method_and_class_bits() {
        // An Allocate error response is 0x0113, a Data indication 0x0017, ChannelBind success 0x0109.
        let m = Builder::new(Class::Error, method::ALLOCATE, tid())
            .error(401, "Unauthorized")
            .finish();
        assert_eq!(&m[..2], &[0x01, 0x13]);
        let d = Message::decode(&m).unwrap();
        assert_eq!(
            (d.class, d.method, d.error_code()),
            (Class::Error, method::ALLOCATE, Some(401))
        );
        assert_eq!(
            &Builder::new(Class::Indication, method::DATA, tid()).finish()[..2],
            &[0x00, 0x17]
        );
        assert_eq!(
            &Builder::new(Class::Success, method::CHANNEL_BIND, tid()).finish()[..2],
            &[0x01, 0x09]
        );
    }

    #[test]
    fn rfc5769_sample_request_verifies() {
        // RFC 5769 §2.1 sample request, short-term password "VOkJxbRl1RmTxUk/WvJxBt".
        let hex = "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e20746573742063\
                   6c69656e74002400046e0001ff80290008932ff9b151263b36000600096576746a3a68\
                   367659202020000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e5\
                   7a3bcf";
        let hex: String = hex.split_whitespace().collect();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let d = Message::decode(&bytes).unwrap();
        assert_eq!(d.text(attr::USERNAME), Some("evtj:h6vY"));
        assert!(d.verify(b"VOkJxbRl1RmTxUk/WvJxBt"));
    }
}
