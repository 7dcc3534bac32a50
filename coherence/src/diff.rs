//! Byte-granular diffs of a page against its twin.
//!
//! A diff is a sequence of runs, each `[offset: u16][len: u16][bytes]` (little-endian), of
//! exactly the bytes where the page differs from its twin: neighbouring bytes of one word may
//! belong to different writers over time, so nothing unchanged is claimed. The scan compares
//! 8-byte words and narrows to bytes only inside a changed word. A page so scattered that its
//! runs would outgrow the page itself is sent as one run of the whole page instead: that is
//! still exact at the receiver, whose copy of the unchanged bytes equals the twin (it has
//! applied every earlier batch of the page's single writer).
//!
//! `apply(diff(twin, page), twin) == page` is property-tested.
#![forbid(unsafe_code)]

use crate::PAGE_BYTES;

/// Bytes of a run's header.
pub const RUN_HEADER: usize = 4;

/// The most bytes a page's diff takes (one whole-page run).
pub const MAX_DIFF_BYTES: usize = RUN_HEADER + PAGE_BYTES;

/// A diff that is not well formed (from a peer: never trusted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DiffError {
    #[error("a diff run header is cut short at byte {at}")]
    Truncated { at: usize },
    #[error("a diff run of {len} bytes at offset {offset} leaves the page")]
    OutOfPage { offset: usize, len: usize },
    #[error("a diff run is empty")]
    EmptyRun,
}

/// Appends the runs where `page` differs from `twin` to `out`; how many runs (0: no change).
/// Both slices are exactly one page.
pub fn encode(twin: &[u8], page: &[u8], out: &mut Vec<u8>) -> usize {
    assert!(twin.len() == PAGE_BYTES && page.len() == PAGE_BYTES);
    let start = out.len();
    let mut runs = 0;
    let mut i = 0;
    while i < PAGE_BYTES {
        // Skip equal words fast.
        if i % 8 == 0 && twin[i..i + 8] == page[i..i + 8] {
            i += 8;
            continue;
        }
        if twin[i] == page[i] {
            i += 1;
            continue;
        }
        let begin = i;
        while i < PAGE_BYTES && twin[i] != page[i] {
            i += 1;
        }
        out.extend_from_slice(&(begin as u16).to_le_bytes());
        out.extend_from_slice(&((i - begin) as u16).to_le_bytes());
        out.extend_from_slice(&page[begin..i]);
        runs += 1;
        if out.len() - start > MAX_DIFF_BYTES {
            out.truncate(start);
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(&(PAGE_BYTES as u16).to_le_bytes());
            out.extend_from_slice(page);
            return 1;
        }
    }
    runs
}

/// The runs of an encoded diff, validated as they are read.
pub fn runs(diff: &[u8]) -> impl Iterator<Item = Result<(usize, &[u8]), DiffError>> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= diff.len() {
            return None;
        }
        let Some(h) = diff.get(at..at + RUN_HEADER) else {
            let start = at;
            at = diff.len();
            return Some(Err(DiffError::Truncated { at: start }));
        };
        let offset = usize::from(u16::from_le_bytes([h[0], h[1]]));
        let len = usize::from(u16::from_le_bytes([h[2], h[3]]));
        if len == 0 {
            at = diff.len();
            return Some(Err(DiffError::EmptyRun));
        }
        if offset + len > PAGE_BYTES {
            at = diff.len();
            return Some(Err(DiffError::OutOfPage { offset, len }));
        }
        let body = at + RUN_HEADER;
        let Some(bytes) = diff.get(body..body + len) else {
            at = diff.len();
            return Some(Err(DiffError::Truncated { at: body }));
        };
        at = body + len;
        Some(Ok((offset, bytes)))
    })
}

/// Checks a whole diff without applying it.
pub fn validate(diff: &[u8]) -> Result<usize, DiffError> {
    let mut n = 0;
    for r in runs(diff) {
        r?;
        n += 1;
    }
    Ok(n)
}

/// Applies a diff to one page's bytes (call `validate` first: a bad diff applies partly).
pub fn apply(diff: &[u8], page: &mut [u8]) -> Result<(), DiffError> {
    assert!(page.len() == PAGE_BYTES);
    for r in runs(diff) {
        let (offset, bytes) = r?;
        page[offset..offset + bytes.len()].copy_from_slice(bytes);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_BYTES]
    }

    #[test]
    fn an_unchanged_page_has_an_empty_diff() {
        let mut out = Vec::new();
        assert_eq!(encode(&page(7), &page(7), &mut out), 0);
        assert!(out.is_empty());
    }

    #[test]
    fn a_diff_claims_only_the_bytes_that_changed_even_inside_one_word() {
        let twin = page(0);
        let mut p = page(0);
        p[9] = 1;
        p[11] = 2;
        let mut out = Vec::new();
        assert_eq!(encode(&twin, &p, &mut out), 2);
        let got: Vec<_> = runs(&out).map(|r| r.unwrap()).collect();
        assert_eq!(got, vec![(9, &[1u8][..]), (11, &[2u8][..])]);
    }

    #[test]
    fn a_scattered_page_is_sent_whole() {
        let twin = page(0);
        let p: Vec<u8> = (0..PAGE_BYTES).map(|i| (i % 2) as u8).collect();
        let mut out = Vec::new();
        assert_eq!(encode(&twin, &p, &mut out), 1);
        assert_eq!(out.len(), MAX_DIFF_BYTES);
        let mut t = twin.clone();
        apply(&out, &mut t).unwrap();
        assert_eq!(t, p);
    }

    #[test]
    fn malformed_diffs_are_errors_not_panics() {
        assert_eq!(validate(&[1, 0]), Err(DiffError::Truncated { at: 0 }));
        assert!(matches!(
            validate(&[0xff, 0x0f, 2, 0, 1, 2]),
            Err(DiffError::OutOfPage { .. })
        ));
        assert_eq!(validate(&[0, 0, 0, 0]), Err(DiffError::EmptyRun));
        assert!(matches!(
            validate(&[0, 0, 4, 0, 1]),
            Err(DiffError::Truncated { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn applying_a_diff_to_the_twin_gives_the_page(
            seed in any::<u64>(),
            changes in proptest::collection::vec((0usize..PAGE_BYTES, any::<u8>()), 0..300),
        ) {
            let twin: Vec<u8> = (0..PAGE_BYTES).map(|i| (seed >> (i % 64)) as u8 ^ i as u8).collect();
            let mut p = twin.clone();
            for (at, v) in changes {
                p[at] = v;
            }
            let mut out = Vec::new();
            encode(&twin, &p, &mut out);
            prop_assert!(out.len() <= MAX_DIFF_BYTES);
            validate(&out).unwrap();
            let mut t = twin.clone();
            apply(&out, &mut t).unwrap();
            prop_assert_eq!(t, p);
        }

        #[test]
        fn random_bytes_never_panic_the_diff_reader(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = validate(&bytes);
        }
    }
}
