//! A minimal nftables netlink (nfnetlink) client for the per-pod fast path: one batch adding or removing
//! elements of `pods4`/`pods6`, and reading the table's handle. Everything else (creating the table, sets,
//! chain and rules; listing) goes through the `nft` binary. Messages follow
//! `include/uapi/linux/netfilter/nf_tables.h`; element comments use libnftnl's user-data TLV so `nft`
//! shows them.

use std::io;
use std::net::IpAddr;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFPROTO_INET: u8 = 1;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_HANDLE: u16 = 4;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_DATA_VALUE: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_EXCL: u16 = 0x200;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// libnftnl: NFTNL_UDATA_SET_ELEM_COMMENT.
const UDATA_SET_ELEM_COMMENT: u8 = 0;

fn attr(ty: u16, data: &[u8]) -> Vec<u8> {
    let len = 4 + data.len();
    let mut v = Vec::with_capacity((len + 3) & !3);
    v.extend_from_slice(&(len as u16).to_ne_bytes());
    v.extend_from_slice(&ty.to_ne_bytes());
    v.extend_from_slice(data);
    v.resize((len + 3) & !3, 0);
    v
}

fn nested(ty: u16, inner: &[u8]) -> Vec<u8> {
    attr(ty | NLA_F_NESTED, inner)
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// What to do with an element.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Add; no error when it is already there (then it is left as it is).
    Add,
    /// Add; EEXIST when it is already there.
    AddExcl,
    Delete,
}

/// One element of a set, with an optional comment.
pub struct Elem<'a> {
    pub set: &'a str,
    pub ip: IpAddr,
    pub comment: Option<&'a str>,
}

/// One answer: message type, sequence number, errno (0 for none) and payload.
type Answer = (u16, u32, i32, Vec<u8>);

pub struct Nfnl {
    sock: netlink_sys::Socket,
    seq: u32,
}

