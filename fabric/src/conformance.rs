//! The one conformance suite every backend runs: each rule of `docs/fabric.md` as a public
//! function over a group of endpoints, so `tests/conformance_sim.rs`, `conformance_shm.rs` and
//! `conformance_tcp.rs` share the checks and differ only in how they build the group.
//!
//! A group for these checks registers [`regions()`], has 2 to [`MAX_NODES`] nodes, and every
//! endpoint lives in the calling process (the checks drive all nodes from threads and read the
//! targets' regions directly, which is the strongest test of "visible at completion").
//! Failures that need a process per node (a killed peer, a refused join) have their own
//! functions taking what only the backend's test can do (kill a process, attempt a join).
//!
//! Each check consumes every doorbell and message it causes, waits for its last operation
//! to every peer and takes every completion it asked for, so checks can run one after
//! another on one group ([`run_all`]).
#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{
    Completion, Fabric, FabricError, Grant, Incoming, IncomingBatch, IncomingRef, MAX_INLINE_BYTES,
    MAX_MESSAGE_BYTES, Memory, NodeId, RECV_CREDITS, RegionId, RegionSpec, RemoteAddr, Resource,
    Signal, Source, Status, WrId,
};

/// Largest group the layout of [`regions()`] serves.
pub const MAX_NODES: usize = 4;

/// Bytes of [`DATA`] each source owns at every target: source `s` writes only into
/// `s * SLOT_BYTES..(s + 1) * SLOT_BYTES`, so checks from different sources never overlap.
pub const SLOT_BYTES: usize = 1 << 20;

/// A region every node may write anywhere in, one slot per source.
pub const DATA: RegionId = RegionId(1);

/// A page of 64-bit words for `fetch_add`.
pub const WORDS: RegionId = RegionId(2);

/// A region of two pages where every node may write only the first.
pub const GUARDED: RegionId = RegionId(3);

/// Bytes of [`GUARDED`] inside the grant.
pub const GUARDED_GRANT_BYTES: u64 = 4096;

/// Each node's private source memory: what its one-sided writes are made from.
pub const SRC: RegionId = RegionId(4);

/// A region the harness may back with memory it created itself (a memfd, as guest RAM is),
/// for [`registered_memory_is_the_region`].
pub const OWNED: RegionId = RegionId(5);

/// Bytes of [`OWNED`].
pub const OWNED_BYTES: usize = 64 * 1024;

/// Bound on each single operation's wait in these checks (generous: the machine is shared).
pub const OP_TIMEOUT: Duration = Duration::from_secs(20);

/// Bound on a whole check's exchange.
pub const CHECK_DEADLINE: Duration = Duration::from_secs(120);

/// The regions every group under test registers.
pub fn regions() -> Vec<RegionSpec> {
    vec![
        RegionSpec::open(DATA, MAX_NODES * SLOT_BYTES),
        RegionSpec::open(WORDS, 4096),
        RegionSpec {
            id: GUARDED,
            len: 2 * GUARDED_GRANT_BYTES as usize,
            grants: vec![Grant {
                peer: None,
                range: 0..GUARDED_GRANT_BYTES,
            }],
        },
        RegionSpec::private(SRC, 2 * SLOT_BYTES),
        RegionSpec::open(OWNED, OWNED_BYTES),
    ]
}

/// A check over a whole group.
pub type Check = fn(&[Arc<dyn Fabric>]) -> Result<(), String>;

/// Every check that needs only a group, by name, in the order [`run_all`] runs them.
pub const GROUP_CHECKS: &[(&str, Check)] = &[
    (
        "arguments_are_checked_before_posting",
        arguments_are_checked_before_posting,
    ),
    ("per_peer_order", per_peer_order),
    ("visibility_at_completion", visibility_at_completion),
    ("doorbell_after_data", doorbell_after_data),
    (
        "fetch_add_is_atomic_under_contention",
        fetch_add_is_atomic_under_contention,
    ),
    ("large_writes", large_writes),
    ("control_messages_in_order", control_messages_in_order),
    (
        "access_outside_grants_is_denied",
        access_outside_grants_is_denied,
    ),
    (
        "completions_are_polled_once_in_order",
        completions_are_polled_once_in_order,
    ),
    (
        "receive_credits_are_back_pressure",
        receive_credits_are_back_pressure,
    ),
    (
        "the_notifier_wakes_an_epoll_sleeper",
        the_notifier_wakes_a_sleeper,
    ),
];

/// Runs every check of [`GROUP_CHECKS`] in order; the first failure, prefixed by its name.
pub fn run_all(group: &[Arc<dyn Fabric>]) -> Result<(), String> {
    for (name, check) in GROUP_CHECKS {
        let t = Instant::now();
        check(group).map_err(|e| format!("{name}: {e}"))?;
        tracing::debug!("conformance check {name} took {:?}", t.elapsed());
    }
    Ok(())
}

fn check_group(group: &[Arc<dyn Fabric>]) -> Result<(), String> {
    if group.len() < 2 || group.len() > MAX_NODES {
        return Err(format!(
            "the suite needs 2 to {MAX_NODES} endpoints, got {}",
            group.len()
        ));
    }
    for (i, ep) in group.iter().enumerate() {
        if usize::from(ep.rank().0) != i || ep.nodes() != group.len() {
            return Err(format!(
                "endpoint {i} says it is rank {} of {}: pass the whole group in rank order",
                ep.rank().0,
                ep.nodes()
            ));
        }
    }
    Ok(())
}

fn rank(i: usize) -> NodeId {
    NodeId(i as u16)
}

