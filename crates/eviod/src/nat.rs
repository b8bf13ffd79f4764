//! NAT traversal settings and records in eviod. NAT traversal itself (candidates, checks, path
//! selection, the TURN relay and its framing) lives in `evio-overlay`'s node, beside the tunnel core; this
//! module turns the command line into its settings and its candidates into the node record and back (its
//! counters become metrics in `metrics.rs`).

use std::net::{SocketAddr, ToSocketAddrs};

use anyhow::{Context, Result, bail};
use evio_overlay::{Candidate, CandidateKind, TurnConfig};

use crate::config::NatConfig;

/// Resolves `HOST:PORT` to a socket address: IPv4 if it has one, else IPv6 (the tunnel socket is
/// dual-stack; our TURN allocation is IPv4 either way).
pub fn resolve(s: &str) -> Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {s:?} (want HOST:PORT)"))?
        .collect();
    match addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()) {
        Some(a) => Ok(*a),
        None => bail!("{s:?} has no address"),
    }
}

/// The agent configuration from the command line: STUN servers, TURN server and credentials.
pub fn agent_settings(cfg: &NatConfig) -> Result<(Vec<SocketAddr>, Option<TurnConfig>)> {
    let stun = cfg
        .stun
        .iter()
        .map(|s| resolve(s))
        .collect::<Result<Vec<_>>>()?;
    let turn = match (&cfg.turn, &cfg.turn_user, &cfg.turn_password_file) {
        (Some(server), Some(user), Some(file)) => {
            let password =
                evio_store::read_secret_file(file, "TURN password").with_context(|| {
                    format!("cannot read the TURN password file {}", file.display())
                })?;
            Some(TurnConfig {
                server: resolve(server)?,
                user: user.clone(),
                password,
            })
        }
        _ => None,
    };
    Ok((stun, turn))
}

/// Our candidates as published in the NodeRecord (peer-reflexive ones are learned, never published).
pub fn to_records(c: &[Candidate]) -> Vec<evio_store::Candidate> {
    c.iter()
        .filter_map(|c| {
            let kind = match c.kind {
                CandidateKind::Host => evio_store::CandidateKind::Host,
                CandidateKind::ServerReflexive => evio_store::CandidateKind::Srflx,
                CandidateKind::Relayed => evio_store::CandidateKind::Relay,
                CandidateKind::PeerReflexive => return None,
            };
            Some(evio_store::Candidate { kind, addr: c.addr })
        })
        .collect()
}

/// A peer's candidates from its NodeRecord: its candidates, and its endpoints as host candidates (records
/// of agents that publish no candidates). Both families: the tunnel socket is dual-stack (the control
/// plane has already dropped addresses that cannot be used, `cluster.rs`).
pub fn from_record(r: &evio_store::NodeRecord) -> Vec<Candidate> {
    let mut v: Vec<Candidate> = Vec::new();
    let mut add = |c: Candidate| {
        if !c.addr.ip().is_unspecified()
            && c.addr.port() != 0
            && !v.iter().any(|x| x.addr == c.addr)
        {
            v.push(c);
        }
    };
    for c in &r.candidates {
        let kind = match c.kind {
            evio_store::CandidateKind::Host => CandidateKind::Host,
            evio_store::CandidateKind::Srflx => CandidateKind::ServerReflexive,
            evio_store::CandidateKind::Relay => CandidateKind::Relayed,
            evio_store::CandidateKind::Unknown => continue,
        };
        add(Candidate::new(kind, c.addr));
    }
    for e in &r.endpoints {
        add(Candidate::new(CandidateKind::Host, *e));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_round_trip_through_the_record() {
        let ours = vec![
            Candidate::new(CandidateKind::Host, "192.168.1.2:51820".parse().unwrap()),
            Candidate::new(
                CandidateKind::ServerReflexive,
                "198.18.1.1:51820".parse().unwrap(),
            ),
            Candidate::new(
                CandidateKind::PeerReflexive,
                "198.18.1.1:4000".parse().unwrap(),
            ),
            Candidate::new(CandidateKind::Relayed, "198.18.0.1:50000".parse().unwrap()),
        ];
        let mut r = evio_store::NodeRecord::new("n");
        r.candidates = to_records(&ours);
        assert_eq!(
            r.candidates.len(),
            3,
            "peer-reflexive candidates are not published"
        );
        // Endpoints of older records count as host candidates; duplicates and unspecified addresses are
        // dropped; IPv6 ones are kept (a dual-stack socket reaches them).
        r.endpoints = vec![
            "192.168.1.2:51820".parse().unwrap(),
            "10.0.0.5:51820".parse().unwrap(),
            "[2001:db8::1]:1".parse().unwrap(),
            "[::]:1".parse().unwrap(),
            "0.0.0.0:1".parse().unwrap(),
        ];
        let back = from_record(&r);
        let want: Vec<Candidate> = ours
            .iter()
            .filter(|c| c.kind != CandidateKind::PeerReflexive)
            .copied()
            .chain([
                Candidate::new(CandidateKind::Host, "10.0.0.5:51820".parse().unwrap()),
                Candidate::new(CandidateKind::Host, "[2001:db8::1]:1".parse().unwrap()),
            ])
            .collect();
        assert_eq!(back, want);
    }

    #[test]
    fn turn_settings_need_a_readable_password_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\n").unwrap();
        let cfg = NatConfig {
            stun: vec!["127.0.0.1:3478".into()],
            turn: Some("127.0.0.1:3478".into()),
            turn_user: Some("u".into()),
            turn_password_file: Some(f.clone()),
        };
        let (stun, turn) = agent_settings(&cfg).unwrap();
        assert_eq!(stun, vec!["127.0.0.1:3478".parse().unwrap()]);
        let turn = turn.unwrap();
        assert_eq!(
            (turn.user.as_str(), turn.password.as_str()),
            ("u", "s3cret")
        );
        let missing = NatConfig {
            turn_password_file: Some(dir.path().join("nope")),
            ..cfg.clone()
        };
        assert!(agent_settings(&missing).is_err());
        let bad = NatConfig {
            stun: vec!["no-port".into()],
            ..cfg
        };
        assert!(agent_settings(&bad).is_err());
    }
}
