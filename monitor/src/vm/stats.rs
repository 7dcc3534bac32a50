//! `--stats`: traps by kind, with the time the monitor spent on each (from observing the stop
//! to the resume call), plus the stop-to-stop interval the trap benchmark reports.
//!
//! Everything is allocated up front: recording a trap on the trap path is a linear scan of at
//! most [`MAX_KINDS`] slots and a histogram increment.

use std::fmt;
use std::io::{self, Write};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use iced_x86::Mnemonic;

/// Distinct trap kinds tracked separately; further kinds are counted together as "other".
/// 48 is well beyond the sensitive-instruction families a guest uses in one run.
pub const MAX_KINDS: usize = 48;

/// Longest time recorded per trap, in nanoseconds (10 s); longer ones are clamped to it.
const MAX_RECORDED_NS: u64 = 10_000_000_000;

/// Significant decimal digits of the per-kind histograms (1%: ~28 KiB each) and of the
/// stop-to-stop histogram (0.1%) the benchmark reports.
const KIND_DIGITS: u8 = 2;
const ROUND_TRIP_DIGITS: u8 = 3;

/// How the guest reached the monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrapKind {
    /// A marker before this instruction.
    Marker(Mnemonic),
    /// This privileged instruction faulted natively (#GP).
    Fault(Mnemonic),
    /// A guest system call (refused).
    Syscall,
    /// Kinds beyond [`MAX_KINDS`].
    Other,
}

impl fmt::Display for TrapKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrapKind::Marker(m) => write!(f, "{}", format!("{m:?}").to_lowercase()),
            TrapKind::Fault(m) => write!(f, "{} (fault)", format!("{m:?}").to_lowercase()),
            TrapKind::Syscall => f.write_str("syscall"),
            TrapKind::Other => f.write_str("other"),
        }
    }
}

#[derive(Debug)]
struct Slot {
    kind: TrapKind,
    in_monitor_ns: Histogram<u64>,
}

/// The statistics of one run.
#[derive(Debug)]
pub struct TrapStats {
    slots: Vec<Slot>,
    spare: Vec<Histogram<u64>>,
    other: Histogram<u64>,
    stop_to_stop_ns: Histogram<u64>,
    last_stop: Option<Instant>,
}

fn histogram(digits: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_RECORDED_NS, digits)
        .expect("constant histogram bounds are valid")
}

impl Default for TrapStats {
    fn default() -> TrapStats {
        TrapStats::new()
    }
}

impl TrapStats {
    /// Allocates every histogram now.
    pub fn new() -> TrapStats {
        TrapStats {
            slots: Vec::with_capacity(MAX_KINDS),
            spare: (0..MAX_KINDS).map(|_| histogram(KIND_DIGITS)).collect(),
            other: histogram(KIND_DIGITS),
            stop_to_stop_ns: histogram(ROUND_TRIP_DIGITS),
            last_stop: None,
        }
    }

    /// Notes that a stop was observed at `at` (for the stop-to-stop interval).
    pub fn stop_observed(&mut self, at: Instant) {
        if let Some(prev) = self.last_stop.replace(at) {
            self.stop_to_stop_ns
                .saturating_record(nanos(at.saturating_duration_since(prev)));
        }
    }

    /// Records one trap of `kind` that kept the monitor busy for `in_monitor`. Allocation-free.
    pub fn record(&mut self, kind: TrapKind, in_monitor: Duration) {
        let ns = nanos(in_monitor);
        if let Some(slot) = self.slots.iter_mut().find(|s| s.kind == kind) {
            slot.in_monitor_ns.saturating_record(ns);
            return;
        }
        match self.spare.pop() {
            Some(mut h) => {
                h.saturating_record(ns);
                // Capacity reserved in `new`: this push never reallocates.
                self.slots.push(Slot {
                    kind,
                    in_monitor_ns: h,
                });
            }
            None => self.other.saturating_record(ns),
        }
    }

    /// The stop-to-stop intervals (ns): one guest round trip through the monitor each.
    pub fn stop_to_stop_ns(&self) -> &Histogram<u64> {
        &self.stop_to_stop_ns
    }

    /// The time-in-monitor histogram of `kind`, if any trap of that kind was recorded.
    pub fn in_monitor_ns(&self, kind: TrapKind) -> Option<&Histogram<u64>> {
        match kind {
            TrapKind::Other => (!self.other.is_empty()).then_some(&self.other),
            _ => self
                .slots
                .iter()
                .find(|s| s.kind == kind)
                .map(|s| &s.in_monitor_ns),
        }
    }

    /// Total traps recorded.
    pub fn total(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| s.in_monitor_ns.len())
            .sum::<u64>()
            + self.other.len()
    }

    /// Writes the table: one row per kind, most frequent first.
    pub fn write_table(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(
            out,
            "vsmp: traps by kind (time in the monitor per trap, from the stop to the resume)"
        )?;
        writeln!(
            out,
            "{:<22} {:>10} {:>10} {:>10} {:>10}",
            "kind", "count", "mean_us", "median_us", "p99_us"
        )?;
        let mut rows: Vec<(TrapKind, &Histogram<u64>)> = self
            .slots
            .iter()
            .map(|s| (s.kind, &s.in_monitor_ns))
            .collect();
        if !self.other.is_empty() {
            rows.push((TrapKind::Other, &self.other));
        }
        rows.sort_by_key(|(_, h)| std::cmp::Reverse(h.len()));
        for (kind, h) in rows {
            writeln!(
                out,
                "{:<22} {:>10} {:>10.2} {:>10.2} {:>10.2}",
                kind.to_string(),
                h.len(),
                h.mean() / 1e3,
                h.value_at_quantile(0.5) as f64 / 1e3,
                h.value_at_quantile(0.99) as f64 / 1e3
            )?;
        }
        writeln!(out, "{:<22} {:>10}", "total", self.total())
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_each_kind_with_its_count() {
        let mut s = TrapStats::new();
        for _ in 0..3 {
            s.record(TrapKind::Marker(Mnemonic::Cpuid), Duration::from_micros(2));
        }
        s.record(TrapKind::Fault(Mnemonic::Cli), Duration::from_micros(5));
        let mut out = Vec::new();
        s.write_table(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("median_us"), "{text}");
        let cpuid = text.lines().find(|l| l.starts_with("cpuid")).unwrap();
        assert!(cpuid.contains(" 3 "), "{text}");
        assert!(text.contains("cli (fault)"), "{text}");
        assert!(text.lines().last().unwrap().ends_with(" 4"), "{text}");
    }

    #[test]
    fn kinds_beyond_the_table_are_counted_as_other() {
        let mut s = TrapStats::new();
        let mnemonics: Vec<Mnemonic> = Mnemonic::values().skip(1).take(MAX_KINDS + 2).collect();
        for m in mnemonics {
            s.record(TrapKind::Marker(m), Duration::from_nanos(100));
        }
        assert_eq!(s.total(), MAX_KINDS as u64 + 2);
        assert_eq!(s.in_monitor_ns(TrapKind::Other).unwrap().len(), 2);
    }

    #[test]
    fn stop_to_stop_intervals_start_at_the_second_stop() {
        let mut s = TrapStats::new();
        let t0 = Instant::now();
        s.stop_observed(t0);
        s.stop_observed(t0 + Duration::from_micros(7));
        assert_eq!(s.stop_to_stop_ns().len(), 1);
        assert!(s.stop_to_stop_ns().max() >= 6_990);
    }
}
