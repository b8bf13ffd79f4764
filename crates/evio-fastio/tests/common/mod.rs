//! Shared by the integration test and the benchmark: two namespaces joined by a veth (the
//! underlay), a TUN in each, and a plain (no crypto) forwarder thread per side.
#![allow(dead_code)]

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use evio_fastio::{
    PacketBatch, RecvBatch, SendBatch, Tun, TunStats, UdpBatch, UdpStats, wait_readable,
};
use evio_testbed::Netns;

pub const TUN_MTU: u32 = 1420;
pub const UDP_PORT: u16 = 51820;

/// Moves the calling thread into network namespace `name` (per-thread for network namespaces).
pub fn enter_netns(name: &str) {
    let f = File::open(format!("/run/netns/{name}")).expect("open netns");
    // Affects only this thread's network namespace.
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns {name}: {e}"));
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SideStats {
    pub tun: TunStats,
    pub udp: UdpStats,
}

pub struct Side {
    pub ns: Netns,
    pub tun_name: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<SideStats>>,
}

pub struct Topology {
    pub a: Side,
    pub b: Side,
}

pub const A_UNDER: &str = "192.0.2.1";
pub const B_UNDER: &str = "192.0.2.2";
pub const A_V4: &str = "10.201.0.1";
pub const B_V4: &str = "10.201.0.2";
pub const A_V6: &str = "fd20::1";
pub const B_V6: &str = "fd20::2";

impl Topology {
    /// `offload_a`/`offload_b`: TUN offloads per side; `udp_offload`: UDP GSO/GRO on both sides.
    pub fn new(offload_a: bool, offload_b: bool, udp_offload: bool) -> Topology {
        Topology::with_batch(offload_a, offload_b, udp_offload, 128)
    }

    /// Like [`new`](Self::new) with `slots` packets per forwarder batch.
    pub fn with_batch(
        offload_a: bool,
        offload_b: bool,
        udp_offload: bool,
        slots: usize,
    ) -> Topology {
        let na = Netns::new("fa");
        let nb = Netns::new("fb");
        na.veth_to("ua", &nb, "ub");
        na.exec_ok(&["ip", "addr", "add", &format!("{A_UNDER}/24"), "dev", "ua"]);
        nb.exec_ok(&["ip", "addr", "add", &format!("{B_UNDER}/24"), "dev", "ub"]);
        let peer_a: SocketAddr = format!("{B_UNDER}:{UDP_PORT}").parse().unwrap();
        let peer_b: SocketAddr = format!("{A_UNDER}:{UDP_PORT}").parse().unwrap();
        let a = Side::start(
            na,
            offload_a,
            udp_offload,
            peer_a,
            (A_V4, B_V4, A_V6, B_V6),
            slots,
        );
        let b = Side::start(
            nb,
            offload_b,
            udp_offload,
            peer_b,
            (B_V4, A_V4, B_V6, A_V6),
            slots,
        );
        Topology { a, b }
    }

    /// Stops both forwarders and returns their counters (namespaces go when `self` drops).
    pub fn stop(mut self) -> (SideStats, SideStats) {
        (self.a.join(), self.b.join())
    }
}

impl Side {
    fn start(
        ns: Netns,
        offload: bool,
        udp_offload: bool,
        peer: SocketAddr,
        ips: (&str, &str, &str, &str),
        slots: usize,
    ) -> Side {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let name = ns.name().to_string();
        let tun_name = format!("t{}", &name[2..]);
        let (tn, st) = (tun_name.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            enter_netns(&name);
            let mut tun = Tun::create(&tn, TUN_MTU, offload).expect("create tun");
            tun.set_nonblocking(true).unwrap();
            let sock = UdpSocket::bind(("0.0.0.0", UDP_PORT)).expect("bind udp");
            let udp = UdpBatch::with_offloads(sock, udp_offload, udp_offload).expect("udp batch");
            udp.set_buffer_sizes(4 << 20).expect("socket buffers");
            tx.send(()).unwrap();
            forward(tun, udp, peer, &st, slots)
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("forwarder started");
        let (me4, peer4, me6, peer6) = ips;
        ns.exec_ok(&["ip", "addr", "add", &format!("{me4}/32"), "dev", &tun_name]);
        ns.exec_ok(&[
            "ip",
            "route",
            "add",
            &format!("{peer4}/32"),
            "dev",
            &tun_name,
        ]);
        ns.exec_ok(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{me6}/128"),
            "dev",
            &tun_name,
            "nodad",
        ]);
        ns.exec_ok(&[
            "ip",
            "-6",
            "route",
            "add",
            &format!("{peer6}/128"),
            "dev",
            &tun_name,
        ]);
        Side {
            ns,
            tun_name,
            stop,
            thread: Some(thread),
        }
    }

    pub fn join(&mut self) -> SideStats {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("forwarder panicked"))
            .unwrap_or_default()
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The forwarder: TUN packets become UDP datagrams to `peer`, datagrams become TUN packets.
pub fn forward(
    mut tun: Tun,
    mut udp: UdpBatch,
    peer: SocketAddr,
    stop: &AtomicBool,
    slots: usize,
) -> SideStats {
    let mut from_tun = PacketBatch::new(slots, 2048);
    let mut to_tun = PacketBatch::new(slots, 2048);
    let mut sb = SendBatch::new(slots, slots * 2048);
    let mut rb = RecvBatch::new(32, evio_fastio::GRO_BUF);
    let fds = [tun.as_raw_fd(), udp.as_raw_fd()];
    while !stop.load(Ordering::Relaxed) {
        let ready = wait_readable(&fds, 50).expect("poll");
        if ready & 1 != 0 {
            loop {
                from_tun.clear();
                match tun.read_batch(&mut from_tun) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("tun read: {e}"),
                }
                sb.clear();
                for p in from_tun.iter() {
                    assert!(sb.push(peer, p));
                }
                udp.send_batch(&sb).expect("udp send");
            }
        }
        if ready & 2 != 0 {
            loop {
                match udp.recv_batch(&mut rb) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("udp recv: {e}"),
                }
                to_tun.clear();
                for (_, d) in rb.iter() {
                    if to_tun.remaining() == 0 {
                        tun.write_batch(&to_tun).expect("tun write");
                        to_tun.clear();
                    }
                    assert!(to_tun.push(d), "datagram larger than a slot");
                }
                if !to_tun.is_empty() {
                    tun.write_batch(&to_tun).expect("tun write");
                }
            }
        }
    }
    SideStats {
        tun: tun.stats(),
        udp: udp.stats(),
    }
}

