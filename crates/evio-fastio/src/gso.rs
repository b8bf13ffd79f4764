//! Segmentation of the super-packets a TUN with offloads hands over (userspace TSO/USO).
//!
//! With `TUNSETOFFLOAD` the kernel sends TCP (and, with USO, UDP) packets of up to 64 KB through
//! the TUN, each preceded by a [`VirtioNetHdr`] that says how to cut it (`gso_size`) and where the
//! partial checksum is. [`split`] does what a NIC would: it writes MTU-sized IP packets with correct
//! lengths, IPv4 ids, TCP sequence numbers, flags (FIN/PSH on the last segment only, CWR on the first
//! only) and full checksums into a [`PacketBatch`].

use crate::batch::PacketBatch;
use crate::checksum::{fold, ipv4_header, pseudo_header, sum};
use crate::vnet::{
    F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, VirtioNetHdr,
};

/// Why a super-packet could not be segmented (the packet is dropped, the device stays usable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    #[error("malformed offload packet: {0}")]
    Malformed(&'static str),
    #[error("segment larger than a batch slot")]
    TooBig,
    #[error("not enough free slots in the batch")]
    NoRoom,
    #[error("unsupported gso type {0}")]
    Unsupported(u8),
}

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// How many slots segmenting `pkt` (with header `hdr`) needs; `None` when the packet is malformed.
pub fn segments_needed(hdr: &VirtioNetHdr, pkt: &[u8]) -> Option<usize> {
    let gso = hdr.gso_type & !GSO_ECN;
    if gso == GSO_NONE {
        return Some(1);
    }
    let hlen = header_len(hdr, pkt).ok()?;
    let mss = hdr.gso_size as usize;
    if mss == 0 {
        return None;
    }
    Some((pkt.len() - hlen).div_ceil(mss).max(1))
}

/// Length of IP + L4 headers of a GSO packet, validated against the packet.
fn header_len(hdr: &VirtioNetHdr, pkt: &[u8]) -> Result<usize, SplitError> {
    let gso = hdr.gso_type & !GSO_ECN;
    let iphlen = hdr.csum_start as usize;
    if pkt.is_empty() {
        return Err(SplitError::Malformed("empty"));
    }
    let version = pkt[0] >> 4;
    match (gso, version) {
        (GSO_TCPV4, 4) | (GSO_UDP_L4, 4) => {
            if iphlen < 20 || iphlen != (pkt[0] & 0x0f) as usize * 4 {
                return Err(SplitError::Malformed("ipv4 header length"));
            }
        }
        (GSO_TCPV6, 6) | (GSO_UDP_L4, 6) => {
            if iphlen < 40 {
                return Err(SplitError::Malformed("ipv6 header length"));
            }
        }
        (GSO_TCPV4, _) | (GSO_TCPV6, _) | (GSO_UDP_L4, _) => {
            return Err(SplitError::Malformed("ip version does not match gso type"));
        }
        (other, _) => return Err(SplitError::Unsupported(other)),
    }
    let l4hlen = if gso == GSO_UDP_L4 {
        8
    } else {
        if pkt.len() < iphlen + 20 {
            return Err(SplitError::Malformed("short tcp header"));
        }
        let doff = (pkt[iphlen + 12] >> 4) as usize * 4;
        if doff < 20 {
            return Err(SplitError::Malformed("tcp data offset"));
        }
        doff
    };
    let hlen = iphlen + l4hlen;
    if hlen > pkt.len() {
        return Err(SplitError::Malformed("headers past end"));
    }
    Ok(hlen)
}

/// Appends the IP packets that `pkt` (a TUN read after its virtio header `hdr`) stands for to `out`.
///
/// Returns the number of packets appended. All or nothing: if `out` lacks the room, nothing is
/// appended and the error is [`SplitError::NoRoom`].
pub fn split(hdr: &VirtioNetHdr, pkt: &[u8], out: &mut PacketBatch) -> Result<usize, SplitError> {
    split_inner(hdr, pkt, out, 0, true).map(|(n, _)| n)
}

/// Appends segments `first..` of `pkt` to `out`, as many as fit; returns `(appended, total)` where
/// `total` is the number of segments `pkt` makes. Lets a caller with a small batch deliver a large
/// super-packet over several calls. [`SplitError::NoRoom`] only when `out` is full.
pub fn split_from(
    hdr: &VirtioNetHdr,
    pkt: &[u8],
    out: &mut PacketBatch,
    first: usize,
) -> Result<(usize, usize), SplitError> {
    split_inner(hdr, pkt, out, first, false)
}

