//! Gratuitous ARP, so neighbours update their caches when an address moves to a new MAC.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::{Error, Result};

/// An `AF_PACKET` socket for ARP; it sends in the network namespace it was opened in (open it inside
/// [`crate::netns::run_in`] to send from another namespace).
pub struct ArpSocket {
    fd: OwnedFd,
}

impl ArpSocket {
    pub fn open() -> Result<ArpSocket> {
        let proto = (libc::ETH_P_ARP as u16).to_be();
        // SAFETY: plain socket(2) call; a non-negative result is a new fd we own.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                proto as i32,
            )
        };
        if fd < 0 {
            return Err(Error::io(
                "open ARP socket",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `fd` is a fresh, valid descriptor that nothing else owns.
        Ok(ArpSocket {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Sends one gratuitous ARP request for `ip` from `mac` on interface `ifindex`.
    pub fn send_gratuitous(&self, ifindex: u32, mac: [u8; 6], ip: Ipv4Addr) -> Result<()> {
        let mut pkt = [0u8; 28];
        pkt[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
        pkt[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
        pkt[4] = 6;
        pkt[5] = 4;
        pkt[6..8].copy_from_slice(&1u16.to_be_bytes()); // request
        pkt[8..14].copy_from_slice(&mac);
        pkt[14..18].copy_from_slice(&ip.octets());
        // target hardware address stays zero
        pkt[24..28].copy_from_slice(&ip.octets());
        // SAFETY: sockaddr_ll is plain old data; zeroed is a valid starting value.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
        sa.sll_ifindex = ifindex as i32;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        // SAFETY: valid fd, buffer and sockaddr_ll with their exact lengths.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(Error::io(
                format!("gratuitous ARP for {ip}"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

/// Sends one gratuitous ARP request for `ip` from `mac` on interface `ifindex`, in the calling thread's
/// network namespace.
pub fn send_gratuitous(ifindex: u32, mac: [u8; 6], ip: Ipv4Addr) -> Result<()> {
    ArpSocket::open()?.send_gratuitous(ifindex, mac, ip)
}
