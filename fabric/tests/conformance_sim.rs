//! The conformance suite on the deterministic simulator, under several seeds, group sizes and
//! an injected delay, plus its exact-replay property. A failure names its seed;
//! `VSMP_SIM_SEED=<seed>` replays only that seed. (The simulator has no bootstrap, so the
//! refused-handshake check runs on shm and tcp.)

use std::sync::Arc;
use std::time::Duration;

use vsmp_fabric::conformance;
use vsmp_fabric::delay::Delayed;
use vsmp_fabric::sim::{LogEntry, LogKind, SimGroup, SimOptions, SplitMix64};
use vsmp_fabric::{
    Completion, Fabric, IncomingBatch, Memory, NodeId, RegionId, RegionSpec, RemoteAddr, Signal,
    Source,
};

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
fn the_suite_passes_on_the_simulator_with_a_simulated_delay() {
    for seed in seeds().into_iter().take(1) {
        let mut options = SimOptions::seeded(seed);
        options.delay = 50_000;
        run_suite(3, options);
    }
}

#[test]
fn the_suite_passes_through_the_delay_decorator_over_the_simulator() {
    let group = SimGroup::new(2, conformance::regions(), SimOptions::seeded(7)).unwrap();
    let delayed: Vec<Arc<dyn Fabric>> = group
        .endpoints()
        .into_iter()
        .map(|ep| {
            Arc::new(Delayed::new(ep, conformance::regions(), Duration::from_micros(20)).unwrap())
                as Arc<dyn Fabric>
        })
        .collect();
    conformance::run_all(&delayed).unwrap();
}

#[test]
fn memory_the_caller_registered_is_the_region_on_the_simulator() {
    let mut caller = Vec::new();
    let group = SimGroup::with_memory(
        3,
        conformance::regions(),
        SimOptions::seeded(11),
        |_, spec| {
            (spec.id == conformance::OWNED).then(|| {
                let m = Memory::create(spec.id, spec.len).unwrap();
                caller.push(conformance::second_mapping(&m).unwrap());
                Arc::new(m)
            })
        },
    )
    .unwrap();
    conformance::registered_memory_is_the_region(&group.endpoints(), &caller).unwrap();
}

#[test]
fn a_killed_simulated_node_is_reported_dead_by_every_survivor() {
    for seed in seeds() {
        let mut options = SimOptions::seeded(seed);
        options.heartbeat_timeout = 200_000;
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

const R: RegionId = RegionId(1);
const WORD: RegionId = RegionId(2);

/// A single-threaded workload driven only by `seed`: every node posts writes, doorbells,
/// messages and `fetch_add`s to seeded peers while the harness delivers seeded numbers of
/// events between the nodes' turns. Returns the event log and every node's final memory.
fn seeded_run(seed: u64) -> (Vec<LogEntry>, Vec<Vec<u8>>) {
    let nodes = 3;
    let layout = vec![RegionSpec::open(R, 4096), RegionSpec::open(WORD, 64)];
    let g = SimGroup::new(nodes, layout, SimOptions::manual(seed)).unwrap();
    let mut rng = SplitMix64(seed ^ 0xa11ce);
    let mut batch = IncomingBatch::new(16);
    let mut done = [Completion::EMPTY; 16];
    for turn in 0..400u64 {
        let me = NodeId(rng.below(nodes as u64) as u16);
        let ep = g.endpoint(me);
        let peer = NodeId(rng.below(nodes as u64) as u16);
        let at = RemoteAddr::new(R, 8 * (me.0 as u64 * 64 + turn % 64));
        let _ = match rng.below(4) {
            0 => ep.post_write(
                peer,
                at,
                Source::Inline(&turn.to_le_bytes()),
                None,
                Signal::Always,
            ),
            1 => ep.post_write(peer, at, Source::Empty, Some(turn as u32), Signal::OnError),
            2 => ep.post_send(peer, &turn.to_le_bytes(), Signal::Always),
            _ => ep.post_fetch_add(peer, RemoteAddr::new(WORD, 0), 1),
        };
        batch.clear();
        ep.poll_incoming(&mut batch);
        ep.poll_completions(&mut done);
        for _ in 0..rng.below(4) {
            g.step();
        }
    }
    g.run_until_idle(100_000);
    let memory = (0..nodes)
        .map(|r| {
            let mut b = vec![0u8; 4096];
            g.endpoint(NodeId(r as u16))
                .memory(R)
                .unwrap()
                .read(0, &mut b)
                .unwrap();
            b
        })
        .collect();
    (g.log(), memory)
}

#[test]
fn two_runs_from_one_seed_produce_the_identical_sequence_of_events() {
    for seed in seeds() {
        let (log_a, mem_a) = seeded_run(seed);
        let (log_b, mem_b) = seeded_run(seed);
        assert!(
            log_a.len() > 500,
            "the workload delivered {} events",
            log_a.len()
        );
        assert_eq!(log_a, log_b, "seed {seed}: the event logs differ");
        assert_eq!(mem_a, mem_b, "seed {seed}: the final memory differs");
    }
}

/// The order in which a log delivers the operations of every (source, target) link.
fn per_link(log: &[LogEntry]) -> Vec<Vec<u64>> {
    let mut links = vec![Vec::new(); 9];
    for e in log {
        if matches!(e.kind, LogKind::Write | LogKind::FetchAdd | LogKind::Send) {
            links[e.src.index() * 3 + e.dst.index()].push(e.counter);
        }
    }
    links
}

#[test]
fn different_seeds_reorder_across_peers_but_never_within_a_link() {
    let mut orders = std::collections::HashSet::new();
    for seed in 0..8u64 {
        let (log, _) = seeded_run(seed);
        for (l, counters) in per_link(&log).iter().enumerate() {
            assert!(
                counters.windows(2).all(|w| w[0] < w[1]),
                "seed {seed}: link {l} delivered out of posting order: {counters:?}"
            );
        }
        let shape: Vec<(u16, u16, LogKind)> =
            log.iter().map(|e| (e.src.0, e.dst.0, e.kind)).collect();
        orders.insert(shape);
    }
    assert!(
        orders.len() >= 7,
        "only {} distinct schedules from 8 seeds",
        orders.len()
    );
}

#[test]
fn the_same_posts_under_two_seeds_interleave_two_sources_differently() {
    // Two sources write to one target at once; only the seed differs.
    let order = |seed| {
        let layout = vec![RegionSpec::open(R, 4096)];
        let g = SimGroup::new(3, layout, SimOptions::manual(seed)).unwrap();
        for k in 0..20u64 {
            for s in [0u16, 1] {
                g.endpoint(NodeId(s))
                    .post_write(
                        NodeId(2),
                        RemoteAddr::new(R, 8 * k),
                        Source::Inline(&[s as u8; 8]),
                        None,
                        Signal::OnError,
                    )
                    .unwrap();
            }
        }
        g.run_until_idle(10_000);
        g.log()
            .iter()
            .filter(|e| e.kind == LogKind::Write)
            .map(|e| e.src.0)
            .collect::<Vec<_>>()
    };
    let distinct: std::collections::HashSet<_> = (0..6).map(order).collect();
    assert!(
        distinct.len() > 1,
        "every seed interleaved the two sources the same way"
    );
}
