//! The hot path does not allocate: after one warm-up round, segmenting, coalescing, UDP batch
//! send/receive and TUN batch read/write run with zero heap allocations on the calling thread.
//! (A counting global allocator; counts only on the thread that asked for it.)

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use evio_fastio::gro::Coalescer;
use evio_fastio::vnet::{F_NEEDS_CSUM, GSO_TCPV4, VirtioNetHdr};
use evio_fastio::{
    GRO_BUF, PacketBatch, RecvBatch, SendBatch, Tun, UdpBatch, split, wait_readable,
};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; only counts on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNTING.with(|c| c.get()) {
            ALLOCS.with(|a| a.set(a.get() + 1));
        }
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: p was allocated by System.alloc with layout l.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if COUNTING.with(|c| c.get()) {
            ALLOCS.with(|a| a.set(a.get() + 1));
        }
        // SAFETY: p was allocated by System with layout l.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by `f` on this thread.
fn allocations(f: impl FnOnce()) -> usize {
    ALLOCS.with(|a| a.set(0));
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCS.with(|a| a.get())
}

fn csum(data: &[u8], init: u32) -> u16 {
    let mut s = init;
    for w in data.chunks(2) {
        s += u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]) as u32;
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// An IPv4 TCP super-packet as a TUN with offloads hands it over (partial checksum).
fn super_packet(payload: usize) -> Vec<u8> {
    let total = 40 + payload;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&[10, 0, 0, 1]);
    p[16..20].copy_from_slice(&[10, 0, 0, 2]);
    p[32] = 5 << 4;
    p[33] = 0x18;
    for (i, b) in p[40..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let mut ph = Vec::new();
    ph.extend_from_slice(&p[12..20]);
    ph.extend_from_slice(&[0, 6]);
    ph.extend_from_slice(&((total - 20) as u16).to_be_bytes());
    let partial = !csum(&ph, 0);
    p[36..38].copy_from_slice(&partial.to_be_bytes());
    p
}

#[test]
fn the_counter_counts() {
    let n = allocations(|| {
        let v = vec![1u8; 10];
        std::hint::black_box(&v);
    });
    assert_eq!(n, 1);
}

#[test]
fn segment_and_coalesce_do_not_allocate() {
    let sp = super_packet(60000);
    let hdr = VirtioNetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 40,
        gso_size: 1380,
        csum_start: 20,
        csum_offset: 16,
    };
    let mut batch = PacketBatch::new(128, 2048);
    let mut c = Coalescer::new();
    let mut hdrbuf = [0u8; evio_fastio::gro::MAX_HEADER];
    let mut round = |batch: &mut PacketBatch, c: &mut Coalescer| {
        batch.clear();
        split(&hdr, &sp, batch).unwrap();
        c.plan(batch);
        let units: usize = c.units().count();
        assert_eq!(units, 1);
        c.header(batch, 0, &mut hdrbuf);
    };
    round(&mut batch, &mut c);
    assert_eq!(
        allocations(|| for _ in 0..50 {
            round(&mut batch, &mut c)
        }),
        0
    );
}

#[test]
fn udp_batches_do_not_allocate() {
    let mut tx = UdpBatch::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
    let mut rx = UdpBatch::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
    rx.set_buffer_sizes(4 << 20).unwrap();
    let dest = rx.local_addr().unwrap();
    let other: SocketAddr = "127.0.0.1:9".parse().unwrap(); // discard port: nothing listens
    let mut sb = SendBatch::new(128, 128 * 2048);
    let mut rb = RecvBatch::new(32, GRO_BUF);
    let data = [7u8; 1400];
    let round = |sb: &mut SendBatch, rb: &mut RecvBatch, tx: &mut UdpBatch, rx: &mut UdpBatch| {
        sb.clear();
        for i in 0..60 {
            sb.push(dest, &data[..if i == 59 { 100 } else { 1400 }]);
        }
        sb.push(other, &data[..10]);
        sb.push(dest, &data[..20]);
        sb.push(dest, &data[..30]);
        assert_eq!(tx.send_batch(sb).unwrap(), 63);
        let mut got = 0;
        while got < 62 {
            wait_readable(&[rx.as_raw_fd()], 1000).unwrap();
            match rx.recv_batch(rb) {
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
    };
    round(&mut sb, &mut rb, &mut tx, &mut rx);
    let n = allocations(|| {
        for _ in 0..20 {
            round(&mut sb, &mut rb, &mut tx, &mut rx)
        }
    });
    assert_eq!(n, 0);
    assert!(tx.stats().gso_sends > 0 && tx.stats().max_mmsg_batch > 1);
}

/// ICMP echo requests written into a TUN (coalescing on) come back as replies read from it.
#[test]
fn tun_batches_do_not_allocate() {
    let ns = evio_testbed::Netns::new("fn");
    let name = format!("t{}", &ns.name()[2..]);
    let nsname = ns.name().to_string();
    let n2 = name.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let worker = std::thread::spawn(move || {
        common::enter_netns(&nsname);
        let mut tun = Tun::create(&n2, 1420, true).unwrap();
        tun.set_nonblocking(true).unwrap();
        tx.send(()).unwrap();
        go_rx.recv().unwrap();
        let mut reqs = PacketBatch::new(64, 2048);
        for i in 0..32u16 {
            let mut p = vec![0u8; 28 + 56];
            p[0] = 0x45;
            let len = p.len() as u16;
            p[2..4].copy_from_slice(&len.to_be_bytes());
            p[8] = 64;
            p[9] = 1;
            p[12..16].copy_from_slice(&[10, 205, 0, 2]);
            p[16..20].copy_from_slice(&[10, 205, 0, 1]);
            let c = csum(&p[..20], 0);
            p[10..12].copy_from_slice(&c.to_be_bytes());
            p[20] = 8; // echo request
            p[24..26].copy_from_slice(&0x4242u16.to_be_bytes());
            p[26..28].copy_from_slice(&i.to_be_bytes());
            let c = csum(&p[20..], 0);
            p[22..24].copy_from_slice(&c.to_be_bytes());
            reqs.push(&p);
        }
        let mut replies = PacketBatch::new(64, 2048);
        let round = |tun: &mut Tun, replies: &mut PacketBatch| {
            assert_eq!(tun.write_batch(&reqs).unwrap(), 32);
            let mut got = 0;
            let mut tries = 0;
            while got < 32 && tries < 200 {
                tries += 1;
                wait_readable(&[tun.as_raw_fd()], 50).unwrap();
                replies.clear();
                match tun.read_batch(replies) {
                    Ok(_) => got += replies.iter().filter(|p| p[9] == 1 && p[20] == 0).count(),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!(got, 32, "echo replies");
        };
        round(&mut tun, &mut replies);
        allocations(|| {
            for _ in 0..10 {
                round(&mut tun, &mut replies)
            }
        })
    });
    rx.recv().unwrap();
    ns.exec_ok(&["ip", "addr", "add", "10.205.0.1/24", "dev", &name]);
    go_tx.send(()).unwrap();
    assert_eq!(worker.join().unwrap(), 0);
}