/// Sends `bytes` over TCP from side a to side b through the tunnel (over IPv6 if `v6`) and checks
/// every byte; returns the throughput in Gb/s.
pub fn transfer(t: &Topology, v6: bool, bytes: usize) -> f64 {
    let (bind, connect): (SocketAddr, SocketAddr) = if v6 {
        (
            format!("[{B_V6}]:5201").parse().unwrap(),
            format!("[{B_V6}]:5201").parse().unwrap(),
        )
    } else {
        (
            format!("{B_V4}:5201").parse().unwrap(),
            format!("{B_V4}:5201").parse().unwrap(),
        )
    };
    let (tx, rx) = mpsc::channel();
    let nb = t.b.ns.name().to_string();
    let server = std::thread::spawn(move || {
        enter_netns(&nb);
        let l = TcpListener::bind(bind).expect("listen");
        tx.send(()).unwrap();
        let (mut c, _) = l.accept().expect("accept");
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut expect = vec![0u8; 256 * 1024];
        let mut got = 0usize;
        loop {
            let n = c.read(&mut buf).expect("read from tunnel");
            if n == 0 {
                break;
            }
            fill_at(got, &mut expect[..n]);
            assert!(buf[..n] == expect[..n], "corrupted bytes at offset {got}");
            got += n;
        }
        got
    });
    rx.recv_timeout(Duration::from_secs(10)).expect("server up");
    let na = t.a.ns.name().to_string();
    let client = std::thread::spawn(move || {
        enter_netns(&na);
        let mut c = TcpStream::connect_timeout(&connect, Duration::from_secs(10))
            .expect("connect through tunnel");
        c.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = vec![0u8; 128 * 1024];
        let start = Instant::now();
        let mut sent = 0;
        while sent < bytes {
            let n = buf.len().min(bytes - sent);
            fill_at(sent, &mut buf[..n]);
            c.write_all(&buf[..n]).expect("write into tunnel");
            sent += n;
        }
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut end = [0u8; 1];
        let _ = c.read(&mut end);
        start.elapsed()
    });
    let got = server.join().expect("server");
    let took = client.join().expect("client");
    assert_eq!(got, bytes, "byte count");
    (bytes as f64 * 8.0) / took.as_secs_f64() / 1e9
}

/// Fills `buf` with the test stream's bytes at absolute offset `off` (block `n` of 8 bytes is a
/// splitmix64 hash of `n`, so any range can be generated independently).
pub fn fill_at(off: usize, buf: &mut [u8]) {
    let mut cur = BlockCursor::at(off / 8);
    let mut block = cur.next();
    let mut k = off % 8;
    for b in buf.iter_mut() {
        if k == 8 {
            block = cur.next();
            k = 0;
        }
        *b = block[k];
        k += 1;
    }
}

/// Block `n` of the stream is a simple hash of `n` (random access, no state).
struct BlockCursor(u64);

impl BlockCursor {
    fn at(n: usize) -> BlockCursor {
        BlockCursor(n as u64)
    }
    fn next(&mut self) -> [u8; 8] {
        let mut z = self.0.wrapping_add(0x9e3779b97f4a7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^= z >> 31;
        self.0 += 1;
        z.to_le_bytes()
    }
}
