//! The tcp fabric between two network namespaces joined by a veth pair: a real network path
//! (its own addresses, routes and interfaces), not loopback.
//!
//! The test creates two namespaces named after its process id (so parallel runs never
//! collide), links them with a veth pair addressed on the private 10.231.0.0/30 (only inside
//! those namespaces), runs one node process in each (this test binary re-executed through
//! `ip netns exec`), and has them exchange writes, doorbells, `fetch_add`s and messages. The
//! namespaces (and so the veth pair) are deleted afterwards, also when the test fails.
//!
//! Namespaces need root and `ip` (iproute2). Without them the test prints
//! `SKIPPED: ... because ...` to stderr and returns; with `VSMP_REQUIRE_NETNS=1` (CI runs as
//! root and sets it) a skip is a failure instead.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vsmp_fabric::conformance::{self, DATA, SRC, WORDS};
use vsmp_fabric::tcp::TcpFabric;
use vsmp_fabric::{
    Fabric, FabricError, GroupConfig, Incoming, LocalSlice, NodeId, RemoteAddr, Secret, Signal,
    Source,
};

const NODE_ENV: &str = "VSMP_NETNS_NODE";
const REQUIRE_ENV: &str = "VSMP_REQUIRE_NETNS";
const ADDR_A: &str = "10.231.0.1";
const ADDR_B: &str = "10.231.0.2";
const PORT: u16 = 7411;
/// Each node process must finish within this, or it is killed and the test fails.
const NODE_DEADLINE: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(20);
const WRITE_BYTES: usize = 256 * 1024;
const ADDS: u64 = 100;

fn config(rank: u16) -> GroupConfig {
    let secret = Secret::from_bytes(b"netns-test-shared-secret".to_vec()).unwrap();
    let mut cfg = GroupConfig::new(
        NodeId(rank),
        2,
        conformance::regions(),
        format!("{ADDR_A}:{PORT}"),
        secret,
    );
    cfg.connect_timeout = Duration::from_secs(30);
    cfg
}

/// Not a check: the body of a node process inside a namespace, run only when
/// `VSMP_NETNS_NODE` names its rank. Exits 0 when every check of its side passed.
#[test]
#[ignore = "a node process's body, run only when a test re-executes this binary with --ignored"]
fn netns_node_process() {
    let Ok(rank) = std::env::var(NODE_ENV) else {
        panic!("netns_node_process runs only inside a node process started by another test");
    };
    let rank: u16 = rank.parse().expect("VSMP_NETNS_NODE is a rank");
    let ep = TcpFabric::join(config(rank)).expect("joining across the veth pair");
    run_node(&ep).unwrap_or_else(|e| panic!("node {rank}: {e}"));
    drop(ep);
    std::process::exit(0);
}

fn run_node(ep: &TcpFabric) -> Result<(), String> {
    let me = ep.rank();
    let other = NodeId(1 - me.0);
    fn err(what: &'static str) -> impl Fn(FabricError) -> String {
        move |e| format!("{what}: {e}")
    }
    let slot = |n: NodeId| (usize::from(n.0) * conformance::SLOT_BYTES) as u64;
    let data = conformance::pattern(u64::from(me.0) + 1, WRITE_BYTES);
    let at = RemoteAddr::new(DATA, slot(me));
    ep.memory(SRC)
        .and_then(|m| m.write(0, &data))
        .map_err(err("staging the source"))?;
    let src = Source::Region(LocalSlice::new(SRC, 0, data.len() as u64));
    let wr = ep
        .post_write(other, at, src, None, Signal::Always)
        .map_err(err("write"))?;
    ep.wait(wr, WAIT).map_err(err("waiting for the write"))?;
    let bell = RemoteAddr::new(DATA, slot(me) + WRITE_BYTES as u64);
    let imm = Some(100 + u32::from(me.0));
    let wr = ep
        .post_write(other, bell, Source::Inline(b"bell"), imm, Signal::Always)
        .map_err(err("write_imm"))?;
    ep.wait(wr, WAIT).map_err(err("waiting for the doorbell"))?;
    let counter = RemoteAddr::new(WORDS, 0);
    for _ in 0..ADDS {
        let wr = ep
            .post_fetch_add(NodeId(0), counter, 1)
            .map_err(err("fetch_add"))?;
        ep.wait(wr, WAIT).map_err(err("waiting for a fetch_add"))?;
    }
    let wr = ep
        .post_send(other, b"done", Signal::Always)
        .map_err(err("send"))?;
    ep.wait(wr, WAIT).map_err(err("waiting for the send"))?;

    // The other side's doorbell then message, in its posting order.
    let want_imm = 100 + u32::from(other.0);
    match ep.recv(WAIT).map_err(err("recv"))? {
        Some(Incoming::Doorbell { from, imm }) if from == other && imm == want_imm => {}
        got => return Err(format!("expected the doorbell from {other}, got {got:?}")),
    }
    let mut got = vec![0u8; WRITE_BYTES];
    let region = ep.memory(DATA).map_err(err("region"))?;
    region.read(slot(other), &mut got).map_err(err("read"))?;
    if got != conformance::pattern(u64::from(other.0) + 1, WRITE_BYTES) {
        return Err(format!(
            "the write from {other} is not visible at its doorbell"
        ));
    }
    match ep.recv(WAIT).map_err(err("recv"))? {
        Some(Incoming::Message { from, data }) if from == other && data == b"done" => {}
        got => return Err(format!("expected 'done' from {other}, got {got:?}")),
    }
    if me == NodeId(0) {
        // Node 1 waited for its adds before sending "done"; ours were waited too.
        let total = ep
            .memory(WORDS)
            .and_then(|r| r.load_u64(0))
            .map_err(err("load"))?;
        if total != 2 * ADDS {
            return Err(format!("the counter is {total}, not {}", 2 * ADDS));
        }
    }
    // Leave in order: node 1 says bye and leaves once node 0 acknowledged it; node 0 leaves
    // only after seeing node 1 gone (otherwise its exit could swallow that acknowledgement).
    if me == NodeId(1) {
        let wr = ep
            .post_send(other, b"bye", Signal::Always)
            .map_err(err("send"))?;
        return ep.wait(wr, WAIT).map(drop).map_err(err("waiting for bye"));
    }
    match ep.recv(WAIT) {
        Ok(Some(Incoming::Message { data, .. })) if data == b"bye" => {}
        got => return Err(format!("expected 'bye' from {other}, got {got:?}")),
    }
    match ep.recv(WAIT) {
        Err(FabricError::PeerDead { peer, .. }) if peer == other => Ok(()),
        got => Err(format!("expected {other} to leave, got {got:?}")),
    }
}

