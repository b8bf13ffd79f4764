//! Synchronous rtnetlink for evio: what the CNI plugin (and later eviod, for its TUN routes) needs to do to
//! links, addresses and routes in a given network namespace, fast and without an async runtime.
//!
//! - [`netns`]: run code inside another network namespace on a short-lived thread (the process's own
//!   threads never change namespace), the way netavark does.
//! - [`Netlink`]: one `NETLINK_ROUTE` socket; a socket keeps the namespace it was created in, so
//!   [`Netlink::in_netns`] opens it inside the target namespace and returns it to the caller.
//! - [`sysctl`]: `/proc/sys/net` knobs (IPv4 forwarding, IPv6 router advertisements).
//!
//! Dependencies: `netlink-packet-route`/`netlink-packet-core` (rust-netlink's message types, the ones
//! netavark and rtnetlink use: no hand-written attribute encoding) and `netlink-sys` (a plain blocking
//! socket; without its async features). A synchronous socket keeps a plugin invocation to a few syscalls,
//! with no runtime to start.

mod link;
pub mod netns;
mod route;
pub mod sysctl;

use std::io;
use std::path::Path;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

pub use link::{Link, LinkChange};
pub use route::RouteSpec;

/// A netlink error: what was being done and the kernel's errno (or an I/O error).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: {source}")]
    Kernel { op: String, source: io::Error },
    #[error("{op}: {msg}")]
    Other { op: String, msg: String },
}

impl Error {
    /// The errno, when the kernel answered with one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Kernel { source, .. } => source.raw_os_error(),
            Error::Other { .. } => None,
        }
    }

    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }

    pub fn is_not_found(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ENODEV) | Some(libc::ENOENT) | Some(libc::ESRCH) | Some(libc::EADDRNOTAVAIL)
        )
    }

    pub(crate) fn io(op: impl Into<String>, source: io::Error) -> Error {
        Error::Kernel {
            op: op.into(),
            source,
        }
    }

    pub(crate) fn other(op: impl Into<String>, msg: impl Into<String>) -> Error {
        Error::Other {
            op: op.into(),
            msg: msg.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// A `NETLINK_ROUTE` socket bound to the namespace it was opened in.
pub struct Netlink {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// A socket in the caller's current network namespace.
    pub fn new() -> Result<Netlink> {
        let mut sock =
            Socket::new(NETLINK_ROUTE).map_err(|e| Error::io("open netlink socket", e))?;
        sock.bind_auto()
            .map_err(|e| Error::io("bind netlink socket", e))?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(|e| Error::io("connect netlink socket", e))?;
        // Strict checking makes the kernel filter dumps by the header fields we set (e.g. one link's addresses).
        let _ = sock.set_netlink_get_strict_chk(true);
        Ok(Netlink {
            sock,
            seq: 1,
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    /// A socket inside the network namespace at `path` (e.g. `/run/netns/x` or `/proc/PID/ns/net`), opened
    /// on a helper thread that enters the namespace; the caller's threads stay where they are.
    pub fn in_netns(path: &Path) -> Result<Netlink> {
        netns::run_in(path, Netlink::new)?
    }

    /// Sends one request and collects the answers: for a dump every message until `NLMSG_DONE`, otherwise
    /// until the ACK. A kernel error becomes [`Error::Kernel`] with `op` as context.
    pub(crate) fn request(
        &mut self,
        op: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        nl.finalize();
        let mut out = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut out);
        self.sock.send(&out, 0).map_err(|e| Error::io(op, e))?;
        let mut answers = Vec::new();
        loop {
            self.buf.clear();
            let n = self
                .sock
                .recv(&mut self.buf, 0)
                .map_err(|e| Error::io(op, e))?;
            let mut off = 0;
            while off < n {
                let bytes = &self.buf[off..n];
                let len = NetlinkBuffer::new_checked(bytes)
                    .map(|b| b.length() as usize)
                    .map_err(|e| Error::other(op, format!("bad netlink answer: {e}")))?;
                if len == 0 || len > bytes.len() {
                    return Err(Error::other(op, "truncated netlink answer"));
                }
                let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[..len])
                    .map_err(|e| Error::other(op, format!("cannot parse netlink answer: {e}")))?;
                off += (len + 3) & !3;
                if m.header.sequence_number != seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::Error(e) => {
                        if e.code.is_none() {
                            return Ok(answers);
                        }
                        return Err(Error::io(op, e.to_io()));
                    }
                    NetlinkPayload::Done(_) => return Ok(answers),
                    // A plain GET answers with the object, then the ACK; a dump ends with DONE.
                    NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                    _ => {}
                }
            }
        }
    }
}
