//! The data plane threads: TUN -> encrypt -> UDP, UDP -> decrypt -> TUN, and the overlay node's timers: the
//! I/O around `evio-overlay`'s sans-IO node. They share it by reference: a packet takes only its peer's lock inside the core (and the table's read
//! lock for the lookup), so sealing and opening run at the same time, and status, metrics and the control
//! plane never make a packet wait for more than one peer's critical section. Control-plane work never
//! runs on these threads.
//!
//! Packet I/O is `evio-fastio`: TUN reads come as TSO super-packets cut into MTU-sized packets, TUN writes
//! coalesce TCP segments back into super-packets, UDP goes out in GSO runs and comes in with GRO and
//! `recvmmsg`. Every buffer is allocated once per thread.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use evio_fastio::{GRO_BUF, PacketBatch, RecvBatch, SendBatch, Tun, UdpBatch, wait_readable};
use evio_overlay::{NodeEvent, OverlayNode, PeerKey, Received, Transmit};

use crate::state::Shared;

/// Smallest slot size of packet batches (an MTU-sized packet plus the tunnel header fits).
const MIN_SLOT: usize = 2048;
/// Packets per batch.
const BATCH: usize = 128;
/// The longest the timer thread sleeps: the control plane and the receive path can make NAT traversal's
/// next deadline earlier than the one it went to sleep for (new peers, answered checks).
const MAX_SLEEP: Duration = Duration::from_millis(100);
/// The shortest: deadlines closer than this run together (a wakeup costs more than 10 ms of lateness
/// here: checks are paced at 50 ms and retransmitted at 100 ms and more).
const MIN_SLEEP: Duration = Duration::from_millis(10);

/// Starts the threads: one reading and sealing per TUN queue (`queues`; the device was opened with
/// `multi_queue` when more than one), one receiving and opening (it writes each flow's packets through the
/// flow's queue: see [`flow_queue`]), one for the timers.
pub fn start(
    shared: Arc<Shared>,
    tun: Tun,
    udp: UdpBatch,
    mtu: u32,
    queues: u16,
) -> io::Result<Vec<JoinHandle<()>>> {
    let slot = MIN_SLOT.max(mtu as usize + 256);
    let mut hs = Vec::new();
    let mut writers = vec![tun.try_clone()?];
    let udp_rx = udp.try_clone()?;
    let udp_timers = udp.try_clone()?;
    for q in 1..queues {
        let t = tun.clone_queue()?;
        writers.push(t.try_clone()?);
        let (u, s) = (udp.try_clone()?, shared.clone());
        hs.push(
            std::thread::Builder::new()
                .name(format!("evio-tun-rx{q}"))
                .spawn(move || tun_to_udp(&s, t, u, slot))?,
        );
    }
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
                .spawn(move || udp_to_tun(&s, writers, udp_rx, slot))?,
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

/// Queues the overlay node's pending datagrams (checks, STUN/TURN, handshakes, cookies, queued packets).
fn drain_transmits(shared: &Shared, udp: &mut UdpBatch, out: &mut SendBatch) {
    while let Some(t) = shared.overlay.poll_transmit() {
        push(shared, udp, out, &t);
    }
}

/// Queues one transmit, flushing first if the batch is full.
fn push(shared: &Shared, udp: &mut UdpBatch, out: &mut SendBatch, t: &Transmit) {
    if out.remaining() == 0 || out.remaining_bytes() < t.len() {
        flush(shared, udp, out);
    }
    out.push_with(t.dst.addr(), t.len(), |buf| t.encode(buf));
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
                let ov = &shared.overlay;
                match ov.dst_for(p) {
                    Some(dst) => {
                        out.push_with(dst.addr(), slot, |buf| ov.encapsulate(now, p, dst, buf));
                    }
                    // No path yet (queued), a relay channel not bound yet, or no route (counted).
                    None => {
                        if let Some(t) = ov.encapsulate_slow(now, p, &mut scratch) {
                            push(shared, &mut udp, &mut out, &t);
                        }
                    }
                }
            }
            flush(shared, &mut udp, &mut out);
        }
        drain_transmits(shared, &mut udp, &mut out);
        flush(shared, &mut udp, &mut out);
    }
}

/// The TUN queue a packet is written through when there are `n` (a symmetric hash of its addresses and, for
/// TCP and UDP, ports: both directions of a flow agree). The TUN driver sends a flow out on the queue its
/// packets were last written to (`tun_automq`), so this is also the queue, and the sealing thread, that
/// reads the flow's outgoing packets: written all through one queue, every flow was read by one thread.
fn flow_queue(p: &[u8], n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let (proto, a, b, l4): (u8, &[u8], &[u8], usize) = match p.first().map(|v| v >> 4) {
        Some(4) if p.len() >= 20 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            // Only the first fragment has ports; later ones hash on addresses alone.
            let frag = u16::from_be_bytes([p[6], p[7]]) & 0x1fff != 0;
            let l4 = if frag { usize::MAX } else { ihl };
            (p[9], &p[12..16], &p[16..20], l4)
        }
        Some(6) if p.len() >= 40 => (p[6], &p[8..24], &p[24..40], 40),
        _ => return 0,
    };
    let ports = match proto {
        6 | 17 if p.len() >= l4.saturating_add(4) => Some((&p[l4..l4 + 2], &p[l4 + 2..l4 + 4])),
        _ => None,
    };
    let fnv = |parts: &[&[u8]]| {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in parts.iter().flat_map(|p| p.iter()) {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    };
    let (sa, sb) = match ports {
        Some((pa, pb)) => (fnv(&[a, pa]), fnv(&[b, pb])),
        None => (fnv(&[a]), fnv(&[b])),
    };
    let (lo, hi) = (sa.min(sb), sa.max(sb));
    let h = fnv(&[&lo.to_le_bytes(), &hi.to_le_bytes(), &[proto]]);
    (h % n as u64) as usize
}

