//! Batched UDP: `recvmmsg` with GRO on receive, GSO on send, on top of `quinn-udp`.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use quinn_udp::{BATCH_SIZE, RecvMeta, UdpSockRef, UdpSocketState};

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
    /// `sendmmsg` calls.
    pub send_calls: u64,
    /// Datagrams sent.
    pub sent_datagrams: u64,
    /// Messages carrying more than one datagram (GSO).
    pub gso_sends: u64,
    /// Most datagrams in one message (one GSO run).
    pub max_gso_batch: u64,
    /// Most messages (GSO runs or single datagrams) in one `sendmmsg`.
    pub max_mmsg_batch: u64,
    /// Datagrams dropped on send errors other than `WouldBlock`.
    pub send_errors: u64,
    /// GSO runs the kernel refused (any error but `WouldBlock`) and that were resent unsegmented.
    pub gso_retries: u64,
}

/// A UDP socket with batched, offloaded I/O. The socket is switched to non-blocking mode; use
/// [`wait_readable`](crate::wait_readable) (or an event loop) to wait for data.
pub struct UdpBatch {
    sock: UdpSocket,
    state: UdpSocketState,
    gso: bool,
    gro: bool,
    v6: bool,
    /// The kernel answered EIO/EINVAL to a GSO send: no more GSO on this handle.
    gso_refused: bool,
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
            gso_refused: false,
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

