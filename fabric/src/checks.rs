//! The contract's argument checks (`docs/fabric.md`, section 3): every backend checks a post's
//! arguments the same way before anything is sent, so a bad post has no effect anywhere.
#![forbid(unsafe_code)]

use crate::{
    FabricError, MAX_INLINE_BYTES, MAX_MESSAGE_BYTES, NodeId, RegionSpec, RemoteAddr, Source,
};

/// The contract's check that `peer` is in a group of `nodes`.
#[inline]
pub(crate) fn check_peer(peer: NodeId, nodes: usize) -> Result<(), FabricError> {
    if peer.index() >= nodes {
        return Err(FabricError::UnknownPeer { peer, nodes });
    }
    Ok(())
}

/// The index of region `dst.region` in `regions`, or `UnknownRegion`.
#[inline]
pub(crate) fn region_index(regions: &[RegionSpec], dst: RemoteAddr) -> Result<usize, FabricError> {
    regions
        .iter()
        .position(|r| r.id == dst.region)
        .ok_or(FabricError::UnknownRegion { region: dst.region })
}

/// The contract's check that `len` bytes at `dst` lie inside a registered region; returns the
/// region's index in `regions`.
#[inline]
pub(crate) fn check_range(
    regions: &[RegionSpec],
    dst: RemoteAddr,
    len: u64,
) -> Result<usize, FabricError> {
    let index = region_index(regions, dst)?;
    let spec = &regions[index];
    match dst.offset.checked_add(len) {
        Some(end) if end <= spec.len as u64 => Ok(index),
        _ => Err(FabricError::OutOfBounds {
            region: dst.region,
            offset: dst.offset,
            len,
            region_len: spec.len as u64,
        }),
    }
}

/// The contract's check of a `fetch_add` target: an aligned word inside a region.
#[inline]
pub(crate) fn check_word(regions: &[RegionSpec], dst: RemoteAddr) -> Result<usize, FabricError> {
    if dst.offset % 8 != 0 {
        return Err(FabricError::Misaligned { offset: dst.offset });
    }
    check_range(regions, dst, 8)
}

/// The contract's bound on a control message.
#[inline]
pub(crate) fn check_message(len: usize) -> Result<(), FabricError> {
    if len > MAX_MESSAGE_BYTES {
        return Err(FabricError::MessageTooLarge {
            len,
            max: MAX_MESSAGE_BYTES,
        });
    }
    Ok(())
}

/// A write's checked arguments.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CheckedWrite {
    /// Index of the target region in the layout.
    pub dst_index: usize,
    /// Index of the source region in the layout, for a write from a region.
    pub src_index: Option<usize>,
    pub len: u64,
}

/// The contract's checks of a write: the target range inside its region, the source inside
/// this node's own region or within the inline bound, and (for backends that check at the
/// source) nothing else. A bare doorbell (no bytes) needs only an existing target region.
#[inline]
pub(crate) fn check_write(
    regions: &[RegionSpec],
    dst: RemoteAddr,
    src: &Source<'_>,
) -> Result<CheckedWrite, FabricError> {
    let len = src.len();
    let src_index = match src {
        Source::Region(s) => {
            let at = RemoteAddr::new(s.region, s.offset);
            Some(check_range(regions, at, s.len)?)
        }
        Source::Inline(b) if b.len() > MAX_INLINE_BYTES => {
            return Err(FabricError::InlineTooLarge {
                len: b.len(),
                max: MAX_INLINE_BYTES,
            });
        }
        Source::Inline(_) | Source::Empty => None,
    };
    let dst_index = check_range(regions, dst, len)?;
    Ok(CheckedWrite {
        dst_index,
        src_index,
        len,
    })
}

/// The contract's grant rule, for backends that enforce it at the source (grants are
/// symmetric and known to all): `AccessDenied` when `me` may not write `len` bytes at `dst`
/// in `peer`'s region. A bare doorbell writes nothing and is never denied.
#[inline]
pub(crate) fn check_grant(
    spec: &RegionSpec,
    me: NodeId,
    peer: NodeId,
    dst: RemoteAddr,
    len: u64,
    bare_doorbell: bool,
) -> Result<(), FabricError> {
    if bare_doorbell || spec.permits(me, dst.offset, len) {
        return Ok(());
    }
    denied(me, peer, dst, len)
}

#[cold]
fn denied(me: NodeId, peer: NodeId, dst: RemoteAddr, len: u64) -> Result<(), FabricError> {
    tracing::warn!(
        "refused a write from {me} to {peer}'s {} at offset {} ({len} bytes): outside its grants",
        dst.region,
        dst.offset
    );
    Err(FabricError::AccessDenied {
        peer,
        region: dst.region,
        offset: dst.offset,
        len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LocalSlice, RegionId};

    fn layout() -> Vec<RegionSpec> {
        vec![
            RegionSpec::open(RegionId(1), 4096),
            RegionSpec::private(RegionId(2), 64),
        ]
    }

    #[test]
    fn a_write_from_a_region_checks_both_ends() {
        let r = layout();
        let dst = RemoteAddr::new(RegionId(1), 4000);
        let ok = check_write(
            &r,
            dst,
            &Source::Region(LocalSlice::new(RegionId(2), 0, 64)),
        )
        .unwrap();
        assert_eq!((ok.dst_index, ok.src_index, ok.len), (0, Some(1), 64));
        let past_source = Source::Region(LocalSlice::new(RegionId(2), 32, 64));
        assert!(matches!(
            check_write(&r, RemoteAddr::new(RegionId(1), 0), &past_source),
            Err(FabricError::OutOfBounds {
                region: RegionId(2),
                ..
            })
        ));
        let past_target = Source::Region(LocalSlice::new(RegionId(2), 0, 64));
        assert!(matches!(
            check_write(&r, RemoteAddr::new(RegionId(1), 4090), &past_target),
            Err(FabricError::OutOfBounds {
                region: RegionId(1),
                ..
            })
        ));
    }

    #[test]
    fn inline_writes_are_bounded_and_doorbells_need_only_a_region() {
        let r = layout();
        let big = vec![0u8; MAX_INLINE_BYTES + 1];
        assert!(matches!(
            check_write(&r, RemoteAddr::new(RegionId(1), 0), &Source::Inline(&big)),
            Err(FabricError::InlineTooLarge { .. })
        ));
        check_write(&r, RemoteAddr::new(RegionId(1), 4096), &Source::Empty).unwrap();
        assert!(matches!(
            check_write(&r, RemoteAddr::new(RegionId(9), 0), &Source::Empty),
            Err(FabricError::UnknownRegion { .. })
        ));
    }

    #[test]
    fn grants_checked_at_the_source_refuse_outside_writes_but_not_bare_doorbells() {
        let r = layout();
        let dst = RemoteAddr::new(RegionId(2), 0);
        assert!(matches!(
            check_grant(&r[1], NodeId(0), NodeId(1), dst, 8, false),
            Err(FabricError::AccessDenied {
                peer: NodeId(1),
                ..
            })
        ));
        check_grant(&r[1], NodeId(0), NodeId(1), dst, 0, true).unwrap();
    }

    #[test]
    fn fetch_add_targets_must_be_aligned_words() {
        let r = layout();
        assert!(matches!(
            check_word(&r, RemoteAddr::new(RegionId(1), 4)),
            Err(FabricError::Misaligned { offset: 4 })
        ));
        assert!(check_word(&r, RemoteAddr::new(RegionId(1), 4096)).is_err());
        assert_eq!(
            check_word(&r, RemoteAddr::new(RegionId(1), 4088)).unwrap(),
            0
        );
    }
}
