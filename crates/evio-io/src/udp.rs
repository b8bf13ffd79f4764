//! Batched UDP: `recvmmsg` with GRO on receive, GSO on send, on top of `quinn-udp`.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use quinn_udp::{BATCH_SIZE, RecvMeta, Transmit, UdpSockRef, UdpSocketState};

/// Most datagrams one GSO send may carry (the kernel's `UDP_MAX_SEGMENTS` is 64 on older kernels).
pub const MAX_GSO_SEGMENTS: usize = 64;
/// Most payload bytes one GSO send may carry (must fit one 64 KB IP packet with headers).
pub const MAX_GSO_BYTES: usize = 65535 - 40 - 8;
/// Receive buffer size that holds a full GRO super-datagram.
pub const GRO_BUF: usize = 65535;

/// Counters of one [`UdpBatch`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpStats {
    /// `recvmmsg` calls that returned data.
    pub recv_calls: u64,
    /// Messages returned (a GRO message holds several datagrams).
    pub recv_msgs: u64,
    /// Datagrams after splitting GRO messages.
    pub recv_datagrams: u64,
    /// Messages that held more than one datagram (GRO at work).
    pub gro_msgs: u64,
    /// Most datagrams in one recvmmsg call.
    pub max_recv_batch: u64,
    /// `sendmsg` calls.
    pub send_calls: u64,
    /// Datagrams sent.
    pub sent_datagrams: u64,
    /// Sends carrying more than one datagram (GSO).
    pub gso_sends: u64,
    /// Most datagrams in one GSO send.
    pub max_gso_batch: u64,
    /// Most datagrams in one `sendmmsg` (datagrams that could not ride in a GSO run).
    pub max_mmsg_batch: u64,
    /// Datagrams dropped on send errors other than `WouldBlock`.
    pub send_errors: u64,
}

/// A UDP socket with batched, offloaded I/O. The socket is switched to non-blocking mode; use
/// [`wait_readable`](crate::wait_readable) (or an event loop) to wait for data.
pub struct UdpBatch {
    sock: UdpSocket,
    state: UdpSocketState,
    gso: bool,
    gro: bool,
    v6: bool,
    stats: UdpStats,
}

impl UdpBatch {
    /// Wraps `sock` with GSO and GRO where the kernel has them.
    pub fn new(sock: UdpSocket) -> io::Result<UdpBatch> {
        UdpBatch::with_offloads(sock, true, true)
    }

    /// Wraps `sock`; `gso`/`gro` false turn those offloads off (for fallback tests and comparisons).
    pub fn with_offloads(sock: UdpSocket, gso: bool, gro: bool) -> io::Result<UdpBatch> {
        let state = UdpSocketState::new(UdpSockRef::from(&sock))?;
        if !gro
            && let Err(e) = setsockopt_int(sock.as_raw_fd(), libc::SOL_UDP, libc::UDP_GRO, 0)
            && e.raw_os_error() != Some(libc::ENOPROTOOPT)
        {
            return Err(e);
        }
        // quinn-udp asks for receive timestamps; we do not use them: save the work and cmsg space.
        let _ = setsockopt_int(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 0);
        let v6 = sock.local_addr()?.is_ipv6();
        Ok(UdpBatch {
            sock,
            state,
            gso,
            gro,
            v6,
            stats: UdpStats::default(),
        })
    }

    /// Another handle on the same socket (a duplicated descriptor) with its own counters, so one
    /// thread can receive while another sends.
    pub fn try_clone(&self) -> io::Result<UdpBatch> {
        UdpBatch::with_offloads(self.sock.try_clone()?, self.gso, self.gro)
    }