fn split_inner(
    hdr: &VirtioNetHdr,
    pkt: &[u8],
    out: &mut PacketBatch,
    first: usize,
    all: bool,
) -> Result<(usize, usize), SplitError> {
    let gso = hdr.gso_type & !GSO_ECN;
    if gso == GSO_NONE {
        if first > 0 {
            return Ok((0, 1));
        }
        return single(hdr, pkt, out).map(|n| (n, 1));
    }
    if hdr.flags & F_NEEDS_CSUM == 0 {
        return Err(SplitError::Malformed("gso without NEEDS_CSUM"));
    }
    let hlen = header_len(hdr, pkt)?;
    let iphlen = hdr.csum_start as usize;
    let tcp = gso != GSO_UDP_L4;
    let mss = hdr.gso_size as usize;
    if mss == 0 {
        return Err(SplitError::Malformed("gso_size 0"));
    }
    if hlen + mss > out.slot_size() {
        return Err(SplitError::TooBig);
    }
    let payload = &pkt[hlen..];
    let nseg = payload.len().div_ceil(mss).max(1);
    if first >= nseg {
        return Ok((0, nseg));
    }
    if out.remaining() == 0 || (all && nseg > out.remaining()) {
        return Err(SplitError::NoRoom);
    }
    let end = nseg.min(first + out.remaining());
    let v4 = pkt[0] >> 4 == 4;
    let (src, dst) = if v4 {
        (12..16, 16..20)
    } else {
        (8..24, 24..40)
    };
    let id0 = u16::from_be_bytes([pkt[4], pkt[5]]);
    let seq0 = u32::from_be_bytes([
        pkt[iphlen + 4],
        pkt[iphlen + 5],
        pkt[iphlen + 6],
        pkt[iphlen + 7],
    ]);
    let proto = if tcp { 6 } else { 17 };
    for i in first..end {
        let start = i * mss;
        let chunk = &payload[start..(start + mss).min(payload.len())];
        let total = hlen + chunk.len();
        let slot = out.spare_slot().expect("room checked above");
        slot[..hlen].copy_from_slice(&pkt[..hlen]);
        slot[hlen..total].copy_from_slice(chunk);
        if v4 {
            slot[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            slot[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            slot[10..12].copy_from_slice(&[0, 0]);
            let c = ipv4_header(&slot[..iphlen]);
            slot[10..12].copy_from_slice(&c.to_be_bytes());
        } else {
            slot[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        }
        let l4len = total - iphlen;
        let csum_at = if tcp {
            let t = iphlen;
            let seq = seq0.wrapping_add((i * mss) as u32);
            slot[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
            if i + 1 < nseg {
                slot[t + 13] &= !(TCP_FIN | TCP_PSH);
            }
            if i > 0 {
                slot[t + 13] &= !TCP_CWR;
            }
            t + 16
        } else {
            slot[iphlen + 4..iphlen + 6].copy_from_slice(&(l4len as u16).to_be_bytes());
            iphlen + 6
        };
        slot[csum_at..csum_at + 2].copy_from_slice(&[0, 0]);
        let ps = pseudo_header(&pkt[src.clone()], &pkt[dst.clone()], proto, l4len as u32);
        let mut c = !fold(sum(&slot[iphlen..total], ps));
        if !tcp && c == 0 {
            c = 0xffff;
        }
        slot[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
        out.commit(total);
    }
    Ok((end - first, nseg))
}

/// A packet without segmentation; completes its checksum if the kernel left it partial.
fn single(hdr: &VirtioNetHdr, pkt: &[u8], out: &mut PacketBatch) -> Result<usize, SplitError> {
    if pkt.len() > out.slot_size() {
        return Err(SplitError::TooBig);
    }
    let slot = out.spare_slot().ok_or(SplitError::NoRoom)?;
    slot[..pkt.len()].copy_from_slice(pkt);
    if hdr.flags & F_NEEDS_CSUM != 0 {
        let start = hdr.csum_start as usize;
        let at = start + hdr.csum_offset as usize;
        if at + 2 > pkt.len() {
            return Err(SplitError::Malformed("checksum offset past end"));
        }
        // The field holds the pseudo-header sum; summing over it completes the checksum.
        let mut c = !fold(sum(&slot[start..pkt.len()], 0));
        if c == 0 {
            c = 0xffff;
        }
        slot[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    out.commit(pkt.len());
    Ok(1)
}
