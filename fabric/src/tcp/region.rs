//! A registered region of the tcp backend: plain memory owned by the endpoint.
//!
//! The bytes live in 64-bit atomic words, so the driver (applying peers' writes and
//! serving `fetch_add`) and the owner's local reads and writes never race in the Rust memory
//! model, with no `unsafe`: a copy is a loop of word loads/stores (plain moves on x86-64), and
//! a partial word at either end of a copy is merged with a compare-and-swap so that it cannot
//! lose a concurrent `fetch_add` or a neighbour's bytes. Stores are `Release` and loads
//! `Acquire`, so `load_u64` pairs with the store that ends a remote write, as the contract asks.
//! Bytes are little-endian inside each word.

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use crate::{FabricError, LocalRegion, RegionId, RegionSpec};

/// One region's memory.
#[derive(Debug)]
pub struct Region {
    spec: RegionSpec,
    words: Box<[AtomicU64]>,
}

impl Region {
    /// A zero-filled region of the spec's length.
    pub fn new(spec: RegionSpec) -> Region {
        let words = (0..spec.len.div_ceil(8))
            .map(|_| AtomicU64::new(0))
            .collect();
        Region { spec, words }
    }

    pub fn spec(&self) -> &RegionSpec {
        &self.spec
    }

    pub fn id(&self) -> RegionId {
        self.spec.id
    }

    /// Checks that `len` bytes at `offset` lie inside the region.
    pub fn check(&self, offset: u64, len: usize) -> Result<(), FabricError> {
        let inside = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= self.spec.len as u64);
        if inside {
            Ok(())
        } else {
            Err(FabricError::OutOfBounds {
                region: self.spec.id,
                offset,
                len: len as u64,
                region_len: self.spec.len,
            })
        }
    }

    /// Copies `data` in at `offset`: partial words at either end merged, whole words stored
    /// in one tight loop (a plain move each on x86-64).
    pub fn store(&self, offset: u64, data: &[u8]) -> Result<(), FabricError> {
        self.check(offset, data.len())?;
        let at = offset as usize;
        let shift = at % 8;
        let mut word = at / 8;
        let mut rest = data;
        if shift != 0 {
            let take = (8 - shift).min(rest.len());
            let (head, tail) = rest.split_at(take);
            self.merge(word, shift, head);
            word += 1;
            rest = tail;
        }
        let whole = rest.len() / 8;
        let (body, tail) = rest.split_at(whole * 8);
        for (w, bytes) in self.words[word..word + whole]
            .iter()
            .zip(body.chunks_exact(8))
        {
            let mut b = [0u8; 8];
            b.copy_from_slice(bytes);
            w.store(u64::from_le_bytes(b), Ordering::Release);
        }
        if !tail.is_empty() {
            self.merge(word + whole, 0, tail);
        }
        Ok(())
    }

    /// Replaces `bytes.len()` bytes of word `word` starting at byte `shift`, keeping the others.
    fn merge(&self, word: usize, shift: usize, bytes: &[u8]) {
        let w = &self.words[word];
        let mut old = w.load(Ordering::Acquire);
        loop {
            let mut b = old.to_le_bytes();
            b[shift..shift + bytes.len()].copy_from_slice(bytes);
            let new = u64::from_le_bytes(b);
            match w.compare_exchange_weak(old, new, Ordering::Release, Ordering::Acquire) {
                Ok(_) => return,
                Err(actual) => old = actual,
            }
        }
    }

    /// Copies bytes out at `offset`, word by word.
    pub fn load(&self, offset: u64, buf: &mut [u8]) -> Result<(), FabricError> {
        self.check(offset, buf.len())?;
        let at = offset as usize;
        let shift = at % 8;
        let mut word = at / 8;
        let mut rest = buf;
        if shift != 0 {
            let take = (8 - shift).min(rest.len());
            let (head, tail) = rest.split_at_mut(take);
            let bytes = self.words[word].load(Ordering::Acquire).to_le_bytes();
            head.copy_from_slice(&bytes[shift..shift + take]);
            word += 1;
            rest = tail;
        }
        let whole = rest.len() / 8;
        let (body, tail) = rest.split_at_mut(whole * 8);
        for (w, bytes) in self.words[word..word + whole]
            .iter()
            .zip(body.chunks_exact_mut(8))
        {
            bytes.copy_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        if !tail.is_empty() {
            let bytes = self.words[word + whole]
                .load(Ordering::Acquire)
                .to_le_bytes();
            tail.copy_from_slice(&bytes[..tail.len()]);
        }
        Ok(())
    }

    /// Atomically adds `add` (wrapping) to the aligned word at `offset`; the old value.
    pub fn fetch_add(&self, offset: u64, add: u64) -> Result<u64, FabricError> {
        self.word(offset)
            .map(|w| w.fetch_add(add, Ordering::AcqRel))
    }

    fn word(&self, offset: u64) -> Result<&AtomicU64, FabricError> {
        if offset % 8 != 0 {
            return Err(FabricError::Misaligned { offset });
        }
        self.check(offset, 8)?;
        Ok(&self.words[(offset / 8) as usize])
    }
}