    pub fn socket(&self) -> &UdpSocket {
        &self.sock
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Datagrams per GSO send in force (1: no GSO; lowered at run time if the kernel refuses GSO).
    pub fn max_gso_segments(&self) -> usize {
        if self.gso {
            self.state.max_gso_segments().min(MAX_GSO_SEGMENTS)
        } else {
            1
        }
    }

    /// Datagrams the kernel may merge into one received message (1: no GRO).
    pub fn gro_segments(&self) -> usize {
        self.state.gro_segments()
    }

    pub fn stats(&self) -> UdpStats {
        self.stats
    }

    /// Receives up to `b.capacity_msgs()` messages with one `recvmmsg`, replacing `b`'s contents,
    /// and splits GRO messages; returns the number of datagrams. `WouldBlock` when none is queued.
    pub fn recv_batch(&mut self, b: &mut RecvBatch) -> io::Result<usize> {
        b.dgrams.clear();
        let n = {
            let mut chunks = b.buf.chunks_mut(b.msg_size);
            let mut slices: [IoSliceMut<'_>; BATCH_SIZE] =
                std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or(&mut [])));
            let msgs = b.msgs.min(BATCH_SIZE);
            loop {
                match self.state.recv(
                    UdpSockRef::from(&self.sock),
                    &mut slices[..msgs],
                    &mut b.meta[..msgs],
                ) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
        };
        for (m, meta) in b.meta[..n].iter().enumerate() {
            let base = m * b.msg_size;
            let stride = if meta.stride == 0 {
                meta.len
            } else {
                meta.stride
            };
            let mut k = 0;
            if meta.len == 0 {
                b.dgrams.push(Dgram {
                    off: base as u32,
                    len: 0,
                    addr: meta.addr,
                });
                k = 1;
            }
            let mut off = 0;
            while off < meta.len {
                let len = stride.min(meta.len - off);
                b.dgrams.push(Dgram {
                    off: (base + off) as u32,
                    len: len as u32,
                    addr: meta.addr,
                });
                off += len;
                k += 1;
            }
            if k > 1 {
                self.stats.gro_msgs += 1;
            }
        }
        self.stats.recv_calls += 1;
        self.stats.recv_msgs += n as u64;
        self.stats.recv_datagrams += b.dgrams.len() as u64;
        self.stats.max_recv_batch = self.stats.max_recv_batch.max(b.dgrams.len() as u64);
        Ok(b.dgrams.len())
    }

    /// Sets the kernel socket buffers (send and receive) to `bytes`, past `net.core.*mem_max` when
    /// the process has CAP_NET_ADMIN (`SO_*BUFFORCE`). A busy tunnel wants a few MB: a GRO message
    /// alone can take 64 KB of receive buffer.
    pub fn set_buffer_sizes(&self, bytes: usize) -> io::Result<()> {
        let fd = self.sock.as_raw_fd();
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            let v = bytes.min(i32::MAX as usize) as libc::c_int;
            if setsockopt_int(fd, libc::SOL_SOCKET, force, v).is_err() {
                setsockopt_int(fd, libc::SOL_SOCKET, plain, v)?;
            }
        }
        Ok(())
    }

    /// Sends every datagram of `b`. Consecutive datagrams to one destination with one size (the
    /// last of a run may be shorter) go out as one GSO `sendmsg`; the others are sent together
    /// with `sendmmsg`. Blocks (polls) while the socket buffer is full, so nothing is dropped for
    /// lack of buffer; other send errors drop the datagrams concerned (counted in
    /// [`UdpStats::send_errors`]). Returns the datagrams sent.
    pub fn send_batch(&mut self, b: &SendBatch) -> io::Result<usize> {
        let mut sent = 0;
        let mut i = 0;
        let n = b.entries.len();
        // Singles waiting for one sendmmsg: entries [singles, i).
        let mut singles = 0;
        while i < n {
            let max_segs = self.max_gso_segments();
            let first = &b.entries[i];
            let seg = first.len as usize;
            let mut j = i + 1;
            let mut bytes = seg;
            while j < n && j - i < max_segs && seg > 0 {
                let e = &b.entries[j];
                let l = e.len as usize;
                if e.addr != first.addr || l > seg || l == 0 || bytes + l > MAX_GSO_BYTES {
                    break;
                }
                bytes += l;
                j += 1;
                if l < seg {
                    break;
                }
            }
            if j - i == 1 {
                i = j;
                continue;
            }
            sent += self.send_mmsg(b, singles, i)?;
            let start = first.off as usize;
            let t = Transmit {
                destination: first.addr,
                ecn: None,
                contents: &b.buf[start..start + bytes],
                segment_size: Some(seg),
                src_ip: None,
            };
            match self.send_one(&t) {
                Ok(()) => {
                    let k = (j - i) as u64;
                    self.stats.send_calls += 1;
                    self.stats.sent_datagrams += k;
                    self.stats.gso_sends += 1;
                    self.stats.max_gso_batch = self.stats.max_gso_batch.max(k);
                    sent += j - i;
                    i = j;
                }
                Err(e) if self.max_gso_segments() == 1 => {
                    // quinn-udp turned GSO off after the kernel refused it: send these one by one.
                    tracing::debug!(error = %e, "gso refused, falling back");
                }
                Err(e) => {
                    tracing::debug!(error = %e, dest = %first.addr, "udp send failed");
                    self.stats.send_errors += (j - i) as u64;
                    i = j;
                }
            }
            singles = i;
        }
        sent += self.send_mmsg(b, singles, n)?;
        Ok(sent)
    }

