//! The tcp data path beyond the conformance suite: writes larger than one frame (sent as
//! chunks) straight from registered memory, grants checked over a whole chunked write, far more
//! posts than the window, the injected delay over tcp, and closing right after receiving.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vsmp_fabric::conformance::post_retrying;
use vsmp_fabric::delay::Delayed;
use vsmp_fabric::tcp::TcpFabric;
use vsmp_fabric::tcp::frame::MAX_WRITE_PAYLOAD;
use vsmp_fabric::{
    Fabric, FabricError, Grant, GroupConfig, Incoming, LocalSlice, NodeId, RegionId, RegionSpec,
    RemoteAddr, SEND_WINDOW, Secret, Signal, Source,
};

const BIG: RegionId = RegionId(1);
const GUARDED: RegionId = RegionId(2);
const SRC: RegionId = RegionId(3);
const BIG_BYTES: usize = 4 * MAX_WRITE_PAYLOAD;
const WAIT: Duration = Duration::from_secs(30);

fn regions() -> Vec<RegionSpec> {
    vec![
        RegionSpec::open(BIG, BIG_BYTES),
        RegionSpec {
            id: GUARDED,
            len: BIG_BYTES,
            grants: vec![Grant {
                peer: None,
                range: 0..(2 * MAX_WRITE_PAYLOAD) as u64,
            }],
        },
        RegionSpec::private(SRC, BIG_BYTES),
    ]
}

fn group() -> Vec<TcpFabric> {
    let secret = Secret::from_bytes(b"tcp-data-path-secret".to_vec()).unwrap();
    let cfg = GroupConfig::new(NodeId(0), 2, regions(), "unused", secret);
    TcpFabric::local_group(&cfg).expect("a local tcp group")
}

/// Stores `data` in `ep`'s source region at 0 and names it as a write's source.
fn source(ep: &dyn Fabric, data: &[u8]) -> Source<'static> {
    ep.memory(SRC).unwrap().write(0, data).unwrap();
    Source::Region(LocalSlice::new(SRC, 0, data.len() as u64))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn a_write_larger_than_one_frame_arrives_whole_before_its_doorbell() {
    let g = group();
    let data = pattern(3 * MAX_WRITE_PAYLOAD + 5, 7);
    let at = RemoteAddr::new(BIG, 3);
    let src = source(&g[0], &data);
    let wr = g[0]
        .post_write(NodeId(1), at, src, Some(42), Signal::Always)
        .unwrap();
    match g[1].recv(WAIT).unwrap() {
        Some(Incoming::Doorbell { from, imm: 42 }) => assert_eq!(from, NodeId(0)),
        other => panic!("expected the doorbell, got {other:?}"),
    }
    let mut got = vec![0u8; data.len()];
    g[1].memory(BIG).unwrap().read(3, &mut got).unwrap();
    assert!(got == data, "the chunked write arrived damaged");
    g[0].wait(wr, WAIT).unwrap();
}

#[test]
fn a_chunked_write_reaching_past_its_grant_is_refused_whole() {
    let g = group();
    // Starts inside the grant, ends past it: no byte may land.
    let data = vec![0xee; 2 * MAX_WRITE_PAYLOAD];
    let at = RemoteAddr::new(GUARDED, MAX_WRITE_PAYLOAD as u64);
    let src = source(&g[0], &data);
    let wr = g[0]
        .post_write(NodeId(1), at, src, None, Signal::Always)
        .unwrap();
    match g[0].wait(wr, WAIT) {
        Err(FabricError::AccessDenied { peer, region, .. }) => {
            assert_eq!((peer, region), (NodeId(1), GUARDED));
        }
        other => panic!("a write past the grant gave {other:?}"),
    }
    let mut got = vec![0u8; data.len()];
    g[1].memory(GUARDED)
        .unwrap()
        .read(MAX_WRITE_PAYLOAD as u64, &mut got)
        .unwrap();
    assert!(
        got.iter().all(|b| *b == 0),
        "a refused chunked write landed"
    );
    // The link still works.
    let wr = g[0]
        .post_write(
            NodeId(1),
            RemoteAddr::new(GUARDED, 0),
            Source::Inline(b"ok"),
            None,
            Signal::Always,
        )
        .unwrap();
    g[0].wait(wr, WAIT).unwrap();
}

#[test]
fn posting_far_more_than_the_window_completes_every_write_in_order() {
    let g = group();
    let count = 4 * SEND_WINDOW as u64;
    let mut last = None;
    for i in 0..count {
        let at = RemoteAddr::new(BIG, 8 * i);
        let bytes = i.to_le_bytes();
        let signal = if i + 1 == count {
            Signal::Always
        } else {
            Signal::OnError
        };
        let post = || g[0].post_write(NodeId(1), at, Source::Inline(&bytes), None, signal);
        last = Some(post_retrying(&g[0], "a write", post).unwrap());
    }
    g[0].wait(last.unwrap(), WAIT).unwrap();
    let region = g[1].memory(BIG).unwrap();
    for i in 0..count {
        assert_eq!(region.load_u64(8 * i).unwrap(), i);
    }
}

#[test]
fn an_injected_delay_over_tcp_holds_every_operation_for_at_least_a_round_trip() {
    // A lower bound only: a loaded machine can make it slower, never faster.
    let delay = Duration::from_millis(20);
    let g: Vec<Delayed> = group()
        .into_iter()
        .map(|ep| Delayed::new(Arc::new(ep), regions(), delay).unwrap())
        .collect();
    let at = RemoteAddr::new(BIG, 0);
    for _ in 0..3 {
        let started = Instant::now();
        let wr = g[0]
            .post_write(NodeId(1), at, Source::Inline(b"slow"), None, Signal::Always)
            .unwrap();
        g[0].wait(wr, WAIT).unwrap();
        let took = started.elapsed();
        assert!(
            took >= 2 * delay,
            "a write completed after {took:?} < 2 x {delay:?}"
        );
        let started = Instant::now();
        let wr = g[0].post_fetch_add(NodeId(0), at, 1).unwrap();
        g[0].wait(wr, WAIT).unwrap();
        assert!(started.elapsed() >= 2 * delay, "loopback ignored the delay");
    }
}

#[test]
fn a_node_closing_right_after_receiving_still_acknowledges() {
    let mut g = group();
    let one = g.pop().unwrap();
    let zero = g.pop().unwrap();
    let wr = zero
        .post_send(NodeId(1), b"last words", Signal::Always)
        .unwrap();
    match one.recv(WAIT).unwrap() {
        Some(Incoming::Message { data, .. }) => assert_eq!(data, b"last words"),
        other => panic!("expected the message, got {other:?}"),
    }
    // Its acknowledgement was deferred for an answer that never comes: closing sends it.
    drop(one);
    zero.wait(wr, WAIT)
        .expect("the message was acknowledged before its target closed");
}
