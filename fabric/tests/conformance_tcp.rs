//! The conformance suite (`vsmp_fabric::conformance`) on the tcp backend: groups of tcp
//! endpoints on 127.0.0.1, one per thread, with and without an injected delay.

use std::sync::Arc;
use std::time::Duration;

use vsmp_fabric::conformance;
use vsmp_fabric::tcp::TcpFabric;
use vsmp_fabric::{Fabric, GroupConfig, NodeId, Secret};

fn template(nodes: usize) -> GroupConfig {
    let secret = Secret::from_bytes(b"conformance-tcp-secret".to_vec()).unwrap();
    GroupConfig::new(NodeId(0), nodes, conformance::regions(), "unused", secret)
}

fn group(cfg: &GroupConfig) -> Vec<Arc<dyn Fabric>> {
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
fn the_suite_passes_on_tcp_with_an_injected_delay() {
    let mut cfg = template(3);
    cfg.delay = Duration::from_micros(200);
    let g = group(&cfg);
    conformance::run_all(&g).unwrap_or_else(|e| panic!("tcp, 3 nodes, 200us delay: {e}"));
}
