//! The twin pool: page-sized buffers allocated once at start-up, handed out and taken back
//! through a lock-free bounded queue, so a write fault never allocates.
//!
//! Bounded on purpose: the pool's size bounds a node's dirty pages, and so the largest batch it
//! can publish (which the per-sender logs are sized to hold, see `net.rs`). When it runs dry the
//! engine publishes what is dirty (a flush), which returns every twin, and retries the fault.
#![forbid(unsafe_code)]

use crossbeam_queue::ArrayQueue;

use crate::PAGE_BYTES;

/// One twin: a page's contents as they were before its first write since the last publish.
pub type Twin = Box<[u8; PAGE_BYTES]>;

/// A bounded, lock-free pool of twins.
#[derive(Debug)]
pub struct TwinPool {
    free: ArrayQueue<Twin>,
    capacity: usize,
}

impl TwinPool {
    /// A pool of `capacity` twins (allocated now).
    pub fn new(capacity: usize) -> TwinPool {
        let free = ArrayQueue::new(capacity.max(1));
        for _ in 0..capacity.max(1) {
            let twin: Twin = Box::new([0u8; PAGE_BYTES]);
            let _ = free.push(twin);
        }
        TwinPool {
            free,
            capacity: capacity.max(1),
        }
    }

    /// A twin, or `None` when every one is in use.
    pub fn take(&self) -> Option<Twin> {
        self.free.pop()
    }

    /// Returns a twin.
    pub fn give(&self, twin: Twin) {
        // The pool never holds more than it made: a full queue means a twin came back twice,
        // which the engine's page states rule out.
        assert!(self.free.push(twin).is_ok(), "a twin was returned twice");
    }

    /// Twins in use.
    pub fn in_use(&self) -> usize {
        self.capacity - self.free.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_hands_out_its_twins_then_runs_dry_then_refills() {
        let pool = TwinPool::new(3);
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        let c = pool.take().unwrap();
        assert!(pool.take().is_none());
        assert_eq!(pool.in_use(), 3);
        pool.give(a);
        assert_eq!(pool.in_use(), 2);
        assert!(pool.take().is_some());
        pool.give(b);
        pool.give(c);
    }

    #[test]
    fn threads_share_a_pool_without_losing_twins() {
        let pool = TwinPool::new(16);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        if let Some(t) = pool.take() {
                            pool.give(t);
                        }
                    }
                });
            }
        });
        assert_eq!(pool.in_use(), 0);
    }
}