fn at(region: RegionId, offset: u64) -> RemoteAddr {
    RemoteAddr { region, offset }
}

fn slot(src: usize) -> u64 {
    (src * SLOT_BYTES) as u64
}

/// Deterministic bytes that differ with `tag`.
pub fn pattern(tag: u64, len: usize) -> Vec<u8> {
    let mut x = tag.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn wait(ep: &dyn Fabric, wr: WrId, what: &str) -> Result<Completion, String> {
    ep.wait(wr, OP_TIMEOUT)
        .map_err(|e| format!("{}: waiting for {what}: {e}", ep.rank()))
}

fn read(ep: &dyn Fabric, region: RegionId, offset: u64, len: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0; len];
    ep.memory(region)
        .and_then(|r| r.read(offset, &mut buf))
        .map_err(|e| format!("{}: reading its {region}: {e}", ep.rank()))?;
    Ok(buf)
}

fn local_write(ep: &dyn Fabric, region: RegionId, offset: u64, data: &[u8]) -> Result<(), String> {
    ep.memory(region)
        .and_then(|r| r.write(offset, data))
        .map_err(|e| format!("{}: writing its own {region}: {e}", ep.rank()))
}

/// Retries `post` while it would block (a full window or no receive credit), letting the
/// endpoint make progress meanwhile without taking completions; other errors end it.
pub fn post_retrying(
    ep: &dyn Fabric,
    what: &str,
    mut post: impl FnMut() -> Result<WrId, FabricError>,
) -> Result<WrId, String> {
    let deadline = Instant::now() + CHECK_DEADLINE;
    loop {
        match post() {
            Ok(wr) => return Ok(wr),
            Err(FabricError::WouldBlock { .. }) if Instant::now() < deadline => {
                ep.poll_completions(&mut []);
                std::thread::yield_now();
            }
            Err(e) => return Err(format!("{}: {what}: {e}", ep.rank())),
        }
    }
}

/// Writes `data` into this node's source memory at `offset` and posts a write of it (from
/// that memory: no staging) to `dst` at `t`.
fn write_from_source(
    ep: &dyn Fabric,
    t: usize,
    dst: RemoteAddr,
    src_offset: u64,
    data: &[u8],
    imm: Option<u32>,
    signal: Signal,
) -> Result<WrId, String> {
    local_write(ep, SRC, src_offset, data)?;
    let src = Source::Region(crate::LocalSlice::new(SRC, src_offset, data.len() as u64));
    post_retrying(ep, "post_write", || {
        ep.post_write(rank(t), dst, src, imm, signal)
    })
}

/// Posts `data` as an inline write (at most `MAX_INLINE_BYTES`).
fn write_inline(
    ep: &dyn Fabric,
    t: usize,
    dst: RemoteAddr,
    data: &[u8],
    imm: Option<u32>,
    signal: Signal,
) -> Result<WrId, String> {
    post_retrying(ep, "post_write inline", || {
        ep.post_write(rank(t), dst, Source::Inline(data), imm, signal)
    })
}

/// Runs `f(i)` for every node on its own thread; the first error.
fn on_every_node<F>(n: usize, f: F) -> Result<(), String>
where
    F: Fn(usize) -> Result<(), String> + Sync,
{
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let f = &f;
                s.spawn(move || f(i))
            })
            .collect();
        let mut first = Ok(());
        for h in handles {
            let r = h
                .join()
                .unwrap_or_else(|_| Err("a check thread panicked".into()));
            if first.is_ok() {
                first = r;
            }
        }
        first
    })
}

/// Receives exactly `expected` items at `ep`, handing each to `on_item`; fails on a deadline.
fn receive(
    ep: &dyn Fabric,
    expected: usize,
    mut on_item: impl FnMut(Incoming) -> Result<(), String>,
) -> Result<(), String> {
    let deadline = Instant::now() + CHECK_DEADLINE;
    let mut got = 0;
    while got < expected {
        if Instant::now() > deadline {
            return Err(format!(
                "{}: received {got} of {expected} items before the deadline",
                ep.rank()
            ));
        }
        match ep.recv(Duration::from_millis(100)) {
            Ok(Some(item)) => {
                got += 1;
                on_item(item)?;
            }
            Ok(None) => {}
            Err(e) => return Err(format!("{}: recv: {e}", ep.rank())),
        }
    }
    Ok(())
}

