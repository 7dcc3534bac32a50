//! The vsmp software DSM: it keeps every node's replica of guest physical memory coherent and
//! gives the guest the x86-TSO memory model across nodes.
//!
//! What it will hold (DESIGN-BRIEF.md, section 5), built on the `fabric` contract and driven by
//! the monitor at write faults and serialising instructions:
//! - page states and write detection: pages start read-only, a first write takes a *twin*
//!   from a preallocated lock-free pool and opens the page;
//! - byte-granular diffs of a page against its twin, encoded and applied;
//! - a node's unpublished writes as its store buffer; publication of a batch of diffs as one
//!   event in a single global order (a sequencer built on the fabric's `fetch_add`); every
//!   node applying batches in that order, never over bytes it wrote and has not published;
//! - `mfence` and locked instructions as drains; locked read-modify-writes sequenced in the
//!   same global order; a bounded periodic flush so plain-`mov` releases become visible;
//! - the argument that all of this is exactly x86-TSO, judged by the litmus kit.
//!
//! It knows nothing of ptrace: the monitor drives it through narrow traits, so it runs
//! unchanged over a deterministic simulated fabric in tests. The DSM is not built yet; this
//! crate holds its place in the dependency order `monitor -> coherence -> fabric`.
#![forbid(unsafe_code)]

/// Re-exported so that the monitor reaches the fabric only through coherence, keeping the
/// dependency order one-way.
pub use vsmp_fabric as fabric;
