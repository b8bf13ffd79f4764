//! The Internet checksum (RFC 1071) for IPv4 headers and TCP/UDP over IPv4 and IPv6.
//!
//! Sums are kept unfolded in a `u64` so a pseudo-header, a header and a payload can be summed
//! separately and added; [`fold`] reduces to 16 bits. The final header field is `!fold(sum)`.

/// Adds `data`, read as big-endian 16-bit words (an odd last byte is padded with zero), to `initial`.
///
/// `data` must start at an even offset of the checksummed region (all callers sum whole headers or
/// payloads that start at even offsets). The one's-complement sum does not depend on byte order
/// (RFC 1071, 2.B), so the bulk is summed as native-endian 32-bit words into a 64-bit accumulator (a
/// loop the compiler vectorizes), folded, and byte-swapped to network order once at the end.
#[inline]
pub fn sum(data: &[u8], initial: u64) -> u64 {
    let mut acc: u64 = 0;
    // Four lanes over 16-byte blocks; a lane could only overflow after 2^32 words (16 GB).
    let mut blocks = data.chunks_exact(16);
    let mut lanes = [0u64; 4];
    for b in &mut blocks {
        for (k, lane) in lanes.iter_mut().enumerate() {
            *lane +=
                u32::from_ne_bytes([b[4 * k], b[4 * k + 1], b[4 * k + 2], b[4 * k + 3]]) as u64;
        }
    }
    for lane in lanes {
        acc += lane;
    }
    let rest = blocks.remainder();
    let mut words = rest.chunks_exact(2);
    for w in &mut words {
        acc += u16::from_ne_bytes([w[0], w[1]]) as u64;
    }
    if let [b] = words.remainder() {
        acc += u16::from_ne_bytes([*b, 0]) as u64;
    }
    let native = fold(acc);
    let be = if cfg!(target_endian = "little") {
        native.swap_bytes()
    } else {
        native
    };
    initial + be as u64
}

/// Folds an unfolded sum to 16 bits (one's-complement addition of all 16-bit parts).
#[inline]
pub fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// The unfolded sum of the TCP/UDP pseudo-header: source and destination addresses (4 or 16 bytes
/// each), protocol number, and the upper-layer length.
#[inline]
pub fn pseudo_header(src: &[u8], dst: &[u8], proto: u8, len: u32) -> u64 {
    let s = sum(src, 0);
    let s = sum(dst, s);
    s + proto as u64 + (len >> 16) as u64 + (len & 0xffff) as u64
}

/// The IPv4 header checksum of `hdr` (its checksum field must be zero or is included as is).
#[inline]
pub fn ipv4_header(hdr: &[u8]) -> u16 {
    !fold(sum(hdr, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071 done the slow obvious way, 16 bits at a time, as an independent reference.
    fn naive(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        let mut i = 0;
        while i + 1 < data.len() {
            s += ((data[i] as u32) << 8) | data[i + 1] as u32;
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
            i += 2;
        }
        if i < data.len() {
            s += (data[i] as u32) << 8;
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
        }
        s as u16
    }

    #[test]
    fn matches_naive_for_all_lengths() {
        let mut x: u32 = 12345;
        let data: Vec<u8> = (0..3000)
            .map(|_| {
                x = x.wrapping_mul(1103515245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect();
        for len in 0..300 {
            assert_eq!(fold(sum(&data[..len], 0)), naive(&data[..len]), "len {len}");
        }
        assert_eq!(fold(sum(&data, 0)), naive(&data));
        let ff = vec![0xffu8; 2001];
        assert_eq!(fold(sum(&ff, 0)), naive(&ff));
    }

    #[test]
    fn known_ipv4_header() {
        // A textbook example header (checksum field 0xb861 zeroed).
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_header(&h), 0xb861);
    }
}
