//! How the fabric benchmark measures and prints: latency histograms, bandwidth medians, the
//! table of fabric figures beside their raw primitives.

use std::time::Instant;

use hdrhistogram::Histogram;

/// A measured figure: fabric and raw, latency histograms (ns) or bandwidth (bytes/s).
pub enum Row {
    Latency {
        name: String,
        fabric: Histogram<u64>,
        raw: Histogram<u64>,
        raw_name: &'static str,
    },
    Bandwidth {
        name: String,
        fabric: f64,
        raw: f64,
        raw_name: &'static str,
    },
}

/// Bytes moved per bandwidth sample, and samples per size (the median is reported).
const BANDWIDTH_BYTES: usize = 256 << 20;
const BANDWIDTH_SAMPLES: usize = 11;

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds")
}

/// Times `iterations` calls of `f` after a warm-up of a tenth as many.
pub fn time(
    iterations: u64,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Histogram<u64>> {
    for _ in 0..iterations / 10 {
        f()?;
    }
    let mut h = histogram();
    for _ in 0..iterations {
        let t = Instant::now();
        f()?;
        h.record((t.elapsed().as_nanos() as u64).max(1))?;
    }
    Ok(h)
}

/// `measure(buffer)` for a buffer of each of `sizes` bytes (filled with `fill`), in order.
pub fn per_size<T>(
    sizes: &[usize],
    fill: u8,
    mut measure: impl FnMut(&[u8]) -> anyhow::Result<T>,
) -> anyhow::Result<Vec<T>> {
    sizes
        .iter()
        .map(|&size| measure(&vec![fill; size]))
        .collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Like [`bandwidth`] for two transfers whose samples alternate, so that both see the same
/// host conditions (the machine is shared; its memory bandwidth comes and goes).
pub fn bandwidth_pair(
    size: usize,
    mut a: impl FnMut(usize) -> anyhow::Result<()>,
    mut b: impl FnMut(usize) -> anyhow::Result<()>,
) -> anyhow::Result<(f64, f64)> {
    let count = (BANDWIDTH_BYTES / size).max(8);
    a(count / 4)?;
    b(count / 4)?;
    let mut sa = Vec::new();
    let mut sb = Vec::new();
    for _ in 0..BANDWIDTH_SAMPLES {
        let t = Instant::now();
        a(count)?;
        sa.push((count * size) as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        b(count)?;
        sb.push((count * size) as f64 / t.elapsed().as_secs_f64());
    }
    Ok((median(&mut sa), median(&mut sb)))
}

pub fn human_bytes(n: usize) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

fn us(ns: u64) -> String {
    format!("{:.2} us", ns as f64 / 1000.0)
}

/// Prints the table under a `title` line.
pub fn print_table(title: &str, rows: &[Row]) {
    println!("{title}");
    println!(
        "{:<38} {:>12} {:>12} {:>12} {:>12} {:>8}  raw primitive",
        "operation", "fabric p50", "fabric p99", "raw p50", "raw p99", "ratio"
    );
    for row in rows {
        match row {
            Row::Latency {
                name,
                fabric,
                raw,
                raw_name,
            } => {
                let (f50, r50) = (fabric.value_at_quantile(0.5), raw.value_at_quantile(0.5));
                println!(
                    "{:<38} {:>12} {:>12} {:>12} {:>12} {:>7.2}x  {raw_name}",
                    name,
                    us(f50),
                    us(fabric.value_at_quantile(0.99)),
                    us(r50),
                    us(raw.value_at_quantile(0.99)),
                    f50 as f64 / r50.max(1) as f64,
                );
            }
            Row::Bandwidth {
                name,
                fabric,
                raw,
                raw_name,
            } => {
                println!(
                    "{:<38} {:>12} {:>12} {:>12} {:>12} {:>7.0}%  {raw_name}",
                    name,
                    format!("{:.2} GiB/s", fabric / (1u64 << 30) as f64),
                    "",
                    format!("{:.2} GiB/s", raw / (1u64 << 30) as f64),
                    "",
                    100.0 * fabric / raw,
                );
            }
        }
    }
    println!(
        "latency ratio = fabric p50 / raw p50 (goal: doorbell round trip <= 1.3x); \
         bandwidth ratio = fabric / raw (goal: >= 80%)"
    );
}