/// Bad arguments are refused by the post itself, with the error the contract names.
pub fn arguments_are_checked_before_posting(group: &[Arc<dyn Fabric>]) -> Result<(), String> {
    check_group(group)?;
    let ep = &*group[0];
    let n = group.len();
    let peer = rank(1);
    let x = Source::Inline(b"x");
    let big = vec![0u8; MAX_INLINE_BYTES + 1];
    let from = |offset, len| Source::Region(crate::LocalSlice::new(SRC, offset, len));
    type Case<'a> = (&'a str, Result<WrId, FabricError>, fn(&FabricError) -> bool);
    let always = Signal::Always;
    let cases: Vec<Case> = vec![
        (
            "a write to a rank outside the group",
            ep.post_write(rank(n), at(DATA, 0), x, None, always),
            |e| matches!(e, FabricError::UnknownPeer { .. }),
        ),
        (
            "a write to an unregistered region",
            ep.post_write(peer, at(RegionId(999), 0), x, None, always),
            |e| matches!(e, FabricError::UnknownRegion { .. }),
        ),
        (
            "a write past the region's end",
            ep.post_write(peer, at(WORDS, 4090), Source::Inline(&[0; 8]), None, always),
            |e| matches!(e, FabricError::OutOfBounds { .. }),
        ),
        (
            "a write from past the source region's end",
            ep.post_write(
                peer,
                at(DATA, 0),
                from(2 * SLOT_BYTES as u64 - 4, 8),
                None,
                always,
            ),
            |e| matches!(e, FabricError::OutOfBounds { region: SRC, .. }),
        ),
        (
            "a write from an unregistered source region",
            ep.post_write(
                peer,
                at(DATA, 0),
                Source::Region(crate::LocalSlice::new(RegionId(998), 0, 8)),
                None,
                always,
            ),
            |e| matches!(e, FabricError::UnknownRegion { .. }),
        ),
        (
            "an oversized inline write",
            ep.post_write(peer, at(DATA, 0), Source::Inline(&big), None, always),
            |e| matches!(e, FabricError::InlineTooLarge { .. }),
        ),
        (
            "a misaligned fetch_add",
            ep.post_fetch_add(peer, at(WORDS, 4), 1),
            |e| matches!(e, FabricError::Misaligned { .. }),
        ),
        (
            "an oversized control message",
            ep.post_send(peer, &vec![0; MAX_MESSAGE_BYTES + 1], always),
            |e| matches!(e, FabricError::MessageTooLarge { .. }),
        ),
    ];
    for (what, result, expected) in cases {
        match result {
            Err(e) if expected(&e) => {}
            Err(e) => return Err(format!("{what} failed with the wrong error: {e}")),
            Ok(wr) => return Err(format!("{what} was accepted as {wr:?}")),
        }
    }
    Ok(())
}

/// Number of writes each source sends each target before its doorbell in [`per_peer_order`].
pub const ORDER_WRITES: usize = 200;

/// Per-peer order: every source writes an increasing sequence number into one word and each
/// value into its own word too (inline, unsignalled), then rings a doorbell. A target watching
/// the word never sees it go backwards, and at the doorbell sees the last value and every
/// earlier word.
pub fn per_peer_order(group: &[Arc<dyn Fabric>]) -> Result<(), String> {
    check_group(group)?;
    let n = group.len();
    // Reset the sequence words: nothing is in flight between checks.
    for t in group {
        for s in 0..n {
            local_write(&**t, DATA, slot(s), &vec![0; 8 * (ORDER_WRITES + 1)])?;
        }
    }
    on_every_node(2 * n, |i| {
        if i < n {
            // Sender: to every target, loopback included.
            let ep = &*group[i];
            let quiet = Signal::OnError;
            for t in 0..n {
                for k in 1..=ORDER_WRITES as u64 {
                    write_inline(ep, t, at(DATA, slot(i)), &k.to_le_bytes(), None, quiet)?;
                    let seq = tagged(i, k).to_le_bytes();
                    write_inline(ep, t, at(DATA, slot(i) + 8 * k), &seq, None, quiet)?;
                }
                let bell = post_retrying(ep, "a doorbell", || {
                    ep.post_write(
                        rank(t),
                        at(DATA, slot(i)),
                        Source::Empty,
                        Some(7),
                        Signal::Always,
                    )
                })?;
                // The doorbell's completion implies every earlier write to `t` completed.
                wait(ep, bell, "the doorbell")?;
            }
            no_failures(ep)
        } else {
            // Receiver: watch every source's sequence word, then check at each doorbell.
            let ep = &*group[i - n];
            let region = ep.memory(DATA).map_err(|e| e.to_string())?;
            let mut seen = vec![0u64; n];
            let mut rung = vec![false; n];
            let deadline = Instant::now() + CHECK_DEADLINE;
            while rung.iter().any(|r| !r) {
                if Instant::now() > deadline {
                    return Err(format!("{}: doorbells missing: {rung:?}", ep.rank()));
                }
                for (s, last) in seen.iter_mut().enumerate() {
                    let v = region.load_u64(slot(s)).map_err(|e| e.to_string())?;
                    if v < *last {
                        return Err(format!(
                            "{}: the sequence word from {} went back from {} to {v}",
                            ep.rank(),
                            rank(s),
                            *last
                        ));
                    }
                    *last = v;
                }
                match ep.recv(Duration::from_micros(200)) {
                    Ok(Some(Incoming::Doorbell { from, imm: 7 })) => {
                        let s = from.index();
                        if s >= n || rung[s] {
                            return Err(format!("{}: unexpected doorbell from {from}", ep.rank()));
                        }
                        rung[s] = true;
                        let words = read(ep, DATA, slot(s), 8 * (ORDER_WRITES + 1))?;
                        let word = |k: usize| {
                            u64::from_le_bytes(words[8 * k..8 * k + 8].try_into().expect("8"))
                        };
                        if word(0) != ORDER_WRITES as u64 {
                            return Err(format!(
                                "{}: at the doorbell from {from} the sequence word is {}, not {ORDER_WRITES}",
                                ep.rank(),
                                word(0)
                            ));
                        }
                        for k in 1..=ORDER_WRITES {
                            if word(k) != tagged(s, k as u64) {
                                return Err(format!(
                                    "{}: at the doorbell from {from} write {k} is missing",
                                    ep.rank()
                                ));
                            }
                        }
                    }
                    Ok(Some(other)) => {
                        return Err(format!("{}: unexpected {other:?}", ep.rank()));
                    }
                    Ok(None) => {}
                    Err(e) => return Err(format!("{}: recv: {e}", ep.rank())),
                }
            }
            Ok(())
        }
    })
}

