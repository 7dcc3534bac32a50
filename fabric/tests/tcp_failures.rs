//! The tcp backend under failure: a node process killed or frozen, a join with the wrong
//! secret, a member sending garbled or oversized frames, a member writing outside its grant.
//!
//! Multi-process tests re-execute this test binary as a node (`child_node_process` with
//! `VSMP_TCP_CHILD` set); every child is killed and reaped by a guard, even when a test fails.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vsmp_fabric::conformance::{self, DATA, GUARDED, GUARDED_GRANT_BYTES};
use vsmp_fabric::tcp::TcpFabric;
use vsmp_fabric::tcp::frame::{HEADER_BYTES, Header, Kind, MAX_WRITE_PAYLOAD, NackReason};
use vsmp_fabric::{
    DeathCause, Fabric, FabricError, GroupConfig, Incoming, NodeId, RemoteAddr, Secret, Signal,
    Source,
};

const CHILD_ENV: &str = "VSMP_TCP_CHILD";
const BOOT_ENV: &str = "VSMP_TCP_CHILD_BOOTSTRAP";
const NODES_ENV: &str = "VSMP_TCP_CHILD_NODES";
const HEARTBEAT: Duration = Duration::from_millis(300);
/// A child node exits by itself after this, whatever happens to its parent.
const CHILD_LIFETIME: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(20);

fn secret() -> Secret {
    Secret::from_bytes(b"tcp-failures-shared-secret".to_vec()).unwrap()
}

fn config(rank: u16, nodes: usize, bootstrap: &str) -> GroupConfig {
    let mut cfg = GroupConfig::new(
        NodeId(rank),
        nodes,
        conformance::regions(),
        bootstrap,
        secret(),
    );
    cfg.heartbeat_timeout = HEARTBEAT;
    cfg.connect_timeout = Duration::from_secs(20);
    cfg
}

/// Not a check: the body of a child node process, run only when `VSMP_TCP_CHILD` names its
/// rank. It joins the group and serves until its parent's node 0 dies or its lifetime ends.
#[test]
#[ignore = "a node process's body, run only when a test re-executes this binary with --ignored"]
fn child_node_process() {
    let Ok(rank) = std::env::var(CHILD_ENV) else {
        panic!("child_node_process runs only inside a node process started by another test");
    };
    let rank: u16 = rank.parse().expect("VSMP_TCP_CHILD is a rank");
    let boot = std::env::var(BOOT_ENV).expect("the bootstrap address");
    let nodes: usize = std::env::var(NODES_ENV).unwrap().parse().unwrap();
    let ep = TcpFabric::join(config(rank, nodes, &boot)).expect("the child joins");
    let born = Instant::now();
    while born.elapsed() < CHILD_LIFETIME {
        if let Err(FabricError::PeerDead {
            peer: NodeId(0), ..
        }) = ep.recv(Duration::from_millis(100))
        {
            break;
        }
    }
    drop(ep);
    std::process::exit(0);
}

