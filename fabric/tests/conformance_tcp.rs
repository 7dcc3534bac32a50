//! The conformance suite (`vsmp_fabric::conformance`) on the tcp backend: groups of tcp
//! endpoints on 127.0.0.1, one per thread, with and without an injected delay.

use std::sync::Arc;
use std::time::Duration;

use vsmp_fabric::conformance;
use vsmp_fabric::delay::Delayed;
use vsmp_fabric::tcp::TcpFabric;
use vsmp_fabric::{Fabric, GroupConfig, Memory, NodeId, Secret};

fn template(nodes: usize) -> GroupConfig {
    let secret = Secret::from_bytes(b"conformance-tcp-secret".to_vec()).unwrap();
    GroupConfig::new(NodeId(0), nodes, conformance::regions(), "unused", secret)
}

fn group(cfg: &GroupConfig) -> Vec<Arc<dyn Fabric>> {
    // Warnings (a dropped connection, a protocol violation) reach the test's output.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("warn")
        .try_init();
    TcpFabric::local_group(cfg)
        .expect("a local tcp group forms")
        .into_iter()
        .map(|f| Arc::new(f) as Arc<dyn Fabric>)
        .collect()
}

#[test]
fn the_suite_passes_on_tcp_with_two_nodes() {
    let g = group(&template(2));
    conformance::run_all(&g).unwrap_or_else(|e| panic!("tcp, 2 nodes: {e}"));
}

#[test]
fn the_suite_passes_on_tcp_with_four_nodes() {
    let g = group(&template(4));
    conformance::run_all(&g).unwrap_or_else(|e| panic!("tcp, 4 nodes: {e}"));
}

#[test]
fn the_suite_passes_on_tcp_through_the_delay_decorator() {
    let g: Vec<Arc<dyn Fabric>> = group(&template(3))
        .into_iter()
        .map(|ep| {
            let d = Delayed::new(ep, conformance::regions(), Duration::from_micros(200)).unwrap();
            Arc::new(d) as Arc<dyn Fabric>
        })
        .collect();
    conformance::run_all(&g).unwrap_or_else(|e| panic!("tcp, 3 nodes, 200us delay: {e}"));
}

#[test]
fn memory_the_caller_registered_is_the_region_on_tcp() {
    // Each rank registers a memfd of its own, so each needs its own configuration.
    let mine: Vec<Arc<Memory>> = (0..3)
        .map(|_| Arc::new(Memory::create(conformance::OWNED, conformance::OWNED_BYTES).unwrap()))
        .collect();
    let views: Vec<Memory> = mine
        .iter()
        .map(|m| conformance::second_mapping(m).unwrap())
        .collect();
    let mut cfg0 = template(3).register(Arc::clone(&mine[0]));
    cfg0.bootstrap = "127.0.0.1:0".into();
    let (listener, addr) = TcpFabric::listen(cfg0).unwrap();
    let joiners: Vec<_> = (1..3u16)
        .map(|r| {
            let mut cfg = template(3).register(Arc::clone(&mine[r as usize]));
            cfg.rank = NodeId(r);
            cfg.bootstrap = addr.to_string();
            std::thread::spawn(move || TcpFabric::join(cfg).unwrap())
        })
        .collect();
    let mut g: Vec<Arc<dyn Fabric>> = vec![Arc::new(listener.accept_group().unwrap())];
    for j in joiners {
        g.push(Arc::new(j.join().unwrap()));
    }
    conformance::registered_memory_is_the_region(&g, &views).unwrap();
}