/// Fails if any completion is waiting at `ep` (unsignalled operations that failed).
fn no_failures(ep: &dyn Fabric) -> Result<(), String> {
    let mut out = [Completion::EMPTY; 16];
    let n = ep.poll_completions(&mut out);
    match out[..n].iter().find(|c| !c.is_ok()) {
        Some(c) => Err(format!("{}: an operation failed: {c:?}", ep.rank())),
        None if n > 0 => Err(format!(
            "{}: {n} completions nobody asked for: {:?}",
            ep.rank(),
            &out[..n]
        )),
        None => Ok(()),
    }
}

fn tagged(src: usize, k: u64) -> u64 {
    (src as u64) << 48 | k
}

/// Sizes written in [`visibility_at_completion`].
pub const VISIBILITY_SIZES: [usize; 6] = [1, 8, 100, 256, 4096, 65536];

/// Visibility at completion: as soon as `wait` returns, the target's own read shows the data,
/// for writes from registered memory and inline writes alike.
pub fn visibility_at_completion(group: &[Arc<dyn Fabric>]) -> Result<(), String> {
    check_group(group)?;
    let n = group.len();
    on_every_node(n, |s| {
        let ep = &*group[s];
        for round in 0..4u64 {
            for (t, target) in group.iter().enumerate() {
                for (k, &len) in VISIBILITY_SIZES.iter().enumerate() {
                    let data = pattern(round << 32 | (s * 64 + t * 8 + k) as u64, len);
                    let offset = slot(s) + (k * 65536) as u64;
                    let dst = at(DATA, offset);
                    let wr = if len <= MAX_INLINE_BYTES && round % 2 == 1 {
                        write_inline(ep, t, dst, &data, None, Signal::Always)?
                    } else {
                        write_from_source(ep, t, dst, 0, &data, None, Signal::Always)?
                    };
                    wait(ep, wr, "a write")?;
                    if read(&**target, DATA, offset, len)? != data {
                        return Err(format!(
                            "{} waited for a {len}-byte write to {} but the target does not see it",
                            ep.rank(),
                            rank(t)
                        ));
                    }
                }
            }
        }
        Ok(())
    })
}

/// Doorbells per source and target in [`doorbell_after_data`].
pub const DOORBELL_ROUNDS: usize = 8;

/// Bytes carried by each doorbell in [`doorbell_after_data`].
pub const DOORBELL_BYTES: usize = 65536;

/// Doorbell after data: when a doorbell arrives, the bytes of its own write (and of a write
/// posted just before it) are all visible.
pub fn doorbell_after_data(group: &[Arc<dyn Fabric>]) -> Result<(), String> {
    check_group(group)?;
    let n = group.len();
    let area = |s: usize, r: usize| slot(s) + (r * 2 * DOORBELL_BYTES) as u64;
    let tag = |s: usize, t: usize, r: usize| ((s * 16 + t) * 64 + r) as u64 + 0xd00b;
    on_every_node(2 * n, |i| {
        if i < n {
            let ep = &*group[i];
            for r in 0..DOORBELL_ROUNDS {
                for t in 0..n {
                    // Each (round, target) its own source bytes: they must stay unchanged
                    // until the write completes.
                    let src = (((r * n + t) % 8) * 2 * DOORBELL_BYTES) as u64;
                    let data = pattern(tag(i, t, r), 2 * DOORBELL_BYTES);
                    let (before, with_imm) = data.split_at(DOORBELL_BYTES);
                    let first = write_from_source(
                        ep,
                        t,
                        at(DATA, area(i, r)),
                        src,
                        before,
                        None,
                        Signal::Always,
                    )?;
                    let second = write_from_source(
                        ep,
                        t,
                        at(DATA, area(i, r) + DOORBELL_BYTES as u64),
                        src + DOORBELL_BYTES as u64,
                        with_imm,
                        Some(r as u32),
                        Signal::Always,
                    )?;
                    wait(ep, first, "a write")?;
                    wait(ep, second, "a doorbell")?;
                }
            }
            Ok(())
        } else {
            let t = i - n;
            let ep = &*group[t];
            let mut next = vec![0usize; n];
            receive(ep, n * DOORBELL_ROUNDS, |item| {
                let Incoming::Doorbell { from, imm } = item else {
                    return Err(format!("{}: unexpected {item:?}", ep.rank()));
                };
                let s = from.index();
                let r = imm as usize;
                if s >= n || next[s] != r {
                    return Err(format!(
                        "{}: doorbell {imm} from {from} out of order (expected {})",
                        ep.rank(),
                        next.get(s).copied().unwrap_or(0)
                    ));
                }
                next[s] += 1;
                if read(ep, DATA, area(s, r), 2 * DOORBELL_BYTES)?
                    != pattern(tag(s, t, r), 2 * DOORBELL_BYTES)
                {
                    return Err(format!(
                        "{}: doorbell {imm} from {from} arrived before its data was visible",
                        ep.rank()
                    ));
                }
                Ok(())
            })
        }
    })
}

/// `fetch_add`s each node performs in [`fetch_add_is_atomic_under_contention`].
pub const FETCH_ADDS_PER_NODE: usize = 300;

