//! A producer facing a full ring of a live but idle peer gives up with `Timeout` within the
//! heartbeat bound instead of hanging, loses nothing it had posted, and works again once the
//! peer drains.

use std::sync::Arc;
use std::time::Duration;

use vsmp_fabric::shm::ShmFabric;
use vsmp_fabric::{
    Fabric, FabricError, GroupConfig, Incoming, MAX_MESSAGE_BYTES, NodeId, Secret, conformance,
};

#[test]
fn a_full_ring_to_an_idle_peer_times_out_then_drains_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("boot");
    let path = path.to_str().unwrap();
    let secret = Secret::generate().unwrap();
    let group: Vec<Arc<dyn Fabric>> = std::thread::scope(|s| {
        let joins: Vec<_> = (0..2u16)
            .map(|r| {
                let secret = secret.clone();
                s.spawn(move || {
                    let mut cfg =
                        GroupConfig::new(NodeId(r), 2, conformance::regions(), path, secret);
                    cfg.heartbeat_timeout = Duration::from_secs(1);
                    ShmFabric::join(&cfg)
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| Arc::new(j.join().unwrap().unwrap()) as Arc<dyn Fabric>)
            .collect()
    });
    let message = |k: usize| conformance::pattern(k as u64, MAX_MESSAGE_BYTES);
    let mut sent = 0;
    let err = loop {
        match group[0].post_send(NodeId(1), &message(sent)) {
            Ok(_) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 1000, "the ring never filled");
    };
    assert!(matches!(err, FabricError::Timeout { .. }), "{err}");
    assert!(sent > 0);
    for k in 0..sent {
        match group[1].recv(Duration::from_secs(10)).unwrap() {
            Some(Incoming::Message {
                from: NodeId(0),
                data,
            }) => assert!(data == message(k)),
            other => panic!("message {k}: {other:?}"),
        }
    }
    let wr = group[0].post_send(NodeId(1), b"again").unwrap();
    group[0].wait(wr, Duration::from_secs(10)).unwrap();
    assert_eq!(
        group[1].recv(Duration::from_secs(10)).unwrap(),
        Some(Incoming::Message {
            from: NodeId(0),
            data: b"again".to_vec()
        })
    );
}