impl LocalRegion for Region {
    fn len(&self) -> usize {
        self.spec.len
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), FabricError> {
        self.load(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), FabricError> {
        self.store(offset, data)
    }

    fn load_u64(&self, offset: u64) -> Result<u64, FabricError> {
        self.word(offset).map(|w| w.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(len: usize) -> Region {
        Region::new(RegionSpec::open(RegionId(1), len))
    }

    #[test]
    fn unaligned_stores_keep_the_neighbouring_bytes() {
        let r = region(21);
        r.store(0, &[0xff; 21]).unwrap();
        r.store(3, b"hello world").unwrap();
        let mut out = [0u8; 21];
        r.load(0, &mut out).unwrap();
        let mut want = [0xffu8; 21];
        want[3..14].copy_from_slice(b"hello world");
        assert_eq!(out, want);
    }

    #[test]
    fn stores_and_loads_at_every_alignment_and_length_agree_with_a_plain_buffer() {
        let r = region(64);
        let mut model = [0u8; 64];
        let mut n = 0u8;
        for offset in 0..20usize {
            for len in 0..30usize {
                let data: Vec<u8> = (0..len)
                    .map(|_| {
                        n = n.wrapping_add(37);
                        n
                    })
                    .collect();
                r.store(offset as u64, &data).unwrap();
                model[offset..offset + len].copy_from_slice(&data);
                let mut all = [0u8; 64];
                r.load(0, &mut all).unwrap();
                assert_eq!(all, model, "after storing {len} bytes at {offset}");
                let mut part = vec![0u8; len];
                r.load(offset as u64, &mut part).unwrap();
                assert_eq!(part, data);
            }
        }
    }

    #[test]
    fn a_store_past_the_end_is_refused_and_changes_nothing() {
        let r = region(16);
        assert!(matches!(
            r.store(10, &[1; 7]),
            Err(FabricError::OutOfBounds { .. })
        ));
        assert!(r.store(u64::MAX, &[1]).is_err());
        assert_eq!(r.load_u64(8).unwrap(), 0);
    }

    #[test]
    fn fetch_add_returns_the_old_value_and_wraps() {
        let r = region(16);
        r.store(8, &u64::MAX.to_le_bytes()).unwrap();
        assert_eq!(r.fetch_add(8, 2).unwrap(), u64::MAX);
        assert_eq!(r.load_u64(8).unwrap(), 1);
        assert!(matches!(
            r.fetch_add(4, 1),
            Err(FabricError::Misaligned { offset: 4 })
        ));
    }

    #[test]
    fn partial_word_stores_do_not_lose_concurrent_fetch_adds() {
        let r = std::sync::Arc::new(region(8));
        let adder = {
            let r = r.clone();
            std::thread::spawn(move || {
                for _ in 0..10_000 {
                    r.fetch_add(0, 1 << 32).unwrap();
                }
            })
        };
        for i in 0..10_000u32 {
            r.store(0, &[i as u8]).unwrap();
        }
        adder.join().unwrap();
        assert_eq!(r.load_u64(0).unwrap() >> 32, 10_000);
    }
}
