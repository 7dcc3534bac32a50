//! The trap path does not allocate: a guest that traps 20 times and one that traps 2000 times
//! cause the same number of heap allocations in the monitor (set-up and tear-down only).
//!
//! Its own test binary, because it counts allocations with a global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use vsmp_affinity::Placement;
use vsmp_monitor::marker::Marker;
use vsmp_monitor::vm::elf::GuestImage;
use vsmp_monitor::vm::memory::MemSize;
use vsmp_monitor::vm::run::{RunConfig, run_image};
use vsmp_monitor::vm::stats::TrapStats;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call unchanged to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout (see `alloc`).
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// `mov $n,%r12d; 1: xor %eax,%eax; int3; cpuid; dec %r12d; jnz 1b; xor %eax,%eax; int3;
/// out %al,$0xf4`.
fn cpuid_loop(n: u32) -> Vec<u8> {
    let mut code = vec![0x41, 0xbc];
    code.extend_from_slice(&n.to_le_bytes());
    code.extend_from_slice(&[0x31, 0xc0, 0xcc, 0x0f, 0xa2, 0x41, 0xff, 0xcc, 0x75, 0xf6]);
    code.extend_from_slice(&[0x31, 0xc0, 0xcc, 0xe6, 0xf4]);
    code
}

fn allocations_running(traps: u32, stats: bool) -> u64 {
    let image = GuestImage::flat(&cpuid_loop(traps), Marker::Int3);
    let config = RunConfig {
        mem: MemSize::new(2 << 20).unwrap(),
        marker: Marker::Int3,
        placement: Placement::Unpinned,
    };
    let mut stats = stats.then(TrapStats::new);
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let status = run_image(&image, &config, Box::new(std::io::sink()), stats.as_mut()).unwrap();
    let after = ALLOCATIONS.load(Ordering::Relaxed);
    assert_eq!(status, 0);
    if let Some(s) = &stats {
        assert_eq!(s.total(), u64::from(traps) + 1);
    }
    after - before
}

#[test]
fn the_number_of_allocations_does_not_grow_with_the_number_of_traps() {
    // A first run pays one-time initialisation (lazily built tables, first use of stdio...).
    allocations_running(1, true);
    for stats in [false, true] {
        let few = allocations_running(20, stats);
        let many = allocations_running(2000, stats);
        assert_eq!(
            few, many,
            "stats {stats}: 20 traps -> {few} allocations, 2000 -> {many}"
        );
    }
}
