//! A Linux TUN device with optional offloads (`IFF_VNET_HDR` + `TUNSETOFFLOAD`).
//!
//! With offloads on, the kernel hands over TCP super-packets of up to 64 KB (TSO4/TSO6, and UDP with
//! USO4/USO6 where the kernel has it) that [`Tun::read_batch`] cuts into MTU-sized IP packets, and
//! [`Tun::write_batch`] merges in-order TCP segments back into super-packets (GRO) so both kernel
//! crossings cost one syscall per ~64 KB instead of one per packet.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::batch::PacketBatch;
use crate::gro::{Coalescer, MAX_HEADER, MAX_SEGMENTS, Unit};
use crate::gso::{SplitError, split_from};
use crate::vnet::{VNET_HDR_LEN, VirtioNetHdr};

/// Largest read from a TUN with offloads: a 64 KB IP packet after its virtio header.
const RX_BUF: usize = VNET_HDR_LEN + 65535;

/// How to open a [`Tun`].
#[derive(Clone, Debug)]
pub struct TunOptions {
    /// Interface name (at most 15 bytes; `%d` patterns like `evio%d` are resolved by the kernel).
    pub name: String,
    /// MTU set on the interface; batch slots must be at least this large.
    pub mtu: u32,
    /// Ask for `IFF_VNET_HDR` and TSO/USO offloads. Falls back to fewer offloads if the kernel refuses.
    pub offload: bool,
    /// Coalesce TCP segments on write (only with offloads). On by default; off for comparisons.
    pub coalesce: bool,
    /// Open with `IFF_MULTI_QUEUE` so [`Tun::clone_queue`] can add queues (one per thread).
    pub multi_queue: bool,
    /// Bring the link up after creating it.
    pub up: bool,
}

impl TunOptions {
    pub fn new(name: &str, mtu: u32) -> TunOptions {
        TunOptions {
            name: name.to_string(),
            mtu,
            offload: true,
            coalesce: true,
            multi_queue: false,
            up: true,
        }
    }
}

/// Counters of one TUN queue (plain fields: each queue belongs to one thread).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunStats {
    /// `read` syscalls that returned a packet.
    pub reads: u64,
    /// IP packets produced by reads (after segmentation).
    pub read_packets: u64,
    /// Reads that returned a GSO super-packet (more than one segment).
    pub super_packets: u64,
    /// Most segments cut from one read.
    pub max_segments: u64,
    /// `write`/`writev` syscalls.
    pub writes: u64,
    /// IP packets written (counting each coalesced segment).
    pub written_packets: u64,
    /// Writes that carried a coalesced super-packet.
    pub coalesced_writes: u64,
    /// Most segments merged into one write.
    pub max_coalesced: u64,
    /// Packets dropped: malformed offload reads, writes the kernel refused.
    pub drops: u64,
    /// Coalesced writes the kernel refused (their segments were then written one by one).
    pub coalesce_failures: u64,
}

/// After this many refused coalesced writes, a queue stops coalescing.
const MAX_COALESCE_FAILURES: u64 = 8;

/// Offload flags the device accepted (`TUN_F_*`), 0 without offloads.
pub type OffloadFlags = u32;

/// One queue of a TUN device. Reading and writing need `&mut self`; open more queues with
/// [`clone_queue`](Self::clone_queue) for more threads.
pub struct Tun {
    file: File,
    name: String,
    opts: TunOptions,
    vnet: bool,
    offload_flags: OffloadFlags,
    nonblocking: bool,
    rx: Box<[u8]>,
    /// A read super-packet not fully delivered yet: its length and the next segment.
    pending: Option<(usize, usize)>,
    coalescer: Coalescer,
    hdr: [u8; MAX_HEADER],
    stats: TunStats,
}

const ZERO_HDR: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

impl Tun {
    /// Creates (or attaches to) TUN `name` in the current network namespace with `mtu`, offloads if
    /// `offload`, and brings it up. Addresses and routes are the caller's business.
    pub fn create(name: &str, mtu: u32, offload: bool) -> io::Result<Tun> {
        let mut o = TunOptions::new(name, mtu);
        o.offload = offload;
        Tun::with_options(o)
    }

    /// Creates the device as `opts` say.
    pub fn with_options(opts: TunOptions) -> io::Result<Tun> {
        let (file, name, vnet, offload_flags) = open_queue(&opts.name, &opts)?;
        set_mtu_up(&name, opts.mtu, opts.up)?;
        tracing::debug!(%name, mtu = opts.mtu, vnet, offload_flags, "tun created");
        Ok(Tun::from_parts(file, name, opts, vnet, offload_flags))
    }

