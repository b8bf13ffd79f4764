//! A minimal nftables netlink (nfnetlink) client: one batch adding or removing elements of
//! `pods4`/`pods6`, and listing a set's elements (keys, interval flags, comments). Creating the table, sets, chain and rules goes through the `nft` binary. Messages follow
//! `include/uapi/linux/netfilter/nf_tables.h`; element comments use libnftnl's user-data TLV so `nft`
//! shows them.

use std::io;
use std::net::IpAddr;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_NFPROTO: u32 = 15;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_LOOKUP_SET_ID: u16 = 4;
const NFTA_LOOKUP_FLAGS: u16 = 5;
const NFT_LOOKUP_F_INV: u32 = 1;
const NFT_REG_1: u32 = 1;
const NF_INET_POST_ROUTING: u32 = 4;
/// `priority srcnat`.
const NF_IP_PRI_NAT_SRC: u32 = 100;
const NF_ACCEPT: u32 = 1;
/// nft's datatype ids of the set keys (`ipv4_addr`, `ipv6_addr`).
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
/// libnftnl: NFTNL_UDATA_SET_MERGE_ELEMENTS (nft shows `auto-merge`), NFTNL_UDATA_RULE_COMMENT.
const UDATA_SET_MERGE_ELEMENTS: u8 = 2;
const UDATA_RULE_COMMENT: u8 = 0;
const NLM_F_APPEND: u16 = 0x800;
const NFT_MSG_GETSETELEM: u16 = 13;
const NLM_F_DUMP: u16 = 0x300;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
/// NFT_SET_ELEM_INTERVAL_END: the element ends an interval (its key is the first address after it).
pub const ELEM_INTERVAL_END: u32 = 1;
const NFPROTO_INET: u8 = 1;
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

fn be32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

/// One expression of a rule: `NFTA_LIST_ELEM { NFTA_EXPR_NAME, NFTA_EXPR_DATA { attrs } }`.
fn expr(name: &str, data: &[u8]) -> Vec<u8> {
    let mut e = attr(NFTA_EXPR_NAME, &cstr(name));
    if !data.is_empty() {
        e.extend(nested(NFTA_EXPR_DATA, data));
    }
    nested(NFTA_LIST_ELEM, &e)
}

/// What a set is for (its key type, whether it holds intervals).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetSpec<'a> {
    pub name: &'a str,
    pub v6: bool,
    pub interval: bool,
    /// Distinguishes the sets created in one batch (`NFTA_SET_ID`).
    pub id: u32,
}

