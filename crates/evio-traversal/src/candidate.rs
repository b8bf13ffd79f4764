//! Candidates: addresses where a node may be reachable.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// How a candidate was learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CandidateKind {
    /// An address of a local interface (the socket's port).
    Host,
    /// Our address as a STUN server (or the TURN server) sees it.
    ServerReflexive,
    /// An address a peer's check came from that no published candidate announced.
    PeerReflexive,
    /// Our relayed address on the TURN server.
    Relayed,
}

impl CandidateKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CandidateKind::Host => "host",
            CandidateKind::ServerReflexive => "srflx",
            CandidateKind::PeerReflexive => "prflx",
            CandidateKind::Relayed => "relay",
        }
    }
}

/// A candidate: kind and address. Text form (for the NodeRecord in etcd): `"srflx 198.18.1.1:51820"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Candidate {
    pub kind: CandidateKind,
    pub addr: SocketAddr,
}

impl Candidate {
    pub fn new(kind: CandidateKind, addr: SocketAddr) -> Candidate {
        Candidate { kind, addr }
    }
}

impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.as_str(), self.addr)
    }
}

/// A candidate string that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("bad candidate {0:?} (want \"host|srflx|prflx|relay ADDR:PORT\")")]
pub struct BadCandidate(pub String);

impl FromStr for Candidate {
    type Err = BadCandidate;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadCandidate(s.to_string());
        let (k, a) = s.trim().split_once(' ').ok_or_else(bad)?;
        let kind = match k {
            "host" => CandidateKind::Host,
            "srflx" => CandidateKind::ServerReflexive,
            "prflx" => CandidateKind::PeerReflexive,
            "relay" => CandidateKind::Relayed,
            _ => return Err(bad()),
        };
        Ok(Candidate {
            kind,
            addr: a.trim().parse().map_err(|_| bad())?,
        })
    }
}

/// True for addresses that cannot be reached across the internet (RFC 1918, CGNAT, link-local, loopback,
/// ULA): a relay never sends there.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || (o[0] == 100 && (o[1] & 0xC0) == 64)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || (s & 0xfe00) == 0xfc00
                || (s & 0xffc0) == 0xfe80
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_roundtrip() {
        for s in [
            "host 192.168.1.2:51820",
            "srflx 198.18.1.1:51820",
            "relay 198.18.0.1:50000",
            "prflx [2001:db8::1]:5",
        ] {
            let c: Candidate = s.parse().unwrap();
            assert_eq!(c.to_string(), s);
        }
        assert!("bogus 1.2.3.4:5".parse::<Candidate>().is_err());
        assert!("host 1.2.3.4".parse::<Candidate>().is_err());
        assert!(is_private("192.168.1.2".parse().unwrap()));
        assert!(is_private("100.64.0.1".parse().unwrap()));
        assert!(!is_private("198.18.1.1".parse().unwrap()));
    }
}
