//! The data plane threads: TUN -> encrypt -> UDP, UDP -> decrypt -> TUN, and the protocol timers. They share
//! the tunnel core by reference: a packet takes only its peer's lock inside the core (and the table's read
//! lock for the lookup), so sealing and opening run at the same time, and status, metrics and the control
//! plane never make a packet wait for more than one peer's critical section. Control-plane work never
//! runs on these threads.
//!
//! Packet I/O is `evio-io`: TUN reads come as TSO super-packets cut into MTU-sized packets, TUN writes
//! coalesce TCP segments back into super-packets, UDP goes out in GSO runs and comes in with GRO and
//! `recvmmsg`. Every buffer is allocated once per thread.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use evio_io::{GRO_BUF, PacketBatch, RecvBatch, SendBatch, Tun, UdpBatch, wait_readable};
use evio_tunnel::{Event, Inbound, Outbound};

use crate::state::Shared;

/// Smallest slot size of packet batches (an MTU-sized packet plus the tunnel header fits).
const MIN_SLOT: usize = 2048;
/// Packets per batch.
const BATCH: usize = 128;
/// Timer tick period (NAT traversal's check retransmissions are 100 ms apart).
const TICK: Duration = Duration::from_millis(100);
/// The tunnel core's timers (WireGuard's are seconds apart; boringtun's own device ticks every 250 ms):
/// a pass over every peer, so not on every tick.
const TUNNEL_TICK: Duration = Duration::from_millis(250);

pub fn start(
    shared: Arc<Shared>,
    tun: Tun,
    udp: UdpBatch,
    mtu: u32,
) -> io::Result<Vec<JoinHandle<()>>> {
    let slot = MIN_SLOT.max(mtu as usize + 256);
    let mut hs = Vec::new();
    let tun_w = tun.try_clone()?;
    let udp_rx = udp.try_clone()?;
    let udp_timers = udp.try_clone()?;
    {
        let s = shared.clone();
        hs.push(
            std::thread::Builder::new()
                .name("evio-tun-rx".into())
                .spawn(move || tun_to_udp(&s, tun, udp, slot))?,
        );
    }
    {
        let s = shared.clone();
        hs.push(
            std::thread::Builder::new()
                .name("evio-udp-rx".into())
                .spawn(move || udp_to_tun(&s, tun_w, udp_rx, slot))?,
        );
    }
    {
        let s = shared.clone();
        hs.push(
            std::thread::Builder::new()
                .name("evio-timers".into())
                .spawn(move || timers(&s, udp_timers))?,
        );
    }
    Ok(hs)
}

