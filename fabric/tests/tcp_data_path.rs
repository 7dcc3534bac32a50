//! The tcp data path beyond the conformance suite: writes larger than one frame (sent as
//! chunks), grants checked over a whole chunked write, the in-flight window, and the injected
//! delay.

use std::time::{Duration, Instant};

use vsmp_fabric::tcp::frame::MAX_WRITE_PAYLOAD;
use vsmp_fabric::tcp::{TcpFabric, WINDOW};
use vsmp_fabric::{
    Fabric, FabricError, Grant, GroupConfig, Incoming, NodeId, RegionId, RegionSpec, RemoteAddr,
    Secret,
};

const BIG: RegionId = RegionId(1);
const GUARDED: RegionId = RegionId(2);
const BIG_BYTES: usize = 4 * MAX_WRITE_PAYLOAD;
const WAIT: Duration = Duration::from_secs(30);

fn group(delay: Duration) -> Vec<TcpFabric> {
    let regions = vec![
        RegionSpec::open(BIG, BIG_BYTES),
        RegionSpec {
            id: GUARDED,
            len: BIG_BYTES,
            grants: vec![Grant {
                peer: None,
                range: 0..(2 * MAX_WRITE_PAYLOAD) as u64,
            }],
        },
    ];
    let secret = Secret::from_bytes(b"tcp-data-path-secret".to_vec()).unwrap();
    let mut cfg = GroupConfig::new(NodeId(0), 2, regions, "unused", secret);
    cfg.delay = delay;
    TcpFabric::local_group(&cfg).expect("a local tcp group")
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn a_write_larger_than_one_frame_arrives_whole_before_its_doorbell() {
    let g = group(Duration::ZERO);
    let data = pattern(3 * MAX_WRITE_PAYLOAD + 5, 7);
    let at = RemoteAddr {
        region: BIG,
        offset: 3,
    };
    let wr = g[0].post_write_imm(NodeId(1), at, &data, 42).unwrap();
    match g[1].recv(WAIT).unwrap() {
        Some(Incoming::Doorbell { from, imm: 42 }) => assert_eq!(from, NodeId(0)),
        other => panic!("expected the doorbell, got {other:?}"),
    }
    let mut got = vec![0u8; data.len()];
    g[1].region(BIG).unwrap().read(3, &mut got).unwrap();
    assert!(got == data, "the chunked write arrived damaged");
    g[0].wait(wr, WAIT).unwrap();
}

#[test]
fn a_chunked_write_reaching_past_its_grant_is_refused_whole() {
    let g = group(Duration::ZERO);
    // Starts inside the grant, ends past it: no byte may land.
    let data = vec![0xee; 2 * MAX_WRITE_PAYLOAD];
    let at = RemoteAddr {
        region: GUARDED,
        offset: MAX_WRITE_PAYLOAD as u64,
    };
    let wr = g[0].post_write(NodeId(1), at, &data).unwrap();
    match g[0].wait(wr, WAIT) {
        Err(FabricError::AccessDenied { peer, region, .. }) => {
            assert_eq!((peer, region), (NodeId(1), GUARDED));
        }
        other => panic!("a write past the grant gave {other:?}"),
    }
    let mut got = vec![0u8; data.len()];
    g[1].region(GUARDED)
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
            RemoteAddr {
                region: GUARDED,
                offset: 0,
            },
            b"ok",
        )
        .unwrap();
    g[0].wait(wr, WAIT).unwrap();
}

#[test]
fn posting_far_more_than_the_window_without_waiting_completes_every_write() {
    let g = group(Duration::ZERO);
    let count = 4 * WINDOW as u64;
    let mut last = None;
    for i in 0..count {
        let at = RemoteAddr {
            region: BIG,
            offset: 8 * i,
        };
        last = Some(g[0].post_write(NodeId(1), at, &i.to_le_bytes()).unwrap());
    }
    g[0].wait(last.unwrap(), WAIT).unwrap();
    let region = g[1].region(BIG).unwrap();
    for i in 0..count {
        assert_eq!(region.load_u64(8 * i).unwrap(), i);
    }
}

#[test]
fn an_injected_delay_holds_every_operation_for_at_least_a_round_trip() {
    // A lower bound only: a loaded machine can make it slower, never faster.
    let delay = Duration::from_millis(20);
    let g = group(delay);
    let at = RemoteAddr {
        region: BIG,
        offset: 0,
    };
    for _ in 0..3 {
        let started = Instant::now();
        let wr = g[0].post_write(NodeId(1), at, b"slow").unwrap();
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
fn a_node_closing_right_after_receiving_still_acknowledges_under_a_delay() {
    let mut g = group(Duration::from_millis(20));
    let one = g.pop().unwrap();
    let zero = g.pop().unwrap();
    let wr = zero.post_send(NodeId(1), b"last words").unwrap();
    match one.recv(WAIT).unwrap() {
        Some(Incoming::Message { data, .. }) => assert_eq!(data, b"last words"),
        other => panic!("expected the message, got {other:?}"),
    }
    // Its acknowledgement is still waiting for its due time: closing must send it first.
    drop(one);
    zero.wait(wr, WAIT)
        .expect("the message was acknowledged before its target closed");
}
