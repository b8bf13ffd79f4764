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
/// The fixed header in front of the attributes.
pub const HEADER: usize = 20;
/// The longest attribute section: the length field is 16 bits and counts whole 4-byte words.
pub const MAX_BODY: usize = 0xFFFC;
/// Value lengths of the fixed-size attributes (RFC 8489 §14).
const INTEGRITY_LEN: usize = 20;
const FINGERPRINT_LEN: usize = 4;

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

/// Decoding and encoding errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StunError {
    #[error("not a STUN message")]
    NotStun,
    #[error("truncated STUN message")]
    Truncated,
    #[error("bad fingerprint")]
    Fingerprint,
    #[error("MESSAGE-INTEGRITY of {0} bytes (must be 20)")]
    IntegrityLength(usize),
    /// Encoding: the message (or ChannelData payload) would not fit its 16-bit length field.
    #[error("{0} bytes do not fit a 16-bit length field")]
    TooLong(usize),
}

/// True if `buf` is framed as one STUN message: first two bits 00, magic cookie at 4..8, and a length
/// field that is a multiple of 4 and exactly the rest of the datagram (over UDP a STUN message is the
/// whole datagram). The exact length is what keeps STUN apart from WireGuard (see [`crate::demux`]).
pub fn is_stun(buf: &[u8]) -> bool {
    buf.len() >= HEADER
        && buf[0] & 0xC0 == 0
        && u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) == MAGIC_COOKIE
        && {
            let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
            len.is_multiple_of(4) && buf.len() == HEADER + len
        }
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
    /// Decodes one message (the whole datagram). A FINGERPRINT, if present, must be right and last; a
    /// MESSAGE-INTEGRITY, if present, must be 20 bytes.
    pub fn decode(buf: &'a [u8]) -> Result<Message<'a>, StunError> {
        if !is_stun(buf) {
            return Err(StunError::NotStun);
        }
        let raw = buf;
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
                attr::MESSAGE_INTEGRITY if integrity_at.is_none() => {
                    // HMAC-SHA1 is 20 bytes; `verify` computes the HMAC over what precedes this header
                    // with the length field pointing right after these 20 bytes, so any other length
                    // would make the MAC cover a message that was not the one received.
                    if l != INTEGRITY_LEN {
                        return Err(StunError::IntegrityLength(l));
                    }
                    integrity_at = Some(off)
                }
                attr::FINGERPRINT => {
                    // The last attribute (RFC 8489 §14.7), checked before the CRC: one datagram costs at
                    // most one CRC. Accepting it anywhere let a 64 KiB datagram of 8000 valid
                    // FINGERPRINTs cost 8000 CRCs over its growing prefix (found writing the fuzz
                    // targets; docs/fuzz.md).
                    if v.len() != FINGERPRINT_LEN || off + 4 + FINGERPRINT_LEN != raw.len() {
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

    /// An XOR-encoded address attribute (XOR-MAPPED-ADDRESS, XOR-PEER-ADDRESS, XOR-RELAYED-ADDRESS);
    /// `None` unless it is exactly 8 bytes (IPv4) or 20 bytes (IPv6).
    pub fn xor_addr(&self, t: u16) -> Option<SocketAddr> {
        decode_xor_addr(self.attr(t)?, &self.tid)
    }

    /// A plain address attribute (MAPPED-ADDRESS, which STUN servers may send besides or instead of
    /// XOR-MAPPED-ADDRESS); same lengths as [`Message::xor_addr`].
    pub fn addr(&self, t: u16) -> Option<SocketAddr> {
        decode_addr(self.attr(t)?)
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

/// A plain address attribute value: a reserved byte, the family (1: IPv4, 8 bytes in all; 2: IPv6, 20
/// bytes in all), the port and the address (RFC 8489 §14.1).
fn decode_addr(v: &[u8]) -> Option<SocketAddr> {
    let port = u16::from_be_bytes([*v.get(2)?, *v.get(3)?]);
    match (v[1], v.len()) {
        (1, 8) => {
            let a: [u8; 4] = v[4..8].try_into().ok()?;
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), port))
        }
        (2, 20) => {
            let a: [u8; 16] = v[4..20].try_into().ok()?;
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port))
        }
        _ => None,
    }
}

