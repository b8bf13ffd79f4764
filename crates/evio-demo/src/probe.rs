//! The connectivity matrix's probes: real ICMP echo requests, sent from each source namespace through a
//! raw socket opened there, to all of that source's targets at once, retried once a second until answered
//! or the common deadline. One thread per source, so N sources with N-1 targets each take about one round
//! trip when everything works and the deadline when something does not, whatever N is; no process per
//! probe (one `ip netns exec … ping -c1 -W1` process per probe through a pool of 32 threads was most of
//! a 55.8 s demo at 30 nodes; this matrix takes 3.1 s there, see docs/bench/demo.md).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{MsgFlags, SockaddrIn, recv, sendto};
use std::time::{Duration, Instant};

use crate::signals;

/// One source: a namespace and the addresses it probes.
pub struct Source {
    pub ns: String,
    pub targets: Vec<Ipv4Addr>,
}

/// How often an unanswered target is probed again.
const RETRY: Duration = Duration::from_secs(1);

/// Probes every target of every source until answered or `end`; per source, per target: the round trip
/// time in ms of the first answer, None if none came. An error opening a source's socket is reported as
/// that source's error (its targets unanswered).
pub fn run(sources: &[Source], end: Instant) -> Vec<Result<Vec<Option<f64>>, String>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = sources
            .iter()
            .enumerate()
            .map(|(k, src)| s.spawn(move || probe_source(src, k as u16, end)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("probe thread panicked".into()))
            })
            .collect()
    })
}

fn open_socket(ns: &str) -> Result<OwnedFd, String> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};
    // Every ICMP message reaching the namespace is copied to a raw socket; replies are picked out by
    // type, identifier, sequence and source (`parse_reply`, `probe_source`).
    evio_testbed::lab::in_netns(ns, || {
        socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::Icmp,
        )
    })
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("raw ICMP socket in {ns}: {e}"))
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        sum += u32::from(w);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request with identifier `id`, sequence `seq` and a 32-byte payload.
fn echo_request(id: u16, seq: u16) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 8; // echo request
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in p[8..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let c = checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

/// Parses an echo reply as a raw socket delivers it (IP header first): (source, id, seq).
fn parse_reply(buf: &[u8]) -> Option<(Ipv4Addr, u16, u16)> {
    let ihl = usize::from(buf.first()? & 0x0f) * 4;
    if buf.len() < ihl + 8 || ihl < 20 {
        return None;
    }
    let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
    let icmp = &buf[ihl..];
    if icmp[0] != 0 {
        return None;
    }
    Some((
        src,
        u16::from_be_bytes([icmp[4], icmp[5]]),
        u16::from_be_bytes([icmp[6], icmp[7]]),
    ))
}

fn probe_source(src: &Source, k: u16, end: Instant) -> Result<Vec<Option<f64>>, String> {
    let n = src.targets.len();
    let mut rtt: Vec<Option<f64>> = vec![None; n];
    if n == 0 {
        return Ok(rtt);
    }
    let fd = open_socket(&src.ns)?;
    // Each source is alone in its namespace's raw sockets; the id still ties replies to this run.
    let id = (std::process::id() as u16) ^ k.rotate_left(7);
    let mut sent_at: Vec<Option<Instant>> = vec![None; n];
    let mut answered = 0;
    let mut buf = [0u8; 1500];
    let mut next_round = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next_round {
            for (seq, ip) in src.targets.iter().enumerate() {
                if rtt[seq].is_some() {
                    continue;
                }
                let pkt = echo_request(id, seq as u16);
                let addr = SockaddrIn::from(SocketAddrV4::new(*ip, 0));
                // The round trip counts from the latest request (an answer to an earlier one is late),
                // from before the call: the reply may be back before sendto returns. A failure (no
                // route, a full queue) is a probe that got no answer: it is retried.
                sent_at[seq] = Some(Instant::now());
                let _ = sendto(fd.as_raw_fd(), &pkt, &addr, MsgFlags::empty());
            }
            next_round = now + RETRY;
        }
        if answered == n || now >= end || signals::interrupted() {
            return Ok(rtt);
        }
        let wait = next_round.min(end).saturating_duration_since(now);
        let ms = wait.as_millis().clamp(1, 200) as u16;
        let mut pfd = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        if !matches!(poll(&mut pfd, PollTimeout::from(ms)), Ok(n) if n > 0) {
            continue;
        }
        loop {
            let got = match recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) if n > 0 => n,
                _ => break,
            };
            let Some((from, rid, seq)) = parse_reply(&buf[..got]) else {
                continue;
            };
            let seq = usize::from(seq);
            if rid != id || seq >= n || src.targets[seq] != from || rtt[seq].is_some() {
                continue;
            }
            let t = sent_at[seq].map(|t| t.elapsed()).unwrap_or_default();
            rtt[seq] = Some(t.as_secs_f64() * 1000.0);
            answered += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_request_checksum_verifies() {
        let p = echo_request(0x1234, 7);
        assert_eq!(checksum(&p), 0);
        assert_eq!(&p[4..8], &[0x12, 0x34, 0, 7]);
    }

    #[test]
    fn replies_are_parsed_after_the_ip_header() {
        let mut b = vec![
            0x45u8, 0, 0, 48, 0, 0, 0, 0, 64, 1, 0, 0, 10, 10, 0, 2, 10, 10, 0, 1,
        ];
        b.extend_from_slice(&[0, 0, 0, 0, 0x12, 0x34, 0, 9]);
        assert_eq!(
            parse_reply(&b),
            Some((Ipv4Addr::new(10, 10, 0, 2), 0x1234, 9))
        );
        b[20] = 8; // a request, not a reply
        assert_eq!(parse_reply(&b), None);
        assert_eq!(parse_reply(&b[..24]), None);
    }
}
