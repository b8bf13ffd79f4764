//! Coalescing of in-order TCP segments (and UDP datagrams) into super-packets for a TUN with
//! offloads (userspace GRO).
//!
//! [`Coalescer::plan`] groups the packets of a [`PacketBatch`]: consecutive in-sequence TCP data
//! segments of one connection (same addresses, ports, ACK number, TCP options, TOS/TTL, equal sizes
//! except a shorter last one) become one group, written to the TUN as one packet with a
//! `VIRTIO_NET_HDR_GSO_TCPV4/6` header so the kernel's stack handles a single 64 KB packet instead
//! of ~45. With [`Coalescer::set_coalesce_udp`] (a TUN with USO), datagrams of one UDP flow with
//! equal sizes (a shorter last one) become one `GSO_UDP_L4` packet the same way. Everything else is
//! written unchanged. Packet order within every connection is kept: a packet only ever joins the
//! newest group of its connection, and any packet of the connection that cannot join (SYN, FIN,
//! RST, pure ACK, out of order, empty datagram) closes that group.
//!
//! The plan only holds indices; [`Coalescer::header`] builds the rewritten headers of a group (the
//! payloads are passed to the kernel in place with `writev`), [`Coalescer::assemble`] the whole
//! super-packet in one buffer (tests, or callers that want a contiguous copy).

use crate::batch::PacketBatch;
use crate::checksum::{fold, ipv4_header, pseudo_header, sum};
use crate::vnet::{F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, VNET_HDR_LEN, VirtioNetHdr};

/// Largest IP packet a group may grow to (IPv4 total length / IPv6 payload length are 16 bits).
pub const MAX_SUPER_PACKET: usize = 65535;
/// Most segments merged into one group (bounds the `iovec` count of one write).
pub const MAX_SEGMENTS: usize = 64;
/// Largest rewritten header block: virtio header + IPv6 with room for options + 60-byte TCP header.
pub const MAX_HEADER: usize = VNET_HDR_LEN + 60 + 60;

const NONE: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Group {
    head: u32,
    last: u32,
    count: u32,
    /// What others may join: TCP or UDP data (else a packet written as is).
    kind: Kind,
    closed: bool,
    psh: bool,
    next_seq: u32,
    gso_size: u32,
    /// Total IP length of the coalesced packet so far.
    bytes: u32,
    iphlen: u16,
    thlen: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Other,
    Tcp,
    Udp,
}

/// One write to the TUN: either one packet as is, or a coalesced group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Packet index, written unchanged.
    Single(usize),
    /// Group index (see [`Coalescer::members`]), written as one super-packet.
    Group(usize),
}

/// Plans which packets of a batch to merge. Reusable; allocates only when a batch larger than any
/// before is planned.
#[derive(Debug)]
pub struct Coalescer {
    groups: Vec<Group>,
    next: Vec<u32>,
    verify: bool,
    udp: bool,
}

impl Default for Coalescer {
    fn default() -> Coalescer {
        Coalescer {
            groups: Vec::new(),
            next: Vec::new(),
            verify: true,
            udp: false,
        }
    }
}

/// Parsed facts about a TCP or UDP packet.
struct L4 {
    kind: Kind,
    iphlen: usize,
    /// TCP header length, or 8 for UDP.
    l4hlen: usize,
    seq: u32,
    flags: u8,
    payload: usize,
}

/// Parses an IPv4 (no options, no fragment) or IPv6 (no extension header) TCP or UDP packet with
/// consistent lengths; `None` for anything else.
fn parse_l4(p: &[u8]) -> Option<L4> {
    let (iphlen, proto) = match p.first()? >> 4 {
        4 => {
            if p.len() < 20 || p[0] & 0x0f != 5 {
                return None;
            }
            if u16::from_be_bytes([p[2], p[3]]) as usize != p.len() {
                return None;
            }
            // No fragments: MF clear and offset zero (DF allowed).
            if u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0 {
                return None;
            }
            (20, p[9])
        }
        6 => {
            if p.len() < 40 || u16::from_be_bytes([p[4], p[5]]) as usize + 40 != p.len() {
                return None;
            }
            (40, p[6])
        }
        _ => return None,
    };
    let t = iphlen;
    match proto {
        6 => {
            if p.len() < iphlen + 20 {
                return None;
            }
            let thlen = (p[t + 12] >> 4) as usize * 4;
            if thlen < 20 || iphlen + thlen > p.len() {
                return None;
            }
            Some(L4 {
                kind: Kind::Tcp,
                iphlen,
                l4hlen: thlen,
                seq: u32::from_be_bytes([p[t + 4], p[t + 5], p[t + 6], p[t + 7]]),
                flags: p[t + 13],
                payload: p.len() - iphlen - thlen,
            })
        }
        17 => {
            if p.len() < iphlen + 8
                || u16::from_be_bytes([p[t + 4], p[t + 5]]) as usize != p.len() - iphlen
            {
                return None;
            }
            Some(L4 {
                kind: Kind::Udp,
                iphlen,
                l4hlen: 8,
                seq: 0,
                flags: 0,
                payload: p.len() - iphlen - 8,
            })
        }
        _ => None,
    }
}

