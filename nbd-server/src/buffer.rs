//! Payload buffers reused across requests. A fresh 1 MiB buffer costs a memset and page faults on
//! every request (a fifth of the CPU time of 1 MiB reads, measured with perf); a pooled one costs
//! neither. Buffers come in power-of-two classes and the pool keeps at most [`POOLED_BYTES_MAX`];
//! when a returned buffer finds it full, the class holding the most bytes gives way, so buffers
//! of a size no longer in use (a seed's chunks, one large read) do not keep the sizes in use
//! from being pooled. A backend may keep a buffer after its request (the proxy's change log
//! holds a write's buffer until the replicator has it); it comes back when that drops it.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// Bytes the pool may hold while no request uses them (bounds the memory it keeps).
const POOLED_BYTES_MAX: usize = 16 << 20;
const CLASS_MIN_BITS: u32 = 12;
const CLASSES: usize = 32 - CLASS_MIN_BITS as usize;

struct Pool {
    free: [Vec<Vec<u8>>; CLASSES],
    pooled_bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: [const { Vec::new() }; CLASSES],
    pooled_bytes: 0,
});

/// A buffer of `len` initialised bytes, returned to the pool when dropped.
#[derive(Default)]
pub struct Buffer {
    vec: Vec<u8>,
    len: usize,
}

fn class_of(capacity: usize) -> usize {
    (capacity.trailing_zeros() - CLASS_MIN_BITS) as usize
}

impl Buffer {
    /// A buffer of `len` bytes with unspecified (but initialised) content.
    pub fn take(len: usize) -> Buffer {
        let capacity = len.next_power_of_two().max(1 << CLASS_MIN_BITS);
        let class = class_of(capacity);
        let pooled = if class < CLASSES {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            let v = pool.free[class].pop();
            if v.is_some() {
                pool.pooled_bytes -= capacity;
            }
            v
        } else {
            None
        };
        Buffer {
            vec: pooled.unwrap_or_else(|| vec![0; capacity]),
            len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of memory the buffer holds (its power-of-two class, at least its length).
    pub fn capacity(&self) -> usize {
        self.vec.len()
    }
}

impl Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.vec[..self.len]
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.vec[..self.len]
    }
}

impl Pool {
    /// Takes `vec` if there is room for it, making room by evicting buffers of the class that
    /// holds the most bytes, unless that is `vec`'s own class. Evicted buffers go to `out`.
    fn put(&mut self, vec: Vec<u8>, out: &mut Vec<Vec<u8>>) {
        let capacity = vec.len();
        let class = class_of(capacity);
        if class >= CLASSES || capacity > POOLED_BYTES_MAX {
            return;
        }
        while self.pooled_bytes + capacity > POOLED_BYTES_MAX {
            let bytes = |c: usize| self.free[c].len() << (c as u32 + CLASS_MIN_BITS);
            let Some(fullest) = (0..CLASSES).max_by_key(|&c| bytes(c)) else {
                return;
            };
            if fullest == class || bytes(fullest) <= bytes(class) {
                return;
            }
            let Some(evicted) = self.free[fullest].pop() else {
                return;
            };
            self.pooled_bytes -= evicted.len();
            out.push(evicted);
        }
        self.pooled_bytes += capacity;
        self.free[class].push(vec);
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let vec = std::mem::take(&mut self.vec);
        if vec.is_empty() {
            return;
        }
        let mut evicted = Vec::new();
        POOL.lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(vec, &mut evicted);
        // Freed outside the pool's lock.
        drop(evicted);
    }
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buffer({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_have_the_asked_length_and_are_reused() {
        let mut a = Buffer::take(5000);
        assert_eq!(a.len(), 5000);
        a[4999] = 7;
        let ptr = a.vec.as_ptr();
        drop(a);
        let b = Buffer::take(8192);
        assert_eq!(b.len(), 8192);
        assert_eq!(
            b.vec.as_ptr(),
            ptr,
            "same class: the pooled buffer comes back"
        );
        assert_eq!(Buffer::take(0).len(), 0);
    }

    #[test]
    fn a_class_that_fills_the_pool_gives_way_to_another() {
        let mut pool = Pool {
            free: [const { Vec::new() }; CLASSES],
            pooled_bytes: 0,
        };
        let mut out = Vec::new();
        for _ in 0..POOLED_BYTES_MAX >> 18 {
            pool.put(vec![0; 1 << 18], &mut out);
        }
        assert_eq!(pool.pooled_bytes, POOLED_BYTES_MAX);
        assert!(out.is_empty());
        // Full of 256 KiB buffers: a 4 KiB one still gets in (a 256 KiB one leaves) ...
        pool.put(vec![0; 4096], &mut out);
        assert_eq!(pool.free[0].len(), 1);
        assert_eq!(out.len(), 1);
        assert!(pool.pooled_bytes <= POOLED_BYTES_MAX);
        // ... and so do many, until the two classes hold about as much.
        for _ in 0..POOLED_BYTES_MAX >> 12 {
            pool.put(vec![0; 4096], &mut out);
        }
        let bytes = |c: usize| pool.free[c].len() << (c as u32 + CLASS_MIN_BITS);
        assert!(pool.pooled_bytes <= POOLED_BYTES_MAX);
        assert!(bytes(0) >= POOLED_BYTES_MAX / 2 - (1 << 18), "{}", bytes(0));
        assert!(bytes(6) >= POOLED_BYTES_MAX / 2 - (1 << 18), "{}", bytes(6));
        // A class holding the most does not evict itself: the buffer is not pooled.
        let before = pool.pooled_bytes;
        pool.put(vec![0; 4096], &mut out);
        assert!(pool.pooled_bytes <= before.max(POOLED_BYTES_MAX));
    }

    #[test]
    fn the_pool_keeps_a_bounded_amount() {
        let many: Vec<Buffer> = (0..40).map(|_| Buffer::take(1 << 20)).collect();
        drop(many);
        assert!(POOL.lock().unwrap().pooled_bytes <= POOLED_BYTES_MAX);
    }
}
