//! A killed (or stopped, hence silent) shm node process is reported as `PeerDead` naming it,
//! by every survivor.
//!
//! The victim is this test binary re-executed as a node (`VSMP_SHM_CHILD_RANK` set): it joins
//! the group, answers a doorbell with what it reads in its region (proving the cross-process
//! data path), and serves until SIGKILLed. It also dies with its parent (PR_SET_PDEATHSIG),
//! and the parent's guard kills and reaps it, so no process is left behind.

use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use vsmp_fabric::conformance::{self, DATA, SRC};
use vsmp_fabric::shm::ShmFabric;
use vsmp_fabric::{
    Fabric, GroupConfig, Incoming, LocalSlice, NodeId, RemoteAddr, SECRET_ENV, Secret, Signal,
    Source,
};

const NODES: usize = 3;
const CHILD_RANK: u16 = 2;
const HEARTBEAT: Duration = Duration::from_secs(1);
const RANK_ENV: &str = "VSMP_SHM_CHILD_RANK";
const PATH_ENV: &str = "VSMP_SHM_CHILD_PATH";

fn config(rank: u16, path: &str, secret: Secret) -> GroupConfig {
    let mut cfg = GroupConfig::new(NodeId(rank), NODES, conformance::regions(), path, secret);
    cfg.heartbeat_timeout = HEARTBEAT;
    cfg.connect_timeout = Duration::from_secs(20);
    cfg
}

/// The child node's body, run only when a death test re-executes this binary with --ignored.
#[test]
#[ignore = "a node process's body, run only when a test re-executes this binary with --ignored"]
fn child_node_process() {
    let Ok(rank) = std::env::var(RANK_ENV) else {
        panic!("child_node_process runs only inside a node process started by another test");
    };
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).expect("pdeathsig");
    let rank: u16 = rank.parse().expect("a rank");
    let path = std::env::var(PATH_ENV).expect("a bootstrap path");
    let secret = Secret::from_env()
        .expect("a valid secret")
        .expect("a secret");
    let ep = ShmFabric::join(&config(rank, &path, secret)).expect("the child joins");
    loop {
        match ep.recv(Duration::from_secs(1)) {
            Ok(Some(Incoming::Doorbell { from, imm })) => {
                let mut buf = vec![0; imm as usize];
                ep.memory(DATA).unwrap().read(0, &mut buf).unwrap();
                let wr = ep.post_send(from, &buf, Signal::Always).unwrap();
                ep.wait(wr, Duration::from_secs(5)).unwrap();
            }
            Ok(_) => {}
            Err(e) => panic!("child: {e}"),
        }
    }
}

/// Kills and reaps the child however the test ends.
struct ChildGuard(Child);

impl ChildGuard {
    fn stop(&self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    }

    fn kill(&mut self) {
        let _ = self.0.kill(); // SIGKILL
        let _ = self.0.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_child(path: &Path, secret: &Secret) -> ChildGuard {
    let exe = std::env::current_exe().expect("the test binary");
    let child = Command::new(exe)
        .args([
            "--ignored",
            "--exact",
            "child_node_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(RANK_ENV, CHILD_RANK.to_string())
        .env(PATH_ENV, path)
        .env(
            SECRET_ENV,
            std::str::from_utf8(secret.expose()).expect("a hex secret"),
        )
        .spawn()
        .expect("spawning the child node");
    ChildGuard(child)
}

/// Forms the group with the child as its last rank and checks the cross-process data path:
/// the child sees our data when our doorbell arrives and sends it back.
fn group_with_child(path: &Path, secret: &Secret) -> Vec<Arc<dyn Fabric>> {
    let path_str = path.to_str().unwrap();
    let group: Vec<Arc<dyn Fabric>> = std::thread::scope(|s| {
        let joins: Vec<_> = (0..CHILD_RANK)
            .map(|r| {
                let secret = secret.clone();
                s.spawn(move || ShmFabric::join(&config(r, path_str, secret)))
            })
            .collect();
        joins
            .into_iter()
            .map(|j| Arc::new(j.join().unwrap().expect("shm join")) as Arc<dyn Fabric>)
            .collect()
    });
    let data = conformance::pattern(42, 4096);
    let at = RemoteAddr::new(DATA, 0);
    group[0].memory(SRC).unwrap().write(0, &data).unwrap();
    let src = Source::Region(LocalSlice::new(SRC, 0, data.len() as u64));
    let wr = group[0]
        .post_write(
            NodeId(CHILD_RANK),
            at,
            src,
            Some(data.len() as u32),
            Signal::Always,
        )
        .unwrap();
    group[0].wait(wr, Duration::from_secs(10)).unwrap();
    let reply = match group[0].recv(Duration::from_secs(20)).unwrap() {
        Some(Incoming::Message { from, data }) if from == NodeId(CHILD_RANK) => data,
        Some(other) => panic!("unexpected {other:?}"),
        None => panic!("the child never answered"),
    };
    assert_eq!(reply, data);
    group
}

#[test]
fn a_killed_shm_peer_process_is_reported_dead_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("boot");
    let secret = Secret::generate().unwrap();
    let mut child = spawn_child(&path, &secret);
    let group = group_with_child(&path, &secret);
    conformance::killed_peer_is_reported(&group, NodeId(CHILD_RANK), HEARTBEAT, || child.kill())
        .unwrap();
}

#[test]
fn a_stopped_shm_peer_process_is_reported_dead_once_silent_past_the_heartbeat_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("boot");
    let secret = Secret::generate().unwrap();
    let child = spawn_child(&path, &secret);
    let group = group_with_child(&path, &secret);
    conformance::killed_peer_is_reported(&group, NodeId(CHILD_RANK), HEARTBEAT, || child.stop())
        .unwrap();
    // The guard kills and reaps the stopped child.
}