/// The TCP or UDP checksum of `p` (IP header length `iphlen`) verifies. An IPv4 UDP datagram
/// without checksum (0) counts as valid.
fn l4_checksum_ok(p: &[u8], iphlen: usize, kind: Kind) -> bool {
    let (src, dst) = if iphlen == 20 {
        (12..16, 16..20)
    } else {
        (8..24, 24..40)
    };
    let proto = if kind == Kind::Udp { 17 } else { 6 };
    if kind == Kind::Udp && iphlen == 20 && p[iphlen + 6..iphlen + 8] == [0, 0] {
        return true;
    }
    let ps = pseudo_header(&p[src], &p[dst], proto, (p.len() - iphlen) as u32);
    fold(sum(&p[iphlen..], ps)) == 0xffff
}

const ACK: u8 = 0x10;
const PSH: u8 = 0x08;

/// Same connection (version, addresses, ports); both parse as the same protocol with `iphlen`.
fn same_flow(a: &[u8], b: &[u8], iphlen: usize) -> bool {
    if a[0] >> 4 != b[0] >> 4 {
        return false;
    }
    let addrs = if iphlen == 20 { 12..20 } else { 8..40 };
    a[addrs.clone()] == b[addrs] && a[iphlen..iphlen + 4] == b[iphlen..iphlen + 4]
}

/// Everything but IPv4 id, sequence number, flags, window, checksums and lengths equal, so `b`'s
/// payload can ride behind `a`'s headers.
fn same_headers(a: &[u8], b: &[u8], iphlen: usize, l4hlen: usize, kind: Kind) -> bool {
    let ip_ok = if iphlen == 20 {
        a[1] == b[1] && a[6] == b[6] && a[8] == b[8]
    } else {
        a[0..4] == b[0..4] && a[7] == b[7]
    };
    let t = iphlen;
    ip_ok
        && (kind != Kind::Tcp
            || (a[t + 8..t + 12] == b[t + 8..t + 12]
                && a[t + 20..t + l4hlen] == b[t + 20..t + l4hlen]))
}

impl Coalescer {
    pub fn new() -> Coalescer {
        Coalescer::default()
    }

    /// Whether a segment's TCP checksum must verify before it may be merged (on by default). The
    /// kernel does not check the checksum of a coalesced packet (it is marked partial), so without
    /// this a corrupt segment would be accepted; with it, such a segment is written alone and the
    /// kernel drops it, as its own GRO would. Costs one pass over the payload.
    pub fn set_verify_checksums(&mut self, on: bool) {
        self.verify = on;
    }

    /// Also merge UDP datagrams (only for a TUN that granted `TUN_F_USO4 | TUN_F_USO6`: the
    /// kernel must accept `GSO_UDP_L4` packets). Off by default.
    pub fn set_coalesce_udp(&mut self, on: bool) {
        self.udp = on;
    }

    /// Groups the packets of `batch`; then iterate [`units`](Self::units).
    pub fn plan(&mut self, batch: &PacketBatch) {
        self.groups.clear();
        self.next.clear();
        self.next.resize(batch.len(), NONE);
        for i in 0..batch.len() {
            let p = batch.get(i);
            let Some(t) = parse_l4(p) else {
                self.push_single(i);
                continue;
            };
            if t.kind == Kind::Udp && !self.udp {
                self.push_single(i);
                continue;
            }
            let data = match t.kind {
                Kind::Tcp => t.payload > 0 && t.flags & ACK != 0 && t.flags & !(ACK | PSH) == 0,
                _ => t.payload > 0,
            };
            let candidate = data && (!self.verify || l4_checksum_ok(p, t.iphlen, t.kind));
            // The newest group of this connection, if any.
            let mut found = None;
            for (gi, g) in self.groups.iter().enumerate().rev() {
                if g.kind == t.kind && g.iphlen as usize == t.iphlen {
                    let h = batch.get(g.head as usize);
                    if same_flow(h, p, t.iphlen) {
                        found = Some(gi);
                        break;
                    }
                }
            }
            if !candidate {
                if let Some(gi) = found {
                    self.groups[gi].closed = true;
                }
                self.push_single(i);
                continue;
            }
            if let Some(gi) = found {
                let g = self.groups[gi];
                let h = batch.get(g.head as usize);
                let joins = !g.closed
                    && g.thlen as usize == t.l4hlen
                    && (t.kind == Kind::Udp || t.seq == g.next_seq)
                    && t.payload as u32 <= g.gso_size
                    && (g.count as usize) < MAX_SEGMENTS
                    && g.bytes as usize + t.payload <= MAX_SUPER_PACKET
                    && same_headers(h, p, t.iphlen, t.l4hlen, t.kind);
                if joins {
                    let g = &mut self.groups[gi];
                    self.next[g.last as usize] = i as u32;
                    g.last = i as u32;
                    g.count += 1;
                    g.next_seq = g.next_seq.wrapping_add(t.payload as u32);
                    g.bytes += t.payload as u32;
                    if t.flags & PSH != 0 {
                        g.psh = true;
                        g.closed = true;
                    }
                    if (t.payload as u32) < g.gso_size {
                        g.closed = true;
                    }
                    continue;
                }
                self.groups[gi].closed = true;
            }
            let psh = t.flags & PSH != 0;
            self.groups.push(Group {
                head: i as u32,
                last: i as u32,
                count: 1,
                kind: t.kind,
                closed: psh,
                psh,
                next_seq: t.seq.wrapping_add(t.payload as u32),
                gso_size: t.payload as u32,
                bytes: p.len() as u32,
                iphlen: t.iphlen as u16,
                thlen: t.l4hlen as u16,
            });
        }
    }