/// Sends the batch and empties it.
pub(crate) fn flush(shared: &Shared, udp: &mut UdpBatch, out: &mut SendBatch) {
    if out.is_empty() {
        return;
    }
    match udp.send_batch(out) {
        Ok(n) => {
            shared
                .counters
                .udp_tx_datagrams
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        Err(e) => tracing::debug!("sending datagrams: {e}"),
    }
    out.clear();
}

/// Queues the core's pending control datagrams (handshakes, cookies, queued packets).
fn drain_transmits(shared: &Shared, udp: &mut UdpBatch, out: &mut SendBatch) {
    loop {
        let t = shared.node().poll_transmit();
        let Some(t) = t else { break };
        if out.remaining() == 0 || out.remaining_bytes() < t.data.len() + crate::nat::CHANNEL_HEADER
        {
            flush(shared, udp, out);
        }
        shared.nat.push(out, t.to, &t.data);
    }
}

fn tun_to_udp(shared: &Shared, mut tun: Tun, mut udp: UdpBatch, slot: usize) {
    if let Err(e) = tun.set_nonblocking(true) {
        tracing::error!("TUN non-blocking mode: {e}");
        return;
    }
    let fd = tun.as_raw_fd();
    let mut pkts = PacketBatch::new(BATCH, slot);
    let mut out = SendBatch::new(BATCH, BATCH * slot);
    let mut scratch = vec![0u8; slot + 64];
    while !shared.stopping() {
        if !matches!(wait_readable(&[fd], 500), Ok(m) if m != 0) {
            continue;
        }
        loop {
            pkts.clear();
            match tun.read_batch(&mut pkts) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("reading the TUN device: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
            shared
                .counters
                .tun_rx_packets
                .fetch_add(pkts.len() as u64, Ordering::Relaxed);
            let now = Instant::now();
            for p in pkts.iter() {
                if out.remaining() == 0 || out.remaining_bytes() < slot {
                    flush(shared, &mut udp, &mut out);
                }
                let node = shared.node();
                let Some(to) = node.endpoint_for(p) else {
                    // No route or no endpoint: let the core count the drop.
                    let _ = node.encapsulate(now, p, &mut scratch);
                    continue;
                };
                if crate::nat::is_relay(&to) || crate::nat::is_provisional(&to) {
                    send_relayed(shared, now, p, to, slot, &mut out, &mut scratch);
                    continue;
                }
                out.push_with(to, slot, |buf| match node.encapsulate(now, p, buf) {
                    Outbound::Send { len, .. } => Some(len),
                    _ => None,
                });
            }
            flush(shared, &mut udp, &mut out);
        }
        drain_transmits(shared, &mut udp, &mut out);
        flush(shared, &mut udp, &mut out);
    }
}

/// Encrypts `p` for a peer reached through our TURN allocation: ChannelData framing written in front of
/// the ciphertext in the batch buffer (no copy, no allocation); a Send indication before a channel exists.
fn send_relayed(
    shared: &Shared,
    now: Instant,
    p: &[u8],
    to: std::net::SocketAddr,
    slot: usize,
    out: &mut SendBatch,
    scratch: &mut [u8],
) {
    use crate::nat::{CHANNEL_HEADER, RelayRoute, channel_header};
    match shared.nat.relay_route(&to) {
        Some(RelayRoute::Channel { server, channel }) => {
            let node = shared.node();
            let n = out.push_with(server, slot, |buf| {
                match node.encapsulate(now, p, &mut buf[CHANNEL_HEADER..]) {
                    Outbound::Send { len, .. } => {
                        // A ciphertext over 65535 bytes (TUN MTU near 64 KiB) cannot be framed: dropped.
                        channel_header(buf, channel, len).ok()?;
                        Some(len + CHANNEL_HEADER)
                    }
                    _ => None,
                }
            });
            if let Some(n) = n {
                shared.nat.count_relay_tx(n);
            }
        }
        Some(RelayRoute::Indication { remote }) => {
            let r = shared.node().encapsulate(now, p, scratch);
            if let Outbound::Send { len, .. } = r
                && let Some(t) = shared.nat.wrap(remote, &scratch[..len])
            {
                out.push(t.dst, &t.payload);
            }
        }
        None => {
            // No allocation right now: let the core count the drop as it would without an endpoint.
            let _ = shared.node().encapsulate(now, p, scratch);
        }
    }
}

fn udp_to_tun(shared: &Shared, mut tun: Tun, mut udp: UdpBatch, slot: usize) {
    let fd = udp.as_raw_fd();
    let mut recv = RecvBatch::new(32, GRO_BUF);
    let mut pkts = PacketBatch::new(BATCH, slot);
    let mut out = SendBatch::new(16, 16 * 256);
    while !shared.stopping() {
        match udp.recv_batch(&mut recv) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let _ = wait_readable(&[fd], 500);
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("receiving datagrams: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        }
        shared
            .counters
            .udp_rx_datagrams
            .fetch_add(recv.len() as u64, Ordering::Relaxed);
        let now = Instant::now();
        let mut control = false;
        let mut nat = false;
        for (from, data) in recv.iter() {
            if pkts.remaining() == 0 {
                write_tun(shared, &mut tun, &mut pkts);
            }
            let (from, data) = if crate::nat::needs_nat(data) {
                match shared.nat.input(from, data, now) {
                    crate::nat::Rx::Tunnel { from, payload } => (from, payload),
                    crate::nat::Rx::Handled => {
                        nat = true;
                        continue;
                    }
                    // Neither: the core counts it as malformed.
                    crate::nat::Rx::Unknown => (from, data),
                }
            } else {
                (from, data)
            };
            let node = shared.node();
            pkts.push_with(|slot| match node.decapsulate(now, from, data, slot) {
                Inbound::WriteTun { len, .. } => Some(len),
                Inbound::Done => {
                    control = true;
                    None
                }
                Inbound::Dropped(_) => None,
            });
        }
        write_tun(shared, &mut tun, &mut pkts);
        // Authenticated datagrams from an address that is not their peer's endpoint (a NAT rebound):
        // NAT traversal checks the new address at once instead of at its next check.
        if crate::nat::new_sources(shared, now) {
            nat = true;
        }
        if nat {
            crate::nat::pump(shared, &mut udp, &mut out);
            control = true;
        }
        if control {
            drain_transmits(shared, &mut udp, &mut out);
            flush(shared, &mut udp, &mut out);
        }
    }
}

fn write_tun(shared: &Shared, tun: &mut Tun, pkts: &mut PacketBatch) {
    if pkts.is_empty() {
        return;
    }
    match tun.write_batch(pkts) {
        Ok(n) => {
            shared
                .counters
                .tun_tx_packets
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        Err(e) => tracing::debug!("writing to the TUN device: {e}"),
    }
    pkts.clear();
}

fn timers(shared: &Shared, mut udp: UdpBatch) {
    let mut out = SendBatch::new(64, 64 * 256);
    let mut last_sweep = Instant::now();
    let mut last_tunnel_tick = Instant::now();
    while !shared.stopping() {
        std::thread::sleep(TICK);
        let events: Vec<Event> = {
            let n = shared.node();
            if last_tunnel_tick.elapsed() >= TUNNEL_TICK {
                last_tunnel_tick = Instant::now();
                n.tick(last_tunnel_tick);
            }
            std::iter::from_fn(|| n.poll_event()).collect()
        };
        let wanted: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Event::Wanted { peer } => Some(*peer),
                _ => None,
            })
            .collect();
        let sweep = (last_sweep.elapsed() >= Duration::from_secs(1)).then(|| {
            last_sweep = Instant::now();
            shared.nat.idle_timeout
        });
        crate::nat::lazy_peers(shared, &wanted, sweep);
        crate::nat::pump(shared, &mut udp, &mut out);
        drain_transmits(shared, &mut udp, &mut out);
        flush(shared, &mut udp, &mut out);
        for e in events {
            log_event(shared, &e);
        }
    }
}

fn log_event(shared: &Shared, e: &Event) {
    let peer_name = |id| shared.node().peer_name(id).unwrap_or_default();
    match e {
        Event::HandshakeCompleted { peer, endpoint } => {
            tracing::debug!(peer = %peer_name(*peer), %endpoint, "handshake completed");
        }
        Event::EndpointChanged { peer, endpoint } => {
            tracing::info!(peer = %peer_name(*peer), %endpoint, "peer endpoint changed");
        }
        Event::SessionExpired { peer } => {
            tracing::info!(peer = %peer_name(*peer), "session expired");
        }
        Event::Wanted { peer } => {
            tracing::debug!(peer = %peer_name(*peer), "packets wait for a path");
        }
    }
}