/// `fetch_add` is atomic under contention: every node (the owner through loopback) adds 1 to
/// one word many times; the old values are distinct and cover `0..N*K`, and the word ends at
/// `N*K`.
pub fn fetch_add_is_atomic_under_contention(group: &[Arc<dyn Fabric>]) -> Result<(), String> {
    check_group(group)?;
    let n = group.len();
    let owner = n - 1;
    let word = 64;
    local_write(&*group[owner], WORDS, word, &0u64.to_le_bytes())?;
    let olds = std::sync::Mutex::new(Vec::new());
    on_every_node(n, |s| {
        let ep = &*group[s];
        let mut mine = Vec::with_capacity(FETCH_ADDS_PER_NODE);
        // A few in flight at once, to contend inside the backend's pipeline too.
        for chunk in 0..FETCH_ADDS_PER_NODE / 3 {
            let wrs = (0..3)
                .map(|_| {
                    post_retrying(ep, &format!("post_fetch_add (chunk {chunk})"), || {
                        ep.post_fetch_add(rank(owner), at(WORDS, word), 1)
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            for wr in wrs {
                let c = wait(ep, wr, "a fetch_add")?;
                let Status::Fetched(old) = c.status else {
                    return Err(format!(
                        "{}: a fetch_add completed without a value: {c:?}",
                        ep.rank()
                    ));
                };
                mine.push(old);
            }
        }
        olds.lock().unwrap_or_else(|p| p.into_inner()).extend(mine);
        Ok(())
    })?;
    let olds = olds.into_inner().unwrap_or_else(|p| p.into_inner());
    let total = (n * (FETCH_ADDS_PER_NODE / 3 * 3)) as u64;
    let distinct: HashSet<u64> = olds.iter().copied().collect();
    if distinct.len() != olds.len() {
        return Err(format!(
            "{} fetch_adds returned only {} distinct old values",
            olds.len(),
            distinct.len()
        ));
    }
    if olds.len() as u64 != total || (0..total).any(|v| !distinct.contains(&v)) {
        return Err(format!("the old values are not exactly 0..{total}"));
    }
    let fin = group[owner]
        .memory(WORDS)
        .and_then(|r| r.load_u64(word))
        .map_err(|e| e.to_string())?;
    if fin != total {
        return Err(format!("the word ends at {fin}, not {total}"));
    }
    Ok(())
}

/// Large writes: a whole 1 MiB slot in one write from registered memory arrives intact.
pub fn large_writes(group: &[Arc<dyn Fabric>]) -> Result<(), String> {
    check_group(group)?;
    let n = group.len();
    on_every_node(n, |s| {
        let ep = &*group[s];
        let t = (s + 1) % n;
        let data = pattern(0x1a7e + s as u64, SLOT_BYTES);
        let wr = write_from_source(ep, t, at(DATA, slot(s)), 0, &data, None, Signal::Always)?;
        wait(ep, wr, "a 1 MiB write")?;
        if read(&*group[t], DATA, slot(s), SLOT_BYTES)? != data {
            return Err(format!(
                "a 1 MiB write from {} to {} arrived damaged",
                ep.rank(),
                rank(t)
            ));
        }
        Ok(())
    })
}

/// Control messages each source sends each target in [`control_messages_in_order`].
pub const MESSAGES_PER_PAIR: usize = 100;

/// Control messages arrive intact and in order per source, up to [`MAX_MESSAGE_BYTES`],
/// more of them than the receive credits (the receivers' polls return credit).
pub fn control_messages_in_order(group: &[Arc<dyn Fabric>]) -> Result<(), String> {
    check_group(group)?;
    let n = group.len();
    let message = |s: usize, t: usize, k: usize| {
        let len = if k == MESSAGES_PER_PAIR / 2 {
            MAX_MESSAGE_BYTES
        } else {
            (k * 37) % 1500
        };
        let mut m = pattern((s * 1000 + t * 100_000 + k) as u64, len.max(4));
        m[..4].copy_from_slice(&(k as u32).to_le_bytes());
        m
    };
    on_every_node(2 * n, |i| {
        if i < n {
            let ep = &*group[i];
            let mut last = Vec::new();
            for k in 0..MESSAGES_PER_PAIR {
                for t in 0..n {
                    let m = message(i, t, k);
                    let signal = if k + 1 == MESSAGES_PER_PAIR {
                        Signal::Always
                    } else {
                        Signal::OnError
                    };
                    let wr = post_retrying(ep, "post_send", || ep.post_send(rank(t), &m, signal))?;
                    if k + 1 == MESSAGES_PER_PAIR {
                        last.push(wr);
                    }
                }
            }
            for wr in last {
                wait(ep, wr, "the last message")?;
            }
            no_failures(ep)
        } else {
            let t = i - n;
            let ep = &*group[t];
            let mut next = vec![0usize; n];
            receive(ep, n * MESSAGES_PER_PAIR, |item| {
                let Incoming::Message { from, data } = item else {
                    return Err(format!("{}: unexpected {item:?}", ep.rank()));
                };
                let s = from.index();
                let k = *next
                    .get(s)
                    .ok_or_else(|| format!("{}: a message from {from}", ep.rank()))?;
                if data != message(s, t, k) {
                    return Err(format!(
                        "{}: message {} from {from} is not the one sent (out of order or damaged)",
                        ep.rank(),
                        k
                    ));
                }
                next[s] += 1;
                Ok(())
            })
        }
    })
}

/// Access outside the grants is refused with `AccessDenied` naming the target (by the post
/// or by its completion), has no effect, and the link keeps working.
pub fn access_outside_grants_is_denied(group: &[Arc<dyn Fabric>]) -> Result<(), String> {
    check_group(group)?;
    let n = group.len();
    for t in group {
        local_write(&**t, GUARDED, 0, &[0; 2 * GUARDED_GRANT_BYTES as usize])?;
    }
    on_every_node(n, |s| {
        let ep = &*group[s];
        let t = (s + 1) % n;
        let bytes = Source::Inline(&[0xee; 16]);
        let try_write = |offset| {
            ep.post_write(rank(t), at(GUARDED, offset), bytes, None, Signal::Always)
                .and_then(|wr| ep.wait(wr, OP_TIMEOUT))
        };
        expect_denied(
            try_write(GUARDED_GRANT_BYTES),
            rank(t),
            "a write past the grant",
        )?;
        expect_denied(
            try_write(GUARDED_GRANT_BYTES - 8),
            rank(t),
            "a write straddling the grant's end",
        )?;
        let fetch = ep
            .post_fetch_add(rank(t), at(GUARDED, GUARDED_GRANT_BYTES), 1)
            .and_then(|wr| ep.wait(wr, OP_TIMEOUT));
        expect_denied(fetch, rank(t), "a fetch_add past the grant")?;
        // An unsignalled refusal is reported as a completion.
        let quiet = ep.post_write(
            rank(t),
            at(GUARDED, GUARDED_GRANT_BYTES),
            bytes,
            None,
            Signal::OnError,
        );
        match quiet {
            Err(e) => expect_denied::<()>(Err(e), rank(t), "an unsignalled write past the grant")?,
            Ok(wr) => {
                let c = wait_any_completion(ep, wr)?;
                expect_denied(c.result(), rank(t), "an unsignalled write past the grant")?;
            }
        }
        // The link still works, and the refused bytes never landed.
        let inside = pattern(0x90a + s as u64, 64);
        let offset = 64 * s as u64;
        let wr = write_inline(ep, t, at(GUARDED, offset), &inside, None, Signal::Always)?;
        wait(ep, wr, "a write inside the grant")?;
        if read(&*group[t], GUARDED, offset, 64)? != inside {
            return Err("a write inside the grant after a refusal did not arrive".into());
        }
        let beyond = read(
            &*group[t],
            GUARDED,
            GUARDED_GRANT_BYTES,
            GUARDED_GRANT_BYTES as usize,
        )?;
        if beyond.iter().any(|&b| b != 0) {
            return Err(format!("a refused write changed {}'s memory", rank(t)));
        }
        Ok(())
    })
}

/// Polls completions until `wr`'s appears (it must be the only one waiting).
fn wait_any_completion(ep: &dyn Fabric, wr: WrId) -> Result<Completion, String> {
    let deadline = Instant::now() + OP_TIMEOUT;
    let mut out = [Completion::EMPTY; 4];
    loop {
        let n = ep.poll_completions(&mut out);
        if let Some(c) = out[..n].iter().find(|c| c.wr == wr) {
            return Ok(*c);
        }
        if n > 0 {
            return Err(format!(
                "{}: unexpected completions {:?}",
                ep.rank(),
                &out[..n]
            ));
        }
        if Instant::now() > deadline {
            return Err(format!("{}: no completion for {wr:?}", ep.rank()));
        }
        std::thread::yield_now();
    }
}

fn expect_denied<T: std::fmt::Debug>(
    result: Result<T, FabricError>,
    target: NodeId,
    what: &str,
) -> Result<(), String> {
    match result {
        Err(FabricError::AccessDenied { peer, .. }) if peer == target => Ok(()),
        Err(e) => Err(format!(
            "{what} to {target} failed with the wrong error: {e}"
        )),
        Ok(c) => Err(format!("{what} to {target} was accepted: {c:?}")),
    }
}

/// Signalled operations each node posts to each peer in
/// [`completions_are_polled_once_in_order`].
pub const POLLED_OPS: usize = 40;

/// `poll_completions` hands out each signalled operation's completion exactly once, in
/// posting order per peer, and nothing for unsignalled successes.
pub fn completions_are_polled_once_in_order(group: &[Arc<dyn Fabric>]) -> Result<(), String> {
    check_group(group)?;
    let n = group.len();
    on_every_node(n, |s| {
        let ep = &*group[s];
        let mut expected: Vec<Vec<WrId>> = vec![Vec::new(); n];
        for k in 0..POLLED_OPS {
            for (t, mine) in expected.iter_mut().enumerate() {
                let word = (8 * (s * POLLED_OPS + k)) as u64 % 4096;
                let dst = at(DATA, slot(s) + word);
                if k % 2 == 0 {
                    mine.push(write_inline(
                        ep,
                        t,
                        dst,
                        &[k as u8; 8],
                        None,
                        Signal::Always,
                    )?);
                } else {
                    write_inline(ep, t, dst, &[k as u8; 8], None, Signal::OnError)?;
                }
            }
        }
        let want: usize = expected.iter().map(Vec::len).sum();
        let mut got: Vec<Vec<WrId>> = vec![Vec::new(); n];
        let mut out = [Completion::EMPTY; 7];
        let deadline = Instant::now() + CHECK_DEADLINE;
        let mut total = 0;
        while total < want {
            if Instant::now() > deadline {
                return Err(format!("{}: {total} of {want} completions came", ep.rank()));
            }
            let k = ep.poll_completions(&mut out);
            for c in &out[..k] {
                if !c.is_ok() {
                    return Err(format!("{}: a write failed: {c:?}", ep.rank()));
                }
                got[c.peer.index()].push(c.wr);
            }
            total += k;
        }
        if got != expected {
            return Err(format!(
                "{}: completions out of order or repeated: {got:?} for {expected:?}",
                ep.rank()
            ));
        }
        no_failures(ep)
    })
}

/// Receive credits are back-pressure, never an overrun: a source may hold
/// [`RECV_CREDITS`] doorbells unread at a target; the next post says `WouldBlock` naming the
/// credits, and once the target polls them, posting goes on.
pub fn receive_credits_are_back_pressure(group: &[Arc<dyn Fabric>]) -> Result<(), String> {
    check_group(group)?;
    let (src, dst) = (&*group[0], &*group[1]);
    // Credits come back in batches as the target polls, and all at once when it arms its
    // notifier to sleep: let earlier checks' credits come home first.
    let deadline = Instant::now() + CHECK_DEADLINE;
    let mut batch = IncomingBatch::new(RECV_CREDITS);
    loop {
        if dst.poll_incoming(&mut batch) > 0 {
            return Err(format!(
                "{}: unexpected {:?}",
                dst.rank(),
                batch.iter().next()
            ));
        }
        dst.arm_notifier();
        src.poll_completions(&mut []);
        let left = src.credits(rank(1)).map_err(|e| e.to_string())?;
        if left == RECV_CREDITS {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} has {left} of {RECV_CREDITS} credits at an idle {}",
                src.rank(),
                dst.rank()
            ));
        }
        std::thread::yield_now();
    }
    let bell = |imm| {
        src.post_write(
            rank(1),
            at(DATA, 0),
            Source::Empty,
            Some(imm),
            Signal::OnError,
        )
    };
    for k in 0..RECV_CREDITS as u32 {
        post_retrying(src, "a doorbell within the credits", || bell(k))?;
    }
    match bell(u32::MAX) {
        Err(FabricError::WouldBlock {
            peer,
            resource: Resource::ReceiveCredits,
        }) if peer == rank(1) => {}
        other => {
            return Err(format!(
                "a doorbell past {RECV_CREDITS} credits gave {other:?}, not WouldBlock"
            ));
        }
    }
    let mut got = 0u32;
    let deadline = Instant::now() + CHECK_DEADLINE;
    while got < RECV_CREDITS as u32 {
        if Instant::now() > deadline {
            return Err(format!(
                "{}: {got} of {RECV_CREDITS} doorbells came",
                dst.rank()
            ));
        }
        batch.clear();
        dst.poll_incoming(&mut batch);
        for item in batch.iter() {
            match item {
                IncomingRef::Doorbell { from, imm } if from == rank(0) && imm == got => got += 1,
                other => return Err(format!("{}: unexpected {other:?}", dst.rank())),
            }
        }
    }
    post_retrying(src, "a doorbell after the credits came back", || bell(7))?;
    receive(dst, 1, |item| match item {
        Incoming::Doorbell { imm: 7, .. } => Ok(()),
        other => Err(format!("{}: unexpected {other:?}", dst.rank())),
    })?;
    no_failures(src)
}

/// The notifier wakes a thread sleeping in `epoll` on it beside another descriptor (as a
/// node's event loop sleeps on the fabric, a pidfd and a signalfd), when a doorbell arrives,
/// after the arm-then-poll-again protocol; the other descriptor stays quiet.
pub fn the_notifier_wakes_a_sleeper(group: &[Arc<dyn Fabric>]) -> Result<(), String> {
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
    use nix::sys::eventfd::{EfdFlags, EventFd};
    check_group(group)?;
    let (src, dst) = (&*group[0], &*group[1]);
    fn fail(what: &'static str) -> impl Fn(nix::Error) -> String {
        move |e| format!("{what}: {e}")
    }
    let other = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).map_err(fail("an eventfd"))?;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(fail("epoll_create"))?;
    epoll
        .add(dst.notifier(), EpollEvent::new(EpollFlags::EPOLLIN, 1))
        .and_then(|()| epoll.add(&other, EpollEvent::new(EpollFlags::EPOLLIN, 2)))
        .map_err(fail("epoll_ctl"))?;
    std::thread::scope(|s| {
        let sleeper = s.spawn(|| {
            let mut batch = IncomingBatch::new(4);
            let mut events = [EpollEvent::empty(); 4];
            let deadline = Instant::now() + CHECK_DEADLINE;
            loop {
                if Instant::now() > deadline {
                    return Err(format!("{}: the notifier never woke it", dst.rank()));
                }
                dst.arm_notifier();
                batch.clear();
                if dst.poll_incoming(&mut batch) > 0 {
                    break;
                }
                let n = epoll
                    .wait(&mut events, EpollTimeout::from(50u16))
                    .map_err(fail("epoll_wait"))?;
                if events[..n].iter().any(|e| e.data() == 2) {
                    return Err("the other descriptor woke the loop".into());
                }
                if dst.poll_incoming(&mut batch) > 0 {
                    break;
                }
            }
            match batch.iter().next() {
                Some(IncomingRef::Doorbell { imm: 0x51ee9, .. }) => Ok(()),
                other => Err(format!("{}: woke for {other:?}", dst.rank())),
            }
        });
        std::thread::sleep(Duration::from_millis(20));
        let wr = post_retrying(src, "a doorbell", || {
            src.post_write(
                rank(1),
                at(DATA, 0),
                Source::Empty,
                Some(0x51ee9),
                Signal::Always,
            )
        })?;
        wait(src, wr, "the doorbell")?;
        sleeper
            .join()
            .unwrap_or_else(|_| Err("the sleeper panicked".into()))
    })
}

