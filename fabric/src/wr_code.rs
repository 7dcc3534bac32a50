//! The work-request ids this crate's backends hand out.
#![forbid(unsafe_code)]

use crate::{NodeId, WrId};

/// How this crate's backends build a `WrId`: a per-endpoint counter (starting at 1) in the
/// high 47 bits, whether it is a `fetch_add` in bit 16, the target's rank in the low 16 bits.
/// The counter dominates, so ids increase; the peer is recoverable without a table, so a
/// completed write needs no bookkeeping at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WrCode {
    pub counter: u64,
    pub fetch: bool,
    pub peer: NodeId,
}

impl WrCode {
    pub fn encode(counter: u64, fetch: bool, peer: NodeId) -> WrId {
        WrId(counter << 17 | u64::from(fetch) << 16 | u64::from(peer.0))
    }

    pub fn decode(wr: WrId) -> WrCode {
        WrCode {
            counter: wr.0 >> 17,
            fetch: wr.0 >> 16 & 1 == 1,
            peer: NodeId(wr.0 as u16),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wr_codes_round_trip_and_increase_with_the_counter() {
        let a = WrCode::encode(5, true, NodeId(65535));
        let b = WrCode::encode(6, false, NodeId(0));
        assert!(a < b);
        assert_eq!(
            WrCode::decode(a),
            WrCode {
                counter: 5,
                fetch: true,
                peer: NodeId(65535)
            }
        );
    }
}
