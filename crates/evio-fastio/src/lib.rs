//! Fast packet I/O for evio's userspace data plane.
//!
//! A userspace tunnel spends most of its time in per-packet syscalls. This crate moves packets in
//! batches and lets the kernel hand over big packets:
//!
//! * [`Tun`]: a TUN device (current network namespace) opened with `IFF_VNET_HDR` and
//!   `TUNSETOFFLOAD` (`TUN_F_CSUM | TSO4 | TSO6 | USO4 | USO6`, falling back to fewer flags). Reads
//!   return TCP/UDP super-packets of up to 64 KB that [`Tun::read_batch`] segments in userspace
//!   ([`gso`]) into MTU-sized IP packets; [`Tun::write_batch`] coalesces in-order TCP segments of one
//!   connection back into super-packets ([`gro`]) written with one `writev` and a virtio header.
//!   `IFF_MULTI_QUEUE` and [`Tun::clone_queue`] give one queue per thread.
//! * [`UdpBatch`]: `recvmmsg` with UDP GRO (super-datagrams split into datagrams by
//!   [`RecvBatch`]), and UDP GSO sends that carry a run of equal-size datagrams to one destination
//!   in one `sendmsg` ([`SendBatch`]).
//! * [`PacketBatch`]: fixed-capacity packet slots in one allocation; nothing on the hot path
//!   allocates (every buffer is owned by the caller and reused).
//!
//! # Why these dependencies
//!
//! * `quinn-udp` does the UDP receive side and the socket setup: it is the socket layer of the
//!   quinn QUIC stack, maintained with it, and handles the details that are easy to get wrong by
//!   hand: probing GSO/GRO support, `recvmmsg` with `UDP_GRO` control messages and their segment
//!   sizes, IPv4-mapped addresses, PMTU discovery settings. Its send path is one `sendmsg` per GSO
//!   run, so the send side is written here: one `sendmmsg` carries up to 64 messages, each a GSO
//!   run with its own `UDP_SEGMENT` control message or a single datagram (as wireguard-go does),
//!   and a run the kernel refuses is resent unsegmented (after EIO, GSO is off for the socket).
//! * The TUN side is written here. `tun-rs` has offload support (a port of wireguard-go's
//!   `offload_linux.go`), but its batch API takes growable buffers (`ExpandBuffer`, coalescing into
//!   the first buffer, flow tables in hash maps) and per-buffer offsets, which does not fit a fixed,
//!   allocation-free batch; and we want segmentation and coalescing as plain functions over byte
//!   slices that can be unit-tested against an independent checksum. Segmentation follows what a
//!   NIC does (Linux `tcp_gso_segment`), coalescing follows the kernel's `tcp_gro_receive` rules.
//! * `libc` for the ioctls (`TUNSETIFF`, `TUNSETOFFLOAD`, `SIOCSIFMTU`) and `poll`; each `unsafe`
//!   block is a single call with a `// SAFETY:` note.
//!
//! See `docs/fastio.md` for the design and `docs/bench/fastio.md` for measurements.

pub mod batch;
pub mod checksum;
pub mod gro;
pub mod gso;
pub mod tun;
pub mod udp;
pub mod vnet;

pub use batch::PacketBatch;
pub use gro::Coalescer;
pub use gso::{SplitError, split, split_from};
pub use tun::{Tun, TunOptions, TunStats, wait_readable};
pub use udp::{GRO_BUF, RecvBatch, SendBatch, UdpBatch, UdpStats, bind_dual_stack};
pub use vnet::VirtioNetHdr;