    fn from_parts(
        file: File,
        name: String,
        opts: TunOptions,
        vnet: bool,
        offload_flags: OffloadFlags,
    ) -> Tun {
        let mut coalescer = Coalescer::new();
        let uso = libc::TUN_F_USO4 | libc::TUN_F_USO6;
        coalescer.set_coalesce_udp(offload_flags & uso == uso);
        Tun {
            file,
            name,
            opts,
            vnet,
            offload_flags,
            nonblocking: false,
            rx: vec![0u8; if vnet { RX_BUF } else { 0 }].into_boxed_slice(),
            pending: None,
            coalescer,
            hdr: [0; MAX_HEADER],
            stats: TunStats::default(),
        }
    }

    /// Opens another queue of a device created with `multi_queue` (same offloads). The kernel spreads
    /// flows over queues by hash, so one TCP flow stays on one queue.
    pub fn clone_queue(&self) -> io::Result<Tun> {
        if !self.opts.multi_queue {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "tun not created with multi_queue",
            ));
        }
        let (file, name, vnet, flags) = open_queue(&self.name, &self.opts)?;
        let mut t = Tun::from_parts(file, name, self.opts.clone(), vnet, flags);
        t.set_nonblocking(self.nonblocking)?;
        Ok(t)
    }

    /// Another handle on the same queue (a duplicated descriptor) with its own buffers, so one
    /// thread can read while another writes.
    pub fn try_clone(&self) -> io::Result<Tun> {
        let file = self.file.try_clone()?;
        let mut t = Tun::from_parts(
            file,
            self.name.clone(),
            self.opts.clone(),
            self.vnet,
            self.offload_flags,
        );
        t.nonblocking = self.nonblocking;
        Ok(t)
    }

    /// The interface name the kernel gave.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn mtu(&self) -> u32 {
        self.opts.mtu
    }

    /// `TUN_F_*` flags in force; non-zero means reads may be super-packets (handled here).
    pub fn offload_flags(&self) -> OffloadFlags {
        self.offload_flags
    }

    /// Whether packets carry a virtio header (offloads asked and granted).
    pub fn has_vnet_hdr(&self) -> bool {
        self.vnet
    }

    /// Turns write coalescing on or off (only matters with offloads).
    pub fn set_coalesce(&mut self, on: bool) {
        self.opts.coalesce = on;
    }

    /// Whether UDP datagrams are merged too (default: when the kernel granted USO4 and USO6).
    pub fn set_coalesce_udp(&mut self, on: bool) {
        self.coalescer.set_coalesce_udp(on);
    }

    /// Whether TCP/UDP checksums are verified before segments are merged (default on; see
    /// [`Coalescer::set_verify_checksums`]).
    pub fn set_verify_checksums(&mut self, on: bool) {
        self.coalescer.set_verify_checksums(on);
    }

    /// Whether segments of a read super-packet wait for the next [`read_batch`](Self::read_batch)
    /// (`poll` on the descriptor does not see them).
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    pub fn stats(&self) -> TunStats {
        self.stats
    }

    /// Non-blocking mode: [`read_batch`](Self::read_batch) then drains the queue into the batch and
    /// returns `WouldBlock` when nothing was there. In blocking mode it does one read per call.
    pub fn set_nonblocking(&mut self, on: bool) -> io::Result<()> {
        set_nonblocking(self.file.as_raw_fd(), on)?;
        self.nonblocking = on;
        Ok(())
    }

    /// Appends IP packets read from the device to `out` (segmenting super-packets); returns how many.
    ///
    /// `out`'s slots must hold an MTU-sized packet. Blocking mode: one `read` (blocks until a packet
    /// arrives; reads again if that one was malformed and dropped). Non-blocking mode: reads until the queue is empty or `out` is full; `WouldBlock` only
    /// when nothing was read. Segments of a super-packet that do not fit the rest of `out` are kept
    /// and delivered first by the next call (which then returns without reading if they fill `out`
    /// again), so any batch size works: call until `WouldBlock` (or check
    /// [`has_pending`](Self::has_pending)) before waiting for the descriptor to become readable.
    /// Returns 0 only if `out` was already full.
    pub fn read_batch(&mut self, out: &mut PacketBatch) -> io::Result<usize> {
        let before = out.len();
        if let Some((len, next)) = self.pending.take() {
            self.pending = self.deliver(len, next, out);
            if self.pending.is_some() || (!self.nonblocking && out.len() > before) {
                return Ok(out.len() - before);
            }
        }
        while out.remaining() > 0 {
            let r = if self.vnet {
                self.file.read(&mut self.rx)
            } else {
                let slot = out.spare_slot().expect("remaining > 0");
                self.file.read(slot)
            };
            let n = match r {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if out.len() > before && e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            self.stats.reads += 1;
            if self.vnet {
                self.pending = self.deliver(n, 0, out);
                if self.pending.is_some() {
                    break;
                }
            } else {
                out.commit(n);
                self.stats.read_packets += 1;
            }
            // Blocking mode: one read, unless it was dropped (malformed) and delivered nothing.
            if !self.nonblocking && out.len() > before {
                break;
            }
        }
        Ok(out.len() - before)
    }

    /// Segments the super-packet of `len` bytes in `rx`, from segment `first`, into `out`. Returns
    /// the next segment to deliver if `out` filled up first.
    fn deliver(
        &mut self,
        len: usize,
        first: usize,
        out: &mut PacketBatch,
    ) -> Option<(usize, usize)> {
        let buf = &self.rx[..len];
        let Some(hdr) = VirtioNetHdr::decode(buf) else {
            self.stats.drops += 1;
            return None;
        };
        match split_from(&hdr, &buf[VNET_HDR_LEN..], out, first) {
            Ok((n, total)) => {
                self.stats.read_packets += n as u64;
                if first == 0 && total > 1 {
                    self.stats.super_packets += 1;
                    self.stats.max_segments = self.stats.max_segments.max(total as u64);
                }
                (first + n < total).then_some((len, first + n))
            }
            Err(SplitError::NoRoom) => Some((len, first)),
            Err(e) => {
                tracing::debug!(error = %e, len, "dropping tun read");
                self.stats.drops += 1;
                None
            }
        }
    }

    /// Writes the packets of `pkts` to the device; with offloads, in-order TCP segments of one
    /// connection are merged into super-packets first. Returns the packets the kernel accepted;
    /// packets it refuses (malformed) are counted in [`TunStats::drops`], and an error is returned
    /// only if none was written.
    pub fn write_batch(&mut self, pkts: &PacketBatch) -> io::Result<usize> {
        let mut written = 0;
        let mut first_err = None;
        if !self.vnet {
            for p in pkts.iter() {
                self.stats.writes += 1;
                match write_all_vectored(&self.file, &[IoSlice::new(p)]) {
                    Ok(_) => written += 1,
                    Err(e) => note_err(&mut self.stats, &mut first_err, e),
                }
            }
        } else if !self.opts.coalesce {
            for p in pkts.iter() {
                self.stats.writes += 1;
                match write_all_vectored(&self.file, &[IoSlice::new(&ZERO_HDR), IoSlice::new(p)]) {
                    Ok(()) => written += 1,
                    Err(e) => note_err(&mut self.stats, &mut first_err, e),
                }
            }
        } else {
            self.coalescer.plan(pkts);
            let Tun {
                file,
                coalescer,
                hdr,
                stats,
                opts,
                ..
            } = self;
            for unit in coalescer.units() {
                stats.writes += 1;
                let res = match unit {
                    Unit::Single(i) => write_all_vectored(
                        file,
                        &[IoSlice::new(&ZERO_HDR), IoSlice::new(pkts.get(i))],
                    ),
                    Unit::Group(gi) => {
                        let n = coalescer.header(pkts, gi, hdr);
                        let hlen = coalescer.header_len(gi);
                        let mut iov = [IoSlice::new(&[]); MAX_SEGMENTS + 1];
                        iov[0] = IoSlice::new(&hdr[..n]);
                        let mut k = 1;
                        for m in coalescer.members(gi) {
                            iov[k] = IoSlice::new(&pkts.get(m)[hlen..]);
                            k += 1;
                        }
                        match write_all_vectored(file, &iov[..k]) {
                            Ok(()) => {
                                stats.coalesced_writes += 1;
                                stats.max_coalesced = stats.max_coalesced.max((k - 1) as u64);
                                written += k - 1;
                                continue;
                            }
                            Err(e) => {
                                // The kernel refused the super-packet: never lose the segments for
                                // it, write them one by one; stop coalescing if this keeps happening.
                                stats.coalesce_failures += 1;
                                tracing::debug!(error = %e, "coalesced tun write refused, writing segments");
                                if stats.coalesce_failures >= MAX_COALESCE_FAILURES && opts.coalesce
                                {
                                    tracing::warn!(error = %e, "tun refuses coalesced packets, coalescing off");
                                    opts.coalesce = false;
                                }
                                for m in coalescer.members(gi) {
                                    stats.writes += 1;
                                    let iov = [IoSlice::new(&ZERO_HDR), IoSlice::new(pkts.get(m))];
                                    match write_all_vectored(file, &iov) {
                                        Ok(()) => written += 1,
                                        Err(e) => note_err(stats, &mut first_err, e),
                                    }
                                }
                                continue;
                            }
                        }
                    }
                };
                match res {
                    Ok(()) => written += 1,
                    Err(e) => note_err(stats, &mut first_err, e),
                }
            }
        }
        self.stats.written_packets += written as u64;
        match first_err {
            Some(e) if written == 0 && !pkts.is_empty() => Err(e),
            _ => Ok(written),
        }
    }
}

