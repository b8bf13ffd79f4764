//! The data plane threads: TUN -> encrypt -> UDP, UDP -> decrypt -> TUN, and the protocol timers. They share
//! the tunnel core behind one mutex held per packet; control-plane work never runs on these threads.

use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use evio_tunnel::{Event, Inbound, Outbound};

use crate::io::{BUF_SIZE, Tun, UdpBatch, wait_fd};
use crate::state::Shared;

/// Datagrams per `recvmmsg`/`sendmmsg`.
const BATCH: usize = 64;
/// Timer tick period.
const TICK: Duration = Duration::from_millis(100);

pub fn start(shared: Arc<Shared>, tun: Arc<Tun>, sock: Arc<UdpSocket>) -> std::io::Result<Vec<JoinHandle<()>>> {
    let mut hs = Vec::new();
    {
        let (s, t, u) = (shared.clone(), tun.clone(), sock.clone());
        hs.push(std::thread::Builder::new().name("evio-tun-rx".into()).spawn(move || tun_to_udp(&s, &t, &u))?);
    }
    {
        let (s, t, u) = (shared.clone(), tun.clone(), sock.clone());
        hs.push(std::thread::Builder::new().name("evio-udp-rx".into()).spawn(move || udp_to_tun(&s, &t, &u))?);
    }
    {
        let (s, u) = (shared.clone(), sock.clone());
        hs.push(std::thread::Builder::new().name("evio-timers".into()).spawn(move || timers(&s, &u))?);
    }
    Ok(hs)
}

fn drain_transmits(shared: &Shared, out: &mut UdpBatch, sock: &UdpSocket) {
    loop {
        let t = shared.node().poll_transmit();
        let Some(t) = t else { break };
        if out.is_full() {
            flush(shared, out, sock);
        }
        out.push_copy(t.to, &t.data);
    }
}

fn flush(shared: &Shared, out: &mut UdpBatch, sock: &UdpSocket) {
    if out.count > 0 {
        let n = out.send(sock);
        shared.counters.udp_tx_datagrams.fetch_add(n as u64, Ordering::Relaxed);
    }
}

fn tun_to_udp(shared: &Shared, tun: &Tun, sock: &UdpSocket) {
    let mut inbuf = vec![0u8; BUF_SIZE];
    let mut out = UdpBatch::new(BATCH, BUF_SIZE + 64);
    while !shared.stopping() {
        if !wait_fd(tun.fd(), libc::POLLIN, 500) {
            continue;
        }
        let mut packets = 0u64;
        loop {
            let n = match tun.read(&mut inbuf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("reading the TUN device: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            };
            packets += 1;
            let r = shared.node().encapsulate(Instant::now(), &inbuf[..n], out.next_buf());
            if let Outbound::Send { to, len, .. } = r {
                out.push(to, len);
                if out.is_full() {
                    flush(shared, &mut out, sock);
                }
            }
        }
        shared.counters.tun_rx_packets.fetch_add(packets, Ordering::Relaxed);
        flush(shared, &mut out, sock);
        drain_transmits(shared, &mut out, sock);
        flush(shared, &mut out, sock);
    }
}

fn udp_to_tun(shared: &Shared, tun: &Tun, sock: &UdpSocket) {
    let mut inb = UdpBatch::new(BATCH, BUF_SIZE);
    let mut out = UdpBatch::new(8, 256);
    let mut dec = vec![0u8; BUF_SIZE];
    let mut tun_out = 0u64;
    while !shared.stopping() {
        match inb.recv(sock) {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => continue,
            Err(e) => {
                tracing::warn!("receiving datagrams: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        }
        shared.counters.udp_rx_datagrams.fetch_add(inb.count as u64, Ordering::Relaxed);
        let mut control = false;
        for i in 0..inb.count {
            let r = shared.node().decapsulate(Instant::now(), inb.addrs[i], &inb.bufs[i][..inb.lens[i]], &mut dec);
            match r {
                Inbound::WriteTun { len, .. } => {
                    if let Err(e) = tun.write(&dec[..len]) {
                        tracing::debug!("writing to the TUN device: {e}");
                    } else {
                        tun_out += 1;
                    }
                }
                Inbound::Done => control = true,
                Inbound::Dropped(_) => {}
            }
        }
        shared.counters.tun_tx_packets.store(tun_out, Ordering::Relaxed);
        if control {
            drain_transmits(shared, &mut out, sock);
            flush(shared, &mut out, sock);
        }
    }
}

fn timers(shared: &Shared, sock: &UdpSocket) {
    let mut out = UdpBatch::new(16, 2048);
    while !shared.stopping() {
        std::thread::sleep(TICK);
        let events: Vec<Event> = {
            let mut n = shared.node();
            n.tick(Instant::now());
            std::iter::from_fn(|| n.poll_event()).collect()
        };
        drain_transmits(shared, &mut out, sock);
        flush(shared, &mut out, sock);
        for e in events {
            log_event(shared, &e);
        }
    }
}

fn log_event(shared: &Shared, e: &Event) {
    let peer_name = |id| {
        let n = shared.node();
        n.peer(id).map(|p| p.name).unwrap_or_default()
    };
    match e {
        Event::HandshakeCompleted { peer, endpoint } => {
            shared.counters.handshakes.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %peer_name(*peer), %endpoint, "handshake completed");
        }
        Event::EndpointChanged { peer, endpoint } => {
            tracing::info!(peer = %peer_name(*peer), %endpoint, "peer endpoint changed");
        }
        Event::SessionExpired { peer } => {
            tracing::info!(peer = %peer_name(*peer), "session expired");
        }
    }
}