impl Nfnl {
    pub fn open() -> io::Result<Nfnl> {
        let mut sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_NETFILTER)?;
        // The kernel assigns the port id.
        sock.bind_auto()?;
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(1);
        Ok(Nfnl { sock, seq })
    }

    fn msg(
        &mut self,
        ty: u16,
        flags: u16,
        family: u8,
        res_id: u16,
        attrs: &[u8],
    ) -> (u32, Vec<u8>) {
        self.seq = self.seq.wrapping_add(1);
        let len = 16 + 4 + attrs.len();
        let mut v = Vec::with_capacity(len);
        v.extend_from_slice(&(len as u32).to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&self.seq.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.push(family);
        v.push(0); // NFNETLINK_V0
        v.extend_from_slice(&res_id.to_be_bytes());
        v.extend_from_slice(attrs);
        (self.seq, v)
    }

    fn send(&self, buf: &[u8]) -> io::Result<()> {
        self.sock.send(buf, 0).map(|_| ())
    }

    /// Reads every queued answer (the kernel handles a request inside send, so they are all there):
    /// `(type, seq, errno or 0, payload)`.
    fn drain(&self, block_first: bool) -> io::Result<Vec<Answer>> {
        let mut out = Vec::new();
        let mut buf: Vec<u8> = Vec::with_capacity(65536);
        let mut first = block_first;
        loop {
            let flags = if first { 0 } else { libc::MSG_DONTWAIT };
            first = false;
            buf.clear();
            let n = match self.sock.recv(&mut buf, flags) {
                Ok(n) => n.min(buf.len()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(out),
                Err(e) => return Err(e),
            };
            let mut off = 0;
            while off + 16 <= n {
                let len =
                    u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or_default()) as usize;
                if len < 16 || off + len > n {
                    break;
                }
                let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
                let seq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().unwrap_or_default());
                let mut err = 0;
                if ty == NLMSG_ERROR && len >= 20 {
                    err =
                        -i32::from_ne_bytes(buf[off + 16..off + 20].try_into().unwrap_or_default());
                }
                out.push((ty, seq, err, buf[off + 16..off + len].to_vec()));
                off += (len + 3) & !3;
            }
        }
    }

    /// The handle of table `inet <name>` (new for every creation of the table), or None.
    pub fn table_handle(&mut self, name: &str) -> io::Result<Option<u64>> {
        let (seq, m) = self.msg(
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE,
            NLM_F_REQUEST | NLM_F_ACK,
            NFPROTO_INET,
            0,
            &attr(NFTA_TABLE_NAME, &cstr(name)),
        );
        self.send(&m)?;
        let mut handle = None;
        for (ty, s, err, payload) in self.drain(true)? {
            if s != seq {
                continue;
            }
            if ty == NLMSG_ERROR && err != 0 {
                if err == libc::ENOENT {
                    return Ok(None);
                }
                return Err(io::Error::from_raw_os_error(err));
            }
            if ty == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE && payload.len() > 4 {
                let mut off = 4; // nfgenmsg
                while off + 4 <= payload.len() {
                    let alen = u16::from_ne_bytes([payload[off], payload[off + 1]]) as usize;
                    let aty =
                        u16::from_ne_bytes([payload[off + 2], payload[off + 3]]) & !NLA_F_NESTED;
                    if alen < 4 || off + alen > payload.len() {
                        break;
                    }
                    if aty == NFTA_TABLE_HANDLE && alen == 12 {
                        handle = Some(u64::from_be_bytes(
                            payload[off + 4..off + 12].try_into().unwrap_or_default(),
                        ));
                    }
                    off += (alen + 3) & !3;
                }
            }
            if ty == NLMSG_DONE {
                break;
            }
        }
        Ok(handle)
    }

    fn setelem(&mut self, table: &str, e: &Elem<'_>, op: Op) -> Vec<u8> {
        let mut elem = nested(NFTA_SET_ELEM_KEY, &attr(NFTA_DATA_VALUE, &ip_bytes(&e.ip)));
        if let Some(c) = e.comment {
            let c = cstr(c);
            let mut ud = vec![UDATA_SET_ELEM_COMMENT, c.len().min(255) as u8];
            ud.extend_from_slice(&c[..c.len().min(255)]);
            elem.extend(attr(NFTA_SET_ELEM_USERDATA, &ud));
        }
        let mut attrs = attr(NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
        attrs.extend(attr(NFTA_SET_ELEM_LIST_SET, &cstr(e.set)));
        attrs.extend(nested(
            NFTA_SET_ELEM_LIST_ELEMENTS,
            &nested(NFTA_LIST_ELEM, &elem),
        ));
        let (ty, flags) = match op {
            Op::Add => (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE),
            Op::AddExcl => (
                NFT_MSG_NEWSETELEM,
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            ),
            Op::Delete => (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
        };
        self.msg(
            (NFNL_SUBSYS_NFTABLES << 8) | ty,
            flags,
            NFPROTO_INET,
            0,
            &attrs,
        )
        .1
    }

    /// One atomic transaction applying `ops` in order. The first kernel error aborts the whole batch and is
    /// returned. (A batch that deletes elements makes the kernel defer their destruction past an RCU grace
    /// period, which closing this socket then waits for: milliseconds; adding alone does not.)
    pub fn batch(&mut self, table: &str, ops: &[(Elem<'_>, Op)]) -> io::Result<()> {
        let mut buf = self
            .msg(
                NFNL_MSG_BATCH_BEGIN,
                NLM_F_REQUEST,
                0,
                NFNL_SUBSYS_NFTABLES,
                &[],
            )
            .1;
        for (e, op) in ops {
            buf.extend(self.setelem(table, e, *op));
        }
        buf.extend(
            self.msg(
                NFNL_MSG_BATCH_END,
                NLM_F_REQUEST,
                0,
                NFNL_SUBSYS_NFTABLES,
                &[],
            )
            .1,
        );
        self.send(&buf)?;
        let mut acked = 0;
        for (ty, _, err, _) in self.drain(true)? {
            if ty == NLMSG_ERROR {
                if err != 0 {
                    return Err(io::Error::from_raw_os_error(err));
                }
                acked += 1;
            }
        }
        if acked < ops.len() {
            return Err(io::Error::other(format!(
                "nftables acknowledged {acked} of {} changes",
                ops.len()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded() {
        assert_eq!(attr(1, b"abc"), vec![7, 0, 1, 0, b'a', b'b', b'c', 0]);
        assert_eq!(nested(3, &[]).len(), 4);
        assert_eq!(
            u16::from_ne_bytes([nested(3, &[])[2], nested(3, &[])[3]]),
            3 | NLA_F_NESTED
        );
    }
}