/// A second, independent mapping of `m`'s memory file (through `/proc/self/fd`: the same
/// file, not a copy), for a harness to watch memory it registered from outside the fabric.
pub fn second_mapping(m: &Memory) -> Result<Memory, FabricError> {
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&m.fd()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(FabricError::io(format!("opening {path}")))?;
    Memory::from_file(m.id(), file)
}

/// Memory the harness registered for [`OWNED`] (a memfd it created and maps on its own,
/// `caller[i]` for node `i`) is the region itself: a peer's one-sided write lands in the
/// caller's memory, and what the caller stores there is what a peer's write from it carries.
pub fn registered_memory_is_the_region(
    group: &[Arc<dyn Fabric>],
    caller: &[Memory],
) -> Result<(), String> {
    check_group(group)?;
    let n = group.len();
    if caller.len() != n {
        return Err(format!("{} caller mappings for {n} nodes", caller.len()));
    }
    for (s, ep) in group.iter().enumerate() {
        let t = (s + 1) % n;
        // Into the target's own memfd...
        let data = pattern(0x0e4d + s as u64, 4096);
        let wr = write_from_source(
            &**ep,
            t,
            at(OWNED, 4096 * s as u64),
            0,
            &data,
            None,
            Signal::Always,
        )?;
        wait(&**ep, wr, "a write into registered memory")?;
        let mut seen = vec![0u8; 4096];
        caller[t]
            .read(4096 * s as u64, &mut seen)
            .map_err(|e| e.to_string())?;
        if seen != data {
            return Err(format!(
                "a write from {} did not land in the memory {} registered",
                ep.rank(),
                rank(t)
            ));
        }
        // ...and out of the source's own memfd, stored by the caller, not through the fabric.
        let mine = pattern(0x5e1f + s as u64, 512);
        caller[s].write(32768, &mine).map_err(|e| e.to_string())?;
        let src = Source::Region(crate::LocalSlice::new(OWNED, 32768, 512));
        let dst = at(DATA, slot(s) + 8192);
        let wr = post_retrying(&**ep, "a write from registered memory", || {
            ep.post_write(rank(t), dst, src, None, Signal::Always)
        })?;
        wait(&**ep, wr, "a write from registered memory")?;
        if read(&*group[t], DATA, slot(s) + 8192, 512)? != mine {
            return Err(format!(
                "a write from {}'s registered memory did not carry what the caller stored",
                ep.rank()
            ));
        }
    }
    Ok(())
}