fn note_err(stats: &mut TunStats, first: &mut Option<io::Error>, e: io::Error) {
    tracing::debug!(error = %e, "tun write refused");
    stats.drops += 1;
    if first.is_none() {
        *first = Some(e);
    }
}

/// One `writev`; a TUN takes a packet whole or not at all.
fn write_all_vectored(mut f: &File, iov: &[IoSlice<'_>]) -> io::Result<()> {
    let total: usize = iov.iter().map(|s| s.len()).sum();
    loop {
        match f.write_vectored(iov) {
            Ok(n) if n == total => return Ok(()),
            Ok(n) => {
                return Err(io::Error::other(format!(
                    "short tun write: {n} of {total} bytes"
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for Tun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl std::fmt::Debug for Tun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tun")
            .field("name", &self.name)
            .field("vnet", &self.vnet)
            .field("offload_flags", &self.offload_flags)
            .finish()
    }
}

fn ifreq_for(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') || name.contains('/')
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    // SAFETY: ifreq is plain old data (arrays and a union of integers/pointers); all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

fn name_of(req: &libc::ifreq) -> String {
    // SAFETY: ifr_name is a NUL-terminated array: zeroed and filled with < IFNAMSIZ bytes by us or the kernel.
    unsafe { CStr::from_ptr(req.ifr_name.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Opens /dev/net/tun and attaches it to `name`; returns the file, the kernel's name, whether the
/// virtio header is on, and the offload flags granted.
fn open_queue(name: &str, opts: &TunOptions) -> io::Result<(File, String, bool, OffloadFlags)> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = ifreq_for(name)?;
    let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
    if opts.offload {
        flags |= libc::IFF_VNET_HDR;
    }
    if opts.multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq that lives across the call; fd is open.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let name = name_of(&req);
    let mut granted = 0;
    if opts.offload {
        let tso = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        for want in [
            tso | libc::TUN_F_USO4 | libc::TUN_F_USO6,
            tso,
            libc::TUN_F_CSUM,
        ] {
            // SAFETY: TUNSETOFFLOAD takes the flags by value; fd is an attached TUN.
            if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETOFFLOAD, want as libc::c_ulong) }
                == 0
            {
                granted = want;
                break;
            }
        }
    }
    Ok((file, name, opts.offload, granted))
}

fn set_mtu_up(name: &str, mtu: u32, up: bool) -> io::Result<()> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let fd = sock.as_raw_fd();
    let mut req = ifreq_for(name)?;
    req.ifr_ifru.ifru_mtu = mtu as libc::c_int;
    // SAFETY: SIOCSIFMTU reads one ifreq living across the call; fd is an open socket.
    if unsafe { libc::ioctl(fd, libc::SIOCSIFMTU, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if up {
        let mut req = ifreq_for(name)?;
        // SAFETY: SIOCGIFFLAGS fills the ifreq living across the call.
        if unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just wrote ifru_flags, the union member SIOCGIFFLAGS fills.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        // SAFETY: SIOCSIFFLAGS reads the ifreq living across the call.
        if unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

pub(crate) fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFL on a descriptor we own; no memory is passed.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if fl < 0 {
        return Err(io::Error::last_os_error());
    }
    let fl = if on {
        fl | libc::O_NONBLOCK
    } else {
        fl & !libc::O_NONBLOCK
    };
    // SAFETY: F_SETFL with integer flags on a descriptor we own.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, fl) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until one of `fds` is readable or `timeout_ms` passes (-1: forever); returns a mask of
/// the ready indices (bit i for `fds[i]`, at most 64 descriptors).
pub fn wait_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<u64> {
    assert!(fds.len() <= 64, "at most 64 descriptors");
    let mut p = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; 64];
    for (slot, fd) in p.iter_mut().zip(fds) {
        *slot = libc::pollfd {
            fd: *fd,
            events: libc::POLLIN,
            revents: 0,
        };
    }
    loop {
        // SAFETY: p holds fds.len() initialized pollfd entries for the duration of the call.
        let r = unsafe { libc::poll(p.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut mask = 0u64;
        for (i, pf) in p[..fds.len()].iter().enumerate() {
            if pf.revents != 0 {
                mask |= 1 << i;
            }
        }
        return Ok(mask);
    }
}