/// Kills and reaps the child when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_child(rank: u16, nodes: usize, boot: &str) -> ChildGuard {
    let exe = std::env::current_exe().unwrap();
    let child = Command::new(exe)
        .args([
            "--ignored",
            "--exact",
            "child_node_process",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_ENV, rank.to_string())
        .env(BOOT_ENV, boot)
        .env(NODES_ENV, nodes.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning a child node");
    ChildGuard(child)
}

/// A 3-node group: ranks 0 and 2 in this process, rank 1 in a child process.
fn group_with_child() -> (Arc<dyn Fabric>, Arc<dyn Fabric>, ChildGuard) {
    let (listener, addr) = TcpFabric::listen(config(0, 3, "127.0.0.1:0")).unwrap();
    let boot = addr.to_string();
    let child = spawn_child(1, 3, &boot);
    let cfg2 = config(2, 3, &boot);
    let two = thread::spawn(move || TcpFabric::join(cfg2));
    let zero = listener.accept_group().expect("rank 0 forms the group");
    let two = two.join().unwrap().expect("rank 2 joins");
    (Arc::new(zero), Arc::new(two), child)
}

#[test]
fn a_killed_node_process_is_reported_dead_naming_it_by_every_survivor() {
    let (zero, two, mut child) = group_with_child();
    // The child is alive and serving: a write to it completes.
    let wr = zero
        .post_write(
            NodeId(1),
            RemoteAddr::new(DATA, 0),
            Source::Inline(b"alive?"),
            None,
            Signal::Always,
        )
        .unwrap();
    zero.wait(wr, WAIT).expect("the child acknowledges");
    let started = Instant::now();
    conformance::killed_peer_is_reported(&[zero, two], NodeId(1), HEARTBEAT, || {
        child.0.kill().expect("SIGKILL the child");
    })
    .unwrap();
    eprintln!(
        "a killed node was reported dead after {:?}",
        started.elapsed()
    );
}

#[test]
fn a_frozen_node_process_is_reported_dead_after_the_heartbeat_timeout() {
    let (zero, two, child) = group_with_child();
    let pid = child.0.id().to_string();
    let started = Instant::now();
    conformance::killed_peer_is_reported(&[zero.clone(), two], NodeId(1), HEARTBEAT, || {
        let ok = Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .expect("running kill -STOP")
            .success();
        assert!(ok, "kill -STOP {pid} failed");
    })
    .unwrap();
    eprintln!(
        "a frozen (SIGSTOP) node was reported dead after {:?} (heartbeat timeout {HEARTBEAT:?})",
        started.elapsed()
    );
    match zero.post_send(NodeId(1), b"still there?", Signal::Always) {
        Err(FabricError::PeerDead { peer, cause }) => {
            assert_eq!(peer, NodeId(1));
            assert_eq!(cause, DeathCause::Silent);
        }
        other => panic!("a post to the frozen node gave {other:?}"),
    }
}

#[test]
fn a_join_with_the_wrong_secret_is_refused_and_the_honest_group_forms() {
    let (listener, addr) = TcpFabric::listen(config(0, 3, "127.0.0.1:0")).unwrap();
    let boot = addr.to_string();
    let mut rogue_cfg = config(1, 3, &boot);
    rogue_cfg.secret = Secret::from_bytes(b"not-the-group-secret".to_vec()).unwrap();
    // The impostor claims rank 1 and comes first; it must not take rank 1's place.
    let rogue = thread::spawn(move || TcpFabric::join(rogue_cfg));
    thread::sleep(Duration::from_millis(50));
    let honest: Vec<_> = [1u16, 2]
        .into_iter()
        .map(|r| {
            let cfg = config(r, 3, &boot);
            thread::spawn(move || TcpFabric::join(cfg))
        })
        .collect();
    let mut group: Vec<Arc<dyn Fabric>> = vec![Arc::new(listener.accept_group().unwrap())];
    for h in honest {
        group.push(Arc::new(h.join().unwrap().expect("an honest node joins")));
    }
    let rogue = rogue.join().unwrap();
    match &rogue {
        Err(e @ FabricError::Handshake { .. }) => {
            eprintln!("the impostor was refused: {e}");
            assert!(e.to_string().contains("wrong secret"), "{e}");
        }
        other => panic!("the impostor's join gave {other:?}"),
    }
    conformance::refused_join_leaves_group_working(rogue, &group).unwrap();
}

/// The rogue's raw connections, by peer rank.
type RogueSockets = Vec<Option<TcpStream>>;

/// A group whose rank 2 is a rogue member (it knows the secret) holding raw sockets. It sends
/// no heartbeats, so the group's heartbeat timeout is long here.
fn group_with_rogue() -> (Arc<dyn Fabric>, Arc<dyn Fabric>, RogueSockets) {
    let patient = |rank, boot: &str| {
        let mut cfg = config(rank, 3, boot);
        cfg.heartbeat_timeout = Duration::from_secs(15);
        cfg
    };
    let (listener, addr) = TcpFabric::listen(patient(0, "127.0.0.1:0")).unwrap();
    let boot = addr.to_string();
    let cfg1 = patient(1, &boot);
    let one = thread::spawn(move || TcpFabric::join(cfg1));
    let cfg2 = patient(2, &boot);
    let rogue = thread::spawn(move || vsmp_fabric::tcp::connect_raw(&cfg2));
    let zero = listener.accept_group().unwrap();
    let one = one.join().unwrap().unwrap();
    let conns = rogue.join().unwrap().unwrap();
    (Arc::new(zero), Arc::new(one), conns)
}

/// Waits for `ep` to report `peer` dead; why.
fn reported_dead(ep: &dyn Fabric, peer: NodeId) -> DeathCause {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match ep.recv(Duration::from_millis(100)) {
            Err(FabricError::PeerDead { peer: p, cause }) if p == peer => return cause,
            Err(e) => panic!("{}: unexpected error {e}", ep.rank()),
            Ok(_) => {}
        }
    }
    panic!("{} never reported {peer} dead", ep.rank());
}

/// Nodes 0 and 1 still exchange writes and doorbells both ways, and loop back to themselves.
fn honest_pair_still_works(zero: &Arc<dyn Fabric>, one: &Arc<dyn Fabric>) {
    for (src, dst) in [(zero, one), (one, zero), (zero, zero)] {
        let at = RemoteAddr::new(DATA, 64 * u64::from(src.rank().0));
        let wr = src
            .post_write(
                dst.rank(),
                at,
                Source::Inline(b"still fine"),
                Some(7),
                Signal::Always,
            )
            .unwrap();
        src.wait(wr, WAIT).unwrap();
        let mut got = [0u8; 10];
        dst.memory(DATA).unwrap().read(at.offset, &mut got).unwrap();
        assert_eq!(&got, b"still fine");
        match dst.recv(WAIT).unwrap() {
            Some(Incoming::Doorbell { from, imm: 7 }) if from == src.rank() => {}
            other => panic!("{}: expected a doorbell, got {other:?}", dst.rank()),
        }
    }
}

