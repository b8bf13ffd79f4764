//! Batched UDP on loopback: GSO runs, sendmmsg for the rest, GRO splitting on receive, with and
//! without offloads. Every datagram must arrive whole, in order per destination.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use evio_io::{GRO_BUF, RecvBatch, SendBatch, UdpBatch, wait_readable};

fn datagram(tag: u32, len: usize) -> Vec<u8> {
    let mut d: Vec<u8> = (0..len).map(|i| (i as u32 * 7 + tag) as u8).collect();
    if len >= 4 {
        d[..4].copy_from_slice(&tag.to_be_bytes());
    }
    d
}

/// Receives until `want` datagrams arrived (or 5 s passed).
fn recv_all(u: &mut UdpBatch, want: usize) -> Vec<(SocketAddr, Vec<u8>)> {
    let mut rb = RecvBatch::new(32, GRO_BUF);
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.len() < want && Instant::now() < deadline {
        wait_readable(&[u.as_raw_fd()], 100).unwrap();
        match u.recv_batch(&mut rb) {
            Ok(_) => got.extend(rb.iter().map(|(a, d)| (a, d.to_vec()))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
    got
}

fn run(offload: bool) {
    let mut tx =
        UdpBatch::with_offloads(UdpSocket::bind("127.0.0.1:0").unwrap(), offload, offload).unwrap();
    let mut rx1 =
        UdpBatch::with_offloads(UdpSocket::bind("127.0.0.1:0").unwrap(), offload, offload).unwrap();
    let mut rx2 =
        UdpBatch::with_offloads(UdpSocket::bind("127.0.0.1:0").unwrap(), offload, offload).unwrap();
    for u in [&tx, &rx1, &rx2] {
        u.set_buffer_sizes(4 << 20).unwrap();
    }
    let (d1, d2) = (rx1.local_addr().unwrap(), rx2.local_addr().unwrap());
    let mut sb = SendBatch::new(256, 256 * 1500);
    let mut want1 = Vec::new();
    let mut want2 = Vec::new();
    let mut tag = 0;
    let mut push = |sb: &mut SendBatch, dest: SocketAddr, len: usize, want: &mut Vec<Vec<u8>>| {
        let d = datagram(tag, len);
        tag += 1;
        assert!(sb.push(dest, &d));
        want.push(d);
    };
    // A GSO run (last shorter), then sizes that break runs, then another destination, then back.
    for _ in 0..20 {
        push(&mut sb, d1, 1200, &mut want1);
    }
    push(&mut sb, d1, 700, &mut want1);
    for len in [100, 1300, 5, 1300, 1300, 0] {
        push(&mut sb, d1, len, &mut want1);
    }
    for i in 0..30 {
        push(
            &mut sb,
            if i % 2 == 0 { d2 } else { d1 },
            64,
            if i % 2 == 0 { &mut want2 } else { &mut want1 },
        );
    }
    for _ in 0..70 {
        push(&mut sb, d2, 1400, &mut want2);
    }
    let n = tx.send_batch(&sb).unwrap();
    assert_eq!(n, sb.len());
    let got1 = recv_all(&mut rx1, want1.len());
    let got2 = recv_all(&mut rx2, want2.len());
    let me = tx.local_addr().unwrap();
    assert!(
        got1.iter().chain(&got2).all(|(a, _)| *a == me),
        "source address"
    );
    let g1: Vec<Vec<u8>> = got1.into_iter().map(|(_, d)| d).collect();
    let g2: Vec<Vec<u8>> = got2.into_iter().map(|(_, d)| d).collect();
    assert_eq!(g1.len(), want1.len());
    assert!(g1 == want1, "datagrams to rx1 differ");
    assert!(g2 == want2, "datagrams to rx2 differ");
    let s = tx.stats();
    assert_eq!(s.sent_datagrams as usize, sb.len());
    assert!(s.max_mmsg_batch > 1, "no sendmmsg batch: {s:?}");
    if offload {
        assert!(tx.max_gso_segments() > 1, "kernel without UDP GSO?");
        assert!(s.gso_sends >= 3 && s.max_gso_batch >= 21, "{s:?}");
        let r = rx2.stats();
        assert!(r.gro_msgs > 0, "no GRO message: {r:?}");
    } else {
        assert_eq!(s.gso_sends, 0);
        assert_eq!(rx2.stats().gro_msgs, 0);
        assert!(
            s.send_calls < sb.len() as u64 / 10,
            "sendmmsg should batch: {s:?}"
        );
    }
}

#[test]
fn gso_gro_batches_arrive_whole() {
    run(true);
}

#[test]
fn without_offloads_sendmmsg_recvmmsg() {
    run(false);
}
