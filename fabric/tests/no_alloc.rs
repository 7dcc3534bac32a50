//! Proves the data path allocates nothing on shm and tcp: posting writes (from registered
//! memory, 1 MiB of it, and inline), doorbells, `fetch_add`s and messages, and polling
//! completions and incoming items, with a counting global allocator armed over every thread of
//! the process (tcp's background threads included). A 1 MiB write that allocated nothing was
//! not staged through a buffer of ours: shm copied it once into the peer's mapping, tcp sent
//! it with one vectored write straight from the mapping.
//!
//! One test function per binary, so no other test allocates while the counter is armed. The
//! warm-up rounds let what is allocated once (queues grown to their working size, the frame
//! reader's buffer, message buffers pooled) settle first.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vsmp_fabric::shm::ShmFabric;
use vsmp_fabric::tcp::TcpFabric;
use vsmp_fabric::{
    Completion, Fabric, FabricError, GroupConfig, IncomingBatch, IncomingRef, LocalSlice, NodeId,
    RegionId, RegionSpec, RemoteAddr, Secret, Signal, Source, WrId,
};

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

const DATA: RegionId = RegionId(1);
const WORDS: RegionId = RegionId(2);
const SRC: RegionId = RegionId(3);
const MIB: usize = 1 << 20;

fn regions() -> Vec<RegionSpec> {
    vec![
        RegionSpec::open(DATA, MIB),
        RegionSpec::open(WORDS, 4096),
        RegionSpec::private(SRC, MIB),
    ]
}

fn config(rank: u16, bootstrap: &str, secret: &Secret) -> GroupConfig {
    GroupConfig::new(NodeId(rank), 2, regions(), bootstrap, secret.clone())
}

/// Until `done`, polls both endpoints (the target must poll to receive, and on tcp to read
/// its socket); fails past a deadline.
fn pump(
    group: &[Arc<dyn Fabric>],
    batch: &mut IncomingBatch,
    done: &mut [Completion],
    mut seen: impl FnMut(&[Completion], &IncomingBatch) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        batch.clear();
        group[1].poll_incoming(batch);
        let n = group[0].poll_completions(done);
        if seen(&done[..n], batch) {
            return;
        }
        assert!(Instant::now() < deadline, "the round never finished");
    }
}

/// Posts, retrying while the peer has not returned its credits yet (it polls in `pump`).
fn post(
    group: &[Arc<dyn Fabric>],
    batch: &mut IncomingBatch,
    mut f: impl FnMut() -> Result<WrId, FabricError>,
) -> WrId {
    loop {
        match f() {
            Err(FabricError::WouldBlock { .. }) => {
                batch.clear();
                group[1].poll_incoming(batch);
                assert!(batch.is_empty(), "every item was taken in its round");
                group[0].poll_completions(&mut []);
            }
            r => return r.expect("a post"),
        }
    }
}

/// One round of every kind of operation, 0 -> 1, and the polls that see it through.
fn round(group: &[Arc<dyn Fabric>], batch: &mut IncomingBatch, done: &mut [Completion]) {
    let (src, peer) = (&group[0], NodeId(1));
    let big = Source::Region(LocalSlice::new(SRC, 0, MIB as u64));
    let a = post(group, batch, || {
        src.post_write(peer, RemoteAddr::new(DATA, 0), big, None, Signal::Always)
    });
    let inline = Source::Inline(b"eight by");
    let b = post(group, batch, || {
        src.post_write(
            peer,
            RemoteAddr::new(DATA, 8),
            inline,
            Some(7),
            Signal::OnError,
        )
    });
    let c = post(group, batch, || {
        src.post_fetch_add(peer, RemoteAddr::new(WORDS, 0), 1)
    });
    let d = post(group, batch, || {
        src.post_send(peer, &[0x5e; 100], Signal::Always)
    });
    let _ = b;
    let mut completed = 0;
    let mut doorbell = false;
    let mut message = false;
    pump(group, batch, done, |cs, items| {
        for c in cs {
            assert!(c.is_ok(), "{c:?}");
            completed += 1;
        }
        for i in items.iter() {
            match i {
                IncomingRef::Doorbell { imm: 7, .. } => doorbell = true,
                IncomingRef::Message { data, .. } => message = data.len() == 100,
                other => panic!("unexpected {other:?}"),
            }
        }
        completed == 3 && doorbell && message
    });
    assert!(a < c && c < d);
}

fn check(name: &str, group: &[Arc<dyn Fabric>]) {
    let mut batch = IncomingBatch::new(16);
    let mut done = [Completion::EMPTY; 16];
    group[0]
        .memory(SRC)
        .unwrap()
        .write(0, &vec![0xa5; MIB])
        .unwrap();
    for _ in 0..200 {
        round(group, &mut batch, &mut done);
    }
    COUNT.store(0, Ordering::Relaxed);
    ARMED.store(true, Ordering::SeqCst);
    for _ in 0..500 {
        round(group, &mut batch, &mut done);
    }
    ARMED.store(false, Ordering::SeqCst);
    let count = COUNT.load(Ordering::Relaxed);
    assert_eq!(
        count, 0,
        "{name}: 500 rounds of posts and polls made {count} allocations"
    );
    let mut seen = vec![0u8; MIB];
    group[1].memory(DATA).unwrap().read(0, &mut seen).unwrap();
    assert!(
        seen[16..].iter().all(|&b| b == 0xa5),
        "{name}: the 1 MiB write arrived damaged"
    );
}

#[test]
fn posting_and_polling_allocate_nothing_on_shm_and_tcp() {
    let secret = Secret::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("boot");
    let path = path.to_str().unwrap();
    let shm: Vec<Arc<dyn Fabric>> = std::thread::scope(|s| {
        let joins: Vec<_> = (0..2u16)
            .map(|r| {
                let secret = &secret;
                s.spawn(move || ShmFabric::join(&config(r, path, secret)))
            })
            .collect();
        joins
            .into_iter()
            .map(|j| Arc::new(j.join().unwrap().unwrap()) as Arc<dyn Fabric>)
            .collect()
    });
    check("shm", &shm);
    drop(shm);
    let tcp: Vec<Arc<dyn Fabric>> = TcpFabric::local_group(&config(0, "unused", &secret))
        .unwrap()
        .into_iter()
        .map(|f| Arc::new(f) as Arc<dyn Fabric>)
        .collect();
    check("tcp", &tcp);
}
