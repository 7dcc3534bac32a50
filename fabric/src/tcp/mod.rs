//! The tcp backend: one authenticated TCP connection per pair of nodes.

#![forbid(unsafe_code)]

/// The frame format, public so that fuzzers and tools can drive the decoder.
pub mod frame {
    pub use crate::wire::*;
}
