//! The contract's argument checks (`docs/fabric.md`, section 3): every backend checks a post's
//! arguments the same way before anything is sent, so a bad post has no effect anywhere.
#![forbid(unsafe_code)]

use crate::{FabricError, MAX_MESSAGE_BYTES, NodeId, RegionId, RegionSpec, RemoteAddr};

/// The contract's check that `peer` is in a group of `nodes`.
pub(crate) fn check_peer(peer: NodeId, nodes: usize) -> Result<(), FabricError> {
    if usize::from(peer.0) >= nodes {
        return Err(FabricError::UnknownPeer { peer, nodes });
    }
    Ok(())
}

/// The contract's check that `len` bytes at `dst` lie inside a registered region; returns the
/// region's index in `regions`.
pub(crate) fn check_range(
    regions: &[RegionSpec],
    dst: RemoteAddr,
    len: u64,
) -> Result<usize, FabricError> {
    let (index, spec) = regions
        .iter()
        .enumerate()
        .find(|(_, r)| r.id == dst.region)
        .ok_or(FabricError::UnknownRegion { region: dst.region })?;
    match dst.offset.checked_add(len) {
        Some(end) if end <= spec.len as u64 => Ok(index),
        _ => Err(FabricError::OutOfBounds {
            region: dst.region,
            offset: dst.offset,
            len,
            region_len: spec.len,
        }),
    }
}

/// The contract's check of a `fetch_add` target: an aligned word inside a region.
pub(crate) fn check_word(regions: &[RegionSpec], dst: RemoteAddr) -> Result<usize, FabricError> {
    if dst.offset % 8 != 0 {
        return Err(FabricError::Misaligned { offset: dst.offset });
    }
    check_range(regions, dst, 8)
}

/// The contract's bound on a control message.
pub(crate) fn check_message(len: usize) -> Result<(), FabricError> {
    if len > MAX_MESSAGE_BYTES {
        return Err(FabricError::MessageTooLarge {
            len,
            max: MAX_MESSAGE_BYTES,
        });
    }
    Ok(())
}

/// The byte range `len` bytes at `offset` occupy in a local region of `region_len` bytes.
pub(crate) fn local_range(
    region: RegionId,
    offset: u64,
    len: usize,
    region_len: usize,
) -> Result<std::ops::Range<usize>, FabricError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= region_len as u64 => Ok(offset as usize..end as usize),
        _ => Err(FabricError::OutOfBounds {
            region,
            offset,
            len: len as u64,
            region_len,
        }),
    }
}