#[test]
fn garbled_and_oversized_frames_drop_only_the_sender_and_the_group_works_on() {
    let (zero, one, mut rogue) = group_with_rogue();
    // To node 0: bytes that are no frame at all.
    let to_zero = rogue[0].as_mut().unwrap();
    to_zero.write_all(&[0xab; HEADER_BYTES]).unwrap();
    // To node 1: a well-formed header announcing more than the bound.
    let mut h = Header::new(Kind::Write);
    h.region = DATA.0;
    h.len = MAX_WRITE_PAYLOAD as u32 + 1;
    // `encode` writes the length as given; the receiver's decoding must refuse it.
    rogue[1].as_mut().unwrap().write_all(&h.encode()).unwrap();

    assert_eq!(reported_dead(&*zero, NodeId(2)), DeathCause::Protocol);
    assert_eq!(reported_dead(&*one, NodeId(2)), DeathCause::Protocol);
    honest_pair_still_works(&zero, &one);
    match zero.post_write(
        NodeId(2),
        RemoteAddr::new(DATA, 0),
        Source::Inline(b"x"),
        None,
        Signal::Always,
    ) {
        Err(FabricError::PeerDead { peer, .. }) => assert_eq!(peer, NodeId(2)),
        other => panic!("a post to the dropped rogue gave {other:?}"),
    }
}

#[test]
fn a_raw_write_outside_the_grant_is_refused_at_the_target_which_stays_untouched() {
    let (zero, one, mut rogue) = group_with_rogue();
    let s = rogue[0].as_mut().unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let send_write = |s: &mut TcpStream, wr: u64, offset: u64, data: &[u8]| {
        let mut h = Header::new(Kind::Write);
        h.region = GUARDED.0;
        h.offset = offset;
        h.len = data.len() as u32;
        h.wr = wr;
        s.write_all(&h.encode()).unwrap();
        s.write_all(data).unwrap();
    };
    // Reads the next answer, skipping heartbeats.
    let answer = |s: &mut TcpStream| loop {
        let mut raw = [0u8; HEADER_BYTES];
        s.read_exact(&mut raw).unwrap();
        let h = Header::decode(&raw).unwrap();
        if h.kind != Kind::Heartbeat {
            return h;
        }
    };
    send_write(s, 1, GUARDED_GRANT_BYTES, &[0xee; 16]);
    let nack = answer(s);
    assert_eq!(nack.kind, Kind::Nack);
    assert_eq!((nack.wr, nack.imm), (1, NackReason::AccessDenied as u32));
    let mut past = [0u8; 16];
    zero.memory(GUARDED)
        .unwrap()
        .read(GUARDED_GRANT_BYTES, &mut past)
        .unwrap();
    assert_eq!(past, [0u8; 16], "a refused write changed the region");

    // The connection is still usable: a write inside the grant is applied and acknowledged.
    send_write(s, 2, 0, b"inside");
    let ack = answer(s);
    assert_eq!((ack.kind, ack.wr), (Kind::Ack, 2));
    let mut inside = [0u8; 6];
    zero.memory(GUARDED).unwrap().read(0, &mut inside).unwrap();
    assert_eq!(&inside, b"inside");
    honest_pair_still_works(&zero, &one);
}

#[test]
fn a_join_with_another_region_layout_is_refused_and_a_silent_stranger_stalls_nobody() {
    let (listener, addr) = TcpFabric::listen(config(0, 2, "127.0.0.1:0")).unwrap();
    let boot = addr.to_string();
    let zero = thread::spawn(move || listener.accept_group());
    // A stranger connects and never says a word: its handshake times out on its own thread.
    let _stranger = TcpStream::connect(addr).unwrap();
    let mut odd = config(1, 2, &boot);
    odd.regions.pop();
    match TcpFabric::join(odd) {
        Err(e @ FabricError::Handshake { .. }) => {
            assert!(e.to_string().contains("layout"), "{e}");
        }
        other => panic!("a join with another layout gave {other:?}"),
    }
    let one: Arc<dyn Fabric> = Arc::new(TcpFabric::join(config(1, 2, &boot)).unwrap());
    let zero: Arc<dyn Fabric> = Arc::new(zero.join().unwrap().unwrap());
    conformance::group_still_works(&[zero, one]).unwrap();
}
