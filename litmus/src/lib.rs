//! The x86-TSO conformance kit: litmus tests, an exhaustive reference model of x86-TSO, a code
//! generator for native and vsmp guest runs, and a runner that judges observed final states.
//!
//! The model is deliberately independent of everything it judges: it shares no code with the
//! monitor, the DSM or the fabric.
#![forbid(unsafe_code)]

pub mod cgen;
pub mod cond;
pub mod error;
pub mod herd;
pub mod instr;
pub mod model;
pub mod native;
pub mod parse;
pub mod reg;
pub mod suite;
pub mod test;

pub use error::{ModelError, ParseError, RunError, SuiteError};
pub use parse::{parse_file, parse_str};
pub use test::LitmusTest;