    fn send_one(&self, t: &Transmit<'_>) -> io::Result<()> {
        loop {
            match self.state.try_send(UdpSockRef::from(&self.sock), t) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait_writable(self.sock.as_raw_fd())?
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends entries `[from, to)` of `b` one datagram each, up to [`MMSG_BATCH`] per `sendmmsg`.
    fn send_mmsg(&mut self, b: &SendBatch, from: usize, to: usize) -> io::Result<usize> {
        let mut sent = 0;
        let mut i = from;
        let v6 = self.v6;
        while i < to {
            let cnt = (to - i).min(MMSG_BATCH);
            let ents = &b.entries[i..i + cnt];
            let addrs: [socket2::SockAddr; MMSG_BATCH] = std::array::from_fn(|k| {
                let a = ents.get(k).map_or(ents[0].addr, |e| e.addr);
                socket2::SockAddr::from(map_addr(a, v6))
            });
            // SAFETY: iovec and mmsghdr are plain C structs for which all-zero is a valid value.
            let mut iovs: [libc::iovec; MMSG_BATCH] = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let mut hdrs: [libc::mmsghdr; MMSG_BATCH] = unsafe { std::mem::zeroed() };
            for (k, e) in ents.iter().enumerate() {
                iovs[k].iov_base = b.buf[e.off as usize..].as_ptr() as *mut libc::c_void;
                iovs[k].iov_len = e.len as usize;
                let h = &mut hdrs[k].msg_hdr;
                h.msg_name = addrs[k].as_ptr() as *mut libc::c_void;
                h.msg_namelen = addrs[k].len();
                h.msg_iov = &mut iovs[k];
                h.msg_iovlen = 1;
            }
            // SAFETY: hdrs[..cnt] point into iovs, addrs and b.buf, all alive and unmoved for the call;
            // the kernel only reads the buffers and writes msg_len.
            let r = unsafe {
                libc::sendmmsg(
                    self.sock.as_raw_fd(),
                    hdrs.as_mut_ptr(),
                    cnt as libc::c_uint,
                    0,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => {
                        wait_writable(self.sock.as_raw_fd())?;
                        continue;
                    }
                    _ => {
                        // The first datagram failed (e.g. unreachable destination): drop it, go on.
                        tracing::debug!(error = %e, dest = %ents[0].addr, "udp send failed");
                        self.stats.send_errors += 1;
                        i += 1;
                        continue;
                    }
                }
            }
            let r = r as usize;
            self.stats.send_calls += 1;
            self.stats.sent_datagrams += r as u64;
            self.stats.max_gso_batch = self.stats.max_gso_batch.max(1);
            self.stats.max_mmsg_batch = self.stats.max_mmsg_batch.max(r as u64);
            sent += r;
            i += r;
        }
        Ok(sent)
    }
}

/// Datagrams per `sendmmsg` call.
pub const MMSG_BATCH: usize = 64;

/// An IPv4 destination on an IPv6 (dual-stack) socket must be given as an IPv4-mapped address.
fn map_addr(a: SocketAddr, v6_socket: bool) -> SocketAddr {
    match a {
        SocketAddr::V4(v4) if v6_socket => {
            SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
        }
        other => other,
    }
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt reads one c_int that lives across the call; fd is an open socket.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn wait_writable(fd: RawFd) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one pollfd that lives across the call.
    let r = unsafe { libc::poll(&mut p, 1, 1000) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

impl AsRawFd for UdpBatch {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl AsFd for UdpBatch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

#[derive(Clone, Copy, Debug)]
struct Dgram {
    off: u32,
    len: u32,
    addr: SocketAddr,
}

/// Receive buffers for [`UdpBatch::recv_batch`]: `msgs` messages of `msg_size` bytes (use
/// [`GRO_BUF`] so a GRO message fits), and the datagrams found in them after a receive.
pub struct RecvBatch {
    buf: Box<[u8]>,
    msg_size: usize,
    msgs: usize,
    meta: Box<[RecvMeta]>,
    dgrams: Vec<Dgram>,
}

impl RecvBatch {
    /// `msgs` is capped at [`quinn_udp::BATCH_SIZE`] (messages per `recvmmsg`).
    pub fn new(msgs: usize, msg_size: usize) -> RecvBatch {
        let msgs = msgs.clamp(1, BATCH_SIZE);
        RecvBatch {
            buf: vec![0u8; msgs * msg_size].into_boxed_slice(),
            msg_size,
            msgs,
            meta: vec![RecvMeta::default(); msgs].into_boxed_slice(),
            // Room for every message to be a full GRO message of minimum-size datagrams.
            dgrams: Vec::with_capacity(msgs * 64),
        }
    }

    /// Datagrams from the last receive.
    pub fn len(&self) -> usize {
        self.dgrams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dgrams.is_empty()
    }

    /// Datagram `i`: its source and payload.
    pub fn get(&self, i: usize) -> (SocketAddr, &[u8]) {
        let d = &self.dgrams[i];
        (d.addr, &self.buf[d.off as usize..(d.off + d.len) as usize])
    }

    /// Datagram `i`, mutable (e.g. for in-place decryption).
    pub fn get_mut(&mut self, i: usize) -> (SocketAddr, &mut [u8]) {
        let d = self.dgrams[i];
        (
            d.addr,
            &mut self.buf[d.off as usize..(d.off + d.len) as usize],
        )
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = (SocketAddr, &[u8])> + '_ {
        (0..self.dgrams.len()).map(move |i| self.get(i))
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    off: u32,
    len: u32,
    addr: SocketAddr,
}

/// Datagrams to send, packed back to back in one buffer so runs of equal-size datagrams to one
/// destination can go out as one GSO send without copying.
pub struct SendBatch {
    buf: Box<[u8]>,
    used: usize,
    entries: Vec<Entry>,
    max: usize,
}

impl SendBatch {
    /// Room for `max_datagrams` datagrams and `bytes` bytes in total.
    pub fn new(max_datagrams: usize, bytes: usize) -> SendBatch {
        SendBatch {
            buf: vec![0u8; bytes].into_boxed_slice(),
            used: 0,
            entries: Vec::with_capacity(max_datagrams),
            max: max_datagrams,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Datagrams that still fit (by count).
    pub fn remaining(&self) -> usize {
        self.max - self.entries.len()
    }

    /// Bytes still free.
    pub fn remaining_bytes(&self) -> usize {
        self.buf.len() - self.used
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.used = 0;
    }

    /// Datagram `i`: destination and payload.
    pub fn get(&self, i: usize) -> (SocketAddr, &[u8]) {
        let e = &self.entries[i];
        (e.addr, &self.buf[e.off as usize..(e.off + e.len) as usize])
    }

    /// Appends a copy of `data` for `dest`; `false` if full.
    pub fn push(&mut self, dest: SocketAddr, data: &[u8]) -> bool {
        self.push_with(dest, data.len(), |b| {
            b[..data.len()].copy_from_slice(data);
            Some(data.len())
        })
        .is_some()
    }

    /// Lets `fill` write a datagram of at most `max_len` bytes for `dest` straight into the buffer
    /// (e.g. an encryption's output) and keeps it if `fill` returns `Some(len)`.
    pub fn push_with<F>(&mut self, dest: SocketAddr, max_len: usize, fill: F) -> Option<usize>
    where
        F: FnOnce(&mut [u8]) -> Option<usize>,
    {
        if self.entries.len() == self.max || self.buf.len() - self.used < max_len {
            return None;
        }
        let len = fill(&mut self.buf[self.used..self.used + max_len])?;
        assert!(len <= max_len, "fill wrote past max_len");
        self.entries.push(Entry {
            off: self.used as u32,
            len: len as u32,
            addr: dest,
        });
        self.used += len;
        Some(len)
    }
}