fn udp_to_tun(shared: &Shared, mut tuns: Vec<Tun>, mut udp: UdpBatch, slot: usize) {
    let fd = udp.as_raw_fd();
    let n = tuns.len();
    let mut recv = RecvBatch::new(32, GRO_BUF);
    // One batch per queue: a packet decrypted into the first batch's spare slot stays there when its flow's
    // queue is the first, and is copied into its queue's batch otherwise (only with several queues).
    let mut pkts: Vec<PacketBatch> = (0..n).map(|_| PacketBatch::new(BATCH, slot)).collect();
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
        for (from, data) in recv.iter() {
            if pkts[0].remaining() == 0 {
                write_tun(shared, &mut tuns[0], &mut pkts[0]);
            }
            let (first, others) = pkts.split_first_mut().expect("one batch at least");
            let Some(buf) = first.spare_slot() else {
                continue;
            };
            match shared.overlay.decapsulate(now, from, data, buf) {
                Received::Packet { len } => match flow_queue(&buf[..len], n) {
                    0 => first.commit(len),
                    q => {
                        let b = &mut others[q - 1];
                        if b.remaining() == 0 {
                            write_tun(shared, &mut tuns[q], b);
                        }
                        b.push(&buf[..len]);
                    }
                },
                Received::Control => control = true,
                Received::Dropped => {}
            }
        }
        for (t, b) in tuns.iter_mut().zip(pkts.iter_mut()) {
            write_tun(shared, t, b);
        }
        // Authenticated datagrams from new sources (a NAT rebound) and NAT traversal's input.
        if shared.overlay.process(now) {
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

/// The overlay node's timers, at the deadlines it asks for (see [`MAX_SLEEP`] and [`MIN_SLEEP`]).
fn timers(shared: &Shared, mut udp: UdpBatch) {
    let mut out = SendBatch::new(64, 64 * 256);
    while !shared.stopping() {
        let now = Instant::now();
        shared.overlay.handle_timeout(now);
        while let Some(e) = shared.overlay.poll_event() {
            log_event(&shared.overlay, &e);
        }
        drain_transmits(shared, &mut udp, &mut out);
        flush(shared, &mut udp, &mut out);
        let next = shared.overlay.poll_timeout();
        let wait = next.saturating_duration_since(Instant::now());
        std::thread::sleep(wait.clamp(MIN_SLEEP, MAX_SLEEP));
    }
}

/// The overlay node's events, in the agent's log (peers by name).
fn log_event(node: &OverlayNode, e: &NodeEvent) {
    let name = |k: &PeerKey| {
        let t = node.tunnel();
        t.peer_id(k)
            .and_then(|id| t.peer_name(id))
            .unwrap_or_default()
    };
    match e {
        NodeEvent::LocalCandidates(c) => {
            let c: Vec<String> = c.iter().map(|c| c.to_string()).collect();
            tracing::info!(candidates = ?c, "local candidates");
        }
        NodeEvent::PathChanged {
            peer,
            path: Some(p),
        } => {
            tracing::info!(peer = %name(peer), endpoint = %p.remote, kind = ?p.kind, base = ?p.base, "path selected")
        }
        NodeEvent::PathChanged { peer, path: None } => {
            tracing::info!(peer = %name(peer), "no working path; re-checking")
        }
        NodeEvent::HandshakeCompleted { peer } => {
            tracing::debug!(peer = %name(peer), "handshake completed")
        }
        NodeEvent::SessionExpired { peer } => {
            tracing::info!(peer = %name(peer), "session expired")
        }
        NodeEvent::PeerWoken { peer, by_packet } => {
            let by = if *by_packet { "a packet" } else { "its check" };
            tracing::info!(peer = %name(peer), "lazy peer woken by {by}")
        }
        NodeEvent::PeerIdled { peer } => tracing::info!(peer = %name(peer), "lazy peer idle"),
    }
}

#[cfg(test)]
mod tests {
    use super::flow_queue;

    fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[9] = 6;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    #[test]
    fn both_directions_of_a_flow_share_a_queue_and_flows_spread() {
        let mut used = [0usize; 4];
        for port in 40000..40064u16 {
            let a = tcp4([10, 10, 0, 1], [10, 10, 0, 2], port, 5201);
            let b = tcp4([10, 10, 0, 2], [10, 10, 0, 1], 5201, port);
            let q = flow_queue(&a, 4);
            assert_eq!(q, flow_queue(&b, 4), "port {port}");
            used[q] += 1;
        }
        assert!(used.iter().all(|&n| n >= 4), "{used:?}");
        assert_eq!(flow_queue(&tcp4([1, 2, 3, 4], [5, 6, 7, 8], 1, 2), 1), 0);
        // Not IP, or cut: queue 0.
        assert_eq!(flow_queue(&[0x45, 0, 0], 4), 0);
        assert_eq!(flow_queue(&[], 4), 0);
    }
}