/// A quick exchange proving every pair of the group still works: a write + doorbell from
/// every node to every other, checked at the target.
pub fn group_still_works(group: &[Arc<dyn Fabric>]) -> Result<(), String> {
    check_group(group)?;
    let n = group.len();
    on_every_node(2 * n, |i| {
        if i < n {
            let ep = &*group[i];
            for t in 0..n {
                let data = pattern(0x5a1e + (i * 16 + t) as u64, 256);
                let wr = write_inline(
                    ep,
                    t,
                    at(DATA, slot(i)),
                    &data,
                    Some(0x5a1e),
                    Signal::Always,
                )?;
                wait(ep, wr, "a doorbell")?;
            }
            Ok(())
        } else {
            let t = i - n;
            let ep = &*group[t];
            receive(ep, n, |item| match item {
                Incoming::Doorbell { from, imm: 0x5a1e } => {
                    let s = from.index();
                    if read(ep, DATA, slot(s), 256)? != pattern(0x5a1e + (s * 16 + t) as u64, 256) {
                        return Err(format!("{}: data from {from} missing", ep.rank()));
                    }
                    Ok(())
                }
                other => Err(format!("{}: unexpected {other:?}", ep.rank())),
            })
        }
    })
}

/// A join with the wrong secret was refused with `Handshake`, and the group formed without
/// it still works.
pub fn refused_join_leaves_group_working<T: std::fmt::Debug>(
    join: Result<T, FabricError>,
    group: &[Arc<dyn Fabric>],
) -> Result<(), String> {
    match join {
        Err(FabricError::Handshake { .. }) => {}
        Err(e) => return Err(format!("the bad join failed with the wrong error: {e}")),
        Ok(v) => return Err(format!("a join with the wrong secret was accepted: {v:?}")),
    }
    group_still_works(group)
}

