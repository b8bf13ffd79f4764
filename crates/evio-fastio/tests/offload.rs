//! Segmentation (userspace TSO/USO) and coalescing (userspace GRO) on hand-built packets, checked
//! with an independent, naive checksum implementation.

use evio_fastio::gro::{Coalescer, Unit};
use evio_fastio::vnet::{self, VNET_HDR_LEN, VirtioNetHdr};
use evio_fastio::{PacketBatch, SplitError, split};

// ---------- independent reference helpers ----------

/// RFC 1071 sum, 16 bits at a time, folded.
fn naive_sum(chunks: &[&[u8]]) -> u16 {
    let mut s: u32 = 0;
    for data in chunks {
        let mut i = 0;
        while i + 1 < data.len() {
            s += u16::from_be_bytes([data[i], data[i + 1]]) as u32;
            i += 2;
        }
        if i < data.len() {
            s += (data[i] as u32) << 8;
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
    }
    s as u16
}

fn pseudo(p: &[u8], proto: u8, l4len: usize) -> Vec<u8> {
    let mut v = Vec::new();
    if p[0] >> 4 == 4 {
        v.extend_from_slice(&p[12..20]);
    } else {
        v.extend_from_slice(&p[8..40]);
    }
    v.extend_from_slice(&[0, proto]);
    v.extend_from_slice(&(l4len as u16).to_be_bytes());
    v
}

/// True if the IP header checksum (v4) and the TCP/UDP checksum verify.
fn checksums_ok(p: &[u8]) -> bool {
    let (iphlen, proto) = if p[0] >> 4 == 4 {
        ((p[0] & 15) as usize * 4, p[9])
    } else {
        (40, p[6])
    };
    if p[0] >> 4 == 4 && naive_sum(&[&p[..iphlen]]) != 0xffff {
        return false;
    }
    let l4 = &p[iphlen..];
    naive_sum(&[&pseudo(p, proto, l4.len()), l4]) == 0xffff
}

fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}
fn be32(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[derive(Clone, Copy)]
struct Tcp {
    v6: bool,
    sport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    opts: &'static [u8],
    id: u16,
}

impl Tcp {
    fn v4() -> Tcp {
        Tcp {
            v6: false,
            sport: 40000,
            seq: 0xfffff000,
            ack: 777,
            flags: 0x10,
            opts: &[],
            id: 0xfffe,
        }
    }
    fn v6() -> Tcp {
        Tcp {
            v6: true,
            ..Tcp::v4()
        }
    }
}

/// A complete TCP packet with valid checksums.
fn tcp_packet(t: &Tcp, data: &[u8]) -> Vec<u8> {
    let thlen = 20 + t.opts.len();
    assert_eq!(t.opts.len() % 4, 0);
    let mut p = Vec::new();
    if t.v6 {
        p.extend_from_slice(&[0x60, 0x01, 0x23, 0x45]);
        p.extend_from_slice(&((thlen + data.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[6, 64]);
        p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    } else {
        p.extend_from_slice(&[0x45, 0]);
        p.extend_from_slice(&((20 + thlen + data.len()) as u16).to_be_bytes());
        p.extend_from_slice(&t.id.to_be_bytes());
        p.extend_from_slice(&[0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        let c = !naive_sum(&[&p[..20]]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }
    let iphlen = p.len();
    p.extend_from_slice(&t.sport.to_be_bytes());
    p.extend_from_slice(&5201u16.to_be_bytes());
    p.extend_from_slice(&t.seq.to_be_bytes());
    p.extend_from_slice(&t.ack.to_be_bytes());
    p.push(((thlen / 4) as u8) << 4);
    p.push(t.flags);
    p.extend_from_slice(&[0xfa, 0xf0, 0, 0, 0, 0]);
    p.extend_from_slice(t.opts);
    p.extend_from_slice(data);
    let l4len = p.len() - iphlen;
    let c = !naive_sum(&[&pseudo(&p, 6, l4len), &p[iphlen..]]);
    p[iphlen + 16..iphlen + 18].copy_from_slice(&c.to_be_bytes());
    assert!(checksums_ok(&p));
    p
}

/// A UDP packet with valid checksums.
fn udp_packet(v6: bool, data: &[u8]) -> Vec<u8> {
    let mut p = tcp_packet(&Tcp { v6, ..Tcp::v4() }, &[]);
    let iphlen = if v6 { 40 } else { 20 };
    p.truncate(iphlen);
    if v6 {
        p[6] = 17;
        p[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    } else {
        p[9] = 17;
        p[2..4].copy_from_slice(&((iphlen + 8 + data.len()) as u16).to_be_bytes());
        p[10..12].copy_from_slice(&[0, 0]);
        let c = !naive_sum(&[&p[..20]]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }
    p.extend_from_slice(&[0x13, 0x88, 0x13, 0x89]);
    p.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(data);
    let c = !naive_sum(&[&pseudo(&p, 17, 8 + data.len()), &p[iphlen..]]);
    p[iphlen + 6..iphlen + 8].copy_from_slice(&c.to_be_bytes());
    assert!(checksums_ok(&p));
    p
}

/// Turns a full packet into what a TUN with offloads hands over: the L4 checksum replaced by the
/// pseudo-header sum (CHECKSUM_PARTIAL), lengths covering the whole packet.
fn as_partial(p: &mut [u8], csum_off: usize) -> u16 {
    let (iphlen, proto) = if p[0] >> 4 == 4 {
        (20, p[9])
    } else {
        (40, p[6])
    };
    let ps = naive_sum(&[&pseudo(p, proto, p.len() - iphlen)]);
    p[iphlen + csum_off..iphlen + csum_off + 2].copy_from_slice(&ps.to_be_bytes());
    iphlen as u16
}

fn tso_hdr(v6: bool, hdr_len: usize, gso_size: usize, udp: bool) -> VirtioNetHdr {
    VirtioNetHdr {
        flags: vnet::F_NEEDS_CSUM,
        gso_type: if udp {
            vnet::GSO_UDP_L4
        } else if v6 {
            vnet::GSO_TCPV6
        } else {
            vnet::GSO_TCPV4
        },
        hdr_len: hdr_len as u16,
        gso_size: gso_size as u16,
        csum_start: if v6 { 40 } else { 20 },
        csum_offset: if udp { 6 } else { 16 },
    }
}

// ---------- segmentation ----------

fn check_tcp_split(v6: bool, total_payload: usize, mss: usize, flags: u8) {
    let opts: &'static [u8] = &[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]; // NOP NOP timestamps
    let t = Tcp {
        flags,
        opts,
        ..if v6 { Tcp::v6() } else { Tcp::v4() }
    };
    let data = payload(total_payload, 7);
    let mut big = tcp_packet(&t, &data);
    as_partial(&mut big, 16);
    let iphlen = if v6 { 40 } else { 20 };
    let hlen = iphlen + 20 + opts.len();
    let hdr = tso_hdr(v6, hlen, mss, false);
    let mut out = PacketBatch::new(400, 1500);
    out.push(&[1, 2, 3]); // something already there stays first
    let n = split(&hdr, &big, &mut out).expect("split");
    let want = total_payload.div_ceil(mss);
    assert_eq!(n, want);
    assert_eq!(out.len(), want + 1);
    assert_eq!(out.get(0), &[1, 2, 3]);
    let mut got = Vec::new();
    for i in 0..n {
        let s = out.get(i + 1);
        assert!(
            checksums_ok(s),
            "segment {i} checksum (v6 {v6}, payload {total_payload}, mss {mss})"
        );
        let plen = s.len() - hlen;
        assert_eq!(plen, mss.min(total_payload - i * mss));
        if v6 {
            assert_eq!(be16(s, 4) as usize, s.len() - 40);
            assert_eq!(&s[..4], &big[..4], "traffic class / flow label kept");
        } else {
            assert_eq!(be16(s, 2) as usize, s.len());
            assert_eq!(
                be16(s, 4),
                t.id.wrapping_add(i as u16),
                "ipv4 id increments"
            );
        }
        assert_eq!(
            be32(s, iphlen + 4),
            t.seq.wrapping_add((i * mss) as u32),
            "sequence number"
        );
        assert_eq!(be32(s, iphlen + 8), t.ack);
        assert_eq!(&s[iphlen + 20..hlen], opts, "options copied");
        let f = s[iphlen + 13];
        let last = i + 1 == n;
        let mut expect = flags;
        if !last {
            expect &= !(0x01 | 0x08);
        }
        if i > 0 {
            expect &= !0x80;
        }
        assert_eq!(f, expect, "flags of segment {i}");
        got.extend_from_slice(&s[hlen..]);
    }
    assert_eq!(got, data, "payload reassembles");
}

#[test]
fn split_tcp_v4_odd_sizes() {
    check_tcp_split(false, 4001, 1000, 0x10 | 0x08 | 0x01); // ACK PSH FIN
    check_tcp_split(false, 65535 - 52, 1448, 0x10 | 0x08);
    check_tcp_split(false, 1, 1448, 0x10);
    check_tcp_split(false, 2896, 1448, 0x10 | 0x80); // CWR on the first only
    check_tcp_split(false, 7, 3, 0x18);
}

#[test]
fn split_tcp_v6_odd_sizes() {
    check_tcp_split(true, 4001, 1000, 0x10 | 0x08 | 0x01);
    check_tcp_split(true, 65535 - 32, 1428, 0x10 | 0x08);
    check_tcp_split(true, 1429, 1428, 0x10 | 0x80);
    check_tcp_split(true, 333, 1, 0x10);
}

#[test]
fn split_udp_l4() {
    for v6 in [false, true] {
        let data = payload(3 * 1200 + 17, 3);
        let mut big = udp_packet(v6, &data);
        let iphlen = as_partial(&mut big, 6) as usize;
        let hdr = tso_hdr(v6, iphlen + 8, 1200, true);
        let mut out = PacketBatch::new(8, 1500);
        assert_eq!(split(&hdr, &big, &mut out), Ok(4));
        let mut got = Vec::new();
        for (i, s) in out.iter().enumerate() {
            assert!(checksums_ok(s), "udp segment {i} v6 {v6}");
            assert_eq!(be16(s, iphlen + 4) as usize, s.len() - iphlen, "udp length");
            got.extend_from_slice(&s[iphlen + 8..]);
        }
        assert_eq!(got, data);
    }
}

#[test]
fn needs_csum_only_is_completed() {
    for v6 in [false, true] {
        let mut p = tcp_packet(
            &Tcp {
                flags: 0x18,
                ..if v6 { Tcp::v6() } else { Tcp::v4() }
            },
            &payload(999, 1),
        );
        let good = p.clone();
        let iphlen = as_partial(&mut p, 16);
        assert!(!checksums_ok(&p));
        let hdr = VirtioNetHdr {
            flags: vnet::F_NEEDS_CSUM,
            gso_type: vnet::GSO_NONE,
            csum_start: iphlen,
            csum_offset: 16,
            ..Default::default()
        };
        let mut out = PacketBatch::new(1, 1500);
        assert_eq!(split(&hdr, &p, &mut out), Ok(1));
        assert_eq!(out.get(0), &good[..]);
        // Without NEEDS_CSUM the packet is copied as is.
        let mut out = PacketBatch::new(1, 1500);
        assert_eq!(split(&VirtioNetHdr::default(), &good, &mut out), Ok(1));
        assert_eq!(out.get(0), &good[..]);
    }
}

#[test]
fn split_from_delivers_in_pieces() {
    let t = Tcp::v6();
    let mut big = tcp_packet(&Tcp { flags: 0x19, ..t }, &payload(20 * 1000 + 1, 5));
    as_partial(&mut big, 16);
    let hdr = tso_hdr(true, 60, 1000, false);
    let mut whole = PacketBatch::new(64, 1500);
    assert_eq!(split(&hdr, &big, &mut whole), Ok(21));
    let mut pieces = Vec::new();
    let mut next = 0;
    let mut small = PacketBatch::new(4, 1500);
    small.push(&[0]);
    loop {
        let (n, total) = evio_fastio::split_from(&hdr, &big, &mut small, next).unwrap();
        assert_eq!(total, 21);
        pieces.extend(small.iter().filter(|p| p.len() > 1).map(|p| p.to_vec()));
        small.clear();
        next += n;
        if next == total {
            break;
        }
    }
    assert_eq!(pieces.len(), 21);
    for (i, p) in pieces.iter().enumerate() {
        assert_eq!(&p[..], whole.get(i), "segment {i}");
    }
    let mut full = PacketBatch::new(1, 1500);
    full.push(&[0]);
    assert_eq!(
        evio_fastio::split_from(&hdr, &big, &mut full, 0),
        Err(SplitError::NoRoom)
    );
}

#[test]
fn split_errors_leave_batch_untouched() {
    let t = Tcp::v4();
    let mut big = tcp_packet(&t, &payload(5000, 0));
    as_partial(&mut big, 16);
    let hdr = tso_hdr(false, 40, 1000, false);
    let mut out = PacketBatch::new(4, 1500);
    assert_eq!(split(&hdr, &big, &mut out), Err(SplitError::NoRoom));
    assert!(out.is_empty());
    let mut small = PacketBatch::new(8, 500);
    assert_eq!(split(&hdr, &big, &mut small), Err(SplitError::TooBig));
    let bad = VirtioNetHdr {
        csum_start: 24,
        ..hdr
    };
    assert!(matches!(
        split(&bad, &big, &mut out),
        Err(SplitError::Malformed(_))
    ));
    let v6hdr = tso_hdr(true, 60, 1000, false);
    assert!(matches!(
        split(&v6hdr, &big, &mut out),
        Err(SplitError::Malformed(_))
    ));
    assert!(out.is_empty());
}

#[test]
fn split_survives_garbage() {
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = PacketBatch::new(64, 1500);
    for _ in 0..20000 {
        let len = (rnd() % 3000) as usize;
        let mut p: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
        if !p.is_empty() && rnd() % 2 == 0 {
            p[0] = if rnd() % 2 == 0 { 0x45 } else { 0x60 };
        }
        let hdr = VirtioNetHdr {
            flags: (rnd() % 4) as u8,
            gso_type: [0, 1, 3, 4, 5, 0x81][(rnd() % 6) as usize],
            hdr_len: (rnd() % 100) as u16,
            gso_size: (rnd() % 1500) as u16,
            csum_start: (rnd() % 80) as u16,
            csum_offset: (rnd() % 20) as u16,
        };
        out.clear();
        let _ = split(&hdr, &p, &mut out);
    }
}

// ---------- coalescing ----------

/// `n` consecutive data segments of `mss` bytes (last `last` bytes), ACK, PSH on the last.
fn flow(t: &Tcp, n: usize, mss: usize, last: usize) -> Vec<Vec<u8>> {
    let mut seq = t.seq;
    (0..n)
        .map(|i| {
            let len = if i + 1 == n { last } else { mss };
            let flags = if i + 1 == n { 0x18 } else { 0x10 };
            let p = tcp_packet(
                &Tcp {
                    seq,
                    flags,
                    id: t.id.wrapping_add(i as u16),
                    ..*t
                },
                &payload(len, i as u8),
            );
            seq = seq.wrapping_add(len as u32);
            p
        })
        .collect()
}

fn batch_of(pkts: &[Vec<u8>]) -> PacketBatch {
    let mut b = PacketBatch::new(pkts.len().max(1), 1500);
    for p in pkts {
        assert!(b.push(p));
    }
    b
}

/// Re-splits a coalesced group and checks it equals the original packets, plus header invariants.
fn check_group(c: &Coalescer, b: &PacketBatch, gi: usize, originals: &[&[u8]]) {
    let mut sp = Vec::new();
    c.assemble(b, gi, &mut sp);
    let hdr = VirtioNetHdr::decode(&sp).unwrap();
    let pkt = &sp[VNET_HDR_LEN..];
    let v6 = pkt[0] >> 4 == 6;
    let iphlen = if v6 { 40 } else { 20 };
    assert_eq!(hdr.flags, vnet::F_NEEDS_CSUM);
    assert_eq!(
        hdr.gso_type,
        if v6 { vnet::GSO_TCPV6 } else { vnet::GSO_TCPV4 }
    );
    assert_eq!(hdr.csum_start as usize, iphlen);
    assert_eq!(hdr.csum_offset, 16);
    let hlen = hdr.hdr_len as usize;
    assert_eq!(hdr.gso_size as usize, originals[0].len() - hlen);
    if v6 {
        assert_eq!(be16(pkt, 4) as usize, pkt.len() - 40);
    } else {
        assert_eq!(be16(pkt, 2) as usize, pkt.len());
        assert_eq!(naive_sum(&[&pkt[..20]]), 0xffff, "ipv4 header checksum");
    }
    // The TCP checksum field holds the pseudo-header sum: completing it gives a valid packet.
    let ps = naive_sum(&[&pseudo(pkt, 6, pkt.len() - iphlen)]);
    assert_eq!(
        be16(pkt, iphlen + 16),
        ps,
        "partial checksum = pseudo-header sum"
    );
    let mut full = pkt.to_vec();
    let c2 = !naive_sum(&[&full[iphlen..]]);
    full[iphlen + 16..iphlen + 18].copy_from_slice(&c2.to_be_bytes());
    assert!(checksums_ok(&full));
    // Segmenting it again gives back the original packets exactly.
    let mut out = PacketBatch::new(70, 1500);
    let n = split(&hdr, pkt, &mut out).unwrap();
    assert_eq!(n, originals.len());
    for (i, o) in originals.iter().enumerate() {
        assert_eq!(out.get(i), *o, "segment {i} after round trip");
    }
}

#[test]
fn coalesce_one_flow_round_trips() {
    for v6 in [false, true] {
        let t = Tcp {
            opts: &[1, 1, 8, 10, 0, 0, 1, 0, 0, 0, 2, 0],
            ..if v6 { Tcp::v6() } else { Tcp::v4() }
        };
        let pkts = flow(&t, 10, 1000, 333);
        let b = batch_of(&pkts);
        let mut c = Coalescer::new();
        c.plan(&b);
        let units: Vec<Unit> = c.units().collect();
        assert_eq!(units, vec![Unit::Group(0)]);
        assert_eq!(c.member_count(0), 10);
        let refs: Vec<&[u8]> = pkts.iter().map(|p| &p[..]).collect();
        check_group(&c, &b, 0, &refs);
    }
}

#[test]
fn coalesce_keeps_order_and_splits_on_rules() {
    let t = Tcp::v4();
    let a = flow(&t, 4, 1000, 1000);
    // a gap: the next flow starts 1 byte late
    let gap = flow(
        &Tcp {
            seq: t.seq.wrapping_add(4001),
            id: 100,
            ..t
        },
        2,
        1000,
        1000,
    );
    let other = flow(&Tcp { sport: 1234, ..t }, 3, 500, 500);
    let syn = tcp_packet(
        &Tcp {
            flags: 0x02,
            sport: 999,
            ..t
        },
        &[],
    );
    let udp = udp_packet(false, &payload(100, 0));
    // interleave: a0 o0 a1 syn o1 a2 udp a3 o2 g0 g1
    let order: Vec<Vec<u8>> = vec![
        a[0].clone(),
        other[0].clone(),
        a[1].clone(),
        syn.clone(),
        other[1].clone(),
        a[2].clone(),
        udp.clone(),
        a[3].clone(),
        other[2].clone(),
        gap[0].clone(),
        gap[1].clone(),
    ];
    let b = batch_of(&order);
    let mut c = Coalescer::new();
    c.plan(&b);
    let units: Vec<Unit> = c.units().collect();
    assert_eq!(units.len(), 5, "{units:?}");
    assert_eq!(units[0], Unit::Group(0));
    assert_eq!(c.members(0).collect::<Vec<_>>(), vec![0, 2, 5, 7]);
    assert_eq!(units[1], Unit::Group(1));
    assert_eq!(c.members(1).collect::<Vec<_>>(), vec![1, 4, 8]);
    assert_eq!(units[2], Unit::Single(3));
    assert_eq!(units[3], Unit::Single(6));
    assert_eq!(units[4], Unit::Group(4));
    assert_eq!(c.members(4).collect::<Vec<_>>(), vec![9, 10]);
    check_group(&c, &b, 0, &[&a[0], &a[1], &a[2], &a[3]]);
    check_group(&c, &b, 1, &[&other[0], &other[1], &other[2]]);
}

#[test]
fn coalesce_stops_after_short_or_psh_segment() {
    let t = Tcp::v6();
    let mut pkts = flow(&t, 3, 1000, 500); // 1000 1000 500(PSH)
    let next = flow(
        &Tcp {
            seq: t.seq.wrapping_add(2500),
            ..t
        },
        2,
        1000,
        1000,
    );
    pkts.extend(next);
    let b = batch_of(&pkts);
    let mut c = Coalescer::new();
    c.plan(&b);
    let units: Vec<Unit> = c.units().collect();
    assert_eq!(units, vec![Unit::Group(0), Unit::Group(1)]);
    assert_eq!(c.member_count(0), 3);
    assert_eq!(c.member_count(1), 2);
    // a larger segment after a smaller one may not join (gso_size is the head's)
    let small_first = vec![
        tcp_packet(&Tcp { seq: 0, ..t }, &payload(500, 0)),
        tcp_packet(&Tcp { seq: 500, ..t }, &payload(1000, 0)),
    ];
    let b = batch_of(&small_first);
    c.plan(&b);
    assert_eq!(
        c.units().collect::<Vec<_>>(),
        vec![Unit::Single(0), Unit::Single(1)]
    );
}

#[test]
fn pure_ack_and_fin_close_the_group() {
    let t = Tcp::v4();
    let d0 = tcp_packet(&Tcp { flags: 0x10, ..t }, &payload(800, 0));
    let d1 = tcp_packet(
        &Tcp {
            flags: 0x10,
            seq: t.seq.wrapping_add(800),
            ..t
        },
        &payload(800, 1),
    );
    let ack = tcp_packet(
        &Tcp {
            flags: 0x10,
            seq: t.seq.wrapping_add(1600),
            ..t
        },
        &[],
    );
    let d2 = tcp_packet(
        &Tcp {
            flags: 0x10,
            seq: t.seq.wrapping_add(1600),
            ..t
        },
        &payload(800, 2),
    );
    let d3 = tcp_packet(
        &Tcp {
            flags: 0x10,
            seq: t.seq.wrapping_add(2400),
            ..t
        },
        &payload(800, 3),
    );
    let fin = tcp_packet(
        &Tcp {
            flags: 0x11,
            seq: t.seq.wrapping_add(3200),
            ..t
        },
        &payload(800, 4),
    );
    let b = batch_of(&[d0, d1, ack, d2, d3, fin]);
    let mut c = Coalescer::new();
    c.plan(&b);
    let units: Vec<Unit> = c.units().collect();
    assert_eq!(
        units,
        vec![
            Unit::Group(0),
            Unit::Single(2),
            Unit::Group(2),
            Unit::Single(5)
        ]
    );
    assert_eq!(c.members(2).collect::<Vec<_>>(), vec![3, 4]);
}

#[test]
fn different_ack_or_options_do_not_merge() {
    let t = Tcp::v4();
    let p0 = tcp_packet(&Tcp { ack: 1, ..t }, &payload(100, 0));
    let p1 = tcp_packet(
        &Tcp {
            ack: 2,
            seq: t.seq.wrapping_add(100),
            ..t
        },
        &payload(100, 0),
    );
    let p2 = tcp_packet(
        &Tcp {
            ack: 2,
            seq: t.seq.wrapping_add(200),
            opts: &[1, 1, 1, 1],
            ..t
        },
        &payload(100, 0),
    );
    let b = batch_of(&[p0, p1, p2]);
    let mut c = Coalescer::new();
    c.plan(&b);
    assert_eq!(
        c.units().collect::<Vec<_>>(),
        vec![Unit::Single(0), Unit::Single(1), Unit::Single(2)]
    );
}

#[test]
fn groups_stay_under_64k() {
    let t = Tcp::v4();
    let pkts = flow(&t, 100, 1400, 1400);
    let b = batch_of(&pkts);
    let mut c = Coalescer::new();
    c.plan(&b);
    let mut total = 0;
    let mut sp = Vec::new();
    for u in c.units() {
        match u {
            Unit::Group(gi) => {
                c.assemble(&b, gi, &mut sp);
                assert!(
                    sp.len() - VNET_HDR_LEN <= 65535,
                    "super-packet {}",
                    sp.len()
                );
                total += c.member_count(gi);
            }
            Unit::Single(_) => total += 1,
        }
    }
    assert_eq!(total, 100);
    assert!(
        c.unit_count() <= 3,
        "{} writes for 100 segments",
        c.unit_count()
    );
}

#[test]
fn corrupt_segment_is_not_merged() {
    let t = Tcp::v4();
    let mut pkts = flow(&t, 4, 1000, 1000);
    pkts[2][100] ^= 0x40; // payload bit flip: TCP checksum no longer verifies
    assert!(!checksums_ok(&pkts[2]));
    let b = batch_of(&pkts);
    let mut c = Coalescer::new();
    c.plan(&b);
    let units: Vec<Unit> = c.units().collect();
    assert_eq!(
        units,
        vec![Unit::Group(0), Unit::Single(2), Unit::Single(3)]
    );
    assert_eq!(c.member_count(0), 2);
    // Without verification it would be merged (and the kernel would never see the bad checksum).
    c.set_verify_checksums(false);
    c.plan(&b);
    assert_eq!(c.units().collect::<Vec<_>>(), vec![Unit::Group(0)]);
}

/// Random interleavings of several connections (v4 and v6, random sizes, gaps, PSH, pure ACKs,
/// retransmissions, UDP): writing the plan out (groups assembled then segmented again, singles as
/// they are) must give back every packet, byte for byte, in the original order within each
/// connection, and every group must obey the merge rules.
const UDP_FLOW: usize = 1000;

#[test]
fn random_batches_keep_every_packet_in_order() {
    let mut x: u64 = 0xdeadbeefcafef00d;
    let mut rnd = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut c = Coalescer::new();
    let mut merged_groups = 0;
    let mut udp_groups = 0;
    for round in 0..300 {
        c.set_coalesce_udp(round % 2 == 1);
        let nflows = 1 + rnd(4) as usize;
        let mut seqs: Vec<u32> = (0..nflows).map(|_| rnd(u32::MAX as u64) as u32).collect();
        let mss: Vec<usize> = (0..nflows).map(|_| 1 + rnd(1400) as usize).collect();
        // (flow: TCP index, or UDP_FLOW + 1 for IPv6 UDP, UDP_FLOW for IPv4 UDP; packet)
        let mut pkts: Vec<(usize, Vec<u8>)> = Vec::new();
        let n = 1 + rnd(100) as usize;
        for _ in 0..n {
            if rnd(10) == 0 {
                let v6 = rnd(2) == 0;
                // Mostly equal sizes so runs form; sometimes short or empty.
                let len = match rnd(6) {
                    0 => rnd(300) as usize,
                    _ => 300,
                };
                pkts.push((UDP_FLOW + v6 as usize, udp_packet(v6, &payload(len, 1))));
                continue;
            }
            let f = rnd(nflows as u64) as usize;
            let t = Tcp {
                v6: f % 2 == 1,
                sport: 1000 + f as u16,
                seq: seqs[f],
                ..Tcp::v4()
            };
            let kind = rnd(30);
            let (flags, len, advance) = match kind {
                0 => (0x10, 0, false),                              // pure ACK
                1 => (0x18, 1 + rnd(mss[f] as u64) as usize, true), // PSH, maybe short
                2 => (0x10, mss[f], false), // retransmission-like: no advance
                3 => {
                    seqs[f] = seqs[f].wrapping_add(7); // gap
                    (0x10, mss[f], true)
                }
                4 => (0x11, 10, true), // FIN with data
                _ => (
                    0x10,
                    if rnd(10) == 0 {
                        1 + rnd(mss[f] as u64) as usize
                    } else {
                        mss[f]
                    },
                    true,
                ),
            };
            let p = tcp_packet(
                &Tcp {
                    flags,
                    id: rnd(65536) as u16,
                    ..t
                },
                &payload(len, kind as u8),
            );
            if advance {
                seqs[f] = seqs[f].wrapping_add(len as u32);
            }
            pkts.push((f, p));
        }
        let b = {
            let mut b = PacketBatch::new(pkts.len(), 1500);
            for (_, p) in &pkts {
                assert!(b.push(p));
            }
            b
        };
        c.plan(&b);
        let mut seen = vec![false; pkts.len()];
        let mut out_order: Vec<usize> = Vec::new();
        let mut sp = Vec::new();
        for u in c.units() {
            match u {
                Unit::Single(i) => out_order.push(i),
                Unit::Group(gi) => {
                    merged_groups += 1;
                    let members: Vec<usize> = c.members(gi).collect();
                    if pkts[members[0]].0 >= UDP_FLOW {
                        assert_eq!(round % 2, 1, "UDP merged although off");
                        udp_groups += 1;
                    }
                    assert!(
                        members.windows(2).all(|w| w[0] < w[1]),
                        "members in batch order"
                    );
                    c.assemble(&b, gi, &mut sp);
                    let hdr = VirtioNetHdr::decode(&sp).unwrap();
                    let mut again = PacketBatch::new(70, 1500);
                    let segs = split(&hdr, &sp[VNET_HDR_LEN..], &mut again).unwrap();
                    assert_eq!(segs, members.len());
                    for (k, m) in members.iter().enumerate() {
                        // IPv4 ids of merged packets are renumbered from the first one; compare the rest.
                        let (mut a, mut o) = (again.get(k).to_vec(), pkts[*m].1.clone());
                        if a[0] >> 4 == 4 {
                            a[4..6].fill(0);
                            a[10..12].fill(0);
                            o[4..6].fill(0);
                            o[10..12].fill(0);
                        }
                        assert_eq!(a, o, "group member {m} round trip");
                        out_order.push(*m);
                    }
                }
            }
        }
        for &i in &out_order {
            assert!(!seen[i], "packet {i} written twice");
            seen[i] = true;
        }
        assert!(seen.iter().all(|s| *s), "a packet was not written");
        for f in (0..nflows).chain([UDP_FLOW, UDP_FLOW + 1]) {
            let written: Vec<usize> = out_order
                .iter()
                .copied()
                .filter(|&i| pkts[i].0 == f)
                .collect();
            let mut sorted = written.clone();
            sorted.sort();
            assert_eq!(written, sorted, "order within connection {f} changed");
        }
    }
    assert!(
        merged_groups > 100,
        "the random batches hardly merged anything ({merged_groups})"
    );
    assert!(udp_groups > 20, "hardly any UDP group ({udp_groups})");
}

#[test]
fn udp_datagrams_coalesce_when_enabled() {
    for v6 in [false, true] {
        let mut pkts: Vec<Vec<u8>> = (0..5).map(|i| udp_packet(v6, &payload(1200, i))).collect();
        pkts.push(udp_packet(v6, &payload(333, 9))); // shorter last one
        pkts.push(udp_packet(v6, &payload(1200, 10))); // after a short one: new group
        let b = batch_of(&pkts);
        let mut c = Coalescer::new();
        c.plan(&b);
        assert_eq!(c.unit_count(), 7, "UDP is not merged unless enabled");
        c.set_coalesce_udp(true);
        c.plan(&b);
        let units: Vec<Unit> = c.units().collect();
        assert_eq!(units, vec![Unit::Group(0), Unit::Single(6)]);
        let mut sp = Vec::new();
        c.assemble(&b, 0, &mut sp);
        let hdr = VirtioNetHdr::decode(&sp).unwrap();
        let pkt = &sp[VNET_HDR_LEN..];
        let iphlen = if v6 { 40 } else { 20 };
        assert_eq!(hdr.gso_type, vnet::GSO_UDP_L4);
        assert_eq!(hdr.flags, vnet::F_NEEDS_CSUM);
        assert_eq!((hdr.csum_start as usize, hdr.csum_offset), (iphlen, 6));
        assert_eq!(hdr.hdr_len as usize, iphlen + 8);
        assert_eq!(hdr.gso_size, 1200);
        assert_eq!(
            be16(pkt, iphlen + 4) as usize,
            pkt.len() - iphlen,
            "udp length"
        );
        let ps = naive_sum(&[&pseudo(pkt, 17, pkt.len() - iphlen)]);
        assert_eq!(
            be16(pkt, iphlen + 6),
            ps,
            "partial checksum = pseudo-header sum"
        );
        let mut out = PacketBatch::new(8, 1500);
        assert_eq!(split(&hdr, pkt, &mut out), Ok(6));
        for (i, o) in pkts[..6].iter().enumerate() {
            // Merged IPv4 packets are renumbered from the first one's id (all have one id here).
            let (mut a, mut o) = (out.get(i).to_vec(), o.clone());
            if !v6 {
                a[4..6].fill(0);
                a[10..12].fill(0);
                o[4..6].fill(0);
                o[10..12].fill(0);
                assert!(checksums_ok(out.get(i)));
            }
            assert_eq!(a, o, "datagram {i} round trip (v6 {v6})");
        }
    }
}

#[test]
fn udp_bad_checksum_or_empty_datagram_breaks_the_run() {
    let mut pkts: Vec<Vec<u8>> = (0..4)
        .map(|i| udp_packet(false, &payload(500, i)))
        .collect();
    pkts[1][30] ^= 1; // corrupt payload
    pkts.insert(3, udp_packet(false, &[]));
    // IPv4 without checksum (0) is valid and may merge.
    let mut nock = udp_packet(false, &payload(500, 7));
    nock[26..28].fill(0);
    pkts.push(nock);
    let b = batch_of(&pkts);
    let mut c = Coalescer::new();
    c.set_coalesce_udp(true);
    c.plan(&b);
    let units: Vec<Unit> = c.units().collect();
    // 0 alone (1 corrupt closes it), 1 alone, 2 alone (empty 3 closes it), 3 alone, 4 + 5 merged.
    assert_eq!(
        units,
        vec![
            Unit::Single(0),
            Unit::Single(1),
            Unit::Single(2),
            Unit::Single(3),
            Unit::Group(4)
        ]
    );
    assert_eq!(c.members(4).collect::<Vec<_>>(), vec![4, 5]);
}

/// Decrypted packets come from peers and may be anything: planning and assembling never panic.
#[test]
fn coalescer_survives_garbage() {
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut c = Coalescer::new();
    c.set_coalesce_udp(true);
    let mut sp = Vec::new();
    for round in 0..3000 {
        c.set_verify_checksums(round % 3 != 0);
        let n = 1 + (rnd() % 32) as usize;
        let mut b = PacketBatch::new(n, 1500);
        // A template packet, then random damage, so many packets get past the first checks.
        let base = if rnd() % 2 == 0 {
            tcp_packet(
                &Tcp {
                    seq: 0,
                    ..Tcp::v4()
                },
                &payload(200, 0),
            )
        } else {
            udp_packet(rnd() % 2 == 0, &payload(200, 0))
        };
        for _ in 0..n {
            let mut p = base.clone();
            let len = (rnd() % (p.len() as u64 + 1)) as usize;
            if rnd() % 2 == 0 {
                p.truncate(len);
            }
            for _ in 0..(rnd() % 4) {
                if !p.is_empty() {
                    let i = (rnd() as usize) % p.len();
                    p[i] = rnd() as u8;
                }
            }
            b.push(&p);
        }
        c.plan(&b);
        let units: Vec<Unit> = c.units().collect();
        for u in units {
            if let Unit::Group(gi) = u {
                c.assemble(&b, gi, &mut sp);
                assert!(sp.len() <= VNET_HDR_LEN + 65535);
            }
        }
    }
}