/// A change of one batch (see [`Nfnl::apply`]); every change is acknowledged.
pub enum Change<'a> {
    /// `add table inet <name>` (no error if it exists).
    Table,
    /// `add set` (no error if it exists with these properties).
    Set(SetSpec<'a>),
    /// `add chain ... { type nat hook postrouting priority srcnat; policy accept; }`.
    NatPostrouting(&'a str),
    /// `flush chain`.
    FlushChain(&'a str),
    /// `add rule <chain> ip[6] saddr @pods ip[6] daddr != @no_masq masquerade comment "<comment>"`.
    MasqRule {
        chain: &'a str,
        pods: SetSpec<'a>,
        no_masq: SetSpec<'a>,
        comment: &'a str,
    },
    /// An element of a plain set.
    Elem(Elem<'a>, Op),
    /// One element of an interval set: `key`, flagged as an interval's end (the first key after it) or not.
    IntervalKey {
        set: &'a str,
        key: Vec<u8>,
        end: bool,
        op: Op,
    },
}

/// One element as the kernel lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub key: Vec<u8>,
    pub flags: u32,
    pub comment: Option<String>,
}

/// The attributes of `buf` (type without the nested flag, value).
fn attributes(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 4 <= buf.len() {
        let len = u16::from_ne_bytes([buf[off], buf[off + 1]]) as usize;
        let ty = u16::from_ne_bytes([buf[off + 2], buf[off + 3]]) & !NLA_F_NESTED;
        if len < 4 || off + len > buf.len() {
            break;
        }
        out.push((ty, &buf[off + 4..off + len]));
        off += (len + 3) & !3;
    }
    out
}

/// The elements of one NEWSETELEM message's payload (after the nfgenmsg header).
fn parse_elements(payload: &[u8]) -> Vec<Listed> {
    let mut out = Vec::new();
    for (ty, list) in attributes(payload.get(4..).unwrap_or_default()) {
        if ty != NFTA_SET_ELEM_LIST_ELEMENTS {
            continue;
        }
        for (ty, elem) in attributes(list) {
            if ty != NFTA_LIST_ELEM {
                continue;
            }
            let mut e = Listed {
                key: Vec::new(),
                flags: 0,
                comment: None,
            };
            for (ty, v) in attributes(elem) {
                match ty {
                    NFTA_SET_ELEM_KEY => {
                        if let Some((_, k)) = attributes(v)
                            .into_iter()
                            .find(|(t, _)| *t == NFTA_DATA_VALUE)
                        {
                            e.key = k.to_vec();
                        }
                    }
                    NFTA_SET_ELEM_FLAGS if v.len() >= 4 => {
                        e.flags = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
                    }
                    NFTA_SET_ELEM_USERDATA => e.comment = udata_comment(v),
                    _ => {}
                }
            }
            out.push(e);
        }
    }
    out
}

/// The comment of libnftnl's user-data TLVs (type, length, value), without its NUL.
fn udata_comment(mut ud: &[u8]) -> Option<String> {
    while ud.len() >= 2 {
        let (ty, len) = (ud[0], usize::from(ud[1]));
        let v = ud.get(2..2 + len)?;
        if ty == UDATA_SET_ELEM_COMMENT {
            let v = v.strip_suffix(&[0]).unwrap_or(v);
            return Some(String::from_utf8_lossy(v).into_owned());
        }
        ud = &ud[2 + len..];
    }
    None
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

    /// Every element of set `set` in table `inet <table>`; `None` if the table or set does not exist.
    pub fn set_elements(&mut self, table: &str, set: &str) -> io::Result<Option<Vec<Listed>>> {
        let mut attrs = attr(NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
        attrs.extend(attr(NFTA_SET_ELEM_LIST_SET, &cstr(set)));
        let (seq, m) = self.msg(
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM,
            NLM_F_REQUEST | NLM_F_DUMP,
            NFPROTO_INET,
            0,
            &attrs,
        );
        self.send(&m)?;
        let mut out = Vec::new();
        // A dump ends with NLMSG_DONE (or an error); its parts come as the previous ones are read.
        loop {
            for (ty, s, err, payload) in self.drain(true)? {
                if s != seq {
                    continue;
                }
                match ty {
                    NLMSG_ERROR if err == libc::ENOENT => return Ok(None),
                    NLMSG_ERROR if err != 0 => return Err(io::Error::from_raw_os_error(err)),
                    NLMSG_DONE => return Ok(Some(out)),
                    t if t == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM => {
                        out.extend(parse_elements(&payload))
                    }
                    _ => {}
                }
            }
        }
    }

    fn setelem(&mut self, table: &str, e: &Elem<'_>, op: Op) -> Vec<u8> {
        self.setelem_raw(table, e.set, &ip_bytes(&e.ip), 0, e.comment, op)
    }

    fn setelem_raw(
        &mut self,
        table: &str,
        set: &str,
        key: &[u8],
        flags: u32,
        comment: Option<&str>,
        op: Op,
    ) -> Vec<u8> {
        let mut elem = nested(NFTA_SET_ELEM_KEY, &attr(NFTA_DATA_VALUE, key));
        if flags != 0 {
            elem.extend(attr(NFTA_SET_ELEM_FLAGS, &be32(flags)));
        }
        if let Some(c) = comment {
            let c = cstr(c);
            let mut ud = vec![UDATA_SET_ELEM_COMMENT, c.len().min(255) as u8];
            ud.extend_from_slice(&c[..c.len().min(255)]);
            elem.extend(attr(NFTA_SET_ELEM_USERDATA, &ud));
        }
        let mut attrs = attr(NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
        attrs.extend(attr(NFTA_SET_ELEM_LIST_SET, &cstr(set)));
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

    /// The message of one change.
    fn change(&mut self, table: &str, c: &Change<'_>) -> Vec<u8> {
        let req = NLM_F_REQUEST | NLM_F_ACK;
        let sub = |m: u16| (NFNL_SUBSYS_NFTABLES << 8) | m;
        match c {
            Change::Table => {
                let a = attr(NFTA_TABLE_NAME, &cstr(table));
                self.msg(
                    sub(NFT_MSG_NEWTABLE),
                    req | NLM_F_CREATE,
                    NFPROTO_INET,
                    0,
                    &a,
                )
                .1
            }
            Change::Set(s) => {
                let mut a = attr(NFTA_SET_TABLE, &cstr(table));
                a.extend(attr(NFTA_SET_NAME, &cstr(s.name)));
                if s.interval {
                    a.extend(attr(NFTA_SET_FLAGS, &be32(NFT_SET_INTERVAL)));
                }
                let (ty, len) = if s.v6 {
                    (TYPE_IP6ADDR, 16)
                } else {
                    (TYPE_IPADDR, 4)
                };
                a.extend(attr(NFTA_SET_KEY_TYPE, &be32(ty)));
                a.extend(attr(NFTA_SET_KEY_LEN, &be32(len)));
                a.extend(attr(NFTA_SET_ID, &be32(s.id)));
                if s.interval {
                    let mut ud = vec![UDATA_SET_MERGE_ELEMENTS, 4];
                    ud.extend_from_slice(&1u32.to_ne_bytes());
                    a.extend(attr(NFTA_SET_USERDATA, &ud));
                }
                self.msg(sub(NFT_MSG_NEWSET), req | NLM_F_CREATE, NFPROTO_INET, 0, &a)
                    .1
            }
            Change::NatPostrouting(chain) => {
                let mut a = attr(NFTA_CHAIN_TABLE, &cstr(table));
                a.extend(attr(NFTA_CHAIN_NAME, &cstr(chain)));
                let mut hook = attr(NFTA_HOOK_HOOKNUM, &be32(NF_INET_POST_ROUTING));
                hook.extend(attr(NFTA_HOOK_PRIORITY, &be32(NF_IP_PRI_NAT_SRC)));
                a.extend(nested(NFTA_CHAIN_HOOK, &hook));
                a.extend(attr(NFTA_CHAIN_POLICY, &be32(NF_ACCEPT)));
                a.extend(attr(NFTA_CHAIN_TYPE, &cstr("nat")));
                self.msg(
                    sub(NFT_MSG_NEWCHAIN),
                    req | NLM_F_CREATE,
                    NFPROTO_INET,
                    0,
                    &a,
                )
                .1
            }
            Change::FlushChain(chain) => {
                let mut a = attr(NFTA_RULE_TABLE, &cstr(table));
                a.extend(attr(NFTA_RULE_CHAIN, &cstr(chain)));
                self.msg(sub(NFT_MSG_DELRULE), req, NFPROTO_INET, 0, &a).1
            }
            Change::MasqRule {
                chain,
                pods,
                no_masq,
                comment,
            } => {
                let (proto, saddr, daddr, len) = if pods.v6 {
                    (10u8, 8, 24, 16)
                } else {
                    (2u8, 12, 16, 4)
                };
                let mut e = expr("meta", &{
                    let mut d = attr(NFTA_META_DREG, &be32(NFT_REG_1));
                    d.extend(attr(NFTA_META_KEY, &be32(NFT_META_NFPROTO)));
                    d
                });
                e.extend(expr("cmp", &{
                    let mut d = attr(NFTA_CMP_SREG, &be32(NFT_REG_1));
                    d.extend(attr(NFTA_CMP_OP, &be32(0)));
                    d.extend(nested(NFTA_CMP_DATA, &attr(NFTA_DATA_VALUE, &[proto])));
                    d
                }));
                for (offset, set, inv) in [(saddr, pods, false), (daddr, no_masq, true)] {
                    e.extend(expr("payload", &{
                        let mut d = attr(NFTA_PAYLOAD_DREG, &be32(NFT_REG_1));
                        d.extend(attr(NFTA_PAYLOAD_BASE, &be32(NFT_PAYLOAD_NETWORK_HEADER)));
                        d.extend(attr(NFTA_PAYLOAD_OFFSET, &be32(offset)));
                        d.extend(attr(NFTA_PAYLOAD_LEN, &be32(len)));
                        d
                    }));
                    e.extend(expr("lookup", &{
                        let mut d = attr(NFTA_LOOKUP_SET, &cstr(set.name));
                        d.extend(attr(NFTA_LOOKUP_SREG, &be32(NFT_REG_1)));
                        d.extend(attr(NFTA_LOOKUP_SET_ID, &be32(set.id)));
                        if inv {
                            d.extend(attr(NFTA_LOOKUP_FLAGS, &be32(NFT_LOOKUP_F_INV)));
                        }
                        d
                    }));
                }
                e.extend(expr("masq", &[]));
                let mut a = attr(NFTA_RULE_TABLE, &cstr(table));
                a.extend(attr(NFTA_RULE_CHAIN, &cstr(chain)));
                a.extend(nested(NFTA_RULE_EXPRESSIONS, &e));
                let c = cstr(comment);
                let mut ud = vec![UDATA_RULE_COMMENT, c.len().min(255) as u8];
                ud.extend_from_slice(&c[..c.len().min(255)]);
                a.extend(attr(NFTA_RULE_USERDATA, &ud));
                self.msg(
                    sub(NFT_MSG_NEWRULE),
                    req | NLM_F_CREATE | NLM_F_APPEND,
                    NFPROTO_INET,
                    0,
                    &a,
                )
                .1
            }
            Change::Elem(e, op) => self.setelem(table, e, *op),
            Change::IntervalKey { set, key, end, op } => {
                let flags = if *end { ELEM_INTERVAL_END } else { 0 };
                self.setelem_raw(table, set, key, flags, None, *op)
            }
        }
    }

    /// One atomic transaction of element changes (see [`Nfnl::apply`]).
    pub fn batch(&mut self, table: &str, ops: &[(Elem<'_>, Op)]) -> io::Result<()> {
        let changes: Vec<Change<'_>> = ops
            .iter()
            .map(|(e, op)| {
                Change::Elem(
                    Elem {
                        set: e.set,
                        ip: e.ip,
                        comment: e.comment,
                    },
                    *op,
                )
            })
            .collect();
        self.apply(table, &changes)
    }

    /// One atomic transaction applying `changes` in order. The first kernel error aborts the whole batch
    /// and is returned. (A batch that deletes elements makes the kernel defer their destruction past an
    /// RCU grace period, which closing this socket then waits for: milliseconds; adding alone does not.)
    pub fn apply(&mut self, table: &str, changes: &[Change<'_>]) -> io::Result<()> {
        let mut buf = self
            .msg(
                NFNL_MSG_BATCH_BEGIN,
                NLM_F_REQUEST,
                0,
                NFNL_SUBSYS_NFTABLES,
                &[],
            )
            .1;
        for c in changes {
            buf.extend(self.change(table, c));
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
        if acked < changes.len() {
            return Err(io::Error::other(format!(
                "nftables acknowledged {acked} of {} changes",
                changes.len()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_elements_are_parsed_with_flags_and_comments() {
        let mut ud = vec![UDATA_SET_ELEM_COMMENT, 6];
        ud.extend_from_slice(b"evio a\0");
        ud[1] = 7;
        let mut elem = nested(NFTA_SET_ELEM_KEY, &attr(NFTA_DATA_VALUE, &[10, 244, 3, 2]));
        elem.extend(attr(NFTA_SET_ELEM_FLAGS, &ELEM_INTERVAL_END.to_be_bytes()));
        elem.extend(attr(NFTA_SET_ELEM_USERDATA, &ud));
        let mut payload = vec![NFPROTO_INET, 0, 0, 0];
        payload.extend(attr(NFTA_SET_ELEM_LIST_TABLE, &cstr("t")));
        payload.extend(nested(
            NFTA_SET_ELEM_LIST_ELEMENTS,
            &nested(NFTA_LIST_ELEM, &elem),
        ));
        assert_eq!(
            parse_elements(&payload),
            vec![Listed {
                key: vec![10, 244, 3, 2],
                flags: ELEM_INTERVAL_END,
                comment: Some("evio a".into()),
            }]
        );
        // Truncated or odd user data: no comment, no panic.
        assert_eq!(udata_comment(&[0, 9, b'x']), None);
        assert_eq!(
            udata_comment(&[5, 1, b'x', 0, 2, b'o', b'k']),
            Some("ok".into())
        );
    }

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