/// A killed peer is reported as `PeerDead` naming it, by `recv` at every survivor and then by
/// a post to it, within a generous deadline (`heartbeat_timeout` plus slack: nothing waits
/// forever). `kill` kills `victim` (SIGKILL for a process, `SimGroup::kill` in the simulator).
/// `survivors` are endpoints of the victim's group, any ranks.
pub fn killed_peer_is_reported(
    survivors: &[Arc<dyn Fabric>],
    victim: NodeId,
    heartbeat_timeout: Duration,
    kill: impl FnOnce(),
) -> Result<(), String> {
    kill();
    let deadline = Instant::now() + 10 * heartbeat_timeout + Duration::from_secs(10);
    on_every_node(survivors.len(), |i| {
        let ep = &*survivors[i];
        loop {
            if Instant::now() > deadline {
                return Err(format!("{} never reported {victim} dead", ep.rank()));
            }
            match ep.recv(Duration::from_millis(100)) {
                Err(FabricError::PeerDead { peer, .. }) if peer == victim => break,
                Err(e) => {
                    return Err(format!(
                        "{}: recv failed with the wrong error: {e}",
                        ep.rank()
                    ));
                }
                Ok(_) => {}
            }
        }
        let post = ep
            .post_write(
                victim,
                at(DATA, slot(ep.rank().index())),
                Source::Inline(b"late"),
                None,
                Signal::Always,
            )
            .and_then(|wr| ep.wait(wr, OP_TIMEOUT));
        match post {
            Err(FabricError::PeerDead { peer, .. }) if peer == victim => Ok(()),
            other => Err(format!(
                "{}: a write to the dead {victim} gave {other:?}, not PeerDead",
                ep.rank()
            )),
        }
    })
}
