//! The x86-TSO conformance kit: litmus tests, an exhaustive reference model of x86-TSO, a code
//! generator for native and vsmp guest runs, and a runner that judges observed final states.
//!
//! The model is deliberately independent of everything it judges: it shares no code with the
//! monitor, the DSM or the fabric.
//!
//! Quick start:
//! ```no_run
//! use vsmp_litmus::model::{MemoryModel, Scope, explore};
//! let test = vsmp_litmus::parse_file("SB.litmus".as_ref())?;
//! let allowed = explore(&test, MemoryModel::Tso, Scope::Condition)?;
//! print!("{}", vsmp_litmus::herd::report(&test, &allowed)); // herd7's format
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Modules: [`parse`] (with [`instr`], [`cond`], [`reg`], [`mod@test`]) reads both x86 dialects;
//! [`model`] explores x86-TSO (or SC) exhaustively; [`herd`] prints herd7's report and
//! verdicts; [`cgen`] turns a test into a native or vsmp-guest C program; [`native`] compiles,
//! runs and judges; [`suite`] finds `shared/litmus` and reads `INDEX.tsv`. See
//! `docs/litmus.md`.
//!
//! Threads: everything here is single-threaded except the caller's choice to build several
//! programs at once; the explorer holds no global state.
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