/// Two namespaces with a veth pair; those created are deleted on drop.
struct Namespaces {
    a: String,
    b: String,
    created: Vec<String>,
}

impl Namespaces {
    fn create() -> Result<Namespaces, String> {
        let pid = std::process::id();
        let ns = Namespaces {
            a: format!("vsmp-{pid}-a"),
            b: format!("vsmp-{pid}-b"),
            created: Vec::new(),
        };
        let mut ns = ns;
        for name in [ns.a.clone(), ns.b.clone()] {
            ip(&["netns", "add", &name])?;
            ns.created.push(name);
        }
        let (va, vb) = (format!("vsa{pid}"), format!("vsb{pid}"));
        ip(&[
            "link", "add", &va, "netns", &ns.a, "type", "veth", "peer", "name", &vb, "netns", &ns.b,
        ])?;
        for (name, dev, addr) in [(&ns.a, &va, ADDR_A), (&ns.b, &vb, ADDR_B)] {
            ip(&["-n", name, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
            ip(&["-n", name, "link", "set", dev, "up"])?;
            ip(&["-n", name, "link", "set", "lo", "up"])?;
        }
        Ok(ns)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.created {
            if let Err(e) = ip(&["netns", "del", name]) {
                eprintln!("cleaning up namespace {name} failed: {e}");
            }
        }
    }
}

fn ip(args: &[&str]) -> Result<Output, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running `ip {}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Kills and reaps a node process when dropped.
struct NodeProcess(Child);

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_in(ns: &str, rank: u16) -> NodeProcess {
    let exe = std::env::current_exe().unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(exe)
        .args([
            "--ignored",
            "--exact",
            "netns_node_process",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(NODE_ENV, rank.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning a node through ip netns exec");
    NodeProcess(child)
}

/// Waits for the node to exit within the deadline; its success.
fn finished(node: &mut NodeProcess, deadline: Instant) -> Result<(), String> {
    loop {
        match node.0.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("the node process failed: {status}")),
            Ok(None) if Instant::now() > deadline => {
                return Err(format!("the node process ran past {NODE_DEADLINE:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for the node process: {e}")),
        }
    }
}

#[test]
fn two_nodes_in_network_namespaces_exchange_over_a_veth_pair() {
    let required = std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1");
    let ns = match Namespaces::create() {
        Ok(ns) => ns,
        Err(why) => {
            assert!(
                !required,
                "{REQUIRE_ENV}=1 but network namespaces are unavailable: {why}"
            );
            eprintln!(
                "SKIPPED: two_nodes_in_network_namespaces_exchange_over_a_veth_pair did NOT run \
                 because network namespaces are unavailable here ({why}); run as root with \
                 iproute2, or set {REQUIRE_ENV}=1 to make this a failure"
            );
            return;
        }
    };
    let deadline = Instant::now() + NODE_DEADLINE;
    let mut zero = spawn_in(&ns.a, 0);
    let mut one = spawn_in(&ns.b, 1);
    let r0 = finished(&mut zero, deadline);
    let r1 = finished(&mut one, deadline);
    drop((zero, one));
    drop(ns);
    r0.map_err(|e| format!("node 0 (in {ADDR_A}): {e}"))
        .unwrap();
    r1.map_err(|e| format!("node 1 (in {ADDR_B}): {e}"))
        .unwrap();
}
