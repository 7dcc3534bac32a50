//! The vsmp software DSM: it keeps every node's replica of guest physical memory coherent and
//! gives the guest exactly the x86-TSO memory model across nodes.
//!
//! - [`engine`]: the protocol of one node as a state machine with no I/O of its own (events
//!   in, [`engine::Output`]s out): pages owned by one writer, twins and diffs, batches published
//!   in one global order of tickets and applied in it everywhere, ownership moving in that order.
//! - [`net`]: carries an engine's outputs over a [`fabric`] endpoint (per-sender logs in
//!   registered memory, doorbells, the sequencer's `fetch_add`, control messages) and feeds it
//!   what arrives; the monitor and the simulation share it.
//! - [`diff`], [`batch`], [`twin_pool`]: the pieces.
//!
//! The argument that every guest execution is an x86-TSO execution, and what each rule is for,
//! is in `docs/coherence.md`; the deterministic simulation in `coherence/tests/` runs the whole
//! public litmus suite through real engines over the simulated fabric and judges every final
//! state with the reference model.
//!
//! It knows nothing of ptrace: the monitor drives it through [`engine::Replica`] (guest RAM)
//! and by carrying out the outputs (page protection, stopping the vCPU).
//!
//! Threads: an engine and its link are used by one thread (the node's monitor thread, or the
//! simulation's); the twin pool alone is shareable (lock-free).
#![forbid(unsafe_code)]

pub mod batch;
pub mod diff;
pub mod engine;
pub mod net;
mod page;
pub mod twin_pool;

pub use engine::{Config, Engine, Gate, MachineEnd, Msg, Output, ProtocolError, Replica};
pub use page::{Gpa, PAGE_BYTES, PageNo, pages_of};

/// Re-exported so that the monitor reaches the fabric only through coherence, keeping the
/// dependency order one-way.
pub use vsmp_fabric as fabric;
