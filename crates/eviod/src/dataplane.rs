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
use evio_overlay::{Received, Transmit};

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
        for (from, data) in recv.iter() {
            if pkts.remaining() == 0 {
                write_tun(shared, &mut tun, &mut pkts);
            }
            let ov = &shared.overlay;
            pkts.push_with(|slot| match ov.decapsulate(now, from, data, slot) {
                Received::Packet { len } => Some(len),
                Received::Control => {
                    control = true;
                    None
                }
                Received::Dropped => None,
            });
        }
        write_tun(shared, &mut tun, &mut pkts);
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
        drain_transmits(shared, &mut udp, &mut out);
        flush(shared, &mut udp, &mut out);
        let next = shared.overlay.poll_timeout();
        let wait = next.saturating_duration_since(Instant::now());
        std::thread::sleep(wait.clamp(MIN_SLEEP, MAX_SLEEP));
    }
}
