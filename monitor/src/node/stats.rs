//! `--stats` and `--stats-json` of a node: the coherence engine's counters, page protection,
//! and the latency of write faults and fences (from the stop to the resume), median and p99.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use vsmp_coherence::engine::Counters;

use crate::vm::protect::{Mechanism, ProtectCounters};
use crate::vm::stats::{TrapKind, TrapStats};

/// What a stopped vCPU waited for, for the latency histograms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// A write fault (ownership, a twin).
    Fault,
    /// A fence (`mfence`, port I/O).
    Fence,
    /// A locked instruction (its pages, the step, the fence after it).
    Atomic,
    /// Any other trap.
    Trap,
    /// A kick (to apply batches, serve an order, flush).
    Kick,
}

/// A node's statistics.
#[derive(Debug)]
pub struct NodeStats {
    pub engine: Counters,
    pub protect: ProtectCounters,
    pub mechanism: Option<Mechanism>,
    pub traps: u64,
    pub kicks: u64,
    /// Traps by kind, with the time each kept the vCPU stopped.
    pub by_kind: TrapStats,
    fault_ns: Histogram<u64>,
    fence_ns: Histogram<u64>,
    atomic_ns: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 2).expect("constant bounds are valid")
}

impl Default for NodeStats {
    fn default() -> NodeStats {
        NodeStats::new()
    }
}

impl NodeStats {
    pub fn new() -> NodeStats {
        NodeStats {
            engine: Counters::default(),
            protect: ProtectCounters::default(),
            mechanism: None,
            traps: 0,
            kicks: 0,
            by_kind: TrapStats::new(),
            fault_ns: histogram(),
            fence_ns: histogram(),
            atomic_ns: histogram(),
        }
    }

    /// Records how long a stop took, and for a trap its kind (allocation-free).
    pub fn record(&mut self, waited: Waited, kind: Option<TrapKind>, took: Duration) {
        if let Some(kind) = kind {
            self.by_kind.record(kind, took);
        }
        let ns = (took.as_nanos() as u64).clamp(1, 60_000_000_000);
        let h = match waited {
            Waited::Fault => &mut self.fault_ns,
            Waited::Fence => &mut self.fence_ns,
            Waited::Atomic => &mut self.atomic_ns,
            Waited::Trap | Waited::Kick => return,
        };
        h.saturating_record(ns);
    }

    fn latency(h: &Histogram<u64>) -> (u64, f64, f64) {
        let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        (h.len(), us(0.5), us(0.99))
    }

    /// The human-readable table, one node.
    pub fn text(&self, node: u16) -> String {
        let e = &self.engine;
        let mut s = String::new();
        let mut table = Vec::new();
        let _ = self.by_kind.write_table(&mut table);
        let _ = writeln!(s, "node {node}:");
        s.push_str(&String::from_utf8_lossy(&table));
        if self.mechanism.is_none() {
            return s;
        }
        let _ = writeln!(
            s,
            "  write faults {}  twins {} (pool dry {})  diffs {} ({} bytes)",
            e.write_faults, e.twins, e.twin_pool_dry, e.diffs, e.diff_bytes
        );
        let _ = writeln!(
            s,
            "  batches published {} ({} bytes)  applied {}  flushes {}  fences {}",
            e.batches_published, e.batch_bytes, e.batches_applied, e.flushes, e.fences
        );
        let _ = writeln!(
            s,
            "  ownership requests {}  pages handed on {}  received {}  kicks {}  traps {}",
            e.ownership_requests, e.transfers_out, e.transfers_in, self.kicks, self.traps
        );
        if let Some(m) = self.mechanism {
            let _ = writeln!(
                s,
                "  protection ({m}): {} page changes in {} operations",
                self.protect.pages, self.protect.operations
            );
        }
        for (name, h) in [
            ("write fault", &self.fault_ns),
            ("fence", &self.fence_ns),
            ("locked instruction", &self.atomic_ns),
        ] {
            let (n, p50, p99) = Self::latency(h);
            if n > 0 {
                let _ = writeln!(
                    s,
                    "  {name:<19} {n:>9} x  median {p50:>9.1} us  p99 {p99:>9.1} us"
                );
            }
        }
        s
    }

    /// The same as one JSON object.
    pub fn json(&self, node: u16) -> String {
        let e = &self.engine;
        let lat = |h: &Histogram<u64>| {
            let (n, p50, p99) = Self::latency(h);
            format!("{{\"count\":{n},\"median_us\":{p50:.3},\"p99_us\":{p99:.3}}}")
        };
        format!(
            "{{\"node\":{node},\"write_faults\":{},\"twins\":{},\"twin_pool_dry\":{},\
             \"diffs\":{},\"diff_bytes\":{},\"batches_published\":{},\"batch_bytes\":{},\
             \"batches_applied\":{},\"flushes\":{},\"fences\":{},\"ownership_requests\":{},\
             \"transfers_out\":{},\"transfers_in\":{},\"kicks\":{},\"traps\":{},\
             \"protection\":{},\"protection_pages\":{},\"protection_operations\":{},\
             \"write_fault_latency\":{},\"fence_latency\":{},\"locked_latency\":{}}}",
            e.write_faults,
            e.twins,
            e.twin_pool_dry,
            e.diffs,
            e.diff_bytes,
            e.batches_published,
            e.batch_bytes,
            e.batches_applied,
            e.flushes,
            e.fences,
            e.ownership_requests,
            e.transfers_out,
            e.transfers_in,
            self.kicks,
            self.traps,
            self.mechanism
                .map_or("null".to_string(), |m| format!("\"{m}\"")),
            self.protect.pages,
            self.protect.operations,
            lat(&self.fault_ns),
            lat(&self.fence_ns),
            lat(&self.atomic_ns),
        )
    }
}
