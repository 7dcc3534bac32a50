//! The conformance suite on the simulated backend, under several seeds, group sizes and an
//! injected delay. A failure names its seed; `VSMP_SIM_SEED=<seed>` replays only that seed.
//! (The simulator has no bootstrap, so the refused-handshake check runs on shm and tcp.)

use std::time::Duration;

use vsmp_fabric::NodeId;
use vsmp_fabric::conformance;
use vsmp_fabric::sim::{SimGroup, SimOptions};

fn seeds() -> Vec<u64> {
    match std::env::var("VSMP_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("VSMP_SIM_SEED is a u64")],
        Err(_) => vec![1, 2, 3, 0x5eed_cafe],
    }
}

fn run_suite(nodes: usize, options: SimOptions) {
    let seed = options.seed;
    let group = SimGroup::new(nodes, conformance::regions(), options).expect("a simulated group");
    if let Err(e) = conformance::run_all(&group.endpoints()) {
        panic!("seed {seed} ({nodes} nodes): {e}\nreplay with VSMP_SIM_SEED={seed}");
    }
}

#[test]
fn the_suite_passes_on_the_simulator_under_every_seed() {
    for seed in seeds() {
        let nodes = 2 + (seed as usize % 3);
        run_suite(nodes, SimOptions::seeded(seed));
    }
}

#[test]
fn the_suite_passes_on_the_simulator_with_an_injected_delay() {
    for seed in seeds().into_iter().take(1) {
        let mut options = SimOptions::seeded(seed);
        options.delay = Duration::from_micros(50);
        run_suite(3, options);
    }
}

#[test]
fn a_killed_simulated_node_is_reported_dead_by_every_survivor() {
    for seed in seeds() {
        let mut options = SimOptions::seeded(seed);
        options.heartbeat_timeout = Duration::from_millis(200);
        let group = SimGroup::new(3, conformance::regions(), options).expect("a simulated group");
        let eps = group.endpoints();
        let victim = NodeId(1);
        let survivors = vec![eps[0].clone(), eps[2].clone()];
        let r = conformance::killed_peer_is_reported(
            &survivors,
            victim,
            Duration::from_millis(200),
            || group.kill(victim),
        );
        if let Err(e) = r {
            panic!("seed {seed}: {e}\nreplay with VSMP_SIM_SEED={seed}");
        }
    }
}
