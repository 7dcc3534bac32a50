//! The conformance suite on the shm backend: a group of endpoints in this process (each
//! joined through the real Unix-socket bootstrap and mapping the others' memfds), plus a join
//! with a wrong secret. The killed-peer check needs a separate process: `shm_peer_death.rs`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vsmp_fabric::delay::Delayed;
use vsmp_fabric::shm::ShmFabric;
use vsmp_fabric::{Fabric, FabricError, GroupConfig, Memory, NodeId, Secret, conformance};

fn config(rank: u16, nodes: usize, path: &Path, secret: &Secret) -> GroupConfig {
    let mut cfg = GroupConfig::new(
        NodeId(rank),
        nodes,
        conformance::regions(),
        path.to_str().expect("a UTF-8 temp path"),
        secret.clone(),
    );
    cfg.connect_timeout = Duration::from_secs(20);
    cfg
}

fn form_group(nodes: usize, path: &Path, secret: &Secret) -> Vec<Arc<dyn Fabric>> {
    form_group_with(nodes, path, secret, |cfg| cfg)
}

fn form_group_with(
    nodes: usize,
    path: &Path,
    secret: &Secret,
    tweak: impl Fn(GroupConfig) -> GroupConfig + Sync,
) -> Vec<Arc<dyn Fabric>> {
    std::thread::scope(|s| {
        let joins: Vec<_> = (0..nodes as u16)
            .map(|r| {
                let tweak = &tweak;
                s.spawn(move || ShmFabric::join(&tweak(config(r, nodes, path, secret))))
            })
            .collect();
        joins
            .into_iter()
            .map(|j| Arc::new(j.join().expect("join thread").expect("shm join")) as Arc<dyn Fabric>)
            .collect()
    })
}

#[test]
fn the_suite_passes_on_shm_with_three_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let secret = Secret::generate().unwrap();
    let group = form_group(3, &dir.path().join("boot"), &secret);
    conformance::run_all(&group).unwrap();
}

#[test]
fn the_suite_passes_on_shm_through_the_delay_decorator() {
    let dir = tempfile::tempdir().unwrap();
    let secret = Secret::generate().unwrap();
    let group = form_group(2, &dir.path().join("boot"), &secret)
        .into_iter()
        .map(|ep| {
            let d = Delayed::new(ep, conformance::regions(), Duration::from_micros(20)).unwrap();
            Arc::new(d) as Arc<dyn Fabric>
        })
        .collect::<Vec<_>>();
    conformance::run_all(&group).unwrap();
}

/// A memfd of the test's own, registered for `OWNED`, and a second mapping of it the test
/// keeps (through `/proc/self/fd`, so it is the same file, not a copy).
fn caller_memory() -> (Arc<Memory>, Memory) {
    let m = Memory::create(conformance::OWNED, conformance::OWNED_BYTES).unwrap();
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&m.fd()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    (
        Arc::new(m),
        Memory::from_file(conformance::OWNED, file).unwrap(),
    )
}

#[test]
fn memory_the_caller_registered_is_the_region_on_shm() {
    let dir = tempfile::tempdir().unwrap();
    let secret = Secret::generate().unwrap();
    let mine: Vec<(Arc<Memory>, Memory)> = (0..3).map(|_| caller_memory()).collect();
    let group = form_group_with(3, &dir.path().join("boot"), &secret, |cfg| {
        let r = cfg.rank.index();
        cfg.register(Arc::clone(&mine[r].0))
    });
    let views: Vec<Memory> = mine.into_iter().map(|(_, view)| view).collect();
    conformance::registered_memory_is_the_region(&group, &views).unwrap();
}

#[test]
fn a_join_with_the_wrong_secret_is_refused_and_the_group_still_forms_and_works() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("boot");
    let secret = Secret::generate().unwrap();
    let wrong = Secret::generate().unwrap();
    std::thread::scope(|s| {
        let rank0 = s.spawn(|| ShmFabric::join(&config(0, 2, &path, &secret)));
        // The intruder reaches rank 0 first (it retries until rank 0 listens).
        let intruder: Result<ShmFabric, FabricError> =
            ShmFabric::join(&config(1, 2, &path, &wrong));
        let rank1 = ShmFabric::join(&config(1, 2, &path, &secret)).expect("the real rank 1 joins");
        let rank0 = rank0.join().unwrap().expect("rank 0 forms the group");
        let group: Vec<Arc<dyn Fabric>> = vec![Arc::new(rank0), Arc::new(rank1)];
        conformance::refused_join_leaves_group_working(intruder, &group).unwrap();
    });
}

#[test]
fn a_join_with_a_different_region_layout_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("boot");
    let secret = Secret::generate().unwrap();
    std::thread::scope(|s| {
        let rank0 = s.spawn(|| {
            let mut cfg = config(0, 2, &path, &secret);
            cfg.connect_timeout = Duration::from_secs(2);
            ShmFabric::join(&cfg)
        });
        let mut cfg = config(1, 2, &path, &secret);
        cfg.regions.pop();
        let err = ShmFabric::join(&cfg).unwrap_err();
        assert!(
            err.to_string().contains("regions") || matches!(err, FabricError::Handshake { .. }),
            "{err}"
        );
        let err0 = rank0.join().unwrap().unwrap_err();
        assert!(matches!(err0, FabricError::Timeout { .. }), "{err0}");
    });
}
