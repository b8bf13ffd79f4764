//! [`PacketBatch`]: a fixed set of equal-capacity packet slots in one allocation.

/// A batch of IP packets in fixed-capacity slots carved from one buffer allocated once.
///
/// Filling and clearing never allocate: the hot path reuses one batch per direction. Packets are
/// appended in order ([`push`](Self::push), [`push_with`](Self::push_with)); [`get`](Self::get) and
/// [`iter`](Self::iter) read them back. Slots hold whole IP packets (no link header, no virtio header).
pub struct PacketBatch {
    buf: Box<[u8]>,
    lens: Box<[usize]>,
    slot: usize,
    n: usize,
}

impl PacketBatch {
    /// A batch of `slots` slots of `slot_size` bytes each (use at least the TUN MTU).
    pub fn new(slots: usize, slot_size: usize) -> PacketBatch {
        assert!(slots > 0 && slot_size > 0, "empty packet batch");
        PacketBatch {
            buf: vec![0u8; slots * slot_size].into_boxed_slice(),
            lens: vec![0usize; slots].into_boxed_slice(),
            slot: slot_size,
            n: 0,
        }
    }

    /// Number of packets held.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.lens.len()
    }

    /// Free slots left.
    pub fn remaining(&self) -> usize {
        self.lens.len() - self.n
    }

    /// Bytes per slot: the largest packet a slot can hold.
    pub fn slot_size(&self) -> usize {
        self.slot
    }

    /// Forgets all packets (keeps the memory).
    pub fn clear(&mut self) {
        self.n = 0;
    }

    /// Packet `i`. Panics if `i >= len()`.
    pub fn get(&self, i: usize) -> &[u8] {
        assert!(i < self.n, "packet index out of range");
        &self.buf[i * self.slot..i * self.slot + self.lens[i]]
    }

    /// Packet `i`, mutable (e.g. to rewrite headers in place). Panics if `i >= len()`.
    pub fn get_mut(&mut self, i: usize) -> &mut [u8] {
        assert!(i < self.n, "packet index out of range");
        &mut self.buf[i * self.slot..i * self.slot + self.lens[i]]
    }

    /// The packets in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        (0..self.n).map(move |i| self.get(i))
    }

    /// Appends a copy of `pkt`; `false` if the batch is full or `pkt` is larger than a slot.
    pub fn push(&mut self, pkt: &[u8]) -> bool {
        if self.n == self.lens.len() || pkt.len() > self.slot {
            return false;
        }
        let off = self.n * self.slot;
        self.buf[off..off + pkt.len()].copy_from_slice(pkt);
        self.lens[self.n] = pkt.len();
        self.n += 1;
        true
    }

    /// Lets `fill` write a packet straight into the next free slot (e.g. a decryption's output) and
    /// keeps it if `fill` returns `Some(len)`. Returns `None` when the batch is full or `fill` declined.
    pub fn push_with<F>(&mut self, fill: F) -> Option<usize>
    where
        F: FnOnce(&mut [u8]) -> Option<usize>,
    {
        let slot = self.spare_slot()?;
        let len = fill(slot)?;
        self.commit(len);
        Some(len)
    }

    /// The next free slot, to be filled and then kept with [`commit`](Self::commit).
    pub fn spare_slot(&mut self) -> Option<&mut [u8]> {
        if self.n == self.lens.len() {
            return None;
        }
        let off = self.n * self.slot;
        Some(&mut self.buf[off..off + self.slot])
    }

    /// Keeps `len` bytes written into the slot returned by [`spare_slot`](Self::spare_slot).
    /// Panics if the batch is full or `len` exceeds the slot size.
    pub fn commit(&mut self, len: usize) {
        assert!(
            self.n < self.lens.len() && len <= self.slot,
            "commit past batch or slot"
        );
        self.lens[self.n] = len;
        self.n += 1;
    }
}

impl std::fmt::Debug for PacketBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketBatch")
            .field("len", &self.n)
            .field("capacity", &self.lens.len())
            .field("slot_size", &self.slot)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_get_clear() {
        let mut b = PacketBatch::new(2, 4);
        assert!(b.push(&[1, 2, 3]));
        assert_eq!(
            b.push_with(|s| {
                s[..4].copy_from_slice(&[4, 5, 6, 7]);
                Some(4)
            }),
            Some(4)
        );
        assert!(!b.push(&[9]), "full");
        assert_eq!(b.get(0), &[1, 2, 3]);
        assert_eq!(b.get(1), &[4, 5, 6, 7]);
        assert_eq!(b.iter().count(), 2);
        b.clear();
        assert!(b.is_empty());
        assert!(!b.push(&[0; 5]), "larger than a slot");
        assert_eq!(b.push_with(|_| None), None);
        assert!(b.is_empty());
    }
}
