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
//! Each check consumes every doorbell and message it causes and waits for its last operation
//! to every peer, so checks can run one after another on one group ([`run_all`]).
#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{
    Fabric, FabricError, Grant, Incoming, MAX_MESSAGE_BYTES, NodeId, RegionId, RegionSpec,
    RemoteAddr, WrId,
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
];

/// Runs every check of [`GROUP_CHECKS`] in order; the first failure, prefixed by its name.
pub fn run_all(group: &[Arc<dyn Fabric>]) -> Result<(), String> {
    for (name, check) in GROUP_CHECKS {
        check(group).map_err(|e| format!("{name}: {e}"))?;
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

fn wait(ep: &dyn Fabric, wr: WrId, what: &str) -> Result<crate::Completion, String> {
    ep.wait(wr, OP_TIMEOUT)
        .map_err(|e| format!("{}: waiting for {what}: {e}", ep.rank()))
}

fn read(ep: &dyn Fabric, region: RegionId, offset: u64, len: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0; len];
    ep.region(region)
        .and_then(|r| r.read(offset, &mut buf))
        .map_err(|e| format!("{}: reading its {region}: {e}", ep.rank()))?;
    Ok(buf)
}

fn local_write(ep: &dyn Fabric, region: RegionId, offset: u64, data: &[u8]) -> Result<(), String> {
    ep.region(region)
        .and_then(|r| r.write(offset, data))
        .map_err(|e| format!("{}: writing its own {region}: {e}", ep.rank()))
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
    type Case<'a> = (&'a str, Result<WrId, FabricError>, fn(&FabricError) -> bool);
    let cases: Vec<Case> = vec![
        (
            "a write to a rank outside the group",
            ep.post_write(rank(n), at(DATA, 0), b"x"),
            |e| matches!(e, FabricError::UnknownPeer { .. }),
        ),
        (
            "a write to an unregistered region",
            ep.post_write(peer, at(RegionId(999), 0), b"x"),
            |e| matches!(e, FabricError::UnknownRegion { .. }),
        ),
        (
            "a write past the region's end",
            ep.post_write(peer, at(WORDS, 4090), &[0; 8]),
            |e| matches!(e, FabricError::OutOfBounds { .. }),
        ),
        (
            "a misaligned fetch_add",
            ep.post_fetch_add(peer, at(WORDS, 4), 1),
            |e| matches!(e, FabricError::Misaligned { .. }),
        ),
        (
            "an oversized control message",
            ep.post_send(peer, &vec![0; MAX_MESSAGE_BYTES + 1]),
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
/// value into its own word too, then rings a doorbell. A target watching the word never sees
/// it go backwards, and at the doorbell sees the last value and every earlier word.
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
            for t in 0..n {
                let mut last = None;
                for k in 1..=ORDER_WRITES as u64 {
                    ep.post_write(rank(t), at(DATA, slot(i)), &k.to_le_bytes())
                        .map_err(|e| format!("{}: post_write: {e}", ep.rank()))?;
                    let seq = tagged(i, k);
                    last = Some(
                        ep.post_write(rank(t), at(DATA, slot(i) + 8 * k), &seq.to_le_bytes())
                            .map_err(|e| format!("{}: post_write: {e}", ep.rank()))?,
                    );
                }
                let bell = ep
                    .post_write_imm(rank(t), at(DATA, slot(i)), &[], 7)
                    .map_err(|e| format!("{}: post_write_imm: {e}", ep.rank()))?;
                if let Some(wr) = last {
                    wait(ep, wr, "the last ordered write")?;
                }
                wait(ep, bell, "the doorbell")?;
            }
            Ok(())
        } else {
            // Receiver: watch every source's sequence word, then check at each doorbell.
            let ep = &*group[i - n];
            let region = ep.region(DATA).map_err(|e| e.to_string())?;
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
                        let s = usize::from(from.0);
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

fn tagged(src: usize, k: u64) -> u64 {
    (src as u64) << 48 | k
}

/// Sizes written in [`visibility_at_completion`].
pub const VISIBILITY_SIZES: [usize; 5] = [1, 8, 100, 4096, 65536];

/// Visibility at completion: as soon as `wait` returns, the target's own read shows the data.
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
                    let wr = ep
                        .post_write(rank(t), at(DATA, offset), &data)
                        .map_err(|e| format!("{}: post_write: {e}", ep.rank()))?;
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
            let mut last = Vec::new();
            for r in 0..DOORBELL_ROUNDS {
                for t in 0..n {
                    let data = pattern(tag(i, t, r), 2 * DOORBELL_BYTES);
                    let (before, with_imm) = data.split_at(DOORBELL_BYTES);
                    ep.post_write(rank(t), at(DATA, area(i, r)), before)
                        .map_err(|e| format!("{}: post_write: {e}", ep.rank()))?;
                    let wr = ep
                        .post_write_imm(
                            rank(t),
                            at(DATA, area(i, r) + DOORBELL_BYTES as u64),
                            with_imm,
                            r as u32,
                        )
                        .map_err(|e| format!("{}: post_write_imm: {e}", ep.rank()))?;
                    if r + 1 == DOORBELL_ROUNDS {
                        last.push(wr);
                    }
                }
            }
            for wr in last {
                wait(ep, wr, "the last doorbell")?;
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
                let s = usize::from(from.0);
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
                .map(|_| ep.post_fetch_add(rank(owner), at(WORDS, word), 1))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{}: post_fetch_add (chunk {chunk}): {e}", ep.rank()))?;
            for wr in wrs {
                let c = wait(ep, wr, "a fetch_add")?;
                let old = c.fetched.ok_or_else(|| {
                    format!("{}: a fetch_add completed without a value", ep.rank())
                })?;
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
        .region(WORDS)
        .and_then(|r| r.load_u64(word))
        .map_err(|e| e.to_string())?;
    if fin != total {
        return Err(format!("the word ends at {fin}, not {total}"));
    }
    Ok(())
}

/// Large writes: a whole 1 MiB slot in one write arrives intact.
pub fn large_writes(group: &[Arc<dyn Fabric>]) -> Result<(), String> {
    check_group(group)?;
    let n = group.len();
    on_every_node(n, |s| {
        let ep = &*group[s];
        let t = (s + 1) % n;
        let data = pattern(0x1a7e + s as u64, SLOT_BYTES);
        let wr = ep
            .post_write(rank(t), at(DATA, slot(s)), &data)
            .map_err(|e| format!("{}: post_write of 1 MiB: {e}", ep.rank()))?;
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

/// Control messages arrive intact and in order per source, up to [`MAX_MESSAGE_BYTES`].
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
                    let wr = ep
                        .post_send(rank(t), &message(i, t, k))
                        .map_err(|e| format!("{}: post_send: {e}", ep.rank()))?;
                    if k + 1 == MESSAGES_PER_PAIR {
                        last.push(wr);
                    }
                }
            }
            for wr in last {
                wait(ep, wr, "the last message")?;
            }
            Ok(())
        } else {
            let t = i - n;
            let ep = &*group[t];
            let mut next = vec![0usize; n];
            receive(ep, n * MESSAGES_PER_PAIR, |item| {
                let Incoming::Message { from, data } = item else {
                    return Err(format!("{}: unexpected {item:?}", ep.rank()));
                };
                let s = usize::from(from.0);
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

/// Access outside the grants is refused with `AccessDenied` naming the target, has no
/// effect, and the link keeps working.
pub fn access_outside_grants_is_denied(group: &[Arc<dyn Fabric>]) -> Result<(), String> {
    check_group(group)?;
    let n = group.len();
    for t in group {
        local_write(&**t, GUARDED, 0, &[0; 2 * GUARDED_GRANT_BYTES as usize])?;
    }
    on_every_node(n, |s| {
        let ep = &*group[s];
        let t = (s + 1) % n;
        let outside = ep
            .post_write(rank(t), at(GUARDED, GUARDED_GRANT_BYTES), &[0xee; 16])
            .and_then(|wr| ep.wait(wr, OP_TIMEOUT));
        expect_denied(outside, rank(t), "a write past the grant")?;
        let straddling = ep
            .post_write(rank(t), at(GUARDED, GUARDED_GRANT_BYTES - 8), &[0xee; 16])
            .and_then(|wr| ep.wait(wr, OP_TIMEOUT));
        expect_denied(straddling, rank(t), "a write straddling the grant's end")?;
        let fetch = ep
            .post_fetch_add(rank(t), at(GUARDED, GUARDED_GRANT_BYTES), 1)
            .and_then(|wr| ep.wait(wr, OP_TIMEOUT));
        expect_denied(fetch, rank(t), "a fetch_add past the grant")?;
        // The link still works, and the refused bytes never landed.
        let inside = pattern(0x90a + s as u64, 64);
        let offset = 64 * s as u64;
        let wr = ep
            .post_write(rank(t), at(GUARDED, offset), &inside)
            .map_err(|e| format!("{}: post_write inside the grant: {e}", ep.rank()))?;
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
                let wr = ep
                    .post_write_imm(rank(t), at(DATA, slot(i)), &data, 0x5a1e)
                    .map_err(|e| format!("{}: post_write_imm: {e}", ep.rank()))?;
                wait(ep, wr, "a doorbell")?;
            }
            Ok(())
        } else {
            let t = i - n;
            let ep = &*group[t];
            receive(ep, n, |item| match item {
                Incoming::Doorbell { from, imm: 0x5a1e } => {
                    let s = usize::from(from.0);
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
            .post_write(victim, at(DATA, slot(usize::from(ep.rank().0))), b"late")
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
