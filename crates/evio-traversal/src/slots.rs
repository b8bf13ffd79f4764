//! [`RelaySlots`]: small numbers standing for peer addresses behind our TURN allocation.
//!
//! The overlay node (`evio-overlay`) gives a peer reached through its relay the stand-in endpoint
//! `[100::1]:SLOT` in the tunnel core; the slot names the peer's address as the relay sees it. The table is
//! bounded and a slot is never re-pointed while it may be in use: a slot is made only for an address the
//! caller vouches for (in the overlay node: a relay pair of an authenticated peer, [`crate::Agent::relay_peer`]), and
//! is given to another address only after it has been idle for [`SLOT_IDLE`] and the caller says it is no
//! longer live.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::Agent;

/// At most this many slots: a slot is the port of a relay endpoint, so 16 bits.
pub const MAX_RELAY_SLOTS: usize = 1 << 16;

/// A slot unused this long may be given to another address (if no longer live). Longer than WireGuard's
/// session lifetime (180 s) and many keepalive intervals: a datagram still on its way, or a session
/// still using the slot, would have touched it.
pub const SLOT_IDLE: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, Debug)]
struct Slot {
    remote: SocketAddr,
    used: Instant,
}

/// The slot table. See the module docs.
#[derive(Debug)]
pub struct RelaySlots {
    slots: Vec<Option<Slot>>,
    of: HashMap<SocketAddr, u16>,
    /// Freed slots, the longest free first.
    free: VecDeque<u16>,
    cap: usize,
}

impl Default for RelaySlots {
    fn default() -> Self {
        RelaySlots::with_capacity(MAX_RELAY_SLOTS)
    }
}

impl RelaySlots {
    /// A table of at most `cap` slots (at most [`MAX_RELAY_SLOTS`]).
    pub fn with_capacity(cap: usize) -> RelaySlots {
        RelaySlots {
            slots: Vec::new(),
            of: HashMap::new(),
            free: VecDeque::new(),
            cap: cap.min(MAX_RELAY_SLOTS),
        }
    }

    /// Slots in use.
    pub fn len(&self) -> usize {
        self.of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.of.is_empty()
    }

    /// The address slot `slot` stands for.
    pub fn remote(&self, slot: u16) -> Option<SocketAddr> {
        self.slots
            .get(slot as usize)
            .copied()
            .flatten()
            .map(|s| s.remote)
    }

    /// The slot of `remote` if it has one (and marks it used at `now`).
    pub fn get(&mut self, remote: SocketAddr, now: Instant) -> Option<u16> {
        let s = *self.of.get(&remote)?;
        if let Some(Some(e)) = self.slots.get_mut(s as usize) {
            e.used = e.used.max(now);
        }
        Some(s)
    }

    /// The slot of `remote`, made if it has none. Only for addresses the caller vouches for (see the module
    /// docs). When the table is full, slots idle for [`SLOT_IDLE`] that are not `live(slot, remote)` are
    /// freed first; `None` if none is: nothing is ever re-pointed to make room.
    pub fn insert(
        &mut self,
        remote: SocketAddr,
        now: Instant,
        live: impl Fn(u16, SocketAddr) -> bool,
    ) -> Option<u16> {
        if let Some(s) = self.get(remote, now) {
            return Some(s);
        }
        if self.free.is_empty() && self.slots.len() >= self.cap {
            self.reclaim(now, live);
        }
        let s = match self.free.pop_front() {
            Some(s) => s,
            None if self.slots.len() < self.cap => {
                self.slots.push(None);
                (self.slots.len() - 1) as u16
            }
            None => {
                tracing::warn!(%remote, slots = self.len(), "relay endpoint table full");
                return None;
            }
        };
        self.slots[s as usize] = Some(Slot { remote, used: now });
        self.of.insert(remote, s);
        Some(s)
    }

    /// The slot of `remote` for a datagram relayed from it or a path through our relay to it: made only if
    /// `remote` is one of `agent`'s relay pairs ([`Agent::relay_peer`]: announced by an authenticated peer
    /// or learned from its authenticated checks), never for an address only a datagram named. When the
    /// table is full, idle slots that are neither relay pairs nor `in_use` (e.g. endpoints the tunnel core
    /// holds) are freed first.
    pub fn slot_for(
        &mut self,
        agent: &Agent,
        remote: SocketAddr,
        now: Instant,
        in_use: impl Fn(u16) -> bool,
    ) -> Option<u16> {
        if let Some(s) = self.get(remote, now) {
            return Some(s);
        }
        agent.relay_peer(remote)?;
        self.insert(remote, now, |s, a| {
            agent.relay_peer(a).is_some() || in_use(s)
        })
    }

    /// Frees every slot idle for [`SLOT_IDLE`] that is not `live`.
    pub fn reclaim(&mut self, now: Instant, live: impl Fn(u16, SocketAddr) -> bool) {
        for (i, e) in self.slots.iter_mut().enumerate() {
            let Some(s) = *e else {
                continue;
            };
            let slot = i as u16;
            if now.saturating_duration_since(s.used) >= SLOT_IDLE && !live(slot, s.remote) {
                *e = None;
                self.of.remove(&s.remote);
                self.free.push_back(slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u32) -> SocketAddr {
        SocketAddr::from((std::net::Ipv4Addr::from(0xC612_0000 + (i >> 16)), i as u16))
    }

    /// A full table refuses new addresses rather than re-pointing a slot: every slot keeps its address,
    /// however many others ask (before, the 65,537th address cleared the table and slot 0 was given again).
    #[test]
    fn full_table_never_repoints_a_slot() {
        let t0 = Instant::now();
        let mut t = RelaySlots::with_capacity(16);
        let never_live = |_, _| false;
        let first: Vec<u16> = (0..16)
            .map(|i| t.insert(addr(i), t0, never_live).unwrap())
            .collect();
        for i in 16..1000 {
            assert_eq!(t.insert(addr(i), t0 + SLOT_IDLE / 2, never_live), None);
        }
        assert_eq!(t.len(), 16);
        for (i, s) in first.iter().enumerate() {
            assert_eq!(t.remote(*s), Some(addr(i as u32)));
        }
    }

    /// Idle slots are given again only if the caller says they are not live; a live one keeps its address
    /// however long it is idle.
    #[test]
    fn only_idle_slots_that_are_not_live_are_reused() {
        let t0 = Instant::now();
        let mut t = RelaySlots::with_capacity(2);
        let a = t.insert(addr(1), t0, |_, _| false).unwrap();
        let b = t.insert(addr(2), t0, |_, _| false).unwrap();
        let later = t0 + SLOT_IDLE;
        // `a` is still used (a path points at it): not reclaimed.
        let live_a = |s: u16, _| s == a;
        let c = t.insert(addr(3), later, live_a).unwrap();
        assert_eq!(c, b, "the idle slot that is not live is reused");
        assert_eq!(t.remote(a), Some(addr(1)));
        assert_eq!(t.remote(b), Some(addr(3)));
        assert_eq!(t.get(addr(2), later), None);
        // Touched recently: not reclaimed even if not live.
        assert_eq!(t.get(addr(1), later), Some(a));
        assert_eq!(t.insert(addr(4), later, |_, _| false), None);
    }
}
