//! Proves a node's write faults and fences allocate nothing once the engine is built and
//! warm: a write fault on an owned page (twin from the pool, protection output), a fence
//! (capture, diff, the sequencer's `fetch_add`, staging, the posted log entry and its
//! doorbell, applying its own batch) and, at the peer, receiving and applying the batch and
//! returning its log space, with a counting global allocator armed over every thread; the
//! fabric is the shm backend between two endpoints of this process.
//!
//! One test function per binary, so no other test allocates while the counter is armed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vsmp_coherence::engine::{Config, Engine, Gate, Output, Replica};
use vsmp_coherence::fabric::shm::ShmFabric;
use vsmp_coherence::fabric::{Fabric, GroupConfig, Memory, NodeId, Secret};
use vsmp_coherence::net::{self, Link, Sizes};
use vsmp_coherence::{Gpa, PAGE_BYTES, PageNo};

struct CountingAllocator;

static ARMED: AtomicBool = AtomicBool::new(false);
static COUNT: AtomicU64 = AtomicU64::new(0);

fn note_allocation() {
    if ARMED.load(Ordering::Relaxed) {
        COUNT.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the arguments it was given, so `System`'s
// guarantees hold unchanged; the counting touches only static atomics, which never allocate.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` via `alloc`/`realloc` above with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: forwarded unchanged; the caller upholds `alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        // SAFETY: `ptr` came from `System` with `layout`; forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const PAGES: usize = 64;

struct Ram(Arc<Memory>);

impl Replica for Ram {
    fn read(&self, gpa: Gpa, buf: &mut [u8]) {
        self.0.read(gpa.0, buf).unwrap();
    }
    fn write(&self, gpa: Gpa, data: &[u8]) {
        self.0.write(gpa.0, data).unwrap();
    }
}

struct Node {
    engine: Engine,
    link: Link,
    ram: Ram,
}

impl Node {
    fn drive(&mut self, now: u64) {
        self.link.poll(&mut self.engine, &self.ram, now).unwrap();
        self.engine.serve(&self.ram, now).unwrap();
        // Protection outputs have no VM process to go to here; the rest is the link's.
        self.link
            .carry(&mut self.engine, |o| {
                assert!(matches!(o, Output::Protect { .. }), "{o:?}");
            })
            .unwrap();
    }
}

fn pump(nodes: &mut [Node], now: u64, mut done: impl FnMut(&[Node]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done(nodes) {
        for n in nodes.iter_mut() {
            n.drive(now);
        }
        assert!(Instant::now() < deadline, "the round never finished");
    }
}

/// Node `w` writes a byte into its own page and fences; both nodes run until the fence is
/// through and the peer has applied the batch.
fn write_and_fence(nodes: &mut [Node], w: usize, page: PageNo, value: u8, now: u64) {
    let n = &mut nodes[w];
    let at = Gpa(page.gpa().0 + 8 * w as u64);
    if !n.engine.writable(page) {
        assert!(
            n.engine.write_fault(&n.ram, &[page], 0x1000, now),
            "the page is owned"
        );
    }
    n.ram.write(at, &[value]);
    n.engine.retired();
    n.engine.fence(&n.ram, now);
    let target = n.engine.last_ticket();
    pump(nodes, now, |ns| {
        ns[w].engine.gate() == Gate::Go && ns.iter().all(|n| n.engine.applied() >= target)
    });
    let mut b = [0u8];
    nodes[1 - w].ram.read(at, &mut b);
    assert_eq!(b[0], value, "the peer sees the store after the fence");
}

#[test]
fn write_faults_and_fences_allocate_nothing() {
    let cfg = |me: u16| Config {
        me: NodeId(me),
        nodes: 2,
        pages: PAGES,
        twins: 16,
        console_bytes: 256,
        flush_interval: u64::MAX,
        console_node: NodeId(0),
    };
    let sizes = Sizes {
        nodes: 2,
        guest_bytes: PAGES * PAGE_BYTES,
        max_batch: cfg(0).max_batch(),
    };
    let secret = Secret::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("boot");
    let path = path.to_str().unwrap();
    let guests: Vec<Arc<Memory>> = (0..2)
        .map(|_| Arc::new(Memory::create(net::GUEST, sizes.guest_bytes).unwrap()))
        .collect();
    let fabrics: Vec<Arc<dyn Fabric>> = std::thread::scope(|s| {
        let joins: Vec<_> = (0..2u16)
            .map(|r| {
                let (secret, guest) = (&secret, Arc::clone(&guests[r as usize]));
                s.spawn(move || {
                    let c =
                        GroupConfig::new(NodeId(r), 2, net::regions(sizes), path, secret.clone())
                            .register(guest);
                    ShmFabric::join(&c)
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| Arc::new(j.join().unwrap().unwrap()) as Arc<dyn Fabric>)
            .collect()
    });
    let mut nodes: Vec<Node> = fabrics
        .into_iter()
        .zip(guests)
        .enumerate()
        .map(|(i, (f, g))| Node {
            engine: Engine::new(cfg(i as u16)),
            link: Link::new(f, sizes),
            ram: Ram(g),
        })
        .collect();
    // Node 1 takes page 2 (node 0 owns everything at first): an ownership transfer.
    let (p0, p1) = (PageNo(1), PageNo(2));
    {
        let n = &mut nodes[1];
        assert!(!n.engine.write_fault(&n.ram, &[p1], 0x2000, 0));
    }
    pump(&mut nodes, 0, |ns| ns[1].engine.writable(p1));
    nodes[1].engine.retired();
    // Warm up: queues and recycled buffers reach their working size.
    for round in 0..50u8 {
        write_and_fence(&mut nodes, 0, p0, round, 1);
        write_and_fence(&mut nodes, 1, p1, round, 1);
    }
    COUNT.store(0, Ordering::Relaxed);
    ARMED.store(true, Ordering::Relaxed);
    for round in 0..200u8 {
        write_and_fence(&mut nodes, 0, p0, round ^ 0x5a, 2);
        write_and_fence(&mut nodes, 1, p1, round ^ 0xa5, 2);
    }
    ARMED.store(false, Ordering::Relaxed);
    let n = COUNT.load(Ordering::Relaxed);
    assert_eq!(n, 0, "write faults and fences allocated {n} times");
    let c = nodes[0].engine.counters();
    assert!(c.write_faults >= 250 && c.fences >= 250, "{c:?}");
}
