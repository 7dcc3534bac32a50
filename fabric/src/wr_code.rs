//! The work-request ids every backend hands out.
#![forbid(unsafe_code)]

use crate::{NodeId, WrId};

/// How a `WrId` is built: a per-endpoint counter (starting at 1) in the high 48 bits, the
/// target's rank in the low 16. The counter dominates, so ids increase in posting order; the
/// peer is recoverable without a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WrCode {
    pub counter: u64,
    pub peer: NodeId,
}

impl WrCode {
    pub fn encode(counter: u64, peer: NodeId) -> WrId {
        WrId(counter << 16 | u64::from(peer.0))
    }

    pub fn decode(wr: WrId) -> WrCode {
        WrCode {
            counter: wr.0 >> 16,
            peer: NodeId(wr.0 as u16),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wr_codes_round_trip_and_increase_with_the_counter() {
        let a = WrCode::encode(5, NodeId(65535));
        let b = WrCode::encode(6, NodeId(0));
        assert!(a < b);
        assert_eq!(
            WrCode::decode(a),
            WrCode {
                counter: 5,
                peer: NodeId(65535)
            }
        );
    }
}