    /// Datagrams per GSO send in force (1: no GSO, or the kernel answered EIO to a GSO send).
    pub fn max_gso_segments(&self) -> usize {
        if self.gso && !self.gso_refused {
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
            let addr = unmap(meta.addr);
            let mut k = 0;
            if meta.len == 0 {
                b.dgrams.push(Dgram {
                    off: base as u32,
                    len: 0,
                    addr,
                });
                k = 1;
            }
            let mut off = 0;
            while off < meta.len {
                let len = stride.min(meta.len - off);
                b.dgrams.push(Dgram {
                    off: (base + off) as u32,
                    len: len as u32,
                    addr,
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
    /// last of a run may be shorter) become one message with a `UDP_SEGMENT` control message (GSO);
    /// up to [`MMSG_BATCH`] such messages and single datagrams go to the kernel in one `sendmmsg`.
    /// Blocks (polls) while the socket buffer is full, so nothing is dropped for lack of buffer;
    /// other send errors drop the datagrams concerned (counted in [`UdpStats::send_errors`]). A GSO
    /// run the kernel refuses is resent as single datagrams; after EIO (a device without checksum
    /// offload) GSO is off for this handle. Returns the datagrams sent.
    pub fn send_batch(&mut self, b: &SendBatch) -> io::Result<usize> {
        let mut sent = 0;
        let mut i = 0;
        let n = b.entries.len();
        // Entries before this index go out without GSO (a run the kernel found invalid).
        let mut no_gso_until = 0;
        while i < n {
            let mut runs = [Run::default(); MMSG_BATCH];
            let mut cnt = 0;
            let mut k = i;
            while k < n && cnt < MMSG_BATCH {
                runs[cnt] = self.run_at(b, k, k >= no_gso_until);
                k = runs[cnt].end;
                cnt += 1;
            }
            let (handled, datagrams) = self.send_runs(b, &runs[..cnt])?;
            sent += datagrams;
            match handled {
                Handled::Runs(h) => i = runs[h - 1].end,
                Handled::RetryWithoutGso => no_gso_until = runs[0].end,
            }
        }
        Ok(sent)
    }

    /// The GSO run of `b` starting at entry `i` (a single datagram unless `gso`).
    fn run_at(&self, b: &SendBatch, i: usize, gso: bool) -> Run {
        let max_segs = if gso { self.max_gso_segments() } else { 1 };
        let first = &b.entries[i];
        let seg = first.len as usize;
        let mut j = i + 1;
        let mut bytes = seg;
        while j < b.entries.len() && j - i < max_segs && seg > 0 {
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
        Run {
            start: i,
            end: j,
            bytes,
        }
    }

    /// One `sendmmsg` of `runs`; returns what became of them and the datagrams sent.
    fn send_runs(&mut self, b: &SendBatch, runs: &[Run]) -> io::Result<(Handled, usize)> {
        let cnt = runs.len();
        let v6 = self.v6;
        let addrs: [socket2::SockAddr; MMSG_BATCH] = std::array::from_fn(|k| {
            let e = &b.entries[runs.get(k).unwrap_or(&runs[0]).start];
            socket2::SockAddr::from(map_addr(e.addr, v6))
        });
        // SAFETY: iovec and mmsghdr are plain C structs for which all-zero is a valid value.
        let mut iovs: [libc::iovec; MMSG_BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; MMSG_BATCH] = unsafe { std::mem::zeroed() };
        let mut ctrl = [Cmsg([0; CMSG_BUF]); MMSG_BATCH];
        for (k, r) in runs.iter().enumerate() {
            let e = &b.entries[r.start];
            iovs[k].iov_base = b.buf[e.off as usize..].as_ptr() as *mut libc::c_void;
            iovs[k].iov_len = r.bytes;
            let h = &mut hdrs[k].msg_hdr;
            h.msg_name = addrs[k].as_ptr() as *mut libc::c_void;
            h.msg_namelen = addrs[k].len();
            h.msg_iov = &mut iovs[k];
            h.msg_iovlen = 1;
            if r.end - r.start > 1 {
                set_udp_segment(h, &mut ctrl[k], e.len as u16);
            }
        }
        let (handled, datagrams) = loop {
            // SAFETY: hdrs[..cnt] point into iovs, addrs, ctrl and b.buf, all alive and unmoved for
            // the call; the kernel only reads them and writes msg_len.
            let r = unsafe {
                libc::sendmmsg(
                    self.sock.as_raw_fd(),
                    hdrs.as_mut_ptr(),
                    cnt as libc::c_uint,
                    0,
                )
            };
            if r > 0 {
                let r = r as usize;
                self.stats.send_calls += 1;
                self.stats.max_mmsg_batch = self.stats.max_mmsg_batch.max(r as u64);
                let mut d = 0;
                for run in &runs[..r] {
                    let k = run.end - run.start;
                    d += k;
                    if k > 1 {
                        self.stats.gso_sends += 1;
                    }
                    self.stats.max_gso_batch = self.stats.max_gso_batch.max(k as u64);
                }
                break (Handled::Runs(r), d);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => wait_writable(self.sock.as_raw_fd())?,
                _ => {
                    let first = &runs[0];
                    if first.end - first.start > 1 {
                        // A GSO run failed: send its datagrams singly, so GSO never loses more than
                        // single sends would (e.g. EMSGSIZE for some of them). EIO means the route's
                        // device cannot checksum, so no GSO is possible at all: off for good.
                        if e.raw_os_error() == Some(libc::EIO) && !self.gso_refused {
                            tracing::warn!(error = %e, "kernel refused UDP GSO, sending datagrams one by one");
                            self.gso_refused = true;
                        }
                        tracing::debug!(error = %e, "GSO run refused, sending it unsegmented");
                        self.stats.gso_retries += 1;
                        break (Handled::RetryWithoutGso, 0);
                    }
                    // The first message failed (e.g. unreachable destination): drop it, go on.
                    tracing::debug!(error = %e, dest = %b.entries[first.start].addr, "udp send failed");
                    self.stats.send_errors += (first.end - first.start) as u64;
                    break (Handled::Runs(1), 0);
                }
            }
        };
        self.stats.sent_datagrams += datagrams as u64;
        Ok((handled, datagrams))
    }
}

/// What one `sendmmsg` did with the runs it was given.
enum Handled {
    /// The first `n` runs are done (sent, or dropped on an error).
    Runs(usize),
    /// The first run was a GSO run the kernel refused: send it again without GSO.
    RetryWithoutGso,
}

/// A run of datagrams sent as one message: entries `[start, end)`, `bytes` in total.
#[derive(Clone, Copy, Default)]
struct Run {
    start: usize,
    end: usize,
    bytes: usize,
}

/// Room for one `UDP_SEGMENT` control message (`CMSG_SPACE(2)` is 24 on 64-bit Linux).
const CMSG_BUF: usize = 32;

/// A control message buffer aligned for `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Cmsg([u8; CMSG_BUF]);

/// Points `h` at `buf` holding a `UDP_SEGMENT` control message with segment size `seg`.
fn set_udp_segment(h: &mut libc::msghdr, buf: &mut Cmsg, seg: u16) {
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as libc::c_uint) } as usize;
    assert!(space <= CMSG_BUF);
    h.msg_control = buf.0.as_mut_ptr() as *mut libc::c_void;
    h.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` bytes aligned for cmsghdr (buf lives as long as h is used),
    // so CMSG_FIRSTHDR returns a valid header pointer inside buf and CMSG_DATA has room for a u16.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(h);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as libc::c_uint) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg);
    }
}

/// Messages per `sendmmsg` call.
pub const MMSG_BATCH: usize = 64;

/// A UDP socket on `[::]:port` that takes IPv4 too (`IPV6_V6ONLY` off, whatever the system default):
/// one socket, one port for both underlay families (IPv4 peers appear as IPv4 addresses through
/// [`UdpBatch`]). Fails where the kernel has no IPv6; callers then bind `0.0.0.0:port`.
pub fn bind_dual_stack(port: u16) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_only_v6(false)?;
    s.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
    Ok(s.into())
}

/// A source address as the peer would name it: IPv4-mapped IPv6 (from a dual-stack socket) as IPv4.
fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

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

    /// Datagram `i`: its source (IPv4-mapped addresses of a dual-stack socket given as IPv4) and
    /// payload.
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