fn decode_xor_addr(v: &[u8], tid: &TransactionId) -> Option<SocketAddr> {
    let port = u16::from_be_bytes([*v.get(2)?, *v.get(3)?]) ^ (MAGIC_COOKIE >> 16) as u16;
    match (v[1], v.len()) {
        (1, 8) => {
            let x = u32::from_be_bytes([v[4], v[5], v[6], v[7]]) ^ MAGIC_COOKIE;
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(x)), port))
        }
        (2, 20) => {
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
///
/// The STUN length field is 16 bits: an attribute that would push the message past [`MAX_BODY`] is not
/// appended, and [`Builder::finish`] / [`Builder::fingerprint`] then return [`StunError::TooLong`]
/// instead of a datagram whose length field is wrong. Everything evio builds is small except a Send
/// indication, whose DATA is the caller's payload.
#[derive(Clone, Debug)]
pub struct Builder {
    buf: Vec<u8>,
    tid: TransactionId,
    /// The attribute section length that did not fit, once something did not.
    too_long: Option<usize>,
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
        Builder {
            buf,
            tid,
            too_long: None,
        }
    }

    /// The attribute section length with `more` bytes appended, if it still fits the length field.
    fn fits(&mut self, more: usize) -> Option<u16> {
        if self.too_long.is_some() {
            return None;
        }
        let body = self.buf.len() - HEADER + more;
        if body > MAX_BODY {
            self.too_long = Some(body);
            return None;
        }
        Some(body as u16)
    }

    /// Appends an attribute (padded to 4 bytes).
    pub fn attr(mut self, t: u16, v: &[u8]) -> Self {
        let padded = v.len().div_ceil(4) * 4;
        let Some(body) = self.fits(4 + padded) else {
            return self;
        };
        // `v.len() <= padded <= MAX_BODY`: the attribute's own length fits 16 bits too.
        self.buf.extend_from_slice(&t.to_be_bytes());
        self.buf.extend_from_slice(&(v.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(v);
        self.buf.extend(std::iter::repeat_n(0u8, padded - v.len()));
        self.buf[2..4].copy_from_slice(&body.to_be_bytes());
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

    /// Appends MESSAGE-INTEGRITY computed with `key`.
    pub fn integrity(mut self, key: &[u8]) -> Self {
        // The MAC covers the header with the length already counting the MESSAGE-INTEGRITY attribute.
        let Some(body) = self.fits(4 + INTEGRITY_LEN) else {
            return self;
        };
        self.buf[2..4].copy_from_slice(&body.to_be_bytes());
        let mut m = <Hmac<Sha1> as Mac>::new_from_slice(key).expect("hmac takes any key length");
        m.update(&self.buf);
        let mac = m.finalize().into_bytes();
        self.attr(attr::MESSAGE_INTEGRITY, &mac)
    }

    /// Appends FINGERPRINT and returns the datagram.
    pub fn fingerprint(mut self) -> Result<Vec<u8>, StunError> {
        if let Some(body) = self.fits(4 + FINGERPRINT_LEN) {
            self.buf[2..4].copy_from_slice(&body.to_be_bytes());
            let crc = crc32fast::hash(&self.buf) ^ 0x5354_554e;
            self = self.attr(attr::FINGERPRINT, &crc.to_be_bytes());
        }
        self.finish()
    }

    /// Returns the datagram without a FINGERPRINT.
    pub fn finish(self) -> Result<Vec<u8>, StunError> {
        match self.too_long {
            Some(body) => Err(StunError::TooLong(HEADER + body)),
            None => Ok(self.buf),
        }
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
            .fingerprint()
            .unwrap();
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
        let one = Builder::new(Class::Request, method::BINDING, tid())
            .fingerprint()
            .unwrap();
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
        let mut m = Builder::new(Class::Request, method::BINDING, tid())
            .finish()
            .unwrap();
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
            .finish()
            .unwrap();
        assert_eq!(&m[..2], &[0x01, 0x13]);
        let d = Message::decode(&m).unwrap();
        assert_eq!(
            (d.class, d.method, d.error_code()),
            (Class::Error, method::ALLOCATE, Some(401))
        );
        assert_eq!(
            &Builder::new(Class::Indication, method::DATA, tid())
                .finish()
                .unwrap()[..2],
            &[0x00, 0x17]
        );
        assert_eq!(
            &Builder::new(Class::Success, method::CHANNEL_BIND, tid())
                .finish()
                .unwrap()[..2],
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

    /// Re-seals a hand-edited message: sets its length field to the rest of the datagram.
    fn seal(m: &mut [u8]) {
        let len = (m.len() - HEADER) as u16;
        m[2..4].copy_from_slice(&len.to_be_bytes());
    }

    /// MESSAGE-INTEGRITY is an HMAC-SHA1, 20 bytes. Any other declared length is a decode error: before,
    /// `verify` took the 20 bytes after the attribute header whatever the attribute said.
    #[test]
    fn integrity_must_be_20_bytes() {
        let good = Builder::new(Class::Success, method::BINDING, tid())
            .integrity(b"key")
            .finish()
            .unwrap();
        assert!(Message::decode(&good).unwrap().verify(b"key"));
        for l in [0usize, 16, 24, 32] {
            // The MAC cut short, or followed by zeros.
            let mut m = good[..HEADER + 4].to_vec();
            m[HEADER + 2..HEADER + 4].copy_from_slice(&(l as u16).to_be_bytes());
            let mut mac = good[HEADER + 4..].to_vec();
            mac.resize(l.div_ceil(4) * 4, 0);
            m.extend_from_slice(&mac);
            seal(&mut m);
            assert_eq!(
                Message::decode(&m).unwrap_err(),
                StunError::IntegrityLength(l)
            );
        }
    }

    /// FINGERPRINT is a CRC-32, 4 bytes: a longer one is rejected even when its first 4 bytes are right.
    #[test]
    fn fingerprint_must_be_4_bytes() {
        let m = Builder::new(Class::Request, method::BINDING, tid())
            .fingerprint()
            .unwrap();
        let mut long = m.clone();
        long[HEADER + 3] = 8;
        long.extend_from_slice(&[0; 4]);
        seal(&mut long);
        let crc = crc32fast::hash(&long[..HEADER]) ^ 0x5354_554e;
        long[HEADER + 4..HEADER + 8].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(Message::decode(&long).unwrap_err(), StunError::Fingerprint);
    }

    /// Address attributes are exactly 8 (IPv4) or 20 (IPv6) bytes; anything else is not an address.
    #[test]
    fn address_attributes_have_exact_lengths() {
        let v4: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::7]:9".parse().unwrap();
        let x4 = encode_xor_addr(v4, &tid());
        let x6 = encode_xor_addr(v6, &tid());
        let with = |v: &[u8]| {
            Builder::new(Class::Success, method::BINDING, tid())
                .attr(attr::XOR_MAPPED_ADDRESS, v)
                .finish()
                .unwrap()
        };
        let m = with(&x4);
        assert_eq!(
            Message::decode(&m)
                .unwrap()
                .xor_addr(attr::XOR_MAPPED_ADDRESS),
            Some(v4)
        );
        let m = with(&x6);
        assert_eq!(
            Message::decode(&m)
                .unwrap()
                .xor_addr(attr::XOR_MAPPED_ADDRESS),
            Some(v6)
        );
        // An IPv4 family with IPv6 length, an IPv6 family with trailing bytes, cut ones.
        let mut v4_long = x4.clone();
        v4_long.extend_from_slice(&[0; 12]);
        let mut v6_long = x6.clone();
        v6_long.extend_from_slice(&[0; 4]);
        for v in [
            &v4_long[..],
            &v6_long[..],
            &x6[..8],
            &x4[..4],
            &x4[..1],
            &[][..],
        ] {
            let m = with(v);
            let d = Message::decode(&m).unwrap();
            assert_eq!(d.xor_addr(attr::XOR_MAPPED_ADDRESS), None, "{v:?}");
            assert_eq!(d.addr(attr::XOR_MAPPED_ADDRESS), None, "{v:?}");
        }
    }

    /// MAPPED-ADDRESS is not XOR-encoded.
    #[test]
    fn plain_mapped_address() {
        let m = Builder::new(Class::Success, method::BINDING, tid())
            .attr(attr::MAPPED_ADDRESS, &[0, 1, 0x9c, 0x40, 198, 51, 100, 7])
            .finish()
            .unwrap();
        let d = Message::decode(&m).unwrap();
        assert_eq!(
            d.addr(attr::MAPPED_ADDRESS),
            Some("198.51.100.7:40000".parse().unwrap())
        );
    }

    /// Over UDP a STUN message is the whole datagram: bytes after the declared length make it not STUN
    /// (this is what keeps a WireGuard datagram from ever looking like one, see `demux`).
    #[test]
    fn length_must_match_the_datagram() {
        let m = Builder::new(Class::Request, method::BINDING, tid())
            .fingerprint()
            .unwrap();
        assert!(is_stun(&m));
        let mut longer = m.clone();
        longer.extend_from_slice(&[0; 4]);
        assert!(!is_stun(&longer));
        assert_eq!(Message::decode(&longer).unwrap_err(), StunError::NotStun);
        assert!(!is_stun(&m[..m.len() - 4]));
    }

    /// The length field is 16 bits: what does not fit is an error, never a datagram with a wrong length.
    #[test]
    fn builder_refuses_what_does_not_fit() {
        // The largest DATA that fits: 4 bytes of attribute header, 65528 bytes of value.
        let fits = vec![0xAB; MAX_BODY - 4];
        let m = Builder::new(Class::Indication, method::SEND, tid())
            .attr(attr::DATA, &fits)
            .finish()
            .unwrap();
        assert_eq!(m.len(), HEADER + MAX_BODY);
        let d = Message::decode(&m).unwrap();
        assert_eq!(d.attr(attr::DATA), Some(&fits[..]));
        // ... but not with a FINGERPRINT or MESSAGE-INTEGRITY after it.
        let b = Builder::new(Class::Indication, method::SEND, tid()).attr(attr::DATA, &fits);
        assert_eq!(
            b.clone().fingerprint().unwrap_err(),
            StunError::TooLong(HEADER + MAX_BODY + 8)
        );
        assert!(b.integrity(b"k").finish().is_err());
        // A 64 KiB payload, and one that the old `as u16` cast would have framed as 4 bytes long.
        for n in [65_536, 65_536 + 4, 70_000] {
            let r = Builder::new(Class::Indication, method::SEND, tid())
                .attr(attr::DATA, &vec![0; n])
                .attr(attr::SOFTWARE, b"evio")
                .fingerprint();
            assert!(matches!(r, Err(StunError::TooLong(_))), "{n}: {r:?}");
        }
    }
}