    fn push_single(&mut self, i: usize) {
        self.groups.push(Group {
            head: i as u32,
            last: i as u32,
            count: 1,
            kind: Kind::Other,
            closed: true,
            psh: false,
            next_seq: 0,
            gso_size: 0,
            bytes: 0,
            iphlen: 0,
            thlen: 0,
        });
    }

    /// The writes of the last plan, in order (each group at the position of its first packet).
    pub fn units(&self) -> impl Iterator<Item = Unit> + '_ {
        self.groups.iter().enumerate().map(|(gi, g)| {
            if g.count == 1 {
                Unit::Single(g.head as usize)
            } else {
                Unit::Group(gi)
            }
        })
    }

    /// Number of writes the last plan needs.
    pub fn unit_count(&self) -> usize {
        self.groups.len()
    }

    /// Packet indices of group `gi`, in order.
    pub fn members(&self, gi: usize) -> impl Iterator<Item = usize> + '_ {
        let mut cur = self.groups[gi].head;
        std::iter::from_fn(move || {
            if cur == NONE {
                return None;
            }
            let i = cur as usize;
            cur = self.next[i];
            Some(i)
        })
    }

    /// Number of packets in group `gi`.
    pub fn member_count(&self, gi: usize) -> usize {
        self.groups[gi].count as usize
    }

    /// IP + TCP/UDP header length of group `gi` (the payload of each member starts there).
    pub fn header_len(&self, gi: usize) -> usize {
        let g = &self.groups[gi];
        (g.iphlen + g.thlen) as usize
    }

    /// Writes the virtio header and the rewritten IP + TCP/UDP headers of group `gi` into `out` (at least
    /// [`MAX_HEADER`] bytes); returns the length written. The payloads of the members follow.
    pub fn header(&self, batch: &PacketBatch, gi: usize, out: &mut [u8]) -> usize {
        let g = &self.groups[gi];
        let h = batch.get(g.head as usize);
        let iphlen = g.iphlen as usize;
        let hlen = iphlen + g.thlen as usize;
        let total = g.bytes as usize;
        let v4 = iphlen == 20;
        let udp = g.kind == Kind::Udp;
        VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: match (udp, v4) {
                (true, _) => GSO_UDP_L4,
                (false, true) => GSO_TCPV4,
                (false, false) => GSO_TCPV6,
            },
            hdr_len: hlen as u16,
            gso_size: g.gso_size as u16,
            csum_start: iphlen as u16,
            csum_offset: if udp { 6 } else { 16 },
        }
        .encode(&mut out[..VNET_HDR_LEN]);
        let o = &mut out[VNET_HDR_LEN..VNET_HDR_LEN + hlen];
        o.copy_from_slice(&h[..hlen]);
        let (src, dst) = if v4 {
            o[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            o[10..12].copy_from_slice(&[0, 0]);
            let c = ipv4_header(&o[..20]);
            o[10..12].copy_from_slice(&c.to_be_bytes());
            (12..16, 16..20)
        } else {
            o[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
            (8..24, 24..40)
        };
        let l4len = total - iphlen;
        if udp {
            o[iphlen + 4..iphlen + 6].copy_from_slice(&(l4len as u16).to_be_bytes());
        } else if g.psh {
            o[iphlen + 13] |= PSH;
        }
        // CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum, not complemented.
        let (proto, at) = if udp {
            (17, iphlen + 6)
        } else {
            (6, iphlen + 16)
        };
        let ps = fold(pseudo_header(&h[src], &h[dst], proto, l4len as u32));
        o[at..at + 2].copy_from_slice(&ps.to_be_bytes());
        VNET_HDR_LEN + hlen
    }

    /// The whole super-packet of group `gi` (virtio header first) into `out`, replacing its contents.
    pub fn assemble(&self, batch: &PacketBatch, gi: usize, out: &mut Vec<u8>) {
        let mut hdr = [0u8; MAX_HEADER];
        let n = self.header(batch, gi, &mut hdr);
        out.clear();
        out.extend_from_slice(&hdr[..n]);
        let hlen = self.header_len(gi);
        for m in self.members(gi) {
            out.extend_from_slice(&batch.get(m)[hlen..]);
        }
    }
}
