//! Packet I/O of the data plane: the TUN device and the UDP socket with batched `recvmmsg`/`sendmmsg`.
//!
//! This is the simple first version behind a small boundary ([`Tun`], [`UdpBatch`]): the `evio-io` crate
//! (TUN offloads with IFF_VNET_HDR, UDP GSO/GRO) is meant to replace it.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Largest datagram or packet handled.
pub const BUF_SIZE: usize = 65536;

/// A TUN device (layer 3, no packet information header). Closing it deletes the device.
pub struct Tun {
    fd: OwnedFd,
    name: String,
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tun {
    /// Creates (or attaches to) TUN device `name` in the current network namespace, non-blocking.
    pub fn create(name: &str) -> io::Result<Tun> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad interface name {name:?}")));
        }
        // SAFETY: open with a NUL-terminated constant path; the result is checked.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by open and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq; IfReq has its layout (16-byte name, flags, padding
        // to 40 bytes) and lives for the call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Tun { fd, name: name.to_string() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads one packet; `WouldBlock` when none is ready.
    #[inline]
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is a valid writable slice of buf.len() bytes for the duration of the call.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
    }

    /// Writes one packet.
    #[inline]
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: buf is a valid readable slice for the call.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                // The device queue is full: wait until it drains a little.
                wait_fd(self.fd.as_raw_fd(), libc::POLLOUT, 10);
                continue;
            }
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Waits up to `timeout_ms` for `events` on `fd`; true if ready.
pub fn wait_fd(fd: RawFd, events: libc::c_short, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd { fd, events, revents: 0 };
    // SAFETY: one valid pollfd for the call.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    r > 0
}

/// Binds the data plane's UDP socket (IPv4, all addresses) with large buffers.
pub fn bind_udp(port: u16) -> io::Result<UdpSocket> {
    let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
    let size: libc::c_int = 8 << 20;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: setsockopt with a pointer to a c_int and its size; failure is harmless (default buffers).
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
    // A receive timeout lets the receiving thread notice shutdown.
    s.set_read_timeout(Some(std::time::Duration::from_millis(500)))?;
    Ok(s)
}

fn to_sockaddr(a: &SocketAddr) -> Option<libc::sockaddr_in> {
    match a {
        SocketAddr::V4(v4) => Some(libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(*v4.ip()).to_be() },
            sin_zero: [0; 8],
        }),
        SocketAddr::V6(_) => None,
    }
}

fn from_sockaddr(a: &libc::sockaddr_in) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)), u16::from_be(a.sin_port)))
}

/// Reusable buffers and headers for `recvmmsg`/`sendmmsg`: no allocation per packet.
pub struct UdpBatch {
    pub bufs: Vec<Vec<u8>>,
    pub lens: Vec<usize>,
    pub addrs: Vec<SocketAddr>,
    pub count: usize,
    names: Vec<libc::sockaddr_in>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers inside iovs/hdrs only point into this struct's own heap buffers, which move with
// it; the batch is used by one thread at a time.
unsafe impl Send for UdpBatch {}

impl UdpBatch {
    pub fn new(n: usize, buf_size: usize) -> UdpBatch {
        UdpBatch {
            bufs: (0..n).map(|_| vec![0u8; buf_size]).collect(),
            lens: vec![0; n],
            addrs: vec![SocketAddr::from(([0, 0, 0, 0], 0)); n],
            count: 0,
            // SAFETY: sockaddr_in, iovec and mmsghdr are plain C structs for which all-zero is valid.
            names: vec![unsafe { std::mem::zeroed() }; n],
            iovs: vec![unsafe { std::mem::zeroed() }; n],
            hdrs: vec![unsafe { std::mem::zeroed() }; n],
        }
    }

    pub fn capacity(&self) -> usize {
        self.bufs.len()
    }

    pub fn is_full(&self) -> bool {
        self.count == self.bufs.len()
    }

    /// The buffer the next queued datagram is written into.
    pub fn next_buf(&mut self) -> &mut [u8] {
        &mut self.bufs[self.count]
    }

    /// Queues `next_buf()[..len]` for `to`.
    pub fn push(&mut self, to: SocketAddr, len: usize) {
        self.addrs[self.count] = to;
        self.lens[self.count] = len;
        self.count += 1;
    }

    /// Queues a copy of `data` for `to` (control messages).
    pub fn push_copy(&mut self, to: SocketAddr, data: &[u8]) {
        let n = data.len().min(self.bufs[self.count].len());
        self.bufs[self.count][..n].copy_from_slice(&data[..n]);
        self.push(to, n);
    }

    /// Sends every queued datagram with as few `sendmmsg` calls as possible, then empties the batch.
    /// Datagrams the kernel refuses (unreachable, no buffer) are dropped, as UDP would.
    pub fn send(&mut self, sock: &UdpSocket) -> usize {
        let mut n = 0;
        for i in 0..self.count {
            let Some(sa) = to_sockaddr(&self.addrs[i]) else { continue };
            self.names[n] = sa;
            self.iovs[n] = libc::iovec { iov_base: self.bufs[i].as_mut_ptr().cast(), iov_len: self.lens[i] };
            // SAFETY: all-zero is a valid msghdr; fields are then set to our own buffers.
            let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
            h.msg_name = (&mut self.names[n] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[n];
            h.msg_iovlen = 1;
            self.hdrs[n] = libc::mmsghdr { msg_hdr: h, msg_len: 0 };
            n += 1;
        }
        let mut sent = 0;
        while sent < n {
            // SAFETY: hdrs[sent..n] are initialised above and point into buffers alive for the call.
            let r = unsafe {
                libc::sendmmsg(sock.as_raw_fd(), self.hdrs[sent..].as_mut_ptr(), (n - sent) as libc::c_uint, 0)
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => {
                        wait_fd(sock.as_raw_fd(), libc::POLLOUT, 10);
                        continue;
                    }
                    // Skip the datagram that failed (e.g. unreachable destination) and go on.
                    _ => sent += 1,
                }
            } else {
                sent += r as usize;
            }
        }
        self.count = 0;
        n
    }

    /// Receives up to a batch of datagrams (blocks for the first, up to the socket's read timeout).
    /// Afterwards `bufs[i][..lens[i]]` came from `addrs[i]` for `i < count`.
    pub fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        let n = self.bufs.len();
        for i in 0..n {
            self.iovs[i] = libc::iovec { iov_base: self.bufs[i].as_mut_ptr().cast(), iov_len: self.bufs[i].len() };
            // SAFETY: as in send.
            let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
            h.msg_name = (&mut self.names[i] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            self.hdrs[i] = libc::mmsghdr { msg_hdr: h, msg_len: 0 };
        }
        // SAFETY: hdrs point into our buffers, alive for the call; MSG_WAITFORONE returns after the first
        // datagram whatever is ready; the timeout is the socket's SO_RCVTIMEO.
        let r = unsafe {
            libc::recvmmsg(sock.as_raw_fd(), self.hdrs.as_mut_ptr(), n as libc::c_uint, libc::MSG_WAITFORONE, std::ptr::null_mut())
        };
        if r < 0 {
            self.count = 0;
            return Err(io::Error::last_os_error());
        }
        let r = r as usize;
        for i in 0..r {
            self.lens[i] = self.hdrs[i].msg_len as usize;
            self.addrs[i] = from_sockaddr(&self.names[i]);
        }
        self.count = r;
        Ok(r)
    }
}
