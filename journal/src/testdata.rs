//! Data for tests, in this crate's and in its users' (the end-to-end tests, the proxy's).

/// Deterministic pseudo-random bytes (xorshift) from `seed`, so failures can be reproduced;
/// lz4 cannot shrink them.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
